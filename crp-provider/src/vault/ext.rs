//! The `x-crp/` extension methods (vault store / retrieve / delete / list, policy check, audit
//! query, whoami), and the JSON (de)serialisation helpers the dispatcher in `provider.rs` uses.


use crp_core::CrpError;
use crp_core::provider::CallContext;
use crp_core::types::{Classification, ext};
use serde_json::Value;

use crate::epoch::Domain;
use crate::agents;
use crate::audit::{self, AuditRecord, events};
use crate::credentials::{self, CredentialConfig, CredentialKind, CredentialRecord, NewCredential};
use crate::policy::Action;
use crate::store::{now_ms, rfc3339};

use super::{Vault, internal, placeholder_credential};
use super::authz::Az;
use super::operator::validate_new;

impl Vault {

    pub(super) async fn ext_store(&self, ctx: &CallContext, p: ext::VaultStoreParams) -> Result<ext::VaultStoreResult, CrpError> {
        let kind = p.credential_type.map(CredentialKind::from).unwrap_or(CredentialKind::ApiKey);
        let service = p.service.clone().or_else(|| p.metadata.get("service").cloned()).unwrap_or_else(|| p.key.clone());
        crp_core::types::validate_service(&service)?;
        let now = now_ms();
        let expires_at = p.ttl.map(|t| now.saturating_add(i64::try_from(t.min(10 * 365 * 86_400)).unwrap_or(0) * 1000));
        // Rotating a value (an overwrite that names no upstream / injection) keeps where and how
        // the previous version was injected.
        let previous: Option<CredentialConfig> = if p.upstream.is_none() || p.inject.is_none() {
            credentials::open_current(&self.inner.store, &self.inner.dk, &p.key)
                .await
                .map_err(|e| internal("storage failure")(e.to_string()))?
                .map(|(_, _, c)| c)
        } else {
            None
        };
        let nc = NewCredential {
            key: p.key.clone(),
            service: service.clone(),
            kind,
            classification: p.classification.unwrap_or(Classification::Confidential),
            tags: p.tags.clone().unwrap_or_default(),
            scopes: p.scopes.clone().unwrap_or_default(),
            max_ttl: p.max_ttl,
            renewable: true,
            metadata: p.metadata.clone(),
            expires_at,
            value: p.value.clone(),
            config: CredentialConfig {
                upstream: p.upstream.clone().or_else(|| previous.as_ref().and_then(|c| c.upstream.clone())),
                injection: p
                    .inject
                    .clone()
                    .or_else(|| previous.as_ref().map(|c| c.injection.clone()))
                    .unwrap_or_else(|| kind.default_injection()),
                allowed_private_hosts: previous.as_ref().map(|c| c.allowed_private_hosts.clone()).unwrap_or_default(),
                broker: None,
            },
        };
        validate_new(&nc).map_err(|e| CrpError::invalid_params(e.to_string()))?;
        let template = AuditRecord::new(events::STORED, &ctx.agent, "allow").key(&p.key).service(&service).with("transport", ctx.transport.as_str());
        let who = self.principal(&ctx.agent, &template).await?;
        let new_rec = CredentialRecord {
            key: nc.key.clone(),
            service: nc.service.clone(),
            kind,
            classification: nc.classification,
            tags: nc.tags.clone(),
            scopes: nc.scopes.clone(),
            max_ttl: nc.max_ttl,
            renewable: true,
            metadata: nc.metadata.clone(),
            expires_at,
            version: 0,
            created_at: now,
            updated_at: now,
        };
        let mut policy = self.authorize(&who, Action::Store, &new_rec, &Az::simple(None), &template).await?;
        // Overwriting needs `store` on the existing credential's attributes too (no relabelling
        // a restricted credential into reach).
        if let Some(existing) = credentials::get(&self.inner.store, &p.key).await.map_err(|e| internal("storage failure")(e.to_string()))? {
            policy = self.authorize(&who, Action::Store, &existing, &Az::simple(None), &template).await?;
        }
        self.append(template.policy(policy.as_deref())).await?;
        let v = credentials::put(&self.inner.store, &self.inner.dk, &nc).await.map_err(|e| internal("storage failure")(e.to_string()))?;
        self.changed(Domain::Config);
        if let Ok(b) = self.broker() {
            b.invalidate(&nc.key);
        }
        Ok(ext::VaultStoreResult { stored: true, key: nc.key, version: u32::try_from(v).unwrap_or(u32::MAX), expires_at: expires_at.map(rfc3339) })
    }

