//! Proxy overhead: one upstream reached (a) directly, (b) through `crp-provider serve` (lease
//! check against the database, session token, header injection, durable audit of every
//! request; once with the default `fsync` audit durability, once with `os`), (c) through nginx `proxy_pass` + `proxy_set_header Authorization` (upstream
//! keepalive), and (d) when given, through a bare hyper proxy (`bench_floor_proxy`: the floor
//! of our HTTP stack), with wrk at several connection counts. Reports throughput, p50/p99, CPU µs per
//! request of the proxy process (utime+stime from /proc over the run / completed requests) and
//! the ratios ours/direct and ours/nginx.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::json;

use crate::common::*;

pub struct ProxyArgs {
    pub work: PathBuf,
    pub upstream_bin: PathBuf,
    pub floor_bin: Option<PathBuf>,
    pub server: ServerCmd,
    pub duration: f64,
    pub warmup: f64,
    pub conns: Vec<u32>,
    pub wrk_threads: u32,
    pub nginx_workers: Vec<String>,
    pub reps: u32,
}

/// nginx (master + workers) started by us; stopped with SIGTERM to its master on drop.
struct Nginx {
    child: Child,
    port: u16,
    workers: String,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").arg("-TERM").arg(&pid).status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_nginx(dir: &Path, workers: &str, upstream: &str, secret: &str) -> anyhow::Result<Nginx> {
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let up = upstream.trim_start_matches("http://").trim_end_matches('/');
    let d = dir.display();
    let conf = format!(
        r#"worker_processes {workers};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream bench_up {{ server {up}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{
            proxy_pass http://bench_up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {secret}";
            proxy_buffering on;
        }}
    }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start nginx (apt-get install nginx-light)")?;
    let mut ng = Nginx { child, port, workers: workers.into() };
    if let Err(e) = wait_port(port, Duration::from_secs(10)) {
        let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
        let _ = ng.child.kill();
        bail!("nginx did not start: {e}\n{log}");
    }
    Ok(ng)
}

#[derive(Clone)]
struct Target {
    name: String,
    url: String,
    headers: Vec<String>,
    /// Processes whose CPU is charged to this target (the proxy's), if any.
    pids: Vec<u32>,
}

#[derive(Clone, Debug)]
struct Run {
    wrk: WrkResult,
    cpu_us_per_req: f64,
    upstream_us_per_req: f64,
}

