//! The data-driven protocol vectors: runs every case of every `spec-vectors/*.json` (files
//! starting with `fixtures` belong to the conformance runner and are skipped) and reports all
//! failures at once, each named `file > group > case`. Adding a vector needs no Rust change.
//!
//! A file is an array of groups `{description, spec, cases: [...]}`. A group may also set
//! `kind`, `level`, `schema`, `method`, `version` and `provider`, which its cases inherit.
//! Every case has a `description`, a `kind`, a `level` (RFC 2119 keyword) and a `spec`
//! section (its own or the group's). Kinds:
//!
//! - `valid`: `data` validates against `schemas/<schema>.schema.json`, decodes into the Rust
//!   type (and passes its `validate()`), and encodes back to `canonical` (default: `data`).
//! - `schema-invalid`: `data` fails the schema and fails the Rust type (decode or validate).
//! - `invalid`: `method` + `params` through `crp_core::Dispatcher` under `version` (default
//!   0.2) answer the error `expect` (subset match), and the provider is not called.
//! - `dispatch`: as `invalid`, but the provider is called (the canned answers of the in-test
//!   provider come from `provider`, a map of method to `{result}` or `{error}`); `expect` is
//!   a subset of the JSON-RPC response; `received` a subset of the params the provider got.
//! - `envelope`: `raw` text (or `message`, serialized) in; `expect` is `"none"` (no answer),
//!   an object (one response) or an array (a batch, matched in any order); `calls` counts
//!   provider calls.
//! - `version`: `requested` (string or null) negotiates to `expect.version`, or fails with
//!   `expect.code` and `expect.supported`.
//! - `error-code`: `code` is in the registry under the spec name `name`.
//! - `signature`: an Ed25519 key from `seed` (hex) signs `request` (`method`, `host`,
//!   `pathAndQuery`, `timestamp`, `nonce`, `body`): the canonical string, signature and public
//!   key equal `expect`, the signature verifies, and a changed body or timestamp does not.
//!
//! Subset matching: objects match when every expected key matches (`"$absent"` requires the
//! key to be missing, `"$present"` any value, `"$contains:text"` a string containing `text`);
//! arrays match element-wise with equal length.
//! A `canary` string must not appear anywhere in the answer (secret-leak vectors).

#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use crp_core::provider::Transport;
use crp_core::types::ext;
use crp_core::types::*;
use crp_core::version::{self, Version};
use crp_core::{CallContext, CrpError, Dispatcher, ErrorCode, Provider};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const KINDS: [&str; 8] =
    ["valid", "schema-invalid", "invalid", "dispatch", "envelope", "version", "error-code", "signature"];
const LEVELS: [&str; 8] =
    ["MUST", "MUST NOT", "SHOULD", "SHOULD NOT", "MAY", "REQUIRED", "RECOMMENDED", "OPTIONAL"];
/// Keys a group may set for its cases.
const INHERITED: [&str; 7] = ["kind", "level", "schema", "method", "version", "provider", "spec"];
const CASE_KEYS: [&str; 23] = [
    "description", "kind", "level", "spec", "schema", "data", "canonical", "method", "params",
    "version", "provider", "expect", "received", "called", "calls", "raw", "message",
    "requested", "canary", "comment", "code", "seed", "request",
];
const GROUP_KEYS: [&str; 3] = ["description", "cases", "comment"];

// ---------------------------------------------------------------------------------------
// The in-test provider: records calls, answers with canned typed results.

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<(String, Value)>>,
    /// method -> `{"result": ..}` or `{"error": ..}`; absent methods use the defaults below.
    canned: BTreeMap<String, Value>,
}

impl Recorder {
    fn new(canned: BTreeMap<String, Value>) -> Self {
        Self { calls: Mutex::new(Vec::new()), canned }
    }

    fn record(&self, method: &str, params: &impl Serialize) {
        let v = serde_json::to_value(params).unwrap_or(Value::Null);
        self.calls.lock().expect("recorder lock").push((method.to_string(), v));
    }

