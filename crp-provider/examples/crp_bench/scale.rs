//! Scale: per-operation latency with 10^4 … 10^6 stored credentials and active leases, and a
//! cascade revoke of a ~10^5-lease delegation tree.
//!
//! Population note: the vault has no bulk API, and its public `admin_store` / `crp/use` commit
//! one fsynced transaction each (~2k/s here), so filler rows are written directly through the
//! store (`Vault::store()`, the SQLite pool) with `INSERT … SELECT` from a recursive CTE, in one
//! transaction per table. Filler credentials carry random bytes where the sealed value would be
//! (they are listed and indexed but never opened); filler leases are `active`, expire in an hour
//! and carry random token hashes. The measured operations all go through the public API
//! (`crp_core::Provider` on the `Vault`, and `Vault::proxy_grant`) on a real credential.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail};
use crp_core::types::{Delegation, LeaseAction, LeaseParams, RevokeParams, RevokeReason, UseParams};
use crp_core::provider::Transport;
use crp_core::{CallContext, Provider};
use crp_provider::store::{Store, now_ms};
use crp_provider::vault::Vault;

use crate::common::*;

pub struct ScaleArgs {
    pub work: PathBuf,
    pub sizes: Vec<u64>,
    pub iters: u32,
    pub tree: u64,
}

fn pool(v: &Vault) -> anyhow::Result<sqlx::SqlitePool> {
    match v.store() {
        Store::Sqlite(p) => Ok(p.clone()),
        Store::Postgres(_) => bail!("the scale benchmark populates SQLite only"),
    }
}

/// `n` filler credentials (`fill/00000001` … on services `fillNNNNNNNN.example/api`).
pub async fn fill_credentials(v: &Vault, n: u64) -> anyhow::Result<()> {
    if n == 0 {
        return Ok(());
    }
    let p = pool(v)?;
    let now = now_ms();
    let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::query(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < $1)
         INSERT INTO credentials (key, service, kind, classification, tags, scopes, max_ttl, renewable, metadata, expires_at, version, created_at, updated_at)
         SELECT printf('fill/%08d', x), printf('fill%08d.example/api', x), 'api_key', 'internal', '[]', '[\"read\"]', NULL, 1, '{}', NULL, 1, $2, $2 FROM c",
    )
    .bind(n as i64)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < $1)
         INSERT INTO credential_versions (key, version, sealed_value, sealed_config, created_at)
         SELECT printf('fill/%08d', x), 1, randomblob(72), randomblob(160), $2 FROM c",
    )
    .bind(n as i64)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// `n` filler active leases spread over the first `creds` filler credentials.
async fn fill_leases(v: &Vault, n: u64, creds: u64) -> anyhow::Result<()> {
    if n == 0 {
        return Ok(());
    }
    let p = pool(v)?;
    let now = now_ms();
    let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::query(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < $1)
         INSERT INTO leases (id, credential_key, service, agent, parent_id, depth, max_depth, scopes, token_hash, state, ttl, created_at, expires_at, max_expires_at, ended_at, end_reason, purpose, consumer)
         SELECT 'lease_' || lower(hex(randomblob(16))), printf('fill/%08d', 1 + (x % $2)), printf('fill%08d.example/api', 1 + (x % $2)),
                'bench', NULL, 0, 4, '[]', lower(hex(randomblob(32))), 'active', 3600, $3, $3 + 3600000, $3 + 86400000, NULL, NULL, NULL, 'bench-fill'
         FROM c",
    )
    .bind(n as i64)
    .bind(creds.max(1) as i64)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Under `root`, `levels` generations of `fan` children each (tagged by consumer
/// `bench-tree-<depth>`). Returns how many were inserted.
async fn fill_tree(v: &Vault, root: &str, fan: u64, levels: u32) -> anyhow::Result<u64> {
    let p = pool(v)?;
    let now = now_ms();
    let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
    let mut total = 0u64;
    for depth in 1..=levels {
        let parent_filter = if depth == 1 { "p.id = $3".to_string() } else { format!("p.consumer = 'bench-tree-{}'", depth - 1) };
        // Each child's id is drawn once (a materialised CTE, so that `randomblob` is not
        // evaluated again where the id is used twice) and its ancestry `path` is the parent's
        // (or `parent/` under the root) followed by `id/`, as the vault writes it.
        let q = format!(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < $1),
             n AS MATERIALIZED (SELECT 'lease_' || lower(hex(randomblob(16))) AS nid, p.* FROM leases p, c WHERE {parent_filter})
             INSERT INTO leases (id, credential_key, service, agent, parent_id, depth, max_depth, scopes, token_hash, state, ttl, created_at, expires_at, max_expires_at, ended_at, end_reason, purpose, consumer, path)
             SELECT nid, credential_key, service, agent, id, depth + 1, 16, scopes,
                    lower(hex(randomblob(32))), 'active', ttl, $2, expires_at, max_expires_at, NULL, NULL, NULL, 'bench-tree-{depth}',
                    CAST(COALESCE(path, CAST(id || '/' AS BLOB)) || CAST(nid || '/' AS BLOB) AS BLOB)
             FROM n"
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(q)).bind(fan as i64).bind(now);
        if depth == 1 {
            query = query.bind(root);
        }
        let r = query.execute(&mut *tx).await?;
        total += r.rows_affected();
    }
    tx.commit().await?;
    Ok(total)
}

