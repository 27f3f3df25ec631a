//! v0.2 §7 graduated outcomes and §8 policy enforcement (v0.1 §9.3, §11.3 default deny):
//! requests the fixtures say must not get a handle don't get one, with the right code.

use super::{bx, describe, refused};
use crate::catalog::{Case, CaseResult, Level::*, Stop, Tier::*};
use crate::ctx::{Ctx, RpcError};
use crate::ensure;
use crp_core::fixtures::FixtureRole;

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case::new("outcome.require-approval", Full, "0.2", "§7", Must,
            "A use that needs approval gets -33020 instead of a handle", |c| bx(approval(c))),
        Case::new("outcome.quarantine", Full, "0.2", "§7", Must,
            "A quarantined use gets -33021 instead of a handle", |c| bx(quarantine(c))),
        Case::new("policy.denied", Full, "0.1", "§11.3", Must,
            "A use the policy denies is refused without a handle", |c| bx(denied(c))),
        Case::new("policy.denied-code", Full, "0.1", "§9.3", Should,
            "A policy denial is -33003 policy_denied (or -33002 if the service is hidden)", |c| bx(denied_code(c))),
    ]
}

async fn refusal(ctx: &Ctx, role: FixtureRole) -> Result<RpcError, Stop> {
    let c = ctx.cred(role)?;
    let r = ctx.call("crp/use", ctx.use_params(&c)).await?;
    refused(&r, &format!("crp/use on {}", c.service))
}

async fn approval(ctx: Ctx) -> CaseResult {
    let e = refusal(&ctx, FixtureRole::RequireApproval).await?;
    ensure!(e.code == -33020, "refused with {}, expected -33020 require_approval", describe(&e));
    Ok(())
}

async fn quarantine(ctx: Ctx) -> CaseResult {
    let e = refusal(&ctx, FixtureRole::Quarantine).await?;
    ensure!(e.code == -33021, "refused with {}, expected -33021 quarantine", describe(&e));
    Ok(())
}

async fn denied(ctx: Ctx) -> CaseResult {
    let e = refusal(&ctx, FixtureRole::Denied).await?;
    ctx.note(format!("refused with {}", describe(&e)));
    Ok(())
}

async fn denied_code(ctx: Ctx) -> CaseResult {
    let e = refusal(&ctx, FixtureRole::Denied).await?;
    ensure!(e.code == -33003 || e.code == -33002, "refused with {}, expected -33003 (or -33002)", describe(&e));
    Ok(())
}
