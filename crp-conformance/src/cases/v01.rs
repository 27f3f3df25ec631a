//! CRP v0.1 for providers that still speak it (superseded by v0.2; run under `CRP-Version:
//! 0.1`). `crp/resolve` returns material, so these cases use the fixture whose access says
//! `export: true` and check everything else stays refused. Tiers follow v0.1 §13.3.

use serde_json::{Value, json};

use super::{bx, describe, estimate_bits, refused};
use crate::catalog::{Case, CaseResult, Level::*, Stop, Tier::*};
use crate::ctx::Ctx;
use crate::schemas;
use crate::transport::Discovery;
use crate::{ensure, fail, skip};
use crp_core::fixtures::FixtureRole;

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case::new("v01.capability", Basic, "0.1", "§5.3", Must,
            "Under 0.1 the capability says version 0.1 and features include resolve", |c| bx(capability(c))),
        Case::new("v01.resolve-shape", Basic, "0.1", "§6.1", Must,
            "crp/resolve answers credential, lease, service per the resolve-result schema", |c| bx(resolve_shape(c))),
        Case::new("v01.resolve-material", Basic, "0.1", "§7.1", Must,
            "The exported api_key carries the stored key", |c| bx(material(c))),
        Case::new("v01.resolve-ttl", Basic, "0.1", "§8.1", Must,
            "A resolve lease never exceeds the requested TTL or the service maximum", |c| bx(ttl(c))),
        Case::new("v01.lease-id-entropy", Basic, "0.1", "§11.2", Must,
            "Resolve lease ids carry at least 128 bits and are distinct", |c| bx(entropy(c))),
        Case::new("v01.default-deny", Basic, "0.1", "§11.3", Must,
            "Resolve is refused, without material, where the policy does not permit export", |c| bx(default_deny(c))),
        Case::new("v01.denied-code", Basic, "0.1", "§9.3", Should,
            "A denied resolve is -33003 policy_denied", |c| bx(denied_code(c))),
        Case::new("v01.audit-resolved", Basic, "0.1", "§10.1", Must,
            "A resolve is recorded in the audit trail (credential.resolved)", |c| bx(audit_resolved(c))),
        Case::new("v01.lease-renew", Standard, "0.1", "§6.2", Must,
            "crp/lease renew answers a lease within the caps", |c| bx(renew(c))),
        Case::new("v01.lease-release", Standard, "0.1", "§6.2", Must,
            "crp/lease release answers {released: true, leaseId}", |c| bx(release(c))),
        Case::new("v01.revoke", Standard, "0.1", "§6.3", Must,
            "crp/revoke answers {revoked: true, leaseId, revokedAt}", |c| bx(revoke(c))),
        Case::new("v01.list", Full, "0.1", "§6.4", Must,
            "crp/list answers services with service and credentialTypes, no material", |c| bx(list(c))),
    ]
}

fn resolve_params(ctx: &Ctx, role: FixtureRole, ttl: u64) -> Result<Value, Stop> {
    let c = ctx.cred(role)?;
    Ok(json!({
        "service": c.service, "ttl": ttl, "credentialType": c.credential_type.as_str(),
        "context": {"consumer": "crp-conformance", "purpose": "conformance v0.1 export"}
    }))
}

async fn resolve(ctx: &Ctx, ttl: u64) -> Result<Value, Stop> {
    let r = ctx.call("crp/resolve", resolve_params(ctx, FixtureRole::Export, ttl)?).await?;
    Ok(r.expect_result("crp/resolve")?.clone())
}

async fn capability(ctx: Ctx) -> CaseResult {
    match ctx.discovery(Some("0.1")) {
        Some(Discovery::Capability(c)) => {
            ctx.record("response", "capability under 0.1", &c.to_string());
            ensure!(c.get("version") == Some(&json!("0.1")), "asked for 0.1, the capability says version {:?}", c.get("version"));
            ensure!(ctx.features().iter().any(|f| f == "resolve"), "features {:?} lack \"resolve\", REQUIRED in 0.1", ctx.features());
            Ok(())
        }
        Some(Discovery::Refused(e)) => fail!("discovery under 0.1 was refused: {e}"),
        Some(Discovery::Unavailable(m)) => skip!("{m}"),
        None => skip!("no discovery under 0.1"),
    }
}

async fn resolve_shape(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Export)?;
    let res = resolve(&ctx, 60).await?;
    if let Err(errs) = schemas::check("resolve-result", &res) {
        fail!("the result does not match schemas/resolve-result.schema.json: {}", errs.join("; "));
    }
    ensure!(res.pointer("/credential/type").is_some_and(Value::is_string), "credential.type is missing");
    for f in ["id", "expiresAt", "ttl", "renewable"] {
        ensure!(res.pointer(&format!("/lease/{f}")).is_some(), "lease.{f} is missing");
    }
    ensure!(res.get("service") == Some(&json!(c.service)), "service is {:?}, expected {}", res.get("service"), c.service);
    Ok(())
}

async fn material(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Export)?;
    let res = resolve(&ctx, 60).await?;
    let key = res.pointer("/credential/key").or_else(|| res.pointer("/credential/value")).and_then(Value::as_str);
    ensure!(key == Some(c.value.expose()), "credential.key is not the stored value of {}", c.key);
    Ok(())
}

