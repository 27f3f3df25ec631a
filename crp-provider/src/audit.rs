//! The audit log: append-only, HMAC-chained, committed (by default durably) before the caller is answered.
//!
//! - **Chain.** Entry `n` stores `mac_n = HMAC-SHA256(audit_key, mac_{n-1} || canonical(entry_n))`
//!   with `mac_0` = 32 zero bytes. `canonical` is the JSON array of every column including the
//!   sequence number, so editing, deleting or reordering rows breaks the chain at that point.
//!   The head (last seq and MAC) is also kept in `meta.audit_head`, which catches a truncated
//!   tail. The audit key is random, held sealed by the data key in `meta.audit_key`; without the
//!   vault's passphrase or keyfile nobody can forge an entry.
//! - **Group commit.** Callers hand entries to one writer over a channel and wait for the
//!   acknowledgement; the writer takes everything queued (up to 256, `MAX_BATCH`), writes it in one
//!   transaction (`BEGIN IMMEDIATE` on SQLite, an advisory lock on PostgreSQL, so several
//!   processes keep one chain), commits (durably: see below), then acknowledges them all.
//! - **Few round trips per batch.** The writer keeps its own connection (no pool checkout and
//!   liveness ping per batch) and remembers the chain head (seq, MAC) after each commit
//!   instead of reading it again. If another process appended meanwhile, the first new entry
//!   collides with the primary key on `seq`; the batch is rolled back and redone once with the
//!   head read inside the transaction, under the write lock, so the redo cannot collide again.
//!   After any failure the head is forgotten and read again. The entries and the head go in one
//!   statement whose text stays prepared (SQLite: bound rows in a `VALUES` list, one text per
//!   power-of-two batch size, padded with NULL rows; PostgreSQL: one array per column through
//!   `UNNEST`, one text for every size).
//! - **No hand-offs for plain appends on SQLite.** On a SQLite file the writer runs on a thread
//!   of its own, and a batch without lease mutations (the proxy's stream of `credential.used`)
//!   is written there on the writer's own rusqlite connection ([`direct`]) instead of through
//!   sqlx, whose connection lives on another thread: a busy writer goes from batch to batch
//!   without waking anyone. An [`AuditLog::append`] that is the only one in flight commits its
//!   entry itself on that connection, under the same lock as the writer: a lone request wakes
//!   no thread. Batches with lease mutations go through sqlx
//!   (`BEGIN IMMEDIATE`, the mutations, then insert, head and `COMMIT` in one multi-statement
//!   text), so the lease SQL exists once.
//! - **Durability** (`[audit] durability` in `config.toml`, [`Durability`]). `fsync` (the
//!   default): the commit is on stable storage before anyone is answered (SQLite
//!   `synchronous=FULL`, one fsync per group commit). `os`: committed without waiting for the
//!   flush (SQLite `synchronous=NORMAL` in WAL mode on the writer's connection, PostgreSQL
//!   `SET LOCAL synchronous_commit = off`): a crash of the process loses nothing, a power loss
//!   or kernel crash may lose the last commits (whole transactions; the chain stays intact).
//! - **Lease mutations ride along.** An entry may carry a [`LeaseOp`] (new root lease, delegated
//!   child, release; [`AuditLog::append_with`]). The writer runs the batch's mutations inside
//!   the same transaction, before the entries (new root leases in one multi-row `INSERT`), so a
//!   lease change and its audit entry are committed together or not at all (no lease without
//!   its audit record), and concurrent `crp/use` / release calls share one fsync. A refused
//!   mutation (lease already ended, parent revoked) writes no entry and is reported to its
//!   caller alone.
//! - **Per-item fallback.** If the batch transaction fails, each item is retried in its own
//!   transaction, so one bad item cannot fail its neighbours; each caller gets its own result.
//! - **Fail-closed.** An entry that cannot be written fails its caller; the vault then refuses
//!   the operation (-33010), and a lease mutation queued with it is rolled back.
//!
//! An entry never holds a credential value: the types that reach this module carry ids, names,
//! decisions and sizes only.

use crp_core::types::ext::{AuditEvent, AuditQueryParams};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::crypto::{Key32, hmac_sha256};
use crate::leases::{LeaseConn, LeaseError, LeaseOp, LeaseOutcome, LeaseRecord};
use crate::config::Durability;
use crate::epoch::{Domain, Epochs};
use crate::store::{Store, StoreError, now_ms, parse_rfc3339, rfc3339, with_pool};

mod direct;

/// Event names (v0.1 §10.1 and this implementation's additions).
pub mod events {
    /// v0.1: material exported through `crp/resolve`.
    pub const RESOLVED: &str = "credential.resolved";
    /// v0.1: a request was refused by policy.
    pub const DENIED: &str = "credential.denied";
    /// v0.1: a request failed.
    pub const ERROR: &str = "credential.error";
    /// v0.1: a lease was renewed.
    pub const LEASE_RENEWED: &str = "lease.renewed";
    /// v0.1: a lease was released.
    pub const LEASE_RELEASED: &str = "lease.released";
    /// v0.1: a lease expired.
    pub const LEASE_EXPIRED: &str = "lease.expired";
    /// v0.1: a lease (and its subtree) was revoked.
    pub const REVOKED: &str = "credential.revoked";
    /// A use-handle was granted (`crp/use`).
    pub const LEASED: &str = "credential.leased";
    /// A delegated child lease was granted.
    pub const DELEGATED: &str = "lease.delegated";
    /// A proxied request used a credential.
    pub const USED: &str = "credential.used";
    /// A credential was stored.
    pub const STORED: &str = "credential.stored";
    /// A credential was deleted.
    pub const DELETED: &str = "credential.deleted";
    /// A value left the vault (`x-crp/vault.retrieve`, `crp/resolve`).
    pub const EXPORTED: &str = "credential.exported";
    /// Credentials were listed.
    pub const LISTED: &str = "credential.listed";
    /// A request is held for approval.
    pub const APPROVAL_REQUIRED: &str = "approval.required";
    /// An operator decided an approval.
    pub const APPROVAL_DECIDED: &str = "approval.decided";
    /// A request was quarantined.
    pub const QUARANTINED: &str = "credential.quarantined";
    /// A policy dry run.
    pub const POLICY_CHECKED: &str = "policy.checked";
    /// The audit log was read.
    pub const AUDIT_QUERIED: &str = "audit.queried";
    /// Agent lifecycle.
    pub const AGENT: &str = "agent.changed";
    /// A brokered token was minted.
    pub const BROKERED: &str = "credential.brokered";
}

/// One entry to append. Never put a value in any field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditRecord {
    /// Event name (see [`events`]).
    pub action: String,
    /// The agent (or `operator` for the admin CLI).
    pub requester: String,
    /// `allow`, `deny`, `require_approval`, `quarantine` or `error`.
    pub decision: String,
    /// Deciding policy id.
    pub policy: Option<String>,
    /// Vault key.
    pub key: Option<String>,
    /// Service.
    pub service: Option<String>,
    /// Lease id.
    pub lease_id: Option<String>,
    /// Purpose.
    pub purpose: Option<String>,
    /// Trace id.
    pub trace_id: Option<String>,
    /// Non-secret detail.
    pub detail: Map<String, Value>,
}

