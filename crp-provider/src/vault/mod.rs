//! The `Vault` facade: the one object the HTTP server, the stdio transport, the MCP adapter and
//! the admin CLI talk to. It implements [`crp_core::Provider`] (`crp/use`, `crp/resolve` as a
//! v0.1 export, `crp/lease`, `crp/revoke`, `crp/list`, and the `x-crp/` extensions), the
//! proxy's hot path ([`Vault::proxy_grant`], [`Vault::audit_proxy`]), agent registration,
//! declarative loading and the operator's admin operations.
//!
//! Every caller-facing operation follows one path: find the credential → ask the Cedar policy
//! ([`crate::policy::PolicyEngine::authorize`]) → on anything but allow, hold an approval /
//! refuse, audited → on allow, write the audit entry (durable, group-committed; if it cannot be
//! written the operation is refused with -33010) → change state → answer.
//!
//! Never returns, logs or audits a credential value, except in the two explicit, policy-gated,
//! audited exports (`crp/resolve` under v0.1, `x-crp/vault.retrieve`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use base64::Engine as _;
use crp_core::fixtures::{FixtureOutcome, Fixtures};
use crp_core::provider::CallContext;
use crp_core::types::ext::{self, InjectionRule};
use crp_core::types::{
    Capability, Classification, ConformanceTier, CredentialDescriptor, CredentialMaterial, Feature,
    LeaseAction, LeaseParams, LeaseReleased, LeaseRenewed, LeaseResult, ListParams, ListResult, RequestContext,
    ResolveMetadata, ResolveParams, ResolveResult, RevokeParams, RevokeResult, ServiceEntry, UseParams, UseResult,
};
use crp_core::{CrpError, SecretValue, Version};
use serde_json::Value;
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use crate::agents::{self, ApprovalRecord};
use crate::apply::{ApplyDoc, ApplyReport};
use crate::audit::{self, AuditLog, AuditRecord, VerifyReport, events};
use crate::broker::{Broker, ClientCredentials};
use crate::config::{Config, Paths, PROVIDER_MAX_DELEGATION_DEPTH};
use crate::credentials::{self, CredentialConfig, CredentialKind, CredentialRecord, NewCredential};
use crate::crypto::{self, KdfParams, KekInput, Key32, KeyEnvelope};
use crate::leases::{self, Caps, LeaseError, LeaseRecord, LeaseState, NewLease};
use crate::proxy_lookup;
use crate::policy::{Action, AuthzContext, CredentialAttrs, Decision, Outcome, PolicyEngine};
use crate::store::{Store, now_ms, rfc3339};

pub use crate::agents::{AgentRecord, AgentStatus};

/// The provider name in capabilities and resolve metadata.
pub const PROVIDER_NAME: &str = "crp-reference";
/// The requester recorded for the admin CLI.
pub const OPERATOR: &str = "operator";
/// Default proxy base URL.
pub const DEFAULT_PROXY_BASE: &str = "http://127.0.0.1:7700";

/// How to unlock the vault.
pub enum Unlock {
    /// The 256-bit keyfile at this path.
    Keyfile(PathBuf),
    /// A passphrase.
    Passphrase(SecretValue),
}

impl std::fmt::Debug for Unlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Keyfile(p) => write!(f, "Keyfile({})", p.display()),
            Self::Passphrase(_) => f.write_str("Passphrase([REDACTED])"),
        }
    }
}

/// Options for [`Vault::open`].
#[derive(Debug)]
pub struct OpenOptions {
    /// `CRP_HOME`.
    pub home: PathBuf,
    /// `None`: the keyfile for a keyfile vault, `CRP_PASSPHRASE` for a passphrase vault.
    pub unlock: Option<Unlock>,
    /// `postgres://…`; `None`: `config.toml`'s `database_url`, then env `CRP_DATABASE_URL`,
    /// then `vault.db` in the home.
    pub database_url: Option<String>,
}

impl OpenOptions {
    /// Options for `home` with default unlocking and storage.
    pub fn new(home: impl Into<PathBuf>) -> Self {
        Self { home: home.into(), unlock: None, database_url: None }
    }
}

/// Errors of vault operations (admin side). Messages never contain a secret.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The passphrase or keyfile does not open this vault.
    #[error("wrong passphrase or keyfile for this vault")]
    WrongKey,
    /// No vault at the home.
    #[error("no vault at {0}: run `crp-provider init` first")]
    NotInitialised(String),
    /// `init` on an existing vault.
    #[error("a vault already exists at {0}; refusing to overwrite it")]
    AlreadyInitialised(String),
    /// Nothing to unlock with.
    #[error("vault is locked: {0}")]
    Locked(String),
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// Unknown id or key.
    #[error("not found: {0}")]
    NotFound(String),
    /// The database failed.
    #[error("storage error: {0}")]
    Storage(String),
    /// The audit log could not be written: the operation was refused.
    #[error("audit log unavailable, operation refused: {0}")]
    Audit(String),
    /// A policy file is invalid.
    #[error("{0}")]
    Policy(String),
    /// Files.
    #[error("{0}")]
    Io(String),
}

impl From<crate::store::StoreError> for VaultError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Storage(e.to_string())
    }
}
impl From<sqlx::Error> for VaultError {
    fn from(e: sqlx::Error) -> Self {
        Self::Storage(e.to_string())
    }
}
impl From<LeaseError> for VaultError {
    fn from(e: LeaseError) -> Self {
        match e {
            LeaseError::NotFound => Self::NotFound("lease".into()),
            LeaseError::Store(s) => Self::Storage(s.to_string()),
            other => Self::Invalid(other.to_string()),
        }
    }
}
impl From<agents::AgentError> for VaultError {
    fn from(e: agents::AgentError) -> Self {
        match e {
            agents::AgentError::Invalid(m) => Self::Invalid(m),
            other => Self::Storage(other.to_string()),
        }
    }
}
impl From<audit::AuditError> for VaultError {
    fn from(e: audit::AuditError) -> Self {
        Self::Audit(e.to_string())
    }
}

/// What the proxy needs to forward one request.
pub struct ProxyGrant {
    /// Lease id.
    pub lease_id: String,
    /// Credential key.
    pub key: String,
    /// Service.
    pub service: String,
    /// Upstream base URL; the proxy appends `{rest}` and the query.
    pub upstream: String,
    /// How to inject.
    pub injection: InjectionRule,
    /// The value to inject (for Basic: `username:password`; brokered: the minted token).
    pub secret: SecretValue,
    /// Private hosts the egress guard allows for this credential.
    pub allowed_private_hosts: Vec<String>,
    /// Whether `secret` is a minted token.
    pub brokered: bool,
    /// The lease holder (for the proxy's audit record).
    pub agent: String,
}

impl std::fmt::Debug for ProxyGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyGrant")
            .field("lease_id", &self.lease_id)
            .field("key", &self.key)
            .field("service", &self.service)
            .field("upstream", &self.upstream)
            .field("injection", &self.injection)
            .field("secret", &self.secret)
            .field("brokered", &self.brokered)
            .finish()
    }
}

/// Why the proxy must refuse a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyDenied {
    /// 401 bad token, 403 revoked/released, 410 expired, 404 unknown, 502 broker, 503 storage.
    pub status: u16,
    /// Short machine code (`lease_not_found`, `bad_session_token`, `lease_revoked`, …).
    pub code: &'static str,
    /// Human message (no secret).
    pub message: String,
}

impl ProxyDenied {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
}

/// One proxied request, for the audit log (`credential.used`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyAuditRecord {
    /// Lease.
    pub lease_id: String,
    /// Agent holding it.
    pub agent: String,
    /// Credential key.
    pub key: String,
    /// HTTP method.
    pub method: String,
    /// Path without query values.
    pub path: String,
    /// Upstream status (or the proxy's own).
    pub status: u16,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes.
    pub bytes_out: u64,
    /// Duration in microseconds.
    pub duration_us: u64,
}

/// The outcome of an operator approval decision.
pub type Approval = ApprovalRecord;

