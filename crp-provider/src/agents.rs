//! Agents, one-shot bootstrap tokens, and the approvals queue.
//!
//! - An agent has an id (what policies see as `Agent::"<id>"`; derived from the operator-chosen
//!   bootstrap name), a display name, an Ed25519 public key (base64), roles, scopes and a
//!   status: `pending` until an operator approves it, then `active`, or `disabled`.
//! - A bootstrap token is shown once; only its SHA-256 is stored, with an expiry, and it is
//!   consumed by the first successful registration.
//! - An approval is a request held by a `@outcome("require_approval")` policy. An operator
//!   approves or denies it; an approved request can then be made once by the same agent
//!   (matched by a fingerprint of agent, action, key and scopes) and is consumed.
//!
//! Stores no secret in clear: tokens are hashed, public keys are public.

use base64::Engine as _;
use serde::Serialize;

use crate::crypto::{self, CryptoError};
use crate::store::{Store, StoreError, now_ms, rfc3339, with_pool, with_write_tx};

/// Agent status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// Registered, not yet approved: every request is refused.
    Pending,
    /// May call.
    Active,
    /// Switched off by an operator.
    Disabled,
}

impl AgentStatus {
    /// Storage name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Disabled => "disabled",
        }
    }
}

impl std::str::FromStr for AgentStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(Self::Pending),
            "active" => Ok(Self::Active),
            "disabled" => Ok(Self::Disabled),
            o => Err(format!("unknown agent status `{o}` (expected pending, active or disabled)")),
        }
    }
}

/// An agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentRecord {
    /// Id (policy principal).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Ed25519 public key, base64 (empty for agents declared without one).
    pub public_key: String,
    /// Roles (`Role::"<r>"` parents in policy).
    pub roles: Vec<String>,
    /// Scopes (checked by the HTTP layer per route).
    pub scopes: Vec<String>,
    /// Status.
    pub status: AgentStatus,
}

/// Errors.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Invalid input.
    #[error("{0}")]
    Invalid(String),
    /// Storage.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Crypto (RNG).
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl From<sqlx::Error> for AgentError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(e.into())
    }
}

type AgentRow = (String, String, String, String, String, String);

fn agent_from_row(r: AgentRow) -> Result<AgentRecord, AgentError> {
    let bad = |w: &str| AgentError::Store(StoreError::Corrupt(format!("agent: bad {w}")));
    Ok(AgentRecord {
        roles: serde_json::from_str(&r.3).map_err(|_| bad("roles"))?,
        scopes: serde_json::from_str(&r.4).map_err(|_| bad("scopes"))?,
        status: r.5.parse().map_err(|_| bad("status"))?,
        id: r.0,
        name: r.1,
        public_key: r.2,
    })
}

/// Check an agent id / name: 1–64 of `[A-Za-z0-9._-]`.
pub fn validate_id(id: &str) -> Result<(), AgentError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err(AgentError::Invalid(
            "agent names are 1 to 64 characters of letters, digits, '.', '_' and '-'".into(),
        ));
    }
    Ok(())
}

/// Check an Ed25519 public key in base64 (standard or URL-safe, padded or not).
pub fn validate_public_key(b64: &str) -> Result<(), AgentError> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let raw = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(b64.trim()).ok())
        .ok_or_else(|| AgentError::Invalid("publicKey is not base64".into()))?;
    let arr: [u8; 32] =
        raw.as_slice().try_into().map_err(|_| AgentError::Invalid("publicKey must be a 32-byte Ed25519 key".into()))?;
    ed25519_dalek::VerifyingKey::from_bytes(&arr)
        .map_err(|_| AgentError::Invalid("publicKey is not a valid Ed25519 point".into()))?;
    Ok(())
}

const AGENT_COLS: &str = "SELECT id, name, public_key, roles, scopes, status FROM agents";

/// One agent.
pub async fn get(store: &Store, id: &str) -> Result<Option<AgentRecord>, AgentError> {
    let q = sqlx::AssertSqlSafe(format!("{AGENT_COLS} WHERE id = $1"));
    let row: Option<AgentRow> = with_pool!(store, |p| sqlx::query_as(q).bind(id).fetch_optional(p).await?);
    row.map(agent_from_row).transpose()
}

/// Every agent, by id.
pub async fn list(store: &Store) -> Result<Vec<AgentRecord>, AgentError> {
    let q = sqlx::AssertSqlSafe(format!("{AGENT_COLS} ORDER BY id"));
    let rows: Vec<AgentRow> = with_pool!(store, |p| sqlx::query_as(q).fetch_all(p).await?);
    rows.into_iter().map(agent_from_row).collect()
}

