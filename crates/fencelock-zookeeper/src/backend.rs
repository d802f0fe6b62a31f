//! [`ZooKeeperBackend`]: the [`LockBackend`] on ZooKeeper.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fencelock_core::{
    AcquireRequest, Capabilities, Error, FencingToken, Lease, LeaseKind, LockBackend, LockName,
    LockState, LossReason, OwnerId, Result, StoreEvent, WaitDeadline, WaitKind, async_trait,
    valid_until,
};
use tokio::sync::broadcast;
use tokio::time::Instant;
use zookeeper_client::{Acls, CreateMode, EventType, SessionInfo};

use crate::ZooKeeperConfig;
use crate::recipe::{self, Place};
use crate::session::{Grant, Grants, Session, Sessions, retry_window};

/// The store's name in messages.
pub(crate) const STORE: &str = "zookeeper";

/// The most times one acquisition lists the line and waits (each wait ends on a watch
/// event or the deadline), as a bound on a store that misbehaves.
const MAX_WAIT_ROUNDS: usize = 1_000_000;
/// The most attempts at creating our node (parents missing, reply lost).
const MAX_CREATE_ATTEMPTS: usize = 5;

/// Locks on ZooKeeper in Apache Curator's `InterProcessMutex` layout.
///
/// - **Acquire**: creates the ephemeral-sequential node
///   `{root}/{escaped name}/_c_{uuid}-lock-NNNNNNNNNN` (parents created as needed),
///   lists the children once: the lowest sequence holds. A waiter watches only the
///   node just before its own (no herd) and lists again when it goes. If the reply to
///   the create is lost, the node is found by its uuid instead of creating another.
///   A dropped acquire, a `NoWait` refusal and a timed-out wait delete the node.
///   Uncontended, acquire and release send three requests in all: create, one
///   children listing, delete.
/// - **Token**: the node's `czxid`, read from the plain create's stat (never from a
///   multi-op, whose stat ZooKeeper 3.8.0 does not return: ZOOKEEPER-4026). Zxids rise
///   across the ensemble, so tokens keep rising when the lock's parent node is deleted
///   and recreated, unlike the sequence suffix.
/// - **TTL**: the node lives with the session, and this backend also deletes it when
///   the grant's TTL runs out without a renewal (as long as this process runs). A
///   renewal writes nothing: it reads the node's stat. A grant held for a third of
///   its TTL also watches its node, so a deletion by someone else is reported at once.
/// - **Renewal**: one `sync` (through the leader) and a read of each node's stat, sent
///   together; the new validity is capped at the session's deadline (see the crate
///   docs) when the TTL allows.
/// - **Release**: a versioned delete of our node; through another backend than the
///   one that granted it, after checking the node's `czxid` is the lease's token. A
///   delete whose outcome is unknown is retried in the background (backoff 50 ms to
///   1 s, bounded) while the session lives.
///   Renewals must go through the granting backend (it keeps the TTL).
/// - **Contenders**: every child with ZooKeeper's 10-digit sequence suffix, so kazoo's
///   `Lock` nodes count too.
/// - **Session**: one per backend. Disconnected sends [`StoreEvent::Suspended`],
///   reconnected [`StoreEvent::Resumed`], expired [`StoreEvent::SessionLost`] (every
///   grant lost) and the next call builds a fresh session; our node deleted by someone
///   else sends [`StoreEvent::LeaseLost`]. A session that carries grants and has had
///   no `sync` or write answered for three quarters of its timeout is given up the
///   same way (and closed), before the server could expire it.
pub struct ZooKeeperBackend {
    sessions: Sessions,
    wakeups: Arc<AtomicU64>,
}

impl fmt::Debug for ZooKeeperBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZooKeeperBackend")
            .field("config", self.sessions.config())
            .finish_non_exhaustive()
    }
}

