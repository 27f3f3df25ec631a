//! The vault's read caches (agents, credential attributes, the delegation depth cap, lease
//! facts, decoded public keys) stay exact across processes: each change that must refuse or
//! alter the next request, made by *another process* on the same vault, takes effect on the
//! very next request of a process whose caches hold the old value. "Another process" is a
//! second `Vault` handle on the same home (its own caches; it shares only the database and the
//! change-stamp file), or the real `crp-provider` binary run against a serving vault.

mod http_support;
mod pg_support;

use assert_cmd::Command;
use crp_core::provider::Transport;
use crp_core::signing::{self, encode_public_key, generate_key, new_nonce};
use crp_core::types::ext;
use crp_core::types::{LeaseAction, LeaseParams, RevokeParams, RevokeReason, UseParams, UseResult};
use crp_core::{CallContext, CrpError, Provider};
use crp_provider::agents::{AgentRecord, AgentStatus};
use crp_provider::vault::{OpenOptions, Unlock, Vault};
use http_support::*;
use serde_json::{Value, json};

fn owner() -> CallContext {
    CallContext::new(Vault::owner_agent(), Transport::InProcess)
}

fn bot_ctx() -> CallContext {
    CallContext::new("bot", Transport::InProcess)
}

async fn store(v: &Vault, key: &str, service: &str, scopes: &[&str]) {
    let r = v
        .extension(
            &owner(),
            ext::VAULT_STORE,
            json!({"key": key, "value": "crp-canary-readcache-5e6f7a8b", "service": service, "scopes": scopes,
                   "upstream": "http://127.0.0.1:9/base", "max_ttl": 600}),
        )
        .await
        .unwrap();
    assert_eq!(r["stored"], true);
}

async fn use_svc(v: &Vault, ctx: &CallContext, params: Value) -> Result<UseResult, CrpError> {
    v.use_credential(ctx, serde_json::from_value::<UseParams>(params).unwrap()).await
}

async fn release(v: &Vault, ctx: &CallContext, id: &str) -> Result<(), CrpError> {
    v.lease(ctx, LeaseParams { action: LeaseAction::Release, lease_id: id.to_string(), ttl: None }).await.map(|_| ())
}

/// Two handles on one vault: `a` serves (and caches), `b` is the other process.
async fn two_processes() -> (Vault, Vault, tempfile::TempDir) {
    let (a, dir) = Vault::open_ephemeral().await.unwrap();
    let b = Vault::open(OpenOptions::new(dir.path())).await.unwrap();
    (a, b, dir)
}

