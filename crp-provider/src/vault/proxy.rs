//! The proxy's hot path: [`Vault::proxy_grant`] (lease + session token check, decrypted
//! injection material), [`Vault::broker_refresh`] for brokered (OAuth2 client-credentials)
//! credentials, and [`Vault::audit_proxy`] for the per-request `credential.used` entry.

use std::sync::Arc;

use crp_core::SecretValue;

use crate::audit::{AuditRecord, events};
use crate::broker::ClientCredentials;
use crate::cache::Lookup;
use crate::credentials::{self, CredentialConfig};
use crate::{crypto, proxy_lookup};
use crate::leases::{self, LeaseState};
use crate::store::now_ms;

use super::{AgentStatus, ProxyAuditRecord, ProxyDenied, ProxyGrant, Vault, VaultError};

impl Vault {

    /// Check a proxied request's lease and session token and hand the proxy what it needs.
    ///
    /// The lease's view (state, token hash, holder's status, the opened credential) comes from
    /// the grant cache while no lease, agent or credential of the vault has changed since it
    /// was read ([`crate::cache`]); any such change, made by this process or another one on
    /// the same vault, is seen by the next request. Only views that passed every check are
    /// kept, so unknown leases, wrong tokens and ended leases read the database each time.
    pub async fn proxy_grant(&self, lease_id: &str, session_token: &str) -> Result<ProxyGrant, ProxyDenied> {
        let (l, ticket) = match self.inner.grants.get(lease_id) {
            Lookup::Hit(view) => (view, None),
            Lookup::Miss(ticket) => {
                let view = proxy_lookup::lookup(&self.inner.store, &self.inner.dk, lease_id).await.map_err(|e| {
                    tracing::error!(target: "crp_provider::vault", "proxy lease lookup failed: {e}");
                    ProxyDenied::new(503, "provider_error", "provider error: storage failure")
                })?;
                let Some(view) = view else {
                    return Err(ProxyDenied::new(404, "lease_not_found", "lease not found"));
                };
                (Arc::new(view), Some(ticket))
            }
        };
        let presented = crypto::sha256_hex(session_token.as_bytes());
        if !crypto::ct_eq(presented.as_bytes(), l.token_hash.as_bytes()) {
            return Err(ProxyDenied::new(401, "bad_session_token", "missing or wrong session token for this lease"));
        }
        let now = now_ms();
        let grace = i64::from(self.inner.config.grace()) * 1000;
        match l.state {
            LeaseState::Revoked => return Err(ProxyDenied::new(403, "lease_revoked", "lease revoked")),
            LeaseState::Released => return Err(ProxyDenied::new(403, "lease_released", "lease released")),
            LeaseState::Expired => return Err(ProxyDenied::new(410, "lease_expired", "lease expired")),
            LeaseState::Active if now >= l.expires_at + grace => {
                return Err(ProxyDenied::new(410, "lease_expired", "lease expired"));
            }
            LeaseState::Active => {}
        }
        // Disabling an agent cuts off its leases at once.
        if let Some(status) = l.agent_status.filter(|s| *s != AgentStatus::Active) {
            return Err(ProxyDenied::new(403, "agent_disabled", format!("agent is {}", status.as_str())));
        }
        let Some(cred) = &l.credential else {
            return Err(ProxyDenied::new(403, "credential_deleted", "the credential behind this lease was deleted"));
        };
        if cred.is_expired(now) {
            return Err(ProxyDenied::new(403, "credential_expired", "the stored credential has expired"));
        }
        let config = &cred.config;
        let Some(upstream) = config.upstream.clone() else {
            return Err(ProxyDenied::new(502, "no_upstream", "the credential has no upstream URL configured"));
        };
        if let Some(ticket) = ticket {
            self.inner.grants.insert(ticket, lease_id.to_string(), l.clone());
        }
        let (secret, brokered) = if cred.kind.brokered() {
            let cc = client_credentials(config, cred.value.clone()).map_err(|m| ProxyDenied::new(502, "broker_failure", m))?;
            let b = self.broker().map_err(|m| ProxyDenied::new(502, "broker_failure", format!("broker failure: {m}")))?;
            let tok = b
                .token(&cred.key, &cc)
                .await
                .map_err(|e| ProxyDenied::new(502, "broker_failure", format!("broker failure: {e}")))?;
            (tok, true)
        } else {
            (cred.value.clone(), false)
        };
        Ok(ProxyGrant {
            lease_id: l.id.clone(),
            key: cred.key.clone(),
            service: cred.service.clone(),
            upstream,
            injection: config.injection.clone(),
            secret,
            allowed_private_hosts: config.allowed_private_hosts.clone(),
            brokered,
            agent: l.agent.clone(),
        })
    }

    /// Force a new brokered token for the lease's credential (after an upstream 401).
    pub async fn broker_refresh(&self, lease_id: &str) -> Result<SecretValue, ProxyDenied> {
        let store = &self.inner.store;
        let l = leases::get(store, lease_id)
            .await
            .map_err(|_| ProxyDenied::new(503, "provider_error", "provider error: storage failure"))?
            .ok_or_else(|| ProxyDenied::new(404, "lease_not_found", "lease not found"))?;
        if !l.is_live(now_ms(), i64::from(self.inner.config.grace()) * 1000) {
            return Err(ProxyDenied::new(403, "lease_not_active", "lease is not active"));
        }
        let (cred, value, config) = credentials::open_current(store, &self.inner.dk, &l.credential_key)
            .await
            .map_err(|_| ProxyDenied::new(503, "provider_error", "provider error: storage failure"))?
            .ok_or_else(|| ProxyDenied::new(403, "credential_deleted", "the credential behind this lease was deleted"))?;
        if !cred.kind.brokered() {
            return Err(ProxyDenied::new(400, "not_brokered", "the credential is not brokered"));
        }
        let cc = client_credentials(&config, value).map_err(|m| ProxyDenied::new(502, "broker_failure", m))?;
        let b = self.broker().map_err(|m| ProxyDenied::new(502, "broker_failure", format!("broker failure: {m}")))?;
        b.refresh(&cred.key, &cc).await.map_err(|e| ProxyDenied::new(502, "broker_failure", format!("broker failure: {e}")))
    }

    /// Audit one proxied request (`credential.used`); durable before it returns.
    pub async fn audit_proxy(&self, rec: ProxyAuditRecord) -> Result<(), VaultError> {
        let decision = if rec.status < 400 { "allow" } else if rec.status == 401 || rec.status == 403 || rec.status == 410 { "deny" } else { "error" };
        let path: String = rec.path.split('?').next().unwrap_or("").chars().take(512).collect();
        let a = AuditRecord::new(events::USED, &rec.agent, decision)
            .key(&rec.key)
            .lease(&rec.lease_id)
            .with("method", rec.method.chars().take(16).collect::<String>())
            .with("path", path)
            .with("status", rec.status)
            .with("bytesIn", rec.bytes_in)
            .with("bytesOut", rec.bytes_out)
            .with("durationUs", rec.duration_us);
        self.inner.audit.append(a).await?;
        Ok(())
    }
}

fn client_credentials(config: &CredentialConfig, secret: SecretValue) -> Result<ClientCredentials, String> {
    let b = config.broker.as_ref().ok_or_else(|| "broker failure: brokered credential has no token endpoint".to_string())?;
    Ok(ClientCredentials {
        token_url: b.token_url.clone(),
        client_id: b.client_id.clone(),
        client_secret: secret,
        scopes: b.scopes.clone(),
        allowed_private_hosts: config.allowed_private_hosts.clone(),
    })
}
