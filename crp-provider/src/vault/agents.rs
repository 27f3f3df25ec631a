//! Agent records and the approvals queue, as the vault exposes them to the HTTP server and
//! the admin CLI (registration, bootstrap tokens, status changes, approval decisions).

use std::sync::Arc;

use crate::agents::{self, AgentError, ApprovalRecord};
use crate::audit::{AuditRecord, events};
use crate::epoch::Domain;

use super::{AgentRecord, AgentStatus, OPERATOR, Vault, VaultError};

impl Vault {

    /// One agent. Served from memory while no agent, credential or setting changed in any
    /// process of this vault (the change stamps), so a status change is seen at once.
    pub async fn agent(&self, agent_id: &str) -> Result<Option<AgentRecord>, VaultError> {
        Ok(self.agent_shared(agent_id).await?.map(|a| AgentRecord::clone(&a)))
    }

    /// [`Vault::agent`] without the copy: the cached record itself. Unknown ids are read from
    /// the database every time (never cached, so that a flood of made-up ids cannot fill the
    /// cache).
    pub(super) async fn agent_shared(&self, agent_id: &str) -> Result<Option<Arc<AgentRecord>>, AgentError> {
        self.inner.agents.get_or_load(agent_id, || async { Ok(agents::get(&self.inner.store, agent_id).await?.map(Arc::new)) }).await
    }

    /// Create or update an agent (operator, `apply`). Returns whether anything changed.
    pub async fn upsert_agent(&self, a: &AgentRecord) -> Result<bool, VaultError> {
        if agents::get(&self.inner.store, &a.id).await?.as_ref() == Some(a) {
            return Ok(false);
        }
        self.inner
            .audit
            .append(AuditRecord::new(events::AGENT, OPERATOR, "allow").with("op", "upsert").with("agent", a.id.clone()).with("status", a.status.as_str()))
            .await?;
        let changed = agents::upsert(&self.inner.store, a).await;
        self.changed(Domain::Config);
        Ok(changed?)
    }

    /// Every agent.
    pub async fn agents(&self) -> Result<Vec<AgentRecord>, VaultError> {
        Ok(agents::list(&self.inner.store).await?)
    }

    /// Redeem a bootstrap token: a new `pending` agent.
    pub async fn register_agent(&self, bootstrap_token: &str, public_key_b64: &str, name: Option<&str>) -> Result<AgentRecord, VaultError> {
        let res = agents::redeem_bootstrap(&self.inner.store, bootstrap_token, public_key_b64, name).await;
        self.changed(Domain::Config);
        let rec = match &res {
            Ok(a) => AuditRecord::new(events::AGENT, &a.id, "allow").with("op", "register").with("status", "pending"),
            Err(e) => AuditRecord::new(events::AGENT, "unknown", "deny").with("op", "register").with("reason", e.to_string()),
        };
        self.inner.audit.append(rec).await?;
        Ok(res?)
    }

    /// Issue a one-shot bootstrap token (operator).
    pub async fn bootstrap_agent(&self, name: &str, roles: &[String], scopes: &[String], ttl_s: u32) -> Result<agents::Bootstrap, VaultError> {
        self.inner
            .audit
            .append(AuditRecord::new(events::AGENT, OPERATOR, "allow").with("op", "bootstrap").with("agent", name))
            .await?;
        Ok(agents::create_bootstrap(&self.inner.store, name, roles, scopes, ttl_s).await?)
    }

    /// Approve, disable or re-enable an agent (operator).
    pub async fn set_agent_status(&self, id: &str, status: AgentStatus) -> Result<AgentRecord, VaultError> {
        self.inner
            .audit
            .append(AuditRecord::new(events::AGENT, OPERATOR, "allow").with("op", "set_status").with("agent", id).with("status", status.as_str()))
            .await?;
        let rec = agents::set_status(&self.inner.store, id, status).await;
        self.changed(Domain::Config);
        rec?.ok_or_else(|| VaultError::NotFound(format!("agent `{id}`")))
    }

    /// Approvals (all, or with `status`).
    pub async fn approvals(&self, status: Option<&str>) -> Result<Vec<ApprovalRecord>, VaultError> {
        Ok(agents::list_approvals(&self.inner.store, status).await?)
    }

    /// Approve or deny a held request (operator).
    pub async fn decide_approval(&self, id: &str, approve: bool) -> Result<ApprovalRecord, VaultError> {
        let existing = agents::get_approval(&self.inner.store, id).await?.ok_or_else(|| VaultError::NotFound(format!("approval `{id}`")))?;
        if existing.status != "pending" {
            return Err(VaultError::Invalid(format!("approval `{id}` is already {}", existing.status)));
        }
        self.inner
            .audit
            .append(
                AuditRecord::new(events::APPROVAL_DECIDED, OPERATOR, if approve { "allow" } else { "deny" })
                    .key(&existing.key)
                    .with("approvalId", id)
                    .with("agent", existing.agent.clone()),
            )
            .await?;
        agents::decide(&self.inner.store, id, approve, OPERATOR)
            .await?
            .ok_or_else(|| VaultError::Invalid(format!("approval `{id}` is no longer pending")))
    }
}
