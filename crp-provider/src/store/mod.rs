//! The storage layer: one schema, two engines.
//!
//! [`Store`] is an enum over a native sqlx pool per engine (SQLite, the embedded default, and
//! PostgreSQL), the shape rustls gives its crypto providers: the SQL text is shared (`$N`
//! placeholders, `BIGINT` integers, unix-millisecond timestamps, `ON CONFLICT … DO UPDATE`,
//! `RETURNING`, recursive CTEs), and only what truly differs branches per engine:
//! - write transactions: `BEGIN IMMEDIATE` on SQLite (so `busy_timeout` applies to taking the
//!   write lock and several processes can share one file), plain `BEGIN` on PostgreSQL;
//! - `BLOB` versus `BYTEA` in the DDL (the migration text has a `{BLOB}` placeholder);
//! - serialising the audit chain head (`pg_advisory_xact_lock` on PostgreSQL; SQLite has one writer).
//!
//! Migrations are embedded in the binary ([`MIGRATIONS`]) and applied on open inside a write
//! transaction, so concurrent first opens are safe.
//!
//! The SQLite file is opened in WAL mode with `synchronous=FULL` (a commit that returned
//! survives power loss), `busy_timeout` 10 s and foreign keys on. Under
//! `[audit] durability = "os"` the audit writer's own connection uses `synchronous=NORMAL`
//! (see [`crate::audit`]). WAL checkpoints run on a thread of their own ([`checkpoint`]), not
//! inside a request's commit.
//!
//! This layer stores what it is given: sealing happens above it, so it never sees a secret.

pub mod checkpoint;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

/// Storage errors: the engine's message (which never contains a sealed value in clear, since
/// there is none) plus a category.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed.
    #[error("database error: {0}")]
    Db(String),
    /// Data in the database does not parse.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        // Row-not-found and similar carry no values; database errors carry the engine text,
        // which for our statements names tables and constraints, never bound parameters.
        StoreError::Db(e.to_string())
    }
}

/// The engine in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// SQLite file (default).
    Sqlite,
    /// PostgreSQL server.
    Postgres,
}

/// A connection pool on one engine.
#[derive(Debug, Clone)]
pub enum Store {
    /// SQLite.
    Sqlite(SqlitePool),
    /// PostgreSQL.
    Postgres(PgPool),
}

/// Run `$body` with `$p` bound to the engine's pool (the body is compiled once per engine).
macro_rules! with_pool {
    ($store:expr, |$p:ident| $body:expr) => {
        match $store {
            $crate::store::Store::Sqlite($p) => $body,
            $crate::store::Store::Postgres($p) => $body,
        }
    };
}
pub(crate) use with_pool;

/// Run `$body` inside a write transaction `$tx` and commit it; an early `?` rolls back.
macro_rules! with_write_tx {
    ($store:expr, |$tx:ident| $body:expr) => {
        match $store {
            $crate::store::Store::Sqlite(p) => {
                let mut $tx = p.begin_with("BEGIN IMMEDIATE").await?;
                let out = $body;
                $tx.commit().await?;
                out
            }
            $crate::store::Store::Postgres(p) => {
                let mut $tx = p.begin().await?;
                let out = $body;
                $tx.commit().await?;
                out
            }
        }
    };
}
pub(crate) use with_write_tx;

/// Embedded migrations: (version, SQL with `{BLOB}` and `{SEQ_KEY}` placeholders for the engine's
/// binary type and the audit sequence key).
pub const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/0001_init.sql")),
    (2, include_str!("../../migrations/0002_lease_path.sql")),
    (3, include_str!("../../migrations/0003_audit_append.sql")),
];

/// Current unix time in milliseconds.
pub fn now_ms() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() / 1_000_000) as i64
}

/// RFC 3339 text for unix milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Parse RFC 3339 text into unix milliseconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

