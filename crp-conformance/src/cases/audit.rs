//! v0.2 §8 (audit by default), §10 ("all use must be auditable", no material in logs) and
//! v0.1 §10.1 (mandatory events), checked through the audit query a provider exposes.
//!
//! CRP defines no audit-reading method. These cases use this implementation's extension
//! `x-crp/audit.query`; a provider without it (-32601) or that refuses the runner (-33003)
//! gets SKIP, never FAIL. Events are matched loosely: an event "concerns" a lease when any of
//! its string values contains the lease id.

use std::time::Duration;

use serde_json::{Value, json};

use super::{bx, mentions, sleep_past};
use crate::catalog::{Case, CaseResult, Level::*, Stop, Tier::*};
use crate::ctx::{Ctx, ProxyReq};
use crate::{ensure, skip};
use crp_core::fixtures::FixtureRole;

/// The extension method read here.
pub const AUDIT_QUERY: &str = "x-crp/audit.query";

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case::new("audit.use-recorded", Basic, "0.2", "§10", Must,
            "Every crp/use is recorded in the audit trail", |c| bx(use_recorded(c))),
        Case::new("audit.denied-recorded", Basic, "0.1", "§10.1", Must,
            "A denied request is recorded (credential.denied)", |c| bx(denied_recorded(c))),
        Case::new("audit.lease-events", Basic, "0.1", "§10.1", Must,
            "Renewal, release and revocation are recorded", |c| bx(lease_events(c))),
        Case::new("audit.proxy-recorded", Basic, "0.2", "§10", Should,
            "Each proxied use of a credential is recorded", |c| bx(proxy_recorded(c))),
        Case::new("audit.expiry-recorded", Basic, "0.1", "§8.4", Must,
            "A lease that expires is recorded as expired", |c| bx(expiry_recorded(c))).slow(),
        Case::new("audit.no-secret", Basic, "0.1", "§10.2", Must,
            "The audit trail carries no credential material", |c| bx(no_secret(c))).last(),
    ]
}

/// Every event the provider returns (newest first, at most 1000).
pub async fn events(ctx: &Ctx) -> Result<Vec<Value>, Stop> {
    let r = ctx.call(AUDIT_QUERY, json!({"limit": 1000})).await?;
    if let Some(e) = r.error() {
        match e.code {
            -32601 => skip!("the provider exposes no audit query ({AUDIT_QUERY} is -32601)"),
            -33003 | -33011 => skip!("the provider refuses the runner its audit query ({} `{}`)", e.code, e.message),
            _ => return Err(Stop::Fail(format!("{AUDIT_QUERY} failed with {} `{}`", e.code, e.message))),
        }
    }
    let res = r.expect_result(AUDIT_QUERY)?;
    Ok(res.get("events").and_then(Value::as_array).cloned().unwrap_or_default())
}

fn about<'a>(events: &'a [Value], needle: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| mentions(e, needle)).collect()
}

fn action_of(e: &Value) -> String {
    ["action", "event", "type", "name"]
        .iter()
        .find_map(|k| e.get(*k).and_then(Value::as_str))
        .unwrap_or("")
        .to_ascii_lowercase()
}

async fn use_recorded(ctx: Ctx) -> CaseResult {
    events(&ctx).await?;
    let h = ctx.use_role(FixtureRole::Primary).await?;
    let ev = events(&ctx).await?;
    ensure!(!about(&ev, &h.lease_id).is_empty(), "no audit event mentions the lease {} just issued ({} events returned)", h.lease_id, ev.len());
    Ok(())
}

