//! The dispatcher: raw JSON-RPC in, raw JSON-RPC out, calls on a [`Provider`] in between.
//!
//! It owns everything that is the same on every transport: envelope checks, batches (whose
//! members run concurrently, as JSON-RPC 2.0 allows; answers keep the batch's order),
//! notifications, method routing, version gating (`crp/resolve` only under 0.1), params
//! decoding and validation. Decoding errors are rewritten so that no value the caller sent
//! is echoed back (a misplaced secret must not come back in an error).

use std::sync::Arc;

use futures_util::future::join_all;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::CrpError;
use crate::jsonrpc::{self, Incoming, Outgoing, Response};
use crate::methods;
use crate::provider::{CallContext, Provider};
use crate::types::{LeaseParams, ListParams, ResolveParams, RevokeParams, UseParams};
use crate::version::Version;

/// The largest batch answered; a larger one is refused whole with -32600.
pub const MAX_BATCH: usize = 100;

/// Routes JSON-RPC messages to a provider.
///
/// ```
/// # use crp_core::{*, types::*, provider::Transport};
/// # use async_trait::async_trait;
/// struct Empty;
/// #[async_trait]
/// impl Provider for Empty {
///     fn capability(&self, v: Version) -> Capability {
///         Capability { version: v.to_string(), versions: vec![], provider: None,
///                      features: vec![Feature::Use], conformance: None }
///     }
///     async fn use_credential(&self, _: &CallContext, p: UseParams) -> Result<UseResult, CrpError> {
///         Err(CrpError::service_not_found(&p.service))
///     }
/// }
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let d = Dispatcher::new(std::sync::Arc::new(Empty));
/// let ctx = CallContext::new("me", Transport::InProcess);
/// let out = d.handle_bytes(&ctx, br#"{"jsonrpc":"2.0","id":7,"method":"crp/use","params":{"service":"x"}}"#).await;
/// assert!(out.unwrap().contains("-33002"));
/// # });
/// ```
pub struct Dispatcher<P: ?Sized> {
    provider: Arc<P>,
}

impl<P: ?Sized> Clone for Dispatcher<P> {
    fn clone(&self) -> Self {
        Self { provider: self.provider.clone() }
    }
}

impl<P: Provider + ?Sized> Dispatcher<P> {
    /// Wrap a provider.
    pub fn new(provider: Arc<P>) -> Self {
        Self { provider }
    }

    /// The provider.
    pub fn provider(&self) -> &Arc<P> {
        &self.provider
    }

