//! The conformance fixture format: what a provider under test must load before
//! `crp-conformance run` can test it.
//!
//! Owned by the conformance suite. The format is provider-neutral JSON (no policy language, no
//! storage layout): it lists canary credentials, the services that front them, how each is
//! injected, which upstream each points at, and the *intended outcome* of each request by each
//! runner identity. A provider maps those outcomes onto its own policy mechanism with a few
//! lines of code (ours: `Vault::load_fixtures`, used by `crp-provider serve --dev --fixtures`).
//!
//! # Versioning
//!
//! `format` is [`FORMAT`] (`crp-conformance-fixtures/1`). Additive changes (new optional fields,
//! new [`FixtureRole`]s) keep the number; anything a loader would misread bumps it. Loaders
//! must refuse a `format` they do not know ([`Fixtures::validate`] does).
//!
//! # What a loader must do
//!
//! For every entry of `credentials`:
//! - store `value` as the secret of a credential named `key`, reachable as CRP service
//!   `service`, of type `type`, with `classification`, the grantable `scopes`, a lease TTL cap
//!   of `maxTtl` seconds, and `renewable`;
//! - configure the injecting proxy: requests under the lease's `proxyBaseUrl` go to
//!   `upstream` (base URL; the rest of the path and the query are appended) with the secret
//!   put on as `inject` says;
//! - allow the upstream even though it is on loopback: `allowPrivateHosts` lists the hosts
//!   this one credential may reach despite an SSRF guard (the fixture's upstream is always
//!   the runner's echo server on `127.0.0.1`; see [`FixtureUpstream::loopback`]);
//! - when `broker` is present, do not inject `value`: it is the OAuth2 client secret; mint an
//!   access token with the client-credentials grant at `broker.tokenUrl` (client id
//!   `broker.clientId`, secret `value`, `broker.scopes`) and inject that token instead;
//! - for each `access` entry make the named agent's `crp/use` (and the lease operations on
//!   its own leases: renew, release, revoke, delegate) end as `outcome` says; every agent not
//!   listed is denied (default deny). `export: true` additionally permits the v0.1 export
//!   `crp/resolve` for that agent (providers that speak only 0.2 ignore it).
//!
//! `agents` lists the identities the runner acts as. A provider that authenticates callers
//! gives the runner one of these identities (ours: `--agent-key` signing, or the unauthenticated
//! loopback caller of `serve --dev`, which a loader also treats as `agents[0]`).
//! `delegation.maxDepth` is the deepest delegated chain the provider must allow (a root lease
//! has depth 0); one level deeper must be refused.
//!
//! Canary values look like `crp-canary-<32 hex>`: distinct, recognisable, useless anywhere
//! else. The runner searches every answer for them (raw, hex, base64, URL-encoded).
//!
//! ```
//! use crp_core::fixtures::{Fixtures, FixtureRole};
//! let f = Fixtures::conformance("127.0.0.1:7799");
//! f.validate().unwrap();
//! let primary = f.by_role(FixtureRole::Primary).unwrap();
//! assert!(primary.upstream.starts_with("http://127.0.0.1:7799/"));
//! assert!(primary.value.expose().starts_with("crp-canary-"));
//! let back: Fixtures = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
//! assert_eq!(back, f);
//! ```

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::secret::SecretValue;
use crate::types::ext::InjectionRule;
use crate::types::{Classification, CredentialType};

/// The format identifier this module reads and writes.
pub const FORMAT: &str = "crp-conformance-fixtures/1";

/// The default address of the runner's upstream echo server.
pub const DEFAULT_UPSTREAM: &str = "127.0.0.1:7799";

/// The agent id the runner acts as in the default fixtures.
pub const CONFORMANCE_AGENT: &str = "crp-conformance";

/// The delegation depth the default fixtures ask providers to allow.
pub const DEFAULT_MAX_DELEGATION_DEPTH: u32 = 2;

/// Path of the echo server's OAuth2 token endpoint.
pub const TOKEN_PATH: &str = "/oauth/token";

/// Path prefix of the echo server's reflecting endpoint (echoes request headers back).
pub const REFLECT_PREFIX: &str = "/reflect";

/// Path prefix under which each service gets its own recording endpoint: `/svc/{name}`.
pub const SERVICE_PREFIX: &str = "/svc";

