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

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crp_core::signing;
use ed25519_dalek::VerifyingKey;
use http::{HeaderMap, Method, StatusCode, Uri};

use super::backend::{AgentStatus, Backend};

/// Most nonces remembered at once. A nonce is remembered until its signed timestamp leaves the
/// ±300 s window, so a client with a synchronized clock occupies an entry for about 301 s:
/// this allows about 23,000 signed requests/s sustained (past it the server answers 503 rather
/// than forget a nonce inside its window). An entry costs about 30 bytes with the tables'
/// slack: a full cache measured 217 MiB, and it only grows that large under that load.
pub const REPLAY_CAPACITY: usize = 7_000_000;
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

/// Nonces seen within the window: the replay cache.
///
/// An entry is a 64-bit keyed hash (SipHash with a per-process random key) of (agent, nonce),
/// not the strings: recording a nonce allocates nothing, and an entry is a few bytes. Two
/// different pairs could share a hash with probability about `len / 2^64` per request (under
/// 10^-12 when full); the cost is a spurious `replayed nonce` for the later one, which a client
/// retries with a fresh nonce. A collision never lets a replay through, and without the key
/// nobody can aim for one.
///
/// Expiry is by the second: entries live in a ring of per-second slots keyed by their expiry
/// time, and each second's slot is dropped whole once that second has passed. Every live
/// expiry time lies in `[now, now + 2·window + 1]` (a timestamp is accepted up to one window
/// ahead), so a ring of `2·window + 2` slots never holds two live seconds in one slot.
pub struct ReplayCache {
    inner: Mutex<ReplayInner>,
    capacity: usize,
    keys: RandomState,
}

struct ReplayInner {
    /// Hashes of every remembered (agent, nonce).
    seen: HashSet<u64, BuildHasherDefault<PreHashed>>,
    /// `slots[e % RING]` holds the hashes expiring at second `e`, if `exp == e`.
    slots: Vec<Slot>,
    /// Every slot whose expiry second is below this has been emptied.
    swept_below: i64,
}

#[derive(Default)]
struct Slot {
    exp: i64,
    hashes: Vec<u64>,
}

/// Slots in the ring: one per second an unexpired entry can be due.
const RING: i64 = 2 * signing::WINDOW_SECONDS + 2;

/// The keys of `ReplayInner::seen` are SipHash outputs already; hashing them again buys
/// nothing.
#[derive(Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (the keys are `u64`); fold anything else in all the same.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
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

impl ReplayInner {
    fn empty_slot(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        for h in slot.hashes.drain(..) {
            self.seen.remove(&h);
        }
    }

    /// Drop every entry due before `now`.
    fn sweep(&mut self, now: i64) {
        if now <= self.swept_below {
            return;
        }
        // Seconds not yet swept; after a long idle spell, at most one turn of the ring.
        let from = self.swept_below.max(now - RING);
        for second in from..now {
            let index = second.rem_euclid(RING) as usize;
            if self.slots[index].exp < now {
                self.empty_slot(index);
            }
        }
        self.swept_below = now;
    }
}

impl ReplayCache {
    /// A cache holding at most `capacity` nonces.
    pub fn new(capacity: usize) -> Self {
        let slots = (0..RING).map(|_| Slot::default()).collect();
        Self {
            inner: Mutex::new(ReplayInner { seen: HashSet::default(), slots, swept_below: i64::MIN }),
            capacity,
            keys: RandomState::new(),
        }
    }

