//! The `Vault` facade end to end, in-process: what the HTTP and MCP layers rely on.

use crp_core::provider::Transport;
use crp_core::types::ext::{self, InjectionRule};
use crp_core::types::{LeaseAction, LeaseParams, LeaseResult, ListParams, RevokeParams, RevokeReason, UseParams};
use crp_core::{CallContext, Dispatcher, Provider, SecretValue, Version};
use crp_provider::vault::{ProxyAuditRecord, Vault};
use serde_json::json;

const CANARY: &str = "crp-canary-vaultapi-5f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn owner() -> CallContext {
    CallContext::new(Vault::owner_agent(), Transport::InProcess)
}

async fn store(v: &Vault, key: &str, service: &str, scopes: &[&str]) {
    let r = v
        .extension(
            &owner(),
            ext::VAULT_STORE,
            json!({"key": key, "value": CANARY, "service": service, "scopes": scopes,
                   "upstream": "http://127.0.0.1:9/base", "max_ttl": 600}),
        )
        .await
        .unwrap();
    assert_eq!(r["stored"], true);
}

fn use_params(service: &str) -> UseParams {
    serde_json::from_value(json!({"service": service, "scopes": ["read"], "ttl": 300})).unwrap()
}

#[tokio::test]
async fn use_proxy_grant_renew_delegate_revoke() {
    let (v, _dir) = Vault::open_ephemeral().await.unwrap();
    v.set_proxy_base_url("http://127.0.0.1:7777/");
    store(&v, "gh/main", "github.com/api", &["read", "write"]).await;

    let u = v.use_credential(&owner(), use_params("github.com/api")).await.unwrap();
    assert!(u.lease.id.starts_with("lease_") && u.lease.id.len() == 6 + 12 + 32);
    assert_eq!(u.proxy_base_url, format!("http://127.0.0.1:7777/api/v1/proxy/t/{}", u.lease.id));
    assert_eq!(u.lease.ttl, 300);
    assert_eq!(u.granted_scopes, vec!["read"]);
    let token = u.session_token.clone().unwrap();
    assert!(!serde_json::to_string(&u).unwrap().contains(CANARY));

    let g = v.proxy_grant(&u.lease.id, &token).await.unwrap();
    assert_eq!(g.secret.expose(), CANARY);
    assert_eq!(g.upstream, "http://127.0.0.1:9/base");
    assert_eq!(g.injection, InjectionRule::Header { name: "Authorization".into(), prefix: "Bearer".into() });
    assert!(!format!("{g:?}").contains(CANARY));
    assert_eq!(v.proxy_grant(&u.lease.id, "wrong").await.unwrap_err().status, 401);
    assert_eq!(v.proxy_grant("lease_nope", &token).await.unwrap_err().status, 404);
    v.audit_proxy(ProxyAuditRecord {
        lease_id: u.lease.id.clone(),
        agent: "owner".into(),
        key: "gh/main".into(),
        method: "GET".into(),
        path: "/repos".into(),
        status: 200,
        bytes_in: 0,
        bytes_out: 10,
        duration_us: 5,
    })
    .await
    .unwrap();

    // Renew keeps the URL.
    let r = v
        .lease(&owner(), LeaseParams { action: LeaseAction::Renew, lease_id: u.lease.id.clone(), ttl: Some(100) })
        .await
        .unwrap();
    match r {
        LeaseResult::Renewed(r) => assert_eq!(r.proxy_base_url.as_deref(), Some(u.proxy_base_url.as_str())),
        other => panic!("{other:?}"),
    }

    // Delegate two levels; a child never out-scopes its parent.
    let mut child = use_params("github.com/api");
    child.delegation = Some(serde_json::from_value(json!({"parentLeaseId": u.lease.id})).unwrap());
    let c1 = v.use_credential(&owner(), child.clone()).await.unwrap();
    assert_eq!(c1.lease.delegation_depth, Some(1));
    let mut wider = child.clone();
    wider.scopes = vec!["write".into()];
    assert_eq!(v.use_credential(&owner(), wider).await.unwrap_err().code, -33009);
    let mut grand = use_params("github.com/api");
    grand.delegation = Some(serde_json::from_value(json!({"parentLeaseId": c1.lease.id})).unwrap());
    let c2 = v.use_credential(&owner(), grand).await.unwrap();
    assert_eq!(c2.lease.delegation_depth, Some(2));
    // Someone else cannot delegate from the owner's lease.
    let other = CallContext::new("mallory", Transport::Http);
    assert_eq!(v.use_credential(&other, child).await.unwrap_err().code, -33004);

    // Revoke the root: the whole subtree, reported, and the proxy refuses all of them.
    let rv = v
        .revoke(&owner(), RevokeParams { lease_id: u.lease.id.clone(), reason: RevokeReason::ManualRevocation, detail: None })
        .await
        .unwrap();
    let mut want = vec![c1.lease.id.clone(), c2.lease.id.clone()];
    want.sort();
    want.insert(0, u.lease.id.clone());
    assert_eq!(rv.affected_leases, want);
    assert_eq!(v.proxy_grant(&u.lease.id, &token).await.unwrap_err().status, 403);
    assert_eq!(v.proxy_grant(&c2.lease.id, c2.session_token.as_deref().unwrap()).await.unwrap_err().status, 403);

    let report = v.audit_verify().await.unwrap();
    assert!(report.ok, "{report:?}");
    v.shutdown().await;
}

