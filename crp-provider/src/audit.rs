//! The audit log: append-only, HMAC-chained, durable before the caller is answered.
//!
//! - **Chain.** Entry `n` stores `mac_n = HMAC-SHA256(audit_key, mac_{n-1} || canonical(entry_n))`
//!   with `mac_0` = 32 zero bytes. `canonical` is the JSON array of every column including the
//!   sequence number, so editing, deleting or reordering rows breaks the chain at that point.
//!   The head (last seq and MAC) is also kept in `meta.audit_head`, which catches a truncated
//!   tail. The audit key is random, held sealed by the data key in `meta.audit_key`; without the
//!   vault's passphrase or keyfile nobody can forge an entry.
//! - **Group commit.** Callers hand entries to one writer task over a channel and wait for the
//!   acknowledgement; the writer takes everything queued (up to 256), writes it in one
//!   transaction (`BEGIN IMMEDIATE` on SQLite, an advisory lock on PostgreSQL, so several
//!   processes keep one chain), commits with `synchronous=FULL`, then acknowledges them all.
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
use crate::store::{Engine, Store, StoreError, now_ms, parse_rfc3339, rfc3339, with_pool, with_write_tx};

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
}

impl From<sqlx::Error> for BatchFail {
    fn from(e: sqlx::Error) -> Self {
        Self { msg: e.to_string(), culprit: None }
    }
}

/// Handle on the group-commit writer. Cloning shares the writer.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Req>,
    stats: std::sync::Arc<Stats>,
}

/// Writer counters.
#[derive(Debug, Default)]
struct Stats {
    batches: std::sync::atomic::AtomicU64,
    entries: std::sync::atomic::AtomicU64,
}

