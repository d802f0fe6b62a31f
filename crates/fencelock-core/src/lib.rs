//! The core of fencelock: the [`LockBackend`] contract every store implements, the
//! [`Locker`]/[`LockGuard`] client built once on top of it, fencing tokens and
//! [`FenceGate`]s, and the in-memory store.
//!
//! Most users depend on the `fencelock` facade crate, which re-exports all of this and
//! adds `connect(url)`. Driver authors implement [`LockBackend`] and run the
//! `fencelock-conformance` suite against it.
//!
//! # Why fencing tokens
//! No lease-based lock is safe by itself: a holder can pause (GC, SIGSTOP, a slow
//! network) past its lease and keep writing after someone else took the lock. Every
//! grant carries a [`FencingToken`] higher than every earlier grant's; a resource that
//! checks tokens through a [`FenceGate`] refuses the paused holder's late writes.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
pub mod backoff;
mod capabilities;
mod error;
mod gate;
mod guard;
mod lease;
mod locker;
mod memory;
mod name;
mod request;
pub mod url;
pub mod wake;
mod watchdog;

pub use backend::{LockBackend, StoreEvent};
pub use backoff::{Backoff, BackoffConfig, RetryPolicy};
pub use capabilities::{Capabilities, LeaseKind, WaitKind};
pub use error::{BoxError, Error, LossReason, Result};
pub use gate::{FenceGate, MemoryFenceGate};
pub use guard::{HeldLock, LockGuard};
pub use lease::{FencingToken, Lease, LockState, OwnerId, drift_allowance, valid_until};
pub use locker::{LockRequest, Locker, LockerOptions};
pub use memory::MemoryStore;
pub use name::LockName;
pub use request::{AcquireRequest, WaitDeadline, WaitPolicy, check_ttl};

/// Re-exported so drivers implement [`LockBackend`] with the same macro version.
pub use async_trait::async_trait;
