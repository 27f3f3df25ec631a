//! Caller authentication on `POST /crp` and agent registration, against the real server:
//! every refusal reason of the interface, in its order, with its message; scopes; bootstrap
//! registration; `--dev` still honouring signatures.

mod http_support;

use crp_core::signing::{self, encode_public_key, generate_key, new_nonce};
use crp_provider::agents::AgentStatus;
use http_support::*;
use serde_json::{Value, json};

struct Agents {
    alice: signing::AgentSigningKey,
    limited: signing::AgentSigningKey,
    pending: signing::AgentSigningKey,
    disabled: signing::AgentSigningKey,
}

fn doc(a: &Agents) -> String {
    let pk = |k: &signing::AgentSigningKey| encode_public_key(&k.verifying_key());
    format!(
        r#"
[[credential]]
key = "svc/main"
service = "svc"
value = "auth-test-secret-value"
upstream = "http://127.0.0.1:9/"
allow_private_hosts = ["127.0.0.1"]

[[policy]]
name = "agents"
source = '''
@id("alice-use")
@reason("test")
permit (principal == Agent::"alice", action in [Action::"use", Action::"list"], resource);
'''

[[agent]]
id = "alice"
public_key = "{}"
scopes = ["crp:*"]
status = "active"

[[agent]]
id = "limited"
public_key = "{}"
scopes = ["crp:list"]
status = "active"

[[agent]]
id = "pending-one"
public_key = "{}"
scopes = ["*"]
status = "pending"

[[agent]]
id = "disabled-one"
public_key = "{}"
scopes = ["*"]
status = "disabled"
"#,
        pk(&a.alice),
        pk(&a.limited),
        pk(&a.pending),
        pk(&a.disabled)
    )
}

fn agents() -> Agents {
    Agents {
        alice: generate_key().unwrap(),
        limited: generate_key().unwrap(),
        pending: generate_key().unwrap(),
        disabled: generate_key().unwrap(),
    }
}

fn call(method: &str, params: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params })).unwrap()
}

async fn expect_refusal(resp: reqwest::Response, status: u16, message: &str) {
    assert_eq!(resp.status(), status, "expected {status} {message}");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["message"], message, "{v}");
}

#[tokio::test]
async fn every_refusal_has_its_status_and_message() {
    let a = agents();
    let (vault, _dir) = vault_with(&doc(&a)).await;
    let server = serve(&vault, false).await;
    let base = server.base_url();
    let body = call("crp/list", json!({}));

    // A good signature works.
    let r = signed(&base, "/crp", "alice", &a.alice, &body, now(), new_nonce().unwrap()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["result"]["services"].is_array(), "{v}");

    // Unsigned (not --dev).
    let r = client().post(format!("{base}/crp")).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().starts_with("auth_failure: missing X-CRP-Agent"), "{v}");

    // agent not found
    let r = signed(&base, "/crp", "nobody", &a.alice, &body, now(), new_nonce().unwrap()).send().await.unwrap();
    expect_refusal(r, 401, "auth_failure: agent not found").await;
    // agent is pending (checked before anything about the signature)
    let r = signed(&base, "/crp", "pending-one", &a.alice, &body, now() - 10_000, "x".into()).send().await.unwrap();
    expect_refusal(r, 401, "auth_failure: agent is pending").await;
    // agent is disabled
    let r = signed(&base, "/crp", "disabled-one", &a.disabled, &body, now(), new_nonce().unwrap()).send().await.unwrap();
    expect_refusal(r, 401, "auth_failure: agent is disabled").await;
    // timestamp out of window, both directions (before the signature is looked at)
    for ts in [now() - 301, now() + 400] {
        let r = signed(&base, "/crp", "alice", &a.alice, &body, ts, new_nonce().unwrap()).send().await.unwrap();
        expect_refusal(r, 401, "auth_failure: timestamp out of window").await;
    }
    // bad signature: another agent's key, or a body other than the signed one
    let r = signed(&base, "/crp", "alice", &a.limited, &body, now(), new_nonce().unwrap()).send().await.unwrap();
    expect_refusal(r, 401, "auth_failure: bad signature").await;
    let r = signed(&base, "/crp", "alice", &a.alice, &body, now(), new_nonce().unwrap())
        .body(call("crp/use", json!({ "service": "svc" })))
        .send()
        .await
        .unwrap();
    expect_refusal(r, 401, "auth_failure: bad signature").await;
    // The host and the query are signed too.
    let r = signed(&base, "/crp?x=1", "alice", &a.alice, &body, now(), new_nonce().unwrap()).send().await.unwrap();
    assert_eq!(r.status(), 200, "a signed query is fine");
    let nonce = new_nonce().unwrap();
    let h = signing::sign_request(&a.alice, "alice", "POST", "evil.example:80", "/crp", &body, now(), nonce);
    let mut rb = client().post(format!("{base}/crp")).body(body.clone());
    for (k, v) in h.pairs() {
        rb = rb.header(k, v);
    }
    expect_refusal(rb.send().await.unwrap(), 401, "auth_failure: bad signature").await;

    // replayed nonce
    let nonce = new_nonce().unwrap();
    let first = signed(&base, "/crp", "alice", &a.alice, &body, now(), nonce.clone());
    let again = signed(&base, "/crp", "alice", &a.alice, &body, now(), nonce);
    assert_eq!(first.send().await.unwrap().status(), 200);
    expect_refusal(again.send().await.unwrap(), 401, "auth_failure: replayed nonce").await;

    // Missing scope: 403 with its message; granted scopes work.
    let use_body = call("crp/use", json!({ "service": "svc" }));
    let r = signed(&base, "/crp", "limited", &a.limited, &use_body, now(), new_nonce().unwrap()).send().await.unwrap();
    expect_refusal(r, 403, "scope: missing required scope crp:use").await;
    let batch = serde_json::to_vec(&json!([
        { "jsonrpc": "2.0", "id": 1, "method": "crp/list", "params": {} },
        { "jsonrpc": "2.0", "id": 2, "method": "x-crp/vault.store", "params": { "key": "k", "value": "v" } }
    ]))
    .unwrap();
    let r = signed(&base, "/crp", "alice", &a.alice, &batch, now(), new_nonce().unwrap()).send().await.unwrap();
    expect_refusal(r, 403, "scope: missing required scope vault:store").await;
    let r = signed(&base, "/crp", "alice", &a.alice, &use_body, now(), new_nonce().unwrap()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["result"]["proxyBaseUrl"].is_string(), "{v}");

    // No refusal leaks the credential.
    server.shutdown().await;
}

