//! Change stamps: how a process learns, without a database round trip, that it (or another
//! process on the same vault) changed something its caches hold.
//!
//! A SQLite vault keeps a 16-byte sidecar file next to its database (`vault.db-epoch`), one
//! 8-byte stamp per [`Domain`]. Whoever commits a change in a domain writes a fresh random
//! stamp for it *after* the commit. A reader takes a [`Stamp`] *before* it reads the database
//! and keeps what it read only while the stamp is unchanged ([`crate::cache::EpochCache`]).
//!
//! Why this is exact: a value cached under stamp `s` was read after `s` was written, so after
//! every commit whose stamp write came before `s`; any commit whose stamp write comes later
//! replaces `s` with a different value, and every later read sees the mismatch. Stamps are
//! random rather than counters so that two writers need no lock: a lost update (two writers
//! racing) still leaves a value no reader has seen, and a value never comes back (no ABA).
//! A torn read yields a value nobody wrote, which reads as "changed": the safe direction.
//!
//! Cost: one `pread` of 16 bytes per check (plus a `stat` of the path every 100 ms); a bump is
//! a `stat` and one `pwrite` of 8 bytes.
//!
//! If the file is deleted or replaced while a process has it open, that process would read a
//! file nobody writes any more: readers notice within 100 ms (the path no longer names their
//! file) and stop trusting stamps until the vault is reopened; writers always write the file
//! the path names, recreating it if needed.
//!
//! PostgreSQL vaults may be shared by processes on several hosts, which no local file can tell,
//! so [`Epochs::disabled`] is used there and every cache lookup misses (each request reads the
//! database, as before caching existed).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What changed. Each domain has its own stamp, so that the churn of one (leases ending many
/// times a second) does not flush the caches of the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// Agents (status, keys, roles), credentials (values, versions, configuration), vault
    /// settings in `meta`.
    Config = 0,
    /// Lease state and expiry: release, revoke, expiry, renewal. (New leases do not bump it: no
    /// cache can hold a lease that did not exist.)
    Leases = 1,
}

/// The stamps of the domains a cache depends on, taken before a database read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp(u128);

/// Handle on a vault's stamp file. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Epochs {
    shared: Option<Arc<Shared>>,
}

#[derive(Debug)]
struct Shared {
    file: File,
    path: PathBuf,
    /// (device, inode) of `file`: the path must keep naming it.
    id: Option<(u64, u64)>,
    origin: Instant,
    /// When the path was last checked, in ns since `origin`.
    checked_at: AtomicU64,
    /// Set when the path stopped naming `file` (deleted or replaced while the vault was open):
    /// other processes now read another file, so this one can no longer trust a stamp and
    /// caches miss until the process reopens the vault.
    lost: AtomicBool,
}

const LEN: u64 = 16;
/// How often a reader re-checks that the path still names its open file.
const PATH_CHECK: Duration = Duration::from_millis(100);

impl Epochs {
    /// Stamps that never match: every cache using them misses.
    pub fn disabled() -> Self {
        Self { shared: None }
    }

    /// The stamp file beside the SQLite database at `db`.
    pub fn path_for(db: &Path) -> PathBuf {
        let mut p = db.as_os_str().to_owned();
        p.push("-epoch");
        PathBuf::from(p)
    }