    fn calls(&self) -> Vec<(String, Value)> {
        self.calls.lock().expect("recorder lock").clone()
    }

    /// The canned answer for `method`, decoded into the method's typed result so that a
    /// vector cannot make the provider return something the types do not allow.
    fn answer<T: DeserializeOwned>(&self, method: &str, default: impl FnOnce() -> T) -> Result<T, CrpError> {
        match self.canned.get(method) {
            None => Ok(default()),
            Some(spec) => {
                if let Some(e) = spec.get("error") {
                    let e: CrpError = serde_json::from_value(e.clone())
                        .map_err(|err| CrpError::provider_error(format!("vector's canned error does not decode: {err}")))?;
                    Err(e)
                } else if let Some(r) = spec.get("result") {
                    serde_json::from_value(r.clone())
                        .map_err(|err| CrpError::provider_error(format!("vector's canned result does not decode: {err}")))
                } else {
                    Err(CrpError::provider_error("vector's canned answer has neither result nor error"))
                }
            }
        }
    }
}

fn lease(id: &str, depth: Option<u32>) -> Lease {
    Lease {
        id: id.into(),
        expires_at: "2026-07-17T13:00:00Z".into(),
        ttl: 3600,
        renewable: true,
        delegation_depth: depth,
    }
}

#[async_trait]
impl Provider for Recorder {
    fn capability(&self, v: Version) -> Capability {
        Capability {
            version: v.to_string(),
            versions: version::SUPPORTED.iter().map(|s| s.to_string()).collect(),
            provider: Some("vector-recorder".into()),
            features: vec![Feature::Use, Feature::List, Feature::Lease, Feature::Revoke],
            conformance: Some(ConformanceTier::Standard),
        }
    }

    async fn use_credential(&self, _: &CallContext, p: UseParams) -> Result<UseResult, CrpError> {
        self.record("crp/use", &p);
        self.answer("crp/use", || UseResult {
            lease: lease("lease-vec-0001", Some(0)),
            proxy_base_url: "http://127.0.0.1:7700/api/v1/proxy/t/lease-vec-0001".into(),
            session_token: Some("st-vec-0001".into()),
            service: p.service.clone(),
            granted_scopes: p.scopes.clone(),
            credential_descriptor: CredentialDescriptor {
                credential_type: CredentialType::ApiKey,
                brokered: false,
                auto_refresh: false,
                classification: Classification::Confidential,
            },
        })
    }

    async fn resolve(&self, _: &CallContext, p: ResolveParams) -> Result<ResolveResult, CrpError> {
        self.record("crp/resolve", &p);
        self.answer("crp/resolve", || ResolveResult {
            credential: CredentialMaterial::ApiKey {
                key: crp_core::SecretValue::new("sk-vector-export"),
                header: "Authorization".into(),
                prefix: Some("Bearer".into()),
            },
            lease: lease("lease-vec-0002", None),
            service: p.service.clone(),
            granted_scopes: p.scopes.clone(),
            metadata: Some(ResolveMetadata {
                provider: "vector-recorder".into(),
                resolved_at: "2026-07-17T12:00:00Z".into(),
            }),
        })
    }

    async fn lease(&self, _: &CallContext, p: LeaseParams) -> Result<LeaseResult, CrpError> {
        self.record("crp/lease", &p);
        self.answer("crp/lease", || match p.action {
            LeaseAction::Renew => LeaseResult::Renewed(LeaseRenewed {
                lease: lease(&p.lease_id, Some(0)),
                proxy_base_url: Some(format!("http://127.0.0.1:7700/api/v1/proxy/t/{}", p.lease_id)),
                credential: None,
            }),
            LeaseAction::Release => {
                LeaseResult::Released(LeaseReleased { released: true, lease_id: p.lease_id.clone() })
            }
        })
    }

    async fn revoke(&self, _: &CallContext, p: RevokeParams) -> Result<RevokeResult, CrpError> {
        self.record("crp/revoke", &p);
        self.answer("crp/revoke", || RevokeResult {
            revoked: true,
            lease_id: p.lease_id.clone(),
            revoked_at: "2026-07-17T12:30:00Z".into(),
            affected_leases: vec![p.lease_id.clone()],
        })
    }

