//! The session-mode locks one Postgres or MySQL backend holds: each on a connection
//! of its own, ended when its TTL passes without a renewal, renewed by probing its
//! connection, released by unlocking on it. The SQL of the probe and the unlock is the
//! store's ([`SessionStatements`]); the bookkeeping is written once here.
//!
//! A connection whose lock was released cleanly (the unlock succeeded, so its server
//! session holds nothing of ours) is kept on a small idle list, at most the pool's
//! size, for the next session acquire, which takes it before asking the pool: opening
//! a server session per lock is most of a lock cycle's cost. Every other end of a
//! lock (a failed probe or unlock, the TTL running out) closes the connection.
//! A kept connection keeps its [`ServerSession`] with it, so the next lock on it
//! needs no statement to learn which server session it is.
//!
//! What a held connection can promise: the server frees a session lock the moment the
//! session ends (killed by an operator, ended by an idle timeout, a server restart, a
//! connection reset by something in between), and nothing tells this client. Three
//! things bound how long it may believe otherwise:
//! - a TTL whose probe period (ttl/3) is not shorter than the server's idle timeout
//!   for the session ([`ServerSession::idle_limit`]) is refused before anything is
//!   taken, naming the setting ([`SessionStatements::IDLE_SETTING`]);
//! - a lease's validity is at most that idle timeout from when its grant or last
//!   probe was sent, whatever the TTL;
//! - every [`SESSION_CHECK_EVERY`] one statement on a pool connection asks the server
//!   whether the server sessions of the locks held for at least that long still hold
//!   them ([`SessionLocks::sessions_to_check`]); the locks of any that do not are
//!   reported lost at once, as a [`StoreEvent::LeaseLost`] the client's watchdog
//!   hears, instead of at the next probe (up to ttl/3 later).
//!
//! sqlx offers no way to wait for the end of an idle connection's stream (only
//! `PgListener` reads while idle, on a pool connection of its own), so the end of a
//! session is learned by asking the server, not from the socket.

use std::collections::HashMap;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fencelock_core::{
    AcquireRequest, Error, FencingToken, Lease, LockName, LossReason, OwnerId, Result, StoreEvent,
    valid_until,
};
use sqlx::pool::PoolConnection;
use sqlx::{Connection, Database};
use tokio::sync::broadcast;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// How often the server is asked which held locks' sessions still exist; a lock is
/// checked once it has been held this long, so a session that ends is reported lost
/// at most twice this (plus a round trip) after it ended.
pub(crate) const SESSION_CHECK_EVERY: Duration = Duration::from_secs(1);

/// A held lock's key and the server session holding it, for the session check.
pub(crate) type HeldBy = (String, ServerSession);

/// Events kept for a watchdog that has not read them yet; one that falls further
/// behind renews everything at once.
const EVENTS_KEPT: usize = 1024;

/// A store's statements on the connection of a held session lock.
pub(crate) trait SessionStatements: Send + Sync {
    /// The connection type.
    type Conn: Connection;

    /// The server setting that ends an idle session, for messages, e.g.
    /// `wait_timeout`.
    const IDLE_SETTING: &'static str;

    /// How to raise [`IDLE_SETTING`](Self::IDLE_SETTING) above `needed`, for messages.
    fn raise_idle_limit(needed: Duration) -> String;

    /// Whether `conn` is still server session `session` and holds the lock of `key`
    /// (`false` also when the connection failed).
    fn probe(
        &self,
        conn: &mut Self::Conn,
        key: &str,
        session: ServerSession,
    ) -> impl Future<Output = bool> + Send;

    /// Clears the row of `owner` and `token` and frees the lock of `key`; whether the
    /// lock was still held (`false` also when the connection failed).
    fn unlock(
        &self,
        conn: &mut Self::Conn,
        key: &str,
        owner: &str,
        token: u64,
    ) -> impl Future<Output = bool> + Send;
}

/// The server session behind a connection, which names it to the server (to end it
/// from another connection, or to check that a statement ran in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerSession {
    /// Postgres `pg_backend_pid()`, MySQL `CONNECTION_ID()`.
    pub(crate) id: i64,
    /// When it started, in µs since the epoch, where the id alone may be reused
    /// (Postgres `backend_start`); 0 where it is not needed or not known.
    pub(crate) started: i64,
    /// How long the server lets this session sit idle before it ends it (MySQL
    /// `wait_timeout`, Postgres `idle_session_timeout`), as read when the connection
    /// was identified; `None` if it never does.
    pub(crate) idle_limit: Option<Duration>,
}

impl ServerSession {
    /// The longest a lease on this session may be valid from when its grant or probe
    /// was sent, for `ttl`: the server ends the session (and frees the lock) once it
    /// has been idle for its idle limit, so no more can be promised.
    pub(crate) fn promised(&self, ttl: Duration) -> Duration {
        self.idle_limit.map_or(ttl, |limit| limit.min(ttl))
    }

