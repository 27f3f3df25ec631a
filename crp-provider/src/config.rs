//! Where the vault lives (`CRP_HOME`) and its optional `config.toml`.
//!
//! Layout of `CRP_HOME` (default `~/.crp`):
//! - `vault.db` (+ `-wal`, `-shm`): the SQLite store (sealed values only);
//! - `vault.key`: the 256-bit keyfile, mode 0600 (keyfile mode only);
//! - `config.toml`: optional settings ([`Config`]);
//! - `policies/*.cedar`: the Cedar policy set, loaded in file-name order;
//! - `agents/<id>/`: local agent identities (written by `crp-mcp install`).
//!
//! Owns no secrets: it only names files.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Largest grace period after lease expiry the spec allows (v0.1 §8).
pub const MAX_GRACE_SECONDS: u32 = 60;
/// Deepest delegation chain this provider grants below a root lease.
pub const PROVIDER_MAX_DELEGATION_DEPTH: u32 = 4;

/// Resolve the home directory: explicit value, else `CRP_HOME`, else `~/.crp`.
pub fn resolve_home(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(h) = std::env::var_os("CRP_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    base.join(".crp")
}

/// The files of one vault home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// The home directory.
    pub home: PathBuf,
}

impl Paths {
    /// Paths under `home`.
    pub fn new(home: impl Into<PathBuf>) -> Self {
        Self { home: home.into() }
    }
    /// `vault.db`.
    pub fn db(&self) -> PathBuf {
        self.home.join("vault.db")
    }
    /// `vault.key`.
    pub fn keyfile(&self) -> PathBuf {
        self.home.join("vault.key")
    }
    /// `config.toml`.
    pub fn config(&self) -> PathBuf {
        self.home.join("config.toml")
    }
    /// `policies/`.
    pub fn policies_dir(&self) -> PathBuf {
        self.home.join("policies")
    }
    /// The starter policy `init` writes.
    pub fn starter_policy(&self) -> PathBuf {
        self.policies_dir().join("00-starter.cedar")
    }
}

/// `config.toml`. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `postgres://…` to use PostgreSQL instead of `vault.db` (env `CRP_DATABASE_URL` wins).
    #[serde(default)]
    pub database_url: Option<String>,
    /// Longest lease TTL the provider grants, seconds (default 3600, at most 86400).
    #[serde(default)]
    pub max_ttl: Option<u32>,
    /// Longest total lifetime of a lease across renewals, seconds (default 86400).
    #[serde(default)]
    pub max_lease_lifetime: Option<u32>,
    /// Grace after expiry during which the proxy still honours a lease (default 0, at most 60).
    #[serde(default)]
    pub lease_grace_seconds: Option<u32>,
    /// Reaper period, seconds (default 1).
    #[serde(default)]
    pub reaper_interval_seconds: Option<u32>,
    /// Proxy base URL put into `proxyBaseUrl` (default `http://127.0.0.1:7700`).
    #[serde(default)]
    pub proxy_base_url: Option<String>,
}

impl Config {
    /// Read `config.toml` if present.
    pub fn load(paths: &Paths) -> Result<Self, String> {
        let p = paths.config();
        match std::fs::read_to_string(&p) {
            Ok(s) => toml::from_str(&s).map_err(|e| format!("{}: {e}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("{}: {e}", p.display())),
        }
    }

    /// Effective provider TTL cap.
    pub fn max_ttl(&self) -> u32 {
        self.max_ttl.unwrap_or(3600).clamp(1, crp_core::types::MAX_TTL_SECONDS)
    }
    /// Effective lease lifetime cap.
    pub fn max_lease_lifetime(&self) -> u32 {
        self.max_lease_lifetime.unwrap_or(86_400).max(1)
    }
    /// Effective grace, never above [`MAX_GRACE_SECONDS`].
    pub fn grace(&self) -> u32 {
        self.lease_grace_seconds.unwrap_or(0).min(MAX_GRACE_SECONDS)
    }
    /// Reaper period.
    pub fn reaper_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.reaper_interval_seconds.unwrap_or(1).max(1)))
    }
}
