//! The SQLite store as a fixture, for the process-level scenarios.

use std::path::PathBuf;
use std::sync::Arc;

use fencelock_core::{Error, LockBackend, LockName, Result, async_trait};
use fencelock_sql::{SqliteBackend, sqlx};

use crate::StoreFixture;

/// The SQLite store on a file in a fresh temporary directory: every client is its own
/// connection pool on that file, as another process would have.
#[derive(Debug)]
pub struct SqliteFixture {
    dir: tempfile::TempDir,
}

impl SqliteFixture {
    /// A fixture over a new, empty database file.
    ///
    /// # Panics
    /// If no temporary directory can be created.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("a temporary directory for the SQLite file"),
        }
    }

    /// The database file.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("locks.db")
    }
}

impl Default for SqliteFixture {
    fn default() -> Self {
        Self::new()
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
