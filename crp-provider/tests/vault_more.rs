//! Vault behaviour beyond the happy path: hard expiry and the reaper, brokered credentials
//! against a local token endpoint, concurrency (group commit, several processes on one file),
//! and the same storage layer on PostgreSQL (when `CRP_TEST_POSTGRES_URL` is set, as
//! scripts/test.sh does).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crp_core::provider::Transport;
use crp_core::types::ext::{self, InjectionRule};
use crp_core::types::{Classification, LeaseAction, LeaseParams, RevokeParams, RevokeReason, UseParams};
use crp_core::{CallContext, Provider, SecretValue};
use crp_provider::credentials::{BrokerConfig, CredentialConfig, CredentialKind, NewCredential};
use crp_provider::vault::{OpenOptions, Unlock, Vault, VaultError};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod pg_support;

const CANARY: &str = "crp-canary-more00112233445566778899aabbccddeeff";

fn owner() -> CallContext {
    CallContext::new("owner", Transport::InProcess)
}

fn cred(key: &str, service: &str, max_ttl: Option<u32>) -> NewCredential {
    NewCredential {
        key: key.into(),
        service: service.into(),
        kind: CredentialKind::ApiKey,
        classification: Classification::Internal,
        tags: vec![],
        scopes: vec!["read".into()],
        max_ttl,
        renewable: true,
        metadata: BTreeMap::new(),
        expires_at: None,
        value: SecretValue::new(CANARY),
        config: CredentialConfig {
            upstream: Some("http://127.0.0.1:9".into()),
            injection: InjectionRule::Header { name: "Authorization".into(), prefix: "Bearer".into() },
            allowed_private_hosts: vec!["127.0.0.1".into()],
            broker: None,
        },
    }
}

fn use_p(service: &str, ttl: Option<u32>) -> UseParams {
    serde_json::from_value(json!({"service": service, "ttl": ttl})).unwrap()
}

#[tokio::test]
async fn expiry_is_hard_and_the_reaper_audits_it() {
    let (v, _d) = Vault::open_ephemeral().await.unwrap();
    v.admin_store(&cred("short/one", "short.svc", Some(1))).await.unwrap();
    let u = v.use_credential(&owner(), use_p("short.svc", Some(600))).await.unwrap();
    assert_eq!(u.lease.ttl, 1, "granted TTL is capped by the credential's max");
    let tok = u.session_token.clone().unwrap();
    assert!(v.proxy_grant(&u.lease.id, &tok).await.is_ok());
    // Wait out the 1-second lease (the only way to observe wall-clock expiry).
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(v.proxy_grant(&u.lease.id, &tok).await.unwrap_err().status, 410);
    let e = v.lease(&owner(), LeaseParams { action: LeaseAction::Renew, lease_id: u.lease.id.clone(), ttl: None }).await.unwrap_err();
    assert_eq!(e.code, -33005);
    let reaped = v.reap_now().await.unwrap();
    assert!(reaped.contains(&u.lease.id));
    assert!(v.reap_now().await.unwrap().is_empty(), "reaped once");
    let a = v.audit_query(&ext::AuditQueryParams { action: Some("lease.expired".into()), ..Default::default() }).await.unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].lease_id.as_deref(), Some(u.lease.id.as_str()));
    assert_eq!(v.lease_record(&u.lease.id).await.unwrap().unwrap().state.as_str(), "expired");
    // A non-renewable credential's lease is not renewable.
    let mut nr = cred("nr/one", "nr.svc", Some(60));
    nr.renewable = false;
    v.admin_store(&nr).await.unwrap();
    let u = v.use_credential(&owner(), use_p("nr.svc", None)).await.unwrap();
    assert!(!u.lease.renewable);
    let e = v.lease(&owner(), LeaseParams { action: LeaseAction::Renew, lease_id: u.lease.id.clone(), ttl: None }).await.unwrap_err();
    assert_eq!(e.code, -33006);
    // Release, then the proxy refuses with 403 and a second release is refused.
    v.lease(&owner(), LeaseParams { action: LeaseAction::Release, lease_id: u.lease.id.clone(), ttl: None }).await.unwrap();
    assert_eq!(v.proxy_grant(&u.lease.id, u.session_token.as_deref().unwrap()).await.unwrap_err().status, 403);
    assert!(v.lease(&owner(), LeaseParams { action: LeaseAction::Release, lease_id: u.lease.id.clone(), ttl: None }).await.is_err());
    assert!(v.audit_verify().await.unwrap().ok);
}

