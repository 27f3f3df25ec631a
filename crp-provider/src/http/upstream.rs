//! The proxy's upstream HTTP client: one request out, one response back, nothing in between.
//!
//! Owns the clients the proxy sends through, one per allowance set ([`Clients`]), and the
//! timeouts around a request:
//! - hyper-util's pooled client: HTTP/1.1, and HTTP/2 when TLS negotiates it (ALPN);
//!   keep-alive pooling per host; redirects are never followed (this client has no notion of
//!   them: a 3xx goes back to the caller as it came);
//! - names are resolved by the egress guard's [`GuardedResolver`], literal addresses were
//!   checked by [`super::egress::check_literal`] before a request gets here;
//! - TLS is rustls with the process's crypto provider (ring), verified against the
//!   platform's roots plus [`ClientSettings::extra_roots_der`];
//! - `connect_timeout` bounds TCP and TLS together; `read_timeout` bounds the wait for the
//!   response head and then each wait for the next piece of its body ([`TimedBody`]).
//!
//! Why not reqwest, which the broker still uses: a proxy does not need its URL type, redirect
//! policy or per-request client layers, and on the proxy benchmark's hot path they cost
//! 7–26 µs of CPU per request (a bare hyper proxy against the same proxy sending through
//! reqwest, 64 connections), against 20–26 µs for the whole of the bare proxy.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Sleep;

use super::egress::{Allowance, EgressDenied, GuardedResolver, egress_denied_in};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Settings of the upstream clients.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Longest wait for the response head, then for each next piece of the body.
    pub read_timeout: Duration,
    /// Idle pooled connections kept per host.
    pub pool_max_idle_per_host: usize,
    /// Extra trusted root certificates (DER), e.g. a test CA; the system roots stay trusted.
    pub extra_roots_der: Vec<Vec<u8>>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(300),
            pool_max_idle_per_host: 64,
            extra_roots_der: Vec::new(),
        }
    }
}

/// Why an upstream exchange failed, in the terms the proxy answers with. Never carries a
/// transport error's text: it could name the URL, and a query-injected secret with it.
#[derive(Debug)]
pub enum SendError {
    /// The egress guard refused the resolved address.
    Egress(EgressDenied),
    /// Connecting (TCP and TLS) or the response head took longer than allowed.
    Timeout,
    /// No connection could be made (refused, unreachable, TLS refused).
    Connect,
    /// The exchange failed after connecting.
    Exchange,
}

type Connector = TimedConnector<HttpsConnector<HttpConnector<GuardedResolver>>>;

/// A client for one allowance set: cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct Client {
    inner: HyperClient<Connector, Body>,
    read_timeout: Duration,
}

impl Client {
    /// Send `req` (an absolute URI) and wait for the response head, at most `read_timeout`.
    /// The response body is a [`TimedBody`] with the same bound per read.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<TimedBody>, SendError> {
        match tokio::time::timeout(self.read_timeout, self.inner.request(req)).await {
            Err(_) => Err(SendError::Timeout),
            Ok(Ok(resp)) => Ok(resp.map(|b| TimedBody::new(b, self.read_timeout))),
            Ok(Err(e)) => Err(if let Some(d) = egress_denied_in(&e) {
                SendError::Egress(d)
            } else if has_source::<ConnectTimedOut>(&e) {
                SendError::Timeout
            } else if e.is_connect() {
                SendError::Connect
            } else {
                SendError::Exchange
            }),
        }
    }
}

fn has_source<E: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<E>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Upstream clients, one per allowance set (each with its own pool and resolver), so a
/// pooled connection opened under one credential's allowance is never reused for a
/// credential without it.
pub struct Clients {
    settings: ClientSettings,
    by_allowance: Mutex<HashMap<Allowance, Client>>,
}

impl Clients {
    /// An empty cache.
    pub fn new(settings: ClientSettings) -> Self {
        Self { settings, by_allowance: Mutex::new(HashMap::new()) }
    }

    /// The client for `allowance`, built on first use.
    pub fn get(&self, allowance: &Allowance) -> Result<Client, String> {
        let mut map = self.by_allowance.lock().map_err(|_| "client cache poisoned".to_string())?;
        if let Some(c) = map.get(allowance) {
            return Ok(c.clone());
        }
        let c = self.build(allowance)?;
        // Bound the cache: allowance sets come from credentials, which are few; a flood of
        // distinct sets just rebuilds clients.
        if map.len() >= 256 {
            map.clear();
        }
        map.insert(allowance.clone(), c.clone());
        Ok(c)
    }

    fn build(&self, allowance: &Allowance) -> Result<Client, String> {
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        let roots = self
            .settings
            .extra_roots_der
            .iter()
            .map(|der| rustls::pki_types::CertificateDer::from(der.clone()))
            .collect::<Vec<_>>();
        let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(roots, provider.clone())
            .map_err(|_| "cannot load the trusted root certificates".to_string())?;
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|_| "cannot configure TLS".to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();

        let mut http = HttpConnector::new_with_resolver(GuardedResolver::new(allowance.clone()));
        http.enforce_http(false);
        http.set_nodelay(true);
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let connector = TimedConnector { inner: https, timeout: self.settings.connect_timeout };
        let inner = HyperClient::builder(TokioExecutor::new())
            .pool_max_idle_per_host(self.settings.pool_max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(Client { inner, read_timeout: self.settings.read_timeout })
    }
}

/// The connect timeout ran out (TCP and TLS together).
#[derive(Debug)]
struct ConnectTimedOut;

impl std::fmt::Display for ConnectTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connecting to the upstream timed out")
    }
}

impl std::error::Error for ConnectTimedOut {}

/// A connector whose whole connection setup (resolve, TCP, TLS) is bounded.
#[derive(Clone)]
struct TimedConnector<C> {
    inner: C,
    timeout: Duration,
}

impl<C> tower_service::Service<Uri> for TimedConnector<C>
where
    C: tower_service::Service<Uri, Error = BoxError> + Send,
    C::Future: Send + 'static,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let fut = self.inner.call(dst);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(Box::new(ConnectTimedOut) as BoxError),
            }
        })
    }
}

/// The body read more slowly than `read_timeout` allows between two pieces.
#[derive(Debug)]
pub struct ReadTimedOut;

impl std::fmt::Display for ReadTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the upstream body stalled")
    }
}

impl std::error::Error for ReadTimedOut {}

/// An upstream response body whose every wait for the next frame is bounded.
pub struct TimedBody {
    inner: Incoming,
    timeout: Duration,
    // Armed when a poll finds nothing ready, cleared when a frame arrives: a body that keeps
    // arriving costs no timer.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl TimedBody {
    fn new(inner: Incoming, timeout: Duration) -> Self {
        Self { inner, timeout, deadline: None }
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.deadline = None;
                Poll::Ready(r.map(|f| f.map_err(BoxError::from)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let deadline = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                ready!(deadline.as_mut().poll(cx));
                Poll::Ready(Some(Err(Box::new(ReadTimedOut))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
