//! Lease mutations ride in the audit writer's group commit: a lease change and its audit entry
//! commit together, many concurrent requests share one transaction (one fsync), and a batch
//! that fails is retried item by item so one bad item cannot fail its neighbours.

use crp_core::provider::Transport;
use crp_core::types::ext;
use crp_core::types::{LeaseAction, LeaseParams, LeaseResult, UseParams};
use crp_core::{CallContext, Provider};
use crp_provider::audit::{AppendError, AuditLog, AuditRecord};
use crp_provider::leases::{self, LeaseError, LeaseOp, LeaseOutcome};
use crp_provider::store::Store;
use crp_provider::vault::{OpenOptions, Unlock, Vault};
use serde_json::json;

mod lease_support;
mod pg_support;

use lease_support::new_lease;

const CANARY: &str = "crp-canary-groupcommit-0a1b2c3d4e5f60718293a4b5c6d7e8f9";

fn owner() -> CallContext {
    CallContext::new(Vault::owner_agent(), Transport::InProcess)
}

async fn count(store: &Store, sql: &'static str) -> i64 {
    match store {
        Store::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
        Store::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
    }
}

/// N concurrent crp/use calls (then N concurrent releases) complete in far fewer than N
/// transactions of the audit writer, and every lease has exactly its audit entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_use_and_release_share_transactions() {
    let (v, _dir) = Vault::open_ephemeral().await.unwrap();
    exercise(&v).await;
}

/// The same on PostgreSQL (scripts/test.sh exports `CRP_TEST_POSTGRES_URL`; required in CI,
/// elsewhere the test says it has nothing to run against).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_use_and_release_share_transactions_on_postgres() {
    let Some(db) = pg_support::TestDatabase::create("crp_group_commit").await else { return };
    let url = db.url.clone();
    let home = tempfile::tempdir().unwrap();
    let key = home.path().join("vault.key");
    Vault::init_with(home.path(), Unlock::Keyfile(key.clone()), Some(&url)).await.unwrap();
    let v = Vault::open(OpenOptions { home: home.path().into(), unlock: Some(Unlock::Keyfile(key)), database_url: Some(url) })
        .await
        .unwrap();
    exercise(&v).await;
    v.store().close().await;
    db.drop_database().await;
}

async fn exercise(v: &Vault) {
    const N: usize = 64;
    let r = v
        .extension(
            &owner(),
            ext::VAULT_STORE,
            json!({"key": "gh/main", "value": CANARY, "service": "github.com/api", "scopes": ["read"],
                   "upstream": "http://127.0.0.1:9/base", "max_ttl": 600}),
        )
        .await
        .unwrap();
    assert_eq!(r["stored"], true);
    let (tx0, _) = v.audit_stats();

    // All N requests are started before any is awaited; a barrier makes them reach the
    // writer together.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(N));
    let mut tasks = Vec::new();
    for _ in 0..N {
        let v = v.clone();
        let b = barrier.clone();
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            let p: UseParams = serde_json::from_value(json!({"service": "github.com/api", "scopes": ["read"], "ttl": 300})).unwrap();
            v.use_credential(&owner(), p).await
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        let u = t.await.unwrap().unwrap();
        ids.push(u.lease.id);
    }
    let (tx1, _) = v.audit_stats();
    let use_tx = tx1 - tx0;
    assert!(use_tx >= 1);
    assert!(use_tx <= (N / 4) as u64, "{N} concurrent crp/use took {use_tx} transactions");

    let store = v.store().clone();
    assert_eq!(count(&store, "SELECT COUNT(*) FROM leases WHERE state = 'active'").await, N as i64);
    assert_eq!(
        count(&store, "SELECT COUNT(*) FROM leases l WHERE EXISTS (SELECT 1 FROM audit a WHERE a.lease_id = l.id AND a.action = 'credential.leased')").await,
        N as i64
    );

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(N));
    let mut tasks = Vec::new();
    for id in ids.clone() {
        let v = v.clone();
        let b = barrier.clone();
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            let p: LeaseParams = serde_json::from_value(json!({"leaseId": id, "action": "release"})).unwrap();
            v.lease(&owner(), p).await
        }));
    }
    for t in tasks {
        match t.await.unwrap().unwrap() {
            LeaseResult::Released(r) => assert!(r.released),
            other => panic!("unexpected {other:?}"),
        }
    }
    let (tx2, _) = v.audit_stats();
    let rel_tx = tx2 - tx1;
    assert!(rel_tx <= (N / 4) as u64, "{N} concurrent releases took {rel_tx} transactions");
    assert_eq!(count(&store, "SELECT COUNT(*) FROM leases WHERE state = 'released'").await, N as i64);
    assert_eq!(count(&store, "SELECT COUNT(*) FROM audit WHERE action = 'lease.released'").await, N as i64);

    // Releasing again is refused (the lease has ended) and audited as an error; nothing else
    // changes.
    let p: LeaseParams = serde_json::from_value(json!({"leaseId": ids[0], "action": "release"})).unwrap();
    let e = v.lease(&owner(), p).await.unwrap_err();
    assert_ne!(e.code, -33010, "{e:?}");
    assert_eq!(count(&store, "SELECT COUNT(*) FROM audit WHERE action = 'lease.released'").await, N as i64);

    let report = v.audit_verify().await.unwrap();
    assert!(report.ok, "{report:?}");
    let _ = LeaseAction::Release;
    v.shutdown().await;
}

