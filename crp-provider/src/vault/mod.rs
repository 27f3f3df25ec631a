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
//!
//! This file owns the public types ([`Unlock`], [`OpenOptions`], [`VaultError`], [`ProxyGrant`],
//! [`ProxyDenied`], [`ProxyAuditRecord`]), the [`Vault`] itself and its lifecycle (init, open,
//! the lease reaper, shutdown, accessors, policy reload, the delegation depth cap, the broker)
//! and the small helpers the operations share. Each operation lives in its own child module,
//! as an `impl Vault` block:
//!
//! - `authz`: the caller as policies see it, the Cedar decision, `enforce` (deny / approval hold).
//! - `use_lease`: `crp/use` and delegation, and the one lease constructor.
//! - `lease_ops`: `crp/lease` (renew / release) and `crp/revoke`.
//! - `list_resolve`: `crp/list` and `crp/resolve` (the v0.1 export).
//! - `proxy`: the proxy's hot path (grant, broker refresh, per-request audit).
//! - `agents`: agent records and the approvals queue.
//! - `operator`: the admin CLI's operations, and [`validate_new`].
//! - `fixtures`: [`Vault::load_fixtures`].
//! - `policy_watch`: whether the policy directory may have changed (the per-operation reload
//!   check).
//! - `ext`: the `x-crp/` extension methods.
//! - `provider`: `impl crp_core::Provider for Vault`, dispatching to the above.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crp_core::types::RequestContext;
use crp_core::types::ext::InjectionRule;
use crp_core::{CrpError, SecretValue};
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use crate::agents::{AgentError, ApprovalRecord};
use crate::audit::{self, AuditLog, AuditRecord, events};
use crate::broker::Broker;
use crate::cache::{EpochCache, Lookup};
use crate::config::{Config, Paths, PROVIDER_MAX_DELEGATION_DEPTH};
use crate::credentials::CredentialRecord;
use crate::crypto::{self, KdfParams, KekInput, Key32, KeyEnvelope};
use crate::epoch::{Domain, Epochs};
use crate::leases::{self, Caps, LeaseError, LeaseRecord};
use crate::policy::PolicyEngine;
use crate::proxy_lookup;
use crate::store::{Store, now_ms};

mod agents;
mod authz;
mod ext;
mod fixtures;
mod lease_ops;
mod list_resolve;
mod operator;
mod policy_watch;
mod provider;
mod proxy;
mod use_lease;

pub use crate::agents::{AgentRecord, AgentStatus};
pub use operator::validate_new;

