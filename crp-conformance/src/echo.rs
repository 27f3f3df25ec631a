//! The upstream echo server the runner serves on loopback: every fixture credential's
//! `upstream` points here, so the runner can see what a provider's proxy actually sent.
//!
//! It owns three kinds of endpoint:
//! - `/svc/{name}/...`: records the request (method, path, query, headers, body) in shared
//!   state the runner reads in-process, and answers a small JSON receipt that **never echoes
//!   anything it received** — so a provider's response redaction is not what these cases test;
//! - `/reflect/...`: deliberately echoes the request headers and query back (the one place a
//!   canary may come back from upstream; it tests the provider's response redaction);
//! - `/oauth/token`: an OAuth2 client-credentials token endpoint for the brokered fixture. It
//!   checks the client id and secret and mints a fresh random access token each time; the
//!   `/svc/brokered` endpoint answers 401 unless it carries a token minted here.
//!
//! Nothing here logs: arrivals are kept in memory for the runner only.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use crp_core::fixtures::{Fixtures, REFLECT_PREFIX, SERVICE_PREFIX, TOKEN_PATH};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// The header the runner puts on every proxied request so the arrival can be matched to it.
pub const PROBE_HEADER: &str = "x-crp-conformance-probe";

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// Sequence number (0-based) in arrival order.
    pub seq: usize,
    /// HTTP method.
    pub method: String,
    /// Path, e.g. `/svc/primary/a/b`.
    pub path: String,
    /// Raw query string (without `?`), if any.
    pub query: Option<String>,
    /// Every header, lower-case names, in order received.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Arrival {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The probe id the runner attached, if it got through.
    pub fn probe(&self) -> Option<&str> {
        self.header(PROBE_HEADER)
    }

    /// The decoded query parameter `name`, if present.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let q = self.query.as_deref()?;
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k) == name).then(|| percent_decode(v))
        })
    }

    /// Everything the upstream saw, as one string (for leak and token searches).
    pub fn as_text(&self) -> String {
        let mut s = format!("{} {}", self.method, self.path);
        if let Some(q) = &self.query {
            s.push('?');
            s.push_str(q);
        }
        s.push('\n');
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {v}\n"));
        }
        s.push('\n');
        s.push_str(&String::from_utf8_lossy(&self.body));
        s
    }

    /// A short summary for evidence.
    pub fn summary(&self) -> String {
        let q = self.query.as_deref().map(|q| format!("?{q}")).unwrap_or_default();
        let hs: Vec<String> = self.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!("{} {}{q}\n{}", self.method, self.path, hs.join("\n"))
    }
}

/// One token request at `/oauth/token`.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// Whether the client authenticated correctly.
    pub accepted: bool,
    /// The token minted (empty when refused).
    pub token: String,
}

/// State shared between the echo server and the runner.
#[derive(Debug, Default)]
pub struct EchoState {
    arrivals: Mutex<Vec<Arrival>>,
    tokens: Mutex<Vec<TokenRequest>>,
    /// client id -> client secret, for the token endpoint.
    clients: Mutex<Vec<(String, String)>>,
}

impl EchoState {
    /// Every arrival so far.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// How many requests have arrived.
    pub fn arrival_count(&self) -> usize {
        self.arrivals.lock().map(|a| a.len()).unwrap_or(0)
    }

    /// Arrivals from index `from` on.
    pub fn arrivals_since(&self, from: usize) -> Vec<Arrival> {
        self.arrivals.lock().map(|a| a.get(from..).map(<[_]>::to_vec).unwrap_or_default()).unwrap_or_default()
    }

    /// The arrival that carried probe `id`.
    pub fn by_probe(&self, id: &str) -> Option<Arrival> {
        self.arrivals.lock().ok()?.iter().find(|a| a.probe() == Some(id)).cloned()
    }

    /// The arrival caused by the proxied request that carried probe `id` for `path` (what
    /// follows `proxyBaseUrl`), sent once `since` arrivals had been seen. A proxy may drop the
    /// probe header (ours drops every `x-crp-*` header), so without it the request is matched by
    /// the newest arrival since then that carries no probe and whose path ends with `path`.
    /// Cases run concurrently against this one upstream, so "whatever arrived meanwhile" can be
    /// another case's request; each case sends its own path.
    pub fn arrival_for(&self, id: &str, since: usize, path: &str) -> Option<Arrival> {
        self.by_probe(id).or_else(|| {
            self.arrivals_since(since).into_iter().filter(|a| a.probe().is_none() && a.path.ends_with(path)).next_back()
        })
    }

    /// Every access token minted so far.
    pub fn minted_tokens(&self) -> Vec<String> {
        self.tokens
            .lock()
            .map(|t| t.iter().filter(|r| r.accepted).map(|r| r.token.clone()).collect())
            .unwrap_or_default()
    }

    /// Every token request so far.
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.tokens.lock().map(|t| t.clone()).unwrap_or_default()
    }

    fn client_ok(&self, id: &str, secret: &str) -> bool {
        self.clients.lock().map(|c| c.iter().any(|(i, s)| i == id && s == secret)).unwrap_or(false)
    }
}

/// A running echo server.
pub struct EchoServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub state: Arc<EchoState>,
    task: tokio::task::JoinHandle<()>,
}

