//! The operator's admin operations (the admin CLI): storing, listing and deleting
//! credentials, listing and revoking leases, audit query/verify, policy checks, declarative
//! `apply`, and [`validate_new`], the check every new credential passes.

use crp_core::types::ext;

use crate::epoch::Domain;
use crate::{agents, crypto};
use crate::apply::{ApplyDoc, ApplyReport};
use crate::audit::{self, AuditRecord, VerifyReport, events};
use crate::credentials::{self, CredentialConfig, CredentialKind, CredentialRecord, NewCredential};
use crate::leases::{self, LeaseRecord, LeaseState};
use crate::policy::Action;
use crate::store::now_ms;

use super::{AgentStatus, OPERATOR, Vault, VaultError};
use super::authz::{Az, Principal};

impl Vault {

    /// Store a credential as the operator (no policy; audited). Returns the version, or the
    /// current one when nothing changed (`changed` false).
    pub async fn admin_store(&self, c: &NewCredential) -> Result<(i64, bool), VaultError> {
        validate_new(c)?;
        let store = &self.inner.store;
        if let Some((rec, value, config)) = credentials::open_current(store, &self.inner.dk, &c.key).await? {
            let same = rec.service == c.service
                && rec.kind == c.kind
                && rec.classification == c.classification
                && rec.tags == c.tags
                && rec.scopes == c.scopes
                && rec.max_ttl == c.max_ttl
                && rec.renewable == c.renewable
                && rec.metadata == c.metadata
                && rec.expires_at == c.expires_at
                && config == c.config
                && crypto::ct_eq(value.expose().as_bytes(), c.value.expose().as_bytes());
            if same {
                return Ok((rec.version, false));
            }
        }
        self.inner
            .audit
            .append(AuditRecord::new(events::STORED, OPERATOR, "allow").key(&c.key).service(&c.service).with("kind", c.kind.as_str()))
            .await?;
        let v = credentials::put(store, &self.inner.dk, c).await?;
        self.changed(Domain::Config);
        if let Ok(b) = self.broker() {
            b.invalidate(&c.key);
        }
        Ok((v, true))
    }

    /// One credential's attributes.
    pub async fn credential(&self, key: &str) -> Result<Option<CredentialRecord>, VaultError> {
        Ok(credentials::get(&self.inner.store, key).await?)
    }

    /// Number of stored versions of a credential.
    pub async fn credential_versions(&self, key: &str) -> Result<i64, VaultError> {
        Ok(credentials::version_count(&self.inner.store, key).await?)
    }

    /// Every credential's attributes, by key.
    pub async fn credentials(&self) -> Result<Vec<CredentialRecord>, VaultError> {
        Ok(credentials::list(&self.inner.store, "").await?)
    }

    /// The non-secret part of a credential's sealed configuration (upstream, injection, allowed
    /// private hosts, broker token URL and client id). For `credential show`.
    pub async fn credential_config(&self, key: &str) -> Result<Option<CredentialConfig>, VaultError> {
        Ok(credentials::open_current(&self.inner.store, &self.inner.dk, key).await?.map(|(_, _, c)| c))
    }

    /// Delete a credential (operator); its active leases are revoked. Returns the revoked ids.
    pub async fn admin_delete(&self, key: &str) -> Result<Vec<String>, VaultError> {
        if credentials::get(&self.inner.store, key).await?.is_none() {
            return Err(VaultError::NotFound(format!("credential `{key}`")));
        }
        self.inner.audit.append(AuditRecord::new(events::DELETED, OPERATOR, "allow").key(key)).await?;
        self.delete_and_revoke(key).await
    }

    pub(super) async fn delete_and_revoke(&self, key: &str) -> Result<Vec<String>, VaultError> {
        let revoked = leases::revoke_for_credential(&self.inner.store, key, "credential_deleted", now_ms()).await?;
        self.changed(Domain::Leases);
        credentials::delete(&self.inner.store, key).await?;
        self.changed(Domain::Config);
        if let Ok(b) = self.broker() {
            b.invalidate(key);
        }
        Ok(revoked)
    }

    /// Leases, newest first.
    pub async fn leases(&self, state: Option<LeaseState>, agent: Option<&str>, limit: u32) -> Result<Vec<LeaseRecord>, VaultError> {
        Ok(leases::list(&self.inner.store, state, agent, limit).await?)
    }

    /// Leases active and not expired (for metrics).
    pub async fn active_lease_count(&self) -> Result<i64, VaultError> {
        Ok(leases::active_count(&self.inner.store, now_ms()).await?)
    }

    /// Audit entries queued for the group-commit writer (for metrics).
    pub fn audit_queue_depth(&self) -> usize {
        self.inner.audit.queue_depth()
    }

    /// (transactions committed, entries written) by this process's audit writer since open.
    /// Lease grants and releases ride in these transactions (group commit).
    pub fn audit_stats(&self) -> (u64, u64) {
        self.inner.audit.stats()
    }

    /// One lease.
    pub async fn lease_record(&self, id: &str) -> Result<Option<LeaseRecord>, VaultError> {
        Ok(leases::get(&self.inner.store, id).await?)
    }

