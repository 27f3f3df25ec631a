//! `crp/lease` (renew / release) and `crp/revoke` on an existing lease, with the ownership
//! check they share, and [`LeaseFacts`]: what release needs to know about a lease, kept in
//! memory from the moment the lease is granted.

use std::sync::Arc;

use crp_core::CrpError;
use crp_core::provider::CallContext;
use crp_core::types::{
    LeaseAction, LeaseParams, LeaseReleased, LeaseRenewed, LeaseResult, RevokeParams,
    RevokeResult,
};

use crate::epoch::Domain;
use crate::audit::{AuditRecord, events};
use crate::cache::Lookup;
use crate::credentials::CredentialRecord;
use crate::leases::{self, LeaseError, LeaseRecord};
use crate::policy::Action;
use crate::store::{now_ms, rfc3339};

use super::{Vault, internal, lease_err};
use super::authz::Az;

/// The parts of a lease that never change once it exists: holder, credential, service,
/// scopes, context and depth. Its state and expiry are deliberately not here (release, revoke,
/// expiry and renewal change them), so a cached copy cannot go stale and needs no change stamp;
/// release checks state and expiry inside its own `UPDATE`, in the audit writer's transaction.
pub(super) struct LeaseFacts {
    agent: String,
    credential_key: String,
    service: String,
    scopes: Vec<String>,
    purpose: Option<String>,
    consumer: Option<String>,
    depth: u32,
}

impl LeaseFacts {
    fn of(l: &LeaseRecord) -> Self {
        Self {
            agent: l.agent.clone(),
            credential_key: l.credential_key.clone(),
            service: l.service.clone(),
            scopes: l.scopes.clone(),
            purpose: l.purpose.clone(),
            consumer: l.consumer.clone(),
            depth: l.depth,
        }
    }
}


impl Vault {

    /// Keep the facts of a lease just granted, so that its release reads nothing.
    pub(super) fn remember_lease(&self, rec: &LeaseRecord) {
        if let Lookup::Miss(ticket) = self.inner.lease_facts.get(&rec.id) {
            self.inner.lease_facts.insert(ticket, rec.id.clone(), Arc::new(LeaseFacts::of(rec)));
        }
    }

    /// A lease's facts, from memory or (a lease granted by another process, or long ago) the
    /// database. Unknown ids are not cached.
    async fn lease_facts(&self, lease_id: &str) -> Result<Option<Arc<LeaseFacts>>, LeaseError> {
        let store = &self.inner.store;
        self.inner
            .lease_facts
            .get_or_load(lease_id, || async { Ok(leases::get(store, lease_id).await?.map(|l| Arc::new(LeaseFacts::of(&l)))) })
            .await
    }

    /// The credential behind a lease as policy sees it (a stand-in when it was deleted).
    async fn lease_credential(&self, key: &str, service: &str) -> Result<Arc<CredentialRecord>, CrpError> {
        let cred = self.credential_shared(key).await.map_err(|e| internal("storage failure")(e.to_string()))?;
        Ok(cred.unwrap_or_else(|| Arc::new(super::placeholder_credential(key, service))))
    }

    async fn owned_lease(&self, agent: &str, lease_id: &str, template: &AuditRecord) -> Result<(LeaseRecord, CredentialRecord), CrpError> {
        let store = &self.inner.store;
        let l = leases::get(store, lease_id).await.map_err(|e| lease_err(e, lease_id))?;
        let Some(l) = l.filter(|l| l.agent == agent) else {
            self.append(template.clone().event(events::DENIED, "deny").with("reason", "lease not found or not held by the caller"))
                .await?;
            return Err(CrpError::lease_not_found(lease_id));
        };
        let cred = self.lease_credential(&l.credential_key, &l.service).await?;
        Ok((l, CredentialRecord::clone(&cred)))
    }

    pub(super) async fn do_lease(&self, ctx: &CallContext, p: LeaseParams) -> Result<LeaseResult, CrpError> {
        match p.action {
            LeaseAction::Renew => self.do_renew(ctx, p).await,
            LeaseAction::Release => self.do_release(ctx, p).await,
        }
    }

    async fn do_renew(&self, ctx: &CallContext, p: LeaseParams) -> Result<LeaseResult, CrpError> {
        let store = &self.inner.store;
        let template =
            AuditRecord::new(events::LEASE_RENEWED, &ctx.agent, "allow").lease(&p.lease_id).with("transport", ctx.transport.as_str());
        let who = self.principal(&ctx.agent, &template).await?;
        let (l, cred) = self.owned_lease(&who.id, &p.lease_id, &template).await?;
        let template = template.key(&l.credential_key).service(&l.service);
        let now = now_ms();
        let caps = self.caps(&cred);
        let increment = caps.grant_ttl(p.ttl.or(Some(l.ttl)));
        let az = Az { scopes: &l.scopes, ttl: increment, purpose: l.purpose.as_deref(), consumer: l.consumer.as_deref(), depth: l.depth };
        let policy = self.authorize(&who, Action::Renew, &cred, &az, &template).await?;
        if let Err(e) = leases::check_usable(&l, now) {
            self.append(template.event(events::ERROR, "error").with("reason", e.to_string())).await?;
            return Err(lease_err(e, &l.id));
        }
        if !cred.renewable || l.expires_at >= l.max_expires_at {
            let why = if cred.renewable { "the lease has reached its maximum lifetime" } else { "the credential's leases are not renewable" };
            self.append(template.event(events::ERROR, "error").with("reason", why)).await?;
            return Err(CrpError::lease_not_renewable(&l.id, why));
        }
        self.append(template.clone().policy(policy.as_deref()).with("increment", increment)).await?;
        let rec = leases::renew(store, &l.id, increment, now).await;
        self.changed(Domain::Leases);
        let rec = rec.map_err(|e| lease_err(e, &l.id))?;
        Ok(LeaseResult::Renewed(LeaseRenewed { lease: rec.to_wire(), proxy_base_url: Some(self.proxy_url(&rec.id)), credential: None }))
    }

