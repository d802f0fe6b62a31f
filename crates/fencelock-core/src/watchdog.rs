//! One renewal task per `Locker`: renews every held lease at ttl/3 in batches, stops at
//! `max_hold`, and marks a lease lost when a renewal says so or its validity passes.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::Instrument;

use crate::{Lease, LockBackend, LossReason, StoreEvent};
use tokio::sync::broadcast::error::RecvError;

/// A held lease's state as its guard sees it.
#[derive(Clone, Debug)]
pub(crate) enum Status {
    /// Held and surely valid until this instant.
    Held { valid_until: Instant },
    /// The store's session is disconnected: the grant may or may not stand. Lost if
    /// this instant passes before the session is back.
    Suspended { valid_until: Instant },
    /// Lost; the watchdog no longer renews it.
    Lost(LossReason),
    /// Released through its guard.
    Released,
}

/// Makes the status cell of one held lease: the watchdog writes it, the guard and its
/// views read it and wait for changes. A tokio `watch` channel would do the same but
/// carries nine wait lists, about a third of a held lock's memory; one `Notify` does.
pub(crate) fn status_channel(initial: Status) -> (StatusSender, StatusReceiver) {
    let shared = Arc::new(StatusShared {
        state: Mutex::new(StatusState {
            status: initial,
            version: 0,
            closed: false,
        }),
        changed: Notify::new(),
    });
    let receiver = StatusReceiver {
        shared: Arc::clone(&shared),
        seen: 0,
    };
    (StatusSender(shared), receiver)
}

struct StatusShared {
    state: Mutex<StatusState>,
    changed: Notify,
}

struct StatusState {
    status: Status,
    /// Bumped by every write, so a reader knows what it has seen.
    version: u64,
    /// The writer is gone: nothing will change any more.
    closed: bool,
}

impl StatusShared {
    fn state(&self) -> MutexGuard<'_, StatusState> {
        // Every update is a single field write: a panic cannot leave it half done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The watchdog's side of a status cell; dropping it tells the readers no change
/// will come.
pub(crate) struct StatusSender(Arc<StatusShared>);

impl StatusSender {
    pub(crate) fn send_replace(&self, status: Status) {
        self.send_modify(|current| *current = status);
    }

    pub(crate) fn send_modify(&self, modify: impl FnOnce(&mut Status)) {
        {
            let mut state = self.0.state();
            modify(&mut state.status);
            state.version += 1;
        }
        self.0.changed.notify_waiters();
    }
}

impl Drop for StatusSender {
    fn drop(&mut self) {
        self.0.state().closed = true;
        self.0.changed.notify_waiters();
    }
}

/// A reader of a status cell (the guard's, cloned into each view).
#[derive(Clone)]
pub(crate) struct StatusReceiver {
    shared: Arc<StatusShared>,
    seen: u64,
}

impl fmt::Debug for StatusReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.current(), f)
    }
}

impl StatusReceiver {
    /// The status now.
    pub(crate) fn current(&self) -> Status {
        self.shared.state().status.clone()
    }

    /// The status now, remembered as seen by [`changed`](Self::changed).
    pub(crate) fn see(&mut self) -> Status {
        let state = self.shared.state();
        self.seen = state.version;
        state.status.clone()
    }

    /// Resolves once the status changed since it was last seen (and marks it seen), or
    /// with `Err` once the writer is gone with nothing new to see.
    pub(crate) async fn changed(&mut self) -> Result<(), ()> {
        loop {
            let notified = self.shared.changed.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before looking, so a write after the look wakes it.
            notified.as_mut().enable();
            {
                let state = self.shared.state();
                if state.version != self.seen {
                    self.seen = state.version;
                    return Ok(());
                }
                if state.closed {
                    return Err(());
                }
            }
            notified.await;
        }
    }
}

pub(crate) struct Watchdog {
    backend: Arc<dyn LockBackend>,
    store: &'static str,
    registry: Mutex<Registry>,
    wake: Notify,
    /// The store's event feed, subscribed when the `Locker` is built so no event sent
    /// before the task first runs is missed; the task takes it.
    events: Mutex<Option<tokio::sync::broadcast::Receiver<StoreEvent>>>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    held: HashMap<u64, Held>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// No `Locker` handle is left: the task ends once the last guard is gone.
    closed: bool,
    /// When the task will look again by itself (set by each scan; `None`: only when
    /// woken). A lease registered with nothing due before then needs no wake-up, so
    /// an acquire/release cycle costs the task nothing.
    planned: Option<Instant>,
}

