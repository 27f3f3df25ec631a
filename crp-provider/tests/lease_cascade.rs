//! Cascades over delegation trees, on SQLite and on PostgreSQL: revoking or releasing a lease
//! ends exactly its active descendants (the `path` range of migration 0002, see `leases.rs`),
//! reports every one of them, and leaves none active, also when some rows lack their `path`
//! (written by an older binary) or when the vault was created before the column existed.

use std::collections::{BTreeMap, BTreeSet};

use crp_provider::leases::{self, LeaseConn, LeaseOp, LeaseRecord, LeaseState};
use lease_support::new_lease;
use crp_provider::store::{MIGRATIONS, Store};

mod lease_support;
mod pg_support;

const NOW: i64 = 1_800_000_000_000;
const CAP: u32 = 32;

fn root(id: &str) -> LeaseOp {
    LeaseOp::InsertRoot(leases::root_record(&new_lease(id), CAP, NOW))
}

fn child(parent: &str, id: &str) -> LeaseOp {
    LeaseOp::InsertChild {
        parent_id: parent.into(),
        lease: new_lease(id),
        requested_ttl: None,
        requested_max_depth: None,
        provider_cap: CAP,
        now: NOW,
    }
}

/// Apply `ops` in order in one transaction (the way the audit writer batches them).
async fn apply_all(store: &Store, ops: &[LeaseOp]) {
    match store {
        Store::Sqlite(p) => {
            let mut tx = p.begin().await.unwrap();
            for op in ops {
                LeaseConn::apply_op(&mut *tx, op).await.unwrap();
            }
            tx.commit().await.unwrap();
        }
        Store::Postgres(p) => {
            let mut tx = p.begin().await.unwrap();
            for op in ops {
                LeaseConn::apply_op(&mut *tx, op).await.unwrap();
            }
            tx.commit().await.unwrap();
        }
    }
}

async fn exec(store: &Store, sql: &str) {
    let sql = sqlx::AssertSqlSafe(sql.to_string());
    match store {
        Store::Sqlite(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()).unwrap(),
        Store::Postgres(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()).unwrap(),
    }
}

async fn count(store: &Store, sql: &'static str) -> i64 {
    match store {
        Store::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
        Store::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
    }
}

/// Every lease, by id.
async fn all(store: &Store) -> BTreeMap<String, LeaseRecord> {
    let list = leases::list(store, None, None, 1_000_000).await.unwrap();
    list.into_iter().map(|l| (l.id.clone(), l)).collect()
}

/// The descendants of `id` (not `id` itself), from the parent links.
fn descendants(m: &BTreeMap<String, LeaseRecord>, id: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut frontier = vec![id.to_string()];
    while let Some(p) = frontier.pop() {
        for l in m.values().filter(|l| l.parent_id.as_deref() == Some(p.as_str())) {
            out.insert(l.id.clone());
            frontier.push(l.id.clone());
        }
    }
    out
}

fn active(m: &BTreeMap<String, LeaseRecord>, ids: &BTreeSet<String>) -> BTreeSet<String> {
    ids.iter().filter(|id| m[*id].state == LeaseState::Active).cloned().collect()
}

/// Two trees. `lease_a`: a wide part (fan-out 6, three levels) and a chain 24 deep below its
/// first leaf. `lease_ab`, whose id extends `lease_a`'s, with a small tree of its own: its
/// leases must never be caught in `lease_a`'s range (nor `lease_a…` children in `lease_ab`'s).
async fn build(store: &Store) -> usize {
    let mut ops = vec![root("lease_a"), root("lease_ab")];
    let mut level = vec!["lease_a".to_string()];
    for depth in 1..=3 {
        let mut next = Vec::new();
        for p in &level {
            for i in 0..6 {
                let id = format!("{p}{depth}{i}");
                ops.push(child(p, &id));
                next.push(id);
            }
        }
        level = next;
    }
    let mut parent = level[0].clone();
    for i in 0..24 {
        let id = format!("lease_a_chain{i:02}");
        ops.push(child(&parent, &id));
        parent = id;
    }
    ops.push(child("lease_ab", "lease_ab0"));
    ops.push(child("lease_ab0", "lease_ab00"));
    ops.push(child("lease_ab", "lease_ab1"));
    let n = ops.len();
    apply_all(store, &ops).await;
    n
}

