//! A small, self-contained CRP v0.2 provider for the runner's own tests: JSON-RPC over HTTP,
//! leases with delegation, an injecting proxy, OAuth2 brokering and an audit query — written
//! from the spec with raw JSON (no crp-core dispatcher), with one switch per deliberate fault.
//!
//! With `Fault::None` it must pass every Full-tier case; each other fault breaks exactly one
//! rule, and the test asserts the runner fails the case named for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use crp_core::fixtures::{FixtureCredential, FixtureOutcome, Fixtures};
use crp_core::types::ext::InjectionRule;
use serde_json::{Value, json};

/// One deliberate fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    LeakSecretInUse,
    SkipCascade,
    OverGrantTtl,
    UrlChangesOnRenew,
    IgnoreRevocationInProxy,
    WrongVersionCode,
    ShortLeaseIds,
    SecretInErrorData,
    UnboundedDelegation,
    GrantsUnknownScopes,
    NoAudit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Active,
    Released,
    Revoked,
}

#[derive(Debug, Clone)]
struct Lease {
    id: String,
    cred: usize,
    token: String,
    url: String,
    expires: Instant,
    expires_at: SystemTime,
    ttl: u64,
    state: St,
    parent: Option<String>,
    depth: u32,
    scopes: Vec<String>,
    expiry_logged: bool,
}

struct Inner {
    fixtures: Fixtures,
    fault: Fault,
    base: Mutex<String>,
    leases: Mutex<HashMap<String, Lease>>,
    aliases: Mutex<HashMap<String, String>>,
    audit: Mutex<Vec<Value>>,
    http: reqwest::Client,
}

type P = Arc<Inner>;

/// A running test provider.
pub struct Provider {
    pub base: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Provider {
    pub async fn start(fixtures: Fixtures, fault: Fault) -> Provider {
        crp_conformance::install_crypto();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let inner = Arc::new(Inner {
            fixtures,
            fault,
            base: Mutex::new(base.clone()),
            leases: Mutex::new(HashMap::new()),
            aliases: Mutex::new(HashMap::new()),
            audit: Mutex::new(vec![]),
            http: reqwest::Client::new(),
        });
        let app = Router::new().fallback(handle).with_state(inner);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Provider { base, task }
    }
}

fn rand_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("random");
    hex::encode(b)
}

fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    time::OffsetDateTime::from_unix_timestamp_nanos(d.as_nanos() as i128)
        .expect("time")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format")
}

fn json_resp(status: StatusCode, v: Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .expect("response")
}

async fn handle(State(p): State<P>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
    let path = parts.uri.path().to_string();
    let version = parts.headers.get("crp-version").and_then(|v| v.to_str().ok()).map(str::to_string);
    if path == "/.well-known/crp" {
        return match negotiate(&p, version.as_deref()) {
            Ok(v) => json_resp(StatusCode::OK, capability(v)),
            Err(e) => json_resp(StatusCode::BAD_REQUEST, json!({"error": e})),
        };
    }
    if path == "/crp" && parts.method == "POST" {
        return match rpc(&p, version.as_deref(), &body).await {
            Some(v) => json_resp(StatusCode::OK, v),
            None => StatusCode::NO_CONTENT.into_response(),
        };
    }
    if let Some(rest) = path.strip_prefix("/proxy/") {
        let (id, tail) = rest.split_once('/').map(|(a, b)| (a, format!("/{b}"))).unwrap_or((rest, String::new()));
        return proxy(&p, id, &tail, parts.uri.query(), parts.method.as_str(), &parts.headers, body.to_vec()).await;
    }
    StatusCode::NOT_FOUND.into_response()
}

fn capability(v: &str) -> Value {
    json!({"version": v, "versions": ["0.2"], "provider": "broken-test-provider",
           "features": ["use", "lease", "revoke", "list", "delegate", "broker", "classify"],
           "conformance": "full"})
}