/// Maps a client error: connection trouble and an ended session are temporary (a fresh
/// session is built for the next call).
pub(crate) fn zk_error(what: impl Into<String>, err: zookeeper_client::Error) -> Error {
    use zookeeper_client::Error as Zk;
    let temporary = outcome_unknown(&err)
        || matches!(
            err,
            Zk::NoHosts | Zk::SessionExpired | Zk::SessionMoved | Zk::ClientClosed | Zk::Throttled
        );
    Error::backend(STORE, what, temporary, err)
}

/// Whether a request failed without the server's answer, so it may or may not have
/// been applied: a lost connection (reported as `ConnectionLoss`, or as the socket's
/// own error when the connection was reset mid-request).
fn outcome_unknown(err: &zookeeper_client::Error) -> bool {
    use zookeeper_client::Error as Zk;
    matches!(err, Zk::ConnectionLoss | Zk::Timeout | Zk::Custom(_))
}

fn lost(lease: &Lease) -> Error {
    Error::Lost {
        name: lease.name().clone(),
        store: STORE,
        token: lease.token(),
        reason: LossReason::NotOurs,
    }
}

/// An acquisition whose session ended (expired, or given up unanswered) while it ran.
fn session_ended(what: String) -> Error {
    Error::backend(
        STORE,
        what,
        true,
        "the ZooKeeper session ended meanwhile (expired, or unanswered for three quarters \
         of its timeout); its node goes with it, and the next attempt builds a fresh session",
    )
}

fn token_of(stat: &zookeeper_client::Stat) -> FencingToken {
    FencingToken(u64::try_from(stat.czxid).unwrap_or(0))
}

impl ZooKeeperBackend {
    /// Connects to the ensemble in `config` and establishes the session.
    ///
    /// # Errors
    /// [`Error::Backend`] if no session is established within `connect_timeout`.
    pub async fn connect(config: ZooKeeperConfig) -> Result<Self> {
        let backend = Self {
            sessions: Sessions::new(config),
            wakeups: Arc::new(AtomicU64::new(0)),
        };
        backend.sessions.get().await?;
        Ok(backend)
    }

    /// Connects by URL (`zk://h1:2181,h2:2181/root?session_timeout=10s`).
    ///
    /// # Errors
    /// [`Error::Config`] for a bad URL, [`Error::Backend`] as [`connect`](Self::connect).
    pub async fn open(url: &str) -> Result<Self> {
        Self::connect(ZooKeeperConfig::from_url(url)?).await
    }

    /// The configuration in use.
    pub fn config(&self) -> &ZooKeeperConfig {
        self.sessions.config()
    }

    /// The node under which the lock nodes of `name` live: `{root}/{escaped name}`.
    /// Curator's `InterProcessMutex` on this path excludes this backend's holders.
    pub fn lock_path(&self, name: &LockName) -> String {
        recipe::lock_dir(&self.config().root, name.as_str())
    }

    /// The current session's id and password, `None` while none is established.
    /// For operators and tests (e.g. to close the session from another client).
    pub fn session(&self) -> Option<SessionInfo> {
        self.sessions.peek().map(|s| s.client.session().clone())
    }

    /// The session timeout the server granted, `None` while no session is established.
    pub fn session_timeout(&self) -> Option<Duration> {
        self.sessions.peek().map(|s| s.client.session_timeout())
    }

