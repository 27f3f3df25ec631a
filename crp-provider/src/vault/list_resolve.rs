//! `crp/list` (credential descriptors the caller may see) and `crp/resolve` as the v0.1
//! export (the one caller-facing path, besides `x-crp/vault.retrieve`, that returns a value),
//! with [`material`], which shapes a value into the wire's credential material.

use std::collections::BTreeMap;

use base64::Engine as _;
use crp_core::{CrpError, SecretValue};
use crp_core::provider::CallContext;
use crp_core::types::{
    CredentialMaterial, ListParams, ListResult, ResolveMetadata, ResolveParams, ResolveResult, ServiceEntry,
};
use crp_core::types::ext::InjectionRule;

use crate::audit::{AuditRecord, events};
use crate::credentials::{self, CredentialConfig, CredentialKind, CredentialRecord};
use crate::leases;
use crate::policy::Action;
use crate::store::{now_ms, rfc3339};

use super::{PROVIDER_NAME, Vault, ctx_fields, internal, lease_err};
use super::authz::Az;
use super::use_lease::new_lease;

impl Vault {

    pub(super) async fn do_list(&self, ctx: &CallContext, p: ListParams) -> Result<ListResult, CrpError> {
        let (purpose, trace, _) = ctx_fields(&p.context);
        let template = AuditRecord::new(events::LISTED, &ctx.agent, "allow").context(purpose, trace);
        let who = self.principal(&ctx.agent, &template).await?;
        let all = credentials::list(&self.inner.store, "").await.map_err(|e| internal("storage failure")(e.to_string()))?;
        let filter = p.filter.clone().unwrap_or_default();
        let after = match &p.cursor {
            Some(c) => Some(
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(c)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| CrpError::invalid_params("cursor is not one this provider issued"))?,
            ),
            None => None,
        };
        let now = now_ms();
        let mut by_service: BTreeMap<String, ServiceEntry> = BTreeMap::new();
        for c in &all {
            if c.is_expired(now) {
                continue;
            }
            if filter.service_prefix.as_deref().is_some_and(|pre| !c.service.starts_with(pre)) {
                continue;
            }
            if filter.credential_type.is_some_and(|t| t != c.kind.crp_type()) {
                continue;
            }
            if after.as_deref().is_some_and(|a| c.service.as_str() <= a) {
                continue;
            }
            if !self.decide(&who, Action::List, c, &Az::simple(purpose)).is_allowed() {
                continue;
            }
            let e = by_service.entry(c.service.clone()).or_insert_with(|| ServiceEntry {
                service: c.service.clone(),
                credential_types: vec![],
                available_scopes: Some(vec![]),
                max_ttl: None,
                description: c.metadata.get("description").cloned(),
                classification: Some(c.classification),
            });
            let ty = c.kind.crp_type();
            if !e.credential_types.contains(&ty) {
                e.credential_types.push(ty);
            }
            if let Some(sc) = e.available_scopes.as_mut() {
                for s in &c.scopes {
                    if !sc.contains(s) {
                        sc.push(s.clone());
                    }
                }
            }
            let cap = self.caps(c).ttl_cap();
            e.max_ttl = Some(e.max_ttl.map_or(cap, |m| m.max(cap)));
            // A service shows its most sensitive credential's label.
            if e.classification.is_some_and(|cl| c.classification > cl) {
                e.classification = Some(c.classification);
            }
        }
        let limit = p.effective_limit() as usize;
        let mut services: Vec<ServiceEntry> = by_service.into_values().collect();
        let cursor = if services.len() > limit {
            services.truncate(limit);
            services.last().map(|s| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s.service.as_bytes()))
        } else {
            None
        };
        self.append(template.with("count", services.len())).await?;
        Ok(ListResult { services, cursor })
    }

    // ------------------------------------------------------------------ crp/resolve (v0.1 export)

    pub(super) async fn do_resolve(&self, ctx: &CallContext, p: ResolveParams) -> Result<ResolveResult, CrpError> {
        let (purpose, trace, consumer) = ctx_fields(&p.context);
        let template = AuditRecord::new(events::RESOLVED, &ctx.agent, "allow")
            .service(&p.service)
            .context(purpose, trace)
            .with("export", true)
            .with("transport", ctx.transport.as_str());
        let who = self.principal(&ctx.agent, &template).await?;
        let store = &self.inner.store;
        let candidates =
            credentials::by_service(store, &p.service).await.map_err(|e| internal("storage failure")(e.to_string()))?;
        let now = now_ms();
        let requested = leases::dedup(&p.scopes);
        let live = candidates
            .iter()
            .filter(|c| !c.is_expired(now) && p.credential_type.is_none_or(|t| t == c.kind.crp_type()));
        let chosen = self.choose(&who, Action::Resolve, live, &requested, p.ttl, purpose, consumer);
        let Some((cred, decision, ttl)) = chosen else {
            self.append(template.event(events::DENIED, "deny").with("reason", "service not found")).await?;
            return Err(CrpError::service_not_found(&p.service));
        };
        let template = template.key(&cred.key);
        let az = Az { scopes: &requested, ttl, purpose, consumer, depth: 0 };
        let policy = self.enforce(&who, Action::Resolve, cred, &az, &template, decision).await?;
        let unknown: Vec<String> = requested.iter().filter(|s| !cred.scopes.contains(s)).cloned().collect();
        if !unknown.is_empty() {
            self.append(template.event(events::DENIED, "deny").with("reason", "scope unavailable")).await?;
            return Err(CrpError::scope_unavailable(unknown));
        }
        if cred.kind.brokered() {
            self.append(template.event(events::DENIED, "deny").with("reason", "brokered credentials are never exported")).await?;
            return Err(CrpError::feature_not_supported("brokered credentials are never exported; use crp/use"));
        }
        let Some((_, value, config)) = credentials::open_current(store, &self.inner.dk, &cred.key)
            .await
            .map_err(|e| internal("storage failure")(e.to_string()))?
        else {
            return Err(CrpError::service_not_found(&p.service));
        };
        let mut caps = self.caps(cred);
        if !cred.renewable {
            caps.max_lease_lifetime = ttl;
        }
        // The export lease tracks the material; its proxy session token is never handed out.
        let (nl, _session_token) = new_lease(&who, cred, requested.clone(), ttl, caps, purpose, consumer)?;
        let lease_id = nl.id.clone();
        self.append(template.clone().policy(policy.as_deref()).lease(&lease_id).with("ttl", ttl)).await?;
        self.append(template.event(events::EXPORTED, "allow").policy(policy.as_deref()).lease(&lease_id)).await?;
        let depth_cap = self.depth_cap().await;
        let rec = leases::insert_root(store, &nl, depth_cap, now_ms()).await.map_err(|e| lease_err(e, &lease_id))?;
        Ok(ResolveResult {
            credential: material(cred, &config, value),
            lease: rec.to_wire(),
            service: cred.service.clone(),
            granted_scopes: rec.scopes.clone(),
            metadata: Some(ResolveMetadata { provider: PROVIDER_NAME.into(), resolved_at: rfc3339(now_ms()) }),
        })
    }
}

