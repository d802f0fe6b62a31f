//! The conformance suite against the SQLite store: every client is its own connection
//! pool on one database file, as separate processes would be.

use std::path::PathBuf;
use std::sync::Arc;

use fencelock_conformance::StoreFixture;
use fencelock_core::{Error, LockBackend, LockName, Result, async_trait};
use fencelock_sql::SqliteBackend;

struct SqliteFixture {
    dir: tempfile::TempDir,
}

impl SqliteFixture {
    fn path(&self) -> PathBuf {
        self.dir.path().join("locks.db")
    }
}

#[async_trait]
impl StoreFixture for SqliteFixture {
    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(SqliteBackend::open(self.path()).await?))
    }

    async fn delete_behind_back(&self, name: &LockName) -> Result<()> {
        let operator = SqliteBackend::open(self.path()).await?;
        let statement = format!("DELETE FROM {} WHERE name = ?", operator.table());
        sqlx::query(&statement)
            .bind(name.as_str())
            .execute(operator.pool())
            .await
            .map_err(|err| Error::backend("sqlite", "operator delete", false, err))?;
        Ok(())
    }

    fn url(&self) -> Option<String> {
        Some(format!("sqlite://{}", self.path().display()))
    }
}

async fn fixture() -> SqliteFixture {
    SqliteFixture {
        dir: tempfile::tempdir().expect("temp dir"),
    }
}

fencelock_conformance::conformance_tests!(fixture);