impl AuditRecord {
    /// A record with action, requester and decision.
    pub fn new(action: &str, requester: &str, decision: &str) -> Self {
        Self { action: action.into(), requester: requester.into(), decision: decision.into(), ..Default::default() }
    }
    /// Set a detail field.
    pub fn with(mut self, k: &str, v: impl Into<Value>) -> Self {
        self.detail.insert(k.into(), v.into());
        self
    }
    /// Set the key.
    pub fn key(mut self, k: &str) -> Self {
        self.key = Some(k.into());
        self
    }
    /// Set the service.
    pub fn service(mut self, s: &str) -> Self {
        self.service = Some(s.into());
        self
    }
    /// Set the lease id.
    pub fn lease(mut self, l: &str) -> Self {
        self.lease_id = Some(l.into());
        self
    }
    /// Set the deciding policy.
    pub fn policy(mut self, p: Option<&str>) -> Self {
        self.policy = p.map(Into::into);
        self
    }
    /// Set purpose and trace id from a request context.
    pub fn context(mut self, purpose: Option<&str>, trace_id: Option<&str>) -> Self {
        self.purpose = purpose.map(|p| p.chars().take(512).collect());
        self.trace_id = trace_id.map(|t| t.chars().take(128).collect());
        self
    }
    /// Replace action and decision (to turn a template into a concrete event).
    pub fn event(mut self, action: &str, decision: &str) -> Self {
        self.action = action.into();
        self.decision = decision.into();
        self
    }
}

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The entry could not be made durable.
    #[error("audit log write failed: {0}")]
    Write(String),
    /// Storage failed while reading.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for AuditError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(e.into())
    }
}

/// Why an entry (with its lease mutation, if any) was not committed.
#[derive(Debug)]
pub enum AppendError {
    /// The lease mutation was refused (e.g. the lease had already ended) or failed in storage;
    /// neither it nor its audit entry was written.
    Lease(LeaseError),
    /// The audit entry could not be made durable; the lease mutation was rolled back with it.
    Audit(AuditError),
}

type Ack = Result<(i64, Option<LeaseOutcome>), AppendError>;
/// One item's result inside the writer: its sequence number and lease outcome, or the refusal
/// of its lease mutation.
type ItemResult = Result<(i64, Option<LeaseOutcome>), LeaseError>;
/// Each item's lease mutation result before the entries are chained.
type OpResults = Vec<Result<Option<LeaseOutcome>, LeaseError>>;

struct Req {
    rec: AuditRecord,
    ts: i64,
    op: Option<LeaseOp>,
    done: oneshot::Sender<Ack>,
}

/// A failed batch transaction: the message, and the item whose lease mutation failed in
/// storage (if that was the cause).
struct BatchFail {
    msg: String,
    culprit: Option<(usize, LeaseError)>,
    /// The entries collided with existing sequence numbers while the writer trusted the head it
    /// remembered: another process appended since. The batch is redone with the head re-read.
    stale_head: bool,
    /// The connection itself failed (not a statement refused by the database): drop it.
    broken: bool,
}

impl From<sqlx::Error> for BatchFail {
    fn from(e: sqlx::Error) -> Self {
        let broken = !matches!(e, sqlx::Error::Database(_));
        Self { msg: e.to_string(), culprit: None, stale_head: false, broken }
    }
}

/// The failure of the statement that inserts the entries; a primary-key collision there means
/// the remembered head (`cached`) was stale.
fn insert_fail(e: sqlx::Error, cached: bool) -> BatchFail {
    let collided = matches!(&e, sqlx::Error::Database(d) if d.kind() == sqlx::error::ErrorKind::UniqueViolation);
    BatchFail { stale_head: cached && collided, ..BatchFail::from(e) }
}

/// Handle on the group-commit writer. Cloning shares the writer.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Req>,
    stats: std::sync::Arc<Stats>,
    /// On a SQLite file: what an append needs to commit itself when it is the only one in
    /// flight.
    inline: Option<std::sync::Arc<Inline>>,
}

/// What [`AuditLog::append_inline`] did. (Returned once and matched at once, never stored, so
/// the size difference between the variants costs nothing worth a box.)
#[allow(clippy::large_enum_variant)]
enum Inlined {
    /// Committed (or, unreachably, lost): the caller's answer.
    Done(Result<i64, AuditError>),
    /// Not attempted, or rolled back: the entry goes to the writer.
    Declined(AuditRecord),
}

/// See [`AuditLog::append`].
struct Inline {
    lane: std::sync::Arc<std::sync::Mutex<Lane>>,
    key: Key32,
    store: Store,
}

/// Writer counters.
#[derive(Default)]
struct Stats {
    /// Told of every committed transaction, to fold the WAL in the background (file-backed
    /// SQLite only).
    checkpoints: Option<crate::store::checkpoint::Kicker>,
    batches: std::sync::atomic::AtomicU64,
    entries: std::sync::atomic::AtomicU64,
    /// Batches redone because another process had appended since this writer's last commit.
    redone: std::sync::atomic::AtomicU64,
    /// Batches committed on the writer's own SQLite connection ([`direct`]), inline ones
    /// included.
    direct: std::sync::atomic::AtomicU64,
    /// Entries their callers committed themselves ([`AuditLog::append`]).
    inline: std::sync::atomic::AtomicU64,
    /// Appends (with or without a lease mutation) started and not yet answered.
    in_flight: std::sync::atomic::AtomicUsize,
}

impl Stats {
    /// One committed transaction and its entries (the items whose mutation was not refused).
    fn count(&self, results: &[ItemResult]) {
        use std::sync::atomic::Ordering::Relaxed;
        self.batches.fetch_add(1, Relaxed);
        self.entries.fetch_add(results.iter().filter(|r| r.is_ok()).count() as u64, Relaxed);
        if let Some(k) = &self.checkpoints {
            k.committed();
        }
    }
}

/// Counts an append in [`Stats::in_flight`] for as long as it lives.
struct InFlight<'a>(&'a Stats);

