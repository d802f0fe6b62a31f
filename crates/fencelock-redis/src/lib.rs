//! fencelock's store on a single Redis server ([`RedisBackend`]), with a Redis
//! [`FenceGate`](fencelock_core::FenceGate) ([`RedisFenceGate`]) for resources kept in
//! Redis.
//!
//! Most users reach this crate through the `fencelock` facade
//! (`fencelock::connect("redis://127.0.0.1:6379/")`). Use it directly to configure the
//! store in code or to fence writes to Redis keys.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use fencelock_core::Locker;
//! use fencelock_redis::{RedisBackend, RedisConfig};
//!
//! # async fn demo() -> fencelock_core::Result<()> {
//! let config = RedisConfig::from_url("redis://127.0.0.1:6379/0?prefix=billing:")?;
//! let backend = RedisBackend::connect(config).await?;
//! let gate = backend.fence_gate();
//! let locker = Locker::new(backend);
//! let guard = locker.lock("invoice/7").ttl(Duration::from_secs(10)).await?;
//! // The write and the token check happen in one script; an older token is refused.
//! gate.set_fenced("invoice/7", guard.token(), "invoice:7:status", b"paid").await?;
//! guard.release().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees and limits
//! - Mutual exclusion holds while the server keeps its data and runs: one key per
//!   lock, set with `NX` and a `PX` expiry, checked by owner and token on renew and
//!   release. A holder's view of its lease ends before the server's (validity counts
//!   from when the request was sent, minus 1 % + 2 ms for clock drift).
//! - Fencing tokens rise with every grant of a name, and keep rising after the
//!   server lost all its data or the name's counter expired, **as long as the server's
//!   clock does not go back** (they are never below the server time in µs). See
//!   [`RedisBackend`] for the exact rule.
//! - A single server is a single point of failure; with replication, a failover to a
//!   replica that missed the last writes can grant a held lock again. The tokens of
//!   such a second grant are still higher if the replica's clock is not behind, so a
//!   fence gate still refuses the older holder's writes.
//! - Keys must not be evicted: connecting fails when `maxmemory-policy` can evict
//!   (see [`RedisConfig::allow_eviction`]).
//! - TLS: `rediss://host:port/?ca=/path/ca.pem` verifies the server's certificate
//!   against the system's roots or the given CA; `cert=`/`key=` present a client
//!   certificate. Built with the `tls` feature (on by default; rustls with ring).
//!
//! Redis 6.2 or later is required (checked at connect; tested with 7.0).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod config;
#[doc(hidden)]
pub mod connection;
mod gate;
#[doc(hidden)]
pub mod scripts;
#[doc(hidden)]
pub mod wake;

pub use backend::RedisBackend;
pub use config::{RedisConfig, RedisNode, RedisTls};
#[doc(hidden)]
pub use config::{SharedOptions, check_duration, check_prefix, check_token_ttl, tls_unsupported};
pub use gate::RedisFenceGate;

/// The redis-rs this crate is built with.
pub use redis;

/// The store's name in messages and [`Capabilities`](fencelock_core::Capabilities).
pub(crate) const STORE: &str = "redis";