async fn ttl(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Export)?;
    let small = resolve(&ctx, 30).await?;
    let t = small.pointer("/lease/ttl").and_then(Value::as_u64).unwrap_or(u64::MAX);
    ensure!(t <= 30, "asked ttl 30, got {t}");
    let big = resolve(&ctx, 86400).await?;
    let t = big.pointer("/lease/ttl").and_then(Value::as_u64).unwrap_or(u64::MAX);
    ensure!(t <= u64::from(c.max_ttl), "asked 86400 on a service capped at {} s, got {t}", c.max_ttl);
    Ok(())
}

async fn entropy(ctx: Ctx) -> CaseResult {
    let mut ids = vec![];
    for _ in 0..6 {
        let r = resolve(&ctx, 60).await?;
        ids.push(r.pointer("/lease/id").and_then(Value::as_str).unwrap_or("").to_string());
    }
    let mut d = ids.clone();
    d.sort();
    d.dedup();
    ensure!(d.len() == ids.len(), "6 resolves gave {} distinct lease ids", d.len());
    let bits = estimate_bits(&ids);
    ctx.note(format!("estimated randomness: {bits:.0} bits"));
    ensure!(bits >= 128.0, "lease ids carry about {bits:.0} bits of randomness, fewer than 128");
    Ok(())
}

async fn default_deny(ctx: Ctx) -> CaseResult {
    for role in [FixtureRole::Denied, FixtureRole::Primary] {
        let r = ctx.call("crp/resolve", resolve_params(&ctx, role, 60)?).await?;
        let e = refused(&r, &format!("crp/resolve on the {role:?} fixture (export not permitted)"))?;
        ctx.note(format!("{role:?}: refused with {}", describe(&e)));
    }
    Ok(())
}

async fn denied_code(ctx: Ctx) -> CaseResult {
    let r = ctx.call("crp/resolve", resolve_params(&ctx, FixtureRole::Denied, 60)?).await?;
    let e = refused(&r, "crp/resolve on the denied fixture")?;
    ensure!(e.code == -33003, "refused with {}, expected -33003", describe(&e));
    Ok(())
}

async fn renew(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Export)?;
    let res = resolve(&ctx, 60).await?;
    let id = res.pointer("/lease/id").and_then(Value::as_str).unwrap_or("").to_string();
    let r = ctx.renew(&id, Some(86400)).await?;
    let out = r.expect_result("crp/lease renew")?;
    let t = out.pointer("/lease/ttl").and_then(Value::as_u64).unwrap_or(u64::MAX);
    ensure!(t <= u64::from(c.max_ttl), "renewal granted ttl {t} on a service capped at {} s", c.max_ttl);
    Ok(())
}

async fn release(ctx: Ctx) -> CaseResult {
    let res = resolve(&ctx, 60).await?;
    let id = res.pointer("/lease/id").and_then(Value::as_str).unwrap_or("").to_string();
    let r = ctx.release(&id).await?;
    let out = r.expect_result("crp/lease release")?;
    ensure!(out.get("released") == Some(&json!(true)) && out.get("leaseId") == Some(&json!(id)), "expected {{released: true, leaseId}}, got {out}");
    let again = ctx.renew(&id, Some(60)).await?;
    refused(&again, "renewing a released lease").map(|_| ())
}

async fn revoke(ctx: Ctx) -> CaseResult {
    let res = resolve(&ctx, 60).await?;
    let id = res.pointer("/lease/id").and_then(Value::as_str).unwrap_or("").to_string();
    let r = ctx.revoke(&id).await?;
    let out = r.expect_result("crp/revoke")?;
    ensure!(out.get("revoked") == Some(&json!(true)), "revoked is not true: {out}");
    ensure!(out.get("leaseId") == Some(&json!(id)), "leaseId does not echo the revoked lease");
    ensure!(out.get("revokedAt").and_then(Value::as_str).and_then(super::instant).is_some(), "revokedAt is not RFC 3339");
    Ok(())
}

async fn list(ctx: Ctx) -> CaseResult {
    let r = ctx.call("crp/list", json!({})).await?;
    let res = r.expect_result("crp/list")?;
    let services = res.get("services").and_then(Value::as_array).cloned().unwrap_or_default();
    ensure!(!services.is_empty(), "the listing is empty");
    for s in &services {
        ensure!(s.get("service").is_some_and(Value::is_string) && s.get("credentialTypes").is_some_and(Value::is_array), "a malformed entry: {s}");
    }
    ctx.no_leak("the 0.1 crp/list result", &r.raw)
}

async fn audit_resolved(ctx: Ctx) -> CaseResult {
    super::audit::events(&ctx).await?;
    let res = resolve(&ctx, 60).await?;
    let id = res.pointer("/lease/id").and_then(Value::as_str).unwrap_or("").to_string();
    let ev = super::audit::events(&ctx).await?;
    ensure!(ev.iter().any(|e| super::mentions(e, &id)), "no audit event mentions the resolved lease {id}");
    ctx.no_leak("the audit trail after an export", &serde_json::to_string(&ev).unwrap_or_default())
}
