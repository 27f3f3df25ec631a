//! The HTTP side of remote mode: `POST {provider}/crp` signed as an installed agent,
//! `GET {provider}/.well-known/crp`, and the unsigned bootstrap registration.
//!
//! Every JSON-RPC call carries `CRP-Version` and the four `X-CRP-*` signature headers of
//! [`crp_core::signing`]. Failures become [`CrpError`]s whose messages say what to do; they
//! carry only what the provider said (which never contains a secret) and our own words.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use crp_core::error::ErrorData;
use crp_core::jsonrpc::{Request, Response};
use crp_core::signing::{self, AgentSigningKey};
use crp_core::types::Capability;
use crp_core::{CrpError, Version};
use reqwest::Url;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The header that carries the requested CRP version on HTTP.
pub const VERSION_HEADER: &str = "crp-version";

/// Install the process-wide rustls provider (ring). Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An HTTP client with the timeouts this crate uses.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client> {
    install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("cannot build the HTTP client")
}

/// Parse a provider base URL (`http://127.0.0.1:7700`, optionally with a path prefix).
pub fn parse_base(url: &str) -> Result<Url> {
    let trimmed = url.trim().trim_end_matches('/');
    let u = Url::parse(trimmed).with_context(|| format!("`{trimmed}` is not a URL"))?;
    if !matches!(u.scheme(), "http" | "https") {
        bail!("provider URL must be http:// or https://, got `{}`", u.scheme());
    }
    if u.host_str().is_none() {
        bail!("provider URL `{trimmed}` has no host");
    }
    if !u.username().is_empty() || u.password().is_some() || u.query().is_some() || u.fragment().is_some() {
        bail!("provider URL must not carry credentials, a query or a fragment");
    }
    Ok(u)
}

/// `host[:port]` exactly as the `Host` header reqwest sends for `u` (port only when explicit
/// and not the scheme's default), which is what the provider verifies the signature against.
pub fn authority(u: &Url) -> String {
    let host = u.host_str().unwrap_or_default();
    match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    }
}

/// `{base path}{suffix}`: `/crp` for `http://h:1`, `/x/crp` for `http://h:1/x`.
fn join_path(base: &Url, suffix: &str) -> String {
    let prefix = base.path().trim_end_matches('/');
    format!("{prefix}{suffix}")
}

fn endpoint(base: &Url, suffix: &str) -> Result<Url> {
    let mut u = base.clone();
    u.set_path(&join_path(base, suffix));
    Ok(u)
}

/// A signed JSON-RPC client for one provider and one agent.
pub struct RemoteClient {
    http: reqwest::Client,
    base: Url,
    agent_id: String,
    key: AgentSigningKey,
    next_id: AtomicU64,
}

impl std::fmt::Debug for RemoteClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteClient").field("base", &self.base.as_str()).field("agent_id", &self.agent_id).finish()
    }
}

impl RemoteClient {
    /// A client for `base` signing as `agent_id` with `key`.
    pub fn new(base: &str, agent_id: &str, key: AgentSigningKey) -> Result<Self> {
        Ok(Self {
            http: http_client(Duration::from_secs(60))?,
            base: parse_base(base)?,
            agent_id: agent_id.to_owned(),
            key,
            next_id: AtomicU64::new(1),
        })
    }