struct Held {
    lease: Lease,
    ttl: Duration,
    hold_until: Option<Instant>,
    next_renew: Instant,
    renewing: bool,
    /// The last renewal (capped at `hold_until`) has been sent: renew no more.
    final_renewal_sent: bool,
    status: StatusSender,
}

impl Held {
    /// The TTL to renew with now, or `None` when `max_hold` forbids renewing.
    fn renewal_ttl(&mut self, now: Instant) -> Option<Duration> {
        if self.final_renewal_sent {
            return None;
        }
        let Some(hold_until) = self.hold_until else {
            return Some(self.ttl);
        };
        let left = hold_until.saturating_duration_since(now);
        if left >= self.ttl {
            return Some(self.ttl);
        }
        self.final_renewal_sent = true;
        (left >= crate::AcquireRequest::MIN_TTL).then_some(left)
    }
}

type Batch = Vec<(u64, Lease, Duration)>;
type BatchOutcome = (Batch, Instant, Option<Vec<crate::Result<Lease>>>);
type InFlight = Pin<Box<dyn Future<Output = BatchOutcome> + Send>>;

/// How long to wait before retrying a renewal that failed for a temporary reason.
fn retry_delay(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_millis(1), Duration::from_secs(1))
}

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Watchdog {
    pub(crate) fn new(backend: Arc<dyn LockBackend>) -> Arc<Self> {
        let store = backend.capabilities().store;
        Arc::new(Self {
            events: Mutex::new(backend.events()),
            backend,
            store,
            registry: Mutex::default(),
            wake: Notify::new(),
        })
    }

    pub(crate) fn backend(&self) -> &Arc<dyn LockBackend> {
        &self.backend
    }

    pub(crate) fn store(&self) -> &'static str {
        self.store
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding this lock cannot leave the map inconsistent (every
        // update is a single insert/remove/field write), so poisoning is ignored.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts renewing `lease` every `ttl/3` (sooner when the store granted less
    /// validity than that, see [`renewal_due`]) until it is deregistered, lost, or
    /// `max_hold` after now.
    pub(crate) fn register(
        self: &Arc<Self>,
        lease: Lease,
        ttl: Duration,
        max_hold: Option<Duration>,
    ) -> (u64, StatusReceiver) {
        let now = Instant::now();
        let lease_valid_until = lease.valid_until();
        let (status, receiver) = status_channel(Status::Held {
            valid_until: lease_valid_until,
        });
        let mut registry = self.registry();
        registry.next_id += 1;
        let id = registry.next_id;
        registry.held.insert(
            id,
            Held {
                lease,
                ttl,
                hold_until: max_hold.map(|d| now + d),
                next_renew: renewal_due(now, ttl, lease_valid_until),
                renewing: false,
                final_renewal_sent: false,
                status,
            },
        );
        let running = registry.task.as_ref().is_some_and(|t| !t.is_finished());
        if !running {
            registry.task = Some(tokio::spawn(Arc::clone(self).run()));
        }
        // The task looks again at `planned` anyway; wake it only if this lease is due
        // earlier (its first renewal comes before its validity ends).
        let due = renewal_due(now, ttl, lease_valid_until);
        let wake = !running || registry.planned.is_none_or(|planned| planned > due);
        drop(registry);
        if wake {
            self.wake.notify_one();
        }
        (id, receiver)
    }

    /// Stops renewing `id`. Returns whether it was still held (not lost) at this moment.
    pub(crate) fn deregister(&self, id: u64) -> bool {
        let mut registry = self.registry();
        let removed = registry.held.remove(&id);
        // Nothing becomes due earlier; the task only needs to hear that it may end.
        let wake = registry.closed && registry.held.is_empty();
        drop(registry);
        if wake {
            self.wake.notify_one();
        }
        match removed {
            Some(held) => {
                let valid = Instant::now() < held.lease.valid_until();
                held.status.send_replace(Status::Released);
                valid
            }
            None => false,
        }
    }

    /// The last `Locker` handle is gone: end the task once no guard is left.
    pub(crate) fn close(&self) {
        self.registry().closed = true;
        self.wake.notify_one();
    }

    async fn run(self: Arc<Self>) {
        let mut in_flight: FuturesUnordered<InFlight> = FuturesUnordered::new();
        // A task started again (after its runtime went away) subscribes anew.
        let mut events = self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .or_else(|| self.backend.events());
        loop {
            let (batch, next_wake, done) = self.scan();
            if done && in_flight.is_empty() {
                return;
            }
            if !batch.is_empty() {
                in_flight.push(Box::pin(self.renew(batch)));
            }
            let sleep = tokio::time::sleep_until(
                next_wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
            );
            tokio::select! {
                () = sleep => {}
                () = self.wake.notified() => {}
                Some(outcome) = in_flight.next(), if !in_flight.is_empty() => self.apply(outcome),
                event = next_event(&mut events) => match event {
                    Ok(event) => self.on_event(event),
                    // Events were missed: renew everything now to find out.
                    Err(RecvError::Lagged(_)) => self.renew_all_now(),
                    Err(RecvError::Closed) => events = None,
                },
            }
        }
    }

    /// Applies what the store reported by itself.
    fn on_event(&self, event: StoreEvent) {
        let mut registry = self.registry();
        match event {
            StoreEvent::Suspended => {
                for held in registry.held.values() {
                    let valid_until = held.lease.valid_until();
                    held.status.send_replace(Status::Suspended { valid_until });
                }
            }
            StoreEvent::Resumed => {
                for held in registry.held.values() {
                    let valid_until = held.lease.valid_until();
                    held.status.send_replace(Status::Held { valid_until });
                }
            }
            StoreEvent::SessionLost { reason } => {
                for (_, held) in registry.held.drain() {
                    self.report_lost(&held, reason);
                }
            }
            StoreEvent::LeaseLost { name, owner } => {
                let lost: Vec<u64> = registry
                    .held
                    .iter()
                    .filter(|(_, h)| *h.lease.name() == name && *h.lease.owner() == owner)
                    .map(|(id, _)| *id)
                    .collect();
                for id in lost {
                    if let Some(held) = registry.held.remove(&id) {
                        self.report_lost(&held, LossReason::NotOurs);
                    }
                }
            }
        }
    }

    /// Makes every lease due for renewal now.
    fn renew_all_now(&self) {
        let now = Instant::now();
        for held in self.registry().held.values_mut() {
            held.next_renew = held.next_renew.min(now);
        }
    }

    /// Marks expired leases lost, collects the renewals now due, and says when to look
    /// again.
    fn scan(&self) -> (Batch, Option<Instant>, bool) {
        let now = Instant::now();
        let mut batch = Vec::new();
        let mut next: Option<Instant> = None;
        let mut ended_by_max_hold = Vec::new();
        let mut registry = self.registry();
        registry.held.retain(|&id, held| {
            if now >= held.lease.valid_until() {
                let reason = if held.final_renewal_sent {
                    ended_by_max_hold.push(held.lease.clone());
                    LossReason::MaxHoldReached
                } else {
                    LossReason::Expired
                };
                self.report_lost(held, reason);
                return false;
            }
            if !held.renewing && now >= held.next_renew {
                if let Some(ttl) = held.renewal_ttl(now) {
                    held.renewing = true;
                    batch.push((id, held.lease.clone(), ttl));
                }
            }
            if !held.renewing && !held.final_renewal_sent {
                next = Some(next.map_or(held.next_renew, |n| n.min(held.next_renew)));
            }
            let until = held.lease.valid_until();
            next = Some(next.map_or(until, |n| n.min(until)));
            true
        });
        let done = registry.closed && registry.held.is_empty();
        registry.planned = next;
        drop(registry);
        // Session stores have no TTL to end a grant: release what max_hold ended.
        for lease in ended_by_max_hold {
            let backend = Arc::clone(&self.backend);
            tokio::spawn(async move {
                let _ = backend.release(&lease).await;
            });
        }
        (batch, next, done)
    }

    fn renew(&self, batch: Batch) -> impl Future<Output = BatchOutcome> + Send + 'static {
        let backend = Arc::clone(&self.backend);
        let span =
            tracing::debug_span!("fencelock.renew", store = self.store, leases = batch.len());
        // Bounded so a hung store cannot pin the batch forever; expiry is judged by
        // `scan` from each lease's own validity regardless.
        let limit = batch
            .iter()
            .map(|(_, _, ttl)| *ttl)
            .max()
            .unwrap_or_default();
        async move {
            let sent = Instant::now();
            let leases: Vec<(Lease, Duration)> = batch
                .iter()
                .map(|(_, lease, ttl)| (lease.clone(), *ttl))
                .collect();
            let results = tokio::time::timeout(limit, backend.renew_all(&leases))
                .await
                .ok();
            (batch, sent, results)
        }
        .instrument(span)
    }

    fn apply(&self, (batch, sent, results): BatchOutcome) {
        let now = Instant::now();
        let mut registry = self.registry();
        let Some(results) = results else {
            for (id, lease, _) in &batch {
                if let Some(held) = registry.held.get_mut(id) {
                    tracing::warn!(lock = %lease.name(), store = self.store, "fencelock renewal timed out; retrying");
                    held.renewing = false;
                    held.next_renew = now + retry_delay(held.ttl);
                }
            }
            drop(registry);
            self.wake.notify_one();
            return;
        };
        for ((id, _, _), result) in batch.iter().zip(results) {
            let Some(held) = registry.held.get_mut(id) else {
                continue; // released or lost meanwhile
            };
            held.renewing = false;
            match result {
                Ok(renewed) => {
                    let valid_until = renewed.valid_until();
                    held.next_renew = renewal_due(sent, held.ttl, valid_until);
                    held.lease = held.lease.clone().renewed(valid_until);
                    // A suspended session stays suspended until the store says it is
                    // back; only the validity moves.
                    held.status.send_modify(|status| match status {
                        Status::Suspended { .. } => *status = Status::Suspended { valid_until },
                        _ => *status = Status::Held { valid_until },
                    });
                }
                Err(crate::Error::Lost { reason, .. }) => {
                    if let Some(held) = registry.held.remove(id) {
                        self.report_lost(&held, reason);
                    }
                }
                Err(err) => {
                    tracing::warn!(lock = %held.lease.name(), store = self.store, error = %err, "fencelock renewal failed; retrying");
                    held.next_renew = now + retry_delay(held.ttl);
                }
            }
        }
    }

    fn report_lost(&self, held: &Held, reason: LossReason) {
        tracing::warn!(
            lock = %held.lease.name(),
            store = self.store,
            token = held.lease.token().0,
            %reason,
            "fencelock lock lost"
        );
        held.status.send_replace(Status::Lost(reason));
    }
}

