//! A fenced resource that records every write, and the checker that judges a run.
//!
//! Holders record the spans during which they *believed* they held the lock
//! ([`Hold`]); the resource records each read-modify-write with its token and whether
//! the gate accepted it ([`Write`]); fault tools record which holder they paused or
//! killed ([`HolderFault`]); waiters record how long they waited ([`Attempt`]).
//! [`check`] then finds, from the history alone: repeated tokens, tokens that fall in
//! real-time order, accepted writes that interleave, overlapping holds not excused by
//! a pause of one of them, and locks not granted to a waiter within a stalled
//! holder's TTL plus a bound (liveness).
//!
//! Histories recorded by several processes use the shared clock of [`micros_at`] and
//! [`instant_at_micros`]; [`SharedResource`](crate::resource::SharedResource) is the
//! fenced resource those processes write to.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fencelock_core::{FencingToken, MemoryFenceGate, Result};
use tokio::time::Instant;

/// A span during which `holder` believed it held the lock with `token`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    /// Who held it (a worker's name).
    pub holder: String,
    /// The grant's token.
    pub token: FencingToken,
    /// When the grant was returned to the holder.
    pub start: Instant,
    /// When the holder stopped believing it held the lock (before its release).
    pub end: Instant,
}

/// One read-modify-write on the fenced resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// Who wrote.
    pub holder: String,
    /// The token it wrote with.
    pub token: FencingToken,
    /// When it read the value.
    pub start: Instant,
    /// When its write was committed or refused.
    pub end: Instant,
    /// Whether the gate accepted the write.
    pub accepted: bool,
}

/// What a fault tool did to a holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Paused (SIGSTOP, or a holder that stopped renewing while it kept its lease):
    /// on resume it may still believe it holds the lock, which only the fence can
    /// catch. Holds that began after the pause may overlap its hold.
    Paused,
    /// Killed: it never resumes, and its hold ends at the validity it last reported.
    /// Excuses no overlap.
    Killed,
}

/// A fault injected on the holder of a grant: from `at` on, it renewed no more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HolderFault {
    /// The holder.
    pub holder: String,
    /// The token of the grant it held.
    pub token: FencingToken,
    /// Paused or killed.
    pub kind: FaultKind,
    /// When the fault began (just before the signal was sent).
    pub at: Instant,
    /// The TTL of the grant: the store must free the lock within it.
    pub ttl: Duration,
}

/// One acquisition attempt that may have waited, for the liveness rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// Who tried.
    pub holder: String,
    /// When the request was sent.
    pub start: Instant,
    /// When it was granted or gave up.
    pub end: Instant,
    /// The token it was granted, `None` if it gave up.
    pub granted: Option<FencingToken>,
}

/// A recorded run.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// Every hold, in any order.
    pub holds: Vec<Hold>,
    /// Every write, in any order.
    pub writes: Vec<Write>,
    /// Every fault injected on a holder.
    pub faults: Vec<HolderFault>,
    /// Acquisition attempts; only needed for the liveness rule.
    pub attempts: Vec<Attempt>,
}

impl History {
    /// The fault recorded on the grant `(holder, token)`, if any.
    fn fault_on(&self, holder: &str, token: FencingToken) -> Option<&HolderFault> {
        self.faults
            .iter()
            .find(|f| f.holder == holder && f.token == token)
    }
}

/// A rule a history broke.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Two different grants carried the same token.
    RepeatedToken {
        /// The token.
        token: FencingToken,
        /// The two holders.
        holders: (String, String),
    },
    /// A grant that began after another ended carried a token that is not higher.
    TokenFell {
        /// The earlier grant's token.
        earlier: FencingToken,
        /// The later grant's token.
        later: FencingToken,
    },
    /// Two accepted writes overlapped in time (a lost update is possible).
    WritesInterleaved {
        /// The two writers and their tokens.
        writers: ((String, FencingToken), (String, FencingToken)),
    },
    /// Two holders believed they held the lock at the same time, and no pause of one
    /// of them explains it.
    HoldsOverlapped {
        /// The two holders and their tokens.
        holders: ((String, FencingToken), (String, FencingToken)),
    },
    /// A holder stopped renewing (paused or killed), and a waiter was still not
    /// granted the lock once the holder's TTL plus the liveness bound had passed.
    NotGranted {
        /// The stalled holder and its token.
        stalled: (String, FencingToken),
        /// The waiter.
        waiter: String,
        /// How long the waiter waited in all.
        waited: Duration,
    },
}