#[derive(Default, PartialEq, Eq)]
struct PolicyStamp(Vec<(String, Option<std::time::SystemTime>, u64)>);

struct Inner {
    paths: Paths,
    config: Config,
    store: Store,
    dk: Key32,
    audit_key: Key32,
    audit: AuditLog,
    _audit_task: JoinHandle<()>,
    reaper: Mutex<Option<JoinHandle<()>>>,
    policy: PolicyEngine,
    policy_stamp: Mutex<PolicyStamp>,
    proxy_base: RwLock<String>,
    broker: Mutex<Option<Broker>>,
    /// A throwaway vault made by [`Vault::open_ephemeral`] (`serve --dev`, tests).
    ephemeral: std::sync::atomic::AtomicBool,
}

/// The vault. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct Vault {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").field("home", &self.inner.paths.home).finish_non_exhaustive()
    }
}

fn io_err(what: &str, p: &Path, e: std::io::Error) -> VaultError {
    VaultError::Io(format!("{what} {}: {e}", p.display()))
}

#[cfg(unix)]
fn set_mode(p: &Path, mode: u32) -> Result<(), VaultError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(|e| io_err("cannot set permissions on", p, e))
}
#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) -> Result<(), VaultError> {
    Ok(())
}

/// The vault database and its WAL/SHM files are readable by the owner only.
fn restrict_db_files(paths: &Paths) {
    let db = paths.db();
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", db.display()));
        if p.exists() {
            let _ = set_mode(&p, 0o600);
        }
    }
}

fn database_url(paths: &Paths, config: &Config, explicit: Option<&str>) -> Option<String> {
    let _ = paths;
    explicit
        .map(str::to_string)
        .or_else(|| config.database_url.clone())
        .or_else(|| std::env::var("CRP_DATABASE_URL").ok().filter(|u| !u.is_empty()))
}

async fn open_store(paths: &Paths, url: Option<&str>) -> Result<Store, VaultError> {
    match url {
        Some(u) => Store::open_url(u).await.map_err(|e| VaultError::Storage(e.to_string())),
        None => Store::open_sqlite(&paths.db()).await.map_err(|e| VaultError::Storage(e.to_string())),
    }
}

fn read_keyfile(p: &Path) -> Result<Key32, VaultError> {
    let bytes = Zeroizing::new(std::fs::read(p).map_err(|e| io_err("cannot read keyfile", p, e))?);
    crypto::parse_keyfile(&bytes).map_err(|e| VaultError::Invalid(format!("{}: {e}", p.display())))
}

/// Read every `*.cedar` file of `dir` in name order, validating each on its own (so errors
/// name the file, line and column), and return the concatenated set.
pub fn read_policy_dir(dir: &Path) -> Result<String, VaultError> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err("cannot read policy directory", dir, e)),
    };
    files.sort();
    let mut all = String::new();
    for f in files {
        let src = std::fs::read_to_string(&f).map_err(|e| io_err("cannot read policy file", &f, e))?;
        PolicyEngine::validate(&src).map_err(|e| VaultError::Policy(e.render(&f.display().to_string())))?;
        all.push_str(&src);
        all.push('\n');
    }
    PolicyEngine::validate(&all).map_err(|e| VaultError::Policy(e.render("policies (combined)")))?;
    Ok(all)
}

fn policy_stamp(dir: &Path) -> PolicyStamp {
    let mut v: Vec<(String, Option<std::time::SystemTime>, u64)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "cedar"))
                .map(|e| {
                    let md = e.metadata().ok();
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        md.as_ref().and_then(|m| m.modified().ok()),
                        md.map(|m| m.len()).unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    PolicyStamp(v)
}

/// Policy input for one decision.
struct Az<'a> {
    scopes: &'a [String],
    ttl: u32,
    purpose: Option<&'a str>,
    consumer: Option<&'a str>,
    depth: u32,
}

impl<'a> Az<'a> {
    fn simple(purpose: Option<&'a str>) -> Self {
        Az { scopes: &[], ttl: 0, purpose, consumer: None, depth: 0 }
    }
}

/// The caller as policies see it.
struct Principal {
    id: String,
    roles: Vec<String>,
}

fn ctx_fields(c: &Option<RequestContext>) -> (Option<&str>, Option<&str>, Option<&str>) {
    match c {
        Some(c) => (c.purpose.as_deref(), c.trace_id.as_deref(), c.consumer.as_deref()),
        None => (None, None, None),
    }
}

/// A fresh lease for `who` on `cred`: a 128-bit random id and a 256-bit session token. The
/// token is returned once, to the caller; only its SHA-256 is stored.
fn new_lease(
    who: &Principal,
    cred: &CredentialRecord,
    scopes: Vec<String>,
    ttl: u32,
    caps: Caps,
    purpose: Option<&str>,
    consumer: Option<&str>,
) -> Result<(NewLease, Zeroizing<String>), CrpError> {
    let id = crypto::random_hex_id("lease_", 16).map_err(|e| internal("random generator failure")(e.to_string()))?;
    let token = crypto::random_token("crpst_", 32).map_err(|e| internal("random generator failure")(e.to_string()))?;
    let nl = NewLease {
        id,
        token_hash: crypto::sha256_hex(token.as_bytes()),
        credential_key: cred.key.clone(),
        service: cred.service.clone(),
        agent: who.id.clone(),
        scopes,
        ttl,
        caps,
        purpose: purpose.map(str::to_string),
        consumer: consumer.map(str::to_string),
    };
    Ok((nl, token))
}

fn internal(what: &'static str) -> impl FnOnce(String) -> CrpError {
    move |detail| {
        tracing::error!(target: "crp_provider::vault", "{what}: {detail}");
        CrpError::provider_error(what)
    }
}

fn audit_refused(e: audit::AuditError) -> CrpError {
    tracing::error!(target: "crp_provider::audit", "audit write failed, refusing operation: {e}");
    CrpError::provider_error("audit log unavailable; operation refused")
}

fn fingerprint(agent: &str, action: Action, key: &str, scopes: &[String]) -> String {
    let mut s: Vec<&str> = scopes.iter().map(String::as_str).collect();
    s.sort_unstable();
    s.dedup();
    crypto::sha256_hex(format!("{agent}\0{}\0{key}\0{}", action.as_str(), s.join(" ")).as_bytes())
}

fn lease_err(e: LeaseError, lease_id: &str) -> CrpError {
    match e {
        LeaseError::NotFound => CrpError::lease_not_found(lease_id),
        LeaseError::Expired => CrpError::lease_expired(lease_id),
        LeaseError::Ended(state) => CrpError::lease_not_renewable(lease_id, &format!("the lease is {state}")),
        LeaseError::NotRenewable(why) => CrpError::lease_not_renewable(lease_id, &why),
        LeaseError::DepthExceeded(max) => CrpError::delegation_depth_exceeded(max),
        LeaseError::ScopeOutOfParent(s) => CrpError::scope_unavailable(s),
        LeaseError::Store(s) => internal("storage failure")(s.to_string()),
    }
}

