//! Embedded mode: open the local vault in-process and make `proxyBaseUrl` work.
//!
//! The vault is opened with its keyfile when there is one (no KDF: fast start), else with
//! `CRP_PASSPHRASE`. The injecting proxy is served on the configured address with
//! `crp_provider::http::start`. When that address is already taken by a CRP provider (e.g.
//! `crp-provider serve` on the same `CRP_HOME`), this process relies on it: both read lease
//! state from the same database on every proxied request, so leases created here work there.
//! The first lease checks that assumption (see [`EmbeddedBackend`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use crp_core::types::Capability;
use crp_core::{CrpError, Version};
use crp_provider::http::{RunningServer, ServeConfig};
use crp_provider::vault::{OpenOptions, Vault};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::backend::{Backend, Embedded};

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
enum ProxyHost {
    /// This process serves it.
    Own(RunningServer),
    /// A provider that was already listening on the address; `verified` once a lease made
    /// here was recognised by it (same vault).
    Shared { base: String, verified: bool },
    /// Shut down.
    Stopped,
}

/// The embedded backend: the vault behind crp-core's dispatcher, plus the proxy it needs.
///
/// When the proxy is shared with a provider that was already listening, the first `crp/use`
/// checks that this provider knows the new lease (a request with a wrong session token must
/// be refused with 401, not 404 "unknown lease"). If it does not (another vault), this
/// process starts its own proxy on an ephemeral port and hands out that URL instead.
pub struct EmbeddedBackend {
    inner: Embedded,
    vault: Vault,
    proxy: Mutex<ProxyHost>,
}

impl EmbeddedBackend {
    /// The proxy's base URL.
    pub async fn proxy_base_url(&self) -> Option<String> {
        match &*self.proxy.lock().await {
            ProxyHost::Own(s) => Some(s.base_url()),
            ProxyHost::Shared { base, .. } => Some(base.clone()),
            ProxyHost::Stopped => None,
        }
    }

    /// Stop the proxy (draining), flush the audit.
    pub async fn shutdown(&self) {
        let host = std::mem::replace(&mut *self.proxy.lock().await, ProxyHost::Stopped);
        match host {
            ProxyHost::Own(s) => s.shutdown().await,
            ProxyHost::Shared { .. } => self.vault.shutdown().await,
            ProxyHost::Stopped => {}
        }
    }

    /// After a successful `crp/use` while sharing an unverified proxy: check it, and move to
    /// an own proxy when it serves another vault. Returns the (possibly rewritten) result.
    async fn check_shared(&self, mut result: Value) -> Value {
        let mut host = self.proxy.lock().await;
        let ProxyHost::Shared { base, verified } = &mut *host else { return result };
        if *verified {
            return result;
        }
        let Some(url) = result.get("proxyBaseUrl").and_then(Value::as_str).map(str::to_owned) else { return result };
        match probe_status(&url).await {
            Some(404) => {}
            other => {
                tracing::info!(proxy = %base, status = ?other, "the shared proxy knows this vault's leases");
                *verified = true;
                return result;
            }
        }
        let old = base.clone();
        tracing::warn!(
            proxy = %old,
            "the provider at {old} does not know leases of this vault (another CRP_HOME?): starting an own proxy"
        );
        let cfg = ServeConfig { listen: SocketAddr::from(([127, 0, 0, 1], 0)), ..Default::default() };
        match crp_provider::http::start(self.vault.clone(), cfg).await {
            Ok(server) => {
                let new = server.base_url();
                if let Some(Value::String(u)) = result.get_mut("proxyBaseUrl")
                    && let Some(rest) = u.strip_prefix(&old)
                {
                    *u = format!("{new}{rest}");
                }
                tracing::info!(proxy = %new, "serving the injecting proxy");
                *host = ProxyHost::Own(server);
            }
            Err(e) => tracing::error!("cannot start an own proxy: {e:#}"),
        }
        result
    }
}

/// Status of `GET {proxy_url}/` with a session token no lease has.
async fn probe_status(proxy_url: &str) -> Option<u16> {
    let http = crate::remote::http_client(Duration::from_secs(5)).ok()?;
    let resp = http
        .get(format!("{}/", proxy_url.trim_end_matches('/')))
        .bearer_auth("crp-mcp-probe-not-a-session-token")
        .send()
        .await
        .ok()?;
    Some(resp.status().as_u16())
}

#[async_trait]
impl Backend for EmbeddedBackend {
    async fn call(&self, version: Version, method: &str, params: Value) -> Result<Value, CrpError> {
        let out = self.inner.call(version, method, params).await?;
        if method == crp_core::methods::USE {
            return Ok(self.check_shared(out).await);
        }
        Ok(out)
    }

    fn capability(&self, version: Version) -> Capability {
        self.inner.capability(version)
    }

    fn agent(&self) -> &str {
        self.inner.agent()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Whether a CRP provider answers discovery at `addr`.
async fn provider_at(addr: SocketAddr) -> bool {
    let Ok(http) = crate::remote::http_client(Duration::from_secs(2)) else { return false };
    let Ok(base) = crate::remote::parse_base(&format!("http://{addr}")) else { return false };
    crate::remote::fetch_capability(&http, &base).await.is_ok()
}

/// Open the vault and start (or find) the proxy.
pub async fn open(opts: EmbeddedOptions) -> Result<Arc<EmbeddedBackend>> {
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
                 (checked on the first lease: it must serve this vault, {})",
                home.display()
            );
            vault.set_proxy_base_url(&base);
            ProxyHost::Shared { base, verified: false }
        }
        Err(e) => {
            vault.shutdown().await;
            bail!("{e:#}; pass --listen 127.0.0.1:0 for a free port, or stop what holds {}", opts.listen)
        }
    };
    let description = format!("embedded vault {}", home.display());
    let inner = Embedded::new(Arc::new(vault.clone()), opts.agent, description);
    Ok(Arc::new(EmbeddedBackend { inner, vault, proxy: Mutex::new(proxy) }))
}
