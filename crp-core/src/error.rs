//! The error registry: JSON-RPC's standard codes, the spec's CRP codes, and the numbers this
//! implementation assigns where v0.2 names an error without numbering it.
//!
//! `data` is the typed [`ErrorData`], whose fields are identifiers, scopes, versions and
//! counts. There is no field of a secret-bearing type and no free-form JSON, so an error
//! cannot carry credential material by construction. Messages are built by this crate's
//! constructors from fixed text and identifiers.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Every code this implementation emits.
///
/// ```
/// use crp_core::ErrorCode;
/// assert_eq!(ErrorCode::RequireApproval.code(), -33020);
/// assert_eq!(ErrorCode::from_code(-33013), Some(ErrorCode::DelegationDepthExceeded));
/// assert_eq!(ErrorCode::from_code(-33013).unwrap().name(), "delegation_depth_exceeded");
/// assert_eq!(ErrorCode::from_code(-33099), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// -32700: the message is not JSON.
    ParseError,
    /// -32600: JSON, but not a JSON-RPC request.
    InvalidRequest,
    /// -32601: no such method.
    MethodNotFound,
    /// -32602: params do not fit the method.
    InvalidParams,
    /// -32603: a fault of the provider's own.
    InternalError,
    /// -32001 (ours, JSON-RPC server-error range): the HTTP caller could not be authenticated
    /// (sent with HTTP 401; no method ran).
    AuthFailure,
    /// -32002 (ours, JSON-RPC server-error range): the authenticated agent lacks the scope a
    /// method needs (sent with HTTP 403; no method ran).
    ScopeMissing,
    /// -33001: no common version.
    VersionMismatch,
    /// -33002: the service is unknown (or invisible to this caller).
    ServiceNotFound,
    /// -33003: policy said no.
    PolicyDenied,
    /// -33004: no such lease.
    LeaseNotFound,
    /// -33005: the lease is past its expiry.
    LeaseExpired,
    /// -33006: the lease may not be renewed.
    LeaseNotRenewable,
    /// -33007: the credential exists but cannot be used now.
    CredentialUnavailable,
    /// -33008: too many requests (`data.retryAfter`).
    RateLimited,
    /// -33009: a requested scope is not offered.
    ScopeUnavailable,
    /// -33010: the provider failed (storage, audit, ...).
    ProviderError,
    /// -33011: the operation is not supported (or not under this version).
    FeatureNotSupported,
    /// -33012: revocation could not complete.
    RevocationFailed,
    /// -33013 (ours; v0.2 §11 names it without a number): delegation too deep.
    DelegationDepthExceeded,
    /// -33014 (ours; v0.2 §11 names it without a number): the brokered exchange failed.
    BrokerFailure,
    /// -33020: a human must approve (v0.2 §7).
    RequireApproval,
    /// -33021: stop; an operator must act (v0.2 §7).
    Quarantine,
}

impl ErrorCode {
    /// Every code, for registries and docs.
    pub const ALL: [ErrorCode; 23] = [
        Self::ParseError,
        Self::InvalidRequest,
        Self::MethodNotFound,
        Self::InvalidParams,
        Self::InternalError,
        Self::AuthFailure,
        Self::ScopeMissing,
        Self::VersionMismatch,
        Self::ServiceNotFound,
        Self::PolicyDenied,
        Self::LeaseNotFound,
        Self::LeaseExpired,
        Self::LeaseNotRenewable,
        Self::CredentialUnavailable,
        Self::RateLimited,
        Self::ScopeUnavailable,
        Self::ProviderError,
        Self::FeatureNotSupported,
        Self::RevocationFailed,
        Self::DelegationDepthExceeded,
        Self::BrokerFailure,
        Self::RequireApproval,
        Self::Quarantine,
    ];

    /// The integer on the wire.
    pub const fn code(self) -> i64 {
        match self {
            Self::ParseError => -32700,
            Self::InvalidRequest => -32600,
            Self::MethodNotFound => -32601,
            Self::InvalidParams => -32602,
            Self::InternalError => -32603,
            Self::AuthFailure => -32001,
            Self::ScopeMissing => -32002,
            Self::VersionMismatch => -33001,
            Self::ServiceNotFound => -33002,
            Self::PolicyDenied => -33003,
            Self::LeaseNotFound => -33004,
            Self::LeaseExpired => -33005,
            Self::LeaseNotRenewable => -33006,
            Self::CredentialUnavailable => -33007,
            Self::RateLimited => -33008,
            Self::ScopeUnavailable => -33009,
            Self::ProviderError => -33010,
            Self::FeatureNotSupported => -33011,
            Self::RevocationFailed => -33012,
            Self::DelegationDepthExceeded => -33013,
            Self::BrokerFailure => -33014,
            Self::RequireApproval => -33020,
            Self::Quarantine => -33021,
        }
    }

