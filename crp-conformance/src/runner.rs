//! Running the catalog against one provider: start the echo upstream, connect, discover the
//! capability, pick the cases (tier, versions, `--only`), run them and collect a report.
//!
//! Cases that wait for an expiry are started first and run alongside the others; everything
//! else runs one case at a time, in catalog order, so evidence reads like a story. Each case
//! runs in its own task with a time limit, so a panic or a hang is reported, not fatal.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crp_core::fixtures::Fixtures;
use serde::Serialize;
use serde_json::Value;

use crate::catalog::{Case, CaseMeta, Level, Stop, Tier};
use crate::cases;
use crate::cases::version::ALIEN_VERSION;
use crate::ctx::{Ctx, Evidence, Shared};
use crate::echo::EchoServer;
use crate::transport::http::{HttpTransport, Signer};
use crate::transport::mcp::McpTransport;
use crate::transport::stdio::StdioTransport;
use crate::transport::{Discovery, Expect, Transport, TransportError};

/// The versions this suite knows, newest first.
pub const KNOWN_VERSIONS: [&str; 2] = ["0.2", "0.1"];

/// Where the provider is.
#[allow(clippy::large_enum_variant)]
pub enum Target {
    /// `--http URL`.
    Http {
        /// Base URL.
        url: String,
        /// Extra headers.
        headers: Vec<(String, String)>,
        /// Request signing.
        signer: Option<Signer>,
    },
    /// `--stdio CMD`.
    Stdio {
        /// Command line.
        cmd: String,
        /// Optional HTTP base URL for `/.well-known/crp`.
        discovery: Option<String>,
    },
    /// `--mcp CMD`.
    Mcp {
        /// Command line.
        cmd: String,
    },
}

impl Target {
    /// For the report.
    pub fn describe(&self) -> String {
        match self {
            Self::Http { url, .. } => format!("http {url}"),
            Self::Stdio { cmd, .. } => format!("stdio `{cmd}`"),
            Self::Mcp { cmd } => format!("mcp `{cmd}`"),
        }
    }
}

/// A run's settings.
pub struct RunConfig {
    /// The provider.
    pub target: Target,
    /// Tier to test (default: the provider's claim, else basic).
    pub tier: Option<Tier>,
    /// Only this CRP version (default: every known version the provider advertises).
    pub crp_version: Option<String>,
    /// Echo server address when the runner starts one (`127.0.0.1:7799`).
    pub upstream: String,
    /// Fixtures the provider loaded (default: the standard ones at `upstream`).
    pub fixtures: Option<Fixtures>,
    /// An echo server already started (tests), used instead of binding `upstream`.
    pub echo: Option<EchoServer>,
    /// Only cases whose id equals or starts with one of these.
    pub only: Vec<String>,
    /// Per-answer time limit.
    pub timeout: Duration,
    /// Draw progress on stderr (only when it is a terminal).
    pub progress: bool,
    /// How long after an expiry the audit trail may take to record it.
    pub audit_wait: Duration,
}

impl RunConfig {
    /// Defaults for `target`.
    pub fn new(target: Target) -> RunConfig {
        RunConfig {
            target,
            tier: None,
            crp_version: None,
            upstream: crp_core::fixtures::DEFAULT_UPSTREAM.into(),
            fixtures: None,
            echo: None,
            only: vec![],
            timeout: Duration::from_secs(10),
            progress: false,
            audit_wait: Duration::from_secs(3),
        }
    }
}

/// A case's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The requirement holds.
    Pass,
    /// The provider broke it.
    Fail,
    /// Not applicable.
    Skip,
    /// The runner could not complete the case.
    Error,
}

impl Outcome {
    /// Upper-case label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Skip => "SKIP",
            Self::Error => "ERROR",
        }
    }
}

/// One case's result.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    /// The case.
    #[serde(flatten)]
    pub meta: CaseMeta,
    /// The CRP version it ran under.
    pub version: String,
    /// Verdict.
    pub outcome: Outcome,
    /// Why (fail, skip, error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Milliseconds.
    pub duration_ms: u64,
    /// What was sent and received, secrets masked.
    pub evidence: Vec<Evidence>,
}

