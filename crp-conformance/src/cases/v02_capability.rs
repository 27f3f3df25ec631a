//! v0.2 §4 (capability negotiation), §8 (conformance tiers) and §10 (no export advertised as
//! CRP): what a provider says about itself, and whether it is true.

use serde_json::{Value, json};

use super::bx;
use crate::catalog::{Case, CaseResult, Level::*, Stop, Tier, Tier::*};
use crate::ctx::Ctx;
use crate::schemas;
use crate::transport::Discovery;
use crate::{ensure, fail, skip};
use crp_core::fixtures::FixtureRole;

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case::new("capability.advertised", Basic, "0.2", "§4", Must,
            "The provider advertises experimental.crp with version and features", |c| bx(advertised(c))),
        Case::new("capability.schema", Basic, "0.2", "§4", Must,
            "The capability object matches the capability schema", |c| bx(schema(c))),
        Case::new("capability.features-include-use", Basic, "0.2", "§4", Must,
            "features includes \"use\"", |c| bx(includes_use(c))),
        Case::new("capability.features-honest", Basic, "0.2", "§4", Must,
            "Every advertised feature actually works", |c| bx(honest(c))),
        Case::new("capability.conformance-claim", Basic, "0.2", "§8", Must,
            "conformance names a tier, at least the tier under test", |c| bx(claim(c))),
        Case::new("capability.tier-features", Basic, "0.2", "§8", Must,
            "The claimed tier's required operations are all advertised", |c| bx(tier_features(c))),
        Case::new("capability.no-export-advertised", Basic, "0.2", "§10", Must,
            "Under 0.2, no secret-returning operation (resolve) is advertised as CRP", |c| bx(no_export(c))),
    ]
}

fn cap(ctx: &Ctx) -> Result<Value, Stop> {
    match ctx.discovery(Some(ctx.version())) {
        Some(Discovery::Capability(c)) => {
            ctx.record("response", "capability", &serde_json::to_string_pretty(c).unwrap_or_default());
            Ok(c.clone())
        }
        Some(Discovery::Refused(e)) => {
            ctx.record("response", "discovery refused", &e.to_string());
            Err(Stop::Fail("discovery was refused (see evidence)".into()))
        }
        Some(Discovery::Unavailable(why)) => Err(Stop::Skip(why.clone())),
        None => Err(Stop::Skip("no discovery was made for this version".into())),
    }
}

async fn advertised(ctx: Ctx) -> CaseResult {
    let c = cap(&ctx)?;
    ensure!(c.is_object(), "the capability is not a JSON object");
    let v = c.get("version").and_then(Value::as_str).unwrap_or("");
    let ok = v.split_once('.').is_some_and(|(a, b)| {
        !a.is_empty() && !b.is_empty() && a.bytes().all(|x| x.is_ascii_digit()) && b.bytes().all(|x| x.is_ascii_digit())
    });
    ensure!(ok, "version `{v}` is not MAJOR.MINOR");
    ensure!(c.get("features").is_some_and(Value::is_array), "features is missing or not an array");
    ctx.no_leak("the capability", &c.to_string())
}

async fn schema(ctx: Ctx) -> CaseResult {
    let c = cap(&ctx)?;
    if let Err(errs) = schemas::check("capability", &c) {
        fail!("the capability does not match schemas/capability.schema.json: {}", errs.join("; "));
    }
    Ok(())
}

async fn includes_use(ctx: Ctx) -> CaseResult {
    cap(&ctx)?;
    let f = ctx.features();
    ensure!(f.iter().any(|x| x == "use"), "features {f:?} does not include \"use\"");
    Ok(())
}

/// One probe per advertised feature.
async fn honest(ctx: Ctx) -> CaseResult {
    cap(&ctx)?;
    let mut broken = vec![];
    for f in ctx.features() {
        let r = probe(&ctx, &f).await;
        match r {
            Ok(()) => ctx.note(format!("feature `{f}`: works")),
            Err(Stop::Fail(m)) => {
                ctx.note(format!("feature `{f}`: {m}"));
                broken.push(format!("{f} ({m})"));
            }
            Err(Stop::Skip(m)) => ctx.note(format!("feature `{f}`: not probed: {m}")),
            Err(e) => return Err(e),
        }
    }
    ensure!(broken.is_empty(), "advertised but not working: {}", broken.join("; "));
    Ok(())
}