async fn count(v: &Vault, sql: &'static str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(&pool(v)?).await?)
}

/// The proxy's per-request check as one statement (lease + credential + current version).
const JOINED_CHECK: &str = "SELECT l.state, l.token_hash, l.expires_at, v.sealed_value, v.sealed_config
     FROM leases l JOIN credentials c ON c.key = l.credential_key
     JOIN credential_versions v ON v.key = c.key AND v.version = c.version WHERE l.id = $1";

struct Ops {
    size: u64,
    populate_s: f64,
    use_: Samples,
    grant: Samples,
    joined: Samples,
    renew: Samples,
    delegate: Samples,
    release: Samples,
    revoke: Samples,
    list_creds: i64,
    active: i64,
}

async fn measure(v: &Vault, size: u64, populate_s: f64, iters: u32) -> anyhow::Result<Ops> {
    let ctx = CallContext::new(AGENT, Transport::InProcess);
    let mut o = Ops {
        size,
        populate_s,
        use_: Samples::default(),
        grant: Samples::default(),
        joined: Samples::default(),
        renew: Samples::default(),
        delegate: Samples::default(),
        release: Samples::default(),
        revoke: Samples::default(),
        list_creds: count(v, "SELECT COUNT(*) FROM credentials").await?,
        active: count(v, "SELECT COUNT(*) FROM leases WHERE state = 'active'").await?,
    };
    let p = pool(v)?;
    let up = || UseParams { service: SERVICE.into(), scopes: vec![], ttl: Some(600), delegation: None, identity_scope: None, context: None };
    for i in 0..iters {
        let t = Instant::now();
        let r = v.use_credential(&ctx, up()).await.map_err(|e| anyhow!("use: {e}"))?;
        o.use_.push(t.elapsed());
        let token = r.session_token.clone().ok_or_else(|| anyhow!("no session token"))?;
        let t = Instant::now();
        v.proxy_grant(&r.lease.id, &token).await.map_err(|e| anyhow!("proxy_grant: {} {}", e.status, e.message))?;
        o.grant.push(t.elapsed());
        // What proxy_grant's three sequential statements (lease, credential, version) cost as
        // one joined statement: the proposed fix, timed on the same store.
        let t = Instant::now();
        let row: Option<(String, String, i64, Vec<u8>, Vec<u8>)> = sqlx::query_as(JOINED_CHECK).bind(&r.lease.id).fetch_optional(&p).await?;
        o.joined.push(t.elapsed());
        if row.is_none() {
            bail!("joined lease check found nothing");
        }
        let t = Instant::now();
        v.lease(&ctx, LeaseParams { action: LeaseAction::Renew, lease_id: r.lease.id.clone(), ttl: Some(900) })
            .await
            .map_err(|e| anyhow!("renew: {e}"))?;
        o.renew.push(t.elapsed());
        let t = Instant::now();
        let mut dp = up();
        dp.delegation = Some(Delegation { parent_lease_id: r.lease.id.clone(), max_depth: None });
        dp.ttl = Some(300);
        v.use_credential(&ctx, dp).await.map_err(|e| anyhow!("delegate: {e}"))?;
        o.delegate.push(t.elapsed());
        if i % 2 == 0 {
            let t = Instant::now();
            v.lease(&ctx, LeaseParams { action: LeaseAction::Release, lease_id: r.lease.id.clone(), ttl: None })
                .await
                .map_err(|e| anyhow!("release: {e}"))?;
            o.release.push(t.elapsed());
        } else {
            let t = Instant::now();
            v.revoke(&ctx, RevokeParams { lease_id: r.lease.id.clone(), reason: RevokeReason::ManualRevocation, detail: None })
                .await
                .map_err(|e| anyhow!("revoke: {e}"))?;
            o.revoke.push(t.elapsed());
        }
    }
    Ok(o)
}

