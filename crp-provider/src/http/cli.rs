//! The `serve` subcommand: arguments and the process lifecycle around [`super::start`].
//!
//! - `serve [--listen 127.0.0.1:7700]`: opens the vault in `CRP_HOME` (keyfile, or
//!   `CRP_PASSPHRASE` / `--passphrase-file`), prints `crp-provider listening on URL` to stdout,
//!   serves until SIGINT/SIGTERM, then drains and flushes the audit.
//! - `serve --stdio`: JSON-RPC on stdin/stdout as the owner's agent; the HTTP server (for the
//!   proxy) still listens on `--listen`, and its URL goes to stderr. Ends at end of input.
//! - `serve --dev [--fixtures FILE] [--apply FILE.toml]`: see [`super::dev`].

use std::net::SocketAddr;
use std::path::PathBuf;

use crp_core::SecretValue;

use super::{ServeConfig, dev, serve_stdio, start, wait_for_signal};
use crate::vault::{OpenOptions, Unlock, Vault};

/// `crp-provider serve` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// Speak JSON-RPC on stdin/stdout as the local owner (the proxy still listens on --listen).
    #[arg(long)]
    pub stdio: bool,
    /// Throwaway vault, unauthenticated loopback callers act as agent `dev`.
    #[arg(long)]
    pub dev: bool,
    /// With --dev: a conformance fixture file to load (`crp-conformance fixtures > f.json`).
    #[arg(long, requires = "dev")]
    pub fixtures: Option<PathBuf>,
    /// With --dev: an `apply` TOML file (credentials, policies, agents) to load.
    #[arg(long = "apply", value_name = "FILE.toml", requires = "dev")]
    pub apply_file: Option<PathBuf>,
    /// Base URL advertised in proxyBaseUrl (default http://<listen address>).
    #[arg(long)]
    pub public_url: Option<String>,
    /// Largest POST /crp body in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Vault home (default $CRP_HOME, else ~/.crp).
    #[arg(long)]
    pub home: Option<PathBuf>,
    /// Read the vault passphrase from this file (else the keyfile, else CRP_PASSPHRASE).
    #[arg(long)]
    pub passphrase_file: Option<PathBuf>,
}

impl Default for ServeArgs {
    /// The defaults of the command line (`127.0.0.1:7700`, 1 MiB bodies, nothing else set).
    /// Build with `ServeArgs { dev: true, ..Default::default() }`: fields may be added.
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 7700)),
            stdio: false,
            dev: false,
            fixtures: None,
            apply_file: None,
            public_url: None,
            max_body_bytes: 1024 * 1024,
            home: None,
            passphrase_file: None,
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CRP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

async fn open_vault(args: &ServeArgs) -> anyhow::Result<Vault> {
    let home = crate::config::resolve_home(args.home.as_deref());
    let unlock = match &args.passphrase_file {
        Some(f) => {
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?,
            );
            Some(Unlock::Passphrase(SecretValue::new(text.trim_end_matches(['\r', '\n']))))
        }
        None => None,
    };
    Vault::open(OpenOptions { home: home.clone(), unlock, database_url: None })
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the vault in {}: {e}", home.display()))
}

/// Run `serve` with these arguments until stopped.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_logging();
    super::install_crypto_provider();
    let (vault, _dev_dir) = if args.dev {
        eprintln!("{}", dev::BANNER);
        if !args.listen.ip().is_loopback() {
            eprintln!(
                "crp-provider: WARNING: --dev on {} is reachable from other machines; only loopback callers act as `dev`, others must sign",
                args.listen
            );
        }
        let (v, d) = dev::open_dev_vault(args.fixtures.as_deref(), args.apply_file.as_deref()).await?;
        (v, Some(d))
    } else {
        (open_vault(&args).await?, None)
    };
    let cfg = ServeConfig {
        listen: args.listen,
        dev: args.dev,
        max_body_bytes: args.max_body_bytes,
        public_url: args.public_url.clone(),
        ..Default::default()
    };
    let server = start(vault.clone(), cfg).await?;
    let url = server.base_url();
    if args.stdio {
        eprintln!("crp-provider: JSON-RPC on stdin/stdout; proxy listening on {url}");
        tokio::select! {
            r = serve_stdio(vault) => { r?; }
            _ = wait_for_signal() => {}
        }
        server.shutdown().await;
    } else {
        if args.dev {
            eprintln!("crp-provider (DEV MODE) listening on {url}  (try: curl {url}/.well-known/crp)");
        }
        println!("crp-provider listening on {url}");
        server.run_until_signal().await;
    }
    Ok(())
}