impl EchoServer {
    /// Bind `addr` (port 0 for an ephemeral port) and serve until dropped.
    pub async fn start(addr: &str) -> std::io::Result<EchoServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(EchoState::default());
        let app = Router::new().fallback(handle).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(EchoServer { addr, state, task })
    }

    /// Register the fixtures' brokered clients with the token endpoint.
    pub fn register_clients(&self, fixtures: &Fixtures) {
        if let Ok(mut c) = self.state.clients.lock() {
            for cred in &fixtures.credentials {
                if let Some(b) = &cred.broker {
                    c.push((b.client_id.clone(), cred.value.expose().to_string()));
                }
            }
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(state): State<Arc<EchoState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20).await.map(|b| b.to_vec()).unwrap_or_default();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let headers = header_pairs(&parts.headers);

    if path == TOKEN_PATH {
        return token_endpoint(&state, &parts.headers, &body);
    }

    let arrival = {
        let Ok(mut a) = state.arrivals.lock() else {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        };
        let arrival = Arrival {
            seq: a.len(),
            method: parts.method.to_string(),
            path: path.clone(),
            query: query.clone(),
            headers: headers.clone(),
            body,
        };
        a.push(arrival.clone());
        arrival
    };

    if path == REFLECT_PREFIX || path.starts_with(&format!("{REFLECT_PREFIX}/")) {
        let hs: serde_json::Map<String, Value> =
            headers.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        return json_response(StatusCode::OK, json!({"reflected": true, "headers": hs, "query": query}));
    }

    if path.starts_with(&format!("{SERVICE_PREFIX}/brokered")) {
        let presented = arrival.header("authorization").and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
        if presented.is_empty() || !state.minted_tokens().iter().any(|t| t == presented) {
            return json_response(
                StatusCode::UNAUTHORIZED,
                json!({"error": "invalid_token", "seq": arrival.seq}),
            );
        }
    }

    if path.starts_with(&format!("{SERVICE_PREFIX}/")) {
        // A receipt that carries nothing the request carried.
        return json_response(
            StatusCode::OK,
            json!({"ok": true, "seq": arrival.seq, "bytes": arrival.body.len()}),
        );
    }
    json_response(StatusCode::NOT_FOUND, json!({"error": "not_found", "seq": arrival.seq}))
}

fn token_endpoint(state: &EchoState, headers: &HeaderMap, body: &[u8]) -> Response {
    let form = parse_form(&String::from_utf8_lossy(body));
    let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let (mut id, mut secret) = (get("client_id"), get("client_secret"));
    if let Some(basic) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        && let Ok(raw) = STANDARD.decode(basic.trim())
        && let Ok(raw) = String::from_utf8(raw)
        && let Some((i, s)) = raw.split_once(':')
    {
        id = Some(percent_decode(i));
        secret = Some(percent_decode(s));
    }
    let grant_ok = get("grant_type").as_deref() == Some("client_credentials");
    let accepted = grant_ok
        && matches!((&id, &secret), (Some(i), Some(s)) if state.client_ok(i, s));
    let token = if accepted { mint() } else { String::new() };
    if let Ok(mut t) = state.tokens.lock() {
        t.push(TokenRequest { accepted, token: token.clone() });
    }
    if !accepted {
        let err = if grant_ok { "invalid_client" } else { "unsupported_grant_type" };
        return json_response(StatusCode::UNAUTHORIZED, json!({"error": err}));
    }
    json_response(
        StatusCode::OK,
        json!({"access_token": token, "token_type": "Bearer", "expires_in": 300}),
    )
}

/// A fresh minted token: `crp-canary-minted-` + 32 random hex digits.
fn mint() -> String {
    let mut b = [0u8; 16];
    // On the impossible failure of the OS source the token is still unique per request
    // because the sequence is mixed in below.
    let _ = getrandom::fill(&mut b);
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    b[..8].iter_mut().zip(n.to_le_bytes()).for_each(|(x, y)| *x ^= y);
    format!("crp-canary-minted-{}", hex::encode(b))
}

fn json_response(status: StatusCode, v: Value) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(v.to_string()))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn header_pairs(h: &HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .map(|(k, v)| (k.as_str().to_ascii_lowercase(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect()
}

/// Parse `application/x-www-form-urlencoded`.
pub fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Decode `%XX` escapes and `+` (form encoding).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%3Ab+c"), "a:b c");
        assert_eq!(percent_decode("50%"), "50%");
        assert_eq!(percent_decode("%4"), "%4");
    }

    fn arrival(seq: usize, path: &str, probe: Option<&str>) -> Arrival {
        let headers = probe.map(|p| vec![(PROBE_HEADER.to_string(), p.to_string())]).unwrap_or_default();
        Arrival { seq, method: "GET".into(), path: path.into(), query: None, headers, body: Vec::new() }
    }

    /// A request whose probe header was dropped is matched by its own path only: a concurrent
    /// case's arrival (another path, or another case's probe) is never taken for it.
    #[test]
    fn arrivals_are_attributed_by_probe_then_by_path() {
        let echo = EchoState::default();
        if let Ok(mut a) = echo.arrivals.lock() {
            a.push(arrival(0, "/svc/primary/before", None));
            a.push(arrival(1, "/svc/primary/audited", Some("p-other")));
            a.push(arrival(2, "/svc/primary/audited", None));
            a.push(arrival(3, "/svc/primary/mine", Some("p-mine")));
        }
        assert_eq!(echo.arrival_for("p-mine", 1, "/ignored").map(|a| a.seq), Some(3));
        assert_eq!(echo.arrival_for("p-gone", 1, "/after-expiry").map(|a| a.seq), None);
        assert_eq!(echo.arrival_for("p-gone", 1, "/audited").map(|a| a.seq), Some(2));
        assert_eq!(echo.arrival_for("p-gone", 1, "/before").map(|a| a.seq), None, "arrived before the request was sent");
    }
}
