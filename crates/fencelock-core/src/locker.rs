//! The user-facing client over any [`LockBackend`].

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use crate::guard::HeldLock;
use crate::watchdog::Watchdog;
use crate::{
    AcquireRequest, Capabilities, Error, LockBackend, LockGuard, LockName, LockState, Result,
    WaitPolicy,
};

/// Defaults a [`Locker`] applies to every lock request that does not set its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockerOptions {
    /// TTL of each grant; the watchdog renews at a third of it. Default: 30 s.
    pub ttl: Duration,
    /// How long `lock(..)` waits for a held lock. Default: forever.
    pub wait: WaitPolicy,
}

impl Default for LockerOptions {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(30),
            wait: WaitPolicy::Forever,
        }
    }
}

/// Takes named locks on one store and keeps them renewed.
///
/// Cheap to clone (all clones share one backend and one watchdog task). Build it once
/// per process with `fencelock::connect(url)` or [`Locker::new`].
///
/// ```
/// # async fn demo() -> fencelock_core::Result<()> {
/// use std::time::Duration;
/// use fencelock_core::{Locker, MemoryStore};
///
/// let locker = Locker::new(MemoryStore::new());
/// let guard = locker.lock("orders/42").ttl(Duration::from_secs(10)).await?;
/// println!("write with token {}", guard.token());
/// guard.release().await?;
/// # Ok(()) }
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(demo()).unwrap();
/// ```
#[derive(Clone)]
pub struct Locker {
    inner: Arc<Inner>,
}

struct Inner {
    capabilities: Capabilities,
    options: LockerOptions,
    watchdog: Arc<Watchdog>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.watchdog.close();
    }
}

impl fmt::Debug for Locker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Locker")
            .field("backend", self.inner.watchdog.backend())
            .field("options", &self.inner.options)
            .finish()
    }
}

impl Locker {
    /// A locker over `backend` with default options.
    pub fn new(backend: impl LockBackend) -> Self {
        Self::with_options(Arc::new(backend), LockerOptions::default())
    }

    /// A locker over a shared backend with `options`.
    pub fn with_options(backend: Arc<dyn LockBackend>, options: LockerOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                capabilities: backend.capabilities(),
                options,
                watchdog: Watchdog::new(backend),
            }),
        }
    }

    /// The backend this locker uses.
    pub fn backend(&self) -> &Arc<dyn LockBackend> {
        self.inner.watchdog.backend()
    }

    /// What the store can do.
    pub fn capabilities(&self) -> Capabilities {
        self.inner.capabilities
    }

    /// The defaults applied to requests.
    pub fn options(&self) -> LockerOptions {
        self.inner.options
    }

    /// A request for the lock `name`; set `ttl`, `wait` and `max_hold` on it, then
    /// `.await` it for a [`LockGuard`] (or call [`LockRequest::run`]).
    ///
    /// The name is validated when the request is awaited.
    pub fn lock(&self, name: impl AsRef<str>) -> LockRequest {
        LockRequest {
            locker: self.clone(),
            name: LockName::new(name),
            ttl: self.inner.options.ttl,
            wait: self.inner.options.wait,
            max_hold: None,
        }
    }

    /// Takes `name` if it is free right now; `Ok(None)` if someone else holds it.
    ///
    /// # Errors
    /// Invalid names, store failures.
    pub async fn try_lock(&self, name: impl AsRef<str>) -> Result<Option<LockGuard>> {
        match self.lock(name).no_wait().await {
            Ok(guard) => Ok(Some(guard)),
            Err(Error::Contended { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Runs `work` while holding `name` (waiting as the locker's options say), then
    /// releases it. See [`LockRequest::run`].
    ///
    /// # Errors
    /// As [`LockRequest::run`].
    pub async fn with_lock<F, Fut, T>(&self, name: impl AsRef<str>, work: F) -> Result<T>
    where
        F: FnOnce(HeldLock) -> Fut,
        Fut: Future<Output = T>,
    {
        self.lock(name).run(work).await
    }

    /// The current holder of `name`, if any (owner, token, remaining time).
    ///
    /// # Errors
    /// Invalid names, store failures.
    pub async fn inspect(&self, name: impl AsRef<str>) -> Result<Option<LockState>> {
        let name = LockName::new(name)?;
        self.backend().inspect(&name).await
    }
}

/// A pending lock request from [`Locker::lock`]; `.await` it for a [`LockGuard`].
#[derive(Debug)]
#[must_use = "a lock request does nothing until awaited"]
pub struct LockRequest {
    locker: Locker,
    name: Result<LockName>,
    ttl: Duration,
    wait: WaitPolicy,
    max_hold: Option<Duration>,
}

impl LockRequest {
    /// TTL of the grant; the watchdog renews at a third of it while the guard lives.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Wait up to `wait` for a held lock, then fail with [`Error::Timeout`].
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = WaitPolicy::Until(wait);
        self
    }

    /// Fail at once with [`Error::Contended`] if the lock is held.
    pub fn no_wait(mut self) -> Self {
        self.wait = WaitPolicy::NoWait;
        self
    }

    /// Wait until granted, however long.
    pub fn wait_forever(mut self) -> Self {
        self.wait = WaitPolicy::Forever;
        self
    }

    /// Stop renewing `max_hold` after the grant: the lock then ends (and the guard
    /// reports [`LossReason::MaxHoldReached`](crate::LossReason::MaxHoldReached)) even
    /// if its holder hangs.
    pub fn max_hold(mut self, max_hold: Duration) -> Self {
        self.max_hold = Some(max_hold);
        self
    }

    /// Takes the lock, runs `work` with a [`HeldLock`] view of it, and releases it.
    ///
    /// The `work` future is dropped the moment the lock is lost, and the call then
    /// returns [`Error::Lost`]. Write through a fence gate with the token anyway: a
    /// loss is noticed at the latest when the lease's validity ends, and the work may
    /// have been paused past it.
    ///
    /// # Errors
    /// Everything acquiring can return; [`Error::Lost`] if the lock was lost during the
    /// work or turned out lost at release.
    pub async fn run<F, Fut, T>(self, work: F) -> Result<T>
    where
        F: FnOnce(HeldLock) -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.await?;
        let lost = guard.lost();
        let work = work(guard.held());
        tokio::select! {
            biased;
            err = lost => Err(err),
            value = work => {
                guard.release().await?;
                Ok(value)
            }
        }
    }

    async fn acquire(self) -> Result<LockGuard> {
        let name = self.name?;
        if self.max_hold.is_some_and(|d| d.is_zero()) {
            return Err(Error::config(format!(
                "max_hold of lock `{name}` is zero; leave it unset to hold for as long as the guard lives"
            )));
        }
        let request = AcquireRequest::new(name.clone(), self.ttl)?.with_wait(self.wait);
        let watchdog = &self.locker.inner.watchdog;
        let span = tracing::info_span!(
            "fencelock.acquire",
            lock = %name,
            store = watchdog.store(),
            ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX),
            token = tracing::field::Empty,
        );
        let lease = watchdog
            .backend()
            .acquire(request)
            .instrument(span.clone())
            .await?;
        span.record("token", lease.token().0);
        let (id, status) = watchdog.register(lease.clone(), self.ttl, self.max_hold);
        Ok(LockGuard::new(lease, id, status, Arc::clone(watchdog)))
    }
}

impl IntoFuture for LockRequest {
    type Output = Result<LockGuard>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<LockGuard>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.acquire())
    }
}
