//! `POST /crp` as a JSON-RPC endpoint (dev mode caller), discovery, health, the body limit,
//! malformed input, random bytes, and the stdio transport.

mod http_support;

use std::sync::Arc;

use crp_provider::http::{ServeConfig, serve_stdio_with, start};
use http_support::*;
use proptest::prelude::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const DOC: &str = r#"
[[credential]]
key = "svc/main"
service = "svc"
value = "rpc-test-secret-value"
upstream = "http://127.0.0.1:9/"
allow_private_hosts = ["127.0.0.1"]
"#;

async fn post_raw(base: &str, body: Vec<u8>, version: Option<&str>) -> (u16, Option<String>, String) {
    let mut rb = client().post(format!("{base}/crp")).header("content-type", "application/json").body(body);
    if let Some(v) = version {
        rb = rb.header("CRP-Version", v);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let ver = r.headers().get("crp-version").map(|v| v.to_str().unwrap().to_string());
    (status, ver, r.text().await.unwrap())
}

#[tokio::test]
async fn jsonrpc_single_batch_notifications_versions_and_limits() {
    let (vault, _dir) = vault_with(DOC).await;
    let server = serve(&vault, true).await;
    let base = server.base_url();

    // Single.
    let (s, ver, text) = post_raw(&base, br#"{"jsonrpc":"2.0","id":"a","method":"crp/list","params":{}}"#.to_vec(), None).await;
    assert_eq!((s, ver.as_deref()), (200, Some("0.2")));
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["id"], "a");
    assert!(v["result"]["services"].to_string().contains("svc"), "{v}");

    // Batch with a notification: one answer per request with an id.
    let batch = json!([
        { "jsonrpc": "2.0", "id": 1, "method": "crp/list", "params": {} },
        { "jsonrpc": "2.0", "method": "crp/list", "params": {} },
        { "jsonrpc": "2.0", "id": 3, "method": "no/such", "params": {} }
    ]);
    let (s, _, text) = post_raw(&base, serde_json::to_vec(&batch).unwrap(), None).await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&text).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2, "{v}");
    assert_eq!(arr[1]["error"]["code"], -32601);

    // Notifications only: 204.
    let (s, _, text) = post_raw(&base, br#"{"jsonrpc":"2.0","method":"crp/list"}"#.to_vec(), None).await;
    assert_eq!((s, text.as_str()), (204, ""));

    // Versions: lower minor wins; an unsupported major is -33001 with data.supported.
    let (s, ver, _) = post_raw(&base, br#"{"jsonrpc":"2.0","id":1,"method":"crp/list"}"#.to_vec(), Some("0.1")).await;
    assert_eq!((s, ver.as_deref()), (200, Some("0.1")));
    let (s, ver, _) = post_raw(&base, br#"{"jsonrpc":"2.0","id":1,"method":"crp/list"}"#.to_vec(), Some("0.9")).await;
    assert_eq!((s, ver.as_deref()), (200, Some("0.2")));
    let (s, _, text) = post_raw(&base, br#"{"jsonrpc":"2.0","id":9,"method":"crp/list"}"#.to_vec(), Some("2.0")).await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], -33001, "{v}");
    assert_eq!(v["error"]["data"]["supported"], json!(["0.2", "0.1"]));
    assert_eq!(v["id"], 9);
    // crp/resolve only under 0.1.
    let (_, _, text) = post_raw(&base, br#"{"jsonrpc":"2.0","id":1,"method":"crp/resolve","params":{"service":"svc"}}"#.to_vec(), None).await;
    assert!(text.contains("-33011"), "{text}");

    // Malformed JSON.
    let (s, _, text) = post_raw(&base, b"{not json".to_vec(), None).await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], -32700, "{v}");

    // Body limit: 413 with a JSON-RPC -32600, both with a declared length and a chunked body.
    let big = vec![b' '; 1024 * 1024 + 1];
    let (s, _, text) = post_raw(&base, big.clone(), None).await;
    assert_eq!(s, 413);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], -32600, "{v}");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    let r = client()
        .post(format!("{base}/crp"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // Discovery, health, unknown routes.
    let cap: Value = client().get(format!("{base}/.well-known/crp")).send().await.unwrap().json().await.unwrap();
    assert_eq!(cap["version"], "0.2");
    assert!(cap["features"].as_array().unwrap().contains(&json!("use")), "{cap}");
    assert!(!cap["features"].as_array().unwrap().contains(&json!("resolve")), "{cap}");
    assert_eq!(cap["versions"], json!(["0.2", "0.1"]));
    let r = client().get(format!("{base}/.well-known/crp")).header("CRP-Version", "7.0").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = client().get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = client().get(format!("{base}/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    server.shutdown().await;
}

/// Whatever the bytes, the route answers (no panic, no dropped connection) with JSON.
#[test]
fn random_bodies_never_break_the_route() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (vault, _dir) = rt.block_on(vault_with(DOC));
    let server = rt.block_on(serve(&vault, true));
    let base = server.base_url();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 256, ..ProptestConfig::default() });
    let strategy = (proptest::collection::vec(any::<u8>(), 0..512), 0u8..3);
    runner
        .run(&strategy, |(bytes, shape)| {
            let body = match shape {
                0 => bytes,
                // Random text inside a plausible envelope reaches deeper code paths.
                1 => {
                    let s = String::from_utf8_lossy(&bytes).into_owned();
                    serde_json::to_vec(&json!({ "jsonrpc": "2.0", "id": 1, "method": s.clone(), "params": { "service": s } })).unwrap()
                }
                _ => {
                    let s = String::from_utf8_lossy(&bytes).into_owned();
                    serde_json::to_vec(&json!([{ "jsonrpc": "2.0", "id": s.clone(), "method": "crp/use", "params": { "service": "svc", "ttl": bytes.len(), "x": s } }, s])).unwrap()
                }
            };
            let (status, _, text) = rt.block_on(post_raw(&base, body, None));
            prop_assert!(status == 200 || status == 204, "status {}", status);
            if status == 200 {
                prop_assert!(serde_json::from_str::<Value>(&text).is_ok(), "not JSON: {}", text);
                prop_assert!(!text.contains("rpc-test-secret-value"));
            }
            Ok(())
        })
        .unwrap();
    rt.block_on(server.shutdown());
}

#[tokio::test]
async fn stdio_speaks_ndjson_as_the_owner() {
    let (vault, _dir) = vault_with(DOC).await;
    let server = start(vault.clone(), ServeConfig { listen: "127.0.0.1:0".parse().unwrap(), ..Default::default() }).await.unwrap();
    let (client_end, server_end) = tokio::io::duplex(64 * 1024);
    let (server_read, server_write) = tokio::io::split(server_end);
    let provider: Arc<dyn crp_core::Provider> = Arc::new(vault.clone());
    let task = tokio::spawn(async move { serve_stdio_with(provider, "owner", server_read, server_write).await });
    let (client_read, mut client_write) = tokio::io::split(client_end);
    let mut lines = BufReader::new(client_read).lines();
    client_write
        .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"x-crp/whoami\"}\n\n{\"jsonrpc\":\"2.0\",\"method\":\"crp/list\"}\nnot json\n{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"crp/use\",\"params\":{\"service\":\"svc\"}}\n")
        .await
        .unwrap();
    let who: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(who["result"]["agent"], "owner", "{who}");
    let bad: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(bad["error"]["code"], -32700);
    let used: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    let url = used["result"]["proxyBaseUrl"].as_str().unwrap_or_else(|| panic!("{used}"));
    assert!(url.starts_with(&server.base_url()), "the proxy URL points at the listening server: {url}");
    // End of input ends the loop.
    client_write.shutdown().await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), task).await.expect("stdio loop ends at EOF").unwrap().unwrap();
    server.shutdown().await;
}

