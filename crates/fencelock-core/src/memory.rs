//! The in-memory store: a product feature for users' own unit tests.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{
    AcquireRequest, Capabilities, Error, FencingToken, Lease, LeaseKind, LockBackend, LockName,
    LockState, LossReason, OwnerId, Result, WaitDeadline, WaitKind, valid_until,
};

const STORE: &str = "memory";

/// Locks in process memory with the full contract: fencing tokens from one counter,
/// TTLs honoured, FIFO waiting by notification.
///
/// Clones share one lock table, so two `Locker`s over clones of one store exclude
/// each other like two processes would. Time is Tokio's clock, so tests may run it
/// with `tokio::time::pause`.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    names: HashMap<LockName, NameState>,
    last_token: u64,
    last_ticket: u64,
}

#[derive(Debug, Default)]
struct NameState {
    holder: Option<Holder>,
    /// Waiters in arrival order.
    queue: VecDeque<(u64, Arc<Notify>)>,
}

#[derive(Debug)]
struct Holder {
    owner: OwnerId,
    token: FencingToken,
    expires: Instant,
}

impl NameState {
    fn live_holder(&self, now: Instant) -> Option<&Holder> {
        self.holder.as_ref().filter(|h| h.expires > now)
    }

    fn holds(&self, lease: &Lease, now: Instant) -> bool {
        self.live_holder(now)
            .is_some_and(|h| h.owner == *lease.owner() && h.token == lease.token())
    }

    /// Frees the name and hands the turn to the first waiter.
    fn vacate(&mut self) {
        self.holder = None;
        if let Some((_, notify)) = self.queue.front() {
            notify.notify_one();
        }
    }
}

/// A waiter's place in a name's queue; dropping it (on grant, timeout or a dropped
/// acquire future) leaves the queue and passes the turn on if it was ours.
struct Ticket {
    shared: Arc<Shared>,
    name: LockName,
    id: u64,
    notify: Arc<Notify>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut state = self.shared.lock();
        let Some(entry) = state.names.get_mut(&self.name) else {
            return;
        };
        let was_first = entry.queue.front().is_some_and(|(id, _)| *id == self.id);
        entry.queue.retain(|(id, _)| *id != self.id);
        if was_first && entry.live_holder(now).is_none() {
            if let Some((_, next)) = entry.queue.front() {
                next.notify_one();
            }
        }
        if entry.holder.is_none() && entry.queue.is_empty() {
            state.names.remove(&self.name);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a single field write or queue edit: poisoning leaves nothing
        // half-done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Deletes the grant of `name` as an operator would, without asking its holder.
    /// The holder learns of it at its next renewal. Returns whether a grant was there.
    pub fn evict(&self, name: &LockName) -> bool {
        let mut state = self.shared.lock();
        let Some(entry) = state.names.get_mut(name) else {
            return false;
        };
        let had = entry.holder.is_some();
        entry.vacate();
        if entry.queue.is_empty() {
            state.names.remove(name);
        }
        had
    }

    fn lost(lease: &Lease) -> Error {
        Error::Lost {
            name: lease.name().clone(),
            store: STORE,
            token: lease.token(),
            reason: LossReason::NotOurs,
        }
    }
}

#[async_trait]
impl LockBackend for MemoryStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            store: STORE,
            fencing: true,
            fifo: true,
            wait: WaitKind::Notify,
            lease: LeaseKind::Ttl,
            shared_between_processes: false,
        }
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Lease> {
        let deadline = WaitDeadline::start(req.wait);
        let mut ticket: Option<Ticket> = None;
        loop {
            let (notify, wake_at) = {
                let now = Instant::now();
                let mut guard = self.shared.lock();
                let state = &mut *guard;
                let entry = state.names.entry(req.name.clone()).or_default();
                let holder_expires = entry.live_holder(now).map(|h| h.expires);
                let our_turn = match &ticket {
                    None => entry.queue.is_empty(),
                    Some(t) => entry.queue.front().is_some_and(|(id, _)| *id == t.id),
                };
                if holder_expires.is_none() && our_turn {
                    state.last_token += 1;
                    let token = FencingToken(state.last_token);
                    entry.holder = Some(Holder {
                        owner: req.owner.clone(),
                        token,
                        expires: now + req.ttl,
                    });
                    if let Some(t) = &ticket {
                        entry.queue.retain(|(id, _)| *id != t.id);
                    }
                    drop(guard);
                    // Leaving the queue is done; the ticket's drop finds nothing to do.
                    drop(ticket);
                    return Ok(Lease::new(
                        req.name,
                        req.owner,
                        token,
                        valid_until(now, req.ttl),
                    ));
                }
                if !deadline.may_wait() || deadline.passed() {
                    drop(guard);
                    return Err(deadline.give_up(&req.name, STORE));
                }
                let ticket = ticket.get_or_insert_with(|| {
                    state.last_ticket += 1;
                    let notify = Arc::new(Notify::new());
                    entry
                        .queue
                        .push_back((state.last_ticket, Arc::clone(&notify)));
                    Ticket {
                        shared: Arc::clone(&self.shared),
                        name: req.name.clone(),
                        id: state.last_ticket,
                        notify,
                    }
                });
                let first = entry.queue.front().is_some_and(|(id, _)| *id == ticket.id);
                // The first waiter also wakes when the holder's TTL runs out, since an
                // expiry notifies nobody.
                let wake_at = match holder_expires {
                    Some(expires) if first => Some(deadline.cap(expires)),
                    _ => deadline.deadline(),
                };
                (Arc::clone(&ticket.notify), wake_at)
            };
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        () = notify.notified() => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notify.notified().await,
            }
        }
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let now = Instant::now();
        let mut state = self.shared.lock();
        match state.names.get_mut(lease.name()) {
            Some(entry) if entry.holds(lease, now) => {
                if let Some(holder) = entry.holder.as_mut() {
                    holder.expires = now + ttl;
                }
                Ok(lease.clone().renewed(valid_until(now, ttl)))
            }
            _ => Err(Self::lost(lease)),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let now = Instant::now();
        let mut state = self.shared.lock();
        let Some(entry) = state.names.get_mut(lease.name()) else {
            return Err(Self::lost(lease));
        };
        let ours = entry
            .holder
            .as_ref()
            .is_some_and(|h| h.owner == *lease.owner() && h.token == lease.token());
        if !ours {
            return Err(Self::lost(lease));
        }
        let live = entry.holds(lease, now);
        entry.vacate();
        if entry.queue.is_empty() {
            state.names.remove(lease.name());
        }
        if live { Ok(()) } else { Err(Self::lost(lease)) }
    }

    async fn inspect(&self, name: &LockName) -> Result<Option<LockState>> {
        let now = Instant::now();
        let state = self.shared.lock();
        Ok(state
            .names
            .get(name)
            .and_then(|entry| entry.live_holder(now))
            .map(|h| LockState {
                holder: h.owner.clone(),
                token: h.token,
                remaining: Some(h.expires - now),
            }))
    }
}