    pub(super) async fn ext_retrieve(&self, ctx: &CallContext, p: ext::VaultRetrieveParams) -> Result<ext::VaultRetrieveResult, CrpError> {
        let template = AuditRecord::new(events::EXPORTED, &ctx.agent, "allow")
            .key(&p.key)
            .context(p.purpose.as_deref(), None)
            .with("export", true)
            .with("transport", ctx.transport.as_str());
        let who = self.principal(&ctx.agent, &template).await?;
        let cred = self.cred_or_404(&p.key, &template).await?;
        let template = template.service(&cred.service);
        let policy = self.authorize(&who, Action::Retrieve, &cred, &Az::simple(p.purpose.as_deref()), &template).await?;
        if p.purpose.as_deref().is_none_or(|s| s.trim().is_empty()) {
            self.append(template.event(events::DENIED, "deny").with("reason", "an export requires a purpose")).await?;
            return Err(CrpError::invalid_params("purpose is required to retrieve a value (it is audited)"));
        }
        if cred.kind.brokered() {
            self.append(template.event(events::DENIED, "deny").with("reason", "brokered credentials are never exported")).await?;
            return Err(CrpError::feature_not_supported("brokered credentials are never exported"));
        }
        if cred.is_expired(now_ms()) {
            self.append(template.event(events::ERROR, "error").with("reason", "credential expired")).await?;
            return Err(CrpError::credential_unavailable("the stored credential has expired"));
        }
        self.append(template.policy(policy.as_deref())).await?;
        let (rec, value, _) = credentials::open_current(&self.inner.store, &self.inner.dk, &p.key)
            .await
            .map_err(|e| internal("storage failure")(e.to_string()))?
            .ok_or_else(|| CrpError::service_not_found(&p.key))?;
        Ok(ext::VaultRetrieveResult { key: rec.key, value, metadata: rec.metadata })
    }

    pub(super) async fn ext_delete(&self, ctx: &CallContext, p: ext::VaultDeleteParams) -> Result<ext::VaultDeleteResult, CrpError> {
        let template = AuditRecord::new(events::DELETED, &ctx.agent, "allow").key(&p.key).with("transport", ctx.transport.as_str());
        let who = self.principal(&ctx.agent, &template).await?;
        let Some(cred) = credentials::get(&self.inner.store, &p.key).await.map_err(|e| internal("storage failure")(e.to_string()))? else {
            self.append(template.event(events::DENIED, "deny").with("reason", "credential not found")).await?;
            return Ok(ext::VaultDeleteResult { deleted: false, key: p.key, revoked_leases: vec![] });
        };
        let template = template.service(&cred.service);
        let policy = self.authorize(&who, Action::Delete, &cred, &Az::simple(None), &template).await?;
        self.append(template.policy(policy.as_deref())).await?;
        let revoked = self.delete_and_revoke(&p.key).await.map_err(|e| internal("storage failure")(e.to_string()))?;
        Ok(ext::VaultDeleteResult { deleted: true, key: p.key, revoked_leases: revoked })
    }

    pub(super) async fn ext_list(&self, ctx: &CallContext, p: ext::VaultListParams) -> Result<ext::VaultListResult, CrpError> {
        let template = AuditRecord::new(events::LISTED, &ctx.agent, "allow").with("transport", ctx.transport.as_str());
        let who = self.principal(&ctx.agent, &template).await?;
        let limit = p.limit.unwrap_or(100).clamp(1, 1000) as usize;
        let after = p.cursor.clone().unwrap_or_default();
        let all = credentials::list(&self.inner.store, &after).await.map_err(|e| internal("storage failure")(e.to_string()))?;
        let mut out = Vec::new();
        let mut more = false;
        for c in all {
            if p.prefix.as_deref().is_some_and(|pre| !c.key.starts_with(pre)) {
                continue;
            }
            if p.tags.as_ref().is_some_and(|t| !t.iter().all(|x| c.tags.contains(x))) {
                continue;
            }
            if !self.decide(&who, Action::List, &c, &Az::simple(None)).is_allowed() {
                continue;
            }
            if out.len() == limit {
                more = true;
                break;
            }
            out.push(ext::VaultListEntry {
                key: c.key.clone(),
                service: c.service.clone(),
                credential_type: c.kind.crp_type(),
                classification: c.classification,
                metadata: c.metadata.clone(),
                tags: c.tags.clone(),
                created_at: rfc3339(c.created_at),
                expires_at: c.expires_at.map(rfc3339),
            });
        }
        let cursor = if more { out.last().map(|e| e.key.clone()) } else { None };
        self.append(template.with("count", out.len())).await?;
        Ok(ext::VaultListResult { credentials: out, cursor })
    }