    async fn list(&self, _: &CallContext, p: ListParams) -> Result<ListResult, CrpError> {
        self.record("crp/list", &p);
        self.answer("crp/list", || ListResult {
            services: vec![ServiceEntry {
                service: "github.com/api".into(),
                credential_types: vec![CredentialType::OauthBearer],
                available_scopes: Some(vec!["repo:read".into()]),
                max_ttl: Some(7200),
                description: None,
                classification: Some(Classification::Confidential),
            }],
            cursor: None,
        })
    }

    async fn extension(&self, ctx: &CallContext, method: &str, params: Value) -> Result<Value, CrpError> {
        self.record(method, &params);
        if method == ext::WHOAMI {
            let r = self.answer(method, || ext::WhoamiResult {
                agent: ctx.agent.clone(),
                roles: vec!["agent".into()],
                version: ctx.version.to_string(),
            })?;
            return serde_json::to_value(r).map_err(|_| CrpError::internal());
        }
        match self.canned.get(method) {
            Some(_) => self.answer::<Value>(method, || Value::Null),
            None => Err(CrpError::method_not_found(method)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Schema stem -> Rust type round trip.

fn decode_encode<T: DeserializeOwned + Serialize>(data: &Value) -> Result<(T, Value), String> {
    let v: T = serde_json::from_value(data.clone()).map_err(|e| format!("does not decode: {e}"))?;
    let back = serde_json::to_value(&v).map_err(|e| format!("does not encode: {e}"))?;
    Ok((v, back))
}

/// Decode `data` as the type behind schema `stem` (running its `validate()` where it has
/// one) and encode it again.
fn roundtrip(stem: &str, data: &Value) -> Result<Value, String> {
    macro_rules! plain {
        ($t:ty) => {
            decode_encode::<$t>(data).map(|(_, back)| back)
        };
    }
    macro_rules! checked {
        ($t:ty) => {
            decode_encode::<$t>(data).and_then(|(v, back)| {
                v.validate().map_err(|e| format!("fails validate(): {} ({})", e.message, e.code))?;
                Ok(back)
            })
        };
    }
    match stem {
        "capability" => checked!(Capability),
        "use-params" => checked!(UseParams),
        "use-result" => plain!(UseResult),
        "resolve-params" => checked!(ResolveParams),
        "resolve-result" => plain!(ResolveResult),
        "lease-params" => checked!(LeaseParams),
        "lease-result" => plain!(LeaseResult),
        "revoke-params" => checked!(RevokeParams),
        "revoke-result" => plain!(RevokeResult),
        "list-params" => checked!(ListParams),
        "list-result" => plain!(ListResult),
        "credential-material" => plain!(CredentialMaterial),
        "error" => plain!(CrpError),
        "jsonrpc-request" => plain!(crp_core::jsonrpc::Request),
        "jsonrpc-response" => plain!(crp_core::jsonrpc::Response),
        "x-vault-store-params" => plain!(ext::VaultStoreParams),
        "x-vault-store-result" => plain!(ext::VaultStoreResult),
        "x-vault-retrieve-params" => plain!(ext::VaultRetrieveParams),
        "x-vault-retrieve-result" => plain!(ext::VaultRetrieveResult),
        "x-vault-delete-params" => plain!(ext::VaultDeleteParams),
        "x-vault-delete-result" => plain!(ext::VaultDeleteResult),
        "x-vault-list-params" => plain!(ext::VaultListParams),
        "x-vault-list-result" => plain!(ext::VaultListResult),
        "x-policy-check-params" => plain!(ext::PolicyCheckParams),
        "x-policy-check-result" => plain!(ext::PolicyCheckResult),
        "x-audit-query-params" => plain!(ext::AuditQueryParams),
        "x-audit-query-result" => plain!(ext::AuditQueryResult),
        "x-whoami-result" => plain!(ext::WhoamiResult),
        other => Err(format!("no Rust type registered for schema `{other}` (add it to roundtrip() in tests/vectors.rs)")),
    }
}

// ---------------------------------------------------------------------------------------
// Matching.

/// `Err(path: why)` when `actual` does not contain `expected`.
fn subset(expected: &Value, actual: Option<&Value>, path: &str) -> Result<(), String> {
    match (expected, actual) {
        (Value::String(s), None) if s == "$absent" => Ok(()),
        (Value::String(s), Some(a)) if s == "$absent" => Err(format!("{path}: must be absent, found {a}")),
        (Value::String(s), Some(_)) if s == "$present" => Ok(()),
        (Value::String(s), Some(Value::String(a))) if s.starts_with("$contains:") => {
            let needle = &s["$contains:".len()..];
            if a.contains(needle) { Ok(()) } else { Err(format!("{path}: `{a}` does not contain `{needle}`")) }
        }
        (_, None) => Err(format!("{path}: missing (expected {expected})")),
        (Value::Object(e), Some(Value::Object(a))) => {
            for (k, ev) in e {
                subset(ev, a.get(k), &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(e), Some(Value::Array(a))) => {
            if e.len() != a.len() {
                return Err(format!("{path}: expected {} items, found {}: {}", e.len(), a.len(), Value::Array(a.clone())));
            }
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                subset(ev, Some(av), &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (e, Some(a)) if e == a => Ok(()),
        (e, Some(a)) => Err(format!("{path}: expected {e}, found {a}")),
    }
}

/// Every expected item matches a distinct actual item, and the counts agree.
fn unordered(expected: &[Value], actual: &[Value]) -> Result<(), String> {
    if expected.len() != actual.len() {
        return Err(format!("batch: expected {} responses, found {}: {}", expected.len(), actual.len(), Value::Array(actual.to_vec())));
    }
    let mut used = vec![false; actual.len()];
    for (i, e) in expected.iter().enumerate() {
        let hit = actual
            .iter()
            .enumerate()
            .find(|(j, a)| !used[*j] && subset(e, Some(a), "").is_ok())
            .map(|(j, _)| j);
        match hit {
            Some(j) => used[j] = true,
            None => return Err(format!("batch: expected response #{i} {e} matches none of {}", Value::Array(actual.to_vec()))),
        }
    }
    Ok(())
}

/// Structural JSON-RPC 2.0 response checks independent of the vector.
fn well_formed_response(r: &Value) -> Result<(), String> {
    let o = r.as_object().ok_or_else(|| format!("response is not an object: {r}"))?;
    if o.get("jsonrpc") != Some(&json!("2.0")) {
        return Err(format!("response lacks jsonrpc 2.0: {r}"));
    }
    if !o.contains_key("id") {
        return Err(format!("response lacks id: {r}"));
    }
    match (o.get("result"), o.get("error")) {
        (Some(_), None) => Ok(()),
        (None, Some(e)) => {
            if !e.get("code").is_some_and(Value::is_i64) || !e.get("message").is_some_and(Value::is_string) {
                return Err(format!("error lacks integer code or string message: {r}"));
            }
            Ok(())
        }
        _ => Err(format!("response must have exactly one of result and error: {r}")),
    }
}

// ---------------------------------------------------------------------------------------
// Cases.

struct Ctx<'a> {
    validators: &'a BTreeMap<String, Result<jsonschema::Validator, String>>,
    rt: &'a tokio::runtime::Runtime,
}

fn str_field<'a>(case: &'a serde_json::Map<String, Value>, key: &str) -> Result<&'a str, String> {
    case.get(key).and_then(Value::as_str).ok_or_else(|| format!("case needs a string `{key}`"))
}

fn validator<'a>(ctx: &'a Ctx, stem: &str) -> Result<&'a jsonschema::Validator, String> {
    match ctx.validators.get(stem) {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(e.clone()),
        None => Err(format!("no committed schema `{stem}` (schemas/{stem}.schema.json)")),
    }
}

fn schema_errors(v: &jsonschema::Validator, data: &Value) -> Vec<String> {
    v.iter_errors(data).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

fn run_valid(ctx: &Ctx, case: &serde_json::Map<String, Value>) -> Result<(), String> {
    let stem = str_field(case, "schema")?;
    let data = case.get("data").ok_or("case needs `data`")?;
    let errors = schema_errors(validator(ctx, stem)?, data);
    if !errors.is_empty() {
        return Err(format!("schema `{stem}` rejects it: {}", errors.join("; ")));
    }
    let back = roundtrip(stem, data)?;
    let want = case.get("canonical").unwrap_or(data);
    if &back != want {
        return Err(format!("round trip changed it:\n      in:  {want}\n      out: {back}"));
    }
    Ok(())
}

fn run_schema_invalid(ctx: &Ctx, case: &serde_json::Map<String, Value>) -> Result<(), String> {
    let stem = str_field(case, "schema")?;
    let data = case.get("data").ok_or("case needs `data`")?;
    if validator(ctx, stem)?.is_valid(data) {
        return Err(format!("schema `{stem}` accepts it"));
    }
    if let Ok(back) = roundtrip(stem, data) {
        return Err(format!("the Rust type accepts it (as {back})"));
    }
    Ok(())
}

fn call_context(case: &serde_json::Map<String, Value>) -> Result<CallContext, String> {
    let v = case.get("version").and_then(Value::as_str);
    let version = version::negotiate(v).map_err(|e| format!("case version: {e}"))?;
    Ok(CallContext::new("vector-agent", Transport::InProcess).with_version(version))
}

fn canned(case: &serde_json::Map<String, Value>) -> Result<BTreeMap<String, Value>, String> {
    match case.get("provider") {
        None => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => Ok(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
        Some(_) => Err("`provider` must be an object of method -> {result}|{error}".into()),
    }
}

fn check_canary(case: &serde_json::Map<String, Value>, text: &str) -> Result<(), String> {
    if let Some(c) = case.get("canary") {
        let c = c.as_str().ok_or("`canary` must be a string")?;
        if c.len() < 8 {
            return Err("`canary` must be at least 8 characters".into());
        }
        if text.contains(c) {
            return Err(format!("the answer leaks the canary: {text}"));
        }
    }
    Ok(())
}

fn run_call(ctx: &Ctx, case: &serde_json::Map<String, Value>, expect_called: bool) -> Result<(), String> {
    let method = str_field(case, "method")?;
    let params = case.get("params").cloned().unwrap_or_else(|| json!({}));
    let expect = case.get("expect").ok_or("case needs `expect`")?;
    let recorder = Arc::new(Recorder::new(canned(case)?));
    let dispatcher = Dispatcher::new(recorder.clone());
    let cc = call_context(case)?;
    let message = json!({"jsonrpc": "2.0", "id": "vec-1", "method": method, "params": params});
    let bytes = serde_json::to_vec(&message).map_err(|e| e.to_string())?;
    let text = ctx
        .rt
        .block_on(dispatcher.handle_bytes(&cc, &bytes))
        .ok_or("no response to a request with an id")?;
    check_canary(case, &text)?;
    let response: Value = serde_json::from_str(&text).map_err(|e| format!("response is not JSON: {e}"))?;
    well_formed_response(&response)?;
    subset(&json!("vec-1"), response.get("id"), "id")?;
    let calls = recorder.calls();
    let called = case.get("called").and_then(Value::as_bool).unwrap_or(expect_called);
    if called && calls.is_empty() {
        return Err(format!("the provider was not called; response {response}"));
    }
    if !called && !calls.is_empty() {
        return Err(format!("the provider must not be called, got {calls:?}; response {response}"));
    }
    if case.get("kind").and_then(Value::as_str) == Some("invalid") {
        // `expect` is the error object.
        subset(expect, response.get("error"), "error")?;
        subset(&json!("$absent"), response.get("result"), "result")?;
    } else {
        subset(expect, Some(&response), "response")?;
    }
    if let Some(received) = case.get("received") {
        let got = calls.first().map(|(_, p)| p);
        subset(received, got, "received params")?;
    }
    Ok(())
}

fn run_envelope(ctx: &Ctx, case: &serde_json::Map<String, Value>) -> Result<(), String> {
    let raw = match (case.get("raw"), case.get("message")) {
        (Some(Value::String(s)), None) => s.clone(),
        (None, Some(m)) => serde_json::to_string(m).map_err(|e| e.to_string())?,
        _ => return Err("envelope case needs exactly one of `raw` (string) and `message`".into()),
    };
    let expect = case.get("expect").ok_or("case needs `expect`")?;
    let recorder = Arc::new(Recorder::new(canned(case)?));
    let dispatcher = Dispatcher::new(recorder.clone());
    let cc = call_context(case)?;
    let out = ctx.rt.block_on(dispatcher.handle_bytes(&cc, raw.as_bytes()));
    if let Some(want) = case.get("calls") {
        let want = want.as_u64().ok_or("`calls` must be a count")?;
        let got = recorder.calls().len() as u64;
        if got != want {
            return Err(format!("expected {want} provider calls, got {got}"));
        }
    }
    match (expect, out) {
        (Value::String(s), None) if s == "none" => Ok(()),
        (Value::String(s), Some(text)) if s == "none" => Err(format!("expected no response, got {text}")),
        (_, None) => Err("expected a response, got none".into()),
        (expect, Some(text)) => {
            check_canary(case, &text)?;
            let response: Value = serde_json::from_str(&text).map_err(|e| format!("response is not JSON: {e}: {text}"))?;
            match (expect, &response) {
                (Value::Array(e), Value::Array(a)) => {
                    for r in a {
                        well_formed_response(r)?;
                    }
                    unordered(e, a)
                }
                (Value::Object(_), Value::Object(_)) => {
                    well_formed_response(&response)?;
                    subset(expect, Some(&response), "response")
                }
                _ => Err(format!("expected {expect}, got {response}")),
            }
        }
    }
}

fn run_version(case: &serde_json::Map<String, Value>) -> Result<(), String> {
    let requested = match case.get("requested") {
        Some(Value::String(s)) => Some(s.as_str()),
        Some(Value::Null) => None,
        _ => return Err("case needs `requested` (string or null)".into()),
    };
    let expect = case.get("expect").ok_or("case needs `expect`")?;
    let got = match version::negotiate(requested) {
        Ok(v) => json!({"version": v.as_str()}),
        Err(e) => {
            let mut v = serde_json::to_value(&e).map_err(|e| e.to_string())?;
            v["supported"] = e.data.as_ref().and_then(|d| d.supported.clone()).map(|s| json!(s)).unwrap_or(Value::Null);
            v
        }
    };
    check_canary(case, &got.to_string())?;
    subset(expect, Some(&got), "negotiated")
}

fn run_error_code(case: &serde_json::Map<String, Value>) -> Result<(), String> {
    let code = case.get("code").and_then(Value::as_i64).ok_or("case needs an integer `code`")?;
    let name = case.get("expect").and_then(|e| e.get("name")).and_then(Value::as_str).ok_or("case needs `expect.name`")?;
    let kind = ErrorCode::from_code(code).ok_or_else(|| format!("{code} is not in the registry"))?;
    if kind.name() != name {
        return Err(format!("{code} is `{}` in the registry, the vector says `{name}`", kind.name()));
    }
    let e = CrpError::new(kind, "x");
    if e.data.and_then(|d| d.error).as_deref() != Some(name) {
        return Err("CrpError::new does not put the name in data.error".into());
    }
    Ok(())
}

fn run_signature(case: &serde_json::Map<String, Value>) -> Result<(), String> {
    use crp_core::signing;
    let seed = hex::decode(str_field(case, "seed")?).map_err(|e| format!("seed: {e}"))?;
    let seed: [u8; 32] = seed.as_slice().try_into().map_err(|_| "seed must be 32 bytes")?;
    let key = signing::AgentSigningKey::from_bytes(&seed);
    let req = case.get("request").and_then(Value::as_object).ok_or("case needs `request`")?;
    let method = str_field(req, "method")?;
    let host = str_field(req, "host")?;
    let path = str_field(req, "pathAndQuery")?;
    let nonce = str_field(req, "nonce")?;
    let body = str_field(req, "body")?.as_bytes();
    let ts = req.get("timestamp").and_then(Value::as_i64).ok_or("request needs an integer `timestamp`")?;
    let expect = case.get("expect").and_then(Value::as_object).ok_or("case needs `expect`")?;

    if !signing::nonce_is_well_formed(nonce) {
        return Err(format!("nonce `{nonce}` is not well formed"));
    }
    let canonical = signing::canonical_string(method, host, path, ts, nonce, body);
    if canonical != str_field(expect, "canonical")? {
        return Err(format!("canonical string differs: {canonical:?}"));
    }
    let headers = signing::sign_request(&key, "agent-v", method, host, path, body, ts, nonce.to_string());
    if headers.signature != str_field(expect, "signature")? {
        return Err(format!("signature differs: {}", headers.signature));
    }
    let public = signing::encode_public_key(&key.verifying_key());
    if public != str_field(expect, "publicKey")? {
        return Err(format!("public key differs: {public}"));
    }
    let vk = signing::parse_public_key(&public)?;
    signing::verify(&vk, &canonical, &headers.signature).map_err(|e| format!("does not verify: {e}"))?;
    let mut other_body = body.to_vec();
    other_body.push(b' ');
    for tampered in [
        signing::canonical_string(method, host, path, ts, nonce, &other_body),
        signing::canonical_string(method, host, path, ts + 1, nonce, body),
        signing::canonical_string(method, host, &format!("{path}x"), ts, nonce, body),
    ] {
        if signing::verify(&vk, &tampered, &headers.signature).is_ok() {
            return Err(format!("a tampered request verifies: {tampered:?}"));
        }
    }
    Ok(())
}

fn run_case(ctx: &Ctx, case: &serde_json::Map<String, Value>) -> Result<(), String> {
    for key in case.keys() {
        if !CASE_KEYS.contains(&key.as_str()) {
            return Err(format!("unknown key `{key}` (typo?)"));
        }
    }
    str_field(case, "description")?;
    let spec = str_field(case, "spec")?;
    if !["v0.1 ", "v0.2 ", "JSON-RPC 2.0 ", "interface.md"].iter().any(|p| spec.starts_with(p)) {
        return Err(format!(
            "`spec` should name a section (`v0.2 §5.1`, `v0.1 Appendix A.1`, `JSON-RPC 2.0 §5`, `interface.md ...`): {spec}"
        ));
    }
    let level = str_field(case, "level")?;
    if !LEVELS.contains(&level) {
        return Err(format!("`level` must be one of {LEVELS:?}, not `{level}`"));
    }
    match str_field(case, "kind")? {
        "valid" => run_valid(ctx, case),
        "schema-invalid" => run_schema_invalid(ctx, case),
        "invalid" => run_call(ctx, case, false),
        "dispatch" => run_call(ctx, case, true),
        "envelope" => run_envelope(ctx, case),
        "version" => run_version(case),
        "error-code" => run_error_code(case),
        "signature" => run_signature(case),
        other => Err(format!("unknown kind `{other}` (one of {KINDS:?})")),
    }
}

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../spec-vectors")
}

fn vector_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("spec-vectors/ exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name.ends_with(".json") && !name.starts_with("fixtures")
        })
        .collect();
    files.sort();
    files
}

fn load_validators() -> BTreeMap<String, Result<jsonschema::Validator, String>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas");
    crp_core::schema::all()
        .into_iter()
        .map(|(stem, _)| {
            let path = dir.join(crp_core::schema::file_name(stem));
            let v = std::fs::read_to_string(&path)
                .map_err(|e| format!("{}: {e}", path.display()))
                .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|e| format!("{}: {e}", path.display())))
                .and_then(|s| {
                    jsonschema::draft202012::options()
                        .should_validate_formats(true)
                        .build(&s)
                        .map_err(|e| format!("{}: {e}", path.display()))
                });
            (stem.to_string(), v)
        })
        .collect()
}