pub async fn run(a: ProxyArgs) -> anyhow::Result<bool> {
    let secret = format!("upstream-secret-{}", random_hex(16)?);
    // (1) upstream
    let mut up_cmd = Command::new(&a.upstream_bin);
    up_cmd.arg("--token").arg(&secret).arg("--listen").arg("127.0.0.1:0").arg("--exit-on-eof");
    let upstream = spawn_with_url("bench upstream", up_cmd, "listening on", Duration::from_secs(20))?;
    let up_url = upstream.url.clone();
    // (2) two vault homes with the credential, a provider server on each: the default audit
    // durability (fsync before answering) and `[audit] durability = "os"` (no fsync).
    let (server, h) = provider(&a, &a.work.join("proxy-home"), &up_url, &secret, None).await?;
    let (server_os, h_os) = provider(&a, &a.work.join("proxy-home-os"), &up_url, &secret, Some("os")).await?;
    let ours_url = format!("{}/v1/items?limit=10", h.proxy_base_url.trim_end_matches('/'));
    let ours_os_url = format!("{}/v1/items?limit=10", h_os.proxy_base_url.trim_end_matches('/'));
    let direct_url = format!("{}/v1/items?limit=10", up_url.trim_end_matches('/'));

    // (3) correctness before any figure: injection works, tokens are checked.
    let c = http_client();
    let bearer_secret = format!("Bearer {secret}");
    let bearer_session = format!("Bearer {}", h.token);
    let (s, body) = get(&c, &direct_url, &[("authorization", &bearer_secret)]).await?;
    if s != 200 || body.len() != 60 {
        bail!("direct check: HTTP {s}, {} bytes", body.len());
    }
    let (s, _) = get(&c, &direct_url, &[]).await?;
    if s != 401 {
        bail!("the upstream must refuse requests without the credential (got {s})");
    }
    let bearer_session_os = format!("Bearer {}", h_os.token);
    for (url, session) in [(&ours_url, &bearer_session), (&ours_os_url, &bearer_session_os)] {
        let (s, body) = get(&c, url, &[("authorization", session)]).await?;
        if s != 200 || body.len() != 60 {
            bail!("proxy check: HTTP {s}: {}", String::from_utf8_lossy(&body));
        }
        let (s, _) = get(&c, url, &[("authorization", "Bearer wrong-token")]).await?;
        if s != 401 {
            bail!("the proxy must refuse a wrong session token with 401 (got {s})");
        }
    }

    // (4) the bare hyper proxy, if given
    let floor = match &a.floor_bin {
        Some(bin) => {
            let mut cmd = Command::new(bin);
            cmd.arg("--upstream").arg(&up_url).arg("--token").arg(&secret).arg("--exit-on-eof");
            let p = spawn_with_url("bench floor proxy", cmd, "listening on", Duration::from_secs(20))?;
            let url = format!("{}/v1/items?limit=10", p.url.trim_end_matches('/'));
            let (s, body) = get(&c, &url, &[]).await?;
            if s != 200 || body.len() != 60 {
                bail!("floor proxy check: HTTP {s}, {} bytes", body.len());
            }
            Some((p, url))
        }
        None => None,
    };

    // (5) nginx, once per worker setting
    let mut nginxes = Vec::new();
    for w in &a.nginx_workers {
        let ng = start_nginx(&a.work.join(format!("nginx-{w}")), w, &up_url, &secret)?;
        let url = format!("http://127.0.0.1:{}/v1/items?limit=10", ng.port);
        let (s, body) = get(&c, &url, &[]).await?;
        if s != 200 || body.len() != 60 {
            bail!("nginx ({w} workers) check: HTTP {s}");
        }
        nginxes.push((ng, url));
    }

    let mut targets = vec![
        Target { name: "direct".into(), url: direct_url.clone(), headers: vec![format!("Authorization: {bearer_secret}")], pids: vec![] },
        Target {
            name: "crp proxy".into(),
            url: ours_url.clone(),
            headers: vec![format!("Authorization: {bearer_session}")],
            pids: vec![server.pid()],
        },
        Target {
            name: "crp proxy, audit os".into(),
            url: ours_os_url.clone(),
            headers: vec![format!("Authorization: {bearer_session_os}")],
            pids: vec![server_os.pid()],
        },
    ];
    // Ours are targets 1..first_ref; the references (the floor if measured, then each nginx)
    // follow.
    let first_ref = targets.len();
    if let Some((p, url)) = &floor {
        targets.push(Target { name: "hyper floor".into(), url: url.clone(), headers: vec![], pids: vec![p.pid()] });
    }
    let first_nginx = targets.len();
    for (ng, url) in &nginxes {
        targets.push(Target {
            name: format!("nginx ({} worker{})", ng.workers, if ng.workers == "1" { "" } else { "s" }),
            url: url.clone(),
            headers: vec![],
            pids: proc_tree(ng.child.id()),
        });
    }

    // (6) measure: reps × conns × targets, interleaved so drift hits every target alike.
    let tick = us_per_tick();
    let up_pid = upstream.pid();
    let mut runs: BTreeMap<(u32, usize), Vec<Run>> = BTreeMap::new();
    for rep in 0..a.reps.max(1) {
        for &conns in &a.conns {
            for (ti, t) in targets.iter().enumerate() {
                if a.warmup > 0.0 {
                    let (url, hs) = (t.url.clone(), t.headers.clone());
                    let w = a.warmup;
                    let th = a.wrk_threads;
                    tokio::task::spawn_blocking(move || run_wrk(&url, conns, th, w, &hs)).await??;
                }
                let before = tree_ticks(&t.pids);
                let up_before = proc_ticks(up_pid).unwrap_or(0);
                let (url, hs) = (t.url.clone(), t.headers.clone());
                let (d, th) = (a.duration, a.wrk_threads);
                let wrk = tokio::task::spawn_blocking(move || run_wrk(&url, conns, th, d, &hs)).await??;
                let after = tree_ticks(&t.pids);
                let up_after = proc_ticks(up_pid).unwrap_or(0);
                let n = wrk.requests.max(1) as f64;
                let cpu = if t.pids.is_empty() { f64::NAN } else { (after.saturating_sub(before)) as f64 * tick / n };
                let upc = (up_after.saturating_sub(up_before)) as f64 * tick / n;
                eprintln!(
                    "  [rep {}] {:<18} c={:<3} {:>9.0} rps  p50 {:>9}  p99 {:>9}  cpu {:>6} µs/req  non-2xx {}  socket errors {}",
                    rep + 1,
                    t.name,
                    conns,
                    wrk.rps,
                    us(wrk.p50_us),
                    us(wrk.p99_us),
                    human(cpu),
                    wrk.non_2xx,
                    wrk.socket_errors
                );
                runs.entry((conns, ti)).or_default().push(Run { wrk, cpu_us_per_req: cpu, upstream_us_per_req: upc });
            }
        }
    }
    drop(nginxes);
    drop(floor);
    drop(server);
    drop(server_os);
    drop(upstream);

    // (7) report: the median run (by throughput) of each cell.
    let median = |v: &Vec<Run>| -> Run {
        let mut v = v.clone();
        v.sort_by(|x, y| x.wrk.rps.total_cmp(&y.wrk.rps));
        v[v.len() / 2].clone()
    };
    let mut ok = true;
    println!("### Proxy overhead (wrk, {} s per run, {} rep(s), median by throughput)\n", a.duration, a.reps.max(1));
    println!("| target | conns | req/s | p50 | p99 | proxy CPU µs/req | upstream CPU µs/req | non-2xx | socket errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &conns in &a.conns {
        for (ti, t) in targets.iter().enumerate() {
            let r = median(&runs[&(conns, ti)]);
            let total_non2xx: u64 = runs[&(conns, ti)].iter().map(|r| r.wrk.non_2xx).sum();
            if total_non2xx > 0 {
                ok = false;
            }
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                t.name,
                conns,
                human(r.wrk.rps),
                us(r.wrk.p50_us),
                us(r.wrk.p99_us),
                if r.cpu_us_per_req.is_finite() { format!("{:.1}", r.cpu_us_per_req) } else { "—".into() },
                format!("{:.1}", r.upstream_us_per_req),
                r.wrk.non_2xx,
                r.wrk.socket_errors
            );
        }
    }
    println!();
    let direct = 0usize;
    print!("| target | conns | ours/direct req/s | added p50 vs direct |");
    for t in &targets[first_ref..] {
        print!(" ours/{} req/s | added p50 ({}) | ours/{} CPU |", t.name, t.name, t.name);
    }
    println!();
    print!("|---|---:|---:|---:|");
    for _ in &targets[first_ref..] {
        print!("---:|---:|---:|");
    }
    println!();
    // Per provider variant: (added p50 at 1 connection, (ours, nginx 1 worker) req/s at 64).
    let mut verdicts: Vec<(String, Option<f64>, Option<(f64, f64)>)> = Vec::new();
    for ours in direct + 1..first_ref {
        let mut p50_added_c1 = None;
        let mut rps_64 = None;
        for &conns in &a.conns {
            let o = median(&runs[&(conns, ours)]);
            let d = median(&runs[&(conns, direct)]);
            let added = o.wrk.p50_us - d.wrk.p50_us;
            if conns == 1 {
                p50_added_c1 = Some(added);
            }
            print!("| {} | {} | {:.2} | {} |", targets[ours].name, conns, o.wrk.rps / d.wrk.rps, us(added));
            for ti in first_ref..targets.len() {
                let n = median(&runs[&(conns, ti)]);
                print!(" {:.2} | {} | {:.2} |", o.wrk.rps / n.wrk.rps, us(n.wrk.p50_us - d.wrk.p50_us), o.cpu_us_per_req / n.cpu_us_per_req);
                if conns == 64 && ti == first_nginx {
                    rps_64 = Some((o.wrk.rps, n.wrk.rps));
                }
            }
            println!();
        }
        verdicts.push((targets[ours].name.clone(), p50_added_c1, rps_64));
    }
    println!();
    for (name, p50, rps) in verdicts {
        if let Some(a) = p50 {
            println!("- target ({name}): added p50 at 1 connection ≤ 50 µs: **{}** ({})", if a <= 50.0 { "met" } else { "missed" }, us(a));
        }
        if let Some((o, n)) = rps {
            println!(
                "- target ({name}): throughput at 64 connections ≥ nginx (1 worker): **{}** ({} vs {} req/s)",
                if o >= n { "met" } else { "missed" },
                human(o),
                human(n)
            );
        }
    }
    if first_nginx > first_ref && first_nginx < targets.len() && a.conns.contains(&64) {
        let (f, n) = (median(&runs[&(64, first_ref)]), median(&runs[&(64, first_nginx)]));
        println!(
            "- the hyper floor (a bare proxy on our HTTP stack) at 64 connections: {} req/s, {:.2}× nginx (1 worker), {:.1} µs CPU per request",
            human(f.wrk.rps),
            f.wrk.rps / n.wrk.rps,
            f.cpu_us_per_req
        );
    }
    if !ok {
        println!("- **ERROR**: non-2xx responses were seen (injection or audit failed); see the table");
    }
    println!();
    Ok(ok)
}

