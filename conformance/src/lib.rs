//! The shared safety suite for fencelock stores.
//!
//! - [`suite`]: the properties, plain `async fn`s over a [`StoreFixture`]; run them all
//!   with [`conformance_tests!`].
//! - [`history`]: a fenced resource that records every write, and the checker that
//!   judges a recorded run.
//! - [`harness`]: real servers started from `PATH` on free loopback ports, owned by pid.
//! - [`proxy`]: a loopback TCP fault proxy switched at runtime.
//! - [`paused_run`]: a checked in-process run with a holder paused past its TTL; it
//!   needs only the store under test.
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
//! ## Cargo features
//!
//! With `default-features = false` the crate depends only on `fencelock-core` (and
//! tokio): the properties, [`StoreFixture`], the history checker, the in-process
//! paused run, the fault proxy and the broken drivers. That is all a third-party
//! driver needs to run [`conformance_tests!`] in its own CI, and it builds no store
//! client.
//!
//! | feature | adds |
//! |---|---|
//! | `harness` | [`harness`]: real servers started from `PATH` |
//! | `processes` | [`faults`], [`worker`], [`resource`] (a SQLite file), [`skew`] and `SqliteFixture`: process-level fault scenarios |
//! | `worker` | the `fencelock-worker` binary (every store of the facade, by URL) |
//! | `full` (default) | all of the above |
//!
//! A third-party driver runs the same suite on its own store:
//!
//! ```ignore
//! async fn fixture() -> MyFixture { MyFixture::start().await }
//! fencelock_conformance::conformance_tests!(fixture);
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

/// Items that need one of this crate's cargo features, with the feature shown on
/// docs.rs.
macro_rules! cfg_feature {
    ($feature:literal; $($item:item)*) => {
        $(
            #[cfg(feature = $feature)]
            #[cfg_attr(docsrs, doc(cfg(feature = $feature)))]
            $item
        )*
    };
}

pub mod broken;
mod fixture;
pub mod history;
pub mod paused_run;
pub mod proxy;
pub mod suite;

cfg_feature! { "harness";
    pub mod harness;
}

cfg_feature! { "processes";
    pub mod faults;
    pub mod resource;
    pub mod skew;
    pub mod worker;
    mod sqlite_fixture;
    pub use sqlite_fixture::SqliteFixture;
}

pub use fixture::{MemoryFixture, StoreFixture};

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
            renew_all_answers_each_lease_in_order,
            waiters_are_granted_in_arrival_order,
            events_announce_a_lost_grant,
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