    /// How many times a waiter of this backend was woken by the watch on the node
    /// before its own; one release wakes one waiter.
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }

    /// How many grants this backend holds now.
    pub fn held(&self) -> usize {
        self.sessions.grants.len()
    }

    /// Creates our node, creating missing parents, and finds it by `uuid` when the
    /// reply was lost. Returns its path and stat.
    async fn create_node(
        &self,
        node: &mut PendingNode,
        owner: &OwnerId,
        what: &str,
    ) -> Result<zookeeper_client::Stat> {
        let client = &node.session.client;
        let prefix = recipe::node_prefix(&node.dir, &node.uuid);
        let ephemeral = CreateMode::EphemeralSequential.with_acls(Acls::anyone_all());
        let parent = CreateMode::Persistent.with_acls(Acls::anyone_all());
        let mut last = None;
        for _ in 0..MAX_CREATE_ATTEMPTS {
            let sent = Instant::now();
            let created = client
                .create(&prefix, owner.as_str().as_bytes(), &ephemeral)
                .await;
            node.session.answered(sent, &created);
            match created {
                Ok((stat, sequence)) => {
                    let path = format!("{prefix}{sequence}");
                    node.path = Some(path.clone());
                    if stat.czxid > 0 {
                        return Ok(stat);
                    }
                    // A server that returned no stat: read it.
                    return match client.check_stat(&path).await {
                        Ok(Some(stat)) => Ok(stat),
                        Ok(None) => Err(Error::backend(
                            STORE,
                            what.to_owned(),
                            true,
                            "our new node vanished at once (session expired?)",
                        )),
                        Err(err) => Err(zk_error(what.to_owned(), err)),
                    };
                }
                Err(zookeeper_client::Error::NoNode) => {
                    let sent = Instant::now();
                    let made = client.mkdir(&node.dir, &parent).await;
                    node.session.answered(sent, &made);
                    match made {
                        Ok(()) | Err(zookeeper_client::Error::NodeExists) => {}
                        Err(err) => return Err(zk_error(format!("{what}: create parents"), err)),
                    }
                }
                Err(err) if outcome_unknown(&err) => {
                    // The server may have created it: look before creating another.
                    if let Some((path, stat)) = find_ours(&node.session, &node.dir, &node.uuid)
                        .await
                        .map_err(|err| zk_error(format!("{what}: find our node"), err))?
                    {
                        node.path = Some(path);
                        return Ok(stat);
                    }
                    last = Some(err);
                }
                Err(err) => return Err(zk_error(what.to_owned(), err)),
            }
        }
        Err(zk_error(
            what.to_owned(),
            last.unwrap_or(zookeeper_client::Error::ConnectionLoss),
        ))
    }

    /// Registers a grant and starts its keeper (TTL and deletion watch).
    fn register(&self, session: &Arc<Session>, path: &str, grant: Grant, ttl: Duration) {
        self.sessions.grants.insert(path.to_owned(), grant);
        tokio::spawn(keep(
            Arc::downgrade(&self.sessions.grants),
            Arc::clone(session),
            path.to_owned(),
            ttl / 3,
            self.sessions.events.clone(),
        ));
    }
}

