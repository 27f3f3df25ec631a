//! `crp/resolve` (v0.1 §6.1): credential material. Superseded by `crp/use`; this
//! implementation answers it only under version 0.1, where a policy permits the export.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    CredentialType, Lease, RequestContext, validate_scopes, validate_service, validate_ttl,
};
use super::material::CredentialMaterial;
use crate::error::CrpError;

/// `crp/resolve` params.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResolveParams {
    /// Service identifier.
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._/-]+$"), length(min = 1, max = 256))]
    pub service: String,
    /// Requested scopes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Expected credential type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_type: Option<CredentialType>,
    /// Requested lifetime in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub ttl: Option<u32>,
    /// Who asks and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<RequestContext>,
}

impl ResolveParams {
    /// Reject what the schema forbids.
    pub fn validate(&self) -> Result<(), CrpError> {
        validate_service(&self.service)?;
        validate_scopes(&self.scopes)?;
        validate_ttl(self.ttl)?;
        match &self.context {
            Some(c) => c.validate(),
            None => Ok(()),
        }
    }
}

/// Provenance of a resolve result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolveMetadata {
    /// Provider name.
    pub provider: String,
    /// RFC 3339 instant of the export.
    #[schemars(extend("format" = "date-time"))]
    pub resolved_at: String,
}

/// `crp/resolve` result. Carries material: never produced outside an audited export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolveResult {
    /// The material.
    pub credential: CredentialMaterial,
    /// The lease that tracks it.
    pub lease: Lease,
    /// The service, echoed (REQUIRED, v0.1 §6.1).
    pub service: String,
    /// Scopes granted.
    #[serde(default)]
    pub granted_scopes: Vec<String>,
    /// Provenance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<ResolveMetadata>,
}