    /// Refuses `ttl` if its probe period (ttl/3, the watchdog's renewal period) is not
    /// shorter than this session's idle limit: the server would end the session
    /// between two probes and free the lock while its holder believes it still holds
    /// it. The message names the setting and the two fixes.
    pub(crate) fn check_ttl<S: SessionStatements>(&self, ttl: Duration) -> Result<(), String> {
        let Some(limit) = self.idle_limit else {
            return Ok(());
        };
        if ttl / 3 < limit {
            return Ok(());
        }
        Err(format!(
            "mode=session cannot keep a lock with ttl {ttl:?}: the watchdog probes the              lock's connection every ttl/3 = {:?}, but the server ends a session idle for              {} = {limit:?}, which frees the lock at once while its holder still believes              it holds it; use a TTL below {:?} (3 x {}), or {}",
            ttl / 3,
            S::IDLE_SETTING,
            limit * 3,
            S::IDLE_SETTING,
            S::raise_idle_limit(ttl / 3),
        ))
    }
}

/// The session locks a backend holds, by owner id.
#[derive(Debug)]
pub(crate) struct SessionLocks<C> {
    store: &'static str,
    held: Mutex<HashMap<String, Arc<Held<C>>>>,
    /// Connections released cleanly, out of the pool, for the next acquire, each with
    /// its server session.
    idle: Mutex<Vec<(C, ServerSession)>>,
    /// The most connections `idle` keeps.
    idle_max: usize,
    /// Losses learned by the session check ([`sessions_ended`](Self::sessions_ended)).
    events: broadcast::Sender<StoreEvent>,
    /// Whether the session check task runs; changed only with `held` locked, so a
    /// grant and the task's end cannot miss each other.
    checking: std::sync::atomic::AtomicBool,
}

/// The connection of a session-mode attempt: from the pool, or kept from a clean
/// release.
#[derive(Debug)]
pub(crate) enum SessionConn<DB: Database> {
    /// Out of the pool; dropped, it goes back.
    Pooled(PoolConnection<DB>),
    /// Off the idle list, with its server session; it may have died while idle.
    Reused(DB::Connection, ServerSession),
}

impl<DB: Database> SessionConn<DB> {
    /// Whether it came off the idle list.
    pub(crate) fn is_reused(&self) -> bool {
        matches!(self, Self::Reused(..))
    }

    /// Its server session, if known without a statement (kept with a reused one).
    pub(crate) fn known_session(&self) -> Option<ServerSession> {
        match self {
            Self::Pooled(_) => None,
            Self::Reused(_, session) => Some(*session),
        }
    }

    /// The connection, no longer counted by the pool.
    pub(crate) fn detach(self) -> DB::Connection {
        match self {
            Self::Pooled(conn) => conn.detach(),
            Self::Reused(conn, _) => conn,
        }
    }
}

impl<DB: Database> Deref for SessionConn<DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        match self {
            Self::Pooled(conn) => conn,
            Self::Reused(conn, _) => conn,
        }
    }
}

impl<DB: Database> DerefMut for SessionConn<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        match self {
            Self::Pooled(conn) => conn,
            Self::Reused(conn, _) => conn,
        }
    }
}

