//! Credential material (v0.1 §7 and v0.2's `basic_auth`): only ever on the wire in the
//! policy-gated v0.1 export, `crp/resolve`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::CredentialType;
use crate::secret::SecretValue;

fn default_header() -> String {
    "Authorization".into()
}
fn default_prefix() -> Option<String> {
    Some("Bearer".into())
}
fn default_token_type() -> String {
    "Bearer".into()
}

/// Credential material, tagged by `type`. Secret fields are [`SecretValue`]s, so `Debug`
/// never shows them.
///
/// ```
/// use crp_core::types::{CredentialMaterial, CredentialType};
/// let m: CredentialMaterial = serde_json::from_str(r#"{"type":"api_key","key":"sk-1"}"#).unwrap();
/// assert_eq!(m.credential_type(), CredentialType::ApiKey);
/// assert!(!format!("{m:?}").contains("sk-1"));
/// // The spec's defaults are filled in.
/// assert_eq!(serde_json::to_string(&m).unwrap(),
///            r#"{"type":"api_key","key":"sk-1","header":"Authorization","prefix":"Bearer"}"#);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CredentialMaterial {
    /// v0.1 §7.1.
    ApiKey {
        /// The key.
        key: SecretValue,
        /// Header to send it in.
        #[serde(default = "default_header")]
        header: String,
        /// Prefix before the key, `Bearer` when absent; `null` means no prefix (the key is
        /// the whole header value). Always written, so that "no prefix" survives a round trip.
        #[serde(default = "default_prefix")]
        prefix: Option<String>,
    },
    /// v0.1 §7.2.
    OauthBearer {
        /// The access token.
        token: SecretValue,
        /// Token type, `Bearer` by default.
        #[serde(default = "default_token_type", rename = "tokenType")]
        token_type: String,
        /// Seconds until the token expires.
        #[serde(default, rename = "expiresIn", skip_serializing_if = "Option::is_none")]
        expires_in: Option<u64>,
    },
    /// v0.2 §6.1.
    BasicAuth {
        /// User name.
        username: String,
        /// Password.
        password: SecretValue,
    },
    /// v0.1 §7.3.
    ClientCertificate {
        /// PEM certificate.
        certificate: String,
        /// PEM private key.
        #[serde(rename = "privateKey")]
        private_key: SecretValue,
        /// Intermediate certificates.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        chain: Vec<String>,
        /// Passphrase of the private key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        passphrase: Option<SecretValue>,
    },
    /// v0.1 §7.4.
    ConnectionString {
        /// The connection string.
        value: SecretValue,
        /// e.g. `postgresql`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dialect: Option<String>,
    },
    /// v0.1 §7.5.
    Custom {
        /// Provider-defined type name (`x-` prefixed by convention).
        #[serde(rename = "customType")]
        custom_type: String,
        /// Provider-defined fields; every value is treated as secret.
        data: BTreeMap<String, SecretValue>,
    },
}

impl CredentialMaterial {
    /// The type tag.
    pub fn credential_type(&self) -> CredentialType {
        match self {
            Self::ApiKey { .. } => CredentialType::ApiKey,
            Self::OauthBearer { .. } => CredentialType::OauthBearer,
            Self::BasicAuth { .. } => CredentialType::BasicAuth,
            Self::ClientCertificate { .. } => CredentialType::ClientCertificate,
            Self::ConnectionString { .. } => CredentialType::ConnectionString,
            Self::Custom { .. } => CredentialType::Custom,
        }
    }
}