#[tokio::test]
async fn list_unknown_scope_and_default_deny() {
    let (v, _dir) = Vault::open_ephemeral().await.unwrap();
    store(&v, "a/one", "svc.a", &["read"]).await;
    store(&v, "b/two", "svc.b", &[]).await;
    let l = v.list(&owner(), ListParams { limit: Some(1), ..Default::default() }).await.unwrap();
    assert_eq!(l.services.len(), 1);
    assert_eq!(l.services[0].service, "svc.a");
    let l2 = v.list(&owner(), ListParams { limit: Some(1), cursor: l.cursor.clone(), ..Default::default() }).await.unwrap();
    assert_eq!(l2.services[0].service, "svc.b");
    assert!(l2.cursor.is_none());

    let mut p = use_params("svc.a");
    p.scopes = vec!["admin".into()];
    assert_eq!(v.use_credential(&owner(), p).await.unwrap_err().code, -33009);
    // Nobody but the owner is permitted anything by the starter policy.
    let e = v.use_credential(&CallContext::new("stranger", Transport::Http), use_params("svc.a")).await.unwrap_err();
    assert_eq!(e.code, -33003);
    // Nobody may export, not even the owner.
    let e = v.extension(&owner(), ext::VAULT_RETRIEVE, json!({"key": "a/one", "purpose": "x"})).await.unwrap_err();
    assert_eq!(e.code, -33003);
    assert!(!serde_json::to_string(&e).unwrap().contains(CANARY));
    assert_eq!(v.use_credential(&owner(), use_params("nope")).await.unwrap_err().code, -33002);

    let listed = v.extension(&owner(), ext::VAULT_LIST, json!({})).await.unwrap();
    assert_eq!(listed["credentials"].as_array().unwrap().len(), 2);
    assert!(!listed.to_string().contains(CANARY));
    let audit = v.extension(&owner(), ext::AUDIT_QUERY, json!({"limit": 100})).await.unwrap();
    assert!(audit.to_string().contains("credential.denied"));
    assert!(!audit.to_string().contains(CANARY));
    let who = v.extension(&owner(), ext::WHOAMI, json!({})).await.unwrap();
    assert_eq!(who["agent"], "owner");
}