fn negotiate(p: &Inner, v: Option<&str>) -> Result<&'static str, Value> {
    let Some(v) = v else { return Ok("0.2") };
    let ok = v.split_once('.').and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)));
    match ok {
        Some((0, m)) if m >= 2 => Ok("0.2"),
        _ => {
            let code = if p.fault == Fault::WrongVersionCode { -32001 } else { -33001 };
            Err(json!({"code": code, "message": "version mismatch", "data": {"supported": ["0.2"]}}))
        }
    }
}

fn err(code: i64, msg: &str) -> Value {
    json!({"code": code, "message": msg})
}

async fn rpc(p: &P, version: Option<&str>, body: &[u8]) -> Option<Value> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Some(json!({"jsonrpc": "2.0", "id": null, "error": err(-32700, "parse error")}));
    };
    match v {
        Value::Array(items) if items.is_empty() => {
            Some(json!({"jsonrpc": "2.0", "id": null, "error": err(-32600, "empty batch")}))
        }
        Value::Array(items) => {
            let mut out = vec![];
            for i in items {
                if let Some(r) = one(p, version, i).await {
                    out.push(r);
                }
            }
            (!out.is_empty()).then_some(Value::Array(out))
        }
        other => one(p, version, other).await,
    }
}

async fn one(p: &P, version: Option<&str>, v: Value) -> Option<Value> {
    let id = v.get("id").cloned();
    let ok_id = matches!(id, None | Some(Value::String(_)) | Some(Value::Number(_)));
    let method = v.get("method").and_then(Value::as_str);
    if v.get("jsonrpc") != Some(&json!("2.0")) || method.is_none() || !ok_id {
        let id = if ok_id { id.unwrap_or(Value::Null) } else { Value::Null };
        return Some(json!({"jsonrpc": "2.0", "id": id, "error": err(-32600, "invalid request")}));
    }
    let params = v.get("params").cloned().unwrap_or(json!({}));
    let out = match negotiate(p, version) {
        Err(e) => Err(e),
        Ok(_) => call(p, method.unwrap_or(""), &params).await,
    };
    let id = id?;
    Some(match out {
        Ok(r) => json!({"jsonrpc": "2.0", "id": id, "result": r}),
        Err(e) => json!({"jsonrpc": "2.0", "id": id, "error": e}),
    })
}

fn audit(p: &Inner, e: Value) {
    p.audit.lock().expect("audit").push(e);
}

async fn call(p: &P, method: &str, params: &Value) -> Result<Value, Value> {
    if !params.is_object() {
        return Err(err(-32602, "params must be an object"));
    }
    match method {
        "crp/use" => use_(p, params).await,
        "crp/lease" => lease(p, params),
        "crp/revoke" => revoke(p, params),
        "crp/list" => list(p, params),
        "x-crp/audit.query" => {
            sweep_expired(p);
            let events = if p.fault == Fault::NoAudit { vec![] } else { p.audit.lock().expect("audit").clone() };
            Ok(json!({"events": events}))
        }
        _ => Err(err(-32601, "method not found")),
    }
}

fn sweep_expired(p: &Inner) {
    let now = Instant::now();
    let mut leases = p.leases.lock().expect("leases");
    for l in leases.values_mut() {
        if l.state == St::Active && l.expires <= now && !l.expiry_logged {
            l.expiry_logged = true;
            audit(p, json!({"action": "lease.expired", "lease_id": l.id}));
        }
    }
}

fn lease_json(l: &Lease, renewable: bool) -> Value {
    json!({"id": l.id, "expiresAt": rfc3339(l.expires_at), "ttl": l.ttl, "renewable": renewable, "delegationDepth": l.depth})
}

