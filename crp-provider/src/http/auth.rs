//! Caller authentication and scopes for `POST /crp`.
//!
//! Agents sign every request with Ed25519 (crp_core::signing). [`Authenticator::authenticate`]
//! runs the checks in the order the interface fixes, and the first failure is the answer:
//!
//! 1. `X-CRP-Agent` names a known agent (`agent not found`);
//! 2. the agent is not pending (`agent is pending`);
//! 3. nor disabled (`agent is disabled`);
//! 4. `X-CRP-Timestamp` is within ±300 s of now (`timestamp out of window`);
//! 5. `X-CRP-Signature` verifies over the canonical string built from the method, the `Host`
//!    header (or the HTTP/2 authority), the request URI's path and query, the timestamp, the
//!    nonce and the SHA-256 of the exact body (`bad signature`);
//! 6. the nonce was not seen before (`replayed nonce`); it is then recorded.
//!
//! Failures are HTTP 401 with the message `auth_failure: <reason>`. The replay cache keeps a
//! nonce until its timestamp is out of the window (so a replay is either "replayed nonce" or
//! "timestamp out of window", never accepted), and holds at most [`REPLAY_CAPACITY`] entries:
//! when full of unexpired nonces it refuses new requests (fail closed, HTTP 503) rather than
//! forgetting one.
//!
//! In `serve --dev`, a request without `X-CRP-Agent` from a loopback address is the agent
//! `dev` with every scope; signed requests are still verified as above.
//!
//! Scopes: each method needs one scope ([`required_scope`]); an agent holds it when its scope
//! list has it exactly, `*`, or `<prefix>:*`. Missing: HTTP 403
//! `scope: missing required scope <s>`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crp_core::signing;
use ed25519_dalek::VerifyingKey;
use http::{HeaderMap, Method, StatusCode, Uri};

use super::backend::{AgentStatus, Backend};

/// Most nonces remembered at once. Nonces live for the ±300 s window, so this bounds sustained
/// signed traffic at about 3,300 requests/s (past it the server answers 503 rather than forget a
/// nonce inside its window); worst-case memory is on the order of 100 MiB.
pub const REPLAY_CAPACITY: usize = 1_000_000;

/// The agent unauthenticated loopback callers become under `serve --dev`.
pub const DEV_AGENT: &str = "dev";

/// Scope each method needs. Methods not listed need none (`x-crp/whoami`; unknown methods,
/// which the dispatcher answers with -32601).
///
/// | method | scope |
/// |---|---|
/// | `crp/use` | `crp:use` |
/// | `crp/resolve` | `crp:resolve` |
/// | `crp/lease` | `crp:lease` |
/// | `crp/revoke` | `crp:revoke` |
/// | `crp/list` | `crp:list` |
/// | `x-crp/vault.store` | `vault:store` |
/// | `x-crp/vault.retrieve` | `vault:retrieve` |
/// | `x-crp/vault.delete` | `vault:delete` |
/// | `x-crp/vault.list` | `vault:list` |
/// | `x-crp/policy.check` | `policy:check` |
/// | `x-crp/audit.query` | `audit:read` |
pub fn required_scope(method: &str) -> Option<&'static str> {
    use crp_core::methods as m;
    use crp_core::types::ext as x;
    Some(match method {
        m::USE => "crp:use",
        m::RESOLVE => "crp:resolve",
        m::LEASE => "crp:lease",
        m::REVOKE => "crp:revoke",
        m::LIST => "crp:list",
        x::VAULT_STORE => "vault:store",
        x::VAULT_RETRIEVE => "vault:retrieve",
        x::VAULT_DELETE => "vault:delete",
        x::VAULT_LIST => "vault:list",
        x::POLICY_CHECK => "policy:check",
        x::AUDIT_QUERY => "audit:read",
        _ => return None,
    })
}

/// Whether `held` grants `needed` (exact, `*`, or `prefix:*`).
pub fn scope_granted(held: &[String], needed: &str) -> bool {
    held.iter().any(|h| {
        h == needed
            || h == "*"
            || h.strip_suffix(":*").is_some_and(|p| needed.split_once(':').is_some_and(|(np, _)| np == p))
    })
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Agent id (what policy sees as the principal).
    pub agent: String,
    /// Scopes the agent holds.
    pub scopes: Vec<String>,
    /// The unauthenticated loopback caller of `serve --dev`.
    pub dev: bool,
}

/// An authentication or authorization refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthError {
    /// 401, 403 or 503.
    pub status: StatusCode,
    /// `auth_failure`, `scope` or `unavailable`.
    pub kind: &'static str,
    /// The full message, e.g. `auth_failure: bad signature`.
    pub message: String,
}