async fn denied_recorded(ctx: Ctx) -> CaseResult {
    events(&ctx).await?;
    let c = ctx.cred(FixtureRole::Denied)?;
    let trace = format!("crp-conformance-denied-{}", super::random_hex(8));
    let mut p = ctx.use_params(&c);
    p["context"]["traceId"] = json!(trace);
    let r = ctx.call("crp/use", p).await?;
    ensure!(r.error().is_some(), "the denied fixture was not denied");
    let ev = events(&ctx).await?;
    let hits: Vec<&Value> = ev
        .iter()
        .filter(|e| mentions(e, &trace) || mentions(e, &c.service) || mentions(e, &c.key))
        .filter(|e| {
            let s = e.to_string().to_ascii_lowercase();
            s.contains("deny") || s.contains("denied")
        })
        .collect();
    ensure!(!hits.is_empty(), "no audit event records the denial of {}", c.service);
    Ok(())
}

async fn lease_events(ctx: Ctx) -> CaseResult {
    events(&ctx).await?;
    let a = ctx.use_role(FixtureRole::Primary).await?;
    ctx.renew(&a.lease_id, Some(60)).await?.expect_result("crp/lease renew")?;
    ctx.release(&a.lease_id).await?.expect_result("crp/lease release")?;
    let b = ctx.use_role(FixtureRole::Primary).await?;
    ctx.revoke(&b.lease_id).await?.expect_result("crp/revoke")?;
    let ev = events(&ctx).await?;
    let acts_a: Vec<String> = about(&ev, &a.lease_id).into_iter().map(action_of).collect();
    let acts_b: Vec<String> = about(&ev, &b.lease_id).into_iter().map(action_of).collect();
    ctx.note(format!("events for the renewed/released lease: {acts_a:?}; for the revoked lease: {acts_b:?}"));
    ensure!(acts_a.iter().any(|x| x.contains("renew")), "no renewal event for lease {}", a.lease_id);
    ensure!(acts_a.iter().any(|x| x.contains("release")), "no release event for lease {}", a.lease_id);
    ensure!(acts_b.iter().any(|x| x.contains("revoke")), "no revocation event for lease {}", b.lease_id);
    Ok(())
}

async fn proxy_recorded(ctx: Ctx) -> CaseResult {
    events(&ctx).await?;
    let h = ctx.use_role(FixtureRole::Primary).await?;
    let before = about(&events(&ctx).await?, &h.lease_id).len();
    let p = ctx.proxy(&h, ProxyReq::get("/audited")).await?;
    ensure!(p.arrival.is_some(), "the proxied request did not reach the upstream (HTTP {})", p.status);
    let after = about(&events(&ctx).await?, &h.lease_id).len();
    ensure!(after > before, "the proxied request added no audit event for lease {} ({before} before, {after} after)", h.lease_id);
    Ok(())
}

async fn expiry_recorded(ctx: Ctx) -> CaseResult {
    events(&ctx).await?;
    let c = ctx.cred(FixtureRole::ShortTtl)?;
    let mut p = ctx.use_params(&c);
    p["ttl"] = json!(c.max_ttl);
    let h = ctx.use_with(p).await?;
    sleep_past(h.expires_at.as_deref(), u64::from(c.max_ttl), Duration::from_millis(200), Duration::from_secs(u64::from(c.max_ttl) + 2)).await;
    let lease = h.lease_id.clone();
    let wait = ctx.shared().audit_wait;
    let found = ctx
        .poll(wait, || {
            let ctx = ctx.clone();
            let lease = lease.clone();
            async move {
                let ev = events(&ctx).await?;
                Ok(about(&ev, &lease).into_iter().any(|e| action_of(e).contains("expire")).then_some(()))
            }
        })
        .await?;
    ensure!(
        found.is_some(),
        "no expiry event (an action containing `expire`) for lease {lease} within {:.1} s of its expiry \
         (raise --audit-wait if the provider records expiries on a slower schedule)",
        wait.as_secs_f64()
    );
    Ok(())
}

async fn no_secret(ctx: Ctx) -> CaseResult {
    let r = ctx.call(AUDIT_QUERY, json!({"limit": 1000})).await?;
    if let Some(e) = r.error()
        && matches!(e.code, -32601 | -33003 | -33011)
    {
        skip!("the audit query is not available to the runner ({})", e.code);
    }
    r.expect_result(AUDIT_QUERY)?;
    ctx.no_leak("the audit trail", &r.raw)
}