impl CaseReport {
    /// Whether this result fails the run (a MUST that failed or errored).
    pub fn is_blocking(&self) -> bool {
        self.meta.level == Level::Must && matches!(self.outcome, Outcome::Fail | Outcome::Error)
    }
}

/// Counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// Passed.
    pub pass: usize,
    /// Failed.
    pub fail: usize,
    /// Skipped.
    pub skip: usize,
    /// Errored.
    pub error: usize,
    /// Failed or errored MUST cases.
    pub blocking: usize,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Runner version.
    pub runner: String,
    /// What was tested.
    pub target: String,
    /// Transport.
    pub transport: String,
    /// Tier tested.
    pub tier: Tier,
    /// Versions tested.
    pub versions: Vec<String>,
    /// The capability the provider advertised (default version), if any.
    pub capability: Option<Value>,
    /// RFC 3339 start.
    pub started_at: String,
    /// Milliseconds.
    pub duration_ms: u64,
    /// Counts.
    pub totals: Totals,
    /// Every case run.
    pub cases: Vec<CaseReport>,
    /// Why the run could not happen at all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fatal: Option<String>,
}

impl RunReport {
    /// 0 every MUST passed, 1 a MUST failed, 2 the run could not happen.
    pub fn exit_code(&self) -> i32 {
        if self.fatal.is_some() {
            2
        } else if self.totals.blocking > 0 {
            1
        } else {
            0
        }
    }

    /// The result of case `id`.
    pub fn case(&self, id: &str) -> Option<&CaseReport> {
        self.cases.iter().find(|c| c.meta.id == id)
    }

    fn fatal(cfg: &RunConfig, started: Instant, started_at: String, why: String) -> RunReport {
        RunReport {
            runner: env!("CARGO_PKG_VERSION").into(),
            target: cfg.target.describe(),
            transport: transport_name(&cfg.target).into(),
            tier: cfg.tier.unwrap_or(Tier::Basic),
            versions: vec![],
            capability: None,
            started_at,
            duration_ms: started.elapsed().as_millis() as u64,
            totals: Totals::default(),
            cases: vec![],
            fatal: Some(why),
        }
    }
}

fn transport_name(t: &Target) -> &'static str {
    match t {
        Target::Http { .. } => "http",
        Target::Stdio { .. } => "stdio",
        Target::Mcp { .. } => "mcp",
    }
}

/// The CRP version a case runs under.
pub fn case_version(meta: &CaseMeta, default_version: &str) -> String {
    if meta.id.starts_with("v01.") { "0.1".into() } else { default_version.into() }
}

