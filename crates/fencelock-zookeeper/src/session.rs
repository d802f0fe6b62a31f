//! One ZooKeeper session per backend, rebuilt after it ends, and the grants made
//! through it.
//!
//! A session is only as sure as the last request the ensemble answered: ZooKeeper
//! expires a session whose client it has not heard from for the session timeout, and
//! then grants its locks to the next waiters. The client library reports `Expired`
//! only after it reconnects, or at 1.4 times the timeout. So each session keeps its
//! own **deadline**: three quarters of the negotiated timeout (less the drift
//! allowance) after the last request answered through the leader (a `sync` or a
//! write) was *sent*. While the session carries grants, its monitor sends a `sync`
//! whenever nothing was answered for a sixth of the timeout, and gives the session
//! up (every grant lost, the session closed) when the deadline passes without an
//! answer: before the server could expire it and grant anyone else.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use fencelock_core::{
    Error, FencingToken, LockName, LossReason, OwnerId, Result, StoreEvent, valid_until,
};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::time::Instant;
use zookeeper_client::{Client, SessionState};

use crate::ZooKeeperConfig;
use crate::backend::{STORE, zk_error};

/// The slot of a backend's current session.
type Current = Arc<Mutex<Option<Arc<Session>>>>;

/// A live (or ended) ZooKeeper session. Dropping the last handle closes it, which
/// deletes its ephemeral nodes.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) client: Client,
    /// The session timeout the server granted.
    timeout: Duration,
    /// When the latest request answered through the leader (a `sync` or a write) was
    /// sent: the server heard from us at or after this instant.
    heard: Mutex<Instant>,
    /// Set once the session expired, closed or was given up.
    ended: watch::Sender<bool>,
    /// Dropped with the session: stops its monitor.
    _stop: oneshot::Sender<()>,
}

impl Session {
    /// Whether the session expired, closed or was given up: no operation through it
    /// can succeed, and whatever holds it should let go.
    pub(crate) fn is_ended(&self) -> bool {
        *self.ended.borrow() || self.client.state().is_terminated()
    }

    /// Resolves once the session has ended (see [`is_ended`](Self::is_ended)).
    pub(crate) async fn ended(&self) {
        let mut ended = self.ended.subscribe();
        // An error means the sender is gone, which it is only with the session.
        let _ = ended.wait_for(|ended| *ended).await;
    }

    fn end(&self) {
        self.ended.send_replace(true);
    }

    fn heard_at(&self) -> Instant {
        *self.heard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that a request sent at `sent` through the leader (a `sync` or a write)
    /// was answered by the server, if `result` is an answer (a success or the server's
    /// refusal, not a lost connection).
    pub(crate) fn answered<T>(
        &self,
        sent: Instant,
        result: &std::result::Result<T, zookeeper_client::Error>,
    ) {
        use zookeeper_client::Error as Zk;
        let answer = matches!(
            result,
            Ok(_) | Err(Zk::NoNode | Zk::NodeExists | Zk::BadVersion | Zk::NotEmpty)
        );
        if answer {
            let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
            *heard = (*heard).max(sent);
        }
    }

    /// When nothing will have been answered through the leader for a sixth of the
    /// session timeout: the monitor sends a `sync` then.
    fn quiet_from(&self) -> Instant {
        self.heard_at() + self.timeout / 6
    }

    /// Whether nothing was answered through the leader for a sixth of the session
    /// timeout, so a read that decides a grant should follow a `sync`.
    pub(crate) fn quiet(&self) -> bool {
        self.quiet_from() <= Instant::now()
    }

    /// Until when the session surely stands: three quarters of the session timeout
    /// (less the drift allowance) after the last answered `sync` or write was sent.
    /// The quarter left covers the server's expiry ticks and the leader learning of a
    /// follower's sessions once a tick (a tick is at most half the session timeout).
    pub(crate) fn deadline(&self) -> Instant {
        valid_until(self.heard_at(), self.timeout - self.timeout / 4)
    }

    /// The validity of a grant confirmed by a read sent at `sent` for `ttl`: the TTL's,
    /// capped by the session's [deadline](Self::deadline), so no guard believes it
    /// holds past the instant the server could expire the session. The client's
    /// watchdog renews halfway to that validity when it comes before a third of the
    /// TTL, and each renewal's `sync` moves the deadline on.
    pub(crate) fn validity(&self, sent: Instant, ttl: Duration) -> Instant {
        valid_until(sent, ttl).min(self.deadline())
    }
}

/// One grant this backend made and still believes it holds.
#[derive(Clone, Debug)]
pub(crate) struct Grant {
    pub(crate) name: LockName,
    pub(crate) owner: OwnerId,
    pub(crate) token: FencingToken,
    /// The node's data version, for the versioned delete.
    pub(crate) version: i32,
    /// When the TTL runs out unless renewed: the node is deleted then.
    pub(crate) deadline: Instant,
    pub(crate) session: Weak<Session>,
}

/// The grants held through this backend, by node path.
#[derive(Debug, Default)]
pub(crate) struct Grants {
    by_path: Mutex<HashMap<String, Grant>>,
}

impl Grants {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Grant>> {
        // Every update is a single insert, remove or field write.
        self.by_path.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn insert(&self, path: String, grant: Grant) {
        self.lock().insert(path, grant);
    }

