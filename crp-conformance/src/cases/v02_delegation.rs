//! v0.2 §5.5 delegation: child leases work, depth is bounded (the fixtures' `maxDepth`), and
//! a child never outgrows its parent.

use serde_json::json;

use super::v02_revoke::delegate;
use super::{bogus_lease_id, bx, describe, instant, refused};
use crate::catalog::{Case, CaseResult, Level::*, Stop, Tier::*};
use crate::ctx::{Ctx, ProxyReq, RpcError};
use crate::{ensure, fail};
use crp_core::fixtures::FixtureRole;

/// The code this implementation's registry gives `delegation_depth_exceeded` (v0.2 §11 names
/// the error without a number).
pub const DELEGATION_DEPTH_CODE: i64 = -33013;

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case::new("delegation.child-lease", Full, "0.2", "§5.5", Must,
            "A delegated child lease is issued with its own id and depth, and its proxy works", |c| bx(child(c))),
        Case::new("delegation.depth-bounded", Full, "0.2", "§5.5", Must,
            "Delegation beyond the provider's depth limit is refused", |c| bx(bounded(c))),
        Case::new("delegation.depth-code", Full, "0.2", "§11", Should,
            "Too deep a delegation is refused with -33013 (delegation_depth_exceeded in this registry)", |c| bx(depth_code(c))),
        Case::new("delegation.unknown-parent", Full, "0.2", "§5.5", Must,
            "Delegating from a lease that was never issued is refused", |c| bx(unknown_parent(c))),
        Case::new("delegation.child-within-parent", Full, "0.2", "§5.5", Should,
            "A child lease expires no later than its parent and has no wider scopes", |c| bx(within(c))),
    ]
}

async fn child(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Primary)?;
    let root = ctx.use_role(FixtureRole::Primary).await?;
    let kid = delegate(&ctx, &root.lease_id).await?;
    ensure!(kid.lease_id != root.lease_id, "the child got its parent's lease id");
    match kid.depth {
        Some(1) => {}
        Some(d) => fail!("the child of a root lease has delegationDepth {d}, expected 1"),
        None => fail!("the child lease has no delegationDepth"),
    }
    let p = ctx.proxy(&kid, ProxyReq::get("/child")).await?;
    let Some(a) = &p.arrival else { fail!("the child's proxy does not reach the upstream (HTTP {})", p.status) };
    super::v02_proxy::check_injection(&c, a)
}

/// Build the chain down to `maxDepth` and return the error for one level more.
async fn too_deep(ctx: &Ctx) -> Result<RpcError, Stop> {
    let max = ctx.fixtures().delegation.max_depth;
    let mut parent = ctx.use_role(FixtureRole::Primary).await?;
    for depth in 1..=max {
        parent = delegate(ctx, &parent.lease_id)
            .await
            .map_err(|e| match e {
                Stop::Fail(m) => Stop::Fail(format!("depth {depth} (within the fixtures' maxDepth {max}) was refused: {m}")),
                other => other,
            })?;
    }
    let c = ctx.cred(FixtureRole::Primary)?;
    let mut p = ctx.use_params(&c);
    p["delegation"] = json!({"parentLeaseId": parent.lease_id});
    let r = ctx.call("crp/use", p).await?;
    refused(&r, &format!("delegating to depth {} (the fixtures allow {max})", max + 1))
}

async fn bounded(ctx: Ctx) -> CaseResult {
    let e = too_deep(&ctx).await?;
    ctx.note(format!("refused with {}", describe(&e)));
    Ok(())
}

async fn depth_code(ctx: Ctx) -> CaseResult {
    let e = too_deep(&ctx).await?;
    ensure!(e.code == DELEGATION_DEPTH_CODE, "refused with {}, expected {DELEGATION_DEPTH_CODE}", describe(&e));
    Ok(())
}

async fn unknown_parent(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Primary)?;
    let mut p = ctx.use_params(&c);
    p["delegation"] = json!({"parentLeaseId": bogus_lease_id(None)});
    let r = ctx.call("crp/use", p).await?;
    refused(&r, "delegating from a lease that was never issued").map(|_| ())
}

async fn within(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Primary)?;
    let mut p = ctx.use_params(&c);
    p["ttl"] = json!(30);
    p["scopes"] = json!([c.scopes.first().cloned().unwrap_or_default()]);
    let root = ctx.use_with(p).await?;
    let mut p = ctx.use_params(&c);
    p["ttl"] = json!(c.max_ttl);
    p["scopes"] = json!(c.scopes);
    p["delegation"] = json!({"parentLeaseId": root.lease_id});
    let r = ctx.call("crp/use", p).await?;
    let Some(res) = r.result() else {
        ctx.note("the provider refused a child asking more than its parent: allowed");
        return Ok(());
    };
    let kid = crate::ctx::Handle::parse(res)?;
    if let (Some(pe), Some(ke)) = (root.expires_at.as_deref().and_then(instant), kid.expires_at.as_deref().and_then(instant)) {
        ensure!(ke <= pe + time::Duration::seconds(1), "the child expires at {ke}, after its parent ({pe})");
    }
    let wider: Vec<&String> = kid.granted.iter().filter(|s| !root.granted.contains(s)).collect();
    ensure!(wider.is_empty(), "the child was granted {wider:?}, which its parent does not have");
    Ok(())
}
