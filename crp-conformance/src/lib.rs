//! # crp-conformance
//!
//! Tests any Credential Resolution Protocol provider against the spec (v0.2, and v0.1 for
//! providers that still speak it) over HTTP, stdio or MCP, and explains every failure with
//! the evidence: what was sent, what came back (secrets masked) and which rule it broke.
//!
//! Layers, lowest first:
//! - [`echo`]: the loopback upstream every fixture credential points at; records what the
//!   provider's proxy delivered, never echoes a secret (except its `/reflect` endpoint);
//! - [`leaks`]: finds canaries in any encoding, masks them in evidence;
//! - [`transport`]: raw JSON-RPC over HTTP, stdio and MCP, replies matched by id;
//! - [`catalog`] and [`cases`]: the cases, one module per spec area, each with a stable id,
//!   tier, spec section and RFC 2119 level;
//! - [`ctx`]: what a case sees (calls, proxy requests, evidence);
//! - [`runner`]: selection, scheduling, verdicts; [`report`]: text, JSON, JUnit, HTML.
//!
//! The provider under test needs nothing beyond the protocol and the fixtures
//! ([`crp_core::fixtures`], printed by `crp-conformance fixtures`).
//!
//! ```
//! let cases = crp_conformance::cases::all();
//! assert!(cases.iter().any(|c| c.meta.id == "use.no-secret-in-result"));
//! ```

pub mod catalog;
pub mod cases;
pub mod ctx;
pub mod echo;
pub mod leaks;
pub mod report;
pub mod runner;
pub mod schemas;
pub mod transport;

pub use runner::{RunConfig, RunReport, Target, run};

/// Install the process-wide TLS crypto provider (ring) that the HTTP client needs. Idempotent;
/// [`run`] calls it.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
