//! What the Postgres and MySQL backends do alike, written once: lease mode through a
//! [`LeaseStore`], session mode through [`SessionLocks`] on a connection per lock, and
//! the choice between them for every call.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fencelock_core::{
    AcquireRequest, Capabilities, Error, Lease, LeaseKind, LockName, LockState, Result, StoreEvent,
    WaitDeadline, WaitKind,
};
use sqlx::Pool;

use crate::lease::{Dialect, LeaseStore};
use crate::session_table::{
    HeldBy, SESSION_CHECK_EVERY, ServerSession, SessionLocks, SessionStatements,
};

/// Why a session-mode attempt failed.
#[derive(Debug)]
pub(crate) enum SessionError {
    /// A statement failed.
    Sql(sqlx::Error),
    /// The statements of one connection ran in different server sessions, or the lock
    /// was not held by the server session that took it: a pooling proxy is in between.
    PoolingProxy,
    /// The session cannot keep the lock for the TTL asked (see
    /// [`ServerSession::check_ttl`]); nothing was taken.
    TtlRefused(String),
}

impl From<sqlx::Error> for SessionError {
    fn from(err: sqlx::Error) -> Self {
        Self::Sql(err)
    }
}

/// A server's session-mode SQL: taking a lock on a connection of its own, ending
/// another client's, and reading the holder.
pub(crate) trait SessionMode: SessionStatements<Conn: 'static> + Sized + 'static {
    /// The database.
    type Db: sqlx::Database;

    /// Takes the lock of `key`, waiting in the server's queue as `deadline` allows:
    /// `Some` lease if granted, `None` if still held when waiting ends.
    fn acquire(
        &self,
        locks: &Arc<SessionLocks<Self::Conn>>,
        pool: &Pool<Self::Db>,
        req: &AcquireRequest,
        key: &str,
        deadline: &WaitDeadline,
    ) -> impl Future<Output = Result<Option<Lease>, SessionError>> + Send;

    /// Ends the server session that holds `lease` for another client; whether it did.
    fn release_elsewhere(
        &self,
        pool: &Pool<Self::Db>,
        lease: &Lease,
        key: &str,
    ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send;

    /// The holder of `key`, if a session holds its lock now.
    fn holder(
        &self,
        pool: &Pool<Self::Db>,
        key: &str,
    ) -> impl Future<Output = Result<Option<LockState>, sqlx::Error>> + Send;

    /// The server session of a connection of `pool`, with its idle limit.
    fn session_of(
        &self,
        pool: &Pool<Self::Db>,
    ) -> impl Future<Output = Result<ServerSession, sqlx::Error>> + Send;

    /// Which of `held` (locks and the server sessions that took them) the server
    /// still has, as far as it can tell: one statement on a connection of `pool`.
    fn alive(
        &self,
        pool: &Pool<Self::Db>,
        held: &[HeldBy],
    ) -> impl Future<Output = Result<Vec<HeldBy>, sqlx::Error>> + Send;
}

/// The locks of a server backend, in lease or session mode.
pub(crate) struct ServerLocks<D: Dialect, S: SessionMode<Db = D::Db>> {
    lease: LeaseStore<D>,
    /// Set in session mode.
    session: Option<Session<S>>,
    /// What [`Error::Unsupported`] says when a pooling proxy is in between.
    pooling_proxy: String,
}

struct Session<S: SessionMode> {
    locks: Arc<SessionLocks<S::Conn>>,
    queries: Arc<S>,
}

/// Every [`SESSION_CHECK_EVERY`] while locks are held, asks the server whether the
/// server sessions holding them still do, and reports the locks of the others lost
/// at once (see [`SessionLocks::sessions_ended`]). Ends when nothing is held.
async fn check_sessions<S: SessionMode>(
    locks: Arc<SessionLocks<S::Conn>>,
    queries: Arc<S>,
    pool: Pool<S::Db>,
) {
    loop {
        tokio::time::sleep(SESSION_CHECK_EVERY).await;
        let Some(sessions) = locks.sessions_to_check() else {
            return;
        };
        if sessions.is_empty() {
            continue;
        }
        match queries.alive(&pool, &sessions).await {
            Ok(alive) => locks.sessions_ended(&sessions, &alive).await,
            // The renewal's probe will tell.
            Err(err) => tracing::debug!(%err, "could not check the sessions of held locks"),
        }
    }
}

impl<D: Dialect, S: SessionMode<Db = D::Db>> ServerLocks<D, S> {
    /// Locks through `lease`, or in session mode with `session`'s SQL when given.
    /// Session mode keeps at most the pool's size of cleanly released connections for
    /// reuse.
    pub(crate) fn new(lease: LeaseStore<D>, session: Option<S>, pooling_proxy: String) -> Self {
        let idle_max =
            usize::try_from(lease.pool().options().get_max_connections()).unwrap_or(usize::MAX);
        Self {
            session: session.map(|queries| Session {
                locks: Arc::new(SessionLocks::new(D::STORE, idle_max)),
                queries: Arc::new(queries),
            }),
            lease,
            pooling_proxy,
        }
    }