    /// The spec's snake_case name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::ParseError => "parse_error",
            Self::InvalidRequest => "invalid_request",
            Self::MethodNotFound => "method_not_found",
            Self::InvalidParams => "invalid_params",
            Self::InternalError => "internal_error",
            Self::AuthFailure => "auth_failure",
            Self::ScopeMissing => "scope",
            Self::VersionMismatch => "version_mismatch",
            Self::ServiceNotFound => "service_not_found",
            Self::PolicyDenied => "policy_denied",
            Self::LeaseNotFound => "lease_not_found",
            Self::LeaseExpired => "lease_expired",
            Self::LeaseNotRenewable => "lease_not_renewable",
            Self::CredentialUnavailable => "credential_unavailable",
            Self::RateLimited => "rate_limited",
            Self::ScopeUnavailable => "scope_unavailable",
            Self::ProviderError => "provider_error",
            Self::FeatureNotSupported => "feature_not_supported",
            Self::RevocationFailed => "revocation_failed",
            Self::DelegationDepthExceeded => "delegation_depth_exceeded",
            Self::BrokerFailure => "broker_failure",
            Self::RequireApproval => "require_approval",
            Self::Quarantine => "quarantine",
        }
    }

    /// Look a wire integer up.
    pub fn from_code(code: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }
}

/// Structured, secret-free detail of an error. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorData {
    /// The spec's name of the code, e.g. `policy_denied`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Versions the provider speaks (-33001).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supported: Option<Vec<String>>,
    /// Scopes refused (-33003, -33009).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied_scopes: Option<Vec<String>>,
    /// Human reason from the policy (`@reason`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The policy that decided (`@id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Seconds to wait (-33008).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// The limit that was hit, in words, e.g. `10 requests per minute` (-33008, v0.1 §12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    /// Id of the held request an operator can approve or deny (-33020).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    /// A lease concerned. Lease ids are bearer secrets (v0.1 §11.2), so this crate's
    /// constructors never fill it from what a caller sent; a provider may set it to an id the
    /// caller is known to hold already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    /// The service concerned (-33002).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The deepest delegation allowed (-33013).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_depth: Option<u32>,
    /// The audit entry id that recorded the refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// A CRP error, ready to become a JSON-RPC `error` object.
///
/// ```
/// use crp_core::CrpError;
/// let e = CrpError::policy_denied("scope admin:org is not permitted", Some("deny-admin".into()));
/// assert_eq!(e.code, -33003);
/// let json = serde_json::to_value(&e).unwrap();
/// assert_eq!(json["data"]["error"], "policy_denied");
/// assert_eq!(json["data"]["policy"], "deny-admin");
///
/// // Lease ids are bearer secrets: lease errors never echo them.
/// let e = CrpError::lease_not_found("lease-7f3a9b2c");
/// assert_eq!(e.code, -33004);
/// assert!(!serde_json::to_string(&e).unwrap().contains("7f3a9b2c"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CrpError {
    /// Integer code.
    pub code: i64,
    /// One-line message, no secrets.
    pub message: String,
    /// Structured detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<ErrorData>,
}

impl fmt::Display for CrpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for CrpError {}

