//! 100 MB through the proxy in each direction in constant memory: the request body is a
//! generated stream counted by the upstream without keeping it; the response is a generated
//! stream counted by the caller. Alone in its binary so that no other test moves the RSS.

mod http_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_support::*;
use serde_json::{Value, json};

const TOTAL: u64 = 100 * 1024 * 1024;
const MAX_GROWTH: u64 = 30 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_stream_both_ways_in_constant_memory() {
    let (up, rec) = upstream().await;
    let doc = format!(
        r#"
[[credential]]
key = "bulk/main"
service = "bulk"
value = "bulk-secret-value-0123456789"
upstream = "http://127.0.0.1:{}"
allow_private_hosts = ["127.0.0.1"]
"#,
        up.port()
    );
    let (vault, _dir) = vault_with(&doc).await;
    let server = serve(&vault, true).await;
    let base = server.base_url();
    let r = rpc_ok(&base, "crp/use", json!({ "service": "bulk" })).await;
    let url = r["proxyBaseUrl"].as_str().unwrap().to_string();
    let token = r["sessionToken"].as_str().unwrap().to_string();
    let http = client();

    // Warm up pools and allocators with a small exchange first.
    let warm = http.post(format!("{url}/count")).bearer_auth(&token).body(vec![0u8; 1 << 20]).send().await.unwrap();
    assert_eq!(warm.status(), 200);
    let _ = http.get(format!("{url}/big/1048576")).bearer_auth(&token).send().await.unwrap().bytes().await.unwrap();

    let baseline = rss_bytes();
    assert!(baseline > 0, "cannot read /proc/self/status");
    let peak = Arc::new(AtomicU64::new(baseline));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                peak.fetch_max(rss_bytes(), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // Upload: 1600 chunks of 64 KiB, generated lazily (the chunk is shared, not copied).
    let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
    let n = TOTAL / chunk.len() as u64;
    let body = futures_util::stream::iter(0..n).map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
    let resp = tokio::time::timeout(
        Duration::from_secs(120),
        http.post(format!("{url}/count")).bearer_auth(&token).body(reqwest::Body::wrap_stream(body)).send(),
    )
    .await
    .expect("upload finished in time")
    .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["bytes"], TOTAL);
    assert_eq!(rec.streamed_bytes.load(Ordering::SeqCst), TOTAL);

    // Download: counted chunk by chunk, never kept.
    let resp = http.get(format!("{url}/big/{TOTAL}")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut got = 0u64;
    let mut s = resp.bytes_stream();
    let read = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(c) = s.next().await {
            got += c.unwrap().len() as u64;
        }
    });
    read.await.expect("download finished in time");
    assert_eq!(got, TOTAL);

    stop.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    let growth = peak.load(Ordering::SeqCst).saturating_sub(baseline);
    eprintln!("RSS baseline {} MiB, growth {} KiB", baseline >> 20, growth >> 10);
    assert!(growth < MAX_GROWTH, "RSS grew by {} MiB while streaming 2 x 100 MiB", growth >> 20);

    // The audit saw the byte counts.
    let events = rpc_ok(&base, "x-crp/audit.query", json!({ "action": "credential.used", "limit": 10 })).await;
    let text = events.to_string();
    assert!(text.contains(&TOTAL.to_string()), "{text}");
    server.shutdown().await;
}