/// A minimal OAuth2 token endpoint on loopback: counts requests, answers a fresh token each time.
async fn token_endpoint() -> (String, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { break };
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let body_ok = String::from_utf8_lossy(&buf).contains("grant_type=client_credentials");
                let n = h.fetch_add(1, Ordering::SeqCst) + 1;
                let body = json!({"access_token": format!("minted-token-{n}-0f1e2d3c4b5a"), "token_type": "Bearer", "expires_in": 300}).to_string();
                let resp = if body_ok {
                    format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
                } else {
                    "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string()
                };
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (format!("http://{addr}/oauth/token"), hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokered_credential_mints_caches_and_never_exports() {
    let (token_url, hits) = token_endpoint().await;
    let (v, _d) = Vault::open_ephemeral().await.unwrap();
    let mut c = cred("idp/client", "api.brokered", Some(600));
    c.kind = CredentialKind::Oauth2ClientCredentials;
    c.config.broker = Some(BrokerConfig { token_url, client_id: "client-1".into(), scopes: vec!["api".into()] });
    v.admin_store(&c).await.unwrap();
    let u = v.use_credential(&owner(), use_p("api.brokered", None)).await.unwrap();
    assert!(u.credential_descriptor.brokered && u.credential_descriptor.auto_refresh);
    let tok = u.session_token.clone().unwrap();
    let g = v.proxy_grant(&u.lease.id, &tok).await.unwrap();
    assert!(g.brokered);
    assert_eq!(g.secret.expose(), "minted-token-1-0f1e2d3c4b5a", "the minted token is injected, never the client secret");
    let g2 = v.proxy_grant(&u.lease.id, &tok).await.unwrap();
    assert_eq!(g2.secret.expose(), g.secret.expose(), "cached until near expiry");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let fresh = v.broker_refresh(&u.lease.id).await.unwrap();
    assert_eq!(fresh.expose(), "minted-token-2-0f1e2d3c4b5a");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    // Neither the client secret nor a token leaves through the API, even with an export policy.
    v.install_policy(
        "70-export.cedar",
        "@id(\"owner-export\")\n@reason(\"test\")\npermit (principal == Agent::\"owner\", action in [Action::\"retrieve\", Action::\"resolve\"], resource);\n",
    )
    .unwrap();
    let e = v.extension(&owner(), ext::VAULT_RETRIEVE, json!({"key": "idp/client", "purpose": "test"})).await.unwrap_err();
    assert_eq!(e.code, -33011);
    let d = crp_core::Dispatcher::new(Arc::new(v.clone()));
    let out = d
        .handle_bytes(&owner().with_version(crp_core::Version::V0_1), br#"{"jsonrpc":"2.0","id":1,"method":"crp/resolve","params":{"service":"api.brokered"}}"#)
        .await
        .unwrap();
    assert!(out.contains("-33011") && !out.contains(CANARY) && !out.contains("minted-token"), "{out}");
    // A plain credential with the export policy is exported (audited) under 0.1.
    v.admin_store(&cred("plain/one", "plain.svc", None)).await.unwrap();
    let out = d
        .handle_bytes(&owner().with_version(crp_core::Version::V0_1), br#"{"jsonrpc":"2.0","id":2,"method":"crp/resolve","params":{"service":"plain.svc"}}"#)
        .await
        .unwrap();
    assert!(out.contains(CANARY), "{out}");
    let a = v.audit_query(&ext::AuditQueryParams { key: Some("plain/one".into()), ..Default::default() }).await.unwrap();
    assert!(a.iter().any(|e| e.action == "credential.resolved") && a.iter().any(|e| e.action == "credential.exported"));
    assert!(!serde_json::to_string(&a).unwrap().contains(CANARY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_and_processes_keep_one_audit_chain() {
    let (v, dir) = Vault::open_ephemeral().await.unwrap();
    v.admin_store(&cred("c/one", "c.svc", None)).await.unwrap();
    // Other processes write to the same file at the same time.
    let bin = assert_cmd::cargo::cargo_bin("crp-provider");
    let mut children = Vec::new();
    for i in 0..3 {
        let mut cmd = std::process::Command::new(&bin);
        cmd.env("CRP_HOME", dir.path())
            .env("CRP_T_VALUE", CANARY)
            .args(["credential", "add", &format!("proc/{i}"), "--type", "api_key", "--value-env", "CRP_T_VALUE"])
            .stdout(std::process::Stdio::null());
        children.push(cmd.spawn().unwrap());
    }
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let v = v.clone();
        tasks.push(tokio::spawn(async move { v.use_credential(&owner(), use_p("c.svc", Some(60))).await.map(|u| u.lease.id) }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap().unwrap());
    }
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let report = v.audit_verify().await.unwrap();
    assert!(report.ok, "{report:?}");
    assert!(report.entries >= 1 + 40 + 3);
    let leased = v.audit_query(&ext::AuditQueryParams { action: Some("credential.leased".into()), limit: Some(1000), ..Default::default() }).await.unwrap();
    assert_eq!(leased.len(), 40);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 40, "lease ids are unique");
}

/// The same operations on PostgreSQL. scripts/test.sh starts a throwaway server and exports
/// `CRP_TEST_POSTGRES_URL` (required in CI); an unsupported database URL is always checked to be
/// a clear storage error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_engine_runs_the_same_vault() {
    {
        let home = tempfile::tempdir().unwrap();
        let e = Vault::init_with(home.path(), Unlock::Keyfile(home.path().join("vault.key")), Some("mysql://nobody@127.0.0.1:1/none"))
            .await
            .unwrap_err();
        assert!(matches!(&e, VaultError::Storage(m) if m.contains("postgres://")), "{e:?}");
    }
    let Some(db) = pg_support::TestDatabase::create("crp_vault_test").await else { return };
    let url = db.url.clone();
    let home = tempfile::tempdir().unwrap();
    let pass = SecretValue::new("postgres passphrase 1");
    Vault::init_with(home.path(), Unlock::Passphrase(pass.clone()), Some(&url)).await.unwrap();
    assert!(matches!(
        Vault::init_with(home.path(), Unlock::Passphrase(pass.clone()), Some(&url)).await,
        Err(VaultError::AlreadyInitialised(_))
    ));
    let wrong = Vault::open(OpenOptions { home: home.path().into(), unlock: Some(Unlock::Passphrase(SecretValue::new("nope nope nope"))), database_url: Some(url.clone()) })
        .await
        .unwrap_err();
    assert!(matches!(wrong, VaultError::WrongKey));
    let v = Vault::open(OpenOptions { home: home.path().into(), unlock: Some(Unlock::Passphrase(pass)), database_url: Some(url.clone()) }).await.unwrap();
    v.admin_store(&cred("pg/one", "pg.svc", Some(300))).await.unwrap();
    let u = v.use_credential(&owner(), use_p("pg.svc", None)).await.unwrap();
    assert_eq!(u.lease.ttl, 300);
    let child = v
        .use_credential(&owner(), serde_json::from_value(json!({"service": "pg.svc", "delegation": {"parentLeaseId": u.lease.id}})).unwrap())
        .await
        .unwrap();
    assert_eq!(v.proxy_grant(&u.lease.id, u.session_token.as_deref().unwrap()).await.unwrap().secret.expose(), CANARY);
    let r = v.lease(&owner(), LeaseParams { action: LeaseAction::Renew, lease_id: child.lease.id.clone(), ttl: Some(10) }).await.unwrap();
    assert!(matches!(r, crp_core::types::LeaseResult::Renewed(_)));
    let rv = v.revoke(&owner(), RevokeParams { lease_id: u.lease.id.clone(), reason: RevokeReason::Rotation, detail: None }).await.unwrap();
    assert_eq!(rv.affected_leases, vec![u.lease.id.clone(), child.lease.id.clone()]);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let v = v.clone();
        tasks.push(tokio::spawn(async move { v.use_credential(&owner(), use_p("pg.svc", Some(30))).await.is_ok() }));
    }
    for t in tasks {
        assert!(t.await.unwrap());
    }
    let rep = v.audit_verify().await.unwrap();
    assert!(rep.ok && rep.entries >= 24, "{rep:?}");
    // Nothing in clear in the database.
    let blobs: Vec<Vec<u8>> = sqlx::query_scalar("SELECT sealed_value FROM credential_versions").fetch_all(match v.store() {
        crp_provider::store::Store::Postgres(p) => p,
        _ => unreachable!(),
    })
    .await
    .unwrap();
    assert!(blobs.iter().all(|b| !b.windows(CANARY.len()).any(|w| w == CANARY.as_bytes())));
    v.shutdown().await;
    v.store().close().await;
    db.drop_database().await;
}

/// Group commit: many concurrent appends share few transactions, every caller gets its own
/// sequence number, and the chain verifies.
#[test]
fn audit_appends_are_group_committed() {
    use crp_provider::audit::{AuditLog, AuditRecord};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = crp_provider::store::Store::open_sqlite(&dir.path().join("vault.db")).await.unwrap();
        store.migrate().await.unwrap();
        let key = crp_provider::crypto::Key32::generate().unwrap();
        let (log, _task) = AuditLog::start(store.clone(), key.clone());
        let mut tasks = Vec::new();
        for i in 0..200 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move { log.append(AuditRecord::new("credential.used", &format!("agent-{i}"), "allow")).await.unwrap() }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort();
        assert_eq!(seqs, (1..=200).collect::<Vec<i64>>());
        let (batches, entries) = log.stats();
        assert_eq!(entries, 200);
        assert!(batches <= 20, "200 concurrent appends took {batches} transactions");
        let r = crp_provider::audit::verify(&store, &key).await.unwrap();
        assert!(r.ok && r.entries == 200, "{r:?}");
        // The wrong key cannot verify (nor forge) the chain.
        let other = crp_provider::crypto::Key32::generate().unwrap();
        assert!(!crp_provider::audit::verify(&store, &other).await.unwrap().ok);
    });
}
