//! A database of its own on the throwaway PostgreSQL server scripts/test.sh starts
//! (`CRP_TEST_POSTGRES_URL`), so tests running in parallel cannot collide.

/// A fresh database; dropped by [`TestDatabase::drop_database`].
pub struct TestDatabase {
    admin: sqlx::PgPool,
    name: String,
    /// URL of the fresh database.
    pub url: String,
}

impl TestDatabase {
    /// `None` when `CRP_TEST_POSTGRES_URL` is not set (and CI is not set either: in CI the real
    /// server must be exercised, so a missing URL fails the test).
    pub async fn create(prefix: &str) -> Option<TestDatabase> {
        let Ok(admin_url) = std::env::var("CRP_TEST_POSTGRES_URL") else {
            assert!(std::env::var_os("CI").is_none(), "CI is set but CRP_TEST_POSTGRES_URL is not: run scripts/test.sh");
            eprintln!("CRP_TEST_POSTGRES_URL not set: PostgreSQL not exercised (scripts/test.sh sets it)");
            return None;
        };
        let name = format!("{prefix}_{}", std::process::id());
        let admin = sqlx::PgPool::connect(&admin_url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}"))).execute(&admin).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await.unwrap();
        let url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("CRP_TEST_POSTGRES_URL has no database path"),
        };
        Some(TestDatabase { admin, name, url })
    }

    /// Drop the database (close every pool on it first).
    pub async fn drop_database(self) {
        let q = format!("DROP DATABASE IF EXISTS {}", self.name);
        sqlx::query(sqlx::AssertSqlSafe(q)).execute(&self.admin).await.unwrap();
    }
}
