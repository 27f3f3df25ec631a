//! What a case sees: the provider (through a transport), the fixtures, the echo server's
//! record, the leak scanner, and an evidence log.
//!
//! Every exchange a case makes through [`Ctx`] is recorded as evidence with secrets masked,
//! and every JSON-RPC answer is kept in the run's transcript for the final leak sweep. Cases
//! never print; the report does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crp_core::fixtures::{FixtureCredential, FixtureRole, Fixtures};
use serde::Serialize;
use serde_json::{Value, json};

use crate::catalog::{Stop, Tier};
use crate::echo::{Arrival, EchoState, PROBE_HEADER};
use crate::leaks::{Finding, LeakScanner};
use crate::transport::{Discovery, Expect, Reply, Transport, TransportError, TransportKind};

/// One JSON-RPC answer the provider gave, for the final leak sweep.
#[derive(Debug, Clone)]
pub struct Said {
    /// Case that asked.
    pub case: &'static str,
    /// Method asked (or `raw`).
    pub method: String,
    /// The answer, raw.
    pub text: String,
    /// Whether this answer is a v0.1 export (`crp/resolve` result), where the exported
    /// credential's own value may legitimately appear.
    pub export_of: Option<String>,
}

/// One piece of evidence.
#[derive(Debug, Clone, Serialize)]
pub struct Evidence {
    /// What it is (`request`, `response`, `upstream`, `note`).
    pub kind: &'static str,
    /// Short title, e.g. `crp/use` or `GET http://…`.
    pub title: String,
    /// The content, secrets masked.
    pub text: String,
}

/// State shared by all cases of one run.
pub struct Shared {
    /// The provider.
    pub transport: Arc<dyn Transport>,
    /// What it loaded.
    pub fixtures: Fixtures,
    /// What the upstream saw.
    pub echo: Arc<EchoState>,
    /// Secrets to look for.
    pub leaks: LeakScanner,
    /// Client for proxied requests.
    pub http: reqwest::Client,
    /// Capability per version asked (`None` key = no version asked).
    pub caps: HashMap<Option<String>, Discovery>,
    /// Version under test by default (`0.2`).
    pub default_version: String,
    /// Tier under test.
    pub tier: Tier,
    /// Session tokens seen (masked in evidence).
    pub tokens: Mutex<Vec<String>>,
    /// Every answer.
    pub transcript: Mutex<Vec<Said>>,
    /// How long to wait for any one answer.
    pub timeout: Duration,
    /// How long after an expiry the audit trail may take to record it.
    pub audit_wait: Duration,
    next_id: AtomicU64,
}

impl Shared {
    /// Assemble the shared state.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        transport: Arc<dyn Transport>,
        fixtures: Fixtures,
        echo: Arc<EchoState>,
        caps: HashMap<Option<String>, Discovery>,
        default_version: String,
        tier: Tier,
        timeout: Duration,
    ) -> Result<Shared, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let leaks = LeakScanner::new(&fixtures);
        Ok(Shared {
            transport,
            fixtures,
            echo,
            leaks,
            http,
            caps,
            default_version,
            tier,
            tokens: Mutex::new(vec![]),
            transcript: Mutex::new(vec![]),
            timeout,
            audit_wait: Duration::from_secs(3),
            next_id: AtomicU64::new(1),
        })
    }
}

/// A JSON-RPC error as received.
#[derive(Debug, Clone)]
pub struct RpcError {
    /// `code`.
    pub code: i64,
    /// `message`.
    pub message: String,
    /// `data`, if any.
    pub data: Option<Value>,
}

/// A JSON-RPC answer to one call.
#[derive(Debug, Clone)]
pub struct Rpc {
    /// The whole response object.
    pub json: Value,
    /// The raw text.
    pub raw: String,
    /// HTTP status, on HTTP.
    pub status: Option<u16>,
}

impl Rpc {
    /// The `result`, if the call succeeded.
    pub fn result(&self) -> Option<&Value> {
        self.json.get("result")
    }