/// A vault home with the benchmark credential (and `[audit] durability`, if given), a provider
/// server on it, and a lease from a signed `crp/use` over HTTP.
async fn provider(a: &ProxyArgs, home: &Path, upstream: &str, secret: &str, durability: Option<&str>) -> anyhow::Result<(Proc, UseHandle)> {
    let (bh, vault) = make_home(home, upstream, secret).await?;
    vault.shutdown().await;
    drop(vault);
    if let Some(d) = durability {
        let cfg = home.join("config.toml");
        let mut text = std::fs::read_to_string(&cfg).unwrap_or_default();
        text.push_str(&format!("\n[audit]\ndurability = \"{d}\"\n"));
        std::fs::write(&cfg, text)?;
    }
    let server = a.server.spawn(&bh.home)?;
    let rpc = RpcClient::new(&server.url, bh.key.clone(), AGENT)?;
    let used = rpc.call("crp/use", json!({"service": SERVICE, "ttl": 3600})).await.context("crp/use over HTTP")?;
    Ok((server, use_handle(&used)?))
}

pub fn ensure_tools() -> anyhow::Result<()> {
    for t in ["wrk", "nginx"] {
        if Command::new("sh").arg("-c").arg(format!("command -v {t}")).stdout(Stdio::null()).status()?.success() {
            continue;
        }
        return Err(anyhow!("{t} is not installed (scripts/bench.sh installs it with apt-get)"));
    }
    Ok(())
}
