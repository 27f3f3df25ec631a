//! The injecting reverse proxy: `ANY /api/v1/proxy/t/{leaseId}/{rest}`.
//!
//! For each request:
//! 1. The session token from `crp/use` is taken from `Authorization: Bearer`, `x-api-key` or
//!    `api-key` (missing: 401). The vault checks it and the lease on every request, against
//!    the database (`Backend::proxy_grant`): unknown lease 404, bad token 401, released or
//!    revoked 403, expired 410, each as `{"error": code, "message": ...}`.
//! 2. The upstream URL is the credential's base URL + `/{rest}` + the query, and must stay
//!    under that base ([`egress::upstream_url`]); literal IPs and resolved names pass the
//!    egress guard ([`egress`]), unless the credential allows the host (403 `egress_denied`).
//! 3. Request headers: hop-by-hop headers, `Host`, the session token and every other
//!    credential-looking header the caller sent ([`STRIPPED_REQUEST_HEADERS`], any `x-crp-*`)
//!    are removed; `Accept-Encoding: identity` is sent so echoes stay redactable; then the
//!    credential is injected by its rule (header with prefix, query parameter, or Basic).
//! 4. The request body streams to the upstream ([`super::upstream`]: hyper-util's pooled client,
//!    HTTP/1.1 or HTTP/2, TLS via rustls, redirects never followed). Brokered credentials: when the upstream answers
//!    401 the vault re-mints the token and the request is sent once more, but only if the
//!    body could be kept: no body, or a Content-Length of at most `retry_buffer_bytes`
//!    (64 KiB); a streamed body is not retried and the 401 goes back to the caller.
//! 5. The response streams back with hop-by-hop headers and `Set-Cookie` removed and every
//!    form of the secret replaced by `[REDACTED]` in headers and body ([`redact`]). Bodies
//!    with a Content-Length up to `redact_buffer_bytes` are redacted whole and get an exact
//!    Content-Length; larger or unknown-length bodies stream without one.
//!    Refusals on a lease that is over (released, revoked, expired; the token was right) are
//!    audited too, with their status; unknown leases and wrong tokens are not.
//! 6. `credential.used` is audited with the lease, method, path (query names, no values),
//!    status, byte counts and duration once the response body has been read to the end, or
//!    failed, and before the last chunk is released to the caller; an audit failure cuts the
//!    response (fail closed). A caller that disconnects early is audited in the background.
//!
//! Errors never carry a transport error's text: it may include the URL, which may carry a
//! query-injected secret.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use crp_core::SecretValue;
use crp_core::types::ext::InjectionRule;
use futures_util::{Stream, StreamExt};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Limited};

use super::backend::{Backend, ProxyAuditRecord, ProxyGrant};
use super::egress::{self, Allowance};
use super::metrics::Metrics;
use super::redact::{self, Redactor, percent_encode};
use super::upstream::SendError;
use super::{AppState, PROXY_PREFIX, json_error};

/// Request headers never forwarded: they could carry the caller's own credentials (or the
/// session token), or are hop-by-hop. Any header starting with `x-crp-` is removed as well.
pub const STRIPPED_REQUEST_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "x-auth-token",
    "x-access-token",
    "private-token",
    "x-goog-api-key",
    "x-amz-security-token",
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "accept-encoding",
];

/// Response headers never returned.
const STRIPPED_RESPONSE_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "set-cookie",
    "proxy-authenticate",
];

/// The session token the caller presented, if any.
pub fn session_token(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if let Some((scheme, tok)) = v.split_once(' ')
            && scheme.eq_ignore_ascii_case("bearer")
            && !tok.trim().is_empty()
        {
            return Some(tok.trim().to_string());
        }
    }
    for name in ["x-api-key", "api-key"] {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok())
            && !v.trim().is_empty()
        {
            return Some(v.trim().to_string());
        }
    }
    None
}

/// Whether a request header must not be forwarded.
pub fn is_stripped_request_header(name: &HeaderName, connection_listed: &[String]) -> bool {
    let n = name.as_str();
    STRIPPED_REQUEST_HEADERS.contains(&n) || n.starts_with("x-crp-") || connection_listed.iter().any(|c| c == n)
}

fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}


fn decode_component(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The caller's query without any parameter named `name` (compared decoded), then
/// `name=<encoded secret>` appended. Other parameters keep their exact spelling.
fn query_with_injected(query: Option<&str>, name: &str, secret: &str) -> String {
    let mut parts: Vec<&str> = query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| decode_component(p.split_once('=').map(|(k, _)| k).unwrap_or(p)) != name)
        .collect();
    let injected = format!("{}={}", percent_encode(name), percent_encode(secret));
    parts.push(&injected);
    parts.join("&")
}

/// The audited path: `/{rest}` plus the query's parameter names, never their values.
fn audit_path(rest: &str, query: Option<&str>) -> String {
    let mut p = format!("/{rest}");
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        let names: Vec<&str> =
            q.split('&').filter(|s| !s.is_empty()).map(|s| s.split_once('=').map(|(k, _)| k).unwrap_or(s)).collect();
        p.push('?');
        p.push_str(&names.join("&"));
    }
    p.chars().take(2048).collect()
}

/// Headers for the upstream request, credential injected.
fn upstream_headers(caller: &HeaderMap, grant_rule: &InjectionRule, secret: &SecretValue) -> Result<HeaderMap, String> {
    let listed = connection_listed(caller);
    let mut out = HeaderMap::with_capacity(caller.len() + 2);
    for (name, value) in caller {
        if !is_stripped_request_header(name, &listed) {
            out.append(name.clone(), value.clone());
        }
    }
    out.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    match grant_rule {
        InjectionRule::Header { name, prefix } => {
            let hn = HeaderName::from_bytes(name.as_bytes()).map_err(|_| "the injection header name is invalid")?;
            let v = if prefix.trim().is_empty() {
                secret.expose().to_string()
            } else {
                format!("{} {}", prefix.trim(), secret.expose())
            };
            let mut hv = HeaderValue::from_str(&v).map_err(|_| "the credential cannot be sent in a header")?;
            hv.set_sensitive(true);
            out.remove(&hn);
            out.insert(hn, hv);
        }
        InjectionRule::Basic => {
            let mut hv = HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(secret.expose().as_bytes())))
                .map_err(|_| "the credential cannot be sent in a header")?;
            hv.set_sensitive(true);
            out.insert(header::AUTHORIZATION, hv);
        }
        InjectionRule::Query { .. } => {}
    }
    Ok(out)
}

fn upstream_url_for(grant: &ProxyGrant, rest: &str, query: Option<&str>, secret: &SecretValue) -> Result<reqwest::Url, (StatusCode, &'static str, String)> {
    let q = match &grant.injection {
        InjectionRule::Query { name } => Some(query_with_injected(query, name, secret.expose())),
        _ => query.map(str::to_string),
    };
    egress::upstream_url(&grant.upstream, rest, q.as_deref()).map_err(|m| {
        if m.starts_with("the credential's") {
            (StatusCode::BAD_GATEWAY, "bad_upstream", m)
        } else {
            (StatusCode::BAD_REQUEST, "bad_path", m)
        }
    })
}

/// The checked URL as the URI the client sends to: the same string, so the host the egress
/// guard saw is the host the connection goes to.
fn upstream_uri(url: &reqwest::Url) -> Result<http::Uri, (StatusCode, &'static str, String)> {
    http::Uri::try_from(url.as_str()).map_err(|_| (StatusCode::BAD_REQUEST, "bad_path", "the request path is not valid".to_string()))
}

/// Everything `credential.used` needs, filled in as the exchange proceeds. Dropping it
/// unfinished (caller went away) audits in the background.
struct AuditGuard {
    backend: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
    rec: Option<ProxyAuditRecord>,
    bytes_in: Arc<AtomicU64>,
    started: Instant,
}

impl AuditGuard {
    fn take(&mut self, bytes_out: u64, redactions: u64) -> Option<ProxyAuditRecord> {
        let mut rec = self.rec.take()?;
        rec.bytes_in = self.bytes_in.load(Ordering::Relaxed);
        rec.bytes_out = bytes_out;
        rec.duration_us = self.started.elapsed().as_micros() as u64;
        self.metrics.bytes(rec.bytes_in, rec.bytes_out);
        self.metrics.redactions(redactions);
        Some(rec)
    }

