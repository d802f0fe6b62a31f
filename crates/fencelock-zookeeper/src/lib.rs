//! The fencelock store on ZooKeeper: locks in Apache Curator's `InterProcessMutex`
//! layout, fenced by the lock node's `czxid`, kept by one session per backend.
//!
//! Most users reach it through the `fencelock` facade
//! (`fencelock::connect("zk://127.0.0.1:2181/fencelock")`, feature `zookeeper`).
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use fencelock_core::Locker;
//! use fencelock_zookeeper::{ZooKeeperBackend, ZooKeeperConfig};
//!
//! # async fn demo() -> fencelock_core::Result<()> {
//! let config = ZooKeeperConfig::from_url("zk://127.0.0.1:2181/locks?session_timeout=10s")?;
//! let locker = Locker::new(ZooKeeperBackend::connect(config).await?);
//! let guard = locker.lock("invoice/7").ttl(Duration::from_secs(30)).await?;
//! // Send guard.token() with every write to the protected resource.
//! guard.release().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees and limits
//! - **Mutual exclusion** comes from ZooKeeper: among the ephemeral-sequential nodes
//!   under `{root}/{escaped name}`, the lowest sequence holds. Holders using Curator's
//!   `InterProcessMutex` (or any client using that layout) on the same path exclude
//!   ours and ours exclude them. Every child with a 10-digit sequence suffix counts,
//!   whatever its name, so kazoo's `Lock` (`{uuid}__lock__NNNNNNNNNN`) excludes ours
//!   too; kazoo counts ours when given `extra_lock_patterns=["-lock-"]`. Names are
//!   escaped into one path component (letters, digits, `-` and `_` stay; any other
//!   byte becomes `%XX`), so Curator and kazoo must use the escaped path.
//! - **Tokens** are the lock node's `czxid`: higher for every later grant, including
//!   after the lock's parent node was deleted and recreated.
//! - **Waiting** is by watch on the node just before ours: one release wakes one
//!   waiter, in arrival order.
//! - **Liveness**: a grant lasts while the session lives and, while this process runs,
//!   no longer than its TTL without a renewal (this backend deletes the node then). A
//!   crashed or frozen process's locks go when its session expires: after the session
//!   timeout, whatever the TTL. Keep the session timeout near your TTL.
//! - **Disconnected** is uncertain: guards report not held (`StoreEvent::Suspended`)
//!   until the session is back; **expired** is lost: every guard reports it
//!   (`StoreEvent::SessionLost`) and the next acquisition builds a fresh session.
//! - **The session's deadline**: the server may expire a session it has not heard
//!   from for the session timeout and grant its locks to others, before the client
//!   library says so. While it carries grants, the backend keeps the session answered
//!   (a `sync` whenever nothing went through the leader for a sixth of the timeout)
//!   and gives it up (every guard lost, the session closed) once three quarters of the
//!   timeout, less the drift allowance, have passed since the last answered `sync` or
//!   write was sent: before the server can grant anyone else.
//! - The grant's validity (`Lease::valid_until`) is measured from the request that
//!   saw us lowest (or the renewal's read, after a `sync`), by the local clock, and is
//!   capped at the session's deadline when the TTL is short enough for the watchdog's
//!   renewals (every third of the TTL) to keep up with it (a TTL up to about 1.7 times
//!   the session timeout); a longer TTL relies on the backend's report at that
//!   deadline. A holder that pauses past it must rely on the token being fenced.
//! - **Release**: a delete whose outcome is unknown (the connection broke) is retried
//!   in the background with backoff while the session lives.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod config;
mod recipe;
mod session;

pub use backend::ZooKeeperBackend;
pub use config::ZooKeeperConfig;

/// The ZooKeeper client this crate is built with, for [`ZooKeeperBackend::session`]
/// and operator tools.
pub use zookeeper_client;
