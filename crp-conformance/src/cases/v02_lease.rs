//! v0.2 §5.3 `crp/lease` and the lease lifecycle (v0.1 §6.2, §8): renew keeps the URL and
//! respects the caps, release and expiry end the handle on the very next request.

use std::time::Duration;

use serde_json::{Value, json};

use super::{bogus_lease_id, bx, describe, proxy_refused, refused, sleep_past};
use crate::catalog::{Case, CaseResult, Level::*, Tier::*};
use crate::ctx::{Ctx, ProxyReq};
use crate::schemas;
use crate::{ensure, fail};
use crp_core::fixtures::FixtureRole;

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case::new("lease.renew-keeps-url", Basic, "0.2", "§5.3", Must,
            "A renewed lease keeps its proxyBaseUrl, which still works", |c| bx(keeps_url(c))),
        Case::new("lease.renew-shape", Basic, "0.1", "§6.2", Must,
            "The renew result matches the lease-result schema", |c| bx(renew_shape(c))),
        Case::new("lease.renew-ttl-capped", Basic, "0.1", "§8.1", Must,
            "A renewal never grants more than the service's maximum TTL", |c| bx(renew_capped(c))),
        Case::new("lease.release-shape", Basic, "0.1", "§6.2", Must,
            "Release answers {released: true, leaseId}", |c| bx(release_shape(c))),
        Case::new("lease.release-ends-proxy", Basic, "0.2", "§10", Must,
            "After release, the next proxied request is refused and not forwarded", |c| bx(release_ends(c))),
        Case::new("lease.renew-released", Basic, "0.1", "§6.2", Must,
            "A released lease cannot be renewed", |c| bx(renew_released(c))),
        Case::new("lease.expiry-ends-proxy", Basic, "0.1", "§8.1", Must,
            "Expiry is hard: after expiresAt the proxy refuses and forwards nothing", |c| bx(expiry_ends(c))).slow(),
        Case::new("lease.not-renewable", Basic, "0.1", "§12", Must,
            "A lease marked renewable: false cannot be renewed", |c| bx(not_renewable(c))),
        Case::new("lease.not-renewable-code", Basic, "0.1", "§12", Should,
            "Renewing a non-renewable lease gives -33006 lease_not_renewable", |c| bx(not_renewable_code(c))),
        Case::new("lease.unknown-id", Basic, "0.1", "§12", Must,
            "Renewing a lease id that was never issued fails", |c| bx(unknown_id(c))),
        Case::new("lease.unknown-id-code", Basic, "0.1", "§12", Should,
            "Renewing a lease id that was never issued gives -33004 lease_not_found", |c| bx(unknown_id_code(c))),
    ]
}

async fn keeps_url(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Primary)?;
    let h = ctx.use_role(FixtureRole::Primary).await?;
    let r = ctx.renew(&h.lease_id, Some(60)).await?;
    let res = r.expect_result("crp/lease renew")?;
    if let Some(u) = res.get("proxyBaseUrl").and_then(Value::as_str) {
        ensure!(u == h.url, "renew returned proxyBaseUrl `{u}`, the lease had `{}`", h.url);
    }
    let p = ctx.proxy(&h, ProxyReq::get("/after-renew")).await?;
    let Some(a) = &p.arrival else {
        fail!("after renewal the original proxyBaseUrl no longer reaches the upstream (HTTP {})", p.status);
    };
    super::v02_proxy::check_injection(&c, a)
}

async fn renew_shape(ctx: Ctx) -> CaseResult {
    let h = ctx.use_role(FixtureRole::Primary).await?;
    let r = ctx.renew(&h.lease_id, Some(60)).await?;
    let res = r.expect_result("crp/lease renew")?;
    if let Err(errs) = schemas::check("lease-result", res) {
        fail!("the renew result does not match schemas/lease-result.schema.json: {}", errs.join("; "));
    }
    for f in ["id", "expiresAt", "ttl", "renewable"] {
        ensure!(res.pointer(&format!("/lease/{f}")).is_some(), "the renew result has no lease.{f}");
    }
    Ok(())
}

