//! A checked in-process run: workers of this process contend for one lock while one
//! holder is paused past its TTL, and the [checker](crate::history) judges the
//! history. It needs nothing but the store under test, so it applies to every store,
//! the in-memory one included, and it is how the [`broken`](crate::broken) drivers are
//! shown to be caught.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fencelock_core::{
    AcquireRequest, Error, LockBackend, LockName, Locker, LockerOptions, OwnerId, WaitPolicy,
};
use tokio::time::{Instant, sleep, timeout};

use crate::StoreFixture;
use crate::history::{self, Attempt, Checks, FaultKind, FencedCounter, History, Hold, HolderFault};
use crate::suite::{Verdict, unique_name};

/// How long a waiter in the run waits at most: a hang guard, far beyond any TTL.
const WAIT_LIMIT: Duration = Duration::from_secs(10);
/// The hang guard of a whole in-process run.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// Workers in this process contending for one lock while one holder is paused past
/// its TTL produce a history that passes the checker, and the paused holder's late
/// write is refused by the fence.
pub async fn paused_holder_run_passes_the_checker(store: &dyn StoreFixture) -> Verdict {
    let run = PausedRun::default();
    let mut clients = Vec::new();
    for _ in 0..=run.workers {
        clients.push(
            store
                .backend()
                .await
                .expect("the store under test must be reachable"),
        );
    }
    let history = run_with_a_paused_holder(&clients, &run).await;
    history::assert_passes(&history, &run.checks());
    let late = history
        .writes
        .iter()
        .filter(|w| w.holder == PausedRun::PAUSED_HOLDER)
        .max_by_key(|w| w.start)
        .expect("the paused holder writes after its pause");
    assert!(
        !late.accepted,
        "the paused holder's late write was admitted"
    );
    Verdict::Passed
}

/// An in-process run with one paused holder (see [`run_with_a_paused_holder`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PausedRun {
    /// Workers contending for the lock besides the paused holder.
    pub workers: usize,
    /// The TTL of every grant.
    pub ttl: Duration,
    /// How long each worker holds the lock per grant, between its two writes.
    pub hold: Duration,
    /// How long the paused holder renews nothing; longer than `ttl +
    /// liveness_bound`, so that a lock never freed shows as a liveness failure.
    pub pause: Duration,
    /// The checker's liveness bound for this run.
    pub liveness_bound: Duration,
}

impl PausedRun {
    /// The paused holder's name in the history.
    pub const PAUSED_HOLDER: &'static str = "paused";
    /// The most grants one worker takes in a run.
    pub const MAX_GRANTS_EACH: usize = 500;

    /// The checks to judge this run's history with.
    pub fn checks(&self) -> Checks {
        Checks {
            faults_injected: false,
            liveness_bound: self.liveness_bound,
        }
    }
}

impl Default for PausedRun {
    fn default() -> Self {
        Self {
            workers: 3,
            ttl: Duration::from_millis(400),
            hold: Duration::from_millis(40),
            pause: Duration::from_millis(2000),
            liveness_bound: Duration::from_millis(1000),
        }
    }
}

