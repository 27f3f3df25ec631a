//! The injecting proxy end to end: the real server on an ephemeral port over a throwaway
//! vault, an upstream of our own on 127.0.0.1:0, `crp/use` through `POST /crp` (dev mode:
//! the unauthenticated loopback caller is agent `dev`).

mod http_support;

use std::time::Duration;

use base64::Engine;
use http_support::*;
use serde_json::{Value, json};

const SECRET: &str = "sk-live-CANARY-0123456789abcdef";

fn creds(port: u16) -> String {
    format!(
        r#"
[[credential]]
key = "echo/main"
service = "echo"
type = "api_key"
value = "{SECRET}"
upstream = "http://127.0.0.1:{port}"
inject = "header:Authorization:Bearer"
allow_private_hosts = ["127.0.0.1"]
renewable = true
max_ttl = 3600

[[credential]]
key = "echo/query"
service = "echo-query"
value = "q-secret/with space+plus"
upstream = "http://127.0.0.1:{port}/echo"
inject = "query:api_key"
allow_private_hosts = ["127.0.0.1"]

[[credential]]
key = "echo/basic"
service = "echo-basic"
type = "basic_auth"
value = "alice:pa55word-very-long"
upstream = "http://127.0.0.1:{port}/echo"
inject = "basic"
allow_private_hosts = ["127.0.0.1"]

[[credential]]
key = "ssrf/metadata"
service = "ssrf-metadata"
value = "m-secret-value"
upstream = "http://169.254.169.254/latest"

[[credential]]
key = "ssrf/private"
service = "ssrf-private"
value = "p-secret-value"
upstream = "http://10.0.0.1/api"

[[credential]]
key = "ssrf/loopback"
service = "ssrf-loopback"
value = "l-secret-value"
upstream = "http://127.0.0.1:{port}/echo"

[[credential]]
key = "ssrf/localhost-name"
service = "ssrf-localhost"
value = "n-secret-value"
upstream = "http://localhost:{port}/echo"

[[credential]]
key = "ssrf/v6-metadata"
service = "ssrf-v6"
value = "v6-secret-value"
upstream = "http://[fd00:ec2::254]/"

[[credential]]
key = "broker/main"
service = "brokered"
type = "oauth2_client_credentials"
value = "client-secret-XYZ-123"
upstream = "http://127.0.0.1:{port}"
allow_private_hosts = ["127.0.0.1"]
broker = {{ token_url = "http://127.0.0.1:{port}/oauth/token", client_id = "cid" }}
"#
    )
}

struct Env {
    _dir: tempfile::TempDir,
    vault: crp_provider::vault::Vault,
    server: crp_provider::http::RunningServer,
    base: String,
    rec: std::sync::Arc<Recorder>,
}

async fn env() -> Env {
    let (up, rec) = upstream().await;
    let (vault, dir) = vault_with(&creds(up.port())).await;
    let server = serve(&vault, true).await;
    let base = server.base_url();
    Env { _dir: dir, vault, server, base, rec }
}

async fn use_service(base: &str, service: &str, extra: Value) -> (String, String, String) {
    let mut params = json!({ "service": service });
    if let (Some(p), Some(e)) = (params.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            p.insert(k.clone(), v.clone());
        }
    }
    let r = rpc_ok(base, "crp/use", params).await;
    let url = r["proxyBaseUrl"].as_str().expect("proxyBaseUrl").to_string();
    let token = r["sessionToken"].as_str().expect("sessionToken").to_string();
    let lease = r["lease"]["id"].as_str().expect("lease.id").to_string();
    assert!(url.starts_with(&format!("{base}/api/v1/proxy/t/")), "{url}");
    (url, token, lease)
}

