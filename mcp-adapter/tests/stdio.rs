//! crp-mcp over raw stdio JSON lines in embedded mode: cold start, both MCP lifecycles
//! (initialize and server/discover), CRP version negotiation, `crp/*` on the connection, the
//! first-run experience under the starter policy, read-blindness, and that stdout carries
//! only protocol.

mod common;

use std::time::{Duration, Instant};

use common::{Mcp, init_vault, is_error, text};
use serde_json::{Value, json};

const LISTEN_ANY: [&str; 3] = ["serve", "--listen", "127.0.0.1:0"];

#[test]
fn cold_start_to_tools_list_and_capabilities() {
    let home = tempfile::tempdir().unwrap();
    init_vault(home.path());
    let started = Instant::now();
    let mut mcp = Mcp::spawn(home.path(), &LISTEN_ANY, &[]);
    let init = mcp.initialize(json!({}));
    let tools = mcp.request("tools/list", json!({}));
    let cold = started.elapsed();
    eprintln!("crp-mcp cold start to answered tools/list: {} ms", cold.as_millis());
    assert!(cold < Duration::from_secs(10), "cold start took {cold:?}");

    let caps = &init["result"]["capabilities"];
    let crp = &caps["experimental"]["crp"];
    assert_eq!(crp["version"], "0.2", "{init}");
    assert!(crp["features"].as_array().unwrap().contains(&json!("use")), "{crp}");
    assert!(crp["provider"].is_string(), "{crp}");
    assert!(crp["conformance"].is_string(), "{crp}");
    assert!(!crp["features"].as_array().unwrap().contains(&json!("resolve")), "resolve is never advertised under 0.2");
    assert_eq!(caps["extensions"]["io.github.crp-reference/crp"], *crp);
    assert!(caps["tools"].is_object());
    assert_eq!(init["result"]["serverInfo"]["name"], "crp-mcp");

    let list = tools["result"]["tools"].as_array().unwrap();
    assert_eq!(list.len(), 10);
    for t in list {
        let s = t.to_string();
        assert!(!s.contains("uint"), "{s}");
        assert!(t["annotations"].is_object(), "{s}");
        assert_eq!(t["inputSchema"]["type"], "object");
        assert_eq!(t["outputSchema"]["type"], "object");
    }
    let (st, stderr, _) = mcp.finish();
    assert!(st.success(), "exit {st:?}: {stderr}");
    assert!(stderr.contains("crp-mcp ready on stdio"), "logs go to stderr: {stderr}");
}