    /// The `error`, if it failed.
    pub fn error(&self) -> Option<RpcError> {
        let e = self.json.get("error")?;
        Some(RpcError {
            code: e.get("code").and_then(Value::as_i64).unwrap_or(0),
            message: e.get("message").and_then(Value::as_str).unwrap_or("").to_string(),
            data: e.get("data").cloned(),
        })
    }

    /// The result, or a failure naming what was asked.
    pub fn expect_result(&self, what: &str) -> Result<&Value, Stop> {
        match (self.result(), self.error()) {
            (Some(r), _) => Ok(r),
            (None, Some(e)) => Err(Stop::Fail(format!("{what} failed with {} `{}`", e.code, e.message))),
            (None, None) => Err(Stop::Fail(format!("{what}: the answer has neither result nor error"))),
        }
    }

    /// The error, or a failure saying the call wrongly succeeded.
    pub fn expect_error(&self, what: &str) -> Result<RpcError, Stop> {
        match self.error() {
            Some(e) => Ok(e),
            None if self.result().is_some() => Err(Stop::Fail(format!("{what}: expected an error, got a result"))),
            None => Err(Stop::Fail(format!("{what}: the answer has neither result nor error"))),
        }
    }
}

/// A use-handle as returned by `crp/use`.
#[derive(Debug, Clone)]
pub struct Handle {
    /// The whole result.
    pub result: Value,
    /// `lease.id`.
    pub lease_id: String,
    /// `proxyBaseUrl`.
    pub url: String,
    /// `sessionToken`, when the provider issues one.
    pub token: Option<String>,
    /// `lease.ttl`.
    pub ttl: Option<u64>,
    /// `lease.expiresAt`.
    pub expires_at: Option<String>,
    /// `lease.renewable`.
    pub renewable: Option<bool>,
    /// `lease.delegationDepth`.
    pub depth: Option<u64>,
    /// `grantedScopes`.
    pub granted: Vec<String>,
}

impl Handle {
    /// Read a `crp/use` result.
    pub fn parse(result: &Value) -> Result<Handle, Stop> {
        let lease_id = result
            .pointer("/lease/id")
            .and_then(Value::as_str)
            .ok_or_else(|| Stop::Fail("crp/use result has no lease.id string".into()))?
            .to_string();
        let url = result
            .get("proxyBaseUrl")
            .and_then(Value::as_str)
            .ok_or_else(|| Stop::Fail("crp/use result has no proxyBaseUrl string".into()))?
            .to_string();
        Ok(Handle {
            lease_id,
            url,
            token: result.get("sessionToken").and_then(Value::as_str).map(str::to_string),
            ttl: result.pointer("/lease/ttl").and_then(Value::as_u64),
            expires_at: result.pointer("/lease/expiresAt").and_then(Value::as_str).map(str::to_string),
            renewable: result.pointer("/lease/renewable").and_then(Value::as_bool),
            depth: result.pointer("/lease/delegationDepth").and_then(Value::as_u64),
            granted: result
                .get("grantedScopes")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
                .unwrap_or_default(),
            result: result.clone(),
        })
    }
}

/// How a proxied request authenticates.
#[derive(Debug, Clone)]
pub enum ProxyAuth {
    /// `Authorization: Bearer <sessionToken>` when the handle has one, else nothing.
    Session,
    /// No credential at all.
    None,
}

/// A proxied request.
#[derive(Debug, Clone)]
pub struct ProxyReq {
    /// Method.
    pub method: &'static str,
    /// Appended to `proxyBaseUrl` (starts with `/`).
    pub path: String,
    /// Query string without `?`.
    pub query: Option<String>,
    /// Body.
    pub body: Option<String>,
    /// Authentication.
    pub auth: ProxyAuth,
}

impl ProxyReq {
    /// `GET {path}` with the session token.
    pub fn get(path: &str) -> ProxyReq {
        ProxyReq { method: "GET", path: path.into(), query: None, body: None, auth: ProxyAuth::Session }
    }
}

/// What came back from the proxy.
#[derive(Debug, Clone)]
pub struct ProxyResp {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// Body text.
    pub body: String,
    /// What the upstream received for this request, if it got there.
    pub arrival: Option<Arrival>,
}

impl ProxyResp {
    /// Everything the consumer received, as text.
    pub fn as_text(&self) -> String {
        let hs: Vec<String> = self.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!("HTTP {}\n{}\n\n{}", self.status, hs.join("\n"), self.body)
    }
}

