//! Every CRP wire type of v0.1 and v0.2, one module per method plus the shared objects.
//!
//! Field names are camelCase exactly as the spec spells them. Requests reject unknown
//! fields only where the spec closes the object; results are open so that newer providers
//! can add fields without breaking older clients.

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
    Classification, CredentialDescriptor, CredentialType, Lease, RequestContext, MAX_TTL_SECONDS,
    validate_scopes, validate_service, validate_ttl,
};
pub use lease::{LeaseAction, LeaseParams, LeaseReleased, LeaseRenewed, LeaseResult};
pub use list::{ListFilter, ListParams, ListResult, ServiceEntry, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT};
pub use material::CredentialMaterial;
pub use resolve::{ResolveMetadata, ResolveParams, ResolveResult};
pub use revoke::{RevokeParams, RevokeReason, RevokeResult};
pub use use_::{Delegation, UseParams, UseResult};
