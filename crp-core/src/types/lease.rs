//! `crp/lease` (v0.1 §6.2, v0.2 §5.3): renew or release.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Lease, validate_ttl};
use super::material::CredentialMaterial;
use crate::error::CrpError;

/// What to do with the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LeaseAction {
    /// Extend by `ttl` (never past the lease's maximum).
    Renew,
    /// Give it up now.
    Release,
}

/// `crp/lease` params.
///
/// ```
/// use crp_core::types::{LeaseAction, LeaseParams};
/// let p: LeaseParams = serde_json::from_str(r#"{"action":"renew","leaseId":"lease-1","ttl":1800}"#).unwrap();
/// assert_eq!(p.action, LeaseAction::Renew);
/// assert!(p.validate().is_ok());
/// assert!(serde_json::from_str::<LeaseParams>(r#"{"action":"extend","leaseId":"l"}"#).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaseParams {
    /// Renew or release.
    pub action: LeaseAction,
    /// The lease.
    #[schemars(length(min = 1, max = 256))]
    pub lease_id: String,
    /// Requested increment for a renewal, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub ttl: Option<u32>,
}

impl LeaseParams {
    /// Reject what the schema forbids.
    pub fn validate(&self) -> Result<(), CrpError> {
        if self.lease_id.is_empty() || self.lease_id.chars().count() > 256 {
            return Err(CrpError::invalid_params("leaseId must be 1 to 256 characters"));
        }
        validate_ttl(self.ttl)
    }
}

/// A renewed lease. The `proxyBaseUrl` is the one `crp/use` returned: renewals never move it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRenewed {
    /// The lease with its new expiry.
    pub lease: Lease,
    /// Unchanged proxy URL (v0.2 §5.3), when the lease came from `crp/use`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_base_url: Option<String>,
    /// v0.1 §6.2 only: a rotated credential for a lease that came from `crp/resolve` (an
    /// export). Never present for a `crp/use` lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialMaterial>,
}

/// A released lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeaseReleased {
    /// Always true.
    pub released: bool,
    /// The lease released.
    pub lease_id: String,
}

/// `crp/lease` result: the shape depends on the action.
///
/// ```
/// use crp_core::types::LeaseResult;
/// let r: LeaseResult = serde_json::from_str(r#"{"released":true,"leaseId":"lease-1"}"#).unwrap();
/// assert!(matches!(r, LeaseResult::Released(ref x) if x.lease_id == "lease-1"));
/// let r: LeaseResult = serde_json::from_str(
///     r#"{"lease":{"id":"lease-1","expiresAt":"2026-07-17T14:00:00Z","ttl":3600,"renewable":true}}"#).unwrap();
/// assert!(matches!(r, LeaseResult::Renewed(_)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum LeaseResult {
    /// After `renew`.
    Renewed(LeaseRenewed),
    /// After `release`.
    Released(LeaseReleased),
}
