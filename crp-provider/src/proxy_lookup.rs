//! The proxy's hot-path read: everything `Vault::proxy_grant` needs about a lease — its state
//! and session-token hash, its agent's status, and the current sealed version of its
//! credential — in one indexed query instead of four round trips through the pool.
//!
//! It reads the database on every call; `Vault::proxy_grant` keeps the views of leases in use
//! in an epoch-validated cache ([`crate::cache`]), so a revocation made by any process of the
//! same vault is still seen by the very next proxied request.

use crp_core::SecretValue;

use crate::agents::AgentStatus;
use crate::credentials::{self, CredentialConfig, CredentialKind};
use crate::crypto::Key32;
use crate::leases::LeaseState;
use crate::store::{Store, StoreError, with_pool};

const LOOKUP: &str = "SELECT l.id, l.agent, l.state, l.token_hash, l.expires_at, a.status, \
     c.key, c.service, c.kind, c.expires_at, c.version, v.sealed_value, v.sealed_config \
     FROM leases l \
     LEFT JOIN agents a ON a.id = l.agent \
     LEFT JOIN credentials c ON c.key = l.credential_key \
     LEFT JOIN credential_versions v ON v.key = c.key AND v.version = c.version \
     WHERE l.id = $1";

type Row = (
    String,
    String,
    String,
    String,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
);

/// The lease as the proxy sees it.
pub struct LeaseView {
    /// Lease id.
    pub id: String,
    /// Holder.
    pub agent: String,
    /// State.
    pub state: LeaseState,
    /// SHA-256 (hex) of the session token.
    pub token_hash: String,
    /// Expiry, unix ms.
    pub expires_at: i64,
    /// The holder's status; `None` for agents without a record (the local owner, `dev`).
    pub agent_status: Option<AgentStatus>,
    /// The credential, opened; `None` when it was deleted.
    pub credential: Option<OpenedCredential>,
}

/// The current version of a lease's credential, unsealed.
pub struct OpenedCredential {
    /// Vault key.
    pub key: String,
    /// Service id.
    pub service: String,
    /// Kind.
    pub kind: CredentialKind,
    /// Expiry of the stored credential (unix ms).
    pub expires_at: Option<i64>,
    /// The value.
    pub value: SecretValue,
    /// Upstream, injection and the rest of the sealed configuration.
    pub config: CredentialConfig,
}

impl OpenedCredential {
    /// Whether the stored credential has expired at `now_ms`.
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at.is_some_and(|e| e <= now_ms)
    }
}

/// Read and open everything about `lease_id` in one query.
pub async fn lookup(store: &Store, dk: &Key32, lease_id: &str) -> Result<Option<LeaseView>, StoreError> {
    let row: Option<Row> = with_pool!(store, |p| sqlx::query_as(LOOKUP).bind(lease_id).fetch_optional(p).await?);
    let Some(r) = row else { return Ok(None) };
    let corrupt = |what: &str| StoreError::Corrupt(format!("lease `{}`: bad {what}", r.0));
    let state = LeaseState::parse(&r.2).ok_or_else(|| corrupt("state"))?;
    let agent_status = match &r.5 {
        Some(s) => Some(s.parse::<AgentStatus>().map_err(|_| corrupt("agent status"))?),
        None => None,
    };
    let credential = match (r.6, r.7, r.8, r.10) {
        (Some(key), Some(service), Some(kind), Some(version)) => {
            let (Some(sealed_value), Some(sealed_config)) = (r.11, r.12) else {
                return Err(StoreError::Corrupt(format!("credential `{key}`: current version missing")));
            };
            let kind: CredentialKind =
                kind.parse().map_err(|_| StoreError::Corrupt(format!("credential `{key}`: bad kind")))?;
            let (value, config) = credentials::unseal(dk, &key, version, &sealed_value, &sealed_config)?;
            Some(OpenedCredential { key, service, kind, expires_at: r.9, value, config })
        }
        _ => None,
    };
    Ok(Some(LeaseView {
        id: r.0,
        agent: r.1,
        state,
        token_hash: r.3,
        expires_at: r.4,
        agent_status,
        credential,
    }))
}
