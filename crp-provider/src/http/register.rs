//! `POST /api/v1/agents/register`: redeem a one-shot bootstrap token for an agent identity.
//!
//! Body `{"token": "...", "publicKey": "<base64 of the raw 32-byte Ed25519 key>", "name": "..."}`
//! (`public_key` is accepted too). Answers `{"agentId": "...", "status": "pending", "name": "..."}`;
//! the agent can sign requests once an operator approves it (`crp-provider agent approve ID`).
//! A bad, used or expired token is HTTP 401 `{"error":"invalid_token","message":...}`; a
//! malformed body or key is 400. The token is never echoed or logged.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::backend::{AgentStatus, RegisterError};
use super::rpc::read_limited;
use super::{AppState, json_error};

/// Largest registration body.
const MAX_REGISTER_BODY: usize = 16 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    token: String,
    #[serde(rename = "publicKey", alias = "public_key")]
    public_key: String,
    #[serde(default)]
    name: Option<String>,
}

/// `POST /api/v1/agents/register`.
pub(crate) async fn handle(State(st): State<AppState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match read_limited(&parts.headers, body, MAX_REGISTER_BODY.min(st.cfg.max_body_bytes)).await {
        Ok(b) => b,
        Err(_) => return json_error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "registration body too large"),
    };
    let Ok(mut req) = serde_json::from_slice::<RegisterBody>(&body) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "expected a JSON object {\"token\", \"publicKey\", \"name\"?}",
        );
    };
    if let Err(e) = crp_core::signing::parse_public_key(&req.public_key) {
        return json_error(StatusCode::BAD_REQUEST, "invalid_public_key", &e);
    }
    if req.name.as_ref().is_some_and(|n| n.is_empty() || n.len() > 128) {
        return json_error(StatusCode::BAD_REQUEST, "invalid_request", "name must be 1 to 128 characters");
    }
    let token = Zeroizing::new(std::mem::take(&mut req.token));
    match st.backend.register_agent(&token, req.public_key.trim(), req.name.as_deref()).await {
        Ok(agent) => {
            let status = match agent.status {
                AgentStatus::Pending => "pending",
                AgentStatus::Active => "active",
                AgentStatus::Disabled => "disabled",
            };
            let body = serde_json::json!({ "agentId": agent.id, "status": status, "name": agent.name });
            (StatusCode::OK, [(http::header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
        }
        Err(RegisterError::BadToken(m)) => json_error(StatusCode::UNAUTHORIZED, "invalid_token", &m),
        Err(RegisterError::Invalid(m)) => json_error(StatusCode::BAD_REQUEST, "invalid_request", &m),
        Err(RegisterError::Internal(m)) => json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", &m),
    }
}