async fn use_(p: &P, params: &Value) -> Result<Value, Value> {
    let Some(service) = params.get("service").and_then(Value::as_str) else {
        return Err(err(-32602, "service must be a string"));
    };
    if service.is_empty() || !service.bytes().all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b)) {
        return Err(err(-32602, "service may contain only letters, digits, '.', '_', '/' and '-'"));
    }
    let scopes: Vec<String> = match params.get("scopes") {
        None => vec![],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        Some(_) => return Err(err(-32602, "scopes must be an array")),
    };
    let ttl_req = match params.get("ttl") {
        None => 60,
        Some(t) => match t.as_u64() {
            Some(t) if (1..=86400).contains(&t) => t,
            _ => return Err(err(-32602, "ttl must be 1..86400")),
        },
    };
    let Some(ci) = p.fixtures.credentials.iter().position(|c| c.service == service) else {
        return Err(json!({"code": -33002, "message": "service not found", "data": {"service": service}}));
    };
    let cred = &p.fixtures.credentials[ci];
    let agent = p.fixtures.agent();
    match cred.outcome_for(agent) {
        FixtureOutcome::Allow => {}
        o => {
            audit(p, json!({"action": "credential.denied", "service": service, "key": cred.key, "decision": "deny"}));
            return Err(match o {
                FixtureOutcome::RequireApproval => err(-33020, "require approval"),
                FixtureOutcome::Quarantine => err(-33021, "quarantine"),
                _ => {
                    let mut e = json!({"code": -33003, "message": "policy denied", "data": {"reason": "not permitted"}});
                    if p.fault == Fault::SecretInErrorData {
                        e["data"]["detail"] = json!(format!("credential {} ({})", cred.key, cred.value.expose()));
                    }
                    e
                }
            });
        }
    }
    let mut granted: Vec<String> = if p.fault == Fault::GrantsUnknownScopes {
        scopes.clone()
    } else {
        scopes.iter().filter(|s| cred.scopes.contains(s)).cloned().collect()
    };
    let mut ttl = if p.fault == Fault::OverGrantTtl { ttl_req } else { ttl_req.min(u64::from(cred.max_ttl)) };
    let mut depth = 0;
    let mut parent = None;
    let mut expires = Instant::now() + Duration::from_secs(ttl);
    if let Some(d) = params.get("delegation") {
        let Some(pid) = d.get("parentLeaseId").and_then(Value::as_str) else {
            return Err(err(-32602, "delegation.parentLeaseId must be a string"));
        };
        let leases = p.leases.lock().expect("leases");
        let Some(par) = leases.get(pid).filter(|l| l.state == St::Active && l.expires > Instant::now() && l.cred == ci) else {
            return Err(err(-33004, "lease not found"));
        };
        depth = par.depth + 1;
        if depth > p.fixtures.delegation.max_depth && p.fault != Fault::UnboundedDelegation {
            return Err(json!({"code": -33013, "message": "delegation depth exceeded", "data": {"maxDepth": p.fixtures.delegation.max_depth}}));
        }
        granted.retain(|s| par.scopes.contains(s));
        if expires > par.expires {
            expires = par.expires;
            ttl = par.expires.saturating_duration_since(Instant::now()).as_secs();
        }
        parent = Some(pid.to_string());
    }
    let id = if p.fault == Fault::ShortLeaseIds { format!("lease-{}", rand_hex(2)) } else { format!("lease-{}", rand_hex(16)) };
    let base = p.base.lock().expect("base").clone();
    let l = Lease {
        id: id.clone(),
        cred: ci,
        token: rand_hex(16),
        url: format!("{base}/proxy/{id}"),
        expires,
        expires_at: SystemTime::now() + expires.saturating_duration_since(Instant::now()),
        ttl,
        state: St::Active,
        parent,
        depth,
        scopes: granted.clone(),
        expiry_logged: false,
    };
    let mut out = json!({
        "lease": lease_json(&l, cred.renewable),
        "proxyBaseUrl": l.url,
        "sessionToken": l.token,
        "service": service,
        "grantedScopes": granted,
        "credentialDescriptor": {"type": cred.credential_type.as_str(), "brokered": cred.broker.is_some(),
                                 "autoRefresh": cred.broker.is_some(), "classification": cred.classification.as_str()}
    });
    if p.fault == Fault::LeakSecretInUse {
        out["credentialDescriptor"]["hint"] = json!(STANDARD.encode(cred.value.expose()));
    }
    audit(p, json!({"action": "credential.used", "lease_id": id, "service": service, "key": cred.key, "decision": "allow"}));
    p.leases.lock().expect("leases").insert(id, l);
    Ok(out)
}