/// The whole fixture document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fixtures {
    /// Always [`FORMAT`].
    pub format: String,
    /// Human-readable summary of the contract (informative).
    #[serde(default)]
    pub description: String,
    /// The runner's echo server every credential points at.
    pub upstream: FixtureUpstream,
    /// The identities the runner acts as.
    pub agents: Vec<FixtureAgent>,
    /// Delegation limits the provider must enforce.
    pub delegation: DelegationLimits,
    /// Canary credentials and their services.
    pub credentials: Vec<FixtureCredential>,
}

/// Where the runner's echo server listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureUpstream {
    /// `host:port`, e.g. `127.0.0.1:7799`.
    pub address: String,
    /// `http://{address}`.
    pub base_url: String,
    /// Always true: the upstream is on loopback, so a provider with an SSRF guard must allow
    /// it explicitly, per credential (see [`FixtureCredential::allow_private_hosts`]).
    pub loopback: bool,
    /// OAuth2 token endpoint (client-credentials grant) served by the echo server.
    pub token_url: String,
}

/// One identity the runner acts as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureAgent {
    /// Agent id.
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Roles, for providers that group agents (informative; outcomes name agents by id).
    #[serde(default)]
    pub roles: Vec<String>,
    /// The agent may read the audit trail of the fixture credentials through whatever the
    /// provider offers for it (ours: `x-crp/audit.query`, policy action `audit`).
    #[serde(default)]
    pub audit: bool,
}

/// Delegation limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DelegationLimits {
    /// Deepest chain allowed (root = 0). A request for depth `maxDepth + 1` must fail.
    pub max_depth: u32,
}

/// What a request by an agent must end in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FixtureOutcome {
    /// A handle is returned.
    Allow,
    /// -33020: a human must approve; no handle.
    RequireApproval,
    /// -33021: stop; no handle, no retry.
    Quarantine,
    /// A policy denial (-33003) or "not found" (-33002); no handle.
    Deny,
}

impl FixtureOutcome {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::RequireApproval => "require_approval",
            Self::Quarantine => "quarantine",
            Self::Deny => "deny",
        }
    }
}

/// One agent's intended outcome on one credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureAccess {
    /// Agent id (one of [`Fixtures::agents`]).
    pub agent: String,
    /// What `crp/use` must end in.
    pub outcome: FixtureOutcome,
    /// Also permit the v0.1 export `crp/resolve`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub export: bool,
}

/// The part a credential plays in the suite; the runner finds its test subjects by role, so
/// a custom fixture file may rename keys and services freely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FixtureRole {
    /// The main subject: bearer header, scopes, several cases.
    Primary,
    /// Header injection without a prefix (`X-Api-Key`).
    HeaderKey,
    /// Query-parameter injection.
    Query,
    /// HTTP Basic injection (`value` is `username:password`).
    Basic,
    /// A 2-second TTL cap for expiry cases.
    ShortTtl,
    /// A credential whose leases may not be renewed.
    NotRenewable,
    /// `crp/use` must end in -33020.
    RequireApproval,
    /// `crp/use` must end in -33021.
    Quarantine,
    /// The runner's agent is denied.
    Denied,
    /// Classification `restricted`.
    Restricted,
    /// OAuth2 client-credentials brokering against the echo server's token endpoint.
    Brokered,
    /// Upstream that reflects request headers (tests the proxy's response redaction).
    Reflect,
    /// v0.1 export (`crp/resolve`) permitted.
    Export,
}