#[test]
fn crp_version_negotiation_and_custom_requests() {
    let home = tempfile::tempdir().unwrap();
    init_vault(home.path());
    common::add_policy(
        home.path(),
        "50-export.cedar",
        r#"@id("owner-export-deploy")
@reason("the owner may export the deploy key with a purpose")
permit (principal == Agent::"owner", action in [Action::"retrieve", Action::"resolve"], resource == Credential::"ci/deploy")
when { context has purpose && context.purpose != "" };
"#,
    );

    // A client asking for CRP 0.1 gets 0.1 advertised; crp/resolve is answered (policy-gated).
    let mut mcp = Mcp::spawn(home.path(), &LISTEN_ANY, &[]);
    let init = mcp.initialize(json!({"experimental": {"crp": {"version": "0.1"}}}));
    assert_eq!(init["result"]["capabilities"]["experimental"]["crp"]["version"], "0.1", "{init}");
    let r = mcp.call_tool("vault_store", json!({"key": "gh/main", "value": "sk-neg-SECRET-1", "service": "github.com"}));
    assert!(!is_error(&r), "{r}");
    let resolve = mcp.request("crp/resolve", json!({"service": "github.com"}));
    let code = resolve["error"]["code"].as_i64().unwrap_or(0);
    assert!(code == -33003 || code == -33011, "starter policy refuses the export: {resolve}");
    assert!(!resolve.to_string().contains("sk-neg-SECRET-1"));
    // Where a policy permits `resolve` (with a purpose), 0.1's crp/resolve exports the material.
    let r = mcp.call_tool("vault_store", json!({"key": "ci/deploy", "value": "sk-neg-EXPORT-2", "service": "deploy.example"}));
    assert!(!is_error(&r), "{r}");
    let resolve = mcp.request("crp/resolve", json!({"service": "deploy.example", "context": {"purpose": "deploy"}}));
    assert_eq!(resolve["result"]["credential"]["key"], "sk-neg-EXPORT-2", "{resolve}");
    assert!(resolve["result"]["lease"]["id"].is_string(), "{resolve}");
    let list = mcp.request("crp/list", json!({}));
    let services: Vec<&str> = list["result"]["services"].as_array().unwrap().iter().filter_map(|s| s["service"].as_str()).collect();
    assert_eq!(services, ["deploy.example", "github.com"], "{list}");
    let unknown = mcp.request("crp/nope", json!({}));
    assert_eq!(unknown["error"]["code"], -32601, "{unknown}");
    let bad = mcp.request("crp/use", json!({"service": "github.com", "ttl": "sk-neg-SECRET-1"}));
    assert_eq!(bad["error"]["code"], -32602, "{bad}");
    assert!(!bad.to_string().contains("sk-neg-SECRET-1"), "params errors never echo values: {bad}");
    let (st, stderr, stdout) = mcp.finish();
    assert!(st.success());
    assert!(!stdout.contains("sk-neg-SECRET-1"));
    assert!(!stderr.contains("sk-neg-SECRET-1") && !stderr.contains("sk-neg-EXPORT-2"), "secrets in logs");

    // A client asking for an unsupported major gets -33001 with the supported list.
    let mut mcp = Mcp::spawn(home.path(), &LISTEN_ANY, &[]);
    let init = mcp.initialize(json!({"experimental": {"crp": {"version": "7.0"}}}));
    assert_eq!(init["error"]["code"], -33001, "{init}");
    assert_eq!(init["error"]["data"]["supported"], json!(["0.2", "0.1"]), "{init}");

    // Under 0.2 crp/resolve does not exist.
    let mut mcp = Mcp::spawn(home.path(), &LISTEN_ANY, &[]);
    mcp.initialize(json!({}));
    let resolve = mcp.request("crp/resolve", json!({"service": "github.com"}));
    assert_eq!(resolve["error"]["code"], -33011, "{resolve}");
}

#[test]
fn server_discover_lifecycle() {
    let home = tempfile::tempdir().unwrap();
    init_vault(home.path());
    let mut mcp = Mcp::spawn(home.path(), &LISTEN_ANY, &[]);
    let meta = |crp: Value| {
        json!({
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {"experimental": {"crp": crp}},
            "io.modelcontextprotocol/clientInfo": {"name": "modern", "version": "1"}
        })
    };
    let d = mcp.request("server/discover", json!({"_meta": meta(json!({}))}));
    assert_eq!(d["result"]["capabilities"]["experimental"]["crp"]["version"], "0.2", "{d}");
    let tools = mcp.request("tools/list", json!({"_meta": meta(json!({}))}));
    assert_eq!(tools["result"]["tools"].as_array().map(Vec::len), Some(10), "{tools}");
    let use_ = mcp.request("crp/use", json!({"service": "nothing.here", "_meta": meta(json!({"version": "0.2"}))}));
    assert_eq!(use_["error"]["code"], -33002, "{use_}");
    let d = mcp.request("server/discover", json!({"_meta": meta(json!({"version": "0.1"}))}));
    assert_eq!(d["result"]["capabilities"]["experimental"]["crp"]["version"], "0.1", "{d}");
    let d = mcp.request("server/discover", json!({"_meta": meta(json!({"version": "3.1"}))}));
    assert_eq!(d["error"]["code"], -33001, "{d}");
}

