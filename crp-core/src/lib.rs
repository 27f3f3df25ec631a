//! # crp-core
//!
//! The Credential Resolution Protocol (CRP) without any transport or storage: the wire types
//! of v0.1 and v0.2, the JSON-RPC 2.0 envelope, one error registry, version negotiation, the
//! [`Provider`] trait and the [`Dispatcher`] that turns raw JSON-RPC messages into calls on a
//! provider. HTTP, stdio and MCP transports are each a thin shell around [`Dispatcher`].
//!
//! Layering, lowest first:
//! - [`secret`]: credential material in zeroizing types whose `Debug` prints nothing secret;
//! - [`types`]: every CRP request, result and shared object, camelCase as the spec spells it;
//! - [`jsonrpc`]: the JSON-RPC 2.0 envelope (requests, notifications, batches, ids);
//! - [`error`]: the error registry; `data` is typed so it cannot carry a secret;
//! - [`version`]: `MAJOR.MINOR` negotiation;
//! - [`provider`] and [`dispatch`]: the seam between protocol and implementation;
//! - [`signing`]: the Ed25519 request signature agents put on HTTP calls;
//! - [`schema`]: the list of messages exported as JSON Schema files.
//!
//! ## Serving CRP
//!
//! Implement [`Provider`] (only `crp/use` and the capability are required; the other methods
//! answer -33011 until implemented), wrap it in a [`Dispatcher`], negotiate the caller's
//! version, and hand every raw message to [`Dispatcher::handle_bytes`]. It answers `None`
//! for notifications, and never echoes a value the caller misplaced into an error.
//!
//! ```
//! use std::sync::Arc;
//! use async_trait::async_trait;
//! use crp_core::provider::Transport;
//! use crp_core::types::*;
//! use crp_core::{CallContext, CrpError, Dispatcher, Provider, Version};
//!
//! struct OneService;
//!
//! #[async_trait]
//! impl Provider for OneService {
//!     fn capability(&self, version: Version) -> Capability {
//!         Capability {
//!             version: version.to_string(),
//!             versions: vec!["0.2".into(), "0.1".into()],
//!             provider: Some("one-service".into()),
//!             features: vec![Feature::Use],
//!             conformance: Some(ConformanceTier::Basic),
//!         }
//!     }
//!
//!     async fn use_credential(&self, _ctx: &CallContext, p: UseParams) -> Result<UseResult, CrpError> {
//!         if p.service != "github.com/api" {
//!             return Err(CrpError::service_not_found(&p.service));
//!         }
//!         Ok(UseResult {
//!             lease: Lease {
//!                 id: "lease-7f3a".into(),
//!                 expires_at: "2026-07-17T13:00:00Z".into(),
//!                 ttl: p.ttl.unwrap_or(3600),
//!                 renewable: true,
//!                 delegation_depth: Some(0),
//!             },
//!             proxy_base_url: "http://127.0.0.1:7700/api/v1/proxy/t/lease-7f3a".into(),
//!             session_token: Some("st-1".into()),
//!             service: p.service,
//!             granted_scopes: p.scopes,
//!             credential_descriptor: CredentialDescriptor {
//!                 credential_type: CredentialType::OauthBearer,
//!                 brokered: false,
//!                 auto_refresh: false,
//!                 classification: Classification::Confidential,
//!             },
//!         })
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let dispatcher = Dispatcher::new(Arc::new(OneService));
//! // The caller sent `CRP-Version: 0.2` (or nothing): negotiate, then dispatch.
//! let version = crp_core::version::negotiate(Some("0.2")).unwrap();
//! let ctx = CallContext::new("agent-1", Transport::Http).with_version(version);
//!
//! let answer = dispatcher
//!     .handle_bytes(&ctx, br#"{"jsonrpc":"2.0","id":1,"method":"crp/use","params":{"service":"github.com/api","ttl":600}}"#)
//!     .await
//!     .unwrap();
//! let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
//! assert_eq!(answer["result"]["lease"]["ttl"], 600);
//!
//! // Bad params never reach the provider, and the misplaced value is not echoed.
//! let answer = dispatcher
//!     .handle_bytes(&ctx, br#"{"jsonrpc":"2.0","id":2,"method":"crp/use","params":{"service":"x","ttl":"sk-live-123"}}"#)
//!     .await
//!     .unwrap();
//! assert!(answer.contains("-32602") && !answer.contains("sk-live-123"));
//!
//! // Notifications get no answer.
//! let none = dispatcher.handle_bytes(&ctx, br#"{"jsonrpc":"2.0","method":"crp/list"}"#).await;
//! assert!(none.is_none());
//! # });
//! ```
//!
//! ## Versions
//!
//! ```
//! use crp_core::version::{negotiate, Version};
//! assert_eq!(negotiate(Some("0.2")).unwrap(), Version::V0_2);
//! assert_eq!(negotiate(Some("0.9")).unwrap(), Version::V0_2); // lower minor wins
//! assert_eq!(negotiate(Some("1.0")).unwrap_err().code, -33001);
//! ```
//!
//! ## Testing
//!
//! `cargo test -p crp-core` runs the data-driven vectors in `spec-vectors/`, the schema drift
//! check against `schemas/`, and property tests over every wire type.

#![warn(missing_docs)]
#![warn(rustdoc::broken_intra_doc_links)]
// CrpError is ~300 bytes (typed, optional data fields); errors are off the hot path and a
// boxed error would make every call site clumsier.
#![allow(clippy::result_large_err, clippy::large_enum_variant)]

pub mod dispatch;
pub mod error;
pub mod fixtures;
pub mod jsonrpc;
pub mod methods;
pub mod provider;
pub mod schema;
pub mod secret;
pub mod signing;
pub mod types;
pub mod version;

pub use dispatch::Dispatcher;
pub use error::{CrpError, ErrorCode, ErrorData};
pub use provider::{CallContext, Provider};
pub use secret::SecretValue;
pub use version::Version;
