//! `crp-conformance`: run the CRP conformance cases against a provider, list them, or print
//! the fixtures a provider under test must load. Exit codes: 0 every required (MUST) case
//! passed, 1 a required case failed, 2 the run could not happen.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use crp_conformance::catalog::Tier;
use crp_conformance::report::{self, Format};
use crp_conformance::runner::{RunConfig, Target};
use crp_conformance::transport::http::Signer;
use crp_core::fixtures::{DEFAULT_UPSTREAM, Fixtures};

#[derive(Parser)]
#[command(name = "crp-conformance", version, about = "Conformance runner for Credential Resolution Protocol providers")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)]
enum Cmd {
    /// Run the cases against a provider.
    Run(RunArgs),
    /// Print the catalog: id, tier, spec section, level, description.
    List {
        /// text or json.
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Print the fixture file a provider under test must load.
    Fixtures {
        /// Address of the upstream echo server the runner will serve.
        #[arg(long, default_value = DEFAULT_UPSTREAM)]
        upstream: String,
    },
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["http", "stdio", "mcp"])))]
struct RunArgs {
    /// Provider base URL: POST URL/crp, GET URL/.well-known/crp.
    #[arg(long)]
    http: Option<String>,
    /// Command starting a provider that speaks NDJSON JSON-RPC on stdin/stdout.
    #[arg(long)]
    stdio: Option<String>,
    /// Command starting an MCP server (crp/* as custom requests).
    #[arg(long)]
    mcp: Option<String>,
    /// basic, standard or full (default: the provider's claim, else basic).
    #[arg(long)]
    tier: Option<String>,
    /// Test only this CRP version (default: every version the provider advertises).
    #[arg(long = "crp-version")]
    crp_version: Option<String>,
    /// Extra HTTP header 'Name: value' on every request (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Ed25519 private key (PKCS#8 PEM) to sign HTTP requests with.
    #[arg(long = "agent-key")]
    agent_key: Option<PathBuf>,
    /// Agent id for signing (default: agentId from identity.json next to the key).
    #[arg(long = "agent-id")]
    agent_id: Option<String>,
    /// text, json, junit or html.
    #[arg(long, default_value = "text")]
    format: String,
    /// Write the report here instead of stdout.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Only these case ids or id prefixes (comma-separated, repeatable).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Address for the upstream echo server.
    #[arg(long, default_value = DEFAULT_UPSTREAM)]
    upstream: String,
    /// A custom fixture file the provider loaded (default: `crp-conformance fixtures`).
    #[arg(long)]
    fixtures: Option<PathBuf>,
    /// For --stdio: an HTTP base URL whose /.well-known/crp describes the provider.
    #[arg(long)]
    discovery: Option<String>,
    /// Seconds to wait for any one answer.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Seconds the audit trail may take to record an expiry (audit.expiry-recorded).
    #[arg(long = "audit-wait", default_value_t = 3)]
    audit_wait: u64,
    /// Show evidence for every case, not only failures (text format).
    #[arg(long)]
    verbose: bool,
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::List { format } => list(&format),
        Cmd::Fixtures { upstream } => {
            let f = Fixtures::conformance(&upstream);
            println!("{}", f.to_json_pretty());
            0
        }
        Cmd::Run(args) => match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
            Ok(rt) => rt.block_on(run(args)),
            Err(e) => {
                eprintln!("crp-conformance: cannot start the runtime: {e}");
                2
            }
        },
    };
    std::process::exit(code);
}

fn list(format: &str) -> i32 {
    let cases = crp_conformance::cases::all();
    if format == "json" {
        let metas: Vec<_> = cases.iter().map(|c| &c.meta).collect();
        println!("{}", serde_json::to_string_pretty(&metas).unwrap_or_default());
        return 0;
    }
    println!("{:<44} {:<9} {:<6} {:<12} description", "id", "tier", "level", "section");
    for c in &cases {
        let m = &c.meta;
        println!("{:<44} {:<9} {:<6} {:<12} {}", m.id, m.tier.as_str(), m.level.as_str(), format!("v{} {}", m.spec, m.section), m.description);
    }
    let count = |t: Tier| cases.iter().filter(|c| c.meta.tier == t).count();
    println!(
        "\n{} cases: {} basic, {} standard, {} full",
        cases.len(),
        count(Tier::Basic),
        count(Tier::Standard),
        count(Tier::Full)
    );
    0
}

fn agent_id_near(key: &Path) -> Result<String, String> {
    let path = key.with_file_name("identity.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("--agent-id not given and {} is unreadable: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    ["agentId", "agent_id", "id"]
        .iter()
        .find_map(|k| v.get(*k).and_then(|x| x.as_str()).map(str::to_string))
        .ok_or_else(|| format!("{} has no agentId", path.display()))
}

fn setup(args: &RunArgs) -> Result<(RunConfig, Format), String> {
    let format = Format::parse(&args.format).ok_or_else(|| format!("unknown format `{}` (text, json, junit, html)", args.format))?;
    let mut headers = vec![];
    for h in &args.headers {
        let (k, v) = h.split_once(':').ok_or_else(|| format!("--header `{h}` is not 'Name: value'"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let signer = match &args.agent_key {
        Some(path) => {
            let pem = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let key = crp_core::signing::private_key_from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
            let agent = match &args.agent_id {
                Some(a) => a.clone(),
                None => agent_id_near(path)?,
            };
            Some(Signer { agent, key })
        }
        None => None,
    };
    let target = match (&args.http, &args.stdio, &args.mcp) {
        (Some(url), _, _) => Target::Http { url: url.clone(), headers, signer },
        (_, Some(cmd), _) => Target::Stdio { cmd: cmd.clone(), discovery: args.discovery.clone() },
        (_, _, Some(cmd)) => Target::Mcp { cmd: cmd.clone() },
        _ => return Err("one of --http, --stdio, --mcp is required".into()),
    };
    let mut cfg = RunConfig::new(target);
    cfg.tier = match &args.tier {
        Some(t) => Some(Tier::parse(t).ok_or_else(|| format!("unknown tier `{t}` (basic, standard, full)"))?),
        None => None,
    };
    cfg.crp_version = args.crp_version.clone();
    cfg.upstream = args.upstream.clone();
    cfg.only = args.only.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    cfg.timeout = Duration::from_secs(args.timeout.max(1));
    cfg.progress = true;
    cfg.audit_wait = Duration::from_secs(args.audit_wait);
    if let Some(p) = &args.fixtures {
        let text = std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        cfg.fixtures = Some(Fixtures::from_json(&text)?);
    }
    Ok((cfg, format))
}

async fn run(args: RunArgs) -> i32 {
    crp_conformance::install_crypto();
    let (cfg, format) = match setup(&args) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("crp-conformance: {e}");
            return 2;
        }
    };
    let report = crp_conformance::run(cfg).await;
    let out = report::render(&report, format, args.verbose);
    match &args.output {
        Some(path) => {
            if let Err(e) = std::fs::write(path, out) {
                eprintln!("crp-conformance: cannot write {}: {e}", path.display());
                return 2;
            }
            let t = &report.totals;
            eprintln!(
                "crp-conformance: {} passed, {} failed, {} skipped, {} errors; report in {}",
                t.pass, t.fail, t.skip, t.error, path.display()
            );
            if let Some(f) = &report.fatal {
                eprintln!("crp-conformance: could not run: {f}");
            }
        }
        None => print!("{out}"),
    }
    report.exit_code()
}
