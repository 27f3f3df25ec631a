//! `--http URL`: JSON-RPC over `POST {URL}/crp`, discovery at `GET {URL}/.well-known/crp`.
//!
//! The version goes in the `CRP-Version` header. Extra headers (`--header 'K: V'`) go on every
//! request. With `--agent-key`, every request is signed with Ed25519 as `crp_core::signing`
//! defines (`X-CRP-Agent`, `X-CRP-Timestamp`, `X-CRP-Nonce`, `X-CRP-Signature`).

use std::time::Duration;

use async_trait::async_trait;
use crp_core::signing::{AgentSigningKey, new_nonce, sign_request};
use serde_json::Value;

use super::{Discovery, Expect, Reply, Transport, TransportError, TransportKind};

/// The header carrying the requested version.
pub const VERSION_HEADER: &str = "CRP-Version";

/// An agent identity to sign with.
pub struct Signer {
    /// Agent id.
    pub agent: String,
    /// Its key.
    pub key: AgentSigningKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.agent)
    }
}

/// An HTTP provider.
pub struct HttpTransport {
    client: reqwest::Client,
    base: String,
    headers: Vec<(String, String)>,
    signer: Option<Signer>,
}

impl HttpTransport {
    /// A transport for the provider at `base` (e.g. `http://127.0.0.1:7700`).
    pub fn new(base: &str, headers: Vec<(String, String)>, signer: Option<Signer>, timeout: Duration) -> Result<Self, TransportError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| TransportError::Failed(format!("HTTP client: {e}")))?;
        Ok(HttpTransport { client, base: base.trim_end_matches('/').to_string(), headers, signer })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn signed(&self, method: &str, url: &str, body: &[u8]) -> Result<Vec<(String, String)>, TransportError> {
        let mut out = self.headers.clone();
        if let Some(s) = &self.signer {
            let u = reqwest::Url::parse(url).map_err(|e| TransportError::Failed(format!("bad URL {url}: {e}")))?;
            let host = match u.port() {
                Some(p) => format!("{}:{p}", u.host_str().unwrap_or("")),
                None => u.host_str().unwrap_or("").to_string(),
            };
            let pq = match u.query() {
                Some(q) => format!("{}?{q}", u.path()),
                None => u.path().to_string(),
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            let nonce = new_nonce().map_err(|e| TransportError::Failed(format!("random source: {e}")))?;
            let h = sign_request(&s.key, &s.agent, method, &host, &pq, body, now, nonce);
            out.extend(h.pairs().into_iter().map(|(k, v)| (k.to_string(), v)));
        }
        Ok(out)
    }
}

/// `GET {base}/.well-known/crp` with an optional version header.
pub async fn fetch_capability(
    client: &reqwest::Client,
    base: &str,
    version: Option<&str>,
    headers: &[(String, String)],
) -> Result<Discovery, TransportError> {
    let url = format!("{base}/.well-known/crp");
    let mut req = client.get(&url);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    if let Some(v) = version {
        req = req.header(VERSION_HEADER, v);
    }
    let resp = req.send().await.map_err(|e| TransportError::Failed(format!("GET {url}: {e}")))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| TransportError::Failed(format!("GET {url}: {e}")))?;
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if status.is_success() {
        // Accept the bare object or one wrapped as MCP does.
        let cap = v
            .pointer("/experimental/crp")
            .or_else(|| v.pointer("/capabilities/experimental/crp"))
            .cloned()
            .unwrap_or(v);
        Ok(Discovery::Capability(cap))
    } else {
        Ok(Discovery::Refused(serde_json::json!({"httpStatus": status.as_u16(), "body": v})))
    }
}

#[async_trait]
impl Transport for HttpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Http
    }

    async fn discover(&self, version: Option<&str>) -> Result<Discovery, TransportError> {
        let url = format!("{}/.well-known/crp", self.base);
        let headers = self.signed("GET", &url, b"")?;
        fetch_capability(&self.client, &self.base, version, &headers).await
    }

    async fn exchange(&self, version: Option<&str>, body: &str, _expect: Expect) -> Result<Reply, TransportError> {
        let url = format!("{}/crp", self.base);
        let headers = self.signed("POST", &url, body.as_bytes())?;
        let mut req = self.client.post(&url).header("content-type", "application/json").body(body.to_string());
        for (k, v) in &headers {
            req = req.header(k, v);
        }
        if let Some(v) = version {
            req = req.header(VERSION_HEADER, v);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                TransportError::Failed(format!("POST {url}: timed out"))
            } else {
                TransportError::Failed(format!("POST {url}: {e}"))
            }
        })?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| TransportError::Failed(format!("POST {url}: {e}")))?;
        Ok(Reply { status: Some(status), body: (!text.trim().is_empty()).then_some(text) })
    }
}