    /// Release: ownership and policy on the lease's facts and credential (both normally in
    /// memory), then one group-committed `UPDATE` that also checks the lease is still active and
    /// unexpired; a lease that is not is refused there (`credential.error` audited, the same
    /// answer as before the release was attempted).
    async fn do_release(&self, ctx: &CallContext, p: LeaseParams) -> Result<LeaseResult, CrpError> {
        let template =
            AuditRecord::new(events::LEASE_RELEASED, &ctx.agent, "allow").lease(&p.lease_id).with("transport", ctx.transport.as_str());
        let who = self.principal(&ctx.agent, &template).await?;
        let facts = self.lease_facts(&p.lease_id).await.map_err(|e| lease_err(e, &p.lease_id))?;
        let Some(l) = facts.filter(|l| l.agent == who.id) else {
            self.append(template.event(events::DENIED, "deny").with("reason", "lease not found or not held by the caller")).await?;
            return Err(CrpError::lease_not_found(&p.lease_id));
        };
        let cred = self.lease_credential(&l.credential_key, &l.service).await?;
        let template = template.key(&l.credential_key).service(&l.service);
        let az = Az { scopes: &l.scopes, ttl: 0, purpose: l.purpose.as_deref(), consumer: l.consumer.as_deref(), depth: l.depth };
        let policy = self.authorize(&who, Action::Release, &cred, &az, &template).await?;
        // The release and its `lease.released` entry commit together.
        let op = leases::LeaseOp::Release { id: p.lease_id.clone(), now: now_ms() };
        // The audit writer bumps the lease stamp once per transaction, before answering.
        self.lease_op(template.clone().policy(policy.as_deref()), template, op, &p.lease_id).await?;
        Ok(LeaseResult::Released(LeaseReleased { released: true, lease_id: p.lease_id }))
    }

    pub(super) async fn do_revoke(&self, ctx: &CallContext, p: RevokeParams) -> Result<RevokeResult, CrpError> {
        let store = &self.inner.store;
        let template = AuditRecord::new(events::REVOKED, &ctx.agent, "allow")
            .lease(&p.lease_id)
            .with("reason", p.reason.as_str())
            .with("transport", ctx.transport.as_str());
        let who = self.principal(&ctx.agent, &template).await?;
        // The holder of the lease or of any ancestor may revoke it.
        let mut l = leases::get(store, &p.lease_id).await.map_err(|e| lease_err(e, &p.lease_id))?;
        let target = l.clone();
        let mut held = false;
        let mut hops = 0;
        while let Some(cur) = l {
            if cur.agent == who.id {
                held = true;
                break;
            }
            hops += 1;
            if hops > 32 {
                break;
            }
            l = match &cur.parent_id {
                Some(pid) => leases::get(store, pid).await.map_err(|e| lease_err(e, pid))?,
                None => None,
            };
        }
        let Some(target) = target.filter(|_| held) else {
            self.append(template.event(events::DENIED, "deny").with("reason", "lease not found or not held by the caller")).await?;
            return Err(CrpError::lease_not_found(&p.lease_id));
        };
        let template = template.key(&target.credential_key).service(&target.service);
        let (_, cred) = self.owned_lease(&target.agent, &target.id, &template).await?;
        let az = Az { scopes: &target.scopes, ttl: 0, purpose: None, consumer: None, depth: target.depth };
        let policy = self.authorize(&who, Action::Revoke, &cred, &az, &template).await?;
        let template = template.policy(policy.as_deref());
        self.append(template.clone().with("detail", p.detail.clone().unwrap_or_default())).await?;
        let now = now_ms();
        let descendants = leases::revoke_subtree(store, &target.id, p.reason.as_str(), now).await;
        self.changed(Domain::Leases);
        let descendants = match descendants {
            Ok(d) => d,
            Err(e) => {
                // The entry above recorded the decision; this one records that the revocation
                // did not happen, so the log never claims a revocation that failed.
                self.append(template.event(events::ERROR, "error").with("reason", match &e {
                    LeaseError::Store(_) => "revocation failed: storage failure".to_string(),
                    other => format!("revocation failed: {other}"),
                }))
                .await?;
                return Err(match e {
                    LeaseError::Store(s) => {
                        tracing::error!(target: "crp_provider::vault", "revoke failed: {s}");
                        CrpError::revocation_failed("storage failure")
                    }
                    other => lease_err(other, &target.id),
                });
            }
        };
        let mut affected = vec![target.id.clone()];
        affected.extend(descendants);
        Ok(RevokeResult { revoked: true, lease_id: target.id, revoked_at: rfc3339(now), affected_leases: affected })
    }
}
