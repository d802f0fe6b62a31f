//! The shared safety suite for fencelock stores.
//!
//! - [`suite`]: the properties, plain `async fn`s over a [`StoreFixture`]; run them all
//!   with [`conformance_tests!`].
//! - [`history`]: a fenced resource that records every write, and the checker that
//!   judges a recorded run.
//! - [`harness`]: real servers started from `PATH` on free loopback ports, owned by pid.
//! - [`proxy`]: a loopback TCP fault proxy switched at runtime.
//! - [`faults`]: fault scenarios for every store (holder process killed, holder paused
//!   past its TTL, a checked run with a paused holder); run them with
//!   [`fault_tests!`].
//! - [`worker`]: drives the `fencelock-worker` binary, a lock holder in a process of
//!   its own that a test can pause or kill whole.
//! - [`resource`]: a fenced resource in a SQLite file that worker processes share,
//!   with a write log the checker reads.
//! - [`skew`]: scenarios with clients whose wall clocks are two hours off, for the
//!   SQL stores; run them with [`skew_tests!`].
//! - [`broken`]: deliberately broken drivers, each breaking one rule, that the checker
//!   must catch.
//!
//! A third-party driver runs the same suite on its own store:
//!
//! ```ignore
//! async fn fixture() -> MyFixture { MyFixture::start().await }
//! fencelock_conformance::conformance_tests!(fixture);
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod broken;
pub mod faults;
mod fixture;
pub mod harness;
pub mod history;
pub mod proxy;
pub mod resource;
pub mod skew;
pub mod suite;
pub mod worker;

pub use fixture::{MemoryFixture, SqliteFixture, StoreFixture};

/// Expands to one `#[tokio::test]` per property of the [`suite`], each run against the
/// fixture that `$fixture().await` returns (a fresh one per test).
#[macro_export]
macro_rules! conformance_tests {
    ($fixture:path) => {
        $crate::conformance_tests!(@each $fixture;
            second_holder_is_refused,
            reacquire_after_release_gets_a_higher_token,
            release_of_a_lost_lease_spares_the_new_holder,
            lock_is_not_taken_before_its_ttl_and_is_free_after,
            auto_renew_keeps_a_lock_past_three_ttls,
            waiter_wakes_on_release,
            wait_times_out,
            dropped_acquire_leaves_nothing_behind,
            independent_names_do_not_interfere,
            names_at_the_limits,
            zero_ttl_is_refused,
            lost_fires_when_deleted_and_with_lock_aborts_the_work,
            max_hold_ends_the_lock,
            stale_token_is_refused_by_the_gate,
            fenced_increments_are_exact,
        );
    };
    (@each $fixture:path; $($property:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $property() {
                let fixture = $fixture().await;
                $crate::suite::run_bounded(
                    stringify!($property),
                    $crate::suite::$property(&fixture),
                )
                .await;
            }
        )*
    };
}
