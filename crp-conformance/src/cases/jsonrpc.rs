//! JSON-RPC 2.0 (v0.1 §4.3: CRP messages are JSON-RPC 2.0; v0.1 §12: standard codes for
//! parse and transport errors): error codes, id echo, notifications, batches.

use serde_json::{Value, json};

use super::{bx, describe};
use crate::catalog::{Case, CaseResult, Level::*, Stop, Tier::*};
use crate::ctx::Ctx;
use crate::transport::{Expect, TransportKind};
use crate::{ensure, fail, skip};

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case::new("jsonrpc.parse-error", Basic, "0.1", "§4.3", Must,
            "A message that is not JSON gets -32700 with a null id", |c| bx(parse_error(c))),
        Case::new("jsonrpc.invalid-request", Basic, "0.1", "§4.3", Must,
            "A JSON value that is not a request gets -32600", |c| bx(invalid_request(c))),
        Case::new("jsonrpc.method-not-found", Basic, "0.1", "§4.3", Must,
            "An unknown crp/ method gets -32601", |c| bx(method_not_found(c))),
        Case::new("jsonrpc.invalid-params", Basic, "0.1", "§4.3", Must,
            "Params of the wrong type get -32602", |c| bx(invalid_params(c))),
        Case::new("jsonrpc.id-string", Basic, "0.1", "§4.3", Must,
            "A string id is echoed exactly", |c| bx(id_string(c))),
        Case::new("jsonrpc.id-number", Basic, "0.1", "§4.3", Must,
            "An integer id is echoed exactly", |c| bx(id_number(c))),
        Case::new("jsonrpc.version-member", Basic, "0.1", "§4.3", Must,
            "Every response carries \"jsonrpc\": \"2.0\"", |c| bx(version_member(c))),
        Case::new("jsonrpc.notification", Basic, "0.1", "§4.3", Must,
            "A notification (no id) gets no response", |c| bx(notification(c))),
        Case::new("jsonrpc.batch", Basic, "0.1", "§4.3", Should,
            "A batch gets an array with one response per request, matched by id", |c| bx(batch(c))),
        Case::new("jsonrpc.empty-batch", Basic, "0.1", "§4.3", Should,
            "An empty batch gets a single -32600 error", |c| bx(empty_batch(c))),
    ]
}

fn parse(text: Option<String>, what: &str) -> Result<Value, Stop> {
    let Some(t) = text else { fail!("{what}: no answer") };
    serde_json::from_str(&t).map_err(|_| Stop::Fail(format!("{what}: the answer is not JSON")))
}

fn code_of(v: &Value) -> Option<i64> {
    v.pointer("/error/code").and_then(Value::as_i64)
}

async fn parse_error(ctx: Ctx) -> CaseResult {
    let r = ctx.raw("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"crp/list\", ", Expect::NullId).await?;
    let v = parse(r.body, "a truncated message")?;
    ensure!(code_of(&v) == Some(-32700), "expected error -32700, got {}", v);
    ensure!(v.get("id") == Some(&Value::Null), "the id of a parse error must be null, got {:?}", v.get("id"));
    Ok(())
}

async fn invalid_request(ctx: Ctx) -> CaseResult {
    for (body, id) in [
        (json!({"jsonrpc": "2.0", "id": "crp-conformance-bad-method", "method": 42}), json!("crp-conformance-bad-method")),
        (json!({"jsonrpc": "1.0", "id": "crp-conformance-bad-version", "method": "crp/list", "params": {}}), json!("crp-conformance-bad-version")),
    ] {
        let r = ctx.raw(&body.to_string(), Expect::IdOrNull(id.clone())).await?;
        let v = parse(r.body, "an invalid request")?;
        ensure!(code_of(&v) == Some(-32600), "for {body} expected error -32600, got {v}");
        let got = v.get("id").cloned().unwrap_or(Value::Null);
        ensure!(got == id || got.is_null(), "the error's id must be the request's or null, got {got}");
    }
    Ok(())
}

async fn method_not_found(ctx: Ctx) -> CaseResult {
    let r = ctx.call("crp/no-such-method", json!({})).await?;
    let e = r.expect_error("crp/no-such-method")?;
    ensure!(e.code == -32601, "expected -32601, got {}", describe(&e));
    Ok(())
}

