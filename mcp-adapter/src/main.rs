//! `crp-mcp`: the MCP server AI clients launch, and the commands that set it up.
//!
//! stdout carries only protocol (serve) or the requested output (other commands); logs go to
//! stderr, or to `--log-file`.

use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use crp_core::Version;
use crp_core::types::ext;
use mcp_adapter::backend::{Backend, Remote};
use mcp_adapter::client_config::{self, Client};
use mcp_adapter::embedded::{self, EmbeddedOptions};
use mcp_adapter::identity::{self, Identity};
use mcp_adapter::remote::{self, RemoteClient};
use mcp_adapter::server::CrpMcpServer;
use rmcp::ServiceExt;

/// crp-mcp: the CRP vault as an MCP server (stdio). Read-blind by default.
#[derive(Debug, Parser)]
#[command(name = "crp-mcp", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Clone, Args)]
struct HomeArg {
    /// Vault and identity directory.
    #[arg(long, env = "CRP_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
struct ServeArgs {
    #[command(flatten)]
    home: HomeArg,
    /// Remote mode: the provider's base URL (signing as an installed agent).
    #[arg(long, env = "CRP_PROVIDER_URL", value_name = "URL")]
    provider: Option<String>,
    /// Remote mode: which installed identity to sign as (needed when several are installed;
    /// alone it selects remote mode against that identity's provider).
    #[arg(long, env = "CRP_AGENT_ID", value_name = "ID")]
    agent_id: Option<String>,
    /// Embedded mode: where to serve the injecting proxy (port 0: any free port).
    #[arg(long, env = "CRP_LISTEN", default_value = "127.0.0.1:7700", value_name = "ADDR")]
    listen: SocketAddr,
    /// Embedded mode: the agent policies see.
    #[arg(long = "as-agent", env = "CRP_MCP_AGENT", value_name = "NAME")]
    as_agent: Option<String>,
    /// Embedded mode: PostgreSQL URL instead of the SQLite file in CRP_HOME.
    #[arg(long, env = "CRP_DATABASE_URL", value_name = "URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Write logs to this file instead of stderr.
    #[arg(long, env = "CRP_MCP_LOG_FILE", value_name = "FILE")]
    log_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve MCP on stdin/stdout (the default).
    Serve(ServeArgs),
    /// Create a local Ed25519 identity and register it with a provider using a one-time
    /// bootstrap token (`-` reads the token from stdin). The agent stays pending until an
    /// operator approves it.
    Install {
        /// The bootstrap token from `crp-provider agent bootstrap`.
        token: String,
        /// The provider's base URL.
        #[arg(long, env = "CRP_PROVIDER_URL", default_value = "http://127.0.0.1:7700")]
        provider: String,
        /// A name for this agent (default: this machine's host name).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        home: HomeArg,
    },
    /// List local identities with their provider and status.
    Whoami {
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        home: HomeArg,
    },
    /// Print a ready-to-paste block that adds crp-mcp to an MCP client.
    Config {
        /// The client.
        #[arg(value_enum)]
        client: Client,
        /// Configure embedded mode even when identities are installed.
        #[arg(long)]
        embedded: bool,
        /// Only this installed identity.
        #[arg(long, value_name = "ID")]
        agent: Option<String>,
        /// Server name in the client's config.
        #[arg(long, default_value = "crp")]
        name: String,
        #[command(flatten)]
        home: HomeArg,
    },
    /// Remove a local identity (the provider keeps its record: disable it there too).
    Revoke {
        /// The agent id.
        agent_id: String,
        #[command(flatten)]
        home: HomeArg,
    },
}

fn init_logging(log_file: Option<&Path>, default: &str) -> Result<()> {
    use tracing_subscriber::EnvFilter;
    let mut filter = EnvFilter::try_from_env("CRP_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(default));
    // These libraries print whole messages (rmcp: every request and result, i.e. stored values
    // and exports) or headers (the proxy's injected credential) at debug/trace. Cap them at
    // info whatever the filter asks, so no log level puts a secret in the log.
    for cap in ["rmcp=info", "hyper=info", "hyper_util=info", "h2=info", "reqwest=info", "rustls=info", "sqlx=info"] {
        if let Ok(d) = cap.parse() {
            filter = filter.add_directive(d);
        }
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    match log_file {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open log file {}", path.display()))?;
            builder.with_ansi(false).with_writer(std::sync::Mutex::new(f)).init();
        }
        None => builder.with_ansi(false).with_writer(std::io::stderr).init(),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_file = match &cli.command {
        None => cli.serve.log_file.clone(),
        Some(Command::Serve(a)) => a.log_file.clone(),
        Some(_) => None,
    };
    let default_level = if matches!(cli.command, None | Some(Command::Serve(_))) { "info,rmcp=warn" } else { "warn" };
    let log_to_file = log_file.is_some();
    if let Err(e) = init_logging(log_file.as_deref(), default_level) {
        eprintln!("crp-mcp: {e:#}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crp-mcp: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            None => serve(cli.serve).await,
            Some(Command::Serve(a)) => serve(a).await,
            Some(Command::Install { token, provider, name, home }) => install(&token, &provider, name, &home).await,
            Some(Command::Whoami { json, home }) => whoami(json, &home).await,
            Some(Command::Config { client, embedded, agent, name, home }) => {
                config(client, embedded, agent.as_deref(), &name, &home)
            }
            Some(Command::Revoke { agent_id, home }) => revoke(&agent_id, &home),
        }
    });
    // Do not wait for blocked stdin readers etc. at exit.
    rt.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if log_to_file {
                tracing::error!("{e:#}");
            }
            eprintln!("crp-mcp: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn home_of(h: &HomeArg) -> PathBuf {
    identity::crp_home(h.home.as_deref())
}

async fn serve(args: ServeArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let home = home_of(&args.home);
    let mut embedded_rt = None;
    let backend: Arc<dyn Backend> = if args.provider.is_some() || args.agent_id.is_some() {
        let ident = identity::pick(&home, args.agent_id.as_deref())?;
        let url = args.provider.clone().unwrap_or_else(|| ident.file.provider.clone());
        if url.trim_end_matches('/') != ident.file.provider {
            tracing::warn!(
                identity_provider = %ident.file.provider,
                provider = %url,
                "agent `{}` was installed against another provider URL",
                ident.agent_id()
            );
        }
        let client = RemoteClient::new(&url, ident.agent_id(), ident.signing_key()?)?;
        let caps = match tokio::time::timeout(Duration::from_secs(3), Remote::discover(&client)).await {
            Ok(caps) => caps,
            Err(_) => {
                tracing::warn!("provider discovery timed out; tools will report errors until it is reachable");
                Vec::new()
            }
        };
        Arc::new(Remote::new(client, caps))
    } else {
        let rt = embedded::open(EmbeddedOptions {
            home: home.clone(),
            database_url: args.database_url.clone(),
            listen: args.listen,
            agent: args.as_agent.clone().unwrap_or_else(|| crp_provider::vault::Vault::owner_agent().to_owned()),
        })
        .await?;
        embedded_rt = Some(rt.clone());
        rt
    };
    tracing::info!(
        backend = %backend.describe(),
        ready_ms = started.elapsed().as_millis() as u64,
        "crp-mcp ready on stdio"
    );
    let outcome = match CrpMcpServer::new(backend)
        .serve(mcp_adapter::stdio::relay(tokio::io::stdin(), tokio::io::stdout()))
        .await {
        Ok(running) => {
            tokio::select! {
                r = running.waiting() => r.map(|_| ()).map_err(|e| anyhow!("MCP session ended: {e}")),
                _ = crp_provider::http::wait_for_signal() => Ok(()),
            }
        }
        // A client that connects and leaves without initializing (e.g. discover-only probes).
        Err(rmcp::service::ServerInitializeError::ConnectionClosed(_)) => Ok(()),
        Err(e) => Err(anyhow!("MCP handshake failed: {e}")),
    };
    if let Some(rt) = embedded_rt {
        rt.shutdown().await;
    }
    outcome
}

fn default_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "crp-mcp".into())
}

async fn install(token: &str, provider: &str, name: Option<String>, home: &HomeArg) -> Result<()> {
    let token = if token == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("reading the token from stdin")?;
        s
    } else {
        token.to_owned()
    };
    let token = token.trim();
    if token.is_empty() || token.len() > 512 || token.chars().any(char::is_whitespace) {
        bail!("that does not look like a bootstrap token (expected one word from `crp-provider agent bootstrap`)");
    }
    let home = home_of(home);
    let provider = remote::parse_base(provider)?.as_str().trim_end_matches('/').to_owned();
    let key = crp_core::signing::generate_key().map_err(|e| anyhow!("no OS randomness: {e}"))?;
    let public = crp_core::signing::encode_public_key(&key.verifying_key());
    let name = name.unwrap_or_else(default_name);
    let reg = remote::register(&provider, token, &public, Some(&name)).await?;
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let id = identity::save(&home, &reg.agent_id, reg.name.as_deref().unwrap_or(&name), &provider, &key, now)?;
    let status = reg.status.unwrap_or_else(|| "pending".into());
    println!("installed agent {} ({}) at {}", id.agent_id(), id.file.name, id.dir.display());
    println!("status: {status}");
    if status == "pending" {
        println!("next: ask the operator to run `crp-provider agent approve {}`", id.agent_id());
    }
    println!("then: `crp-mcp config <claude-code|claude-desktop|cursor|vscode|windsurf|codex>`");
    Ok(())
}

