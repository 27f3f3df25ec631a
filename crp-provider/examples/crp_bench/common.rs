//! Shared pieces of the benchmark driver: a prepared vault home, child processes (server,
//! upstream, nginx), a signed JSON-RPC client, /proc CPU accounting, wrk output parsing and
//! latency percentiles.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use crp_core::signing;
use crp_core::types::ext::InjectionRule;
use crp_core::types::Classification;
use crp_core::SecretValue;
use crp_provider::agents::{AgentRecord, AgentStatus};
use crp_provider::credentials::{CredentialConfig, CredentialKind, NewCredential};
use crp_provider::vault::{OpenOptions, Unlock, Vault};
use ed25519_dalek::SigningKey;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// The benchmark agent (policy principal).
pub const AGENT: &str = "bench";
/// The service of the benchmark credential.
pub const SERVICE: &str = "bench.local/api";
/// The key of the benchmark credential.
pub const CRED_KEY: &str = "bench/api";

/// Lets the benchmark agent do everything on every credential (exports included: the
/// benchmarks never call them).
pub const POLICY: &str = r#"@id("bench-all")
@reason("benchmark agent")
permit (principal == Agent::"bench", action, resource);
"#;

/// A vault home with the benchmark policy, credential and agent.
pub struct BenchHome {
    pub home: PathBuf,
    pub key: SigningKey,
}

/// Create and populate a vault home in `home` (must not hold a vault yet). `upstream` is the
/// credential's upstream base URL, `secret` its value (injected as `Authorization: Bearer`).
/// Returns the home and the open vault.
pub async fn make_home(home: &Path, upstream: &str, secret: &str) -> anyhow::Result<(BenchHome, Vault)> {
    std::fs::create_dir_all(home)?;
    Vault::init(home, Unlock::Keyfile(home.join("vault.key"))).await.map_err(|e| anyhow!("vault init: {e}"))?;
    let vault = Vault::open(OpenOptions { home: home.to_path_buf(), unlock: None, database_url: None })
        .await
        .map_err(|e| anyhow!("vault open: {e}"))?;
    vault.install_policy("50-bench.cedar", POLICY).map_err(|e| anyhow!("bench policy: {e}"))?;
    vault.admin_store(&bench_credential(CRED_KEY, SERVICE, upstream, secret)).await.map_err(|e| anyhow!("store: {e}"))?;
    let key = signing::generate_key().map_err(|e| anyhow!("key: {e}"))?;
    vault
        .upsert_agent(&AgentRecord {
            id: AGENT.into(),
            name: AGENT.into(),
            public_key: signing::encode_public_key(&key.verifying_key()),
            roles: vec![],
            scopes: vec!["*".into()],
            status: AgentStatus::Active,
        })
        .await
        .map_err(|e| anyhow!("agent: {e}"))?;
    Ok((BenchHome { home: home.to_path_buf(), key }, vault))
}

/// The benchmark credential: header injection `Authorization: Bearer <secret>`, loopback
/// upstream allowed explicitly.
pub fn bench_credential(key: &str, service: &str, upstream: &str, secret: &str) -> NewCredential {
    NewCredential {
        key: key.into(),
        service: service.into(),
        kind: CredentialKind::ApiKey,
        classification: Classification::Internal,
        tags: vec![],
        scopes: vec!["read".into(), "write".into()],
        max_ttl: None,
        renewable: true,
        metadata: Default::default(),
        expires_at: None,
        value: SecretValue::new(secret),
        config: CredentialConfig {
            upstream: Some(upstream.into()),
            injection: InjectionRule::Header { name: "Authorization".into(), prefix: "Bearer".into() },
            allowed_private_hosts: vec!["127.0.0.1".into()],
            broker: None,
        },
    }
}

/// A random token (hex).
pub fn random_hex(n: usize) -> anyhow::Result<String> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).map_err(|e| anyhow!("random: {e}"))?;
    Ok(hex::encode(b))
}

// ---------------------------------------------------------------------------- processes

/// A child process killed (and reaped) on drop.
pub struct Proc {
    pub child: Child,
    pub url: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `cmd` (stdout piped, stdin piped so the child may watch for our exit) and wait up to
/// `timeout` for a stdout line containing `marker`; the URL is the line's text from `http://`.
pub fn spawn_with_url(name: &str, mut cmd: Command, marker: &str, timeout: Duration) -> anyhow::Result<Proc> {
    cmd.stdout(Stdio::piped()).stdin(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("cannot start {name}"))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("{name}: no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let marker = marker.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains(&marker) {
                if let Some(i) = line.find("http://") {
                    let _ = tx.send(line[i..].split_whitespace().next().unwrap_or("").to_string());
                    sent = true;
                }
            }
        }
    });
    match rx.recv_timeout(timeout) {
        Ok(url) => Ok(Proc { child, url }),
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().ok();
            bail!("{name} did not print its URL within {timeout:?} (exit status {status:?})")
        }
    }
}

