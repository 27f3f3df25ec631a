//! `--stdio 'CMD'`: the provider is a child process speaking CRP JSON-RPC 2.0 as
//! newline-delimited JSON on stdin/stdout (v0.1 §4.3). There is no version header and no
//! discovery on this transport; `--discovery URL` may name an HTTP endpoint whose
//! `/.well-known/crp` describes the same provider.

use std::time::Duration;

use async_trait::async_trait;

use super::http::fetch_capability;
use super::lines::LineConn;
use super::{Discovery, Expect, Reply, Transport, TransportError, TransportKind};

/// A stdio provider.
pub struct StdioTransport {
    conn: LineConn,
    speaks: String,
    discovery: Option<(reqwest::Client, String)>,
}

impl StdioTransport {
    /// Spawn `cmd`; `speaks` is the one CRP version the process is assumed to speak.
    pub fn spawn(cmd: &str, speaks: &str, discovery: Option<String>, timeout: Duration) -> Result<Self, TransportError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| TransportError::Failed(format!("HTTP client: {e}")))?;
        Ok(StdioTransport {
            conn: LineConn::spawn(cmd, timeout)?,
            speaks: speaks.to_string(),
            discovery: discovery.map(|u| (client, u.trim_end_matches('/').to_string())),
        })
    }
}

#[async_trait]
impl Transport for StdioTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Stdio
    }

    async fn discover(&self, version: Option<&str>) -> Result<Discovery, TransportError> {
        match &self.discovery {
            Some((client, url)) => fetch_capability(client, url, version, &[]).await,
            None => Ok(Discovery::Unavailable(
                "the stdio transport has no discovery; pass --discovery URL to read /.well-known/crp".into(),
            )),
        }
    }

    async fn exchange(&self, version: Option<&str>, body: &str, expect: Expect) -> Result<Reply, TransportError> {
        if let Some(v) = version
            && v != self.speaks
        {
            return Err(TransportError::Unsupported(format!(
                "stdio carries no version; the process speaks {} (set --crp-version)",
                self.speaks
            )));
        }
        let body = self.conn.exchange(body, expect).await?;
        Ok(Reply { status: None, body })
    }

    fn unsolicited(&self) -> Vec<String> {
        self.conn.unsolicited()
    }

    async fn close(&self) {
        self.conn.close().await;
    }
}
