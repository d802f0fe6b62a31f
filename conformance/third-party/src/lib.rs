//! A store written outside the fencelock workspace: it wraps the in-memory store and
//! counts the calls it forwards, so the suite runs against a `LockBackend` that the
//! conformance crate has never seen.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fencelock_core::{
    AcquireRequest, Capabilities, Lease, LockBackend, LockName, LockState, MemoryStore, Result,
    async_trait,
};

/// The memory store behind a third party's own type.
#[derive(Debug, Default)]
pub struct WrappedStore {
    inner: MemoryStore,
    calls: AtomicU64,
}

impl WrappedStore {
    /// A client of `inner` (clones of one `MemoryStore` share their locks).
    pub fn new(inner: MemoryStore) -> Self {
        Self {
            inner,
            calls: AtomicU64::new(0),
        }
    }

    /// How many calls this client forwarded.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn count(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl LockBackend for WrappedStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            store: "third-party",
            ..self.inner.capabilities()
        }
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Lease> {
        self.count();
        self.inner.acquire(req).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        self.count();
        self.inner.renew(lease, ttl).await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        self.count();
        self.inner.release(lease).await
    }

    async fn inspect(&self, name: &LockName) -> Result<Option<LockState>> {
        self.count();
        self.inner.inspect(name).await
    }
}