    /// The provider base URL.
    pub fn base_url(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// The agent this client signs as.
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// `GET /.well-known/crp` (the newest version).
    pub async fn discover(&self) -> Result<Capability> {
        fetch_capability(&self.http, &self.base).await
    }

    /// `GET /.well-known/crp` with `CRP-Version: version`: the capability under that version.
    pub async fn discover_version(&self, version: Version) -> Result<Capability> {
        let url = endpoint(&self.base, "/.well-known/crp")?;
        let resp = self
            .http
            .get(url.clone())
            .header(VERSION_HEADER, version.as_str())
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        if !resp.status().is_success() {
            bail!("{url} answered HTTP {} for CRP {version}", resp.status().as_u16());
        }
        resp.json::<Capability>().await.with_context(|| format!("{url} did not return a CRP capability object"))
    }

    /// One signed JSON-RPC call.
    pub async fn call(&self, version: Version, method: &str, params: Value) -> Result<Value, CrpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as i64;
        let body = serde_json::to_vec(&Request::new(id, method, params)).map_err(|_| CrpError::internal())?;
        let path = join_path(&self.base, "/crp");
        let url = endpoint(&self.base, "/crp").map_err(|_| CrpError::internal())?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let nonce = signing::new_nonce().map_err(|_| CrpError::provider_error("no OS randomness for a nonce"))?;
        let signed = signing::sign_request(&self.key, &self.agent_id, "POST", &authority(&self.base), &path, &body, now, nonce);
        let mut req = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(VERSION_HEADER, version.as_str());
        for (k, v) in signed.pairs() {
            req = req.header(k, v);
        }
        let resp = req.body(body).send().await.map_err(|e| unreachable(self.base_url(), &e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| unreachable(self.base_url(), &e))?;
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            // The provider refused the caller itself (`auth_failure: …`, `scope: …`), with or
            // without a JSON-RPC body: say which operator command fixes it.
            let said = match serde_json::from_slice::<Response>(&bytes).map(Response::into_result) {
                Ok(Err(e)) if e.message.starts_with("auth_failure") || e.message.starts_with("scope") => e.message,
                Ok(other) => return other,
                Err(_) => provider_text(&bytes),
            };
            return Err(auth_error(&self.agent_id, status.as_u16(), &said));
        }
        match serde_json::from_slice::<Response>(&bytes) {
            Ok(r) => r.into_result(),
            Err(_) => Err(CrpError::provider_error(format!(
                "the provider at {} answered HTTP {} without a JSON-RPC response",
                self.base_url(),
                status.as_u16()
            ))),
        }
    }
}

/// The text of an error body: a JSON `error`/`message` field, else the body, cut short.
fn provider_text(bytes: &[u8]) -> String {
    let text = match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => ["error", "message", "detail"]
            .iter()
            .find_map(|k| v.get(*k).and_then(|x| x.as_str().map(str::to_owned)))
            .or_else(|| v.get("error").and_then(|e| e.get("message")).and_then(|m| m.as_str()).map(str::to_owned))
            .unwrap_or_default(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    };
    text.chars().filter(|c| !c.is_control()).take(200).collect()
}

fn unreachable(base: &str, e: &reqwest::Error) -> CrpError {
    let why = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection refused or host unreachable"
    } else {
        "request failed"
    };
    CrpError::provider_error(format!(
        "cannot reach the CRP provider at {base} ({why}); check that `crp-provider serve` is running there"
    ))
}

/// A provider refusal of the agent itself (HTTP 401/403 without a JSON-RPC body), worded so
/// that the reader knows which operator command fixes it.
pub fn auth_error(agent: &str, status: u16, provider_said: &str) -> CrpError {
    let hint = if provider_said.contains("pending") {
        format!("agent `{agent}` is waiting for approval: ask the operator to run `crp-provider agent approve {agent}`")
    } else if provider_said.contains("disabled") {
        format!("agent `{agent}` is disabled: ask the operator to run `crp-provider agent enable {agent}`")
    } else if provider_said.contains("not found") {
        format!("the provider does not know agent `{agent}`: install a new identity with `crp-mcp install <token>`")
    } else if provider_said.contains("window") {
        "this machine's clock differs from the provider's by more than 300 s: fix the clock".to_owned()
    } else if provider_said.starts_with("scope") {
        format!("agent `{agent}` lacks a scope: ask the operator to grant it")
    } else {
        format!("the provider refused agent `{agent}`")
    };
    let said: String = if provider_said.is_empty() { format!("HTTP {status}") } else { provider_said.to_owned() };
    // The provider's codes for these refusals (interface.md, crp-provider http/rpc.rs).
    let (code, name) = if status == 403 { (-32002, "scope") } else { (-32001, "auth_failure") };
    CrpError {
        code,
        message: format!("{said}: {hint}"),
        data: Some(ErrorData { error: Some(name.into()), reason: Some(said), ..Default::default() }),
    }
}