#[test]
fn first_run_under_the_starter_policy_is_read_blind() {
    let home = tempfile::tempdir().unwrap();
    init_vault(home.path());
    let secret = "sk-firstrun-CANARY-7f3a9c";
    // The most verbose logging there is: still no secret in the log.
    let mut mcp = Mcp::spawn(home.path(), &LISTEN_ANY, &[("CRP_LOG", "trace")]);
    mcp.initialize(json!({}));

    let r = mcp.call_tool(
        "vault_store",
        json!({"key": "aws/production", "value": secret, "metadata": {"service": "aws", "environment": "production"}, "ttl": 3600}),
    );
    assert!(!is_error(&r), "{r}");
    assert_eq!(r["structuredContent"]["stored"], true);
    assert_eq!(r["structuredContent"]["key"], "aws/production");
    assert!(r["structuredContent"]["expires_at"].is_string(), "{r}");

    let r = mcp.call_tool("vault_list", json!({"prefix": "aws/"}));
    assert_eq!(r["structuredContent"]["credentials"][0]["key"], "aws/production", "{r}");
    assert_eq!(r["structuredContent"]["credentials"][0]["service"], "aws", "{r}");

    let r = mcp.call_tool("policy_check", json!({"key": "aws/production", "action": "retrieve"}));
    assert_eq!(r["structuredContent"]["allowed"], false, "{r}");
    let r = mcp.call_tool("policy_check", json!({"key": "aws/production", "action": "use"}));
    assert_eq!(r["structuredContent"]["allowed"], true, "{r}");
    assert_eq!(r["structuredContent"]["policy"], "owner-manage", "{r}");

    let r = mcp.call_tool("vault_retrieve", json!({"key": "aws/production", "purpose": "deploy"}));
    assert!(is_error(&r), "{r}");
    let t = text(&r);
    assert!(t.contains("policy denied") && t.contains("Agent::\"owner\"") && t.contains("operator"), "{t}");
    let r = mcp.call_tool("vault_retrieve", json!({"key": "aws/production"}));
    assert!(is_error(&r) && text(&r).contains("purpose"), "{r}");
    let r = mcp.call_tool("credential_resolve", json!({"service": "aws", "export": true, "purpose": "x"}));
    assert!(is_error(&r), "{r}");

    let r = mcp.call_tool("credential_resolve", json!({"service": "aws", "scope": [], "requester": "cursor/workspace-abc"}));
    assert!(!is_error(&r), "{r}");
    let c = &r["structuredContent"];
    assert_eq!(c["exported"], false);
    for k in ["proxy_base_url", "session_token", "descriptor", "lease_id", "expires_at"] {
        assert!(c["credential"].get(k).is_some(), "credential.{k} in {c}");
    }
    assert_eq!(c["lease_id"], c["credential"]["lease_id"]);
    let lease = c["lease_id"].as_str().unwrap().to_owned();

    let r = mcp.call_tool("credential_lease", json!({"lease_id": lease, "action": "renew", "ttl": 60}));
    assert!(!is_error(&r), "{r}");
    let r = mcp.call_tool("credential_lease", json!({"lease_id": lease, "action": "release"}));
    assert_eq!(r["structuredContent"]["released"], true, "{r}");
    let r = mcp.call_tool("credential_lease", json!({"lease_id": lease, "action": "renew"}));
    assert!(is_error(&r) && text(&r).contains("credential_use"), "{r}");

    let r = mcp.call_tool("audit_log", json!({"key": "aws/production", "limit": 50}));
    assert!(!is_error(&r), "{r}");
    assert!(!r["structuredContent"]["events"].as_array().unwrap().is_empty());

    let r = mcp.call_tool("vault_delete", json!({"key": "aws/production"}));
    assert_eq!(r["structuredContent"]["deleted"], true, "{r}");

    // Argument errors are isError results that never echo values; unknown tools are -32602.
    let r = mcp.call_tool("vault_store", json!({"key": "x", "value": secret, "bogus": secret}));
    assert!(is_error(&r), "{r}");
    let unknown = mcp.request("tools/call", json!({"name": "nope", "arguments": {}}));
    assert_eq!(unknown["error"]["code"], -32602, "{unknown}");

    let (st, stderr, stdout) = mcp.finish();
    assert!(st.success(), "{stderr}");
    assert!(!stdout.contains(secret), "the secret appeared in MCP output");
    assert!(!stderr.contains(secret), "the secret appeared in the logs");
    for f in std::fs::read_dir(home.path()).unwrap().flatten() {
        if f.file_name().to_string_lossy().starts_with("vault.db") {
            let bytes = std::fs::read(f.path()).unwrap();
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "plaintext in {:?}", f.path());
        }
    }
}

