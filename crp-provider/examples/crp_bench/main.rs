//! The benchmark driver behind `scripts/bench.sh` (see the README's "Performance" section).
//!
//! ```text
//! crp_bench proxy  --upstream-bin B --server-bin S [--floor-bin F] [--duration 10] [--conns 1,16,64] [--nginx-workers 1,auto]
//! crp_bench leases --server-bin S [--duration 5] [--clients 1,64] [--batch 1,16]
//! crp_bench audit  --work W [--durability fsync|os] [--duration 4] [--concurrency 1,8,64]
//! crp_bench scale  [--sizes 10000,100000,1000000] [--iters 200] [--tree 100000]
//! crp_bench mcp-home --home H [--credentials 10000]   # a keyfile vault for the crp-mcp timings
//! crp_bench serve [the flags of `crp-provider serve`]  # crp_provider::http::run, the same entry point
//! ```
//! Each measuring subcommand prints a Markdown section on stdout (progress on stderr) and exits
//! 1 only on an error (a failed setup, a non-2xx proxied response, a failed lease operation),
//! never because a figure misses its target.

mod audit;
mod common;
mod leases;
mod proxy;
mod scale;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "CRP benchmark driver (see scripts/bench.sh)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

fn list_u32(s: &str) -> Result<Vec<u32>, String> {
    s.split(',').map(|x| x.trim().parse::<u32>().map_err(|e| format!("{x}: {e}"))).collect()
}
fn list_u64(s: &str) -> Result<Vec<u64>, String> {
    s.split(',').map(|x| x.trim().parse::<u64>().map_err(|e| format!("{x}: {e}"))).collect()
}

#[derive(Subcommand)]
enum Cmd {
    /// Proxy overhead: direct vs crp-provider vs nginx, under wrk.
    Proxy {
        /// Scratch directory (vault homes, nginx config).
        #[arg(long)]
        work: PathBuf,
        /// The bench_upstream binary.
        #[arg(long)]
        upstream_bin: PathBuf,
        /// The server binary, run as `BIN serve --home H --listen 127.0.0.1:0`.
        #[arg(long)]
        server_bin: PathBuf,
        /// The bench_floor_proxy binary: a bare hyper proxy measured beside ours (the floor of
        /// our HTTP stack); left out when not given.
        #[arg(long)]
        floor_bin: Option<PathBuf>,
        /// Seconds per wrk run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Seconds of warm-up before each run (0: none).
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Connection counts.
        #[arg(long, value_parser = list_u32, default_value = "1,16,64")]
        conns: ::std::vec::Vec<u32>,
        /// wrk threads (capped by the connection count).
        #[arg(long, default_value_t = 1)]
        wrk_threads: u32,
        /// nginx worker_processes settings to compare with.
        #[arg(long, value_delimiter = ',', default_value = "1,auto")]
        nginx_workers: Vec<String>,
        /// Repetitions (the median by throughput is reported).
        #[arg(long, default_value_t = 1)]
        reps: u32,
    },
    /// Lease path: crp/use + release, over HTTP (signed) and in process.
    Leases {
        #[arg(long)]
        work: PathBuf,
        #[arg(long)]
        server_bin: PathBuf,
        /// Seconds per concurrency level.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Concurrent clients.
        #[arg(long, value_parser = list_u32, default_value = "1,64")]
        clients: ::std::vec::Vec<u32>,
        /// Leases per signed HTTP request: 1 is one `crp/use` per request; N sends a JSON-RPC
        /// batch of N `crp/use`, then one of their N releases.
        #[arg(long, value_parser = list_u32, default_value = "1,16")]
        batch: ::std::vec::Vec<u32>,
    },
    /// The audit writer alone, in process: appends/s and CPU per entry by concurrency.
    Audit {
        #[arg(long)]
        work: PathBuf,
        /// `fsync` or `os` (as `[audit] durability`).
        #[arg(long, default_value = "os")]
        durability: crp_provider::config::Durability,
        /// Seconds per concurrency level.
        #[arg(long, default_value_t = 4.0)]
        duration: f64,
        /// Concurrent appenders.
        #[arg(long, value_parser = list_u32, default_value = "1,8,64")]
        concurrency: ::std::vec::Vec<u32>,
    },
    /// Scale: operation latency by store size, cascade revoke.
    Scale {
        #[arg(long)]
        work: PathBuf,
        /// Stored credentials and active leases (each).
        #[arg(long, value_parser = list_u64, default_value = "10000,100000,1000000")]
        sizes: ::std::vec::Vec<u64>,
        /// Iterations of each operation per size.
        #[arg(long, default_value_t = 200)]
        iters: u32,
        /// Leases in the cascade-revoke tree (0: skip), built in the largest store.
        #[arg(long, default_value_t = 100_000)]
        tree: u64,
    },
    /// A keyfile vault home with `credentials` filler credentials (for crp-mcp timings).
    McpHome {
        #[arg(long)]
        home: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        credentials: u64,
    },
    /// `crp-provider serve` through the library entry point (`crp_provider::http::run`), with
    /// the same flags.
    Serve {
        #[command(flatten)]
        args: crp_provider::http::ServeArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crp_bench: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let res: anyhow::Result<bool> = rt.block_on(async move {
        match cli.cmd {
            Cmd::Proxy { work, upstream_bin, server_bin, floor_bin, duration, warmup, conns, wrk_threads, nginx_workers, reps } => {
                proxy::ensure_tools()?;
                proxy::run(proxy::ProxyArgs {
                    work,
                    upstream_bin,
                    floor_bin,
                    server: common::ServerCmd { bin: server_bin },
                    duration,
                    warmup,
                    conns,
                    wrk_threads,
                    nginx_workers,
                    reps,
                })
                .await
            }
            Cmd::Leases { work, server_bin, duration, clients, batch } => {
                leases::run(leases::LeaseArgs { work, server: common::ServerCmd { bin: server_bin }, duration, clients, batch }).await
            }
            Cmd::Audit { work, durability, duration, concurrency } => {
                audit::run(audit::AuditArgs { work, durability, duration, concurrency }).await
            }
            Cmd::Scale { work, sizes, iters, tree } => scale::run(scale::ScaleArgs { work, sizes, iters, tree }).await,
            Cmd::McpHome { home, credentials } => {
                let (_bh, v) = common::make_home(&home, "http://127.0.0.1:9", "mcp-bench-secret").await?;
                scale::fill_credentials(&v, credentials).await?;
                v.shutdown().await;
                Ok(true)
            }
            Cmd::Serve { args } => {
                crp_provider::http::run(args).await?;
                Ok(true)
            }
        }
    });
    match res {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("crp_bench: errors were seen (see above)");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("crp_bench: {e:#}");
            ExitCode::from(1)
        }
    }
}
