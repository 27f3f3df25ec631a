//! Property tests of the lease state machine under random operation sequences, with a
//! simulated clock, against the real storage layer (SQLite):
//! - no active child outlives or out-scopes its parent, and a live child has a live parent;
//! - no grant exceeds its caps (requested TTL, credential max, provider max, lifetime max);
//! - delegation depth never exceeds the chain's limit;
//! - a revoked lease stays revoked, and revoking reports exactly the subtree that was live.

use std::collections::{BTreeMap, BTreeSet};

use crp_provider::leases::{self, Caps, LeaseError, LeaseRecord, LeaseState, NewLease};
use crp_provider::store::Store;
use proptest::prelude::*;

const SCOPES: [&str; 3] = ["a", "b", "c"];
const PROVIDER_MAX_TTL: u32 = 120;
const LIFETIME: u32 = 300;
const DEPTH_CAP: u32 = 3;

#[derive(Debug, Clone)]
enum Op {
    Root { ttl: Option<u32>, cred_max: Option<u32>, scopes: u8 },
    Delegate { parent: usize, ttl: Option<u32>, scopes: u8, max_depth: Option<u32> },
    Renew { lease: usize, inc: u32 },
    Release { lease: usize },
    Revoke { lease: usize },
    Advance { secs: u32 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (proptest::option::of(1u32..400), proptest::option::of(1u32..200), 0u8..8)
            .prop_map(|(ttl, cred_max, scopes)| Op::Root { ttl, cred_max, scopes }),
        4 => (0usize..64, proptest::option::of(1u32..400), 0u8..8, proptest::option::of(1u32..6))
            .prop_map(|(parent, ttl, scopes, max_depth)| Op::Delegate { parent, ttl, scopes, max_depth }),
        2 => (0usize..64, 1u32..400).prop_map(|(lease, inc)| Op::Renew { lease, inc }),
        1 => (0usize..64).prop_map(|lease| Op::Release { lease }),
        1 => (0usize..64).prop_map(|lease| Op::Revoke { lease }),
        2 => (0u32..90).prop_map(|secs| Op::Advance { secs }),
    ]
}

fn scopes(mask: u8) -> Vec<String> {
    SCOPES.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, s)| s.to_string()).collect()
}

fn caps(cred_max: Option<u32>) -> Caps {
    Caps { provider_max_ttl: PROVIDER_MAX_TTL, credential_max_ttl: cred_max, max_lease_lifetime: LIFETIME }
}

async fn all(store: &Store, ids: &[String]) -> BTreeMap<String, LeaseRecord> {
    let mut m = BTreeMap::new();
    for id in ids {
        m.insert(id.clone(), leases::get(store, id).await.unwrap().unwrap());
    }
    m
}

fn live(l: &LeaseRecord, now: i64) -> bool {
    l.state == LeaseState::Active && now < l.expires_at
}

fn check(m: &BTreeMap<String, LeaseRecord>, revoked: &BTreeSet<String>, now: i64) -> Result<(), TestCaseError> {
    for l in m.values() {
        prop_assert!(l.expires_at <= l.max_expires_at, "{} expires after its maximum", l.id);
        prop_assert!(l.depth <= l.max_depth && l.max_depth <= DEPTH_CAP, "{} too deep", l.id);
        if revoked.contains(&l.id) {
            prop_assert_eq!(l.state, LeaseState::Revoked, "{} was revoked and came back", &l.id);
        }
        if let Some(pid) = &l.parent_id {
            let p = &m[pid];
            prop_assert_eq!(l.depth, p.depth + 1);
            prop_assert!(l.scopes.iter().all(|s| p.scopes.contains(s)), "{} out-scopes its parent", l.id);
            prop_assert!(l.max_expires_at <= p.max_expires_at, "{} may outlive its parent's maximum", l.id);
            if live(l, now) {
                prop_assert!(live(p, now), "{} is live but its parent {} is not", l.id, p.id);
                prop_assert!(l.expires_at <= p.expires_at, "{} outlives its parent", l.id);
            }
        }
    }
    Ok(())
}

