//! `crp/list` (v0.1 §6.4, v0.2 §5.2): discover services. Never carries material.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Classification, CredentialType, MAX_TEXT_CHARS, RequestContext};
use crate::error::CrpError;

/// Page size when `limit` is absent (v0.1 §6.4).
pub const DEFAULT_LIST_LIMIT: u32 = 50;
/// Largest page a caller may ask for.
pub const MAX_LIST_LIMIT: u32 = 500;

/// Narrow the listing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListFilter {
    /// Only services starting with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub service_prefix: Option<String>,
    /// Only credentials of this type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_type: Option<CredentialType>,
}

/// `crp/list` params.
///
/// ```
/// use crp_core::types::ListParams;
/// let p: ListParams = serde_json::from_str(r#"{"filter":{"servicePrefix":"github.com/"}}"#).unwrap();
/// assert_eq!(p.effective_limit(), 50); // v0.1 §6.4 default
/// assert!(p.validate().is_ok());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListParams {
    /// Filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<ListFilter>,
    /// Who asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<RequestContext>,
    /// Opaque cursor from a previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub cursor: Option<String>,
    /// Page size, 1..=500 (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 500))]
    pub limit: Option<u32>,
}

impl ListParams {
    /// Reject what the schema forbids.
    pub fn validate(&self) -> Result<(), CrpError> {
        if matches!(self.limit, Some(0)) || self.limit.is_some_and(|l| l > MAX_LIST_LIMIT) {
            return Err(CrpError::invalid_params(format!(
                "limit must be between 1 and {MAX_LIST_LIMIT}"
            )));
        }
        if self.cursor.as_ref().is_some_and(|c| c.chars().count() > MAX_TEXT_CHARS) {
            return Err(CrpError::invalid_params(format!("cursor must be at most {MAX_TEXT_CHARS} characters")));
        }
        if self.filter.as_ref().and_then(|f| f.service_prefix.as_ref()).is_some_and(|p| p.chars().count() > 256) {
            return Err(CrpError::invalid_params("filter.servicePrefix must be at most 256 characters"));
        }
        match &self.context {
            Some(c) => c.validate(),
            None => Ok(()),
        }
    }

    /// The effective page size.
    pub fn effective_limit(&self) -> u32 {
        self.limit.unwrap_or(DEFAULT_LIST_LIMIT)
    }
}

/// One service in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    /// Service identifier.
    pub service: String,
    /// Credential types offered for it.
    pub credential_types: Vec<CredentialType>,
    /// Scopes a lease may be granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_scopes: Option<Vec<String>>,
    /// Longest TTL granted, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ttl: Option<u32>,
    /// Human description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Sensitivity label (v0.2 classification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classification: Option<Classification>,
}

/// `crp/list` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListResult {
    /// This page.
    pub services: Vec<ServiceEntry>,
    /// Cursor for the next page; absent (or null) on the last.
    #[serde(default)]
    pub cursor: Option<String>,
}
