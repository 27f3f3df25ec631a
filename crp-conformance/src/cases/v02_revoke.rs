//! v0.2 §5.4 `crp/revoke` (v0.1 §6.3 shapes): revocation takes effect on the next request,
//! cascades to the delegated subtree and reports it in `affectedLeases`.

use serde_json::{Value, json};

use super::{bogus_lease_id, bx, instant, proxy_refused, refused};
use crate::catalog::{Case, CaseResult, Level::*, Stop, Tier::*};
use crate::ctx::{Ctx, Handle, ProxyReq};
use crate::schemas;
use crate::{ensure, fail};
use crp_core::fixtures::FixtureRole;

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case::new("revoke.shape", Standard, "0.1", "§6.3", Must,
            "Revoke answers {revoked: true, leaseId, revokedAt} per the revoke-result schema", |c| bx(shape(c))),
        Case::new("revoke.ends-proxy", Standard, "0.2", "§10", Must,
            "After revoke, the next proxied request is refused and not forwarded", |c| bx(ends_proxy(c))),
        Case::new("revoke.renew-revoked", Standard, "0.1", "§6.3", Must,
            "A revoked lease cannot be renewed", |c| bx(renew_revoked(c))),
        Case::new("revoke.unknown-lease", Standard, "0.1", "§12", Must,
            "Revoking a lease id that was never issued fails", |c| bx(unknown(c))),
        Case::new("revoke.invalid-reason", Standard, "0.1", "§6.3", Must,
            "A reason outside the four defined ones gets -32602", |c| bx(invalid_reason(c))),
        Case::new("revoke.cascade-affected-leases", Full, "0.2", "§5.4", Must,
            "Revoking a parent lists every delegated descendant in affectedLeases", |c| bx(cascade_list(c))),
        Case::new("revoke.cascade-ends-proxy", Full, "0.2", "§5.5", Must,
            "Revoking a parent ends every descendant's proxy on the next request", |c| bx(cascade_proxy(c))),
        Case::new("revoke.child-only", Full, "0.2", "§5.5", Should,
            "Revoking a child leaves its parent usable", |c| bx(child_only(c))),
    ]
}

async fn shape(ctx: Ctx) -> CaseResult {
    let h = ctx.use_role(FixtureRole::Primary).await?;
    let r = ctx.revoke(&h.lease_id).await?;
    let res = r.expect_result("crp/revoke")?;
    if let Err(errs) = schemas::check("revoke-result", res) {
        fail!("the revoke result does not match schemas/revoke-result.schema.json: {}", errs.join("; "));
    }
    ensure!(res.get("revoked") == Some(&json!(true)), "revoked is {:?}, expected true", res.get("revoked"));
    ensure!(res.get("leaseId") == Some(&json!(h.lease_id)), "leaseId does not echo the revoked lease");
    let at = res.get("revokedAt").and_then(Value::as_str).unwrap_or("");
    ensure!(instant(at).is_some(), "revokedAt `{at}` is not an RFC 3339 instant");
    Ok(())
}

async fn ends_proxy(ctx: Ctx) -> CaseResult {
    let h = ctx.use_role(FixtureRole::Primary).await?;
    let before = ctx.proxy(&h, ProxyReq::get("/before-revoke")).await?;
    ensure!(before.arrival.is_some(), "the proxy did not work even before revocation (HTTP {})", before.status);
    ctx.revoke(&h.lease_id).await?.expect_result("crp/revoke")?;
    let after = ctx.proxy(&h, ProxyReq::get("/after-revoke")).await?;
    proxy_refused(&after, "after revoke")
}

async fn renew_revoked(ctx: Ctx) -> CaseResult {
    let h = ctx.use_role(FixtureRole::Primary).await?;
    ctx.revoke(&h.lease_id).await?.expect_result("crp/revoke")?;
    let r = ctx.renew(&h.lease_id, Some(60)).await?;
    refused(&r, "renewing a revoked lease").map(|_| ())
}

async fn unknown(ctx: Ctx) -> CaseResult {
    let r = ctx.revoke(&bogus_lease_id(None)).await?;
    refused(&r, "revoking a lease that was never issued").map(|_| ())
}

async fn invalid_reason(ctx: Ctx) -> CaseResult {
    let h = ctx.use_role(FixtureRole::Primary).await?;
    let r = ctx.call("crp/revoke", json!({"leaseId": h.lease_id, "reason": "because"})).await?;
    let e = refused(&r, "crp/revoke with reason \"because\"")?;
    ensure!(e.code == -32602, "expected -32602, got {} `{}`", e.code, e.message);
    Ok(())
}

/// A child of `parent` on the primary fixture.
pub async fn delegate(ctx: &Ctx, parent: &str) -> Result<Handle, Stop> {
    let c = ctx.cred(FixtureRole::Primary)?;
    let mut p = ctx.use_params(&c);
    p["delegation"] = json!({"parentLeaseId": parent});
    ctx.use_with(p).await
}

async fn family(ctx: &Ctx) -> Result<(Handle, Handle, Handle), Stop> {
    let root = ctx.use_role(FixtureRole::Primary).await?;
    let child = delegate(ctx, &root.lease_id).await?;
    let grandchild = delegate(ctx, &child.lease_id).await?;
    Ok((root, child, grandchild))
}

async fn cascade_list(ctx: Ctx) -> CaseResult {
    let (root, child, grandchild) = family(&ctx).await?;
    let r = ctx.revoke(&root.lease_id).await?;
    let res = r.expect_result("crp/revoke")?;
    let Some(affected) = res.get("affectedLeases").and_then(Value::as_array) else {
        fail!("the revoke result has no affectedLeases list, although the lease had delegated children");
    };
    let ids: Vec<&str> = affected.iter().filter_map(Value::as_str).collect();
    for (name, h) in [("child", &child), ("grandchild", &grandchild)] {
        ensure!(ids.contains(&h.lease_id.as_str()), "affectedLeases {ids:?} lacks the {name} {}", h.lease_id);
    }
    Ok(())
}

async fn cascade_proxy(ctx: Ctx) -> CaseResult {
    let (root, child, grandchild) = family(&ctx).await?;
    for (name, h) in [("child", &child), ("grandchild", &grandchild)] {
        let b = ctx.proxy(h, ProxyReq::get("/before-cascade")).await?;
        ensure!(b.arrival.is_some(), "the {name}'s proxy did not work before the cascade (HTTP {})", b.status);
    }
    ctx.revoke(&root.lease_id).await?.expect_result("crp/revoke")?;
    for (name, h) in [("child", &child), ("grandchild", &grandchild)] {
        let a = ctx.proxy(h, ProxyReq::get("/after-cascade")).await?;
        proxy_refused(&a, &format!("after revoking the root, the {name}'s proxy"))?;
    }
    Ok(())
}

async fn child_only(ctx: Ctx) -> CaseResult {
    let root = ctx.use_role(FixtureRole::Primary).await?;
    let child = delegate(&ctx, &root.lease_id).await?;
    ctx.revoke(&child.lease_id).await?.expect_result("crp/revoke")?;
    let p = ctx.proxy(&root, ProxyReq::get("/parent-after-child-revoke")).await?;
    ensure!(p.arrival.is_some(), "revoking a child also ended its parent (HTTP {})", p.status);
    Ok(())
}