/// One held session lock: its connection and when its TTL ends.
#[derive(Debug)]
struct Held<C> {
    name: LockName,
    owner: OwnerId,
    key: String,
    token: u64,
    /// When it was granted.
    taken: Instant,
    /// The server session of `conn`.
    session: ServerSession,
    conn: tokio::sync::Mutex<Option<C>>,
    ends_at: Mutex<Instant>,
    expiry: Mutex<Option<AbortHandle>>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is one assignment or map operation: poisoning leaves nothing
    // half-done.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ends the server session of `conn`, which frees its session locks.
async fn close<C: Connection>(conn: Option<C>) {
    if let Some(conn) = conn {
        let _ = conn.close().await;
    }
}

impl<C: Connection + 'static> SessionLocks<C> {
    /// No locks yet, for `store` (its name in errors and logs); keeps at most
    /// `idle_max` cleanly released connections for reuse.
    pub(crate) fn new(store: &'static str, idle_max: usize) -> Self {
        Self {
            store,
            held: Mutex::default(),
            idle: Mutex::default(),
            idle_max,
            events: broadcast::channel(EVENTS_KEPT).0,
            checking: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A new receiver of the losses the session check finds.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }

    /// Marks the session check task running; `true` if it was not (so the caller
    /// starts it).
    pub(crate) fn start_checking(&self) -> bool {
        let _table = locked(&self.held);
        !self
            .checking
            .swap(true, std::sync::atomic::Ordering::SeqCst)
    }

    /// The keys and server sessions of the locks held for at least
    /// [`SESSION_CHECK_EVERY`], for the session check task; `None` once nothing is
    /// held, when the task must end (it is marked stopped, so the next grant starts
    /// another).
    pub(crate) fn sessions_to_check(&self) -> Option<Vec<HeldBy>> {
        let table = locked(&self.held);
        if table.is_empty() {
            self.checking
                .store(false, std::sync::atomic::Ordering::SeqCst);
            return None;
        }
        let now = Instant::now();
        let mut sessions: Vec<HeldBy> = table
            .values()
            .filter(|held| held.taken + SESSION_CHECK_EVERY <= now)
            .map(|held| (held.key.clone(), held.session))
            .collect();
        sessions.sort_by(|(a, x), (b, y)| (a, x.id, x.started).cmp(&(b, y.id, y.started)));
        sessions.dedup();
        Some(sessions)
    }

    /// Ends every held lock that was among `checked` but is not in `alive` (the
    /// server said its session no longer holds it): forgets it, closes its
    /// connection, and tells the watchdog it is lost.
    pub(crate) async fn sessions_ended(&self, checked: &[HeldBy], alive: &[HeldBy]) {
        let ended: Vec<(String, Arc<Held<C>>)> = locked(&self.held)
            .iter()
            .filter(|(_, held)| {
                let by = (held.key.clone(), held.session);
                checked.contains(&by) && !alive.contains(&by)
            })
            .map(|(owner, held)| (owner.clone(), Arc::clone(held)))
            .collect();
        for (owner, held) in ended {
            if !self.forget(&owner, &held) {
                continue; // Released or ended meanwhile.
            }
            if let Some(expiry) = locked(&held.expiry).take() {
                expiry.abort();
            }
            tracing::warn!(
                key = held.key,
                store = self.store,
                session = held.session.id,
                "the server session holding a session lock ended"
            );
            let _ = self.events.send(StoreEvent::LeaseLost {
                name: held.name.clone(),
                owner: held.owner.clone(),
            });
            close(held.conn.lock().await.take()).await;
        }
    }

    /// The connection for a session-mode attempt: one kept from a clean release if
    /// there is one (the most recently kept: the least likely to have been closed by
    /// the server while idle), else one from `pool`.
    pub(crate) async fn connection<DB: Database<Connection = C>>(
        &self,
        pool: &sqlx::Pool<DB>,
    ) -> Result<SessionConn<DB>, sqlx::Error> {
        let kept = locked(&self.idle).pop();
        match kept {
            Some((conn, session)) => Ok(SessionConn::Reused(conn, session)),
            None => Ok(SessionConn::Pooled(pool.acquire().await?)),
        }
    }

    /// Ends an attempt that took nothing and changed no session state: a pool
    /// connection goes back to the pool, a reused one back on the idle list.
    pub(crate) async fn put_back<DB: Database<Connection = C>>(&self, conn: SessionConn<DB>) {
        match conn {
            SessionConn::Pooled(conn) => drop(conn),
            SessionConn::Reused(conn, session) => self.keep(conn, session).await,
        }
    }

    /// Keeps `conn` (server session `session`), which holds nothing of ours and has
    /// no session state left from a lock, for the next acquire; closes it if enough
    /// are kept.
    pub(crate) async fn keep(&self, conn: C, session: ServerSession) {
        let spare = {
            let mut idle = locked(&self.idle);
            if idle.len() < self.idle_max {
                idle.push((conn, session));
                None
            } else {
                Some(conn)
            }
        };
        close(spare).await;
    }

    fn lost(&self, lease: &Lease, reason: LossReason) -> Error {
        Error::Lost {
            name: lease.name().clone(),
            store: self.store,
            token: lease.token(),
            reason,
        }
    }

    /// Records the lock of `req` just taken with `token` on `conn` (server session
    /// `session`), which leaves the pool for as long as it is held, and starts its TTL
    /// from `taken` (when the lock statement returned: the server lock has no expiry of
    /// its own, so the connection is closed at `taken + ttl` unless renewed). Returns
    /// the lease, valid as long.
    pub(crate) fn grant(
        self: &Arc<Self>,
        req: &AcquireRequest,
        key: &str,
        token: u64,
        session: ServerSession,
        conn: C,
        taken: Instant,
    ) -> Lease {
        self.insert(req, key, token, session, conn, taken);
        Lease::new(
            req.name.clone(),
            req.owner.clone(),
            FencingToken(token),
            valid_until(taken, session.promised(req.ttl)),
        )
    }

    fn insert(
        self: &Arc<Self>,
        req: &AcquireRequest,
        key: &str,
        token: u64,
        session: ServerSession,
        conn: C,
        taken: Instant,
    ) {
        let owner = req.owner.as_str();
        let ends_at = taken + req.ttl;
        let held = Arc::new(Held {
            name: req.name.clone(),
            owner: req.owner.clone(),
            key: key.to_owned(),
            token,
            taken,
            session,
            conn: tokio::sync::Mutex::new(Some(conn)),
            ends_at: Mutex::new(ends_at),
            expiry: Mutex::new(None),
        });
        locked(&self.held).insert(owner.to_owned(), Arc::clone(&held));
        let expiry = tokio::spawn(Arc::clone(self).expire(owner.to_owned(), Arc::clone(&held)));
        *locked(&held.expiry) = Some(expiry.abort_handle());
    }

    /// Ends `held` once its TTL passes without a renewal. Runs until then or until
    /// the lock is released (which aborts it).
    ///
    /// A renewal probes with the connection's mutex held and extends the TTL before
    /// it lets go: so the TTL is judged again once the mutex is ours, and a renewal
    /// that succeeded while this timer fired keeps its connection.
    async fn expire(self: Arc<Self>, owner: String, held: Arc<Held<C>>) {
        let mut conn = loop {
            let ends_at = *locked(&held.ends_at);
            tokio::time::sleep_until(ends_at).await;
            if *locked(&held.ends_at) > Instant::now() {
                continue;
            }
            let conn = held.conn.lock().await;
            if *locked(&held.ends_at) <= Instant::now() {
                break conn;
            }
        };
        self.forget(&owner, &held);
        close(conn.take()).await;
        tracing::debug!(
            key = held.key,
            store = self.store,
            "session lock ran out its TTL"
        );
    }

    /// Removes `held` from the table if it is still the entry of `owner`; whether it
    /// was.
    fn forget(&self, owner: &str, held: &Arc<Held<C>>) -> bool {
        let mut table = locked(&self.held);
        let ours = table
            .get(owner)
            .is_some_and(|entry| Arc::ptr_eq(entry, held));
        if ours {
            table.remove(owner);
        }
        ours
    }

    /// The entry of `lease`, if this backend still holds exactly that grant.
    fn entry(&self, lease: &Lease, key: &str) -> Option<Arc<Held<C>>> {
        let table = locked(&self.held);
        let held = table.get(lease.owner().as_str())?;
        (held.key == key && held.token == lease.token().0).then(|| Arc::clone(held))
    }

    /// Probes the lock's connection and extends its TTL.
    pub(crate) async fn renew<S: SessionStatements<Conn = C>>(
        &self,
        statements: &S,
        lease: &Lease,
        key: &str,
        ttl: Duration,
    ) -> Result<Lease> {
        let Some(held) = self.entry(lease, key) else {
            return Err(self.lost(lease, LossReason::NotOurs));
        };
        let mut conn = held.conn.lock().await;
        let sent = Instant::now();
        if *locked(&held.ends_at) <= sent {
            // The TTL ran out before this renewal got the connection (the timer that
            // closes it waits for this mutex): too late to extend it.
            self.forget(lease.owner().as_str(), &held);
            close(conn.take()).await;
            return Err(self.lost(lease, LossReason::Expired));
        }
        let alive = match conn.as_mut() {
            Some(conn) => statements.probe(conn, key, held.session).await,
            None => false,
        };
        if !alive {
            // The connection died, or a proxy moved it to another server session:
            // either way the session that held the lock is gone.
            self.forget(lease.owner().as_str(), &held);
            close(conn.take()).await;
            return Err(self.lost(lease, LossReason::SessionEnded));
        }
        *locked(&held.ends_at) = sent + ttl;
        Ok(lease
            .clone()
            .renewed(valid_until(sent, held.session.promised(ttl))))
    }

    /// Unlocks on the lock's connection, then keeps it for reuse if the unlock
    /// succeeded and closes it otherwise; `Lost` if the lock was not held any more.
    /// `None` if this backend does not hold the lease.
    pub(crate) async fn release<S: SessionStatements<Conn = C>>(
        &self,
        statements: &S,
        lease: &Lease,
        key: &str,
    ) -> Option<Result<()>> {
        let held = self.entry(lease, key)?;
        self.forget(lease.owner().as_str(), &held);
        if let Some(expiry) = locked(&held.expiry).take() {
            expiry.abort();
        }
        let mut conn = held.conn.lock().await;
        let unlocked = match conn.as_mut() {
            Some(c) => {
                statements
                    .unlock(c, key, lease.owner().as_str(), held.token)
                    .await
            }
            None => false,
        };
        match conn.take() {
            Some(conn) if unlocked => self.keep(conn, held.session).await,
            conn => close(conn).await,
        }
        Some(if unlocked {
            Ok(())
        } else {
            Err(self.lost(lease, LossReason::SessionEnded))
        })
    }
}
