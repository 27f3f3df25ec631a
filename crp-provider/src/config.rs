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
    /// The `[audit]` table.
    #[serde(default)]
    pub audit: AuditSettings,
}

/// `[audit]` in `config.toml`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// When a group commit counts as done (default [`Durability::Fsync`]).
    #[serde(default)]
    pub durability: Durability,
}

/// `[audit] durability`: how far a group commit of the audit writer (audit entries and the
/// lease changes riding with them) is made durable before its callers are answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `"fsync"` (default): flushed to stable storage (one fsync per group commit; SQLite
    /// `synchronous=FULL`, PostgreSQL `synchronous_commit` as configured on the server).
    /// Survives a crash of the process, the kernel or the power.
    #[default]
    Fsync,
    /// `"os"`: committed without waiting for the flush (SQLite `synchronous=NORMAL` in WAL mode
    /// on the writer's connection, PostgreSQL `SET LOCAL synchronous_commit = off` in the
    /// writer's transaction). Survives a crash of the process; a power loss or kernel crash
    /// may lose the last moments of commits (whole transactions, never part of one: the chain
    /// stays intact).
    Os,
}

impl Durability {
    /// The value as written in `config.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Fsync => "fsync",
            Durability::Os => "os",
        }
    }
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fsync" => Ok(Durability::Fsync),
            "os" => Ok(Durability::Os),
            other => Err(format!(
                "[audit] durability must be \"fsync\" (durable on stable storage before answering, the default) \
                 or \"os\" (committed without fsync: may lose the last moments on power loss), not {other:?}"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Durability {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_durability_parses_and_defaults_to_fsync() {
        let c: Config = toml::from_str("max_ttl = 60\n").unwrap();
        assert_eq!(c.audit.durability, Durability::Fsync);
        let c: Config = toml::from_str("[audit]\n").unwrap();
        assert_eq!(c.audit.durability, Durability::Fsync);
        let c: Config = toml::from_str("[audit]\ndurability = \"os\"\n").unwrap();
        assert_eq!(c.audit.durability, Durability::Os);
        let c: Config = toml::from_str("[audit]\ndurability = \"fsync\"\n").unwrap();
        assert_eq!(c.audit.durability, Durability::Fsync);
        assert_eq!(Durability::Os.as_str(), "os");
    }

    #[test]
    fn bad_audit_durability_is_a_clear_error() {
        for (text, needle) in [
            ("[audit]\ndurability = \"OS\"\n", "not \"OS\""),
            ("[audit]\ndurability = \"none\"\n", "must be \"fsync\""),
            ("[audit]\ndurability = true\n", "string"),
            ("[audit]\nsync = \"os\"\n", "unknown field `sync`"),
            ("durability = \"os\"\n", "unknown field `durability`"),
        ] {
            let e = toml::from_str::<Config>(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}