/// Wait (bounded) until the audit queue holds `n` entries; the first check comes after the
/// tasks spawned so far have run (current-thread runtime).
async fn queue_reaches(log: &AuditLog, n: usize) {
    for _ in 0..5000 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        if log.queue_depth() == n {
            return;
        }
    }
    panic!("the audit queue never held {n} entries (it holds {})", log.queue_depth());
}

async fn setup() -> (tempfile::TempDir, Store, crp_provider::crypto::Key32, AuditLog) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("vault.db")).await.unwrap();
    store.migrate().await.unwrap();
    let key = crp_provider::crypto::Key32::generate().unwrap();
    let (log, _task) = AuditLog::start(store.clone(), key.clone());
    (dir, store, key, log)
}

/// Each caller gets its own result: a refused release and a duplicate insert (a storage error
/// that fails the batch transaction) do not fail their neighbours, and the chain verifies.
#[test]
fn bad_items_do_not_fail_their_neighbours() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (_dir, store, key, log) = setup().await;
        let now = crp_provider::store::now_ms();
        // A lease that exists already, so inserting it again violates the primary key.
        let dup = leases::root_record(&new_lease("lease_dup"), 2, now);
        leases::apply(&store, &LeaseOp::InsertRoot(dup.clone())).await.unwrap();

        let mut tasks = Vec::new();
        for i in 0..40 {
            let log = log.clone();
            let op = match i % 10 {
                3 => LeaseOp::InsertRoot(dup.clone()),
                7 => LeaseOp::Release { id: "lease_missing".into(), now },
                _ => LeaseOp::InsertRoot(leases::root_record(&new_lease(&format!("lease_{i:02}")), 2, now)),
            };
            tasks.push(tokio::spawn(async move {
                log.append_with(AuditRecord::new("credential.leased", "a", "allow"), op).await
            }));
        }
        let mut ok = 0;
        for (i, t) in tasks.into_iter().enumerate() {
            let r = t.await.unwrap();
            match i % 10 {
                3 => assert!(matches!(r, Err(AppendError::Lease(LeaseError::Store(_)))), "{i}: {r:?}"),
                7 => assert!(matches!(r, Err(AppendError::Lease(LeaseError::NotFound))), "{i}: {r:?}"),
                _ => {
                    let (_, o) = r.unwrap();
                    assert!(matches!(o, LeaseOutcome::Inserted(ref rec) if rec.id == format!("lease_{i:02}")));
                    ok += 1;
                }
            }
        }
        assert_eq!(ok, 32);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM leases").await, 33);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM audit").await, 32);
        let r = crp_provider::audit::verify(&store, &key).await.unwrap();
        assert!(r.ok && r.entries == 32, "{r:?}");

        // Release rides in the same way and reports the revoked descendants.
        let child = LeaseOp::InsertChild {
            parent_id: "lease_00".into(),
            lease: new_lease("lease_child"),
            requested_ttl: Some(30),
            requested_max_depth: None,
            provider_cap: 2,
            now,
        };
        log.append_with(AuditRecord::new("lease.delegated", "a", "allow"), child).await.unwrap();
        let (_, o) = log
            .append_with(AuditRecord::new("lease.released", "a", "allow"), LeaseOp::Release { id: "lease_00".into(), now })
            .await
            .unwrap();
        assert_eq!(o, LeaseOutcome::Released(vec!["lease_child".into()]));
        // A child of an ended parent is refused inside the transaction, with no entry.
        let late = LeaseOp::InsertChild {
            parent_id: "lease_00".into(),
            lease: new_lease("lease_late"),
            requested_ttl: None,
            requested_max_depth: None,
            provider_cap: 2,
            now,
        };
        let r = log.append_with(AuditRecord::new("lease.delegated", "a", "allow"), late).await;
        assert!(matches!(r, Err(AppendError::Lease(LeaseError::Ended("released")))), "{r:?}");
        assert_eq!(count(&store, "SELECT COUNT(*) FROM leases WHERE id = 'lease_late'").await, 0);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM audit").await, 34);
    });
}

