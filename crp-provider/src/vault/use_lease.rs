//! `crp/use`: granting a lease on a credential (and v0.2 delegation from a parent lease), and
//! [`new_lease`], the one constructor of lease id, session token and lease record shared with
//! the v0.1 export.

use crp_core::CrpError;
use crp_core::provider::CallContext;
use crp_core::types::{CredentialDescriptor, UseParams, UseResult};
use zeroize::Zeroizing;

use crate::audit::{AuditRecord, events};
use crate::credentials::CredentialRecord;
use crate::crypto;
use crate::leases::{self, Caps, LeaseRecord, NewLease};
use crate::policy::Action;
use crate::store::now_ms;

use super::{Vault, ctx_fields, internal, lease_err};
use super::authz::{Az, Principal};

/// A fresh lease for `who` on `cred`: a time-ordered id with 128 random bits
/// ([`crypto::time_ordered_hex_id`]) and a 256-bit session token. The
/// token is returned once, to the caller; only its SHA-256 is stored.
pub(super) fn new_lease(
    who: &Principal,
    cred: &CredentialRecord,
    scopes: Vec<String>,
    ttl: u32,
    caps: Caps,
    purpose: Option<&str>,
    consumer: Option<&str>,
) -> Result<(NewLease, Zeroizing<String>), CrpError> {
    let id = crypto::time_ordered_hex_id("lease_", crate::store::now_ms(), 16).map_err(|e| internal("random generator failure")(e.to_string()))?;
    let token = crypto::random_token("crpst_", 32).map_err(|e| internal("random generator failure")(e.to_string()))?;
    let nl = NewLease {
        id,
        token_hash: crypto::sha256_hex(token.as_bytes()),
        credential_key: cred.key.clone(),
        service: cred.service.clone(),
        agent: who.id.clone(),
        scopes,
        ttl,
        caps,
        purpose: purpose.map(str::to_string),
        consumer: consumer.map(str::to_string),
    };
    Ok((nl, token))
}

impl Vault {

    pub(super) async fn do_use(&self, ctx: &CallContext, p: UseParams) -> Result<UseResult, CrpError> {
        let (purpose, trace, consumer) = ctx_fields(&p.context);
        let template = AuditRecord::new(events::LEASED, &ctx.agent, "allow")
            .service(&p.service)
            .context(purpose, trace)
            .with("transport", ctx.transport.as_str());
        let who = self.principal(&ctx.agent, &template).await?;
        if let Some(del) = &p.delegation {
            return self.do_delegate(ctx, &who, &p, del, template).await;
        }
        let candidates =
            self.credentials_of_service(&p.service).await.map_err(|e| internal("storage failure")(e.to_string()))?;
        if candidates.is_empty() {
            self.append(template.event(events::DENIED, "deny").with("reason", "service not found")).await?;
            return Err(CrpError::service_not_found(&p.service));
        }
        let now = now_ms();
        let live: Vec<&CredentialRecord> = candidates.iter().filter(|c| !c.is_expired(now)).collect();
        if live.is_empty() {
            self.append(template.event(events::ERROR, "error").with("reason", "credential expired")).await?;
            return Err(CrpError::credential_unavailable("the stored credential has expired"));
        }
        let requested = leases::dedup(&p.scopes);
        let chosen = self.choose(&who, Action::Use, live.iter().copied(), &requested, p.ttl, purpose, consumer);
        let Some((cred, decision, ttl)) = chosen else {
            return Err(CrpError::service_not_found(&p.service));
        };
        let template = template.key(&cred.key);
        let az = Az { scopes: &requested, ttl, purpose, consumer, depth: 0 };
        let policy = self.enforce(&who, Action::Use, cred, &az, &template, decision).await?;
        let unknown: Vec<String> = requested.iter().filter(|s| !cred.scopes.contains(s)).cloned().collect();
        if !unknown.is_empty() {
            self.append(
                template.clone().policy(policy.as_deref()).event(events::DENIED, "deny").with("reason", "scope unavailable").with("deniedScopes", unknown.clone()),
            )
            .await?;
            return Err(CrpError::scope_unavailable(unknown));
        }
        let mut caps = self.caps(cred);
        if !cred.renewable {
            caps.max_lease_lifetime = ttl;
        }
        let (nl, token) = new_lease(&who, cred, requested.clone(), ttl, caps, purpose, consumer)?;
        let lease_id = nl.id.clone();
        let depth_cap = self.depth_cap().await;
        // The lease row and its `credential.leased` entry commit together in the audit
        // writer's group commit.
        let entry = template.clone().policy(policy.as_deref()).lease(&lease_id).with("ttl", ttl).with("scopes", requested.clone());
        let op = leases::LeaseOp::InsertRoot(leases::root_record(&nl, depth_cap, now_ms()));
        let rec = self.lease_insert(entry, template.lease(&lease_id), op, &lease_id).await?;
        self.remember_lease(&rec);
        Ok(self.use_result(&rec, cred, Some(token.to_string())))
    }