/// A one-route loopback upstream: answers 200 to every request and reports the
/// `Authorization` header it saw.
fn upstream() -> (String, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut auth = String::new();
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if line == "\r\n" {
                    break;
                }
                if let Some(v) = line.strip_prefix("authorization: ").or_else(|| line.strip_prefix("Authorization: ")) {
                    auth = v.trim().to_owned();
                }
                line.clear();
            }
            let _ = tx.send(auth);
            let mut w = conn;
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    (url, rx)
}

/// `GET url` with a bearer token: the status code.
fn get_status(url: &str, token: &str) -> u16 {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (hostport, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn allow_loopback(home: &std::path::Path, key: &str, service: &str, value: &str, upstream: &str) {
    let file = home.join("allow.toml");
    std::fs::write(
        &file,
        format!(
            "[[credential]]\nkey = \"{key}\"\nservice = \"{service}\"\nvalue_env = \"ALLOW_TEST_VALUE\"\n\
             upstream = \"{upstream}\"\nallow_private_hosts = [\"127.0.0.1\"]\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(common::provider_bin())
        .args(["apply", file.to_str().unwrap()])
        .env("CRP_HOME", home)
        .env("ALLOW_TEST_VALUE", value)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Start `crp-provider serve` on `home`; returns the child and its base URL.
fn serve(home: &std::path::Path) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(common::provider_bin())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("CRP_HOME", home)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("provider printed its address").unwrap();
        if let Some(u) = line.split_whitespace().find(|w| w.starts_with("http://")) {
            break u.to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, url)
}

#[test]
fn shared_proxy_is_used_only_for_the_same_vault() {
    let (up, seen) = upstream();
    for same_vault in [true, false] {
        let mine = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        init_vault(mine.path());
        init_vault(other.path());
        let (mut provider, url) = serve(if same_vault { mine.path() } else { other.path() });
        let listen = url.trim_start_matches("http://").to_owned();
        let secret = "sk-shared-proxy-CANARY";
        let mut mcp = Mcp::spawn(mine.path(), &["serve", "--listen", &listen], &[]);
        mcp.initialize(json!({}));
        let r = mcp.call_tool("vault_store", json!({"key": "svc/k", "value": secret, "service": "svc"}));
        assert!(!is_error(&r), "{r}");
        allow_loopback(mine.path(), "svc/k", "svc", secret, &up);
        let r = mcp.call_tool("credential_use", json!({"service": "svc"}));
        assert!(!is_error(&r), "{r}");
        let base = r["structuredContent"]["proxy_base_url"].as_str().unwrap().to_owned();
        let token = r["structuredContent"]["session_token"].as_str().unwrap().to_owned();
        assert_eq!(base.starts_with(&url), same_vault, "proxy {base} vs provider {url} (same vault: {same_vault})");
        assert_eq!(get_status(&format!("{base}/x"), &token), 200, "same vault: {same_vault}");
        assert_eq!(seen.recv_timeout(Duration::from_secs(10)).unwrap(), format!("Bearer {secret}"));
        // Later leases go straight to the proxy chosen.
        let r = mcp.call_tool("credential_use", json!({"service": "svc"}));
        let base2 = r["structuredContent"]["proxy_base_url"].as_str().unwrap();
        assert_eq!(base2.starts_with(&url), same_vault, "{base2}");
        let (st, stderr, stdout) = mcp.finish();
        assert!(st.success(), "{stderr}");
        assert!(!stdout.contains(secret) && !stderr.contains(secret));
        let _ = provider.kill();
        let _ = provider.wait();
    }
}
