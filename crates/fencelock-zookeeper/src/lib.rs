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
//!   ours and ours exclude them. Names are escaped into one path component (letters,
//!   digits, `-` and `_` stay; any other byte becomes `%XX`), so Curator must use the
//!   escaped path.
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
//! - The grant's validity (`Lease::valid_until`) is measured from the request that
//!   saw us lowest, by the local clock; a holder that pauses past it must rely on the
//!   token being fenced.
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
