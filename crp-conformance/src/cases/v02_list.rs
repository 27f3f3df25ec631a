//! v0.2 §5.2 `crp/list` (v0.1 §6.4 shapes, §9.1 policy-scoped listing) and classification
//! (v0.2 §3/§4 `classify`): discovery without secrets, pagination, labels.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::bx;
use crate::catalog::{Case, CaseResult, Level::*, Stop, Tier::*};
use crate::ctx::Ctx;
use crate::schemas;
use crate::{ensure, fail};
use crp_core::fixtures::{FixtureOutcome, FixtureRole};

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case::new("list.shape", Standard, "0.2", "§5.2", Must,
            "crp/list answers services[] with service and credentialTypes per the list-result schema", |c| bx(shape(c))),
        Case::new("list.no-secret", Standard, "0.2", "§5.2", Must,
            "No listing carries credential material", |c| bx(no_secret(c))),
        Case::new("list.shows-allowed", Standard, "0.2", "§5.2", Should,
            "Every service the caller may use is listed", |c| bx(shows_allowed(c))),
        Case::new("list.hides-denied", Standard, "0.1", "§9.1", Must,
            "A service the caller is denied is not listed", |c| bx(hides_denied(c))),
        Case::new("list.limit", Standard, "0.1", "§6.4", Must,
            "A page never holds more than limit services", |c| bx(limit(c))),
        Case::new("list.pagination", Standard, "0.1", "§6.4", Should,
            "Following cursors visits every service once and ends with a null cursor", |c| bx(pagination(c))),
        Case::new("list.prefix-filter", Standard, "0.1", "§6.4", Should,
            "filter.servicePrefix returns only matching services", |c| bx(prefix(c))),
        Case::new("list.type-filter", Standard, "0.1", "§6.4", Should,
            "filter.credentialType returns only services offering that type", |c| bx(type_filter(c))),
        Case::new("classify.descriptor", Standard, "0.2", "§3", Must,
            "credentialDescriptor.classification is the credential's label", |c| bx(descriptor(c))),
        Case::new("classify.list", Standard, "0.2", "§5.2", Must,
            "crp/list carries each service's classification", |c| bx(list_labels(c))),
    ]
}

/// All pages of `crp/list` with `limit`, at most 100 pages.
async fn all_pages(ctx: &Ctx, limit: Option<u64>, filter: Option<Value>) -> Result<Vec<Value>, Stop> {
    let mut out = vec![];
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let mut p = json!({});
        if let Some(l) = limit {
            p["limit"] = json!(l);
        }
        if let Some(f) = &filter {
            p["filter"] = f.clone();
        }
        if let Some(c) = &cursor {
            p["cursor"] = json!(c);
        }
        let r = ctx.call("crp/list", p).await?;
        let res = r.expect_result("crp/list")?;
        let page = res.get("services").and_then(Value::as_array).cloned().unwrap_or_default();
        if let Some(l) = limit {
            ensure!(page.len() as u64 <= l, "asked for limit {l}, got a page of {}", page.len());
        }
        out.extend(page);
        match res.get("cursor") {
            Some(Value::String(c)) if !c.is_empty() => {
                if cursor.as_deref() == Some(c.as_str()) {
                    fail!("the provider returned the same cursor twice");
                }
                cursor = Some(c.clone());
            }
            _ => return Ok(out),
        }
    }
    fail!("100 pages and the cursor has not ended")
}

fn names(services: &[Value]) -> Vec<String> {
    services.iter().filter_map(|s| s.get("service").and_then(Value::as_str)).map(str::to_string).collect()
}

fn with_outcome(ctx: &Ctx, o: FixtureOutcome) -> Vec<String> {
    let agent = ctx.fixtures().agent().to_string();
    ctx.fixtures().credentials.iter().filter(|c| c.outcome_for(&agent) == o).map(|c| c.service.clone()).collect()
}

async fn shape(ctx: Ctx) -> CaseResult {
    let r = ctx.call("crp/list", json!({})).await?;
    let res = r.expect_result("crp/list")?;
    if let Err(errs) = schemas::check("list-result", res) {
        fail!("the result does not match schemas/list-result.schema.json: {}", errs.join("; "));
    }
    let services = res.get("services").and_then(Value::as_array).cloned().unwrap_or_default();
    ensure!(!services.is_empty(), "the listing is empty although the fixtures allow several services");
    for s in &services {
        ensure!(s.get("service").is_some_and(Value::is_string), "an entry has no service string: {s}");
        ensure!(s.get("credentialTypes").is_some_and(Value::is_array), "an entry has no credentialTypes array: {s}");
    }
    Ok(())
}

