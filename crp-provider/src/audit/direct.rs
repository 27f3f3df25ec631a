//! The audit writer's own SQLite connection, for batches that only append entries (the proxy's
//! `credential.used` stream, approvals, listings: everything without a lease mutation).
//!
//! Why a second connection: sqlx runs each SQLite connection on a worker thread of its own,
//! so every batch through it is two thread hand-offs (writer → sqlx's thread → writer), and
//! the worker sleeps between batches, so each hand-off is a wake-up. Measured in process, those
//! wake-ups were half the CPU of a one-entry batch, and under proxy load the whole SQLite part
//! of the audit cost ~14 µs per request. The writer runs on a thread of its own
//! ([`super::AuditLog::start_with`]) and executes these batches there, on this connection,
//! without a hand-off; a busy writer goes from one batch to the next without sleeping. An
//! append that is the only one in flight commits its own entry here instead, on the caller's thread
//! ([`super::AuditLog::append`]): no hand-off at all.
//!
//! Batches with lease mutations keep the sqlx connection, so the lease SQL has one
//! implementation. The chain head and this connection sit together behind one lock
//! ([`super::Lane`]), and the sqlx path takes the head out while its transaction runs, so
//! commits never interleave and the remembered head stays right; another process's appends are
//! caught by the same `seq` collision as on the sqlx path ([`BatchFail::stale_head`]).
//!
//! The statement texts are the sqlx path's ([`super::sqlite_inserts`]): the same rows, bound
//! the same way, NULL padding included.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags};

use super::{BatchFail, Entry, Head, MAX_BATCH, SQLITE_HEAD_UPSERT, head_bytes, sqlite_inserts};
use crate::config::Durability;

/// How long a statement waits for another connection's write lock (as the store's pool does).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// `sqlite_inserts()` has one text per power of two up to [`MAX_BATCH`]; with `BEGIN`,
/// `COMMIT` and the head they all stay prepared.
const STATEMENT_CACHE: usize = 24;

/// The connection, opened on the store's file (never creating it). It lives in the writer's
/// [`super::Lane`], whose lock serializes the writer and inline appends.
pub(super) struct Direct {
    conn: Connection,
    /// The busy timeout now set on `conn`.
    busy_timeout: Duration,
}

impl Direct {
    /// Open `path` for writing with the durability's `synchronous` setting. The file is already
    /// in WAL mode (the store sets it, and it persists in the file).
    pub(super) fn open(path: &Path, durability: Durability) -> rusqlite::Result<Self> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let synchronous = match durability {
            Durability::Fsync => "FULL",
            Durability::Os => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", synchronous)?;
        conn.pragma_update(None, "wal_autocheckpoint", crate::store::checkpoint::BACKSTOP_PAGES)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(Self { conn, busy_timeout: BUSY_TIMEOUT })
    }

    /// Insert `entries` and store `head` in one transaction. `Err` rolls back; its
    /// `broken` asks the caller to drop this connection (the rollback failed too, so the
    /// connection's state is unknown). Without `wait`, a write lock held by another connection
    /// fails the call at once instead of being waited for: an inline append runs on a runtime
    /// worker, which must not sleep on another process's transaction.
    pub(super) fn append(&mut self, entries: &[Entry<'_>], head: &Head, wait: bool) -> Result<(), BatchFail> {
        let timeout = if wait { BUSY_TIMEOUT } else { Duration::ZERO };
        if self.busy_timeout != timeout {
            self.conn.busy_timeout(timeout).map_err(|e| fail(Failure::Other(e), false))?;
            self.busy_timeout = timeout;
        }
        let conn = &mut self.conn;
        match transaction(conn, entries, head) {
            Ok(()) => Ok(()),
            Err(e) => {
                let rolled_back = conn.is_autocommit() || conn.execute_batch("ROLLBACK").is_ok();
                Err(fail(e, !rolled_back))
            }
        }
    }
}

fn transaction(conn: &Connection, entries: &[Entry<'_>], head: &Head) -> Result<(), Failure> {
    let Some(text) = sqlite_inserts().iter().find(|t| t.rows >= entries.len()) else {
        return Err(Failure::TooLarge(entries.len()));
    };
    conn.prepare_cached("BEGIN IMMEDIATE")?.raw_execute()?;
    let mut insert = conn.prepare_cached(&text.insert)?;
    // Rows past `entries` stay NULL (the statement keeps bindings between runs).
    insert.clear_bindings();
    let mut i = 0;
    for e in entries {
        let r = &e.req.rec;
        insert.raw_bind_parameter(i + 1, e.seq)?;
        insert.raw_bind_parameter(i + 2, e.req.ts)?;
        insert.raw_bind_parameter(i + 3, r.action.as_str())?;
        insert.raw_bind_parameter(i + 4, r.requester.as_str())?;
        insert.raw_bind_parameter(i + 5, r.decision.as_str())?;
        insert.raw_bind_parameter(i + 6, r.policy.as_deref())?;
        insert.raw_bind_parameter(i + 7, r.key.as_deref())?;
        insert.raw_bind_parameter(i + 8, r.service.as_deref())?;
        insert.raw_bind_parameter(i + 9, r.lease_id.as_deref())?;
        insert.raw_bind_parameter(i + 10, r.purpose.as_deref())?;
        insert.raw_bind_parameter(i + 11, r.trace_id.as_deref())?;
        insert.raw_bind_parameter(i + 12, e.detail.as_str())?;
        insert.raw_bind_parameter(i + 13, &e.mac[..])?;
        i += super::AUDIT_COLUMN_COUNT;
    }
    insert.raw_execute().map_err(Failure::Insert)?;
    let mut upsert = conn.prepare_cached(SQLITE_HEAD_UPSERT)?;
    upsert.raw_bind_parameter(1, head_bytes(head.seq, &head.mac))?;
    upsert.raw_execute()?;
    conn.prepare_cached("COMMIT")?.raw_execute()?;
    Ok(())
}

/// What went wrong inside the transaction.
enum Failure {
    /// More entries than [`MAX_BATCH`] (the writer never takes that many at once).
    TooLarge(usize),
    /// The insert of the entries: a primary-key collision here means another process appended.
    Insert(rusqlite::Error),
    /// Any other statement.
    Other(rusqlite::Error),
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Self {
        Failure::Other(e)
    }
}

fn fail(f: Failure, broken: bool) -> BatchFail {
    match f {
        Failure::TooLarge(n) => BatchFail {
            msg: format!("audit batch of {n} entries exceeds {MAX_BATCH}"),
            culprit: None,
            stale_head: false,
            broken,
        },
        Failure::Insert(e) => {
            let collided = matches!(&e, rusqlite::Error::SqliteFailure(f, _)
                if f.code == ErrorCode::ConstraintViolation
                    && matches!(f.extended_code, rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY | rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE));
            // The batch always starts from the remembered head here, so a collision is stale.
            BatchFail {
                msg: e.to_string(),
                culprit: None,
                stale_head: collided,
                broken,
            }
        }
        Failure::Other(e) => BatchFail {
            msg: e.to_string(),
            culprit: None,
            stale_head: false,
            broken,
        },
    }
}