/// `GET {base}/.well-known/crp`.
pub async fn fetch_capability(http: &reqwest::Client, base: &Url) -> Result<Capability> {
    let url = endpoint(base, "/.well-known/crp")?;
    let resp = http.get(url.clone()).send().await.with_context(|| format!("cannot reach {url}"))?;
    if !resp.status().is_success() {
        bail!("{url} answered HTTP {}", resp.status().as_u16());
    }
    resp.json::<Capability>().await.with_context(|| format!("{url} did not return a CRP capability object"))
}

/// `POST /api/v1/agents/register` body.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RegisterRequest<'a> {
    token: &'a str,
    public_key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

/// `POST /api/v1/agents/register` answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registered {
    /// The id the provider assigned.
    pub agent_id: String,
    /// `pending` until an operator approves.
    #[serde(default)]
    pub status: Option<String>,
    /// The name the provider recorded.
    #[serde(default)]
    pub name: Option<String>,
}

/// Register a public key with a one-time bootstrap token (the token is the credential; the
/// request is not signed).
pub async fn register(base: &str, token: &str, public_key_b64: &str, name: Option<&str>) -> Result<Registered> {
    let base = parse_base(base)?;
    let http = http_client(Duration::from_secs(30))?;
    let url = endpoint(&base, "/api/v1/agents/register")?;
    let resp = http
        .post(url.clone())
        .json(&RegisterRequest { token, public_key: public_key_b64, name })
        .send()
        .await
        .with_context(|| format!("cannot reach {url}; is `crp-provider serve` running there?"))?;
    let status = resp.status();
    let bytes = resp.bytes().await.context("reading the registration answer")?;
    if !status.is_success() {
        return Err(anyhow!("bootstrap rejected (HTTP {}): {}", status.as_u16(), provider_text(&bytes)));
    }
    serde_json::from_slice(&bytes).context("the provider's registration answer has no agentId")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_and_authority() {
        let u = parse_base("http://127.0.0.1:7700/").unwrap();
        assert_eq!(authority(&u), "127.0.0.1:7700");
        assert_eq!(join_path(&u, "/crp"), "/crp");
        assert_eq!(endpoint(&u, "/crp").unwrap().as_str(), "http://127.0.0.1:7700/crp");
        let u = parse_base("https://vault.example/prefix").unwrap();
        assert_eq!(authority(&u), "vault.example");
        assert_eq!(join_path(&u, "/crp"), "/prefix/crp");
        let u = parse_base("http://[::1]:8080").unwrap();
        assert_eq!(authority(&u), "[::1]:8080");
        assert!(parse_base("ftp://x").is_err());
        assert!(parse_base("http://user:pw@x").is_err());
        assert!(parse_base("http://x/?token=1").is_err());
        assert!(parse_base("not a url").is_err());
    }

    #[test]
    fn auth_errors_say_what_to_do() {
        let e = auth_error("ag-1", 401, "auth_failure: agent is pending");
        assert!(e.message.contains("crp-provider agent approve ag-1"), "{}", e.message);
        let e = auth_error("ag-1", 401, "auth_failure: agent is disabled");
        assert!(e.message.contains("agent enable ag-1"), "{}", e.message);
        assert_eq!(e.code, -32001);
        let e = auth_error("ag-1", 401, "");
        assert!(e.message.contains("HTTP 401"), "{}", e.message);
        let e = auth_error("ag-1", 403, "scope: missing required scope crp.use");
        assert_eq!(e.code, -32002);
        assert!(e.message.contains("grant it"), "{}", e.message);
    }

    #[test]
    fn provider_text_is_short_and_clean() {
        assert_eq!(provider_text(br#"{"error":"auth_failure: bad signature"}"#), "auth_failure: bad signature");
        assert_eq!(provider_text(b"plain\ntext"), "plaintext");
        assert_eq!(provider_text(&[b'x'; 500]).len(), 200);
    }
}
