//! Version negotiation: v0.2 §4 and §11 (mismatch is -33001), v0.1 §5.2 (majors must match,
//! the lower minor wins).

use serde_json::{Value, json};

use super::{bx, describe};
use crate::catalog::{Case, CaseResult, Level::*, Stop, Tier::*};
use crate::ctx::Ctx;
use crate::transport::{Discovery, TransportKind};
use crate::{ensure, fail, skip};
use crp_core::fixtures::FixtureRole;

/// A version no provider speaks.
pub const ALIEN_VERSION: &str = "99.0";

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case::new("version.mismatch-code", Standard, "0.2", "§4", Must,
            "A request under an unsupported major version fails with -33001", |c| bx(mismatch(c))),
        Case::new("version.mismatch-supported", Standard, "0.2", "§11", Should,
            "The -33001 error lists the supported versions in data.supported", |c| bx(supported(c))),
        Case::new("version.lower-minor", Standard, "0.1", "§5.2", Must,
            "A newer minor of the same major is served with the lower minor's feature set", |c| bx(lower_minor(c))),
    ]
}

/// The -33001 error for a request under [`ALIEN_VERSION`], wherever the transport puts it.
async fn alien_error(ctx: &Ctx) -> Result<Value, Stop> {
    if ctx.transport() == TransportKind::Stdio {
        skip!("the stdio transport carries no version");
    }
    if ctx.transport() == TransportKind::Mcp
        && let Some(Discovery::Refused(e)) = ctx.discovery(Some(ALIEN_VERSION))
    {
        ctx.record("response", format!("MCP initialize asking CRP {ALIEN_VERSION}"), &e.to_string());
        return Ok(e.clone());
    }
    let c = ctx.cred(FixtureRole::Primary)?;
    let r = ctx.call_at(Some(ALIEN_VERSION), "crp/use", ctx.use_params(&c)).await?;
    if r.result().is_some() {
        fail!("crp/use under CRP version {ALIEN_VERSION} succeeded; version negotiation must refuse it");
    }
    let e = r.expect_error("crp/use")?;
    Ok(r.json.get("error").cloned().unwrap_or(json!({"code": e.code})))
}

async fn mismatch(ctx: Ctx) -> CaseResult {
    let e = alien_error(&ctx).await?;
    let code = e.get("code").and_then(Value::as_i64).unwrap_or(0);
    ensure!(code == -33001, "the error code is {code}, expected -33001 (version_mismatch)");
    Ok(())
}

async fn supported(ctx: Ctx) -> CaseResult {
    let e = alien_error(&ctx).await?;
    let list = e.pointer("/data/supported").and_then(Value::as_array);
    let Some(list) = list else {
        fail!("the -33001 error has no data.supported list");
    };
    let versions: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
    ensure!(!versions.is_empty(), "data.supported is empty");
    let tested = ctx.shared().default_version.clone();
    ensure!(versions.contains(&tested.as_str()), "data.supported {versions:?} does not include {tested}, which the provider serves");
    Ok(())
}

async fn lower_minor(ctx: Ctx) -> CaseResult {
    if ctx.transport() == TransportKind::Stdio {
        skip!("the stdio transport carries no version");
    }
    let asked = "0.9";
    let c = ctx.cred(FixtureRole::Primary)?;
    let r = ctx.call_at(Some(asked), "crp/use", ctx.use_params(&c)).await?;
    if let Some(e) = r.error() {
        fail!("crp/use under CRP version {asked} failed with {}; same major, so the provider must serve its highest minor ≤ 9", describe(&e));
    }
    r.expect_result("crp/use")?;
    match ctx.discovery(Some(asked)) {
        Some(Discovery::Capability(cap)) => {
            ctx.record("response", format!("capability when asking {asked}"), &cap.to_string());
            let v = cap.get("version").and_then(Value::as_str).unwrap_or("");
            let minor = v.strip_prefix("0.").and_then(|m| m.parse::<u32>().ok());
            ensure!(matches!(minor, Some(m) if m <= 9), "asked {asked}, the capability says version `{v}` (expected 0.x with x ≤ 9)");
        }
        Some(Discovery::Refused(e)) => fail!("discovery under {asked} was refused: {e}"),
        _ => ctx.note("no discovery under this version; checked crp/use only"),
    }
    Ok(())
}
