//! Local agent identities: what `crp-mcp install` writes and remote mode signs with.
//!
//! Layout, under `CRP_HOME` (default `~/.crp`):
//!
//! ```text
//! agents/                      0700
//!   <agentId>/                 0700
//!     private.pem              0600  PKCS#8 PEM Ed25519 key (never leaves this machine)
//!     identity.json            0600  {agentId, name, provider, publicKey, privateKeyPath, createdAt}
//! ```
//!
//! The agent id comes from the provider, so it is checked against a strict pattern before it
//! becomes a directory name. Files are written to a temporary name and renamed, so a crash
//! never leaves a half-written slot; a malformed slot is skipped when listing, with a warning.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use crp_core::signing::{self, AgentSigningKey};
use serde::{Deserialize, Serialize};

/// Resolve `CRP_HOME`: the explicit value, else the environment, else `~/.crp`.
pub fn crp_home(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(h) = std::env::var_os("CRP_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME")
        .or_else(|| std::env::var_os("USERPROFILE"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    base.join(".crp")
}

/// `identity.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityFile {
    /// The id the provider assigned.
    pub agent_id: String,
    /// Human name given at install.
    pub name: String,
    /// Base URL of the provider the agent registered with.
    pub provider: String,
    /// Standard base64 of the raw Ed25519 public key.
    pub public_key: String,
    /// Absolute path of `private.pem`.
    pub private_key_path: PathBuf,
    /// RFC 3339 instant of the install.
    pub created_at: String,
}

/// One installed identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// What `identity.json` says.
    pub file: IdentityFile,
    /// Its slot directory.
    pub dir: PathBuf,
}

impl Identity {
    /// The agent id.
    pub fn agent_id(&self) -> &str {
        &self.file.agent_id
    }

    /// Read the private key (PKCS#8 PEM). Refuses a key file others can read.
    pub fn signing_key(&self) -> Result<AgentSigningKey> {
        let path = self.dir.join("private.pem");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                bail!(
                    "{} is readable by other users (mode {:o}); run `chmod 600 {}`",
                    path.display(),
                    mode & 0o777,
                    path.display()
                );
            }
        }
        let pem = zeroize::Zeroizing::new(
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?,
        );
        signing::private_key_from_pem(&pem).map_err(|e| anyhow!("{}: {e}", path.display()))
    }
}

/// Whether `id` may be used as an agent id (and so as a directory name):
/// 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with a dot.
pub fn valid_agent_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn agents_dir(home: &Path) -> PathBuf {
    home.join("agents")
}

#[cfg(unix)]
fn make_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    // create() honours the umask and leaves existing directories alone: set it explicitly.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot chmod {}", dir.display()))
}

#[cfg(not(unix))]
fn make_private_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Write `bytes` to `path` with mode 0600 via a temporary file and a rename.
fn write_private_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Store a freshly registered identity (overwrites a slot of the same id).
pub fn save(
    home: &Path,
    agent_id: &str,
    name: &str,
    provider: &str,
    key: &AgentSigningKey,
    created_at: String,
) -> Result<Identity> {
    if !valid_agent_id(agent_id) {
        bail!("the provider returned an agent id that is not a safe name: refusing to store it");
    }
    let root = agents_dir(home);
    make_private_dir(home)?;
    make_private_dir(&root)?;
    let dir = root.join(agent_id);
    make_private_dir(&dir)?;
    let pem = signing::private_key_to_pem(key).map_err(|e| anyhow!(e))?;
    let key_path = dir.join("private.pem");
    write_private_file(&key_path, pem.as_bytes())?;
    let key_path = fs::canonicalize(&key_path).unwrap_or(key_path);
    let file = IdentityFile {
        agent_id: agent_id.to_owned(),
        name: name.to_owned(),
        provider: provider.trim_end_matches('/').to_owned(),
        public_key: signing::encode_public_key(&key.verifying_key()),
        private_key_path: key_path,
        created_at,
    };
    let json = serde_json::to_vec_pretty(&file)?;
    write_private_file(&dir.join("identity.json"), &json)?;
    Ok(Identity { file, dir })
}

/// Every readable identity, sorted by agent id. Malformed slots are skipped with a warning.
pub fn load_all(home: &Path) -> Result<Vec<Identity>> {
    let root = agents_dir(home);
    let entries = match fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", root.display())),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        match load_slot(&dir) {
            Ok(id) => out.push(id),
            Err(e) => tracing::warn!(slot = %dir.display(), "skipping unreadable agent identity: {e:#}"),
        }
    }
    out.sort_by(|a, b| a.file.agent_id.cmp(&b.file.agent_id));
    Ok(out)
}