fn cedar_str(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

impl Vault {
    // ------------------------------------------------------------------ lifecycle

    /// Create a vault in `home`. Refuses if one exists. Writes the starter policy.
    pub async fn init(home: &Path, unlock: Unlock) -> Result<(), VaultError> {
        Self::init_with(home, unlock, None).await
    }

    /// [`Vault::init`] with an explicit database URL (PostgreSQL).
    pub async fn init_with(home: &Path, unlock: Unlock, database_url_opt: Option<&str>) -> Result<(), VaultError> {
        Self::init_with_kdf(home, unlock, database_url_opt, KdfParams::default()).await
    }

    /// [`Vault::init_with`] with explicit Argon2id cost (tests use a cheap one).
    pub async fn init_with_kdf(
        home: &Path,
        unlock: Unlock,
        database_url_opt: Option<&str>,
        kdf: KdfParams,
    ) -> Result<(), VaultError> {
        let paths = Paths::new(home);
        std::fs::create_dir_all(home).map_err(|e| io_err("cannot create", home, e))?;
        set_mode(home, 0o700)?;
        let config = Config::load(&paths).map_err(VaultError::Invalid)?;
        let url = database_url(&paths, &config, database_url_opt);
        let store = open_store(&paths, url.as_deref()).await?;
        store.migrate().await?;
        if store.is_initialised().await? {
            store.close().await;
            return Err(VaultError::AlreadyInitialised(url.map(|_| "the configured database".to_string()).unwrap_or_else(|| paths.db().display().to_string())));
        }
        let keyfile_key;
        let input = match &unlock {
            Unlock::Passphrase(p) => {
                if p.len() < 8 {
                    return Err(VaultError::Invalid("passphrase must be at least 8 characters".into()));
                }
                KekInput::Passphrase(p.expose())
            }
            Unlock::Keyfile(path) => {
                keyfile_key = if path.exists() {
                    read_keyfile(path)?
                } else {
                    let k = Key32::generate().map_err(|e| VaultError::Invalid(e.to_string()))?;
                    write_new_file(path, crypto::keyfile_text(&k).as_bytes(), 0o600)?;
                    k
                };
                KekInput::Keyfile(&keyfile_key)
            }
        };
        let vault_id = crypto::random_hex_id("vault_", 16).map_err(|e| VaultError::Invalid(e.to_string()))?;
        let (env, dk) = KeyEnvelope::create(&vault_id, &input, kdf).map_err(|e| VaultError::Invalid(e.to_string()))?;
        let audit_key = Key32::generate().map_err(|e| VaultError::Invalid(e.to_string()))?;
        let sealed_audit = dk
            .seal(&crypto::aad("audit-key", &vault_id, 1), audit_key.bytes())
            .map_err(|e| VaultError::Invalid(e.to_string()))?;
        let env_json = serde_json::to_vec(&env).map_err(|e| VaultError::Invalid(e.to_string()))?;
        store.meta_insert("audit_key", &sealed_audit).await?;
        store.meta_insert("key_envelope", &env_json).await?;
        store.close().await;
        restrict_db_files(&paths);
        let pdir = paths.policies_dir();
        std::fs::create_dir_all(&pdir).map_err(|e| io_err("cannot create", &pdir, e))?;
        set_mode(&pdir, 0o700)?;
        let starter = paths.starter_policy();
        if !starter.exists() {
            write_new_file(&starter, crate::policy::starter_policy().as_bytes(), 0o600)?;
        }
        Ok(())
    }

    /// Open an existing vault. A wrong key is [`VaultError::WrongKey`].
    pub async fn open(opts: OpenOptions) -> Result<Vault, VaultError> {
        let paths = Paths::new(&opts.home);
        let config = Config::load(&paths).map_err(VaultError::Invalid)?;
        let url = database_url(&paths, &config, opts.database_url.as_deref());
        if url.is_none() && !paths.db().exists() {
            return Err(VaultError::NotInitialised(paths.home.display().to_string()));
        }
        let store = open_store(&paths, url.as_deref()).await?;
        store.migrate().await?;
        if url.is_none() {
            restrict_db_files(&paths);
        }
        let Some(env) = store.meta_get("key_envelope").await? else {
            return Err(VaultError::NotInitialised(paths.home.display().to_string()));
        };
        let env: KeyEnvelope =
            serde_json::from_slice(&env).map_err(|_| VaultError::Storage("key envelope is corrupt".into()))?;
        let dk = match opts.unlock {
            Some(Unlock::Passphrase(p)) => env.unwrap_key(&KekInput::Passphrase(p.expose())),
            Some(Unlock::Keyfile(path)) => {
                let k = read_keyfile(&path)?;
                env.unwrap_key(&KekInput::Keyfile(&k))
            }
            None if env.uses_passphrase() => {
                let p = std::env::var("CRP_PASSPHRASE").map(Zeroizing::new).map_err(|_| {
                    VaultError::Locked("this vault uses a passphrase: set CRP_PASSPHRASE or pass --passphrase-file".into())
                })?;
                env.unwrap_key(&KekInput::Passphrase(&p))
            }
            None => {
                let kf = paths.keyfile();
                if !kf.exists() {
                    return Err(VaultError::Locked(format!("keyfile {} not found", kf.display())));
                }
                let k = read_keyfile(&kf)?;
                env.unwrap_key(&KekInput::Keyfile(&k))
            }
        }
        .map_err(|e| match e {
            crypto::CryptoError::WrongKey => VaultError::WrongKey,
            other => VaultError::Locked(other.to_string()),
        })?;
        let sealed_audit = store
            .meta_get("audit_key")
            .await?
            .ok_or_else(|| VaultError::Storage("audit key missing".into()))?;
        let raw = dk
            .open(&crypto::aad("audit-key", &env.vault_id, 1), &sealed_audit)
            .map_err(|_| VaultError::Storage("audit key failed authentication".into()))?;
        let audit_key = Key32::from_slice(&raw).map_err(|e| VaultError::Storage(e.to_string()))?;
        let src = read_policy_dir(&paths.policies_dir())?;
        let policy = PolicyEngine::new(&src).map_err(|e| VaultError::Policy(e.render("policies")))?;
        let stamp = policy_stamp(&paths.policies_dir());
        let (audit, audit_task) = AuditLog::start(store.clone(), audit_key.clone());
        let proxy_base = config.proxy_base_url.clone().unwrap_or_else(|| DEFAULT_PROXY_BASE.into());
        let vault = Vault {
            inner: Arc::new(Inner {
                paths,
                config,
                store,
                dk,
                audit_key,
                audit,
                _audit_task: audit_task,
                reaper: Mutex::new(None),
                policy,
                policy_stamp: Mutex::new(stamp),
                proxy_base: RwLock::new(proxy_base),
                broker: Mutex::new(None),
                ephemeral: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        vault.start_reaper();
        Ok(vault)
    }

    /// A throwaway vault in a temporary home with a keyfile (for `serve --dev` and tests).
    /// Keep the `TempDir` alive as long as the vault.
    pub async fn open_ephemeral() -> Result<(Vault, tempfile::TempDir), VaultError> {
        let dir = tempfile::Builder::new()
            .prefix("crp-vault-")
            .tempdir()
            .map_err(|e| VaultError::Io(format!("cannot create a temporary directory: {e}")))?;
        let home = dir.path().to_path_buf();
        Self::init_with(&home, Unlock::Keyfile(home.join("vault.key")), None).await?;
        let v = Self::open(OpenOptions { home, unlock: None, database_url: None }).await?;
        v.inner.ephemeral.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok((v, dir))
    }

    fn start_reaper(&self) {
        let weak = Arc::downgrade(&self.inner);
        let period = self.inner.config.reaper_interval();
        let h = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                let v = Vault { inner };
                if let Err(e) = v.reap_now().await {
                    tracing::warn!(target: "crp_provider::leases", "reaper: {e}");
                }
            }
        });
        if let Ok(mut g) = self.inner.reaper.lock() {
            *g = Some(h);
        }
    }

    /// Mark expired leases now and audit each (`lease.expired`). Returns the ids.
    pub async fn reap_now(&self) -> Result<Vec<String>, VaultError> {
        let grace = i64::from(self.inner.config.grace()) * 1000;
        let reaped = leases::reap(&self.inner.store, now_ms(), grace).await?;
        let ids: Vec<String> = reaped.iter().map(|r| r.id.clone()).collect();
        for r in &reaped {
            let rec = AuditRecord::new(events::LEASE_EXPIRED, &r.agent, "allow").key(&r.key).service(&r.service).lease(&r.id);
            if let Err(e) = self.inner.audit.append(rec).await {
                // Could not audit: put them back so a later pass retries; they are past expiry,
                // so the proxy refuses them regardless.
                leases::unreap(&self.inner.store, &ids).await?;
                return Err(e.into());
            }
        }
        Ok(ids)
    }

    /// Stop the reaper and wait for the audit writer to have written everything queued.
    pub async fn shutdown(&self) {
        if let Some(h) = self.inner.reaper.lock().ok().and_then(|mut g| g.take()) {
            h.abort();
        }
        // Every append is acknowledged only once it is durable, so nothing acknowledged is
        // pending. Fold the SQLite WAL into the main file so a clean stop leaves one file.
        if let Store::Sqlite(p) = &self.inner.store
            && let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(p).await
        {
            tracing::warn!(target: "crp_provider::vault", "WAL checkpoint at shutdown failed: {e}");
        }
    }

    /// The home directory.
    pub fn home(&self) -> &Path {
        &self.inner.paths.home
    }

    /// The storage layer (for tests and tools).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Set the proxy base URL (`proxyBaseUrl = {base}/api/v1/proxy/t/{leaseId}`).
    pub fn set_proxy_base_url(&self, base: &str) {
        if let Ok(mut g) = self.inner.proxy_base.write() {
            *g = base.trim_end_matches('/').to_string();
        }
    }

    /// `proxyBaseUrl` for a lease.
    pub fn proxy_url(&self, lease_id: &str) -> String {
        let base = self.inner.proxy_base.read().map(|g| g.clone()).unwrap_or_else(|_| DEFAULT_PROXY_BASE.into());
        format!("{base}/api/v1/proxy/t/{lease_id}")
    }

    /// The local owner's agent id.
    pub fn owner_agent() -> &'static str {
        "owner"
    }

    /// The loaded policy engine.
    pub fn policy(&self) -> &PolicyEngine {
        self.reload_policies_if_changed();
        &self.inner.policy
    }

    fn reload_policies_if_changed(&self) {
        let dir = self.inner.paths.policies_dir();
        let stamp = policy_stamp(&dir);
        let Ok(mut cur) = self.inner.policy_stamp.lock() else { return };
        if *cur == stamp {
            return;
        }
        match read_policy_dir(&dir).and_then(|src| {
            self.inner.policy.replace(&src).map_err(|e| VaultError::Policy(e.render("policies")))
        }) {
            Ok(()) => {
                tracing::info!(target: "crp_provider::policy", "policies reloaded");
                *cur = stamp;
            }
            Err(e) => {
                tracing::warn!(target: "crp_provider::policy", "policy reload failed; previous policies stay in force: {e}");
                *cur = stamp;
            }
        }
    }

    /// Validate the whole policy set with `src` written as `policies/{file_name}`, then write it
    /// and load it. On error nothing is written and the current set stays in force.
    pub fn install_policy(&self, file_name: &str, src: &str) -> Result<(), VaultError> {
        if file_name.is_empty()
            || !file_name.ends_with(".cedar")
            || !file_name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(VaultError::Invalid("policy file names are [A-Za-z0-9._-]+.cedar".into()));
        }
        let dir = self.inner.paths.policies_dir();
        std::fs::create_dir_all(&dir).map_err(|e| io_err("cannot create", &dir, e))?;
        PolicyEngine::validate(src).map_err(|e| VaultError::Policy(e.render(file_name)))?;
        let target = dir.join(file_name);
        let tmp = dir.join(format!(".{file_name}.tmp"));
        std::fs::write(&tmp, src).map_err(|e| io_err("cannot write", &tmp, e))?;
        std::fs::rename(&tmp, &target).map_err(|e| io_err("cannot write", &target, e))?;
        match read_policy_dir(&dir).and_then(|all| {
            self.inner.policy.replace(&all).map_err(|e| VaultError::Policy(e.render("policies")))
        }) {
            Ok(()) => {
                if let Ok(mut g) = self.inner.policy_stamp.lock() {
                    *g = policy_stamp(&dir);
                }
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&target);
                Err(e)
            }
        }
    }

    /// The delegation depth cap of this vault (`meta.max_delegation_depth`, else 4).
    async fn depth_cap(&self) -> u32 {
        match self.inner.store.meta_get("max_delegation_depth").await {
            Ok(Some(v)) => std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()).unwrap_or(PROVIDER_MAX_DELEGATION_DEPTH),
            _ => PROVIDER_MAX_DELEGATION_DEPTH,
        }
        .min(16)
    }

    /// Set the delegation depth cap (persisted).
    pub async fn set_max_delegation_depth(&self, depth: u32) -> Result<(), VaultError> {
        let v = depth.min(16).to_string();
        crate::store::with_write_tx!(&self.inner.store, |tx| {
            sqlx::query("INSERT INTO meta (name, value) VALUES ('max_delegation_depth', $1) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
                .bind(v.as_bytes().to_vec())
                .execute(&mut *tx)
                .await?;
        });
        Ok(())
    }

    fn broker(&self) -> Result<Broker, String> {
        let mut g = self.inner.broker.lock().map_err(|_| "broker lock poisoned".to_string())?;
        if let Some(b) = g.as_ref() {
            return Ok(b.clone());
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build HTTP client: {e}"))?;
        let b = Broker::new(http);
        *g = Some(b.clone());
        Ok(b)
    }

    fn caps(&self, cred: &CredentialRecord) -> Caps {
        Caps {
            provider_max_ttl: self.inner.config.max_ttl(),
            credential_max_ttl: cred.max_ttl,
            max_lease_lifetime: self.inner.config.max_lease_lifetime(),
        }
    }

    async fn append(&self, rec: AuditRecord) -> Result<i64, CrpError> {
        self.inner.audit.append(rec).await.map_err(audit_refused)
    }

    /// Run a lease mutation and its audit entry `entry` in one group-committed transaction of
    /// the audit writer (atomic: no lease change without its entry; concurrent requests share
    /// one fsync). A refused mutation is audited as `error` (from `err_template`, best effort
    /// only in the sense that an unwritable audit refuses the request with -33010 instead).
    async fn lease_op(
        &self,
        entry: AuditRecord,
        err_template: AuditRecord,
        op: leases::LeaseOp,
        lease_id: &str,
    ) -> Result<leases::LeaseOutcome, CrpError> {
        match self.inner.audit.append_with(entry, op).await {
            Ok((_, outcome)) => Ok(outcome),
            Err(audit::AppendError::Audit(e)) => Err(audit_refused(e)),
            Err(audit::AppendError::Lease(e)) => {
                self.append(err_template.event(events::ERROR, "error").with("reason", e.to_string())).await?;
                Err(lease_err(e, lease_id))
            }
        }
    }

    /// [`Vault::lease_op`] for an insert: the stored record.
    async fn lease_insert(
        &self,
        entry: AuditRecord,
        err_template: AuditRecord,
        op: leases::LeaseOp,
        lease_id: &str,
    ) -> Result<LeaseRecord, CrpError> {
        match self.lease_op(entry, err_template, op, lease_id).await? {
            leases::LeaseOutcome::Inserted(rec) => Ok(rec),
            leases::LeaseOutcome::Released(_) => Err(internal("storage failure")("unexpected lease outcome".into())),
        }
    }

    // ------------------------------------------------------------------ authorization

    async fn principal(&self, agent: &str, template: &AuditRecord) -> Result<Principal, CrpError> {
        // Pick up policy files changed on disk (by `apply`, an editor, another process) once
        // per operation.
        self.reload_policies_if_changed();
        let rec = agents::get(&self.inner.store, agent).await.map_err(|e| internal("storage failure")(e.to_string()))?;
        match rec {
            Some(a) if a.status != AgentStatus::Active => {
                let why = format!("agent is {}", a.status.as_str());
                self.append(template.clone().event(events::DENIED, "deny").with("reason", why.clone())).await?;
                Err(CrpError::policy_denied(why, None))
            }
            Some(a) => Ok(Principal { id: a.id, roles: a.roles }),
            None => Ok(Principal { id: agent.to_string(), roles: Vec::new() }),
        }
    }

    fn decide(&self, who: &Principal, action: Action, cred: &CredentialRecord, az: &Az<'_>) -> Decision {
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

    /// Authorize with side effects: audit refusals, hold approvals, consume an approval.
    /// Returns the deciding policy id on allow.
    async fn authorize(
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

    async fn enforce(
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

    async fn cred_or_404(&self, key: &str, template: &AuditRecord) -> Result<CredentialRecord, CrpError> {
        match credentials::get(&self.inner.store, key).await.map_err(|e| internal("storage failure")(e.to_string()))? {
            Some(c) => Ok(c),
            None => {
                self.append(template.clone().event(events::DENIED, "deny").with("reason", "credential not found")).await?;
                Err(CrpError::service_not_found(key))
            }
        }
    }

    // ------------------------------------------------------------------ crp/use

    async fn do_use(&self, ctx: &CallContext, p: UseParams) -> Result<UseResult, CrpError> {
        let (purpose, trace, consumer) = ctx_fields(&p.context);
        let template = AuditRecord::new(events::LEASED, &ctx.agent, "allow")
            .service(&p.service)
            .context(purpose, trace)
            .with("transport", ctx.transport.as_str());
        let who = self.principal(&ctx.agent, &template).await?;
        if let Some(del) = &p.delegation {
            return self.do_delegate(ctx, &who, &p, del, template).await;
        }
        let store = &self.inner.store;
        let candidates =
            credentials::by_service(store, &p.service).await.map_err(|e| internal("storage failure")(e.to_string()))?;
        if candidates.is_empty() {
            self.append(template.event(events::DENIED, "deny").with("reason", "service not found")).await?;
            return Err(CrpError::service_not_found(&p.service));
        }
        let now = now_ms();
        let live: Vec<&CredentialRecord> = candidates.iter().filter(|c| !c.is_expired(now)).collect();
        if live.is_empty() {
            self.append(template.event(events::ERROR, "error").with("reason", "credential expired")).await?;
            return Err(CrpError::credential_unavailable("the stored credential has expired"));
        }
        let requested = leases::dedup(&p.scopes);
        // Pick the first credential (by key) the policy allows; else the first one's decision.
        let mut chosen: Option<(&CredentialRecord, Decision, u32)> = None;
        for c in &live {
            let ttl = self.caps(c).grant_ttl(p.ttl);
            let az = Az { scopes: &requested, ttl, purpose, consumer, depth: 0 };
            let d = self.decide(&who, Action::Use, c, &az);
            let better = match &chosen {
                None => true,
                Some((_, prev, _)) => d.outcome < prev.outcome,
            };
            if better {
                let allow = d.outcome == Outcome::Allow;
                chosen = Some((c, d, ttl));
                if allow {
                    break;
                }
            }
        }
        let Some((cred, decision, ttl)) = chosen else {
            return Err(CrpError::service_not_found(&p.service));
        };
        let template = template.key(&cred.key);
        let az = Az { scopes: &requested, ttl, purpose, consumer, depth: 0 };
        let policy = self.enforce(&who, Action::Use, cred, &az, &template, decision).await?;
        let unknown: Vec<String> = requested.iter().filter(|s| !cred.scopes.contains(s)).cloned().collect();
        if !unknown.is_empty() {
            self.append(
                template.clone().policy(policy.as_deref()).event(events::DENIED, "deny").with("reason", "scope unavailable").with("deniedScopes", unknown.clone()),
            )
            .await?;
            return Err(CrpError::scope_unavailable(unknown));
        }
        let mut caps = self.caps(cred);
        if !cred.renewable {
            caps.max_lease_lifetime = ttl;
        }
        let (nl, token) = new_lease(&who, &cred, requested.clone(), ttl, caps, purpose, consumer)?;
        let lease_id = nl.id.clone();
        let depth_cap = self.depth_cap().await;
        // The lease row and its `credential.leased` entry commit together in the audit
        // writer's group commit.
        let entry = template.clone().policy(policy.as_deref()).lease(&lease_id).with("ttl", ttl).with("scopes", requested.clone());
        let op = leases::LeaseOp::InsertRoot(leases::root_record(&nl, depth_cap, now_ms()));
        let rec = self.lease_insert(entry, template.lease(&lease_id), op, &lease_id).await?;
        Ok(self.use_result(&rec, cred, Some(token.to_string())))
    }

    fn use_result(&self, rec: &LeaseRecord, cred: &CredentialRecord, token: Option<String>) -> UseResult {
        UseResult {
            lease: rec.to_wire(),
            proxy_base_url: self.proxy_url(&rec.id),
            session_token: token,
            service: rec.service.clone(),
            granted_scopes: rec.scopes.clone(),
            credential_descriptor: CredentialDescriptor {
                credential_type: cred.kind.crp_type(),
                brokered: cred.kind.brokered(),
                auto_refresh: cred.kind.brokered(),
                classification: cred.classification,
            },
        }
    }

    async fn do_delegate(
        &self,
        ctx: &CallContext,
        who: &Principal,
        p: &UseParams,
        del: &crp_core::types::Delegation,
        template: AuditRecord,
    ) -> Result<UseResult, CrpError> {
        let (purpose, _, consumer) = ctx_fields(&p.context);
        let store = &self.inner.store;
        let template = template.event(events::DELEGATED, "allow").with("parentLeaseId", del.parent_lease_id.clone());
        let parent = leases::get(store, &del.parent_lease_id).await.map_err(|e| lease_err(e, &del.parent_lease_id))?;
        let parent = match parent {
            Some(l) if l.agent == who.id => l,
            _ => {
                self.append(template.event(events::DENIED, "deny").with("reason", "parent lease not found or not held by the caller"))
                    .await?;
                return Err(CrpError::lease_not_found(&del.parent_lease_id));
            }
        };
        if parent.service != p.service {
            return Err(CrpError::invalid_params("delegation must name the parent lease's service"));
        }
        let template = template.key(&parent.credential_key);
        let Some(cred) =
            credentials::get(store, &parent.credential_key).await.map_err(|e| internal("storage failure")(e.to_string()))?
        else {
            return Err(CrpError::credential_unavailable("the parent lease's credential was deleted"));
        };
        let mut caps = self.caps(&cred);
        if !cred.renewable {
            caps.max_lease_lifetime = caps.grant_ttl(p.ttl);
        }
        let depth_cap = self.depth_cap().await;
        let requested = leases::dedup(&p.scopes);
        let plan = match leases::plan_child(&parent, &requested, p.ttl, del.max_depth, &caps, depth_cap, now_ms()) {
            Ok(plan) => plan,
            Err(e) => {
                self.append(template.event(events::DENIED, "deny").with("reason", e.to_string())).await?;
                return Err(lease_err(e, &del.parent_lease_id));
            }
        };
        let az = Az { scopes: &plan.scopes, ttl: plan.ttl, purpose, consumer, depth: plan.depth };
        let policy = self.authorize(who, Action::Delegate, &cred, &az, &template).await?;
        let (nl, token) = new_lease(who, &cred, plan.scopes.clone(), plan.ttl, caps, purpose, consumer)?;
        let lease_id = nl.id.clone();
        let _ = ctx;
        // The parent is re-checked inside the writer's transaction (a concurrent revoke or
        // release cannot be raced); the child and its `lease.delegated` entry commit together.
        let entry = template.clone().policy(policy.as_deref()).lease(&lease_id).with("depth", plan.depth).with("ttl", plan.ttl);
        let op = leases::LeaseOp::InsertChild {
            parent_id: parent.id.clone(),
            lease: nl,
            requested_ttl: p.ttl,
            requested_max_depth: del.max_depth,
            provider_cap: depth_cap,
            now: now_ms(),
        };
        let rec = self.lease_insert(entry, template.lease(&lease_id), op, &parent.id).await?;
        Ok(self.use_result(&rec, &cred, Some(token.to_string())))
    }

    // ------------------------------------------------------------------ crp/lease, crp/revoke

    async fn owned_lease(&self, agent: &str, lease_id: &str, template: &AuditRecord) -> Result<(LeaseRecord, CredentialRecord), CrpError> {
        let store = &self.inner.store;
        let l = leases::get(store, lease_id).await.map_err(|e| lease_err(e, lease_id))?;
        let Some(l) = l.filter(|l| l.agent == agent) else {
            self.append(template.clone().event(events::DENIED, "deny").with("reason", "lease not found or not held by the caller"))
                .await?;
            return Err(CrpError::lease_not_found(lease_id));
        };
        let cred = credentials::get(store, &l.credential_key).await.map_err(|e| internal("storage failure")(e.to_string()))?;
        let cred = cred.unwrap_or_else(|| CredentialRecord {
            key: l.credential_key.clone(),
            service: l.service.clone(),
            kind: CredentialKind::Custom,
            classification: Classification::Restricted,
            tags: vec![],
            scopes: vec![],
            max_ttl: None,
            renewable: false,
            metadata: BTreeMap::new(),
            expires_at: None,
            version: 0,
            created_at: 0,
            updated_at: 0,
        });
        Ok((l, cred))
    }

    async fn do_lease(&self, ctx: &CallContext, p: LeaseParams) -> Result<LeaseResult, CrpError> {
        let store = &self.inner.store;
        let event = match p.action {
            LeaseAction::Renew => events::LEASE_RENEWED,
            LeaseAction::Release => events::LEASE_RELEASED,
        };
        let template = AuditRecord::new(event, &ctx.agent, "allow").lease(&p.lease_id).with("transport", ctx.transport.as_str());
        let who = self.principal(&ctx.agent, &template).await?;
        let (l, cred) = self.owned_lease(&who.id, &p.lease_id, &template).await?;
        let template = template.key(&l.credential_key).service(&l.service);
        let now = now_ms();
        match p.action {
            LeaseAction::Renew => {
                let caps = self.caps(&cred);
                let increment = caps.grant_ttl(p.ttl.or(Some(l.ttl)));
                let az = Az { scopes: &l.scopes, ttl: increment, purpose: l.purpose.as_deref(), consumer: l.consumer.as_deref(), depth: l.depth };
                let policy = self.authorize(&who, Action::Renew, &cred, &az, &template).await?;
                if let Err(e) = leases::check_usable(&l, now) {
                    self.append(template.event(events::ERROR, "error").with("reason", e.to_string())).await?;
                    return Err(lease_err(e, &l.id));
                }
                if !cred.renewable || l.expires_at >= l.max_expires_at {
                    let why = if cred.renewable { "the lease has reached its maximum lifetime" } else { "the credential's leases are not renewable" };
                    self.append(template.event(events::ERROR, "error").with("reason", why)).await?;
                    return Err(CrpError::lease_not_renewable(&l.id, why));
                }
                self.append(template.clone().policy(policy.as_deref()).with("increment", increment)).await?;
                let rec = leases::renew(store, &l.id, increment, now).await.map_err(|e| lease_err(e, &l.id))?;
                Ok(LeaseResult::Renewed(LeaseRenewed { lease: rec.to_wire(), proxy_base_url: Some(self.proxy_url(&rec.id)), credential: None }))
            }
            LeaseAction::Release => {
                let az = Az { scopes: &l.scopes, ttl: 0, purpose: l.purpose.as_deref(), consumer: l.consumer.as_deref(), depth: l.depth };
                let policy = self.authorize(&who, Action::Release, &cred, &az, &template).await?;
                if let Err(e) = leases::check_usable(&l, now) {
                    self.append(template.event(events::ERROR, "error").with("reason", e.to_string())).await?;
                    return Err(lease_err(e, &l.id));
                }
                // The release and its `lease.released` entry commit together.
                let op = leases::LeaseOp::Release { id: l.id.clone(), now };
                self.lease_op(template.clone().policy(policy.as_deref()), template, op, &l.id).await?;
                Ok(LeaseResult::Released(LeaseReleased { released: true, lease_id: l.id }))
            }
        }
    }

    async fn do_revoke(&self, ctx: &CallContext, p: RevokeParams) -> Result<RevokeResult, CrpError> {
        let store = &self.inner.store;
        let template = AuditRecord::new(events::REVOKED, &ctx.agent, "allow")
            .lease(&p.lease_id)
            .with("reason", p.reason.as_str())
            .with("transport", ctx.transport.as_str());
        let who = self.principal(&ctx.agent, &template).await?;
        // The holder of the lease or of any ancestor may revoke it.
        let mut l = leases::get(store, &p.lease_id).await.map_err(|e| lease_err(e, &p.lease_id))?;
        let target = l.clone();
        let mut held = false;
        let mut hops = 0;
        while let Some(cur) = l {
            if cur.agent == who.id {
                held = true;
                break;
            }
            hops += 1;
            if hops > 32 {
                break;
            }
            l = match &cur.parent_id {
                Some(pid) => leases::get(store, pid).await.map_err(|e| lease_err(e, pid))?,
                None => None,
            };
        }
        let Some(target) = target.filter(|_| held) else {
            self.append(template.event(events::DENIED, "deny").with("reason", "lease not found or not held by the caller")).await?;
            return Err(CrpError::lease_not_found(&p.lease_id));
        };
        let template = template.key(&target.credential_key).service(&target.service);
        let (_, cred) = self.owned_lease(&target.agent, &target.id, &template).await?;
        let az = Az { scopes: &target.scopes, ttl: 0, purpose: None, consumer: None, depth: target.depth };
        let policy = self.authorize(&who, Action::Revoke, &cred, &az, &template).await?;
        self.append(template.policy(policy.as_deref()).with("detail", p.detail.clone().unwrap_or_default())).await?;
        let now = now_ms();
        let descendants = leases::revoke_subtree(store, &target.id, p.reason.as_str(), now)
            .await
            .map_err(|e| match e {
                LeaseError::Store(s) => {
                    tracing::error!(target: "crp_provider::vault", "revoke failed: {s}");
                    CrpError::revocation_failed("storage failure")
                }
                other => lease_err(other, &target.id),
            })?;
        let mut affected = vec![target.id.clone()];
        affected.extend(descendants);
        Ok(RevokeResult { revoked: true, lease_id: target.id, revoked_at: rfc3339(now), affected_leases: affected })
    }

    // ------------------------------------------------------------------ crp/list

    async fn do_list(&self, ctx: &CallContext, p: ListParams) -> Result<ListResult, CrpError> {
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

    async fn do_resolve(&self, ctx: &CallContext, p: ResolveParams) -> Result<ResolveResult, CrpError> {
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
        let mut chosen: Option<(CredentialRecord, Decision, u32)> = None;
        for c in candidates.into_iter().filter(|c| !c.is_expired(now)) {
            if p.credential_type.is_some_and(|t| t != c.kind.crp_type()) {
                continue;
            }
            let ttl = self.caps(&c).grant_ttl(p.ttl);
            let d = self.decide(&who, Action::Resolve, &c, &Az { scopes: &requested, ttl, purpose, consumer, depth: 0 });
            let better = chosen.as_ref().is_none_or(|(_, prev, _)| d.outcome < prev.outcome);
            if better {
                let allow = d.outcome == Outcome::Allow;
                chosen = Some((c, d, ttl));
                if allow {
                    break;
                }
            }
        }
        let Some((cred, decision, ttl)) = chosen else {
            self.append(template.event(events::DENIED, "deny").with("reason", "service not found")).await?;
            return Err(CrpError::service_not_found(&p.service));
        };
        let template = template.key(&cred.key);
        let az = Az { scopes: &requested, ttl, purpose, consumer, depth: 0 };
        let policy = self.enforce(&who, Action::Resolve, &cred, &az, &template, decision).await?;
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
        let mut caps = self.caps(&cred);
        if !cred.renewable {
            caps.max_lease_lifetime = ttl;
        }
        // The export lease tracks the material; its proxy session token is never handed out.
        let (nl, _session_token) = new_lease(&who, &cred, requested.clone(), ttl, caps, purpose, consumer)?;
        let lease_id = nl.id.clone();
        self.append(template.clone().policy(policy.as_deref()).lease(&lease_id).with("ttl", ttl)).await?;
        self.append(template.event(events::EXPORTED, "allow").policy(policy.as_deref()).lease(&lease_id)).await?;
        let depth_cap = self.depth_cap().await;
        let rec = leases::insert_root(store, &nl, depth_cap, now_ms()).await.map_err(|e| lease_err(e, &lease_id))?;
        Ok(ResolveResult {
            credential: material(&cred, &config, value),
            lease: rec.to_wire(),
            service: cred.service.clone(),
            granted_scopes: rec.scopes.clone(),
            metadata: Some(ResolveMetadata { provider: PROVIDER_NAME.into(), resolved_at: rfc3339(now_ms()) }),
        })
    }

    // ------------------------------------------------------------------ proxy hot path

    /// Check a proxied request's lease and session token and hand the proxy what it needs.
    /// Reads the lease from the database every time, so a revoke by any process takes effect
    /// on the next request.
    pub async fn proxy_grant(&self, lease_id: &str, session_token: &str) -> Result<ProxyGrant, ProxyDenied> {
        let store = &self.inner.store;
        let l = proxy_lookup::lookup(store, &self.inner.dk, lease_id).await.map_err(|e| {
            tracing::error!(target: "crp_provider::vault", "proxy lease lookup failed: {e}");
            ProxyDenied::new(503, "provider_error", "provider error: storage failure")
        })?;
        let Some(l) = l else {
            return Err(ProxyDenied::new(404, "lease_not_found", "lease not found"));
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
        let Some(cred) = l.credential else {
            return Err(ProxyDenied::new(403, "credential_deleted", "the credential behind this lease was deleted"));
        };
        if cred.is_expired(now) {
            return Err(ProxyDenied::new(403, "credential_expired", "the stored credential has expired"));
        }
        let config = cred.config;
        let Some(upstream) = config.upstream.clone() else {
            return Err(ProxyDenied::new(502, "no_upstream", "the credential has no upstream URL configured"));
        };
        let (secret, brokered) = if cred.kind.brokered() {
            let cc = client_credentials(&config, cred.value).map_err(|m| ProxyDenied::new(502, "broker_failure", m))?;
            let b = self.broker().map_err(|m| ProxyDenied::new(502, "broker_failure", format!("broker failure: {m}")))?;
            let tok = b
                .token(&cred.key, &cc)
                .await
                .map_err(|e| ProxyDenied::new(502, "broker_failure", format!("broker failure: {e}")))?;
            (tok, true)
        } else {
            (cred.value, false)
        };
        Ok(ProxyGrant {
            lease_id: l.id,
            key: cred.key,
            service: cred.service,
            upstream,
            injection: config.injection,
            secret,
            allowed_private_hosts: config.allowed_private_hosts,
            brokered,
            agent: l.agent,
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

    // ------------------------------------------------------------------ agents

    /// One agent.
    pub async fn agent(&self, agent_id: &str) -> Result<Option<AgentRecord>, VaultError> {
        Ok(agents::get(&self.inner.store, agent_id).await?)
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
        Ok(agents::upsert(&self.inner.store, a).await?)
    }

    /// Every agent.
    pub async fn agents(&self) -> Result<Vec<AgentRecord>, VaultError> {
        Ok(agents::list(&self.inner.store).await?)
    }

    /// Redeem a bootstrap token: a new `pending` agent.
    pub async fn register_agent(&self, bootstrap_token: &str, public_key_b64: &str, name: Option<&str>) -> Result<AgentRecord, VaultError> {
        let res = agents::redeem_bootstrap(&self.inner.store, bootstrap_token, public_key_b64, name).await;
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
        agents::set_status(&self.inner.store, id, status).await?.ok_or_else(|| VaultError::NotFound(format!("agent `{id}`")))
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

    // ------------------------------------------------------------------ operator (admin CLI)

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

    async fn delete_and_revoke(&self, key: &str) -> Result<Vec<String>, VaultError> {
        let revoked = leases::revoke_for_credential(&self.inner.store, key, "credential_deleted", now_ms()).await?;
        credentials::delete(&self.inner.store, key).await?;
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
        out.extend(leases::revoke_subtree(&self.inner.store, id, "manual_revocation", now_ms()).await?);
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
        Ok(leases::revoke_prefix(&self.inner.store, prefix, "manual_revocation", now_ms()).await?)
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

    /// Load the conformance fixtures: credentials, and a generated policy file
    /// (`policies/50-fixtures.cedar`) giving each listed agent the intended outcome. The
    /// loopback `dev` caller of `serve --dev` gets the outcomes of `agents[0]`. In a throwaway
    /// vault ([`Vault::open_ephemeral`]) the local owner (`serve --stdio --dev`) gets them too,
    /// and the starter policy is removed so the fixtures are the whole policy.
    pub async fn load_fixtures(&self, fixtures: &Fixtures) -> Result<(), VaultError> {
        fixtures.validate().map_err(|e| VaultError::Invalid(format!("fixtures: {e}")))?;
        let mut policy = String::from("// Generated by `Vault::load_fixtures` from the conformance fixtures. Do not edit.\n");
        let mut n = 0;
        let first = fixtures.agents.first().map(|a| a.id.clone());
        let ephemeral = self.inner.ephemeral.load(std::sync::atomic::Ordering::Relaxed);
        for c in &fixtures.credentials {
            let kind = if c.broker.is_some() { CredentialKind::Oauth2ClientCredentials } else { CredentialKind::from(c.credential_type) };
            let mut metadata = BTreeMap::new();
            if !c.description.is_empty() {
                metadata.insert("description".to_string(), c.description.clone());
            }
            let nc = NewCredential {
                key: c.key.clone(),
                service: c.service.clone(),
                kind,
                classification: c.classification,
                tags: c.tags.clone(),
                scopes: c.scopes.clone(),
                max_ttl: Some(c.max_ttl),
                renewable: c.renewable,
                metadata,
                expires_at: None,
                value: c.value.clone(),
                config: CredentialConfig {
                    upstream: Some(c.upstream.clone()),
                    injection: c.inject.clone(),
                    allowed_private_hosts: c.allow_private_hosts.clone(),
                    broker: c.broker.as_ref().map(|b| credentials::BrokerConfig {
                        token_url: b.token_url.clone(),
                        client_id: b.client_id.clone(),
                        scopes: b.scopes.clone(),
                    }),
                },
            };
            self.admin_store(&nc).await?;
            let mut access: Vec<(String, FixtureOutcome, bool)> =
                c.access.iter().map(|a| (a.agent.clone(), a.outcome, a.export)).collect();
            if let Some(first) = &first {
                let mut mirrors = vec!["dev"];
                if ephemeral {
                    mirrors.push(Self::owner_agent());
                }
                for m in mirrors {
                    if !access.iter().any(|(a, _, _)| a == m) {
                        access.push((m.into(), c.outcome_for(first), c.export_for(first)));
                    }
                }
            }
            let key = cedar_str(&c.key);
            for (agent, outcome, export) in access {
                let agent = cedar_str(&agent);
                let ann = match outcome {
                    FixtureOutcome::Allow => "",
                    FixtureOutcome::RequireApproval => "@outcome(\"require_approval\")\n",
                    FixtureOutcome::Quarantine => "@outcome(\"quarantine\")\n",
                    FixtureOutcome::Deny => continue,
                };
                n += 1;
                policy.push_str(&format!(
                    "@id(\"fixture-{n}-use\")\n@reason(\"fixture: {agent} {} on {key}\")\n{ann}permit (principal == Agent::\"{agent}\", action == Action::\"use\", resource == Credential::\"{key}\");\n",
                    outcome.as_str()
                ));
                policy.push_str(&format!(
                    "@id(\"fixture-{n}-lease-ops\")\n@reason(\"fixture: {agent} may list and manage its own leases on {key}\")\npermit (principal == Agent::\"{agent}\", action in [Action::\"list\", Action::\"renew\", Action::\"release\", Action::\"revoke\", Action::\"delegate\"], resource == Credential::\"{key}\");\n",
                ));
                if export && outcome == FixtureOutcome::Allow {
                    policy.push_str(&format!(
                        "@id(\"fixture-{n}-export\")\n@reason(\"fixture: {agent} may export {key} (v0.1)\")\npermit (principal == Agent::\"{agent}\", action in [Action::\"resolve\", Action::\"retrieve\"], resource == Credential::\"{key}\");\n",
                    ));
                }
            }
        }
        // Agents with `audit: true` may read the audit trail (of any key, and the whole log);
        // the loopback `dev` caller mirrors agents[0].
        let mut auditors: Vec<String> = fixtures.agents.iter().filter(|a| a.audit).map(|a| a.id.clone()).collect();
        if fixtures.agents.first().is_some_and(|a| a.audit) {
            for m in ["dev", Self::owner_agent()] {
                if (m == "dev" || ephemeral) && !auditors.iter().any(|a| a == m) {
                    auditors.push(m.into());
                }
            }
        }
        for a in auditors {
            n += 1;
            let a = cedar_str(&a);
            policy.push_str(&format!(
                "@id(\"fixture-{n}-audit\")\n@reason(\"fixture: {a} may read the audit trail\")\npermit (principal == Agent::\"{a}\", action == Action::\"audit\", resource);\n"
            ));
        }
        self.install_policy("50-fixtures.cedar", &policy)?;
        if ephemeral {
            // The fixtures are the whole policy of a throwaway conformance vault.
            let starter = self.inner.paths.starter_policy();
            if starter.exists() {
                std::fs::remove_file(&starter).map_err(|e| io_err("cannot remove", &starter, e))?;
                let dir = self.inner.paths.policies_dir();
                let all = read_policy_dir(&dir)?;
                self.inner.policy.replace(&all).map_err(|e| VaultError::Policy(e.render("policies")))?;
                if let Ok(mut g) = self.inner.policy_stamp.lock() {
                    *g = policy_stamp(&dir);
                }
            }
        }
        self.set_max_delegation_depth(fixtures.delegation.max_depth).await?;
        Ok(())
    }

    // ------------------------------------------------------------------ x-crp extensions

    async fn ext_store(&self, ctx: &CallContext, p: ext::VaultStoreParams) -> Result<ext::VaultStoreResult, CrpError> {
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
        if let Ok(b) = self.broker() {
            b.invalidate(&nc.key);
        }
        Ok(ext::VaultStoreResult { stored: true, key: nc.key, version: u32::try_from(v).unwrap_or(u32::MAX), expires_at: expires_at.map(rfc3339) })
    }

    async fn ext_retrieve(&self, ctx: &CallContext, p: ext::VaultRetrieveParams) -> Result<ext::VaultRetrieveResult, CrpError> {
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

    async fn ext_delete(&self, ctx: &CallContext, p: ext::VaultDeleteParams) -> Result<ext::VaultDeleteResult, CrpError> {
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

    async fn ext_list(&self, ctx: &CallContext, p: ext::VaultListParams) -> Result<ext::VaultListResult, CrpError> {
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

    async fn ext_policy_check(&self, ctx: &CallContext, p: ext::PolicyCheckParams) -> Result<ext::PolicyCheckResult, CrpError> {
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

    async fn ext_audit_query(&self, ctx: &CallContext, p: ext::AuditQueryParams) -> Result<ext::AuditQueryResult, CrpError> {
        let template = AuditRecord::new(events::AUDIT_QUERIED, &ctx.agent, "allow").with("transport", ctx.transport.as_str());
        let who = self.principal(&ctx.agent, &template).await?;
        // The audit resource: the key asked about, else the whole log (`Credential::"*"`).
        let resource = match &p.key {
            Some(k) => credentials::get(&self.inner.store, k).await.map_err(|e| internal("storage failure")(e.to_string()))?,
            None => None,
        };
        let resource = resource.unwrap_or_else(|| CredentialRecord {
            key: p.key.clone().unwrap_or_else(|| "*".into()),
            service: "*".into(),
            kind: CredentialKind::Custom,
            classification: Classification::Restricted,
            tags: vec![],
            scopes: vec![],
            max_ttl: None,
            renewable: false,
            metadata: BTreeMap::new(),
            expires_at: None,
            version: 0,
            created_at: 0,
            updated_at: 0,
        });
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

    async fn ext_whoami(&self, ctx: &CallContext) -> Result<ext::WhoamiResult, CrpError> {
        let rec = agents::get(&self.inner.store, &ctx.agent).await.map_err(|e| internal("storage failure")(e.to_string()))?;
        Ok(ext::WhoamiResult { agent: ctx.agent.clone(), roles: rec.map(|a| a.roles).unwrap_or_default(), version: ctx.version.to_string() })
    }
}

fn write_new_file(p: &Path, bytes: &[u8], mode: u32) -> Result<(), VaultError> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(mode);
    }
    let mut f = o.open(p).map_err(|e| io_err("cannot create", p, e))?;
    f.write_all(bytes).map_err(|e| io_err("cannot write", p, e))?;
    f.sync_all().map_err(|e| io_err("cannot sync", p, e))?;
    set_mode(p, mode)
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

fn decode_ext<T: serde::de::DeserializeOwned>(params: Value) -> Result<T, CrpError> {
    let params = if params.is_null() { Value::Object(Default::default()) } else { params };
    crp_core::dispatch::decode(params)
}

fn to_json<T: serde::Serialize>(v: T) -> Result<Value, CrpError> {
    serde_json::to_value(v).map_err(|_| CrpError::internal())
}

#[async_trait]
impl crp_core::Provider for Vault {
    fn capability(&self, version: Version) -> Capability {
        let (features, conformance) = match version {
            Version::V0_1 => (vec![Feature::Resolve, Feature::Lease, Feature::Revoke, Feature::List], ConformanceTier::Standard),
            Version::V0_2 => (
                vec![
                    Feature::Use,
                    Feature::List,
                    Feature::Lease,
                    Feature::Revoke,
                    Feature::Delegate,
                    Feature::Broker,
                    Feature::Classify,
                ],
                ConformanceTier::Full,
            ),
        };
        Capability {
            version: version.to_string(),
            versions: crp_core::version::SUPPORTED.iter().map(|s| s.to_string()).collect(),
            provider: Some(PROVIDER_NAME.into()),
            features,
            conformance: Some(conformance),
        }
    }

    async fn use_credential(&self, ctx: &CallContext, params: UseParams) -> Result<UseResult, CrpError> {
        self.do_use(ctx, params).await
    }

    async fn resolve(&self, ctx: &CallContext, params: ResolveParams) -> Result<ResolveResult, CrpError> {
        self.do_resolve(ctx, params).await
    }

    async fn lease(&self, ctx: &CallContext, params: LeaseParams) -> Result<LeaseResult, CrpError> {
        self.do_lease(ctx, params).await
    }

    async fn revoke(&self, ctx: &CallContext, params: RevokeParams) -> Result<RevokeResult, CrpError> {
        self.do_revoke(ctx, params).await
    }

    async fn list(&self, ctx: &CallContext, params: ListParams) -> Result<ListResult, CrpError> {
        self.do_list(ctx, params).await
    }

    async fn extension(&self, ctx: &CallContext, method: &str, params: Value) -> Result<Value, CrpError> {
        match method {
            ext::VAULT_STORE => to_json(self.ext_store(ctx, decode_ext(params)?).await?),
            ext::VAULT_RETRIEVE => to_json(self.ext_retrieve(ctx, decode_ext(params)?).await?),
            ext::VAULT_DELETE => to_json(self.ext_delete(ctx, decode_ext(params)?).await?),
            ext::VAULT_LIST => to_json(self.ext_list(ctx, decode_ext(params)?).await?),
            ext::POLICY_CHECK => to_json(self.ext_policy_check(ctx, decode_ext(params)?).await?),
            ext::AUDIT_QUERY => to_json(self.ext_audit_query(ctx, decode_ext(params)?).await?),
            ext::WHOAMI => to_json(self.ext_whoami(ctx).await?),
            other => Err(CrpError::method_not_found(other)),
        }
    }
}