/// Canonical bytes of an entry (what the MAC covers).
#[allow(clippy::too_many_arguments)]
fn canonical(
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
) -> Vec<u8> {
    serde_json::to_vec(&(
        "crp-audit-v1",
        seq,
        ts,
        action,
        requester,
        decision,
        policy,
        key,
        service,
        lease_id,
        purpose,
        trace_id,
        detail,
    ))
    .unwrap_or_default()
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

fn row_canonical(r: &Row) -> Vec<u8> {
    canonical(
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
    )
}

/// Write `batch` in one transaction: first each item's lease mutation (in queue order), then
/// the audit entries of every item whose mutation was not refused, chained, then the head.
/// Returns one result per item: `Ok((seq, outcome))`, or `Err` for a refused mutation (that
/// item gets no entry). A storage error anywhere rolls the whole batch back.
async fn write_batch(
    store: &Store,
    key: &Key32,
    batch: &[Req],
) -> Result<Vec<Result<(i64, Option<LeaseOutcome>), LeaseError>>, BatchFail> {
    let lock_pg = store.engine() == Engine::Postgres;
    let out = with_write_tx!(store, |tx| {
        if lock_pg {
            sqlx::query("SELECT pg_advisory_xact_lock(770002)").execute(&mut *tx).await?;
        }
        // Lease mutations first: an entry is only written for a mutation that happened.
        // New root leases go in one multi-row statement. They can go first: no other op in
        // the batch can name them, since their ids reach clients only after the commit.
        let roots: Vec<&LeaseRecord> = batch
            .iter()
            .filter_map(|r| match &r.op {
                Some(LeaseOp::InsertRoot(rec)) => Some(rec),
                _ => None,
            })
            .collect();
        if let Err(e) = LeaseConn::insert_roots(&mut *tx, &roots).await {
            // Which item is at fault is only known when items are retried one by one.
            let culprit = if batch.len() == 1 { Some((0, e)) } else { None };
            return Err(BatchFail { msg: "lease insert failed".into(), culprit });
        }
        let mut results: Vec<Result<Option<LeaseOutcome>, LeaseError>> = Vec::with_capacity(batch.len());
        for (i, r) in batch.iter().enumerate() {
            match &r.op {
                None => results.push(Ok(None)),
                Some(LeaseOp::InsertRoot(rec)) => results.push(Ok(Some(LeaseOutcome::Inserted(rec.clone())))),
                Some(op) => match LeaseConn::apply_op(&mut *tx, op).await {
                    Ok(o) => results.push(Ok(Some(o))),
                    Err(LeaseError::Store(e)) => {
                        return Err(BatchFail { msg: e.to_string(), culprit: Some((i, LeaseError::Store(e))) });
                    }
                    Err(e) => results.push(Err(e)),
                },
            }
        }
        let last: Option<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1").fetch_optional(&mut *tx).await?;
        let (mut seq, mut prev) = last.unwrap_or((0, vec![0u8; 32]));
        let mut rows = Vec::with_capacity(batch.len());
        let mut out = Vec::with_capacity(batch.len());
        for (r, res) in batch.iter().zip(results) {
            let outcome = match res {
                Ok(o) => o,
                Err(e) => {
                    out.push(Err(e));
                    continue;
                }
            };
            seq += 1;
            let detail = serde_json::to_string(&r.rec.detail).unwrap_or_else(|_| "{}".into());
            let c = canonical(
                seq,
                r.ts,
                &r.rec.action,
                &r.rec.requester,
                &r.rec.decision,
                r.rec.policy.as_deref(),
                r.rec.key.as_deref(),
                r.rec.service.as_deref(),
                r.rec.lease_id.as_deref(),
                r.rec.purpose.as_deref(),
                r.rec.trace_id.as_deref(),
                &detail,
            );
            let mac = hmac_sha256(key.bytes(), &[&prev, &c]).to_vec();
            prev = mac.clone();
            rows.push((seq, r, detail, mac));
            out.push(Ok((seq, outcome)));
        }
        if !rows.is_empty() {
            let mut qb = sqlx::QueryBuilder::new(
                "INSERT INTO audit (seq, ts, action, requester, decision, policy, key, service, lease_id, purpose, trace_id, detail, mac) ",
            );
            qb.push_values(rows.iter(), |mut b, (seq, r, detail, mac)| {
                b.push_bind(*seq)
                    .push_bind(r.ts)
                    .push_bind(r.rec.action.clone())
                    .push_bind(r.rec.requester.clone())
                    .push_bind(r.rec.decision.clone())
                    .push_bind(r.rec.policy.clone())
                    .push_bind(r.rec.key.clone())
                    .push_bind(r.rec.service.clone())
                    .push_bind(r.rec.lease_id.clone())
                    .push_bind(r.rec.purpose.clone())
                    .push_bind(r.rec.trace_id.clone())
                    .push_bind(detail.clone())
                    .push_bind(mac.clone());
            });
            qb.build().execute(&mut *tx).await?;
            sqlx::query(
                "INSERT INTO meta (name, value) VALUES ('audit_head', $1) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            )
            .bind(head_bytes(seq, &prev))
            .execute(&mut *tx)
            .await?;
        }
        out
    });
    Ok(out)
}

/// Commit `buf` and acknowledge every caller. One transaction for the whole batch; if it
/// fails, each item is retried alone (its own transaction), so one bad item cannot fail its
/// neighbours and each caller gets its own result.
async fn commit_and_ack(store: &Store, key: &Key32, stats: &Stats, buf: &mut Vec<Req>) {
    use std::sync::atomic::Ordering::Relaxed;
    let count = |results: &[Result<(i64, Option<LeaseOutcome>), LeaseError>]| {
        stats.batches.fetch_add(1, Relaxed);
        stats.entries.fetch_add(results.iter().filter(|r| r.is_ok()).count() as u64, Relaxed);
    };
    match write_batch(store, key, buf).await {
        Ok(results) => {
            count(&results);
            for (r, res) in buf.drain(..).zip(results) {
                let _ = r.done.send(res.map_err(AppendError::Lease));
            }
        }
        Err(first) if buf.len() == 1 => {
            let r = buf.remove(0);
            let _ = r.done.send(Err(fail_to_error(first)));
        }
        Err(_) => {
            for r in buf.drain(..) {
                let one = std::slice::from_ref(&r);
                let ack = match write_batch(store, key, one).await {
                    Ok(mut results) => {
                        count(&results);
                        match results.pop() {
                            Some(res) => res.map_err(AppendError::Lease),
                            None => Err(AppendError::Audit(AuditError::Write("audit writer lost an entry".into()))),
                        }
                    }
                    Err(f) => Err(fail_to_error(f)),
                };
                let _ = r.done.send(ack);
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
    /// Start the writer task on the current Tokio runtime.
    pub fn start(store: Store, key: Key32) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Req>(4096);
        let stats = std::sync::Arc::new(Stats::default());
        let st = stats.clone();
        let handle = tokio::spawn(async move {
            let mut buf: Vec<Req> = Vec::with_capacity(256);
            while rx.recv_many(&mut buf, 256).await > 0 {
                commit_and_ack(&store, &key, &st, &mut buf).await;
            }
        });
        (Self { tx, stats }, handle)
    }

    /// (transactions committed, entries written) by this process's writer since start.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.stats.batches.load(std::sync::atomic::Ordering::Relaxed),
            self.stats.entries.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Entries queued for the writer and not yet taken (for metrics).
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    async fn submit(&self, rec: AuditRecord, op: Option<LeaseOp>) -> Ack {
        let (done, wait) = oneshot::channel();
        let stopped = || AppendError::Audit(AuditError::Write("audit writer stopped".into()));
        self.tx.send(Req { rec, ts: now_ms(), op, done }).await.map_err(|_| stopped())?;
        wait.await.map_err(|_| stopped())?
    }

    /// Append an entry and wait until it is durable. Returns its sequence number.
    pub async fn append(&self, rec: AuditRecord) -> Result<i64, AuditError> {
        match self.submit(rec, None).await {
            Ok((seq, _)) => Ok(seq),
            Err(AppendError::Audit(e)) => Err(e),
            // Unreachable without an op; reported as a write failure all the same.
            Err(AppendError::Lease(e)) => Err(AuditError::Write(e.to_string())),
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
            let mac = hmac_sha256(key.bytes(), &[&prev, &row_canonical(r)]);
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
/// dot (`credential` matches `credential.*`). Filters use the indexes on key, requester, action
/// and ts.
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
