//! The MCP tools: names, arguments and result shapes of the seed (`vault_store`,
//! `vault_retrieve`, `vault_delete`, `vault_list`, `credential_resolve`, `credential_lease`,
//! `policy_check`, `audit_log`) plus `credential_use` and `credential_revoke`.
//!
//! Each tool is one or two `crp/*` / `x-crp/*` calls through the [`Backend`]; none touches
//! the vault directly, so embedded and remote mode behave the same and policy decides.
//!
//! Read-blind by default: the only results that can carry a stored value are `vault_retrieve`
//! and `credential_resolve` with `export: true`. Both require a `purpose` and a policy that
//! permits `retrieve` / `resolve` for this agent on that credential (the provider checks and
//! audits the export). Every other result is decoded into a typed struct that has no field for
//! a value before it is re-encoded, so a value cannot pass through by accident.
//!
//! Failures the agent can do something about are `isError` results whose text says what to
//! do; decoding errors never echo the arguments (a misplaced secret must not come back).

use std::sync::{Arc, LazyLock};

use crp_core::dispatch::redact_serde_message;
use crp_core::error::ErrorCode;
use crp_core::methods;
use crp_core::types::ext::{
    self, AuditQueryParams, AuditQueryResult, PolicyCheckParams, PolicyCheckResult, VaultDeleteParams,
    VaultDeleteResult, VaultListParams, VaultListResult, VaultRetrieveParams, VaultRetrieveResult,
    VaultStoreParams, VaultStoreResult,
};
use crp_core::types::{
    Classification, CredentialMaterial, CredentialType, Delegation, LeaseAction, LeaseParams, LeaseResult,
    RequestContext, ResolveParams, ResolveResult, RevokeParams, RevokeReason, RevokeResult, UseParams, UseResult,
};
use crp_core::{CrpError, Version};
use rmcp::model::{CallToolResult, ContentBlock, JsonObject, Tool, ToolAnnotations};
use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backend::Backend;

// ---------------------------------------------------------------------------------------------
// Arguments that are not crp-core extension types
// ---------------------------------------------------------------------------------------------

/// `credential_resolve` arguments (the seed's `service`, `scope`, `requester`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CredentialResolveArgs {
    /// CRP service id, e.g. `github.com` (vault_list shows each credential's `service`).
    #[schemars(length(min = 1, max = 256))]
    pub service: String,
    /// Scopes requested; the grant may be narrower.
    #[serde(default, alias = "scopes")]
    pub scope: Vec<String>,
    /// On whose behalf you ask, e.g. `cursor/workspace-abc`. Recorded in the audit log;
    /// policies see this server's agent identity, not this value.
    #[serde(default)]
    pub requester: Option<String>,
    /// Why you need it. Recorded in the audit log; required when `export` is true.
    #[serde(default)]
    pub purpose: Option<String>,
    /// Lease lifetime in seconds (1 to 86400); the grant may be shorter.
    #[serde(default)]
    #[schemars(range(min = 1, max = 86400))]
    pub ttl: Option<u32>,
    /// Return the credential material itself instead of a use-handle. Needs a policy
    /// permitting action `resolve` for this agent on this credential, and `purpose`; audited
    /// as an export. Leave false unless a program outside HTTP must hold the raw value.
    #[serde(default)]
    pub export: bool,
}

/// `credential_use` arguments.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CredentialUseArgs {
    /// CRP service id, e.g. `github.com` (vault_list shows each credential's `service`).
    #[schemars(length(min = 1, max = 256))]
    pub service: String,
    /// Scopes requested; the grant may be narrower.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Lease lifetime in seconds (1 to 86400); the grant may be shorter.
    #[serde(default)]
    #[schemars(range(min = 1, max = 86400))]
    pub ttl: Option<u32>,
    /// Why you need it (audited; some policies require it).
    #[serde(default)]
    pub purpose: Option<String>,
    /// The program that will send the requests (audited). Defaults to the MCP client's name.
    #[serde(default)]
    pub consumer: Option<String>,
    /// Ask for a child of this lease (delegation) instead of a new root lease.
    #[serde(default)]
    pub parent_lease_id: Option<String>,
    /// With `parent_lease_id`: the deepest delegation chain you accept (1 to 16).
    #[serde(default)]
    #[schemars(range(min = 1, max = 16))]
    pub max_depth: Option<u32>,
}

/// What `credential_lease` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LeaseToolAction {
    /// Extend the lease (policy action `renew`).
    Renew,
    /// Give the lease up now (policy action `release`).
    Release,
    /// Revoke the lease and every delegated child (policy action `revoke`).
    Revoke,
}

/// `credential_lease` arguments.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CredentialLeaseArgs {
    /// The lease id from credential_use / credential_resolve.
    #[schemars(length(min = 1, max = 256))]
    pub lease_id: String,
    /// `renew`, `release` or `revoke`.
    pub action: LeaseToolAction,
    /// For `renew`: seconds to extend by (1 to 86400).
    #[serde(default)]
    #[schemars(range(min = 1, max = 86400))]
    pub ttl: Option<u32>,
}