fn bot(roles: &[&str], status: AgentStatus) -> AgentRecord {
    AgentRecord {
        id: "bot".into(),
        name: "Bot".into(),
        public_key: String::new(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        scopes: vec![],
        status,
    }
}

#[tokio::test]
async fn an_agent_disabled_or_stripped_of_its_role_by_another_process_is_refused_at_once() {
    let (a, b, _dir) = two_processes().await;
    store(&a, "k", "svc", &["read"]).await;
    a.install_policy(
        "20-bot.cedar",
        "@id(\"bot-use\")\n@reason(\"bots use\")\npermit (principal in Role::\"bots\", action in [Action::\"use\", Action::\"release\"], resource);\n",
    )
    .unwrap();
    a.upsert_agent(&bot(&["bots"], AgentStatus::Active)).await.unwrap();
    for _ in 0..2 {
        use_svc(&a, &bot_ctx(), json!({"service": "svc"})).await.unwrap();
    }

    b.set_agent_status("bot", AgentStatus::Disabled).await.unwrap();
    let e = use_svc(&a, &bot_ctx(), json!({"service": "svc"})).await.unwrap_err();
    assert_eq!(e.code, -33003, "{e:?}");
    assert!(e.message.contains("agent is disabled"), "{e:?}");
    assert!(a.agent("bot").await.unwrap().is_some_and(|r| r.status == AgentStatus::Disabled));

    b.set_agent_status("bot", AgentStatus::Active).await.unwrap();
    let u = use_svc(&a, &bot_ctx(), json!({"service": "svc"})).await.unwrap();

    // Roles are what policy sees: without `bots` nothing permits it.
    b.upsert_agent(&bot(&[], AgentStatus::Active)).await.unwrap();
    let e = use_svc(&a, &bot_ctx(), json!({"service": "svc"})).await.unwrap_err();
    assert_eq!(e.code, -33003, "{e:?}");
    let e = release(&a, &bot_ctx(), &u.lease.id).await.unwrap_err();
    assert_eq!(e.code, -33003, "release is decided on the current roles too: {e:?}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_credential_changed_or_deleted_by_another_process_is_seen_by_the_next_use() {
    let (a, b, _dir) = two_processes().await;
    store(&a, "k", "svc", &["read"]).await;
    for _ in 0..2 {
        use_svc(&a, &owner(), json!({"service": "svc", "scopes": ["read"]})).await.unwrap();
    }
    let e = use_svc(&a, &owner(), json!({"service": "svc", "scopes": ["write"]})).await.unwrap_err();
    assert_eq!(e.code, -33009, "{e:?}");

    // New scopes.
    store(&b, "k", "svc", &["read", "write"]).await;
    let held = use_svc(&a, &owner(), json!({"service": "svc", "scopes": ["write"]})).await.unwrap();
    assert_eq!(held.granted_scopes, vec!["write".to_string()]);

    // Moved to another service.
    store(&b, "k", "svc2", &["read"]).await;
    let e = use_svc(&a, &owner(), json!({"service": "svc"})).await.unwrap_err();
    assert_eq!(e.code, -33002, "{e:?}");
    use_svc(&a, &owner(), json!({"service": "svc2"})).await.unwrap();

    // Restricted by classification: a forbid on restricted credentials now applies to `k`.
    a.install_policy(
        "90-no-restricted.cedar",
        "@id(\"no-restricted\")\n@reason(\"restricted credentials are off limits\")\nforbid (principal, action == Action::\"use\", resource) when { resource.classification == \"restricted\" };\n",
    )
    .unwrap();
    use_svc(&a, &owner(), json!({"service": "svc2"})).await.unwrap();
    b.extension(
        &owner(),
        ext::VAULT_STORE,
        json!({"key": "k", "value": "v2", "service": "svc2", "scopes": ["read"], "classification": "restricted",
               "upstream": "http://127.0.0.1:9/base"}),
    )
    .await
    .unwrap();
    let e = use_svc(&a, &owner(), json!({"service": "svc2"})).await.unwrap_err();
    assert_eq!(e.code, -33003, "{e:?}");
    assert!(e.message.contains("off limits"), "{e:?}");

    // Deleted.
    b.admin_delete("k").await.unwrap();
    let e = use_svc(&a, &owner(), json!({"service": "svc2"})).await.unwrap_err();
    assert_eq!(e.code, -33002, "{e:?}");
    // The lease taken before the deletion was revoked with it; releasing it is refused.
    let e = release(&a, &owner(), &held.lease.id).await.unwrap_err();
    assert_eq!(e.code, -33006, "{e:?}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_depth_cap_changed_by_another_process_applies_to_the_next_delegation() {
    let (a, b, _dir) = two_processes().await;
    store(&a, "k", "svc", &["read"]).await;
    let parent = use_svc(&a, &owner(), json!({"service": "svc"})).await.unwrap();
    let me = owner();
    let delegate = || use_svc(&a, &me, json!({"service": "svc", "delegation": {"parentLeaseId": parent.lease.id}}));
    delegate().await.unwrap();
    delegate().await.unwrap();

    b.set_max_delegation_depth(0).await.unwrap();
    let e = delegate().await.unwrap_err();
    assert_eq!(e.code, -33013, "{e:?}");

    b.set_max_delegation_depth(4).await.unwrap();
    let child = delegate().await.unwrap();
    assert_eq!(child.lease.delegation_depth, Some(1));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn release_sees_what_other_processes_did_to_the_lease() {
    let (a, b, _dir) = two_processes().await;
    store(&a, "k", "svc", &["read"]).await;

    // Released or revoked elsewhere after this process granted it (and knows its facts).
    let l = use_svc(&a, &owner(), json!({"service": "svc"})).await.unwrap();
    release(&b, &owner(), &l.lease.id).await.unwrap();
    let e = release(&a, &owner(), &l.lease.id).await.unwrap_err();
    assert_eq!(e.code, -33006, "{e:?}");
    assert!(e.message.contains("released"), "{e:?}");

    let l = use_svc(&a, &owner(), json!({"service": "svc"})).await.unwrap();
    b.revoke(&owner(), RevokeParams { lease_id: l.lease.id.clone(), reason: RevokeReason::Rotation, detail: None })
        .await
        .unwrap();
    let e = release(&a, &owner(), &l.lease.id).await.unwrap_err();
    assert!(e.code == -33006 && e.message.contains("revoked"), "{e:?}");

    // Granted elsewhere: read from the database, released here.
    let l = use_svc(&b, &owner(), json!({"service": "svc"})).await.unwrap();
    release(&a, &owner(), &l.lease.id).await.unwrap();
    let e = release(&a, &owner(), &l.lease.id).await.unwrap_err();
    assert_eq!(e.code, -33006, "a second release is refused: {e:?}");

    // Only the holder may release; unknown ids are not found.
    a.install_policy(
        "20-bot.cedar",
        "@id(\"bot-release\")\n@reason(\"bots release\")\npermit (principal in Role::\"bots\", action == Action::\"release\", resource);\n",
    )
    .unwrap();
    b.upsert_agent(&bot(&["bots"], AgentStatus::Active)).await.unwrap();
    let l = use_svc(&a, &owner(), json!({"service": "svc"})).await.unwrap();
    let e = release(&a, &bot_ctx(), &l.lease.id).await.unwrap_err();
    assert_eq!(e.code, -33004, "{e:?}");
    let e = release(&a, &owner(), "lease_00000000000000000000000000000000").await.unwrap_err();
    assert_eq!(e.code, -33004, "{e:?}");
    release(&a, &owner(), &l.lease.id).await.unwrap();

    // Every outcome above is in the audit log, in one intact chain.
    let released = a
        .extension(&owner(), ext::AUDIT_QUERY, json!({"action": "lease.released", "limit": 100}))
        .await
        .unwrap();
    assert_eq!(released["events"].as_array().map(Vec::len), Some(3), "{released}");
    a.shutdown().await;
    b.shutdown().await;
}

// ------------------------------------------------------------------ the real CLI, over HTTP

fn doc(alice: &signing::AgentSigningKey) -> String {
    format!(
        r#"
[[credential]]
key = "svc/main"
service = "svc"
value = "crp-canary-readcache-http-1f2e3d4c"
upstream = "http://127.0.0.1:9/"

[[policy]]
name = "alice"
source = '''
@id("alice-use")
@reason("test")
permit (principal == Agent::"alice", action in [Action::"use", Action::"release"], resource);
'''

[[agent]]
id = "alice"
public_key = "{}"
scopes = ["crp:*"]
status = "active"
"#,
        encode_public_key(&alice.verifying_key())
    )
}

/// A signed JSON-RPC call as alice: (HTTP status, body).
async fn call(base: &str, key: &signing::AgentSigningKey, method: &str, params: Value) -> (u16, Value) {
    let body = serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})).unwrap();
    let r = signed(base, "/crp", "alice", key, &body, now(), new_nonce().unwrap()).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Run the real binary on `home`; it must succeed.
fn cli(home: &std::path::Path, args: &[&str]) {
    let out = Command::cargo_bin("crp-provider")
        .unwrap()
        .env("CRP_HOME", home)
        .env_remove("CRP_PASSPHRASE")
        .env_remove("CRP_DATABASE_URL")
        .args(args)
        .timeout(std::time::Duration::from_secs(60))
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn the_cli_disabling_an_agent_or_deleting_a_credential_cuts_the_next_signed_request() {
    let alice = generate_key().unwrap();
    let (vault, dir) = vault_with(&doc(&alice)).await;
    let server = serve(&vault, false).await;
    let base = server.base_url();
    for _ in 0..2 {
        let (status, v) = call(&base, &alice, "crp/use", json!({"service": "svc"})).await;
        assert!(status == 200 && v["result"]["lease"]["id"].is_string(), "{v}");
    }

    cli(dir.path(), &["agent", "disable", "alice"]);
    let (status, v) = call(&base, &alice, "crp/use", json!({"service": "svc"})).await;
    assert_eq!((status, v["error"]["message"].as_str()), (401, Some("auth_failure: agent is disabled")), "{v}");

    cli(dir.path(), &["agent", "enable", "alice"]);
    let (status, v) = call(&base, &alice, "crp/use", json!({"service": "svc"})).await;
    assert_eq!(status, 200, "{v}");
    let lease = v["result"]["lease"]["id"].as_str().unwrap().to_string();

    cli(dir.path(), &["credential", "rm", "svc/main"]);
    let (status, v) = call(&base, &alice, "crp/use", json!({"service": "svc"})).await;
    assert_eq!((status, v["error"]["code"].as_i64()), (200, Some(-33002)), "{v}");
    let (_, v) = call(&base, &alice, "crp/lease", json!({"action": "release", "leaseId": lease})).await;
    assert_eq!(v["error"]["code"].as_i64(), Some(-33006), "revoked with its credential: {v}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_public_key_replaced_by_another_process_is_the_only_one_accepted_next() {
    let old = generate_key().unwrap();
    let (vault, dir) = vault_with(&doc(&old)).await;
    let server = serve(&vault, false).await;
    let base = server.base_url();
    for _ in 0..2 {
        assert_eq!(call(&base, &old, "crp/use", json!({"service": "svc"})).await.0, 200);
    }
    let new = generate_key().unwrap();
    let other = Vault::open(OpenOptions::new(dir.path())).await.unwrap();
    let mut rec = other.agent("alice").await.unwrap().unwrap();
    rec.public_key = encode_public_key(&new.verifying_key());
    other.upsert_agent(&rec).await.unwrap();
    let (status, v) = call(&base, &old, "crp/use", json!({"service": "svc"})).await;
    assert_eq!((status, v["error"]["message"].as_str()), (401, Some("auth_failure: bad signature")), "{v}");
    assert_eq!(call(&base, &new, "crp/use", json!({"service": "svc"})).await.0, 200);
    other.shutdown().await;
    server.shutdown().await;
}

/// On PostgreSQL (no change stamps: the caches always miss) the same changes are seen at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_every_change_by_another_process_is_seen_at_once() {
    let Some(db) = pg_support::TestDatabase::create("crp_read_caches").await else { return };
    let home = tempfile::tempdir().unwrap();
    let key = home.path().join("vault.key");
    Vault::init_with(home.path(), Unlock::Keyfile(key.clone()), Some(&db.url)).await.unwrap();
    let open = || Vault::open(OpenOptions { home: home.path().into(), unlock: Some(Unlock::Keyfile(key.clone())), database_url: Some(db.url.clone()) });
    let (a, b) = (open().await.unwrap(), open().await.unwrap());
    assert!(!a.epochs().enabled());
    store(&a, "k", "svc", &["read"]).await;
    a.install_policy("20-bot.cedar", "@id(\"bot-use\")\npermit (principal in Role::\"bots\", action == Action::\"use\", resource);\n").unwrap();
    a.upsert_agent(&bot(&["bots"], AgentStatus::Active)).await.unwrap();
    let parent = use_svc(&a, &owner(), json!({"service": "svc"})).await.unwrap();
    use_svc(&a, &bot_ctx(), json!({"service": "svc"})).await.unwrap();

    b.set_agent_status("bot", AgentStatus::Disabled).await.unwrap();
    assert_eq!(use_svc(&a, &bot_ctx(), json!({"service": "svc"})).await.unwrap_err().code, -33003);
    b.set_max_delegation_depth(0).await.unwrap();
    let e = use_svc(&a, &owner(), json!({"service": "svc", "delegation": {"parentLeaseId": parent.lease.id}})).await.unwrap_err();
    assert_eq!(e.code, -33013, "{e:?}");
    b.admin_delete("k").await.unwrap();
    assert_eq!(use_svc(&a, &owner(), json!({"service": "svc"})).await.unwrap_err().code, -33002);
    let e = release(&a, &owner(), &parent.lease.id).await.unwrap_err();
    assert_eq!(e.code, -33006, "revoked with its credential: {e:?}");
    for v in [a, b] {
        v.shutdown().await;
        v.store().close().await;
    }
    db.drop_database().await;
}

/// Policy files changed on disk — by another process's `install_policy`, or rewritten in place
/// the way an editor does — govern the very next decision of a process that has been serving
/// (its directory watch armed and quiet).
#[tokio::test]
async fn policy_files_changed_on_disk_govern_the_next_decision() {
    let (a, b, dir) = two_processes().await;
    store(&a, "k", "svc", &["read"]).await;
    for _ in 0..3 {
        use_svc(&a, &owner(), json!({"service": "svc"})).await.unwrap();
    }
    let forbid = "@id(\"no-svc\")\n@reason(\"svc is closed\")\nforbid (principal, action == Action::\"use\", resource) when { resource.service == \"svc\" };\n";
    b.install_policy("90-close.cedar", forbid).unwrap();
    let e = use_svc(&a, &owner(), json!({"service": "svc"})).await.unwrap_err();
    assert!(e.code == -33003 && e.message.contains("svc is closed"), "{e:?}");

    // Rewritten in place (same file, new text): the forbid now names another service.
    let path = dir.path().join("policies/90-close.cedar");
    std::fs::write(&path, forbid.replace("== \"svc\"", "== \"other-svc\"").replace("svc is closed", "other closed")).unwrap();
    use_svc(&a, &owner(), json!({"service": "svc"})).await.unwrap();

    // Deleted.
    std::fs::write(&path, forbid).unwrap();
    assert_eq!(use_svc(&a, &owner(), json!({"service": "svc"})).await.unwrap_err().code, -33003);
    std::fs::remove_file(&path).unwrap();
    use_svc(&a, &owner(), json!({"service": "svc"})).await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}