/// What [`check_with`] judges beyond the always-on rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checks {
    /// Pauses or clock faults were injected without being recorded per holder: every
    /// overlap of holds is then left to the fence. Recorded [`HolderFault`]s need not
    /// set this; they excuse exactly the overlaps they explain.
    pub faults_injected: bool,
    /// How long after a stalled holder's TTL ran out a waiter may still wait. A
    /// generous allowance for the store's notification or polling, not a target.
    pub liveness_bound: Duration,
}

impl Checks {
    /// The default [`liveness_bound`](Self::liveness_bound).
    pub const DEFAULT_LIVENESS_BOUND: Duration = Duration::from_secs(2);
}

impl Default for Checks {
    fn default() -> Self {
        Self {
            faults_injected: false,
            liveness_bound: Self::DEFAULT_LIVENESS_BOUND,
        }
    }
}

/// Judges `history`. `faults_injected` says whether pauses or clock faults were
/// injected without being recorded in [`History::faults`], which legitimately let a
/// paused holder keep believing it holds the lock; overlapping holds are then left to
/// the fence, and only the other rules apply. Liveness uses the default bound.
///
/// # Errors
/// Every violation found.
pub fn check(history: &History, faults_injected: bool) -> Result<(), Vec<Violation>> {
    check_with(
        history,
        &Checks {
            faults_injected,
            ..Checks::default()
        },
    )
}

/// Judges `history` by every rule, as `checks` configures them:
///
/// - tokens never repeat across grants, and a grant that began after another ended
///   has a higher token;
/// - accepted writes never interleave;
/// - holds never overlap, except where one holder was [paused](FaultKind::Paused) and
///   the other hold began after that pause (or `checks.faults_injected` is set);
/// - after a holder stalls (paused or killed) at `t` with TTL `ttl`, someone else is
///   granted the lock by `t + ttl + checks.liveness_bound` if anyone was waiting then.
///
/// # Errors
/// Every violation found.
pub fn check_with(history: &History, checks: &Checks) -> Result<(), Vec<Violation>> {
    let mut violations = Vec::new();
    let mut holds: Vec<&Hold> = history.holds.iter().collect();
    holds.sort_by_key(|h| h.start);
    let paused_before = |hold: &Hold, instant: Instant| {
        history
            .fault_on(&hold.holder, hold.token)
            .is_some_and(|f| f.kind == FaultKind::Paused && f.at <= instant)
    };
    for (i, a) in holds.iter().enumerate() {
        for b in &holds[i + 1..] {
            if a.token == b.token && (a.holder != b.holder || a.start != b.start) {
                violations.push(Violation::RepeatedToken {
                    token: a.token,
                    holders: (a.holder.clone(), b.holder.clone()),
                });
            }
            if b.start >= a.end && b.token < a.token {
                violations.push(Violation::TokenFell {
                    earlier: a.token,
                    later: b.token,
                });
            }
            let excused =
                checks.faults_injected || paused_before(a, b.start) || paused_before(b, a.start);
            if b.start < a.end && !excused {
                violations.push(Violation::HoldsOverlapped {
                    holders: ((a.holder.clone(), a.token), (b.holder.clone(), b.token)),
                });
            }
        }
    }
    let mut writes: Vec<&Write> = history.writes.iter().filter(|w| w.accepted).collect();
    writes.sort_by_key(|w| w.start);
    for pair in writes.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if b.start < a.end && a.token != b.token {
            violations.push(Violation::WritesInterleaved {
                writers: ((a.holder.clone(), a.token), (b.holder.clone(), b.token)),
            });
        }
    }
    violations.extend(liveness(history, checks.liveness_bound));
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

