//! A fenced resource that records every write, and the checker that judges a run.
//!
//! Holders record the spans during which they *believed* they held the lock
//! ([`Hold`]); the resource records each read-modify-write with its token and whether
//! the gate accepted it ([`Write`]). [`check`] then finds, from the history alone:
//! repeated tokens, tokens that fall in real-time order, accepted writes that
//! interleave, and (when no pause or clock fault was injected) overlapping holds.

use std::sync::{Arc, Mutex};

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

/// A recorded run.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// Every hold, in any order.
    pub holds: Vec<Hold>,
    /// Every write, in any order.
    pub writes: Vec<Write>,
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
    /// Two holders believed they held the lock at the same time.
    HoldsOverlapped {
        /// The two holders and their tokens.
        holders: ((String, FencingToken), (String, FencingToken)),
    },
}

/// Judges `history`. `faults_injected` says whether pauses or clock faults were
/// injected, which legitimately let a paused holder keep believing it holds the lock;
/// overlapping holds are then left to the fence, and only the other rules apply.
///
/// # Errors
/// Every violation found.
pub fn check(history: &History, faults_injected: bool) -> Result<(), Vec<Violation>> {
    let mut violations = Vec::new();
    let mut holds: Vec<&Hold> = history.holds.iter().collect();
    holds.sort_by_key(|h| h.start);
    for (i, a) in holds.iter().enumerate() {
        for b in &holds[i + 1..] {
            if a.token == b.token && (a.holder != b.holder || a.start != b.start) {
                violations.push(Violation::RepeatedToken {
                    token: a.token,
                    holders: (a.holder.clone(), b.holder.clone()),
                });
            }
            if b.start >= a.end && b.token <= a.token && a.token != b.token {
                violations.push(Violation::TokenFell {
                    earlier: a.token,
                    later: b.token,
                });
            }
            if !faults_injected && b.start < a.end {
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
    if violations.is_empty() { Ok(()) } else { Err(violations) }
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
    /// [`Error::StaleToken`] if the gate refused the token at commit time.
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

/// Renders violations for an assertion message.
pub fn describe(violations: &[Violation]) -> String {
    violations.iter().map(|v| format!("\n  - {v:?}")).collect()
}