/// `credential_revoke` arguments.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CredentialRevokeArgs {
    /// The lease to revoke; its delegated children are revoked with it.
    #[schemars(length(min = 1, max = 256))]
    pub lease_id: String,
    /// Why (default `manual_revocation`).
    #[serde(default)]
    pub reason: Option<RevokeReason>,
    /// Free text for the audit log (at most 1024 characters).
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub detail: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Results (snake_case, like the seed's)
// ---------------------------------------------------------------------------------------------

/// What kind of credential sits behind a handle. Never the credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Descriptor {
    /// Credential type.
    #[serde(rename = "type")]
    pub credential_type: CredentialType,
    /// Minted by the provider from a root secret.
    pub brokered: bool,
    /// Refreshed by the provider before expiry.
    pub auto_refresh: bool,
    /// Sensitivity label.
    pub classification: Classification,
}

/// A use-handle: send HTTP through `proxy_base_url` with `session_token`; the provider injects
/// the credential in transit. Holds no credential material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UseHandle {
    /// The lease id (renew, release, revoke with it).
    pub lease_id: String,
    /// RFC 3339 expiry of the lease.
    pub expires_at: String,
    /// Granted lifetime in seconds.
    pub ttl: u32,
    /// Whether credential_lease `renew` may extend it.
    pub renewable: bool,
    /// Base URL to send requests to; paths and queries are appended to the service's API.
    pub proxy_base_url: String,
    /// Per-lease token the proxy requires as `Authorization: Bearer <token>` (not the credential).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_token: Option<String>,
    /// The service.
    pub service: String,
    /// Scopes granted.
    pub granted_scopes: Vec<String>,
    /// What is behind the handle.
    pub descriptor: Descriptor,
    /// 0 for a root lease, parent's depth + 1 for a delegated one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation_depth: Option<u32>,
    /// How to use it, in one sentence.
    pub how_to_use: String,
}

impl UseHandle {
    fn from_use(r: UseResult) -> Self {
        let how_to_use = format!(
            "Send ordinary HTTP requests to {}/<path of the service's API> with header \
             `Authorization: Bearer <session_token>`; the provider adds the credential. \
             Renew with credential_lease before {}.",
            r.proxy_base_url.trim_end_matches('/'),
            r.lease.expires_at
        );
        Self {
            lease_id: r.lease.id,
            expires_at: r.lease.expires_at,
            ttl: r.lease.ttl,
            renewable: r.lease.renewable,
            proxy_base_url: r.proxy_base_url,
            session_token: r.session_token,
            service: r.service,
            granted_scopes: r.granted_scopes,
            descriptor: Descriptor {
                credential_type: r.credential_descriptor.credential_type,
                brokered: r.credential_descriptor.brokered,
                auto_refresh: r.credential_descriptor.auto_refresh,
                classification: r.credential_descriptor.classification,
            },
            delegation_depth: r.lease.delegation_depth,
            how_to_use,
        }
    }
}

/// `credential_resolve`'s `credential`: a use-handle, or (export only) the material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ResolvedCredential {
    /// The default: a handle.
    Handle(UseHandle),
    /// `export: true` where policy permits: the material (v0.1 shape).
    Material(CredentialMaterial),
}

/// `credential_resolve` result, as the seed's `{credential, lease_id, expires_at}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ResolveOutput {
    /// A use-handle, or the material when exported.
    pub credential: ResolvedCredential,
    /// The lease that tracks it.
    pub lease_id: String,
    /// RFC 3339 expiry.
    pub expires_at: String,
    /// True only when material was exported.
    pub exported: bool,
    /// Scopes granted.
    pub granted_scopes: Vec<String>,
}

/// `credential_lease` result. Fields depend on `action`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LeaseOutput {
    /// What was done.
    pub action: LeaseToolAction,
    /// The lease.
    pub lease_id: String,
    /// After `renew`: the new expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// After `renew`: the granted lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
    /// After `renew`: whether it can be renewed again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewable: Option<bool>,
    /// After `renew`: the proxy URL, unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_base_url: Option<String>,
    /// After `release`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<bool>,
    /// After `revoke`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<bool>,
    /// After `revoke`: RFC 3339 instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// After `revoke`: delegated children revoked with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affected_leases: Option<Vec<String>>,
}

/// `credential_revoke` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RevokeOutput {
    /// Always true.
    pub revoked: bool,
    /// The lease named.
    pub lease_id: String,
    /// RFC 3339 instant.
    pub revoked_at: String,
    /// Delegated children revoked with it.
    pub affected_leases: Vec<String>,
}

impl From<RevokeResult> for RevokeOutput {
    fn from(r: RevokeResult) -> Self {
        Self { revoked: r.revoked, lease_id: r.lease_id, revoked_at: r.revoked_at, affected_leases: r.affected_leases }
    }
}

// ---------------------------------------------------------------------------------------------
// Schemas
// ---------------------------------------------------------------------------------------------

const NON_STANDARD_FORMATS: &[&str] =
    &["int8", "int16", "int32", "int64", "uint", "uint8", "uint16", "uint32", "uint64", "float", "double"];

