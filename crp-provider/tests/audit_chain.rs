//! The audit writer keeps one exact chain when several processes append to it: each writer
//! remembers the head after its own commit and finds out about another process's appends by the
//! sequence-number collision, then redoes its batch (lease mutations included) on the real
//! head. Also: stored entries equal what was appended, byte for byte; and the
//! `[audit] durability` setting of `config.toml`.

use crp_provider::audit::{self, AuditLog, AuditRecord};
use crp_provider::config::Durability;
use crp_provider::crypto::Key32;
use crp_provider::leases::{self, LeaseOp, LeaseOutcome};
use crp_provider::store::Store;
use crp_provider::vault::{OpenOptions, Unlock, Vault};
use crp_core::Provider;
use crp_core::types::ext::AuditQueryParams;

mod lease_support;
mod pg_support;

async fn count(store: &Store, sql: &'static str) -> i64 {
    match store {
        Store::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
        Store::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
    }
}

fn root(id: &str) -> LeaseOp {
    LeaseOp::InsertRoot(leases::root_record(&lease_support::new_lease(id), 2, crp_provider::store::now_ms()))
}

/// Two writers (as two processes would have: separate pools, separate writer tasks, one key)
/// append to one chain: strictly alternating (so every append after the other writer's finds
/// its remembered head stale), with lease mutations in the mix, then all at once. Every entry
/// gets a distinct sequence number, none is lost, the lease rows are there exactly once, and
/// the chain and its head verify.
async fn two_writers(a: Store, b: Store, key: Key32, durability_b: Durability) {
    let (wa, _ta) = AuditLog::start(a.clone(), key.clone());
    let (wb, _tb) = AuditLog::start_with(b.clone(), key.clone(), durability_b, crp_provider::epoch::Epochs::disabled());
    let mut seqs = Vec::new();
    // Strictly alternating, one at a time.
    for i in 0..20 {
        let (w, name) = if i % 2 == 0 { (&wa, "a") } else { (&wb, "b") };
        let rec = AuditRecord::new("credential.used", &format!("{name}-{i}"), "allow");
        if i % 4 < 2 {
            seqs.push(w.append(rec).await.unwrap());
        } else {
            let id = format!("lease_{name}_{i:02}");
            let (seq, o) = w.append_with(rec.lease(&id), root(&id)).await.unwrap();
            assert!(matches!(o, LeaseOutcome::Inserted(ref r) if r.id == id));
            seqs.push(seq);
        }
    }
    assert_eq!(seqs, (1..=20).collect::<Vec<i64>>(), "alternating appends");
    assert!(wa.redone_batches() >= 9 && wb.redone_batches() >= 9, "{} {}", wa.redone_batches(), wb.redone_batches());

    // Concurrent: both writers group-commit batches that race for the same sequence numbers.
    let mut tasks = Vec::new();
    for i in 0..200 {
        let w = if i % 2 == 0 { wa.clone() } else { wb.clone() };
        tasks.push(tokio::spawn(async move {
            let rec = AuditRecord::new("credential.used", &format!("c-{i}"), "allow");
            if i % 5 == 0 {
                let id = format!("lease_c_{i:03}");
                w.append_with(rec.lease(&id), root(&id)).await.map(|(s, _)| s).unwrap()
            } else {
                w.append(rec).await.unwrap()
            }
        }));
    }
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort();
    assert_eq!(seqs, (1..=220).collect::<Vec<i64>>(), "no sequence number lost or given twice");
    let (_, ea) = wa.stats();
    let (_, eb) = wb.stats();
    assert_eq!(ea + eb, 220);
    assert_eq!(count(&a, "SELECT COUNT(*) FROM audit").await, 220);
    assert_eq!(count(&a, "SELECT COUNT(DISTINCT seq) FROM audit").await, 220);
    assert_eq!(count(&a, "SELECT COUNT(*) FROM leases").await, 10 + 40);
    for s in [&a, &b] {
        let r = audit::verify(s, &key).await.unwrap();
        assert!(r.ok && r.entries == 220, "{r:?}");
    }
    // Each writer carries on from the other's last entry.
    let s1 = wa.append(AuditRecord::new("credential.used", "a-last", "allow")).await.unwrap();
    let s2 = wb.append(AuditRecord::new("credential.used", "b-last", "allow")).await.unwrap();
    assert_eq!((s1, s2), (221, 222));
    // On a SQLite file, an append without a lease goes through the writer's own connection once
    // the writer knows the head (above, each such append after the other writer's collided
    // there first, and was redone): with the head fresh, it commits there.
    let before = wa.direct_batches();
    let s3 = wa.append(AuditRecord::new("credential.used", "a-again", "allow")).await.unwrap();
    let s4 = wa.append(AuditRecord::new("credential.used", "a-again", "allow")).await.unwrap();
    assert_eq!((s3, s4), (223, 224));
    let on_file = a.sqlite_path().is_some();
    assert_eq!(wa.direct_batches() > before, on_file, "{before} {}", wa.direct_batches());
    let r = audit::verify(&b, &key).await.unwrap();
    assert!(r.ok && r.entries == 224, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_writers_share_one_chain_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("vault.db");
    let a = Store::open_sqlite(&db).await.unwrap();
    a.migrate().await.unwrap();
    let b = Store::open_sqlite(&db).await.unwrap();
    let key = Key32::generate().unwrap();
    two_writers(a.clone(), b.clone(), key, Durability::Os).await;
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_writers_share_one_chain_on_postgres() {
    let Some(db) = pg_support::TestDatabase::create("crp_audit_chain").await else { return };
    let a = Store::open_url(&db.url).await.unwrap();
    a.migrate().await.unwrap();
    let b = Store::open_url(&db.url).await.unwrap();
    let key = Key32::generate().unwrap();
    two_writers(a.clone(), b.clone(), key, Durability::Os).await;
    a.close().await;
    b.close().await;
    db.drop_database().await;
}

/// What the writer stores is exactly what was appended (every column, including empty,
/// missing, quoted, escaped and non-ASCII text), in batches of every size.
async fn exact_values(store: Store, nul: bool) {
    let key = Key32::generate().unwrap();
    let (w, _t) = AuditLog::start(store.clone(), key.clone());
    let odd = [
        "",
        "plain",
        "quote \" and backslash \\ and slash /",
        "newline\nreturn\rtab\t",
        "ünïcödé ☃ 𝄞 \u{7f} \u{2028}",
        "{\"looks\": [\"like\", \"json\"]}",
        "'; DROP TABLE audit; --",
    ];
    let mut recs = Vec::new();
    for (i, s) in odd.iter().enumerate() {
        let mut r = AuditRecord::new(&format!("credential.used{s}"), &format!("agent {s}"), s)
            .with("text", *s)
            .with("n", i as i64)
            .with("big", i64::MAX)
            .with("nested", serde_json::json!({"a": [1, null, s], "b": {"c": -1.5}}));
        if i % 2 == 0 {
            r = r.key(&format!("key/{s}")).service(s).lease(s).policy(Some(s)).context(Some(s), Some(s));
        }
        recs.push(r);
    }
    if nul {
        recs.push(AuditRecord::new("credential.used", "nul \0 inside", "allow").key("k\0").with("t", "\0"));
    }
    // One at a time, then all at once (one batch).
    let mut expect = Vec::new();
    for r in &recs {
        w.append(r.clone()).await.unwrap();
        expect.push(r.clone());
    }
    let mut tasks = Vec::new();
    for r in &recs {
        let (w, r) = (w.clone(), r.clone());
        tasks.push(tokio::spawn(async move { (w.append(r.clone()).await.unwrap(), r) }));
    }
    let mut more: Vec<(i64, AuditRecord)> = Vec::new();
    for t in tasks {
        more.push(t.await.unwrap());
    }
    more.sort_by_key(|(s, _)| *s);
    expect.extend(more.into_iter().map(|(_, r)| r));
    let got = audit::query(&store, &AuditQueryParams { limit: Some(1000), ..Default::default() }).await.unwrap();
    assert_eq!(got.len(), expect.len());
    for (e, g) in expect.iter().zip(got.iter().rev()) {
        assert_eq!(
            (&e.action, &e.requester, &e.decision, &e.policy, &e.key, &e.service, &e.lease_id, &e.purpose, &e.trace_id, &e.detail),
            (&g.action, &g.requester, &g.decision, &g.policy, &g.key, &g.service, &g.lease_id, &g.purpose, &g.trace_id, &g.detail),
            "entry {}",
            g.seq
        );
    }
    let r = audit::verify(&store, &key).await.unwrap();
    assert!(r.ok && r.entries == expect.len() as u64, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_entries_are_exact_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    exact_values(store.clone(), true).await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_entries_are_exact_on_postgres() {
    let Some(db) = pg_support::TestDatabase::create("crp_audit_exact").await else { return };
    let store = Store::open_url(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    // PostgreSQL text cannot hold NUL (the insert fails, the caller gets the error).
    exact_values(store.clone(), false).await;
    store.close().await;
    db.drop_database().await;
}

/// More appends queued at once than one batch holds (the writer takes at most 256, and SQLite
/// binds each batch into the statement of the next power-of-two size up, padded with NULL
/// rows): every entry is stored once, with its own sequence number, and the chain and its head
/// verify, also after the writer restarts and reads the head back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_longer_than_a_batch_commits_exactly_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    let key = Key32::generate().unwrap();
    let (w, task) = AuditLog::start(store.clone(), key.clone());
    let tasks: Vec<_> = (0..600)
        .map(|i| {
            let w = w.clone();
            tokio::spawn(async move { w.append(AuditRecord::new("credential.used", &format!("q-{i}"), "allow")).await.unwrap() })
        })
        .collect();
    let mut seqs = futures_join(tasks).await;
    seqs.sort();
    assert_eq!(seqs, (1..=600).collect::<Vec<i64>>());
    assert_eq!(count(&store, "SELECT COUNT(DISTINCT requester) FROM audit").await, 600);
    drop(w);
    let _ = task.await;
    let r = audit::verify(&store, &key).await.unwrap();
    assert!(r.ok && r.entries == 600, "{r:?}");
    let (w, _task) = AuditLog::start(store.clone(), key.clone());
    assert_eq!(w.append(AuditRecord::new("credential.used", "after", "allow")).await.unwrap(), 601);
    let r = audit::verify(&store, &key).await.unwrap();
    assert!(r.ok && r.entries == 601, "{r:?}");
    store.close().await;
}

/// An entry whose text PostgreSQL cannot store fails its own caller only (fail-closed), and the
/// writer carries on with an exact chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstorable_entry_fails_alone_on_postgres() {
    let Some(db) = pg_support::TestDatabase::create("crp_audit_unstorable").await else { return };
    let store = Store::open_url(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    let key = Key32::generate().unwrap();
    let (w, _t) = AuditLog::start(store.clone(), key.clone());
    let results = thirty_appends_at_once(&w, "bad \0").await;
    assert!(results[13].is_err());
    let mut ok: Vec<i64> = results.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
    ok.sort();
    assert_eq!(ok, (1..=29).collect::<Vec<i64>>());
    assert_eq!(w.append(AuditRecord::new("credential.used", "after", "allow")).await.unwrap(), 30);
    let r = audit::verify(&store, &key).await.unwrap();
    assert!(r.ok && r.entries == 30, "{r:?}");
    store.close().await;
    db.drop_database().await;
}

/// On a SQLite file, batches without a lease mutation are written on the writer's own
/// connection. An entry the database refuses there (a trigger stands in for a failing disk)
/// fails its own caller only: the batch is rolled back and each item retried alone. The
/// chain stays exact, and the writer carries on on its own connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_refused_on_the_writers_own_connection_fails_alone_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store_refusing_poison(dir.path()).await;
    let key = Key32::generate().unwrap();
    let (w, _t) = AuditLog::start(store.clone(), key.clone());
    // The first batch reads the head (sqlx); from then on the writer knows it.
    assert_eq!(w.append(AuditRecord::new("credential.used", "first", "allow")).await.unwrap(), 1);
    let direct_before = w.direct_batches();
    let results = thirty_appends_at_once(&w, "poison").await;
    let refused = results[13].as_ref().expect_err("the refused entry fails its caller");
    assert!(refused.to_string().contains("refused by the test"), "{refused}");
    let mut ok: Vec<i64> = results.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
    ok.sort();
    assert_eq!(ok, (2..=30).collect::<Vec<i64>>());
    assert_eq!(w.append(AuditRecord::new("credential.used", "after", "allow")).await.unwrap(), 31);
    assert!(w.direct_batches() > direct_before, "the writer kept using its own connection");
    assert_eq!(count(&store, "SELECT COUNT(*) FROM audit WHERE requester = 'poison'").await, 0);
    let r = audit::verify(&store, &key).await.unwrap();
    assert!(r.ok && r.entries == 31, "{r:?}");
    store.close().await;
}

/// On a SQLite file, an append that is the only one in flight commits its entry itself, on
/// the writer's connection. Mixed with lease mutations (which go through the writer and sqlx) and
/// with an entry the database refuses on the inline path, the numbering has no gap, the refused
/// entry fails its own caller only, and the chain verifies, also after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_append_commits_itself_and_the_chain_stays_exact_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store_refusing_poison(dir.path()).await;
    let key = Key32::generate().unwrap();
    let (w, task) = AuditLog::start(store.clone(), key.clone());
    let mut expected = 0;
    for i in 0..60 {
        expected += 1;
        let rec = AuditRecord::new("credential.used", &format!("one-{i}"), "allow");
        let seq = if i % 10 == 9 {
            let id = format!("lease_inline_{i:02}");
            w.append_with(rec.lease(&id), root(&id)).await.unwrap().0
        } else {
            w.append(rec).await.unwrap()
        };
        assert_eq!(seq, expected, "append {i}");
        if i == 30 {
            let refused = w.append(AuditRecord::new("credential.used", "poison", "allow")).await.expect_err("refused");
            assert!(refused.to_string().contains("refused by the test"), "{refused}");
        }
    }
    // The first append reads the head and the second opens the connection (both through the
    // writer); each lease mutation goes through the writer too. Every other one is inline.
    assert!(w.inline_commits() >= 45, "{} inline commits", w.inline_commits());
    assert_eq!(count(&store, "SELECT COUNT(*) FROM audit WHERE requester = 'poison'").await, 0);
    assert_eq!(count(&store, "SELECT COUNT(*) FROM leases").await, 6);
    drop(w);
    let _ = task.await;
    let r = audit::verify(&store, &key).await.unwrap();
    assert!(r.ok && r.entries == 60, "{r:?}");
    let (w, _task) = AuditLog::start(store.clone(), key.clone());
    assert_eq!(w.append(AuditRecord::new("credential.used", "after", "allow")).await.unwrap(), 61);
    assert_eq!(w.append(AuditRecord::new("credential.used", "after-2", "allow")).await.unwrap(), 62);
    assert_eq!(w.append(AuditRecord::new("credential.used", "after-3", "allow")).await.unwrap(), 63);
    assert!(w.inline_commits() >= 1);
    let r = audit::verify(&store, &key).await.unwrap();
    assert!(r.ok && r.entries == 63, "{r:?}");
    store.close().await;
}

/// Commits leave folding the WAL to the checkpointer's thread: after `KICK_EVERY` of them it
/// has run, and the store's connections would fold it themselves only at the backstop.
#[tokio::test]
async fn the_wal_is_folded_in_the_background_on_sqlite() {
    use crp_provider::store::checkpoint::{BACKSTOP_PAGES, KICK_EVERY};
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    let key = Key32::generate().unwrap();
    let (w, task) = AuditLog::start(store.clone(), key.clone());
    let mut done = w.background_checkpoints().expect("a file-backed store has a checkpointer");
    for i in 0..KICK_EVERY {
        w.append(AuditRecord::new("credential.used", &format!("fold-{i}"), "allow")).await.unwrap();
    }
    tokio::time::timeout(std::time::Duration::from_secs(10), done.wait_for(|n| *n >= 1))
        .await
        .expect("a background checkpoint ran")
        .unwrap();
    assert_eq!(count(&store, "PRAGMA wal_autocheckpoint").await, i64::from(BACKSTOP_PAGES));
    drop(w);
    let _ = task.await;
    let r = audit::verify(&store, &key).await.unwrap();
    assert!(r.ok && r.entries == KICK_EVERY, "{r:?}");
    store.close().await;

    // No checkpointer where there is no WAL file.
    let store = Store::open_url("sqlite::memory:").await.unwrap();
    store.migrate().await.unwrap();
    let (w, _task) = AuditLog::start(store, key);
    assert!(w.background_checkpoints().is_none());
}

/// A lone append that finds the database locked by another connection (another process, in
/// life) does not wait on the runtime's worker: it goes to the writer's thread, which waits for
/// the lock, and commits once it is free. With one worker, a task spawned meanwhile still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_lone_append_never_waits_for_a_lock_on_a_runtime_worker() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path()).await;
    let key = Key32::generate().unwrap();
    let (w, _task) = AuditLog::start(store.clone(), key.clone());
    // The first append reads the head and the second opens the writer's connection.
    for i in 1..=3 {
        assert_eq!(w.append(AuditRecord::new("credential.used", &format!("before-{i}"), "allow")).await.unwrap(), i);
    }
    let inline_before = w.inline_commits();
    assert!(inline_before >= 1, "the third append commits inline");
    let Store::Sqlite(pool) = &store else { unreachable!("sqlite store") };
    let mut other = pool.acquire().await.unwrap();
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *other).await.unwrap();
    let w2 = w.clone();
    let pending = tokio::spawn(async move { w2.append(AuditRecord::new("credential.used", "while-locked", "allow")).await });
    // Wall time, not a Tokio timer: a blocked worker would not drive the timers either.
    let started = std::time::Instant::now();
    tokio::spawn(async {}).await.unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(3), "the only worker was blocked for {:?}", started.elapsed());
    assert!(!pending.is_finished(), "the append waits for the lock");
    sqlx::query("COMMIT").execute(&mut *other).await.unwrap();
    drop(other);
    assert_eq!(pending.await.unwrap().unwrap(), 4);
    assert_eq!(w.inline_commits(), inline_before, "that append went through the writer");
    assert_eq!(w.append(AuditRecord::new("credential.used", "after", "allow")).await.unwrap(), 5);
    let r = audit::verify(&store, &key).await.unwrap();
    assert!(r.ok && r.entries == 5, "{r:?}");
    store.close().await;
}

