//! Lease path: `crp/use` followed by `crp/lease` release, with durable audit, (a) over HTTP
//! against `crp-provider serve` with Ed25519-signed requests, one lease per request and in
//! JSON-RPC batches (N uses in one signed request, then their N releases in another), (b) in
//! process through `crp_core::Provider` on a `Vault` (no HTTP, no signatures), at several
//! concurrencies.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use crp_core::types::{LeaseAction, LeaseParams, UseParams};
use crp_core::provider::Transport;
use crp_core::{CallContext, Provider};
use serde_json::json;
use tokio::sync::Mutex;

use crate::common::*;

pub struct LeaseArgs {
    pub work: PathBuf,
    pub server: ServerCmd,
    pub duration: f64,
    pub clients: Vec<u32>,
    pub batch: Vec<u32>,
}

#[derive(Default)]
struct Tally {
    use_lat: Samples,
    release_lat: Samples,
    errors: Vec<String>,
}

struct Row {
    mode: String,
    clients: u32,
    pairs: u64,
    secs: f64,
    use_lat: Samples,
    release_lat: Samples,
    cpu_us_per_pair: f64,
    /// CPU of this process (the load generator; in process, also the vault) per pair.
    own_cpu_us_per_pair: f64,
    errors: u64,
    first_error: Option<String>,
}

fn use_params() -> UseParams {
    UseParams { service: SERVICE.into(), scopes: vec![], ttl: Some(600), delegation: None, identity_scope: None, context: None }
}

