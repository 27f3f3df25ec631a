//! The stdio transport: newline-delimited JSON-RPC between the MCP client and rmcp, with the
//! one rule rmcp does not enforce — a line that is not JSON gets a -32700 answer (JSON-RPC
//! 2.0 §5.1) instead of being dropped without a word, so a client never waits forever.
//!
//! Lines are relayed whole: rmcp's output goes through a pipe and is copied to stdout a line
//! at a time, under the same lock as the parse-error answers, so two messages never interleave.
//!
//! When the client closes stdin right after its last request (`printf ... | crp-mcp`), rmcp
//! would stop at end of input and drop requests still being handled. The relay holds the end of
//! input back until every request it forwarded has been answered (bounded by
//! [`DRAIN_TIMEOUT`]), so a piped session gets all its answers.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, DuplexStream};
use tokio::sync::{Mutex, Notify};

/// How long the relay waits for outstanding answers after the client closed stdin.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Request ids forwarded to rmcp and not answered yet.
#[derive(Default)]
struct Pending {
    ids: std::sync::Mutex<HashSet<String>>,
    changed: Notify,
}

impl Pending {
    fn requests_in(&self, message: &serde_json::Value) {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        for m in messages(message) {
            if let (Some(id), Some(_)) = (m.get("id"), m.get("method")) {
                ids.insert(id.to_string());
            }
        }
    }

    fn answers_in(&self, message: &serde_json::Value) {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        for m in messages(message) {
            if m.get("method").is_none() {
                if let Some(id) = m.get("id") {
                    ids.remove(&id.to_string());
                }
            }
        }
        drop(ids);
        self.changed.notify_waiters();
    }

    fn is_empty(&self) -> bool {
        self.ids.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    async fn drained(&self) {
        loop {
            let changed = self.changed.notified();
            if self.is_empty() {
                return;
            }
            changed.await;
        }
    }
}

fn messages(v: &serde_json::Value) -> Vec<&serde_json::Value> {
    match v {
        serde_json::Value::Array(items) => items.iter().collect(),
        other => vec![other],
    }
}

/// The largest line accepted from the client; a longer one is answered -32600 and skipped.
pub const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;

const PIPE_BYTES: usize = 64 * 1024;

/// Relay `input`/`output` (the process's stdin/stdout in production) and return the pair of
/// streams rmcp should serve on.
pub fn relay<R, W>(input: R, output: W) -> (DuplexStream, DuplexStream)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (rmcp_in, mut to_rmcp) = tokio::io::duplex(PIPE_BYTES);
    let (from_rmcp, rmcp_out) = tokio::io::duplex(PIPE_BYTES);
    let output = Arc::new(Mutex::new(output));
    let pending = Arc::new(Pending::default());

    let out = output.clone();
    let answered = pending.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(from_rmcp);
        let mut line = Vec::new();
        loop {
            line.clear();
            match lines.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let mut w = out.lock().await;
                    if w.write_all(&line).await.is_err() || w.flush().await.is_err() {
                        break;
                    }
                    drop(w);
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) {
                        answered.answers_in(&v);
                    }
                }
            }
        }
        // rmcp is gone (or stdout is): nothing more will be answered.
        answered.ids.lock().unwrap_or_else(|p| p.into_inner()).clear();
        answered.changed.notify_waiters();
    });

    tokio::spawn(async move {
        let mut reader = BufReader::new(input);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = match (&mut reader).take(MAX_LINE_BYTES as u64 + 1).read_until(b'\n', &mut line).await {
                Ok(n) => n,
                Err(_) => break,
            };
            if n == 0 {
                break;
            }
            let oversized = line.len() > MAX_LINE_BYTES && !line.ends_with(b"\n");
            if oversized {
                // Skip the rest of the line, then say why.
                let mut rest = Vec::new();
                if reader.read_until(b'\n', &mut rest).await.is_err() {
                    break;
                }
                answer(&output, -32600, "invalid request: message larger than 8 MiB").await;
                continue;
            }
            let text = trim_line(&line);
            if text.is_empty() {
                continue;
            }
            match serde_json::from_slice::<serde_json::Value>(text) {
                Ok(message) => {
                    pending.requests_in(&message);
                    if to_rmcp.write_all(text).await.is_err() || to_rmcp.write_all(b"\n").await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let msg = format!("parse error: line {} column {}", e.line(), e.column());
                    answer(&output, -32700, &msg).await;
                }
            }
        }
        // Answer what was asked, then close the pipe: that tells rmcp the client went away.
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, pending.drained()).await;
        let _ = to_rmcp.shutdown().await;
    });

    (rmcp_in, rmcp_out)
}

fn trim_line(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && matches!(line[end - 1], b'\n' | b'\r' | b' ' | b'\t') {
        end -= 1;
    }
    let mut start = 0;
    while start < end && matches!(line[start], b' ' | b'\t') {
        start += 1;
    }
    &line[start..end]
}

async fn answer<W: AsyncWrite + Unpin>(output: &Mutex<W>, code: i64, message: &str) {
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": {"code": code, "message": message},
    });
    let mut w = output.lock().await;
    let _ = w.write_all(format!("{body}\n").as_bytes()).await;
    let _ = w.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn not_json_gets_parse_error_and_json_passes_through() {
        let (client_in, relay_in) = tokio::io::duplex(4096);
        let (relay_out, mut client_out) = tokio::io::duplex(4096);
        let (mut rmcp_in, _rmcp_out) = relay(relay_in, relay_out);
        let mut client_in = client_in;
        client_in.write_all(b"{\"truncated\": \n\n{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\r\n").await.unwrap();
        let mut got = vec![0u8; 256];
        let n = client_out.read(&mut got).await.unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&got[..n]).unwrap();
        assert_eq!(answer["error"]["code"], -32700);
        assert_eq!(answer["id"], serde_json::Value::Null);
        let mut forwarded = vec![0u8; 256];
        let n = rmcp_in.read(&mut forwarded).await.unwrap();
        assert_eq!(&forwarded[..n], b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n");
    }

    #[tokio::test]
    async fn end_of_input_waits_for_outstanding_answers() {
        let (mut client_in, relay_in) = tokio::io::duplex(4096);
        let (relay_out, mut client_out) = tokio::io::duplex(4096);
        let (mut rmcp_in, mut rmcp_out) = relay(relay_in, relay_out);
        client_in.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":\"a\",\"method\":\"tools/list\"}\n").await.unwrap();
        drop(client_in);
        let mut buf = vec![0u8; 256];
        let n = rmcp_in.read(&mut buf).await.unwrap();
        assert!(n > 0);
        // The request is outstanding, so rmcp's input stays open.
        let early = tokio::time::timeout(Duration::from_millis(100), rmcp_in.read(&mut buf)).await;
        assert!(early.is_err(), "input closed before the answer");
        rmcp_out.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":\"a\",\"result\":{}}\n").await.unwrap();
        let n = client_out.read(&mut buf).await.unwrap();
        assert!(std::str::from_utf8(&buf[..n]).unwrap().contains("\"result\""));
        // Answered: now the end of input reaches rmcp.
        let n = tokio::time::timeout(Duration::from_secs(5), rmcp_in.read(&mut buf)).await.unwrap().unwrap();
        assert_eq!(n, 0);
    }
}