    fn use_result(&self, rec: &LeaseRecord, cred: &CredentialRecord, token: Option<String>) -> UseResult {
        UseResult {
            lease: rec.to_wire(),
            proxy_base_url: self.proxy_url(&rec.id),
            session_token: token,
            service: rec.service.clone(),
            granted_scopes: rec.scopes.clone(),
            credential_descriptor: CredentialDescriptor {
                credential_type: cred.kind.crp_type(),
                brokered: cred.kind.brokered(),
                auto_refresh: cred.kind.brokered(),
                classification: cred.classification,
            },
        }
    }

    async fn do_delegate(
        &self,
        ctx: &CallContext,
        who: &Principal,
        p: &UseParams,
        del: &crp_core::types::Delegation,
        template: AuditRecord,
    ) -> Result<UseResult, CrpError> {
        let (purpose, _, consumer) = ctx_fields(&p.context);
        let store = &self.inner.store;
        let template = template.event(events::DELEGATED, "allow").with("parentLeaseId", del.parent_lease_id.clone());
        let parent = leases::get(store, &del.parent_lease_id).await.map_err(|e| lease_err(e, &del.parent_lease_id))?;
        let parent = match parent {
            Some(l) if l.agent == who.id => l,
            _ => {
                self.append(template.event(events::DENIED, "deny").with("reason", "parent lease not found or not held by the caller"))
                    .await?;
                return Err(CrpError::lease_not_found(&del.parent_lease_id));
            }
        };
        if parent.service != p.service {
            return Err(CrpError::invalid_params("delegation must name the parent lease's service"));
        }
        let template = template.key(&parent.credential_key);
        let Some(cred) =
            self.credential_shared(&parent.credential_key).await.map_err(|e| internal("storage failure")(e.to_string()))?
        else {
            return Err(CrpError::credential_unavailable("the parent lease's credential was deleted"));
        };
        let mut caps = self.caps(&cred);
        if !cred.renewable {
            caps.max_lease_lifetime = caps.grant_ttl(p.ttl);
        }
        let depth_cap = self.depth_cap().await;
        let requested = leases::dedup(&p.scopes);
        let plan = match leases::plan_child(&parent, &requested, p.ttl, del.max_depth, &caps, depth_cap, now_ms()) {
            Ok(plan) => plan,
            Err(e) => {
                self.append(template.event(events::DENIED, "deny").with("reason", e.to_string())).await?;
                return Err(lease_err(e, &del.parent_lease_id));
            }
        };
        let az = Az { scopes: &plan.scopes, ttl: plan.ttl, purpose, consumer, depth: plan.depth };
        let policy = self.authorize(who, Action::Delegate, &cred, &az, &template).await?;
        let (nl, token) = new_lease(who, &cred, plan.scopes.clone(), plan.ttl, caps, purpose, consumer)?;
        let lease_id = nl.id.clone();
        let _ = ctx;
        // The parent is re-checked inside the writer's transaction (a concurrent revoke or
        // release cannot be raced); the child and its `lease.delegated` entry commit together.
        let entry = template.clone().policy(policy.as_deref()).lease(&lease_id).with("depth", plan.depth).with("ttl", plan.ttl);
        let op = leases::LeaseOp::InsertChild {
            parent_id: parent.id.clone(),
            lease: nl,
            requested_ttl: p.ttl,
            requested_max_depth: del.max_depth,
            provider_cap: depth_cap,
            now: now_ms(),
        };
        let rec = self.lease_insert(entry, template.lease(&lease_id), op, &parent.id).await?;
        self.remember_lease(&rec);
        Ok(self.use_result(&rec, &cred, Some(token.to_string())))
    }
}
