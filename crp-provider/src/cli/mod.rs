//! The admin commands of the `crp-provider` binary (everything but `serve`, which lives in
//! `http::cli`): `init`, `apply`, `credential`, `policy`, `lease`, `audit`, `agent`,
//! `approvals`.
//!
//! The operator acts directly on the vault (no Cedar policy applies to the operator; every
//! change is audited with requester `operator`). Credential values are read only from stdin, a
//! file or an environment variable, never from arguments, and never printed.
//!
//! Exit codes: 0 success; 1 failure (not found, refused, invalid input, policy check not
//! allowed); 2 usage error (clap); 3 the vault cannot be unlocked (wrong key, locked, missing);
//! 4 `audit verify` found tampering.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use crp_core::SecretValue;
use crp_core::types::Classification;
use crp_core::types::ext::AuditQueryParams;
use serde_json::json;

use crate::apply::{ApplyDoc, strip_newline};
use crate::config::resolve_home;
use crate::credentials::{BrokerConfig, CredentialConfig, CredentialKind, NewCredential, parse_injection};
use crate::leases::LeaseState;
use crate::policy::{Action, PolicyEngine};
use crate::store::{now_ms, rfc3339};
use crate::vault::{AgentStatus, OpenOptions, Unlock, Vault, VaultError};

/// Options every admin command accepts (also before the subcommand).
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalOpts {
    /// Vault home (default: $CRP_HOME, else ~/.crp).
    #[arg(long, global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Read the vault passphrase from this file (default: the keyfile, or $CRP_PASSPHRASE).
    #[arg(long, global = true, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

impl GlobalOpts {
    /// Prefer values given after the subcommand, then before it.
    pub fn merged(&self, top: &GlobalOpts) -> GlobalOpts {
        GlobalOpts {
            home: self.home.clone().or_else(|| top.home.clone()),
            passphrase_file: self.passphrase_file.clone().or_else(|| top.passphrase_file.clone()),
        }
    }
}

/// A CLI failure with its exit code.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub code: i32,
    /// Message for stderr.
    pub message: String,
}

impl CliError {
    fn new(code: i32, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

impl From<VaultError> for CliError {
    fn from(e: VaultError) -> Self {
        let code = match e {
            VaultError::WrongKey | VaultError::Locked(_) | VaultError::NotInitialised(_) => 3,
            _ => 1,
        };
        Self::new(code, e.to_string())
    }
}

type R<T = ()> = Result<T, CliError>;

fn fail(msg: impl Into<String>) -> CliError {
    CliError::new(1, msg)
}

/// Read a passphrase file (one trailing newline dropped).
pub fn read_passphrase_file(p: &Path) -> R<SecretValue> {
    let text = std::fs::read_to_string(p).map_err(|e| fail(format!("cannot read {}: {e}", p.display())))?;
    let s = strip_newline(text);
    if s.is_empty() {
        return Err(fail(format!("{} is empty", p.display())));
    }
    Ok(SecretValue::new(s))
}

/// Open the vault named by the options.
pub async fn open(g: &GlobalOpts) -> R<Vault> {
    let home = resolve_home(g.home.as_deref());
    let unlock = match &g.passphrase_file {
        Some(f) => Some(Unlock::Passphrase(read_passphrase_file(f)?)),
        None => None,
    };
    Ok(Vault::open(OpenOptions { home, unlock, database_url: None }).await?)
}

fn split_list(s: &Option<String>) -> Vec<String> {
    s.as_deref()
        .map(|s| s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(str::to_string).collect())
        .unwrap_or_default()
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn table(rows: Vec<Vec<String>>) {
    let Some(first) = rows.first() else { return };
    let mut w = vec![0usize; first.len()];
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
        println!("{}", line.join("  ").trim_end());
    }
}

// ---------------------------------------------------------------------------------- init

/// `init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Protect the vault with a random 256-bit keyfile (`vault.key`, mode 0600) — the default
    /// unless a passphrase is given (--passphrase-file or $CRP_PASSPHRASE).
    #[arg(long, conflicts_with = "passphrase_file")]
    pub keyfile: bool,
    #[command(flatten)]
    /// Global options.
    pub g: GlobalOpts,
}

/// Run `init`.
pub async fn init(a: InitArgs, top: &GlobalOpts) -> R {
    let g = a.g.merged(top);
    let home = resolve_home(g.home.as_deref());
    let unlock = match (&g.passphrase_file, a.keyfile) {
        (Some(f), _) => Unlock::Passphrase(read_passphrase_file(f)?),
        (None, false) if std::env::var("CRP_PASSPHRASE").is_ok_and(|p| !p.is_empty()) => {
            Unlock::Passphrase(SecretValue::new(std::env::var("CRP_PASSPHRASE").unwrap_or_default()))
        }
        _ => Unlock::Keyfile(home.join("vault.key")),
    };
    let mode = match &unlock {
        Unlock::Keyfile(p) => format!("keyfile {}", p.display()),
        Unlock::Passphrase(_) => "passphrase (Argon2id)".into(),
    };
    Vault::init(&home, unlock).await?;
    println!("initialised vault in {} ({mode})", home.display());
    println!("starter policy: {}", crate::config::Paths::new(&home).starter_policy().display());
    Ok(())
}

// ---------------------------------------------------------------------------------- apply

/// `apply FILE.toml`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The declarative file.
    pub file: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    /// Global options.
    pub g: GlobalOpts,
}

