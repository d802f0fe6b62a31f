//! fencelock stores on SQL databases through [sqlx]. Today: SQLite
//! ([`SqliteBackend`], feature `sqlite`, on by default); Postgres and MySQL will join
//! under their own features.
//!
//! Most users reach this crate through the `fencelock` facade
//! (`fencelock::connect("sqlite://locks.db")`). Use it directly to configure the store
//! in code or to fence writes inside your own SQL transactions with
//! [`SqliteFenceGate`].
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use fencelock_core::Locker;
//! use fencelock_sql::{SqliteBackend, SqliteConfig};
//!
//! # async fn demo() -> fencelock_core::Result<()> {
//! let config = SqliteConfig::from_url("sqlite://locks.db?prefix=billing/")?;
//! let backend = SqliteBackend::connect(config).await?;
//! let gate = backend.fence_gate().await?;
//! let locker = Locker::new(backend);
//! let guard = locker.lock("invoice/7").ttl(Duration::from_secs(10)).await?;
//! // Writes to the resource carry the token; the gate refuses any older one.
//! gate.admit_in(gate.pool(), "invoice/7", guard.token()).await?;
//! guard.release().await?;
//! # Ok(())
//! # }
//! ```
//!
//! The store's rules (database time only, tokens that outlive rows, waiting by polling
//! plus in-process wake-ups, cancel-safety) are documented on [`SqliteBackend`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "sqlite")]
mod config;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "sqlite")]
pub use config::SqliteConfig;
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteBackend, SqliteFenceGate};

/// The sqlx this crate is built with: use it for the executors and transactions you
/// pass to [`SqliteFenceGate::admit_in`] so the versions match.
pub use sqlx;
