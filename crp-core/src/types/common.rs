//! Objects shared by several methods: classification, credential type, lease, context.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::CrpError;

/// The largest TTL a request may ask for (v0.1 §6.1: `ttl` 1..86400).
pub const MAX_TTL_SECONDS: u32 = 86_400;

/// Sensitivity label. The declaration order is the spec's order, so `Ord` compares them:
/// `public < internal < confidential < restricted` (v0.2 §3).
///
/// ```
/// use crp_core::types::Classification;
/// assert!(Classification::Public < Classification::Restricted);
/// let c: Classification = "confidential".parse().unwrap();
/// assert!(c >= Classification::Internal);
/// assert_eq!(serde_json::to_string(&c).unwrap(), r#""confidential""#);
/// assert!("secret".parse::<Classification>().is_err());
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Classification {
    /// May be shown to anyone.
    Public,
    /// Inside the organisation.
    Internal,
    /// Need to know.
    Confidential,
    /// Highest sensitivity.
    Restricted,
}

impl Classification {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Internal => "internal",
            Self::Confidential => "confidential",
            Self::Restricted => "restricted",
        }
    }
}

impl std::str::FromStr for Classification {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "public" => Ok(Self::Public),
            "internal" => Ok(Self::Internal),
            "confidential" => Ok(Self::Confidential),
            "restricted" => Ok(Self::Restricted),
            other => Err(format!(
                "unknown classification `{other}` (expected public, internal, confidential or restricted)"
            )),
        }
    }
}

/// The credential types: the five of v0.1 §7 plus v0.2's `basic_auth`.
///
/// ```
/// use crp_core::types::CredentialType;
/// let t: CredentialType = "oauth_bearer".parse().unwrap();
/// assert_eq!(t, CredentialType::OauthBearer);
/// assert_eq!(t.as_str(), "oauth_bearer");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CredentialType {
    /// An API key sent in a header (or query parameter).
    ApiKey,
    /// An OAuth bearer token.
    OauthBearer,
    /// Username and password (v0.2).
    BasicAuth,
    /// A client certificate with private key.
    ClientCertificate,
    /// A database connection string.
    ConnectionString,
    /// Anything else, described by `customType`.
    Custom,
}

impl CredentialType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ApiKey => "api_key",
            Self::OauthBearer => "oauth_bearer",
            Self::BasicAuth => "basic_auth",
            Self::ClientCertificate => "client_certificate",
            Self::ConnectionString => "connection_string",
            Self::Custom => "custom",
        }
    }
}

impl std::str::FromStr for CredentialType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
            format!(
                "unknown credential type `{s}` (expected api_key, oauth_bearer, basic_auth, client_certificate, connection_string or custom)"
            )
        })
    }
}

/// Who asks and why (v0.1 §6.1 `context`, v0.2 §5.1). Every field is optional and audited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestContext {
    /// The MCP server or program that will use the credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub consumer: Option<String>,
    /// Its version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub consumer_version: Option<String>,
    /// The end user or agent on whose behalf the consumer acts (v0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub requestor: Option<String>,
    /// Human-readable reason; policies may require it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub purpose: Option<String>,
    /// Correlates provider audit entries with the caller's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub trace_id: Option<String>,
}

/// The longest string accepted in a request's `context` fields and other free text, in
/// characters.
pub const MAX_TEXT_CHARS: usize = 1024;

impl RequestContext {
    /// Reject what the schema forbids: each field at most [`MAX_TEXT_CHARS`] characters.
    ///
    /// ```
    /// use crp_core::types::RequestContext;
    /// let mut c = RequestContext { purpose: Some("list repositories".into()), ..Default::default() };
    /// assert!(c.validate().is_ok());
    /// c.purpose = Some("x".repeat(1025));
    /// assert_eq!(c.validate().unwrap_err().code, -32602);
    /// ```
    pub fn validate(&self) -> Result<(), CrpError> {
        let fields = [
            ("consumer", &self.consumer),
            ("consumerVersion", &self.consumer_version),
            ("requestor", &self.requestor),
            ("purpose", &self.purpose),
            ("traceId", &self.trace_id),
        ];
        for (name, value) in fields {
            if value.as_ref().is_some_and(|v| v.chars().count() > MAX_TEXT_CHARS) {
                return Err(invalid(format!("context.{name} must be at most {MAX_TEXT_CHARS} characters")));
            }
        }
        Ok(())
    }
}

/// A lease: the bounded, revocable right to use a credential (v0.1 §8, v0.2 §5.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// Opaque id with at least 128 bits from a CSPRNG. A bearer secret: treat it as such.
    #[schemars(length(min = 1, max = 256))]
    pub id: String,
    /// RFC 3339 instant after which the lease is dead.
    #[schemars(extend("format" = "date-time"))]
    pub expires_at: String,
    /// Granted lifetime in seconds (at least 1, v0.1 Appendix A.2).
    #[schemars(range(min = 1))]
    pub ttl: u32,
    /// Whether `crp/lease` renew may extend it.
    pub renewable: bool,
    /// 0 for a root lease, parent's depth + 1 for a delegated one (v0.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation_depth: Option<u32>,
}

/// What `crp/use` says about the credential behind a handle, without its material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialDescriptor {
    /// The credential type.
    #[serde(rename = "type")]
    pub credential_type: CredentialType,
    /// Minted by the provider from a root secret (v0.2 §6.2).
    pub brokered: bool,
    /// The provider refreshes it before expiry.
    pub auto_refresh: bool,
    /// Sensitivity label.
    pub classification: Classification,
}

fn invalid(message: String) -> CrpError {
    CrpError::invalid_params(message)
}

/// Check a service identifier against v0.1 §6.1: `^[a-zA-Z0-9._/-]+$`, at most 256 bytes.
///
/// ```
/// use crp_core::types::validate_service;
/// assert!(validate_service("github.com/api").is_ok());
/// assert_eq!(validate_service("github com").unwrap_err().code, -32602);
/// ```
pub fn validate_service(service: &str) -> Result<(), CrpError> {
    if service.is_empty() || service.len() > 256 {
        return Err(invalid("service must be 1 to 256 characters".into()));
    }
    if !service.bytes().all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b)) {
        return Err(invalid(
            "service may contain only letters, digits, '.', '_', '/' and '-'".into(),
        ));
    }
    Ok(())
}

/// Check a requested TTL: 1..=86400 seconds.
pub fn validate_ttl(ttl: Option<u32>) -> Result<(), CrpError> {
    match ttl {
        Some(t) if t == 0 || t > MAX_TTL_SECONDS => Err(invalid(format!(
            "ttl must be between 1 and {MAX_TTL_SECONDS} seconds"
        ))),
        _ => Ok(()),
    }
}

/// Check requested scopes: at most 64, each 1 to 128 printable ASCII characters.
pub fn validate_scopes(scopes: &[String]) -> Result<(), CrpError> {
    if scopes.len() > 64 {
        return Err(invalid("at most 64 scopes may be requested".into()));
    }
    for s in scopes {
        if s.is_empty() || s.len() > 128 || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "each scope must be 1 to 128 printable ASCII characters without spaces".into(),
            ));
        }
    }
    Ok(())
}
