//! v0.2 §6.2 brokered credentials: the provider mints a short-lived token from a root secret
//! (OAuth2 client credentials at the echo server's token endpoint) and injects that; neither
//! the root secret nor the minted token ever reaches the consumer.

use super::bx;
use crate::catalog::{Case, CaseResult, Level::*, Tier::*};
use crate::ctx::{Ctx, ProxyReq};
use crate::{ensure, fail};
use crp_core::fixtures::FixtureRole;
use serde_json::json;

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case::new("broker.descriptor", Full, "0.2", "§6.2", Should,
            "A brokered credential's descriptor says brokered: true", |c| bx(descriptor(c))),
        Case::new("broker.minted-token-injected", Full, "0.2", "§6.2", Must,
            "The proxy injects a token minted at the token endpoint, never the root secret", |c| bx(minted(c))),
        Case::new("broker.secrets-stay-inside", Full, "0.2", "§6.2", Must,
            "Neither the root secret nor a minted token reaches the consumer", |c| bx(inside(c))),
    ]
}

async fn descriptor(ctx: Ctx) -> CaseResult {
    let h = ctx.use_role(FixtureRole::Brokered).await?;
    let b = h.result.pointer("/credentialDescriptor/brokered").cloned();
    ensure!(b == Some(json!(true)), "credentialDescriptor.brokered is {b:?}, expected true");
    Ok(())
}

async fn minted(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Brokered)?;
    let h = ctx.use_role(FixtureRole::Brokered).await?;
    let r = ctx.proxy(&h, ProxyReq::get("/minted")).await?;
    let Some(a) = &r.arrival else { fail!("the brokered request never reached the upstream (HTTP {})", r.status) };
    ensure!(!a.as_text().contains(c.value.expose()), "the upstream received the root secret (the OAuth2 client secret)");
    let auth = a.header("authorization").unwrap_or("");
    let minted = ctx.shared().echo.minted_tokens();
    ctx.note(format!("the token endpoint was asked {} time(s) and minted {} token(s)",
        ctx.shared().echo.token_requests().len(), minted.len()));
    let Some(tok) = auth.strip_prefix("Bearer ") else {
        fail!("the upstream got no Authorization: Bearer header");
    };
    ensure!(minted.iter().any(|m| m == tok), "the upstream got a bearer token the token endpoint never minted");
    ensure!(r.status == 200, "the upstream accepted the minted token, the proxy passed on HTTP {}", r.status);
    Ok(())
}

async fn inside(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Brokered)?;
    let r = ctx.call("crp/use", ctx.use_params(&c)).await?;
    let res = r.expect_result("crp/use")?;
    let h = crate::ctx::Handle::parse(res)?;
    let p = ctx.proxy(&h, ProxyReq::get("/inside")).await?;
    // Minted tokens are added to the scanner as they appear; check both answers again now.
    ctx.no_leak("the brokered crp/use result", &r.raw)?;
    ctx.no_leak("the brokered proxied answer", &p.as_text())
}
