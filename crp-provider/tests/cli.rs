//! The real `crp-provider` binary, driven through the operator's workflow:
//! init → apply → credential add → policy check → lease ops → audit verify, plus wrong-key,
//! tamper-evidence, approvals, fail-closed audit and canary searches of the database files
//! and of every byte the CLI printed.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use base64::Engine as _;
use crp_core::provider::Transport;
use crp_core::types::{RevokeParams, RevokeReason, UseParams};
use crp_core::{CallContext, Provider};
use crp_provider::vault::{OpenOptions, Vault};
use serde_json::json;

const CANARY: &str = "crp-canary-cli0a1b2c3d4e5f60718293a4b5c6d7e8f9";
const DBPW: &str = "pw-7d1e9c0b5a4f3e2d1c0b9a8f";
const CANARY2: &str = "crp-canary-applyfedcba98765432100123456789abc";

struct Env {
    dir: tempfile::TempDir,
    /// Every stdout and stderr byte the binary produced.
    output: Vec<u8>,
}

impl Env {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap(), output: Vec::new() }
    }
    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }
    fn cmd(&self) -> Command {
        let mut c = Command::cargo_bin("crp-provider").unwrap();
        c.env("CRP_HOME", self.home()).env_remove("CRP_PASSPHRASE").env_remove("CRP_DATABASE_URL").timeout(std::time::Duration::from_secs(60));
        c
    }
    /// Run, record output, assert the exit code, return stdout.
    fn run(&mut self, args: &[&str], stdin: Option<&str>, code: i32) -> String {
        let mut c = self.cmd();
        c.args(args);
        if let Some(s) = stdin {
            c.write_stdin(s);
        }
        let out = c.output().unwrap();
        self.output.extend_from_slice(&out.stdout);
        self.output.extend_from_slice(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "args {args:?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
        stdout + &stderr
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

/// Every encoding of `secret` a careless implementation could leave behind.
fn encodings(secret: &str) -> Vec<Vec<u8>> {
    let b = secret.as_bytes();
    let mut v = vec![b.to_vec(), hex::encode(b).into_bytes(), hex::encode_upper(b).into_bytes()];
    for engine in [base64::engine::general_purpose::STANDARD_NO_PAD, base64::engine::general_purpose::URL_SAFE_NO_PAD] {
        // The three alignments a secret can have inside a longer base64 blob; drop the edge
        // characters that depend on neighbouring bytes.
        for pad in 0..3 {
            let mut buf = vec![0u8; pad];
            buf.extend_from_slice(b);
            let enc = engine.encode(&buf);
            let start = if pad == 0 { 0 } else { (pad * 4).div_ceil(3) + 1 };
            let end = enc.len().saturating_sub(2);
            if end > start {
                v.push(enc.as_bytes()[start..end].to_vec());
            }
        }
    }
    v
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.len() <= hay.len() && hay.windows(needle.len()).any(|w| w == needle)
}

fn assert_no_canary(what: &str, bytes: &[u8], secrets: &[&str]) {
    for s in secrets {
        for (i, e) in encodings(s).iter().enumerate() {
            assert!(!contains(bytes, e), "{what}: found canary `{s}` (encoding #{i})");
        }
    }
}

/// The database files with their contents (the WAL and SHM exist only while a connection is open).
fn db_files(home: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    ["vault.db", "vault.db-wal", "vault.db-shm"]
        .iter()
        .map(|f| home.join(f))
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect()
}

fn owner() -> CallContext {
    CallContext::new("owner", Transport::InProcess)
}

async fn sqlite(home: &Path) -> sqlx::SqlitePool {
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(home.join("vault.db")).busy_timeout(std::time::Duration::from_secs(10));
    sqlx::SqlitePool::connect_with(opts).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_workflow_end_to_end() {
    let mut env = Env::new();
    env.run(&["init", "--keyfile"], None, 0);
    // init refuses to overwrite.
    let out = env.run(&["init"], None, 1);
    assert!(out.contains("refusing to overwrite"), "{out}");

    // apply: a credential from an env var, one from a file, a policy, an agent; twice.
    let vf = env.write("value.txt", &format!("{CANARY2}\n"));
    let apply = env.write(
        "vault.toml",
        &format!(
            r#"
[[credential]]
key = "ci/deploy"
service = "deploy.example/api"
type = "api_key"
value_file = "{}"
scopes = ["deploy"]
max_ttl = 900
upstream = "https://deploy.example"
inject = "header:X-Api-Key"

[[credential]]
key = "db/main"
service = "db.example"
type = "connection_string"
value_env = "CRP_TEST_DB_VALUE"
classification = "restricted"

[[policy]]
name = "ci"
source = '''
@id("ci-use-deploy")
@reason("CI may use the deploy key")
permit (principal in Role::"ci", action == Action::"use", resource == Credential::"ci/deploy");
'''

[[agent]]
id = "ci-bot"
roles = ["ci"]
"#,
            vf.display()
        ),
    );
    let mut c = env.cmd();
    let out = c.args(["apply", apply.to_str().unwrap()]).env("CRP_TEST_DB_VALUE", "postgres://u:pw-7d1e9c0b5a4f3e2d1c0b9a8f@h/db").output().unwrap();
    env.output.extend_from_slice(&out.stdout);
    env.output.extend_from_slice(&out.stderr);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("credentials: 2 changed"));
    let out = env.cmd().args(["apply", apply.to_str().unwrap(), "--json"]).env("CRP_TEST_DB_VALUE", "postgres://u:pw-7d1e9c0b5a4f3e2d1c0b9a8f@h/db").output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["credentials_unchanged"], json!(["ci/deploy", "db/main"]), "apply is idempotent: {report}");
    assert_eq!(report["policies_unchanged"], json!(["60-ci.cedar"]));
    assert_eq!(report["agents_unchanged"], json!(["ci-bot"]));

    // credential add: the value only from stdin / file / env, never an argument.
    env.run(
        &["credential", "add", "gh/main", "--type", "api_key", "--service", "github.com/api", "--scopes", "read,write",
          "--upstream", "https://api.github.com", "--max-ttl", "600", "--value-stdin"],
        Some(&format!("{CANARY}\n")),
        0,
    );
    let out = env.run(&["credential", "add", "gh/x", "--type", "api_key", "--value", CANARY], None, 2);
    assert!(out.contains("unexpected argument"), "{out}");
    let list = env.run(&["credential", "list"], None, 0);
    assert!(list.contains("gh/main") && list.contains("ci/deploy") && list.contains("restricted"), "{list}");
    let show = env.run(&["credential", "show", "gh/main", "--json"], None, 0);
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(show["upstream"], "https://api.github.com");
    assert_eq!(show["scopes"], json!(["read", "write"]));

    // policy check: the starter policy lets the owner use, nobody retrieve; ci-bot via its role.
    let out = env.run(&["policy", "check", "--agent", "owner", "--action", "use", "--key", "gh/main"], None, 0);
    assert!(out.contains("owner-manage"), "{out}");
    let out = env.run(&["policy", "check", "--agent", "owner", "--action", "retrieve", "--key", "gh/main", "--json"], None, 1);
    let r: serde_json::Value = serde_json::from_str(&out.lines().take_while(|l| !l.is_empty()).collect::<Vec<_>>().join("\n")).unwrap_or(json!({}));
    assert_eq!(r["allowed"], false, "{out}");
    let out = env.run(&["policy", "check", "--agent", "ci-bot", "--action", "use", "--key", "ci/deploy"], None, 0);
    assert!(out.contains("ci-use-deploy"), "{out}");
    let bad = env.write("bad.cedar", "@id(\"x\")\npermit (principal, action, resource) when { resource.servce == \"a\" };\n");
    let out = env.run(&["policy", "validate", bad.to_str().unwrap()], None, 1);
    assert!(out.contains("bad.cedar:2:"), "error names file and line: {out}");

    // Leases: made in-process (another process on the same vault), managed by the CLI.
    let v = Vault::open(OpenOptions::new(env.home())).await.unwrap();
    let u = v.use_credential(&owner(), serde_json::from_value::<UseParams>(json!({"service": "github.com/api", "scopes": ["read"]})).unwrap()).await.unwrap();
    let token = u.session_token.clone().unwrap();
    let child = v
        .use_credential(&owner(), serde_json::from_value(json!({"service": "github.com/api", "delegation": {"parentLeaseId": u.lease.id}})).unwrap())
        .await
        .unwrap();
    assert_eq!(v.proxy_grant(&u.lease.id, &token).await.unwrap().secret.expose(), CANARY);
    let leases = env.run(&["lease", "list", "--state", "active", "--json"], None, 0);
    assert!(leases.contains(&u.lease.id) && leases.contains(&child.lease.id), "{leases}");
    let out = env.run(&["lease", "revoke", &u.lease.id], None, 0);
    assert!(out.contains("revoked 2 lease(s)") && out.contains(&child.lease.id), "{out}");
    // The revoke by another process takes effect on the very next proxied request.
    assert_eq!(v.proxy_grant(&u.lease.id, &token).await.unwrap_err().status, 403);
    assert_eq!(v.proxy_grant(&child.lease.id, child.session_token.as_deref().unwrap()).await.unwrap_err().status, 403);
    // Revoke by prefix.
    let a = v.use_credential(&owner(), serde_json::from_value(json!({"service": "github.com/api"})).unwrap()).await.unwrap();
    let out = env.run(&["lease", "revoke", "--prefix", &a.lease.id[..12]], None, 0);
    assert!(out.contains(&a.lease.id), "{out}");
    let e = v.revoke(&owner(), RevokeParams { lease_id: "lease_unknown".into(), reason: RevokeReason::Rotation, detail: None }).await.unwrap_err();
    assert_eq!(e.code, -33004);

    // Audit: query and verify.
    let out = env.run(&["audit", "--key", "gh/main", "--json", "--limit", "100"], None, 0);
    let evs: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = evs.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    for n in ["credential.stored", "credential.leased", "lease.delegated", "credential.revoked"] {
        assert!(names.contains(&n), "missing {n} in {names:?}");
    }
    let out = env.run(&["audit", "--since", "1h", "--action", "credential"], None, 0);
    assert!(out.contains("credential.leased"), "{out}");
    let out = env.run(&["audit", "verify"], None, 0);
    assert!(out.contains("audit chain intact"), "{out}");

    // Credential rm revokes its leases.
    let b = v.use_credential(&owner(), serde_json::from_value(json!({"service": "github.com/api"})).unwrap()).await.unwrap();
    let out = env.run(&["credential", "rm", "gh/main"], None, 0);
    assert!(out.contains(&b.lease.id), "{out}");
    env.run(&["credential", "show", "gh/main"], None, 1);

    // Canary search while the in-process vault still holds the database open (WAL present).
    let files = db_files(&env.home());
    assert!(files.len() >= 2, "vault.db and its WAL are present while the vault is open");
    for (f, bytes) in files {
        assert_no_canary(&f.display().to_string(), &bytes, &[CANARY, CANARY2, DBPW]);
    }
    v.shutdown().await;
    drop(v);
    for (f, bytes) in db_files(&env.home()) {
        assert_no_canary(&f.display().to_string(), &bytes, &[CANARY, CANARY2, DBPW]);
    }
    assert_no_canary("CLI output", &env.output, &[CANARY, CANARY2, DBPW]);
}

#[test]
fn wrong_key_is_a_clear_error_never_an_empty_vault() {
    let mut env = Env::new();
    let good = env.write("pass", "correct horse battery staple\n");
    let bad = env.write("bad", "incorrect horse battery\n");
    env.run(&["init", "--passphrase-file", good.to_str().unwrap()], None, 0);
    env.run(&["credential", "add", "k", "--type", "api_key", "--value-env", "CRP_T", "--passphrase-file", good.to_str().unwrap()], None, 1);
    let mut c = env.cmd();
    let out = c
        .args(["--passphrase-file", good.to_str().unwrap(), "credential", "add", "k", "--type", "api_key", "--value-env", "CRP_T"])
        .env("CRP_T", CANARY)
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = env.run(&["--passphrase-file", bad.to_str().unwrap(), "credential", "list"], None, 3);
    assert!(out.contains("wrong passphrase or keyfile for this vault"), "{out}");
    let out = env.run(&["credential", "list"], None, 3);
    assert!(out.contains("CRP_PASSPHRASE"), "{out}");
    let out = env.cmd().args(["credential", "list"]).env("CRP_PASSPHRASE", "correct horse battery staple").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("k "), "{}", String::from_utf8_lossy(&out.stdout));
    // A keyfile vault with a different keyfile.
    let mut env2 = Env::new();
    env2.run(&["init", "--keyfile"], None, 0);
    std::fs::write(env2.home().join("vault.key"), format!("{}\n", "ab".repeat(32))).unwrap();
    let out = env2.run(&["credential", "list"], None, 3);
    assert!(out.contains("wrong passphrase or keyfile for this vault"), "{out}");
    let out = env2.run(&["--home", env2.dir.path().join("nowhere").to_str().unwrap(), "credential", "list"], None, 3);
    assert!(out.contains("crp-provider init"), "{out}");
    assert_no_canary("CLI output", &env.output, &[CANARY]);
}

