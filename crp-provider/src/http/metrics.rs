//! `GET /metrics`: Prometheus text exposition (format 0.0.4), written by hand.
//!
//! Series:
//! - `crp_http_requests_total{route,status}`: every answered request;
//! - `crp_proxy_requests_total{outcome}`: proxied requests by outcome (`forwarded`, `denied`,
//!   `egress_denied`, `upstream_error`);
//! - `crp_proxy_upstream_latency_seconds` (histogram): from the proxy receiving the request to
//!   the upstream's response headers;
//! - `crp_proxy_bytes_total{direction}`: body bytes sent upstream (`in`) and back (`out`);
//! - `crp_proxy_redactions_total`: echoed secrets replaced;
//! - `crp_leases_active`, `crp_audit_queue_depth`: gauges from the vault;
//! - `crp_audit_commits_total`, `crp_audit_entries_total`: audit transactions this process
//!   committed and the entries they held (entries per commit: how well group commit batches);
//! - `crp_auth_replay_cache_entries`: nonces held.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::backend::Gauges;

/// Histogram bucket upper bounds, seconds.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The server's counters.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    proxy_outcomes: Mutex<BTreeMap<&'static str, u64>>,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    redactions: AtomicU64,
    audit_pending: AtomicU64,
}

impl Metrics {
    /// Count an answered request.
    pub fn request(&self, route: &'static str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route, status)).or_default() += 1;
        }
    }

    /// Count a proxy outcome.
    pub fn proxy_outcome(&self, outcome: &'static str) {
        if let Ok(mut m) = self.proxy_outcomes.lock() {
            *m.entry(outcome).or_default() += 1;
        }
    }

    /// Observe an upstream latency.
    pub fn observe_latency(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            if s <= *le {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Add proxied body bytes.
    pub fn bytes(&self, bytes_in: u64, bytes_out: u64) {
        self.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
    }

    /// Add redactions.
    pub fn redactions(&self, n: u64) {
        self.redactions.fetch_add(n, Ordering::Relaxed);
    }

    /// A proxied-request audit record was handed to the vault.
    pub fn audit_started(&self) {
        self.audit_pending.fetch_add(1, Ordering::Relaxed);
    }

    /// That record is durable (or failed).
    pub fn audit_finished(&self) {
        self.audit_pending.fetch_sub(1, Ordering::Relaxed);
    }

    /// Number of requests counted for `route` with `status`.
    pub fn request_count(&self, route: &str, status: u16) -> u64 {
        self.requests
            .lock()
            .map(|m| m.iter().filter(|((r, s), _)| *r == route && *s == status).map(|(_, n)| *n).sum())
            .unwrap_or(0)
    }

    /// The exposition text.
    pub fn render(&self, gauges: Gauges, replay_entries: usize) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP crp_http_requests_total HTTP requests answered, by route and status.\n");
        out.push_str("# TYPE crp_http_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((route, status), n) in m.iter() {
                let _ = writeln!(out, "crp_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
            }
        }
        out.push_str("# HELP crp_proxy_requests_total Proxied requests by outcome.\n");
        out.push_str("# TYPE crp_proxy_requests_total counter\n");
        if let Ok(m) = self.proxy_outcomes.lock() {
            for (outcome, n) in m.iter() {
                let _ = writeln!(out, "crp_proxy_requests_total{{outcome=\"{outcome}\"}} {n}");
            }
        }
        out.push_str("# HELP crp_proxy_upstream_latency_seconds Time from request to upstream response headers.\n");
        out.push_str("# TYPE crp_proxy_upstream_latency_seconds histogram\n");
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            let n = self.latency_buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "crp_proxy_upstream_latency_seconds_bucket{{le=\"{le}\"}} {n}");
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "crp_proxy_upstream_latency_seconds_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "crp_proxy_upstream_latency_seconds_sum {sum}");
        let _ = writeln!(out, "crp_proxy_upstream_latency_seconds_count {count}");
        out.push_str("# HELP crp_proxy_bytes_total Proxied body bytes (in: to the upstream, out: to the caller).\n");
        out.push_str("# TYPE crp_proxy_bytes_total counter\n");
        let _ = writeln!(out, "crp_proxy_bytes_total{{direction=\"in\"}} {}", self.bytes_in.load(Ordering::Relaxed));
        let _ = writeln!(out, "crp_proxy_bytes_total{{direction=\"out\"}} {}", self.bytes_out.load(Ordering::Relaxed));
        out.push_str("# HELP crp_proxy_redactions_total Echoed secrets replaced in responses.\n");
        out.push_str("# TYPE crp_proxy_redactions_total counter\n");
        let _ = writeln!(out, "crp_proxy_redactions_total {}", self.redactions.load(Ordering::Relaxed));
        if let Some(n) = gauges.leases_active {
            out.push_str("# HELP crp_leases_active Leases neither released, revoked nor expired.\n");
            out.push_str("# TYPE crp_leases_active gauge\n");
            let _ = writeln!(out, "crp_leases_active {n}");
        }
        {
            let n = gauges.audit_queue_depth.unwrap_or_else(|| self.audit_pending.load(Ordering::Relaxed));
            out.push_str("# HELP crp_audit_queue_depth Audit records queued, not yet durable.\n");
            out.push_str("# TYPE crp_audit_queue_depth gauge\n");
            let _ = writeln!(out, "crp_audit_queue_depth {n}");
        }
        if let Some((commits, entries)) = gauges.audit_commits {
            out.push_str("# HELP crp_audit_commits_total Audit transactions committed by this process.\n");
            out.push_str("# TYPE crp_audit_commits_total counter\n");
            let _ = writeln!(out, "crp_audit_commits_total {commits}");
            out.push_str("# HELP crp_audit_entries_total Audit entries written by this process.\n");
            out.push_str("# TYPE crp_audit_entries_total counter\n");
            let _ = writeln!(out, "crp_audit_entries_total {entries}");
        }
        out.push_str("# HELP crp_auth_replay_cache_entries Nonces remembered for replay protection.\n");
        out.push_str("# TYPE crp_auth_replay_cache_entries gauge\n");
        let _ = writeln!(out, "crp_auth_replay_cache_entries {replay_entries}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_series() {
        let m = Metrics::default();
        m.request("crp", 200);
        m.request("crp", 200);
        m.request("proxy", 403);
        m.observe_latency(Duration::from_millis(3));
        let t = m.render(Gauges { leases_active: Some(2), audit_queue_depth: Some(0), audit_commits: Some((3, 7)) }, 5);
        assert!(t.contains("crp_http_requests_total{route=\"crp\",status=\"200\"} 2"), "{t}");
        assert!(t.contains("crp_http_requests_total{route=\"proxy\",status=\"403\"} 1"), "{t}");
        assert!(t.contains("crp_proxy_upstream_latency_seconds_bucket{le=\"0.005\"} 1"), "{t}");
        assert!(t.contains("crp_proxy_upstream_latency_seconds_bucket{le=\"0.0025\"} 0"), "{t}");
        assert!(t.contains("crp_leases_active 2"), "{t}");
        assert!(t.contains("crp_audit_queue_depth 0"), "{t}");
        assert!(t.contains("crp_audit_commits_total 3\n"), "{t}");
        assert!(t.contains("crp_audit_entries_total 7\n"), "{t}");
        assert_eq!(m.request_count("crp", 200), 2);
    }
}
