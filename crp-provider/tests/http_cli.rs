//! The real `crp-provider` binary: `serve --dev --fixtures` driven with `curl`, and `serve`
//! over an `init`ed vault in CRP_HOME; both stop gracefully on SIGTERM.

mod http_support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crp_core::fixtures::{FixtureRole, Fixtures};
use http_support::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_crp-provider");

/// Start the binary and wait (bounded) for its "listening on URL" line on stdout.
fn spawn_serve(args: &[&str], home: Option<&std::path::Path>) -> (Child, String, mpsc::Receiver<String>) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).env_remove("CRP_PASSPHRASE");
    if let Some(h) = home {
        cmd.env("CRP_HOME", h);
    }
    let mut child = cmd.spawn().expect("crp-provider starts");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (etx, erx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = etx.send(line);
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
        let _ = child.kill();
        let err: Vec<String> = erx.try_iter().collect();
        panic!("no URL on stdout; stderr: {}", err.join("\n"));
    });
    let url = line.strip_prefix("crp-provider listening on ").unwrap_or_else(|| panic!("unexpected line {line}")).to_string();
    (child, url, erx)
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl").args(["-sS", "--max-time", "20"]).args(args).output().expect("curl is installed");
    assert!(out.status.success(), "curl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn sigterm_and_wait(mut child: Child) {
    let pid = child.id().to_string();
    let ok = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(ok.success());
    for _ in 0..200 {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit after SIGTERM: {status}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("crp-provider did not stop within 10 s of SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_binary_with_fixtures_and_curl() {
    let (up, rec) = upstream().await;
    let fixtures = Fixtures::conformance(&up.to_string());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fixtures.json");
    std::fs::write(&file, serde_json::to_string(&fixtures).unwrap()).unwrap();
    let (child, url, stderr) =
        spawn_serve(&["serve", "--dev", "--listen", "127.0.0.1:0", "--fixtures", file.to_str().unwrap()], None);
    let banner: Vec<String> = (0..3).filter_map(|_| stderr.recv_timeout(Duration::from_secs(5)).ok()).collect();
    assert!(banner.iter().any(|l| l.contains("DEV MODE")), "{banner:?}");

    let primary = fixtures.by_role(FixtureRole::Primary).unwrap();
    let secret = primary.value.expose().to_string();
    let cap: Value = serde_json::from_str(&curl(&[&format!("{url}/.well-known/crp")])).unwrap();
    assert_eq!(cap["version"], "0.2");

    let req = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"crp/use","params":{{"service":"{}","ttl":60}}}}"#, primary.service);
    let out = curl(&["-X", "POST", &format!("{url}/crp"), "-H", "content-type: application/json", "-d", &req]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let proxy = v["result"]["proxyBaseUrl"].as_str().unwrap_or_else(|| panic!("{v}"));
    let token = v["result"]["sessionToken"].as_str().unwrap();
    assert!(!out.contains(&secret));

    let echoed = curl(&[&format!("{proxy}/hello?x=1"), "-H", &format!("Authorization: Bearer {token}")]);
    assert!(!echoed.contains(&secret), "the secret came back: {echoed}");
    assert!(echoed.contains("[REDACTED]"), "{echoed}");
    let seen = rec.last();
    assert!(seen.path_and_query.ends_with("/hello?x=1"), "{seen:?}");
    assert!(seen.headers.values().any(|v| v.contains(&secret)), "credential not injected: {seen:?}");
    assert!(seen.headers.values().all(|v| !v.contains(token)), "session token forwarded");

    let metrics = curl(&[&format!("{url}/metrics")]);
    assert!(metrics.contains("crp_http_requests_total{route=\"proxy\",status=\"200\"} 1"), "{metrics}");
    sigterm_and_wait(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_opens_the_vault_in_crp_home() {
    let home = tempfile::tempdir().unwrap();
    let st = Command::new(BIN)
        .args(["--home", home.path().to_str().unwrap(), "init", "--keyfile"])
        .env_remove("CRP_PASSPHRASE")
        .output()
        .unwrap();
    assert!(st.status.success(), "init failed: {}", String::from_utf8_lossy(&st.stderr));
    let (child, url, _stderr) = spawn_serve(&["serve", "--listen", "127.0.0.1:0"], Some(home.path()));
    assert_eq!(curl(&[&format!("{url}/healthz")]), r#"{"status":"ok"}"#);
    // Not --dev: an unsigned call is refused with the interface's message.
    let out = curl(&["-X", "POST", &format!("{url}/crp"), "-d", r#"{"jsonrpc":"2.0","id":1,"method":"crp/list"}"#, "-w", "\n%{http_code}"]);
    assert!(out.ends_with("\n401"), "{out}");
    assert!(out.contains("auth_failure: missing X-CRP-Agent header"), "{out}");
    sigterm_and_wait(child);
}
