//! How the runner reaches a provider: HTTP JSON-RPC, stdio NDJSON, or MCP over stdio.
//!
//! Every transport moves raw JSON-RPC text, so the cases can send malformed messages and
//! batches as well as ordinary calls. Replies are matched to requests by id (they may come
//! back in any order); replies with a null id (parse errors, invalid requests) go to whoever
//! waits for one. The transports never interpret CRP: that is the cases' job.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

pub mod http;
pub mod lines;
pub mod mcp;
pub mod stdio;

/// Which transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// `POST {url}/crp`.
    Http,
    /// Newline-delimited JSON-RPC on a child's stdin/stdout.
    Stdio,
    /// MCP over a child's stdin/stdout (`crp/*` as custom requests).
    Mcp,
}

impl TransportKind {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Stdio => "stdio",
            Self::Mcp => "mcp",
        }
    }
}

/// What the runner waits for after sending.
#[derive(Debug, Clone)]
pub enum Expect {
    /// A reply carrying one of these ids (a single response, or a batch containing one).
    Ids(Vec<Value>),
    /// A reply with a null id (parse error, invalid request).
    NullId,
    /// A reply with this id or a null id (an invalid request whose id may be unreadable).
    IdOrNull(Value),
    /// Nothing (a notification).
    Nothing,
}

/// A raw reply.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// HTTP status, on HTTP.
    pub status: Option<u16>,
    /// The reply text; `None` when nothing came back.
    pub body: Option<String>,
}

/// The capability a provider advertises.
#[derive(Debug, Clone)]
pub enum Discovery {
    /// The `experimental.crp` object.
    Capability(Value),
    /// The provider refused (the error object or body).
    Refused(Value),
    /// This transport offers no discovery.
    Unavailable(String),
}

/// A transport failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// The transport cannot express this (the case is skipped).
    #[error("not possible over this transport: {0}")]
    Unsupported(String),
    /// Sending or receiving failed.
    #[error("{0}")]
    Failed(String),
    /// No reply within the time limit.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
}

/// A connection to a provider.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Which kind.
    fn kind(&self) -> TransportKind;

    /// The capability under `version` (`None`: do not ask for one).
    async fn discover(&self, version: Option<&str>) -> Result<Discovery, TransportError>;

    /// Send one raw message under `version` and wait for what `expect` says.
    async fn exchange(&self, version: Option<&str>, body: &str, expect: Expect) -> Result<Reply, TransportError>;

    /// Replies nobody asked for so far (e.g. an answer to a notification).
    fn unsolicited(&self) -> Vec<String> {
        vec![]
    }

    /// Whether JSON-RPC batches can be sent (MCP 2025-06-18 removed them).
    fn supports_batches(&self) -> bool {
        true
    }

    /// Stop child processes.
    async fn close(&self) {}
}

/// A stable map key for a JSON-RPC id.
pub fn id_key(id: &Value) -> Option<String> {
    match id {
        Value::String(s) => Some(format!("s:{s}")),
        Value::Number(n) => Some(format!("n:{n}")),
        _ => None,
    }
}