/// Make a vault with a few audit entries; return the env.
fn audited_vault() -> Env {
    let mut env = Env::new();
    env.run(&["init"], None, 0);
    for k in ["a", "b", "c", "d"] {
        env.run(&["credential", "add", k, "--type", "api_key", "--value-stdin"], Some(CANARY), 0);
    }
    env.run(&["audit", "verify"], None, 0);
    env
}

#[tokio::test]
async fn audit_verify_detects_an_edited_entry() {
    let mut env = audited_vault();
    let pool = sqlite(&env.home()).await;
    sqlx::query("UPDATE audit SET requester = 'someone-else' WHERE seq = 2").execute(&pool).await.unwrap();
    pool.close().await;
    let out = env.run(&["audit", "verify"], None, 4);
    assert!(out.contains("entry 2: MAC mismatch"), "{out}");
}

#[tokio::test]
async fn audit_verify_detects_a_deleted_entry() {
    let mut env = audited_vault();
    let pool = sqlite(&env.home()).await;
    sqlx::query("DELETE FROM audit WHERE seq = 2").execute(&pool).await.unwrap();
    pool.close().await;
    let out = env.run(&["audit", "verify"], None, 4);
    assert!(out.contains("missing (deleted)"), "{out}");
    // Deleting the tail is caught by the recorded chain head.
    let mut env = audited_vault();
    let pool = sqlite(&env.home()).await;
    sqlx::query("DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)").execute(&pool).await.unwrap();
    pool.close().await;
    let out = env.run(&["audit", "verify"], None, 4);
    assert!(out.contains("chain head"), "{out}");
}

