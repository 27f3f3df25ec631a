//! Declarative load: `crp-provider apply FILE.toml`.
//!
//! ```toml
//! [[credential]]
//! key = "github/main"
//! service = "github.com/api"
//! type = "api_key"                      # or oauth_bearer, basic_auth, ..., oauth2_client_credentials
//! value_env = "GITHUB_TOKEN"            # or value_file = "token.txt" (relative to this file), or value = "…" (tests)
//! classification = "confidential"
//! scopes = ["repo", "read:org"]
//! tags = ["ci"]
//! max_ttl = 3600
//! renewable = true
//! upstream = "https://api.github.com"
//! inject = "header:Authorization:Bearer" # or query:NAME, basic
//! allow_private_hosts = []
//! metadata = { description = "GitHub bot" }
//! # broker = { token_url = "https://idp/oauth/token", client_id = "abc", scopes = ["api"] }
//!
//! [[policy]]
//! name = "team"                         # written to policies/60-team.cedar
//! source = '''@id("x") permit (...);'''  # or file = "team.cedar"
//!
//! [[agent]]
//! id = "ci"
//! roles = ["deploy"]
//! scopes = []
//! status = "active"
//! public_key = "base64…"                # optional
//! ```
//!
//! Applying the same file twice changes nothing: a credential whose attributes, configuration
//! and value are unchanged gets no new version; identical policy files and agents are left
//! alone. Values are read from the environment or files, never echoed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crp_core::SecretValue;
use crp_core::types::Classification;
use serde::{Deserialize, Serialize};

use crate::agents::{AgentRecord, AgentStatus};
use crate::credentials::{BrokerConfig, CredentialConfig, CredentialKind, NewCredential, parse_injection};
use crate::store::{now_ms, parse_rfc3339};
use crate::vault::{Vault, VaultError};

/// A parsed apply file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyDoc {
    /// `[[credential]]`.
    #[serde(default, alias = "credentials")]
    pub credential: Vec<ApplyCredential>,
    /// `[[policy]]`.
    #[serde(default, alias = "policies")]
    pub policy: Vec<ApplyPolicy>,
    /// `[[agent]]`.
    #[serde(default, alias = "agents")]
    pub agent: Vec<ApplyAgent>,
    /// Directory relative paths resolve against (the file's directory).
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

/// Injection in TOML: the short string form or a table.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum InjectSpec {
    /// `header:Authorization:Bearer`, `query:key`, `basic`.
    Short(String),
    /// `{ kind = "header", name = "…", prefix = "…" }`.
    Rule(crp_core::types::ext::InjectionRule),
}

/// One credential.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyCredential {
    /// Vault key.
    pub key: String,
    /// Service id (default: the key).
    #[serde(default)]
    pub service: Option<String>,
    /// Type (default api_key).
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Inline value (tests only).
    #[serde(default)]
    pub value: Option<SecretValue>,
    /// Environment variable holding the value.
    #[serde(default)]
    pub value_env: Option<String>,
    /// File holding the value (one trailing newline is dropped).
    #[serde(default)]
    pub value_file: Option<PathBuf>,
    /// Classification (default confidential).
    #[serde(default)]
    pub classification: Option<Classification>,
    /// Grantable scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Lease TTL cap.
    #[serde(default)]
    pub max_ttl: Option<u32>,
    /// Renewable leases (default true).
    #[serde(default)]
    pub renewable: Option<bool>,
    /// Upstream base URL.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Injection rule.
    #[serde(default)]
    pub inject: Option<InjectSpec>,
    /// Private hosts allowed for this credential.
    #[serde(default)]
    pub allow_private_hosts: Vec<String>,
    /// Metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// RFC 3339 expiry of the stored credential.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// OAuth2 client-credentials settings (type oauth2_client_credentials).
    #[serde(default)]
    pub broker: Option<BrokerConfig>,
}

impl std::fmt::Debug for ApplyCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplyCredential").field("key", &self.key).finish_non_exhaustive()
    }
}