/// OAuth2 client-credentials brokering (v0.2 §6.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureBroker {
    /// Token endpoint (the echo server's `/oauth/token`).
    pub token_url: String,
    /// OAuth2 client id; the client secret is the credential's `value`.
    pub client_id: String,
    /// Scopes asked of the token endpoint.
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// One canary credential and the service that fronts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FixtureCredential {
    /// Vault key.
    pub key: String,
    /// CRP service id (what `crp/use` names).
    pub service: String,
    /// What the suite uses it for.
    pub fixture_role: FixtureRole,
    /// Human description (a provider may show it in `crp/list`).
    #[serde(default)]
    pub description: String,
    /// Credential type.
    #[serde(rename = "type")]
    pub credential_type: CredentialType,
    /// The canary secret (for Basic: `username:password`; for brokered: the client secret).
    pub value: SecretValue,
    /// Scopes a lease may be granted; anything else must not be granted.
    pub scopes: Vec<String>,
    /// Lease TTL cap, seconds.
    pub max_ttl: u32,
    /// Whether leases on it may be renewed.
    pub renewable: bool,
    /// Sensitivity label.
    pub classification: Classification,
    /// Upstream base URL the proxy forwards to.
    pub upstream: String,
    /// How the secret goes on the upstream request.
    pub inject: InjectionRule,
    /// Hosts this credential may reach although they are private/loopback.
    pub allow_private_hosts: Vec<String>,
    /// Brokering, when the credential is a client secret rather than the injected value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<FixtureBroker>,
    /// Intended outcome per agent; unlisted agents are denied.
    pub access: Vec<FixtureAccess>,
    /// Free tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

impl FixtureCredential {
    /// The outcome for `agent` (default deny).
    pub fn outcome_for(&self, agent: &str) -> FixtureOutcome {
        self.access
            .iter()
            .find(|a| a.agent == agent)
            .map(|a| a.outcome)
            .unwrap_or(FixtureOutcome::Deny)
    }

    /// Whether `agent` may use the v0.1 export.
    pub fn export_for(&self, agent: &str) -> bool {
        self.access.iter().any(|a| a.agent == agent && a.export && a.outcome == FixtureOutcome::Allow)
    }
}

/// A deterministic canary: `crp-canary-` + 32 hex digits derived from `label`.
///
/// Deterministic so that the committed fixture file and `crp-conformance fixtures` agree; the
/// values are worthless outside the suite.
pub fn canary(label: &str) -> String {
    let d = Sha256::digest(format!("crp-conformance-canary/1/{label}").as_bytes());
    format!("crp-canary-{}", hex::encode(&d[..16]))
}