    /// Handle one raw message; `None` when nothing is to be sent back (notifications).
    pub async fn handle_bytes(&self, ctx: &CallContext, bytes: &[u8]) -> Option<String> {
        let out = self.handle_message(ctx, bytes).await?;
        Some(serde_json::to_string(&out).unwrap_or_else(|_| {
            // Serializing our own types cannot fail; answer something valid regardless.
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"internal error"}}"#.into()
        }))
    }

    /// Handle one raw message, returning the structured reply.
    pub async fn handle_message(&self, ctx: &CallContext, bytes: &[u8]) -> Option<Outgoing> {
        match jsonrpc::parse_incoming(bytes) {
            Err(resp) => Some(Outgoing::Single(resp)),
            Ok(Incoming::Single(v)) => self.handle_one(ctx, v).await.map(Outgoing::Single),
            Ok(Incoming::Batch(items)) if items.len() > MAX_BATCH => Some(Outgoing::Single(Response::error(
                None,
                CrpError::invalid_request(format!("batch too large: at most {MAX_BATCH} requests")),
            ))),
            Ok(Incoming::Batch(items)) => {
                // JSON-RPC 2.0 §6 lets a server run a batch's members concurrently, in any
                // order. Doing so lets the provider commit them together (one group commit for
                // a batch of `crp/use`, instead of one durable commit each); the answers keep
                // the batch's order all the same.
                let answers = join_all(items.into_iter().map(|item| self.handle_one(ctx, item))).await;
                let out: Vec<Response> = answers.into_iter().flatten().collect();
                (!out.is_empty()).then_some(Outgoing::Batch(out))
            }
        }
    }

    /// Handle one already-parsed request value.
    pub async fn handle_one(&self, ctx: &CallContext, value: Value) -> Option<Response> {
        let call = match jsonrpc::check_envelope(value) {
            Ok(c) => c,
            Err(resp) => return Some(resp),
        };
        let result = self.call(ctx, &call.method, call.params).await;
        if call.is_notification {
            return None;
        }
        Some(match result {
            Ok(v) => Response::result(call.id, v),
            Err(e) => Response::error(call.id, e),
        })
    }

    /// Call `method` with `params`, returning the result as JSON: for transports that have
    /// already taken the envelope apart (MCP tool calls, for instance).
    ///
    /// ```
    /// # use crp_core::{*, types::*, provider::Transport};
    /// # use async_trait::async_trait;
    /// # struct Empty;
    /// # #[async_trait]
    /// # impl Provider for Empty {
    /// #     fn capability(&self, v: Version) -> Capability {
    /// #         Capability { version: v.to_string(), versions: vec![], provider: None,
    /// #                      features: vec![Feature::Use], conformance: None }
    /// #     }
    /// #     async fn use_credential(&self, _: &CallContext, p: UseParams) -> Result<UseResult, CrpError> {
    /// #         Err(CrpError::service_not_found(&p.service))
    /// #     }
    /// # }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let d = Dispatcher::new(std::sync::Arc::new(Empty));
    /// let v01 = CallContext::new("me", Transport::Mcp).with_version(Version::V0_1);
    /// let v02 = CallContext::new("me", Transport::Mcp);
    /// let params = serde_json::json!({"service": "openai.com/api"});
    /// // crp/resolve exists only under 0.1; `Empty` does not implement it either way.
    /// assert_eq!(d.call(&v02, "crp/resolve", params.clone()).await.unwrap_err().code, -33011);
    /// assert_eq!(d.call(&v01, "crp/resolve", params).await.unwrap_err().code, -33011);
    /// assert_eq!(d.call(&v02, "crp/nope", serde_json::json!({})).await.unwrap_err().code, -32601);
    /// # });
    /// ```
    pub async fn call(&self, ctx: &CallContext, method: &str, params: Value) -> Result<Value, CrpError> {
        let p = &*self.provider;
        match method {
            methods::USE => {
                let params: UseParams = decode(params)?;
                params.validate()?;
                to_value(p.use_credential(ctx, params).await?)
            }
            methods::RESOLVE => {
                if ctx.version != Version::V0_1 {
                    return Err(CrpError::feature_not_supported(
                        "crp/resolve exists only under CRP version 0.1; use crp/use",
                    ));
                }
                let params: ResolveParams = decode(params)?;
                params.validate()?;
                to_value(p.resolve(ctx, params).await?)
            }
            methods::LEASE => {
                let params: LeaseParams = decode(params)?;
                params.validate()?;
                to_value(p.lease(ctx, params).await?)
            }
            methods::REVOKE => {
                let params: RevokeParams = decode(params)?;
                params.validate()?;
                to_value(p.revoke(ctx, params).await?)
            }
            methods::LIST => {
                let params: ListParams = decode(params)?;
                params.validate()?;
                to_value(p.list(ctx, params).await?)
            }
            m if m.starts_with(methods::EXTENSION_PREFIX) => p.extension(ctx, m, params).await,
            other => Err(CrpError::method_not_found(other)),
        }
    }
}

fn to_value<T: Serialize>(v: T) -> Result<Value, CrpError> {
    serde_json::to_value(v).map_err(|_| CrpError::internal())
}

/// Decode params into `T`, turning serde's message into one that echoes no value. Providers
/// use it for the `x-crp/` extension params they receive raw.
///
/// ```
/// use crp_core::dispatch::decode;
/// use crp_core::types::ext::VaultDeleteParams;
/// let p: VaultDeleteParams = decode(serde_json::json!({"key": "openai/prod"})).unwrap();
/// assert_eq!(p.key, "openai/prod");
/// let e = decode::<VaultDeleteParams>(serde_json::json!({"key": ["sk-live-1"]})).unwrap_err();
/// assert_eq!(e.code, -32602);
/// assert!(!e.message.contains("sk-live-1"));
/// ```
pub fn decode<T: DeserializeOwned>(params: Value) -> Result<T, CrpError> {
    if !params.is_object() {
        return Err(CrpError::invalid_params("params must be an object of named fields"));
    }
    serde_json::from_value(params).map_err(|e| CrpError::invalid_params(redact_serde_message(&e.to_string())))
}

