//! Brokered credentials: OAuth 2.0 client-credentials minting (RFC 6749 §4.4) inside the
//! provider, a token cache, and single-flight refresh.
//!
//! A credential of kind `oauth2_client_credentials` stores a token URL, a client id, a client
//! secret and scopes. Agents never see the client secret nor the minted access token: the
//! proxy asks [`Broker::token`] for a bearer token and injects it upstream itself.
//!
//! What this module owns and guarantees:
//! - **Minting**: `POST` `grant_type=client_credentials` (+ `scope`, space-separated) as
//!   `application/x-www-form-urlencoded`, client authentication with HTTP Basic (id and
//!   secret form-urlencoded first, RFC 6749 §2.3.1). Every request has a bounded timeout and
//!   the response body is capped.
//! - **Caching**: per cache key (the credential key) until `expires_in` minus a margin
//!   (`min(refresh_margin, lifetime / 2)`); a token is re-minted when the credential's
//!   configuration (URL, id, secret, scopes) changes.
//! - **Single flight**: concurrent callers for one key wait for the one in-flight request and
//!   share its result, success or failure. [`Broker::refresh`] (forced, after an upstream 401)
//!   is single-flight too: callers that were waiting while another caller re-minted get that
//!   fresh token instead of minting again.
//! - **No leaks**: the client secret and minted tokens live only in [`SecretValue`]s (and
//!   zeroized buffers); [`BrokerError`] carries only fixed texts, HTTP status codes and the
//!   standard OAuth error code — never response bodies, URLs or values.
//! - **Egress**: the token URL must be `https`, and may point at a loopback, private or
//!   link-local address (or `localhost`) only if its host is listed in
//!   `allowed_private_hosts`, which is also the only way to allow plain `http`. Host names are
//!   resolved and checked before the request (best effort: the HTTP client resolves again).
//!   Redirects are refused.
//!
//! ```no_run
//! # async fn demo() -> Result<(), crp_provider::broker::BrokerError> {
//! use crp_provider::broker::{Broker, ClientCredentials};
//! use crp_core::SecretValue;
//! let broker = Broker::new(reqwest::Client::new());
//! let cfg = ClientCredentials {
//!     token_url: "https://auth.example.com/oauth/token".into(),
//!     client_id: "crp-provider".into(),
//!     client_secret: SecretValue::new("s3cr3t"),
//!     scopes: vec!["read".into()],
//!     allowed_private_hosts: vec![],
//! };
//! let token = broker.token("github/app", &cfg).await?;      // minted once, then cached
//! let fresh = broker.refresh("github/app", &cfg).await?;    // upstream said 401
//! # let _ = (token, fresh); Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use crp_core::SecretValue;
use reqwest::Url;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Configuration of one `oauth2_client_credentials` credential.
#[derive(Debug, Clone)]
pub struct ClientCredentials {
    /// Token endpoint, `https://...` (plain http only for a host in `allowed_private_hosts`).
    pub token_url: String,
    /// OAuth client id.
    pub client_id: String,
    /// OAuth client secret.
    pub client_secret: SecretValue,
    /// Scopes to request (sent space-separated; omitted when empty).
    pub scopes: Vec<String>,
    /// Hosts (exact host names or IP literals, e.g. `127.0.0.1`, `::1`, `localhost`) that may
    /// be private/loopback or reached over plain http. Empty: public https hosts only.
    pub allowed_private_hosts: Vec<String>,
}

/// Tuning knobs; [`Default`] is what [`Broker::new`] uses.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Refresh this long before a token expires (at most half its lifetime). Default 30 s.
    pub refresh_margin: Duration,
    /// Lifetime assumed when the token endpoint sends no `expires_in`. Default 300 s.
    pub default_lifetime: Duration,
    /// Upper bound on one token request, connect to last body byte. Default 10 s.
    pub request_timeout: Duration,
    /// Largest token response accepted. Default 64 KiB.
    pub max_response_bytes: usize,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            refresh_margin: Duration::from_secs(30),
            default_lifetime: Duration::from_secs(300),
            request_timeout: Duration::from_secs(10),
            max_response_bytes: 64 * 1024,
        }
    }
}