/// How to start the provider's HTTP server on a home.
#[derive(Debug, Clone)]
pub struct ServerCmd {
    /// The binary: `crp-provider` (its `serve` subcommand) or this driver (`serve`, the same
    /// library entry point `crp_provider::http::run`).
    pub bin: PathBuf,
}

impl ServerCmd {
    pub fn spawn(&self, home: &Path) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve").arg("--home").arg(home).arg("--listen").arg("127.0.0.1:0");
        cmd.env("CRP_LOG", std::env::var("CRP_LOG").unwrap_or_else(|_| "error".into()));
        cmd.env_remove("CRP_PASSPHRASE");
        spawn_with_url("provider server", cmd, "listening on", Duration::from_secs(60))
    }
}

// ---------------------------------------------------------------------------- /proc

/// utime + stime of one process (all its threads), in clock ticks.
pub fn proc_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // after ')': [0]=state(3) [1]=ppid(4) ... [11]=utime(14) [12]=stime(15)
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn proc_ppid(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// `pid` and all its descendants.
pub fn proc_tree(pid: u32) -> Vec<u32> {
    let mut all: Vec<(u32, u32)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
                if let Some(pp) = proc_ppid(p) {
                    all.push((p, pp));
                }
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(all.iter().filter(|(_, pp)| *pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    out
}

/// CPU ticks of a process tree.
pub fn tree_ticks(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| proc_ticks(*p)).sum()
}

/// Microseconds per clock tick.
pub fn us_per_tick() -> f64 {
    // USER_HZ, as `getconf CLK_TCK` reports it (100 on every Linux we run on).
    let hz: f64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|v: &f64| *v > 0.0)
        .unwrap_or(100.0);
    1_000_000.0 / hz
}

// ---------------------------------------------------------------------------- wrk

/// One wrk run.
#[derive(Debug, Clone, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
}

fn parse_dur_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1_000.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1_000_000.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000_000.0)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * mult)
}

/// Parse `wrk --latency` output.
pub fn parse_wrk(out: &str) -> anyhow::Result<WrkResult> {
    let mut r = WrkResult::default();
    let mut in_dist = false;
    for line in out.lines() {
        let t = line.trim();
        if t.starts_with("Latency Distribution") {
            in_dist = true;
            continue;
        }
        if in_dist {
            let mut it = t.split_whitespace();
            match (it.next(), it.next()) {
                (Some("50%"), Some(v)) => r.p50_us = parse_dur_us(v).unwrap_or(f64::NAN),
                (Some("99%"), Some(v)) => {
                    r.p99_us = parse_dur_us(v).unwrap_or(f64::NAN);
                    in_dist = false;
                }
                (Some(p), _) if p.ends_with('%') => {}
                _ => in_dist = false,
            }
        }
        if t.contains(" requests in ") {
            // "123456 requests in 10.00s, 20.00MB read"
            let mut it = t.split_whitespace();
            r.requests = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            if let Some(d) = t.split(" requests in ").nth(1).and_then(|x| x.split(',').next()) {
                r.seconds = parse_dur_us(d).map(|us| us / 1e6).unwrap_or(0.0);
            }
        }
        if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().unwrap_or(0);
        }
        if let Some(v) = t.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            r.socket_errors = v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()))
                .sum();
        }
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().unwrap_or(0.0);
        }
    }
    if r.requests == 0 && r.rps == 0.0 {
        bail!("could not parse wrk output:\n{out}");
    }
    Ok(r)
}

/// Run wrk against `url` with `conns` connections for `secs` seconds.
pub fn run_wrk(url: &str, conns: u32, threads: u32, secs: f64, headers: &[String]) -> anyhow::Result<WrkResult> {
    let mut cmd = Command::new("wrk");
    cmd.arg("-t").arg(threads.clamp(1, conns.max(1)).to_string());
    cmd.arg("-c").arg(conns.to_string());
    cmd.arg("-d").arg(format!("{}s", secs.max(1.0).round() as u64));
    cmd.arg("--timeout").arg("5s");
    cmd.arg("--latency");
    for h in headers {
        cmd.arg("-H").arg(h);
    }
    cmd.arg(url);
    let out = cmd.output().context("cannot run wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed: {}\n{}", String::from_utf8_lossy(&out.stderr), text);
    }
    parse_wrk(&text)
}

// ---------------------------------------------------------------------------- HTTP client

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn http_client() -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build(conn)
}