/// The next event of the feed, or never when there is none.
async fn next_event(
    events: &mut Option<tokio::sync::broadcast::Receiver<StoreEvent>>,
) -> Result<StoreEvent, RecvError> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}

/// When a lease sent (or renewed) at `sent` is due for its next renewal: `ttl/3`
/// later, or halfway to its `valid_until` if that comes first. A store may grant
/// less validity than the TTL (a session store caps it at the session's own
/// deadline); renewing at ttl/3 regardless would let such a lease run out first.
fn renewal_due(sent: Instant, ttl: Duration, valid_until: Instant) -> Instant {
    let halfway = sent + valid_until.saturating_duration_since(sent) / 2;
    (sent + ttl / 3).min(halfway)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader hears every write made after it last looked (even one made before it
    /// started waiting), and hears that the writer is gone once it has seen the rest.
    #[tokio::test]
    async fn a_status_reader_hears_each_change_and_the_writers_end() {
        let (sender, mut receiver) = status_channel(Status::Released);
        assert!(matches!(receiver.see(), Status::Released));
        sender.send_replace(Status::Lost(LossReason::Expired));
        receiver.changed().await.expect("a write not yet seen");
        assert!(matches!(
            receiver.current(),
            Status::Lost(LossReason::Expired)
        ));
        let mut view = receiver.clone();
        let waiting = tokio::spawn(async move { view.changed().await });
        tokio::task::yield_now().await;
        sender.send_modify(|status| *status = Status::Lost(LossReason::NotOurs));
        waiting
            .await
            .expect("no panic")
            .expect("woken by the write");
        receiver.changed().await.expect("the second write");
        drop(sender);
        assert!(
            receiver.changed().await.is_err(),
            "nothing comes after the end"
        );
        assert!(matches!(
            receiver.current(),
            Status::Lost(LossReason::NotOurs)
        ));
    }
}