    pub(super) async fn ext_policy_check(&self, ctx: &CallContext, p: ext::PolicyCheckParams) -> Result<ext::PolicyCheckResult, CrpError> {
        let action: Action = p.action.parse().map_err(|_| {
            CrpError::invalid_params("action must be one of use resolve retrieve list store delete renew release revoke delegate audit")
        })?;
        let template = AuditRecord::new(events::POLICY_CHECKED, &ctx.agent, "allow").key(&p.key).with("action", action.as_str());
        let who = self.principal(&ctx.agent, &template).await?;
        let cred = self.cred_or_404(&p.key, &template).await?;
        let target = p.requester.clone().unwrap_or_else(|| who.id.clone());
        if target != who.id {
            // Asking about someone else reveals their rights: needs `audit`.
            self.authorize(&who, Action::Audit, &cred, &Az::simple(None), &template).await?;
        }
        let scopes = p.scopes.clone().unwrap_or_default();
        let r = self
            .policy_check(&target, action, &p.key, &scopes, p.ttl, p.purpose.as_deref())
            .await
            .map_err(|e| internal("policy check failure")(e.to_string()))?;
        self.append(template.with("requester", target).with("outcome", r.outcome.clone())).await?;
        Ok(r)
    }

    pub(super) async fn ext_audit_query(&self, ctx: &CallContext, p: ext::AuditQueryParams) -> Result<ext::AuditQueryResult, CrpError> {
        let template = AuditRecord::new(events::AUDIT_QUERIED, &ctx.agent, "allow").with("transport", ctx.transport.as_str());
        let who = self.principal(&ctx.agent, &template).await?;
        // The audit resource: the key asked about, else the whole log (`Credential::"*"`).
        let resource = match &p.key {
            Some(k) => credentials::get(&self.inner.store, k).await.map_err(|e| internal("storage failure")(e.to_string()))?,
            None => None,
        };
        let resource = resource.unwrap_or_else(|| placeholder_credential(p.key.as_deref().unwrap_or("*"), "*"));
        let template = match &p.key {
            Some(k) => template.key(k),
            None => template,
        };
        let policy = self.authorize(&who, Action::Audit, &resource, &Az::simple(None), &template).await?;
        let events = audit::query(&self.inner.store, &p).await.map_err(|e| match e {
            audit::AuditError::Write(m) => CrpError::invalid_params(m),
            other => internal("storage failure")(other.to_string()),
        })?;
        self.append(template.policy(policy.as_deref()).with("count", events.len())).await?;
        Ok(ext::AuditQueryResult { events })
    }

    pub(super) async fn ext_whoami(&self, ctx: &CallContext) -> Result<ext::WhoamiResult, CrpError> {
        let rec = agents::get(&self.inner.store, &ctx.agent).await.map_err(|e| internal("storage failure")(e.to_string()))?;
        Ok(ext::WhoamiResult { agent: ctx.agent.clone(), roles: rec.map(|a| a.roles).unwrap_or_default(), version: ctx.version.to_string() })
    }
}

pub(super) fn decode_ext<T: serde::de::DeserializeOwned>(params: Value) -> Result<T, CrpError> {
    let params = if params.is_null() { Value::Object(Default::default()) } else { params };
    crp_core::dispatch::decode(params)
}

pub(super) fn to_json<T: serde::Serialize>(v: T) -> Result<Value, CrpError> {
    serde_json::to_value(v).map_err(|_| CrpError::internal())
}