    /// Number of nonces held.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.seen.len()).unwrap_or(0)
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Record `(agent, nonce)` signed at `timestamp`, now being `now` (unix seconds); the
    /// caller has checked that `timestamp` is within the window of `now`. The entry lives
    /// until `timestamp` is out of the window: after that a replay is refused by its timestamp.
    pub fn record(&self, agent: &str, nonce: &str, timestamp: i64, now: i64) -> Replay {
        let hash = self.keys.hash_one((agent, nonce));
        let Ok(mut inner) = self.inner.lock() else {
            return Replay::Full;
        };
        inner.sweep(now);
        if inner.seen.contains(&hash) {
            return Replay::Replayed;
        }
        if inner.seen.len() >= self.capacity {
            return Replay::Full;
        }
        // Due after the last second at which `timestamp` passes the window check. Clamped to
        // the ring's live seconds, so that a slot never holds two of them (a timestamp outside
        // the window, which the caller refuses anyway, would otherwise evict a live slot).
        let exp = timestamp.saturating_add(signing::WINDOW_SECONDS + 1).clamp(now, now + RING - 1);
        let index = exp.rem_euclid(RING) as usize;
        if inner.slots[index].exp != exp {
            // The slot holds a second that has passed (two live seconds never share a slot).
            inner.empty_slot(index);
            inner.slots[index].exp = exp;
        }
        inner.slots[index].hashes.push(hash);
        inner.seen.insert(hash);
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

    #[test]
    fn a_timestamp_from_the_future_is_remembered_until_it_leaves_the_window() {
        let w = signing::WINDOW_SECONDS;
        let c = ReplayCache::new(10);
        assert_eq!(c.record("a", "n", 1000 + w, 1000), Replay::Fresh);
        // The window still accepts that timestamp at 1000 + 2w: the nonce must still be known.
        assert_eq!(c.record("a", "n", 1000 + w, 1000 + 2 * w), Replay::Replayed);
        assert_eq!(c.record("a", "other", 1000, 1000 + 2 * w + 2), Replay::Fresh);
        assert_eq!(c.len(), 1, "the future-dated nonce is dropped once its timestamp is out of the window");
    }

    #[test]
    fn after_a_long_idle_spell_everything_expired_is_dropped() {
        let c = ReplayCache::new(100);
        for i in 0..50 {
            assert_eq!(c.record("a", &format!("n{i}"), 1000 + i, 1000 + i), Replay::Fresh);
        }
        let much_later = 1000 + 100 * RING;
        assert_eq!(c.record("a", "n0", much_later, much_later), Replay::Fresh);
        assert_eq!(c.len(), 1);
    }

    /// The capacity is about sustained rate × (window + 1 s): a client with a synchronized
    /// clock at a steady rate never finds the cache full, and the cache does not grow.
    #[test]
    fn a_steady_rate_fits_in_rate_times_the_window() {
        let rate = 150_i64;
        let c = ReplayCache::new((rate * (signing::WINDOW_SECONDS + 2)) as usize);
        let mut most = 0;
        for second in 0..(3 * RING) {
            let now = 10_000 + second;
            for i in 0..rate {
                assert_eq!(c.record("agent", &format!("{now}-{i}"), now, now), Replay::Fresh, "at {now}");
            }
            most = most.max(c.len());
        }
        assert!(most <= (rate * (signing::WINDOW_SECONDS + 2)) as usize, "{most}");
        assert!(most >= (rate * signing::WINDOW_SECONDS) as usize, "{most}");
    }

    proptest::proptest! {
        /// Against a model that keeps every (agent, nonce) with the timestamp it was signed at:
        /// a pair whose first timestamp is still inside the window is always `Replayed`, and a
        /// pair whose timestamp has left the window (by more than a second) is forgotten.
        #[test]
        fn replays_are_refused_exactly_while_their_timestamp_is_in_the_window(
            steps in proptest::collection::vec((0u8..4, 0u8..6, -300i64..=300, 0i64..4, proptest::bool::weighted(0.02)), 1..400)
        ) {
            let w = signing::WINDOW_SECONDS;
            let c = ReplayCache::new(usize::MAX);
            let mut model: HashMap<(u8, u8), i64> = HashMap::new();
            let mut now = 5_000_i64;
            for (agent, nonce, skew, advance, jump) in steps {
                now += if jump { 2 * RING } else { advance };
                let ts = now + skew;
                model.retain(|_, first_ts| *first_ts + w + 1 >= now);
                let expected = if model.contains_key(&(agent, nonce)) { Replay::Replayed } else { Replay::Fresh };
                let got = c.record(&format!("agent{agent}"), &format!("nonce{nonce}"), ts, now);
                proptest::prop_assert_eq!(got, expected);
                model.entry((agent, nonce)).or_insert(ts);
            }
        }
    }
}
