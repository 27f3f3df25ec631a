//! The seam between protocol and implementation: the [`Provider`] trait.
//!
//! A provider implements the CRP operations over already-validated, typed params. Transports
//! never call it directly; they hand raw messages to [`crate::Dispatcher`].

use async_trait::async_trait;
use serde_json::Value;

use crate::error::CrpError;
use crate::types::{
    Capability, LeaseParams, LeaseResult, ListParams, ListResult, ResolveParams, ResolveResult,
    RevokeParams, RevokeResult, UseParams, UseResult,
};
use crate::version::Version;

/// How the caller reached the provider (recorded in audit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// A library call in the same process.
    InProcess,
    /// Newline-delimited JSON-RPC on stdin/stdout.
    Stdio,
    /// `POST /crp`.
    Http,
    /// An MCP connection.
    Mcp,
}

impl Transport {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InProcess => "in_process",
            Self::Stdio => "stdio",
            Self::Http => "http",
            Self::Mcp => "mcp",
        }
    }
}

/// Who is calling, under which negotiated version, through which transport. Transports
/// authenticate the caller before building this; providers trust `agent`.
///
/// ```
/// use crp_core::{CallContext, Version};
/// use crp_core::provider::Transport;
/// let ctx = CallContext::new("agent-1", Transport::Stdio);
/// assert_eq!(ctx.version, Version::LATEST);
/// let old = ctx.with_version(Version::V0_1);
/// assert_eq!((old.version.as_str(), old.transport.as_str()), ("0.1", "stdio"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallContext {
    /// The authenticated agent id: what policies see as the principal.
    pub agent: String,
    /// The negotiated protocol version.
    pub version: Version,
    /// The transport.
    pub transport: Transport,
}

impl CallContext {
    /// A context for `agent` speaking the newest version.
    pub fn new(agent: impl Into<String>, transport: Transport) -> Self {
        Self { agent: agent.into(), version: Version::LATEST, transport }
    }

    /// The same caller under another version.
    pub fn with_version(mut self, version: Version) -> Self {
        self.version = version;
        self
    }
}

/// A CRP provider. Every method receives params the dispatcher has already decoded and
/// validated; errors are CRP errors, already free of secrets.
///
/// Only [`Provider::capability`] and [`Provider::use_credential`] are required; the others
/// answer -33011 (`feature_not_supported`) and extensions -32601 until implemented. See the
/// crate documentation for a complete provider behind a [`crate::Dispatcher`].
///
/// ```
/// use async_trait::async_trait;
/// use crp_core::types::*;
/// use crp_core::{CallContext, CrpError, Provider, Version};
///
/// /// Knows no service at all; lists nothing.
/// struct Empty;
///
/// #[async_trait]
/// impl Provider for Empty {
///     fn capability(&self, v: Version) -> Capability {
///         Capability { version: v.to_string(), versions: vec![], provider: Some("empty".into()),
///                      features: vec![Feature::Use, Feature::List], conformance: None }
///     }
///     async fn use_credential(&self, _: &CallContext, p: UseParams) -> Result<UseResult, CrpError> {
///         Err(CrpError::service_not_found(&p.service))
///     }
///     async fn list(&self, _: &CallContext, _: ListParams) -> Result<ListResult, CrpError> {
///         Ok(ListResult { services: vec![], cursor: None })
///     }
/// }
/// assert!(Empty.capability(Version::V0_2).is_conforming_provider());
/// ```
#[async_trait]
pub trait Provider: Send + Sync {
    /// The capability object for a caller speaking `version`: `features` and `conformance`
    /// must be exactly what is implemented.
    fn capability(&self, version: Version) -> Capability;

    /// `crp/use`.
    async fn use_credential(&self, ctx: &CallContext, params: UseParams) -> Result<UseResult, CrpError>;

    /// `crp/resolve` (only dispatched under v0.1).
    async fn resolve(&self, ctx: &CallContext, params: ResolveParams) -> Result<ResolveResult, CrpError> {
        let _ = (ctx, params);
        Err(CrpError::feature_not_supported("crp/resolve"))
    }

    /// `crp/lease`.
    async fn lease(&self, ctx: &CallContext, params: LeaseParams) -> Result<LeaseResult, CrpError> {
        let _ = (ctx, params);
        Err(CrpError::feature_not_supported("crp/lease"))
    }

    /// `crp/revoke`.
    async fn revoke(&self, ctx: &CallContext, params: RevokeParams) -> Result<RevokeResult, CrpError> {
        let _ = (ctx, params);
        Err(CrpError::feature_not_supported("crp/revoke"))
    }

    /// `crp/list`.
    async fn list(&self, ctx: &CallContext, params: ListParams) -> Result<ListResult, CrpError> {
        let _ = (ctx, params);
        Err(CrpError::feature_not_supported("crp/list"))
    }

    /// An `x-crp/` extension method; `method` includes the prefix.
    async fn extension(&self, ctx: &CallContext, method: &str, params: Value) -> Result<Value, CrpError> {
        let _ = (ctx, params);
        Err(CrpError::method_not_found(method))
    }
}