/// One [`Violation::NotGranted`] per stalled holder whose lock nobody got in time
/// although someone was waiting for it.
fn liveness(history: &History, bound: Duration) -> Vec<Violation> {
    let mut violations = Vec::new();
    for fault in &history.faults {
        let deadline = fault.at + fault.ttl + bound;
        let granted_in_time = history.holds.iter().any(|h| {
            (h.holder != fault.holder || h.token != fault.token)
                && h.start > fault.at
                && h.start <= deadline
        });
        if granted_in_time {
            continue;
        }
        let starved = history
            .attempts
            .iter()
            .find(|a| a.start <= deadline && a.end > deadline);
        if let Some(attempt) = starved {
            violations.push(Violation::NotGranted {
                stalled: (fault.holder.clone(), fault.token),
                waiter: attempt.holder.clone(),
                waited: attempt.end - attempt.start,
            });
        }
    }
    violations
}

/// A counter behind a fence gate: each increment reads the value, yields (so a second
/// writer could interleave), and commits only if its token passes the gate at commit
/// time. Every attempt is recorded as a [`Write`].
#[derive(Clone, Debug, Default)]
pub struct FencedCounter {
    inner: Arc<Mutex<CounterState>>,
    gate: MemoryFenceGate,
}

#[derive(Debug, Default)]
struct CounterState {
    value: u64,
    writes: Vec<Write>,
}

impl FencedCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Increments the counter as `holder` with `token`.
    ///
    /// # Errors
    /// [`Error::StaleToken`](fencelock_core::Error::StaleToken) if the gate refused the
    /// token at commit time.
    pub async fn increment(&self, holder: &str, token: FencingToken) -> Result<()> {
        let start = Instant::now();
        let read = self.state().value;
        tokio::task::yield_now().await;
        let mut state = self.state();
        let admitted = self.gate.admit_now("counter", token);
        if admitted.is_ok() {
            state.value = read + 1;
        }
        state.writes.push(Write {
            holder: holder.to_owned(),
            token,
            start,
            end: Instant::now(),
            accepted: admitted.is_ok(),
        });
        admitted
    }

    /// The current value.
    pub fn value(&self) -> u64 {
        self.state().value
    }

    /// Every write so far.
    pub fn writes(&self) -> Vec<Write> {
        self.state().writes.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CounterState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The shared clock's reading at a local instant, in microseconds since the Unix
/// epoch: what processes on one host exchange to record one history.
///
/// Each process maps its monotonic clock to the wall clock once (at the first call),
/// so readings within a process keep their order and spacing, and readings of
/// different processes agree to within microseconds unless the wall clock is stepped
/// during the run. Real time only: meaningless under `tokio::time::pause`.
pub fn micros_at(instant: Instant) -> u64 {
    let (anchor_micros, anchor) = anchor();
    if instant >= anchor {
        anchor_micros.saturating_add(micros(instant - anchor))
    } else {
        anchor_micros.saturating_sub(micros(anchor - instant))
    }
}

/// The local instant at which the shared clock read `micros` (the inverse of
/// [`micros_at`]).
pub fn instant_at_micros(micros: u64) -> Instant {
    let (anchor_micros, anchor) = anchor();
    if micros >= anchor_micros {
        anchor + Duration::from_micros(micros - anchor_micros)
    } else {
        let back = Duration::from_micros(anchor_micros - micros);
        anchor.checked_sub(back).unwrap_or(anchor)
    }
}

/// The shared clock now (see [`micros_at`]).
pub fn now_micros() -> u64 {
    micros_at(Instant::now())
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

fn anchor() -> (u64, Instant) {
    static ANCHOR: OnceLock<(u64, std::time::Instant)> = OnceLock::new();
    let (micros_then, instant) = *ANCHOR.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        (micros(wall), std::time::Instant::now())
    });
    (micros_then, Instant::from_std(instant))
}

/// Renders violations for an assertion message.
pub fn describe(violations: &[Violation]) -> String {
    violations.iter().map(|v| format!("\n  - {v:?}")).collect()
}

/// Panics with every violation if `history` breaks a rule that `checks` judges.
pub(crate) fn assert_passes(history: &History, checks: &Checks) {
    if let Err(violations) = check_with(history, checks) {
        panic!(
            "the history breaks the lock's rules:{}",
            describe(&violations)
        );
    }
}
