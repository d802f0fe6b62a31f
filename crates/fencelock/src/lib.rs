//! Distributed locks with fencing tokens, one API over many stores.
//!
//! Pick a store with a cargo feature and a URL; call sites never change when the
//! store does:
//!
//! ```
//! # async fn demo() -> fencelock::Result<()> {
//! use std::time::Duration;
//!
//! let locker = fencelock::connect("memory://").await?;
//! let guard = locker.lock("orders/42").ttl(Duration::from_secs(10)).wait(Duration::from_secs(5)).await?;
//! let token = guard.token(); // send it with every write; a FenceGate refuses stale ones
//! # let _ = token;
//! guard.release().await?;
//! # Ok(()) }
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(demo()).unwrap();
//! ```
//!
//! Every grant carries a [`FencingToken`] higher than every earlier grant's of the same
//! name. A lease-based lock alone cannot stop a holder that paused past its lease from
//! writing; a resource that checks tokens through a [`FenceGate`] can.
//!
//! # Stores
//! | URL | feature | store |
//! |---|---|---|
//! | `memory://` or `memory://NAME` | always | in-process, for unit tests |
//! | `sqlite://PATH` | `sqlite` (default) | embedded SQLite file, safe across processes on one host |
//! | `redis://[user:pass@]host:port[/db]` | `redis` | single-node Redis |
//! | `redlock://h1:p,h2:p,h3:p` | `redlock` | Redlock over N independent Redis nodes |
//! | `etcd://h1:p,h2:p` | `etcd` | etcd v3 (`concurrency.Mutex` layout) |
//! | `zk://h1:p,h2:p/root`, `zookeeper://` | `zookeeper` | ZooKeeper (Curator `InterProcessMutex` layout) |
//! | `postgres://`, `postgresql://` | `postgres` | Postgres lease rows (or `?mode=session`: advisory locks) |
//! | `mysql://`, `mariadb://` | `mysql` | MySQL/MariaDB lease rows (or `?mode=session`: `GET_LOCK`) |
//!
//! A scheme whose feature is off answers with an error naming the feature.
//!
//! # URL options
//! `ttl` (default TTL, e.g. `?ttl=10s`) and `wait` (default wait, e.g. `&wait=5s`;
//! otherwise `lock()` waits forever) apply to every store; each store documents its
//! own (e.g. SQLite's `table`, `prefix`, `busy_timeout`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod connect;

pub use connect::{SchemeInfo, connect, open_backend, schemes};
pub use fencelock_core::{
    AcquireRequest, BoxError, Capabilities, Error, FenceGate, FencingToken, HeldLock, Lease,
    LeaseKind, LockBackend, LockGuard, LockName, LockRequest, LockState, Locker, LockerOptions,
    LossReason, MemoryFenceGate, MemoryStore, OwnerId, Result, StoreEvent, WaitKind, WaitPolicy,
};

/// For authors of store drivers, not for users of locks: the pieces a
/// [`LockBackend`] implementation shares with the built-in drivers (URL parsing, wait
/// deadlines, validity arithmetic, the in-process wake-up of waiters).
pub mod driver {
    pub use fencelock_core::{
        WaitDeadline, async_trait, check_ttl, drift_allowance, url, valid_until, wake,
    };
}

/// The etcd store.
#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
pub use fencelock_etcd as etcd;
/// The Redis store.
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use fencelock_redis as redis;
/// The Redlock store.
#[cfg(feature = "redlock")]
#[cfg_attr(docsrs, doc(cfg(feature = "redlock")))]
pub use fencelock_redlock as redlock;
/// The SQL stores.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql")))
)]
pub use fencelock_sql as sql;
/// The ZooKeeper store.
#[cfg(feature = "zookeeper")]
#[cfg_attr(docsrs, doc(cfg(feature = "zookeeper")))]
pub use fencelock_zookeeper as zookeeper;