/// Looks for the node of acquisition `uuid` under `dir`, retrying connection losses
/// while the session may come back.
async fn find_ours(
    session: &Session,
    dir: &str,
    uuid: &str,
) -> std::result::Result<Option<(String, zookeeper_client::Stat)>, zookeeper_client::Error> {
    let until = Instant::now() + retry_window(session);
    loop {
        if session.is_ended() {
            return Err(zookeeper_client::Error::SessionExpired);
        }
        let attempt = async {
            let children = match session.client.list_children(dir).await {
                Ok(children) => children,
                Err(zookeeper_client::Error::NoNode) => return Ok(None),
                Err(err) => return Err(err),
            };
            let Some(child) = children.into_iter().find(|c| recipe::is_ours(c, uuid)) else {
                return Ok(None);
            };
            let path = format!("{dir}/{child}");
            Ok(session.client.check_stat(&path).await?.map(|s| (path, s)))
        };
        match attempt.await {
            Err(err) if outcome_unknown(&err) && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// Deletes our node at `path` (or found by `uuid` under `dir`), retrying connection
/// losses while the session may come back. A node already gone is fine.
async fn delete_ours(session: &Session, dir: &str, uuid: &str, path: Option<String>) {
    let until = Instant::now() + retry_window(session);
    loop {
        if session.is_ended() {
            return; // its nodes go with it
        }
        let path = match path.clone() {
            Some(path) => Some(path),
            None => match find_ours(session, dir, uuid).await {
                Ok(found) => found.map(|(path, _)| path),
                Err(_) => return,
            },
        };
        let Some(path) = path else { return };
        match session.client.delete(&path, None).await {
            Err(err) if outcome_unknown(&err) && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => return,
        }
    }
}

/// The most times a release's delete whose outcome was unknown is retried.
const MAX_DELETE_RETRIES: usize = 40;

/// Retries the delete of a released grant's node after a delete whose outcome was
/// unknown: with backoff (50 ms, doubling up to 1 s), at most [`MAX_DELETE_RETRIES`]
/// times, while the session lives (when it ends, the node goes with it). Done once
/// the node is gone or is no longer this grant's; then forgets the grant.
async fn retry_delete(grants: Arc<Grants>, session: Arc<Session>, path: String, grant: Grant) {
    let mut pause = Duration::from_millis(50);
    let mut version = grant.version;
    for _ in 0..MAX_DELETE_RETRIES {
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = session.ended() => break,
        }
        pause = (pause * 2).min(Duration::from_secs(1));
        let sent = Instant::now();
        let deleted = session.client.delete(&path, Some(version)).await;
        session.answered(sent, &deleted);
        match deleted {
            Ok(()) | Err(zookeeper_client::Error::NoNode) => break,
            // Someone wrote to our node: delete it if it is still ours.
            Err(zookeeper_client::Error::BadVersion) => {
                match session.client.check_stat(&path).await {
                    Ok(Some(stat)) if token_of(&stat) == grant.token => version = stat.version,
                    Ok(_) => break,
                    Err(_) => {}
                }
            }
            Err(err) if outcome_unknown(&err) => {}
            Err(err) => {
                tracing::debug!(lock = %grant.name, %err, "zookeeper release retry gave up");
                break;
            }
        }
    }
    grants.remove_if(&path, grant.token);
}

/// Our node while an acquisition is in progress: deleted in the background if the
/// acquisition is dropped before it settles.
struct PendingNode {
    session: Arc<Session>,
    dir: String,
    uuid: String,
    path: Option<String>,
    settled: bool,
}

impl PendingNode {
    /// Deletes the node now (the acquisition failed).
    async fn abandon(mut self) {
        self.settled = true;
        delete_ours(&self.session, &self.dir, &self.uuid, self.path.take()).await;
    }
}

impl Drop for PendingNode {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime: the node goes with the session
        };
        let (session, dir, uuid, path) = (
            Arc::clone(&self.session),
            std::mem::take(&mut self.dir),
            std::mem::take(&mut self.uuid),
            self.path.take(),
        );
        runtime.spawn(async move { delete_ours(&session, &dir, &uuid, path).await });
    }
}

/// Keeps one grant: deletes its node when its TTL runs out unrenewed, and reports a
/// deletion by anyone else as [`StoreEvent::LeaseLost`].
///
/// The deletion watch is armed only once the grant has been held for `arm_after`
/// (a third of its TTL, when the watchdog's first renewal also reads the node), so an
/// uncontended acquire+release costs exactly create, one children listing and delete.
/// A deletion before that is found by the next renewal.
///
/// Holds the session, so a grant outlives a dropped backend until its TTL, like a
/// grant of a TTL store; the last keeper to end closes the session.
async fn keep(
    grants: std::sync::Weak<Grants>,
    session: Arc<Session>,
    path: String,
    arm_after: Duration,
    events: broadcast::Sender<StoreEvent>,
) {
    type Watch =
        std::pin::Pin<Box<dyn std::future::Future<Output = zookeeper_client::WatchedEvent> + Send>>;
    let mut watch: Watch = Box::pin(futures_pending());
    let mut arm_at = Some(Instant::now() + arm_after);
    loop {
        let Some(deadline) = grants.upgrade().and_then(|g| g.deadline(&path)) else {
            return; // released or lost
        };
        let arming = async {
            match arm_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            () = tokio::time::sleep_until(deadline) => {
                let Some(grants) = grants.upgrade() else { return };
                if grants.deadline(&path).is_some_and(|d| d > Instant::now()) {
                    continue; // renewed meanwhile
                }
                let Some(grant) = grants.remove(&path) else { return };
                drop(grants);
                tracing::debug!(lock = %grant.name, "zookeeper grant's ttl ran out: deleting its node");
                delete_ours(&session, "", "", Some(path)).await;
                return;
            }
            () = arming => None,
            event = &mut watch => Some(event),
            () = session.ended() => return, // the session monitor reports it
        };
        arm_at = None;
        if event
            .as_ref()
            .is_some_and(|e| e.event_type == EventType::Session)
        {
            return; // the session monitor reports it
        }
        let Some(grants) = grants.upgrade() else {
            return;
        };
        if grants.deadline(&path).is_none() {
            return; // released meanwhile
        }
        // (Re-)arm on anything but a deletion; a node gone means lost.
        let deleted = event
            .as_ref()
            .is_some_and(|e| e.event_type == EventType::NodeDeleted);
        let exists = match session.client.check_and_watch_stat(&path).await {
            Ok((Some(_), armed)) if !deleted => {
                watch = Box::pin(armed.changed());
                true
            }
            Ok((Some(_), _)) | Err(_) => {
                // The old watch has fired; if unreadable now (disconnected), the
                // renewals find out.
                watch = Box::pin(futures_pending());
                true
            }
            Ok((None, _)) => false,
        };
        if !exists {
            if let Some(grant) = grants.remove(&path) {
                tracing::warn!(lock = %grant.name, "zookeeper lock node deleted by someone else");
                let _ = events.send(StoreEvent::LeaseLost {
                    name: grant.name,
                    owner: grant.owner,
                });
            }
            return;
        }
    }
}

