-- CRP vault schema, version 1. Portable between SQLite and PostgreSQL: BIGINT integers,
-- unix-millisecond timestamps, JSON as TEXT, and {BLOB} (BLOB on SQLite, BYTEA on PostgreSQL).
-- Credential values and sensitive configuration are sealed (XChaCha20-Poly1305) before they
-- reach these tables; no column holds secret material in clear.

CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value {BLOB} NOT NULL
);

CREATE TABLE credentials (
    key            TEXT PRIMARY KEY,
    service        TEXT NOT NULL,
    kind           TEXT NOT NULL,
    classification TEXT NOT NULL,
    tags           TEXT NOT NULL,
    scopes         TEXT NOT NULL,
    max_ttl        BIGINT,
    renewable      BIGINT NOT NULL,
    metadata       TEXT NOT NULL,
    expires_at     BIGINT,
    version        BIGINT NOT NULL,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);
CREATE INDEX credentials_service ON credentials (service, key);

CREATE TABLE credential_versions (
    key          TEXT NOT NULL,
    version      BIGINT NOT NULL,
    sealed_value {BLOB} NOT NULL,
    sealed_config {BLOB} NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (key, version)
);

CREATE TABLE leases (
    id             TEXT PRIMARY KEY,
    credential_key TEXT NOT NULL,
    service        TEXT NOT NULL,
    agent          TEXT NOT NULL,
    parent_id      TEXT,
    depth          BIGINT NOT NULL,
    max_depth      BIGINT NOT NULL,
    scopes         TEXT NOT NULL,
    token_hash     TEXT NOT NULL,
    state          TEXT NOT NULL,
    ttl            BIGINT NOT NULL,
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    max_expires_at BIGINT NOT NULL,
    ended_at       BIGINT,
    end_reason     TEXT,
    purpose        TEXT,
    consumer       TEXT
);
CREATE INDEX leases_parent ON leases (parent_id);
CREATE INDEX leases_state_expiry ON leases (state, expires_at);
CREATE INDEX leases_key ON leases (credential_key);

CREATE TABLE audit (
    seq       BIGINT PRIMARY KEY,
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
CREATE INDEX audit_key ON audit (key, seq);
CREATE INDEX audit_requester ON audit (requester, seq);
CREATE INDEX audit_action ON audit (action, seq);
CREATE INDEX audit_ts ON audit (ts);

CREATE TABLE agents (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    public_key TEXT NOT NULL,
    roles      TEXT NOT NULL,
    scopes     TEXT NOT NULL,
    status     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE bootstrap_tokens (
    token_hash TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    roles      TEXT NOT NULL,
    scopes     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at    BIGINT,
    agent_id   TEXT
);

CREATE TABLE approvals (
    id             TEXT PRIMARY KEY,
    agent          TEXT NOT NULL,
    action         TEXT NOT NULL,
    credential_key TEXT NOT NULL,
    fingerprint    TEXT NOT NULL,
    summary        TEXT NOT NULL,
    policy         TEXT,
    reason         TEXT NOT NULL,
    status         TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    decided_at     BIGINT,
    decided_by     TEXT
);
CREATE INDEX approvals_lookup ON approvals (agent, fingerprint, status);
