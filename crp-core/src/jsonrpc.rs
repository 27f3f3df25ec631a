//! The JSON-RPC 2.0 envelope: ids, requests, notifications, responses and batches.
//!
//! Ids are echoed exactly as received (a string, or a number kept in `serde_json::Number` so
//! that `7`, `-1` and `18446744073709551615` come back unchanged).
//!
//! [`crate::Dispatcher`] uses these pieces; a transport that needs them directly does this:
//!
//! ```
//! use crp_core::jsonrpc::{check_envelope, parse_incoming, Incoming};
//! let Ok(Incoming::Single(v)) = parse_incoming(br#"{"jsonrpc":"2.0","id":"a","method":"crp/list"}"#) else {
//!     panic!("a single request")
//! };
//! let call = check_envelope(v).unwrap();
//! assert_eq!(call.method, "crp/list");
//! assert!(!call.is_notification);
//! assert_eq!(call.params, serde_json::json!({})); // absent params read as {}
//!
//! // Not JSON: the -32700 response to send back.
//! let err = parse_incoming(b"{oops").unwrap_err();
//! assert_eq!(err.into_result().unwrap_err().code, -32700);
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::error::CrpError;

/// The only protocol version string JSON-RPC 2.0 allows.
pub const JSONRPC_VERSION: &str = "2.0";

/// A request id, echoed exactly.
///
/// ```
/// use crp_core::jsonrpc::Id;
/// let big: Id = serde_json::from_str("18446744073709551615").unwrap();
/// assert_eq!(serde_json::to_string(&big).unwrap(), "18446744073709551615");
/// assert_eq!(serde_json::from_str::<Id>(r#""7""#).unwrap(), Id::from("7"));
/// assert_ne!(Id::from("7"), Id::from(7));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Id {
    /// A number.
    Number(serde_json::Number),
    /// A string.
    String(String),
}

impl From<i64> for Id {
    fn from(n: i64) -> Self {
        Id::Number(n.into())
    }
}

impl From<&str> for Id {
    fn from(s: &str) -> Self {
        Id::String(s.into())
    }
}

/// A request (with `id`) or notification (without).
///
/// ```
/// use crp_core::jsonrpc::Request;
/// let r = Request::new(1, "crp/list", serde_json::json!({}));
/// assert_eq!(serde_json::to_string(&r).unwrap(),
///            r#"{"jsonrpc":"2.0","id":1,"method":"crp/list","params":{}}"#);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Request {
    /// Always `"2.0"`.
    #[schemars(extend("const" = "2.0"))]
    #[serde(deserialize_with = "two_point_oh")]
    pub jsonrpc: String,
    /// Absent for a notification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    /// Method name.
    pub method: String,
    /// By-name params.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
}

impl Request {
    /// A request with an id.
    pub fn new(id: impl Into<Id>, method: impl Into<String>, params: Value) -> Self {
        Self { jsonrpc: JSONRPC_VERSION.into(), id: Some(id.into()), method: method.into(), params: Some(params) }
    }

    /// A notification.
    pub fn notification(method: impl Into<String>, params: Value) -> Self {
        Self { jsonrpc: JSONRPC_VERSION.into(), id: None, method: method.into(), params: Some(params) }
    }
}

/// Either a result or an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub enum Outcome {
    /// Success.
    #[serde(rename = "result")]
    Result(Value),
    /// Failure.
    #[serde(rename = "error")]
    Error(CrpError),
}

/// A response. `id` is `null` only when the request's id could not be read.
///
/// Reading one is strict: `jsonrpc` must be `"2.0"`, `id` must be present, and exactly one
/// of `result` and `error` (a `null` result is a result).
///
/// ```
/// use crp_core::jsonrpc::Response;
/// let r: Response = serde_json::from_str(r#"{"jsonrpc":"2.0","id":"a","result":null}"#).unwrap();
/// assert_eq!(r.into_result().unwrap(), serde_json::Value::Null);
/// assert!(serde_json::from_str::<Response>(r#"{"jsonrpc":"2.0","id":1}"#).is_err());
/// assert!(serde_json::from_str::<Response>(
///     r#"{"jsonrpc":"2.0","id":1,"result":1,"error":{"code":-32603,"message":"x"}}"#).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Response {
    /// Always `"2.0"`.
    #[schemars(extend("const" = "2.0"))]
    pub jsonrpc: String,
    /// The request's id, unchanged.
    pub id: Option<Id>,
    /// Result or error.
    #[serde(flatten)]
    pub outcome: Outcome,
}

