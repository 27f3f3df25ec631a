//! `serve --stdio`: CRP JSON-RPC 2.0 as newline-delimited JSON on stdin/stdout.
//!
//! One message per line (a request, a notification or a batch); one answer per line, in
//! order; notifications get no line. The caller is the local owner's agent
//! ([`crate::vault::Vault::owner_agent`]) speaking the newest version. A line longer than
//! [`MAX_LINE_BYTES`] is answered with -32600 and skipped. Nothing but protocol goes to
//! stdout; logs go to stderr. Returns at end of input.

use std::sync::Arc;

use crp_core::jsonrpc::Response as RpcResponse;
use crp_core::provider::{CallContext, Transport};
use crp_core::{CrpError, Dispatcher, Provider};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::vault::Vault;

/// Longest accepted line.
pub const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

/// Serve on the process's stdin/stdout as the owner's agent until stdin closes.
pub async fn serve_stdio(vault: Vault) -> anyhow::Result<()> {
    let provider: Arc<dyn Provider> = Arc::new(vault);
    serve_stdio_with(provider, Vault::owner_agent(), tokio::io::stdin(), tokio::io::stdout()).await?;
    Ok(())
}

/// Read one line of at most `max` bytes (without the newline). `Ok(None)` at end of input;
/// `Ok(Some(Err(())))` when the line was too long (it has been consumed).
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, max: usize) -> std::io::Result<Option<Result<Vec<u8>, ()>>> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            if line.is_empty() && !too_long {
                return Ok(None);
            }
            break;
        }
        let (chunk, found) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i)),
            None => (buf, None),
        };
        if !too_long {
            if line.len() + chunk.len() > max {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let consumed = found.map(|i| i + 1).unwrap_or(buf.len());
        r.consume(consumed);
        if found.is_some() {
            break;
        }
    }
    if too_long {
        return Ok(Some(Err(())));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(Ok(line)))
}

/// Serve newline-delimited JSON-RPC from `reader` to `writer` as `agent`.
pub async fn serve_stdio_with<R, W>(provider: Arc<dyn Provider>, agent: &str, reader: R, mut writer: W) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let dispatcher: Dispatcher<dyn Provider> = Dispatcher::new(provider);
    let ctx = CallContext::new(agent, Transport::Stdio);
    let mut reader = BufReader::new(reader);
    while let Some(line) = read_line(&mut reader, MAX_LINE_BYTES).await? {
        let out = match line {
            Err(()) => serde_json::to_string(&RpcResponse::error(
                None,
                CrpError::invalid_request(format!("message too large: at most {MAX_LINE_BYTES} bytes per line")),
            ))
            .ok(),
            Ok(l) if l.iter().all(|b| b.is_ascii_whitespace()) => None,
            Ok(l) => dispatcher.handle_bytes(&ctx, &l).await,
        };
        if let Some(mut out) = out {
            out.push('\n');
            writer.write_all(out.as_bytes()).await?;
            writer.flush().await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded() {
        let input = b"abc\r\n0123456789ABCDEF\nlast".to_vec();
        let mut r = BufReader::with_capacity(4, &input[..]);
        assert_eq!(read_line(&mut r, 8).await.unwrap(), Some(Ok(b"abc".to_vec())));
        assert_eq!(read_line(&mut r, 8).await.unwrap(), Some(Err(())));
        assert_eq!(read_line(&mut r, 8).await.unwrap(), Some(Ok(b"last".to_vec())));
        assert_eq!(read_line(&mut r, 8).await.unwrap(), None);
    }
}