#[test]
fn spec_vectors() {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let validators = load_validators();
    let ctx = Ctx { validators: &validators, rt: &rt };
    let mut failures = Vec::new();
    let mut total = 0usize;
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    let files = vector_files(&vectors_dir());
    assert!(!files.is_empty(), "no vector files in spec-vectors/");
    for file in &files {
        let fname = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let groups: Vec<Value> = match std::fs::read_to_string(file)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
        {
            Ok(Value::Array(g)) => g,
            Ok(_) => {
                failures.push(format!("{fname}: must be an array of groups"));
                continue;
            }
            Err(e) => {
                failures.push(format!("{fname}: {e}"));
                continue;
            }
        };
        for (gi, group) in groups.iter().enumerate() {
            let Some(g) = group.as_object() else {
                failures.push(format!("{fname} > group #{gi}: not an object"));
                continue;
            };
            let gname = g.get("description").and_then(Value::as_str).unwrap_or("?").to_string();
            for key in g.keys() {
                if !GROUP_KEYS.contains(&key.as_str()) && !INHERITED.contains(&key.as_str()) {
                    failures.push(format!("{fname} > {gname}: unknown group key `{key}`"));
                }
            }
            let Some(cases) = g.get("cases").and_then(Value::as_array) else {
                failures.push(format!("{fname} > {gname}: needs `cases`"));
                continue;
            };
            for (ci, case) in cases.iter().enumerate() {
                let Some(c) = case.as_object() else {
                    failures.push(format!("{fname} > {gname} > case #{ci}: not an object"));
                    continue;
                };
                let mut merged = c.clone();
                for key in INHERITED {
                    if let (Some(v), false) = (g.get(key), merged.contains_key(key)) {
                        merged.insert(key.into(), v.clone());
                    }
                }
                let cname = c.get("description").and_then(Value::as_str).map(str::to_string).unwrap_or(format!("case #{ci}"));
                total += 1;
                *by_kind.entry(merged.get("kind").and_then(Value::as_str).unwrap_or("?").into()).or_default() += 1;
                if let Err(e) = run_case(&ctx, &merged) {
                    failures.push(format!("{fname} > {gname} > {cname}: {e}"));
                }
            }
        }
    }
    eprintln!("spec-vectors: {total} cases in {} files, by kind {by_kind:?}", files.len());
    assert!(total >= 60, "expected at least 60 vectors, found {total}");
    assert!(failures.is_empty(), "{} of {total} vectors failed:\n  {}", failures.len(), failures.join("\n  "));
}

