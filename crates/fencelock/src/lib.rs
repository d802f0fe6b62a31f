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
//!
//! Redis, Redlock, etcd, ZooKeeper, Postgres and MySQL/MariaDB are planned; their
//! schemes are recognised and answer with an error saying so.
//!
//! # URL options
//! `ttl` (default TTL, e.g. `?ttl=10s`) and `wait` (default wait, e.g. `&wait=5s`;
//! otherwise `lock()` waits forever) apply to every store; each store documents its
//! own (e.g. SQLite's `table`, `prefix`, `busy_timeout`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod connect;

pub use connect::{SchemeInfo, connect, open_backend, schemes};
pub use fencelock_core::*;

/// The SQL stores (SQLite today).
#[cfg(feature = "sqlite")]
pub use fencelock_sql as sql;
