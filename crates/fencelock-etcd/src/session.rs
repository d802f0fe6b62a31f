//! The session: one etcd lease per backend, kept alive by one keep-alive stream.
//!
//! Every lock key of the backend is attached to this lease, so when the lease dies
//! (expired, revoked, or the stream could not be re-established before the local
//! deadline) etcd deletes them all at once and the backend reports `SessionLost`.

use std::time::Duration;

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper};
use fencelock_core::{LossReason, StoreEvent, valid_until};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout_at};

use crate::backend::{REQUEST_TIMEOUT, STORE, call};

/// What a session knows about its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SessionState {
    /// Surely alive until this local instant (from when the last acknowledged
    /// keep-alive was sent).
    Alive { deadline: Instant },
    /// The lease is gone, or may be: every key on it is lost.
    Lost,
}

/// One lease and the task that keeps it alive; dropping it stops the task and
/// revokes the lease in the background.
pub(crate) struct Session {
    id: i64,
    state: watch::Receiver<SessionState>,
    task: JoinHandle<()>,
    client: Client,
}

impl Session {
    /// Grants a lease of `ttl_secs` and starts keeping it alive.
    pub(crate) async fn start(
        client: &Client,
        ttl_secs: i64,
        events: broadcast::Sender<StoreEvent>,
    ) -> fencelock_core::Result<Self> {
        let sent = Instant::now();
        // A retried grant may leave an unused lease behind; it expires after its TTL.
        let granted = call("grant the session lease", || {
            let mut lease = client.lease_client();
            async move { lease.grant(ttl_secs, None).await }
        })
        .await?;
        let ttl = secs(granted.ttl());
        let (state_tx, state) = watch::channel(SessionState::Alive {
            deadline: valid_until(sent, ttl),
        });
        let task = tokio::spawn(keep_alive(
            client.clone(),
            granted.id(),
            ttl,
            valid_until(sent, ttl),
            state_tx,
            events,
        ));
        tracing::debug!(lease = granted.id(), ?ttl, "etcd session started");
        Ok(Self {
            id: granted.id(),
            state,
            task,
            client: client.clone(),
        })
    }

    /// The lease id.
    pub(crate) fn id(&self) -> i64 {
        self.id
    }

    /// The local deadline of the lease, `None` once it is lost or the deadline passed.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match *self.state.borrow() {
            SessionState::Alive { deadline } if Instant::now() < deadline => Some(deadline),
            _ => None,
        }
    }

    /// Resolves once the session is lost.
    pub(crate) async fn lost(&self) {
        let mut state = self.state.clone();
        // An error means the task ended, which it does only once lost.
        let _ = state.wait_for(|s| *s == SessionState::Lost).await;
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
        if self.deadline().is_some() {
            // Free every key of this session now rather than after the TTL.
            let (mut lease, id) = (self.client.lease_client(), self.id);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(2), lease.revoke(id)).await;
                });
            }
        }
    }
}

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}

/// Sends a keep-alive every third of the TTL on one stream. Each acknowledged
/// keep-alive moves the deadline to `sent + ttl - drift`, `sent` being when that
/// keep-alive was sent. A stream that fails, ends, or leaves a keep-alive unanswered
/// for a third of the TTL (at most [`REQUEST_TIMEOUT`]) is dropped and a new one
/// opened, which the client may route to another member: a stream to a member that
/// died or lost its leader must not run the session into its deadline. Ends, reporting
/// the loss, when etcd answers TTL 0 (expired or revoked) or the deadline passes
/// without an answer.
async fn keep_alive(
    client: Client,
    id: i64,
    ttl: Duration,
    mut deadline: Instant,
    state: watch::Sender<SessionState>,
    events: broadcast::Sender<StoreEvent>,
) {
    let every = (ttl / 3).max(Duration::from_millis(100));
    let patience = every.min(REQUEST_TIMEOUT);
    let retry = (ttl / 10).clamp(Duration::from_millis(50), Duration::from_millis(500));
    let mut stream: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
    let mut next = Instant::now() + every;
    // Bounded: each pass either moves the deadline forward, or waits at least `retry`
    // (or `patience`) on the way to it.
    let why = loop {
        sleep_until(next.min(deadline)).await;
        if Instant::now() >= deadline {
            break "no keep-alive was acknowledged before the lease's deadline";
        }
        if stream.is_none() {
            let give_up = (Instant::now() + patience).min(deadline);
            let opened = timeout_at(give_up, client.lease_client().keep_alive(id)).await;
            match opened {
                Ok(Ok(pair)) => stream = Some(pair),
                Ok(Err(err)) if lease_not_found(&err) => {
                    break "etcd says the lease expired or was revoked";
                }
                Ok(Err(err)) => {
                    tracing::debug!(lease = id, %err, "etcd keep-alive stream not opened");
                    next = Instant::now() + retry;
                    continue;
                }
                Err(_) => {
                    tracing::debug!(lease = id, "etcd keep-alive stream not opened in time");
                    next = Instant::now() + retry;
                    continue;
                }
            }
        }
        let Some((keeper, replies)) = stream.as_mut() else {
            continue;
        };
        let sent = Instant::now();
        let answer = timeout_at((sent + patience).min(deadline), async {
            keeper.keep_alive().await?;
            replies.message().await
        })
        .await;
        match answer {
            Ok(Ok(Some(reply))) if reply.ttl() > 0 => {
                deadline = valid_until(sent, secs(reply.ttl()));
                state.send_replace(SessionState::Alive { deadline });
                next = sent + every;
            }
            Ok(Ok(Some(_))) => break "etcd says the lease expired or was revoked",
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                tracing::debug!(
                    lease = id,
                    "etcd keep-alive unanswered; re-opening the stream"
                );
                stream = None;
                next = Instant::now() + retry;
            }
        }
    };
    tracing::warn!(store = STORE, lease = id, reason = why, "etcd session lost");
    state.send_replace(SessionState::Lost);
    let _ = events.send(StoreEvent::SessionLost {
        reason: LossReason::SessionEnded,
    });
    // If the lease still stands somewhere (we only lost contact), free its keys.
    let _ = tokio::time::timeout(Duration::from_secs(1), client.lease_client().revoke(id)).await;
}

/// Whether a request failed because the lease it names no longer exists (opening a
/// keep-alive stream, or a put on it).
pub(crate) fn lease_not_found(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::LeaseKeepAliveError(text) => text.contains("not found"),
        etcd_client::Error::GRpcStatus(status) => status.message().contains("lease not found"),
        _ => false,
    }
}