impl<'a> InFlight<'a> {
    /// Count one more; also says whether it is the only one.
    fn enter(stats: &'a Stats) -> (Self, bool) {
        let before = stats.in_flight.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        (Self(stats), before == 0)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Canonical bytes of an entry (what the MAC covers), written into `out` (cleared first).
#[allow(clippy::too_many_arguments)]
fn canonical_into(
    out: &mut Vec<u8>,
    seq: i64,
    ts: i64,
    action: &str,
    requester: &str,
    decision: &str,
    policy: Option<&str>,
    key: Option<&str>,
    service: Option<&str>,
    lease_id: Option<&str>,
    purpose: Option<&str>,
    trace_id: Option<&str>,
    detail: &str,
) {
    out.clear();
    // Serialising strings, integers and options into a Vec cannot fail.
    let _ = serde_json::to_writer(
        &mut *out,
        &("crp-audit-v1", seq, ts, action, requester, decision, policy, key, service, lease_id, purpose, trace_id, detail),
    );
}

fn head_bytes(seq: i64, mac: &[u8]) -> Vec<u8> {
    let mut v = seq.to_be_bytes().to_vec();
    v.extend_from_slice(mac);
    v
}

type Row = (
    i64,
    i64,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    Vec<u8>,
);
const COLS: &str = "seq, ts, action, requester, decision, policy, key, service, lease_id, purpose, trace_id, detail, mac";

fn row_canonical(r: &Row, out: &mut Vec<u8>) {
    canonical_into(
        out,
        r.0,
        r.1,
        &r.2,
        &r.3,
        &r.4,
        r.5.as_deref(),
        r.6.as_deref(),
        r.7.as_deref(),
        r.8.as_deref(),
        r.9.as_deref(),
        r.10.as_deref(),
        &r.11,
    );
}

/// The chain head: the last sequence number and its MAC (`(0, 32 zero bytes)` for an empty log).
#[derive(Clone)]
struct Head {
    seq: i64,
    mac: Vec<u8>,
}

impl Head {
    fn from_row(row: Option<(i64, Vec<u8>)>) -> Self {
        let (seq, mac) = row.unwrap_or((0, vec![0u8; 32]));
        Self { seq, mac }
    }
}

const HEAD_SQL: &str = "SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1";

/// One entry, chained, ready to insert.
struct Entry<'a> {
    seq: i64,
    req: &'a Req,
    detail: String,
    mac: [u8; 32],
}

/// Chain the entries of every item whose mutation was not refused onto `head`. Returns the
/// entries, one result per item, and the new head.
fn chain<'a>(
    key: &Key32,
    head: &Head,
    batch: &'a [Req],
    ops: OpResults,
    scratch: &mut Vec<u8>,
) -> (Vec<Entry<'a>>, Vec<ItemResult>, Head) {
    let mut seq = head.seq;
    let mut prev: &[u8] = &head.mac;
    let mut entries: Vec<Entry<'a>> = Vec::with_capacity(batch.len());
    let mut out = Vec::with_capacity(batch.len());
    for (r, res) in batch.iter().zip(ops) {
        let outcome = match res {
            Ok(o) => o,
            Err(e) => {
                out.push(Err(e));
                continue;
            }
        };
        seq += 1;
        let rec = &r.rec;
        let detail = serde_json::to_string(&rec.detail).unwrap_or_else(|_| "{}".into());
        canonical_into(
            scratch,
            seq,
            r.ts,
            &rec.action,
            &rec.requester,
            &rec.decision,
            rec.policy.as_deref(),
            rec.key.as_deref(),
            rec.service.as_deref(),
            rec.lease_id.as_deref(),
            rec.purpose.as_deref(),
            rec.trace_id.as_deref(),
            &detail,
        );
        let mac = hmac_sha256(key.bytes(), &[prev, scratch]);
        entries.push(Entry { seq, req: r, detail, mac });
        prev = &entries[entries.len() - 1].mac;
        out.push(Ok((seq, outcome)));
    }
    let new_head = Head { seq, mac: prev.to_vec() };
    (entries, out, new_head)
}

/// Run each item's lease mutation (in queue order) on `c`, inside the caller's transaction.
/// New root leases go in one multi-row statement. They can go first: no other op in the batch
/// can name them, since their ids reach clients only after the commit.
async fn run_ops<C: LeaseConn>(c: &mut C, batch: &[Req]) -> Result<OpResults, BatchFail> {
    let mut results: OpResults = Vec::with_capacity(batch.len());
    if batch.iter().all(|r| r.op.is_none()) {
        results.resize_with(batch.len(), || Ok(None));
        return Ok(results);
    }
    let roots: Vec<&LeaseRecord> = batch
        .iter()
        .filter_map(|r| match &r.op {
            Some(LeaseOp::InsertRoot(rec)) => Some(rec),
            _ => None,
        })
        .collect();
    if !roots.is_empty()
        && let Err(e) = c.insert_roots(&roots).await
    {
        // Which item is at fault is only known when items are retried one by one.
        let culprit = if batch.len() == 1 { Some((0, e)) } else { None };
        return Err(BatchFail { msg: "lease insert failed".into(), culprit, stale_head: false, broken: false });
    }
    // Releases in one go when nothing else in the batch can see their order: with no
    // delegation in the batch, a release touches no lease another op names (new roots are
    // unknown to clients until the commit), and releases of the same lease are resolved in
    // queue order by `release_many`.
    let releases: Vec<(usize, &str, i64)> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match &r.op {
            Some(LeaseOp::Release { id, now }) => Some((i, id.as_str(), *now)),
            _ => None,
        })
        .collect();
    let has_child = batch.iter().any(|r| matches!(r.op, Some(LeaseOp::InsertChild { .. })));
    let mut released: Vec<Option<Result<LeaseOutcome, LeaseError>>> = Vec::new();
    if releases.len() >= 2 && !has_child {
        let pairs: Vec<(&str, i64)> = releases.iter().map(|(_, id, now)| (*id, *now)).collect();
        let outcomes = c.release_many(&pairs).await.map_err(|e| BatchFail {
            msg: e.to_string(),
            // Which release failed is only known when items are retried one by one.
            culprit: None,
            stale_head: false,
            broken: false,
        })?;
        released.resize_with(batch.len(), || None);
        for ((i, _, _), o) in releases.iter().zip(outcomes) {
            released[*i] = Some(o);
        }
    }
    for (i, r) in batch.iter().enumerate() {
        if let Some(done) = released.get_mut(i).and_then(Option::take) {
            results.push(done.map(Some));
            continue;
        }
        match &r.op {
            None => results.push(Ok(None)),
            Some(LeaseOp::InsertRoot(rec)) => results.push(Ok(Some(LeaseOutcome::Inserted(rec.clone())))),
            Some(op) => match c.apply_op(op).await {
                Ok(o) => results.push(Ok(Some(o))),
                Err(LeaseError::Store(e)) => {
                    return Err(BatchFail {
                        msg: e.to_string(),
                        culprit: Some((i, LeaseError::Store(e))),
                        stale_head: false,
                        broken: false,
                    });
                }
                Err(e) => results.push(Err(e)),
            },
        }
    }
    Ok(results)
}

/// Most entries one writer batch takes from the queue.
const MAX_BATCH: usize = 256;
/// Columns of an `audit` row, in the order [`bind_sqlite_rows`] binds them.
const AUDIT_COLUMNS: &str = "seq, ts, action, requester, decision, policy, key, service, lease_id, purpose, trace_id, detail, mac";
const AUDIT_COLUMN_COUNT: usize = 13;

/// SQLite statement texts for one batch: insert `rows` entries, store the head, commit;
/// with or without the opening `BEGIN IMMEDIATE`.
struct SqliteInsert {
    rows: usize,
    /// The entries' `INSERT` alone (the writer's own connection runs the statements one by one).
    insert: String,
    one_shot: String,
    after_begin: String,
}

