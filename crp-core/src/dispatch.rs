//! The dispatcher: raw JSON-RPC in, raw JSON-RPC out, calls on a [`Provider`] in between.
//!
//! It owns everything that is the same on every transport: envelope checks, batches,
//! notifications, method routing, version gating (`crp/resolve` only under 0.1), params
//! decoding and validation. Decoding errors are rewritten so that no value the caller sent
//! is echoed back (a misplaced secret must not come back in an error).

use std::sync::Arc;

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
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    if let Some(r) = self.handle_one(ctx, item).await {
                        out.push(r);
                    }
                }
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

    /// Call `method` with `params`, returning the result as JSON.
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

/// Decode params into `T`, turning serde's message into one that echoes no value.
pub fn decode<T: DeserializeOwned>(params: Value) -> Result<T, CrpError> {
    if !params.is_object() {
        return Err(CrpError::invalid_params("params must be an object of named fields"));
    }
    serde_json::from_value(params).map_err(|e| CrpError::invalid_params(redact_serde_message(&e.to_string())))
}

/// serde_json quotes the offending value (`invalid type: string "sk-…", expected u32`);
/// replace every quoted or back-ticked span after "invalid"/"unknown variant" with `…`.
/// Field names in "unknown field"/"missing field" stay, since they come from the schema or are
/// keys rather than values.
pub fn redact_serde_message(msg: &str) -> String {
    let keep_ticks = msg.starts_with("unknown field") || msg.starts_with("missing field");
    let mut out = String::with_capacity(msg.len());
    let mut in_quote = false;
    let mut tick_count = 0usize;
    for ch in msg.chars() {
        match ch {
            '"' => {
                in_quote = !in_quote;
                out.push('"');
                if in_quote {
                    out.push('…');
                }
            }
            '`' if !in_quote => {
                tick_count += 1;
                out.push('`');
                // First back-ticked span is the value for "unknown variant `x`, expected ...".
                if !keep_ticks && tick_count == 1 {
                    out.push('…');
                }
            }
            _ if in_quote => {}
            _ if !keep_ticks && tick_count == 1 => {}
            c => out.push(c),
        }
    }
    out
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
        let m = redact_serde_message("unknown field `servce`, expected one of `service`, `scopes`");
        assert!(m.contains("servce"), "{m}");
        let m = redact_serde_message("missing field `service`");
        assert_eq!(m, "missing field `service`");
    }
}