/// The provider's view of an identity: `active` (with roles), `pending`, `disabled`,
/// `unknown to provider`, or `unreachable`.
async fn remote_status(id: &Identity) -> String {
    let client = match id.signing_key().and_then(|k| RemoteClient::new(&id.file.provider, id.agent_id(), k)) {
        Ok(c) => c,
        Err(e) => return format!("unusable ({e})"),
    };
    let call = client.call(Version::LATEST, ext::WHOAMI, serde_json::json!({}));
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Err(_) => "unreachable (timeout)".into(),
        Ok(Ok(v)) => match serde_json::from_value::<ext::WhoamiResult>(v) {
            Ok(w) if w.roles.is_empty() => "active".into(),
            Ok(w) => format!("active (roles: {})", w.roles.join(", ")),
            Err(_) => "active".into(),
        },
        Ok(Err(e)) => {
            let reason = e.data.as_ref().and_then(|d| d.reason.clone()).unwrap_or_default();
            if e.message.starts_with("provider error: cannot reach") {
                "unreachable".into()
            } else if reason.contains("pending") {
                "pending".into()
            } else if reason.contains("disabled") {
                "disabled".into()
            } else if reason.contains("not found") {
                "unknown to provider".into()
            } else if e.code == -32601 {
                "reachable (provider has no x-crp/whoami)".into()
            } else {
                format!("error: {}", e.message)
            }
        }
    }
}

