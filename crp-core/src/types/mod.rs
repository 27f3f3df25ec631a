//! Every CRP wire type of v0.1 and v0.2, one module per method plus the shared objects.
//!
//! Field names are camelCase exactly as the spec spells them. Request params reject unknown
//! fields (a misspelt `servce` is an error, not a silently ignored option; the spec itself
//! never closes an object, so this is this implementation's choice); results are open so
//! that newer providers can add fields without breaking older clients. Every params type has
//! a `validate()` for what serde cannot express (service pattern, TTL range, lengths); the
//! [`crate::Dispatcher`] calls both.
//!
//! ```
//! use crp_core::types::{UseParams, UseResult};
//!
//! // The request of v0.2 §5.1.
//! let p: UseParams = serde_json::from_value(serde_json::json!({
//!     "service": "github.com/api", "scopes": ["repo:read"], "ttl": 3600,
//!     "delegation": {"parentLeaseId": "lease-1", "maxDepth": 2},
//!     "context": {"consumer": "mcp-github", "purpose": "list repos"}
//! })).unwrap();
//! assert!(p.validate().is_ok());
//! assert_eq!(p.delegation.unwrap().max_depth, Some(2));
//!
//! // Its result: a handle, never material.
//! let r: UseResult = serde_json::from_value(serde_json::json!({
//!     "lease": {"id": "lease-7f3a", "expiresAt": "2026-07-17T13:00:00Z", "ttl": 3600,
//!               "renewable": true, "delegationDepth": 0},
//!     "proxyBaseUrl": "http://127.0.0.1:7700/api/v1/proxy/t/lease-7f3a",
//!     "service": "github.com/api", "grantedScopes": ["repo:read"],
//!     "credentialDescriptor": {"type": "oauth_bearer", "brokered": false,
//!                              "autoRefresh": false, "classification": "confidential"}
//! })).unwrap();
//! assert_eq!(r.lease.delegation_depth, Some(0));
//! ```

mod capability;
mod common;
pub mod ext;
mod lease;
mod list;
mod material;
mod resolve;
mod revoke;
mod use_;

pub use capability::{Capability, ConformanceTier, Feature};
pub use common::{
    Classification, CredentialDescriptor, CredentialType, Lease, RequestContext, MAX_TEXT_CHARS, MAX_TTL_SECONDS,
    validate_scopes, validate_service, validate_ttl,
};
pub use lease::{LeaseAction, LeaseParams, LeaseReleased, LeaseRenewed, LeaseResult};
pub use list::{ListFilter, ListParams, ListResult, ServiceEntry, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT};
pub use material::CredentialMaterial;
pub use resolve::{ResolveMetadata, ResolveParams, ResolveResult};
pub use revoke::{RevokeParams, RevokeReason, RevokeResult};
pub use use_::{Delegation, UseParams, UseResult};
