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
