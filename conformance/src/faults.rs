//! Fault scenarios, written once for every store: plain `async fn`s over a
//! [`StoreFixture`], each stating its rule, returning [`Verdict::NotApplicable`] where
//! the store's capabilities rule it out and panicking with the broken rule otherwise.
//! Run them all for a store with [`fault_tests!`](crate::fault_tests); a store then
//! adds only its server and its own faults.
//!
//! - **Process-level** scenarios run holders as whole `fencelock-worker` processes
//!   ([`Worker`]) that a test kills or pauses, watchdog included. They apply to stores
//!   shared between processes (`Capabilities::shared_between_processes`), so not to
//!   the in-memory store, which lives in one process.
//! - [`run_with_a_paused_holder`] (from [`paused_run`](crate::paused_run), re-exported
//!   here) records an in-process run of workers contending for one lock while one
//!   holder is paused past its TTL; the checker judges it ([`PausedRun::checks`]). It
//!   applies to every store, and it is how the [`broken`](crate::broken) drivers are
//!   shown to be caught.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::{Instant, sleep};

use crate::StoreFixture;
use crate::history::{self, Attempt, Checks, FaultKind, History, Hold, HolderFault};
use crate::resource::SharedResource;
use crate::suite::{Verdict, unique_name};
use crate::worker::{Acquired, Grant, Released, Worker, WorkerState, Written};

pub use crate::paused_run::{PausedRun, paused_holder_run_passes_the_checker, run_with_a_paused_holder};

/// The TTL of the grants in the process-level scenarios.
pub const FAULT_TTL: Duration = Duration::from_secs(1);
/// How long after a stalled holder's TTL a waiter may still wait in the process-level
/// scenarios (generous: SQLite polls at most every 250 ms).
pub const FAULT_LIVENESS_BOUND: Duration = Duration::from_secs(2);
/// How long a waiter in a scenario waits at most: a hang guard, far beyond any TTL.
const WAIT_LIMIT: Duration = Duration::from_secs(10);

const PROCESS_LOCAL: &str =
    "the store lives in one process, so no other process can hold its locks";

/// Expands to one `#[tokio::test]` per fault scenario of [`faults`](crate::faults),
/// each against the fixture that `$fixture().await` returns, with the worker binary
/// at `$worker` (in this crate's tests: `env!("CARGO_BIN_EXE_fencelock-worker")`).
#[macro_export]
macro_rules! fault_tests {
    ($fixture:path, $worker:expr) => {
        $crate::fault_tests!(@each $fixture, $worker;
            holder_killed_frees_the_lock_after_its_ttl,
            holder_paused_past_its_ttl_is_told_lost_and_fenced,
        );

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn paused_holder_run_passes_the_checker() {
            let fixture = $fixture().await;
            $crate::suite::run_bounded(
                "paused_holder_run_passes_the_checker",
                $crate::faults::paused_holder_run_passes_the_checker(&fixture),
            )
            .await;
        }
    };
    (@each $fixture:path, $worker:expr; $($scenario:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let fixture = $fixture().await;
                $crate::suite::run_bounded(
                    stringify!($scenario),
                    $crate::faults::$scenario(&fixture, ::std::path::Path::new($worker)),
                )
                .await;
            }
        )*
    };
}

