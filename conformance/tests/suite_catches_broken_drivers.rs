//! The suite's properties can fail: each deliberately broken driver fails the property
//! that states the rule it breaks (the same properties pass on the memory store in
//! `memory.rs`).

use std::future::Future;
use std::sync::Arc;

use fencelock_conformance::broken::{NoTtl, PlainDelete, RandomToken, ResettingCounter};
use fencelock_conformance::{StoreFixture, suite};
use fencelock_core::{LockBackend, LockName, MemoryStore, Result, async_trait};

/// A broken driver over one memory store; every client shares the one broken backend,
/// as clients of one broken server would.
struct Broken {
    store: MemoryStore,
    backend: Arc<dyn LockBackend>,
}

impl Broken {
    fn new(wrap: impl FnOnce(MemoryStore) -> Arc<dyn LockBackend>) -> Arc<Self> {
        let store = MemoryStore::new();
        Arc::new(Self {
            backend: wrap(store.clone()),
            store,
        })
    }
}

#[async_trait]
impl StoreFixture for Broken {
    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::clone(&self.backend))
    }
    async fn delete_behind_back(&self, name: &LockName) -> Result<()> {
        self.store.evict(name);
        Ok(())
    }
    fn url(&self) -> Option<String> {
        None
    }
}

/// Runs `property` on its own task and asserts that it failed (panicked).
async fn assert_fails<F, Fut>(fixture: Arc<Broken>, property: F)
where
    F: FnOnce(Arc<Broken>) -> Fut,
    Fut: Future<Output = suite::Verdict> + Send + 'static,
{
    let outcome = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        tokio::spawn(property(fixture)),
    )
    .await
    .expect("the property must end, passing or failing, within 120s");
    match outcome {
        Err(join) => assert!(join.is_panic(), "{join:?}"),
        Ok(verdict) => panic!("the property passed on a broken driver: {verdict:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_delete_fails_the_owner_checked_release_property() {
    let fixture = Broken::new(|store| Arc::new(PlainDelete::new(store)));
    assert_fails(fixture, |f| async move {
        suite::release_of_a_lost_lease_spares_the_new_holder(&*f).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ttl_fails_the_free_after_ttl_property() {
    let fixture = Broken::new(|store| Arc::new(NoTtl::new(store)));
    assert_fails(fixture, |f| async move {
        suite::lock_is_not_taken_before_its_ttl_and_is_free_after(&*f).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resetting_counter_fails_the_rising_token_property() {
    let fixture = Broken::new(|store| Arc::new(ResettingCounter::new(store, 2)));
    assert_fails(fixture, |f| async move {
        suite::reacquire_after_release_gets_a_higher_token(&*f).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_tokens_fail_the_fenced_increments_property() {
    let fixture = Broken::new(|store| Arc::new(RandomToken::new(store)));
    assert_fails(fixture, |f| async move {
        suite::fenced_increments_are_exact(&*f).await
    })
    .await;
}
