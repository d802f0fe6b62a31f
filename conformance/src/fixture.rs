//! How the suite reaches a store under test.

use std::path::PathBuf;
use std::sync::Arc;

use fencelock_core::{Error, LockBackend, LockName, MemoryStore, Result, async_trait};
use fencelock_sql::{SqliteBackend, sqlx};

/// A store under test, as the suite sees it.
///
/// Implement this for your own driver and run the suite with
/// [`conformance_tests!`](crate::conformance_tests).
#[async_trait]
pub trait StoreFixture: Send + Sync {
    /// A new, independent client of the store (as a second process would have).
    ///
    /// # Errors
    /// If the store cannot be reached.
    async fn backend(&self) -> Result<Arc<dyn LockBackend>>;

    /// Deletes the grant of `name` as an operator would, bypassing owner checks
    /// (`DEL`, `DELETE FROM`, `etcdctl del`, ...).
    ///
    /// # Errors
    /// If the store cannot be reached.
    async fn delete_behind_back(&self, name: &LockName) -> Result<()>;

    /// A URL another process can connect to this store with, for stores shared between
    /// processes; `None` for process-local stores.
    fn url(&self) -> Option<String>;
}

/// The in-memory store: every client shares one lock table.
#[derive(Debug, Default, Clone)]
pub struct MemoryFixture {
    store: MemoryStore,
}

impl MemoryFixture {
    /// A fixture over a fresh, empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl StoreFixture for MemoryFixture {
    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(self.store.clone()))
    }

    async fn delete_behind_back(&self, name: &LockName) -> Result<()> {
        self.store.evict(name);
        Ok(())
    }

    fn url(&self) -> Option<String> {
        None
    }
}

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
