//! Waking waiters on release: one pub/sub connection per backend. Redlock's nodes
//! publish the freed name on `{prefix}released`, which wakes this process's waiters on
//! that name. A one-server release hands the lock to a queued waiter and publishes
//! `name NUL owner:token NUL attempt` on that waiter's backend's own channel
//! (`{prefix}handoff:{id}`): the grant goes to the owner's [`Handoffs`] entry if it
//! follows the owner's latest attempt, and no one else is woken.
//!
//! Public for the Redlock driver (one listener per node); not part of the stable API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use fencelock_core::{FencingToken, OwnerId};

use futures_util::StreamExt;
use redis::RedisResult;
use redis::aio::PubSubStream;

use crate::scripts::Handed;

/// The first pause before resubscribing after the pub/sub connection dropped.
const FIRST_PAUSE: Duration = Duration::from_millis(50);
/// The longest pause between two resubscription attempts.
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

pub use fencelock_core::wake::{Waiter, Wakers};

/// Waiters of this process that are queued on the server for a hand-off, by owner: a
/// release that hands one of them the lock delivers its token here.
///
/// A hand-off names the attempt whose queue entry it read, and is delivered only if
/// that is the waiter's latest attempt: a grant handed on before a later attempt ran
/// (and lost before it, since that attempt did not see it: expired while the waiter
/// stalled, or released by the undo of an attempt whose reply was lost) is dropped,
/// however late its message arrives.
#[derive(Debug, Default)]
pub struct Handoffs {
    state: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    by_owner: HashMap<OwnerId, Expected>,
    /// The last registration or attempt id handed out.
    last_id: u64,
}

/// What one registered owner waits for.
#[derive(Debug)]
struct Expected {
    /// The registration this entry belongs to (removed only by its own drop).
    registration: u64,
    /// The attempt a hand-off must name to be delivered (0: none made yet).
    attempt: u64,
    /// Taken by the delivery.
    sender: Option<tokio::sync::oneshot::Sender<FencingToken>>,
}

impl Registry {
    fn next_id(&mut self) -> u64 {
        self.last_id += 1;
        self.last_id
    }
}

impl Handoffs {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // Every update is one insert, change or remove: poisoning leaves nothing
        // half-done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `owner` until the returned value is dropped. It hears nothing until
    /// [`Handoff::expect_next`] names the attempt a hand-off must follow.
    pub fn register(&self, owner: &OwnerId) -> Handoff<'_> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let mut state = self.lock();
        let registration = state.next_id();
        state.by_owner.insert(
            owner.clone(),
            Expected {
                registration,
                attempt: 0,
                sender: Some(sender),
            },
        );
        Handoff {
            handoffs: self,
            owner: owner.clone(),
            registration,
            receiver,
        }
    }

    /// Delivers a grant handed to `owner` by a release that read the queue entry of
    /// `attempt`; whether a waiter of this process took it. A hand-off naming an
    /// earlier attempt than the waiter's latest is dropped.
    pub fn deliver(&self, owner: &OwnerId, attempt: u64, token: FencingToken) -> bool {
        let sender = {
            let mut state = self.lock();
            match state.by_owner.get_mut(owner) {
                Some(expected) if expected.attempt == attempt && attempt != 0 => {
                    expected.sender.take()
                }
                _ => None,
            }
        };
        sender.is_some_and(|sender| sender.send(token).is_ok())
    }
}

/// A registration in [`Handoffs`]; removed on drop (its own entry only: a later
/// registration of the same owner stays).
#[derive(Debug)]
pub struct Handoff<'a> {
    handoffs: &'a Handoffs,
    owner: OwnerId,
    registration: u64,
    /// Receives the token of a grant handed to this owner after its latest attempt.
    pub receiver: tokio::sync::oneshot::Receiver<FencingToken>,
}

impl Handoff<'_> {
    /// Starts a new attempt: returns its id, which the attempt's queue entry carries
    /// and a hand-off echoes, and from now on accepts only a hand-off naming it (with a
    /// fresh [`receiver`](Self::receiver); a token delivered for an earlier attempt is
    /// dropped).
    pub fn expect_next(&mut self) -> u64 {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let mut state = self.handoffs.lock();
        let attempt = state.next_id();
        state.by_owner.insert(
            self.owner.clone(),
            Expected {
                registration: self.registration,
                attempt,
                sender: Some(sender),
            },
        );
        self.receiver = receiver;
        attempt
    }
}

impl Drop for Handoff<'_> {
    fn drop(&mut self) {
        let mut state = self.handoffs.lock();
        if state
            .by_owner
            .get(&self.owner)
            .is_some_and(|expected| expected.registration == self.registration)
        {
            state.by_owner.remove(&self.owner);
        }
    }
}