async fn whoami(json: bool, home: &HomeArg) -> Result<()> {
    let home = home_of(home);
    let ids = identity::load_all(&home)?;
    if ids.is_empty() {
        if json {
            println!("[]");
        } else {
            println!("no agent identities under {} (embedded mode acts as `owner`)", home.join("agents").display());
        }
        return Ok(());
    }
    let mut statuses = Vec::with_capacity(ids.len());
    for i in &ids {
        statuses.push(remote_status(i).await);
    }
    if json {
        let rows: Vec<_> = ids
            .iter()
            .zip(&statuses)
            .map(|(i, s)| {
                serde_json::json!({"agentId": i.agent_id(), "name": i.file.name, "provider": i.file.provider, "status": s})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        for (i, s) in ids.iter().zip(&statuses) {
            println!("{}\t{}\t{}\t{}", i.agent_id(), i.file.name, i.file.provider, s);
        }
    }
    Ok(())
}

fn config(client: Client, embedded: bool, agent: Option<&str>, name: &str, home: &HomeArg) -> Result<()> {
    let home_dir = home_of(home);
    let mut ids = if embedded { Vec::new() } else { identity::load_all(&home_dir)? };
    if let Some(a) = agent {
        ids.retain(|i| i.agent_id() == a);
        if ids.is_empty() {
            bail!("no local identity `{a}` (see `crp-mcp whoami`)");
        }
    }
    let command = client_config::command_path(std::env::current_exe().ok());
    // Name CRP_HOME in the block only when it is not the default.
    let explicit_home = home.home.as_deref();
    let entries = client_config::entries(&command, &ids, explicit_home, name);
    let out = client_config::render(client, &entries)?;
    if std::io::stderr().is_terminal() || std::env::var_os("CRP_MCP_CONFIG_HINT").is_some() {
        eprintln!("# {}", client.target());
    }
    print!("{out}");
    Ok(())
}

fn revoke(agent_id: &str, home: &HomeArg) -> Result<()> {
    let home = home_of(home);
    if identity::remove(&home, agent_id)? {
        println!("removed local identity {agent_id}");
        println!(
            "the provider still has this agent: ask the operator to run `crp-provider agent disable {agent_id}`"
        );
        Ok(())
    } else {
        bail!("no local identity `{agent_id}` under {}", home.join("agents").display())
    }
}