/// A case's view of the run.
#[derive(Clone)]
pub struct Ctx {
    shared: Arc<Shared>,
    case: &'static str,
    version: String,
    evidence: Arc<Mutex<Vec<Evidence>>>,
}

impl Ctx {
    /// A context for case `case` testing `version`.
    pub fn new(shared: Arc<Shared>, case: &'static str, version: &str) -> Ctx {
        Ctx { shared, case, version: version.to_string(), evidence: Arc::new(Mutex::new(vec![])) }
    }

    /// The shared state.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The evidence so far.
    pub fn evidence(&self) -> Vec<Evidence> {
        self.evidence.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// The version this case tests.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The transport kind.
    pub fn transport(&self) -> TransportKind {
        self.shared.transport.kind()
    }

    /// The fixtures.
    pub fn fixtures(&self) -> &Fixtures {
        &self.shared.fixtures
    }

    /// The fixture credential playing `role` (skip when a custom fixture file lacks it).
    pub fn cred(&self, role: FixtureRole) -> Result<FixtureCredential, Stop> {
        self.shared
            .fixtures
            .by_role(role)
            .cloned()
            .ok_or_else(|| Stop::Skip(format!("the fixtures have no credential with fixtureRole {role:?}")))
    }

    /// Mask every known secret and session token in `s`.
    pub fn mask(&self, s: &str) -> String {
        let mut out = self.shared.leaks.mask(s);
        if let Ok(t) = self.shared.tokens.lock() {
            for tok in t.iter() {
                if tok.len() >= 8 {
                    out = out.replace(tok.as_str(), "«session-token»");
                }
            }
        }
        if out.len() > 6000 {
            let mut cut = 6000;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push_str("\n… (truncated)");
        }
        out
    }

    /// Record evidence (masked).
    pub fn record(&self, kind: &'static str, title: impl Into<String>, text: &str) {
        let e = Evidence { kind, title: self.mask(&title.into()), text: self.mask(text) };
        if let Ok(mut v) = self.evidence.lock() {
            v.push(e);
        }
    }

    /// Record a note.
    pub fn note(&self, text: impl AsRef<str>) {
        self.record("note", "note", text.as_ref());
    }

    /// Secrets found in `text`.
    pub fn leaks_in(&self, text: &str) -> Vec<Finding> {
        self.shared.leaks.find(text)
    }

    /// Fail if `text` carries any secret.
    pub fn no_leak(&self, what: &str, text: &str) -> Result<(), Stop> {
        let f = self.leaks_in(text);
        if f.is_empty() {
            Ok(())
        } else {
            let list: Vec<String> = f.iter().map(ToString::to_string).collect();
            Err(Stop::Fail(format!("{what} carries credential material: {}", list.join(", "))))
        }
    }

    /// The capability under `version` (`None`: asked without a version).
    pub fn discovery(&self, version: Option<&str>) -> Option<&Discovery> {
        self.shared.caps.get(&version.map(str::to_string))
    }

    /// The capability object for this case's version, if discovery worked.
    pub fn capability(&self) -> Option<&Value> {
        match self.discovery(Some(&self.version)) {
            Some(Discovery::Capability(c)) => Some(c),
            _ => None,
        }
    }

    /// Advertised features under this case's version (empty if unknown).
    pub fn features(&self) -> Vec<String> {
        self.capability()
            .and_then(|c| c.get("features"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default()
    }

    fn next_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn map_transport(e: TransportError) -> Stop {
        match e {
            TransportError::Unsupported(m) => Stop::Skip(m),
            other => Stop::Error(other.to_string()),
        }
    }

    fn keep(&self, method: &str, text: &str, export_of: Option<String>) {
        if let Ok(mut t) = self.shared.transcript.lock() {
            t.push(Said { case: self.case, method: method.into(), text: text.into(), export_of });
        }
    }

    /// Send raw text under this case's version.
    pub async fn raw(&self, body: &str, expect: Expect) -> Result<Reply, Stop> {
        self.raw_at(Some(&self.version.clone()), body, expect).await
    }

    /// Send raw text under `version`.
    pub async fn raw_at(&self, version: Option<&str>, body: &str, expect: Expect) -> Result<Reply, Stop> {
        let title = match version {
            Some(v) => format!("raw message (CRP version {v})"),
            None => "raw message".to_string(),
        };
        self.record("request", title, body);
        let reply = self.shared.transport.exchange(version, body, expect).await.map_err(Self::map_transport)?;
        let shown = match (&reply.status, &reply.body) {
            (Some(s), Some(b)) => format!("HTTP {s}\n{b}"),
            (Some(s), None) => format!("HTTP {s} (empty body)"),
            (None, Some(b)) => b.clone(),
            (None, None) => "(no reply)".into(),
        };
        self.record("response", "reply", &shown);
        if let Some(b) = &reply.body {
            self.keep("raw", b, None);
        }
        Ok(reply)
    }

    /// Call `method` with `params` under this case's version.
    pub async fn call(&self, method: &str, params: Value) -> Result<Rpc, Stop> {
        let v = self.version.clone();
        self.call_at(Some(&v), method, params).await
    }

    /// Call `method` under `version`.
    pub async fn call_at(&self, version: Option<&str>, method: &str, params: Value) -> Result<Rpc, Stop> {
        let id = self.next_id();
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.call_msg(version, method, msg, json!(id)).await
    }

    /// Send a prepared request object and read its answer.
    pub async fn call_msg(&self, version: Option<&str>, method: &str, msg: Value, id: Value) -> Result<Rpc, Stop> {
        let body = msg.to_string();
        let title = match version {
            Some(v) if v != self.shared.default_version => format!("{method} (CRP version {v})"),
            _ => method.to_string(),
        };
        self.record("request", title, &serde_json::to_string_pretty(&msg).unwrap_or(body.clone()));
        let started = Instant::now();
        let reply = self
            .shared
            .transport
            .exchange(version, &body, Expect::Ids(vec![id]))
            .await
            .map_err(Self::map_transport)?;
        let Some(text) = reply.body else {
            let s = reply.status.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
            self.record("response", "reply", &format!("(no body){s}"));
            return Err(Stop::Fail(format!("{method}: no JSON-RPC answer{s}")));
        };
        let export_of = (method == "crp/resolve").then(|| {
            msg.pointer("/params/service").and_then(Value::as_str).unwrap_or("").to_string()
        });
        self.keep(method, &text, export_of);
        let json: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(_) => {
                self.record("response", "reply (not JSON)", &text);
                let s = reply.status.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
                if matches!(reply.status, Some(401) | Some(403)) {
                    return Err(Stop::Error(format!(
                        "{method}: the provider refused the caller{s}: {} — pass --header or --agent-key?",
                        self.mask(&text)
                    )));
                }
                return Err(Stop::Fail(format!("{method}: the answer is not JSON{s}")));
            }
        };
        if let Some(tok) = json.pointer("/result/sessionToken").and_then(Value::as_str)
            && let Ok(mut t) = self.shared.tokens.lock()
            && !t.iter().any(|x| x == tok)
        {
            t.push(tok.to_string());
        }
        let pretty = serde_json::to_string_pretty(&json).unwrap_or(text.clone());
        let status = reply.status.map(|s| format!("HTTP {s}, ")).unwrap_or_default();
        self.record("response", format!("reply ({status}{} ms)", started.elapsed().as_millis()), &pretty);
        let code = json.pointer("/error/code").and_then(Value::as_i64);
        let crp_code = code.is_some_and(|c| (-33099..=-33001).contains(&c));
        if reply.status == Some(401) || (reply.status == Some(403) && !crp_code) {
            return Err(Stop::Error(format!(
                "{method}: the provider refused the caller (HTTP {}): {} — pass --header or --agent-key?",
                reply.status.unwrap_or(0),
                self.mask(&text)
            )));
        }
        Ok(Rpc { json, raw: text, status: reply.status })
    }

    /// Default `crp/use` params for a fixture credential.
    pub fn use_params(&self, cred: &FixtureCredential) -> Value {
        let mut p = json!({
            "service": cred.service,
            "ttl": 60,
            "context": {"consumer": "crp-conformance", "purpose": format!("conformance case {}", self.case),
                        "traceId": format!("crp-conformance-{}", self.case)}
        });
        if let Some(s) = cred.scopes.first() {
            p["scopes"] = json!([s]);
        }
        if cred.broker.is_some() {
            p["identityScope"] = json!(self.fixtures().agent());
        }
        p
    }

    /// `crp/use` with `params`; the handle or a failure.
    pub async fn use_with(&self, params: Value) -> Result<Handle, Stop> {
        let r = self.call("crp/use", params).await?;
        let res = r.expect_result("crp/use")?;
        Handle::parse(res)
    }

    /// `crp/use` on the fixture playing `role` with the default params.
    pub async fn use_role(&self, role: FixtureRole) -> Result<Handle, Stop> {
        let c = self.cred(role)?;
        self.use_with(self.use_params(&c)).await
    }

    /// `crp/lease` renew.
    pub async fn renew(&self, lease_id: &str, ttl: Option<u64>) -> Result<Rpc, Stop> {
        let mut p = json!({"action": "renew", "leaseId": lease_id});
        if let Some(t) = ttl {
            p["ttl"] = json!(t);
        }
        self.call("crp/lease", p).await
    }

    /// `crp/lease` release.
    pub async fn release(&self, lease_id: &str) -> Result<Rpc, Stop> {
        self.call("crp/lease", json!({"action": "release", "leaseId": lease_id})).await
    }

    /// `crp/revoke`.
    pub async fn revoke(&self, lease_id: &str) -> Result<Rpc, Stop> {
        self.call(
            "crp/revoke",
            json!({"leaseId": lease_id, "reason": "manual_revocation", "detail": "crp-conformance"}),
        )
        .await
    }

    /// Send a request through a handle's proxy URL and collect what the upstream saw.
    pub async fn proxy(&self, h: &Handle, req: ProxyReq) -> Result<ProxyResp, Stop> {
        let mut probe = [0u8; 8];
        let _ = getrandom::fill(&mut probe);
        let probe = hex::encode(probe);
        let mut url = format!("{}{}", h.url.trim_end_matches('/'), req.path);
        if let Some(q) = &req.query {
            url.push('?');
            url.push_str(q);
        }
        let method = reqwest::Method::from_bytes(req.method.as_bytes())
            .map_err(|_| Stop::Error(format!("bad method {}", req.method)))?;
        let mut rb = self.shared.http.request(method, &url).header(PROBE_HEADER, &probe);
        let mut shown = format!("{} {url}\n{PROBE_HEADER}: {probe}", req.method);
        if let (ProxyAuth::Session, Some(t)) = (&req.auth, &h.token) {
            rb = rb.header("authorization", format!("Bearer {t}"));
            shown.push_str("\nauthorization: Bearer «session-token»");
        }
        if let Some(b) = &req.body {
            rb = rb.header("content-type", "application/json").body(b.clone());
            shown.push_str(&format!("\n\n{b}"));
        }
        self.record("request", format!("proxy {} {}", req.method, req.path), &shown);
        let before = self.shared.echo.arrival_count();
        let resp = rb.send().await.map_err(|e| Stop::Error(format!("proxy request to {url}: {e}")))?;
        let status = resp.status().as_u16();
        let headers: Vec<(String, String)> = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let body = resp.text().await.unwrap_or_default();
        let arrival = self.shared.echo.arrival_for(&probe, before, &req.path);
        for t in self.shared.echo.minted_tokens() {
            self.shared.leaks.add("minted-token", &t);
        }
        let out = ProxyResp { status, headers, body, arrival };
        self.record("response", format!("proxy answer (HTTP {status})"), &out.as_text());
        match &out.arrival {
            Some(a) => self.record("upstream", "the upstream received", &a.summary()),
            None => self.record("upstream", "the upstream received", "nothing"),
        }
        Ok(out)
    }

    /// Poll `f` every 100 ms until it returns `Some`, for at most `limit`.
    pub async fn poll<T, F, Fut>(&self, limit: Duration, mut f: F) -> Result<Option<T>, Stop>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>, Stop>>,
    {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = f().await? {
                return Ok(Some(v));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