async fn renew_capped(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Primary)?;
    let h = ctx.use_role(FixtureRole::Primary).await?;
    let r = ctx.renew(&h.lease_id, Some(86400)).await?;
    match (r.result(), r.error()) {
        (Some(res), _) => {
            let ttl = res.pointer("/lease/ttl").and_then(Value::as_u64).unwrap_or(u64::MAX);
            ensure!(ttl <= u64::from(c.max_ttl), "renew asked 86400 on a service capped at {} s and got ttl {ttl}", c.max_ttl);
            if let Some(s) = res.pointer("/lease/expiresAt").and_then(Value::as_str).and_then(super::secs_until) {
                ensure!(s <= f64::from(c.max_ttl) + 2.0, "after renewal the lease expires {s:.0} s from now, beyond the {} s cap", c.max_ttl);
            }
        }
        (None, Some(e)) => ctx.note(format!("the provider refused the over-long renewal ({}): allowed", describe(&e))),
        _ => fail!("the answer has neither result nor error"),
    }
    Ok(())
}

async fn release_shape(ctx: Ctx) -> CaseResult {
    let h = ctx.use_role(FixtureRole::Primary).await?;
    let r = ctx.release(&h.lease_id).await?;
    let res = r.expect_result("crp/lease release")?;
    ensure!(res.get("released") == Some(&json!(true)), "released is {:?}, expected true", res.get("released"));
    ensure!(res.get("leaseId") == Some(&json!(h.lease_id)), "leaseId is not the released lease's id");
    Ok(())
}

async fn release_ends(ctx: Ctx) -> CaseResult {
    let h = ctx.use_role(FixtureRole::Primary).await?;
    let before = ctx.proxy(&h, ProxyReq::get("/before-release")).await?;
    ensure!(before.arrival.is_some(), "the proxy did not work even before release (HTTP {})", before.status);
    ctx.release(&h.lease_id).await?.expect_result("crp/lease release")?;
    let after = ctx.proxy(&h, ProxyReq::get("/after-release")).await?;
    proxy_refused(&after, "after release")
}

async fn renew_released(ctx: Ctx) -> CaseResult {
    let h = ctx.use_role(FixtureRole::Primary).await?;
    ctx.release(&h.lease_id).await?.expect_result("crp/lease release")?;
    let r = ctx.renew(&h.lease_id, Some(60)).await?;
    refused(&r, "renewing a released lease").map(|_| ())
}

async fn expiry_ends(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::ShortTtl)?;
    let mut p = ctx.use_params(&c);
    p["ttl"] = json!(c.max_ttl);
    let h = ctx.use_with(p).await?;
    let before = ctx.proxy(&h, ProxyReq::get("/before-expiry")).await?;
    ensure!(before.arrival.is_some(), "the proxy did not work even before expiry (HTTP {})", before.status);
    let ttl = h.ttl.unwrap_or(u64::from(c.max_ttl));
    // Wait until expiresAt has passed, plus a little for clock granularity (whole seconds).
    sleep_past(h.expires_at.as_deref(), ttl, Duration::from_millis(1100), Duration::from_secs(u64::from(c.max_ttl) + 3)).await;
    let after = ctx.proxy(&h, ProxyReq::get("/after-expiry")).await?;
    proxy_refused(&after, "after the lease expired")
}

async fn not_renewable_err(ctx: &Ctx) -> Result<crate::ctx::RpcError, crate::catalog::Stop> {
    let h = ctx.use_role(FixtureRole::NotRenewable).await?;
    ensure!(h.renewable == Some(false), "a lease on a non-renewable credential says renewable: {:?}", h.renewable);
    let r = ctx.renew(&h.lease_id, Some(60)).await?;
    refused(&r, "renewing a lease with renewable: false")
}

async fn not_renewable(ctx: Ctx) -> CaseResult {
    not_renewable_err(&ctx).await.map(|_| ())
}

async fn not_renewable_code(ctx: Ctx) -> CaseResult {
    let e = not_renewable_err(&ctx).await?;
    ensure!(e.code == -33006, "refused with {}, expected -33006", describe(&e));
    Ok(())
}

async fn unknown_id(ctx: Ctx) -> CaseResult {
    let r = ctx.renew(&bogus_lease_id(None), Some(60)).await?;
    refused(&r, "renewing a lease that was never issued").map(|_| ())
}

async fn unknown_id_code(ctx: Ctx) -> CaseResult {
    let r = ctx.renew(&bogus_lease_id(None), Some(60)).await?;
    let e = refused(&r, "renewing a lease that was never issued")?;
    ensure!(e.code == -33004, "refused with {}, expected -33004", describe(&e));
    Ok(())
}