/// Make a schemars schema portable for MCP clients: drop schemars' non-standard numeric
/// `format`s (`uint64`...), and turn optional properties' `["T","null"]` / `anyOf [.., null]`
/// into plain `T` (absent means unset; several validators flag nullable unions).
pub fn clean_schema(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(f)) = map.get("format")
                && NON_STANDARD_FORMATS.contains(&f.as_str())
            {
                map.remove("format");
            }
            let required: Vec<String> = map
                .get("required")
                .and_then(|r| r.as_array())
                .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            if let Some(Value::Object(props)) = map.get_mut("properties") {
                for (name, prop) in props.iter_mut() {
                    if required.contains(name) {
                        split_nullable(prop);
                    } else {
                        strip_null(prop);
                    }
                }
            }
            for (_, child) in map.iter_mut() {
                clean_schema(child);
            }
            hoist_type(map);
        }
        Value::Array(items) => items.iter_mut().for_each(clean_schema),
        _ => {}
    }
}

/// `oneOf`/`anyOf` whose branches all share one `type` gets that `type` itself, so clients
/// that look only at `type` (the inspector's argument coercion, form UIs) see e.g. `object`.
fn hoist_type(map: &mut JsonObject) {
    if map.contains_key("type") {
        return;
    }
    for key in ["oneOf", "anyOf"] {
        let Some(Value::Array(branches)) = map.get(key) else { continue };
        let types: Vec<Option<&str>> = branches.iter().map(|b| b.get("type").and_then(|t| t.as_str())).collect();
        if let Some(Some(first)) = types.first()
            && types.iter().all(|t| t == &Some(*first))
        {
            let t = (*first).to_owned();
            map.insert("type".into(), Value::String(t));
            return;
        }
    }
}

/// A required nullable `{"type": ["T","null"], ...}` becomes
/// `{"anyOf": [{"type": "T", ...}, {"type": "null"}]}` (one `type` per branch, which
/// single-type dialects understand); `description`, `title` and `default` stay outside.
fn split_nullable(prop: &mut Value) {
    let Value::Object(map) = prop else { return };
    let Some(Value::Array(types)) = map.get("type") else { return };
    let non_null: Vec<Value> = types.iter().filter(|t| t.as_str() != Some("null")).cloned().collect();
    if non_null.len() != 1 || non_null.len() == types.len() {
        return;
    }
    let mut branch = JsonObject::new();
    branch.insert("type".into(), non_null[0].clone());
    let keys: Vec<String> = map.keys().filter(|k| !["type", "description", "title", "default"].contains(&k.as_str())).cloned().collect();
    for k in keys {
        if let Some(v) = map.remove(&k) {
            branch.insert(k, v);
        }
    }
    map.remove("type");
    map.insert("anyOf".into(), serde_json::json!([Value::Object(branch), {"type": "null"}]));
}

fn strip_null(prop: &mut Value) {
    let Value::Object(map) = prop else { return };
    if let Some(Value::Array(types)) = map.get("type") {
        let non_null: Vec<Value> = types.iter().filter(|t| t.as_str() != Some("null")).cloned().collect();
        if non_null.len() == 1 {
            map.insert("type".into(), non_null[0].clone());
        } else if non_null.len() < types.len() {
            map.insert("type".into(), Value::Array(non_null));
        }
    }
    // `enum: [..., null]` from an optional enum.
    if let Some(Value::Array(values)) = map.get_mut("enum") {
        values.retain(|x| !x.is_null());
    }
    let Some(Value::Array(any)) = map.get("anyOf") else { return };
    let non_null: Vec<Value> = any
        .iter()
        .filter(|s| !(s.get("type").and_then(|t| t.as_str()) == Some("null") && s.as_object().is_some_and(|o| o.len() == 1)))
        .cloned()
        .collect();
    if non_null.len() == 1 {
        map.remove("anyOf");
        if let Value::Object(inner) = &non_null[0] {
            for (k, val) in inner {
                map.entry(k.clone()).or_insert_with(|| val.clone());
            }
        }
    }
}

fn schema<T: JsonSchema>(serialize: bool) -> Arc<JsonObject> {
    let mut settings = SchemaSettings::draft2020_12();
    settings.inline_subschemas = true;
    if serialize {
        settings = settings.for_serialize();
    }
    let root = settings.into_generator().into_root_schema_for::<T>();
    let mut v = serde_json::to_value(root).unwrap_or_else(|_| serde_json::json!({"type": "object"}));
    clean_schema(&mut v);
    let mut obj = match v {
        Value::Object(o) => o,
        _ => JsonObject::new(),
    };
    // The wrapper type's own name and doc are noise to a model; the tool has a description.
    obj.remove("title");
    obj.remove("description");
    if !matches!(obj.get("type"), Some(Value::String(t)) if t == "object") {
        obj.insert("type".into(), Value::String("object".into()));
    }
    Arc::new(obj)
}

// ---------------------------------------------------------------------------------------------
// The tool list
// ---------------------------------------------------------------------------------------------

/// Names of all tools, in `tools/list` order.
pub const TOOL_NAMES: [&str; 10] = [
    "vault_store",
    "vault_retrieve",
    "vault_delete",
    "vault_list",
    "credential_use",
    "credential_resolve",
    "credential_lease",
    "credential_revoke",
    "policy_check",
    "audit_log",
];

