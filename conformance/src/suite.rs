//! The properties every store must have. Each is a plain `async fn` over a
//! [`StoreFixture`]; it panics with the broken rule on failure and returns
//! [`Verdict::NotApplicable`] when the store's [`Capabilities`] rule it out.
//!
//! [`Capabilities`]: fencelock_core::Capabilities

use std::sync::Arc;
use std::time::Duration;

use fencelock_core::{
    AcquireRequest, Error, Lease, LockBackend, LockName, Locker, LockerOptions, LossReason,
    MemoryFenceGate, StoreEvent, WaitPolicy,
};
use tokio::time::{Instant, timeout};

use crate::StoreFixture;
use crate::history::{self, FencedCounter, History, Hold};

/// The outcome of a property that did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The rule held.
    Passed,
    /// The rule does not apply to this store (the reason says why).
    NotApplicable(&'static str),
}

/// A TTL long enough never to run out during a test.
pub const LONG_TTL: Duration = Duration::from_secs(30);
/// A TTL short enough to watch it run out.
pub const SHORT_TTL: Duration = Duration::from_millis(800);
/// The bound on how long any single step may take before the property fails.
pub const STEP_LIMIT: Duration = Duration::from_secs(20);

/// A lock name no other test uses.
pub fn unique_name(rule: &str) -> LockName {
    let suffix = fencelock_core::OwnerId::random();
    LockName::new(format!("conformance/{rule}/{}", &suffix.as_str()[..12])).expect("valid name")
}

async fn client(store: &dyn StoreFixture) -> Arc<dyn LockBackend> {
    store
        .backend()
        .await
        .expect("the store under test must be reachable")
}

fn request(name: &LockName, ttl: Duration, wait: WaitPolicy) -> AcquireRequest {
    AcquireRequest::new(name.clone(), ttl)
        .expect("valid ttl")
        .with_wait(wait)
}

async fn take(backend: &dyn LockBackend, name: &LockName, ttl: Duration) -> Lease {
    step(
        "an uncontended acquire",
        backend.acquire(request(name, ttl, WaitPolicy::NoWait)),
    )
    .await
    .unwrap_or_else(|err| panic!("acquiring free lock {name} failed: {err}"))
}

/// Bounds a step of a property: a store that hangs fails the property instead of the
/// run.
async fn step<F: std::future::IntoFuture>(what: &str, fut: F) -> F::Output {
    timeout(STEP_LIMIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP_LIMIT:?}"))
}

fn locker(backend: Arc<dyn LockBackend>) -> Locker {
    Locker::with_options(backend, LockerOptions::default())
}

/// While one client holds a lock, another client (and a second acquisition from the
/// same client) is refused with `Contended`.
pub async fn second_holder_is_refused(store: &dyn StoreFixture) -> Verdict {
    let (a, b) = (client(store).await, client(store).await);
    let name = unique_name("second-holder");
    let lease = take(&*a, &name, LONG_TTL).await;
    for (who, backend) in [("another client", &b), ("the same client", &a)] {
        let err = step(
            "a contended acquire",
            backend.acquire(request(&name, LONG_TTL, WaitPolicy::NoWait)),
        )
        .await
        .expect_err("a held lock must not be granted twice");
        assert!(
            matches!(err, Error::Contended { .. }),
            "{who}: expected Contended, got {err:?}"
        );
        assert!(err.is_temporary(), "contention is temporary");
    }
    a.release(&lease).await.expect("release by the holder");
    Verdict::Passed
}