/// A plain GET; returns (status, body).
pub async fn get(client: &HttpClient, url: &str, headers: &[(&str, &str)]) -> anyhow::Result<(u16, Bytes)> {
    let mut b = hyper::Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client.request(b.body(Full::new(Bytes::new()))?).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// A JSON-RPC client that signs every request as the benchmark agent.
#[derive(Clone)]
pub struct RpcClient {
    pub client: HttpClient,
    pub base: String,
    host: String,
    key: SigningKey,
    agent: String,
}

impl RpcClient {
    pub fn new(base: &str, key: SigningKey, agent: &str) -> anyhow::Result<Self> {
        let host = base.strip_prefix("http://").ok_or_else(|| anyhow!("base URL must be http://"))?.trim_end_matches('/').to_string();
        Ok(Self { client: http_client(), base: base.trim_end_matches('/').to_string(), host, key, agent: agent.into() })
    }

    /// Call `method`; the `result` or an error naming the JSON-RPC error.
    pub async fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        let v = self.post(json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})).await?;
        result_of(&v)
    }

    /// Call `method` once per entry of `params`, in one JSON-RPC batch (one signed request);
    /// the results in order, or the first error.
    pub async fn call_batch(&self, method: &str, params: Vec<Value>) -> anyhow::Result<Vec<Value>> {
        let n = params.len();
        let calls: Vec<Value> =
            params.into_iter().enumerate().map(|(i, p)| json!({"jsonrpc": "2.0", "id": i, "method": method, "params": p})).collect();
        let v = self.post(Value::Array(calls)).await?;
        let answers = v.as_array().ok_or_else(|| anyhow!("a batch was answered with {v}"))?;
        if answers.len() != n {
            bail!("a batch of {n} got {} answers", answers.len());
        }
        answers.iter().map(result_of).collect()
    }

    /// POST a signed message to `/crp`; the parsed answer.
    async fn post(&self, message: Value) -> anyhow::Result<Value> {
        let body = serde_json::to_vec(&message)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
        let nonce = signing::new_nonce().map_err(|e| anyhow!("nonce: {e}"))?;
        let sig = signing::sign_request(&self.key, &self.agent, "POST", &self.host, "/crp", &body, now, nonce);
        let mut b = hyper::Request::post(format!("{}/crp", self.base)).header("content-type", "application/json");
        for (k, v) in sig.pairs() {
            b = b.header(k, v);
        }
        let resp = self.client.request(b.body(Full::new(Bytes::from(body)))?).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if status != 200 {
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&bytes).chars().take(200).collect::<String>());
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}

/// The `result` of one JSON-RPC answer, or an error naming its error.
fn result_of(v: &Value) -> anyhow::Result<Value> {
    if let Some(e) = v.get("error") {
        bail!("JSON-RPC error {}: {}", e.get("code").unwrap_or(&Value::Null), e.get("message").unwrap_or(&Value::Null));
    }
    v.get("result").cloned().ok_or_else(|| anyhow!("no result in {v}"))
}

/// A lease obtained through `crp/use`.
#[derive(Debug, Clone)]
pub struct UseHandle {
    pub lease_id: String,
    pub token: String,
    pub proxy_base_url: String,
}

pub fn use_handle(v: &Value) -> anyhow::Result<UseHandle> {
    let s = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_string).ok_or_else(|| anyhow!("crp/use result lacks {p}: {v}"));
    Ok(UseHandle { lease_id: s("/lease/id")?, token: s("/sessionToken")?, proxy_base_url: s("/proxyBaseUrl")? })
}

// ---------------------------------------------------------------------------- statistics

/// Latency samples in nanoseconds.
#[derive(Debug, Default, Clone)]
pub struct Samples(pub Vec<u64>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d.as_nanos().min(u128::from(u64::MAX)) as u64);
    }
    pub fn extend(&mut self, o: Samples) {
        self.0.extend(o.0);
    }
    /// Percentile in microseconds (`q` in 0..=100).
    pub fn pct_us(&mut self, q: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        self.0.sort_unstable();
        let idx = ((q / 100.0) * (self.0.len() - 1) as f64).round() as usize;
        self.0[idx.min(self.0.len() - 1)] as f64 / 1000.0
    }
}

/// `12.3k` style numbers.
pub fn human(n: f64) -> String {
    if !n.is_finite() {
        "—".into()
    } else if n >= 10_000.0 {
        format!("{:.1}k", n / 1000.0)
    } else if n >= 100.0 {
        format!("{n:.0}")
    } else {
        format!("{n:.1}")
    }
}

/// Microseconds as `123 µs` / `1.23 ms`.
pub fn us(v: f64) -> String {
    if !v.is_finite() {
        "—".into()
    } else if v >= 1000.0 {
        format!("{:.2} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

/// A free loopback port (bound and released; a tiny race is acceptable for benchmarks).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Wait until a TCP port accepts connections.
pub fn wait_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on 127.0.0.1:{port} after {timeout:?}")
}
