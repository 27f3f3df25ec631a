//! Shared helpers of the `http_*` integration tests: a throwaway vault loaded from an apply
//! document, the real server on an ephemeral port, an upstream of our own that records what
//! reaches it and echoes it back, and a request signer.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use crp_core::signing;
use crp_provider::apply::ApplyDoc;
use crp_provider::http::{RunningServer, ServeConfig, start};
use crp_provider::vault::Vault;
use futures_util::StreamExt;
use serde_json::{Value, json};

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path_and_query: String,
    pub headers: BTreeMap<String, String>,
    pub body_bytes: u64,
    pub version: String,
}

/// What the upstream recorded.
#[derive(Default)]
pub struct Recorder {
    pub seen: Mutex<Vec<Seen>>,
    pub streamed_bytes: AtomicU64,
    pub token_calls: AtomicU64,
    /// `/slow` signals this when a request arrived...
    pub slow_entered: tokio::sync::Notify,
    /// ...and answers once this is notified.
    pub slow_gate: tokio::sync::Notify,
}

impl Recorder {
    pub fn last(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().expect("the upstream saw no request")
    }
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

fn record(rec: &Recorder, req: &Request, body_bytes: u64) -> Seen {
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let s = Seen {
        method: req.method().to_string(),
        path_and_query: req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        headers,
        body_bytes,
        version: format!("{:?}", req.version()),
    };
    rec.seen.lock().unwrap().push(s.clone());
    s
}

/// `ANY /echo/*`: answers a JSON echo of method, path, query and headers (so an injected
/// credential comes straight back) plus the body length.
async fn echo(State(rec): State<Arc<Recorder>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 16 * 1024 * 1024).await.unwrap_or_default();
    let req = Request::from_parts(parts, Body::empty());
    let s = record(&rec, &req, bytes.len() as u64);
    let out = json!({ "method": s.method, "pathAndQuery": s.path_and_query, "headers": s.headers, "bodyBytes": s.body_bytes });
    // Echo the Authorization header in a response header as well.
    let mut resp = axum::Json(out).into_response();
    if let Some(a) = req.headers().get("authorization") {
        resp.headers_mut().insert("x-echo-authorization", a.clone());
    }
    resp.headers_mut().insert("set-cookie", "upstream-session=abc".parse().unwrap());
    resp
}

/// `ANY /count`: reads the body as a stream, counting bytes without keeping them.
async fn count(State(rec): State<Arc<Recorder>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let mut n = 0u64;
    let mut s = body.into_data_stream();
    while let Some(chunk) = s.next().await {
        match chunk {
            Ok(c) => n += c.len() as u64,
            Err(_) => return (http::StatusCode::BAD_REQUEST, "body failed").into_response(),
        }
    }
    rec.streamed_bytes.store(n, Ordering::SeqCst);
    let req = Request::from_parts(parts, Body::empty());
    record(&rec, &req, n);
    axum::Json(json!({ "bytes": n })).into_response()
}

/// `GET /stream-echo/{n}`: a streamed (chunked) body of `n` filler bytes with the request's
/// Authorization value inserted in the middle, split across chunks of 7 bytes.
async fn stream_echo(State(rec): State<Arc<Recorder>>, req: Request) -> Response {
    let auth = req.headers().get("authorization").map(|v| v.as_bytes().to_vec()).unwrap_or_default();
    record(&rec, &req, 0);
    let mut data = Vec::new();
    data.extend_from_slice(&[b'a'; 100]);
    data.extend_from_slice(&auth);
    data.extend_from_slice(&[b'z'; 100]);
    let chunks: Vec<Result<Bytes, std::io::Error>> = data.chunks(7).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    Response::builder().status(200).body(Body::from_stream(futures_util::stream::iter(chunks))).unwrap()
}

/// `GET /big/{n}`: `n` bytes of filler, generated as a stream of 64 KiB chunks (no length).
async fn big(State(rec): State<Arc<Recorder>>, axum::extract::Path(n): axum::extract::Path<u64>, req: Request) -> Response {
    record(&rec, &req, 0);
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let full = n / chunk.len() as u64;
    let tail = (n % chunk.len() as u64) as usize;
    let s = futures_util::stream::iter(0..full)
        .map(move |_| Ok::<_, std::io::Error>(chunk.clone()))
        .chain(futures_util::stream::iter((tail > 0).then(|| Ok(Bytes::from(vec![b'y'; tail])))));
    Response::builder().status(200).body(Body::from_stream(s)).unwrap()
}

/// `GET /slow`: answers only when the test opens `slow_gate`.
async fn slow(State(rec): State<Arc<Recorder>>, req: Request) -> Response {
    record(&rec, &req, 0);
    rec.slow_entered.notify_one();
    rec.slow_gate.notified().await;
    (http::StatusCode::OK, "slow done").into_response()
}

