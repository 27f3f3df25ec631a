//! A child process speaking newline-delimited JSON-RPC on stdin/stdout, with replies routed
//! to their waiters by id. Shared by the stdio and MCP transports.
//!
//! The child's stderr is kept (last 50 lines) for "cannot run" diagnostics; it is never
//! printed on success. Requests the child sends to us (MCP servers may) are answered with
//! -32601, except `ping`, which gets an empty result.

use std::collections::{HashMap, VecDeque};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::oneshot;

use super::{Expect, TransportError, id_key};

type Waiter = Arc<Mutex<Option<oneshot::Sender<String>>>>;

#[derive(Default)]
struct Routes {
    by_id: HashMap<String, Waiter>,
    null_id: VecDeque<Waiter>,
    unsolicited: Vec<String>,
    closed: bool,
}

/// A running child and its reply router.
pub struct LineConn {
    stdin: Arc<tokio::sync::Mutex<Option<ChildStdin>>>,
    child: Mutex<Option<Child>>,
    routes: Arc<Mutex<Routes>>,
    stderr: Arc<Mutex<VecDeque<String>>>,
    timeout: Duration,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl LineConn {
    /// Start `cmd` with `sh -c`.
    pub fn spawn(cmd: &str, timeout: Duration) -> Result<LineConn, TransportError> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| TransportError::Failed(format!("cannot start `{cmd}`: {e}")))?;
        let stdout = child.stdout.take().ok_or_else(|| TransportError::Failed("no stdout".into()))?;
        let stderr = child.stderr.take().ok_or_else(|| TransportError::Failed("no stderr".into()))?;
        let stdin = Arc::new(tokio::sync::Mutex::new(child.stdin.take()));
        let routes = Arc::new(Mutex::new(Routes::default()));
        let tail = Arc::new(Mutex::new(VecDeque::new()));