/// The provider name in capabilities and resolve metadata.
pub const PROVIDER_NAME: &str = "crp-reference";
/// The requester recorded for the admin CLI.
pub const OPERATOR: &str = "operator";
/// Default proxy base URL.
pub const DEFAULT_PROXY_BASE: &str = "http://127.0.0.1:7700";
/// Leases the proxy keeps opened in memory (a full cache starts over).
const GRANT_CACHE_ENTRIES: usize = 65_536;
/// Agents, credentials (by key, by service) and lease facts kept in memory (a full cache starts
/// over).
const READ_CACHE_ENTRIES: usize = 65_536;
/// The longest a cached read is trusted without a stamp change: a bound for the case where a
/// process committed a change and died (or failed to write the stamp) before recording it.
const CACHE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(5);

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
impl From<AgentError> for VaultError {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::Invalid(m) => Self::Invalid(m),
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
    /// Tells the reload check when the policy directory cannot have changed (taken while
    /// `policy_stamp` is held).
    policy_watch: Mutex<policy_watch::PolicyWatch>,
    proxy_base: RwLock<String>,
    broker: Mutex<Option<Broker>>,
    /// A throwaway vault made by [`Vault::open_ephemeral`] (`serve --dev`, tests).
    ephemeral: std::sync::atomic::AtomicBool,
    /// Change stamps shared with every process of this vault (disabled on PostgreSQL).
    epochs: Epochs,
    /// The proxy's view of leases in use, valid while no lease, agent or credential changed.
    grants: EpochCache<String, Arc<proxy_lookup::LeaseView>>,
    /// Agents by id (found ones only: unknown ids are never cached), valid while no agent,
    /// credential or setting changed. Read by HTTP authentication and by every operation.
    agents: EpochCache<String, Arc<AgentRecord>>,
    /// Credential attributes (no value) of a service, by service (non-empty lists only).
    creds_by_service: EpochCache<String, Arc<Vec<CredentialRecord>>>,
    /// Credential attributes (no value) by key (found ones only).
    creds_by_key: EpochCache<String, Arc<CredentialRecord>>,
    /// The delegation depth cap (`meta.max_delegation_depth`).
    depth_cap: EpochCache<(), u32>,
    /// The parts of a lease that never change (holder, credential, scopes, depth, ...), by id:
    /// valid without any stamp, see [`lease_ops::LeaseFacts`].
    lease_facts: EpochCache<String, Arc<lease_ops::LeaseFacts>>,
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


fn ctx_fields(c: &Option<RequestContext>) -> (Option<&str>, Option<&str>, Option<&str>) {
    match c {
        Some(c) => (c.purpose.as_deref(), c.trace_id.as_deref(), c.consumer.as_deref()),
        None => (None, None, None),
    }
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
        let epochs = match store.sqlite_path() {
            Some(db) => {
                let p = Epochs::path_for(&db);
                Epochs::open(&p).map_err(|e| io_err("cannot open the change-stamp file", &p, e))?
            }
            None => Epochs::disabled(),
        };
        let (audit, audit_task) = AuditLog::start_with(store.clone(), audit_key.clone(), config.audit.durability, epochs.clone());
        let grants = EpochCache::new(epochs.clone(), &[Domain::Config, Domain::Leases], GRANT_CACHE_ENTRIES, CACHE_MAX_AGE);
        fn config_cache<K: Eq + std::hash::Hash, V: Clone>(epochs: &Epochs, cap: usize) -> EpochCache<K, V> {
            EpochCache::new(epochs.clone(), &[Domain::Config], cap, CACHE_MAX_AGE)
        }
        let agents = config_cache(&epochs, READ_CACHE_ENTRIES);
        let creds_by_service = config_cache(&epochs, READ_CACHE_ENTRIES);
        let creds_by_key = config_cache(&epochs, READ_CACHE_ENTRIES);
        let depth_cap = config_cache(&epochs, 1);
        // No domain: a lease's facts never change once it exists (its state and expiry are not
        // among them), so no stamp can make them stale.
        let lease_facts = EpochCache::new(epochs.clone(), &[], READ_CACHE_ENTRIES, CACHE_MAX_AGE);
        let policy_watch = Mutex::new(policy_watch::PolicyWatch::new(paths.policies_dir(), epochs.enabled()));
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
                policy_watch,
                proxy_base: RwLock::new(proxy_base),
                broker: Mutex::new(None),
                ephemeral: std::sync::atomic::AtomicBool::new(false),
                epochs,
                grants,
                agents,
                creds_by_service,
                creds_by_key,
                depth_cap,
                lease_facts,
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
        if !reaped.is_empty() {
            self.changed(Domain::Leases);
        }
        let ids: Vec<String> = reaped.iter().map(|r| r.id.clone()).collect();
        for r in &reaped {
            let rec = AuditRecord::new(events::LEASE_EXPIRED, &r.agent, "allow").key(&r.key).service(&r.service).lease(&r.id);
            if let Err(e) = self.inner.audit.append(rec).await {
                // Could not audit: put them back so a later pass retries; they are past expiry,
                // so the proxy refuses them regardless.
                let put_back = leases::unreap(&self.inner.store, &ids).await;
                self.changed(Domain::Leases);
                put_back?;
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

    /// This vault's change stamps (see [`crate::epoch`]), for the read caches.
    pub fn epochs(&self) -> &Epochs {
        &self.inner.epochs
    }

    /// Record a committed change in `domain`, so every process's caches drop what it made
    /// stale. Call it after each commit that changes an agent, a credential, a vault setting
    /// (`Domain::Config`) or the state or expiry of an existing lease (`Domain::Leases`), also
    /// when the operation then fails for another reason.
    pub(crate) fn changed(&self, domain: Domain) {
        self.inner.epochs.bump(domain);
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

    /// Reload the policy files if any changed on disk (compared by name, mtime and size). The
    /// directory is listed only when its watch reports a change or cannot vouch for it (see
    /// [`policy_watch`]); both checks run under the stamp lock, so that an operation that finds
    /// no new change also waits for a reload another operation is making.
    fn reload_policies_if_changed(&self) {
        let Ok(mut cur) = self.inner.policy_stamp.lock() else { return };
        if let Ok(mut watch) = self.inner.policy_watch.lock()
            && !watch.maybe_changed()
        {
            return;
        }
        let dir = self.inner.paths.policies_dir();
        let stamp = policy_stamp(&dir);
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

    /// The delegation depth cap of this vault (`meta.max_delegation_depth`, else 4). Cached
    /// while no setting changed (in any process); a failed read is not cached.
    async fn depth_cap(&self) -> u32 {
        let ticket = match self.inner.depth_cap.get(&()) {
            Lookup::Hit(cap) => return cap,
            Lookup::Miss(t) => t,
        };
        let cap = match self.inner.store.meta_get("max_delegation_depth").await {
            Ok(Some(v)) => std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()).unwrap_or(PROVIDER_MAX_DELEGATION_DEPTH),
            Ok(None) => PROVIDER_MAX_DELEGATION_DEPTH,
            Err(_) => return PROVIDER_MAX_DELEGATION_DEPTH.min(16),
        }
        .min(16);
        self.inner.depth_cap.insert(ticket, (), cap);
        cap
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
        self.changed(Domain::Config);
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

/// What policy sees of a credential it cannot read: nothing but a key and a service, at the
/// most restrictive classification (a credential deleted while leases on it lived, or one
/// named by a dry-run policy check that does not exist).
pub(super) fn placeholder_credential(key: &str, service: &str) -> CredentialRecord {
    CredentialRecord {
        key: key.to_string(),
        service: service.to_string(),
        kind: crate::credentials::CredentialKind::Custom,
        classification: crp_core::types::Classification::Restricted,
        tags: vec![],
        scopes: vec![],
        max_ttl: None,
        renewable: false,
        metadata: std::collections::BTreeMap::new(),
        expires_at: None,
        version: 0,
        created_at: 0,
        updated_at: 0,
    }
}
