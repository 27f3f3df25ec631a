//! v0.2 §5.1 `crp/use`: the handle's shape, no material in it, TTL and scope caps, lease id
//! entropy (v0.1 §11.2, which v0.2 keeps), and refusals of unknown services and bad params.

use serde_json::{Value, json};

use super::{bx, describe, estimate_bits, instant, now, refused};
use crate::catalog::{Case, CaseResult, Level::*, Tier::*};
use crate::ctx::Ctx;
use crate::schemas;
use crate::{ensure, fail};
use crp_core::fixtures::{FixtureOutcome, FixtureRole};

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case::new("use.result-shape", Basic, "0.2", "§5.1", Must,
            "The crp/use result matches the use-result schema and echoes the service", |c| bx(shape(c))),
        Case::new("use.no-secret-in-result", Basic, "0.2", "§5.1", Must,
            "No crp/use result carries credential material (raw, hex, base64, URL-encoded)", |c| bx(no_secret(c))),
        Case::new("use.ttl-within-request", Basic, "0.1", "§8.1", Must,
            "The granted TTL never exceeds the requested TTL", |c| bx(ttl_request(c))),
        Case::new("use.ttl-within-max", Basic, "0.1", "§8.1", Must,
            "The granted TTL never exceeds the service's maximum", |c| bx(ttl_max(c))),
        Case::new("use.expires-at", Basic, "0.1", "§6.1", Should,
            "lease.expiresAt is an RFC 3339 instant about ttl seconds ahead", |c| bx(expires_at(c))),
        Case::new("use.scopes-subset", Basic, "0.2", "§5.1", Must,
            "grantedScopes is a subset of the requested scopes", |c| bx(scopes_subset(c))),
        Case::new("use.unknown-scope", Basic, "0.1", "§6.1", Must,
            "A scope the service does not offer is never granted", |c| bx(unknown_scope(c))),
        Case::new("use.unknown-service", Basic, "0.1", "§12", Must,
            "An unknown service is refused without a handle", |c| bx(unknown_service(c))),
        Case::new("use.unknown-service-code", Basic, "0.1", "§12", Should,
            "An unknown service is refused with -33002 service_not_found", |c| bx(unknown_service_code(c))),
        Case::new("use.lease-id-entropy", Basic, "0.1", "§11.2", Must,
            "Lease ids carry at least 128 bits of randomness (estimated over 8 leases)", |c| bx(entropy(c))),
        Case::new("use.lease-id-unique", Basic, "0.1", "§11.2", Must,
            "Every lease gets a distinct id", |c| bx(unique(c))),
        Case::new("use.descriptor-type", Basic, "0.2", "§6.1", Should,
            "credentialDescriptor.type names the credential's type", |c| bx(descriptor_type(c))),
    ]
}

async fn shape(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Primary)?;
    let r = ctx.call("crp/use", ctx.use_params(&c)).await?;
    let res = r.expect_result("crp/use")?;
    if let Err(errs) = schemas::check("use-result", res) {
        fail!("the result does not match schemas/use-result.schema.json: {}", errs.join("; "));
    }
    ensure!(res.get("service") == Some(&json!(c.service)), "service is {:?}, expected {:?}", res.get("service"), c.service);
    let url = res.get("proxyBaseUrl").and_then(Value::as_str).unwrap_or("");
    let parsed = reqwest::Url::parse(url);
    ensure!(
        parsed.as_ref().is_ok_and(|u| u.scheme() == "http" || u.scheme() == "https"),
        "proxyBaseUrl `{url}` is not an absolute http(s) URL"
    );
    Ok(())
}

async fn no_secret(ctx: Ctx) -> CaseResult {
    let agent = ctx.fixtures().agent().to_string();
    let creds: Vec<_> = ctx
        .fixtures()
        .credentials
        .iter()
        .filter(|c| c.outcome_for(&agent) == FixtureOutcome::Allow)
        .cloned()
        .collect();
    for c in creds {
        let r = ctx.call("crp/use", ctx.use_params(&c)).await?;
        r.expect_result(&format!("crp/use {}", c.service))?;
        ctx.no_leak(&format!("the crp/use result for {}", c.service), &r.raw)?;
    }
    Ok(())
}

async fn ttl_request(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Primary)?;
    let mut p = ctx.use_params(&c);
    p["ttl"] = json!(30);
    let started = now();
    let h = ctx.use_with(p).await?;
    let ttl = h.ttl.unwrap_or(0);
    ensure!(ttl <= 30, "asked for ttl 30, granted {ttl}");
    if let Some(e) = h.expires_at.as_deref().and_then(instant) {
        let secs = (e - started).as_seconds_f64();
        ensure!(secs <= 32.0, "asked for ttl 30, expiresAt is {secs:.0} s ahead");
    }
    Ok(())
}