/// SQLite: store the chain head (its one parameter).
const SQLITE_HEAD_UPSERT: &str =
    "INSERT INTO meta (name, value) VALUES ('audit_head', ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value";

/// The insert texts, one per power-of-two batch size up to [`MAX_BATCH`]. The rows are bound
/// parameters in a `VALUES` list, then the head; a smaller batch uses the next size up and
/// binds NULL rows, which `WHERE column1 IS NOT NULL` drops. So the writer's connection keeps
/// 18 texts prepared whatever the batch sizes are. The parameters are anonymous (`?`), bound
/// in order: naming or numbering them (`$N`) makes each bind look its name up in a list that
/// SQLite scans from the start, quadratic in the parameter count (half the writer thread's
/// time at 64 proxy connections). The previous form, the rows as one JSON array through
/// `json_each` and `value->>N`, spent ~3 µs more per row parsing JSON.
fn sqlite_inserts() -> &'static [SqliteInsert] {
    static TEXTS: std::sync::OnceLock<Vec<SqliteInsert>> = std::sync::OnceLock::new();
    TEXTS.get_or_init(|| {
        let mut sizes = vec![1usize];
        while sizes[sizes.len() - 1] < MAX_BATCH {
            sizes.push(sizes[sizes.len() - 1] * 2);
        }
        let row = format!("({})", vec!["?"; AUDIT_COLUMN_COUNT].join(", "));
        let columns: Vec<String> = (1..=AUDIT_COLUMN_COUNT).map(|c| format!("column{c}")).collect();
        let columns = columns.join(", ");
        sizes
            .into_iter()
            .map(|rows| {
                let values = vec![row.as_str(); rows].join(", ");
                let insert =
                    format!("INSERT INTO audit ({AUDIT_COLUMNS}) SELECT {columns} FROM (VALUES {values}) WHERE column1 IS NOT NULL");
                let after_begin = format!("{insert}; {SQLITE_HEAD_UPSERT}; COMMIT");
                SqliteInsert { rows, one_shot: format!("BEGIN IMMEDIATE; {after_begin}"), insert, after_begin }
            })
            .collect()
    })
}

/// The insert of `entries` with the new head, bound and ready to run: [`sqlite_inserts`]' text
/// for the next size up, `one_shot` choosing the text that opens the transaction too. More than
/// [`MAX_BATCH`] entries (which the writer never takes at once) is an error, not a truncation:
/// surplus arguments would be ignored, and the head would name entries never written.
fn bind_sqlite_rows<'q>(
    entries: &'q [Entry<'q>],
    head: &Head,
    one_shot: bool,
) -> Result<sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>, BatchFail> {
    let Some(text) = sqlite_inserts().iter().find(|t| t.rows >= entries.len()) else {
        return Err(BatchFail { msg: format!("audit batch of {} entries exceeds {MAX_BATCH}", entries.len()), culprit: None, stale_head: false, broken: false });
    };
    let sql = if one_shot { text.one_shot.as_str() } else { text.after_begin.as_str() };
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for e in entries {
        let r = &e.req.rec;
        q = q
            .bind(e.seq)
            .bind(e.req.ts)
            .bind(r.action.as_str())
            .bind(r.requester.as_str())
            .bind(r.decision.as_str())
            .bind(r.policy.as_deref())
            .bind(r.key.as_deref())
            .bind(r.service.as_deref())
            .bind(r.lease_id.as_deref())
            .bind(r.purpose.as_deref())
            .bind(r.trace_id.as_deref())
            .bind(e.detail.as_str())
            .bind(&e.mac[..]);
    }
    for _ in entries.len()..text.rows {
        for _ in 0..AUDIT_COLUMN_COUNT {
            q = q.bind(None::<i64>);
        }
    }
    Ok(q.bind(head_bytes(head.seq, &head.mac)))
}

const SQLITE_BEGIN_HEAD: &str = "BEGIN IMMEDIATE; SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1";

/// PostgreSQL: insert the entries (one array per column, so one statement text serves every
/// batch size) and store the head, in one statement.
const PG_INSERT: &str = "WITH ins AS (INSERT INTO audit (seq, ts, action, requester, decision, policy, key, service, lease_id, purpose, trace_id, detail, mac) \
     SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], \
     $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::bytea[])) \
     INSERT INTO meta (name, value) VALUES ('audit_head', $14) ON CONFLICT (name) DO UPDATE SET value = excluded.value";
/// PostgreSQL: open the transaction and serialise the chain across processes, in one round trip.
const PG_BEGIN: &str = "BEGIN; SELECT pg_advisory_xact_lock(770002)";
const PG_BEGIN_NO_FSYNC: &str = "BEGIN; SET LOCAL synchronous_commit = off; SELECT pg_advisory_xact_lock(770002)";

/// One batch transaction on SQLite. `head` is the remembered chain head, if any (trusted; a
/// collision reports [`BatchFail::stale_head`]). Returns the results and the new head.
async fn batch_sqlite(
    c: &mut sqlx::SqliteConnection,
    key: &Key32,
    head: Option<&Head>,
    batch: &[Req],
    scratch: &mut Vec<u8>,
) -> Result<(Vec<ItemResult>, Head), BatchFail> {
    if let Some(h) = head
        && batch.iter().all(|r| r.op.is_none())
    {
        let ops: OpResults = batch.iter().map(|_| Ok(None)).collect();
        let (entries, out, new_head) = chain(key, h, batch, ops, scratch);
        bind_sqlite_rows(&entries, &new_head, true)?
            .execute(&mut *c)
            .await
            .map_err(|e| insert_fail(e, true))?;
        return Ok((out, new_head));
    }
    let start = match head {
        Some(h) => {
            sqlx::query("BEGIN IMMEDIATE").execute(&mut *c).await?;
            h.clone()
        }
        None => Head::from_row(sqlx::query_as(SQLITE_BEGIN_HEAD).fetch_optional(&mut *c).await?),
    };
    let ops = run_ops(c, batch).await?;
    let (entries, out, new_head) = chain(key, &start, batch, ops, scratch);
    if entries.is_empty() {
        sqlx::query("COMMIT").execute(&mut *c).await?;
    } else {
        bind_sqlite_rows(&entries, &new_head, false)?
            .execute(&mut *c)
            .await
            .map_err(|e| insert_fail(e, head.is_some()))?;
    }
    Ok((out, new_head))
}