impl AuthError {
    fn auth(reason: impl AsRef<str>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            kind: "auth_failure",
            message: format!("auth_failure: {}", reason.as_ref()),
        }
    }

    /// 403 `scope: missing required scope <s>`.
    pub fn scope(scope: &str) -> Self {
        Self { status: StatusCode::FORBIDDEN, kind: "scope", message: format!("scope: missing required scope {scope}") }
    }

    fn unavailable(msg: &str) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, kind: "unavailable", message: msg.into() }
    }
}

/// Nonces seen within the window.
pub struct ReplayCache {
    inner: Mutex<ReplayInner>,
    capacity: usize,
}

struct ReplayInner {
    seen: HashMap<(String, String), i64>,
    order: VecDeque<(i64, String, String)>,
}

/// What [`ReplayCache::record`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// First time: recorded.
    Fresh,
    /// Seen before.
    Replayed,
    /// The cache is full of unexpired nonces.
    Full,
}

impl ReplayCache {
    /// A cache holding at most `capacity` nonces.
    pub fn new(capacity: usize) -> Self {
        Self { inner: Mutex::new(ReplayInner { seen: HashMap::new(), order: VecDeque::new() }), capacity }
    }

    /// Number of nonces held.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.seen.len()).unwrap_or(0)
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Record `(agent, nonce)` signed at `timestamp`, now being `now` (unix seconds). The
    /// entry lives until `timestamp + window` has passed.
    pub fn record(&self, agent: &str, nonce: &str, timestamp: i64, now: i64) -> Replay {
        let Ok(mut inner) = self.inner.lock() else {
            return Replay::Full;
        };
        // Expire in insertion order (expiry times are close to insertion times; an entry
        // whose expiry is later than its successors just lives a little longer).
        while let Some((exp, _, _)) = inner.order.front() {
            if *exp >= now {
                break;
            }
            if let Some((exp, a, n)) = inner.order.pop_front()
                && inner.seen.get(&(a.clone(), n.clone())) == Some(&exp)
            {
                inner.seen.remove(&(a, n));
            }
        }
        let key = (agent.to_string(), nonce.to_string());
        if inner.seen.contains_key(&key) {
            return Replay::Replayed;
        }
        if inner.seen.len() >= self.capacity {
            // Drop entries that expired out of order before giving up.
            inner.seen.retain(|_, exp| *exp >= now);
            let seen = &inner.seen;
            let kept: VecDeque<_> =
                inner.order.iter().filter(|(e, a, n)| seen.get(&(a.clone(), n.clone())) == Some(e)).cloned().collect();
            inner.order = kept;
            if inner.seen.len() >= self.capacity {
                return Replay::Full;
            }
        }
        let exp = timestamp.max(now) + signing::WINDOW_SECONDS + 1;
        inner.seen.insert(key.clone(), exp);
        inner.order.push_back((exp, key.0, key.1));
        Replay::Fresh
    }
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Verifies signed requests against the agents a [`Backend`] knows.
#[derive(Clone)]
pub struct Authenticator {
    backend: Arc<dyn Backend>,
    replay: Arc<ReplayCache>,
    dev: bool,
    keys: Arc<KeyCache>,
}

/// Agents' public keys, decoded: base64 → Ed25519 point (decompressing the point is a field
/// exponentiation, a few percent of a request). The mapping is a pure function of the stored
/// text, so nothing can make an entry stale; only keys of known agents (read from the vault)
/// are ever parsed. A full map starts over.
struct KeyCache(Mutex<HashMap<String, VerifyingKey>>);

/// Decoded public keys kept at once.
const KEY_CACHE_ENTRIES: usize = 4096;

impl KeyCache {
    fn parse(&self, b64: &str) -> Result<VerifyingKey, String> {
        if let Ok(m) = self.0.lock()
            && let Some(k) = m.get(b64)
        {
            return Ok(*k);
        }
        let key = signing::parse_public_key(b64)?;
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= KEY_CACHE_ENTRIES {
                m.clear();
            }
            m.insert(b64.to_string(), key);
        }
        Ok(key)
    }
}

/// The parts of a request the signature covers.
pub struct SignedParts<'a> {
    /// Method.
    pub method: &'a Method,
    /// Request URI (path and query are signed).
    pub uri: &'a Uri,
    /// Headers (`Host`, `X-CRP-*`).
    pub headers: &'a HeaderMap,
    /// The exact body.
    pub body: &'a [u8],
    /// Peer address.
    pub peer: Option<SocketAddr>,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, AuthError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.trim())).map_err(|_| AuthError::auth(format!("malformed {name} header"))),
    }
}

impl Authenticator {
    /// An authenticator; `dev` enables the unauthenticated loopback caller.
    pub fn new(backend: Arc<dyn Backend>, dev: bool) -> Self {
        Self {
            backend,
            replay: Arc::new(ReplayCache::new(REPLAY_CAPACITY)),
            dev,
            keys: Arc::new(KeyCache(Mutex::new(HashMap::new()))),
        }
    }

