//! The catalog: one module per spec area, each case a small value with its requirement and
//! its check. [`all`] lists them in run order.
//!
//! Cases only talk to the provider through [`Ctx`]; they never assume anything of a provider
//! beyond the protocol, the fixtures and the transport.

use std::future::Future;
use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::catalog::{Case, CaseFuture, CaseResult, Stop};
use crate::ctx::RpcError;

pub mod audit;
pub mod jsonrpc;
pub mod secrecy;
pub mod v01;
pub mod v02_broker;
pub mod v02_capability;
pub mod v02_delegation;
pub mod v02_lease;
pub mod v02_list;
pub mod v02_outcomes;
pub mod v02_proxy;
pub mod v02_revoke;
pub mod v02_use;
pub mod version;

/// Every case, in run order.
pub fn all() -> Vec<Case> {
    let mut v = vec![];
    v.extend(v02_capability::cases());
    v.extend(version::cases());
    v.extend(jsonrpc::cases());
    v.extend(v02_use::cases());
    v.extend(v02_proxy::cases());
    v.extend(v02_lease::cases());
    v.extend(v02_revoke::cases());
    v.extend(v02_list::cases());
    v.extend(v02_delegation::cases());
    v.extend(v02_broker::cases());
    v.extend(v02_outcomes::cases());
    v.extend(secrecy::cases());
    v.extend(audit::cases());
    v.extend(v01::cases());
    v
}

/// Box a case future.
pub fn bx<F: Future<Output = CaseResult> + Send + 'static>(f: F) -> CaseFuture {
    Box::pin(f)
}

/// Parse an RFC 3339 instant.
pub fn instant(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

/// Now.
pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// Seconds from now until `s` (negative when past).
pub fn secs_until(s: &str) -> Option<f64> {
    instant(s).map(|t| (t - now()).as_seconds_f64())
}

/// A random hex string of `n` bytes.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

/// A lease id that certainly does not exist, shaped like `like` when given.
pub fn bogus_lease_id(like: Option<&str>) -> String {
    match like {
        Some(l) if l.len() >= 8 => {
            // Same length and alphabet class, different content.
            let hexish = l.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
            let mut s: String = l
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { if hexish { 'f' } else { 'Z' } } else { c })
                .collect();
            let tail = random_hex(4);
            s.replace_range(s.len() - 8.., &tail);
            s
        }
        _ => format!("crp-conformance-no-such-lease-{}", random_hex(16)),
    }
}

/// Describe an error for evidence.
pub fn describe(e: &RpcError) -> String {
    format!("{} `{}`", e.code, e.message)
}

/// The estimated random bits of a set of lease ids: the common prefix and suffix are removed,
/// the remaining characters' alphabet is guessed (decimal, hex, base32, base64url, other), and
/// fixed positions (same character in every id) are discounted.
pub fn estimate_bits(ids: &[String]) -> f64 {
    if ids.is_empty() {
        return 0.0;
    }
    let first = ids[0].as_bytes();
    let mut prefix = first.len();
    let mut suffix = first.len();
    for id in &ids[1..] {
        let b = id.as_bytes();
        prefix = prefix.min(first.iter().zip(b).take_while(|(a, c)| a == c).count());
        suffix = suffix.min(first.iter().rev().zip(b.iter().rev()).take_while(|(a, c)| a == c).count());
    }
    let mut bits = 0.0;
    for id in ids {
        let b = id.as_bytes();
        let end = b.len().saturating_sub(suffix).max(prefix);
        let body = &b[prefix.min(b.len())..end.min(b.len())];
        // Positions that never vary (e.g. UUID dashes and version nibble) carry nothing.
        let varying: Vec<u8> = body
            .iter()
            .enumerate()
            .filter(|(i, c)| ids.iter().any(|o| o.as_bytes().get(prefix + i) != Some(c)))
            .map(|(_, c)| *c)
            .collect();
        let all = |f: fn(&u8) -> bool| varying.iter().all(f);
        let per_char = if all(|c| c.is_ascii_digit()) {
            10f64.log2()
        } else if all(|c| c.is_ascii_hexdigit()) {
            4.0
        } else if all(|c| c.is_ascii_uppercase() || (b'2'..=b'7').contains(c))
            || all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(c))
        {
            5.0
        } else if all(|c| c.is_ascii_alphanumeric()) {
            62f64.log2()
        } else {
            6.0
        };
        let b = varying.len() as f64 * per_char;
        bits = if bits == 0.0 { b } else { f64::min(bits, b) };
    }
    bits
}

