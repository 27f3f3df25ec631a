//! `crp_bench audit`: the audit writer alone, in process. `concurrency` tasks each append
//! `credential.used` entries (shaped like the proxy's) one after the other for `duration`
//! seconds, on a fresh SQLite vault file; reported: appends/s, this process's CPU per entry,
//! entries per group commit, and the share of batches the writer committed on its own
//! connection (`crp_provider::audit`, "No hand-offs for plain appends").

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crp_provider::audit::{AuditLog, AuditRecord};
use crp_provider::config::Durability;
use crp_provider::crypto::Key32;
use crp_provider::epoch::Epochs;
use crp_provider::store::Store;

use crate::common::{proc_ticks, us_per_tick};

pub struct AuditArgs {
    pub work: PathBuf,
    pub durability: Durability,
    pub duration: f64,
    pub concurrency: Vec<u32>,
}

pub async fn run(a: AuditArgs) -> anyhow::Result<bool> {
    println!("### Audit writer alone (in process, {:?}, {} s per level)\n", a.durability, a.duration);
    println!("| appenders | appends/s | CPU µs/entry | entries/commit | own-connection commits | committed by their caller |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let pid = std::process::id();
    for (i, &conc) in a.concurrency.iter().enumerate() {
        let dir = a.work.join(format!("audit-{i}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let store = Store::open_sqlite(&dir.join("vault.db")).await?;
        store.migrate().await?;
        let (log, _writer) = AuditLog::start_with(store.clone(), Key32::generate()?, a.durability, Epochs::disabled());
        let stop = Instant::now() + Duration::from_secs_f64(a.duration);
        let ticks = proc_ticks(pid).unwrap_or(0);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..conc {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let lease = format!("lease_0000000000000000{t:04}");
                let mut n = 0u64;
                while Instant::now() < stop {
                    let rec = AuditRecord::new("credential.used", "agent_0123456789abcdef", "allow")
                        .key("bench-key")
                        .lease(&lease)
                        .with("method", "GET")
                        .with("path", "/v1/items")
                        .with("status", 200)
                        .with("bytesIn", 0)
                        .with("bytesOut", 60)
                        .with("durationUs", 250);
                    log.append(rec).await?;
                    n += 1;
                }
                anyhow::Ok(n)
            }));
        }
        let mut total = 0u64;
        for t in tasks {
            total += t.await??;
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu_us = (proc_ticks(pid).unwrap_or(0).saturating_sub(ticks)) as f64 * us_per_tick();
        let (batches, entries) = log.stats();
        println!(
            "| {conc} | {:.0} | {:.1} | {:.1} | {:.0}% | {:.0}% |",
            total as f64 / secs,
            cpu_us / total.max(1) as f64,
            entries as f64 / batches.max(1) as f64,
            100.0 * log.direct_batches() as f64 / batches.max(1) as f64,
            100.0 * log.inline_commits() as f64 / entries.max(1) as f64
        );
        drop(log);
        store.close().await;
    }
    println!();
    Ok(true)
}