async fn cascade(store: &Store) {
    let n = build(store).await;
    let m = all(store).await;
    assert_eq!(m.len(), n);
    assert_eq!(count(store, "SELECT COUNT(*) FROM leases WHERE parent_id IS NOT NULL AND path IS NULL").await, 0);
    assert_eq!(descendants(&m, "lease_a").len(), 6 + 36 + 216 + 24);

    // Release a mid-level lease: exactly its subtree is revoked with it.
    let mid = "lease_a11";
    let released: BTreeSet<String> = leases::release(store, mid, NOW + 1).await.unwrap().into_iter().collect();
    assert_eq!(released, descendants(&m, mid));
    assert_eq!(released.len(), 6 + 36);

    // Revoke a lease deep in the chain.
    let deep = "lease_a_chain10";
    let revoked: BTreeSet<String> = leases::revoke_subtree(store, deep, "manual_revocation", NOW + 2).await.unwrap().into_iter().collect();
    assert_eq!(revoked, descendants(&m, deep));
    assert_eq!(revoked.len(), 13);

    // Revoke the root: every descendant still active, and nothing else.
    let before = all(store).await;
    let expected = active(&before, &descendants(&before, "lease_a"));
    assert_eq!(expected.len(), 6 + 36 + 216 + 24 - (6 + 36 + 1) - (1 + 13));
    let got = leases::revoke_subtree(store, "lease_a", "credential_compromised", NOW + 3).await.unwrap();
    assert!(got.windows(2).all(|w| w[0] < w[1]), "affected ids are sorted and distinct");
    assert_eq!(got.iter().cloned().collect::<BTreeSet<_>>(), expected);

    let after = all(store).await;
    let root = &after["lease_a"];
    assert_eq!((root.state, root.end_reason.as_deref(), root.ended_at), (LeaseState::Revoked, Some("credential_compromised"), Some(NOW + 3)));
    for id in descendants(&after, "lease_a") {
        if id == mid {
            continue;
        }
        let l = &after[&id];
        assert_eq!(l.state, LeaseState::Revoked, "{id} left {:?}", l.state);
        let (reason, at) = if expected.contains(&id) {
            ("parent_revoked", NOW + 3)
        } else if released.contains(&id) {
            ("parent_released", NOW + 1)
        } else if id == deep {
            ("manual_revocation", NOW + 2)
        } else {
            ("parent_revoked", NOW + 2)
        };
        assert_eq!((l.end_reason.as_deref(), l.ended_at), (Some(reason), Some(at)), "{id}");
    }
    let released_mid = &after[mid];
    assert_eq!((released_mid.state, released_mid.end_reason.as_deref()), (LeaseState::Released, Some("released")));
    // The other tree is untouched.
    for id in ["lease_ab", "lease_ab0", "lease_ab00", "lease_ab1"] {
        assert_eq!(after[id].state, LeaseState::Active, "{id}");
    }
    // Revoking again finds nothing left to end.
    assert!(leases::revoke_subtree(store, "lease_a", "manual_revocation", NOW + 4).await.unwrap().is_empty());
    assert!(matches!(leases::revoke_subtree(store, "lease_nope", "manual_revocation", NOW).await, Err(leases::LeaseError::NotFound)));

    let got: BTreeSet<String> = leases::revoke_subtree(store, "lease_ab", "manual_revocation", NOW + 5).await.unwrap().into_iter().collect();
    assert_eq!(got, ["lease_ab0", "lease_ab00", "lease_ab1"].map(String::from).into_iter().collect());
    assert_eq!(count(store, "SELECT COUNT(*) FROM leases WHERE state = 'active'").await, 0);
}

