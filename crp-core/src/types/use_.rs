//! `crp/use` (v0.2 §5.1): obtain a use-handle. The result never carries credential material.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    CredentialDescriptor, Lease, RequestContext, validate_scopes, validate_service, validate_ttl,
};
use crate::error::CrpError;

/// A request for a delegated child lease (v0.2 §5.5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delegation {
    /// The lease the child derives from; the caller must hold it.
    #[schemars(length(min = 1, max = 256))]
    pub parent_lease_id: String,
    /// The deepest chain the caller accepts below the root; the provider caps it further.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub max_depth: Option<u32>,
}

/// `crp/use` params.
///
/// ```
/// use crp_core::types::UseParams;
/// let p: UseParams = serde_json::from_str(r#"{"service":"github.com/api","ttl":0}"#).unwrap();
/// assert_eq!(p.validate().unwrap_err().code, -32602); // ttl is 1..=86400
/// assert!(serde_json::from_str::<UseParams>(r#"{"servce":"github.com/api"}"#).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UseParams {
    /// Service identifier, e.g. `github.com/api`.
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._/-]+$"), length(min = 1, max = 256))]
    pub service: String,
    /// Requested scopes; the grant may be narrower, never wider.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Requested lifetime in seconds; the grant may be shorter, never longer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub ttl: Option<u32>,
    /// Ask for a child of an existing lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation: Option<Delegation>,
    /// Identity to broker a token for (v0.2 §6.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub identity_scope: Option<String>,
    /// Who asks and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<RequestContext>,
}

impl UseParams {
    /// Reject what the schema forbids, with -32602 and a message that names the field.
    pub fn validate(&self) -> Result<(), CrpError> {
        validate_service(&self.service)?;
        validate_scopes(&self.scopes)?;
        validate_ttl(self.ttl)?;
        if self.identity_scope.as_ref().is_some_and(|s| s.is_empty() || s.chars().count() > 256) {
            return Err(CrpError::invalid_params("identityScope must be 1 to 256 characters"));
        }
        if let Some(c) = &self.context {
            c.validate()?;
        }
        if let Some(d) = &self.delegation {
            if d.parent_lease_id.is_empty() || d.parent_lease_id.chars().count() > 256 {
                return Err(CrpError::invalid_params(
                    "delegation.parentLeaseId must be 1 to 256 characters",
                ));
            }
            if matches!(d.max_depth, Some(0) | Some(17..)) {
                return Err(CrpError::invalid_params(
                    "delegation.maxDepth must be between 1 and 16",
                ));
            }
        }
        Ok(())
    }
}

/// `crp/use` result: a lease and the URL to send ordinary HTTP through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UseResult {
    /// The lease.
    pub lease: Lease,
    /// Stable for the life of the lease, renewals included.
    #[schemars(extend("format" = "uri"))]
    pub proxy_base_url: String,
    /// Per-lease bearer token the proxy requires (`Authorization: Bearer`, `x-api-key` or
    /// `api-key`); it is not the credential. Present in this implementation; v0.2 §12 names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_token: Option<String>,
    /// The service granted.
    pub service: String,
    /// Scopes granted (a subset of those requested).
    pub granted_scopes: Vec<String>,
    /// What kind of credential is behind the handle.
    pub credential_descriptor: CredentialDescriptor,
}