async fn invalid_params(ctx: Ctx) -> CaseResult {
    for params in [json!({"service": 42}), json!({"scopes": ["read"]})] {
        let r = ctx.call("crp/use", params.clone()).await?;
        let e = super::refused(&r, "crp/use with bad params")?;
        ensure!(e.code == -32602, "crp/use with {params} gave {}, expected -32602", describe(&e));
    }
    Ok(())
}

async fn echo_id(ctx: &Ctx, id: Value) -> CaseResult {
    let msg = json!({"jsonrpc": "2.0", "id": id, "method": "crp/no-such-method", "params": {}});
    let r = ctx.call_msg(Some(ctx.version()), "crp/no-such-method", msg, id.clone()).await?;
    let got = r.json.get("id").cloned().unwrap_or(Value::Null);
    ensure!(got == id, "sent id {id}, the answer carries {got}");
    Ok(())
}

async fn id_string(ctx: Ctx) -> CaseResult {
    echo_id(&ctx, json!("crp-conformance/ïd ✓ 7")).await
}

async fn id_number(ctx: Ctx) -> CaseResult {
    echo_id(&ctx, json!(424242)).await?;
    echo_id(&ctx, json!(-7)).await
}

async fn version_member(ctx: Ctx) -> CaseResult {
    let ok = ctx.call("crp/list", json!({})).await?;
    let err = ctx.call("crp/no-such-method", json!({})).await?;
    for r in [ok, err] {
        ensure!(r.json.get("jsonrpc") == Some(&json!("2.0")), "an answer lacks \"jsonrpc\": \"2.0\": {}", r.raw);
    }
    Ok(())
}

async fn notification(ctx: Ctx) -> CaseResult {
    let before = ctx.shared().transport.unsolicited().len();
    let note = json!({"jsonrpc": "2.0", "method": "crp/list", "params": {}});
    let r = ctx.raw(&note.to_string(), Expect::Nothing).await?;
    if let Some(b) = r.body
        && !b.trim().is_empty()
    {
        fail!("the notification got an answer: {}", ctx.mask(&b));
    }
    if ctx.transport() != TransportKind::Http {
        // Any answer to the notification would arrive before the answer to this request.
        ctx.call("crp/no-such-method", json!({})).await?;
        let after = ctx.shared().transport.unsolicited();
        if after.len() > before {
            fail!("the notification got an answer: {}", ctx.mask(&after[before..].join("\n")));
        }
    }
    Ok(())
}

async fn batch(ctx: Ctx) -> CaseResult {
    if !ctx.shared().transport.supports_batches() {
        skip!("MCP (2025-06-18) has no JSON-RPC batches");
    }
    let body = json!([
        {"jsonrpc": "2.0", "id": "crp-conformance-b1", "method": "crp/list", "params": {}},
        {"jsonrpc": "2.0", "method": "crp/list", "params": {}},
        {"jsonrpc": "2.0", "id": 77001, "method": "crp/no-such-method", "params": {}}
    ]);
    let r = ctx
        .raw(&body.to_string(), Expect::Ids(vec![json!("crp-conformance-b1"), json!(77001)]))
        .await?;
    let v = parse(r.body, "a batch")?;
    let Some(items) = v.as_array() else { fail!("a batch must be answered with an array, got {v}") };
    ensure!(items.len() == 2, "3 messages (one a notification) must give 2 responses, got {}", items.len());
    let find = |id: &Value| items.iter().find(|i| i.get("id") == Some(id));
    let a = find(&json!("crp-conformance-b1")).ok_or_else(|| Stop::Fail("no response with id \"crp-conformance-b1\"".into()))?;
    let b = find(&json!(77001)).ok_or_else(|| Stop::Fail("no response with id 77001".into()))?;
    ensure!(a.get("result").is_some() || a.get("error").is_some(), "the crp/list response has neither result nor error");
    ensure!(code_of(b) == Some(-32601), "the unknown method in the batch gave {b}, expected -32601");
    Ok(())
}

async fn empty_batch(ctx: Ctx) -> CaseResult {
    if !ctx.shared().transport.supports_batches() {
        skip!("MCP (2025-06-18) has no JSON-RPC batches");
    }
    let r = ctx.raw("[]", Expect::NullId).await?;
    let v = parse(r.body, "an empty batch")?;
    ensure!(v.is_object(), "an empty batch must get a single error object, got {v}");
    ensure!(code_of(&v) == Some(-32600), "expected -32600, got {v}");
    Ok(())
}
