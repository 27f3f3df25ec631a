//! Helpers shared by the crp-mcp integration tests: a keyfile vault in a temp dir, a crp-mcp
//! child process spoken to in raw JSON lines, and the crp-provider binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The crp-mcp binary under test.
pub fn mcp_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_crp-mcp"))
}

/// The crp-provider binary (built by cargo for the workspace; built here if missing).
pub fn provider_bin() -> PathBuf {
    let dir = mcp_bin().parent().expect("bin dir").to_path_buf();
    let path = dir.join(format!("crp-provider{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        // `cargo test -p mcp-adapter` alone does not build other packages' binaries. Build it
        // with the environment a shell would have: the CARGO_* variables cargo sets for test
        // processes would otherwise change build fingerprints and rebuild dependencies.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "crp-provider", "--bin", "crp-provider"]).current_dir(env!("CARGO_MANIFEST_DIR"));
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            let keep = ["CARGO_HOME", "CARGO_TARGET_DIR", "CARGO_BUILD_JOBS", "CARGO_TERM_COLOR"];
            if (k.starts_with("CARGO_") && !keep.contains(&k.as_ref())) || k == "OUT_DIR" || k.starts_with("RUST_TEST") {
                cmd.env_remove(k.as_ref());
            }
        }
        let st = cmd.status().expect("run cargo build for crp-provider");
        assert!(st.success(), "building crp-provider failed");
    }
    assert!(path.exists(), "crp-provider not found at {}", path.display());
    path
}

/// A fresh keyfile vault (via the library, so these tests need no CLI).
pub fn init_vault(home: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        crp_provider::vault::Vault::init(home, crp_provider::vault::Unlock::Keyfile(home.join("vault.key")))
            .await
            .expect("init vault");
    });
}

/// Write an extra policy file into the vault's policy directory.
pub fn add_policy(home: &Path, name: &str, src: &str) {
    std::fs::write(home.join("policies").join(name), src).expect("write policy");
}

/// A crp-mcp child speaking newline-delimited JSON-RPC.
pub struct Mcp {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pub stdout_lines: Vec<String>,
    pub stderr_path: PathBuf,
    next_id: i64,
}

impl Mcp {
    /// Spawn `crp-mcp args...` with `CRP_HOME=home` and `env`.
    pub fn spawn(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Mcp {
        let stderr_path = home.join(format!("crp-mcp-{}.stderr", std::process::id() as u64 * 1000 + rand_suffix()));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut cmd = Command::new(mcp_bin());
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home)
            .env("CRP_HOME", home)
            .env("CRP_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn crp-mcp");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let stdin = child.stdin.take();
        Mcp { child, stdin, lines: rx, stdout_lines: Vec::new(), stderr_path, next_id: 1 }
    }

    /// Send one JSON value as a line.
    pub fn send(&mut self, v: &Value) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{v}").expect("write");
        stdin.flush().expect("flush");
    }

    /// Next stdout line as JSON (panics after `timeout`, or if the line is not JSON: stdout
    /// must carry only protocol).
    pub fn recv(&mut self, timeout: Duration) -> Value {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.stdout_lines.push(line.clone());
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line}"))
            }
            Err(RecvTimeoutError::Timeout) => panic!("no answer within {timeout:?}; stderr:\n{}", self.stderr()),
            Err(RecvTimeoutError::Disconnected) => panic!("crp-mcp closed stdout; stderr:\n{}", self.stderr()),
        }
    }

    /// Send a request and wait for the response with the same id (skipping notifications).
    pub fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.recv(left.max(Duration::from_millis(1)));
            if v.get("id") == Some(&json!(id)) {
                return v;
            }
        }
    }

    /// initialize + notifications/initialized with the given client capabilities.
    pub fn initialize(&mut self, capabilities: Value) -> Value {
        let r = self.request(
            "initialize",
            json!({"protocolVersion": "2025-06-18", "capabilities": capabilities,
                   "clientInfo": {"name": "raw-test", "version": "1"}}),
        );
        if r.get("result").is_some() {
            self.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        }
        r
    }

    /// tools/call, returning the `result` object.
    pub fn call_tool(&mut self, name: &str, args: Value) -> Value {
        let r = self.request("tools/call", json!({"name": name, "arguments": args}));
        r.get("result").cloned().unwrap_or_else(|| panic!("tools/call {name} failed: {r}"))
    }

    /// Everything crp-mcp wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Close stdin and wait for a clean exit: (status, stderr, every stdout line).
    pub fn finish(mut self) -> (std::process::ExitStatus, String, String) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                while let Ok(line) = self.lines.try_recv() {
                    self.stdout_lines.push(line);
                }
                return (st, self.stderr(), self.stdout_lines.join("\n"));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("crp-mcp did not exit after stdin closed; stderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mcp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// The `isError` flag of a tool result.
pub fn is_error(result: &Value) -> bool {
    result.get("isError").and_then(Value::as_bool).unwrap_or(false)
}

/// The text content of a tool result.
pub fn text(result: &Value) -> String {
    result["content"].as_array().map(|a| a.iter().filter_map(|c| c["text"].as_str()).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}