pub async fn run(a: ScaleArgs) -> anyhow::Result<bool> {
    let mut rows = Vec::new();
    let mut cascade = None;
    for (i, &size) in a.sizes.iter().enumerate() {
        let home = a.work.join(format!("scale-{size}"));
        let (_bh, v) = make_home(&home, "http://127.0.0.1:9", "scale-secret").await?;
        let t = Instant::now();
        fill_credentials(&v, size).await?;
        fill_leases(&v, size, size).await?;
        let populate_s = t.elapsed().as_secs_f64();
        eprintln!("  scale {size}: populated in {populate_s:.1}s");
        let ops = measure(&v, size, populate_s, a.iters).await?;
        rows.push(ops);
        if i == a.sizes.len() - 1 && a.tree > 0 {
            // Cascade: a root from crp/use, then a 3-level tree under it.
            let ctx = CallContext::new(AGENT, Transport::InProcess);
            let r = v
                .use_credential(&ctx, UseParams { service: SERVICE.into(), scopes: vec![], ttl: Some(3600), delegation: None, identity_scope: None, context: None })
                .await
                .map_err(|e| anyhow!("use: {e}"))?;
            let fan = (a.tree as f64).cbrt().ceil().max(1.0) as u64;
            let t = Instant::now();
            let inserted = fill_tree(&v, &r.lease.id, fan, 3).await?;
            let tree_fill_s = t.elapsed().as_secs_f64();
            // Every delegated row carries its ancestry, so the revoke below measures the
            // cascade itself and not a repair of rows written without one.
            let unpathed = count(&v, "SELECT COUNT(*) FROM leases WHERE parent_id IS NOT NULL AND path IS NULL").await?;
            if unpathed != 0 {
                bail!("{unpathed} tree leases were written without a path");
            }
            let ticks0 = proc_ticks(std::process::id());
            let t = Instant::now();
            let res = v
                .revoke(&ctx, RevokeParams { lease_id: r.lease.id.clone(), reason: RevokeReason::CredentialCompromised, detail: None })
                .await
                .map_err(|e| anyhow!("cascade revoke: {e}"))?;
            let revoke_s = t.elapsed().as_secs_f64();
            // CPU of this process (every thread, the SQLite workers included) over the revoke:
            // steadier than the wall time when the machine is shared.
            let revoke_cpu_s = match (ticks0, proc_ticks(std::process::id())) {
                (Some(a), Some(b)) => (b - a) as f64 * us_per_tick() / 1e6,
                _ => f64::NAN,
            };
            let left = count(&v, "SELECT COUNT(*) FROM leases WHERE consumer LIKE 'bench-tree-%' AND state = 'active'").await?;
            if left != 0 || res.affected_leases.len() as u64 != inserted + 1 {
                bail!("cascade revoke left {left} tree leases active; {} affected of {}", res.affected_leases.len(), inserted + 1);
            }
            // What a transport adds on top: the JSON of the result (every affected id).
            let t = Instant::now();
            let json = serde_json::to_vec(&res)?;
            let json_s = t.elapsed().as_secs_f64();
            cascade = Some((inserted, fan, tree_fill_s, revoke_s, revoke_cpu_s, size, json_s, json.len()));
        }
        v.shutdown().await;
        drop(v);
        // The homes are large at 10^6; free the disk as we go.
        let _ = std::fs::remove_dir_all(&home);
    }
    println!("### Scale: in-process operation latency (p50 / p99) by store size ({} iterations each)\n", a.iters);
    println!("| credentials | active leases | populate | crp/use | proxy lease check (proxy_grant) | same check as 1 joined query | renew | delegate | release | revoke |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for mut o in rows {
        let f = |s: &mut Samples| format!("{} / {}", us(s.pct_us(50.0)), us(s.pct_us(99.0)));
        println!(
            "| {} | {} | {:.1} s | {} | {} | {} | {} | {} | {} | {} |",
            o.list_creds,
            o.active,
            o.populate_s,
            f(&mut o.use_),
            f(&mut o.grant),
            f(&mut o.joined),
            f(&mut o.renew),
            f(&mut o.delegate),
            f(&mut o.release),
            f(&mut o.revoke)
        );
        let _ = o.size;
    }
    println!();
    if let Some((n, fan, fill_s, revoke_s, revoke_cpu_s, size, json_s, json_len)) = cascade {
        println!(
            "- cascade revoke (crp/revoke of the root, one audited transaction): **{} leases in {:.3} s** \
             ({:.2} s of CPU; tree: 3 levels of fan-out {fan} under a crp/use root, built in {:.1} s; store of {size} credentials); \
             target ≤ 1 s: **{}**; the result as JSON (what HTTP/stdio add): {:.1} ms, {:.1} MB",
            n + 1,
            revoke_s,
            revoke_cpu_s,
            fill_s,
            if revoke_s <= 1.0 { "met" } else { "missed" },
            json_s * 1e3,
            json_len as f64 / 1e6
        );
        println!();
    }
    Ok(true)
}