    /// Revoke a lease and its subtree (operator). Returns every revoked id (the lease first).
    pub async fn admin_revoke(&self, id: &str) -> Result<Vec<String>, VaultError> {
        let l = leases::get(&self.inner.store, id).await?.ok_or_else(|| VaultError::NotFound(format!("lease `{id}`")))?;
        self.inner
            .audit
            .append(AuditRecord::new(events::REVOKED, OPERATOR, "allow").lease(id).key(&l.credential_key).service(&l.service).with("reason", "manual_revocation"))
            .await?;
        let mut out = vec![id.to_string()];
        let revoked = leases::revoke_subtree(&self.inner.store, id, "manual_revocation", now_ms()).await;
        self.changed(Domain::Leases);
        out.extend(revoked?);
        Ok(out)
    }

    /// Revoke every active lease whose id starts with `prefix` (operator), with subtrees.
    pub async fn admin_revoke_prefix(&self, prefix: &str) -> Result<Vec<String>, VaultError> {
        if prefix.len() < 6 {
            return Err(VaultError::Invalid("a revocation prefix must be at least 6 characters (e.g. `lease_`)".into()));
        }
        self.inner
            .audit
            .append(AuditRecord::new(events::REVOKED, OPERATOR, "allow").with("prefix", prefix).with("reason", "manual_revocation"))
            .await?;
        let revoked = leases::revoke_prefix(&self.inner.store, prefix, "manual_revocation", now_ms()).await;
        self.changed(Domain::Leases);
        Ok(revoked?)
    }

    /// Query the audit log (operator).
    pub async fn audit_query(&self, q: &ext::AuditQueryParams) -> Result<Vec<ext::AuditEvent>, VaultError> {
        audit::query(&self.inner.store, q).await.map_err(|e| VaultError::Invalid(e.to_string()))
    }

    /// Verify the audit chain.
    pub async fn audit_verify(&self) -> Result<VerifyReport, VaultError> {
        audit::verify(&self.inner.store, &self.inner.audit_key).await.map_err(|e| VaultError::Storage(e.to_string()))
    }

    /// Dry-run a policy decision for `agent` (no state change, not audited).
    pub async fn policy_check(
        &self,
        agent: &str,
        action: Action,
        key: &str,
        scopes: &[String],
        ttl: Option<u32>,
        purpose: Option<&str>,
    ) -> Result<ext::PolicyCheckResult, VaultError> {
        self.reload_policies_if_changed();
        let cred = credentials::get(&self.inner.store, key).await?.ok_or_else(|| VaultError::NotFound(format!("credential `{key}`")))?;
        let roles = agents::get(&self.inner.store, agent).await?;
        if let Some(a) = roles.as_ref().filter(|a| a.status != AgentStatus::Active) {
            return Ok(ext::PolicyCheckResult {
                allowed: false,
                outcome: "deny".into(),
                policy: None,
                reason: format!("agent is {}", a.status.as_str()),
            });
        }
        let who = Principal { id: agent.into(), roles: roles.map(|a| a.roles).unwrap_or_default() };
        let ttl = ttl.unwrap_or_else(|| self.caps(&cred).grant_ttl(None));
        let d = self.decide(&who, action, &cred, &Az { scopes, ttl, purpose, consumer: None, depth: 0 });
        Ok(ext::PolicyCheckResult { allowed: d.is_allowed(), outcome: d.outcome.as_str().into(), policy: d.policy, reason: d.reason })
    }

    /// Declarative load (`apply FILE.toml`).
    pub async fn apply(&self, doc: &ApplyDoc) -> Result<ApplyReport, VaultError> {
        crate::apply::run(self, doc).await
    }
}

/// Check a credential before it is stored.
pub fn validate_new(c: &NewCredential) -> Result<(), VaultError> {
    crp_core::types::validate_service(&c.key).map_err(|_| {
        VaultError::Invalid("credential keys are 1 to 256 characters of letters, digits, '.', '_', '/' and '-'".into())
    })?;
    crp_core::types::validate_service(&c.service).map_err(|e| VaultError::Invalid(e.message.replace("invalid params: ", "")))?;
    crp_core::types::validate_scopes(&c.scopes).map_err(|e| VaultError::Invalid(e.message.replace("invalid params: ", "")))?;
    if c.value.is_empty() {
        return Err(VaultError::Invalid("the credential value is empty".into()));
    }
    if c.max_ttl.is_some_and(|t| t == 0 || t > crp_core::types::MAX_TTL_SECONDS) {
        return Err(VaultError::Invalid("max_ttl must be between 1 and 86400 seconds".into()));
    }
    if let Some(u) = &c.config.upstream {
        let url = reqwest::Url::parse(u).map_err(|_| VaultError::Invalid("upstream must be an absolute http(s) URL".into()))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(VaultError::Invalid("upstream must be an absolute http(s) URL".into()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(VaultError::Invalid("upstream must not carry credentials in the URL".into()));
        }
    }
    if c.kind == CredentialKind::BasicAuth && !c.value.expose().contains(':') {
        return Err(VaultError::Invalid("a basic_auth value is `username:password`".into()));
    }
    if c.kind == CredentialKind::Oauth2ClientCredentials && c.config.broker.is_none() {
        return Err(VaultError::Invalid("an oauth2_client_credentials credential needs token_url and client_id".into()));
    }
    Ok(())
}