/// Create or update an agent (declarative `apply`). Returns whether anything changed.
pub async fn upsert(store: &Store, a: &AgentRecord) -> Result<bool, AgentError> {
    validate_id(&a.id)?;
    if !a.public_key.is_empty() {
        validate_public_key(&a.public_key)?;
    }
    if get(store, &a.id).await?.as_ref() == Some(a) {
        return Ok(false);
    }
    let roles = serde_json::to_string(&a.roles).unwrap_or_else(|_| "[]".into());
    let scopes = serde_json::to_string(&a.scopes).unwrap_or_else(|_| "[]".into());
    with_write_tx!(store, |tx| {
        sqlx::query(
            "INSERT INTO agents (id, name, public_key, roles, scopes, status, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, public_key = excluded.public_key, roles = excluded.roles,
               scopes = excluded.scopes, status = excluded.status",
        )
        .bind(&a.id)
        .bind(&a.name)
        .bind(&a.public_key)
        .bind(roles)
        .bind(scopes)
        .bind(a.status.as_str())
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
    });
    Ok(true)
}

/// Set an agent's status. Returns the updated record, or `None` if unknown.
pub async fn set_status(store: &Store, id: &str, status: AgentStatus) -> Result<Option<AgentRecord>, AgentError> {
    let n = with_write_tx!(store, |tx| {
        sqlx::query("UPDATE agents SET status = $1 WHERE id = $2")
            .bind(status.as_str())
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
    });
    if n == 0 { Ok(None) } else { get(store, id).await }
}

/// A fresh bootstrap token: shown once, stored hashed.
pub struct Bootstrap {
    /// The token (give it to the agent's installer).
    pub token: zeroize::Zeroizing<String>,
    /// The agent id it will register.
    pub name: String,
    /// RFC 3339 expiry.
    pub expires_at: String,
}

/// Issue a one-shot bootstrap token for an agent called `name`, valid `ttl_s` seconds.
pub async fn create_bootstrap(
    store: &Store,
    name: &str,
    roles: &[String],
    scopes: &[String],
    ttl_s: u32,
) -> Result<Bootstrap, AgentError> {
    validate_id(name)?;
    let token = crypto::random_token("crpbt_", 32)?;
    let now = now_ms();
    let expires = now + i64::from(ttl_s) * 1000;
    with_write_tx!(store, |tx| {
        sqlx::query(
            "INSERT INTO bootstrap_tokens (token_hash, name, roles, scopes, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(crypto::sha256_hex(token.as_bytes()))
        .bind(name)
        .bind(serde_json::to_string(roles).unwrap_or_else(|_| "[]".into()))
        .bind(serde_json::to_string(scopes).unwrap_or_else(|_| "[]".into()))
        .bind(now)
        .bind(expires)
        .execute(&mut *tx)
        .await?;
    });
    Ok(Bootstrap { token, name: name.into(), expires_at: rfc3339(expires) })
}

/// Redeem a bootstrap token: creates a `pending` agent with `public_key`. The token is
/// consumed; an unknown, used or expired token is refused with one message for all three.
pub async fn redeem_bootstrap(
    store: &Store,
    token: &str,
    public_key: &str,
    display_name: Option<&str>,
) -> Result<AgentRecord, AgentError> {
    validate_public_key(public_key)?;
    let hash = crypto::sha256_hex(token.as_bytes());
    let now = now_ms();
    let rec = with_write_tx!(store, |tx| {
        let row: Option<(String, String, String)> = sqlx::query_as(
            "SELECT name, roles, scopes FROM bootstrap_tokens WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2",
        )
        .bind(&hash)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((name, roles, scopes)) = row else {
            return Err(AgentError::Invalid("bootstrap token is invalid, already used, or expired".into()));
        };
        // The id is the operator-chosen name; a clash gets a numeric suffix.
        let mut id = name.clone();
        let mut n = 2;
        loop {
            let taken: Option<String> =
                sqlx::query_scalar("SELECT id FROM agents WHERE id = $1").bind(&id).fetch_optional(&mut *tx).await?;
            if taken.is_none() {
                break;
            }
            id = format!("{name}-{n}");
            n += 1;
        }
        let display = display_name.filter(|d| !d.trim().is_empty() && d.len() <= 128).unwrap_or(&name).to_string();
        sqlx::query(
            "INSERT INTO agents (id, name, public_key, roles, scopes, status, created_at) VALUES ($1, $2, $3, $4, $5, 'pending', $6)",
        )
        .bind(&id)
        .bind(&display)
        .bind(public_key.trim())
        .bind(&roles)
        .bind(&scopes)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE bootstrap_tokens SET used_at = $1, agent_id = $2 WHERE token_hash = $3")
            .bind(now)
            .bind(&id)
            .bind(&hash)
            .execute(&mut *tx)
            .await?;
        AgentRecord {
            id,
            name: display,
            public_key: public_key.trim().into(),
            roles: serde_json::from_str(&roles).unwrap_or_default(),
            scopes: serde_json::from_str(&scopes).unwrap_or_default(),
            status: AgentStatus::Pending,
        }
    });
    Ok(rec)
}

/// A held request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApprovalRecord {
    /// Id (`appr_…`).
    pub id: String,
    /// Requesting agent.
    pub agent: String,
    /// Policy action.
    pub action: String,
    /// Credential key.
    pub key: String,
    /// Non-secret description of the request (service, scopes, ttl, purpose).
    pub summary: serde_json::Value,
    /// Policy that held it.
    pub policy: Option<String>,
    /// Its reason.
    pub reason: String,
    /// `pending`, `approved`, `denied` or `consumed`.
    pub status: String,
    /// RFC 3339 creation.
    pub created_at: String,
    /// Who decided.
    pub decided_by: Option<String>,
}