/// A migrated SQLite store in `dir` whose database refuses any audit entry from the requester
/// `poison` (a trigger stands in for a failing disk).
/// A migrated SQLite store in `dir`.
async fn sqlite_store(dir: &std::path::Path) -> Store {
    let store = Store::open_sqlite(&dir.join("vault.db")).await.unwrap();
    store.migrate().await.unwrap();
    store
}

async fn sqlite_store_refusing_poison(dir: &std::path::Path) -> Store {
    let store = sqlite_store(dir).await;
    let Store::Sqlite(pool) = &store else { unreachable!("sqlite store") };
    sqlx::query("CREATE TRIGGER refuse_poison BEFORE INSERT ON audit WHEN NEW.requester = 'poison' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
        .execute(pool)
        .await
        .unwrap();
    store
}

/// 30 appends queued at once; the 14th (index 13) from `bad_requester`, the others fine.
async fn thirty_appends_at_once(w: &AuditLog, bad_requester: &str) -> Vec<Result<i64, audit::AuditError>> {
    let mut tasks = Vec::new();
    for i in 0..30 {
        let w = w.clone();
        let who = if i == 13 { bad_requester.to_string() } else { format!("agent-{i}") };
        tasks.push(tokio::spawn(async move { w.append(AuditRecord::new("credential.used", &who, "allow")).await }));
    }
    futures_join(tasks).await
}

async fn futures_join<T: Send + 'static>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// `[audit] durability = "os"` in `config.toml`: the vault opens, appends and verifies; a value
/// that is not `fsync` or `os` is refused with a message that names the setting and the choices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_setting_from_config_toml() {
    let home = tempfile::tempdir().unwrap();
    let keyfile = home.path().join("vault.key");
    Vault::init_with(home.path(), Unlock::Keyfile(keyfile.clone()), None).await.unwrap();
    let open = || Vault::open(OpenOptions { home: home.path().into(), unlock: Some(Unlock::Keyfile(keyfile.clone())), database_url: None });

    std::fs::write(home.path().join("config.toml"), "max_ttl = 600\n\n[audit]\ndurability = \"os\"\n").unwrap();
    let paths = crp_provider::config::Paths::new(home.path());
    assert_eq!(crp_provider::config::Config::load(&paths).unwrap().audit.durability, Durability::Os);
    let v = open().await.unwrap();
    let before = audit::count(v.store()).await.unwrap();
    let r = v
        .extension(
            &crp_core::CallContext::new(Vault::owner_agent(), crp_core::provider::Transport::InProcess),
            crp_core::types::ext::VAULT_STORE,
            serde_json::json!({"key": "gh/main", "value": "v-0123456789", "service": "github.com/api", "scopes": ["read"]}),
        )
        .await
        .unwrap();
    assert_eq!(r["stored"], true);
    assert!(audit::count(v.store()).await.unwrap() > before);
    let report = v.audit_verify().await.unwrap();
    assert!(report.ok, "{report:?}");
    v.shutdown().await;
    v.store().close().await;

    std::fs::write(home.path().join("config.toml"), "[audit]\ndurability = \"fsync\"\n").unwrap();
    assert_eq!(crp_provider::config::Config::load(&paths).unwrap().audit.durability, Durability::Fsync);
    let v = open().await.unwrap();
    assert!(v.audit_verify().await.unwrap().ok);
    v.shutdown().await;
    v.store().close().await;

    for (text, needle) in [
        ("[audit]\ndurability = \"sometimes\"\n", "durability must be \"fsync\""),
        ("[audit]\ndurability = 1\n", "string"),
        ("[audit]\ndurablity = \"os\"\n", "durablity"),
    ] {
        std::fs::write(home.path().join("config.toml"), text).unwrap();
        let msg = match open().await {
            Ok(_) => panic!("{text:?} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains(needle) && msg.contains("config.toml"), "{text:?}: {msg}");
    }
}

/// A vault written before migration 3 (the audit table rebuilt with fewer indexes, `seq` the
/// rowid on SQLite) upgrades in place: every entry survives byte for byte, the chain verifies,
/// and appending continues the chain.
async fn upgrade_keeps_the_chain(store: Store) {
    store.migrate_to(2).await.unwrap();
    let key = Key32::generate().unwrap();
    {
        let (w, task) = AuditLog::start(store.clone(), key.clone());
        for i in 0..40 {
            w.append(AuditRecord::new("credential.used", &format!("agent-{}", i % 3), "allow").key("k").with("i", i)).await.unwrap();
        }
        drop(w);
        task.await.unwrap();
    }
    let before = audit::query(&store, &AuditQueryParams { limit: Some(1000), ..Default::default() }).await.unwrap();
    store.migrate().await.unwrap();
    let after = audit::query(&store, &AuditQueryParams { limit: Some(1000), ..Default::default() }).await.unwrap();
    assert_eq!(before.len(), 40);
    assert_eq!(serde_json::to_value(&before).unwrap(), serde_json::to_value(&after).unwrap());
    assert!(audit::verify(&store, &key).await.unwrap().ok);
    let (w, _task) = AuditLog::start(store.clone(), key.clone());
    assert_eq!(w.append(AuditRecord::new("credential.used", "agent-0", "allow")).await.unwrap(), 41);
    let report = audit::verify(&store, &key).await.unwrap();
    assert!(report.ok && report.entries == 41, "{report:?}");
    // Filters that lost their index still answer (newest first along seq).
    let by_action = audit::query(&store, &AuditQueryParams { action: Some("credential".into()), limit: Some(5), ..Default::default() }).await.unwrap();
    assert_eq!(by_action.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![41, 40, 39, 38, 37]);
}

#[tokio::test]
async fn upgrade_to_schema_3_keeps_the_chain_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("v.db")).await.unwrap();
    upgrade_keeps_the_chain(store).await;
}

#[tokio::test]
async fn upgrade_to_schema_3_keeps_the_chain_postgres() {
    let Some(db) = pg_support::TestDatabase::create("crp_audit_upgrade").await else { return };
    let store = Store::open_url(&db.url).await.unwrap();
    upgrade_keeps_the_chain(store.clone()).await;
    store.close().await;
    db.drop_database().await;
}