fn descendants(m: &BTreeMap<String, LeaseRecord>, root: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut frontier = vec![root.to_string()];
    while let Some(x) = frontier.pop() {
        for l in m.values().filter(|l| l.parent_id.as_deref() == Some(&x)) {
            out.insert(l.id.clone());
            frontier.push(l.id.clone());
        }
    }
    out
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("vault.db")).await.unwrap();
    store.migrate().await.unwrap();
    let mut now: i64 = 1_800_000_000_000;
    let mut ids: Vec<String> = Vec::new();
    let mut cred_caps: BTreeMap<String, Caps> = BTreeMap::new();
    let mut revoked: BTreeSet<String> = BTreeSet::new();
    let pick = |ids: &Vec<String>, i: usize| (!ids.is_empty()).then(|| ids[i % ids.len()].clone());
    for (n, op) in ops.into_iter().enumerate() {
        let id = format!("lease_{n:04}");
        match op {
            Op::Root { ttl, cred_max, scopes: mask } => {
                let c = caps(cred_max);
                let granted = c.grant_ttl(ttl);
                prop_assert!(granted <= ttl.unwrap_or(leases::DEFAULT_TTL) && granted <= PROVIDER_MAX_TTL);
                prop_assert!(cred_max.is_none_or(|m| granted <= m));
                let nl = NewLease {
                    id: id.clone(),
                    token_hash: "h".into(),
                    credential_key: "k".into(),
                    service: "s".into(),
                    agent: "a".into(),
                    scopes: scopes(mask),
                    ttl: granted,
                    caps: c,
                    purpose: None,
                    consumer: None,
                };
                let rec = leases::insert_root(&store, &nl, DEPTH_CAP, now).await.unwrap();
                prop_assert_eq!(rec.expires_at, now + i64::from(granted) * 1000);
                cred_caps.insert(id.clone(), c);
                ids.push(id);
            }
            Op::Delegate { parent, ttl, scopes: mask, max_depth } => {
                let Some(pid) = pick(&ids, parent) else { continue };
                let c = cred_caps[&pid];
                let before = leases::get(&store, &pid).await.unwrap().unwrap();
                let nl = NewLease {
                    id: id.clone(),
                    token_hash: "h".into(),
                    credential_key: "k".into(),
                    service: "s".into(),
                    agent: "a".into(),
                    scopes: scopes(mask),
                    ttl: 0,
                    caps: c,
                    purpose: None,
                    consumer: None,
                };
                match leases::insert_child(&store, &pid, &nl, ttl, max_depth, DEPTH_CAP, now).await {
                    Ok(rec) => {
                        prop_assert!(live(&before, now), "delegated from a dead parent");
                        prop_assert!(rec.ttl <= c.grant_ttl(ttl), "child grant exceeds its caps");
                        prop_assert!(rec.expires_at <= before.expires_at);
                        cred_caps.insert(id.clone(), c);
                        ids.push(id);
                    }
                    Err(LeaseError::DepthExceeded(max)) => {
                        prop_assert!(before.depth + 1 > max);
                        prop_assert!(max <= DEPTH_CAP);
                    }
                    Err(LeaseError::ScopeOutOfParent(out)) => {
                        prop_assert!(out.iter().all(|s| !before.scopes.contains(s)));
                    }
                    Err(LeaseError::Expired) | Err(LeaseError::Ended(_)) => {
                        prop_assert!(!live(&before, now) || (before.expires_at - now) < 1000);
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("delegate: {e}"))),
                }
            }
            Op::Renew { lease, inc } => {
                let Some(lid) = pick(&ids, lease) else { continue };
                let c = cred_caps[&lid];
                let before = leases::get(&store, &lid).await.unwrap().unwrap();
                let inc = c.grant_ttl(Some(inc));
                match leases::renew(&store, &lid, inc, now).await {
                    Ok(rec) => {
                        prop_assert!(live(&before, now), "renewed a dead lease");
                        prop_assert!(rec.expires_at >= before.expires_at, "renew shortened a lease");
                        prop_assert!(rec.expires_at <= now + i64::from(inc) * 1000 || rec.expires_at == before.expires_at);
                        prop_assert!(rec.expires_at <= rec.max_expires_at);
                    }
                    Err(LeaseError::Expired | LeaseError::Ended(_) | LeaseError::NotRenewable(_)) => {}
                    Err(e) => return Err(TestCaseError::fail(format!("renew: {e}"))),
                }
            }
            Op::Release { lease } => {
                let Some(lid) = pick(&ids, lease) else { continue };
                let m = all(&store, &ids).await;
                match leases::release(&store, &lid, now).await {
                    Ok(affected) => {
                        prop_assert!(live(&m[&lid], now));
                        let live_desc: BTreeSet<String> =
                            descendants(&m, &lid).into_iter().filter(|d| m[d].state == LeaseState::Active).collect();
                        prop_assert_eq!(affected.into_iter().collect::<BTreeSet<_>>(), live_desc.clone());
                        revoked.extend(live_desc);
                    }
                    Err(LeaseError::Expired | LeaseError::Ended(_)) => prop_assert!(!live(&m[&lid], now)),
                    Err(e) => return Err(TestCaseError::fail(format!("release: {e}"))),
                }
            }
            Op::Revoke { lease } => {
                let Some(lid) = pick(&ids, lease) else { continue };
                let m = all(&store, &ids).await;
                let affected = leases::revoke_subtree(&store, &lid, "manual_revocation", now).await.unwrap();
                let active_desc: BTreeSet<String> =
                    descendants(&m, &lid).into_iter().filter(|d| m[d].state == LeaseState::Active).collect();
                prop_assert_eq!(affected.into_iter().collect::<BTreeSet<_>>(), active_desc.clone());
                revoked.insert(lid);
                revoked.extend(active_desc);
            }
            Op::Advance { secs } => {
                now += i64::from(secs) * 1000;
                let reaped = leases::reap(&store, now, 0).await.unwrap();
                for r in reaped {
                    prop_assert!(!revoked.contains(&r.id));
                }
            }
        }
        let m = all(&store, &ids).await;
        check(&m, &revoked, now)?;
    }
    store.close().await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 200, ..ProptestConfig::default() })]
    #[test]
    fn lease_invariants_hold(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(ops))?;
    }
}

#[test]
fn grant_ttl_is_the_minimum_of_its_caps() {
    let c = Caps { provider_max_ttl: 100, credential_max_ttl: Some(50), max_lease_lifetime: 1000 };
    assert_eq!(c.grant_ttl(Some(10)), 10);
    assert_eq!(c.grant_ttl(Some(70)), 50);
    assert_eq!(c.grant_ttl(None), 50);
    let c = Caps { provider_max_ttl: 100, credential_max_ttl: None, max_lease_lifetime: 1000 };
    assert_eq!(c.grant_ttl(Some(700)), 100);
}
