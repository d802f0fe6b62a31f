//! The contract every store implements.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;

use crate::{
    AcquireRequest, Capabilities, Lease, LockName, LockState, LossReason, OwnerId, Result,
};

/// What a store learns by itself about this client's grants, without being asked: a
/// session that dropped, came back or ended, a grant whose key vanished.
///
/// Session stores (etcd, ZooKeeper, database connections) send these so guards hear of
/// a loss at once rather than at the next renewal.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreEvent {
    /// The session is disconnected: its grants may or may not still stand. Guards
    /// report not held until [`Resumed`](Self::Resumed); a grant whose validity runs
    /// out meanwhile is lost.
    Suspended,
    /// The session is connected again and its grants still stand.
    Resumed,
    /// The session ended: every grant made through this backend is lost.
    SessionLost {
        /// Why.
        reason: LossReason,
    },
    /// One grant is gone (its key or node was deleted, its row taken).
    LeaseLost {
        /// The lock.
        name: LockName,
        /// The owner id of the lost grant.
        owner: OwnerId,
    },
}

/// A store that grants named locks with fencing tokens.
///
/// Object-safe: a [`Locker`](crate::Locker) holds an `Arc<dyn LockBackend>`. Drivers
/// implement exactly the behaviour below; timeouts, retries, renewal scheduling,
/// tracing and loss reporting live in the client, not here. The conformance suite
/// (`fencelock-conformance`) tests each rule.
#[async_trait]
pub trait LockBackend: Send + Sync + Debug + 'static {
    /// What this store can do.
    fn capabilities(&self) -> Capabilities;

    /// Grants `req.name` to `req.owner` for `req.ttl`.
    ///
    /// # Behavior
    /// - Grants iff nobody holds the name (a grant past its TTL holds nothing).
    /// - While it is held, waits as `req.wait` says: [`WaitPolicy::NoWait`] returns
    ///   [`Error::Contended`] at once; `Until(d)` returns [`Error::Timeout`] after `d`;
    ///   `Forever` waits until granted. Waiting uses the store's own notification where
    ///   [`Capabilities::wait`] is `Notify`, and polling with backoff capped by the
    ///   holder's remaining time where it is `Poll`; never a fixed sleep.
    /// - The returned [`Lease`] carries a [`FencingToken`] higher than that of every
    ///   earlier grant of this name, the owner `req.owner`, and a `valid_until`
    ///   computed with [`valid_until`](crate::valid_until) from the instant the
    ///   granting request was **sent** (never from when its reply arrived).
    /// - Cancel-safe: dropping the future at any await leaves no queue entry behind and
    ///   no grant beyond its TTL; a request whose outcome is unknown (timed out,
    ///   dropped mid-flight) is cleaned up by owner as if it had been applied.
    ///
    /// [`WaitPolicy::NoWait`]: crate::WaitPolicy::NoWait
    /// [`Error::Contended`]: crate::Error::Contended
    /// [`Error::Timeout`]: crate::Error::Timeout
    /// [`FencingToken`]: crate::FencingToken
    async fn acquire(&self, req: AcquireRequest) -> Result<Lease>;

    /// Extends `lease` to `ttl` from now.
    ///
    /// # Behavior
    /// - Succeeds only if the store still holds this exact grant (same name, owner and
    ///   token) and it has not expired; returns the lease with a new `valid_until`
    ///   measured from when the renewal was sent, and the same token.
    /// - Otherwise returns [`Error::Lost`](crate::Error::Lost) and changes nothing.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease>;

    /// Renews many leases at once, one result per lease in the same order.
    ///
    /// # Behavior
    /// Each result is what [`renew`](Self::renew) would return for that lease. The
    /// default runs the renewals concurrently; stores that can batch (one pipeline, one
    /// statement, one script) override it so a watchdog tick costs one round trip.
    async fn renew_all(&self, leases: &[(Lease, Duration)]) -> Vec<Result<Lease>> {
        futures_util::future::join_all(leases.iter().map(|(lease, ttl)| self.renew(lease, *ttl)))
            .await
    }

    /// Releases `lease`.
    ///
    /// # Behavior
    /// - Deletes the grant only if it is still this owner's (compare-and-delete by
    ///   owner and token, never a plain delete), then wakes the next waiter.
    /// - If the lease was already lost (expired, taken over, deleted), returns
    ///   [`Error::Lost`](crate::Error::Lost) and leaves whoever holds the name now
    ///   untouched.
    async fn release(&self, lease: &Lease) -> Result<()>;

    /// A feed of [`StoreEvent`]s about grants made through this backend, for the
    /// client's watchdog. Each call returns a new receiver of the same feed.
    ///
    /// # Behavior
    /// Stores that learn of losses by themselves (sessions, watches) return
    /// `Some` and send an event as soon as they know; a lagging receiver makes the
    /// watchdog renew everything at once to find out what it missed. The default,
    /// for stores where only a renewal can tell, is `None`.
    fn events(&self) -> Option<tokio::sync::broadcast::Receiver<StoreEvent>> {
        None
    }

    /// Reports the current holder of `name`: owner, token and remaining time, or
    /// `None` when nobody holds it (never held, released or expired). For tools and
    /// tests; the answer may be stale by the time it arrives.
    async fn inspect(&self, name: &LockName) -> Result<Option<LockState>>;
}
