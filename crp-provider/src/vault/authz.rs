//! Authorization for every caller-facing operation: the caller as policies see it
//! ([`Principal`]), the per-decision input ([`Az`]), the Cedar decision, and `enforce` (deny /
//! approval hold, audited) plus the small helpers it needs (approval fingerprint, Cedar string
//! escaping, credential lookup that answers -33001), and the cached reads of credential
//! attributes every operation starts with.

use std::sync::Arc;

use crp_core::CrpError;

use crate::{agents, crypto};
use crate::audit::{AuditRecord, events};
use crate::cache::Lookup;
use crate::credentials::{self, CredentialRecord};
use crate::policy::{Action, AuthzContext, CredentialAttrs, Decision, Outcome};
use crate::store::StoreError;

use super::{AgentStatus, Vault, internal};

/// Policy input for one decision.
pub(super) struct Az<'a> {
    pub(super) scopes: &'a [String],
    pub(super) ttl: u32,
    pub(super) purpose: Option<&'a str>,
    pub(super) consumer: Option<&'a str>,
    pub(super) depth: u32,
}

impl<'a> Az<'a> {
    pub(super) fn simple(purpose: Option<&'a str>) -> Self {
        Az { scopes: &[], ttl: 0, purpose, consumer: None, depth: 0 }
    }
}

/// The caller as policies see it.
pub(super) struct Principal {
    pub(super) id: String,
    pub(super) roles: Vec<String>,
}

fn fingerprint(agent: &str, action: Action, key: &str, scopes: &[String]) -> String {
    let mut s: Vec<&str> = scopes.iter().map(String::as_str).collect();
    s.sort_unstable();
    s.dedup();
    crypto::sha256_hex(format!("{agent}\0{}\0{key}\0{}", action.as_str(), s.join(" ")).as_bytes())
}