/// A holder process killed with SIGKILL frees its lock after its TTL: another
/// process is not granted it before the validity the holder last reported, is
/// granted it within the TTL plus [`FAULT_LIVENESS_BOUND`] of the kill, with a higher
/// token, and the history passes the checker.
pub async fn holder_killed_frees_the_lock_after_its_ttl(
    store: &dyn StoreFixture,
    worker: &Path,
) -> Verdict {
    let Some(setup) = Processes::new(store, worker).await else {
        return Verdict::NotApplicable(PROCESS_LOCAL);
    };
    let name = unique_name("killed-holder");
    let mut holder = setup.worker("holder").await;
    let mut next = setup.worker("next").await;
    let first = granted(
        holder
            .acquire(name.as_str(), FAULT_TTL, Duration::ZERO)
            .await,
    );
    let valid_until = match holder.state().await {
        Ok(WorkerState::Held { valid_until, .. }) => valid_until,
        other => panic!("a fresh holder must report its lock held, got {other:?}"),
    };
    let killed_at = Instant::now();
    holder.kill().await.expect("kill -9 the holder");

    let second = granted(next.acquire(name.as_str(), FAULT_TTL, WAIT_LIMIT).await);
    assert!(
        second.granted >= valid_until,
        "granted {:?} before the killed holder's reported validity ended",
        valid_until - second.granted
    );
    assert!(
        second.token > first.token,
        "token {} after {} did not rise",
        second.token,
        first.token
    );
    assert_eq!(
        next.write().await.expect("write"),
        Written::Accepted {
            token: second.token
        },
        "the new holder's write must be admitted"
    );
    let released = next.release().await.expect("release");
    assert_eq!(
        released,
        Released::Released {
            token: second.token
        }
    );

    let mut history = setup.history().await;
    history.holds = vec![
        hold(holder.name(), first.token, first.granted, valid_until),
        hold(next.name(), second.token, second.granted, Instant::now()),
    ];
    history.faults.push(HolderFault {
        holder: holder.name().to_owned(),
        token: first.token,
        kind: FaultKind::Killed,
        at: killed_at,
        ttl: FAULT_TTL,
    });
    history.attempts.push(attempt(next.name(), &second));
    judge(&history, FAULT_LIVENESS_BOUND);
    Verdict::Passed
}

/// A holder process paused (SIGSTOP) past its TTL loses its lock to another process,
/// which takes it and writes; on resume (SIGCONT) the paused holder reports its lock
/// lost, the fence refuses its late write, its release returns `Lost` and spares the
/// new holder, and the history shows no overlapping accepted writes nor lost updates.
pub async fn holder_paused_past_its_ttl_is_told_lost_and_fenced(
    store: &dyn StoreFixture,
    worker: &Path,
) -> Verdict {
    let Some(setup) = Processes::new(store, worker).await else {
        return Verdict::NotApplicable(PROCESS_LOCAL);
    };
    let name = unique_name("paused-holder");
    let mut holder = setup.worker("paused").await;
    let mut next = setup.worker("next").await;
    let first = granted(
        holder
            .acquire(name.as_str(), FAULT_TTL, Duration::ZERO)
            .await,
    );
    let write = holder.write().await.expect("write");
    assert_eq!(write, Written::Accepted { token: first.token });
    wait_for_a_renewal(&mut holder).await;
    let paused_at = Instant::now();
    holder.pause().expect("SIGSTOP the holder");

    let second = granted(next.acquire(name.as_str(), FAULT_TTL, WAIT_LIMIT).await);
    assert!(
        second.token > first.token,
        "token did not rise across the takeover"
    );
    let write = next.write().await.expect("write");
    assert_eq!(
        write,
        Written::Accepted {
            token: second.token
        }
    );

    holder.resume().expect("SIGCONT the holder");
    let told = holder.state().await.expect("state after resume");
    let noticed_at = Instant::now();
    assert!(
        matches!(told, WorkerState::Lost { token, .. } if token == first.token),
        "the resumed holder must report its lock lost, got {told:?}"
    );
    let late = holder.write().await.expect("the late write");
    assert!(
        matches!(late, Written::Refused { highest, .. } if highest >= second.token),
        "the fence must refuse the paused holder's late write, got {late:?}"
    );
    let released = holder.release().await.expect("release");
    assert_eq!(released, Released::Lost { token: first.token });
    let state = next.state().await.expect("state");
    assert!(
        matches!(state, WorkerState::Held { token, .. } if token == second.token),
        "the lost holder's release touched the new holder: {state:?}"
    );
    let released = next.release().await.expect("release");
    assert_eq!(
        released,
        Released::Released {
            token: second.token
        }
    );

    let mut history = setup.history().await;
    let accepted = history.writes.iter().filter(|w| w.accepted).count();
    let value = setup.resource.value().await.expect("read the resource");
    assert_eq!(value, accepted as u64, "an accepted write was lost");
    history.holds = vec![
        hold(holder.name(), first.token, first.granted, noticed_at),
        hold(next.name(), second.token, second.granted, Instant::now()),
    ];
    history.faults.push(HolderFault {
        holder: holder.name().to_owned(),
        token: first.token,
        kind: FaultKind::Paused,
        at: paused_at,
        ttl: FAULT_TTL,
    });
    history.attempts.push(attempt(next.name(), &second));
    judge(&history, FAULT_LIVENESS_BOUND);
    Verdict::Passed
}