/// One batch transaction on PostgreSQL (see [`batch_sqlite`]).
async fn batch_pg(
    c: &mut sqlx::PgConnection,
    key: &Key32,
    head: Option<&Head>,
    durability: Durability,
    batch: &[Req],
    scratch: &mut Vec<u8>,
) -> Result<(Vec<ItemResult>, Head), BatchFail> {
    let begin = match durability {
        Durability::Fsync => PG_BEGIN,
        Durability::Os => PG_BEGIN_NO_FSYNC,
    };
    sqlx::raw_sql(begin).execute(&mut *c).await?;
    let start = match head {
        Some(h) => h.clone(),
        None => Head::from_row(sqlx::query_as(HEAD_SQL).fetch_optional(&mut *c).await?),
    };
    let ops = run_ops(c, batch).await?;
    let (entries, out, new_head) = chain(key, &start, batch, ops, scratch);
    if !entries.is_empty() {
        let n = entries.len();
        let mut seq = Vec::with_capacity(n);
        let mut ts = Vec::with_capacity(n);
        let mut action = Vec::with_capacity(n);
        let mut requester = Vec::with_capacity(n);
        let mut decision = Vec::with_capacity(n);
        let mut policy = Vec::with_capacity(n);
        let mut rkey = Vec::with_capacity(n);
        let mut service = Vec::with_capacity(n);
        let mut lease_id = Vec::with_capacity(n);
        let mut purpose = Vec::with_capacity(n);
        let mut trace_id = Vec::with_capacity(n);
        let mut detail = Vec::with_capacity(n);
        let mut mac = Vec::with_capacity(n);
        for e in &entries {
            let r = &e.req.rec;
            seq.push(e.seq);
            ts.push(e.req.ts);
            action.push(r.action.as_str());
            requester.push(r.requester.as_str());
            decision.push(r.decision.as_str());
            policy.push(r.policy.as_deref());
            rkey.push(r.key.as_deref());
            service.push(r.service.as_deref());
            lease_id.push(r.lease_id.as_deref());
            purpose.push(r.purpose.as_deref());
            trace_id.push(r.trace_id.as_deref());
            detail.push(e.detail.as_str());
            mac.push(&e.mac[..]);
        }
        sqlx::query(PG_INSERT)
            .bind(&seq)
            .bind(&ts)
            .bind(&action)
            .bind(&requester)
            .bind(&decision)
            .bind(&policy)
            .bind(&rkey)
            .bind(&service)
            .bind(&lease_id)
            .bind(&purpose)
            .bind(&trace_id)
            .bind(&detail)
            .bind(&mac)
            .bind(head_bytes(new_head.seq, &new_head.mac))
            .execute(&mut *c)
            .await
            .map_err(|e| insert_fail(e, head.is_some()))?;
    }
    sqlx::raw_sql("COMMIT").execute(&mut *c).await?;
    Ok((out, new_head))
}

/// The writer's own connection, held across batches (no pool checkout, no liveness ping per
/// batch); given back when the pool closes, replaced after a connection failure.
/// What both the writer and an inline append ([`AuditLog::append`]) need to commit entries on
/// the writer's own connection. Whoever holds the lock may commit; the writer's sqlx path takes
/// the head out for the length of its transaction, so nobody else commits meanwhile.
struct Lane {
    /// The chain head as of this process's last commit. Trusted for the next batch (no read);
    /// if another process appended meanwhile, the next insert collides on `seq`, the batch is
    /// rolled back and redone once with the head read inside the transaction (under the write
    /// lock, so the redo cannot collide again). Forgotten after any failure.
    head: Option<Head>,
    /// The writer's own SQLite connection for batches without lease mutations ([`direct`]),
    /// opened by the writer on first use.
    direct: Option<direct::Direct>,
    scratch: Vec<u8>,
}

/// Lock the lane. A panic while it was held (none is expected) leaves the head and the
/// connection in an unknown state: both are dropped, so the next batch reads the head again.
fn lock_lane(lane: &std::sync::Mutex<Lane>) -> std::sync::MutexGuard<'_, Lane> {
    lane.lock().unwrap_or_else(|poisoned| {
        lane.clear_poison();
        let mut g = poisoned.into_inner();
        g.head = None;
        g.direct = None;
        g
    })
}

impl Lane {
    /// Commit `batch` (no lease mutations) on the own connection, from the remembered head;
    /// `wait`: whether to wait for another connection's write lock ([`direct::Direct::append`]).
    /// `None` when there is no head or no connection: the batch must go through sqlx.
    fn commit(&mut self, key: &Key32, batch: &[Req], stats: &Stats, wait: bool) -> Option<Result<Vec<ItemResult>, BatchFail>> {
        if self.head.is_none() || self.direct.is_none() {
            return None;
        }
        let head = self.head.take()?;
        let ops: OpResults = batch.iter().map(|_| Ok(None)).collect();
        let (entries, out, new_head) = chain(key, &head, batch, ops, &mut self.scratch);
        let d = self.direct.as_mut()?;
        Some(match d.append(&entries, &new_head, wait) {
            Ok(()) => {
                stats.direct.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.head = Some(new_head);
                Ok(out)
            }
            Err(f) => {
                if f.broken {
                    self.direct = None;
                }
                Err(f)
            }
        })
    }
}

enum Conn {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

/// The state of the writer task.
struct Writer {
    store: Store,
    key: Key32,
    durability: Durability,
    stats: std::sync::Arc<Stats>,
    conn: Option<Conn>,
    /// The chain head and the writer's own connection, shared with [`AuditLog`]'s inline
    /// appends.
    lane: std::sync::Arc<std::sync::Mutex<Lane>>,
    scratch: Vec<u8>,
    /// The vault's change stamps: after a transaction that released leases, the writer bumps
    /// [`Domain::Leases`] once, before any caller hears the result (so a released lease's
    /// grant is gone from every process's cache when the release is acknowledged).
    epochs: Epochs,
    /// Where the writer opens its own connection ([`Lane::direct`]): the store's file; `None`
    /// on PostgreSQL and in-memory SQLite, or after the connection could not be opened (the
    /// sqlx connection then takes every batch).
    direct_path: Option<std::path::PathBuf>,
    /// Whether the writer runs on a thread of its own (see [`Writer::gather`]).
    own_thread: bool,
}

/// Whether any of `items` ends a lease (its commit must bump [`Domain::Leases`]).
fn ends_leases<'a>(items: impl IntoIterator<Item = &'a Req>) -> bool {
    items.into_iter().any(|r| matches!(r.op, Some(LeaseOp::Release { .. })))
}

impl Writer {
    fn pool_closed(&self) -> bool {
        with_pool!(&self.store, |p| p.is_closed())
    }

    async fn connect(&self) -> Result<Conn, sqlx::Error> {
        Ok(match &self.store {
            Store::Sqlite(p) => {
                let mut c = p.acquire().await?.detach();
                if self.durability == Durability::Os {
                    // WAL mode (set on every connection of the store): a commit is appended to
                    // the WAL without waiting for the flush; checkpoints still fsync.
                    sqlx::query("PRAGMA synchronous = NORMAL").execute(&mut c).await?;
                }
                Conn::Sqlite(c)
            }
            Store::Postgres(p) => Conn::Postgres(p.acquire().await?.detach()),
        })
    }

