//! The checker's self-tests: every deliberately broken driver is caught by the run
//! with a paused holder, and a correct driver (the memory store) passes the same run.
//! Plus the checker's own rules on small hand-made histories.

use std::sync::Arc;
use std::time::Duration;

use fencelock_conformance::broken::{NoTtl, PlainDelete, RandomToken, ResettingCounter};
use fencelock_conformance::history::{
    Attempt, Checks, FaultKind, History, Hold, HolderFault, Violation, check, check_with, describe,
};
use fencelock_conformance::paused_run::{PausedRun, run_with_a_paused_holder};
use fencelock_core::{FencingToken, LockBackend, MemoryStore};
use tokio::time::Instant;

/// Runs the paused-holder scenario with every client on `backend` and returns what the
/// checker found.
async fn violations_of(backend: impl LockBackend) -> (History, Vec<Violation>) {
    let run = PausedRun::default();
    let backend: Arc<dyn LockBackend> = Arc::new(backend);
    let clients = vec![backend; run.workers + 1];
    let history = run_with_a_paused_holder(&clients, &run).await;
    let violations = check_with(&history, &run.checks())
        .err()
        .unwrap_or_default();
    (history, violations)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_driver_passes_the_run_with_a_paused_holder() {
    // Rule: a store that keeps the contract produces a history with no violation, and
    // the fence refuses the paused holder's late write.
    let (history, violations) = violations_of(MemoryStore::new()).await;
    assert!(
        violations.is_empty(),
        "the memory store was flagged:{}",
        describe(&violations)
    );
    assert!(
        history.holds.len() > 10,
        "too few grants to judge: {}",
        history.holds.len()
    );
    let late = history
        .writes
        .iter()
        .filter(|w| w.holder == PausedRun::PAUSED_HOLDER)
        .max_by_key(|w| w.start)
        .expect("the paused holder wrote after its pause");
    assert!(
        !late.accepted,
        "the paused holder's late write was admitted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ttl_is_caught_as_a_lock_never_freed() {
    // Rule (liveness): after a holder stops renewing, a waiter is granted the lock
    // within the holder's TTL plus a bound.
    let (_, violations) = violations_of(NoTtl::new(MemoryStore::new())).await;
    assert!(
        violations.iter().any(|v| matches!(v, Violation::NotGranted { stalled, .. } if stalled.0 == PausedRun::PAUSED_HOLDER)),
        "NoTtl was not caught as a liveness failure:{}",
        describe(&violations)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_delete_is_caught_as_overlapping_holds() {
    // Rule: two holders never believe they hold the lock at once unless one was paused;
    // a lost holder's release must not free its successor's lock.
    let (_, violations) = violations_of(PlainDelete::new(MemoryStore::new())).await;
    let paused = PausedRun::PAUSED_HOLDER;
    assert!(
        violations.iter().any(|v| matches!(v, Violation::HoldsOverlapped { holders } if holders.0.0 != paused && holders.1.0 != paused)),
        "PlainDelete was not caught as two unpaused holders overlapping:{}",
        describe(&violations)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_tokens_are_caught_falling() {
    // Rule: a grant that begins after another ended carries a higher token.
    let (history, violations) = violations_of(RandomToken::new(MemoryStore::new())).await;
    // More than ten grants one after another: random tokens all rising has odds of
    // at most 1 in 10!.
    assert!(
        history.holds.len() > 10,
        "too few grants to judge: {}",
        history.holds.len()
    );
    assert!(
        violations
            .iter()
            .any(|v| matches!(v, Violation::TokenFell { .. })),
        "RandomToken was not caught with falling tokens:{}",
        describe(&violations)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resetting_counter_is_caught_repeating_tokens() {
    // Rule: tokens never repeat and never fall, also across a counter reset.
    let (_, violations) = violations_of(ResettingCounter::new(MemoryStore::new(), 5)).await;
    assert!(
        violations
            .iter()
            .any(|v| matches!(v, Violation::RepeatedToken { .. })),
        "ResettingCounter was not caught repeating tokens:{}",
        describe(&violations)
    );
    assert!(
        violations
            .iter()
            .any(|v| matches!(v, Violation::TokenFell { .. })),
        "ResettingCounter was not caught with falling tokens:{}",
        describe(&violations)
    );
}

fn at(base: Instant, ms: u64) -> Instant {
    base + Duration::from_millis(ms)
}

fn hold(holder: &str, token: u64, start: Instant, end: Instant) -> Hold {
    Hold {
        holder: holder.into(),
        token: FencingToken(token),
        start,
        end,
    }
}

fn fault(holder: &str, token: u64, kind: FaultKind, at: Instant) -> HolderFault {
    HolderFault {
        holder: holder.into(),
        token: FencingToken(token),
        kind,
        at,
        ttl: Duration::from_millis(100),
    }
}

#[test]
fn an_overlap_is_excused_only_by_a_pause_that_began_before_the_other_hold() {
    // Rule: overlapping holds are a violation unless one holder was paused and the
    // other hold began after that pause; a kill excuses nothing.
    let t = Instant::now();
    let mut history = History {
        holds: vec![
            hold("a", 1, at(t, 0), at(t, 500)),
            hold("b", 2, at(t, 200), at(t, 300)),
        ],
        ..History::default()
    };
    let overlapped = |h: &History| {
        check(h, false)
            .err()
            .unwrap_or_default()
            .iter()
            .any(|v| matches!(v, Violation::HoldsOverlapped { .. }))
    };
    assert!(
        overlapped(&history),
        "an unexplained overlap must be flagged"
    );
    history.faults = vec![fault("a", 1, FaultKind::Paused, at(t, 250))];
    assert!(
        overlapped(&history),
        "a pause after the other hold began explains nothing"
    );
    history.faults = vec![fault("a", 1, FaultKind::Killed, at(t, 50))];
    assert!(overlapped(&history), "a kill excuses no overlap");
    history.faults = vec![fault("a", 1, FaultKind::Paused, at(t, 50))];
    assert!(
        !overlapped(&history),
        "b began after a's pause: only the fence can tell a"
    );
    history.faults.clear();
    assert!(
        check(&history, true).is_ok(),
        "faults_injected leaves every overlap to the fence"
    );
}

#[test]
fn a_waiter_not_granted_within_the_ttl_and_bound_of_a_stalled_holder_is_a_liveness_failure() {
    // Rule: once a holder stalls at t with TTL ttl, someone waiting is granted the lock
    // by t + ttl + bound.
    let t = Instant::now();
    let checks = Checks {
        faults_injected: false,
        liveness_bound: Duration::from_millis(200),
    };
    let waited = |granted_ms: u64| History {
        holds: vec![
            hold("a", 1, at(t, 0), at(t, 100)),
            hold("b", 2, at(t, granted_ms), at(t, granted_ms + 10)),
        ],
        faults: vec![fault("a", 1, FaultKind::Killed, at(t, 50))],
        attempts: vec![Attempt {
            holder: "b".into(),
            start: at(t, 60),
            end: at(t, granted_ms),
            granted: Some(FencingToken(2)),
        }],
        ..History::default()
    };
    // Deadline: 50 + 100 + 200 = 350 ms.
    assert!(check_with(&waited(340), &checks).is_ok(), "granted in time");
    let violations = check_with(&waited(900), &checks).expect_err("granted 550 ms late");
    assert!(
        matches!(violations.as_slice(), [Violation::NotGranted { stalled, waiter, .. }] if stalled.0 == "a" && waiter == "b"),
        "{}",
        describe(&violations)
    );
}
