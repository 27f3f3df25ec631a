//! This implementation's `x-crp/` extension methods: the vault operations the MCP adapter
//! needs in remote mode, each behind its own policy action. Field names are snake_case, the
//! same as the seed's MCP tool arguments, so a tool call passes through unchanged.
//!
//! None of these is CRP: they are not advertised in `features`, and a provider that does not
//! implement them answers -32601.
//!
//! ```
//! use crp_core::types::ext::{self, VaultStoreParams};
//! // An MCP `vault_store` tool call's arguments pass through unchanged.
//! let args = serde_json::json!({"key": "openai/prod", "value": "sk-proj-1", "metadata": {"service": "openai.com/api"}});
//! let p: VaultStoreParams = crp_core::dispatch::decode(args.clone()).unwrap();
//! assert_eq!(p.metadata["service"], "openai.com/api");
//! assert!(!format!("{p:?}").contains("sk-proj-1"));
//! let request = crp_core::jsonrpc::Request::new(7, ext::VAULT_STORE, args);
//! assert_eq!(request.method, "x-crp/vault.store");
//! ```

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Classification, CredentialType};
use crate::secret::SecretValue;

/// `x-crp/vault.store` (policy action `store`).
pub const VAULT_STORE: &str = "x-crp/vault.store";
/// `x-crp/vault.retrieve` (policy action `retrieve`; an audited export).
pub const VAULT_RETRIEVE: &str = "x-crp/vault.retrieve";
/// `x-crp/vault.delete` (policy action `delete`).
pub const VAULT_DELETE: &str = "x-crp/vault.delete";
/// `x-crp/vault.list` (policy action `list`, per credential).
pub const VAULT_LIST: &str = "x-crp/vault.list";
/// `x-crp/policy.check` (a dry run; never changes state).
pub const POLICY_CHECK: &str = "x-crp/policy.check";
/// `x-crp/audit.query` (policy action `audit`).
pub const AUDIT_QUERY: &str = "x-crp/audit.query";
/// `x-crp/whoami`: the authenticated agent as the provider sees it.
pub const WHOAMI: &str = "x-crp/whoami";

/// How the proxy puts the credential on an upstream request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InjectionRule {
    /// `{header}: {prefix} {value}` (prefix may be empty).
    Header {
        /// Header name, e.g. `Authorization`.
        name: String,
        /// e.g. `Bearer`; empty for none.
        #[serde(default)]
        prefix: String,
    },
    /// `?{name}={value}` appended to the query.
    Query {
        /// Query parameter name.
        name: String,
    },
    /// `Authorization: Basic base64(username:password)`.
    Basic,
}

/// `x-crp/vault.store` params: store (or overwrite, keeping the old version) a credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VaultStoreParams {
    /// Vault key, e.g. `aws/production`.
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._/-]+$"), length(min = 1, max = 256))]
    pub key: String,
    /// The secret. Sealed before it reaches storage; never returned by any other tool.
    pub value: SecretValue,
    /// Free-form, non-secret metadata (a `service` entry names the CRP service).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Seconds until the stored credential itself expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub ttl: Option<u64>,
    /// CRP service id; defaults to `metadata.service`, then to the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Credential type (default `api_key`).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub credential_type: Option<CredentialType>,
    /// Sensitivity label (default `confidential`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classification: Option<Classification>,
    /// Scopes a lease may be granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// Tags (policy attribute `tags`, filter of `vault.list`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    /// Upstream base URL the proxy forwards to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Injection rule (default `Authorization: Bearer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject: Option<InjectionRule>,
    /// Longest lease TTL, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub max_ttl: Option<u32>,
}

/// `x-crp/vault.store` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VaultStoreResult {
    /// Always true.
    pub stored: bool,
    /// The key.
    pub key: String,
    /// Version number of the stored value (1 for a new key).
    pub version: u32,
    /// RFC 3339 expiry, when `ttl` was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// `x-crp/vault.retrieve` params.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VaultRetrieveParams {
    /// Vault key.
    pub key: String,
    /// Why the value must leave the vault; required, audited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
}