    /// One attempt at the batch transaction.
    async fn attempt(&mut self, batch: &[Req]) -> Result<Vec<ItemResult>, BatchFail> {
        if self.pool_closed() {
            self.conn = None;
            lock_lane(&self.lane).direct = None;
        }
        if let Some(done) = self.attempt_direct(batch) {
            return done;
        }
        if self.conn.is_none() {
            self.conn = Some(self.connect().await?);
        }
        let head = lock_lane(&self.lane).head.take();
        let Writer { conn, key, durability, scratch, .. } = self;
        let res = match conn {
            Some(Conn::Sqlite(c)) => batch_sqlite(c, key, head.as_ref(), batch, scratch).await,
            Some(Conn::Postgres(c)) => batch_pg(c, key, head.as_ref(), *durability, batch, scratch).await,
            None => Err(BatchFail { msg: "audit writer has no connection".into(), culprit: None, stale_head: false, broken: true }),
        };
        match res {
            Ok((out, h)) => {
                lock_lane(&self.lane).head = Some(h);
                Ok(out)
            }
            Err(f) => {
                self.abandon(f.broken).await;
                Err(f)
            }
        }
    }

    /// The batch on the writer's own connection ([`direct`]), when it can go there: no lease
    /// mutation, a remembered head, a file-backed SQLite store. `None`: it goes to the sqlx
    /// connection. A failure forgets the head (as on the sqlx path), so the next batch reads it.
    fn attempt_direct(&mut self, batch: &[Req]) -> Option<Result<Vec<ItemResult>, BatchFail>> {
        if batch.iter().any(|r| r.op.is_some()) {
            return None;
        }
        let mut lane = lock_lane(&self.lane);
        lane.head.as_ref()?;
        if lane.direct.is_none() {
            let path = self.direct_path.as_ref()?;
            match direct::Direct::open(path, self.durability) {
                Ok(d) => lane.direct = Some(d),
                Err(e) => {
                    tracing::warn!(target: "crp_provider::audit", "audit writer keeps to the pooled connection: cannot open its own ({e})");
                    self.direct_path = None;
                    return None;
                }
            }
        }
        lane.commit(&self.key, batch, &self.stats, true)
    }

    /// After a failure: roll back whatever is open; drop the connection if it is broken or the
    /// rollback fails (closing it rolls back too), so the next batch starts clean.
    async fn abandon(&mut self, broken: bool) {
        let ok = match (&mut self.conn, broken) {
            (Some(Conn::Sqlite(c)), false) => sqlx::raw_sql("ROLLBACK").execute(c).await.is_ok(),
            (Some(Conn::Postgres(c)), false) => sqlx::raw_sql("ROLLBACK").execute(c).await.is_ok(),
            _ => false,
        };
        if !ok {
            self.conn = None;
        }
    }

    /// Write `batch` in one transaction (redone once if another process had appended since
    /// this writer's last commit). First each item's lease mutation (in queue order), then the
    /// audit entries of every item whose mutation was not refused, chained, then the head.
    /// Returns one result per item: `Ok((seq, outcome))`, or `Err` for a refused mutation
    /// (that item gets no entry). A storage error anywhere rolls the whole batch back.
    async fn write_batch(&mut self, batch: &[Req]) -> Result<Vec<ItemResult>, BatchFail> {
        match self.attempt(batch).await {
            Err(f) if f.stale_head => {
                self.stats.redone.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.attempt(batch).await
            }
            r => r,
        }
    }

    /// Commit `buf` and acknowledge every caller. One transaction for the whole batch; if it
    /// fails, each item is retried alone (its own transaction), so one bad item cannot fail its
    /// neighbours and each caller gets its own result.
    async fn commit_and_ack(&mut self, buf: &mut Vec<Req>) {
        // Bumped whatever the outcome (a failed or partial release only flushes caches): one
        // stamp write per transaction instead of one per release.
        let bump = |w: &Self, items: &[Req]| {
            if ends_leases(items) {
                w.epochs.bump(Domain::Leases);
            }
        };
        match self.write_batch(buf).await {
            Ok(results) => {
                self.stats.count(&results);
                bump(self, buf);
                for (r, res) in buf.drain(..).zip(results) {
                    let _ = r.done.send(res.map_err(AppendError::Lease));
                }
            }
            Err(first) if buf.len() == 1 => {
                bump(self, buf);
                let r = buf.remove(0);
                let _ = r.done.send(Err(fail_to_error(first)));
            }
            Err(_) => {
                for r in buf.drain(..) {
                    let one = std::slice::from_ref(&r);
                    let ack = match self.write_batch(one).await {
                        Ok(mut results) => {
                            self.stats.count(&results);
                            match results.pop() {
                                Some(res) => res.map_err(AppendError::Lease),
                                None => Err(AppendError::Audit(AuditError::Write("audit writer lost an entry".into()))),
                            }
                        }
                        Err(f) => Err(fail_to_error(f)),
                    };
                    bump(self, one);
                    let _ = r.done.send(ack);
                }
            }
        }
    }

    /// Serve batches until every [`AuditLog`] handle is gone. While idle, a closing pool takes
    /// the writer's connection back at once (so `Store::close` is not held up).
    /// On its own thread the writer wakes at the first item queued, where a writer task would
    /// run only once the runtime's workers had run their other ready tasks, which by then had
    /// queued theirs. Lease mutations go through sqlx and cost a transaction of their own, so
    /// before committing a batch that has any, let the workers run once (a task spawned now
    /// runs after the ones already waiting) and take what they queued meanwhile.
    async fn gather(&self, rx: &mut mpsc::Receiver<Req>, buf: &mut Vec<Req>) {
        let _ = tokio::spawn(async {}).await;
        while buf.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(req) => buf.push(req),
                Err(_) => break,
            }
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Req>) {
        let mut buf: Vec<Req> = Vec::with_capacity(MAX_BATCH);
        loop {
            let n = if self.conn.is_some() {
                let closed = with_pool!(&self.store, |p| p.close_event());
                tokio::select! {
                    n = rx.recv_many(&mut buf, MAX_BATCH) => n,
                    () = closed => {
                        self.conn = None;
                        lock_lane(&self.lane).direct = None;
                        continue;
                    }
                }
            } else {
                rx.recv_many(&mut buf, MAX_BATCH).await
            };
            if n == 0 {
                break;
            }
            if self.own_thread && buf.iter().any(|r| r.op.is_some()) {
                self.gather(&mut rx, &mut buf).await;
            }
            self.commit_and_ack(&mut buf).await;
        }
    }
}

/// Run the writer on a thread of its own, so that it can execute SQLite statements there
/// ([`direct`]); its futures (the queue, the sqlx connection) run on that thread under the
/// current runtime's handle. The returned task ends when the thread does. If no thread can be
/// started, the writer runs as a task (every batch then goes through sqlx).
fn spawn_on_thread(writer: Writer, rx: mpsc::Receiver<Req>) -> tokio::task::JoinHandle<()> {
    let rt = tokio::runtime::Handle::current();
    let slot = std::sync::Arc::new(std::sync::Mutex::new(Some((writer, rx))));
    let (exited, on_exit) = oneshot::channel::<()>();
    let taken = slot.clone();
    let spawned = std::thread::Builder::new().name("crp-audit-writer".into()).spawn(move || {
        let parts = taken.lock().ok().and_then(|mut g| g.take());
        if let Some((writer, rx)) = parts {
            rt.block_on(writer.run(rx));
        }
        let _ = exited.send(());
    });
    match spawned {
        Ok(_) => tokio::spawn(async move {
            let _ = on_exit.await;
        }),
        Err(e) => {
            tracing::warn!(target: "crp_provider::audit", "audit writer runs as a task: cannot start its thread ({e})");
            match slot.lock().ok().and_then(|mut g| g.take()) {
                Some((mut writer, rx)) => {
                    writer.direct_path = None;
                    writer.own_thread = false;
                    tokio::spawn(writer.run(rx))
                }
                None => tokio::spawn(async {}),
            }
        }
    }
}