impl Store {
    /// Open (creating if missing) the SQLite vault file at `path`.
    pub async fn open_sqlite(path: &Path) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::new().filename(path).create_if_missing(true);
        Self::sqlite_with(opts).await
    }

    async fn sqlite_with(opts: SqliteConnectOptions) -> Result<Self, StoreError> {
        let opts = opts
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            // Checkpoints run on a thread of their own ([`checkpoint`]); a commit folds the
            // WAL itself only past this backstop.
            .pragma("wal_autocheckpoint", checkpoint::BACKSTOP_PAGES.to_string());
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(opts).await?;
        Ok(Store::Sqlite(pool))
    }

    /// Open by URL: `postgres://…` / `postgresql://…` or `sqlite:…`.
    pub async fn open_url(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new().max_connections(8).connect(url).await?;
            Ok(Store::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?.create_if_missing(true);
            Self::sqlite_with(opts).await
        } else {
            Err(StoreError::Db("database URL must start with postgres://, postgresql:// or sqlite:".into()))
        }
    }

    /// The SQLite database file, if this is a file-backed SQLite store (not PostgreSQL, not
    /// `:memory:`).
    pub fn sqlite_path(&self) -> Option<std::path::PathBuf> {
        match self {
            Store::Sqlite(p) => {
                let opts = p.connect_options();
                let f = opts.get_filename();
                let s = f.to_string_lossy();
                (!s.is_empty() && !s.contains(":memory:")).then(|| f.to_path_buf())
            }
            Store::Postgres(_) => None,
        }
    }

    /// Which engine.
    pub fn engine(&self) -> Engine {
        match self {
            Store::Sqlite(_) => Engine::Sqlite,
            Store::Postgres(_) => Engine::Postgres,
        }
    }

    /// Apply pending embedded migrations (idempotent; safe when several processes open at once).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.migrate_to(i64::MAX).await
    }

    /// Apply pending embedded migrations up to `version` (upgrade tests build an older schema
    /// with it).
    pub async fn migrate_to(&self, version: i64) -> Result<(), StoreError> {
        const CREATE: &str =
            "CREATE TABLE IF NOT EXISTS crp_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)";
        with_pool!(self, |p| {
            sqlx::query(CREATE).execute(p).await?;
        });
        let (blob, seq_key) = match self.engine() {
            Engine::Sqlite => ("BLOB", "INTEGER PRIMARY KEY"),
            Engine::Postgres => ("BYTEA", "BIGINT PRIMARY KEY"),
        };
        let lock_pg = matches!(self.engine(), Engine::Postgres);
        with_write_tx!(self, |tx| {
            if lock_pg {
                sqlx::query("SELECT pg_advisory_xact_lock(770001)").execute(&mut *tx).await?;
            }
            let applied: Vec<i64> =
                sqlx::query_scalar("SELECT version FROM crp_migrations").fetch_all(&mut *tx).await?;
            for (v, sql) in MIGRATIONS {
                if applied.contains(v) || *v > version {
                    continue;
                }
                let sql = sql.replace("{BLOB}", blob).replace("{SEQ_KEY}", seq_key);
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await?;
                sqlx::query("INSERT INTO crp_migrations (version, applied_at) VALUES ($1, $2)")
                    .bind(*v)
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await?;
            }
        });
        Ok(())
    }

    /// Whether the schema exists and holds a key envelope (an initialised vault).
    pub async fn is_initialised(&self) -> Result<bool, StoreError> {
        Ok(self.meta_get("key_envelope").await?.is_some())
    }

    /// Read a `meta` value.
    pub async fn meta_get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        const Q: &str = "SELECT value FROM meta WHERE name = $1";
        let v: Option<Vec<u8>> =
            with_pool!(self, |p| sqlx::query_scalar(Q).bind(name).fetch_optional(p).await?);
        Ok(v)
    }

    /// Insert a `meta` value; fails if it exists (used for one-time init values).
    pub async fn meta_insert(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        const Q: &str = "INSERT INTO meta (name, value) VALUES ($1, $2)";
        with_pool!(self, |p| {
            sqlx::query(Q).bind(name).bind(value).execute(p).await?;
        });
        Ok(())
    }

    /// Close the pool.
    pub async fn close(&self) {
        with_pool!(self, |p| p.close().await)
    }
}