/// Run the suite.
pub async fn run(mut cfg: RunConfig) -> RunReport {
    crate::install_crypto();
    let started = Instant::now();
    let started_at = crate::cases::now()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();

    // The upstream echo server and the fixtures that point at it.
    let echo = match cfg.echo.take() {
        Some(e) => e,
        None => {
            let addr = cfg.fixtures.as_ref().map(|f| f.upstream.address.clone()).unwrap_or(cfg.upstream.clone());
            match EchoServer::start(&addr).await {
                Ok(e) => e,
                Err(e) => return RunReport::fatal(&cfg, started, started_at, format!("cannot serve the upstream echo on {addr}: {e}")),
            }
        }
    };
    let fixtures = cfg.fixtures.clone().unwrap_or_else(|| Fixtures::conformance(&echo.addr.to_string()));
    if let Err(e) = fixtures.validate() {
        return RunReport::fatal(&cfg, started, started_at, e);
    }
    echo.register_clients(&fixtures);

    // The transport.
    let default_guess = cfg.crp_version.clone().unwrap_or_else(|| KNOWN_VERSIONS[0].to_string());
    let transport: Arc<dyn Transport> = match &cfg.target {
        Target::Http { url, headers, signer } => {
            let signer = signer.as_ref().map(|s| Signer { agent: s.agent.clone(), key: s.key.clone() });
            match HttpTransport::new(url, headers.clone(), signer, cfg.timeout) {
                Ok(t) => Arc::new(t),
                Err(e) => return RunReport::fatal(&cfg, started, started_at, e.to_string()),
            }
        }
        Target::Stdio { cmd, discovery } => match StdioTransport::spawn(cmd, &default_guess, discovery.clone(), cfg.timeout) {
            Ok(t) => Arc::new(t),
            Err(e) => return RunReport::fatal(&cfg, started, started_at, e.to_string()),
        },
        Target::Mcp { cmd } => Arc::new(McpTransport::new(cmd, &default_guess, cfg.timeout)),
    };

    // Reachability (a child process first: its discovery endpoint may not be up before it
    // answers on stdio), then discovery.
    let probe = r#"{"jsonrpc":"2.0","id":"crp-conformance-probe","method":"crp/no-such-method","params":{}}"#;
    if transport.kind() == crate::transport::TransportKind::Stdio
        && let Err(e) = transport.exchange(None, probe, Expect::Ids(vec![Value::from("crp-conformance-probe")])).await
    {
        transport.close().await;
        return RunReport::fatal(&cfg, started, started_at, format!("the provider does not answer: {e}"));
    }
    let mut caps: HashMap<Option<String>, Discovery> = HashMap::new();
    let first = match transport.discover(Some(&default_guess)).await {
        Ok(d) => d,
        Err(TransportError::Unsupported(m)) => Discovery::Unavailable(m),
        Err(e) => {
            transport.close().await;
            return RunReport::fatal(&cfg, started, started_at, format!("cannot reach the provider: {e}"));
        }
    };
    if matches!(first, Discovery::Unavailable(_)) {
        // No discovery: check the provider answers at all.
        if let Err(e) = transport.exchange(None, probe, Expect::Ids(vec![Value::from("crp-conformance-probe")])).await {
            transport.close().await;
            return RunReport::fatal(&cfg, started, started_at, format!("the provider does not answer: {e}"));
        }
    }
    let capability = match &first {
        Discovery::Capability(c) => Some(c.clone()),
        _ => None,
    };
    let advertised: Vec<String> = capability
        .as_ref()
        .map(|c| {
            let mut v: Vec<String> = c
                .get("versions")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
                .unwrap_or_default();
            if let Some(x) = c.get("version").and_then(Value::as_str)
                && !v.iter().any(|y| y == x)
            {
                v.push(x.to_string());
            }
            v
        })
        .unwrap_or_default();
    let versions: Vec<String> = match &cfg.crp_version {
        Some(v) => vec![v.clone()],
        None => {
            let v: Vec<String> =
                KNOWN_VERSIONS.iter().filter(|k| advertised.iter().any(|a| a == *k)).map(|s| s.to_string()).collect();
            if v.is_empty() { vec![default_guess.clone()] } else { v }
        }
    };
    let default_version = if versions.iter().any(|v| v == "0.2") { "0.2".to_string() } else { versions[0].clone() };
    caps.insert(Some(default_guess.clone()), first);
    let mut asks: Vec<String> = versions.clone();
    asks.push(default_version.clone());
    asks.push("0.9".into());
    asks.push(ALIEN_VERSION.into());
    for v in asks {
        if caps.contains_key(&Some(v.clone())) {
            continue;
        }
        let d = match transport.discover(Some(&v)).await {
            Ok(d) => d,
            Err(TransportError::Unsupported(m)) => Discovery::Unavailable(m),
            Err(e) => Discovery::Unavailable(format!("discovery failed: {e}")),
        };
        caps.insert(Some(v), d);
    }

    let claimed = capability.as_ref().and_then(|c| c.get("conformance")).and_then(Value::as_str).and_then(Tier::parse);
    let tier = cfg.tier.or(claimed).unwrap_or(Tier::Basic);

    let shared = match Shared::new(transport.clone(), fixtures, echo.state.clone(), caps, default_version.clone(), tier, cfg.timeout) {
        Ok(mut s) => {
            s.audit_wait = cfg.audit_wait;
            Arc::new(s)
        }
        Err(e) => return RunReport::fatal(&cfg, started, started_at, e),
    };

    // Pick the cases.
    let selected: Vec<Case> = cases::all()
        .into_iter()
        .filter(|c| c.meta.tier <= tier)
        .filter(|c| {
            let v = case_version(&c.meta, &default_version);
            versions.contains(&v) || (!c.meta.id.starts_with("v01.") && versions.iter().any(|x| x == &default_version))
        })
        .filter(|c| cfg.only.is_empty() || cfg.only.iter().any(|o| c.meta.id == o || c.meta.id.starts_with(o.as_str())))
        .collect();

    let total = selected.len();
    let progress = cfg.progress && std::io::stderr().is_terminal();
    let mut done = 0usize;
    let mut results: Vec<Option<CaseReport>> = vec![None; total];

    // Slow cases in the background first.
    let mut background = vec![];
    for (i, c) in selected.iter().enumerate().filter(|(_, c)| c.meta.slow && !c.meta.last) {
        let v = case_version(&c.meta, &default_version);
        background.push((i, tokio::spawn(run_case(shared.clone(), c.clone(), v))));
    }
    let order: Vec<usize> = (0..total)
        .filter(|i| !selected[*i].meta.slow && !selected[*i].meta.last)
        .chain((0..total).filter(|i| selected[*i].meta.last))
        .collect();
    let mut background_joined = false;
    for i in order {
        let c = &selected[i];
        if c.meta.last && !background_joined {
            for (j, h) in background.drain(..) {
                results[j] = Some(join(h, &selected[j], &default_version).await);
                done += 1;
            }
            background_joined = true;
        }
        if progress {
            eprint!("\r\x1b[2K[{}/{total}] {}", done + 1, c.meta.id);
            let _ = std::io::stderr().flush();
        }
        let v = case_version(&c.meta, &default_version);
        let h = tokio::spawn(run_case(shared.clone(), c.clone(), v));
        results[i] = Some(join(h, c, &default_version).await);
        done += 1;
    }
    for (j, h) in background.drain(..) {
        results[j] = Some(join(h, &selected[j], &default_version).await);
    }
    if progress {
        eprint!("\r\x1b[2K");
        let _ = std::io::stderr().flush();
    }
    transport.close().await;
    drop(echo);

    let cases: Vec<CaseReport> = results.into_iter().flatten().collect();
    let mut totals = Totals::default();
    for c in &cases {
        match c.outcome {
            Outcome::Pass => totals.pass += 1,
            Outcome::Fail => totals.fail += 1,
            Outcome::Skip => totals.skip += 1,
            Outcome::Error => totals.error += 1,
        }
        if c.is_blocking() {
            totals.blocking += 1;
        }
    }
    RunReport {
        runner: env!("CARGO_PKG_VERSION").into(),
        target: cfg.target.describe(),
        transport: transport_name(&cfg.target).into(),
        tier,
        versions,
        capability,
        started_at,
        duration_ms: started.elapsed().as_millis() as u64,
        totals,
        cases,
        fatal: None,
    }
}

