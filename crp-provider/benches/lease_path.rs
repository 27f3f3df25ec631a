//! In-process lease path benchmarks (divan): the `Vault` through `crp_core::Provider`, with
//! the real SQLite file (WAL, `synchronous=FULL`) and the durable, group-committed audit.
//!
//! `cargo bench -p crp-provider --bench lease_path`
//!
//! - `use_credential`: one `crp/use` (agent lookup, Cedar decision, audit append, lease insert);
//! - `use_then_release`: `crp/use` followed by `crp/lease` release;
//! - `renew`: `crp/lease` renew of a live lease;
//! - `proxy_grant`: the proxy's per-request check (lease row, token hash, credential unseal).
//!
//! Each iteration is a few fsyncs, so samples are few and single-iteration. The end-to-end
//! figures (HTTP, concurrency, store sizes) come from `scripts/bench.sh`.

use std::sync::OnceLock;

use crp_core::provider::Transport;
use crp_core::types::ext::InjectionRule;
use crp_core::types::{Classification, LeaseAction, LeaseParams, UseParams, UseResult};
use crp_core::{CallContext, Provider, SecretValue};
use crp_provider::agents::{AgentRecord, AgentStatus};
use crp_provider::credentials::{CredentialConfig, CredentialKind, NewCredential};
use crp_provider::vault::{OpenOptions, Unlock, Vault};

fn main() {
    divan::main();
}

const SERVICE: &str = "bench.local/api";

struct Env {
    rt: tokio::runtime::Runtime,
    vault: Vault,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        let home = dir.path().join("home");
        let vault = rt.block_on(async {
            Vault::init(&home, Unlock::Keyfile(home.join("vault.key"))).await.expect("init");
            let v = Vault::open(OpenOptions { home: home.clone(), unlock: None, database_url: None }).await.expect("open");
            v.install_policy(
                "50-bench.cedar",
                "@id(\"bench-all\")\n@reason(\"benchmark agent\")\npermit (principal == Agent::\"bench\", action, resource);\n",
            )
            .expect("policy");
            v.admin_store(&NewCredential {
                key: "bench/api".into(),
                service: SERVICE.into(),
                kind: CredentialKind::ApiKey,
                classification: Classification::Internal,
                tags: vec![],
                scopes: vec!["read".into()],
                max_ttl: None,
                renewable: true,
                metadata: Default::default(),
                expires_at: None,
                value: SecretValue::new("bench-secret-value"),
                config: CredentialConfig {
                    upstream: Some("http://127.0.0.1:9".into()),
                    injection: InjectionRule::Header { name: "Authorization".into(), prefix: "Bearer".into() },
                    allowed_private_hosts: vec!["127.0.0.1".into()],
                    broker: None,
                },
            })
            .await
            .expect("store");
            v.upsert_agent(&AgentRecord {
                id: "bench".into(),
                name: "bench".into(),
                public_key: String::new(),
                roles: vec![],
                scopes: vec!["*".into()],
                status: AgentStatus::Active,
            })
            .await
            .expect("agent");
            v
        });
        Env { rt, vault, _dir: dir }
    })
}

fn ctx() -> CallContext {
    CallContext::new("bench", Transport::InProcess)
}

fn use_params() -> UseParams {
    UseParams { service: SERVICE.into(), scopes: vec![], ttl: Some(600), delegation: None, identity_scope: None, context: None }
}

async fn use_once(v: &Vault) -> UseResult {
    v.use_credential(&ctx(), use_params()).await.expect("crp/use")
}

#[divan::bench(sample_count = 40, sample_size = 1)]
fn use_credential(b: divan::Bencher) {
    let e = env();
    b.bench(|| e.rt.block_on(use_once(&e.vault)));
}

#[divan::bench(sample_count = 40, sample_size = 1)]
fn use_then_release(b: divan::Bencher) {
    let e = env();
    b.bench(|| {
        e.rt.block_on(async {
            let r = use_once(&e.vault).await;
            e.vault
                .lease(&ctx(), LeaseParams { action: LeaseAction::Release, lease_id: r.lease.id, ttl: None })
                .await
                .expect("release")
        })
    });
}

#[divan::bench(sample_count = 40, sample_size = 1)]
fn renew(b: divan::Bencher) {
    let e = env();
    let r = e.rt.block_on(use_once(&e.vault));
    b.bench(|| {
        e.rt.block_on(e.vault.lease(&ctx(), LeaseParams { action: LeaseAction::Renew, lease_id: r.lease.id.clone(), ttl: Some(900) }))
            .expect("renew")
    });
}

#[divan::bench(sample_count = 200, sample_size = 1)]
fn proxy_grant(b: divan::Bencher) {
    let e = env();
    let r = e.rt.block_on(use_once(&e.vault));
    let token = r.session_token.clone().expect("session token");
    b.bench(|| e.rt.block_on(e.vault.proxy_grant(&r.lease.id, &token)).map(|g| g.lease_id).map_err(|d| d.status));
}
