//! The capability object (`experimental.crp`, v0.2 §4) and `GET /.well-known/crp`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::CrpError;

/// An operation a provider implements. `features` MUST list only implemented ones and MUST
/// include `use` (v0.2 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// `crp/use`.
    Use,
    /// `crp/resolve` (v0.1 only).
    Resolve,
    /// `crp/lease`.
    Lease,
    /// `crp/revoke`.
    Revoke,
    /// `crp/list`.
    List,
    /// Delegated child leases.
    Delegate,
    /// Brokered short-lived tokens.
    Broker,
    /// Classification labels.
    Classify,
    /// Client-side consent (v0.1 client capability).
    Consent,
}

/// Conformance tier (v0.2 §8).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ConformanceTier {
    /// `crp/use`, lease lifecycle, audit by default.
    Basic,
    /// Basic + list, revoke, version negotiation, classification.
    Standard,
    /// Standard + delegation, brokering, graduated outcomes, policy enforcement.
    Full,
}

impl ConformanceTier {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Basic => "basic",
            Self::Standard => "standard",
            Self::Full => "full",
        }
    }
}

/// `experimental.crp`: what a provider (or client) speaks.
///
/// ```
/// use crp_core::types::{Capability, Feature};
/// let c: Capability = serde_json::from_str(
///     r#"{"version":"0.2","provider":"v","features":["use"],"conformance":"basic"}"#).unwrap();
/// assert!(c.features.contains(&Feature::Use));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capability {
    /// The negotiated (or newest) version, `MAJOR.MINOR`.
    #[schemars(regex(pattern = r"^[0-9]+\.[0-9]+$"))]
    pub version: String,
    /// Every version the provider speaks, newest first (this implementation's addition).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[0-9]+\.[0-9]+$")))]
    pub versions: Vec<String>,
    /// Provider name. Absent in a client's capability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Implemented operations.
    pub features: Vec<Feature>,
    /// The tier the provider claims (v0.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conformance: Option<ConformanceTier>,
}

impl Capability {
    /// Reject what the schema forbids: `version` (and each of `versions`) must be
    /// `MAJOR.MINOR`.
    ///
    /// ```
    /// use crp_core::types::{Capability, Feature};
    /// let mut c = Capability { version: "0.2".into(), versions: vec![], provider: None,
    ///                          features: vec![Feature::Use], conformance: None };
    /// assert!(c.validate().is_ok());
    /// c.version = "v2".into();
    /// assert_eq!(c.validate().unwrap_err().code, -32602);
    /// ```
    pub fn validate(&self) -> Result<(), CrpError> {
        let well_formed = |v: &str| {
            v.split_once('.').is_some_and(|(a, b)| {
                [a, b].iter().all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
            })
        };
        if !well_formed(&self.version) || !self.versions.iter().all(|v| well_formed(v)) {
            return Err(CrpError::invalid_params("capability versions must be MAJOR.MINOR"));
        }
        Ok(())
    }

    /// Whether a provider's capability says what v0.2 §4 requires of it: `features` includes
    /// `use` and the provider is named.
    ///
    /// ```
    /// use crp_core::types::{Capability, Feature};
    /// let c = Capability { version: "0.2".into(), versions: vec![], provider: Some("v".into()),
    ///                      features: vec![Feature::List], conformance: None };
    /// assert!(!c.is_conforming_provider());
    /// ```
    pub fn is_conforming_provider(&self) -> bool {
        self.features.contains(&Feature::Use) && self.provider.is_some()
    }
}