        let r = routes.clone();
        let w = stdin.clone();
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.trim().is_empty() {
                    continue;
                }
                if let Some(answer) = route(&r, line)
                    && let Some(stdin) = w.lock().await.as_mut()
                {
                    let _ = stdin.write_all(format!("{answer}\n").as_bytes()).await;
                    let _ = stdin.flush().await;
                }
            }
            if let Ok(mut g) = r.lock() {
                g.closed = true;
                // Dropping the senders wakes every waiter with an error.
                let g = &mut *g;
                let waiters: Vec<Waiter> = g.by_id.drain().map(|(_, w)| w).chain(g.null_id.drain(..)).collect();
                for w in waiters {
                    if let Ok(mut s) = w.lock() {
                        s.take();
                    }
                }
            }
        });
        let t = tail.clone();
        let err_task = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(mut g) = t.lock() {
                    if g.len() >= 50 {
                        g.pop_front();
                    }
                    g.push_back(line);
                }
            }
        });
        Ok(LineConn {
            stdin,
            child: Mutex::new(Some(child)),
            routes,
            stderr: tail,
            timeout,
            tasks: vec![reader, err_task],
        })
    }

    /// Write one line and wait for what `expect` says.
    pub async fn exchange(&self, body: &str, expect: Expect) -> Result<Option<String>, TransportError> {
        let (tx, rx) = oneshot::channel();
        let waiter: Waiter = Arc::new(Mutex::new(Some(tx)));
        let mut keys = vec![];
        {
            let mut g = self.routes.lock().map_err(|_| TransportError::Failed("router poisoned".into()))?;
            if g.closed {
                return Err(TransportError::Failed(format!("the provider process has exited{}", self.stderr_note())));
            }
            match &expect {
                Expect::Ids(ids) => {
                    for id in ids {
                        if let Some(k) = id_key(id) {
                            g.by_id.insert(k.clone(), waiter.clone());
                            keys.push(k);
                        }
                    }
                }
                Expect::NullId => g.null_id.push_back(waiter.clone()),
                Expect::IdOrNull(id) => {
                    if let Some(k) = id_key(id) {
                        g.by_id.insert(k.clone(), waiter.clone());
                        keys.push(k);
                    }
                    g.null_id.push_back(waiter.clone());
                }
                Expect::Nothing => {}
            }
        }
        self.write_line(body).await?;
        if matches!(expect, Expect::Nothing) {
            return Ok(None);
        }
        let out = tokio::time::timeout(self.timeout, rx).await;
        if let Ok(mut g) = self.routes.lock() {
            for k in &keys {
                g.by_id.remove(k);
            }
            g.null_id.retain(|w| !Arc::ptr_eq(w, &waiter));
        }
        match out {
            Ok(Ok(line)) => Ok(Some(line)),
            Ok(Err(_)) => Err(TransportError::Failed(format!("the provider process has exited{}", self.stderr_note()))),
            Err(_) => Err(TransportError::Timeout(self.timeout)),
        }
    }

    async fn write_line(&self, body: &str) -> Result<(), TransportError> {
        let mut guard = self.stdin.lock().await;
        let stdin = guard.as_mut().ok_or_else(|| TransportError::Failed("stdin closed".into()))?;
        let mut line = body.replace('\n', " ");
        line.push('\n');
        stdin
            .write_all(line.as_bytes())
            .await
            .map_err(|e| TransportError::Failed(format!("cannot write to the provider: {e}{}", self.stderr_note())))?;
        stdin.flush().await.map_err(|e| TransportError::Failed(format!("cannot write to the provider: {e}")))
    }

    /// Replies nobody waited for.
    pub fn unsolicited(&self) -> Vec<String> {
        self.routes.lock().map(|g| g.unsolicited.clone()).unwrap_or_default()
    }

    /// The child's last stderr lines.
    pub fn stderr_tail(&self) -> String {
        self.stderr.lock().map(|g| g.iter().cloned().collect::<Vec<_>>().join("\n")).unwrap_or_default()
    }

    fn stderr_note(&self) -> String {
        let t = self.stderr_tail();
        if t.is_empty() { String::new() } else { format!("; its stderr ends with:\n{t}") }
    }

    /// Close stdin and stop the child.
    pub async fn close(&self) {
        self.stdin.lock().await.take();
        let child = self.child.lock().ok().and_then(|mut c| c.take());
        if let Some(mut c) = child
            && tokio::time::timeout(Duration::from_secs(2), c.wait()).await.is_err()
        {
            let _ = c.kill().await;
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Deliver a line to its waiter; returns an answer to write back if the child asked us
/// something.
fn route(routes: &Mutex<Routes>, line: String) -> Option<String> {
    let parsed: Option<Value> = serde_json::from_str(&line).ok();
    let Ok(mut g) = routes.lock() else { return None };
    match &parsed {
        Some(Value::Array(items)) => {
            let w = items
                .iter()
                .filter_map(|i| i.get("id").and_then(id_key))
                .find_map(|k| g.by_id.get(&k).cloned());
            match w {
                Some(w) => deliver(&w, line),
                None => g.unsolicited.push(line),
            }
            None
        }
        Some(Value::Object(o)) => {
            if let Some(method) = o.get("method").and_then(Value::as_str) {
                // A request or notification from the child.
                let id = o.get("id")?;
                let answer = if method == "ping" {
                    serde_json::json!({"jsonrpc": "2.0", "id": id, "result": {}})
                } else {
                    serde_json::json!({"jsonrpc": "2.0", "id": id,
                        "error": {"code": -32601, "message": "the conformance runner implements no client methods"}})
                };
                return Some(answer.to_string());
            }
            let key = o.get("id").and_then(id_key);
            let w = match key {
                Some(k) => g.by_id.get(&k).cloned(),
                None => g.null_id.pop_front(),
            };
            match w {
                Some(w) => deliver(&w, line),
                None => g.unsolicited.push(line),
            }
            None
        }
        _ => {
            // Not JSON: hand it to whoever waits for a null-id reply, else keep it.
            match g.null_id.pop_front() {
                Some(w) => deliver(&w, line),
                None => g.unsolicited.push(line),
            }
            None
        }
    }
}

fn deliver(w: &Waiter, line: String) {
    if let Ok(mut s) = w.lock()
        && let Some(tx) = s.take()
    {
        let _ = tx.send(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn replies_are_matched_by_id_out_of_order() {
        // A child that reads two requests and answers them in reverse order, plus a stray
        // answer nobody asked for.
        let script = r#"read a; read b; printf '%s\n' '{"jsonrpc":"2.0","id":"two","result":2}' '{"jsonrpc":"2.0","id":99,"result":0}' '{"jsonrpc":"2.0","id":1,"result":1}'; cat >/dev/null"#;
        let conn = LineConn::spawn(script, Duration::from_secs(5)).expect("spawn");
        let one = conn.exchange(r#"{"jsonrpc":"2.0","id":1,"method":"a"}"#, Expect::Ids(vec![json!(1)]));
        let two = conn.exchange(r#"{"jsonrpc":"2.0","id":"two","method":"b"}"#, Expect::Ids(vec![json!("two")]));
        let (one, two) = tokio::join!(one, two);
        assert!(one.expect("one").expect("reply").contains("\"result\":1"));
        assert!(two.expect("two").expect("reply").contains("\"result\":2"));
        assert_eq!(conn.unsolicited().len(), 1);
        conn.close().await;
    }

    #[tokio::test]
    async fn an_exited_child_is_an_error_not_a_hang() {
        let conn = LineConn::spawn("echo oops >&2; exit 3", Duration::from_secs(5)).expect("spawn");
        let r = conn.exchange(r#"{"jsonrpc":"2.0","id":1,"method":"a"}"#, Expect::Ids(vec![json!(1)])).await;
        assert!(matches!(r, Err(TransportError::Failed(_))), "{r:?}");
    }
}
