//! Embedded mode: open the local vault in-process and make `proxyBaseUrl` work.
//!
//! The vault is opened with its keyfile when there is one (no KDF: fast start), else with
//! `CRP_PASSPHRASE`. The injecting proxy is served on the configured address with
//! `crp_provider::http::start`. When that address is already taken by a CRP provider (e.g.
//! `crp-provider serve` on the same `CRP_HOME`), this process relies on it: both read lease
//! state from the same database on every proxied request, so leases created here work there.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use crp_provider::http::{RunningServer, ServeConfig};
use crp_provider::vault::{OpenOptions, Vault};

use crate::backend::Embedded;

/// How to open the vault and where to serve the proxy.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// `CRP_HOME`.
    pub home: PathBuf,
    /// `postgres://…` instead of the SQLite file in `home`.
    pub database_url: Option<String>,
    /// Proxy address (default `127.0.0.1:7700`; port 0 picks one).
    pub listen: SocketAddr,
    /// The agent policies see (default `owner`).
    pub agent: String,
}

/// Where the proxy is served from.
pub enum ProxyHost {
    /// This process serves it.
    Own(RunningServer),
    /// A provider that was already listening on the address.
    Shared(String),
}

/// An opened vault, its proxy, and the backend over it.
pub struct EmbeddedRuntime {
    vault: Vault,
    proxy: ProxyHost,
    backend: Arc<Embedded>,
}

impl EmbeddedRuntime {
    /// The backend the MCP server calls.
    pub fn backend(&self) -> Arc<Embedded> {
        self.backend.clone()
    }

    /// The proxy's base URL.
    pub fn proxy_base_url(&self) -> String {
        match &self.proxy {
            ProxyHost::Own(s) => s.base_url(),
            ProxyHost::Shared(u) => u.clone(),
        }
    }

    /// Stop the proxy (draining), flush the audit.
    pub async fn shutdown(self) {
        match self.proxy {
            ProxyHost::Own(s) => s.shutdown().await,
            ProxyHost::Shared(_) => self.vault.shutdown().await,
        }
    }
}

/// Whether a CRP provider answers discovery at `addr`.
async fn provider_at(addr: SocketAddr) -> bool {
    let Ok(http) = crate::remote::http_client(Duration::from_secs(2)) else { return false };
    let Ok(base) = crate::remote::parse_base(&format!("http://{addr}")) else { return false };
    crate::remote::fetch_capability(&http, &base).await.is_ok()
}

/// Open the vault and start (or find) the proxy.
pub async fn open(opts: EmbeddedOptions) -> Result<EmbeddedRuntime> {
    let home = opts.home.clone();
    let vault = Vault::open(OpenOptions { home: home.clone(), unlock: None, database_url: opts.database_url.clone() })
        .await
        .with_context(|| {
            format!(
                "cannot open the vault in {} (create one with `crp-provider init --keyfile`, or set CRP_PASSPHRASE \
                 for a passphrase vault; use --provider URL for a remote provider)",
                home.display()
            )
        })?;
    let cfg = ServeConfig { listen: opts.listen, ..Default::default() };
    let proxy = match crp_provider::http::start(vault.clone(), cfg).await {
        Ok(server) => {
            tracing::info!(proxy = %server.base_url(), "serving the injecting proxy");
            ProxyHost::Own(server)
        }
        Err(e) if opts.listen.port() != 0 && provider_at(opts.listen).await => {
            let base = format!("http://{}", opts.listen);
            tracing::info!(
                proxy = %base,
                "{e:#}; a CRP provider already serves there: relying on it for the proxy \
                 (it must serve the same vault, {})",
                home.display()
            );
            vault.set_proxy_base_url(&base);
            ProxyHost::Shared(base)
        }
        Err(e) => {
            vault.shutdown().await;
            bail!("{e:#}; pass --listen 127.0.0.1:0 for a free port, or stop what holds {}", opts.listen)
        }
    };
    let description = format!("embedded vault {}", home.display());
    let backend = Arc::new(Embedded::new(Arc::new(vault.clone()), opts.agent, description));
    Ok(EmbeddedRuntime { vault, proxy, backend })
}
