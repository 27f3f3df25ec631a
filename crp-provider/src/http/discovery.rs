//! `GET /.well-known/crp` (the capability object) and `GET /healthz`.
//!
//! Discovery is public: it says what the provider speaks, not what it holds. With a
//! `CRP-Version` header the object describes the negotiated version (`features` of 0.1 may
//! include `resolve`; 0.2 never does); an unsupported version is HTTP 400 with the -33001
//! error object and `data.supported`.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use crp_core::version;
use http::StatusCode;

use super::AppState;
use super::rpc::VERSION_HEADER;

/// `GET /.well-known/crp`.
pub(crate) async fn capability(State(st): State<AppState>, req: Request) -> Response {
    let requested = match req.headers().get(VERSION_HEADER).map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => Some("?"),
    };
    let json = [(http::header::CONTENT_TYPE, "application/json")];
    match version::negotiate(requested) {
        Ok(v) => {
            let cap = st.backend.provider().capability(v);
            let body = serde_json::to_string(&cap).unwrap_or_else(|_| "{}".into());
            (StatusCode::OK, json, body).into_response()
        }
        Err(e) => {
            let body = serde_json::json!({ "error": e }).to_string();
            (StatusCode::BAD_REQUEST, json, body).into_response()
        }
    }
}

/// `GET /healthz`: the process is up and serving.
pub(crate) async fn healthz() -> Response {
    ([(http::header::CONTENT_TYPE, "application/json")], r#"{"status":"ok"}"#).into_response()
}
