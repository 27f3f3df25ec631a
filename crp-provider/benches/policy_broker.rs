//! Benchmarks of the policy engine and the token broker (divan).
//!
//! `cargo bench -p crp-provider --bench policy_broker`
//!
//! - `authorize`: one [`PolicyEngine::authorize`] call (entities, context, request, Cedar,
//!   graduation) against 10 and 1,000 policies spread over the 11 actions;
//! - `authorize_one_action`: 1,000 policies that all scope the requested action (the
//!   per-action split cannot help);
//! - `load`: parse + re-id + strict validation + per-action split of a policy file;
//! - `broker_cache_hit`: [`Broker::token`] answered from the cache (includes a
//!   current-thread `block_on`).

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crp_core::SecretValue;
use crp_core::types::Classification;
use crp_provider::broker::{Broker, ClientCredentials};
use crp_provider::policy::{Action, AuthzContext, CredentialAttrs, Outcome, PolicyEngine};

fn main() {
    divan::main();
}

/// `n` policies over 50 roles and the 11 actions; exactly one (`p0`) permits the benchmark
/// request. With `one_action`, every policy scopes `use`.
fn policy_src(n: usize, one_action: bool) -> String {
    let mut s = String::new();
    for i in 0..n {
        let action = if one_action {
            Action::Use
        } else {
            Action::ALL[i % Action::ALL.len()]
        };
        let effect = if i % 10 == 9 { "forbid" } else { "permit" };
        s.push_str(&format!(
            "@id(\"p{i}\") @reason(\"generated {i}\")\n{effect} (principal in Role::\"team{}\", action == Action::\"{}\", resource)\n  when {{ resource.service == \"svc{i}\" && resource.classificationLevel <= 2 && context.ttl <= 3600 }};\n",
            i % 50,
            action.as_str()
        ));
    }
    s
}

fn request(engine: &PolicyEngine) -> Outcome {
    let roles = ["team0".to_string(), "readers".to_string()];
    let tags = ["prod".to_string()];
    let scopes = ["read".to_string()];
    let cred = CredentialAttrs {
        key: "svc0/key",
        service: "svc0",
        classification: Classification::Internal,
        tags: &tags,
    };
    let ctx = AuthzContext {
        scopes: &scopes,
        ttl: 600,
        purpose: Some("bench"),
        consumer: None,
        delegation_depth: 0,
        now: time::OffsetDateTime::now_utc(),
    };
    engine
        .authorize(
            black_box("agent-1"),
            black_box(&roles),
            Action::Use,
            black_box(&cred),
            black_box(&ctx),
        )
        .outcome
}

#[divan::bench(args = [10, 1000])]
fn authorize(bencher: divan::Bencher, n: usize) {
    let engine = PolicyEngine::new(&policy_src(n, false)).expect("generated policies load");
    assert_eq!(request(&engine), Outcome::Allow);
    bencher.bench_local(|| request(&engine));
}

#[divan::bench(args = [1000])]
fn authorize_one_action(bencher: divan::Bencher, n: usize) {
    let engine = PolicyEngine::new(&policy_src(n, true)).expect("generated policies load");
    assert_eq!(request(&engine), Outcome::Allow);
    bencher.bench_local(|| request(&engine));
}

#[divan::bench(args = [10, 1000], sample_count = 10, sample_size = 1)]
fn load(bencher: divan::Bencher, n: usize) {
    let src = policy_src(n, false);
    bencher.bench_local(|| PolicyEngine::validate(black_box(&src)).expect("valid"));
}

#[divan::bench]
fn broker_cache_hit(bencher: divan::Bencher) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let hits = Arc::new(AtomicUsize::new(0));
    let url = rt.block_on(async {
        let h = hits.clone();
        let app = axum::Router::new().route(
            "/token",
            axum::routing::post(move || {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    r#"{"access_token":"bench-token","token_type":"Bearer","expires_in":3600}"#
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}/token")
    });
    let broker = Broker::new(reqwest::Client::new());
    let cfg = ClientCredentials {
        token_url: url,
        client_id: "bench".into(),
        client_secret: SecretValue::new("bench-secret"),
        scopes: vec!["read".into()],
        allowed_private_hosts: vec!["127.0.0.1".into()],
    };
    let first = rt.block_on(broker.token("bench/key", &cfg)).expect("mint");
    assert_eq!(first.expose(), "bench-token");
    bencher.bench_local(|| rt.block_on(broker.token(black_box("bench/key"), black_box(&cfg))));
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "every benchmarked call was a cache hit"
    );
}