/// One policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyPolicy {
    /// Name: written to `policies/60-{name}.cedar`.
    pub name: String,
    /// Cedar text.
    #[serde(default)]
    pub source: Option<String>,
    /// Or a file with it.
    #[serde(default)]
    pub file: Option<PathBuf>,
}

/// One agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyAgent {
    /// Id (policy principal).
    pub id: String,
    /// Display name (default: id).
    #[serde(default)]
    pub name: Option<String>,
    /// Ed25519 public key, base64.
    #[serde(default)]
    pub public_key: Option<String>,
    /// Roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Status (default active).
    #[serde(default)]
    pub status: Option<AgentStatus>,
}

/// What `apply` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    /// Credentials stored (new or new version).
    pub credentials_changed: Vec<String>,
    /// Credentials already as declared.
    pub credentials_unchanged: Vec<String>,
    /// Policy files written.
    pub policies_changed: Vec<String>,
    /// Policy files already as declared.
    pub policies_unchanged: Vec<String>,
    /// Agents created or updated.
    pub agents_changed: Vec<String>,
    /// Agents already as declared.
    pub agents_unchanged: Vec<String>,
}

impl ApplyDoc {
    /// Parse TOML text; `base_dir` resolves relative `value_file` / `file` paths.
    pub fn parse(text: &str, base_dir: Option<&Path>) -> Result<Self, VaultError> {
        let mut d: ApplyDoc = toml::from_str(text).map_err(|e| VaultError::Invalid(redact_toml(&e)))?;
        d.base_dir = base_dir.map(Path::to_path_buf);
        Ok(d)
    }

