//! `POST /crp`: JSON-RPC 2.0 over HTTP.
//!
//! Order of handling, each step answering on failure:
//! 1. body size: a `Content-Length` above the limit, or a body that grows past it, is HTTP 413
//!    with a JSON-RPC -32600 error (`id: null`);
//! 2. caller authentication ([`super::auth`]): HTTP 401, JSON-RPC code -32001, message
//!    `auth_failure: <reason>`, `data.error = "auth_failure"`;
//! 3. `CRP-Version` negotiation: an unsupported version is HTTP 200 with the JSON-RPC error
//!    -33001 and `data.supported` (the request's id echoed when it can be read);
//! 4. scopes: every method of the message (all members of a batch) must be granted, otherwise
//!    HTTP 403, JSON-RPC code -32002, `scope: missing required scope <s>`, `data.error = "scope"`;
//! 5. the dispatcher: malformed JSON is -32700, envelope errors -32600, and so on; a message
//!    of notifications only is HTTP 204.
//!
//! Every answer is `application/json` and carries the negotiated `CRP-Version`.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use crp_core::error::ErrorData;
use crp_core::jsonrpc::{Id, Response as RpcResponse};
use crp_core::provider::{CallContext, Transport};
use crp_core::version::{self, Version};
use crp_core::CrpError;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde_json::Value;

use super::AppState;
use super::auth::{AuthError, SignedParts, required_scope, scope_granted};

/// The request header carrying the caller's protocol version.
pub const VERSION_HEADER: &str = "crp-version";

/// JSON-RPC code for an authentication failure (crp-core's registry: `auth_failure`).
pub const AUTH_FAILURE_CODE: i64 = crp_core::ErrorCode::AuthFailure.code();
/// JSON-RPC code for a missing scope (crp-core's registry: `scope`).
pub const SCOPE_CODE: i64 = crp_core::ErrorCode::ScopeMissing.code();

fn rpc_json(status: StatusCode, body: String, version: Option<Version>) -> Response {
    let mut resp = (status, [(http::header::CONTENT_TYPE, "application/json")], body).into_response();
    if let Some(v) = version {
        resp.headers_mut().insert("crp-version", HeaderValue::from_static(v.as_str()));
    }
    resp
}

fn rpc_error(status: StatusCode, id: Option<Id>, err: CrpError, version: Option<Version>) -> Response {
    let body = serde_json::to_string(&RpcResponse::error(id, err)).unwrap_or_else(|_| {
        r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"internal error"}}"#.to_string()
    });
    rpc_json(status, body, version)
}

/// The HTTP answer for an authentication/authorization refusal on `/crp`.
pub(crate) fn auth_error_response(e: AuthError) -> Response {
    let code = if e.status == StatusCode::FORBIDDEN { SCOPE_CODE } else { AUTH_FAILURE_CODE };
    let err = CrpError {
        code,
        message: e.message,
        data: Some(ErrorData { error: Some(e.kind.to_string()), ..Default::default() }),
    };
    rpc_error(e.status, None, err, None)
}

fn too_large(limit: usize) -> Response {
    rpc_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        None,
        CrpError::invalid_request(format!("request body too large: at most {limit} bytes")),
        None,
    )
}

/// Read a body of at most `limit` bytes; `Err` is the 413 (or 400) response.
pub(crate) async fn read_limited(headers: &HeaderMap, body: axum::body::Body, limit: usize) -> Result<Bytes, Response> {
    if let Some(len) = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large(limit)),
        Err(_) => Err(rpc_error(
            StatusCode::BAD_REQUEST,
            None,
            CrpError::invalid_request("the request body could not be read"),
            None,
        )),
    }
}

/// The id of a single request, when the body is one readable request object.
fn single_id(body: &[u8]) -> Option<Id> {
    let v: Value = serde_json::from_slice(body).ok()?;
    match v.get("id")? {
        Value::Number(n) => Some(Id::Number(n.clone())),
        Value::String(s) => Some(Id::String(s.clone())),
        _ => None,
    }
}

/// Methods named in a message (single or batch); unreadable shapes name none (the
/// dispatcher answers them).
fn methods_of(body: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let one = |v: &Value| v.get("method").and_then(Value::as_str).map(str::to_string);
    match &v {
        Value::Array(items) => items.iter().filter_map(one).collect(),
        other => one(other).into_iter().collect(),
    }
}

/// `POST /crp`.
pub(crate) async fn handle(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let body = match read_limited(&parts.headers, body, st.cfg.max_body_bytes).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let caller = match st
        .auth
        .authenticate(&SignedParts {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            body: &body,
            peer: Some(peer),
        })
        .await
    {
        Ok(c) => c,
        Err(e) => return auth_error_response(e),
    };
    let requested = match parts.headers.get(VERSION_HEADER).map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => Some(v),
        // Not even visible ASCII: no version we could speak.
        Some(Err(_)) => Some("?"),
    };
    let version = match version::negotiate(requested) {
        Ok(v) => v,
        Err(e) => return rpc_error(StatusCode::OK, single_id(&body), e, None),
    };
    for m in methods_of(&body) {
        if let Some(scope) = required_scope(&m)
            && !scope_granted(&caller.scopes, scope)
        {
            return auth_error_response(AuthError::scope(scope));
        }
    }
    let ctx = CallContext::new(caller.agent, Transport::Http).with_version(version);
    match st.dispatcher.handle_bytes(&ctx, &body).await {
        Some(out) => rpc_json(StatusCode::OK, out, Some(version)),
        None => {
            let mut r = StatusCode::NO_CONTENT.into_response();
            r.headers_mut().insert("crp-version", HeaderValue::from_static(version.as_str()));
            r
        }
    }
}