/// Run `clients` workers for `secs`, each looping `op` (which returns the two latencies and
/// the pairs it completed).
async fn drive<F, Fut>(clients: u32, secs: f64, op: F) -> (u64, f64, Tally)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<(Duration, Duration, u64)>> + Send,
{
    let tally = Arc::new(Mutex::new(Tally::default()));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let (op, tally, done) = (op.clone(), tally.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = Tally::default();
            while Instant::now() < deadline {
                match op().await {
                    Ok((u, r, n)) => {
                        local.use_lat.push(u);
                        local.release_lat.push(r);
                        done.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if local.errors.len() < 3 {
                            local.errors.push(format!("{e:#}"));
                        } else {
                            local.errors.push(String::new());
                        }
                        // Do not spin on a persistent failure.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            let mut t = tally.lock().await;
            t.use_lat.extend(local.use_lat);
            t.release_lat.extend(local.release_lat);
            t.errors.extend(local.errors);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let tally = Arc::try_unwrap(tally).map(Mutex::into_inner).unwrap_or_default();
    (done.load(Ordering::Relaxed), secs, tally)
}

fn row(mode: String, clients: u32, pairs: u64, secs: f64, t: Tally, cpu: f64, own_cpu: f64) -> Row {
    let first_error = t.errors.iter().find(|e| !e.is_empty()).cloned();
    Row {
        mode,
        clients,
        pairs,
        secs,
        use_lat: t.use_lat,
        release_lat: t.release_lat,
        cpu_us_per_pair: cpu,
        own_cpu_us_per_pair: own_cpu,
        errors: t.errors.len() as u64,
        first_error,
    }
}

pub async fn run(a: LeaseArgs) -> anyhow::Result<bool> {
    let mut rows = Vec::new();
    // (a) over HTTP, signed, against the server process.
    {
        let home = a.work.join("lease-home");
        let (bh, vault) = make_home(&home, "http://127.0.0.1:9", "unused-secret").await?;
        vault.shutdown().await;
        drop(vault);
        let server = a.server.spawn(&bh.home)?;
        let rpc = RpcClient::new(&server.url, bh.key.clone(), AGENT)?;
        // correctness once
        let v = rpc.call("crp/use", json!({"service": SERVICE, "ttl": 600})).await.context("crp/use over HTTP")?;
        let h = use_handle(&v)?;
        rpc.call("crp/lease", json!({"action": "release", "leaseId": h.lease_id})).await.context("release over HTTP")?;
        let tick = us_per_tick();
        for &b in &a.batch {
            for &c in &a.clients {
                let rpc = rpc.clone();
                let before = proc_ticks(server.pid()).unwrap_or(0);
                let own_before = proc_ticks(std::process::id()).unwrap_or(0);
                let (pairs, secs, tally) = drive(c, a.duration, move || {
                    let rpc = rpc.clone();
                    async move {
                        if b <= 1 {
                            let t0 = Instant::now();
                            let v = rpc.call("crp/use", json!({"service": SERVICE, "ttl": 600})).await?;
                            let t1 = Instant::now();
                            let id = lease_id(&v)?;
                            rpc.call("crp/lease", json!({"action": "release", "leaseId": id})).await?;
                            return Ok((t1 - t0, t1.elapsed(), 1));
                        }
                        let t0 = Instant::now();
                        let uses = rpc.call_batch("crp/use", vec![json!({"service": SERVICE, "ttl": 600}); b as usize]).await?;
                        let t1 = Instant::now();
                        let releases =
                            uses.iter().map(|v| Ok(json!({"action": "release", "leaseId": lease_id(v)?}))).collect::<anyhow::Result<Vec<_>>>()?;
                        rpc.call_batch("crp/lease", releases).await?;
                        Ok((t1 - t0, t1.elapsed(), u64::from(b)))
                    }
                })
                .await;
                let after = proc_ticks(server.pid()).unwrap_or(0);
                let own_after = proc_ticks(std::process::id()).unwrap_or(0);
                let cpu = after.saturating_sub(before) as f64 * tick / pairs.max(1) as f64;
                let own = own_after.saturating_sub(own_before) as f64 * tick / pairs.max(1) as f64;
                let mode = if b <= 1 {
                    "HTTP (signed) → crp-provider serve".to_string()
                } else {
                    format!("HTTP (signed), batches of {b} → crp-provider serve")
                };
                rows.push(row(mode, c, pairs, secs, tally, cpu, own));
                eprintln!("  leases over HTTP c={c} batch={b}: {pairs} pairs in {secs:.1}s");
            }
        }
        drop(server);
    }
    // (b) in process.
    {
        let home = a.work.join("lease-home-inproc");
        let (_bh, vault) = make_home(&home, "http://127.0.0.1:9", "unused-secret").await?;
        let vault = Arc::new(vault);
        let ctx = CallContext::new(AGENT, Transport::InProcess);
        let tick = us_per_tick();
        for &c in &a.clients {
            let (vault, ctx) = (vault.clone(), ctx.clone());
            let own_before = proc_ticks(std::process::id()).unwrap_or(0);
            let (pairs, secs, tally) = drive(c, a.duration, move || {
                let (vault, ctx) = (vault.clone(), ctx.clone());
                async move {
                    let t0 = Instant::now();
                    let r = vault.use_credential(&ctx, use_params()).await.map_err(|e| anyhow!("use: {e}"))?;
                    let t1 = Instant::now();
                    vault
                        .lease(&ctx, LeaseParams { action: LeaseAction::Release, lease_id: r.lease.id, ttl: None })
                        .await
                        .map_err(|e| anyhow!("release: {e}"))?;
                    Ok((t1 - t0, t1.elapsed(), 1))
                }
            })
            .await;
            let own = proc_ticks(std::process::id()).unwrap_or(0).saturating_sub(own_before) as f64 * tick / pairs.max(1) as f64;
            rows.push(row("in-process Provider (Vault)".into(), c, pairs, secs, tally, f64::NAN, own));
            eprintln!("  leases in process c={c}: {pairs} pairs in {secs:.1}s");
        }
        vault.shutdown().await;
    }

    let mut ok = true;
    println!("### Lease path: crp/use + release, durable audit ({} s per run)\n", a.duration);
    println!(
        "Batched rows: each client sends N `crp/use` in one signed JSON-RPC batch, then their N releases in another; \
         latencies are per batch.\n"
    );
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("| mode | clients | leases/s (use+release pairs) | use p50 | use p99 | release p50 | release p99 | server CPU µs/pair | bench CPU µs/pair | CPU-bound ceiling | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for mut r in rows {
        let rate = r.pairs as f64 / r.secs;
        let own_cpu = format!("{:.0}", r.own_cpu_us_per_pair);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.mode,
            r.clients,
            human(rate),
            us(r.use_lat.pct_us(50.0)),
            us(r.use_lat.pct_us(99.0)),
            us(r.release_lat.pct_us(50.0)),
            us(r.release_lat.pct_us(99.0)),
            if r.cpu_us_per_pair.is_finite() { format!("{:.0}", r.cpu_us_per_pair) } else { "—".into() },
            own_cpu,
            ceiling(cores, r.cpu_us_per_pair, r.own_cpu_us_per_pair),
            r.errors
        );
        if r.errors > 0 {
            ok = false;
            println!(
                "|  ↳ first error | | {} | | | | | | | | |",
                r.first_error.unwrap_or_default().replace('|', "/").chars().take(160).collect::<String>()
            );
        }
        if r.mode.starts_with("HTTP") && r.clients == 64 {
            println!(
                "|  ↳ target ≥ 10,000 leases/s at 64 | | **{}** | | | | | | | | |",
                if rate >= 10_000.0 { "met" } else { "missed" }
            );
        }
    }
    println!(
        "\nbench CPU: this process (the signing HTTP load generator; in process, also the vault). \
         CPU-bound ceiling: pairs/s if all {cores} cores ran only server and bench at the measured CPU per pair.\n"
    );
    Ok(ok)
}

fn lease_id(use_result: &serde_json::Value) -> anyhow::Result<String> {
    use_result.pointer("/lease/id").and_then(|x| x.as_str()).map(str::to_string).ok_or_else(|| anyhow!("no lease id in {use_result}"))
}

/// Pairs per second `cores` could sustain at `server_us` + `bench_us` CPU per pair.
fn ceiling(cores: usize, server_us: f64, bench_us: f64) -> String {
    let per_pair = if server_us.is_finite() { server_us + bench_us } else { bench_us };
    if per_pair > 0.0 { human(cores as f64 * 1e6 / per_pair) } else { "—".into() }
}
