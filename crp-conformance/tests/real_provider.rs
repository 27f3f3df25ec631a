//! Our own provider at Full tier, through the real binaries: `crp-provider serve --dev
//! --fixtures` over HTTP, and `crp-mcp` (embedded mode, a vault loaded with the same fixtures)
//! over MCP, each tested by the `crp-conformance` binary on ephemeral ports.
//!
//! `--audit-wait 6`: the provider's reaper records `lease.expired` every 5 s by default, and
//! CRP sets no bound on how soon an expiry must be logged (v0.1 §8.4), so the runner's 3 s
//! default would fail it for timing alone.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crp_core::fixtures::Fixtures;

/// A child process killed on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A workspace binary next to this test's own target directory, built if missing.
fn workspace_bin(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir").to_path_buf();
    let path = dir.join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo).args(["build", "-p", package, "--bin", name]).status().expect("cargo build");
        assert!(st.success(), "cannot build {name}");
    }
    path
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn write_fixtures(dir: &Path, upstream: &str) -> (Fixtures, PathBuf) {
    let f = Fixtures::conformance(upstream);
    let path = dir.join("fixtures.json");
    std::fs::write(&path, f.to_json_pretty()).expect("write fixtures");
    (f, path)
}

fn run_conformance(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_crp-conformance"))
        .arg("run")
        .args(args)
        .output()
        .expect("run crp-conformance");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Run with a JSON report; the report and the ids of failed or errored MUST cases.
fn run_json(dir: &Path, args: &[&str]) -> (i32, serde_json::Value, Vec<String>, String) {
    let out = dir.join("report.json");
    let mut all: Vec<&str> = args.to_vec();
    let o = out.to_str().expect("utf-8 path").to_string();
    all.extend(["--format", "json", "--output", &o]);
    let (code, text) = run_conformance(&all);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap_or_default()).unwrap_or_default();
    let cases = report["cases"].as_array().cloned().unwrap_or_default();
    let blocking: Vec<String> = cases
        .iter()
        .filter(|c| c["level"] == "MUST" && (c["outcome"] == "fail" || c["outcome"] == "error"))
        .filter_map(|c| c["id"].as_str().map(str::to_string))
        .collect();
    let failures: Vec<String> = cases
        .iter()
        .filter(|c| c["outcome"] == "fail" || c["outcome"] == "error")
        .map(|c| format!("{} {}: {}\n{}", c["outcome"], c["id"], c["reason"], serde_json::to_string_pretty(&c["evidence"]).unwrap_or_default()))
        .collect();
    (code, report, blocking, format!("{text}\n{}", failures.join("\n")))
}

#[test]
fn our_provider_passes_full_tier_over_http() {
    let tmp = tempfile::tempdir().expect("tmp");
    let upstream = format!("127.0.0.1:{}", free_port());
    let (_, fixtures) = write_fixtures(tmp.path(), &upstream);
    let mut child = Command::new(workspace_bin("crp-provider", "crp-provider"))
        .args(["serve", "--dev", "--listen", "127.0.0.1:0", "--fixtures"])
        .arg(&fixtures)
        .env("CRP_HOME", tmp.path().join("unused-home"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start crp-provider");
    let stderr = child.stderr.take().expect("stderr");
    let guard = Guard(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("listening on http://") {
                let url: String = line[i + "listening on ".len()..].split_whitespace().next().unwrap_or("").to_string();
                let _ = tx.send(url);
            }
        }
    });
    let url = rx.recv_timeout(Duration::from_secs(60)).expect("crp-provider did not print its URL");
    let (code, text) = run_conformance(&[
        "--http", &url, "--tier", "full", "--upstream", &upstream, "--fixtures",
        fixtures.to_str().expect("utf-8 path"), "--audit-wait", "6",
    ]);
    drop(guard);
    assert_eq!(code, 0, "crp-conformance against crp-provider --dev:\n{text}");
    assert!(text.contains("CONFORMS"), "{text}");
    assert!(!text.contains("crp-canary-"), "the report carries a canary in the clear");
}

#[test]
fn our_provider_passes_full_tier_over_mcp() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    let upstream = format!("127.0.0.1:{}", free_port());
    let (f, fixtures) = write_fixtures(tmp.path(), &upstream);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        use crp_provider::vault::{OpenOptions, Unlock, Vault};
        Vault::init(&home, Unlock::Keyfile(home.join("vault.key"))).await.expect("init vault");
        let v = Vault::open(OpenOptions::new(&home)).await.expect("open vault");
        v.load_fixtures(&f).await.expect("load fixtures");
        v.shutdown().await;
    });
    let mcp = workspace_bin("crp-mcp", "mcp-adapter");
    let cmd = format!(
        "'{}' serve --home '{}' --as-agent crp-conformance --listen 127.0.0.1:0 --log-file '{}'",
        mcp.display(),
        home.display(),
        tmp.path().join("mcp.log").display()
    );
    let (code, report, blocking, text) = run_json(tmp.path(), &[
        "--mcp", &cmd, "--tier", "full", "--upstream", &upstream, "--fixtures",
        fixtures.to_str().expect("utf-8 path"), "--audit-wait", "6", "--timeout", "3",
    ]);
    let log = std::fs::read_to_string(tmp.path().join("mcp.log")).unwrap_or_default();
    assert!(blocking.is_empty(), "crp-conformance against crp-mcp (exit {code}), failures {blocking:?}:\n{text}\n--- crp-mcp log ---\n{log}");
    assert_eq!(code, 0, "{text}");
    assert!(report["totals"]["pass"].as_u64().unwrap_or(0) >= 90, "{text}");
}

#[test]
fn our_provider_passes_full_tier_over_stdio() {
    let tmp = tempfile::tempdir().expect("tmp");
    let upstream = format!("127.0.0.1:{}", free_port());
    let (_, fixtures) = write_fixtures(tmp.path(), &upstream);
    let listen = format!("127.0.0.1:{}", free_port());
    let cmd = format!(
        "'{}' serve --stdio --dev --fixtures '{}' --listen {listen}",
        workspace_bin("crp-provider", "crp-provider").display(),
        fixtures.display()
    );
    let discovery = format!("http://{listen}");
    let (code, report, blocking, text) = run_json(tmp.path(), &[
        "--stdio", &cmd, "--discovery", &discovery, "--tier", "full", "--upstream", &upstream,
        "--fixtures", fixtures.to_str().expect("utf-8 path"), "--audit-wait", "6",
    ]);
    assert!(blocking.is_empty(), "crp-conformance against crp-provider --stdio (exit {code}), failures {blocking:?}:\n{text}");
    assert_eq!(code, 0, "{text}");
    // stdio carries no version: the v0.1 cases and the negotiation cases are skipped, the rest pass.
    assert!(report["totals"]["pass"].as_u64().unwrap_or(0) >= 80, "{text}");
}
