-- CRP vault schema, version 3: a cheaper audit append (see crp-provider/src/audit.rs).
-- Every proxied request and every lease operation appends one `audit` row, so each index on the
-- table is paid on the hot path (on SQLite, 4 indexes made an append ~5x the cost of the row
-- itself). On SQLite `seq` becomes the rowid ({SEQ_KEY} is `INTEGER PRIMARY KEY` there: one
-- B-tree fewer than `BIGINT PRIMARY KEY`, which keeps a separate unique index; PostgreSQL keeps
-- `BIGINT PRIMARY KEY`). The `action` and `ts` indexes go: those filters are applied newest
-- first along `seq`, which reaches recent entries at once. Entries by credential key and by
-- requester keep their indexes. Values, and so the MAC chain, are copied unchanged.

CREATE TABLE audit_v3 (
    seq       {SEQ_KEY},
    ts        BIGINT NOT NULL,
    action    TEXT NOT NULL,
    requester TEXT NOT NULL,
    decision  TEXT NOT NULL,
    policy    TEXT,
    key       TEXT,
    service   TEXT,
    lease_id  TEXT,
    purpose   TEXT,
    trace_id  TEXT,
    detail    TEXT NOT NULL,
    mac       {BLOB} NOT NULL
);
INSERT INTO audit_v3 (seq, ts, action, requester, decision, policy, key, service, lease_id, purpose, trace_id, detail, mac)
    SELECT seq, ts, action, requester, decision, policy, key, service, lease_id, purpose, trace_id, detail, mac FROM audit;
DROP TABLE audit;
ALTER TABLE audit_v3 RENAME TO audit;
CREATE INDEX audit_key ON audit (key, seq);
CREATE INDEX audit_requester ON audit (requester, seq);