    /// The lease-mode store (its pool serves session mode too).
    pub(crate) fn lease(&self) -> &LeaseStore<D> {
        &self.lease
    }

    /// Notify or poll waiting in lease mode as the dialect says; in session mode the
    /// server's queue wakes the waiter.
    pub(crate) fn capabilities(&self) -> Capabilities {
        Capabilities {
            store: D::STORE,
            fencing: true,
            fifo: false,
            wait: if self.session.is_some() {
                WaitKind::Notify
            } else {
                D::WAIT
            },
            lease: if self.session.is_some() {
                LeaseKind::Session
            } else {
                LeaseKind::Ttl
            },
            shared_between_processes: true,
        }
    }

    /// [`LockBackend::acquire`](fencelock_core::LockBackend::acquire).
    pub(crate) async fn acquire(&self, req: AcquireRequest) -> Result<Lease> {
        let key = self.lease.key(&req.name);
        let Some(session) = &self.session else {
            return self.lease.acquire(&req, &key).await;
        };
        // The server's queue does the waiting.
        let deadline = WaitDeadline::start(req.wait);
        let attempt = (session.queries)
            .acquire(&session.locks, self.lease.pool(), &req, &key, &deadline)
            .await;
        let lease = attempt
            .map_err(|err| match err {
                SessionError::Sql(err) => self
                    .lease
                    .failed(format_args!("acquire `{}`", req.name), err),
                SessionError::PoolingProxy => Error::Unsupported {
                    store: D::STORE,
                    what: self.pooling_proxy.clone(),
                },
                SessionError::TtlRefused(why) => Error::config(format!(
                    "{}: {why}",
                    self.lease.context(format_args!("acquire `{}`", req.name))
                )),
            })?
            .ok_or_else(|| deadline.give_up(&req.name, D::STORE))?;
        if session.locks.start_checking() {
            tokio::spawn(check_sessions(
                Arc::clone(&session.locks),
                Arc::clone(&session.queries),
                self.lease.pool().clone(),
            ));
        }
        Ok(lease)
    }

    /// Fails with [`Error::Config`] if session mode cannot keep a lock for `ttl` (see
    /// [`ServerSession::check_ttl`]), judged on a connection of the pool; `Ok` in
    /// lease mode, where the server keeps no session for a lock.
    pub(crate) async fn check_ttl(&self, ttl: Duration) -> Result<()> {
        let Some(session) = &self.session else {
            return Ok(());
        };
        let server = session
            .queries
            .session_of(self.lease.pool())
            .await
            .map_err(|err| self.lease.failed("read the session's idle timeout", err))?;
        server
            .check_ttl::<S>(ttl)
            .map_err(|why| Error::config(format!("{}: {why}", self.lease.context("ttl"))))
    }

