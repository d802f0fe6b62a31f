//! The client's own rules (watchdog, loss, release on drop, FIFO), on the in-memory
//! store with Tokio's paused clock so every timing is exact.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fencelock_core::{
    AcquireRequest, Capabilities, Error, Lease, LockBackend, LockName, LockState, Locker,
    LossReason, MemoryStore, OwnerId, Result, StoreEvent, async_trait,
};
use futures_util::FutureExt;
use tokio::sync::broadcast;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(3);

/// The memory store, counting renewal batches, able to stall renewals, and sending
/// store events as a session store would.
#[derive(Debug, Clone)]
struct Observed {
    store: MemoryStore,
    batches: Arc<Mutex<Vec<usize>>>,
    renewals_hang: Arc<AtomicBool>,
    releases: Arc<AtomicUsize>,
    events: broadcast::Sender<StoreEvent>,
    renewals_lost_with: Arc<Mutex<Option<LossReason>>>,
}

impl Default for Observed {
    fn default() -> Self {
        Self {
            store: MemoryStore::new(),
            batches: Arc::default(),
            renewals_hang: Arc::default(),
            releases: Arc::default(),
            events: broadcast::channel(16).0,
            renewals_lost_with: Arc::default(),
        }
    }
}

#[async_trait]
impl LockBackend for Observed {
    fn capabilities(&self) -> Capabilities {
        self.store.capabilities()
    }
    async fn acquire(&self, req: AcquireRequest) -> Result<Lease> {
        self.store.acquire(req).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        self.store.renew(lease, ttl).await
    }
    async fn renew_all(&self, leases: &[(Lease, Duration)]) -> Vec<Result<Lease>> {
        self.batches.lock().unwrap().push(leases.len());
        if self.renewals_hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if let Some(reason) = *self.renewals_lost_with.lock().unwrap() {
            return leases
                .iter()
                .map(|(lease, _)| {
                    Err(Error::Lost {
                        name: lease.name().clone(),
                        store: "memory",
                        token: lease.token(),
                        reason,
                    })
                })
                .collect();
        }
        let mut out = Vec::new();
        for (lease, ttl) in leases {
            out.push(self.store.renew(lease, *ttl).await);
        }
        out
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.releases.fetch_add(1, Ordering::SeqCst);
        self.store.release(lease).await
    }
    async fn inspect(&self, name: &LockName) -> Result<Option<LockState>> {
        self.store.inspect(name).await
    }
    fn events(&self) -> Option<broadcast::Receiver<StoreEvent>> {
        Some(self.events.subscribe())
    }
}

/// Lets the watchdog task run until it is idle.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

/// Asserts `err` is `Error::Lost` for `reason`.
#[track_caller]
fn assert_lost(err: &Error, reason: LossReason) {
    assert!(
        matches!(err, Error::Lost { reason: r, .. } if *r == reason),
        "expected lost ({reason:?}), got {err:?}"
    );
}

fn name(n: &str) -> LockName {
    LockName::new(n).unwrap()
}

