//! `crp-provider serve`: the HTTP face of the vault, usable as a library.
//!
//! Owns the axum application and its lifecycle:
//! - `POST /crp` ([`rpc`]): JSON-RPC 2.0 through `crp_core::Dispatcher`, signed callers ([`auth`]);
//! - `GET /.well-known/crp`, `GET /healthz` ([`discovery`]), `GET /metrics` ([`metrics`]);
//! - `POST /api/v1/agents/register` ([`register`]);
//! - `ANY /api/v1/proxy/t/{leaseId}/{rest}` ([`proxy`]): the injecting reverse proxy, with the
//!   egress guard ([`egress`]), its upstream client ([`upstream`]) and response redaction
//!   ([`redact`]);
//! - `serve --stdio` ([`stdio`]) and `serve --dev` ([`dev`]); the clap arguments ([`cli`]).
//!
//! Library use (the MCP adapter's embedded mode, tests, benchmarks):
//!
//! ```no_run
//! # async fn demo(vault: crp_provider::vault::Vault) -> anyhow::Result<()> {
//! use crp_provider::http::{start, ServeConfig};
//! let server = start(vault, ServeConfig { listen: "127.0.0.1:0".parse()?, ..Default::default() }).await?;
//! println!("{}", server.base_url());
//! server.shutdown().await; // drains in-flight requests, flushes the audit
//! # Ok(()) }
//! ```

pub mod auth;
pub mod backend;
pub mod cli;
pub mod dev;
pub mod discovery;
pub mod egress;
pub mod metrics;
pub mod proxy;
pub mod redact;
pub mod register;
pub mod rpc;
pub mod stdio;
pub mod upstream;
mod vault_backend;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use crp_core::{Dispatcher, Provider};
use http::StatusCode;
use tokio::sync::oneshot;

pub use backend::{Backend, Gauges, RegisterError};
pub use cli::{ServeArgs, run};
pub use stdio::{serve_stdio, serve_stdio_with};

use crate::vault::Vault;

/// Where the proxy route starts.
pub const PROXY_PREFIX: &str = "/api/v1/proxy/t/";

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to bind; port 0 picks an ephemeral port. Default `127.0.0.1:7700`.
    pub listen: SocketAddr,
    /// `serve --dev`: unauthenticated loopback callers act as agent `dev`.
    pub dev: bool,
    /// Largest `POST /crp` body (and registration body); larger is 413. Default 1 MiB.
    pub max_body_bytes: usize,
    /// The base URL advertised in `proxyBaseUrl` (default `http://{local_addr}`), e.g. when
    /// the server sits behind a TLS terminator.
    pub public_url: Option<String>,
    /// Upstream client settings (timeouts, pool, extra trusted roots).
    pub upstream: upstream::ClientSettings,
    /// Request bodies up to this size are kept so a brokered request can be retried once
    /// after a 401; larger (or unknown-length) bodies stream and are not retried. 64 KiB.
    pub retry_buffer_bytes: usize,
    /// Responses with a Content-Length up to this size are redacted whole and keep an exact
    /// Content-Length; larger or unknown-length ones stream (Content-Length dropped). 64 KiB.
    pub redact_buffer_bytes: usize,
    /// Longest wait for in-flight requests at shutdown before connections are cut. 30 s.
    pub drain_timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            dev: false,
            max_body_bytes: 1024 * 1024,
            public_url: None,
            upstream: upstream::ClientSettings::default(),
            retry_buffer_bytes: 64 * 1024,
            redact_buffer_bytes: 64 * 1024,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Shared state of every route, behind one `Arc`: axum clones the state for every extractor
/// of every request, and one reference count is cheaper to move between cores than nine.
pub(crate) type AppState = Arc<Shared>;

/// What [`AppState`] points to.
pub(crate) struct Shared {
    pub backend: Arc<dyn Backend>,
    pub dispatcher: Dispatcher<dyn Provider>,
    pub auth: auth::Authenticator,
    pub metrics: Arc<metrics::Metrics>,
    pub clients: Arc<upstream::Clients>,
    pub cfg: Arc<ServeConfig>,
}