fn annotations(title: &str, read_only: bool, destructive: bool, idempotent: bool) -> ToolAnnotations {
    let a = ToolAnnotations::with_title(title).read_only(read_only).idempotent(idempotent).open_world(false);
    if read_only { a } else { a.destructive(destructive) }
}

fn tool<I: JsonSchema, O: JsonSchema>(name: &'static str, description: &'static str, ann: ToolAnnotations) -> Tool {
    let mut t = Tool::new_with_raw(name, Some(description.into()), schema::<I>(false))
        .with_raw_output_schema(schema::<O>(true))
        .with_annotations(ann.clone());
    t.title = ann.title.clone();
    t
}

static TOOLS: LazyLock<Vec<Tool>> = LazyLock::new(|| {
    vec![
        tool::<VaultStoreParams, VaultStoreResult>(
            "vault_store",
            "Store a credential in the vault (or a new version of an existing key). The value is \
             sealed and no tool ever returns it again except an audited, policy-permitted export. \
             Give `upstream` (the API base URL) and optionally `inject` so credential_use can proxy \
             requests with it. Policy action: `store` (remote agents also need scope `vault:store`).",
            annotations("Store a credential", false, false, false),
        ),
        tool::<VaultRetrieveParams, VaultRetrieveResult>(
            "vault_retrieve",
            "Export a stored value. Prefer credential_use, which never exposes the value. Needs \
             `purpose` and a policy permitting action `retrieve` for this agent on this key; every \
             export is audited. Policy action: `retrieve` (remote scope `vault:retrieve`).",
            annotations("Export a credential value", true, false, true),
        ),
        tool::<VaultDeleteParams, VaultDeleteResult>(
            "vault_delete",
            "Remove a credential from the vault; its open leases are revoked. Policy action: `delete` \
             (remote scope `vault:delete`).",
            annotations("Delete a credential", false, true, true),
        ),
        tool::<VaultListParams, VaultListResult>(
            "vault_list",
            "List credentials this agent may see: key, service, type, classification, metadata, \
             tags. Values are never returned. Policy action: `list` (per credential; others are \
             left out; remote scope `vault:list`).",
            annotations("List credentials", true, false, true),
        ),
        tool::<CredentialUseArgs, UseHandle>(
            "credential_use",
            "Get a use-handle for a service: a lease, a `proxy_base_url` and a `session_token`. Send \
             ordinary HTTP requests to proxy_base_url + path with `Authorization: Bearer \
             <session_token>`; the provider injects the real credential, which you never see. \
             Policy action: `use` (remote scope `crp:use`).",
            annotations("Use a credential through the proxy", false, false, false),
        ),
        tool::<CredentialResolveArgs, ResolveOutput>(
            "credential_resolve",
            "Resolve a credential for a service (CRP). By default returns a use-handle in \
             `credential` (proxy_base_url, session_token, descriptor, lease_id, expires_at), like \
             credential_use (policy action `use`). With `export: true` and a `purpose` it returns \
             the material itself, only where a policy permits action `resolve`; audited as an \
             export (remote scopes `crp:use` / `crp:resolve`).",
            annotations("Resolve a credential", false, false, false),
        ),
        tool::<CredentialLeaseArgs, LeaseOutput>(
            "credential_lease",
            "Manage a lease: `renew` extends it (policy action `renew`; the proxy URL and token stay \
             the same), `release` gives it up (action `release`), `revoke` revokes it and its \
             delegated children (action `revoke`). Remote scope `crp:lease` (`crp:revoke` for revoke).",
            annotations("Renew, release or revoke a lease", false, true, false),
        ),
        tool::<CredentialRevokeArgs, RevokeOutput>(
            "credential_revoke",
            "Revoke a lease and every lease delegated from it. The next proxied request with it \
             fails. Policy action: `revoke` (remote scope `crp:revoke`).",
            annotations("Revoke a lease", false, true, true),
        ),
        tool::<PolicyCheckParams, PolicyCheckResult>(
            "policy_check",
            "Dry-run a policy decision without touching the credential: would `requester` (default: \
             this agent) be allowed `action` on `key`? Returns allowed, outcome, the deciding policy \
             and its reason. Checking another agent needs policy action `audit` (remote scope `policy:check`).",
            annotations("Check policy", true, false, true),
        ),
        tool::<AuditQueryParams, AuditQueryResult>(
            "audit_log",
            "Query the tamper-evident audit trail (newest first): who did what to which key, when, \
             under which policy. Never contains values. Policy action: `audit` (remote scope `audit:read`).",
            annotations("Read the audit log", true, false, true),
        ),
    ]
});

/// Every tool definition (built once).
pub fn tools() -> &'static [Tool] {
    &TOOLS
}

// ---------------------------------------------------------------------------------------------
// Calling
// ---------------------------------------------------------------------------------------------

/// What a tool call knows besides its arguments.
#[derive(Debug, Clone)]
pub struct CallEnv {
    /// Negotiated CRP version of the connection.
    pub version: Version,
    /// The MCP client's name (default `consumer`).
    pub client_name: Option<String>,
}

/// A failed tool call: text for the agent (already free of values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolFailure(pub String);

impl ToolFailure {
    fn bad_args(tool: &str, detail: &str) -> Self {
        Self(format!(
            "invalid arguments for {tool}: {detail}. Fix the arguments to match the tool's input schema and call it again."
        ))
    }
}

