//! crp-mcp driven by MCP clients nobody here wrote, in both modes:
//!
//! - the Python `mcp` SDK (tests/clients/mcp_flow.py, custom `crp/*` requests included), and
//! - `@modelcontextprotocol/inspector --cli` (tests/clients/inspector_flow.py),
//!
//! through store → list (no values) → use → proxied request to a loopback upstream (after the
//! operator's explicit loopback allowance) → lease renew → revoke → audit_log. Remote mode runs
//! against a real `crp-provider serve` with an agent bootstrapped, installed (`crp-mcp install`)
//! and approved through the CLIs. Afterwards the provider's logs and the database files are
//! scanned for the stored secrets too.
//!
//! The clients are installed by tests/clients/install.sh (scripts/test.sh runs it). When they
//! are missing the client tests are skipped with a message, except under CI (CI=true), where
//! that is a failure. `install_whoami_config_revoke` needs no external client and always runs.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::channel;
use std::time::Duration;

use common::{mcp_bin, provider_bin};
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

struct Clients {
    python: PathBuf,
    inspector: PathBuf,
    dir: PathBuf,
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// The installed clients, or `None` (skip) outside CI. In CI missing clients fail the test.
fn clients() -> Option<Clients> {
    let dir = repo_root().join("tests/clients");
    let python = std::env::var_os("CRP_TEST_PYTHON").map(PathBuf::from).unwrap_or_else(|| dir.join(".venv/bin/python"));
    let inspector = dir.join("node_modules/.bin/mcp-inspector");
    let mut missing = Vec::new();
    if !python.exists() {
        missing.push(format!("Python mcp SDK venv ({})", python.display()));
    }
    if !inspector.exists() {
        missing.push(format!("MCP inspector ({})", inspector.display()));
    }
    if missing.is_empty() {
        return Some(Clients { python, inspector, dir });
    }
    let msg = format!("MCP test clients not installed: {}; run tests/clients/install.sh", missing.join(", "));
    if in_ci() {
        panic!("{msg} (CI is set, so this is a failure, not a skip)");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn provider(home: &Path) -> Command {
    let mut c = Command::new(provider_bin());
    c.env("CRP_HOME", home).env_remove("CRP_PASSPHRASE").env_remove("CRP_DATABASE_URL");
    c
}

fn crp_mcp(home: &Path) -> Command {
    let mut c = Command::new(mcp_bin());
    c.env("CRP_HOME", home)
        .env_remove("CRP_PROVIDER_URL")
        .env_remove("CRP_AGENT_ID")
        .env_remove("CRP_LISTEN")
        .env_remove("CRP_DATABASE_URL");
    c
}

/// `crp-provider init --keyfile` plus this test's policy file.
fn init_vault(home: &Path, policy: &str) {
    run(provider(home).args(["init", "--keyfile"]));
    std::fs::write(home.join("policies/50-mcp-test.cedar"), policy).expect("write policy");
}

const EXPORT_KEY: &str = "test/export";

fn owner_export_policy() -> String {
    format!(
        r#"@id("mcp-test-export")
@reason("The client tests may export their export key with a stated purpose")
permit (principal == Agent::"owner", action in [Action::"retrieve", Action::"resolve"], resource == Credential::"{EXPORT_KEY}")
when {{ context has purpose && context.purpose != "" }};
"#
    )
}

fn role_policy() -> String {
    format!(
        r#"@id("mcp-agents")
@reason("MCP agents may manage and use credentials through the proxy")
permit (
  principal in Role::"mcp",
  action in [Action::"store", Action::"list", Action::"delete", Action::"use", Action::"renew",
             Action::"release", Action::"revoke", Action::"delegate", Action::"audit"],
  resource
);
@id("mcp-agents-export")
@reason("MCP agents may export the test export key with a stated purpose")
permit (principal in Role::"mcp", action in [Action::"retrieve", Action::"resolve"], resource == Credential::"{EXPORT_KEY}")
when {{ context has purpose && context.purpose != "" }};
"#
    )
}

/// A running `crp-provider serve` on an ephemeral loopback port.
struct Provider {
    child: Child,
    url: String,
    stderr: PathBuf,
}

impl Provider {
    fn start(home: &Path) -> Provider {
        let stderr = home.join("provider.stderr");
        let mut child = provider(home)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn crp-provider serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // The provider prints `crp-provider listening on http://127.0.0.1:PORT` once bound.
        let url = loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    if let Some(u) = line.split_whitespace().find(|w| w.starts_with("http://")) {
                        break u.trim_end_matches('/').to_owned();
                    }
                }
                Err(e) => panic!(
                    "crp-provider serve did not report its address ({e}); stderr:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                ),
            }
        };
        Provider { child, url, stderr }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bootstrap → `crp-mcp install` → approve. Returns the agent id.
fn install_agent(vault_home: &Path, client_home: &Path, provider_url: &str, name: &str) -> String {
    let out = run(provider(vault_home).args([
        "agent",
        "bootstrap",
        "--name",
        name,
        "--role",
        "mcp",
        "--scopes",
        "crp:*,vault:*,policy:*,audit:*",
        "--json",
    ]));
    let boot: Value = serde_json::from_slice(&out.stdout).expect("bootstrap --json output");
    let token = boot["token"].as_str().expect("token").to_owned();
    let out = run(crp_mcp(client_home).args(["install", &token, "--provider", provider_url, "--name", "test laptop"]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("status: pending"), "{text}");
    let agent = text
        .split_whitespace()
        .skip_while(|w| *w != "agent")
        .nth(1)
        .unwrap_or_else(|| panic!("install output names the agent: {text}"))
        .to_owned();
    assert!(!text.contains(&token), "install echoed the token");
    let who = run(crp_mcp(client_home).args(["whoami", "--json"]));
    let who: Value = serde_json::from_slice(&who.stdout).expect("whoami --json");
    assert_eq!(who[0]["agentId"], agent.as_str());
    assert_eq!(who[0]["status"], "pending", "{who}");
    run(provider(vault_home).args(["agent", "approve", &agent]));
    let who = run(crp_mcp(client_home).args(["whoami", "--json"]));
    let who: Value = serde_json::from_slice(&who.stdout).expect("whoami --json");
    assert!(who[0]["status"].as_str().unwrap_or_default().starts_with("active"), "{who}");
    agent
}

struct Canaries {
    main: String,
    export: String,
    inspector: String,
}

impl Canaries {
    fn new(tag: &str) -> Canaries {
        let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let r = format!("{:x}{:x}", n, std::process::id());
        Canaries {
            main: format!("sk-canary-{tag}-main-{r}"),
            export: format!("sk-canary-{tag}-export-{r}"),
            inspector: format!("sk-canary-{tag}-insp-{r}"),
        }
    }

    fn all(&self) -> [&str; 3] {
        [&self.main, &self.export, &self.inspector]
    }

    fn env(&self, c: &mut Command) {
        c.env("CRP_TEST_CANARY_MAIN", &self.main)
            .env("CRP_TEST_CANARY_EXPORT", &self.export)
            .env("CRP_TEST_CANARY_INSPECTOR", &self.inspector);
    }
}

/// No canary in the logs or (in clear) in any database file of `home`.
fn assert_no_leaks(canaries: &Canaries, home: &Path, logs: &str) {
    for c in canaries.all() {
        assert!(!logs.contains(c), "a stored secret appeared in the provider's logs");
    }
    for f in std::fs::read_dir(home).expect("home").flatten() {
        if f.file_name().to_string_lossy().starts_with("vault.db") {
            let bytes = std::fs::read(f.path()).unwrap_or_default();
            for c in canaries.all() {
                assert!(!bytes.windows(c.len()).any(|w| w == c.as_bytes()), "plaintext secret in {:?}", f.path());
            }
        }
    }
}

fn run_script(cl: &Clients, script: &str, canaries: &Canaries, env: &[(&str, String)]) {
    let mut c = Command::new(&cl.python);
    c.arg(cl.dir.join(script))
        .current_dir(&cl.dir)
        .env("CRP_MCP_BIN", mcp_bin())
        .env("CRP_PROVIDER_BIN", provider_bin())
        .env("CRP_INSPECTOR_BIN", &cl.inspector)
        .env("CRP_EXPORT_KEY", EXPORT_KEY)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("CRP_PASSPHRASE");
    canaries.env(&mut c);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.stdin(Stdio::null()).output().expect("run python");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "{script} failed ({}):\n{}\n{stderr}", out.status, String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains("all checks passed"), "{script} did not finish: {stderr}");
}

#[test]
fn embedded_mode_with_python_sdk_and_inspector() {
    let Some(cl) = clients() else { return };
    let home = tempfile::tempdir().unwrap();
    let home_s = home.path().to_string_lossy().into_owned();
    init_vault(home.path(), &owner_export_policy());
    let canaries = Canaries::new("emb");

    // Python SDK: crp-mcp serves its own proxy on an ephemeral port.
    run_script(&cl, "mcp_flow.py", &canaries, &[("CRP_HOME", home_s.clone()), ("CRP_TEST_MODE", "embedded".into())]);

    // Inspector: one crp-mcp per call, so a provider serving the same vault holds the proxy
    // and every crp-mcp relies on it (same address, same database).
    let p = Provider::start(home.path());
    run_script(
        &cl,
        "inspector_flow.py",
        &canaries,
        &[("CRP_HOME", home_s), ("CRP_TEST_MODE", "embedded".into()), ("CRP_PROVIDER_URL", p.url.clone())],
    );
    let logs = p.logs();
    drop(p);
    assert_no_leaks(&canaries, home.path(), &logs);
}

#[test]
fn remote_mode_with_python_sdk_and_inspector() {
    let Some(cl) = clients() else { return };
    let vault = tempfile::tempdir().unwrap();
    let client = tempfile::tempdir().unwrap();
    init_vault(vault.path(), &role_policy());
    let p = Provider::start(vault.path());
    let agent = install_agent(vault.path(), client.path(), &p.url, "mcp-remote");
    let canaries = Canaries::new("rem");
    let env = [
        ("CRP_HOME", vault.path().to_string_lossy().into_owned()),
        ("CRP_CLIENT_HOME", client.path().to_string_lossy().into_owned()),
        ("CRP_TEST_MODE", "remote".into()),
        ("CRP_PROVIDER_URL", p.url.clone()),
        ("CRP_AGENT_ID", agent),
    ];
    run_script(&cl, "mcp_flow.py", &canaries, &env);
    run_script(&cl, "inspector_flow.py", &canaries, &env);
    let logs = p.logs();
    drop(p);
    assert_no_leaks(&canaries, vault.path(), &logs);
}

#[test]
fn install_whoami_config_revoke() {
    let vault = tempfile::tempdir().unwrap();
    let client = tempfile::tempdir().unwrap();
    init_vault(vault.path(), &role_policy());
    let p = Provider::start(vault.path());

    // Nothing installed: whoami says so; config gives an embedded entry.
    let out = run(crp_mcp(client.path()).args(["whoami"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no agent identities"));
    let out = run(crp_mcp(client.path()).args(["config", "cursor"]));
    let v: Value = serde_json::from_slice(&out.stdout).expect("cursor config is JSON");
    assert_eq!(v["mcpServers"]["crp"]["args"], serde_json::json!(["serve"]));
    assert_eq!(v["mcpServers"]["crp"]["command"], mcp_bin().to_string_lossy().as_ref());

    // A bad token is refused by the provider and nothing is stored.
    let out = crp_mcp(client.path()).args(["install", "crpbt_not-a-real-token", "--provider", &p.url]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bootstrap rejected"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!client.path().join("agents").exists() || std::fs::read_dir(client.path().join("agents")).unwrap().next().is_none());

    let agent = install_agent(vault.path(), client.path(), &p.url, "mcp-cli");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let slot = client.path().join("agents").join(&agent);
        assert_eq!(mode(client.path().join("agents")), 0o700);
        assert_eq!(mode(slot.clone()), 0o700);
        assert_eq!(mode(slot.join("private.pem")), 0o600);
        assert_eq!(mode(slot.join("identity.json")), 0o600);
    }

    for (client_name, key) in
        [("claude-desktop", "mcpServers"), ("cursor", "mcpServers"), ("windsurf", "mcpServers"), ("vscode", "servers")]
    {
        let out = run(crp_mcp(client.path()).args(["config", client_name]));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{client_name}: {e}"));
        let entry = &v[key]["crp"];
        assert_eq!(entry["env"]["CRP_AGENT_ID"], agent.as_str(), "{v}");
        assert_eq!(entry["env"]["CRP_PROVIDER_URL"], p.url.as_str(), "{v}");
    }
    let out = run(crp_mcp(client.path()).args(["config", "codex"]));
    let v: toml::Value = toml::from_str(&String::from_utf8_lossy(&out.stdout)).expect("codex config is TOML");
    assert_eq!(v["mcp_servers"]["crp"]["env"]["CRP_AGENT_ID"].as_str(), Some(agent.as_str()));
    let out = run(crp_mcp(client.path()).args(["config", "claude-code"]));
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(line.starts_with("claude mcp add crp --env CRP_AGENT_ID=") && line.contains(" -- "), "{line}");
    let out = run(crp_mcp(client.path()).args(["config", "cursor", "--embedded"]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["mcpServers"]["crp"].get("env").is_none_or(|e| e.get("CRP_AGENT_ID").is_none()), "{v}");

    // Remote mode over raw stdio: the capability is the provider's for the negotiated version,
    // and crp/* requests are signed and answered by the provider.
    let mut mcp = common::Mcp::spawn(client.path(), &["serve"], &[("CRP_PROVIDER_URL", &p.url), ("CRP_AGENT_ID", &agent)]);
    let init = mcp.initialize(serde_json::json!({"experimental": {"crp": {"version": "0.1"}}}));
    let crp = &init["result"]["capabilities"]["experimental"]["crp"];
    assert_eq!(crp["version"], "0.1", "{init}");
    // The provider's own 0.1 capability (v0.1 has crp/resolve and no crp/use).
    assert!(crp["features"].as_array().is_some_and(|f| f.contains(&serde_json::json!("resolve"))), "{init}");
    let list = mcp.request("crp/list", serde_json::json!({}));
    assert!(list["result"]["services"].is_array(), "{list}");
    let resolve = mcp.request("crp/resolve", serde_json::json!({"service": "nothing.here"}));
    assert!(resolve["error"]["code"].as_i64().is_some_and(|c| c <= -33001), "{resolve}");
    let r = mcp.call_tool("vault_list", serde_json::json!({}));
    assert_eq!(r["isError"], false, "{r}");
    let (st, stderr, _) = mcp.finish();
    assert!(st.success(), "{stderr}");
    assert!(stderr.contains(&format!("as agent `{agent}`")), "{stderr}");

    // revoke removes the local identity and points at the provider-side command.
    let out = run(crp_mcp(client.path()).args(["revoke", &agent]));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("crp-provider agent disable {agent}")));
    assert!(!client.path().join("agents").join(&agent).exists());
    let out = crp_mcp(client.path()).args(["revoke", &agent]).output().unwrap();
    assert!(!out.status.success());
    let out = crp_mcp(client.path()).args(["--provider", &p.url]).stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("crp-mcp install"), "{}", String::from_utf8_lossy(&out.stderr));
}
