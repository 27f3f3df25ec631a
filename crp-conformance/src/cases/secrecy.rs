//! No secret in any answer: errors (v0.1 §12: `data` MUST NOT contain credential material;
//! v0.1 §11.1: no secrets in error messages) and, at the end, a sweep of every JSON-RPC answer
//! of the run (v0.2 §10: material never leaves the provider on the conforming path). The only
//! allowed exception is a v0.1 `crp/resolve` export carrying the exported credential itself.

use serde_json::json;

use super::{bogus_lease_id, bx};
use crate::catalog::{Case, CaseResult, Level::*, Tier::*};
use crate::ctx::Ctx;
use crate::{ensure, fail};
use crp_core::fixtures::FixtureRole;

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case::new("errors.no-secret", Basic, "0.1", "§12", Must,
            "No error (message or data) carries credential material", |c| bx(errors(c))),
        Case::new("errors.no-echo-of-misplaced-secret", Basic, "0.1", "§11.1", Should,
            "A secret a caller misplaces into params is not echoed back in the error", |c| bx(misplaced(c))),
        Case::new("secrecy.transcript", Basic, "0.2", "§10", Must,
            "No JSON-RPC answer of the whole run carries credential material (v0.1 exports excepted)", |c| bx(sweep(c))).last(),
    ]
}

async fn errors(ctx: Ctx) -> CaseResult {
    let mut seen = 0;
    for role in [FixtureRole::Denied, FixtureRole::RequireApproval, FixtureRole::Quarantine] {
        let Ok(c) = ctx.cred(role) else { continue };
        let r = ctx.call("crp/use", ctx.use_params(&c)).await?;
        if r.error().is_some() {
            seen += 1;
        }
        ctx.no_leak(&format!("the answer to crp/use on {}", c.service), &r.raw)?;
    }
    let c = ctx.cred(FixtureRole::Primary)?;
    let mut p = ctx.use_params(&c);
    p["scopes"] = json!(["crp-conformance:admin"]);
    let asks = vec![
        ("crp/use", p),
        ("crp/use", json!({"service": c.service, "ttl": 0})),
        ("crp/lease", json!({"action": "renew", "leaseId": bogus_lease_id(None)})),
        ("crp/revoke", json!({"leaseId": bogus_lease_id(None), "reason": "rotation"})),
    ];
    for (m, p) in asks {
        let r = ctx.call(m, p).await?;
        if r.error().is_some() {
            seen += 1;
        }
        ctx.no_leak(&format!("the answer to {m}"), &r.raw)?;
    }
    if let Ok(nr) = ctx.use_role(FixtureRole::NotRenewable).await {
        let r = ctx.renew(&nr.lease_id, Some(60)).await?;
        ctx.no_leak("the answer to renewing a non-renewable lease", &r.raw)?;
    }
    ensure!(seen > 0, "none of the error-provoking requests produced an error");
    Ok(())
}

async fn misplaced(ctx: Ctx) -> CaseResult {
    let c = ctx.cred(FixtureRole::Primary)?;
    let secret = c.value.expose().to_string();
    for p in [
        json!({"service": c.service, "ttl": secret}),
        json!({"service": format!("{secret} !")}),
        json!({"service": c.service, "context": {"consumer": 7, "purpose": secret}}),
    ] {
        let r = ctx.call("crp/use", p).await?;
        if r.result().is_some() {
            continue;
        }
        if !ctx.leaks_in(&r.raw).is_empty() {
            fail!("the error echoes the value the caller misplaced into params");
        }
    }
    Ok(())
}

async fn sweep(ctx: Ctx) -> CaseResult {
    let transcript = ctx.shared().transcript.lock().map(|t| t.clone()).unwrap_or_default();
    let export_labels = |service: &str| -> Option<String> {
        ctx.fixtures().by_service(service).map(|c| format!("canary:{}", c.key.rsplit('/').next().unwrap_or(&c.key)))
    };
    let mut bad = vec![];
    for s in &transcript {
        // Requests that deliberately carried a canary (misplaced-secret probes) may have it
        // echoed in their *own* case, which judges that separately.
        if s.case == "errors.no-echo-of-misplaced-secret" {
            continue;
        }
        let allowed = s.export_of.as_deref().and_then(export_labels);
        let found: Vec<String> = ctx
            .leaks_in(&s.text)
            .into_iter()
            .filter(|f| Some(&f.label) != allowed.as_ref())
            .map(|f| f.to_string())
            .collect();
        if !found.is_empty() {
            bad.push(format!("{} answer in case {}: {}", s.method, s.case, found.join(", ")));
        }
    }
    ctx.note(format!("{} answers examined", transcript.len()));
    ensure!(bad.is_empty(), "credential material in {} answer(s): {}", bad.len(), bad.join("; "));
    Ok(())
}
