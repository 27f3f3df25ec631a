//! Folding the SQLite WAL back into the database file, on a thread of its own.
//!
//! SQLite checkpoints by itself inside the commit that takes the WAL past 1000 pages. That
//! commit is then a request's: with the audit's one-entry commits, every ~230th proxied
//! request waited while its commit copied the WAL's pages into the database and fsynced both
//! files (~5 ms here; with `[audit] durability = "os"` the WAL's pages were never flushed
//! before, so the checkpoint's own fsync of the WAL wrote them all).
//!
//! Here the writers count their commits ([`Kicker::committed`]) and every [`KICK_EVERY`]th
//! one wakes this thread, which runs `PRAGMA wal_checkpoint(PASSIVE)` on a connection of its
//! own: a passive checkpoint takes no lock a writer or reader needs and never waits, it copies
//! what it can. Once everything is copied, the next writer starts the WAL over from its first
//! page, as after an automatic checkpoint. The writers' connections keep SQLite's automatic
//! checkpoint as a backstop only, at [`BACKSTOP_PAGES`], for when this thread cannot keep up
//! or cannot run at all.
//!
//! Under steady load the WAL does not start over after each fold: it restarts only at a commit
//! that finds every frame copied, and a commit always lands while a fold runs. So it grows
//! until a commit crosses the backstop and folds the remainder itself (a few frames, then the
//! WAL starts over): up to ~40 MB on disk. Tried and not kept: a `RESTART` checkpoint after the
//! passive one, which kept the WAL under ~10 MB but holds the write lock while it syncs, and
//! the proxy's p99 at one connection went from 1.0–1.2 to 2.0–2.2 ms.
//!
//! The thread ends when the last [`Kicker`] is dropped (the audit log's writer and inline path
//! hold them). A vault's shutdown still folds the whole WAL (`TRUNCATE`) on its way out.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};

use rusqlite::{Connection, OpenFlags};

/// Commits between two wake-ups of the checkpointer: with one-entry commits (~4 WAL pages
/// each) about half of SQLite's own threshold.
pub const KICK_EVERY: u64 = 256;

/// `wal_autocheckpoint` on the writers' connections: ~40 MB of WAL before a commit folds it
/// itself (SQLite's default is 1000 pages).
pub const BACKSTOP_PAGES: u32 = 10_000;

/// Wakes the checkpointer every [`KICK_EVERY`] commits; cheap to clone.
#[derive(Clone)]
pub struct Kicker {
    shared: Arc<Shared>,
    kick: SyncSender<()>,
}

struct Shared {
    commits: AtomicU64,
    done: tokio::sync::watch::Sender<u64>,
}

impl Kicker {
    /// Start the checkpointer on the SQLite file at `path` (which must exist and be in WAL
    /// mode). `Err` when its connection cannot be opened or its thread cannot start; the
    /// writers then checkpoint by themselves, at the backstop.
    pub fn start(path: &Path) -> std::io::Result<Kicker> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(std::io::Error::other)?;
        let (kick, wakes) = sync_channel::<()>(1);
        let (done, _) = tokio::sync::watch::channel(0u64);
        let shared = Arc::new(Shared { commits: AtomicU64::new(0), done });
        let on_thread = shared.clone();
        std::thread::Builder::new().name("crp-checkpoint".into()).spawn(move || {
            while wakes.recv().is_ok() {
                // Busy (another connection is checkpointing) or failed: the next kick retries,
                // and the backstop stands behind it.
                match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    Ok(()) => {
                        on_thread.done.send_modify(|n| *n += 1);
                    }
                    Err(e) => tracing::debug!(target: "crp_provider::store", "background WAL checkpoint: {e}"),
                }
            }
        })?;
        Ok(Kicker { shared, kick })
    }

    /// One more committed transaction; every [`KICK_EVERY`]th wakes the checkpointer (never
    /// blocks: a wake-up already pending is enough).
    pub fn committed(&self) {
        let n = self.shared.commits.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(KICK_EVERY) {
            // Full: a wake-up is pending already. Disconnected: the thread is gone (it never
            // exits while a kicker lives, so only if it panicked); the backstop remains.
            let _ = self.kick.try_send(());
        }
    }

    /// Checkpoints completed so far, watchable (tests await it instead of sleeping).
    pub fn completed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.done.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// (frames in the WAL, frames already copied into the database), read without copying.
    fn wal_state(conn: &Connection) -> (i64, i64) {
        // A passive checkpoint from a connection that cannot get the checkpoint lock reports
        // the state; here nothing else checkpoints, so this copies whatever is left, which is
        // why the tests look at the state before calling it.
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get(1)?, r.get(2)?))).unwrap()
    }

    #[tokio::test]
    async fn every_kick_every_commits_fold_the_wal_on_the_checkpointers_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        let writer = Connection::open(&path).unwrap();
        writer.pragma_update(None, "journal_mode", "WAL").unwrap();
        // The writer never folds the WAL itself, so only the checkpointer can.
        writer.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        writer.execute_batch("CREATE TABLE t (v BLOB)").unwrap();
        let kicker = Kicker::start(&path).unwrap();
        let mut done = kicker.completed();
        let wal = path.with_extension("db-wal");
        let mut first_size = None;

        for round in 1..=2u64 {
            for _ in 0..KICK_EVERY - 1 {
                writer.execute("INSERT INTO t VALUES (zeroblob(3000))", []).unwrap();
                kicker.committed();
            }
            assert_eq!(*done.borrow(), round - 1, "woken before the {KICK_EVERY}th commit");
            writer.execute("INSERT INTO t VALUES (zeroblob(3000))", []).unwrap();
            kicker.committed();
            tokio::time::timeout(Duration::from_secs(10), done.wait_for(|n| *n >= round))
                .await
                .expect("the checkpointer ran")
                .unwrap();
            let size = std::fs::metadata(&wal).unwrap().len();
            let reader = Connection::open(&path).unwrap();
            let (frames, copied) = wal_state(&reader);
            assert!(frames >= KICK_EVERY as i64, "{frames} frames");
            assert_eq!(frames, copied, "round {round}: the WAL was folded");
            match first_size {
                None => first_size = Some(size),
                // The WAL started over after the first fold: the second round, as long as the
                // first, reused its pages instead of growing the file.
                Some(first) => assert_eq!(size, first, "the WAL grew instead of starting over"),
            }
        }
        assert_eq!(writer.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)).unwrap(), 2 * KICK_EVERY as i64);
    }
}
