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
//! ```
//! use crp_core::version::{negotiate, Version};
//! assert_eq!(negotiate(Some("0.2")).unwrap(), Version::V0_2);
//! assert_eq!(negotiate(Some("0.9")).unwrap(), Version::V0_2); // lower minor wins
//! assert_eq!(negotiate(Some("1.0")).unwrap_err().code, -33001);
//! ```

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