    /// The grant at `path` if it carries `token`.
    pub(crate) fn get(&self, path: &str, token: FencingToken) -> Option<Grant> {
        self.lock().get(path).filter(|g| g.token == token).cloned()
    }

    pub(crate) fn deadline(&self, path: &str) -> Option<Instant> {
        self.lock().get(path).map(|g| g.deadline)
    }

    /// Moves the deadline of the grant at `path` with `token`; false if it is gone.
    pub(crate) fn extend(&self, path: &str, token: FencingToken, deadline: Instant) -> bool {
        match self.lock().get_mut(path) {
            Some(grant) if grant.token == token => {
                grant.deadline = deadline;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn remove(&self, path: &str) -> Option<Grant> {
        self.lock().remove(path)
    }

    /// Removes the grant at `path` if it still carries `token`.
    pub(crate) fn remove_if(&self, path: &str, token: FencingToken) {
        let mut grants = self.lock();
        if grants.get(path).is_some_and(|g| g.token == token) {
            grants.remove(path);
        }
    }

    /// Forgets every grant of an ended session.
    fn remove_session(&self, session: &Weak<Session>) {
        self.lock()
            .retain(|_, g| !Weak::ptr_eq(&g.session, session) && g.session.strong_count() > 0);
    }

    /// Whether any grant is held through `session`.
    fn any_of(&self, session: &Weak<Session>) -> bool {
        self.lock()
            .values()
            .any(|g| Weak::ptr_eq(&g.session, session))
    }

    /// How many grants are held.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The session of a backend: connected on first use, rebuilt after it ends.
#[derive(Debug)]
pub(crate) struct Sessions {
    config: ZooKeeperConfig,
    current: Current,
    connecting: tokio::sync::Mutex<()>,
    pub(crate) grants: Arc<Grants>,
    pub(crate) events: broadcast::Sender<StoreEvent>,
}

impl Sessions {
    pub(crate) fn new(config: ZooKeeperConfig) -> Self {
        Self {
            config,
            current: Arc::default(),
            connecting: tokio::sync::Mutex::new(()),
            grants: Arc::new(Grants::default()),
            events: broadcast::channel(256).0,
        }
    }

    pub(crate) fn config(&self) -> &ZooKeeperConfig {
        &self.config
    }

    /// The live session, if one is established.
    pub(crate) fn peek(&self) -> Option<Arc<Session>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|s| !s.is_ended())
    }

    /// The live session, establishing a fresh one if there is none or it ended.
    pub(crate) async fn get(&self) -> Result<Arc<Session>> {
        if let Some(session) = self.peek() {
            return Ok(session);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(session) = self.peek() {
            return Ok(session);
        }
        let session = self.connect().await?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&session));
        Ok(session)
    }

    async fn connect(&self) -> Result<Arc<Session>> {
        let hosts = self.config.connect_string();
        let sent = Instant::now();
        let connecting = Client::connector()
            .with_session_timeout(self.config.session_timeout)
            .connect(&hosts);
        let client = match tokio::time::timeout(self.config.connect_timeout, connecting).await {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => return Err(zk_error(format!("connect to {hosts}"), err)),
            Err(_) => {
                return Err(Error::backend(
                    STORE,
                    format!("connect to {hosts}"),
                    true,
                    format!(
                        "no session within {:?}; check that ZooKeeper serves there",
                        self.config.connect_timeout
                    ),
                ));
            }
        };
        let (stop, stopped) = oneshot::channel();
        let states = client.state_watcher();
        let session = Arc::new(Session {
            timeout: client.session_timeout(),
            client,
            // The session was created (through the leader) after this.
            heard: Mutex::new(sent),
            ended: watch::channel(false).0,
            _stop: stop,
        });
        tracing::debug!(session = %session.client.session_id(), timeout = ?session.timeout, "zookeeper session established");
        tokio::spawn(monitor(
            Arc::downgrade(&session),
            states,
            stopped,
            Arc::clone(&self.grants),
            self.events.clone(),
            Arc::clone(&self.current),
        ));
        Ok(session)
    }
}

/// A heartbeat in flight.
type Beat = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Turns a session's state changes into [`StoreEvent`]s until it ends or is dropped,
/// and keeps its deadline: while grants are held through it, sends a `sync` when
/// nothing was answered for a sixth of the session timeout, and gives the session up
/// when its deadline passes.
async fn monitor(
    session: Weak<Session>,
    mut states: zookeeper_client::StateWatcher,
    mut stopped: oneshot::Receiver<()>,
    grants: Arc<Grants>,
    events: broadcast::Sender<StoreEvent>,
    current: Current,
) {
    let mut suspended = false;
    let mut beat: Option<Beat> = None;
    loop {
        let Some((deadline, next_beat, sixth)) = session
            .upgrade()
            .map(|s| (s.deadline(), s.quiet_from(), s.timeout / 6))
        else {
            return;
        };
        let holds = grants.any_of(&session);
        // Without grants, look again every sixth of the timeout (a grant made
        // meanwhile was just answered, so its deadline is further than that).
        let wake_at = if holds && beat.is_some() {
            deadline
        } else if holds {
            deadline.min(next_beat)
        } else {
            Instant::now() + sixth
        };
        tokio::select! {
            state = states.changed() => match state {
                SessionState::Disconnected => {
                    suspended = true;
                    let _ = events.send(StoreEvent::Suspended);
                }
                SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                    if std::mem::take(&mut suspended) {
                        let _ = events.send(StoreEvent::Resumed);
                    }
                }
                SessionState::Expired | SessionState::Closed | SessionState::AuthFailed => {
                    tracing::warn!(%state, "zookeeper session ended: every lock held through it is lost");
                    end(&session, &grants, &events, &current);
                    return;
                }
            },
            _ = &mut stopped => return,
            () = async { beat.as_mut().expect("in flight").await }, if beat.is_some() => beat = None,
            () = tokio::time::sleep_until(wake_at) => {
                if !holds {
                    continue;
                }
                let Some(alive) = session.upgrade() else { return };
                let now = Instant::now();
                if now >= alive.deadline() {
                    tracing::warn!(
                        timeout = ?alive.timeout,
                        "zookeeper session unanswered for three quarters of its timeout: \
                         giving it up before the server can expire it; every lock held \
                         through it is lost"
                    );
                    drop(alive);
                    end(&session, &grants, &events, &current);
                    return;
                }
                if beat.is_none() && alive.quiet() {
                    beat = Some(Box::pin(heartbeat(alive)));
                }
            }
        }
    }
}

/// One `sync` through the leader, recording its answer; after a failure (the
/// connection broke), waits a little before the monitor sends the next one, which the
/// client library queues until it has reconnected.
async fn heartbeat(session: Arc<Session>) {
    let sent = Instant::now();
    let answer = tokio::select! {
        answer = session.client.sync("/") => answer,
        () = session.ended() => return,
    };
    session.answered(sent, &answer);
    if answer.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Ends a session: every grant through it is lost, the backend stops using it, and
/// whatever holds it lets go, so its last handle closes it (deleting its nodes if the
/// server still has it).
fn end(
    session: &Weak<Session>,
    grants: &Grants,
    events: &broadcast::Sender<StoreEvent>,
    current: &Mutex<Option<Arc<Session>>>,
) {
    if let Some(ended) = session.upgrade() {
        ended.end();
    }
    grants.remove_session(session);
    {
        let mut current = current.lock().unwrap_or_else(|p| p.into_inner());
        if current
            .as_ref()
            .is_some_and(|c| std::ptr::eq(Arc::as_ptr(c), session.as_ptr()))
        {
            *current = None;
        }
    }
    let _ = events.send(StoreEvent::SessionLost {
        reason: LossReason::SessionEnded,
    });
}

/// How long to keep retrying a delete that failed for a connection loss: while the
/// session may still come back.
pub(crate) fn retry_window(session: &Session) -> Duration {
    session.timeout * 2
}