    async fn finish(&mut self, bytes_out: u64, redactions: u64) -> Result<(), String> {
        match self.take(bytes_out, redactions) {
            Some(rec) => {
                self.metrics.audit_started();
                let r = self.backend.audit_proxy(rec).await;
                self.metrics.audit_finished();
                r
            }
            None => Ok(()),
        }
    }
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        if let Some(rec) = self.take(0, 0) {
            let backend = self.backend.clone();
            let metrics = self.metrics.clone();
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                metrics.audit_started();
                h.spawn(async move {
                    if let Err(e) = backend.audit_proxy(rec).await {
                        tracing::error!("audit of an interrupted proxied request failed: {e}");
                    }
                    metrics.audit_finished();
                });
            }
        }
    }
}

/// Body of the caller's request for the upstream: kept whole (retryable) or streamed.
enum OutBody {
    Kept(Bytes),
    Streamed(Option<Body>),
}

impl OutBody {
    fn take(&mut self) -> Body {
        match self {
            OutBody::Kept(b) => Body::from(b.clone()),
            OutBody::Streamed(b) => b.take().unwrap_or_else(Body::empty),
        }
    }
    fn retryable(&self) -> bool {
        matches!(self, OutBody::Kept(_))
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// The proxy handler.
pub(crate) async fn handle(State(st): State<AppState>, req: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let after = parts.uri.path().strip_prefix(PROXY_PREFIX).unwrap_or("");
    let (lease_id, rest) = after.split_once('/').unwrap_or((after, ""));
    if lease_id.is_empty() || lease_id.len() > 256 {
        st.metrics.proxy_outcome("denied");
        return json_error(StatusCode::NOT_FOUND, "lease_not_found", "no lease id in the proxy URL");
    }
    let Some(token) = session_token(&parts.headers) else {
        st.metrics.proxy_outcome("denied");
        return json_error(
            StatusCode::UNAUTHORIZED,
            "missing_session_token",
            "send the lease's sessionToken as `Authorization: Bearer <token>`, `x-api-key` or `api-key`",
        );
    };
    let grant = match st.backend.proxy_grant(lease_id, &token).await {
        Ok(g) => g,
        Err(d) => {
            st.metrics.proxy_outcome("denied");
            let status = StatusCode::from_u16(d.status).unwrap_or(StatusCode::FORBIDDEN);
            // The lease exists and the token was right, but the lease is over: record the
            // attempt (the vault checks the token before the lease state).
            if matches!(d.code, "lease_revoked" | "lease_released" | "lease_expired") {
                let path = audit_path(rest, parts.uri.query());
                if let Err(e) = st.backend.audit_proxy_refused(lease_id, parts.method.as_str(), &path, d.status).await {
                    tracing::error!("audit of a refused proxied request failed: {e}");
                }
            }
            return json_error(status, d.code, &d.message);
        }
    };
    drop(token);
    let query = parts.uri.query();
    let bytes_in = Arc::new(AtomicU64::new(0));
    let mut guard = AuditGuard {
        backend: st.backend.clone(),
        metrics: st.metrics.clone(),
        rec: Some(ProxyAuditRecord {
            lease_id: grant.lease_id.clone(),
            agent: grant.agent.clone(),
            key: grant.key.clone(),
            method: parts.method.as_str().to_string(),
            path: audit_path(rest, query),
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            duration_us: 0,
        }),
        bytes_in: bytes_in.clone(),
        started,
    };
    let set_status = |g: &mut AuditGuard, s: u16| {
        if let Some(r) = g.rec.as_mut() {
            r.status = s;
        }
    };
    // Refusals after the grant are audited too, then answered.
    macro_rules! refuse {
        ($status:expr, $code:expr, $msg:expr, $outcome:expr) => {{
            let status: StatusCode = $status;
            set_status(&mut guard, status.as_u16());
            st.metrics.proxy_outcome($outcome);
            if let Err(e) = guard.finish(0, 0).await {
                tracing::error!("audit failed: {e}");
                return json_error(StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable", "the audit log is unavailable");
            }
            return json_error(status, $code, $msg);
        }};
    }

    let allowance = Allowance::new(&grant.allowed_private_hosts);
    let mut secret = grant.secret.clone();
    let url = match upstream_url_for(&grant, rest, query, &secret) {
        Ok(u) => u,
        Err((s, code, m)) => refuse!(s, code, &m, "denied"),
    };
    if let Err(d) = egress::check_literal(&url, &allowance) {
        refuse!(StatusCode::FORBIDDEN, "egress_denied", &d.to_string(), "egress_denied");
    }
    let mut uri = match upstream_uri(&url) {
        Ok(u) => u,
        Err((s, code, m)) => refuse!(s, code, &m, "denied"),
    };
    drop(url);
    let client = match st.clients.get(&allowance) {
        Ok(c) => c,
        Err(m) => refuse!(StatusCode::BAD_GATEWAY, "upstream_client", &m, "upstream_error"),
    };
    let mut headers = match upstream_headers(&parts.headers, &grant.injection, &secret) {
        Ok(h) => h,
        Err(m) => refuse!(StatusCode::BAD_GATEWAY, "bad_injection", &m, "denied"),
    };

    // The body: kept when a brokered retry may need it again, streamed otherwise.
    let declared = content_length(&parts.headers);
    let has_body = declared.is_some_and(|n| n > 0) || parts.headers.contains_key(header::TRANSFER_ENCODING);
    let mut out_body = if grant.brokered
        && (!has_body || declared.is_some_and(|n| n <= st.cfg.retry_buffer_bytes as u64))
    {
        match Limited::new(body, st.cfg.retry_buffer_bytes).collect().await {
            Ok(c) => {
                let b = c.to_bytes();
                bytes_in.store(b.len() as u64, Ordering::Relaxed);
                OutBody::Kept(b)
            }
            Err(_) => refuse!(StatusCode::BAD_REQUEST, "bad_body", "the request body could not be read", "denied"),
        }
    } else if !has_body {
        OutBody::Kept(Bytes::new())
    } else {
        let counter = bytes_in.clone();
        let counted = body.map_frame(move |f| {
            if let Some(b) = f.data_ref() {
                counter.fetch_add(b.len() as u64, Ordering::Relaxed);
            }
            f
        });
        OutBody::Streamed(Some(Body::new(counted)))
    };
    if let OutBody::Kept(b) = &out_body {
        // A kept body has an exact length; keep Content-Length consistent with it.
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
        if b.is_empty() && declared.is_none() {
            headers.remove(header::CONTENT_LENGTH);
        }
    }

    let method = parts.method.clone();
    let mut patterns = redact::patterns_for(&secret, &grant.injection);
    let mut attempt = 0;
    let resp = loop {
        attempt += 1;
        let mut req = http::Request::new(out_body.take());
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri.clone();
        *req.headers_mut() = headers.clone();
        let resp = match client.send(req).await {
            Ok(r) => r,
            Err(SendError::Egress(d)) => refuse!(StatusCode::FORBIDDEN, "egress_denied", &d.to_string(), "egress_denied"),
            Err(SendError::Timeout) => refuse!(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the upstream did not answer in time",
                "upstream_error"
            ),
            Err(SendError::Connect) => {
                refuse!(StatusCode::BAD_GATEWAY, "upstream_unreachable", "cannot connect to the upstream", "upstream_error")
            }
            Err(SendError::Exchange) => {
                refuse!(StatusCode::BAD_GATEWAY, "upstream_unreachable", "the upstream exchange failed", "upstream_error")
            }
        };
        if resp.status() == StatusCode::UNAUTHORIZED && grant.brokered && out_body.retryable() && attempt == 1 {
            match st.backend.broker_refresh(&grant.lease_id).await {
                Ok(fresh) => {
                    secret = fresh;
                    patterns.extend(redact::patterns_for(&secret, &grant.injection));
                    patterns.sort_by_key(|p| std::cmp::Reverse(p.len()));
                    uri = match upstream_url_for(&grant, rest, query, &secret).and_then(|u| upstream_uri(&u)) {
                        Ok(u) => u,
                        Err((s, code, m)) => refuse!(s, code, &m, "denied"),
                    };
                    headers = match upstream_headers(&parts.headers, &grant.injection, &secret) {
                        Ok(mut h) => {
                            if let Some(cl) = headers.get(header::CONTENT_LENGTH).cloned() {
                                h.insert(header::CONTENT_LENGTH, cl);
                            }
                            h
                        }
                        Err(m) => refuse!(StatusCode::BAD_GATEWAY, "bad_injection", &m, "denied"),
                    };
                    continue;
                }
                Err(d) => {
                    tracing::warn!(lease = %grant.lease_id, code = d.code, "broker refresh after 401 failed");
                }
            }
        }
        break resp;
    };
    drop(secret);
    st.metrics.observe_latency(started.elapsed());
    st.metrics.proxy_outcome("forwarded");
    let status = resp.status();
    set_status(&mut guard, status.as_u16());

    // Response headers.
    let redactor = Redactor::new(patterns);
    let upstream_len = content_length(resp.headers());
    let mut out_headers = HeaderMap::with_capacity(resp.headers().len());
    let listed = connection_listed(resp.headers());
    let mut header_redactions = 0;
    for (name, value) in resp.headers() {
        let n = name.as_str();
        if STRIPPED_RESPONSE_HEADERS.contains(&n) || listed.iter().any(|c| c == n) || n == "content-length" {
            continue;
        }
        match redactor.redact_value(value.as_bytes()) {
            None => {
                out_headers.append(name.clone(), value.clone());
            }
            Some((cleaned, hits)) => {
                header_redactions += hits;
                if let Ok(v) = HeaderValue::from_bytes(&cleaned) {
                    out_headers.append(name.clone(), v);
                }
            }
        }
    }

    let bodiless = method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut builder = Response::builder().status(status);
    if let Some(h) = builder.headers_mut() {
        *h = out_headers;
    }
    if bodiless {
        if let (Some(n), Some(h)) = (upstream_len, builder.headers_mut())
            && method == Method::HEAD
        {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        if let Err(e) = guard.finish(0, header_redactions).await {
            tracing::error!("audit failed: {e}");
            return json_error(StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable", "the audit log is unavailable");
        }
        return builder.body(Body::empty()).unwrap_or_else(|_| internal());
    }

    if upstream_len.is_some_and(|n| n <= st.cfg.redact_buffer_bytes as u64) {
        // Small body: read it whole (bounded), redact, exact Content-Length.
        let limit = st.cfg.redact_buffer_bytes;
        let collected = Limited::new(resp.into_body(), limit).collect().await;
        let raw = match collected {
            Ok(c) => c.to_bytes(),
            Err(_) => refuse!(StatusCode::BAD_GATEWAY, "upstream_body", "the upstream body could not be read", "upstream_error"),
        };
        let (clean, body_redactions) = redactor.redact_value(&raw).unwrap_or((raw, 0));
        if let Err(e) = guard.finish(clean.len() as u64, header_redactions + body_redactions).await {
            tracing::error!("audit failed: {e}");
            return json_error(StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable", "the audit log is unavailable");
        }
        if let Some(h) = builder.headers_mut() {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(clean.len()));
        }
        return builder.body(Body::from(clean)).unwrap_or_else(|_| internal());
    }

    // Large or unknown length: stream, redacting across chunk boundaries; audit at the end.
    let stream = ResponseStream {
        upstream: Box::pin(resp.into_body().into_data_stream()),
        redactor,
        guard,
        bytes_out: 0,
        extra_redactions: header_redactions,
        done: false,
    };
    builder.body(Body::from_stream(stream.into_stream())).unwrap_or_else(|_| internal())
}

fn internal() -> Response {
    json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "internal error")
}

type UpstreamStream = Pin<Box<dyn Stream<Item = Result<Bytes, Box<dyn std::error::Error + Send + Sync>>> + Send>>;

struct ResponseStream {
    upstream: UpstreamStream,
    redactor: Redactor,
    guard: AuditGuard,
    bytes_out: u64,
    extra_redactions: u64,
    done: bool,
}

impl ResponseStream {
    fn into_stream(self) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        futures_util::stream::unfold(self, |mut s| async move {
            if s.done {
                return None;
            }
            loop {
                match s.upstream.next().await {
                    Some(Ok(chunk)) => {
                        let out = s.redactor.push(&chunk);
                        if out.is_empty() {
                            continue;
                        }
                        s.bytes_out += out.len() as u64;
                        return Some((Ok(out), s));
                    }
                    Some(Err(_)) => {
                        s.done = true;
                        let hits = s.redactor.hits + s.extra_redactions;
                        if let Err(e) = s.guard.finish(s.bytes_out, hits).await {
                            tracing::error!("audit failed: {e}");
                        }
                        return Some((Err(std::io::Error::other("the upstream body failed")), s));
                    }
                    None => {
                        s.done = true;
                        let tail = s.redactor.finish();
                        s.bytes_out += tail.len() as u64;
                        let hits = s.redactor.hits + s.extra_redactions;
                        if let Err(e) = s.guard.finish(s.bytes_out, hits).await {
                            tracing::error!("audit failed: {e}");
                            return Some((Err(std::io::Error::other("the audit log is unavailable")), s));
                        }
                        if tail.is_empty() {
                            return None;
                        }
                        return Some((Ok(tail), s));
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer tok-1"));
        assert_eq!(session_token(&h).as_deref(), Some("tok-1"));
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("bearer   tok-2 "));
        assert_eq!(session_token(&h).as_deref(), Some("tok-2"));
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("tok-3"));
        assert_eq!(session_token(&h).as_deref(), Some("tok-3"));
        let mut h = HeaderMap::new();
        h.insert("api-key", HeaderValue::from_static("tok-4"));
        assert_eq!(session_token(&h).as_deref(), Some("tok-4"));
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert_eq!(session_token(&h), None);
    }

    #[test]
    fn headers_are_stripped_and_injected() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer session"),
            ("x-api-key", "k"),
            ("api-key", "k"),
            ("cookie", "c=1"),
            ("proxy-authorization", "p"),
            ("x-crp-agent", "a"),
            ("x-crp-signature", "s"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("accept", "application/json"),
            ("x-request-id", "r1"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let rule = InjectionRule::Header { name: "Authorization".into(), prefix: "Bearer".into() };
        let out = upstream_headers(&h, &rule, &SecretValue::new("sk-1")).unwrap();
        assert_eq!(out.get("authorization").unwrap(), "Bearer sk-1");
        for gone in ["x-api-key", "api-key", "cookie", "proxy-authorization", "x-crp-agent", "x-crp-signature", "connection", "x-hop"] {
            assert!(out.get(gone).is_none(), "{gone}");
        }
        assert_eq!(out.get("accept").unwrap(), "application/json");
        assert_eq!(out.get("x-request-id").unwrap(), "r1");
        assert_eq!(out.get_all("authorization").iter().count(), 1);

        let out = upstream_headers(&h, &InjectionRule::Basic, &SecretValue::new("u:p")).unwrap();
        assert_eq!(out.get("authorization").unwrap(), "Basic dTpw");
        let out = upstream_headers(&h, &InjectionRule::Header { name: "X-Api-Key".into(), prefix: "".into() }, &SecretValue::new("sk-2")).unwrap();
        assert_eq!(out.get("x-api-key").unwrap(), "sk-2");
        assert!(out.get("authorization").is_none());
    }

    #[test]
    fn query_injection_replaces_the_callers_parameter() {
        assert_eq!(query_with_injected(Some("a=1&key=mine&b=%20x"), "key", "s e/cret"), "a=1&b=%20x&key=s%20e%2Fcret");
        assert_eq!(query_with_injected(None, "api_key", "v"), "api_key=v");
        assert_eq!(query_with_injected(Some("k%65y=x"), "key", "v"), "key=v");
    }

    #[test]
    fn audit_paths_drop_values() {
        assert_eq!(audit_path("v1/items", Some("page=2&token=abc")), "/v1/items?page&token");
        assert_eq!(audit_path("", None), "/");
    }

    #[test]
    fn decode_handles_truncated_escapes() {
        assert_eq!(decode_component("a%2"), "a%2");
        assert_eq!(decode_component("%41%zz+"), "A%zz ");
    }
}
