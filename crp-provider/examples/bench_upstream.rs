//! The upstream of the proxy benchmarks (`scripts/bench.sh`): a minimal hyper HTTP/1.1 server
//! that answers a 60-byte JSON body, but only when `Authorization` is exactly
//! `Bearer <--token>`; anything else gets 401. Every benchmark run therefore checks, on every
//! request, that the credential was injected: wrk counts the 401s as non-2xx responses.
//!
//! ```text
//! bench_upstream --token SECRET [--listen 127.0.0.1:0] [--threads 1]
//! ```
//! Prints `bench-upstream listening on http://ADDR` on stdout once bound, then serves until
//! killed (or until stdin closes when `--exit-on-eof` is given).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

mod bench_support;

/// 60 bytes.
const OK_BODY: &[u8] = br#"{"ok":true,"service":"bench-upstream","data":"0123456789ab"}"#;
const DENIED_BODY: &[u8] = br#"{"error":"unauthorized"}"#;

#[derive(Parser, Debug)]
#[command(about = "Benchmark upstream: 200 with a 60-byte JSON body iff Authorization is `Bearer <token>`")]
struct Args {
    /// Address to bind (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The bearer token that must be presented.
    #[arg(long, env = "BENCH_UPSTREAM_TOKEN")]
    token: String,
    /// Tokio worker threads (1: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Exit when stdin reaches end of input (so a parent that dies takes us with it).
    #[arg(long)]
    exit_on_eof: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build()?
    };
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    bench_support::announce("bench-upstream", &listener, args.exit_on_eof)?;
    let expected: Arc<[u8]> = format!("Bearer {}", args.token).into_bytes().into();
    loop {
        let stream = bench_support::accept("bench-upstream", &listener).await;
        let expected = expected.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let ok = req.headers().get(hyper::header::AUTHORIZATION).is_some_and(|v| v.as_bytes() == &expected[..]);
                async move {
                    let (status, body) = if ok { (StatusCode::OK, OK_BODY) } else { (StatusCode::UNAUTHORIZED, DENIED_BODY) };
                    let resp = Response::builder()
                        .status(status)
                        .header(hyper::header::CONTENT_TYPE, "application/json")
                        .body(Full::new(Bytes::from_static(body)))
                        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