/// After a release, the next grant of the same name carries a strictly higher token,
/// and `inspect` reports the holder while held and nobody after release.
pub async fn reacquire_after_release_gets_a_higher_token(store: &dyn StoreFixture) -> Verdict {
    let (a, b) = (client(store).await, client(store).await);
    let name = unique_name("higher-token");
    let mut last = None;
    for backend in [&a, &b, &a] {
        let lease = take(&**backend, &name, LONG_TTL).await;
        if let Some(prev) = last {
            assert!(
                lease.token() > prev,
                "token {} after {prev} did not rise",
                lease.token()
            );
        }
        let state = b
            .inspect(&name)
            .await
            .expect("inspect")
            .expect("a held lock is reported");
        assert_eq!((&state.holder, state.token), (lease.owner(), lease.token()));
        backend
            .release(&lease)
            .await
            .expect("release by the holder");
        assert_eq!(
            b.inspect(&name).await.expect("inspect"),
            None,
            "released lock still reported"
        );
        last = Some(lease.token());
    }
    Verdict::Passed
}

/// Releasing or renewing a lease that was lost (expired and taken over) returns
/// `Lost` and leaves the new holder's lock untouched.
pub async fn release_of_a_lost_lease_spares_the_new_holder(store: &dyn StoreFixture) -> Verdict {
    let (a, b) = (client(store).await, client(store).await);
    let name = unique_name("lost-release");
    let old = take(&*a, &name, SHORT_TTL).await;
    let new = step(
        "a waiting acquire",
        b.acquire(request(&name, LONG_TTL, WaitPolicy::Until(SHORT_TTL * 10))),
    )
    .await
    .expect("the lock must be free once its TTL ran out");
    let err = a
        .release(&old)
        .await
        .expect_err("releasing a lost lease must fail");
    assert!(err.is_lost(), "expected Lost, got {err:?}");
    let err = a
        .renew(&old, LONG_TTL)
        .await
        .expect_err("renewing a lost lease must fail");
    assert!(err.is_lost(), "expected Lost, got {err:?}");
    let state = b
        .inspect(&name)
        .await
        .expect("inspect")
        .expect("the new holder still holds it");
    assert_eq!(
        (&state.holder, state.token),
        (new.owner(), new.token()),
        "the new holder's lock was touched"
    );
    b.release(&new)
        .await
        .expect("the new holder releases normally");
    Verdict::Passed
}

/// Nobody is granted a lock while its holder's `valid_until` has not passed, and it
/// is granted once the TTL ran out without renewal.
pub async fn lock_is_not_taken_before_its_ttl_and_is_free_after(
    store: &dyn StoreFixture,
) -> Verdict {
    let (a, b) = (client(store).await, client(store).await);
    let name = unique_name("ttl");
    let first = take(&*a, &name, SHORT_TTL).await;
    let err = b
        .acquire(request(&name, LONG_TTL, WaitPolicy::NoWait))
        .await
        .expect_err("held");
    assert!(matches!(err, Error::Contended { .. }), "{err:?}");
    let second = step(
        "a waiting acquire",
        b.acquire(request(&name, LONG_TTL, WaitPolicy::Until(SHORT_TTL * 10))),
    )
    .await
    .expect("the lock must be granted after its TTL ran out");
    let granted_at = Instant::now();
    assert!(
        granted_at >= first.valid_until(),
        "granted {:?} before the first holder's validity ended",
        first.valid_until() - granted_at
    );
    assert!(
        second.token() > first.token(),
        "token did not rise across expiry"
    );
    b.release(&second).await.expect("release");
    Verdict::Passed
}

/// The watchdog keeps a lock held past three TTLs: nobody else gets it meanwhile and
/// the guard stays held.
pub async fn auto_renew_keeps_a_lock_past_three_ttls(store: &dyn StoreFixture) -> Verdict {
    let holder = locker(client(store).await);
    let other = client(store).await;
    let name = unique_name("auto-renew");
    let guard = step("lock", holder.lock(&name).ttl(SHORT_TTL))
        .await
        .expect("lock");
    let started = Instant::now();
    // Bounded: 8 checks, half a TTL apart, span 4 TTLs.
    for _ in 0..8 {
        tokio::time::sleep(SHORT_TTL / 2).await;
        assert!(
            guard.is_held(),
            "guard stopped being held after {:?}",
            started.elapsed()
        );
        let err = other
            .acquire(request(&name, LONG_TTL, WaitPolicy::NoWait))
            .await;
        assert!(
            matches!(err, Err(Error::Contended { .. })),
            "taken over after {:?}: {err:?}",
            started.elapsed()
        );
    }
    assert!(started.elapsed() > SHORT_TTL * 3);
    guard
        .release()
        .await
        .expect("a renewed lock releases normally");
    Verdict::Passed
}

