//! A held lock: its token, its liveness, and its release.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use crate::watchdog::{Status, StatusReceiver, Watchdog};
use crate::{Error, FencingToken, Lease, LockName, LossReason, Result};

/// How long after a lease's validity `lost()` reports it lost by itself when the
/// watchdog has not reported anything.
const LOST_FALLBACK_GRACE: Duration = Duration::from_millis(10);

/// A cheap, cloneable view of a held lock, for moving into the work it protects.
///
/// It answers the same questions as its [`LockGuard`] but cannot release the lock.
#[derive(Clone, Debug)]
pub struct HeldLock {
    name: LockName,
    token: FencingToken,
    store: &'static str,
    status: StatusReceiver,
}

impl HeldLock {
    /// The fencing token of this grant: send it with every write you make under it.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The lock's name.
    pub fn name(&self) -> &LockName {
        &self.name
    }

    /// Whether the lock is surely still held: not lost, not released, within its
    /// validity, and its store session not suspended. `false` is final unless a
    /// suspended session comes back.
    pub fn is_held(&self) -> bool {
        match self.status.current() {
            Status::Held { valid_until } => Instant::now() < valid_until,
            _ => false,
        }
    }

    /// Time left until the current validity ends (the watchdog extends it); zero once
    /// lost or released, and while the store session is suspended.
    pub fn remaining(&self) -> Duration {
        match self.status.current() {
            Status::Held { valid_until } => valid_until.saturating_duration_since(Instant::now()),
            _ => Duration::ZERO,
        }
    }

    /// Resolves with [`Error::Lost`] once the lock is lost: a renewal was refused, the
    /// validity ran out without a successful renewal, `max_hold` ended it, or the
    /// store's session died. Never resolves after a normal release.
    ///
    /// The future is `'static`: it can be moved into another task.
    pub fn lost(&self) -> impl Future<Output = Error> + Send + 'static {
        let mut status = self.status.clone();
        let (name, token, store) = (self.name.clone(), self.token, self.store);
        async move {
            let lost = |reason| Error::Lost {
                name,
                token,
                store,
                reason,
            };
            loop {
                let current = status.see();
                match current {
                    Status::Lost(reason) => return lost(reason),
                    Status::Released => return std::future::pending().await,
                    Status::Held { valid_until } | Status::Suspended { valid_until } => {
                        tokio::select! {
                            changed = status.changed() => {
                                if changed.is_err() {
                                    // The sender is gone only after a release or a loss,
                                    // and a loss is always sent first.
                                    let last = status.current();
                                    if let Status::Lost(reason) = last {
                                        return lost(reason);
                                    }
                                    return std::future::pending().await;
                                }
                            }
                            // Even if the watchdog cannot run (its runtime is gone),
                            // validity that passed without a renewal is a loss. The grace
                            // lets a running watchdog report the precise reason first.
                            () = tokio::time::sleep_until(valid_until + LOST_FALLBACK_GRACE) => {
                                let still = matches!(
                                    status.current(),
                                    Status::Held { valid_until: v } | Status::Suspended { valid_until: v } if v == valid_until
                                );
                                if still {
                                    return lost(LossReason::Expired);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn loss_reason(&self) -> LossReason {
        match self.status.current() {
            Status::Lost(reason) => reason,
            _ => LossReason::Expired,
        }
    }
}

/// A held lock. The watchdog of its [`Locker`](crate::Locker) renews it at ttl/3 for as
/// long as the guard lives (bounded by `max_hold`).
///
/// Release it with [`release`](Self::release) to learn whether it was still held.
/// Dropping the guard stops the renewals and releases it in the background,
/// best-effort: if no Tokio runtime is running at that moment, or the store is
/// unreachable, the lock is freed only when its TTL runs out.
#[derive(Debug)]
#[must_use = "dropping the guard releases the lock"]
pub struct LockGuard {
    held: HeldLock,
    lease: Lease,
    id: u64,
    watchdog: Arc<Watchdog>,
    released: bool,
}

impl LockGuard {
    pub(crate) fn new(
        lease: Lease,
        id: u64,
        status: StatusReceiver,
        watchdog: Arc<Watchdog>,
    ) -> Self {
        Self {
            held: HeldLock {
                name: lease.name().clone(),
                token: lease.token(),
                store: watchdog.store(),
                status,
            },
            lease,
            id,
            watchdog,
            released: false,
        }
    }

    /// The fencing token of this grant: send it with every write you make under it.
    pub fn token(&self) -> FencingToken {
        self.held.token()
    }

    /// The lock's name.
    pub fn name(&self) -> &LockName {
        self.held.name()
    }

    /// Whether the lock is surely still held (see [`HeldLock::is_held`]).
    pub fn is_held(&self) -> bool {
        self.held.is_held()
    }

    /// Time left on the current validity (see [`HeldLock::remaining`]).
    pub fn remaining(&self) -> Duration {
        self.held.remaining()
    }

    /// Resolves with [`Error::Lost`] once the lock is lost (see [`HeldLock::lost`]).
    pub fn lost(&self) -> impl Future<Output = Error> + Send + 'static {
        self.held.lost()
    }

    /// A cloneable view of this lock to move into the work it protects.
    pub fn held(&self) -> HeldLock {
        self.held.clone()
    }

    /// The grant as the store made it (owner id, token; `valid_until` of the grant).
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Stops renewing and releases the lock now.
    ///
    /// # Errors
    /// [`Error::Lost`] if the lock had already been lost (the store's current holder,
    /// if any, is left untouched); a backend error if the store could not be reached
    /// (the lock then frees itself when its TTL runs out).
    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        let reason_if_lost = self.held.loss_reason();
        let was_held = self.watchdog.deregister(self.id);
        let span = tracing::info_span!(
            "fencelock.release",
            lock = %self.lease.name(),
            store = self.watchdog.store(),
            token = self.lease.token().0,
        );
        // Even a lease we count as lost is released by owner: the store may still hold
        // it (validity is judged conservatively), and owner-checked release cannot
        // touch anyone else's grant.
        let released = self
            .watchdog
            .backend()
            .release(&self.lease)
            .instrument(span)
            .await;
        if !was_held {
            return Err(Error::Lost {
                name: self.lease.name().clone(),
                store: self.watchdog.store(),
                token: self.lease.token(),
                reason: reason_if_lost,
            });
        }
        released
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.watchdog.deregister(self.id);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let backend = Arc::clone(self.watchdog.backend());
            let lease = self.lease.clone();
            runtime.spawn(async move {
                if let Err(err) = backend.release(&lease).await {
                    tracing::debug!(lock = %lease.name(), error = %err, "fencelock background release after drop failed");
                }
            });
        }
    }
}
