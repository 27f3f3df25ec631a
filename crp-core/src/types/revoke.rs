//! `crp/revoke` (v0.1 §6.3, v0.2 §5.4): revoke a lease and its whole delegated subtree.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::CrpError;

/// Why a lease is revoked (v0.1 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RevokeReason {
    /// The credential leaked.
    CredentialCompromised,
    /// The holder broke policy.
    PolicyViolation,
    /// An operator said so.
    ManualRevocation,
    /// The credential is being rotated.
    Rotation,
}

impl RevokeReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CredentialCompromised => "credential_compromised",
            Self::PolicyViolation => "policy_violation",
            Self::ManualRevocation => "manual_revocation",
            Self::Rotation => "rotation",
        }
    }
}

/// `crp/revoke` params.
///
/// ```
/// use crp_core::types::{RevokeParams, RevokeReason};
/// let p: RevokeParams = serde_json::from_str(
///     r#"{"leaseId":"lease-7f3a9b2c","reason":"credential_compromised","detail":"in logs"}"#).unwrap();
/// assert_eq!(p.reason, RevokeReason::CredentialCompromised);
/// assert!(p.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RevokeParams {
    /// The lease to revoke.
    #[schemars(length(min = 1, max = 256))]
    pub lease_id: String,
    /// Why.
    pub reason: RevokeReason,
    /// Free-text detail for the audit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub detail: Option<String>,
}

impl RevokeParams {
    /// Reject what the schema forbids.
    pub fn validate(&self) -> Result<(), CrpError> {
        if self.lease_id.is_empty() || self.lease_id.chars().count() > 256 {
            return Err(CrpError::invalid_params("leaseId must be 1 to 256 characters"));
        }
        if self.detail.as_ref().is_some_and(|d| d.chars().count() > 1024) {
            return Err(CrpError::invalid_params("detail must be at most 1024 characters"));
        }
        Ok(())
    }
}

/// `crp/revoke` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevokeResult {
    /// Always true on success.
    pub revoked: bool,
    /// The lease named in the request.
    pub lease_id: String,
    /// RFC 3339 instant.
    #[schemars(extend("format" = "date-time"))]
    pub revoked_at: String,
    /// Leases revoked along with it: every delegated descendant (v0.2 §5.4 MUST); v0.1's
    /// examples also list the named lease itself. Always written by this implementation;
    /// OPTIONAL in v0.1, so absent reads as empty.
    #[serde(default)]
    pub affected_leases: Vec<String>,
}