/// The background task that feeds one server's release messages to [`Wakers`]; it
/// resubscribes (with backoff up to 1 s) when the connection drops, then wakes every
/// waiter since releases published meanwhile were lost. Stops when dropped or when the
/// wakers are gone.
#[derive(Debug)]
pub struct WakeListener {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WakeListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WakeListener {
    /// Subscribes to `channel` now, so that every waiter registered after this returns
    /// hears every later release, then listens in the background.
    ///
    /// # Errors
    /// The subscription's failure, or a timeout after `connect_timeout`.
    pub async fn subscribe(
        client: redis::Client,
        channel: String,
        wakers: &Arc<Wakers>,
        connect_timeout: Duration,
    ) -> RedisResult<Self> {
        let first = subscribe(&client, &channel, connect_timeout).await?;
        Ok(Self::spawn(
            client,
            channel,
            wakers,
            connect_timeout,
            Some(first),
        ))
    }

    /// [`subscribe`](Self::subscribe), also delivering hand-off grants to `handoffs`.
    ///
    /// # Errors
    /// As [`subscribe`](Self::subscribe).
    pub async fn subscribe_with_handoffs(
        client: redis::Client,
        channel: String,
        wakers: &Arc<Wakers>,
        handoffs: &Arc<Handoffs>,
        connect_timeout: Duration,
    ) -> RedisResult<Self> {
        let first = subscribe(&client, &channel, connect_timeout).await?;
        Ok(Self::start(
            client,
            channel,
            wakers,
            Some(handoffs),
            connect_timeout,
            Some(first),
        ))
    }

    /// Listens in the background, subscribing first if `first` is `None` (for servers
    /// that may be down at the start).
    pub fn spawn(
        client: redis::Client,
        channel: String,
        wakers: &Arc<Wakers>,
        connect_timeout: Duration,
        first: Option<PubSubStream>,
    ) -> Self {
        Self::start(client, channel, wakers, None, connect_timeout, first)
    }

    fn start(
        client: redis::Client,
        channel: String,
        wakers: &Arc<Wakers>,
        handoffs: Option<&Arc<Handoffs>>,
        connect_timeout: Duration,
        first: Option<PubSubStream>,
    ) -> Self {
        let task = tokio::spawn(listen(
            client,
            channel,
            Arc::downgrade(wakers),
            handoffs.map(Arc::downgrade),
            connect_timeout,
            first,
        ));
        Self { task }
    }
}

async fn subscribe(
    client: &redis::Client,
    channel: &str,
    within: Duration,
) -> RedisResult<PubSubStream> {
    let subscribing = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok(pubsub.into_on_message())
    };
    tokio::time::timeout(within, subscribing)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no pub/sub subscription within {within:?}"),
            )))
        })
}

async fn listen(
    client: redis::Client,
    channel: String,
    wakers: Weak<Wakers>,
    handoffs: Option<Weak<Handoffs>>,
    connect_timeout: Duration,
    mut stream: Option<PubSubStream>,
) {
    let mut pause = FIRST_PAUSE;
    // Runs for as long as its backend lives (which aborts it on drop); each round
    // either reads a live subscription or waits before one attempt to resubscribe.
    loop {
        if let Some(mut messages) = stream.take() {
            while let Some(message) = messages.next().await {
                let Some(wakers) = wakers.upgrade() else {
                    return;
                };
                match crate::scripts::parse_release_message(message.get_payload_bytes()) {
                    // Handed to one queued owner: only that waiter hears it (if it is
                    // ours); everyone else keeps its place in the queue.
                    Some((
                        _,
                        Some(Handed {
                            owner,
                            token,
                            attempt: Some(attempt),
                        }),
                    )) => {
                        if let Some(handoffs) = handoffs.as_ref().and_then(Weak::upgrade) {
                            handoffs.deliver(&owner, attempt, token);
                        }
                    }
                    // A freed name, or a hand-off that names no attempt (written by an
                    // older release script): the name's waiters look again, and an
                    // attempt finds a grant handed to its owner.
                    Some((name, _)) => wakers.wake(name),
                    None => {}
                }
            }
            tracing::debug!(channel, "fencelock pub/sub connection lost; resubscribing");
        }
        tokio::time::sleep(pause).await;
        if wakers.strong_count() == 0 {
            return;
        }
        match subscribe(&client, &channel, connect_timeout).await {
            Ok(messages) => {
                pause = FIRST_PAUSE;
                stream = Some(messages);
                if let Some(wakers) = wakers.upgrade() {
                    wakers.wake_all();
                }
            }
            Err(err) => {
                tracing::debug!(channel, error = %err, "fencelock pub/sub resubscription failed");
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
        }
    }
}