impl Fixtures {
    /// The suite's standard fixtures, with the echo server at `upstream` (`host:port`).
    pub fn conformance(upstream: &str) -> Fixtures {
        let base = format!("http://{upstream}");
        let host = upstream
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
            .unwrap_or_else(|| upstream.to_string());
        let agent = CONFORMANCE_AGENT;
        let allow = vec![FixtureAccess { agent: agent.into(), outcome: FixtureOutcome::Allow, export: false }];
        let token_url = format!("{base}{TOKEN_PATH}");
        let bearer = |p: &str| InjectionRule::Header { name: "Authorization".into(), prefix: p.into() };
        #[allow(clippy::too_many_arguments)]
        let cred = |name: &str,
                    role: FixtureRole,
                    desc: &str,
                    ty: CredentialType,
                    value: String,
                    scopes: &[&str],
                    max_ttl: u32,
                    renewable: bool,
                    class: Classification,
                    upstream_path: String,
                    inject: InjectionRule,
                    access: Vec<FixtureAccess>| FixtureCredential {
            key: format!("conformance/{name}"),
            service: format!("conformance.test/{name}"),
            fixture_role: role,
            description: desc.into(),
            credential_type: ty,
            value: SecretValue::new(value),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            max_ttl,
            renewable,
            classification: class,
            upstream: format!("{base}{upstream_path}"),
            inject,
            allow_private_hosts: vec![host.clone()],
            broker: None,
            access,
            tags: vec!["conformance".into()],
        };
        let svc = |name: &str| format!("{SERVICE_PREFIX}/{name}");
        let only = |o: FixtureOutcome| vec![FixtureAccess { agent: agent.into(), outcome: o, export: false }];
        let mut credentials = vec![
            cred("primary", FixtureRole::Primary, "Bearer API key; the main subject of the suite",
                CredentialType::ApiKey, canary("primary"), &["read", "write"], 300, true,
                Classification::Internal, svc("primary"), bearer("Bearer"), allow.clone()),
            cred("header", FixtureRole::HeaderKey, "API key in X-Api-Key without a prefix",
                CredentialType::ApiKey, canary("header"), &["read"], 600, true,
                Classification::Confidential, svc("header"),
                InjectionRule::Header { name: "X-Api-Key".into(), prefix: String::new() }, allow.clone()),
            cred("query", FixtureRole::Query, "API key in the api_key query parameter",
                CredentialType::ApiKey, canary("query"), &["read"], 600, true,
                Classification::Public, svc("query"), InjectionRule::Query { name: "api_key".into() },
                allow.clone()),
            cred("basic", FixtureRole::Basic, "username:password sent as HTTP Basic",
                CredentialType::BasicAuth, format!("crp-conformance:{}", canary("basic")), &["read"], 600,
                true, Classification::Internal, svc("basic"), InjectionRule::Basic, allow.clone()),
            cred("short-ttl", FixtureRole::ShortTtl, "Leases capped at 2 seconds (expiry cases)",
                CredentialType::ApiKey, canary("short-ttl"), &["read"], 2, true,
                Classification::Internal, svc("short-ttl"), bearer("Bearer"), allow.clone()),
            cred("fixed", FixtureRole::NotRenewable, "Leases may not be renewed",
                CredentialType::ApiKey, canary("fixed"), &["read"], 300, false,
                Classification::Internal, svc("fixed"), bearer("Bearer"), allow.clone()),
            cred("approval", FixtureRole::RequireApproval, "Every use needs a human's approval",
                CredentialType::ApiKey, canary("approval"), &["read"], 300, true,
                Classification::Confidential, svc("approval"), bearer("Bearer"),
                only(FixtureOutcome::RequireApproval)),
            cred("quarantine", FixtureRole::Quarantine, "Quarantined: every use must stop",
                CredentialType::ApiKey, canary("quarantine"), &["read"], 300, true,
                Classification::Confidential, svc("quarantine"), bearer("Bearer"),
                only(FixtureOutcome::Quarantine)),
            cred("denied", FixtureRole::Denied, "Exists, but the conformance agent is denied",
                CredentialType::ApiKey, canary("denied"), &["read"], 300, true,
                Classification::Confidential, svc("denied"), bearer("Bearer"), only(FixtureOutcome::Deny)),
            cred("restricted", FixtureRole::Restricted, "Classification restricted",
                CredentialType::ApiKey, canary("restricted"), &["read"], 300, true,
                Classification::Restricted, svc("restricted"), bearer("Bearer"), allow.clone()),
            cred("brokered", FixtureRole::Brokered, "OAuth2 client credentials; the proxy injects a minted token",
                CredentialType::OauthBearer, canary("brokered"), &["read"], 300, true,
                Classification::Confidential, svc("brokered"), bearer("Bearer"), allow.clone()),
            cred("reflect", FixtureRole::Reflect, "Upstream echoes request headers back (response redaction)",
                CredentialType::ApiKey, canary("reflect"), &["read"], 300, true,
                Classification::Internal, REFLECT_PREFIX.to_string(), bearer("Bearer"), allow.clone()),
            cred("export", FixtureRole::Export, "v0.1 crp/resolve permitted (export)",
                CredentialType::ApiKey, canary("export"), &["read"], 300, true,
                Classification::Internal, svc("export"), bearer("Bearer"),
                vec![FixtureAccess { agent: agent.into(), outcome: FixtureOutcome::Allow, export: true }]),
        ];
        for c in &mut credentials {
            if c.fixture_role == FixtureRole::Brokered {
                c.broker = Some(FixtureBroker {
                    token_url: token_url.clone(),
                    client_id: "crp-conformance-client".into(),
                    scopes: vec!["read".into()],
                });
            }
        }
        Fixtures {
            format: FORMAT.into(),
            description: "Fixtures for crp-conformance. Load every credential; map each access \
                outcome onto your policy (unlisted agents are denied); allow each credential's \
                loopback upstream explicitly. Canary values are worthless outside the suite."
                .into(),
            upstream: FixtureUpstream {
                address: upstream.into(),
                base_url: base,
                loopback: true,
                token_url,
            },
            agents: vec![FixtureAgent {
                id: agent.into(),
                name: "CRP conformance runner".into(),
                roles: vec!["conformance".into()],
                audit: true,
            }],
            delegation: DelegationLimits { max_depth: DEFAULT_MAX_DELEGATION_DEPTH },
            credentials,
        }
    }

    /// Parse and validate a fixture document.
    pub fn from_json(text: &str) -> Result<Fixtures, String> {
        let f: Fixtures = serde_json::from_str(text).map_err(|e| format!("fixtures: {e}"))?;
        f.validate()?;
        Ok(f)
    }