/// Why a token could not be obtained. Carries no secret, body, or URL by construction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The credential's configuration is unusable (bad URL, not https, private host...).
    #[error("brokered credential misconfigured: {0}")]
    Config(&'static str),
    /// The token endpoint could not be reached (connect error, timeout...).
    #[error("token endpoint unreachable: {0}")]
    Transport(&'static str),
    /// The token endpoint answered with a non-2xx status.
    #[error("token endpoint returned HTTP {status}{}", oauth_error.map(|e| format!(" ({e})")).unwrap_or_default())]
    Status {
        /// HTTP status code.
        status: u16,
        /// The RFC 6749 §5.2 `error` code, only if it is one of the standard codes.
        oauth_error: Option<&'static str>,
    },
    /// A 2xx answer without a usable `access_token`.
    #[error("token endpoint returned no access_token")]
    NoAccessToken,
    /// A 2xx answer that is not a valid token response.
    #[error("token endpoint returned an invalid response: {0}")]
    InvalidResponse(&'static str),
    /// The token endpoint redirected the request; tokens are only taken from the configured URL.
    #[error("token endpoint redirected the request; redirects are refused")]
    Redirected,
}

type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// Mints, caches and refreshes client-credentials tokens. Cheap to clone (shared cache).
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    opts: BrokerOptions,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    clock: Clock,
    /// Random per-broker salt for configuration fingerprints.
    salt: [u8; 32],
}

/// Per-key state. The async mutex is what makes minting single-flight.
struct Slot {
    state: tokio::sync::Mutex<SlotState>,
    /// Number of completed mint attempts (mirrors `SlotState::attempts`, readable unlocked).
    attempts: AtomicU64,
    /// Callers currently waiting for the lock (observability and tests).
    waiting: AtomicUsize,
}

#[derive(Default)]
struct SlotState {
    cached: Option<Cached>,
    /// Result of the last attempt, if it failed, with the fingerprint of its configuration.
    last_error: Option<([u8; 32], BrokerError)>,
}

struct Cached {
    token: SecretValue,
    refresh_at: Instant,
    fingerprint: [u8; 32],
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = self.inner.slots.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("Broker")
            .field("keys", &keys)
            .field("opts", &self.inner.opts)
            .finish()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Cached,
    Forced,
}

impl Broker {
    /// A broker using `http` for token requests, with [`BrokerOptions::default`].
    ///
    /// Build `http` with redirects disabled (`reqwest::redirect::Policy::none()`) if you can;
    /// the broker refuses a redirected answer either way.
    pub fn new(http: reqwest::Client) -> Broker {
        Broker::with_options(http, BrokerOptions::default())
    }

    /// A broker with explicit options.
    pub fn with_options(http: reqwest::Client, opts: BrokerOptions) -> Broker {
        Broker::build(http, opts, Arc::new(Instant::now))
    }

    fn build(http: reqwest::Client, opts: BrokerOptions, clock: Clock) -> Broker {
        let mut salt = [0u8; 32];
        // If the OS RNG fails the salt stays zero: fingerprints are then plain SHA-256, which
        // only matters for an attacker who can already read this process's memory.
        let _ = getrandom::fill(&mut salt);
        Broker {
            inner: Arc::new(Inner {
                http,
                opts,
                slots: Mutex::new(HashMap::new()),
                clock,
                salt,
            }),
        }
    }

    /// A valid access token for `cache_key`: the cached one until near expiry, else a freshly
    /// minted one. Concurrent callers for one key share one token request.
    pub async fn token(
        &self,
        cache_key: &str,
        cfg: &ClientCredentials,
    ) -> Result<SecretValue, BrokerError> {
        self.get(cache_key, cfg, Mode::Cached).await
    }

    /// Mint a new token now (the upstream rejected the cached one with 401). Single-flight:
    /// callers that waited while another caller re-minted receive that new token.
    pub async fn refresh(
        &self,
        cache_key: &str,
        cfg: &ClientCredentials,
    ) -> Result<SecretValue, BrokerError> {
        self.get(cache_key, cfg, Mode::Forced).await
    }

    /// Forget the cached token of `cache_key` (credential deleted or rotated).
    pub fn invalidate(&self, cache_key: &str) {
        let mut slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.remove(cache_key);
    }

    fn slot(&self, cache_key: &str) -> Arc<Slot> {
        let mut slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .entry(cache_key.to_string())
            .or_insert_with(|| {
                Arc::new(Slot {
                    state: tokio::sync::Mutex::new(SlotState::default()),
                    attempts: AtomicU64::new(0),
                    waiting: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    async fn get(
        &self,
        cache_key: &str,
        cfg: &ClientCredentials,
        mode: Mode,
    ) -> Result<SecretValue, BrokerError> {
        let url = check_token_url(cfg)?;
        let fp = self.fingerprint(cfg);
        let slot = self.slot(cache_key);

        let seen = slot.attempts.load(Ordering::Acquire);
        slot.waiting.fetch_add(1, Ordering::AcqRel);
        let mut st = slot.state.lock().await;
        slot.waiting.fetch_sub(1, Ordering::AcqRel);
        let now = (self.inner.clock)();

        if slot.attempts.load(Ordering::Acquire) != seen {
            // Another caller finished an attempt while we waited: share its result.
            if let Some((efp, e)) = &st.last_error
                && *efp == fp
            {
                return Err(e.clone());
            }
            if let Some(c) = &st.cached
                && c.fingerprint == fp
                && (mode == Mode::Forced || now < c.refresh_at)
            {
                return Ok(c.token.clone());
            }
        } else if mode == Mode::Cached
            && let Some(c) = &st.cached
            && c.fingerprint == fp
            && now < c.refresh_at
        {
            return Ok(c.token.clone());
        }

        let result = self.mint(&url, cfg).await;
        slot.attempts.fetch_add(1, Ordering::AcqRel);
        match result {
            Ok(Minted { token, lifetime }) => {
                let margin = self.inner.opts.refresh_margin.min(lifetime / 2);
                let refresh_at = now.checked_add(lifetime - margin).unwrap_or(now);
                st.cached = Some(Cached {
                    token: token.clone(),
                    refresh_at,
                    fingerprint: fp,
                });
                st.last_error = None;
                Ok(token)
            }
            Err(e) => {
                st.last_error = Some((fp, e.clone()));
                if mode == Mode::Forced {
                    // the upstream already rejected the cached token
                    st.cached = None;
                }
                Err(e)
            }
        }
    }

    fn fingerprint(&self, cfg: &ClientCredentials) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.inner.salt);
        for part in [
            cfg.token_url.as_str(),
            cfg.client_id.as_str(),
            cfg.client_secret.expose(),
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        for s in &cfg.scopes {
            h.update((s.len() as u64).to_be_bytes());
            h.update(s.as_bytes());
        }
        h.finalize().into()
    }

    async fn mint(&self, url: &Url, cfg: &ClientCredentials) -> Result<Minted, BrokerError> {
        check_resolved_host(url, cfg).await?;
        let opts = &self.inner.opts;

        let mut body = String::from("grant_type=client_credentials");
        if !cfg.scopes.is_empty() {
            body.push_str("&scope=");
            body.push_str(&form_encode(&cfg.scopes.join(" ")));
        }
        let mut credentials = Zeroizing::new(form_encode(&cfg.client_id));
        credentials.push(':');
        credentials.push_str(&Zeroizing::new(form_encode(cfg.client_secret.expose())));
        let basic = Zeroizing::new(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials.as_bytes())
        ));
        let mut auth = HeaderValue::from_str(&basic)
            .map_err(|_| BrokerError::Config("client credentials cannot be sent in a header"))?;
        auth.set_sensitive(true);

        let mut resp = self
            .inner
            .http
            .post(url.clone())
            .header(AUTHORIZATION, auth)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .timeout(opts.request_timeout)
            .body(body)
            .send()
            .await
            .map_err(transport_error)?;
        if resp.url() != url || resp.status().is_redirection() {
            return Err(BrokerError::Redirected);
        }
        let status = resp.status();

        let mut buf = Zeroizing::new(Vec::new());
        while let Some(chunk) = resp.chunk().await.map_err(transport_error)? {
            if buf.len() + chunk.len() > opts.max_response_bytes {
                return Err(if status.is_success() {
                    BrokerError::InvalidResponse("response too large")
                } else {
                    BrokerError::Status {
                        status: status.as_u16(),
                        oauth_error: None,
                    }
                });
            }
            buf.extend_from_slice(&chunk);
        }

        if !status.is_success() {
            return Err(BrokerError::Status {
                status: status.as_u16(),
                oauth_error: oauth_error_code(&buf),
            });
        }
        let parsed: TokenResponse = serde_json::from_slice(&buf)
            // the serde error text can quote the input: never surface it
            .map_err(|_| BrokerError::InvalidResponse("not a JSON token response"))?;
        let token = match parsed.access_token {
            Some(t) if !t.is_empty() => t,
            _ => return Err(BrokerError::NoAccessToken),
        };
        if let Some(tt) = &parsed.token_type
            && !tt.eq_ignore_ascii_case("bearer")
        {
            return Err(BrokerError::InvalidResponse("token_type is not Bearer"));
        }
        let lifetime = match parsed.expires_in {
            None | Some(serde_json::Value::Null) => opts.default_lifetime,
            Some(v) => {
                let secs = match &v {
                    serde_json::Value::Number(n) => n
                        .as_u64()
                        .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
                    serde_json::Value::String(s) => s.trim().parse::<u64>().ok(),
                    _ => None,
                };
                match secs {
                    // cap at a year so Instant arithmetic cannot overflow
                    Some(s) => Duration::from_secs(s.min(365 * 24 * 3600)),
                    None => return Err(BrokerError::InvalidResponse("expires_in is not a number")),
                }
            }
        };
        Ok(Minted { token, lifetime })
    }

    #[cfg(test)]
    fn waiting(&self, cache_key: &str) -> usize {
        self.slot(cache_key).waiting.load(Ordering::Acquire)
    }
}

struct Minted {
    token: SecretValue,
    lifetime: Duration,
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    access_token: Option<SecretValue>,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

fn transport_error(e: reqwest::Error) -> BrokerError {
    if e.is_timeout() {
        BrokerError::Transport("timed out")
    } else if e.is_connect() {
        BrokerError::Transport("could not connect")
    } else if e.is_redirect() {
        BrokerError::Redirected
    } else if e.is_body() || e.is_decode() {
        BrokerError::Transport("response body could not be read")
    } else {
        BrokerError::Transport("request failed")
    }
}

/// The standard RFC 6749 §5.2 error code of an error body, if it is one; anything else in the
/// body is ignored.
fn oauth_error_code(body: &[u8]) -> Option<&'static str> {
    #[derive(Deserialize)]
    struct ErrBody {
        error: Option<String>,
    }
    const CODES: [&str; 6] = [
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
    ];
    let e: ErrBody = serde_json::from_slice(body).ok()?;
    let code = e.error?;
    CODES.into_iter().find(|c| *c == code)
}

/// `application/x-www-form-urlencoded` byte serializer (WHATWG URL §5.2).
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Static checks of the token URL: parseable, https (or allowed http), no userinfo, and no
/// private/loopback literal unless allowed.
fn check_token_url(cfg: &ClientCredentials) -> Result<Url, BrokerError> {
    let url = Url::parse(cfg.token_url.trim())
        .map_err(|_| BrokerError::Config("token URL is not a valid URL"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(BrokerError::Config(
            "token URL must not contain user information",
        ));
    }
    if url.host().is_none() {
        return Err(BrokerError::Config("token URL has no host"));
    }
    let allowed = host_allowed(&url, &cfg.allowed_private_hosts);
    match url.scheme() {
        "https" => {}
        "http" if allowed => {}
        "http" => {
            return Err(BrokerError::Config(
                "token URL must use https (plain http only for a host in allowed_private_hosts)",
            ));
        }
        _ => return Err(BrokerError::Config("token URL must use https")),
    }
    if !allowed && host_is_private_literal(&url) {
        return Err(BrokerError::Config(
            "token URL points at a loopback or private address that is not in allowed_private_hosts",
        ));
    }
    Ok(url)
}

/// Resolve a host name and refuse private addresses unless the host is allowed.
async fn check_resolved_host(url: &Url, cfg: &ClientCredentials) -> Result<(), BrokerError> {
    let Some(HostKind::Domain(domain)) = host_kind(url) else {
        return Ok(());
    };
    if host_allowed(url, &cfg.allowed_private_hosts) {
        return Ok(());
    }
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs = tokio::net::lookup_host((domain.as_str(), port))
        .await
        .map_err(|_| BrokerError::Transport("could not resolve the token endpoint's host"))?;
    for a in addrs {
        if ip_is_private(a.ip()) {
            return Err(BrokerError::Config(
                "token URL host resolves to a loopback or private address that is not in allowed_private_hosts",
            ));
        }
    }
    Ok(())
}

/// The URL's host: an IP address or a lower-cased domain without a trailing dot.
enum HostKind {
    Ip(IpAddr),
    Domain(String),
}

fn host_kind(url: &Url) -> Option<HostKind> {
    let h = url.host_str()?;
    let bare = h.trim_start_matches('[').trim_end_matches(']');
    Some(match bare.parse::<IpAddr>() {
        Ok(ip) => HostKind::Ip(ip),
        Err(_) => HostKind::Domain(bare.trim_end_matches('.').to_ascii_lowercase()),
    })
}

fn host_allowed(url: &Url, allowed: &[String]) -> bool {
    let Some(host) = host_kind(url) else {
        return false;
    };
    allowed.iter().any(|a| {
        let a = a
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.');
        match (&host, a.parse::<IpAddr>()) {
            (HostKind::Ip(h), Ok(x)) => *h == x,
            (HostKind::Domain(d), Err(_)) => a.eq_ignore_ascii_case(d),
            _ => false,
        }
    })
}

fn host_is_private_literal(url: &Url) -> bool {
    match host_kind(url) {
        Some(HostKind::Ip(ip)) => ip_is_private(ip),
        Some(HostKind::Domain(d)) => d == "localhost" || d.ends_with(".localhost"),
        None => true,
    }
}

/// Loopback, private (RFC 1918, unique local), link-local (incl. cloud metadata), CGNAT,
/// unspecified and broadcast addresses.
fn ip_is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10
                || o[0] == 0
        }
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return ip_is_private(IpAddr::V4(v4));
            }
            let seg0 = a.segments()[0];
            a.is_loopback()
                || a.is_unspecified()
                || (seg0 & 0xfe00) == 0xfc00 // fc00::/7 unique local
                || (seg0 & 0xffc0) == 0xfe80 // fe80::/10 link-local
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::{Semaphore, mpsc};

    const CANARY: &str = "CANARY-7f3a9c-do-not-leak";
    const SECRET: &str = "s3cr3t+/=:&% é-CANARY-7f3a9c-do-not-leak";

    #[derive(Clone, Copy)]
    enum Behave {
        Ok { expires_in: Option<u64> },
        Status(u16),
        OAuthError,
        NoToken,
        BadJson,
        Redirect,
        Slow,
    }

    struct Server {
        hits: AtomicUsize,
        behave: Mutex<Behave>,
        /// When set, each request reports arrival and waits for a permit.
        gate: Mutex<Option<(Arc<Semaphore>, mpsc::UnboundedSender<()>)>>,
        last_body: Mutex<String>,
    }

    fn form_decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).expect("hex"));
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).expect("utf8")
    }

    async fn token_endpoint(
        State(srv): State<Arc<Server>>,
        headers: HeaderMap,
        body: String,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        let n = srv.hits.fetch_add(1, Ordering::SeqCst) + 1;
        *srv.last_body.lock().unwrap() = body.clone();
        let gate = srv.gate.lock().unwrap().clone();
        if let Some((sem, arrived)) = gate {
            let _ = arrived.send(());
            let permit = sem.acquire().await.expect("semaphore");
            permit.forget();
        }
        // client authentication: HTTP Basic over form-encoded id and secret
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                form_encode("client-1"),
                form_encode(SECRET)
            ))
        );
        let auth_ok =
            headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(expected.as_str());
        let (id, secret) = {
            let h = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let raw = base64::engine::general_purpose::STANDARD
                .decode(h.trim_start_matches("Basic "))
                .unwrap_or_default();
            let raw = String::from_utf8(raw).unwrap_or_default();
            let (a, b) = raw.split_once(':').unwrap_or(("", ""));
            (form_decode(a), form_decode(b))
        };
        let form_ok = body
            .split('&')
            .any(|kv| kv == "grant_type=client_credentials")
            && headers.get("content-type").and_then(|v| v.to_str().ok())
                == Some("application/x-www-form-urlencoded");
        if !auth_ok || id != "client-1" || secret != SECRET || !form_ok {
            return (
                StatusCode::UNAUTHORIZED,
                format!(r#"{{"error":"invalid_client","error_description":"{CANARY}"}}"#),
            )
                .into_response();
        }
        let behave = *srv.behave.lock().unwrap();
        let echo = format!("{CANARY} {SECRET}");
        match behave {
            Behave::Ok { expires_in } => {
                let mut v =
                    serde_json::json!({"access_token": format!("tok-{n}"), "token_type": "Bearer"});
                if let Some(e) = expires_in {
                    v["expires_in"] = e.into();
                }
                (
                    StatusCode::OK,
                    [("content-type", "application/json")],
                    v.to_string(),
                )
                    .into_response()
            }
            Behave::Status(code) => (StatusCode::from_u16(code).unwrap(), echo).into_response(),
            Behave::OAuthError => (
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "invalid_scope", "error_description": echo})
                    .to_string(),
            )
                .into_response(),
            Behave::NoToken => (
                StatusCode::OK,
                serde_json::json!({"token_type": "Bearer", "note": echo, "expires_in": 60})
                    .to_string(),
            )
                .into_response(),
            Behave::BadJson => {
                (StatusCode::OK, format!("{{\"access_token\": {echo}")).into_response()
            }
            Behave::Redirect => (
                StatusCode::TEMPORARY_REDIRECT,
                [("location", "/elsewhere")],
                echo,
            )
                .into_response(),
            Behave::Slow => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                (StatusCode::OK, "{}").into_response()
            }
        }
    }

    async fn start(behave: Behave) -> (Arc<Server>, String) {
        let srv = Arc::new(Server {
            hits: AtomicUsize::new(0),
            behave: Mutex::new(behave),
            gate: Mutex::new(None),
            last_body: Mutex::new(String::new()),
        });
        let app = axum::Router::new()
            .route("/token", post(token_endpoint))
            .route("/elsewhere", post(token_endpoint))
            .with_state(srv.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (srv, format!("http://{addr}/token"))
    }

    fn client() -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder().build().unwrap()
    }

    fn cfg(url: &str) -> ClientCredentials {
        ClientCredentials {
            token_url: url.to_string(),
            client_id: "client-1".into(),
            client_secret: SecretValue::new(SECRET),
            scopes: vec!["read".into(), "write:all".into()],
            allowed_private_hosts: vec!["127.0.0.1".into()],
        }
    }

    /// A manually advanced clock.
    fn manual_clock() -> (Clock, Arc<Mutex<Duration>>) {
        let base = Instant::now();
        let offset = Arc::new(Mutex::new(Duration::ZERO));
        let o = offset.clone();
        (Arc::new(move || base + *o.lock().unwrap()), offset)
    }

    fn assert_clean(e: &BrokerError) {
        for text in [e.to_string(), format!("{e:?}")] {
            assert!(!text.contains(CANARY), "{text}");
            assert!(!text.contains("s3cr3t"), "{text}");
            assert!(!text.contains("127.0.0.1"), "no URL in errors: {text}");
        }
    }

    #[tokio::test]
    async fn mints_with_basic_auth_form_body_and_scopes() {
        let (srv, url) = start(Behave::Ok {
            expires_in: Some(3600),
        })
        .await;
        let b = Broker::new(client());
        let t = b.token("k", &cfg(&url)).await.unwrap();
        assert_eq!(t.expose(), "tok-1");
        assert_eq!(srv.hits.load(Ordering::SeqCst), 1);
        let body = srv.last_body.lock().unwrap().clone();
        assert!(body.contains("grant_type=client_credentials"), "{body}");
        assert!(body.contains("scope=read+write%3Aall"), "{body}");
        assert!(
            !body.contains("s3cr3t"),
            "secret goes in the Authorization header only: {body}"
        );
        // Debug of the config and the token do not reveal them
        assert!(!format!("{:?} {t:?}", cfg(&url)).contains("s3cr3t"));
        assert!(!format!("{t:?}").contains("tok-1"));

        // no scopes: no scope parameter
        let mut c = cfg(&url);
        c.scopes.clear();
        b.token("k2", &c).await.unwrap();
        assert_eq!(
            *srv.last_body.lock().unwrap(),
            "grant_type=client_credentials"
        );
    }

    #[tokio::test]
    async fn caches_until_near_expiry_then_refreshes() {
        let (srv, url) = start(Behave::Ok {
            expires_in: Some(120),
        })
        .await;
        let (clock, offset) = manual_clock();
        let b = Broker::build(client(), BrokerOptions::default(), clock);
        let c = cfg(&url);
        for _ in 0..10 {
            assert_eq!(b.token("k", &c).await.unwrap().expose(), "tok-1");
        }
        assert_eq!(
            srv.hits.load(Ordering::SeqCst),
            1,
            "N calls, one endpoint hit"
        );
        // 120 s lifetime, 30 s margin: still cached at 89 s, refreshed at 90 s
        *offset.lock().unwrap() = Duration::from_secs(89);
        assert_eq!(b.token("k", &c).await.unwrap().expose(), "tok-1");
        *offset.lock().unwrap() = Duration::from_secs(90);
        assert_eq!(b.token("k", &c).await.unwrap().expose(), "tok-2");
        assert_eq!(b.token("k", &c).await.unwrap().expose(), "tok-2");
        assert_eq!(srv.hits.load(Ordering::SeqCst), 2);
        // another key has its own token
        assert_eq!(b.token("other", &c).await.unwrap().expose(), "tok-3");
        // a changed configuration (rotated secret is the common case; here: scopes) re-mints
        let mut c2 = c.clone();
        c2.scopes.push("admin".into());
        assert_eq!(b.token("k", &c2).await.unwrap().expose(), "tok-4");
        // invalidate drops the cache
        b.invalidate("k");
        assert_eq!(b.token("k", &c2).await.unwrap().expose(), "tok-5");
    }

    #[tokio::test]
    async fn short_and_missing_lifetimes() {
        let (srv, url) = start(Behave::Ok {
            expires_in: Some(10),
        })
        .await;
        let (clock, offset) = manual_clock();
        let b = Broker::build(client(), BrokerOptions::default(), clock);
        let c = cfg(&url);
        // 10 s lifetime: margin is capped at half the lifetime (5 s)
        assert_eq!(b.token("k", &c).await.unwrap().expose(), "tok-1");
        *offset.lock().unwrap() = Duration::from_secs(4);
        assert_eq!(b.token("k", &c).await.unwrap().expose(), "tok-1");
        *offset.lock().unwrap() = Duration::from_secs(5);
        assert_eq!(b.token("k", &c).await.unwrap().expose(), "tok-2");

        // no expires_in: default lifetime (300 s) minus 30 s
        *srv.behave.lock().unwrap() = Behave::Ok { expires_in: None };
        assert_eq!(b.token("k2", &c).await.unwrap().expose(), "tok-3");
        *offset.lock().unwrap() = Duration::from_secs(5 + 269);
        assert_eq!(b.token("k2", &c).await.unwrap().expose(), "tok-3");
        *offset.lock().unwrap() = Duration::from_secs(5 + 270);
        assert_eq!(b.token("k2", &c).await.unwrap().expose(), "tok-4");

        // expires_in 0: never cached
        *srv.behave.lock().unwrap() = Behave::Ok {
            expires_in: Some(0),
        };
        assert_eq!(b.token("k3", &c).await.unwrap().expose(), "tok-5");
        assert_eq!(b.token("k3", &c).await.unwrap().expose(), "tok-6");
    }

    /// Start `n` callers of `op` while the token endpoint holds the first request; release it
    /// once the other n-1 callers wait on the key. Returns the tokens.
    async fn concurrent(
        b: &Broker,
        srv: &Arc<Server>,
        url: &str,
        n: usize,
        forced: bool,
    ) -> Vec<Result<SecretValue, BrokerError>> {
        let sem = Arc::new(Semaphore::new(0));
        let (tx, mut arrived) = mpsc::unbounded_channel();
        *srv.gate.lock().unwrap() = Some((sem.clone(), tx));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let b = b.clone();
            let c = cfg(url);
            tasks.push(tokio::spawn(async move {
                if forced {
                    b.refresh("k", &c).await
                } else {
                    b.token("k", &c).await
                }
            }));
        }
        tokio::time::timeout(Duration::from_secs(10), async {
            arrived.recv().await.expect("first request arrives");
            while b.waiting("k") < n - 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("all callers queue behind the in-flight request");
        sem.add_permits(n); // release the in-flight request (and any wrongly made extra ones)
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        *srv.gate.lock().unwrap() = None;
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn single_flight_concurrent_callers_one_hit() {
        let (srv, url) = start(Behave::Ok {
            expires_in: Some(3600),
        })
        .await;
        let b = Broker::new(client());
        let results = concurrent(&b, &srv, &url, 16, false).await;
        assert_eq!(srv.hits.load(Ordering::SeqCst), 1);
        for r in results {
            assert_eq!(r.unwrap().expose(), "tok-1");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn forced_refresh_is_single_flight() {
        let (srv, url) = start(Behave::Ok {
            expires_in: Some(3600),
        })
        .await;
        let b = Broker::new(client());
        assert_eq!(b.token("k", &cfg(&url)).await.unwrap().expose(), "tok-1");
        // one forced refresh re-mints even though the cached token is fresh
        assert_eq!(b.refresh("k", &cfg(&url)).await.unwrap().expose(), "tok-2");
        assert_eq!(b.token("k", &cfg(&url)).await.unwrap().expose(), "tok-2");
        // 8 callers all saw a 401 at once: one re-mint
        let results = concurrent(&b, &srv, &url, 8, true).await;
        assert_eq!(srv.hits.load(Ordering::SeqCst), 3);
        for r in results {
            assert_eq!(r.unwrap().expose(), "tok-3");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn waiters_share_a_failure() {
        let (srv, url) = start(Behave::Status(503)).await;
        let b = Broker::new(client());
        let results = concurrent(&b, &srv, &url, 6, false).await;
        assert_eq!(srv.hits.load(Ordering::SeqCst), 1);
        for r in results {
            assert_eq!(
                r.unwrap_err(),
                BrokerError::Status {
                    status: 503,
                    oauth_error: None
                }
            );
        }
        // the next caller tries again
        *srv.behave.lock().unwrap() = Behave::Ok {
            expires_in: Some(60),
        };
        assert_eq!(b.token("k", &cfg(&url)).await.unwrap().expose(), "tok-2");
    }

    #[tokio::test]
    async fn token_endpoint_errors_carry_no_secrets() {
        let (srv, url) = start(Behave::Status(500)).await;
        let b = Broker::new(client());
        let c = cfg(&url);

        let e = b.token("k", &c).await.unwrap_err();
        assert_eq!(
            e,
            BrokerError::Status {
                status: 500,
                oauth_error: None
            }
        );
        assert_eq!(e.to_string(), "token endpoint returned HTTP 500");
        assert_clean(&e);

        *srv.behave.lock().unwrap() = Behave::OAuthError;
        let e = b.token("k", &c).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "token endpoint returned HTTP 400 (invalid_scope)"
        );
        assert_clean(&e);

        *srv.behave.lock().unwrap() = Behave::NoToken;
        let e = b.token("k", &c).await.unwrap_err();
        assert_eq!(e.to_string(), "token endpoint returned no access_token");
        assert_clean(&e);

        *srv.behave.lock().unwrap() = Behave::BadJson;
        let e = b.token("k", &c).await.unwrap_err();
        assert_eq!(e, BrokerError::InvalidResponse("not a JSON token response"));
        assert_clean(&e);

        *srv.behave.lock().unwrap() = Behave::Redirect;
        let e = b.token("k", &c).await.unwrap_err();
        assert_eq!(e, BrokerError::Redirected);
        assert_clean(&e);

        // wrong client secret: the endpoint answers 401 with the canary in its body
        *srv.behave.lock().unwrap() = Behave::Ok {
            expires_in: Some(60),
        };
        let mut wrong = c.clone();
        wrong.client_secret = SecretValue::new("s3cr3t-wrong");
        let e = b.token("k", &wrong).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "token endpoint returned HTTP 401 (invalid_client)"
        );
        assert_clean(&e);

        // the failure did not poison the key
        assert!(b.token("k", &c).await.unwrap().expose().starts_with("tok-"));
    }

    #[tokio::test]
    async fn requests_are_time_bounded() {
        let (_srv, url) = start(Behave::Slow).await;
        let opts = BrokerOptions {
            request_timeout: Duration::from_millis(200),
            ..Default::default()
        };
        let b = Broker::with_options(client(), opts);
        let started = Instant::now();
        let e = b.token("k", &cfg(&url)).await.unwrap_err();
        assert_eq!(e, BrokerError::Transport("timed out"));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn connection_refused_is_a_transport_error() {
        // bind then drop: nothing listens on that port any more
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let b = Broker::new(client());
        let e = b
            .token("k", &cfg(&format!("http://{addr}/token")))
            .await
            .unwrap_err();
        assert!(matches!(e, BrokerError::Transport(_)), "{e:?}");
        assert_clean(&e);
    }

    #[tokio::test]
    async fn token_url_must_be_https_or_explicitly_allowed() {
        let (srv, url) = start(Behave::Ok {
            expires_in: Some(60),
        })
        .await;
        let b = Broker::new(client());
        let mut c = cfg(&url);
        c.allowed_private_hosts.clear();
        assert!(
            matches!(b.token("k", &c).await, Err(BrokerError::Config(m)) if m.contains("https"))
        );
        c.token_url = url.replace("http://", "https://");
        assert!(
            matches!(b.token("k", &c).await, Err(BrokerError::Config(m)) if m.contains("loopback"))
        );
        assert_eq!(srv.hits.load(Ordering::SeqCst), 0, "nothing was sent");

        let bad = |u: &str, allow: &[&str]| ClientCredentials {
            token_url: u.into(),
            allowed_private_hosts: allow.iter().map(|s| s.to_string()).collect(),
            ..cfg(&url)
        };
        for (u, allow) in [
            ("not a url", &[][..]),
            ("ftp://auth.example.com/token", &[]),
            ("https://user:pw@auth.example.com/token", &[]),
            ("http://auth.example.com/token", &[]),
            ("https://localhost/token", &[]),
            ("https://api.localhost/token", &[]),
            ("https://10.1.2.3/token", &[]),
            ("https://169.254.169.254/latest", &[]),
            ("https://[::1]/token", &[]),
            ("https://[fd00::1]/token", &[]),
            ("https://[::ffff:127.0.0.1]/token", &[]),
            ("https://100.64.1.1/token", &[]),
            ("http://127.0.0.1/token", &["127.0.0.2"]),
        ] {
            let r = check_token_url(&bad(u, allow));
            assert!(
                matches!(r, Err(BrokerError::Config(_))),
                "{u} should be refused"
            );
        }
        for (u, allow) in [
            ("https://auth.example.com/token", &[][..]),
            ("https://8.8.8.8/token", &[]),
            ("http://127.0.0.1:9/token", &["127.0.0.1"]),
            ("https://[::1]:8443/token", &["[::1]"]),
            ("http://LOCALHOST/token", &["localhost"]),
            ("https://10.1.2.3/token", &["10.1.2.3"]),
        ] {
            assert!(
                check_token_url(&bad(u, allow)).is_ok(),
                "{u} should be accepted"
            );
        }
    }

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode("a b+c/d:é*-._~"), "a+b%2Bc%2Fd%3A%C3%A9*-._%7E");
        assert_eq!(form_decode(&form_encode(SECRET)), SECRET);
    }

    #[test]
    fn oauth_error_codes_are_whitelisted() {
        assert_eq!(
            oauth_error_code(br#"{"error":"invalid_client"}"#),
            Some("invalid_client")
        );
        assert_eq!(
            oauth_error_code(format!(r#"{{"error":"{CANARY}"}}"#).as_bytes()),
            None
        );
        assert_eq!(oauth_error_code(b"not json"), None);
    }
}