/// Rewrite a serde error message so that nothing the caller sent survives.
///
/// serde quotes the offending input (`invalid type: string "sk-…", expected u32`, ``unknown
/// variant `x` ``, ``unknown field `x` ``), and a quoted value may itself contain quotes or
/// backticks, so the message is not parsed. Only serde's own words are kept: the kind of
/// failure (with the JSON type of the value for `invalid type`), and the text after the last
/// `, expected `, which serde builds from this crate's types. `missing field` and `duplicate
/// field` name fields of this crate's types and are kept when they are plain identifiers.
/// Anything else becomes a fixed message.
///
/// ```
/// use crp_core::dispatch::redact_serde_message;
/// let m = redact_serde_message(r#"invalid type: string "sk-live-CANARY", expected u32"#);
/// assert_eq!(m, "invalid type: string, expected u32");
/// let m = redact_serde_message("unknown variant `sk`CANARY`, expected `renew` or `release`");
/// assert_eq!(m, "unknown variant, expected `renew` or `release`");
/// assert_eq!(redact_serde_message("missing field `service`"), "missing field `service`");
/// ```
pub fn redact_serde_message(msg: &str) -> String {
    const GENERIC: &str = "params do not match the method's schema";
    for kind in ["missing field", "duplicate field"] {
        if let Some(rest) = msg.strip_prefix(kind) {
            let name = rest.strip_prefix(" `").and_then(|r| r.strip_suffix('`'));
            return match name {
                Some(n) if !n.is_empty() && n.len() <= 64 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
                    format!("{kind} `{n}`")
                }
                _ => kind.to_string(),
            };
        }
    }
    if msg.ends_with(", there are no fields") {
        // serde's wording for a field-less struct: nothing of ours to keep.
        return "unknown field".to_string();
    }
    let expected = msg.rfind(", expected ").map(|i| &msg[i..]).unwrap_or("");
    let expected_is_ours = !expected.contains('"') && expected.len() <= 512;
    let expected = if expected_is_ours { expected } else { "" };
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        // serde names the JSON type before the quoted value: `string "..."`, `integer `5``,
        // `map`, `sequence`, `boolean `true``, `floating point `1.5``, `null`.
        let end = rest.find(['"', '`', ',']).unwrap_or(rest.len());
        let ty = rest[..end].trim();
        let ty = if !ty.is_empty() && ty.len() <= 24 && ty.bytes().all(|b| b.is_ascii_lowercase() || b == b' ') {
            ty
        } else {
            "value"
        };
        return format!("invalid type: {ty}{expected}");
    }
    for kind in ["invalid value", "invalid length", "unknown variant", "unknown field"] {
        if msg.starts_with(kind) {
            return format!("{kind}{expected}");
        }
    }
    GENERIC.to_string()
}

#[cfg(test)]
mod tests {
    use super::redact_serde_message;

    #[test]
    fn redacts_values_keeps_shape() {
        let m = redact_serde_message(r#"invalid type: string "sk-live-SECRET", expected u32 at line 1 column 9"#);
        assert!(!m.contains("SECRET"), "{m}");
        assert!(m.contains("expected u32"), "{m}");
        let m = redact_serde_message("unknown variant `sk-SECRET`, expected `renew` or `release`");
        assert!(!m.contains("SECRET"), "{m}");
        assert!(m.contains("renew"), "{m}");
        let m = redact_serde_message("unknown field `sk-SECRET`, expected one of `service`, `scopes`");
        assert_eq!(m, "unknown field, expected one of `service`, `scopes`");
        let m = redact_serde_message("missing field `service`");
        assert_eq!(m, "missing field `service`");
    }

    #[test]
    fn quotes_and_ticks_inside_values_do_not_fool_it() {
        for msg in [
            r#"invalid type: string "x\"SECRET\"y", expected u32"#,
            "unknown variant `a`SECRET`, expected `renew` or `release`",
            "unknown field `a`, expected SECRET`, expected one of `service`",
            "invalid value: string \"a, expected SECRET\", expected a date",
            "missing field `SECRET\" or something`",
            "SECRET in a custom message",
            "unknown field `a, expected SECRET`, there are no fields",
        ] {
            let m = redact_serde_message(msg);
            assert!(!m.contains("SECRET"), "{msg} -> {m}");
        }
    }
}