/// Run `apply`.
pub async fn apply(a: ApplyArgs, top: &GlobalOpts) -> R {
    let doc = ApplyDoc::load(&a.file)?;
    let v = open(&a.g.merged(top)).await?;
    let report = v.apply(&doc).await;
    v.shutdown().await;
    let report = report?;
    if a.json {
        print_json(&serde_json::to_value(&report).unwrap_or_default());
    } else {
        println!(
            "credentials: {} changed, {} unchanged; policies: {} changed, {} unchanged; agents: {} changed, {} unchanged",
            report.credentials_changed.len(),
            report.credentials_unchanged.len(),
            report.policies_changed.len(),
            report.policies_unchanged.len(),
            report.agents_changed.len(),
            report.agents_unchanged.len()
        );
        for k in &report.credentials_changed {
            println!("  stored {k}");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------- credential

/// `credential …`.
#[derive(Debug, Args)]
pub struct CredentialArgs {
    #[command(subcommand)]
    /// What to do.
    pub cmd: CredentialCmd,
    #[command(flatten)]
    /// Global options.
    pub g: GlobalOpts,
}

/// `credential` subcommands.
#[derive(Debug, Subcommand)]
pub enum CredentialCmd {
    /// Store a credential (a new version if the key exists). The value comes from stdin, a file or an env var.
    Add(Box<CredentialAdd>),
    /// List credentials (never values).
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show one credential's attributes (never its value).
    Show {
        /// Vault key.
        key: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a credential; its active leases are revoked.
    Rm {
        /// Vault key.
        key: String,
    },
}

/// `credential add`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["value_stdin", "value_file", "value_env"])))]
pub struct CredentialAdd {
    /// Vault key, e.g. `github/main`.
    pub key: String,
    /// Type: api_key, oauth_bearer, basic_auth, client_certificate, connection_string, custom, oauth2_client_credentials.
    #[arg(long = "type", value_name = "T")]
    pub kind: String,
    /// CRP service id (default: the key).
    #[arg(long)]
    pub service: Option<String>,
    /// Upstream base URL the proxy forwards to.
    #[arg(long)]
    pub upstream: Option<String>,
    /// Injection: `header:NAME[:PREFIX]`, query:NAME or basic (default header:Authorization:Bearer; basic for basic_auth).
    #[arg(long)]
    pub inject: Option<String>,
    /// Grantable scopes, comma-separated.
    #[arg(long)]
    pub scopes: Option<String>,
    /// Tags, comma-separated.
    #[arg(long)]
    pub tags: Option<String>,
    /// public, internal, confidential (default) or restricted.
    #[arg(long)]
    pub classification: Option<String>,
    /// Longest lease TTL in seconds.
    #[arg(long)]
    pub max_ttl: Option<u32>,
    /// Leases on this credential cannot be renewed.
    #[arg(long)]
    pub not_renewable: bool,
    /// A private host the proxy may reach for this credential (repeatable), e.g. 127.0.0.1.
    #[arg(long = "allow-private-host", value_name = "HOST")]
    pub allow_private_hosts: Vec<String>,
    /// Human description (shown by crp/list).
    #[arg(long)]
    pub description: Option<String>,
    /// Non-secret metadata KEY=VALUE (repeatable).
    #[arg(long = "metadata", value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,
    /// Expire the stored credential after this many seconds.
    #[arg(long)]
    pub ttl: Option<u64>,
    /// oauth2_client_credentials: token endpoint.
    #[arg(long)]
    pub token_url: Option<String>,
    /// oauth2_client_credentials: client id.
    #[arg(long)]
    pub client_id: Option<String>,
    /// oauth2_client_credentials: scopes to request, comma-separated.
    #[arg(long)]
    pub broker_scopes: Option<String>,
    /// Read the value from stdin (one trailing newline dropped).
    #[arg(long)]
    pub value_stdin: bool,
    /// Read the value from this file (one trailing newline dropped).
    #[arg(long, value_name = "FILE")]
    pub value_file: Option<PathBuf>,
    /// Read the value from this environment variable.
    #[arg(long, value_name = "VAR")]
    pub value_env: Option<String>,
}

fn read_value(a: &CredentialAdd) -> R<SecretValue> {
    let v = if a.value_stdin {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(|e| fail(format!("cannot read stdin: {e}")))?;
        strip_newline(s)
    } else if let Some(f) = &a.value_file {
        strip_newline(std::fs::read_to_string(f).map_err(|e| fail(format!("cannot read {}: {e}", f.display())))?)
    } else if let Some(var) = &a.value_env {
        std::env::var(var).map_err(|_| fail(format!("environment variable {var} is not set")))?
    } else {
        return Err(fail("give one of --value-stdin, --value-file or --value-env"));
    };
    let v = SecretValue::new(v);
    if v.is_empty() {
        return Err(fail("the credential value is empty"));
    }
    Ok(v)
}

fn new_credential(a: &CredentialAdd) -> R<NewCredential> {
    let kind: CredentialKind = a.kind.parse().map_err(fail)?;
    let classification: Classification =
        a.classification.as_deref().unwrap_or("confidential").parse().map_err(fail)?;
    let injection = match &a.inject {
        Some(s) => parse_injection(s).map_err(fail)?,
        None => kind.default_injection(),
    };
    let mut metadata = std::collections::BTreeMap::new();
    for m in &a.metadata {
        let (k, v) = m.split_once('=').ok_or_else(|| fail(format!("--metadata `{m}`: expected KEY=VALUE")))?;
        metadata.insert(k.to_string(), v.to_string());
    }
    if let Some(d) = &a.description {
        metadata.insert("description".into(), d.clone());
    }
    let broker = match (&a.token_url, &a.client_id) {
        (Some(t), Some(c)) => Some(BrokerConfig { token_url: t.clone(), client_id: c.clone(), scopes: split_list(&a.broker_scopes) }),
        (None, None) => None,
        _ => return Err(fail("--token-url and --client-id go together")),
    };
    if broker.is_some() != (kind == CredentialKind::Oauth2ClientCredentials) {
        return Err(fail("--token-url/--client-id are for --type oauth2_client_credentials (and it needs them)"));
    }
    Ok(NewCredential {
        key: a.key.clone(),
        service: a.service.clone().unwrap_or_else(|| a.key.clone()),
        kind,
        classification,
        tags: split_list(&a.tags),
        scopes: split_list(&a.scopes),
        max_ttl: a.max_ttl,
        renewable: !a.not_renewable,
        metadata,
        expires_at: a.ttl.map(|t| now_ms().saturating_add(i64::try_from(t.min(10 * 365 * 86_400)).unwrap_or(0) * 1000)),
        value: read_value(a)?,
        config: CredentialConfig {
            upstream: a.upstream.clone(),
            injection,
            allowed_private_hosts: a.allow_private_hosts.clone(),
            broker,
        },
    })
}

/// Run `credential …`.
pub async fn credential(a: CredentialArgs, top: &GlobalOpts) -> R {
    let g = a.g.merged(top);
    // Validate input before unlocking (and before reading a value from stdin).
    let add = match &a.cmd {
        CredentialCmd::Add(add) => Some(new_credential(add)?),
        _ => None,
    };
    if let Some(c) = &add {
        crate::vault::validate_new(c)?;
    }
    let v = open(&g).await?;
    let r = credential_inner(&v, a.cmd, add).await;
    v.shutdown().await;
    r
}

async fn credential_inner(v: &Vault, cmd: CredentialCmd, add: Option<NewCredential>) -> R {
    match cmd {
        CredentialCmd::Add(_) => {
            let c = add.ok_or_else(|| fail("internal: no credential"))?;
            let (version, changed) = v.admin_store(&c).await?;
            if changed {
                println!("stored {} (version {version})", c.key);
            } else {
                println!("{} unchanged (version {version})", c.key);
            }
        }
        CredentialCmd::List { json } => {
            let all = v.credentials().await?;
            if json {
                print_json(&serde_json::to_value(&all).unwrap_or_default());
            } else if all.is_empty() {
                println!("no credentials");
            } else {
                let mut rows = vec![vec!["KEY".into(), "SERVICE".into(), "TYPE".into(), "CLASS".into(), "SCOPES".into(), "VERSION".into()]];
                for c in all {
                    rows.push(vec![
                        c.key,
                        c.service,
                        c.kind.as_str().into(),
                        c.classification.as_str().into(),
                        c.scopes.join(","),
                        c.version.to_string(),
                    ]);
                }
                table(rows);
            }
        }
        CredentialCmd::Show { key, json } => {
            let c = v.credential(&key).await?.ok_or_else(|| fail(format!("no credential `{key}`")))?;
            let cfg = v.credential_config(&key).await?;
            let versions = v.credential_versions(&key).await?;
            let out = json!({
                "key": c.key, "service": c.service, "type": c.kind.as_str(),
                "classification": c.classification.as_str(), "tags": c.tags, "scopes": c.scopes,
                "maxTtl": c.max_ttl, "renewable": c.renewable, "metadata": c.metadata,
                "expiresAt": c.expires_at.map(rfc3339), "version": c.version, "versions": versions,
                "createdAt": rfc3339(c.created_at), "updatedAt": rfc3339(c.updated_at),
                "upstream": cfg.as_ref().and_then(|c| c.upstream.clone()),
                "inject": cfg.as_ref().map(|c| serde_json::to_value(&c.injection).unwrap_or_default()),
                "allowPrivateHosts": cfg.as_ref().map(|c| c.allowed_private_hosts.clone()),
                "broker": cfg.as_ref().and_then(|c| c.broker.as_ref()).map(|b| json!({"tokenUrl": b.token_url, "clientId": b.client_id, "scopes": b.scopes})),
            });
            if json {
                print_json(&out);
            } else if let Some(o) = out.as_object() {
                for (k, val) in o {
                    if !val.is_null() {
                        println!("{k:<18} {}", if let Some(s) = val.as_str() { s.to_string() } else { val.to_string() });
                    }
                }
            }
        }
        CredentialCmd::Rm { key } => {
            let revoked = v.admin_delete(&key).await?;
            println!("deleted {key}; revoked {} lease(s)", revoked.len());
            for l in revoked {
                println!("  {l}");
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------- policy

/// `policy …`.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    /// What to do.
    pub cmd: PolicyCmd,
    #[command(flatten)]
    /// Global options.
    pub g: GlobalOpts,
}

/// `policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Validate a Cedar policy file against the schema (no vault needed).
    Validate {
        /// The file.
        file: PathBuf,
    },
    /// Dry-run a decision: would AGENT be allowed ACTION on KEY? Exit 0 if allowed, 1 if not.
    Check {
        /// Agent id.
        #[arg(long)]
        agent: String,
        /// use, resolve, retrieve, list, store, delete, renew, release, revoke, delegate or audit.
        #[arg(long)]
        action: String,
        /// Credential key.
        #[arg(long)]
        key: String,
        /// Requested scopes, comma-separated.
        #[arg(long)]
        scopes: Option<String>,
        /// Requested TTL.
        #[arg(long)]
        ttl: Option<u32>,
        /// Stated purpose.
        #[arg(long)]
        purpose: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// Run `policy …`.
pub async fn policy(a: PolicyArgs, top: &GlobalOpts) -> R {
    match a.cmd {
        PolicyCmd::Validate { file } => {
            let src = std::fs::read_to_string(&file).map_err(|e| fail(format!("cannot read {}: {e}", file.display())))?;
            let n = PolicyEngine::validate(&src).map_err(|e| fail(e.render(&file.display().to_string())))?;
            println!("{}: {n} polic{} valid", file.display(), if n == 1 { "y" } else { "ies" });
            Ok(())
        }
        PolicyCmd::Check { agent, action, key, scopes, ttl, purpose, json } => {
            let action: Action = action.parse().map_err(|_| {
                fail("--action must be one of use resolve retrieve list store delete renew release revoke delegate audit")
            })?;
            let v = open(&a.g.merged(top)).await?;
            let r = v.policy_check(&agent, action, &key, &split_list(&scopes), ttl, purpose.as_deref()).await;
            v.shutdown().await;
            let r = r?;
            if json {
                print_json(&serde_json::to_value(&r).unwrap_or_default());
            } else {
                println!("{}: {}", if r.allowed { "allowed" } else { "not allowed" }, r.outcome);
                println!("policy: {}", r.policy.as_deref().unwrap_or("(none: default deny)"));
                println!("reason: {}", r.reason);
            }
            if r.allowed { Ok(()) } else { Err(CliError::new(1, String::new())) }
        }
    }
}

// ---------------------------------------------------------------------------------- lease

/// `lease …`.
#[derive(Debug, Args)]
pub struct LeaseArgs {
    #[command(subcommand)]
    /// What to do.
    pub cmd: LeaseCmd,
    #[command(flatten)]
    /// Global options.
    pub g: GlobalOpts,
}

/// `lease` subcommands.
#[derive(Debug, Subcommand)]
pub enum LeaseCmd {
    /// List leases, newest first.
    List {
        /// Only this state: active, released, revoked, expired.
        #[arg(long)]
        state: Option<String>,
        /// Only this agent's.
        #[arg(long)]
        agent: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a lease and every delegated descendant (or, with --prefix, every lease whose id starts with ID).
    Revoke {
        /// Lease id (or prefix with --prefix).
        id: String,
        /// Treat ID as a prefix.
        #[arg(long)]
        prefix: bool,
    },
}

/// Run `lease …`.
pub async fn lease(a: LeaseArgs, top: &GlobalOpts) -> R {
    let v = open(&a.g.merged(top)).await?;
    let r = lease_inner(&v, a.cmd).await;
    v.shutdown().await;
    r
}

async fn lease_inner(v: &Vault, cmd: LeaseCmd) -> R {
    match cmd {
        LeaseCmd::List { state, agent, limit, json } => {
            let state = match state.as_deref() {
                None => None,
                Some("active") => Some(LeaseState::Active),
                Some("released") => Some(LeaseState::Released),
                Some("revoked") => Some(LeaseState::Revoked),
                Some("expired") => Some(LeaseState::Expired),
                Some(o) => return Err(fail(format!("unknown state `{o}` (active, released, revoked, expired)"))),
            };
            let ls = v.leases(state, agent.as_deref(), limit).await?;
            if json {
                let arr: Vec<_> = ls
                    .iter()
                    .map(|l| {
                        json!({"id": l.id, "key": l.credential_key, "service": l.service, "agent": l.agent,
                               "state": l.state.as_str(), "parent": l.parent_id, "depth": l.depth, "scopes": l.scopes,
                               "createdAt": rfc3339(l.created_at), "expiresAt": rfc3339(l.expires_at),
                               "endReason": l.end_reason})
                    })
                    .collect();
                print_json(&json!(arr));
            } else if ls.is_empty() {
                println!("no leases");
            } else {
                let mut rows = vec![vec!["ID".into(), "STATE".into(), "AGENT".into(), "KEY".into(), "DEPTH".into(), "EXPIRES".into(), "PARENT".into()]];
                for l in ls {
                    rows.push(vec![
                        l.id,
                        l.state.as_str().into(),
                        l.agent,
                        l.credential_key,
                        l.depth.to_string(),
                        rfc3339(l.expires_at),
                        l.parent_id.unwrap_or_default(),
                    ]);
                }
                table(rows);
            }
        }
        LeaseCmd::Revoke { id, prefix } => {
            let ids = if prefix { v.admin_revoke_prefix(&id).await? } else { v.admin_revoke(&id).await? };
            println!("revoked {} lease(s)", ids.len());
            for i in ids {
                println!("  {i}");
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------- audit

/// `audit [filters] | audit verify`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    /// `verify`.
    pub cmd: Option<AuditCmd>,
    /// Only events about this key.
    #[arg(long)]
    pub key: Option<String>,
    /// Only events by this agent.
    #[arg(long)]
    pub requester: Option<String>,
    /// Only this event (e.g. credential.used) or family (e.g. lease).
    #[arg(long)]
    pub action: Option<String>,
    /// Since: RFC 3339, or a duration ago like 30m, 2h, 7d.
    #[arg(long)]
    pub since: Option<String>,
    /// Until: RFC 3339.
    #[arg(long)]
    pub until: Option<String>,
    /// At most this many (newest first).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    /// Global options.
    pub g: GlobalOpts,
}

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Verify the tamper-evident chain (exit 4 if broken).
    Verify {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

fn parse_since(s: &str) -> R<String> {
    if crate::store::parse_rfc3339(s).is_some() {
        return Ok(s.to_string());
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num.parse().map_err(|_| fail(format!("--since `{s}`: RFC 3339 or a duration like 30m, 2h, 7d")))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(fail(format!("--since `{s}`: RFC 3339 or a duration like 30m, 2h, 7d"))),
    };
    Ok(rfc3339(now_ms() - secs.saturating_mul(1000)))
}

/// Run `audit …`.
pub async fn audit(a: AuditArgs, top: &GlobalOpts) -> R {
    let since = a.since.as_deref().map(parse_since).transpose()?;
    let v = open(&a.g.merged(top)).await?;
    let r = audit_inner(&v, &a, since).await;
    v.shutdown().await;
    r
}

async fn audit_inner(v: &Vault, a: &AuditArgs, since: Option<String>) -> R {
    if let Some(AuditCmd::Verify { json }) = &a.cmd {
        let r = v.audit_verify().await?;
        if *json {
            print_json(&serde_json::to_value(&r).unwrap_or_default());
        } else if r.ok {
            println!("audit chain intact: {} entries verified", r.entries);
        } else {
            println!("AUDIT CHAIN BROKEN ({} entries read):", r.entries);
            for p in &r.problems {
                println!("  {p}");
            }
        }
        return if r.ok { Ok(()) } else { Err(CliError::new(4, "audit verification failed")) };
    }
    let q = AuditQueryParams {
        key: a.key.clone(),
        requester: a.requester.clone(),
        action: a.action.clone(),
        since,
        until: a.until.clone(),
        limit: Some(a.limit.clamp(1, 1000)),
    };
    let evs = v.audit_query(&q).await?;
    if a.json {
        print_json(&serde_json::to_value(&evs).unwrap_or_default());
    } else if evs.is_empty() {
        println!("no audit events");
    } else {
        let mut rows = vec![vec!["SEQ".into(), "TIME".into(), "EVENT".into(), "DECISION".into(), "REQUESTER".into(), "KEY".into(), "LEASE".into(), "POLICY".into()]];
        for e in evs {
            rows.push(vec![
                e.seq.to_string(),
                e.timestamp,
                e.action,
                e.decision,
                e.requester,
                e.key.unwrap_or_default(),
                e.lease_id.unwrap_or_default(),
                e.policy.unwrap_or_default(),
            ]);
        }
        table(rows);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------- agent

/// `agent …`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    /// What to do.
    pub cmd: AgentCmd,
    #[command(flatten)]
    /// Global options.
    pub g: GlobalOpts,
}

/// `agent` subcommands.
#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Issue a one-time bootstrap token (printed once; the agent registers with it and starts pending).
    Bootstrap {
        /// Agent name (its policy id).
        #[arg(long)]
        name: String,
        /// Scopes, comma-separated.
        #[arg(long)]
        scopes: Option<String>,
        /// Role (repeatable).
        #[arg(long = "role")]
        roles: Vec<String>,
        /// Token lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u32,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// List agents.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending agent (it becomes active).
    Approve {
        /// Agent id.
        id: String,
    },
    /// Disable an agent.
    Disable {
        /// Agent id.
        id: String,
    },
    /// Re-enable a disabled agent.
    Enable {
        /// Agent id.
        id: String,
    },
}

/// Run `agent …`.
pub async fn agent(a: AgentArgs, top: &GlobalOpts) -> R {
    let v = open(&a.g.merged(top)).await?;
    let r = agent_inner(&v, a.cmd).await;
    v.shutdown().await;
    r
}

async fn agent_inner(v: &Vault, cmd: AgentCmd) -> R {
    match cmd {
        AgentCmd::Bootstrap { name, scopes, roles, ttl, json } => {
            let b = v.bootstrap_agent(&name, &roles, &split_list(&scopes), ttl.clamp(60, 30 * 86_400)).await?;
            if json {
                print_json(&json!({"token": b.token.as_str(), "agent": b.name, "expiresAt": b.expires_at}));
            } else {
                println!("bootstrap token for agent `{}` (shown once, expires {}):", b.name, b.expires_at);
                println!("{}", b.token.as_str());
                println!("install it with: crp-mcp install <token> --provider URL");
            }
        }
        AgentCmd::List { json } => {
            let all = v.agents().await?;
            if json {
                print_json(&serde_json::to_value(&all).unwrap_or_default());
            } else if all.is_empty() {
                println!("no agents");
            } else {
                let mut rows = vec![vec!["ID".into(), "NAME".into(), "STATUS".into(), "ROLES".into(), "SCOPES".into()]];
                for a in all {
                    rows.push(vec![a.id, a.name, a.status.as_str().into(), a.roles.join(","), a.scopes.join(",")]);
                }
                table(rows);
            }
        }
        AgentCmd::Approve { id } | AgentCmd::Enable { id } => {
            let a = v.set_agent_status(&id, AgentStatus::Active).await?;
            println!("agent {} is {}", a.id, a.status.as_str());
        }
        AgentCmd::Disable { id } => {
            let a = v.set_agent_status(&id, AgentStatus::Disabled).await?;
            println!("agent {} is {}", a.id, a.status.as_str());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------- approvals

/// `approvals …`.
#[derive(Debug, Args)]
pub struct ApprovalsArgs {
    #[command(subcommand)]
    /// What to do.
    pub cmd: ApprovalsCmd,
    #[command(flatten)]
    /// Global options.
    pub g: GlobalOpts,
}

/// `approvals` subcommands.
#[derive(Debug, Subcommand)]
pub enum ApprovalsCmd {
    /// List held requests (pending only unless --all).
    List {
        /// Include decided and consumed ones.
        #[arg(long)]
        all: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Approve a held request: the same request by the same agent then succeeds once.
    Approve {
        /// Approval id.
        id: String,
    },
    /// Deny a held request.
    Deny {
        /// Approval id.
        id: String,
    },
}

/// Run `approvals …`.
pub async fn approvals(a: ApprovalsArgs, top: &GlobalOpts) -> R {
    let v = open(&a.g.merged(top)).await?;
    let r = approvals_inner(&v, a.cmd).await;
    v.shutdown().await;
    r
}

async fn approvals_inner(v: &Vault, cmd: ApprovalsCmd) -> R {
    match cmd {
        ApprovalsCmd::List { all, json } => {
            let list = v.approvals(if all { None } else { Some("pending") }).await?;
            if json {
                print_json(&serde_json::to_value(&list).unwrap_or_default());
            } else if list.is_empty() {
                println!("no {}approvals", if all { "" } else { "pending " });
            } else {
                let mut rows = vec![vec!["ID".into(), "STATUS".into(), "AGENT".into(), "ACTION".into(), "KEY".into(), "POLICY".into(), "CREATED".into()]];
                for a in list {
                    rows.push(vec![a.id, a.status, a.agent, a.action, a.key, a.policy.unwrap_or_default(), a.created_at]);
                }
                table(rows);
            }
        }
        ApprovalsCmd::Approve { id } => {
            let a = v.decide_approval(&id, true).await?;
            println!("approved {} ({} {} on {})", a.id, a.agent, a.action, a.key);
        }
        ApprovalsCmd::Deny { id } => {
            let a = v.decide_approval(&id, false).await?;
            println!("denied {} ({} {} on {})", a.id, a.agent, a.action, a.key);
        }
    }
    Ok(())
}
