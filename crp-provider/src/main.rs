//! `crp-provider`: the CRP reference provider's binary. `serve` (HTTP endpoint, proxy, stdio,
//! dev mode) is `crp_provider::http::cli`; every other command is an operator command from
//! `crp_provider::cli`. See `crp-provider --help` and docs/interface.md.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use crp_provider::cli::{self, GlobalOpts};

/// mimalloc instead of glibc's malloc: the proxy and the lease path allocate per request
/// (headers, bodies, audit entries) from several threads, and glibc's arenas showed as ~15% of
/// the server's CPU under load (perf, README "Performance"); mimalloc's thread-local pages
/// make those calls cheap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "crp-provider", version, about = "The Credential Resolution Protocol reference provider: encrypted vault, leases, Cedar policy, audit, HTTP endpoint and injecting proxy")]
struct Cli {
    /// Vault home (default: $CRP_HOME, else ~/.crp).
    #[arg(long, value_name = "DIR")]
    home: Option<PathBuf>,
    /// Read the vault passphrase from this file (default: the keyfile, or $CRP_PASSPHRASE).
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create an encrypted vault (refuses to overwrite one) and a starter policy.
    Init(cli::InitArgs),
    /// Serve JSON-RPC, discovery, the injecting proxy and agent registration.
    Serve(crp_provider::http::ServeArgs),
    /// Load credentials, policies and agents from a TOML file (idempotent).
    Apply(cli::ApplyArgs),
    /// Manage credentials (values only from stdin, a file or an env var; never printed).
    Credential(cli::CredentialArgs),
    /// Validate policies and dry-run decisions.
    Policy(cli::PolicyArgs),
    /// List and revoke leases.
    Lease(cli::LeaseArgs),
    /// Query the audit log, or verify its chain.
    Audit(cli::AuditArgs),
    /// Bootstrap, list, approve, disable and enable agents.
    Agent(cli::AgentArgs),
    /// Requests held for approval.
    Approvals(cli::ApprovalsArgs),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CRP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Cli::parse();
    let top = GlobalOpts { home: args.home.clone(), passphrase_file: args.passphrase_file.clone() };
    let result = match args.cmd {
        Cmd::Serve(mut s) => {
            s.home = s.home.or(top.home);
            s.passphrase_file = s.passphrase_file.or(top.passphrase_file);
            return match crp_provider::http::run(s).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("crp-provider: {e:#}");
                    ExitCode::from(1)
                }
            };
        }
        cmd => {
            init_logging();
            match cmd {
                Cmd::Init(a) => cli::init(a, &top).await,
                Cmd::Apply(a) => cli::apply(a, &top).await,
                Cmd::Credential(a) => cli::credential(a, &top).await,
                Cmd::Policy(a) => cli::policy(a, &top).await,
                Cmd::Lease(a) => cli::lease(a, &top).await,
                Cmd::Audit(a) => cli::audit(a, &top).await,
                Cmd::Agent(a) => cli::agent(a, &top).await,
                Cmd::Approvals(a) => cli::approvals(a, &top).await,
                Cmd::Serve(_) => Ok(()),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.message.is_empty() {
                eprintln!("crp-provider: {}", e.message);
            }
            ExitCode::from(u8::try_from(e.code).unwrap_or(1))
        }
    }
}