#[tokio::test(start_paused = true)]
async fn watchdog_renews_every_held_lock_at_a_third_of_the_ttl_in_one_batch() {
    let backend = Observed::default();
    let locker = Locker::new(backend.clone());
    let guards = vec![
        locker.lock("a").ttl(TTL).await.unwrap(),
        locker.lock("b").ttl(TTL).await.unwrap(),
        locker.lock("c").ttl(TTL).await.unwrap(),
    ];
    tokio::time::sleep(TTL * 3 + Duration::from_millis(500)).await;
    let batches = backend.batches.lock().unwrap().clone();
    // 9.5 s at one renewal per TTL/3 = 1 s: 9 ticks, each renewing all three locks at once.
    assert_eq!(batches, vec![3; 9], "renewal batches");
    for guard in guards {
        assert!(guard.is_held());
        assert!(
            guard.remaining() > TTL / 2,
            "remaining {:?}",
            guard.remaining()
        );
        guard.release().await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_short_lease_taken_while_a_long_one_is_held_is_renewed_at_its_own_third() {
    let backend = Observed::default();
    let locker = Locker::new(backend.clone());
    // The task now sleeps until the long lease's first renewal, 30 s away.
    let long = locker
        .lock("long")
        .ttl(Duration::from_secs(90))
        .await
        .unwrap();
    settle().await;
    let short = locker.lock("short").ttl(TTL).await.unwrap();
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    // 3.5 s at TTL/3 = 1 s: three renewals of the short lease alone, none of the long.
    assert_eq!(
        *backend.batches.lock().unwrap(),
        vec![1; 3],
        "renewal batches"
    );
    assert!(short.is_held() && long.is_held());
    short.release().await.unwrap();
    long.release().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn released_leases_are_never_renewed() {
    let backend = Observed::default();
    let locker = Locker::new(backend.clone());
    for _ in 0..5 {
        let guard = locker.lock("cycle").ttl(TTL).await.unwrap();
        guard.release().await.unwrap();
    }
    let held = locker.lock("held").ttl(TTL).await.unwrap();
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    // Only the lease still held was renewed: at 1 s, 2 s and 3 s.
    assert_eq!(
        *backend.batches.lock().unwrap(),
        vec![1; 3],
        "renewal batches"
    );
    drop(locker);
    held.release().await.unwrap();
    tokio::time::sleep(TTL * 10).await;
    assert_eq!(
        backend.batches.lock().unwrap().len(),
        3,
        "no renewal after the release"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_renewal_marks_the_guard_lost() {
    let backend = Observed::default();
    let locker = Locker::new(backend.clone());
    let guard = locker.lock("a").ttl(TTL).await.unwrap();
    let started = Instant::now();
    assert!(backend.store.evict(&name("a")));
    let err = guard.lost().await;
    assert_lost(&err, LossReason::NotOurs);
    // Noticed at the first renewal after the eviction.
    assert_eq!(started.elapsed(), TTL / 3);
    assert!(!guard.is_held());
    assert_eq!(guard.remaining(), Duration::ZERO);
    assert!(guard.release().await.unwrap_err().is_lost());
}

#[tokio::test(start_paused = true)]
async fn validity_passing_without_a_successful_renewal_marks_the_guard_lost() {
    let backend = Observed::default();
    backend.renewals_hang.store(true, Ordering::SeqCst);
    let locker = Locker::new(backend.clone());
    let guard = locker.lock("a").ttl(TTL).await.unwrap();
    let valid_until = guard.lease().valid_until();
    let err = guard.lost().await;
    assert_lost(&err, LossReason::Expired);
    assert_eq!(
        Instant::now(),
        valid_until,
        "lost exactly when validity ended"
    );
    assert!(!guard.is_held());
}

#[tokio::test(start_paused = true)]
async fn dropping_a_guard_releases_the_lock_in_the_background() {
    let backend = Observed::default();
    let locker = Locker::new(backend.clone());
    let guard = locker.lock("a").ttl(TTL).await.unwrap();
    drop(guard);
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    assert_eq!(backend.releases.load(Ordering::SeqCst), 1);
    assert!(
        locker.try_lock("a").await.unwrap().is_some(),
        "free right after the drop"
    );
}

#[tokio::test(start_paused = true)]
async fn with_lock_releases_after_the_work_and_returns_its_value() {
    let backend = Observed::default();
    let locker = Locker::new(backend.clone());
    let token = locker
        .with_lock("job", |held| async move { held.token() })
        .await
        .unwrap();
    assert_eq!(backend.releases.load(Ordering::SeqCst), 1);
    assert_eq!(locker.inspect("job").await.unwrap(), None);
    let next = locker.lock("job").await.unwrap();
    assert!(next.token() > token);
}

#[tokio::test(start_paused = true)]
async fn max_hold_stops_renewal_and_ends_the_lock_at_max_hold() {
    let backend = Observed::default();
    let locker = Locker::new(backend.clone());
    let started = Instant::now();
    let guard = locker.lock("a").ttl(TTL).max_hold(TTL * 2).await.unwrap();
    let err = guard.lost().await;
    assert_lost(&err, LossReason::MaxHoldReached);
    let held_for = started.elapsed();
    assert!(
        held_for <= TTL * 2 && held_for >= TTL * 2 - TTL / 10,
        "held for {held_for:?}"
    );
    tokio::task::yield_now().await;
    assert!(
        locker.try_lock("a").await.unwrap().is_some(),
        "released at max_hold"
    );
}

#[tokio::test(start_paused = true)]
async fn memory_waiters_are_granted_in_arrival_order() {
    let store = MemoryStore::new();
    let locker = Locker::new(store.clone());
    let first = locker.lock("q").ttl(TTL).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..5 {
        let (locker, order) = (locker.clone(), Arc::clone(&order));
        waiters.push(tokio::spawn(async move {
            let guard = locker.lock("q").ttl(TTL).await.unwrap();
            order.lock().unwrap().push(i);
            guard.release().await.unwrap();
        }));
        // Let waiter i enqueue before waiter i+1 starts.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    first.release().await.unwrap();
    for w in waiters {
        w.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
}

#[tokio::test(start_paused = true)]
async fn memory_first_waiter_takes_an_expired_lock_at_its_expiry() {
    let store = MemoryStore::new();
    let lease = store
        .acquire(AcquireRequest::new(name("e"), TTL).unwrap())
        .await
        .unwrap();
    let started = Instant::now();
    let req = AcquireRequest::new(name("e"), TTL)
        .unwrap()
        .with_wait(fencelock_core::WaitPolicy::Forever);
    let next = store.acquire(req).await.unwrap();
    assert_eq!(
        started.elapsed(),
        TTL,
        "granted exactly at the holder's expiry"
    );
    assert!(next.token() > lease.token());
}

#[tokio::test(start_paused = true)]
async fn a_locker_dropped_while_guards_live_keeps_renewing_them() {
    let backend = Observed::default();
    let locker = Locker::new(backend.clone());
    let guard = locker.lock("a").ttl(TTL).await.unwrap();
    drop(locker);
    tokio::time::sleep(TTL * 2).await;
    assert!(guard.is_held());
    guard.release().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_session_lost_event_marks_every_guard_lost_at_once() {
    let backend = Observed::default();
    let locker = Locker::new(backend.clone());
    let a = locker.lock("a").ttl(TTL).await.unwrap();
    let b = locker.lock("b").ttl(TTL).await.unwrap();
    let started = Instant::now();
    backend
        .events
        .send(StoreEvent::SessionLost {
            reason: LossReason::SessionEnded,
        })
        .unwrap();
    for guard in [&a, &b] {
        let err = guard.lost().await;
        assert_lost(&err, LossReason::SessionEnded);
        assert!(!guard.is_held());
    }
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "reported at once, not at a renewal"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lease_lost_event_marks_only_that_guard_lost() {
    let backend = Observed::default();
    let locker = Locker::new(backend.clone());
    let a = locker.lock("a").ttl(TTL).await.unwrap();
    let b = locker.lock("b").ttl(TTL).await.unwrap();
    settle().await;
    let owner: OwnerId = a.lease().owner().clone();
    backend
        .events
        .send(StoreEvent::LeaseLost {
            name: a.name().clone(),
            owner,
        })
        .unwrap();
    let err = a.lost().await;
    assert_lost(&err, LossReason::NotOurs);
    assert!(b.is_held());
    assert!(b.lost().now_or_never().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_suspended_session_is_not_held_until_resumed_and_lost_if_validity_passes() {
    let backend = Observed::default();
    let locker = Locker::new(backend.clone());
    let guard = locker.lock("a").ttl(TTL).await.unwrap();
    settle().await;
    backend.events.send(StoreEvent::Suspended).unwrap();
    settle().await;
    assert!(!guard.is_held(), "a suspended session's grant is uncertain");
    assert_eq!(guard.remaining(), Duration::ZERO);
    assert!(
        guard.lost().now_or_never().is_none(),
        "suspended is not lost"
    );
    backend.events.send(StoreEvent::Resumed).unwrap();
    settle().await;
    assert!(guard.is_held(), "held again once the session is back");

    // Suspended with renewals failing: lost when the validity runs out.
    backend.renewals_hang.store(true, Ordering::SeqCst);
    backend.events.send(StoreEvent::Suspended).unwrap();
    let err = guard.lost().await;
    assert_lost(&err, LossReason::Expired);
}

#[tokio::test(start_paused = true)]
async fn a_renewal_refused_for_a_reason_reports_that_reason() {
    let backend = Observed::default();
    *backend.renewals_lost_with.lock().unwrap() = Some(LossReason::SessionEnded);
    let locker = Locker::new(backend.clone());
    let guard = locker.lock("a").ttl(TTL).await.unwrap();
    let err = guard.lost().await;
    assert_lost(&err, LossReason::SessionEnded);
}

/// The memory store granting less validity than the TTL, as a session store does when
/// it caps a lease at its session's deadline.
#[derive(Debug, Clone, Default)]
struct CappedValidity {
    store: MemoryStore,
}

impl CappedValidity {
    const CAP: Duration = Duration::from_millis(500);

    fn cap(lease: Lease, sent: Instant) -> Lease {
        let valid_until = lease.valid_until().min(sent + Self::CAP);
        lease.renewed(valid_until)
    }
}

#[async_trait]
impl LockBackend for CappedValidity {
    fn capabilities(&self) -> Capabilities {
        self.store.capabilities()
    }
    async fn acquire(&self, req: AcquireRequest) -> Result<Lease> {
        let sent = Instant::now();
        Ok(Self::cap(self.store.acquire(req).await?, sent))
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let sent = Instant::now();
        Ok(Self::cap(self.store.renew(lease, ttl).await?, sent))
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.store.release(lease).await
    }
    async fn inspect(&self, name: &LockName) -> Result<Option<LockState>> {
        self.store.inspect(name).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_lease_granted_less_validity_than_a_third_of_its_ttl_is_renewed_before_it_runs_out() {
    let locker = Locker::new(CappedValidity::default());
    // ttl/3 = 1 s, but each grant is valid for 500 ms only.
    let guard = locker.lock("capped").ttl(TTL).await.unwrap();
    tokio::time::sleep(TTL * 2).await;
    assert!(
        guard.is_held(),
        "the lease ran out before the watchdog renewed it"
    );
    assert!(
        guard.lost().now_or_never().is_none(),
        "no loss was reported"
    );
    guard.release().await.unwrap();
}