/// What the process-level scenarios share: the worker binary, the store's URL and
/// the fenced resource in a temp dir.
struct Processes {
    program: PathBuf,
    url: String,
    resource: SharedResource,
    _dir: tempfile::TempDir,
}

impl Processes {
    /// `None` when the store cannot be shared between processes.
    async fn new(store: &dyn StoreFixture, program: &Path) -> Option<Self> {
        let url = store.url()?;
        let backend = store
            .backend()
            .await
            .expect("the store under test must be reachable");
        if !backend.capabilities().shared_between_processes {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("fencelock-resource-")
            .tempdir()
            .expect("a temp dir for the fenced resource");
        let resource = SharedResource::open(dir.path().join("resource.db"))
            .await
            .expect("open the fenced resource");
        Some(Self {
            program: program.to_owned(),
            url,
            resource,
            _dir: dir,
        })
    }

    async fn worker(&self, name: &str) -> Worker {
        Worker::spawn(&self.program, name, &self.url, self.resource.path())
            .await
            .unwrap_or_else(|err| panic!("{err}"))
    }

    async fn history(&self) -> History {
        self.resource.history().await.expect("read the write log")
    }
}

fn granted(acquired: crate::worker::Result<Acquired>) -> Grant {
    match acquired {
        Ok(Acquired::Granted(grant)) => grant,
        other => panic!("the lock must be granted, got {other:?}"),
    }
}

/// Waits until the worker's watchdog renews its lease, so that a pause right after
/// cannot catch it in the middle of a store request (on SQLite that would keep the
/// file's write lock for the whole pause).
async fn wait_for_a_renewal(worker: &mut Worker) {
    let held_until = |state| match state {
        Ok(WorkerState::Held { valid_until, .. }) => valid_until,
        other => panic!("the holder must hold its lock, got {other:?}"),
    };
    let before = held_until(worker.state().await);
    let every = Duration::from_millis(10);
    // The watchdog renews every ttl/3; allow a whole TTL.
    for _ in 0..FAULT_TTL.as_millis() / every.as_millis() {
        sleep(every).await;
        // A renewal moves the validity by about ttl/3; rounding moves it by nanoseconds.
        if held_until(worker.state().await) > before + FAULT_TTL / 10 {
            return;
        }
    }
    panic!("the holder's watchdog did not renew its lease within {FAULT_TTL:?}");
}

fn hold(holder: &str, token: fencelock_core::FencingToken, start: Instant, end: Instant) -> Hold {
    Hold {
        holder: holder.to_owned(),
        token,
        start,
        end,
    }
}

fn attempt(holder: &str, grant: &Grant) -> Attempt {
    Attempt {
        holder: holder.to_owned(),
        start: grant.requested,
        end: grant.granted,
        granted: Some(grant.token),
    }
}

fn judge(history: &History, liveness_bound: Duration) {
    let checks = Checks {
        faults_injected: false,
        liveness_bound,
    };
    history::assert_passes(history, &checks);
}