pub(super) fn cedar_str(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

impl Vault {

    /// The caller as policies see it, refusing (audited) an agent that is not active. The
    /// agent record comes from the cache ([`Vault::agent_shared`]): a status or role change
    /// made by any process is seen by the next request.
    pub(super) async fn principal(&self, agent: &str, template: &AuditRecord) -> Result<Principal, CrpError> {
        // Pick up policy files changed on disk (by `apply`, an editor, another process) once
        // per operation.
        self.reload_policies_if_changed();
        let rec = self.agent_shared(agent).await.map_err(|e| internal("storage failure")(e.to_string()))?;
        match rec {
            Some(a) if a.status != AgentStatus::Active => {
                let why = format!("agent is {}", a.status.as_str());
                self.append(template.clone().event(events::DENIED, "deny").with("reason", why.clone())).await?;
                Err(CrpError::policy_denied(why, None))
            }
            Some(a) => Ok(Principal { id: a.id.clone(), roles: a.roles.clone() }),
            None => Ok(Principal { id: agent.to_string(), roles: Vec::new() }),
        }
    }

    /// A credential's attributes (no value) by key: from memory while no agent, credential or
    /// setting changed in any process of this vault, else from the database. A missing key is
    /// read every time (never cached).
    pub(super) async fn credential_shared(&self, key: &str) -> Result<Option<Arc<CredentialRecord>>, StoreError> {
        self.inner.creds_by_key.get_or_load(key, || async { Ok(credentials::get(&self.inner.store, key).await?.map(Arc::new)) }).await
    }

    /// Every credential offering `service`, by key, cached like [`Vault::credential_shared`]
    /// (an empty answer is read every time).
    pub(super) async fn credentials_of_service(&self, service: &str) -> Result<Arc<Vec<CredentialRecord>>, StoreError> {
        let ticket = match self.inner.creds_by_service.get(service) {
            Lookup::Hit(c) => return Ok(c),
            Lookup::Miss(t) => t,
        };
        let found = Arc::new(credentials::by_service(&self.inner.store, service).await?);
        if !found.is_empty() {
            self.inner.creds_by_service.insert(ticket, service.to_string(), found.clone());
        }
        Ok(found)
    }

    pub(super) fn decide(&self, who: &Principal, action: Action, cred: &CredentialRecord, az: &Az<'_>) -> Decision {
        let attrs = CredentialAttrs {
            key: &cred.key,
            service: &cred.service,
            classification: cred.classification,
            tags: &cred.tags,
        };
        let ctx = AuthzContext {
            scopes: az.scopes,
            ttl: az.ttl,
            purpose: az.purpose,
            consumer: az.consumer,
            delegation_depth: az.depth,
            now: time::OffsetDateTime::now_utc(),
        };
        self.inner.policy.authorize(&who.id, &who.roles, action, &attrs, &ctx)
    }

    /// Among `candidates` (in key order), the first credential the policy allows for `action`;
    /// when none is allowed, the one with the least restrictive outcome (the first of equals),
    /// with its decision and the TTL it would be granted. `crp/use` and `crp/resolve` choose
    /// the same way.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn choose<'c>(
        &self,
        who: &Principal,
        action: Action,
        candidates: impl IntoIterator<Item = &'c CredentialRecord>,
        scopes: &[String],
        requested_ttl: Option<u32>,
        purpose: Option<&str>,
        consumer: Option<&str>,
    ) -> Option<(&'c CredentialRecord, Decision, u32)> {
        let mut chosen: Option<(&CredentialRecord, Decision, u32)> = None;
        for c in candidates {
            let ttl = self.caps(c).grant_ttl(requested_ttl);
            let d = self.decide(who, action, c, &Az { scopes, ttl, purpose, consumer, depth: 0 });
            if chosen.as_ref().is_none_or(|(_, prev, _)| d.outcome < prev.outcome) {
                let allow = d.outcome == Outcome::Allow;
                chosen = Some((c, d, ttl));
                if allow {
                    break;
                }
            }
        }
        chosen
    }

    /// Authorize with side effects: audit refusals, hold approvals, consume an approval.
    /// Returns the deciding policy id on allow.
    pub(super) async fn authorize(
        &self,
        who: &Principal,
        action: Action,
        cred: &CredentialRecord,
        az: &Az<'_>,
        template: &AuditRecord,
    ) -> Result<Option<String>, CrpError> {
        let d = self.decide(who, action, cred, az);
        self.enforce(who, action, cred, az, template, d).await
    }

    pub(super) async fn enforce(
        &self,
        who: &Principal,
        action: Action,
        cred: &CredentialRecord,
        az: &Az<'_>,
        template: &AuditRecord,
        d: Decision,
    ) -> Result<Option<String>, CrpError> {
        let base = template.clone().policy(d.policy.as_deref()).with("op", action.as_str());
        match d.outcome {
            Outcome::Allow => Ok(d.policy),
            Outcome::RequireApproval => {
                let fp = fingerprint(&who.id, action, &cred.key, az.scopes);
                let consumed = agents::consume_approved(&self.inner.store, &who.id, &fp)
                    .await
                    .map_err(|e| internal("storage failure")(e.to_string()))?;
                if let Some(approval) = consumed {
                    self.append(base.event(events::APPROVAL_DECIDED, "allow").with("approvalId", approval.clone()).with("consumed", true))
                        .await?;
                    return Ok(d.policy);
                }
                let summary = serde_json::json!({
                    "service": cred.service, "scopes": az.scopes, "ttl": az.ttl,
                    "purpose": az.purpose, "delegationDepth": az.depth,
                });
                let id = agents::hold(&self.inner.store, &who.id, action.as_str(), &cred.key, &fp, &summary, d.policy.as_deref(), &d.reason)
                    .await
                    .map_err(|e| internal("storage failure")(e.to_string()))?;
                self.append(
                    base.event(events::APPROVAL_REQUIRED, Outcome::RequireApproval.as_str())
                        .with("approvalId", id.clone())
                        .with("reason", d.reason.clone()),
                )
                .await?;
                Err(CrpError::require_approval(&id, d.reason, d.policy))
            }
            Outcome::Quarantine => {
                self.append(base.event(events::QUARANTINED, Outcome::Quarantine.as_str()).with("reason", d.reason.clone()))
                    .await?;
                Err(CrpError::quarantine(d.reason, d.policy))
            }
            Outcome::Deny => {
                self.append(base.event(events::DENIED, "deny").with("reason", d.reason.clone())).await?;
                Err(CrpError::policy_denied(d.reason, d.policy))
            }
        }
    }

    pub(super) async fn cred_or_404(&self, key: &str, template: &AuditRecord) -> Result<CredentialRecord, CrpError> {
        match credentials::get(&self.inner.store, key).await.map_err(|e| internal("storage failure")(e.to_string()))? {
            Some(c) => Ok(c),
            None => {
                self.append(template.clone().event(events::DENIED, "deny").with("reason", "credential not found")).await?;
                Err(CrpError::service_not_found(key))
            }
        }
    }
}