    /// [`LockBackend::events`](fencelock_core::LockBackend::events): in session mode,
    /// the locks found lost when their server session ended.
    pub(crate) fn events(&self) -> Option<tokio::sync::broadcast::Receiver<StoreEvent>> {
        self.session
            .as_ref()
            .map(|session| session.locks.subscribe())
    }

    /// [`LockBackend::renew`](fencelock_core::LockBackend::renew).
    pub(crate) async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let Some(session) = &self.session else {
            return self.lease.renew(lease, ttl).await;
        };
        let key = self.lease.key(lease.name());
        session
            .locks
            .renew(&*session.queries, lease, &key, ttl)
            .await
    }

    /// [`LockBackend::renew_all`](fencelock_core::LockBackend::renew_all).
    pub(crate) async fn renew_all(&self, leases: &[(Lease, Duration)]) -> Vec<Result<Lease>> {
        if self.session.is_none() {
            return self.lease.renew_all(leases).await;
        }
        // One probe per held connection: there is nothing to batch.
        let renewals = leases.iter().map(|(lease, ttl)| self.renew(lease, *ttl));
        futures_util::future::join_all(renewals).await
    }

    /// [`LockBackend::release`](fencelock_core::LockBackend::release).
    pub(crate) async fn release(&self, lease: &Lease) -> Result<()> {
        let Some(session) = &self.session else {
            return self.lease.release(lease).await;
        };
        let key = self.lease.key(lease.name());
        let queries = &*session.queries;
        let released = match session.locks.release(queries, lease, &key).await {
            Some(released) => released,
            None => queries
                .release_elsewhere(self.lease.pool(), lease, &key)
                .await
                .map_err(|err| {
                    (self.lease).failed(format_args!("release `{}`", lease.name()), err)
                })?
                .then_some(())
                .ok_or_else(|| LeaseStore::<D>::lost(lease)),
        };
        self.lease.wake(&key);
        released
    }

    /// [`LockBackend::inspect`](fencelock_core::LockBackend::inspect).
    pub(crate) async fn inspect(&self, name: &LockName) -> Result<Option<LockState>> {
        let key = self.lease.key(name);
        let Some(session) = &self.session else {
            return self.lease.holder(&key, name).await;
        };
        (session.queries)
            .holder(self.lease.pool(), &key)
            .await
            .map_err(|err| (self.lease).failed(format_args!("read the holder of `{name}`"), err))
    }
}

/// Implements [`LockBackend`](fencelock_core::LockBackend) for a server backend type
/// by handing every call to the [`ServerLocks`] its `locks()` returns.
macro_rules! lock_backend_on_server_locks {
    ($backend:ty) => {
        #[fencelock_core::async_trait]
        impl fencelock_core::LockBackend for $backend {
            fn capabilities(&self) -> fencelock_core::Capabilities {
                self.locks().capabilities()
            }

            fn events(
                &self,
            ) -> Option<tokio::sync::broadcast::Receiver<fencelock_core::StoreEvent>> {
                self.locks().events()
            }

            async fn acquire(
                &self,
                req: fencelock_core::AcquireRequest,
            ) -> fencelock_core::Result<fencelock_core::Lease> {
                self.locks().acquire(req).await
            }

            async fn renew(
                &self,
                lease: &fencelock_core::Lease,
                ttl: std::time::Duration,
            ) -> fencelock_core::Result<fencelock_core::Lease> {
                self.locks().renew(lease, ttl).await
            }

            async fn renew_all(
                &self,
                leases: &[(fencelock_core::Lease, std::time::Duration)],
            ) -> Vec<fencelock_core::Result<fencelock_core::Lease>> {
                self.locks().renew_all(leases).await
            }

            async fn release(&self, lease: &fencelock_core::Lease) -> fencelock_core::Result<()> {
                self.locks().release(lease).await
            }

            async fn inspect(
                &self,
                name: &fencelock_core::LockName,
            ) -> fencelock_core::Result<Option<fencelock_core::LockState>> {
                self.locks().inspect(name).await
            }
        }
    };
}
pub(crate) use lock_backend_on_server_locks;