/// A server started by [`start`].
pub struct RunningServer {
    addr: SocketAddr,
    base_url: String,
    shutdown_tx: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    backend: Arc<dyn Backend>,
    metrics: Arc<metrics::Metrics>,
    drain_timeout: Duration,
}

impl RunningServer {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (or the configured public URL).
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// Counters (tests read them).
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    /// Graceful stop: refuse new connections, drain in-flight requests (up to the drain
    /// timeout), then flush the audit and stop the vault's background work.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
        let abort = self.task.abort_handle();
        if tokio::time::timeout(self.drain_timeout, &mut self.task).await.is_err() {
            tracing::warn!("drain timeout: closing remaining connections");
            abort.abort();
        }
        self.backend.shutdown().await;
    }

    /// Run until SIGINT or SIGTERM, then [`RunningServer::shutdown`].
    pub async fn run_until_signal(self) {
        wait_for_signal().await;
        eprintln!("crp-provider: shutting down (draining requests, flushing audit)");
        self.shutdown().await;
    }
}

/// SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Install rustls' ring provider once per process (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Start the server over a vault: binds, sets the vault's proxy base URL, spawns.
pub async fn start(vault: Vault, cfg: ServeConfig) -> anyhow::Result<RunningServer> {
    start_with_backend(Arc::new(vault), cfg).await
}

/// Start the server over any [`Backend`].
pub async fn start_with_backend(backend: Arc<dyn Backend>, cfg: ServeConfig) -> anyhow::Result<RunningServer> {
    install_crypto_provider();
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let base_url = cfg.public_url.clone().unwrap_or_else(|| format!("http://{addr}"));
    let base_url = base_url.trim_end_matches('/').to_string();
    backend.set_proxy_base_url(&base_url);
    let metrics = Arc::new(metrics::Metrics::default());
    let state = Arc::new(Shared {
        dispatcher: Dispatcher::new(backend.provider()),
        auth: auth::Authenticator::new(backend.clone(), cfg.dev),
        backend: backend.clone(),
        metrics: metrics.clone(),
        clients: Arc::new(upstream::Clients::new(cfg.upstream.clone())),
        cfg: Arc::new(cfg.clone()),
    });
    let app = router(state);
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
    });
    Ok(RunningServer {
        addr,
        base_url,
        shutdown_tx: Some(tx),
        task,
        backend,
        metrics,
        drain_timeout: cfg.drain_timeout,
    })
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/crp", post(rpc::handle))
        .route("/.well-known/crp", get(discovery::capability))
        .route("/healthz", get(discovery::healthz))
        .route("/metrics", get(metrics_route))
        .route("/api/v1/agents/register", post(register::handle))
        .fallback(fallback)
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

/// Everything not routed above: the proxy (whose paths axum's router cannot express in full:
/// an empty `{rest}`, encoded slashes) or 404.
async fn fallback(state: State<AppState>, req: Request) -> Response {
    if req.uri().path().starts_with(PROXY_PREFIX) {
        return proxy::handle(state, req).await;
    }
    json_error(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn metrics_route(State(st): State<AppState>) -> Response {
    let gauges = st.backend.gauges().await;
    let text = st.metrics.render(gauges, st.auth.replay_cache().len());
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

fn route_label(path: &str) -> &'static str {
    match path {
        "/crp" => "crp",
        "/.well-known/crp" => "discovery",
        "/healthz" => "healthz",
        "/metrics" => "metrics",
        "/api/v1/agents/register" => "register",
        p if p.starts_with(PROXY_PREFIX) => "proxy",
        _ => "other",
    }
}

async fn count_requests(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let route = route_label(req.uri().path());
    let started = Instant::now();
    let resp = next.run(req).await;
    st.metrics.request(route, resp.status().as_u16());
    if route != "proxy" {
        tracing::debug!(route, status = resp.status().as_u16(), us = started.elapsed().as_micros() as u64, "request");
    }
    resp
}

/// `{"error": code, "message": message}` with `status`.
pub(crate) fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": code, "message": message });
    (status, [(http::header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}