async fn ttl_max(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Primary)?;
    let mut p = ctx.use_params(&c);
    p["ttl"] = json!(86400);
    let started = now();
    let h = ctx.use_with(p).await?;
    let ttl = h.ttl.unwrap_or(u64::MAX);
    ensure!(ttl <= u64::from(c.max_ttl), "asked for 86400 on a service capped at {} s, granted {ttl}", c.max_ttl);
    if let Some(e) = h.expires_at.as_deref().and_then(instant) {
        let secs = (e - started).as_seconds_f64();
        ensure!(secs <= f64::from(c.max_ttl) + 2.0, "service capped at {} s, expiresAt is {secs:.0} s ahead", c.max_ttl);
    }
    Ok(())
}

async fn expires_at(ctx: Ctx) -> CaseResult {
    let started = now();
    let h = ctx.use_role(FixtureRole::Primary).await?;
    let Some(raw) = h.expires_at.clone() else { fail!("lease.expiresAt is missing") };
    let Some(e) = instant(&raw) else { fail!("lease.expiresAt `{raw}` is not RFC 3339") };
    let ttl = h.ttl.unwrap_or(0) as f64;
    let ahead = (e - started).as_seconds_f64();
    ensure!((ahead - ttl).abs() <= 5.0, "lease.ttl is {ttl} but expiresAt is {ahead:.1} s ahead");
    Ok(())
}

async fn scopes_subset(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Primary)?;
    let asked: Vec<String> = c.scopes.iter().take(1).cloned().collect();
    let mut p = ctx.use_params(&c);
    p["scopes"] = json!(asked);
    let h = ctx.use_with(p).await?;
    let extra: Vec<&String> = h.granted.iter().filter(|g| !asked.contains(g)).collect();
    ensure!(extra.is_empty(), "asked for {asked:?}, granted {:?} (extra: {extra:?})", h.granted);
    Ok(())
}

async fn unknown_scope(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Primary)?;
    let bogus = "crp-conformance:admin";
    let mut p = ctx.use_params(&c);
    p["scopes"] = json!([c.scopes.first().cloned().unwrap_or_default(), bogus]);
    let r = ctx.call("crp/use", p).await?;
    match (r.result(), r.error()) {
        (Some(res), _) => {
            let granted = res.get("grantedScopes").cloned().unwrap_or(json!([]));
            ensure!(!super::mentions(&granted, bogus), "the provider granted `{bogus}`, which the service does not offer (granted {granted})");
            ctx.note("the provider narrowed the grant instead of refusing: allowed");
        }
        (None, Some(e)) => ctx.note(format!("refused with {}", describe(&e))),
        _ => fail!("the answer has neither result nor error"),
    }
    Ok(())
}

async fn unknown_service(ctx: Ctx) -> CaseResult {
    let r = ctx.call("crp/use", json!({"service": "conformance.test/no-such-service", "ttl": 60})).await?;
    refused(&r, "crp/use on an unknown service").map(|_| ())
}

async fn unknown_service_code(ctx: Ctx) -> CaseResult {
    let r = ctx.call("crp/use", json!({"service": "conformance.test/no-such-service", "ttl": 60})).await?;
    let e = refused(&r, "crp/use on an unknown service")?;
    ensure!(e.code == -33002, "refused with {}, expected -33002 service_not_found", describe(&e));
    Ok(())
}

async fn leases(ctx: &Ctx, n: usize) -> Result<Vec<String>, crate::catalog::Stop> {
    let mut ids = vec![];
    for _ in 0..n {
        let h = ctx.use_role(FixtureRole::Primary).await?;
        ids.push(h.lease_id);
    }
    for id in &ids {
        // Tidy up; the answer does not matter here.
        let _ = ctx.release(id).await;
    }
    Ok(ids)
}

async fn entropy(ctx: Ctx) -> CaseResult {
    let ids = leases(&ctx, 8).await?;
    let bits = estimate_bits(&ids);
    ctx.note(format!("estimated randomness: {bits:.0} bits (ids: {})", ids.join(", ")));
    ensure!(bits >= 128.0, "lease ids carry about {bits:.0} bits of randomness, fewer than 128");
    Ok(())
}

async fn unique(ctx: Ctx) -> CaseResult {
    let ids = leases(&ctx, 8).await?;
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    ensure!(sorted.len() == ids.len(), "8 crp/use calls gave only {} distinct lease ids", sorted.len());
    Ok(())
}

async fn descriptor_type(ctx: Ctx) -> CaseResult {
    for role in [FixtureRole::Primary, FixtureRole::Basic] {
        let c = ctx.cred(role)?;
        let h = ctx.use_with(ctx.use_params(&c)).await?;
        let t = h.result.pointer("/credentialDescriptor/type").cloned().unwrap_or(Value::Null);
        ensure!(t == json!(c.credential_type.as_str()), "{}: credentialDescriptor.type is {t}, expected {:?}", c.service, c.credential_type.as_str());
    }
    Ok(())
}