fn lease(p: &P, params: &Value) -> Result<Value, Value> {
    let action = params.get("action").and_then(Value::as_str);
    let Some(id) = params.get("leaseId").and_then(Value::as_str) else {
        return Err(err(-32602, "leaseId must be a string"));
    };
    let mut leases = p.leases.lock().expect("leases");
    let Some(l) = leases.get_mut(id).filter(|l| l.state == St::Active) else {
        return Err(err(-33004, "lease not found"));
    };
    if l.expires <= Instant::now() {
        return Err(err(-33005, "lease expired"));
    }
    let cred = &p.fixtures.credentials[l.cred];
    match action {
        Some("renew") => {
            if !cred.renewable {
                return Err(err(-33006, "lease not renewable"));
            }
            let want = params.get("ttl").and_then(Value::as_u64).unwrap_or(60);
            l.ttl = want.min(u64::from(cred.max_ttl));
            l.expires = Instant::now() + Duration::from_secs(l.ttl);
            l.expires_at = SystemTime::now() + Duration::from_secs(l.ttl);
            let mut url = l.url.clone();
            if p.fault == Fault::UrlChangesOnRenew {
                let alias = format!("lease-{}", rand_hex(16));
                url = format!("{}/proxy/{alias}", p.base.lock().expect("base"));
                p.aliases.lock().expect("aliases").insert(alias, l.id.clone());
                l.url = url.clone();
            }
            audit(p, json!({"action": "lease.renewed", "lease_id": id}));
            Ok(json!({"lease": lease_json(l, true), "proxyBaseUrl": url}))
        }
        Some("release") => {
            l.state = St::Released;
            audit(p, json!({"action": "lease.released", "lease_id": id}));
            Ok(json!({"released": true, "leaseId": id}))
        }
        _ => Err(err(-32602, "action must be renew or release")),
    }
}

fn revoke(p: &P, params: &Value) -> Result<Value, Value> {
    let Some(id) = params.get("leaseId").and_then(Value::as_str) else {
        return Err(err(-32602, "leaseId must be a string"));
    };
    let reason = params.get("reason").and_then(Value::as_str).unwrap_or("");
    if !["credential_compromised", "policy_violation", "manual_revocation", "rotation"].contains(&reason) {
        return Err(err(-32602, "unknown reason"));
    }
    let mut leases = p.leases.lock().expect("leases");
    if !leases.contains_key(id) {
        return Err(err(-33004, "lease not found"));
    }
    let mut affected = vec![];
    if p.fault != Fault::SkipCascade {
        let mut frontier = vec![id.to_string()];
        while let Some(cur) = frontier.pop() {
            for l in leases.values() {
                if l.parent.as_deref() == Some(cur.as_str()) {
                    affected.push(l.id.clone());
                    frontier.push(l.id.clone());
                }
            }
        }
    }
    for a in affected.iter().chain(std::iter::once(&id.to_string())) {
        if let Some(l) = leases.get_mut(a) {
            l.state = St::Revoked;
        }
    }
    audit(p, json!({"action": "credential.revoked", "lease_id": id, "affected": affected}));
    Ok(json!({"revoked": true, "leaseId": id, "revokedAt": rfc3339(SystemTime::now()), "affectedLeases": affected}))
}

fn list(p: &P, params: &Value) -> Result<Value, Value> {
    let limit = params.get("limit").and_then(Value::as_u64).unwrap_or(50).clamp(1, 500) as usize;
    let start: usize = params.get("cursor").and_then(Value::as_str).and_then(|c| c.parse().ok()).unwrap_or(0);
    let prefix = params.pointer("/filter/servicePrefix").and_then(Value::as_str).unwrap_or("");
    let ty = params.pointer("/filter/credentialType").and_then(Value::as_str);
    let agent = p.fixtures.agent();
    let mut all: Vec<&FixtureCredential> = p
        .fixtures
        .credentials
        .iter()
        .filter(|c| c.outcome_for(agent) != FixtureOutcome::Deny && c.service.starts_with(prefix))
        .filter(|c| ty.is_none_or(|t| t == c.credential_type.as_str()))
        .collect();
    all.sort_by(|a, b| a.service.cmp(&b.service));
    let page: Vec<Value> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|c| json!({"service": c.service, "credentialTypes": [c.credential_type.as_str()], "availableScopes": c.scopes,
                        "maxTtl": c.max_ttl, "description": c.description, "classification": c.classification.as_str()}))
        .collect();
    let next = (start + limit < all.len()).then(|| (start + limit).to_string());
    Ok(json!({"services": page, "cursor": next}))
}