type ApprovalRow = (String, String, String, String, String, Option<String>, String, String, i64, Option<String>);
const APPROVAL_COLS: &str =
    "SELECT id, agent, action, credential_key, summary, policy, reason, status, created_at, decided_by FROM approvals";

fn approval_from_row(r: ApprovalRow) -> ApprovalRecord {
    ApprovalRecord {
        summary: serde_json::from_str(&r.4).unwrap_or(serde_json::Value::Null),
        id: r.0,
        agent: r.1,
        action: r.2,
        key: r.3,
        policy: r.5,
        reason: r.6,
        status: r.7,
        created_at: rfc3339(r.8),
        decided_by: r.9,
    }
}

/// A pending approval for this fingerprint, or a new one. Returns its id.
#[allow(clippy::too_many_arguments)]
pub async fn hold(
    store: &Store,
    agent: &str,
    action: &str,
    key: &str,
    fingerprint: &str,
    summary: &serde_json::Value,
    policy: Option<&str>,
    reason: &str,
) -> Result<String, AgentError> {
    let new_id = crypto::random_hex_id("appr_", 12)?;
    let id = with_write_tx!(store, |tx| {
        let existing: Option<String> = sqlx::query_scalar(
            "SELECT id FROM approvals WHERE agent = $1 AND fingerprint = $2 AND status = 'pending' ORDER BY created_at LIMIT 1",
        )
        .bind(agent)
        .bind(fingerprint)
        .fetch_optional(&mut *tx)
        .await?;
        match existing {
            Some(id) => id,
            None => {
                sqlx::query(
                    "INSERT INTO approvals (id, agent, action, credential_key, fingerprint, summary, policy, reason, status, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9)",
                )
                .bind(&new_id)
                .bind(agent)
                .bind(action)
                .bind(key)
                .bind(fingerprint)
                .bind(summary.to_string())
                .bind(policy)
                .bind(reason)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
                new_id
            }
        }
    });
    Ok(id)
}

/// Consume one approved approval for this agent and fingerprint; returns its id if there was one.
pub async fn consume_approved(store: &Store, agent: &str, fingerprint: &str) -> Result<Option<String>, AgentError> {
    let id = with_write_tx!(store, |tx| {
        let id: Option<String> = sqlx::query_scalar(
            "SELECT id FROM approvals WHERE agent = $1 AND fingerprint = $2 AND status = 'approved' ORDER BY created_at LIMIT 1",
        )
        .bind(agent)
        .bind(fingerprint)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(id) = &id {
            sqlx::query("UPDATE approvals SET status = 'consumed' WHERE id = $1 AND status = 'approved'")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        id
    });
    Ok(id)
}

/// Approvals, oldest first; `status` filters when given.
pub async fn list_approvals(store: &Store, status: Option<&str>) -> Result<Vec<ApprovalRecord>, AgentError> {
    let q = sqlx::AssertSqlSafe(format!("{APPROVAL_COLS} WHERE ($1 = '' OR status = $1) ORDER BY created_at, id"));
    let rows: Vec<ApprovalRow> =
        with_pool!(store, |p| sqlx::query_as(q).bind(status.unwrap_or("")).fetch_all(p).await?);
    Ok(rows.into_iter().map(approval_from_row).collect())
}

/// One approval.
pub async fn get_approval(store: &Store, id: &str) -> Result<Option<ApprovalRecord>, AgentError> {
    let q = sqlx::AssertSqlSafe(format!("{APPROVAL_COLS} WHERE id = $1"));
    let row: Option<ApprovalRow> = with_pool!(store, |p| sqlx::query_as(q).bind(id).fetch_optional(p).await?);
    Ok(row.map(approval_from_row))
}

/// Approve or deny a pending approval. `None` if unknown or no longer pending.
pub async fn decide(store: &Store, id: &str, approve: bool, by: &str) -> Result<Option<ApprovalRecord>, AgentError> {
    let n = with_write_tx!(store, |tx| {
        sqlx::query("UPDATE approvals SET status = $1, decided_at = $2, decided_by = $3 WHERE id = $4 AND status = 'pending'")
            .bind(if approve { "approved" } else { "denied" })
            .bind(now_ms())
            .bind(by)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
    });
    if n == 0 { Ok(None) } else { get_approval(store, id).await }
}