#[tokio::test]
async fn bootstrap_registration_then_approval() {
    let a = agents();
    let (vault, _dir) = vault_with(&doc(&a)).await;
    let server = serve(&vault, false).await;
    let base = server.base_url();
    let boot = vault.bootstrap_agent("newbie", &[], &["crp:list".to_string()], 600).await.unwrap();
    let key = generate_key().unwrap();
    let reg = json!({ "token": boot.token.as_str(), "publicKey": encode_public_key(&key.verifying_key()), "name": "New agent" });
    let url = format!("{base}/api/v1/agents/register");

    let r = client().post(&url).json(&reg).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "pending", "{v}");
    let id = v["agentId"].as_str().unwrap().to_string();

    // The token is one-shot; unknown tokens are refused alike.
    for token in [boot.token.as_str(), "crpbt_not-a-real-token"] {
        let mut again = reg.clone();
        again["token"] = json!(token);
        let r = client().post(&url).json(&again).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "invalid_token", "{v}");
        assert!(v["message"].as_str().unwrap().contains("bootstrap token"), "{v}");
        assert!(!v.to_string().contains(token), "the token was echoed");
    }
    // A malformed key is a 400.
    let r = client().post(&url).json(&json!({ "token": "t", "publicKey": "AAAA" })).send().await.unwrap();
    assert_eq!(r.status(), 400);

    let body = call("crp/list", json!({}));
    let r = signed(&base, "/crp", &id, &key, &body, now(), new_nonce().unwrap()).send().await.unwrap();
    expect_refusal(r, 401, "auth_failure: agent is pending").await;
    vault.set_agent_status(&id, AgentStatus::Active).await.unwrap();
    let r = signed(&base, "/crp", &id, &key, &body, now(), new_nonce().unwrap()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    vault.set_agent_status(&id, AgentStatus::Disabled).await.unwrap();
    let r = signed(&base, "/crp", &id, &key, &body, now(), new_nonce().unwrap()).send().await.unwrap();
    expect_refusal(r, 401, "auth_failure: agent is disabled").await;
    server.shutdown().await;
}

#[tokio::test]
async fn dev_mode_loopback_is_dev_and_signatures_still_count() {
    let a = agents();
    let (vault, _dir) = vault_with(&doc(&a)).await;
    let server = serve(&vault, true).await;
    let base = server.base_url();
    let whoami = call("x-crp/whoami", json!({}));
    let r = client().post(format!("{base}/crp")).body(whoami.clone()).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["result"]["agent"], "dev", "{v}");
    let r = signed(&base, "/crp", "alice", &a.alice, &whoami, now(), new_nonce().unwrap()).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["result"]["agent"], "alice", "{v}");
    // A bad signature is not downgraded to the dev caller.
    let r = signed(&base, "/crp", "alice", &a.limited, &whoami, now(), new_nonce().unwrap()).send().await.unwrap();
    expect_refusal(r, 401, "auth_failure: bad signature").await;
    server.shutdown().await;
}