fn fail_to_error(f: BatchFail) -> AppendError {
    match f.culprit {
        Some((_, e)) => AppendError::Lease(e),
        None => AppendError::Audit(AuditError::Write(f.msg)),
    }
}

impl AuditLog {
    /// Start the writer task on the current Tokio runtime, with the default durability
    /// ([`Durability::Fsync`]).
    pub fn start(store: Store, key: Key32) -> (Self, tokio::task::JoinHandle<()>) {
        Self::start_with(store, key, Durability::Fsync, Epochs::disabled())
    }

    /// Start the writer task with the given `[audit] durability`, bumping `epochs` after each
    /// transaction that released leases.
    pub fn start_with(store: Store, key: Key32, durability: Durability, epochs: Epochs) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel::<Req>(4096);
        let direct_path = store.sqlite_path();
        let checkpoints = direct_path.as_deref().and_then(|p| match crate::store::checkpoint::Kicker::start(p) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(target: "crp_provider::audit", "no background WAL checkpoints ({e}); commits fold the WAL themselves");
                None
            }
        });
        let stats = std::sync::Arc::new(Stats { checkpoints, ..Stats::default() });
        let on_thread = direct_path.is_some();
        let lane = std::sync::Arc::new(std::sync::Mutex::new(Lane { head: None, direct: None, scratch: Vec::with_capacity(512) }));
        let inline = on_thread.then(|| std::sync::Arc::new(Inline { lane: lane.clone(), key: key.clone(), store: store.clone() }));
        let writer = Writer {
            store,
            key,
            durability,
            stats: stats.clone(),
            conn: None,
            lane,
            scratch: Vec::with_capacity(512),
            epochs,
            direct_path,
            own_thread: on_thread,
        };
        let handle = if on_thread { spawn_on_thread(writer, rx) } else { tokio::spawn(writer.run(rx)) };
        (Self { tx, stats, inline }, handle)
    }

    /// Batches this process's writer redid because another process had appended to the chain
    /// since its previous commit.
    pub fn redone_batches(&self) -> u64 {
        self.stats.redone.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Batches this process's writer committed on its own SQLite connection, without a lease
    /// mutation (see the module's notes); always 0 on PostgreSQL and in-memory SQLite.
    pub fn direct_batches(&self) -> u64 {
        self.stats.direct.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Entries whose callers committed them themselves, being the only append in flight (see
    /// [`AuditLog::append`]); always 0 on PostgreSQL and in-memory SQLite.
    pub fn inline_commits(&self) -> u64 {
        self.stats.inline.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// (transactions committed, entries written) by this process's writer since start.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.stats.batches.load(std::sync::atomic::Ordering::Relaxed),
            self.stats.entries.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Background WAL checkpoints completed so far ([`crate::store::checkpoint`]); `None`
    /// when none run (PostgreSQL, in-memory SQLite).
    pub fn background_checkpoints(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.stats.checkpoints.as_ref().map(|k| k.completed())
    }

    /// Entries queued for the writer and not yet taken (for metrics).
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    async fn submit(&self, rec: AuditRecord, op: Option<LeaseOp>) -> Ack {
        let _counted = InFlight::enter(&self.stats);
        self.send(rec, op).await
    }

    async fn send(&self, rec: AuditRecord, op: Option<LeaseOp>) -> Ack {
        let (done, wait) = oneshot::channel();
        let stopped = || AppendError::Audit(AuditError::Write("audit writer stopped".into()));
        self.tx.send(Req { rec, ts: now_ms(), op, done }).await.map_err(|_| stopped())?;
        wait.await.map_err(|_| stopped())?
    }

    /// Append an entry and wait until it is durable. Returns its sequence number.
    ///
    /// On a SQLite file, an append that is the only one in flight (nothing queued, no commit
    /// running, no other caller waiting) commits its entry itself, on the writer's own
    /// connection (the writer's lock keeps the chain in order): a lone request then costs no
    /// hand-off to the writer's thread and back, which was about half the CPU of a one-entry
    /// commit. With company it goes through the writer, whose batches share one commit (an
    /// inline commit would hold the others up for its own fsync). So does an entry whose inline
    /// commit failed (rolled back), or found the database locked by another process (a runtime
    /// worker does not wait for that; the writer's thread does).
    pub async fn append(&self, rec: AuditRecord) -> Result<i64, AuditError> {
        let (_counted, alone) = InFlight::enter(&self.stats);
        let rec = if alone {
            match self.append_inline(rec) {
                Inlined::Done(result) => return result,
                Inlined::Declined(rec) => rec,
            }
        } else {
            rec
        };
        match self.send(rec, None).await {
            Ok((seq, _)) => Ok(seq),
            Err(AppendError::Audit(e)) => Err(e),
            // Unreachable without an op; reported as a write failure all the same.
            Err(AppendError::Lease(e)) => Err(AuditError::Write(e.to_string())),
        }
    }

    /// Commit `rec` here, on the caller's thread (see [`AuditLog::append`]); if the writer's
    /// lane is busy or not ready, or the commit fails, hand it back.
    fn append_inline(&self, rec: AuditRecord) -> Inlined {
        let Some(inline) = &self.inline else {
            return Inlined::Declined(rec);
        };
        if self.queue_depth() > 0 || with_pool!(&inline.store, |p| p.is_closed()) {
            return Inlined::Declined(rec);
        }
        let Ok(mut lane) = inline.lane.try_lock() else {
            return Inlined::Declined(rec);
        };
        let (done, _) = oneshot::channel();
        let batch = [Req { rec, ts: now_ms(), op: None, done }];
        let committed = lane.commit(&inline.key, &batch, &self.stats, false);
        drop(lane);
        let [req] = batch;
        match committed {
            Some(Ok(mut results)) => {
                self.stats.count(&results);
                self.stats.inline.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Inlined::Done(match results.pop() {
                    Some(Ok((seq, _))) => Ok(seq),
                    // Unreachable: an entry without a lease mutation is never refused.
                    _ => Err(AuditError::Write("audit writer lost an entry".into())),
                })
            }
            // The commit failed and was rolled back, the head forgotten: the writer takes the
            // entry and reads the head again (after another process's append, that is a redo).
            Some(Err(f)) => {
                if f.stale_head {
                    self.stats.redone.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Inlined::Declined(req.rec)
            }
            // No head or connection yet: the writer's first batch reads and opens them.
            None => Inlined::Declined(req.rec),
        }
    }

    /// Run the lease mutation `op` and append `rec` in the same group-committed transaction:
    /// both are durable together or neither is (no lease change without its audit entry).
    /// Concurrent callers share the writer's transaction and its fsync. A refused mutation
    /// (lease ended, parent revoked, ...) writes nothing and returns [`AppendError::Lease`].
    pub async fn append_with(&self, rec: AuditRecord, op: LeaseOp) -> Result<(i64, LeaseOutcome), AppendError> {
        match self.submit(rec, Some(op)).await? {
            (seq, Some(o)) => Ok((seq, o)),
            (_, None) => Err(AppendError::Audit(AuditError::Write("audit writer lost a lease outcome".into()))),
        }
    }
}

/// The result of `audit verify`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Entries checked.
    pub entries: u64,
    /// Whether the whole chain is intact.
    pub ok: bool,
    /// What is wrong, first problem first.
    pub problems: Vec<String>,
}

/// Recompute the chain over every entry.
pub async fn verify(store: &Store, key: &Key32) -> Result<VerifyReport, AuditError> {
    let mut problems = Vec::new();
    let mut prev = vec![0u8; 32];
    let mut expected_seq = 1i64;
    let mut after = 0i64;
    let mut entries = 0u64;
    let mut scratch = Vec::with_capacity(512);
    loop {
        let q = sqlx::AssertSqlSafe(format!("SELECT {COLS} FROM audit WHERE seq > $1 ORDER BY seq LIMIT 1000"));
        let rows: Vec<Row> = with_pool!(store, |p| sqlx::query_as(q).bind(after).fetch_all(p).await?);
        if rows.is_empty() {
            break;
        }
        for r in &rows {
            entries += 1;
            if r.0 != expected_seq {
                problems.push(format!(
                    "entry {} follows entry {}: entries {}..{} are missing (deleted)",
                    r.0,
                    expected_seq - 1,
                    expected_seq,
                    r.0 - 1
                ));
            }
            row_canonical(r, &mut scratch);
            let mac = hmac_sha256(key.bytes(), &[&prev, &scratch]);
            if !crate::crypto::ct_eq(&mac, &r.12) {
                problems.push(format!(
                    "entry {}: MAC mismatch (the entry was edited, or an entry before it was deleted or reordered)",
                    r.0
                ));
            }
            // Continue the chain from the stored MAC so one bad entry is reported once.
            prev = r.12.clone();
            expected_seq = r.0 + 1;
            after = r.0;
        }
    }
    if let Some(head) = store.meta_get("audit_head").await? {
        let expect = head_bytes(expected_seq - 1, &prev);
        if head != expect {
            let head_seq = head.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(i64::from_be_bytes).unwrap_or(-1);
            problems.push(format!(
                "chain head records entry {head_seq}, but the log ends at entry {}: entries were removed from the end or rewritten",
                expected_seq - 1
            ));
        }
    } else if entries > 0 {
        problems.push("chain head missing".into());
    }
    Ok(VerifyReport { entries, ok: problems.is_empty(), problems })
}

fn to_event(r: Row) -> AuditEvent {
    let detail: Map<String, Value> = serde_json::from_str(&r.11).unwrap_or_default();
    AuditEvent {
        seq: u64::try_from(r.0).unwrap_or(0),
        action: r.2,
        requester: r.3,
        timestamp: rfc3339(r.1),
        decision: r.4,
        policy: r.5,
        key: r.6,
        service: r.7,
        lease_id: r.8,
        purpose: r.9,
        trace_id: r.10,
        detail,
    }
}

/// Query entries, newest first. `action` matches the event name exactly, or its prefix up to a
/// dot (`credential` matches `credential.*`). Key and requester filters use their indexes;
/// action and time filters are applied newest first along `seq` (schema 3 dropped their indexes
/// to make every append cheaper), which reaches recent entries at once.
pub async fn query(store: &Store, q: &AuditQueryParams) -> Result<Vec<AuditEvent>, AuditError> {
    let limit = i64::from(q.limit.unwrap_or(50).clamp(1, 1000));
    let since = match &q.since {
        Some(s) => Some(parse_rfc3339(s).ok_or_else(|| AuditError::Write(format!("`since` is not RFC 3339: {s}")))?),
        None => None,
    };
    let until = match &q.until {
        Some(s) => Some(parse_rfc3339(s).ok_or_else(|| AuditError::Write(format!("`until` is not RFC 3339: {s}")))?),
        None => None,
    };
    macro_rules! build {
        () => {{
            let mut qb = sqlx::QueryBuilder::new(format!("SELECT {COLS} FROM audit WHERE 1 = 1"));
            if let Some(k) = &q.key {
                qb.push(" AND key = ").push_bind(k.clone());
            }
            if let Some(r) = &q.requester {
                qb.push(" AND requester = ").push_bind(r.clone());
            }
            if let Some(a) = &q.action {
                if a.contains('.') {
                    qb.push(" AND action = ").push_bind(a.clone());
                } else {
                    qb.push(" AND action >= ")
                        .push_bind(format!("{a}."))
                        .push(" AND action < ")
                        .push_bind(format!("{a}/"));
                }
            }
            if let Some(s) = since {
                qb.push(" AND ts >= ").push_bind(s);
            }
            if let Some(u) = until {
                qb.push(" AND ts < ").push_bind(u);
            }
            qb.push(" ORDER BY seq DESC LIMIT ").push_bind(limit);
            qb
        }};
    }
    let rows: Vec<Row> = with_pool!(store, |p| {
        let mut qb = build!();
        qb.build_query_as().fetch_all(p).await?
    });
    Ok(rows.into_iter().map(to_event).collect())
}

/// Number of entries.
pub async fn count(store: &Store) -> Result<i64, AuditError> {
    Ok(with_pool!(store, |p| sqlx::query_scalar("SELECT COUNT(*) FROM audit").fetch_one(p).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One text per power-of-two size up to the batch cap, each with exactly one anonymous
    /// parameter per column of each row plus the head, and no numbered parameter (see
    /// [`sqlite_inserts`] for why).
    #[test]
    fn sqlite_insert_texts_cover_every_batch_size() {
        let texts = sqlite_inserts();
        let sizes: Vec<usize> = texts.iter().map(|t| t.rows).collect();
        assert_eq!(sizes, vec![1, 2, 4, 8, 16, 32, 64, 128, 256]);
        assert_eq!(*sizes.last().unwrap_or(&0), MAX_BATCH);
        for t in texts {
            for sql in [&t.one_shot, &t.after_begin] {
                assert_eq!(sql.matches('?').count(), AUDIT_COLUMN_COUNT * t.rows + 1, "{} rows", t.rows);
                assert!(!sql.contains('$'), "{} rows", t.rows);
            }
            assert!(t.one_shot.starts_with("BEGIN IMMEDIATE; ") && t.one_shot.ends_with(&t.after_begin));
        }
        assert_eq!(AUDIT_COLUMNS.split(", ").count(), AUDIT_COLUMN_COUNT);
    }
}