/// Who, what, on which subject: for error guidance.
struct Subject<'a> {
    tool: &'a str,
    action: &'a str,
    /// `key`, `service` or `lease` with its value.
    what: String,
    agent: &'a str,
}

fn decode_args<T: DeserializeOwned>(tool: &str, args: JsonObject) -> Result<T, ToolFailure> {
    serde_json::from_value(Value::Object(args))
        .map_err(|e| ToolFailure::bad_args(tool, &redact_serde_message(&e.to_string())))
}

fn decode_result<T: DeserializeOwned>(tool: &str, v: Value) -> Result<T, ToolFailure> {
    serde_json::from_value(v).map_err(|_| {
        ToolFailure(format!(
            "{tool}: the provider's answer does not have the expected shape; tell the operator \
             (crp-mcp and the provider may be different versions)"
        ))
    })
}

fn require_purpose(tool: &str, purpose: &Option<String>) -> Result<(), ToolFailure> {
    match purpose {
        Some(p) if !p.trim().is_empty() => Ok(()),
        _ => Err(ToolFailure(format!(
            "{tool} exports a credential value, so it needs `purpose`: say why the raw value must \
             leave the vault (it is audited). If you only need to call an HTTP API, use \
             credential_use instead: it never exposes the value."
        ))),
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Value, ToolFailure> {
    serde_json::to_value(v).map_err(|_| ToolFailure("internal error encoding the result".into()))
}

async fn crp(backend: &dyn Backend, version: Version, method: &str, params: Value, s: &Subject<'_>) -> Result<Value, ToolFailure> {
    backend.call(version, method, params).await.map_err(|e| ToolFailure(explain(&e, s)))
}

/// Call tool `name`. `None` when there is no such tool (a protocol error for the caller).
pub async fn call_tool(backend: &dyn Backend, env: &CallEnv, name: &str, args: JsonObject) -> Option<CallToolResult> {
    let out = match name {
        "vault_store" => vault_store(backend, env, args).await,
        "vault_retrieve" => vault_retrieve(backend, env, args).await,
        "vault_delete" => vault_delete(backend, env, args).await,
        "vault_list" => vault_list(backend, env, args).await,
        "credential_use" => credential_use(backend, env, args).await,
        "credential_resolve" => credential_resolve(backend, env, args).await,
        "credential_lease" => credential_lease(backend, env, args).await,
        "credential_revoke" => credential_revoke(backend, env, args).await,
        "policy_check" => policy_check(backend, env, args).await,
        "audit_log" => audit_log(backend, env, args).await,
        _ => return None,
    };
    Some(match out {
        Ok(v) => CallToolResult::structured(v),
        Err(ToolFailure(text)) => CallToolResult::error(vec![ContentBlock::text(text)]),
    })
}

async fn vault_store(b: &dyn Backend, env: &CallEnv, args: JsonObject) -> Result<Value, ToolFailure> {
    let p: VaultStoreParams = decode_args("vault_store", args)?;
    let s = Subject { tool: "vault_store", action: "store", what: format!("key `{}`", p.key), agent: b.agent() };
    let params = to_json(&p)?;
    drop(p); // zeroizes the SecretValue copy; the JSON copy goes to the backend
    let v = crp(b, env.version, ext::VAULT_STORE, params, &s).await?;
    to_json(&decode_result::<VaultStoreResult>("vault_store", v)?)
}

async fn vault_retrieve(b: &dyn Backend, env: &CallEnv, args: JsonObject) -> Result<Value, ToolFailure> {
    let p: VaultRetrieveParams = decode_args("vault_retrieve", args)?;
    require_purpose("vault_retrieve", &p.purpose)?;
    let s = Subject { tool: "vault_retrieve", action: "retrieve", what: format!("key `{}`", p.key), agent: b.agent() };
    let v = crp(b, env.version, ext::VAULT_RETRIEVE, to_json(&p)?, &s).await?;
    to_json(&decode_result::<VaultRetrieveResult>("vault_retrieve", v)?)
}

async fn vault_delete(b: &dyn Backend, env: &CallEnv, args: JsonObject) -> Result<Value, ToolFailure> {
    let p: VaultDeleteParams = decode_args("vault_delete", args)?;
    let s = Subject { tool: "vault_delete", action: "delete", what: format!("key `{}`", p.key), agent: b.agent() };
    let v = crp(b, env.version, ext::VAULT_DELETE, to_json(&p)?, &s).await?;
    to_json(&decode_result::<VaultDeleteResult>("vault_delete", v)?)
}

async fn vault_list(b: &dyn Backend, env: &CallEnv, args: JsonObject) -> Result<Value, ToolFailure> {
    let p: VaultListParams = decode_args("vault_list", args)?;
    let s = Subject { tool: "vault_list", action: "list", what: "the vault".into(), agent: b.agent() };
    let v = crp(b, env.version, ext::VAULT_LIST, to_json(&p)?, &s).await?;
    to_json(&decode_result::<VaultListResult>("vault_list", v)?)
}

fn request_context(purpose: Option<String>, consumer: Option<String>, requestor: Option<String>) -> Option<RequestContext> {
    let ctx = RequestContext { consumer, consumer_version: None, requestor, purpose, trace_id: None };
    (ctx != RequestContext::default()).then_some(ctx)
}

async fn credential_use(b: &dyn Backend, env: &CallEnv, args: JsonObject) -> Result<Value, ToolFailure> {
    let a: CredentialUseArgs = decode_args("credential_use", args)?;
    if a.max_depth.is_some() && a.parent_lease_id.is_none() {
        return Err(ToolFailure::bad_args("credential_use", "`max_depth` only applies with `parent_lease_id`"));
    }
    let s = Subject { tool: "credential_use", action: "use", what: format!("service `{}`", a.service), agent: b.agent() };
    let params = UseParams {
        service: a.service.clone(),
        scopes: a.scopes,
        ttl: a.ttl,
        delegation: a.parent_lease_id.map(|parent_lease_id| Delegation { parent_lease_id, max_depth: a.max_depth }),
        identity_scope: None,
        context: request_context(a.purpose, a.consumer.or_else(|| env.client_name.clone()), None),
    };
    let v = crp(b, env.version, methods::USE, to_json(&params)?, &s).await?;
    to_json(&UseHandle::from_use(decode_result::<UseResult>("credential_use", v)?))
}

async fn credential_resolve(b: &dyn Backend, env: &CallEnv, args: JsonObject) -> Result<Value, ToolFailure> {
    let a: CredentialResolveArgs = decode_args("credential_resolve", args)?;
    let context = request_context(a.purpose.clone(), env.client_name.clone(), a.requester.clone());
    if a.export {
        require_purpose("credential_resolve with export", &a.purpose)?;
        let s = Subject { tool: "credential_resolve", action: "resolve", what: format!("service `{}`", a.service), agent: b.agent() };
        let params = ResolveParams { service: a.service.clone(), scopes: a.scope, credential_type: None, ttl: a.ttl, context };
        // crp/resolve exists only under CRP 0.1: the export is always a 0.1 call.
        let v = crp(b, Version::V0_1, methods::RESOLVE, to_json(&params)?, &s).await?;
        let r: ResolveResult = decode_result("credential_resolve", v)?;
        return to_json(&ResolveOutput {
            lease_id: r.lease.id,
            expires_at: r.lease.expires_at,
            exported: true,
            granted_scopes: r.granted_scopes,
            credential: ResolvedCredential::Material(r.credential),
        });
    }
    let s = Subject { tool: "credential_resolve", action: "use", what: format!("service `{}`", a.service), agent: b.agent() };
    let params = UseParams {
        service: a.service.clone(),
        scopes: a.scope,
        ttl: a.ttl,
        delegation: None,
        identity_scope: None,
        context,
    };
    let v = crp(b, env.version, methods::USE, to_json(&params)?, &s).await?;
    let h = UseHandle::from_use(decode_result::<UseResult>("credential_resolve", v)?);
    to_json(&ResolveOutput {
        lease_id: h.lease_id.clone(),
        expires_at: h.expires_at.clone(),
        exported: false,
        granted_scopes: h.granted_scopes.clone(),
        credential: ResolvedCredential::Handle(h),
    })
}

async fn credential_lease(b: &dyn Backend, env: &CallEnv, args: JsonObject) -> Result<Value, ToolFailure> {
    let a: CredentialLeaseArgs = decode_args("credential_lease", args)?;
    let what = format!("lease `{}`", a.lease_id);
    let empty = LeaseOutput {
        action: a.action,
        lease_id: a.lease_id.clone(),
        expires_at: None,
        ttl: None,
        renewable: None,
        proxy_base_url: None,
        released: None,
        revoked: None,
        revoked_at: None,
        affected_leases: None,
    };
    match a.action {
        LeaseToolAction::Renew | LeaseToolAction::Release => {
            let (action, verb) = match a.action {
                LeaseToolAction::Renew => (LeaseAction::Renew, "renew"),
                _ => (LeaseAction::Release, "release"),
            };
            if action == LeaseAction::Release && a.ttl.is_some() {
                return Err(ToolFailure::bad_args("credential_lease", "`ttl` only applies to `renew`"));
            }
            let s = Subject { tool: "credential_lease", action: verb, what, agent: b.agent() };
            let params = LeaseParams { action, lease_id: a.lease_id.clone(), ttl: a.ttl };
            let v = crp(b, env.version, methods::LEASE, to_json(&params)?, &s).await?;
            let out = match decode_result::<LeaseResult>("credential_lease", v)? {
                LeaseResult::Renewed(r) => LeaseOutput {
                    lease_id: r.lease.id,
                    expires_at: Some(r.lease.expires_at),
                    ttl: Some(r.lease.ttl),
                    renewable: Some(r.lease.renewable),
                    proxy_base_url: r.proxy_base_url,
                    ..empty
                },
                LeaseResult::Released(r) => LeaseOutput { lease_id: r.lease_id, released: Some(r.released), ..empty },
            };
            to_json(&out)
        }
        LeaseToolAction::Revoke => {
            if a.ttl.is_some() {
                return Err(ToolFailure::bad_args("credential_lease", "`ttl` only applies to `renew`"));
            }
            let s = Subject { tool: "credential_lease", action: "revoke", what, agent: b.agent() };
            let params = RevokeParams { lease_id: a.lease_id.clone(), reason: RevokeReason::ManualRevocation, detail: None };
            let v = crp(b, env.version, methods::REVOKE, to_json(&params)?, &s).await?;
            let r: RevokeResult = decode_result("credential_lease", v)?;
            to_json(&LeaseOutput {
                lease_id: r.lease_id,
                revoked: Some(r.revoked),
                revoked_at: Some(r.revoked_at),
                affected_leases: Some(r.affected_leases),
                ..empty
            })
        }
    }
}

async fn credential_revoke(b: &dyn Backend, env: &CallEnv, args: JsonObject) -> Result<Value, ToolFailure> {
    let a: CredentialRevokeArgs = decode_args("credential_revoke", args)?;
    let s = Subject { tool: "credential_revoke", action: "revoke", what: format!("lease `{}`", a.lease_id), agent: b.agent() };
    let params = RevokeParams {
        lease_id: a.lease_id,
        reason: a.reason.unwrap_or(RevokeReason::ManualRevocation),
        detail: a.detail,
    };
    let v = crp(b, env.version, methods::REVOKE, to_json(&params)?, &s).await?;
    to_json(&RevokeOutput::from(decode_result::<RevokeResult>("credential_revoke", v)?))
}

async fn policy_check(b: &dyn Backend, env: &CallEnv, args: JsonObject) -> Result<Value, ToolFailure> {
    let p: PolicyCheckParams = decode_args("policy_check", args)?;
    let action = if p.requester.as_deref().is_some_and(|r| r != b.agent()) { "audit" } else { "policy check" };
    let s = Subject { tool: "policy_check", action, what: format!("key `{}`", p.key), agent: b.agent() };
    let v = crp(b, env.version, ext::POLICY_CHECK, to_json(&p)?, &s).await?;
    to_json(&decode_result::<PolicyCheckResult>("policy_check", v)?)
}

async fn audit_log(b: &dyn Backend, env: &CallEnv, args: JsonObject) -> Result<Value, ToolFailure> {
    let p: AuditQueryParams = decode_args("audit_log", args)?;
    let what = p.key.as_ref().map(|k| format!("key `{k}`")).unwrap_or_else(|| "the audit log".into());
    let s = Subject { tool: "audit_log", action: "audit", what, agent: b.agent() };
    let v = crp(b, env.version, ext::AUDIT_QUERY, to_json(&p)?, &s).await?;
    to_json(&decode_result::<AuditQueryResult>("audit_log", v)?)
}

// ---------------------------------------------------------------------------------------------
// Error guidance
// ---------------------------------------------------------------------------------------------

fn cedar_hint(agent: &str, action: &str, what: &str) -> String {
    let resource = what
        .strip_prefix("key `")
        .and_then(|k| k.strip_suffix('`'))
        .map(|k| format!("resource == Credential::\"{k}\""))
        .unwrap_or_else(|| "resource".into());
    format!("permit(principal == Agent::\"{agent}\", action == Action::\"{action}\", {resource});")
}

/// Turn a CRP error into text an agent can act on. Uses only the error's own message and
/// typed data (which cannot carry a value) plus names from the request.
fn explain(e: &CrpError, s: &Subject<'_>) -> String {
    let data = e.data.clone().unwrap_or_default();
    let policy = data.policy.as_deref().map(|p| format!(" (policy `{p}`)")).unwrap_or_default();
    let name = e.kind().map(|k| k.name()).unwrap_or("error");
    let head = format!("{}{policy}", e.message);
    let advice = match e.kind() {
        Some(ErrorCode::PolicyDenied) => format!(
            "Agent `{}` may not `{}` {}. Ask the operator to allow it in the vault's Cedar policy, e.g. `{}`, \
             or call policy_check to see what is allowed.",
            s.agent,
            s.action,
            s.what,
            cedar_hint(s.agent, s.action, &s.what)
        ),
        Some(ErrorCode::RequireApproval) => match &data.approval_id {
            Some(id) => format!(
                "A human must approve this request: ask the operator to run `crp-provider approvals approve {id}`, then call {} again.",
                s.tool
            ),
            None => format!("A human must approve this request; ask the operator, then call {} again.", s.tool),
        },
        Some(ErrorCode::Quarantine) => {
            "Stop using this credential and tell the operator; retrying will not succeed.".into()
        }
        Some(ErrorCode::ServiceNotFound) => {
            "Call vault_list to see the credentials and services this agent can see, or store one with vault_store.".into()
        }
        Some(ErrorCode::LeaseNotFound) | Some(ErrorCode::LeaseExpired) | Some(ErrorCode::LeaseNotRenewable) => {
            "Get a new lease with credential_use.".into()
        }
        Some(ErrorCode::ScopeUnavailable) => {
            "Ask for fewer scopes (the refused ones are listed) or ask the operator to offer them.".into()
        }
        Some(ErrorCode::RateLimited) => match data.retry_after {
            Some(n) => format!("Wait {n} seconds, then call {} again.", s.tool),
            None => format!("Wait a little, then call {} again.", s.tool),
        },
        Some(ErrorCode::InvalidParams) => {
            format!("Fix the arguments to match {}'s input schema and call it again.", s.tool)
        }
        Some(ErrorCode::FeatureNotSupported) if s.action == "resolve" => format!(
            "Exporting material needs a policy that permits action `resolve` for agent `{}` on {}; \
             without one, call credential_resolve without `export` (or credential_use) for a use-handle.",
            s.agent, s.what
        ),
        Some(ErrorCode::FeatureNotSupported) | Some(ErrorCode::MethodNotFound) => {
            "This provider does not offer that operation.".into()
        }
        Some(ErrorCode::CredentialUnavailable) => {
            "The credential exists but cannot be used now (expired, disabled or missing an upstream); ask the operator.".into()
        }
        Some(ErrorCode::DelegationDepthExceeded) => {
            "Delegate from a lease closer to the root, or ask for a new root lease with credential_use.".into()
        }
        Some(ErrorCode::BrokerFailure) => "The token endpoint failed; try again later or tell the operator.".into(),
        Some(ErrorCode::RevocationFailed) => "Try again; if it keeps failing, tell the operator.".into(),
        Some(ErrorCode::VersionMismatch) => "Reconnect without asking for a CRP version.".into(),
        _ => "If this keeps happening, tell the operator (the provider's log has details).".into(),
    };
    format!("{head}. {advice} [CRP error {} {name}]", e.code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_tools_with_object_schemas_and_no_uint_formats() {
        let tools = tools();
        let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
        assert_eq!(names, TOOL_NAMES);
        for t in tools {
            let input = serde_json::to_string(&t.input_schema).unwrap();
            let output = serde_json::to_string(t.output_schema.as_ref().unwrap()).unwrap();
            for s in [&input, &output] {
                assert!(!s.contains("uint"), "{}: {s}", t.name);
                assert!(!s.contains("$ref"), "{}: {s}", t.name);
            }
            // Optional arguments are plain types, not nullable unions.
            assert!(!input.contains("\"null\""), "{}: {input}", t.name);
            assert_eq!(t.input_schema.get("type").unwrap(), "object");
            assert!(t.description.as_ref().unwrap().contains('`'), "{} names a policy action", t.name);
            assert!(t.annotations.is_some());
        }
        let store = &tools[0];
        let props = store.input_schema.get("properties").unwrap();
        for k in ["key", "value", "metadata", "ttl"] {
            assert!(props.get(k).is_some(), "vault_store has {k}");
        }
        let resolve = tools.iter().find(|t| t.name == "credential_resolve").unwrap();
        let props = resolve.input_schema.get("properties").unwrap();
        for k in ["service", "scope", "requester"] {
            assert!(props.get(k).is_some(), "credential_resolve has {k}");
        }
    }

    #[test]
    fn clean_schema_flattens_optional_nulls() {
        let mut v = serde_json::json!({
            "type": "object",
            "required": ["a"],
            "properties": {
                "a": {"type": "integer", "format": "uint64"},
                "b": {"type": ["string", "null"]},
                "c": {"anyOf": [{"type": "string", "enum": ["x"]}, {"type": "null"}], "description": "d"},
                "d": {"type": ["integer", "null"], "format": "uint32", "minimum": 0}
            }
        });
        clean_schema(&mut v);
        assert_eq!(v["properties"]["a"], serde_json::json!({"type": "integer"}));
        assert_eq!(v["properties"]["b"], serde_json::json!({"type": "string"}));
        assert_eq!(v["properties"]["c"], serde_json::json!({"type": "string", "enum": ["x"], "description": "d"}));
        assert_eq!(v["properties"]["d"], serde_json::json!({"type": "integer", "minimum": 0}));
        let mut v = serde_json::json!({
            "type": "object", "required": ["p"],
            "properties": {"p": {"type": ["string", "null"], "description": "d", "minLength": 1}}
        });
        clean_schema(&mut v);
        assert_eq!(
            v["properties"]["p"],
            serde_json::json!({"description": "d", "anyOf": [{"type": "string", "minLength": 1}, {"type": "null"}]})
        );
        let mut v = serde_json::json!({"oneOf": [{"type": "object"}, {"type": "object", "properties": {}}]});
        clean_schema(&mut v);
        assert_eq!(v["type"], "object");
        let mut v = serde_json::json!({"anyOf": [{"type": "object"}, {"type": "string"}]});
        clean_schema(&mut v);
        assert!(v.get("type").is_none());
    }

    #[test]
    fn policy_denied_is_actionable() {
        let e = CrpError::policy_denied("no policy permits this", Some("starter-owner".into()));
        let s = Subject { tool: "vault_retrieve", action: "retrieve", what: "key `aws/prod`".into(), agent: "owner" };
        let t = explain(&e, &s);
        assert!(t.contains("policy denied: no policy permits this (policy `starter-owner`)"), "{t}");
        assert!(t.contains("Agent::\"owner\""), "{t}");
        assert!(t.contains("Credential::\"aws/prod\""), "{t}");
        assert!(t.contains("-33003"), "{t}");
        let e = CrpError::require_approval("ap-1", "needs a human", None);
        assert!(explain(&e, &s).contains("crp-provider approvals approve ap-1"));
    }
}