    /// Pretty JSON.
    pub fn to_json_pretty(&self) -> String {
        // Serializing plain data structs with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Check the document is one this version reads and is internally consistent.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("fixtures: unknown format `{}` (this reader knows `{FORMAT}`)", self.format));
        }
        if self.agents.is_empty() {
            return Err("fixtures: at least one agent is required".into());
        }
        let agents: BTreeSet<&str> = self.agents.iter().map(|a| a.id.as_str()).collect();
        let mut keys = BTreeSet::new();
        let mut services = BTreeSet::new();
        let mut values = BTreeSet::new();
        for c in &self.credentials {
            crate::types::validate_service(&c.service)
                .map_err(|e| format!("fixtures: credential `{}`: {}", c.key, e.message))?;
            if !keys.insert(c.key.as_str()) {
                return Err(format!("fixtures: duplicate key `{}`", c.key));
            }
            if !services.insert(c.service.as_str()) {
                return Err(format!("fixtures: duplicate service `{}`", c.service));
            }
            if c.value.len() < 16 || !values.insert(c.value.expose().to_string()) {
                return Err(format!("fixtures: credential `{}` needs a distinct value of 16+ bytes", c.key));
            }
            if c.max_ttl == 0 || c.max_ttl > crate::types::MAX_TTL_SECONDS {
                return Err(format!("fixtures: credential `{}`: maxTtl must be 1..=86400", c.key));
            }
            if !(c.upstream.starts_with("http://") || c.upstream.starts_with("https://")) {
                return Err(format!("fixtures: credential `{}`: upstream must be an http(s) URL", c.key));
            }
            if c.credential_type == CredentialType::BasicAuth && !c.value.expose().contains(':') {
                return Err(format!("fixtures: credential `{}`: basic_auth value must be username:password", c.key));
            }
            for a in &c.access {
                if !agents.contains(a.agent.as_str()) {
                    return Err(format!("fixtures: credential `{}` names unknown agent `{}`", c.key, a.agent));
                }
            }
        }
        Ok(())
    }

    /// The first credential playing `role`.
    pub fn by_role(&self, role: FixtureRole) -> Option<&FixtureCredential> {
        self.credentials.iter().find(|c| c.fixture_role == role)
    }

    /// The credential fronted by `service`.
    pub fn by_service(&self, service: &str) -> Option<&FixtureCredential> {
        self.credentials.iter().find(|c| c.service == service)
    }

    /// The runner's (first) agent id.
    pub fn agent(&self) -> &str {
        self.agents.first().map(|a| a.id.as_str()).unwrap_or(CONFORMANCE_AGENT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_fixtures_validate_and_cover_every_role() {
        let f = Fixtures::conformance(DEFAULT_UPSTREAM);
        f.validate().unwrap();
        for role in [
            FixtureRole::Primary, FixtureRole::HeaderKey, FixtureRole::Query, FixtureRole::Basic,
            FixtureRole::ShortTtl, FixtureRole::NotRenewable, FixtureRole::RequireApproval,
            FixtureRole::Quarantine, FixtureRole::Denied, FixtureRole::Restricted,
            FixtureRole::Brokered, FixtureRole::Reflect, FixtureRole::Export,
        ] {
            assert!(f.by_role(role).is_some(), "{role:?}");
        }
        assert!(f.by_role(FixtureRole::Brokered).unwrap().broker.is_some());
    }

    #[test]
    fn unknown_format_is_refused() {
        let mut f = Fixtures::conformance(DEFAULT_UPSTREAM);
        f.format = "crp-conformance-fixtures/9".into();
        assert!(f.validate().is_err());
    }

    #[test]
    fn canaries_are_distinct_and_recognisable() {
        assert_ne!(canary("a"), canary("b"));
        assert!(canary("a").starts_with("crp-canary-"));
        assert_eq!(canary("a").len(), "crp-canary-".len() + 32);
    }

    #[test]
    fn debug_never_prints_a_canary() {
        let f = Fixtures::conformance(DEFAULT_UPSTREAM);
        let dbg = format!("{f:?}");
        for c in &f.credentials {
            assert!(!dbg.contains(c.value.expose()));
        }
    }
}
