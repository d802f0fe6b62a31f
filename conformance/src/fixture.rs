//! How the suite reaches a store under test.

use std::sync::Arc;

use fencelock_core::{LockBackend, LockName, MemoryStore, Result, async_trait};

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