/// The `/metrics` page.
async fn metrics(base: &str) -> String {
    client().get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap()
}

/// One series' value on a `/metrics` page.
fn metric(text: &str, name: &str) -> u64 {
    let line = text.lines().find(|l| l.split_once(' ').is_some_and(|(n, _)| n == name)).unwrap_or_else(|| panic!("no {name} in {text}"));
    line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("unreadable {line}"))
}

/// The members of a batch run concurrently (JSON-RPC 2.0 §6 allows it), so a batch of
/// `crp/use` or of releases shares durable commits instead of taking one each; the answers keep
/// the batch's order, and every lease and audit entry is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_uses_and_releases_shares_commits() {
    const N: usize = 32;
    let (vault, _dir) = vault_with(DOC).await;
    let server = serve(&vault, true).await;
    let base = server.base_url();
    let page = metrics(&base).await;
    let (commits0, entries0) = (metric(&page, "crp_audit_commits_total"), metric(&page, "crp_audit_entries_total"));

    let uses: Vec<Value> =
        (0..N).map(|i| json!({"jsonrpc": "2.0", "id": i, "method": "crp/use", "params": {"service": "svc", "ttl": 300}})).collect();
    let (s, _, text) = post_raw(&base, serde_json::to_vec(&uses).unwrap(), None).await;
    assert_eq!(s, 200, "{text}");
    let answers: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(answers.len(), N, "{text}");
    let mut ids = Vec::new();
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a["id"], i, "answers keep the batch's order: {text}");
        ids.push(a["result"]["lease"]["id"].as_str().unwrap_or_else(|| panic!("{a}")).to_string());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), N, "every use got its own lease");
    let page = metrics(&base).await;
    let (commits1, entries1) = (metric(&page, "crp_audit_commits_total"), metric(&page, "crp_audit_entries_total"));
    assert!(entries1 - entries0 >= N as u64, "{N} uses wrote {} audit entries", entries1 - entries0);
    // One member after the other takes exactly N commits (each waits for its own). Run
    // together they share them, but how many they take depends on when the writer's thread
    // wakes: 2 to 7 for the uses and 3 to 15 for the releases in debug builds on 2 vCPUs, 9
    // on a busy CI machine. So the bound is "fewer than one each"; that the members run
    // concurrently at all is pinned down without timing in crp-core's
    // `a_batch_runs_its_members_concurrently_and_answers_in_its_order`.
    assert!(commits1 - commits0 < N as u64, "a batch of {N} uses took {} commits", commits1 - commits0);

    let releases: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| json!({"jsonrpc": "2.0", "id": i, "method": "crp/lease", "params": {"leaseId": id, "action": "release"}}))
        .collect();
    let (s, _, text) = post_raw(&base, serde_json::to_vec(&releases).unwrap(), None).await;
    assert_eq!(s, 200, "{text}");
    let answers: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert!(answers.iter().enumerate().all(|(i, a)| a["id"] == i && a.get("error").is_none()), "{text}");
    let page = metrics(&base).await;
    let commits2 = metric(&page, "crp_audit_commits_total");
    assert!(commits2 - commits1 < N as u64, "a batch of {N} releases took {} commits", commits2 - commits1);
    assert_eq!(metric(&page, "crp_leases_active"), 0);
}