/// Fail-closed: when the audit entry cannot be written, the lease is not created either.
#[test]
fn unwritable_audit_rolls_back_the_lease() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (_dir, store, _key, log) = setup().await;
        let Store::Sqlite(pool) = &store else { unreachable!("sqlite store") };
        sqlx::query("CREATE TRIGGER block_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'audit is read-only'); END")
            .execute(pool)
            .await
            .unwrap();
        let now = crp_provider::store::now_ms();
        let mut tasks = Vec::new();
        for i in 0..8 {
            let log = log.clone();
            let op = LeaseOp::InsertRoot(leases::root_record(&new_lease(&format!("lease_{i}")), 2, now));
            tasks.push(tokio::spawn(async move { log.append_with(AuditRecord::new("credential.leased", "a", "allow"), op).await }));
        }
        for t in tasks {
            let r = t.await.unwrap();
            assert!(matches!(r, Err(AppendError::Audit(_))), "{r:?}");
        }
        assert_eq!(count(&store, "SELECT COUNT(*) FROM leases").await, 0);
        sqlx::query("DROP TRIGGER block_audit").execute(pool).await.unwrap();
        let op = LeaseOp::InsertRoot(leases::root_record(&new_lease("lease_ok"), 2, now));
        log.append_with(AuditRecord::new("credential.leased", "a", "allow"), op).await.unwrap();
        assert_eq!(count(&store, "SELECT COUNT(*) FROM leases").await, 1);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM audit").await, 1);
    });
}

/// Releases queued together are applied in one statement on SQLite, with the results a
/// one-after-the-other application gives: the first release of a lease wins and a second one
/// in the same batch finds it released; unknown and expired leases are refused alone; a
/// released parent ends its delegated child; every success has its entry and nothing else.
#[test]
fn releases_in_one_batch_resolve_in_queue_order() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (_dir, store, key, log) = setup().await;
        let now = crp_provider::store::now_ms();
        for i in 0..6 {
            let rec = leases::root_record(&new_lease(&format!("lease_r{i}")), 2, now);
            leases::apply(&store, &LeaseOp::InsertRoot(rec)).await.unwrap();
        }
        let child = LeaseOp::InsertChild {
            parent_id: "lease_r1".into(),
            lease: new_lease("lease_r1_child"),
            requested_ttl: Some(30),
            requested_max_depth: None,
            provider_cap: 2,
            now,
        };
        leases::apply(&store, &child).await.unwrap();
        // lease_r5 is past its expiry at the release's clock.
        let later = now + 61_000;
        let ops = [
            ("lease_r0", now),
            ("lease_r1", now),
            ("lease_r0", now),
            ("lease_nope", now),
            ("lease_r2", now),
            ("lease_r5", later),
            ("lease_r3", now),
        ];
        // The writer runs on its own thread. To make the releases share one batch, another
        // connection holds the write lock while the writer is busy with a first entry, until
        // every release is queued.
        let Store::Sqlite(pool) = &store else { unreachable!("sqlite store") };
        let mut lock = pool.acquire().await.unwrap();
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *lock).await.unwrap();
        let (tx_before, _) = log.stats();
        let blocker = {
            let log = log.clone();
            tokio::spawn(async move { log.append(AuditRecord::new("credential.used", "blocker", "allow")).await })
        };
        queue_reaches(&log, 0).await;
        let mut tasks = Vec::new();
        for (id, at) in ops {
            let log = log.clone();
            let op = LeaseOp::Release { id: id.into(), now: at };
            tasks.push(tokio::spawn(async move { log.append_with(AuditRecord::new("lease.released", "a", "allow").lease(id), op).await }));
        }
        queue_reaches(&log, ops.len()).await;
        sqlx::query("COMMIT").execute(&mut *lock).await.unwrap();
        drop(lock);
        blocker.await.unwrap().unwrap();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        assert_eq!(log.stats().0 - tx_before, 2, "the first entry's transaction, then one for the releases");
        assert!(matches!(results[0], Ok((_, LeaseOutcome::Released(ref d))) if d.is_empty()), "{:?}", results[0]);
        assert!(matches!(results[1], Ok((_, LeaseOutcome::Released(ref d))) if d == &vec!["lease_r1_child".to_string()]), "{:?}", results[1]);
        assert!(matches!(results[2], Err(AppendError::Lease(LeaseError::Ended("released")))), "{:?}", results[2]);
        assert!(matches!(results[3], Err(AppendError::Lease(LeaseError::NotFound))), "{:?}", results[3]);
        assert!(results[4].is_ok(), "{:?}", results[4]);
        assert!(matches!(results[5], Err(AppendError::Lease(LeaseError::Expired))), "{:?}", results[5]);
        assert!(results[6].is_ok(), "{:?}", results[6]);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM leases WHERE state = 'released'").await, 4);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM leases WHERE id = 'lease_r1_child' AND state = 'revoked' AND end_reason = 'parent_released'").await, 1);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM leases WHERE state = 'active'").await, 2);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM audit WHERE action = 'lease.released'").await, 4);
        let r = crp_provider::audit::verify(&store, &key).await.unwrap();
        assert!(r.ok && r.entries == 5, "{r:?}");
    });
}