/// A waiter is granted the lock when its holder releases it, long before the holder's
/// TTL would run out.
pub async fn waiter_wakes_on_release(store: &dyn StoreFixture) -> Verdict {
    let (a, b) = (client(store).await, client(store).await);
    let name = unique_name("wake");
    let lease = take(&*a, &name, LONG_TTL).await;
    let waiter = {
        let (name, b) = (name.clone(), Arc::clone(&b));
        // The wait is far shorter than the holder's TTL: only a release can grant it.
        tokio::spawn(async move {
            b.acquire(request(&name, LONG_TTL, WaitPolicy::Until(LONG_TTL / 3)))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.release(&lease).await.expect("release");
    let granted = step("the woken waiter", waiter).await.expect("waiter task");
    let granted = granted.expect("the waiter must be granted after the release");
    assert!(granted.token() > lease.token());
    b.release(&granted)
        .await
        .expect("the new holder releases normally");
    Verdict::Passed
}

/// A wait on a held lock ends with `Timeout` once its duration has passed, and the
/// holder keeps the lock.
pub async fn wait_times_out(store: &dyn StoreFixture) -> Verdict {
    let (a, b) = (client(store).await, client(store).await);
    let name = unique_name("timeout");
    let lease = take(&*a, &name, LONG_TTL).await;
    let wait = Duration::from_millis(300);
    let started = Instant::now();
    let err = step(
        "a timed wait",
        b.acquire(request(&name, LONG_TTL, WaitPolicy::Until(wait))),
    )
    .await
    .expect_err("a held lock must not be granted");
    assert!(
        matches!(err, Error::Timeout { .. }),
        "expected Timeout, got {err:?}"
    );
    assert!(
        started.elapsed() >= wait,
        "gave up after {:?}, before the wait of {wait:?}",
        started.elapsed()
    );
    let state = b
        .inspect(&name)
        .await
        .expect("inspect")
        .expect("still held");
    assert_eq!(state.token, lease.token());
    a.release(&lease).await.expect("release");
    Verdict::Passed
}

/// A dropped acquire future leaves nothing behind: no queue entry that delays later
/// acquirers, and no grant beyond its TTL.
pub async fn dropped_acquire_leaves_nothing_behind(store: &dyn StoreFixture) -> Verdict {
    let (a, b, c) = (
        client(store).await,
        client(store).await,
        client(store).await,
    );
    let name = unique_name("dropped-acquire");
    // A waiting acquire dropped while it waits.
    let lease = take(&*a, &name, LONG_TTL).await;
    let waited = timeout(
        Duration::from_millis(300),
        b.acquire(request(&name, LONG_TTL, WaitPolicy::Forever)),
    )
    .await;
    assert!(
        waited.is_err(),
        "the waiter cannot have been granted a held lock"
    );
    a.release(&lease).await.expect("release");
    let next = c
        .acquire(request(&name, LONG_TTL, WaitPolicy::NoWait))
        .await;
    let next = next.expect("a dropped waiter must not keep its place in line");
    c.release(&next).await.expect("release");
    // Acquires on a free lock dropped at their first await: whatever they did is undone
    // by the time a waiter's TTL-bounded wait ends.
    for _ in 0..5 {
        let fut = b.acquire(request(&name, SHORT_TTL, WaitPolicy::NoWait));
        let _ = futures_util::FutureExt::now_or_never(fut);
        let next = step(
            "acquire after a dropped one",
            c.acquire(request(&name, LONG_TTL, WaitPolicy::Until(SHORT_TTL * 10))),
        )
        .await
        .expect("a dropped acquire must not hold the lock beyond its TTL");
        c.release(&next).await.expect("release");
    }
    Verdict::Passed
}

/// Locks on different names are independent: holding or releasing one does not
/// affect another.
pub async fn independent_names_do_not_interfere(store: &dyn StoreFixture) -> Verdict {
    let (a, b) = (client(store).await, client(store).await);
    let first = unique_name("independent");
    let second = LockName::new(format!("{first}-other")).expect("valid");
    let held = take(&*a, &first, LONG_TTL).await;
    let other = take(&*b, &second, LONG_TTL).await;
    b.release(&other).await.expect("release");
    let state = b
        .inspect(&first)
        .await
        .expect("inspect")
        .expect("first lock still held");
    assert_eq!(state.token, held.token());
    a.release(&held).await.expect("release");
    Verdict::Passed
}

/// Names with unicode, slashes and escape-like characters, and names of exactly 256
/// bytes, are distinct locks; empty, NUL-containing and 257-byte names are refused
/// with `InvalidName`.
pub async fn names_at_the_limits(store: &dyn StoreFixture) -> Verdict {
    let locker = locker(client(store).await);
    let base = unique_name("names");
    let mut names = vec![
        format!("{base}/ünïcødé ✓/ロック"),
        format!("{base}/a/b"),
        format!("{base}/a%2Fb"),
        format!("{base}/a_b"),
        format!("{base}/a:b"),
        format!("{base}/a\\b"),
        format!("{base}/a'b\"c;--"),
    ];
    let pad = LockName::MAX_LEN - base.as_str().len() - 1;
    names.push(format!("{base}/{}", "x".repeat(pad)));
    assert_eq!(names.last().map(String::len), Some(256));
    let mut guards = Vec::new();
    for name in &names {
        // All held at once: no two of these names may map to one key.
        let guard = step("lock", locker.lock(name).ttl(LONG_TTL).no_wait())
            .await
            .unwrap_or_else(|err| panic!("name {name:?} must be usable: {err}"));
        guards.push(guard);
    }
    for guard in guards {
        let state = locker
            .inspect(guard.name())
            .await
            .expect("inspect")
            .expect("held");
        assert_eq!(
            state.token,
            guard.token(),
            "{:?} reports another holder",
            guard.name()
        );
        guard.release().await.expect("release");
    }
    for bad in [String::new(), format!("{base}\0"), "y".repeat(257)] {
        let err = locker
            .lock(&bad)
            .await
            .expect_err("an invalid name must be refused");
        assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err:?}");
    }
    Verdict::Passed
}

/// A TTL of zero is refused with a `Config` error that names the TTL, before any
/// request reaches the store.
pub async fn zero_ttl_is_refused(store: &dyn StoreFixture) -> Verdict {
    let locker = locker(client(store).await);
    let name = unique_name("zero-ttl");
    let err = locker
        .lock(&name)
        .ttl(Duration::ZERO)
        .await
        .expect_err("zero TTL");
    assert!(
        matches!(err, Error::Config { .. }) && err.to_string().contains("ttl"),
        "{err:?}"
    );
    assert_eq!(
        locker.inspect(&name).await.expect("inspect"),
        None,
        "nothing was taken"
    );
    Verdict::Passed
}

/// `lost()` fires when the lock is deleted behind the holder's back, the guard stops
/// being held, and `with_lock` drops its work and returns `Lost`.
pub async fn lost_fires_when_deleted_and_with_lock_aborts_the_work(
    store: &dyn StoreFixture,
) -> Verdict {
    let holder = locker(client(store).await);
    let name = unique_name("deleted");
    let guard = step("lock", holder.lock(&name).ttl(SHORT_TTL))
        .await
        .expect("lock");
    store
        .delete_behind_back(&name)
        .await
        .expect("operator delete");
    let err = timeout(SHORT_TTL * 5, guard.lost())
        .await
        .expect("lost() must fire after the deletion");
    assert!(
        matches!(
            err,
            Error::Lost {
                reason: LossReason::NotOurs | LossReason::SessionEnded,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!guard.is_held());
    let err = guard.release().await.expect_err("releasing a lost guard");
    assert!(err.is_lost(), "{err:?}");

    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let work_finished = Arc::clone(&finished);
    let result = timeout(
        SHORT_TTL * 5,
        holder.lock(&name).ttl(SHORT_TTL).run(|held| async move {
            store
                .delete_behind_back(held.name())
                .await
                .expect("operator delete");
            tokio::time::sleep(LONG_TTL).await;
            work_finished.store(true, std::sync::atomic::Ordering::SeqCst);
        }),
    )
    .await
    .expect("with_lock must return once the lock is lost");
    assert!(matches!(result, Err(Error::Lost { .. })), "{result:?}");
    assert!(
        !finished.load(std::sync::atomic::Ordering::SeqCst),
        "the work ran on after the loss"
    );
    Verdict::Passed
}

/// `max_hold` ends a lock even while its guard lives: renewals stop, the guard reports
/// `MaxHoldReached`, and others can take the lock.
pub async fn max_hold_ends_the_lock(store: &dyn StoreFixture) -> Verdict {
    let holder = locker(client(store).await);
    let other = client(store).await;
    let name = unique_name("max-hold");
    let max_hold = SHORT_TTL * 2;
    let guard = step("lock", holder.lock(&name).ttl(SHORT_TTL).max_hold(max_hold))
        .await
        .expect("lock");
    let started = Instant::now();
    let err = timeout(max_hold + SHORT_TTL * 5, guard.lost())
        .await
        .expect("max_hold must end the lock");
    assert!(
        matches!(
            err,
            Error::Lost {
                reason: LossReason::MaxHoldReached,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        started.elapsed() >= max_hold - SHORT_TTL / 10,
        "ended after {:?}",
        started.elapsed()
    );
    let next = step(
        "acquire after max_hold",
        other.acquire(request(&name, LONG_TTL, WaitPolicy::Until(SHORT_TTL * 10))),
    )
    .await
    .expect("the lock must be free after max_hold");
    other.release(&next).await.expect("release");
    drop(guard);
    Verdict::Passed
}

/// A holder whose lock expired and was taken over has its write refused by the fence
/// gate with `StaleToken`, while the new holder's write is admitted.
pub async fn stale_token_is_refused_by_the_gate(store: &dyn StoreFixture) -> Verdict {
    let (a, b) = (client(store).await, client(store).await);
    let name = unique_name("stale-token");
    let gate = MemoryFenceGate::new();
    let old = take(&*a, &name, SHORT_TTL).await;
    let new = step(
        "takeover",
        b.acquire(request(&name, LONG_TTL, WaitPolicy::Until(SHORT_TTL * 10))),
    )
    .await
    .expect("takeover after expiry");
    gate.admit_now("resource", new.token())
        .expect("the new holder's token is admitted");
    let err = gate
        .admit_now("resource", old.token())
        .expect_err("the old token must be refused");
    assert!(matches!(err, Error::StaleToken { .. }), "{err:?}");
    b.release(&new).await.expect("release");
    Verdict::Passed
}

/// 8 workers, each with its own client, do 50 fenced increments each: the counter
/// ends at exactly 400, and the recorded history shows unique tokens rising in
/// real-time order, no overlapping holds and no interleaved accepted writes.
pub async fn fenced_increments_are_exact(store: &dyn StoreFixture) -> Verdict {
    const WORKERS: usize = 8;
    const EACH: usize = 50;
    let name = unique_name("increments");
    let counter = FencedCounter::new();
    let mut tasks = Vec::new();
    for worker in 0..WORKERS {
        let locker = locker(client(store).await);
        let (name, counter) = (name.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let holder = format!("worker-{worker}");
            let mut holds = Vec::with_capacity(EACH);
            for _ in 0..EACH {
                let guard = locker
                    .lock(&name)
                    .ttl(LONG_TTL)
                    .wait(LONG_TTL * 2)
                    .await
                    .expect("lock");
                let start = Instant::now();
                counter
                    .increment(&holder, guard.token())
                    .await
                    .expect("a holder's write is admitted");
                let end = Instant::now();
                holds.push(Hold {
                    holder: holder.clone(),
                    token: guard.token(),
                    start,
                    end,
                });
                guard.release().await.expect("release");
            }
            holds
        }));
    }
    let mut history = History::default();
    for task in tasks {
        let holds = timeout(Duration::from_secs(240), task)
            .await
            .expect("400 increments must finish within 240s")
            .expect("worker");
        history.holds.extend(holds);
    }
    history.writes = counter.writes();
    assert_eq!(
        counter.value(),
        (WORKERS * EACH) as u64,
        "increments were lost"
    );
    history::assert_passes(&history, &history::Checks::default());
    Verdict::Passed
}

/// `renew_all` answers once per lease, in the order given: each lease still held is
/// renewed with its own name, owner and token, and only the lease whose grant was
/// deleted is `Lost`.
pub async fn renew_all_answers_each_lease_in_order(store: &dyn StoreFixture) -> Verdict {
    let a = client(store).await;
    let names: Vec<LockName> = (0..3)
        .map(|i| unique_name(&format!("renew-all-{i}")))
        .collect();
    let mut leases = Vec::new();
    for name in &names {
        leases.push(take(&*a, name, LONG_TTL).await);
    }
    step("an operator's delete", store.delete_behind_back(&names[1]))
        .await
        .expect("the operator's delete");
    let batch: Vec<(Lease, Duration)> = leases.iter().map(|l| (l.clone(), LONG_TTL)).collect();
    // A session store may learn of the delete a moment after it happened; the batch is
    // asked again (bounded) until the deleted lease reads lost.
    let deadline = Instant::now() + STEP_LIMIT;
    let answers = loop {
        let answers = step("a batched renewal", a.renew_all(&batch)).await;
        assert_eq!(answers.len(), batch.len(), "one answer per lease");
        if answers[1].is_err() || Instant::now() >= deadline {
            break answers;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (i, (answer, lease)) in answers.iter().zip(&leases).enumerate() {
        if i == 1 {
            let err = answer
                .as_ref()
                .expect_err("the deleted grant must not renew");
            assert!(
                matches!(err, Error::Lost { .. }),
                "the deleted grant: expected Lost, got {err:?}"
            );
            continue;
        }
        let renewed = answer
            .as_ref()
            .unwrap_or_else(|err| panic!("lease {i} is still held, got {err:?}"));
        assert_eq!(
            (renewed.name(), renewed.owner(), renewed.token()),
            (lease.name(), lease.owner(), lease.token()),
            "answer {i} must be about lease {i}"
        );
    }
    for i in [0, 2] {
        a.release(&leases[i])
            .await
            .expect("release a renewed lease");
    }
    Verdict::Passed
}

/// Where the store is FIFO (`Capabilities::fifo`), waiters that arrived one after
/// another are granted in their order of arrival, each with a higher token.
pub async fn waiters_are_granted_in_arrival_order(store: &dyn StoreFixture) -> Verdict {
    let holder = client(store).await;
    if !holder.capabilities().fifo {
        return Verdict::NotApplicable("the store does not grant waiters in arrival order");
    }
    let name = unique_name("fifo");
    let lease = take(&*holder, &name, LONG_TTL).await;
    let (granted_tx, mut granted_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut waiters = Vec::new();
    for arrival in 0..4 {
        let backend = client(store).await;
        let (name, granted_tx) = (name.clone(), granted_tx.clone());
        waiters.push(tokio::spawn(async move {
            let lease = backend
                .acquire(request(&name, LONG_TTL, WaitPolicy::Until(STEP_LIMIT)))
                .await
                .unwrap_or_else(|err| panic!("waiter {arrival} was not granted: {err}"));
            let _ = granted_tx.send((arrival, lease.token()));
            backend
                .release(&lease)
                .await
                .expect("release by the waiter");
        }));
        // Spaced arrivals: each waiter is queued before the next one asks.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(granted_tx);
    holder.release(&lease).await.expect("release by the holder");
    let mut order = Vec::new();
    while let Some(grant) = step("the next waiter's grant", granted_rx.recv()).await {
        order.push(grant);
    }
    for waiter in waiters {
        step("a waiter's end", waiter).await.expect("waiter task");
    }
    let arrivals: Vec<usize> = order.iter().map(|(arrival, _)| *arrival).collect();
    assert_eq!(arrivals, vec![0, 1, 2, 3], "grants out of arrival order");
    assert!(
        order.windows(2).all(|w| w[0].1 < w[1].1),
        "tokens must rise in grant order: {order:?}"
    );
    Verdict::Passed
}

/// Where a store has an event feed (`LockBackend::events`), a grant deleted behind its
/// holder's back is announced on it, naming the grant (or as its session's loss):
/// by the store's own watch, or at the latest when a renewal finds the grant gone and
/// answers `Lost`.
pub async fn events_announce_a_lost_grant(store: &dyn StoreFixture) -> Verdict {
    let a = client(store).await;
    let Some(mut events) = a.events() else {
        return Verdict::NotApplicable("the store has no event feed; renewals find losses");
    };
    let name = unique_name("events");
    let lease = take(&*a, &name, LONG_TTL).await;
    step("an operator's delete", store.delete_behind_back(&name))
        .await
        .expect("the operator's delete");
    // A store that watches its grants announces the delete by itself.
    if announced_loss(&mut events, &lease, Duration::from_secs(3)).await {
        return Verdict::Passed;
    }
    // Otherwise a renewal finds it, and the feed hears of it then.
    let renewal = step("a renewal after the delete", a.renew(&lease, LONG_TTL)).await;
    assert!(
        matches!(renewal, Err(Error::Lost { .. })),
        "a deleted grant must not renew, got {renewal:?}"
    );
    assert!(
        announced_loss(&mut events, &lease, STEP_LIMIT).await,
        "the loss of the deleted grant was never announced on the event feed"
    );
    Verdict::Passed
}

/// Whether `events` announces the loss of `lease` (or its session) within `window`.
async fn announced_loss(
    events: &mut tokio::sync::broadcast::Receiver<StoreEvent>,
    lease: &Lease,
    window: Duration,
) -> bool {
    let deadline = Instant::now() + window;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = match timeout(left, events.recv()).await {
            Err(_) => return false,
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(err)) => panic!("the event feed ended: {err}"),
            Ok(Ok(event)) => event,
        };
        match event {
            StoreEvent::LeaseLost { name, owner } if &name == lease.name() => {
                assert_eq!(&owner, lease.owner(), "the loss names our grant's owner");
                return true;
            }
            StoreEvent::SessionLost { .. } => return true,
            _ => {}
        }
    }
}

/// Runs a property by name for the [`conformance_tests!`](crate::conformance_tests)
/// macro, bounding it in time.
#[doc(hidden)]
pub async fn run_bounded<F: std::future::Future<Output = Verdict>>(name: &str, property: F) {
    match timeout(Duration::from_secs(300), property).await {
        Ok(Verdict::Passed) => {}
        Ok(Verdict::NotApplicable(why)) => eprintln!("{name}: not applicable: {why}"),
        Err(_) => panic!("{name} did not finish within 300s"),
    }
}