fn material(cred: &CredentialRecord, config: &CredentialConfig, value: SecretValue) -> CredentialMaterial {
    match cred.kind {
        CredentialKind::ApiKey => {
            let (header, prefix) = match &config.injection {
                InjectionRule::Header { name, prefix } => (name.clone(), (!prefix.is_empty()).then(|| prefix.clone())),
                _ => ("Authorization".into(), Some("Bearer".into())),
            };
            CredentialMaterial::ApiKey { key: value, header, prefix }
        }
        CredentialKind::OauthBearer | CredentialKind::Oauth2ClientCredentials => {
            CredentialMaterial::OauthBearer { token: value, token_type: "Bearer".into(), expires_in: None }
        }
        CredentialKind::BasicAuth => {
            let (u, p) = value
                .expose()
                .split_once(':')
                .map(|(u, p)| (u.to_string(), SecretValue::new(p)))
                .unwrap_or_else(|| (String::new(), value.clone()));
            CredentialMaterial::BasicAuth { username: u, password: p }
        }
        CredentialKind::ClientCertificate => CredentialMaterial::ClientCertificate {
            certificate: cred.metadata.get("certificate").cloned().unwrap_or_default(),
            private_key: value,
            chain: vec![],
            passphrase: None,
        },
        CredentialKind::ConnectionString => {
            CredentialMaterial::ConnectionString { value, dialect: cred.metadata.get("dialect").cloned() }
        }
        CredentialKind::Custom => CredentialMaterial::Custom {
            custom_type: cred.metadata.get("custom_type").cloned().unwrap_or_else(|| "x-custom".into()),
            data: BTreeMap::from([("value".to_string(), value)]),
        },
    }
}
