//! One ZooKeeper session per backend, rebuilt after it ends, and the grants made
//! through it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use fencelock_core::{Error, FencingToken, LockName, LossReason, OwnerId, Result, StoreEvent};
use tokio::sync::{broadcast, oneshot};
use tokio::time::Instant;
use zookeeper_client::{Client, SessionState};

use crate::ZooKeeperConfig;
use crate::backend::{STORE, zk_error};

/// A live (or ended) ZooKeeper session. Dropping the last handle closes it, which
/// deletes its ephemeral nodes.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) client: Client,
    ended: AtomicBool,
    /// Dropped with the session: stops its monitor.
    _stop: oneshot::Sender<()>,
}

impl Session {
    /// Whether the session expired or closed: no operation through it can succeed.
    pub(crate) fn is_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst) || self.client.state().is_terminated()
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

    /// Forgets every grant of an ended session.
    fn remove_session(&self, session: &Weak<Session>) {
        self.lock()
            .retain(|_, g| !Weak::ptr_eq(&g.session, session) && g.session.strong_count() > 0);
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
    current: Mutex<Option<Arc<Session>>>,
    connecting: tokio::sync::Mutex<()>,
    pub(crate) grants: Arc<Grants>,
    pub(crate) events: broadcast::Sender<StoreEvent>,
}

impl Sessions {
    pub(crate) fn new(config: ZooKeeperConfig) -> Self {
        Self {
            config,
            current: Mutex::new(None),
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
            client,
            ended: AtomicBool::new(false),
            _stop: stop,
        });
        tracing::debug!(session = %session.client.session_id(), timeout = ?session.client.session_timeout(), "zookeeper session established");
        tokio::spawn(monitor(
            Arc::downgrade(&session),
            states,
            stopped,
            Arc::clone(&self.grants),
            self.events.clone(),
        ));
        Ok(session)
    }
}

/// Turns a session's state changes into [`StoreEvent`]s until it ends or is dropped.
async fn monitor(
    session: Weak<Session>,
    mut states: zookeeper_client::StateWatcher,
    mut stopped: oneshot::Receiver<()>,
    grants: Arc<Grants>,
    events: broadcast::Sender<StoreEvent>,
) {
    let mut suspended = false;
    loop {
        let state = tokio::select! {
            state = states.changed() => state,
            _ = &mut stopped => return,
        };
        match state {
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
                if let Some(session) = session.upgrade() {
                    session.ended.store(true, Ordering::SeqCst);
                }
                grants.remove_session(&session);
                tracing::warn!(%state, "zookeeper session ended: every lock held through it is lost");
                let _ = events.send(StoreEvent::SessionLost {
                    reason: LossReason::SessionEnded,
                });
                return;
            }
        }
    }
}

/// How long to keep retrying a delete that failed for a connection loss: while the
/// session may still come back.
pub(crate) fn retry_window(session: &Session) -> Duration {
    session.client.session_timeout() * 2
}