/// Records a run on one lock: `clients[0]` is the paused holder, every other client a
/// worker with a `Locker` of its own.
///
/// The paused holder takes the lock through the backend directly, so no watchdog
/// renews it (what a paused process's lease sees), writes once to a
/// [`FencedCounter`], and renews nothing for `run.pause`. Meanwhile the workers, each
/// in a loop, wait for the lock, write, hold it for `run.hold` (less if it is lost),
/// write again and release it. On resume the paused holder notes that its lease
/// expired, writes with its stale token, and, once another holder has the lock,
/// releases its lost lease; then the workers stop. Every grant, write, wait and the
/// pause are recorded. Refused writes and lost locks are recorded, not judged: the
/// checker judges the history.
///
/// # Panics
/// With fewer than two clients, or if the store fails a request.
pub async fn run_with_a_paused_holder(
    clients: &[Arc<dyn LockBackend>],
    run: &PausedRun,
) -> History {
    let (paused_client, worker_clients) = clients
        .split_first()
        .expect("a paused holder and at least one worker");
    assert!(!worker_clients.is_empty(), "at least one worker");
    let name = unique_name("paused-run");
    let counter = FencedCounter::new();
    let mut history = History::default();

    let request = AcquireRequest::new(name.clone(), run.ttl)
        .expect("valid ttl")
        .with_wait(WaitPolicy::NoWait);
    let sent = Instant::now();
    let lease = timeout(WAIT_LIMIT, paused_client.acquire(request))
        .await
        .expect("an acquire of a free lock must not hang")
        .expect("the lock is free at the start");
    let granted = Instant::now();
    history.faults.push(HolderFault {
        holder: PausedRun::PAUSED_HOLDER.to_owned(),
        token: lease.token(),
        kind: FaultKind::Paused,
        at: sent,
        ttl: run.ttl,
    });
    counter
        .increment(PausedRun::PAUSED_HOLDER, lease.token())
        .await
        .expect("the first write is admitted");

    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, client) in worker_clients.iter().enumerate() {
        let locker = Locker::with_options(Arc::clone(client), LockerOptions::default());
        let worker = WorkerLoop {
            holder: format!("worker-{i}"),
            locker,
            name: name.clone(),
            counter: counter.clone(),
            stop: Arc::clone(&stop),
            run: *run,
        };
        tasks.push(tokio::spawn(worker.run()));
    }

    sleep(run.pause).await;
    let resumed = Instant::now();
    history.holds.push(Hold {
        holder: PausedRun::PAUSED_HOLDER.to_owned(),
        token: lease.token(),
        start: granted,
        end: resumed,
    });
    // The late write of a resumed holder that did not check its lease first.
    let _ = counter
        .increment(PausedRun::PAUSED_HOLDER, lease.token())
        .await;
    wait_for_another_holder(&**paused_client, &name, lease.owner(), run.ttl).await;
    let _ = paused_client.release(&lease).await;
    stop.store(true, Ordering::SeqCst);

    for task in tasks {
        let (holds, attempts) = timeout(RUN_LIMIT, task)
            .await
            .expect("the workers must stop within the run's limit")
            .expect("worker task");
        history.holds.extend(holds);
        history.attempts.extend(attempts);
    }
    history.writes = counter.writes();
    history
}

/// One in-process worker of [`run_with_a_paused_holder`].
struct WorkerLoop {
    holder: String,
    locker: Locker,
    name: LockName,
    counter: FencedCounter,
    stop: Arc<AtomicBool>,
    run: PausedRun,
}

impl WorkerLoop {
    async fn run(self) -> (Vec<Hold>, Vec<Attempt>) {
        let (mut holds, mut attempts) = (Vec::new(), Vec::new());
        // A lock never freed is the checker's to report: wait far past the pause.
        let wait = self.run.pause * 3 + self.run.ttl;
        for _ in 0..PausedRun::MAX_GRANTS_EACH {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let start = Instant::now();
            let acquired = self
                .locker
                .lock(&self.name)
                .ttl(self.run.ttl)
                .wait(wait)
                .await;
            let end = Instant::now();
            let guard = match acquired {
                Ok(guard) => guard,
                Err(Error::Timeout { .. }) => {
                    attempts.push(Attempt {
                        holder: self.holder.clone(),
                        start,
                        end,
                        granted: None,
                    });
                    break;
                }
                Err(err) => panic!("{}: acquire failed: {err}", self.holder),
            };
            let token = guard.token();
            attempts.push(Attempt {
                holder: self.holder.clone(),
                start,
                end,
                granted: Some(token),
            });
            let _ = self.counter.increment(&self.holder, token).await;
            let lost = guard.lost();
            let still_held = tokio::select! {
                () = sleep(self.run.hold) => true,
                _ = lost => false,
            };
            if still_held {
                let _ = self.counter.increment(&self.holder, token).await;
            }
            holds.push(Hold {
                holder: self.holder.clone(),
                token,
                start: end,
                end: Instant::now(),
            });
            let _ = guard.release().await;
        }
        (holds, attempts)
    }
}

/// Polls `inspect` (bounded by `limit`) until someone other than `owner` holds `name`.
async fn wait_for_another_holder(
    backend: &dyn LockBackend,
    name: &LockName,
    owner: &OwnerId,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    let every = Duration::from_millis(5);
    for _ in 0..=limit.as_millis() / every.as_millis() {
        if let Ok(Some(state)) = backend.inspect(name).await {
            if state.holder != *owner {
                return;
            }
        }
        if Instant::now() >= deadline {
            return;
        }
        sleep(every).await;
    }
}
