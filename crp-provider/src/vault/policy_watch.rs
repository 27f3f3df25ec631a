//! "Has the policy directory changed?", cheaply, for the reload check every operation makes
//! ([`super::Vault::reload_policies_if_changed`]).
//!
//! Listing the directory and stat-ing each `*.cedar` file costs several system calls per
//! operation (7% of the server's CPU on the lease path). On Linux, a [`PolicyWatch`] keeps an
//! inotify watch on the directory and asks it, without blocking, whether anything happened:
//! one `read` that finds nothing. The kernel queues an event before the write, create, rename
//! or delete that caused it returns, so a change completed before an operation starts, by this
//! or any other process on the host, is reported to that operation; the caller then compares
//! the file stamps as before and reloads if they differ.
//!
//! Wherever no watch can be kept the answer is "maybe changed" and the caller compares stamps
//! on every operation, as before: other platforms, PostgreSQL vaults (whose home may be shared
//! with other hosts, which inotify cannot see), a directory that does not exist yet, inotify
//! limits reached, the directory removed or moved (the watch is then re-armed), or an event
//! queue overflow.

use std::path::PathBuf;

/// A watch on one policy directory (see the module docs).
pub(super) struct PolicyWatch {
    dir: PathBuf,
    /// `false`: never watch, always "maybe changed".
    enabled: bool,
    #[cfg(target_os = "linux")]
    inotify: Option<rustix::fd::OwnedFd>,
    /// Whether a watch on `dir` is in place.
    #[cfg(target_os = "linux")]
    armed: bool,
}

impl PolicyWatch {
    /// A watch on `dir`, used only when `enabled` (a SQLite vault: the home is on this host).
    /// Nothing is opened until the first check.
    pub(super) fn new(dir: PathBuf, enabled: bool) -> Self {
        Self {
            dir,
            enabled,
            #[cfg(target_os = "linux")]
            inotify: None,
            #[cfg(target_os = "linux")]
            armed: false,
        }
    }

    /// Whether the directory may have changed since the previous call. `false` only when a
    /// watch was in place during the whole interval and reported nothing.
    #[cfg(target_os = "linux")]
    pub(super) fn maybe_changed(&mut self) -> bool {
        use rustix::fs::inotify::{self, ReadFlags};
        use rustix::io::Errno;
        if !self.enabled {
            return true;
        }
        if !self.armed {
            // Changes before the watch exists are the caller's stamp comparison's to find.
            self.arm();
            return true;
        }
        let Some(fd) = &self.inotify else { return true };
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut events = inotify::Reader::new(fd, &mut buf);
        let mut any = false;
        loop {
            match events.next() {
                Ok(ev) => {
                    any = true;
                    let lost = ReadFlags::IGNORED
                        | ReadFlags::DELETE_SELF
                        | ReadFlags::MOVE_SELF
                        | ReadFlags::UNMOUNT
                        | ReadFlags::QUEUE_OVERFLOW;
                    if ev.events().intersects(lost) {
                        // The watch is gone or missed events: start over at the next check.
                        self.armed = false;
                    }
                }
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => continue,
                Err(_) => {
                    self.armed = false;
                    self.inotify = None;
                    return true;
                }
            }
        }
        if !self.armed {
            // Drop the instance (and any watch still on it) so that re-arming starts clean.
            self.inotify = None;
        }
        any
    }

    #[cfg(target_os = "linux")]
    fn arm(&mut self) {
        use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
        if self.inotify.is_none() {
            self.inotify = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).ok();
        }
        let Some(fd) = &self.inotify else { return };
        let what = WatchFlags::CREATE
            | WatchFlags::DELETE
            | WatchFlags::MODIFY
            | WatchFlags::CLOSE_WRITE
            | WatchFlags::ATTRIB
            | WatchFlags::MOVED_FROM
            | WatchFlags::MOVED_TO
            | WatchFlags::DELETE_SELF
            | WatchFlags::MOVE_SELF;
        self.armed = inotify::add_watch(fd, &self.dir, what).is_ok();
    }

    /// Whether the directory may have changed: always, where no watch is kept.
    #[cfg(not(target_os = "linux"))]
    pub(super) fn maybe_changed(&mut self) -> bool {
        let _ = (&self.dir, self.enabled);
        true
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_change_is_reported_once_and_silence_means_unchanged() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("policies");
        std::fs::create_dir(&dir).unwrap();
        let mut w = PolicyWatch::new(dir.clone(), true);
        assert!(w.maybe_changed(), "the first check arms the watch and cannot vouch for the past");
        assert!(!w.maybe_changed());
        let f = dir.join("a.cedar");
        std::fs::write(&f, "x").unwrap();
        assert!(w.maybe_changed(), "create + write");
        assert!(!w.maybe_changed(), "events are consumed");
        std::fs::write(&f, "y").unwrap();
        assert!(w.maybe_changed(), "rewrite in place");
        std::fs::write(dir.join(".b.tmp"), "z").unwrap();
        assert!(w.maybe_changed());
        std::fs::rename(dir.join(".b.tmp"), dir.join("b.cedar")).unwrap();
        assert!(w.maybe_changed(), "rename into place");
        std::fs::remove_file(&f).unwrap();
        assert!(w.maybe_changed(), "delete");
        assert!(!w.maybe_changed());
    }

    #[test]
    fn a_removed_directory_is_watched_again_once_it_is_back() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("policies");
        let mut w = PolicyWatch::new(dir.clone(), true);
        assert!(w.maybe_changed());
        assert!(w.maybe_changed(), "no directory: no watch, always maybe");
        std::fs::create_dir(&dir).unwrap();
        assert!(w.maybe_changed(), "armed now");
        assert!(!w.maybe_changed());
        std::fs::remove_dir(&dir).unwrap();
        assert!(w.maybe_changed(), "the directory went away");
        std::fs::create_dir(&dir).unwrap();
        assert!(w.maybe_changed(), "re-armed on the new directory");
        assert!(!w.maybe_changed());
        std::fs::write(dir.join("c.cedar"), "x").unwrap();
        assert!(w.maybe_changed());
    }

    #[test]
    fn a_disabled_watch_always_answers_maybe() {
        let home = tempfile::tempdir().unwrap();
        let mut w = PolicyWatch::new(home.path().to_path_buf(), false);
        assert!(w.maybe_changed());
        assert!(w.maybe_changed());
    }
}