/// Rows without `path` (as a binary older than migration 0002 would write them while sharing
/// the vault) are given one before a subtree operation or a delegation relies on the range.
async fn heal(store: &Store) {
    build(store).await;
    // Forget the ancestry of everything at depth 2 or more in one tree (which includes the chain).
    exec(store, "UPDATE leases SET path = NULL WHERE depth >= 2 AND id NOT IN ('lease_ab00')").await;
    assert!(count(store, "SELECT COUNT(*) FROM leases WHERE parent_id IS NOT NULL AND path IS NULL").await > 24);
    // A delegation below a lease without a path.
    apply_all(store, &[child("lease_a_chain05", "lease_a_late")]).await;
    assert_eq!(count(store, "SELECT COUNT(*) FROM leases WHERE parent_id IS NOT NULL AND path IS NULL").await, 0);
    check_paths(store).await;

    exec(store, "UPDATE leases SET path = NULL WHERE parent_id IS NOT NULL").await;
    let m = all(store).await;
    let expected = active(&m, &descendants(&m, "lease_a"));
    assert_eq!(expected.len(), 6 + 36 + 216 + 24 + 1);
    let got: BTreeSet<String> = leases::revoke_subtree(store, "lease_a", "manual_revocation", NOW + 1).await.unwrap().into_iter().collect();
    assert_eq!(got, expected);
    check_paths(store).await;

    exec(store, "UPDATE leases SET path = NULL WHERE id = 'lease_ab00'").await;
    assert_eq!(leases::release(store, "lease_ab", NOW + 2).await.unwrap(), vec!["lease_ab0", "lease_ab00", "lease_ab1"]);
    assert_eq!(count(store, "SELECT COUNT(*) FROM leases WHERE state = 'active'").await, 0);
}

/// Every delegated lease's `path` is its parent's (`parent/` for a root) followed by `id/`.
async fn check_paths(store: &Store) {
    let rows: Vec<(String, Option<String>, Option<Vec<u8>>)> = match store {
        Store::Sqlite(p) => sqlx::query_as("SELECT id, parent_id, path FROM leases").fetch_all(p).await.unwrap(),
        Store::Postgres(p) => sqlx::query_as("SELECT id, parent_id, path FROM leases").fetch_all(p).await.unwrap(),
    };
    let by_id: BTreeMap<&str, (&Option<String>, &Option<Vec<u8>>)> = rows.iter().map(|(i, p, x)| (i.as_str(), (p, x))).collect();
    for (id, parent, path) in &rows {
        let Some(parent) = parent else {
            assert!(path.is_none(), "root {id} has a path");
            continue;
        };
        // A missing parent (an orphan) counts as a root.
        let mut want = match by_id.get(parent.as_str()) {
            None | Some((None, _)) => format!("{parent}/").into_bytes(),
            Some((Some(_), Some(pp))) => (*pp).clone(),
            Some((Some(_), None)) => panic!("{parent} has no path"),
        };
        want.extend_from_slice(format!("{id}/").as_bytes());
        assert_eq!(path.as_deref(), Some(want.as_slice()), "path of {id}");
    }
}