async fn futures_pending() -> zookeeper_client::WatchedEvent {
    std::future::pending().await
}

#[async_trait]
impl LockBackend for ZooKeeperBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            store: STORE,
            fencing: true,
            fifo: true,
            wait: WaitKind::Notify,
            lease: LeaseKind::Session,
            shared_between_processes: true,
        }
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Lease> {
        fencelock_core::check_ttl(req.ttl)?;
        let what = format!("acquire `{}`", req.name);
        let deadline = WaitDeadline::start(req.wait);
        let session = self.sessions.get().await?;
        let mut node = PendingNode {
            dir: self.lock_path(&req.name),
            uuid: uuid::Uuid::new_v4().to_string(),
            session: Arc::clone(&session),
            path: None,
            settled: false,
        };
        let stat = self.create_node(&mut node, &req.owner, &what).await?;
        let path = node.path.clone().unwrap_or_default();
        let ours = path.rsplit('/').next().unwrap_or_default().to_owned();
        let client = &session.client;
        for _ in 0..MAX_WAIT_ROUNDS {
            let sent = Instant::now();
            // After a quiet spell (a long wait), a sync goes first: the listing then
            // shows what the leader has, and its answer moves the session's deadline.
            // Both are sent now; ZooKeeper answers a session's requests in order.
            let sync = session.quiet().then(|| client.sync(&node.dir));
            let listing = client.list_children(&node.dir);
            if let Some(sync) = sync {
                let synced = sync.await;
                session.answered(sent, &synced);
            }
            let children = match listing.await {
                Ok(children) => children,
                Err(err) => return Err(zk_error(what, err)),
            };
            let line = recipe::queue(children);
            let before = match recipe::place(&line, &ours) {
                Place::First if session.is_ended() => {
                    node.settled = true; // the node goes with the session
                    return Err(session_ended(what));
                }
                Place::First => {
                    node.settled = true;
                    let valid = session.validity(sent, req.ttl);
                    let token = token_of(&stat);
                    self.register(
                        &session,
                        &path,
                        Grant {
                            name: req.name.clone(),
                            owner: req.owner.clone(),
                            token,
                            version: stat.version,
                            // The node lives for the TTL; only the guard's belief is
                            // capped by the session.
                            deadline: valid_until(sent, req.ttl),
                            session: Arc::downgrade(&session),
                        },
                        req.ttl,
                    );
                    return Ok(Lease::new(req.name, req.owner, token, valid).with_locator(path));
                }
                Place::Gone => {
                    return Err(Error::backend(
                        STORE,
                        what,
                        true,
                        "our queue node vanished while waiting (session expired or deleted by an operator)",
                    ));
                }
                Place::After(before) => format!("{}/{before}", node.dir),
            };
            if !deadline.may_wait() || deadline.passed() {
                node.abandon().await;
                return Err(deadline.give_up(&req.name, STORE));
            }
            let watch = match client.check_and_watch_stat(&before).await {
                Ok((Some(_), watch)) => watch,
                Ok((None, _)) => continue, // went between the listing and the watch
                Err(err) => return Err(zk_error(what, err)),
            };
            let until = async {
                match deadline.deadline() {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let woken = tokio::select! {
                _ = watch.changed() => true,
                () = until => false,
                () = session.ended() => {
                    node.settled = true; // the node goes with the session
                    return Err(session_ended(what));
                }
            };
            if !woken {
                node.abandon().await;
                return Err(deadline.give_up(&req.name, STORE));
            }
            self.wakeups.fetch_add(1, Ordering::Relaxed);
        }
        node.abandon().await;
        Err(deadline.give_up(&req.name, STORE))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let mut renewed = self.renew_all(&[(lease.clone(), ttl)]).await;
        renewed.pop().unwrap_or_else(|| Err(lost(lease)))
    }

    /// Sends one `sync` per session (through the leader, so its answer moves the
    /// session's deadline and the reads after it show what the leader has), then a
    /// read of each lease's node, all at once: ZooKeeper answers a session's requests
    /// in order, so a tick costs one round trip.
    async fn renew_all(&self, leases: &[(Lease, Duration)]) -> Vec<Result<Lease>> {
        let sent = Instant::now();
        let grants = &self.sessions.grants;
        let sessions: Vec<Result<Arc<Session>>> = leases
            .iter()
            .map(|(lease, _)| {
                let path = lease.locator().ok_or_else(|| lost(lease))?;
                let grant = grants.get(path, lease.token()).ok_or_else(|| lost(lease))?;
                match grant.session.upgrade().filter(|s| !s.is_ended()) {
                    Some(session) => Ok(session),
                    None => {
                        grants.remove(path);
                        Err(lost(lease))
                    }
                }
            })
            .collect();
        let mut distinct: Vec<&Arc<Session>> = Vec::new();
        for session in sessions.iter().flatten() {
            if !distinct.iter().any(|s| Arc::ptr_eq(s, session)) {
                distinct.push(session);
            }
        }
        let syncs: Vec<_> = distinct
            .iter()
            .map(|session| (*session, session.client.sync("/")))
            .collect();
        let reads: Vec<_> = sessions
            .iter()
            .zip(leases)
            .map(|(session, (lease, _))| {
                let session = session.as_ref().ok()?;
                Some(session.client.check_stat(lease.locator()?))
            })
            .collect();
        for (session, sync) in syncs {
            let answer = sync.await;
            session.answered(sent, &answer);
        }
        let mut results = Vec::with_capacity(leases.len());
        for ((session, read), (lease, ttl)) in sessions.iter().zip(reads).zip(leases) {
            let (session, read) = match (session, read) {
                (Ok(session), Some(read)) => (session, read),
                _ => {
                    results.push(Err(lost(lease)));
                    continue;
                }
            };
            let path = lease.locator().unwrap_or_default();
            results.push(match read.await {
                Ok(Some(stat)) if token_of(&stat) == lease.token() => {
                    let valid = session.validity(sent, *ttl);
                    if grants.extend(path, lease.token(), valid_until(sent, *ttl)) {
                        Ok(lease.clone().renewed(valid))
                    } else {
                        Err(lost(lease))
                    }
                }
                Ok(_) => {
                    // Our node is gone before its watch was armed: tell the feed too.
                    if grants.remove(path).is_some() {
                        let _ = self.sessions.events.send(StoreEvent::LeaseLost {
                            name: lease.name().clone(),
                            owner: lease.owner().clone(),
                        });
                    }
                    Err(lost(lease))
                }
                Err(zookeeper_client::Error::SessionExpired) => {
                    grants.remove(path);
                    Err(lost(lease))
                }
                Err(err) => Err(zk_error(format!("renew `{}`", lease.name()), err)),
            });
        }
        results
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let path = lease.locator().ok_or_else(|| lost(lease))?;
        let what = format!("release `{}`", lease.name());
        let grants = &self.sessions.grants;
        let Some(grant) = grants.get(path, lease.token()) else {
            // Granted through another backend: delete the node if it is still that grant's.
            let session = self.sessions.get().await?;
            return match session.client.check_stat(path).await {
                Ok(Some(stat)) if token_of(&stat) == lease.token() => {
                    match session.client.delete(path, Some(stat.version)).await {
                        Ok(()) => Ok(()),
                        Err(zookeeper_client::Error::NoNode) => Err(lost(lease)),
                        Err(err) => Err(zk_error(what, err)),
                    }
                }
                Ok(_) => Err(lost(lease)),
                Err(err) => Err(zk_error(what, err)),
            };
        };
        let Some(session) = grant.session.upgrade().filter(|s| !s.is_ended()) else {
            grants.remove(path);
            return Err(lost(lease));
        };
        // Out of the table first, so the keeper does not report our own delete.
        grants.remove(path);
        let sent = Instant::now();
        let deleted = session.client.delete(path, Some(grant.version)).await;
        session.answered(sent, &deleted);
        match deleted {
            Ok(()) => Ok(()),
            Err(zookeeper_client::Error::NoNode) => Err(lost(lease)),
            Err(zookeeper_client::Error::BadVersion) => {
                // Someone wrote to our node: delete it if it is still the same node.
                match session.client.check_stat(path).await {
                    Ok(Some(stat)) if token_of(&stat) == lease.token() => session
                        .client
                        .delete(path, Some(stat.version))
                        .await
                        .map_err(|err| zk_error(what, err)),
                    Ok(_) => Err(lost(lease)),
                    Err(err) => Err(zk_error(what, err)),
                }
            }
            Err(err) if outcome_unknown(&err) => {
                // The delete may or may not have been applied, and the grant's TTL task
                // may have ended already (it ends when it finds the grant gone): keep
                // the grant and retry the delete while the session lives.
                grants.insert(path.to_owned(), grant.clone());
                tokio::spawn(retry_delete(
                    Arc::clone(grants),
                    session,
                    path.to_owned(),
                    grant,
                ));
                Err(zk_error(
                    format!(
                        "{what} (outcome unknown; the delete is retried in the background while the session lives)"
                    ),
                    err,
                ))
            }
            Err(err) => {
                // Keep the grant so a retry (or the TTL) deletes it.
                grants.insert(path.to_owned(), grant);
                Err(zk_error(what, err))
            }
        }
    }

    fn events(&self) -> Option<broadcast::Receiver<StoreEvent>> {
        Some(self.sessions.events.subscribe())
    }

    async fn inspect(&self, name: &LockName) -> Result<Option<LockState>> {
        let what = format!("inspect `{name}`");
        let session = self.sessions.get().await?;
        let dir = self.lock_path(name);
        // The holder may go between the listing and the read: look again, bounded.
        for _ in 0..5 {
            let children = match session.client.list_children(&dir).await {
                Ok(children) => children,
                Err(zookeeper_client::Error::NoNode) => return Ok(None),
                Err(err) => return Err(zk_error(what, err)),
            };
            let Some(first) = recipe::queue(children).into_iter().next() else {
                return Ok(None);
            };
            match session.client.get_data(&format!("{dir}/{first}")).await {
                Ok((data, stat)) => {
                    let holder = String::from_utf8(data)
                        .ok()
                        .filter(|d| !d.is_empty())
                        .unwrap_or(first);
                    return Ok(Some(LockState {
                        holder: OwnerId::from_stored(holder),
                        token: token_of(&stat),
                        remaining: None,
                    }));
                }
                Err(zookeeper_client::Error::NoNode) => continue,
                Err(err) => return Err(zk_error(what, err)),
            }
        }
        Err(Error::backend(
            STORE,
            what,
            true,
            "the holder kept changing while being read",
        ))
    }
}