impl CrpError {
    /// An error of `code` with a message and the spec name in `data.error`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: code.code(),
            message: message.into(),
            data: Some(ErrorData { error: Some(code.name().into()), ..Default::default() }),
        }
    }

    /// Add detail (the `error` name is kept).
    pub fn with_data(mut self, f: impl FnOnce(&mut ErrorData)) -> Self {
        let data = self.data.get_or_insert_with(ErrorData::default);
        f(data);
        self
    }

    /// The registry entry, if the code is one of ours.
    pub fn kind(&self) -> Option<ErrorCode> {
        ErrorCode::from_code(self.code)
    }

    /// -32700.
    pub fn parse_error(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::ParseError, format!("parse error: {}", detail.into()))
    }
    /// -32600.
    pub fn invalid_request(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, format!("invalid request: {}", detail.into()))
    }
    /// -32601.
    ///
    /// The name is echoed only when it looks like a method name (at most 64 characters of
    /// letters, digits and `._/-`).
    pub fn method_not_found(method: &str) -> Self {
        let looks_like_method = !method.is_empty()
            && method.len() <= 64
            && method.bytes().all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
        if looks_like_method {
            Self::new(ErrorCode::MethodNotFound, format!("method not found: {method}"))
        } else {
            Self::new(ErrorCode::MethodNotFound, "method not found")
        }
    }
    /// -32602.
    pub fn invalid_params(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidParams, format!("invalid params: {}", detail.into()))
    }
    /// -32603. The detail goes to the provider's log, never to the caller.
    pub fn internal() -> Self {
        Self::new(ErrorCode::InternalError, "internal error")
    }
    /// -33001 with the supported list.
    ///
    /// The requested version is echoed only when it looks like a version (digits and dots, at
    /// most 16 characters), so a header holding something else is never reflected.
    pub fn version_mismatch(requested: &str, supported: &[&str]) -> Self {
        let requested = requested.trim();
        let shown = if !requested.is_empty()
            && requested.len() <= 16
            && requested.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        {
            format!("`{requested}` is not supported")
        } else {
            "the requested version is not of the form MAJOR.MINOR".to_string()
        };
        Self::new(
            ErrorCode::VersionMismatch,
            format!("version mismatch: {shown} (supported: {})", supported.join(", ")),
        )
        .with_data(|d| d.supported = Some(supported.iter().map(|s| s.to_string()).collect()))
    }
    /// -33002.
    pub fn service_not_found(service: &str) -> Self {
        Self::new(ErrorCode::ServiceNotFound, format!("service not found: {service}"))
            .with_data(|d| d.service = Some(service.into()))
    }
    /// -33003.
    pub fn policy_denied(reason: impl Into<String>, policy: Option<String>) -> Self {
        let reason = reason.into();
        Self::new(ErrorCode::PolicyDenied, format!("policy denied: {reason}")).with_data(|d| {
            d.reason = Some(reason);
            d.policy = policy;
        })
    }
    /// -33004. The id is not echoed: lease ids are bearer secrets (v0.1 §11.2) and errors
    /// end up in logs. The caller correlates by JSON-RPC id.
    pub fn lease_not_found(lease_id: &str) -> Self {
        let _ = lease_id;
        Self::new(ErrorCode::LeaseNotFound, "lease not found")
    }
    /// -33005. The id is not echoed (see [`CrpError::lease_not_found`]).
    pub fn lease_expired(lease_id: &str) -> Self {
        let _ = lease_id;
        Self::new(ErrorCode::LeaseExpired, "lease expired")
    }
    /// -33006, saying why in words that carry no value. The id is not echoed (see
    /// [`CrpError::lease_not_found`]).
    pub fn lease_not_renewable(lease_id: &str, why: &str) -> Self {
        let _ = lease_id;
        Self::new(ErrorCode::LeaseNotRenewable, format!("lease not renewable: {why}"))
    }
    /// -33007.
    pub fn credential_unavailable(why: impl Into<String>) -> Self {
        Self::new(ErrorCode::CredentialUnavailable, format!("credential unavailable: {}", why.into()))
    }
    /// -33008.
    pub fn rate_limited(retry_after: u64) -> Self {
        Self::new(ErrorCode::RateLimited, "rate limited")
            .with_data(|d| d.retry_after = Some(retry_after))
    }
    /// -33009.
    pub fn scope_unavailable(denied: Vec<String>) -> Self {
        Self::new(ErrorCode::ScopeUnavailable, format!("scope unavailable: {}", denied.join(", ")))
            .with_data(|d| d.denied_scopes = Some(denied))
    }
    /// -33010. Say what failed in words that carry no value.
    pub fn provider_error(what: impl Into<String>) -> Self {
        Self::new(ErrorCode::ProviderError, format!("provider error: {}", what.into()))
    }
    /// -33011.
    pub fn feature_not_supported(what: impl Into<String>) -> Self {
        Self::new(ErrorCode::FeatureNotSupported, format!("feature not supported: {}", what.into()))
    }
    /// -33012.
    pub fn revocation_failed(what: impl Into<String>) -> Self {
        Self::new(ErrorCode::RevocationFailed, format!("revocation failed: {}", what.into()))
    }
    /// -33013.
    pub fn delegation_depth_exceeded(max_depth: u32) -> Self {
        Self::new(
            ErrorCode::DelegationDepthExceeded,
            format!("delegation depth exceeded: at most {max_depth} levels"),
        )
        .with_data(|d| d.max_depth = Some(max_depth))
    }
    /// -33014.
    pub fn broker_failure(what: impl Into<String>) -> Self {
        Self::new(ErrorCode::BrokerFailure, format!("broker failure: {}", what.into()))
    }
    /// -33020 with the approval id to poll.
    pub fn require_approval(approval_id: &str, reason: impl Into<String>, policy: Option<String>) -> Self {
        let reason = reason.into();
        Self::new(ErrorCode::RequireApproval, format!("approval required: {reason}")).with_data(|d| {
            d.approval_id = Some(approval_id.into());
            d.reason = Some(reason);
            d.policy = policy;
        })
    }
    /// -33021.
    pub fn quarantine(reason: impl Into<String>, policy: Option<String>) -> Self {
        let reason = reason.into();
        Self::new(ErrorCode::Quarantine, format!("quarantined: {reason}")).with_data(|d| {
            d.reason = Some(reason);
            d.policy = policy;
        })
    }
}