/// How long one case may take.
pub const CASE_LIMIT: Duration = Duration::from_secs(30);

async fn run_case(shared: Arc<Shared>, case: Case, version: String) -> CaseReport {
    let ctx = Ctx::new(shared, case.meta.id, &version);
    let started = Instant::now();
    let r = tokio::time::timeout(CASE_LIMIT, (case.run)(ctx.clone())).await;
    let (outcome, reason) = match r {
        Ok(Ok(())) => (Outcome::Pass, None),
        Ok(Err(Stop::Fail(m))) => (Outcome::Fail, Some(m)),
        Ok(Err(Stop::Skip(m))) => (Outcome::Skip, Some(m)),
        Ok(Err(Stop::Error(m))) => (Outcome::Error, Some(m)),
        Err(_) => (Outcome::Error, Some(format!("the case did not finish within {CASE_LIMIT:?}"))),
    };
    CaseReport {
        meta: case.meta.clone(),
        version,
        outcome,
        reason: reason.map(|r| ctx.mask(&r)),
        duration_ms: started.elapsed().as_millis() as u64,
        evidence: ctx.evidence(),
    }
}

async fn join(h: tokio::task::JoinHandle<CaseReport>, case: &Case, default_version: &str) -> CaseReport {
    match h.await {
        Ok(r) => r,
        Err(e) => CaseReport {
            meta: case.meta.clone(),
            version: case_version(&case.meta, default_version),
            outcome: Outcome::Error,
            reason: Some(format!("the case panicked: {e}")),
            duration_ms: 0,
            evidence: vec![],
        },
    }
}
