//! [`Backend`] for the real [`Vault`]: a thin mapping of the vault's API and errors.

use std::sync::Arc;

use async_trait::async_trait;
use crp_core::{Provider, SecretValue};

use super::backend::{AgentRecord, Backend, Gauges, ProxyAuditRecord, ProxyDenied, ProxyGrant, RegisterError};
use crate::vault::Vault;

#[async_trait]
impl Backend for Vault {
    fn provider(&self) -> Arc<dyn Provider> {
        Arc::new(self.clone())
    }

    fn set_proxy_base_url(&self, base: &str) {
        Vault::set_proxy_base_url(self, base)
    }

    async fn proxy_grant(&self, lease_id: &str, session_token: &str) -> Result<ProxyGrant, ProxyDenied> {
        Vault::proxy_grant(self, lease_id, session_token).await
    }

    async fn broker_refresh(&self, lease_id: &str) -> Result<SecretValue, ProxyDenied> {
        Vault::broker_refresh(self, lease_id).await
    }

    async fn audit_proxy(&self, rec: ProxyAuditRecord) -> Result<(), String> {
        Vault::audit_proxy(self, rec).await.map_err(|e| e.to_string())
    }

    async fn audit_proxy_refused(&self, lease_id: &str, method: &str, path: &str, status: u16) -> Result<(), String> {
        let Some(l) = Vault::lease_record(self, lease_id).await.map_err(|e| e.to_string())? else {
            return Ok(());
        };
        let rec = ProxyAuditRecord {
            lease_id: l.id,
            agent: l.agent,
            key: l.credential_key,
            method: method.to_string(),
            path: path.to_string(),
            status,
            bytes_in: 0,
            bytes_out: 0,
            duration_us: 0,
        };
        Vault::audit_proxy(self, rec).await.map_err(|e| e.to_string())
    }

    async fn agent(&self, agent_id: &str) -> Result<Option<AgentRecord>, String> {
        Vault::agent(self, agent_id).await.map_err(|e| e.to_string())
    }

    async fn register_agent(
        &self,
        token: &str,
        public_key_b64: &str,
        name: Option<&str>,
    ) -> Result<AgentRecord, RegisterError> {
        Vault::register_agent(self, token, public_key_b64, name).await.map_err(|e| {
            let m = e.to_string();
            if m.contains("bootstrap token") {
                RegisterError::BadToken(m)
            } else if m.contains("publicKey") || m.contains("agent name") {
                RegisterError::Invalid(m)
            } else {
                RegisterError::Internal("registration failed".into())
            }
        })
    }

    async fn gauges(&self) -> Gauges {
        let leases_active = Vault::active_lease_count(self).await.ok().map(|n| n.max(0) as u64);
        Gauges {
            leases_active,
            audit_queue_depth: Some(Vault::audit_queue_depth(self) as u64),
            audit_commits: Some(Vault::audit_stats(self)),
        }
    }

    async fn shutdown(&self) {
        Vault::shutdown(self).await
    }
}
