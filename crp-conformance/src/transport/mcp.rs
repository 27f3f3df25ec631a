//! `--mcp 'CMD'`: the provider is an MCP server on a child's stdin/stdout. The runner is a
//! minimal MCP client written as plain JSON-RPC: `initialize` with `experimental.crp` (and the
//! CRP version wanted) in the client capabilities, `notifications/initialized`, then `crp/*`
//! as custom requests on the same connection. The capability comes from the initialize
//! result's `capabilities.experimental.crp`.
//!
//! One child per CRP version: the version is fixed at initialize time, so asking for another
//! version starts another session. MCP 2025-06-18 removed JSON-RPC batches, so batch cases are
//! skipped here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::lines::LineConn;
use super::{Discovery, Expect, Reply, Transport, TransportError, TransportKind};

/// The MCP protocol version the runner asks for (the last one with `initialize`).
pub const MCP_PROTOCOL_VERSION: &str = "2025-06-18";

struct Session {
    conn: LineConn,
    /// `Ok(experimental.crp or null)` or `Err(error object)`.
    init: Result<Value, Value>,
}

/// An MCP provider.
pub struct McpTransport {
    cmd: String,
    timeout: Duration,
    default_version: String,
    sessions: tokio::sync::Mutex<HashMap<String, Arc<Session>>>,
}

impl McpTransport {
    /// A transport that starts `cmd` on first use; `default_version` is the CRP version asked
    /// for when a case names none.
    pub fn new(cmd: &str, default_version: &str, timeout: Duration) -> Self {
        McpTransport {
            cmd: cmd.to_string(),
            timeout,
            default_version: default_version.to_string(),
            sessions: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    async fn session(&self, version: &str) -> Result<Arc<Session>, TransportError> {
        let mut s = self.sessions.lock().await;
        if let Some(x) = s.get(version) {
            return Ok(x.clone());
        }
        let conn = LineConn::spawn(&self.cmd, self.timeout)?;
        let init = json!({
            "jsonrpc": "2.0", "id": "crp-conformance-init", "method": "initialize",
            "params": {
                "protocolVersion": MCP_PROTOCOL_VERSION,
                "capabilities": {"experimental": {"crp": {"version": version, "features": []}}},
                "clientInfo": {"name": "crp-conformance", "version": env!("CARGO_PKG_VERSION")}
            }
        });
        let reply = conn
            .exchange(&init.to_string(), Expect::Ids(vec![json!("crp-conformance-init")]))
            .await
            .map_err(|e| TransportError::Failed(format!("MCP initialize: {e}{}", tail(&conn))))?
            .unwrap_or_default();
        let v: Value = serde_json::from_str(&reply)
            .map_err(|_| TransportError::Failed(format!("MCP initialize: the reply is not JSON: {reply}")))?;
        let init = match (v.get("result"), v.get("error")) {
            (Some(r), _) => Ok(r.pointer("/capabilities/experimental/crp").cloned().unwrap_or(Value::Null)),
            (None, Some(e)) => Err(e.clone()),
            _ => return Err(TransportError::Failed(format!("MCP initialize: neither result nor error: {reply}"))),
        };
        if init.is_ok() {
            let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
            conn.exchange(&note.to_string(), Expect::Nothing).await?;
        }
        let session = Arc::new(Session { conn, init });
        s.insert(version.to_string(), session.clone());
        Ok(session)
    }
}

fn tail(conn: &LineConn) -> String {
    let t = conn.stderr_tail();
    if t.is_empty() { String::new() } else { format!("; stderr:\n{t}") }
}

#[async_trait]
impl Transport for McpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Mcp
    }

    async fn discover(&self, version: Option<&str>) -> Result<Discovery, TransportError> {
        let s = self.session(version.unwrap_or(&self.default_version)).await?;
        Ok(match &s.init {
            Ok(Value::Null) => Discovery::Refused(json!({
                "note": "initialize succeeded but capabilities.experimental.crp is absent"})),
            Ok(cap) => Discovery::Capability(cap.clone()),
            Err(e) => Discovery::Refused(e.clone()),
        })
    }

    async fn exchange(&self, version: Option<&str>, body: &str, expect: Expect) -> Result<Reply, TransportError> {
        let s = self.session(version.unwrap_or(&self.default_version)).await?;
        if let Err(e) = &s.init {
            // The session was refused at initialize: that refusal is the answer to anything.
            let id = match &expect {
                Expect::Ids(ids) => ids.first().cloned().unwrap_or(Value::Null),
                _ => Value::Null,
            };
            return Ok(Reply {
                status: None,
                body: Some(json!({"jsonrpc": "2.0", "id": id, "error": e}).to_string()),
            });
        }
        let body = s.conn.exchange(body, expect).await?;
        Ok(Reply { status: None, body })
    }

    fn unsolicited(&self) -> Vec<String> {
        match self.sessions.try_lock() {
            Ok(s) => s.values().flat_map(|x| x.conn.unsolicited()).collect(),
            Err(_) => vec![],
        }
    }

    fn supports_batches(&self) -> bool {
        false
    }

    async fn close(&self) {
        let sessions: Vec<_> = self.sessions.lock().await.drain().map(|(_, v)| v).collect();
        for s in sessions {
            s.conn.close().await;
        }
    }
}
