//! fencelock stores on SQL databases through [sqlx], one cargo feature each:
//! SQLite (`SqliteBackend`, feature `sqlite`, on by default), Postgres
//! (`PostgresBackend`, feature `postgres`) and MySQL/MariaDB (`MySqlBackend`, feature
//! `mysql`). Every store keeps one lease row per lock name whose expiry is judged by
//! the database's clock only, with a fencing counter in the same row.
//!
//! Most users reach this crate through the `fencelock` facade
//! (`fencelock::connect("sqlite://locks.db")`). Use it directly to configure the store
//! in code or to fence writes inside your own SQL transactions with
//! `SqliteFenceGate`, `PostgresFenceGate` or `MySqlFenceGate`.
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

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
mod backoff;
#[cfg(feature = "sqlite")]
mod config;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
mod fence;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
mod identifier;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
mod in_flight;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
mod lease;
#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(any(feature = "postgres", feature = "mysql"))]
mod server_config;
#[cfg(any(feature = "postgres", feature = "mysql"))]
mod server_locks;
#[cfg(any(feature = "postgres", feature = "mysql"))]
mod session_table;
#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
#[cfg(feature = "sqlite")]
pub use config::SqliteConfig;
#[cfg(feature = "mysql")]
pub use mysql::{MySqlBackend, MySqlConfig, MySqlFenceGate};
#[cfg(feature = "postgres")]
pub use postgres::{PostgresBackend, PostgresConfig, PostgresFenceGate};
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub use server_config::{LockMode, ServerAddress};
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteBackend, SqliteFenceGate};

/// The sqlx this crate is built with: use it for the executors and transactions you
/// pass to the fence gates' `admit_in` so the versions match.
pub use sqlx;