    /// The replay cache (for metrics and tests).
    pub fn replay_cache(&self) -> &ReplayCache {
        &self.replay
    }

    /// Authenticate a request; see the module docs for the order of checks.
    pub async fn authenticate(&self, req: &SignedParts<'_>) -> Result<Caller, AuthError> {
        let agent_id = header(req.headers, signing::HEADER_AGENT)?;
        let Some(agent_id) = agent_id.filter(|a| !a.is_empty()) else {
            if self.dev && req.peer.is_some_and(|p| p.ip().is_loopback()) {
                return Ok(Caller { agent: DEV_AGENT.into(), scopes: vec!["*".into()], dev: true });
            }
            return Err(AuthError::auth("missing X-CRP-Agent header (sign requests with the agent's Ed25519 key)"));
        };
        if agent_id.len() > 256 {
            return Err(AuthError::auth("agent not found"));
        }
        let agent = self
            .backend
            .agent(agent_id)
            .await
            .map_err(|_| AuthError::unavailable("agent lookup failed"))?
            .ok_or_else(|| AuthError::auth("agent not found"))?;
        match agent.status {
            AgentStatus::Pending => return Err(AuthError::auth("agent is pending")),
            AgentStatus::Disabled => return Err(AuthError::auth("agent is disabled")),
            AgentStatus::Active => {}
        }
        let ts = header(req.headers, signing::HEADER_TIMESTAMP)?
            .ok_or_else(|| AuthError::auth("missing X-CRP-Timestamp header"))?;
        let ts: i64 = ts.parse().map_err(|_| AuthError::auth("timestamp out of window"))?;
        let now = unix_now();
        if ts.abs_diff(now) > signing::WINDOW_SECONDS as u64 {
            return Err(AuthError::auth("timestamp out of window"));
        }
        let nonce =
            header(req.headers, signing::HEADER_NONCE)?.ok_or_else(|| AuthError::auth("missing X-CRP-Nonce header"))?;
        let sig = header(req.headers, signing::HEADER_SIGNATURE)?
            .ok_or_else(|| AuthError::auth("missing X-CRP-Signature header"))?;
        let host = header(req.headers, "host")?
            .map(str::to_string)
            .or_else(|| req.uri.authority().map(|a| a.as_str().to_string()))
            .ok_or_else(|| AuthError::auth("missing Host header"))?;
        let path_and_query = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let key = self.keys.parse(&agent.public_key).map_err(|_| AuthError::auth("bad signature"))?;
        let canonical = signing::canonical_string(req.method.as_str(), &host, path_and_query, ts, nonce, req.body);
        signing::verify(&key, &canonical, sig).map_err(|_| AuthError::auth("bad signature"))?;
        if !signing::nonce_is_well_formed(nonce) {
            return Err(AuthError::auth("malformed nonce (16 to 64 base64url characters)"));
        }
        match self.replay.record(&agent.id, nonce, ts, now) {
            Replay::Fresh => {}
            Replay::Replayed => return Err(AuthError::auth("replayed nonce")),
            Replay::Full => return Err(AuthError::unavailable("replay cache full; retry shortly")),
        }
        Ok(Caller { agent: agent.id, scopes: agent.scopes, dev: false })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        let held = vec!["crp:use".to_string(), "vault:*".to_string()];
        assert!(scope_granted(&held, "crp:use"));
        assert!(!scope_granted(&held, "crp:lease"));
        assert!(scope_granted(&held, "vault:store"));
        assert!(!scope_granted(&held, "vaultx:store"));
        assert!(scope_granted(&["*".to_string()], "audit:read"));
        assert_eq!(required_scope("crp/use"), Some("crp:use"));
        assert_eq!(required_scope("x-crp/whoami"), None);
    }

    #[test]
    fn replay_cache_expires_and_bounds() {
        let c = ReplayCache::new(3);
        assert_eq!(c.record("a", "n1", 1000, 1000), Replay::Fresh);
        assert_eq!(c.record("a", "n1", 1000, 1001), Replay::Replayed);
        assert_eq!(c.record("b", "n1", 1000, 1001), Replay::Fresh);
        assert_eq!(c.record("a", "n2", 1000, 1001), Replay::Fresh);
        assert_eq!(c.record("a", "n3", 1000, 1001), Replay::Full);
        // After the window, old entries go and there is room again.
        let later = 1000 + signing::WINDOW_SECONDS + 10;
        assert_eq!(c.record("a", "n3", later, later), Replay::Fresh);
        assert_eq!(c.len(), 1);
        // A nonce is remembered as long as its timestamp is inside the window.
        assert_eq!(c.record("a", "n3", later, later + signing::WINDOW_SECONDS), Replay::Replayed);
    }
}