/// Wait until `expires_at` (RFC 3339) has passed plus `extra`, at most `cap`.
pub async fn sleep_past(expires_at: Option<&str>, fallback_ttl: u64, extra: Duration, cap: Duration) {
    let wait = expires_at
        .and_then(secs_until)
        .map(|s| Duration::from_secs_f64(s.max(0.0)))
        .unwrap_or(Duration::from_secs(fallback_ttl));
    tokio::time::sleep((wait + extra).min(cap)).await;
}

/// Require that a reply is an error, and that it carries no result.
pub fn refused(r: &crate::ctx::Rpc, what: &str) -> Result<RpcError, Stop> {
    if r.result().is_some() {
        return Err(Stop::Fail(format!("{what}: the provider returned a result (a handle) instead of refusing")));
    }
    r.expect_error(what)
}

/// Whether a JSON value mentions `needle` anywhere (string values only).
pub fn mentions(v: &Value, needle: &str) -> bool {
    match v {
        Value::String(s) => s.contains(needle),
        Value::Array(a) => a.iter().any(|x| mentions(x, needle)),
        Value::Object(o) => o.values().any(|x| mentions(x, needle)),
        _ => false,
    }
}

/// Whether an HTTP status means "refused".
pub fn is_refusal(status: u16) -> bool {
    (400..500).contains(&status)
}

/// Check a proxied request was refused and never reached the upstream.
pub fn proxy_refused(resp: &crate::ctx::ProxyResp, after: &str) -> CaseResult {
    if let Some(a) = &resp.arrival {
        return Err(Stop::Fail(format!(
            "{after}, a request through the proxy still reached the upstream ({} {}) with HTTP {}",
            a.method, a.path, resp.status
        )));
    }
    if !is_refusal(resp.status) {
        return Err(Stop::Fail(format!("{after}, the proxy answered HTTP {} (expected 401/403/404/410)", resp.status)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_estimates() {
        let hex32: Vec<String> = (0..8).map(|_| format!("lease-{}", random_hex(16))).collect();
        assert!(estimate_bits(&hex32) >= 120.0, "{}", estimate_bits(&hex32));
        let short: Vec<String> = (0..8).map(|_| format!("lease-{}", random_hex(4))).collect();
        assert!(estimate_bits(&short) < 64.0);
        let uuids: Vec<String> = (0..8)
            .map(|_| {
                let h = random_hex(16);
                format!("{}-{}-4{}-a{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
            })
            .collect();
        assert!(estimate_bits(&uuids) < 128.0, "{}", estimate_bits(&uuids));
        let counters: Vec<String> = (0..8).map(|i| format!("lease-{i}")).collect();
        assert!(estimate_bits(&counters) < 8.0);
    }

    #[test]
    fn bogus_ids_differ() {
        let l = format!("lease-{}", random_hex(16));
        let b = bogus_lease_id(Some(&l));
        assert_ne!(b, l);
        assert_eq!(b.len(), l.len());
    }

    #[test]
    fn ids_are_unique_and_stable() {
        let cases = all();
        let mut ids: Vec<&str> = cases.iter().map(|c| c.meta.id).collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "duplicate case ids");
        for c in &cases {
            assert!(c.meta.id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)), "{}", c.meta.id);
            assert!(c.meta.section.starts_with('§'), "{}", c.meta.id);
        }
    }
}
