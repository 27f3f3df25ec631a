//! What the benchmark's helper servers (`bench_upstream`, `bench_floor_proxy`) share: the
//! announcement line the harness waits for, exit when the harness goes away, and an accept loop
//! that survives transient accept errors.

use std::io::Write as _;

use tokio::net::{TcpListener, TcpStream};

/// Print `{name} listening on http://ADDR` (what `crp_bench` waits for) and, with
/// `exit_on_eof`, exit once stdin closes, so a harness that dies takes this process with it.
pub fn announce(name: &str, listener: &TcpListener, exit_on_eof: bool) -> anyhow::Result<()> {
    println!("{name} listening on http://{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    if exit_on_eof {
        tokio::spawn(async {
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut sink).await;
            std::process::exit(0);
        });
    }
    Ok(())
}

/// The next connection, with `TCP_NODELAY` set; accept errors are reported and skipped.
pub async fn accept(name: &str, listener: &TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                return stream;
            }
            Err(e) => eprintln!("{name}: accept failed: {e}"),
        }
    }
}