/// A vault created at schema version 1, with delegation trees, migrated to the current schema.
async fn migrate_v1(store: &Store, blob: &str) {
    exec(store, "CREATE TABLE crp_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)").await;
    exec(store, &MIGRATIONS[0].1.replace("{BLOB}", blob)).await;
    exec(store, "INSERT INTO crp_migrations (version, applied_at) VALUES (1, 0)").await;
    let cols = "id, credential_key, service, agent, parent_id, depth, max_depth, scopes, token_hash, state, ttl, created_at, expires_at, max_expires_at";
    let row = |id: &str, parent: Option<&str>, depth: u32, state: &str| {
        let parent = parent.map(|p| format!("'{p}'")).unwrap_or_else(|| "NULL".into());
        format!("('{id}', 'k', 's', 'agent', {parent}, {depth}, 8, '[]', 'h', '{state}', 60, 0, {NOW}, {NOW})")
    };
    let values = [
        row("lease_r", None, 0, "active"),
        row("lease_r1", Some("lease_r"), 1, "active"),
        row("lease_r11", Some("lease_r1"), 2, "active"),
        row("lease_r111", Some("lease_r11"), 3, "active"),
        row("lease_r12", Some("lease_r1"), 2, "expired"),
        row("lease_r2", Some("lease_r"), 1, "active"),
        row("lease_s", None, 0, "active"),
        row("lease_s1", Some("lease_s"), 1, "active"),
        row("lease_orphan1", Some("lease_gone"), 1, "active"),
        row("lease_orphan11", Some("lease_orphan1"), 2, "active"),
    ];
    exec(store, &format!("INSERT INTO leases ({cols}) VALUES {}", values.join(", "))).await;
    store.migrate().await.unwrap();
    assert_eq!(count(store, "SELECT COUNT(*) FROM crp_migrations").await, MIGRATIONS.len() as i64);
    assert_eq!(count(store, "SELECT COUNT(*) FROM leases WHERE parent_id IS NOT NULL AND path IS NULL").await, 0);
    check_paths(store).await;
    let got = leases::revoke_subtree(store, "lease_r1", "manual_revocation", NOW - 1).await.unwrap();
    assert_eq!(got, vec!["lease_r11", "lease_r111"]);
    assert_eq!(leases::revoke_subtree(store, "lease_orphan1", "manual_revocation", NOW - 1).await.unwrap(), vec!["lease_orphan11"]);
    assert_eq!(leases::revoke_subtree(store, "lease_r", "manual_revocation", NOW - 1).await.unwrap(), vec!["lease_r2"]);
    assert_eq!(leases::get(store, "lease_s1").await.unwrap().map(|l| l.state), Some(LeaseState::Active));
    // The expiry index the reaper uses still finds what it must.
    let reaped = leases::reap(store, NOW + 1, 0).await.unwrap();
    assert_eq!(reaped.into_iter().map(|r| r.id).collect::<Vec<_>>(), vec!["lease_s", "lease_s1"]);
}

async fn sqlite() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("vault.db")).await.unwrap();
    (dir, store)
}

#[tokio::test]
async fn cascade_ends_every_active_descendant() {
    let (_dir, store) = sqlite().await;
    store.migrate().await.unwrap();
    cascade(&store).await;
}

#[tokio::test]
async fn leases_without_a_path_are_healed_first() {
    let (_dir, store) = sqlite().await;
    store.migrate().await.unwrap();
    heal(&store).await;
}

#[tokio::test]
async fn a_version_1_vault_is_migrated() {
    let (_dir, store) = sqlite().await;
    migrate_v1(&store, "BLOB").await;
}

/// The three above on PostgreSQL (scripts/test.sh exports `CRP_TEST_POSTGRES_URL`; required in
/// CI, elsewhere the test says it has nothing to run against).
#[tokio::test]
async fn on_postgres() {
    for (name, run) in [("cascade", 0), ("heal", 1), ("migrate", 2)] {
        let Some(db) = pg_support::TestDatabase::create(&format!("crp_cascade_{name}")).await else { return };
        let store = Store::open_url(&db.url).await.unwrap();
        match run {
            0 => {
                store.migrate().await.unwrap();
                cascade(&store).await;
            }
            1 => {
                store.migrate().await.unwrap();
                heal(&store).await;
            }
            _ => migrate_v1(&store, "BYTEA").await,
        }
        store.close().await;
        db.drop_database().await;
    }
}