#[tokio::test]
async fn audit_verify_detects_reordered_entries() {
    let mut env = audited_vault();
    let pool = sqlite(&env.home()).await;
    // Swap entries 2 and 3 (contents move, sequence numbers stay in order).
    sqlx::query("UPDATE audit SET seq = -2 WHERE seq = 2").execute(&pool).await.unwrap();
    sqlx::query("UPDATE audit SET seq = 2 WHERE seq = 3").execute(&pool).await.unwrap();
    sqlx::query("UPDATE audit SET seq = 3 WHERE seq = -2").execute(&pool).await.unwrap();
    pool.close().await;
    let out = env.run(&["audit", "verify"], None, 4);
    assert!(out.contains("MAC mismatch"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_failure_refuses_the_operation_and_leaves_state_intact() {
    let mut env = Env::new();
    env.run(&["init"], None, 0);
    env.run(&["credential", "add", "gh/main", "--type", "api_key", "--service", "github.com/api", "--value-stdin"], Some(CANARY), 0);
    let v = Vault::open(OpenOptions::new(env.home())).await.unwrap();
    let pool = sqlite(&env.home()).await;
    sqlx::query("CREATE TRIGGER block_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'audit is read-only'); END")
        .execute(&pool)
        .await
        .unwrap();
    // crp/use is refused with -33010 and no lease exists afterwards.
    let e = v.use_credential(&owner(), serde_json::from_value(json!({"service": "github.com/api"})).unwrap()).await.unwrap_err();
    assert_eq!(e.code, -33010, "{e:?}");
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM leases").fetch_one(&pool).await.unwrap();
    assert_eq!(n, 0);
    // A denial that cannot be audited is also refused as a provider error.
    let e = v
        .use_credential(&CallContext::new("stranger", Transport::Http), serde_json::from_value(json!({"service": "github.com/api"})).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.code, -33010);
    // The operator's store is refused too, and nothing was stored.
    let out = env.run(&["credential", "add", "new/key", "--type", "api_key", "--value-stdin"], Some(CANARY), 1);
    assert!(out.contains("audit log unavailable"), "{out}");
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM credentials WHERE key = 'new/key'").fetch_one(&pool).await.unwrap();
    assert_eq!(n, 0);
    // Once the audit is writable again everything works and the chain is intact.
    sqlx::query("DROP TRIGGER block_audit").execute(&pool).await.unwrap();
    v.use_credential(&owner(), serde_json::from_value(json!({"service": "github.com/api"})).unwrap()).await.unwrap();
    env.run(&["audit", "verify"], None, 0);
    pool.close().await;
    v.shutdown().await;
    assert_no_canary("CLI output", &env.output, &[CANARY]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_approval_then_operator_approves_once() {
    let mut env = Env::new();
    env.run(&["init"], None, 0);
    env.run(&["credential", "add", "prod/db", "--type", "api_key", "--service", "prod.db", "--value-stdin"], Some(CANARY), 0);
    let apply = env.write(
        "p.toml",
        r#"
[[policy]]
name = "approval"
source = '''
@id("prod-needs-approval")
@reason("Production needs a human")
@outcome("require_approval")
permit (principal == Agent::"deployer", action == Action::"use", resource == Credential::"prod/db");
@id("quarantine-intern")
@reason("Interns are quarantined")
@outcome("quarantine")
permit (principal == Agent::"intern", action == Action::"use", resource);
'''
"#,
    );
    env.run(&["apply", apply.to_str().unwrap()], None, 0);
    let v = Vault::open(OpenOptions::new(env.home())).await.unwrap();
    let deployer = CallContext::new("deployer", Transport::Http);
    let req = || serde_json::from_value::<UseParams>(json!({"service": "prod.db", "ttl": 60})).unwrap();
    let e = v.use_credential(&deployer, req()).await.unwrap_err();
    assert_eq!(e.code, -33020);
    let data = e.data.unwrap();
    assert_eq!(data.policy.as_deref(), Some("prod-needs-approval"));
    let id = data.approval_id.unwrap();
    // Asking again while pending gives the same approval id.
    let again = v.use_credential(&deployer, req()).await.unwrap_err();
    assert_eq!(again.data.unwrap().approval_id.as_deref(), Some(id.as_str()));
    let out = env.run(&["approvals", "list"], None, 0);
    assert!(out.contains(&id) && out.contains("deployer"), "{out}");
    env.run(&["approvals", "approve", &id], None, 0);
    env.run(&["approvals", "approve", &id], None, 1);
    // Exactly once.
    v.use_credential(&deployer, req()).await.unwrap();
    assert_eq!(v.use_credential(&deployer, req()).await.unwrap_err().code, -33020);
    // Quarantine.
    let e = v.use_credential(&CallContext::new("intern", Transport::Http), req()).await.unwrap_err();
    assert_eq!(e.code, -33021);
    let out = env.run(&["audit", "--json", "--limit", "100"], None, 0);
    assert!(out.contains("approval.required") && out.contains("credential.quarantined"), "{out}");
    v.shutdown().await;
}

#[test]
fn agent_bootstrap_register_approve_disable() {
    let mut env = Env::new();
    env.run(&["init"], None, 0);
    let out = env.run(&["agent", "bootstrap", "--name", "builder", "--scopes", "crp:use", "--role", "ci", "--json"], None, 0);
    let b: serde_json::Value = serde_json::from_str(&out).unwrap();
    let token = b["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("crpbt_") && token.len() >= 6 + 43);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let v = Vault::open(OpenOptions::new(env.home())).await.unwrap();
        let key = base64::engine::general_purpose::STANDARD.encode(ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key().to_bytes());
        let a = v.register_agent(&token, &key, Some("Builder bot")).await.unwrap();
        assert_eq!(a.id, "builder");
        assert_eq!(a.roles, vec!["ci"]);
        // One-shot.
        assert!(v.register_agent(&token, &key, None).await.is_err());
        // A pending agent is refused.
        let e = v.list(&CallContext::new("builder", Transport::Http), Default::default()).await.unwrap_err();
        assert!(e.message.contains("pending"), "{e:?}");
        v.shutdown().await;
    });
    let out = env.run(&["agent", "list"], None, 0);
    assert!(out.contains("builder") && out.contains("pending"), "{out}");
    env.run(&["agent", "approve", "builder"], None, 0);
    let out = env.run(&["agent", "list", "--json"], None, 0);
    assert!(out.contains("\"active\""), "{out}");
    env.run(&["agent", "disable", "builder"], None, 0);
    env.run(&["agent", "enable", "nobody"], None, 1);
    // The token is never stored in clear.
    for (_, bytes) in db_files(&env.home()) {
        assert_no_canary("db", &bytes, &[&token]);
    }
}

#[test]
fn canary_search_finds_every_encoding() {
    for enc in encodings(CANARY) {
        let mut blob = vec![0x5au8; 37];
        blob.extend_from_slice(&enc);
        blob.extend_from_slice(&[0xa5; 11]);
        let r = std::panic::catch_unwind(|| assert_no_canary("blob", &blob, &[CANARY]));
        assert!(r.is_err(), "an encoding was not detected");
    }
    // Base64 of the canary inside a longer base64 blob, at every alignment.
    for pre in ["", "x", "xy"] {
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{pre}{CANARY}tail"));
        assert!(std::panic::catch_unwind(|| assert_no_canary("b64", b.as_bytes(), &[CANARY])).is_err(), "alignment {pre:?}");
    }
    assert_no_canary("clean", &[0u8; 4096], &[CANARY]);
}
