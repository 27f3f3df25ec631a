-- CRP vault schema, version 2: delegation subtrees as index ranges (see crp-provider/src/leases.rs).
-- Every delegated lease stores its ancestry in `path`: the ids from its root down to itself, each
-- followed by '/', as bytes, so that a lease's descendants are one range of `leases_path` on both
-- engines. Roots keep NULL (their prefix is `id/`), so only delegated leases are indexed.
-- Portable between SQLite and PostgreSQL ({BLOB} is BLOB or BYTEA).

ALTER TABLE leases ADD COLUMN path {BLOB};

-- Backfill (the same statement as leases::HEAL_PATHS, which repairs rows written without a path).
WITH RECURSIVE t(id, path) AS (
    SELECT l.id, CAST(COALESCE(p.path, CAST(l.parent_id || '/' AS {BLOB})) || CAST(l.id || '/' AS {BLOB}) AS {BLOB})
    FROM leases l LEFT JOIN leases p ON p.id = l.parent_id
    WHERE l.parent_id IS NOT NULL AND l.path IS NULL AND NOT (p.parent_id IS NOT NULL AND p.path IS NULL)
    UNION ALL
    SELECT c.id, CAST(t.path || CAST(c.id || '/' AS {BLOB}) AS {BLOB})
    FROM leases c JOIN t ON c.parent_id = t.id
    WHERE c.path IS NULL
)
UPDATE leases SET path = t.path FROM t WHERE leases.id = t.id;

CREATE INDEX leases_path ON leases (path) WHERE path IS NOT NULL;

-- Delegated leases still without a path: normally none; probed before every subtree operation.
CREATE INDEX leases_unpathed ON leases (parent_id) WHERE parent_id IS NOT NULL AND path IS NULL;

-- Expiry is only ever asked of active leases (reaper, active count): index those alone, so that
-- ending a lease removes one entry instead of moving it (halves the index work of a cascade).
DROP INDEX leases_state_expiry;
CREATE INDEX leases_active_expiry ON leases (expires_at) WHERE state = 'active';
