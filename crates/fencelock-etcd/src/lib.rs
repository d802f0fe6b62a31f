//! fencelock on etcd v3: one session lease per backend, fencing tokens from create
//! revisions, predecessor watches, and the key layout of etcd's `concurrency.Mutex`.
//!
//! ```no_run
//! # async fn run() -> fencelock_core::Result<()> {
//! use fencelock_core::Locker;
//! use fencelock_etcd::{EtcdBackend, EtcdConfig};
//!
//! let config = EtcdConfig::from_url("etcd://127.0.0.1:2379?prefix=app/locks/")?;
//! let locker = Locker::new(EtcdBackend::connect(config).await?);
//! let guard = locker.lock("orders/42").await?;
//! println!("fencing token {}", guard.token());
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! # How it works
//! - The lock `NAME` is the set of keys under `{prefix}NAME/`. An acquisition puts
//!   `{prefix}NAME/{lease:x}-{owner}` with the backend's session lease, in one
//!   transaction that also reads the queue; the key with the lowest create revision
//!   holds the lock. Its create revision is the fencing token.
//! - A waiter watches the deletion of the key just before its own (no herd), then
//!   re-reads the queue and checks its own key is still there before it claims the lock.
//! - Release deletes our key only if its create revision is still our token.
//! - One lease per backend is kept alive by one keep-alive stream; its local deadline
//!   is measured from when each keep-alive was sent.
//!
//! # Guarantees and limits
//! - Mutual exclusion holds while etcd is linearizable (a quorum up); tokens rise with
//!   etcd's revision and survive restarts that keep the data.
//! - With `prefix=` empty, locks exclude `etcdctl lock NAME` and Go's
//!   `concurrency.Mutex` on the same name, both ways.
//! - When the session lease dies (expired, revoked, or keep-alives unanswered until its
//!   deadline) every grant of the backend is lost at once, reported as
//!   `StoreEvent::SessionLost`; the next acquisition starts a new session.
//! - A grant not renewed within its TTL is deleted by this backend; a client that stops
//!   entirely (crash, pause, partition) keeps its grants until the session lease
//!   expires, i.e. up to [`EtcdConfig::session_ttl`]. The fencing token is what makes
//!   a paused holder's late writes refusable.
//! - Renewals cost no writes: a local check plus one read per 128 held locks.
//! - Every request has a deadline (3 s) and is retried, up to 5 tries, when it timed
//!   out or failed temporarily (member unreachable, no leader, leader changed); the
//!   client spreads requests over every endpoint, so a retry usually reaches a live
//!   member. A put that etcd applied without answering is recognised on the retry, and
//!   a key whose deletion failed is deleted again while its session lives. The
//!   keep-alive stream is re-opened when a keep-alive goes unanswered for a third of
//!   the session TTL.
//! - An abandoned try can still be applied later, after the key was released or given
//!   up (a frozen member proposes the put it read when it resumes). Each put therefore
//!   also requires that a tombstone key `{prefix}\0NAME/{lease:x}-{owner}/{n}` does
//!   not exist, and deleting a key any of whose puts went unanswered writes that
//!   tombstone, on the session lease, in the same transaction: a late put changes
//!   nothing, and the tombstones (one per such acquisition) go with the session. An
//!   acquisition whose put is answered at once writes none.
//! - Names that are prefixes of others at a `/` (`a` and `a/b`) are kept apart by this
//!   driver, but `etcdctl lock a` would queue behind holders of `a/b`.
//! - Plain HTTP only: TLS is not supported yet.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod config;
mod session;

pub use backend::EtcdBackend;
pub use config::EtcdConfig;
/// The etcd client crate this driver is built on, for operator tools and tests.
pub use etcd_client;