/// `GET /redirect`: a 302 to another host.
async fn redirect(State(rec): State<Arc<Recorder>>, req: Request) -> Response {
    record(&rec, &req, 0);
    Response::builder().status(302).header("location", "http://169.254.169.254/latest/meta-data/").body(Body::empty()).unwrap()
}

/// `POST /oauth/token`: client-credentials token endpoint minting `minted-<n>`.
async fn token(State(rec): State<Arc<Recorder>>) -> Response {
    let n = rec.token_calls.fetch_add(1, Ordering::SeqCst) + 1;
    axum::Json(json!({ "access_token": format!("minted-token-{n}"), "token_type": "Bearer", "expires_in": 3600 })).into_response()
}

/// `ANY /needs-fresh/*`: 401 unless the bearer is the second minted token.
async fn needs_fresh(State(rec): State<Arc<Recorder>>, req: Request) -> Response {
    let ok = req.headers().get("authorization").is_some_and(|v| v == "Bearer minted-token-2");
    record(&rec, &req, 0);
    if ok { (http::StatusCode::OK, "fresh ok").into_response() } else { (http::StatusCode::UNAUTHORIZED, "stale").into_response() }
}

/// An upstream on 127.0.0.1:0.
pub async fn upstream() -> (SocketAddr, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let app = upstream_app(rec.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, rec)
}

/// The same upstream over TLS (HTTP/1.1 and HTTP/2 by ALPN) with a fresh self-signed
/// certificate for `localhost`; returns the certificate (DER) to trust.
pub async fn tls_upstream() -> (SocketAddr, Arc<Recorder>, Vec<u8>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    crp_provider::http::install_crypto_provider();
    let rec = Arc::new(Recorder::default());
    let app = upstream_app(rec.clone());
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_der = ck.cert.der().to_vec();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![rustls::pki_types::CertificateDer::from(cert_der.clone())], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, rec, cert_der)
}

fn upstream_app(rec: Arc<Recorder>) -> Router {
    Router::new()
        .route("/echo", any(echo))
        .route("/echo/{*rest}", any(echo))
        .route("/count", any(count))
        .route("/stream-echo", get(stream_echo))
        .route("/redirect", get(redirect))
        .route("/slow", get(slow))
        .route("/big/{n}", get(big))
        .route("/oauth/token", axum::routing::post(token))
        .route("/needs-fresh/{*rest}", any(needs_fresh))
        .fallback(echo)
        .with_state(rec)
}

/// A throwaway vault with `toml` applied and the dev policy installed.
pub async fn vault_with(toml: &str) -> (Vault, tempfile::TempDir) {
    let (vault, dir) = Vault::open_ephemeral().await.expect("ephemeral vault");
    vault.install_policy("10-dev.cedar", crp_provider::policy::dev_policy()).expect("dev policy");
    let doc = ApplyDoc::parse(toml, None).expect("apply doc");
    vault.apply(&doc).await.expect("apply");
    (vault, dir)
}

/// The real server over `vault` on an ephemeral port.
pub async fn serve(vault: &Vault, dev: bool) -> RunningServer {
    start(vault.clone(), ServeConfig { listen: "127.0.0.1:0".parse().unwrap(), dev, ..Default::default() })
        .await
        .expect("server starts")
}

/// A plain client (no pooling surprises across tests).
pub fn client() -> reqwest::Client {
    crp_provider::http::install_crypto_provider();
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).no_proxy().build().unwrap()
}

/// POST a JSON-RPC call unsigned (dev mode), returning the parsed body.
pub async fn rpc(base: &str, method: &str, params: Value) -> Value {
    let body = json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params });
    let r = client().post(format!("{base}/crp")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "{method}");
    r.json().await.unwrap()
}

/// The `result` of a call, panicking with the error otherwise.
pub async fn rpc_ok(base: &str, method: &str, params: Value) -> Value {
    let v = rpc(base, method, params).await;
    assert!(v.get("error").is_none(), "{method} failed: {v}");
    v["result"].clone()
}

/// A signed POST of `body` to `{base}{path}` as `agent`.
pub fn signed(
    base: &str,
    path: &str,
    agent: &str,
    key: &signing::AgentSigningKey,
    body: &[u8],
    timestamp: i64,
    nonce: String,
) -> reqwest::RequestBuilder {
    let url = reqwest::Url::parse(&format!("{base}{path}")).unwrap();
    let host = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap()),
        None => url.host_str().unwrap().to_string(),
    };
    let pq = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let h = signing::sign_request(key, agent, "POST", &host, &pq, body, timestamp, nonce);
    let mut rb = client().post(url).header("content-type", "application/json").body(body.to_vec());
    for (k, v) in h.pairs() {
        rb = rb.header(k, v);
    }
    rb
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Resident set size of this process, bytes (Linux).
pub fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
