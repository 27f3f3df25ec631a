//! The proxy's grant cache stays exact: every change that can refuse or alter a proxied
//! request, made by *another process* on the same vault (a second `Vault` handle on the same
//! home: its own caches, sharing only the database and the change-stamp file), takes effect on
//! the very next `proxy_grant` of a process that has the grant cached.

use crp_core::provider::Transport;
use crp_core::types::ext;
use crp_core::types::{LeaseAction, LeaseParams, RevokeParams, RevokeReason, UseParams};
use crp_core::{CallContext, Provider};
use crp_provider::agents::{AgentRecord, AgentStatus};
use crp_provider::vault::{OpenOptions, Vault};
use serde_json::json;

const CANARY: &str = "crp-canary-grantcache-0a1b2c3d4e5f";
const ROTATED: &str = "crp-canary-grantcache-rotated-9f8e7d";

fn owner() -> CallContext {
    CallContext::new(Vault::owner_agent(), Transport::InProcess)
}

async fn store(v: &Vault, key: &str, value: &str) {
    let r = v
        .extension(
            &owner(),
            ext::VAULT_STORE,
            json!({"key": key, "value": value, "service": "svc", "scopes": ["read"],
                   "upstream": "http://127.0.0.1:9/base", "max_ttl": 600}),
        )
        .await
        .unwrap();
    assert_eq!(r["stored"], true);
}

fn use_params() -> UseParams {
    serde_json::from_value(json!({"service": "svc", "scopes": ["read"], "ttl": 300})).unwrap()
}

/// Two handles on one vault: `proxy` serves requests (and caches), `other` changes things.
async fn two_processes() -> (Vault, Vault, tempfile::TempDir) {
    let (first, dir) = Vault::open_ephemeral().await.unwrap();
    store(&first, "k", CANARY).await;
    let other = Vault::open(OpenOptions::new(dir.path())).await.unwrap();
    (first, other, dir)
}

/// A lease whose grant `proxy` has already checked once (so it is cached).
async fn cached_lease(proxy: &Vault, ctx: &CallContext) -> (String, String) {
    let u = proxy.use_credential(ctx, use_params()).await.unwrap();
    let token = u.session_token.unwrap();
    for _ in 0..2 {
        assert_eq!(proxy.proxy_grant(&u.lease.id, &token).await.unwrap().secret.expose(), CANARY);
    }
    (u.lease.id, token)
}

#[tokio::test]
async fn release_and_revoke_by_another_process_cut_the_next_request() {
    let (proxy, other, _dir) = two_processes().await;
    let (id, token) = cached_lease(&proxy, &owner()).await;
    other.lease(&owner(), LeaseParams { action: LeaseAction::Release, lease_id: id.clone(), ttl: None }).await.unwrap();
    let e = proxy.proxy_grant(&id, &token).await.unwrap_err();
    assert_eq!((e.status, e.code), (403, "lease_released"));

    let (id, token) = cached_lease(&proxy, &owner()).await;
    other.revoke(&owner(), RevokeParams { lease_id: id.clone(), reason: RevokeReason::Rotation, detail: None }).await.unwrap();
    let e = proxy.proxy_grant(&id, &token).await.unwrap_err();
    assert_eq!((e.status, e.code), (403, "lease_revoked"));

    let (id, token) = cached_lease(&proxy, &owner()).await;
    other.admin_revoke_prefix(&id[..12]).await.unwrap();
    assert_eq!(proxy.proxy_grant(&id, &token).await.unwrap_err().code, "lease_revoked");
    proxy.shutdown().await;
    other.shutdown().await;
}

#[tokio::test]
async fn credential_rotation_and_deletion_by_another_process_are_seen_at_once() {
    let (proxy, other, _dir) = two_processes().await;
    let (id, token) = cached_lease(&proxy, &owner()).await;
    store(&other, "k", ROTATED).await;
    assert_eq!(proxy.proxy_grant(&id, &token).await.unwrap().secret.expose(), ROTATED, "the new version is injected");
    other.admin_delete("k").await.unwrap();
    let e = proxy.proxy_grant(&id, &token).await.unwrap_err();
    assert_eq!(e.status, 403, "{}", e.code);
    proxy.shutdown().await;
    other.shutdown().await;
}

#[tokio::test]
async fn disabling_the_holder_in_another_process_cuts_its_leases() {
    let (proxy, other, _dir) = two_processes().await;
    proxy
        .install_policy("20-bot.cedar", "@id(\"bot-use\")\n@reason(\"bot\")\npermit (principal in Role::\"bots\", action == Action::\"use\", resource);\n")
        .unwrap();
    let bot = AgentRecord {
        id: "bot".into(),
        name: "Bot".into(),
        public_key: String::new(),
        roles: vec!["bots".into()],
        scopes: vec![],
        status: AgentStatus::Active,
    };
    proxy.upsert_agent(&bot).await.unwrap();
    let ctx = CallContext::new("bot", Transport::InProcess);
    let (id, token) = cached_lease(&proxy, &ctx).await;
    other.set_agent_status("bot", AgentStatus::Disabled).await.unwrap();
    let e = proxy.proxy_grant(&id, &token).await.unwrap_err();
    assert_eq!((e.status, e.code), (403, "agent_disabled"));
    other.set_agent_status("bot", AgentStatus::Active).await.unwrap();
    assert_eq!(proxy.proxy_grant(&id, &token).await.unwrap().secret.expose(), CANARY, "re-enabled");
    proxy.shutdown().await;
    other.shutdown().await;
}

#[tokio::test]
async fn a_refused_request_is_never_served_from_the_cache() {
    let (proxy, _other, _dir) = two_processes().await;
    let (id, token) = cached_lease(&proxy, &owner()).await;
    // A wrong token against a cached grant is refused, and does not disturb the right one.
    assert_eq!(proxy.proxy_grant(&id, "wrong").await.unwrap_err().status, 401);
    assert_eq!(proxy.proxy_grant(&id, &token).await.unwrap().secret.expose(), CANARY);
    // Release in the same process: the next request is refused.
    proxy.lease(&owner(), LeaseParams { action: LeaseAction::Release, lease_id: id.clone(), ttl: None }).await.unwrap();
    assert_eq!(proxy.proxy_grant(&id, &token).await.unwrap_err().code, "lease_released");
    proxy.shutdown().await;
}
