//! The floor of the proxy benchmark (`scripts/bench.sh`): the least a proxy built on our HTTP
//! stack can do. A hyper server and hyper-util's pooled client (the one reqwest wraps) on a
//! multi-threaded tokio runtime, as `crp-provider serve` runs; every request is forwarded to
//! one upstream with `Authorization: Bearer <--token>` set, bodies streamed both ways. No
//! lease, no session token, no egress guard, no redaction, no audit, no metrics.
//!
//! Its figures beside ours and nginx's split the gap: what our own work costs (ours vs this)
//! and what the stack costs (this vs nginx).
//!
//! ```text
//! bench_floor_proxy --upstream http://127.0.0.1:PORT --token SECRET [--listen 127.0.0.1:0] [--exit-on-eof]
//! ```
//! Prints `bench-floor-proxy listening on http://ADDR` on stdout once bound.

use std::convert::Infallible;
use std::net::SocketAddr;

use clap::Parser;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

mod bench_support;

#[derive(Parser, Debug)]
#[command(about = "Benchmark floor: a bare hyper proxy that sets Authorization and forwards to one upstream")]
struct Args {
    /// The upstream's base URL (`http://HOST:PORT`).
    #[arg(long)]
    upstream: String,
    /// The bearer token to inject.
    #[arg(long, env = "BENCH_UPSTREAM_TOKEN")]
    token: String,
    /// Address to bind (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Exit when stdin reaches end of input (so a parent that dies takes us with it).
    #[arg(long)]
    exit_on_eof: bool,
}

type Body = BoxBody<Bytes, hyper::Error>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let upstream: Uri = args.upstream.parse()?;
    let authority = upstream.authority().cloned().ok_or_else(|| anyhow::anyhow!("--upstream needs a host"))?;
    let bearer = hyper::header::HeaderValue::from_str(&format!("Bearer {}", args.token))?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    bench_support::announce("bench-floor-proxy", &listener, args.exit_on_eof)?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build(connector);
    loop {
        let stream = bench_support::accept("bench-floor-proxy", &listener).await;
        let (client, authority, bearer) = (client.clone(), authority.clone(), bearer.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (client, authority, bearer) = (client.clone(), authority.clone(), bearer.clone());
                async move { Ok::<_, Infallible>(forward(&client, authority, bearer, req).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn forward(
    client: &Client<HttpConnector, Incoming>,
    authority: hyper::http::uri::Authority,
    bearer: hyper::header::HeaderValue,
    req: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let mut uri = parts.uri.into_parts();
    uri.scheme = Some(hyper::http::uri::Scheme::HTTP);
    uri.authority = Some(authority);
    parts.uri = match Uri::from_parts(uri) {
        Ok(u) => u,
        Err(_) => return status(StatusCode::BAD_REQUEST),
    };
    parts.headers.remove(hyper::header::HOST);
    parts.headers.insert(hyper::header::AUTHORIZATION, bearer);
    match client.request(Request::from_parts(parts, body)).await {
        Ok(resp) => resp.map(|b| b.boxed()),
        Err(_) => status(StatusCode::BAD_GATEWAY),
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed());
    *r.status_mut() = code;
    r
}