#[tokio::test]
async fn use_then_proxy_injects_strips_and_redacts() {
    let e = env().await;
    let (url, token, _lease) = use_service(&e.base, "echo", json!({})).await;
    let resp = client()
        .get(format!("{url}/echo/v1/items?x=1&y=two"))
        .bearer_auth(&token)
        .header("cookie", "caller-session=1")
        .header("proxy-authorization", "Basic Y2FsbGVyOnB3")
        .header("x-crp-agent", "someone")
        .header("x-request-id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("set-cookie").is_none(), "upstream cookies are not returned");
    let echoed_auth = resp.headers().get("x-echo-authorization").unwrap().to_str().unwrap().to_string();
    let body = resp.text().await.unwrap();

    // Upstream: the credential, none of the caller's credentials, the path and query intact.
    let seen = e.rec.last();
    assert_eq!(seen.path_and_query, "/echo/v1/items?x=1&y=two");
    assert_eq!(seen.headers.get("authorization").map(String::as_str), Some(format!("Bearer {SECRET}").as_str()));
    assert_eq!(seen.headers.get("x-request-id").map(String::as_str), Some("req-42"));
    for h in ["cookie", "proxy-authorization", "x-crp-agent", "x-api-key"] {
        assert!(!seen.headers.contains_key(h), "{h} was forwarded");
    }
    assert!(seen.headers.values().all(|v| !v.contains(&token)), "the session token reached the upstream");

    // Caller: the echo came back with the secret replaced, in the body and in headers.
    assert!(!body.contains(SECRET), "secret leaked in body: {body}");
    assert!(body.contains("Bearer [REDACTED]"), "{body}");
    assert_eq!(echoed_auth, "Bearer [REDACTED]");
}

#[tokio::test]
async fn streamed_echo_is_redacted_across_chunks() {
    let e = env().await;
    let (url, token, _) = use_service(&e.base, "echo", json!({})).await;
    let resp = client().get(format!("{url}/stream-echo")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("content-length").is_none());
    let body = resp.text().await.unwrap();
    assert!(!body.contains(SECRET), "secret leaked in a streamed body");
    assert_eq!(body, format!("{}Bearer [REDACTED]{}", "a".repeat(100), "z".repeat(100)));
}

#[tokio::test]
async fn query_and_basic_injection_are_redacted_too() {
    let e = env().await;
    let (url, token, _) = use_service(&e.base, "echo-query", json!({})).await;
    let resp = client().get(format!("{url}/x?a=1&api_key=caller-own")).header("x-api-key", &token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    let seen = e.rec.last();
    assert_eq!(seen.path_and_query, "/echo/x?a=1&api_key=q-secret%2Fwith%20space%2Bplus");
    assert!(!body.contains("q-secret"), "{body}");
    assert!(!seen.headers.contains_key("x-api-key"));

    let (url, token, _) = use_service(&e.base, "echo-basic", json!({})).await;
    let resp = client().post(format!("{url}/b")).header("api-key", &token).body("hello").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode("alice:pa55word-very-long");
    assert_eq!(e.rec.last().headers.get("authorization"), Some(&format!("Basic {b64}")));
    assert_eq!(e.rec.last().body_bytes, 5);
    assert!(!body.contains(&b64) && !body.contains("pa55word-very-long"), "{body}");
}

#[tokio::test]
async fn tokens_are_required_and_checked() {
    let e = env().await;
    let (url, _token, _) = use_service(&e.base, "echo", json!({})).await;
    let r = client().get(format!("{url}/echo")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = client().get(format!("{url}/echo")).bearer_auth("not-the-token").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].is_string() && v["message"].is_string(), "{v}");
    let r = client().get(format!("{}/api/v1/proxy/t/lease-that-does-not-exist/x", e.base)).bearer_auth("t").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(e.rec.count(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn renew_keeps_the_url_and_release_cuts_it() {
    let e = env().await;
    let (url, token, lease) = use_service(&e.base, "echo", json!({ "ttl": 60 })).await;
    let r = rpc_ok(&e.base, "crp/lease", json!({ "action": "renew", "leaseId": lease, "ttl": 120 })).await;
    assert_eq!(r["proxyBaseUrl"].as_str(), Some(url.as_str()), "{r}");
    let ok = client().get(format!("{url}/echo")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    rpc_ok(&e.base, "crp/lease", json!({ "action": "release", "leaseId": lease })).await;
    let before = e.rec.count();
    let cut = client().get(format!("{url}/echo")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(cut.status(), 403);
    let v: Value = cut.json().await.unwrap();
    assert_eq!(v["error"], "lease_released", "{v}");
    assert_eq!(e.rec.count(), before);
}

#[tokio::test]
async fn revoke_cascades_to_delegated_children() {
    let e = env().await;
    let (purl, ptok, parent) = use_service(&e.base, "echo", json!({})).await;
    let (curl, ctok, child) =
        use_service(&e.base, "echo", json!({ "delegation": { "parentLeaseId": parent } })).await;
    assert_ne!(parent, child);
    for (u, t) in [(&purl, &ptok), (&curl, &ctok)] {
        assert_eq!(client().get(format!("{u}/echo")).bearer_auth(t).send().await.unwrap().status(), 200);
    }
    let r = rpc_ok(&e.base, "crp/revoke", json!({ "leaseId": parent, "reason": "manual_revocation" })).await;
    assert!(r["affectedLeases"].to_string().contains(&child), "{r}");
    let before = e.rec.count();
    for (u, t) in [(&purl, &ptok), (&curl, &ctok)] {
        let resp = client().get(format!("{u}/echo")).bearer_auth(t).send().await.unwrap();
        assert_eq!(resp.status(), 403);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"], "lease_revoked", "{v}");
    }
    assert_eq!(e.rec.count(), before, "a revoked lease reached the upstream");
    // The refused attempts are in the audit, with their status.
    let events = rpc_ok(&e.base, "x-crp/audit.query", json!({ "action": "credential.used", "limit": 50 })).await;
    let refused = events["events"].as_array().unwrap().iter().filter(|ev| ev["detail"]["status"] == 403).count();
    assert_eq!(refused, 2, "{events}");
}

#[tokio::test]
async fn expired_leases_are_refused() {
    let e = env().await;
    let (url, token, _) = use_service(&e.base, "echo", json!({ "ttl": 1 })).await;
    // The lease's expiry is whole seconds away; wait it out (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = client().get(format!("{url}/echo")).bearer_auth(&token).send().await.unwrap();
        if r.status() == 410 {
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"], "lease_expired", "{v}");
            break;
        }
        assert_eq!(r.status(), 200);
        assert!(std::time::Instant::now() < deadline, "lease never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn ssrf_destinations_are_refused_without_an_allowance() {
    let e = env().await;
    for service in ["ssrf-metadata", "ssrf-private", "ssrf-loopback", "ssrf-localhost", "ssrf-v6"] {
        let (url, token, _) = use_service(&e.base, service, json!({})).await;
        let r = client().get(format!("{url}/latest/meta-data/")).bearer_auth(&token).send().await.unwrap();
        assert_eq!(r.status(), 403, "{service}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "egress_denied", "{service}: {v}");
        let text = v.to_string();
        assert!(!text.contains("secret-value"), "{text}");
    }
    assert_eq!(e.rec.count(), 0, "an SSRF attempt reached the loopback upstream");
}

#[tokio::test]
async fn redirects_are_returned_not_followed() {
    let e = env().await;
    let (url, token, _) = use_service(&e.base, "echo", json!({})).await;
    let r = client().get(format!("{url}/redirect")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers().get("location").unwrap(), "http://169.254.169.254/latest/meta-data/");
    assert_eq!(e.rec.count(), 1);
}

#[tokio::test]
async fn path_escapes_are_refused() {
    let e = env().await;
    let (url, token, _) = use_service(&e.base, "echo-query", json!({})).await;
    // HTTP clients normalise "..", so write the request by hand.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let path = url.strip_prefix(&e.base).unwrap();
    for escape in ["%2e%2e/oauth/token", "../oauth/token", "x/%2E%2E/%2e%2e/oauth/token"] {
        let mut s = tokio::net::TcpStream::connect(e.server.local_addr()).await.unwrap();
        let req = format!("GET {path}/{escape} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 400"), "{escape}: {out}");
        assert!(out.contains("bad_path"), "{out}");
    }
    assert_eq!(e.rec.count(), 0);
}

#[tokio::test]
async fn brokered_credentials_refresh_once_after_401() {
    let e = env().await;
    let (url, token, _) = use_service(&e.base, "brokered", json!({})).await;
    let r = client().get(format!("{url}/needs-fresh/x")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "fresh ok");
    assert_eq!(e.rec.token_calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    let seen = e.rec.seen.lock().unwrap().clone();
    let auths: Vec<_> = seen.iter().filter(|s| s.path_and_query.starts_with("/needs-fresh")).map(|s| s.headers["authorization"].clone()).collect();
    assert_eq!(auths, vec!["Bearer minted-token-1", "Bearer minted-token-2"]);
}

#[tokio::test]
async fn http2_callers_and_audit_and_metrics() {
    let e = env().await;
    let (url, token, lease) = use_service(&e.base, "echo", json!({})).await;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().no_proxy().build().unwrap();
    // A query value no id or timestamp can contain by chance (ids are hex; "abc" once was).
    let r = h2.put(format!("{url}/echo/doc?version=7&sig=query-value-kept-out")).bearer_auth(&token).body(vec![7u8; 1000]).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(e.rec.last().body_bytes, 1000);
    // The audit record is durable before the response completes.
    let events = rpc_ok(&e.base, "x-crp/audit.query", json!({ "action": "credential.used" })).await;
    let ev = events["events"].as_array().unwrap().iter().find(|ev| ev["lease_id"] == lease.as_str()).cloned().unwrap_or_else(|| panic!("credential.used not audited: {events}"));
    let text = ev.to_string();
    assert!(text.contains("/echo/doc"), "{text}");
    assert!(!text.contains("query-value-kept-out") && !text.contains(SECRET), "query values or the secret in the audit: {text}");
    assert_eq!(ev["detail"]["status"], 200, "{text}");
    assert_eq!(ev["detail"]["bytesIn"], 1000, "{text}");
    let m = client().get(format!("{}/metrics", e.base)).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("crp_http_requests_total{route=\"proxy\",status=\"200\"} 1"), "{m}");
    assert!(m.contains("crp_proxy_upstream_latency_seconds_count 1"), "{m}");
    assert!(m.contains("crp_leases_active 1"), "{m}");
    assert!(m.contains("crp_audit_queue_depth"), "{m}");
    e.server.shutdown().await;
    drop(e.vault);
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let e = env().await;
    let (url, token, lease) = use_service(&e.base, "echo", json!({})).await;
    let inflight = tokio::spawn({
        let (url, token) = (url.clone(), token.clone());
        async move { client().get(format!("{url}/slow")).bearer_auth(&token).send().await.unwrap().text().await.unwrap() }
    });
    e.rec.slow_entered.notified().await;
    let addr = e.server.local_addr();
    let shutdown = tokio::spawn(e.server.shutdown());
    // New connections are refused once shutdown began (bounded wait for the listener to close).
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "still accepting connections during shutdown");
    assert!(!shutdown.is_finished(), "shutdown did not wait for the in-flight request");
    e.rec.slow_gate.notify_one();
    assert_eq!(inflight.await.unwrap(), "slow done");
    tokio::time::timeout(Duration::from_secs(10), shutdown).await.expect("shutdown finished").unwrap();
    // The drained request was audited before the vault was flushed.
    let ev = crp_provider::audit::query(
        e.vault.store(),
        &crp_core::types::ext::AuditQueryParams { action: Some("credential.used".into()), ..Default::default() },
    )
    .await
    .unwrap();
    assert!(ev.iter().any(|ev| ev.lease_id.as_deref() == Some(lease.as_str())), "{ev:?}");
}

#[tokio::test]
async fn tls_upstreams_over_http2_with_rustls() {
    let (up, rec, ca) = tls_upstream().await;
    let doc = format!(
        r#"
[[credential]]
key = "tls/main"
service = "tls"
value = "{SECRET}"
upstream = "https://localhost:{}/api"
allow_private_hosts = ["localhost"]
"#,
        up.port()
    );
    let (vault, _dir) = vault_with(&doc).await;
    let mut cfg = crp_provider::http::ServeConfig { listen: "127.0.0.1:0".parse().unwrap(), dev: true, ..Default::default() };
    cfg.upstream.extra_roots_der = vec![ca];
    let server = crp_provider::http::start(vault.clone(), cfg).await.unwrap();
    let (url, token, _) = use_service(&server.base_url(), "tls", json!({})).await;
    let r = client().get(format!("{url}/v1/me")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(!body.contains(SECRET), "{body}");
    let seen = rec.last();
    assert_eq!(seen.path_and_query, "/api/v1/me");
    assert_eq!(seen.version, "HTTP/2.0", "ALPN should pick h2");
    assert_eq!(seen.headers.get("authorization"), Some(&format!("Bearer {SECRET}")));
    server.shutdown().await;

    // Without the test CA the certificate is refused (502), and nothing is sent.
    let (vault2, _dir2) = vault_with(&doc).await;
    let server2 = serve(&vault2, true).await;
    let (url, token, _) = use_service(&server2.base_url(), "tls", json!({})).await;
    let before = rec.count();
    let r = client().get(format!("{url}/v1/me")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(rec.count(), before);
    server2.shutdown().await;
}

#[tokio::test]
async fn a_revoke_by_another_vault_process_cuts_the_next_request() {
    let e = env().await;
    let (url, token, lease) = use_service(&e.base, "echo", json!({})).await;
    assert_eq!(client().get(format!("{url}/echo")).bearer_auth(&token).send().await.unwrap().status(), 200);
    // A second, independent vault handle on the same home (what `crp-provider lease revoke`
    // run from a shell is).
    let other = crp_provider::vault::Vault::open(crp_provider::vault::OpenOptions {
        home: e._dir.path().to_path_buf(),
        unlock: None,
        database_url: None,
    })
    .await
    .unwrap();
    let affected = other.admin_revoke(&lease).await.unwrap();
    assert!(affected.contains(&lease), "{affected:?}");
    let r = client().get(format!("{url}/echo")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 403);
    other.shutdown().await;
}

/// A loopback server that reads whatever comes and answers with `reply` (possibly nothing,
/// possibly a head and part of a body), then keeps the connection open without another byte.
async fn stalling_server(reply: &'static [u8]) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
                // Hold the connection open, silent, until the peer goes away.
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

#[tokio::test]
async fn silent_and_stalling_upstreams_time_out_and_are_audited() {
    let silent = stalling_server(b"").await;
    let half_body = stalling_server(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten..").await;
    let doc = format!(
        r#"
[[credential]]
key = "slow/head"
service = "silent"
value = "{SECRET}"
upstream = "http://127.0.0.1:{}"
allow_private_hosts = ["127.0.0.1"]

[[credential]]
key = "slow/tls"
service = "silent-tls"
value = "{SECRET}"
upstream = "https://127.0.0.1:{}"
allow_private_hosts = ["127.0.0.1"]

[[credential]]
key = "slow/body"
service = "half-body"
value = "{SECRET}"
upstream = "http://127.0.0.1:{}"
allow_private_hosts = ["127.0.0.1"]
"#,
        silent.port(),
        silent.port(),
        half_body.port()
    );
    let (vault, _dir) = vault_with(&doc).await;
    let mut cfg = crp_provider::http::ServeConfig { listen: "127.0.0.1:0".parse().unwrap(), dev: true, ..Default::default() };
    cfg.upstream.connect_timeout = Duration::from_millis(200);
    cfg.upstream.read_timeout = Duration::from_millis(1000);
    let server = crp_provider::http::start(vault.clone(), cfg).await.unwrap();
    // The response head never comes: the read timeout. The TLS handshake never completes:
    // the connect timeout, which covers TLS. Ten bytes of a hundred: the read timeout again,
    // now between two pieces of the body.
    // (The TLS case must end well before the read timeout would have ended it.)
    for (service, status, code, within) in [
        ("silent", 504, "upstream_timeout", Duration::from_secs(10)),
        ("silent-tls", 504, "upstream_timeout", Duration::from_millis(900)),
        ("half-body", 502, "upstream_body", Duration::from_secs(10)),
    ] {
        let (url, token, lease) = use_service(&server.base_url(), service, json!({})).await;
        let started = std::time::Instant::now();
        let sent = client().get(format!("{url}/v1/x?q=1")).bearer_auth(&token).send();
        let r = tokio::time::timeout(Duration::from_secs(20), sent).await.expect("the proxy answers").unwrap();
        assert_eq!(r.status(), status, "{service}");
        assert!(started.elapsed() < within, "{service}: {:?}", started.elapsed());
        let text = r.text().await.unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"], code, "{service}: {v}");
        assert!(!text.contains(SECRET), "{text}");
        let ev = crp_provider::audit::query(
            vault.store(),
            &crp_core::types::ext::AuditQueryParams { action: Some("credential.used".into()), ..Default::default() },
        )
        .await
        .unwrap();
        let used = ev.iter().find(|e| e.lease_id.as_deref() == Some(lease.as_str())).expect("the refusal is audited");
        let detail = serde_json::to_string(&used.detail).unwrap();
        assert!(detail.contains(&format!("\"status\":{status}")), "{service}: {detail}");
        assert!(!detail.contains(SECRET), "{detail}");
    }
    server.shutdown().await;
}