/// `x-crp/vault.retrieve` result: an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VaultRetrieveResult {
    /// The key.
    pub key: String,
    /// The value.
    pub value: SecretValue,
    /// Its metadata.
    pub metadata: BTreeMap<String, String>,
}

/// `x-crp/vault.delete` params.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VaultDeleteParams {
    /// Vault key.
    pub key: String,
}

/// `x-crp/vault.delete` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VaultDeleteResult {
    /// Whether a credential was removed.
    pub deleted: bool,
    /// The key.
    pub key: String,
    /// Leases on it that were revoked with it.
    #[serde(default)]
    pub revoked_leases: Vec<String>,
}

/// `x-crp/vault.list` params.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VaultListParams {
    /// Only keys starting with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Only credentials carrying every one of these tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    /// Page size (default 100, at most 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub limit: Option<u32>,
    /// Cursor from the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// One credential in a listing: never a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VaultListEntry {
    /// Vault key.
    pub key: String,
    /// CRP service id.
    pub service: String,
    /// Credential type.
    #[serde(rename = "type")]
    pub credential_type: CredentialType,
    /// Sensitivity label.
    pub classification: Classification,
    /// Non-secret metadata.
    pub metadata: BTreeMap<String, String>,
    /// Tags.
    pub tags: Vec<String>,
    /// RFC 3339 creation instant.
    pub created_at: String,
    /// RFC 3339 expiry of the stored credential, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// `x-crp/vault.list` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VaultListResult {
    /// This page.
    pub credentials: Vec<VaultListEntry>,
    /// Next page's cursor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// `x-crp/policy.check` params: would `requester` be allowed `action` on `key`?
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyCheckParams {
    /// Vault key.
    pub key: String,
    /// One of `use resolve retrieve list store delete renew release revoke delegate audit`.
    pub action: String,
    /// Agent to check; defaults to the caller. Checking another agent needs action `audit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester: Option<String>,
    /// Scopes in the hypothetical request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// TTL in the hypothetical request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
    /// Purpose in the hypothetical request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
}

/// `x-crp/policy.check` result, as the seed's `policy_check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PolicyCheckResult {
    /// Whether the request would go through without a human.
    pub allowed: bool,
    /// `allow`, `deny`, `require_approval` or `quarantine`.
    pub outcome: String,
    /// The deciding policy's `@id`, if one matched.
    pub policy: Option<String>,
    /// Its `@reason`, or why nothing matched.
    pub reason: String,
}

/// `x-crp/audit.query` params.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditQueryParams {
    /// Only events about this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Only events by this agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester: Option<String>,
    /// Only this event name (e.g. `credential.used`) or action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// RFC 3339 lower bound (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// RFC 3339 upper bound (exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// At most this many, newest first (default 50, at most 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub limit: Option<u32>,
}

/// One audit event. Never a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AuditEvent {
    /// Sequence number in the chain.
    pub seq: u64,
    /// Event name (`credential.used`, `credential.denied`, `lease.renewed`, ...).
    pub action: String,
    /// The agent.
    pub requester: String,
    /// RFC 3339 instant.
    pub timestamp: String,
    /// `allow`, `deny`, `require_approval`, `quarantine` or `error`.
    pub decision: String,
    /// Deciding policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Vault key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    /// Stated purpose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// Caller's trace id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Further non-secret detail (method, path, status, bytes, duration...).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub detail: serde_json::Map<String, serde_json::Value>,
}

/// `x-crp/audit.query` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AuditQueryResult {
    /// Matching events, newest first.
    pub events: Vec<AuditEvent>,
}

/// `x-crp/whoami` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WhoamiResult {
    /// The authenticated agent id.
    pub agent: String,
    /// Its roles.
    pub roles: Vec<String>,
    /// The negotiated CRP version.
    pub version: String,
}