async fn broker_token(p: &Inner, cred: &FixtureCredential) -> Option<String> {
    let b = cred.broker.as_ref()?;
    let form = format!("grant_type=client_credentials&client_id={}&client_secret={}", b.client_id, cred.value.expose());
    let r = p
        .http
        .post(&b.token_url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .ok()?;
    let v: Value = r.json().await.ok()?;
    v.get("access_token").and_then(Value::as_str).map(str::to_string)
}

#[allow(clippy::too_many_arguments)]
async fn proxy(p: &P, id: &str, tail: &str, query: Option<&str>, method: &str, headers: &HeaderMap, body: Vec<u8>) -> Response {
    let id = p.aliases.lock().expect("aliases").get(id).cloned().unwrap_or_else(|| id.to_string());
    let lease = p.leases.lock().expect("leases").get(&id).cloned();
    let Some(l) = lease else {
        return json_resp(StatusCode::NOT_FOUND, json!({"error": "unknown lease"}));
    };
    let presented = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if presented != Some(l.token.as_str()) {
        return json_resp(StatusCode::UNAUTHORIZED, json!({"error": "session token required"}));
    }
    match l.state {
        St::Released => return json_resp(StatusCode::FORBIDDEN, json!({"error": "released"})),
        St::Revoked if p.fault != Fault::IgnoreRevocationInProxy => {
            return json_resp(StatusCode::FORBIDDEN, json!({"error": "revoked"}));
        }
        _ => {}
    }
    if l.expires <= Instant::now() {
        return json_resp(StatusCode::GONE, json!({"error": "expired"}));
    }
    let cred = &p.fixtures.credentials[l.cred];
    let mut url = format!("{}{tail}", cred.upstream);
    let mut q: Vec<String> = query.map(|q| vec![q.to_string()]).unwrap_or_default();
    let mut out_headers: Vec<(String, String)> = headers
        .iter()
        .filter(|(k, _)| !["host", "authorization", "content-length", "connection"].contains(&k.as_str()))
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let secret = if cred.broker.is_some() {
        match broker_token(p, cred).await {
            Some(t) => t,
            None => return json_resp(StatusCode::BAD_GATEWAY, json!({"error": "broker failure"})),
        }
    } else {
        cred.value.expose().to_string()
    };
    match &cred.inject {
        InjectionRule::Header { name, prefix } => {
            let v = if prefix.is_empty() { secret.clone() } else { format!("{prefix} {secret}") };
            out_headers.push((name.to_ascii_lowercase(), v));
        }
        InjectionRule::Query { name } => q.push(format!("{name}={secret}")),
        InjectionRule::Basic => out_headers.push(("authorization".into(), format!("Basic {}", STANDARD.encode(&secret)))),
    }
    if !q.is_empty() {
        url.push('?');
        url.push_str(&q.join("&"));
    }
    let Ok(m) = reqwest::Method::from_bytes(method.as_bytes()) else {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    };
    let mut rb = p.http.request(m, &url).body(body);
    for (k, v) in out_headers {
        rb = rb.header(k, v);
    }
    let Ok(resp) = rb.send().await else {
        return json_resp(StatusCode::BAD_GATEWAY, json!({"error": "upstream unreachable"}));
    };
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let redacted = text.replace(&secret, "[REDACTED]");
    audit(p, json!({"action": "credential.used", "lease_id": l.id, "detail": {"path": tail, "status": status}}));
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(redacted))
        .expect("response")
}