async fn probe(ctx: &Ctx, feature: &str) -> CaseResult {
    match feature {
        "use" => ctx.use_role(FixtureRole::Primary).await.map(|_| ()),
        "lease" => {
            let h = ctx.use_role(FixtureRole::Primary).await?;
            ctx.renew(&h.lease_id, Some(60)).await?.expect_result("crp/lease renew")?;
            ctx.release(&h.lease_id).await?.expect_result("crp/lease release")?;
            Ok(())
        }
        "revoke" => {
            let h = ctx.use_role(FixtureRole::Primary).await?;
            ctx.revoke(&h.lease_id).await?.expect_result("crp/revoke")?;
            Ok(())
        }
        "list" => ctx.call("crp/list", json!({})).await?.expect_result("crp/list").map(|_| ()),
        "delegate" => {
            let c = ctx.cred(FixtureRole::Primary)?;
            let h = ctx.use_role(FixtureRole::Primary).await?;
            let mut p = ctx.use_params(&c);
            p["delegation"] = json!({"parentLeaseId": h.lease_id});
            ctx.use_with(p).await.map(|_| ())
        }
        "broker" => {
            let h = ctx.use_role(FixtureRole::Brokered).await?;
            ensure!(
                h.result.pointer("/credentialDescriptor/brokered") == Some(&json!(true)),
                "the brokered fixture's descriptor does not say brokered: true"
            );
            Ok(())
        }
        "classify" => {
            let h = ctx.use_role(FixtureRole::Primary).await?;
            ensure!(
                h.result.pointer("/credentialDescriptor/classification").is_some_and(Value::is_string),
                "credentialDescriptor.classification is missing"
            );
            Ok(())
        }
        "resolve" => skip!("resolve is checked by capability.no-export-advertised and the v0.1 cases"),
        other => skip!("`{other}` is not a CRP feature this suite knows"),
    }
}

fn required(tier: Tier) -> &'static [&'static str] {
    match tier {
        Basic => &["use", "lease"],
        Standard => &["use", "lease", "list", "revoke", "classify"],
        Full => &["use", "lease", "list", "revoke", "classify", "delegate", "broker"],
    }
}

async fn claim(ctx: Ctx) -> CaseResult {
    let c = cap(&ctx)?;
    let Some(claimed) = c.get("conformance").and_then(Value::as_str) else {
        fail!("the capability has no `conformance` tier");
    };
    let Some(t) = Tier::parse(claimed) else {
        fail!("conformance `{claimed}` is not basic, standard or full");
    };
    let testing = ctx.shared().tier;
    ensure!(
        t >= testing,
        "the provider claims `{claimed}` but is being tested at `{}`: a run at a tier validates a claim of that tier",
        testing.as_str()
    );
    if t > testing {
        ctx.note(format!("the claim `{claimed}` is above the tier under test; run --tier {claimed} to verify it"));
    }
    Ok(())
}

async fn tier_features(ctx: Ctx) -> CaseResult {
    let c = cap(&ctx)?;
    let claimed = c.get("conformance").and_then(Value::as_str).and_then(Tier::parse).unwrap_or(ctx.shared().tier);
    let have = ctx.features();
    let missing: Vec<&str> = required(claimed).iter().copied().filter(|f| !have.iter().any(|h| h == f)).collect();
    ensure!(
        missing.is_empty(),
        "tier `{}` requires {:?} but features lacks {missing:?}",
        claimed.as_str(),
        required(claimed)
    );
    Ok(())
}

async fn no_export(ctx: Ctx) -> CaseResult {
    cap(&ctx)?;
    let f = ctx.features();
    ensure!(!f.iter().any(|x| x == "resolve"), "features under {} include \"resolve\", an operation returning credential material", ctx.version());
    Ok(())
}