fn two_point_oh<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = String::deserialize(d)?;
    if v == JSONRPC_VERSION {
        Ok(v)
    } else {
        Err(serde::de::Error::custom("jsonrpc must be \"2.0\""))
    }
}

/// Wraps whatever is there, `null` included, so that presence can be told from absence.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

impl<'de> Deserialize<'de> for Response {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(deserialize_with = "two_point_oh")]
            jsonrpc: String,
            #[serde(default, deserialize_with = "present")]
            id: Option<Option<Id>>,
            #[serde(default, deserialize_with = "present")]
            result: Option<Value>,
            #[serde(default)]
            error: Option<CrpError>,
        }
        let raw = Raw::deserialize(d)?;
        let id = raw.id.ok_or_else(|| serde::de::Error::missing_field("id"))?;
        let outcome = match (raw.result, raw.error) {
            (Some(v), None) => Outcome::Result(v),
            (None, Some(e)) => Outcome::Error(e),
            _ => return Err(serde::de::Error::custom("a response has exactly one of result and error")),
        };
        Ok(Response { jsonrpc: raw.jsonrpc, id, outcome })
    }
}

impl Response {
    /// A success.
    pub fn result(id: Option<Id>, result: Value) -> Self {
        Self { jsonrpc: JSONRPC_VERSION.into(), id, outcome: Outcome::Result(result) }
    }

    /// A failure.
    pub fn error(id: Option<Id>, error: CrpError) -> Self {
        Self { jsonrpc: JSONRPC_VERSION.into(), id, outcome: Outcome::Error(error) }
    }

    /// The result, or the error.
    pub fn into_result(self) -> Result<Value, CrpError> {
        match self.outcome {
            Outcome::Result(v) => Ok(v),
            Outcome::Error(e) => Err(e),
        }
    }
}

/// One incoming message: a single request or a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// One JSON value that should be a request object.
    Single(Value),
    /// A non-empty array of values that should be request objects.
    Batch(Vec<Value>),
}

/// What comes back for an [`Incoming`]: nothing (notifications only), one response, or a
/// batch of them.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Outgoing {
    /// A single response.
    Single(Response),
    /// A batch's responses (never empty).
    Batch(Vec<Response>),
}

/// Split raw bytes into a message, or the error response JSON-RPC prescribes.
pub fn parse_incoming(bytes: &[u8]) -> Result<Incoming, Response> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        Response::error(None, CrpError::parse_error(format!("line {} column {}", e.line(), e.column())))
    })?;
    match value {
        Value::Array(items) if items.is_empty() => {
            Err(Response::error(None, CrpError::invalid_request("empty batch")))
        }
        Value::Array(items) => Ok(Incoming::Batch(items)),
        other => Ok(Incoming::Single(other)),
    }
}

/// A request whose envelope has been checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// `None` for a notification.
    pub id: Option<Id>,
    /// Whether this is a notification (no reply is sent).
    pub is_notification: bool,
    /// Method name.
    pub method: String,
    /// Params (`{}` when absent).
    pub params: Value,
}

/// Check a value against the JSON-RPC 2.0 request rules.
pub fn check_envelope(value: Value) -> Result<Call, Response> {
    let Value::Object(mut obj) = value else {
        return Err(Response::error(None, CrpError::invalid_request("a request must be a JSON object")));
    };
    let (id, is_notification) = match obj.remove("id") {
        None => (None, true),
        Some(Value::Null) => (None, false),
        Some(Value::Number(n)) => (Some(Id::Number(n)), false),
        Some(Value::String(s)) => (Some(Id::String(s)), false),
        Some(_) => {
            return Err(Response::error(None, CrpError::invalid_request("id must be a string, a number or null")));
        }
    };
    let fail = |msg: &str| Response::error(id.clone(), CrpError::invalid_request(msg));
    match obj.get("jsonrpc") {
        Some(Value::String(v)) if v == JSONRPC_VERSION => {}
        _ => return Err(fail("jsonrpc must be \"2.0\"")),
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        _ => return Err(fail("method must be a string")),
    };
    let params = match obj.remove("params") {
        None => Value::Object(Default::default()),
        Some(p @ (Value::Object(_) | Value::Array(_))) => p,
        Some(_) => return Err(fail("params must be an object or an array")),
    };
    Ok(Call { id, is_notification, method, params })
}