#[test]
fn every_exported_schema_has_a_rust_type_for_round_trips() {
    for (stem, _) in crp_core::schema::all() {
        if let Err(e) = roundtrip(stem, &Value::Null) {
            assert!(!e.starts_with("no Rust type registered"), "{e}");
        }
    }
}

#[test]
fn the_matcher_itself_fails_when_it_should() {
    assert!(subset(&json!({"a": 1}), Some(&json!({"a": 2})), "").is_err());
    assert!(subset(&json!({"a": "$absent"}), Some(&json!({"a": null})), "").is_err());
    assert!(subset(&json!({"a": "$present"}), Some(&json!({})), "").is_err());
    assert!(subset(&json!([1]), Some(&json!([1, 2])), "").is_err());
    assert!(subset(&json!({"a": 1}), Some(&json!({"a": 1, "b": 2})), "").is_ok());
    assert!(unordered(&[json!({"id": 1}), json!({"id": 2})], &[json!({"id": 2}), json!({"id": 1})]).is_ok());
    assert!(unordered(&[json!({"id": 1}), json!({"id": 1})], &[json!({"id": 2}), json!({"id": 1})]).is_err());
    assert!(well_formed_response(&json!({"jsonrpc": "2.0", "id": 1, "result": 1, "error": {}})).is_err());
}