    /// Open (creating, owner-only) the stamp file at `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = open_file(path)?;
        let id = file_id(&file.metadata()?);
        Ok(Self {
            shared: Some(Arc::new(Shared {
                file,
                path: path.to_path_buf(),
                id,
                origin: Instant::now(),
                checked_at: AtomicU64::new(0),
                lost: AtomicBool::new(false),
            })),
        })
    }

    /// Whether stamps are kept (a SQLite vault).
    pub fn enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// The current stamp of `domains`, or `None` when caching is off or the file cannot be read
    /// or no longer is the vault's (then nothing may be cached).
    pub fn stamp(&self, domains: &[Domain]) -> Option<Stamp> {
        let s = self.shared.as_ref()?;
        let now = u64::try_from(s.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let last = s.checked_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= PATH_CHECK.as_nanos() as u64 {
            s.checked_at.store(now, Ordering::Relaxed);
            s.check_path();
        }
        if s.lost.load(Ordering::Acquire) {
            return None;
        }
        let mut buf = [0u8; 16];
        read_at(&s.file, &mut buf, 0).ok()?;
        let word = |d: Domain| {
            let i = d as usize * 8;
            let mut w = [0u8; 8];
            w.copy_from_slice(&buf[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let mut stamp = 0u128;
        for d in [Domain::Config, Domain::Leases] {
            stamp <<= 64;
            if domains.contains(&d) {
                stamp |= u128::from(word(d));
            }
        }
        Some(Stamp(stamp))
    }

    /// Record that a change in `domain` was committed. Call after the commit, never before.
    /// The stamp is written to the file the path names now (recreated if it was deleted), so
    /// other processes see it whatever happened to this handle's file. A failure is logged:
    /// caches elsewhere then rely on their maximum age.
    pub fn bump(&self, domain: Domain) {
        let Some(s) = &self.shared else { return };
        let stamp = random_bytes::<8>();
        let written = if s.check_path() {
            write_at(&s.file, &stamp, domain as u64 * 8)
        } else {
            open_file(&s.path).and_then(|f| write_at(&f, &stamp, domain as u64 * 8))
        };
        if let Err(e) = written {
            tracing::error!(target: "crp_provider::cache", "cannot record a change in the stamp file: {e}");
        }
    }
}

impl Shared {
    /// Whether the path still names the open file; marks the handle lost (for good) if not.
    fn check_path(&self) -> bool {
        if self.lost.load(Ordering::Acquire) {
            return false;
        }
        let ours = match (self.id, std::fs::metadata(&self.path)) {
            (None, Ok(_)) => true,
            (Some(id), Ok(m)) => file_id(&m) == Some(id),
            (_, Err(_)) => false,
        };
        if !ours {
            self.lost.store(true, Ordering::Release);
            tracing::warn!(
                target: "crp_provider::cache",
                "{} was deleted or replaced while the vault was open: read caches are off in this process until it reopens the vault",
                self.path.display()
            );
        }
        ours
    }
}

fn open_file(path: &Path) -> io::Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let file = opts.open(path)?;
    if file.metadata()?.len() < LEN {
        // A new (or cut-short) file: fresh stamps for both domains. Another process doing
        // the same at the same time writes other random values, which only flushes caches.
        write_at(&file, &random_bytes::<16>(), 0)?;
    }
    Ok(file)
}

#[cfg(unix)]
fn file_id(m: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((m.dev(), m.ino()))
}
#[cfg(not(unix))]
fn file_id(_: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // No entropy means no unpredictable stamp; a zero stamp still differs from the random one
    // it replaces, which is all a reader needs.
    let _ = getrandom::fill(&mut b);
    b
}

#[cfg(unix)]
fn read_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, off)
}
#[cfg(unix)]
fn write_at(f: &File, buf: &[u8], off: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(f, buf, off)
}
#[cfg(not(unix))]
fn read_at(_: &File, _: &mut [u8], _: u64) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "stamp files need a unix platform"))
}
#[cfg(not(unix))]
fn write_at(_: &File, _: &[u8], _: u64) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "stamp files need a unix platform"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bump_in_one_handle_is_seen_by_another_and_only_in_its_domain() {
        let dir = tempfile::tempdir().unwrap();
        let path = Epochs::path_for(&dir.path().join("vault.db"));
        let a = Epochs::open(&path).unwrap();
        let b = Epochs::open(&path).unwrap();
        let cfg = b.stamp(&[Domain::Config]).unwrap();
        let both = b.stamp(&[Domain::Config, Domain::Leases]).unwrap();
        a.bump(Domain::Leases);
        assert_eq!(b.stamp(&[Domain::Config]), Some(cfg), "a lease change leaves config stamps alone");
        assert_ne!(b.stamp(&[Domain::Config, Domain::Leases]), Some(both));
        a.bump(Domain::Config);
        assert_ne!(b.stamp(&[Domain::Config]), Some(cfg));
    }

    #[test]
    fn a_deleted_or_replaced_file_stops_the_old_handle_trusting_stamps() {
        let dir = tempfile::tempdir().unwrap();
        let path = Epochs::path_for(&dir.path().join("vault.db"));
        let old = Epochs::open(&path).unwrap();
        assert!(old.stamp(&[Domain::Leases]).is_some());
        std::fs::remove_file(&path).unwrap();
        // A writer that still holds the deleted file writes the new one the path names.
        old.bump(Domain::Leases);
        assert!(path.exists(), "the bump recreated the file");
        let new = Epochs::open(&path).unwrap();
        let before = new.stamp(&[Domain::Leases]);
        old.bump(Domain::Leases);
        assert_ne!(new.stamp(&[Domain::Leases]), before, "the old handle's bump reached the new file");
        // The old handle no longer trusts its own (deleted) file.
        assert_eq!(old.stamp(&[Domain::Leases]), None);
        // Replaced by another file under the same name: the reader notices at its next path check.
        let reader = Epochs::open(&path).unwrap();
        std::fs::write(dir.path().join("other"), [0u8; 16]).unwrap();
        std::fs::rename(dir.path().join("other"), &path).unwrap();
        let s = reader.shared.as_ref().unwrap();
        assert!(!s.check_path());
        assert_eq!(reader.stamp(&[Domain::Config]), None);
    }

    #[test]
    fn disabled_stamps_are_none() {
        assert_eq!(Epochs::disabled().stamp(&[Domain::Config]), None);
    }

    #[cfg(unix)]
    #[test]
    fn the_file_is_owner_only_and_reopening_keeps_stamps() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = Epochs::path_for(&dir.path().join("vault.db"));
        let a = Epochs::open(&path).unwrap();
        let s = a.stamp(&[Domain::Config, Domain::Leases]);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let b = Epochs::open(&path).unwrap();
        assert_eq!(b.stamp(&[Domain::Config, Domain::Leases]), s);
    }
}