async fn no_secret(ctx: Ctx) -> CaseResult {
    let r = ctx.call("crp/list", json!({"limit": 500})).await?;
    r.expect_result("crp/list")?;
    ctx.no_leak("the crp/list result", &r.raw)?;
    let r = ctx.call("crp/list", json!({"filter": {"servicePrefix": "conformance"}})).await?;
    ctx.no_leak("the filtered crp/list result", &r.raw)
}

async fn shows_allowed(ctx: Ctx) -> CaseResult {
    let listed = names(&all_pages(&ctx, None, None).await?);
    let missing: Vec<String> = with_outcome(&ctx, FixtureOutcome::Allow).into_iter().filter(|s| !listed.contains(s)).collect();
    ensure!(missing.is_empty(), "allowed services not listed: {missing:?}");
    Ok(())
}

async fn hides_denied(ctx: Ctx) -> CaseResult {
    let listed = names(&all_pages(&ctx, None, None).await?);
    let shown: Vec<String> = with_outcome(&ctx, FixtureOutcome::Deny).into_iter().filter(|s| listed.contains(s)).collect();
    ensure!(shown.is_empty(), "services the caller is denied are listed: {shown:?}");
    Ok(())
}

async fn limit(ctx: Ctx) -> CaseResult {
    let r = ctx.call("crp/list", json!({"limit": 2})).await?;
    let res = r.expect_result("crp/list")?;
    let n = res.get("services").and_then(Value::as_array).map(Vec::len).unwrap_or(0);
    ensure!(n <= 2, "asked for limit 2, got {n} services");
    Ok(())
}

async fn pagination(ctx: Ctx) -> CaseResult {
    let full: BTreeSet<String> = names(&all_pages(&ctx, None, None).await?).into_iter().collect();
    let paged = names(&all_pages(&ctx, Some(2), None).await?);
    let set: BTreeSet<String> = paged.iter().cloned().collect();
    ensure!(set.len() == paged.len(), "a service appeared on two pages: {paged:?}");
    ensure!(set == full, "pages of 2 list {set:?}, one page lists {full:?}");
    ensure!(full.len() > 2, "only {} services listed: too few to exercise pagination", full.len());
    Ok(())
}

async fn prefix(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Primary)?;
    let pfx: String = c.service.chars().take(c.service.len().saturating_sub(2)).collect();
    let got = names(&all_pages(&ctx, None, Some(json!({"servicePrefix": pfx}))).await?);
    ensure!(got.contains(&c.service), "servicePrefix `{pfx}` does not list {}", c.service);
    let off: Vec<&String> = got.iter().filter(|s| !s.starts_with(&pfx)).collect();
    ensure!(off.is_empty(), "servicePrefix `{pfx}` listed {off:?}");
    Ok(())
}

async fn descriptor(ctx: Ctx) -> CaseResult {
    for role in [FixtureRole::Query, FixtureRole::Primary, FixtureRole::HeaderKey, FixtureRole::Restricted] {
        let c = ctx.cred(role)?;
        let h = ctx.use_with(ctx.use_params(&c)).await?;
        let got = h.result.pointer("/credentialDescriptor/classification").cloned().unwrap_or(Value::Null);
        ensure!(got == json!(c.classification.as_str()), "{}: classification is {got}, expected {:?}", c.service, c.classification.as_str());
    }
    Ok(())
}

async fn list_labels(ctx: Ctx) -> CaseResult {
    let services = all_pages(&ctx, None, None).await?;
    let agent = ctx.fixtures().agent().to_string();
    for c in ctx.fixtures().credentials.iter().filter(|c| c.outcome_for(&agent) == FixtureOutcome::Allow) {
        let Some(entry) = services.iter().find(|s| s.get("service") == Some(&json!(c.service))) else {
            continue;
        };
        let got = entry.get("classification").cloned().unwrap_or(Value::Null);
        ensure!(got == json!(c.classification.as_str()), "{} is listed with classification {got}, expected {:?}", c.service, c.classification.as_str());
    }
    Ok(())
}

async fn type_filter(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Basic)?;
    let t = c.credential_type.as_str();
    let got = all_pages(&ctx, None, Some(json!({"credentialType": t}))).await?;
    let names_got = names(&got);
    ensure!(names_got.contains(&c.service), "filter.credentialType `{t}` does not list {}", c.service);
    for s in &got {
        let types = s.get("credentialTypes").cloned().unwrap_or(json!([]));
        ensure!(super::mentions(&types, t), "filter.credentialType `{t}` listed {} with credentialTypes {types}", s.get("service").unwrap_or(&Value::Null));
    }
    Ok(())
}