#[tokio::test]
async fn dispatcher_resolve_only_under_v0_1_and_capability() {
    let (v, _dir) = Vault::open_ephemeral().await.unwrap();
    let cap = v.capability(Version::V0_2);
    assert!(cap.features.contains(&crp_core::types::Feature::Use));
    assert!(!cap.features.contains(&crp_core::types::Feature::Resolve));
    let d = Dispatcher::new(std::sync::Arc::new(v.clone()));
    store(&v, "a/one", "svc.a", &[]).await;
    let ctx = owner().with_version(Version::V0_1);
    let out = d
        .handle_bytes(&ctx, br#"{"jsonrpc":"2.0","id":1,"method":"crp/resolve","params":{"service":"svc.a"}}"#)
        .await
        .unwrap();
    // The starter policy permits no export.
    assert!(out.contains("-33003"), "{out}");
    assert!(!out.contains(CANARY));
    let _ = SecretValue::new("x");
}

#[tokio::test]
async fn conformance_fixtures_map_to_outcomes() {
    use crp_core::fixtures::{FixtureRole, Fixtures};
    let (v, _dir) = Vault::open_ephemeral().await.unwrap();
    let f = Fixtures::conformance("127.0.0.1:7799");
    v.load_fixtures(&f).await.unwrap();
    // Loading twice is idempotent.
    v.load_fixtures(&f).await.unwrap();
    for agent in [crp_core::fixtures::CONFORMANCE_AGENT, "dev", "owner"] {
        let ctx = CallContext::new(agent, Transport::Http);
        let svc = |r: FixtureRole| f.by_role(r).unwrap().service.clone();
        let u = v.use_credential(&ctx, serde_json::from_value(json!({"service": svc(FixtureRole::Primary)})).unwrap()).await.unwrap();
        let code = |r| {
            let v = v.clone();
            let ctx = ctx.clone();
            async move { v.use_credential(&ctx, serde_json::from_value(json!({"service": svc(r)})).unwrap()).await.unwrap_err().code }
        };
        assert_eq!(code(FixtureRole::RequireApproval).await, -33020);
        assert_eq!(code(FixtureRole::Quarantine).await, -33021);
        assert_eq!(code(FixtureRole::Denied).await, -33003);
        // Delegation: depth 1 and 2 allowed, 3 refused with -33013.
        let mut parent = u.lease.id.clone();
        for depth in 1..=3u32 {
            let p = serde_json::from_value(json!({"service": svc(FixtureRole::Primary), "delegation": {"parentLeaseId": parent}})).unwrap();
            match v.use_credential(&ctx, p).await {
                Ok(c) if depth <= 2 => parent = c.lease.id,
                Err(e) if depth == 3 => assert_eq!(e.code, -33013),
                other => panic!("depth {depth}: {other:?}"),
            }
        }
        let a = v.extension(&ctx, ext::AUDIT_QUERY, json!({"limit": 5})).await.unwrap();
        assert!(!a["events"].as_array().unwrap().is_empty());
    }
}

#[tokio::test]
async fn store_overwrite_keeps_versions_delete_revokes_and_expiry() {
    let (v, _dir) = Vault::open_ephemeral().await.unwrap();
    store(&v, "k/one", "svc.k", &[]).await;
    let r = v.extension(&owner(), ext::VAULT_STORE, json!({"key": "k/one", "value": "second-value-0123456789", "service": "svc.k", "ttl": 3600})).await.unwrap();
    assert_eq!(r["version"], 2);
    assert!(r["expires_at"].is_string());
    assert_eq!(v.credential_versions("k/one").await.unwrap(), 2);
    let u = v.use_credential(&owner(), serde_json::from_value(json!({"service": "svc.k"})).unwrap()).await.unwrap();
    assert_eq!(v.proxy_grant(&u.lease.id, u.session_token.as_deref().unwrap()).await.unwrap().secret.expose(), "second-value-0123456789");
    let d = v.extension(&owner(), ext::VAULT_DELETE, json!({"key": "k/one"})).await.unwrap();
    assert_eq!(d["deleted"], true);
    assert_eq!(d["revoked_leases"], json!([u.lease.id]));
    assert_eq!(v.proxy_grant(&u.lease.id, u.session_token.as_deref().unwrap()).await.unwrap_err().status, 403);
    let d = v.extension(&owner(), ext::VAULT_DELETE, json!({"key": "k/one"})).await.unwrap();
    assert_eq!(d["deleted"], false);
    // Bad params never echo the value.
    let e = v.extension(&owner(), ext::VAULT_STORE, json!({"key": "bad key!", "value": CANARY})).await.unwrap_err();
    assert_eq!(e.code, -32602);
    assert!(!serde_json::to_string(&e).unwrap().contains(CANARY));
    let e = v.extension(&owner(), ext::VAULT_STORE, json!({"key": "k", "value": CANARY, "bogus": 1})).await.unwrap_err();
    assert!(!serde_json::to_string(&e).unwrap().contains(CANARY));
}

#[tokio::test]
async fn a_bad_policy_is_refused_with_its_position_and_the_previous_set_stays() {
    let (v, _dir) = Vault::open_ephemeral().await.unwrap();
    store(&v, "a/one", "svc.a", &[]).await;
    let doc = crp_provider::apply::ApplyDoc::parse(
        "[[policy]]\nname = \"broken\"\nsource = '''\n@id(\"x\")\npermit (principal, action, resource) when { resource.nope };\n'''\n",
        None,
    )
    .unwrap();
    let e = v.apply(&doc).await.unwrap_err().to_string();
    assert!(e.contains("broken") && e.contains(":2:"), "{e}");
    assert!(e.contains("nope"), "{e}");
    // Still the starter policy: the owner may use.
    v.use_credential(&owner(), serde_json::from_value(json!({"service": "svc.a"})).unwrap()).await.unwrap();
    // A policy file broken on disk is ignored until fixed; the previous set stays in force.
    std::fs::write(v.home().join("policies/99-broken.cedar"), "permit (").unwrap();
    v.use_credential(&owner(), serde_json::from_value(json!({"service": "svc.a"})).unwrap()).await.unwrap();
}

#[tokio::test]
async fn disabling_an_agent_cuts_off_its_leases_at_once() {
    use crp_provider::vault::{AgentRecord, AgentStatus};
    let (v, _dir) = Vault::open_ephemeral().await.unwrap();
    store(&v, "a/one", "svc.a", &[]).await;
    v.install_policy("20-bot.cedar", "@id(\"bot-use\")\n@reason(\"bot\")\npermit (principal in Role::\"bots\", action == Action::\"use\", resource);\n")
        .unwrap();
    let bot = AgentRecord { id: "bot".into(), name: "Bot".into(), public_key: String::new(), roles: vec!["bots".into()], scopes: vec![], status: AgentStatus::Active };
    assert!(v.upsert_agent(&bot).await.unwrap());
    assert!(!v.upsert_agent(&bot).await.unwrap(), "idempotent");
    let ctx = CallContext::new("bot", Transport::Http);
    let u = v.use_credential(&ctx, serde_json::from_value(json!({"service": "svc.a"})).unwrap()).await.unwrap();
    let tok = u.session_token.clone().unwrap();
    assert!(v.proxy_grant(&u.lease.id, &tok).await.is_ok());
    v.set_agent_status("bot", AgentStatus::Disabled).await.unwrap();
    let d = v.proxy_grant(&u.lease.id, &tok).await.unwrap_err();
    assert_eq!((d.status, d.code), (403, "agent_disabled"));
    let e = v.use_credential(&ctx, serde_json::from_value(json!({"service": "svc.a"})).unwrap()).await.unwrap_err();
    assert_eq!(e.code, -33003);
    assert!(e.message.contains("disabled"), "{e:?}");
    v.set_agent_status("bot", AgentStatus::Active).await.unwrap();
    assert!(v.proxy_grant(&u.lease.id, &tok).await.is_ok());
}