    /// Read and parse a file.
    pub fn load(path: &Path) -> Result<Self, VaultError> {
        let text = std::fs::read_to_string(path).map_err(|e| VaultError::Io(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text, path.parent()).map_err(|e| VaultError::Invalid(format!("{}: {e}", path.display())))
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        match &self.base_dir {
            Some(b) if p.is_relative() => b.join(p),
            _ => p.to_path_buf(),
        }
    }
}

/// TOML errors quote the offending line, which may hold an inline value: keep only the message
/// and position.
fn redact_toml(e: &toml::de::Error) -> String {
    let pos = e.span().map(|s| format!(" (at byte {})", s.start)).unwrap_or_default();
    format!("invalid apply file: {}{pos}", e.message())
}

/// Strip one trailing newline (files and stdin usually end with one).
pub fn strip_newline(mut s: String) -> String {
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    s
}

fn credential_value(doc: &ApplyDoc, c: &ApplyCredential) -> Result<SecretValue, VaultError> {
    let n = usize::from(c.value.is_some()) + usize::from(c.value_env.is_some()) + usize::from(c.value_file.is_some());
    if n != 1 {
        return Err(VaultError::Invalid(format!(
            "credential `{}`: give exactly one of value_env, value_file or value",
            c.key
        )));
    }
    if let Some(v) = &c.value {
        return Ok(v.clone());
    }
    if let Some(var) = &c.value_env {
        return std::env::var(var)
            .map(SecretValue::new)
            .map_err(|_| VaultError::Invalid(format!("credential `{}`: environment variable {var} is not set", c.key)));
    }
    let p = doc.resolve(c.value_file.as_deref().unwrap_or(Path::new("")));
    let text = std::fs::read_to_string(&p)
        .map_err(|e| VaultError::Io(format!("credential `{}`: cannot read {}: {e}", c.key, p.display())))?;
    Ok(SecretValue::new(strip_newline(text)))
}

/// Turn one declared credential into a [`NewCredential`].
pub fn to_new_credential(doc: &ApplyDoc, c: &ApplyCredential) -> Result<NewCredential, VaultError> {
    let bad = |m: String| VaultError::Invalid(format!("credential `{}`: {m}", c.key));
    let kind: CredentialKind = c.kind.as_deref().unwrap_or("api_key").parse().map_err(bad)?;
    let injection = match &c.inject {
        None => kind.default_injection(),
        Some(InjectSpec::Short(s)) => parse_injection(s).map_err(bad)?,
        Some(InjectSpec::Rule(r)) => r.clone(),
    };
    let expires_at = match &c.expires_at {
        Some(s) => Some(parse_rfc3339(s).ok_or_else(|| bad(format!("expires_at `{s}` is not RFC 3339")))?),
        None => None,
    };
    if expires_at.is_some_and(|e| e <= now_ms()) {
        return Err(bad("expires_at is in the past".into()));
    }
    Ok(NewCredential {
        key: c.key.clone(),
        service: c.service.clone().unwrap_or_else(|| c.key.clone()),
        kind,
        classification: c.classification.unwrap_or(Classification::Confidential),
        tags: c.tags.clone(),
        scopes: c.scopes.clone(),
        max_ttl: c.max_ttl,
        renewable: c.renewable.unwrap_or(true),
        metadata: c.metadata.clone(),
        expires_at,
        value: credential_value(doc, c)?,
        config: CredentialConfig {
            upstream: c.upstream.clone(),
            injection,
            allowed_private_hosts: c.allow_private_hosts.clone(),
            broker: c.broker.clone(),
        },
    })
}

/// Apply `doc` to `vault` (operator rights). Everything is validated before anything is written.
pub async fn run(vault: &Vault, doc: &ApplyDoc) -> Result<ApplyReport, VaultError> {
    let mut report = ApplyReport::default();
    // Validate first: all credentials, all policies (together with the installed set), agents.
    let creds: Vec<NewCredential> =
        doc.credential.iter().map(|c| to_new_credential(doc, c)).collect::<Result<_, _>>()?;
    for c in &creds {
        crate::vault::validate_new(c)?;
    }
    let mut policies = Vec::new();
    for p in &doc.policy {
        if p.name.is_empty() || !p.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b)) {
            return Err(VaultError::Invalid(format!("policy name `{}`: use letters, digits, '_' and '-'", p.name)));
        }
        let src = match (&p.source, &p.file) {
            (Some(s), None) => s.clone(),
            (None, Some(f)) => {
                let path = doc.resolve(f);
                std::fs::read_to_string(&path).map_err(|e| VaultError::Io(format!("policy `{}`: cannot read {}: {e}", p.name, path.display())))?
            }
            _ => return Err(VaultError::Invalid(format!("policy `{}`: give exactly one of source or file", p.name))),
        };
        crate::policy::PolicyEngine::validate(&src).map_err(|e| VaultError::Policy(e.render(&format!("policy `{}`", p.name))))?;
        policies.push((format!("60-{}.cedar", p.name), src));
    }
    let agents: Vec<AgentRecord> = doc
        .agent
        .iter()
        .map(|a| AgentRecord {
            id: a.id.clone(),
            name: a.name.clone().unwrap_or_else(|| a.id.clone()),
            public_key: a.public_key.clone().unwrap_or_default(),
            roles: a.roles.clone(),
            scopes: a.scopes.clone(),
            status: a.status.unwrap_or(AgentStatus::Active),
        })
        .collect();
    for a in &agents {
        crate::agents::validate_id(&a.id).map_err(|e| VaultError::Invalid(format!("agent `{}`: {e}", a.id)))?;
        if !a.public_key.is_empty() {
            crate::agents::validate_public_key(&a.public_key).map_err(|e| VaultError::Invalid(format!("agent `{}`: {e}", a.id)))?;
        }
    }

    for c in &creds {
        let (_, changed) = vault.admin_store(c).await?;
        if changed { &mut report.credentials_changed } else { &mut report.credentials_unchanged }.push(c.key.clone());
    }
    let dir = crate::config::Paths::new(vault.home()).policies_dir();
    for (file, src) in &policies {
        let same = std::fs::read_to_string(dir.join(file)).is_ok_and(|cur| &cur == src);
        if same {
            report.policies_unchanged.push(file.clone());
        } else {
            vault.install_policy(file, src)?;
            report.policies_changed.push(file.clone());
        }
    }
    for a in &agents {
        let changed = vault.upsert_agent(a).await?;
        if changed { &mut report.agents_changed } else { &mut report.agents_unchanged }.push(a.id.clone());
    }
    Ok(report)
}
