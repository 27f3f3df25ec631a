//! The seam between the HTTP layer and the vault: the [`Backend`] trait.
//!
//! Every route of `serve` talks to the vault through this trait only, so the server can be
//! started over the real [`crate::vault::Vault`] (what `crp-provider serve`, the MCP adapter's
//! embedded mode and the benchmarks do) or over a small in-test backend. The value types
//! ([`ProxyGrant`], [`ProxyDenied`], [`ProxyAuditRecord`], [`AgentRecord`]) are the vault's.

use std::sync::Arc;

use async_trait::async_trait;
use crp_core::{Provider, SecretValue};

pub use crate::agents::{AgentRecord, AgentStatus};
pub use crate::vault::{ProxyAuditRecord, ProxyDenied, ProxyGrant};

/// Why an agent registration was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterError {
    /// The bootstrap token is unknown, already used or expired (HTTP 401).
    BadToken(String),
    /// The request is malformed, e.g. the public key is not 32 bytes of base64 (HTTP 400).
    Invalid(String),
    /// The vault failed (HTTP 500); the message carries no secret.
    Internal(String),
}

/// Point-in-time gauges for `/metrics`; `None` when the backend cannot tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Leases that are neither released, revoked nor expired.
    pub leases_active: Option<u64>,
    /// Audit records queued and not yet durable.
    pub audit_queue_depth: Option<u64>,
    /// Audit transactions this process has committed, and the entries they held: their ratio
    /// is how well group commit is batching.
    pub audit_commits: Option<(u64, u64)>,
}

/// What the HTTP server needs from a vault.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The CRP provider behind `POST /crp`, `serve --stdio` and `/.well-known/crp`.
    fn provider(&self) -> Arc<dyn Provider>;
    /// Tell the vault where the proxy listens (`{base}/api/v1/proxy/t/{leaseId}`).
    fn set_proxy_base_url(&self, base: &str);
    /// The lease's grant, checked against the database on every call (revocation is immediate).
    async fn proxy_grant(&self, lease_id: &str, session_token: &str) -> Result<ProxyGrant, ProxyDenied>;
    /// Force a re-mint of a brokered token after the upstream answered 401.
    async fn broker_refresh(&self, lease_id: &str) -> Result<SecretValue, ProxyDenied>;
    /// Record `credential.used`; returns once the record is durable.
    async fn audit_proxy(&self, rec: ProxyAuditRecord) -> Result<(), String>;
    /// Record a refused proxied request on a lease that exists and whose session token was
    /// right (released, revoked, expired): `credential.used` with the refusal status. Refusals
    /// for unknown leases or wrong tokens are not recorded (anyone can send those; they would
    /// let a stranger flood the log).
    async fn audit_proxy_refused(&self, lease_id: &str, method: &str, path: &str, status: u16) -> Result<(), String> {
        let _ = (lease_id, method, path, status);
        Ok(())
    }
    /// Look an agent up.
    async fn agent(&self, agent_id: &str) -> Result<Option<AgentRecord>, String>;
    /// Redeem a bootstrap token for a new (pending) agent.
    async fn register_agent(
        &self,
        token: &str,
        public_key_b64: &str,
        name: Option<&str>,
    ) -> Result<AgentRecord, RegisterError>;
    /// Gauges for `/metrics`.
    async fn gauges(&self) -> Gauges {
        Gauges::default()
    }
    /// Flush the audit and stop background work.
    async fn shutdown(&self);
}