fn load_slot(dir: &Path) -> Result<Identity> {
    let path = dir.join("identity.json");
    let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: IdentityFile =
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not an identity file", path.display()))?;
    let dir_name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if !valid_agent_id(&file.agent_id) || dir_name != file.agent_id {
        bail!("{} names agent `{}` but lives in `{dir_name}`", path.display(), file.agent_id);
    }
    Ok(Identity { file, dir: dir.to_path_buf() })
}

/// Pick the identity to serve as: `requested` (from `CRP_AGENT_ID`), else the only one.
pub fn pick(home: &Path, requested: Option<&str>) -> Result<Identity> {
    let all = load_all(home)?;
    if let Some(id) = requested.filter(|s| !s.is_empty()) {
        return all.into_iter().find(|i| i.file.agent_id == id).ok_or_else(|| {
            anyhow!(
                "no local identity for agent `{id}` under {}; run `crp-mcp whoami` to list them",
                agents_dir(home).display()
            )
        });
    }
    match all.len() {
        0 => bail!(
            "no agent identity installed under {}. Ask the operator for a bootstrap token \
             (`crp-provider agent bootstrap --name N`), then run `crp-mcp install <token> --provider URL`",
            agents_dir(home).display()
        ),
        1 => Ok(all.into_iter().next().ok_or_else(|| anyhow!("identity list changed"))?),
        n => bail!("{n} agent identities are installed; set CRP_AGENT_ID to pick one (`crp-mcp whoami` lists them)"),
    }
}

/// Remove a local identity. Returns whether one was removed.
pub fn remove(home: &Path, agent_id: &str) -> Result<bool> {
    if !valid_agent_id(agent_id) {
        bail!("`{agent_id}` is not a valid agent id");
    }
    let dir = agents_dir(home).join(agent_id);
    match fs::remove_dir_all(&dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_id_pattern() {
        assert!(valid_agent_id("agent-01H.x_y"));
        for bad in ["", "..", ".hidden", "a/b", "a\\b", "a b", &"x".repeat(129)] {
            assert!(!valid_agent_id(bad), "{bad}");
        }
    }

    #[test]
    fn save_load_pick_remove() {
        let home = tempfile::tempdir().unwrap();
        assert!(pick(home.path(), None).unwrap_err().to_string().contains("no agent identity"));
        let key = signing::generate_key().unwrap();
        let id = save(home.path(), "ag-1", "laptop", "http://127.0.0.1:7700/", &key, "2026-01-01T00:00:00Z".into())
            .unwrap();
        assert_eq!(id.file.provider, "http://127.0.0.1:7700");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&home.path().join("agents")), 0o700);
            assert_eq!(mode(&id.dir), 0o700);
            assert_eq!(mode(&id.dir.join("private.pem")), 0o600);
            assert_eq!(mode(&id.dir.join("identity.json")), 0o600);
        }
        let loaded = pick(home.path(), None).unwrap();
        assert_eq!(loaded, id);
        assert_eq!(loaded.signing_key().unwrap().verifying_key(), key.verifying_key());
        // A malformed slot is skipped, not fatal.
        fs::create_dir_all(home.path().join("agents/broken")).unwrap();
        fs::write(home.path().join("agents/broken/identity.json"), "{").unwrap();
        assert_eq!(load_all(home.path()).unwrap().len(), 1);
        let key2 = signing::generate_key().unwrap();
        save(home.path(), "ag-2", "ci", "http://127.0.0.1:7700", &key2, "2026-01-01T00:00:00Z".into()).unwrap();
        assert!(pick(home.path(), None).unwrap_err().to_string().contains("CRP_AGENT_ID"));
        assert_eq!(pick(home.path(), Some("ag-2")).unwrap().agent_id(), "ag-2");
        assert!(pick(home.path(), Some("nope")).is_err());
        assert!(remove(home.path(), "ag-1").unwrap());
        assert!(!remove(home.path(), "ag-1").unwrap());
        assert!(remove(home.path(), "../x").is_err());
    }

    #[test]
    fn save_refuses_unsafe_id() {
        let home = tempfile::tempdir().unwrap();
        let key = signing::generate_key().unwrap();
        assert!(save(home.path(), "../../etc", "x", "http://h", &key, String::new()).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn world_readable_key_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let home = tempfile::tempdir().unwrap();
        let key = signing::generate_key().unwrap();
        let id = save(home.path(), "ag", "x", "http://h", &key, String::new()).unwrap();
        fs::set_permissions(id.dir.join("private.pem"), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(id.signing_key().unwrap_err().to_string().contains("chmod 600"));
    }
}
