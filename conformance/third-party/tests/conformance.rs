//! fencelock's conformance suite, run from a crate outside its workspace against a
//! driver of our own.

use std::sync::Arc;

use fencelock_conformance::StoreFixture;
use fencelock_core::{LockBackend, LockName, MemoryStore, Result, async_trait};
use fencelock_third_party_driver::WrappedStore;

struct Fixture {
    store: MemoryStore,
}

#[async_trait]
impl StoreFixture for Fixture {
    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(WrappedStore::new(self.store.clone())))
    }

    async fn delete_behind_back(&self, name: &LockName) -> Result<()> {
        self.store.evict(name);
        Ok(())
    }

    fn url(&self) -> Option<String> {
        None
    }
}

async fn fixture() -> Fixture {
    Fixture {
        store: MemoryStore::new(),
    }
}

fencelock_conformance::conformance_tests!(fixture);
