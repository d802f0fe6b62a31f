//! [`LockBackend`] on Postgres: one lease row per lock name, waiters woken by
//! `LISTEN/NOTIFY`.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use fencelock_core::{
    AcquireRequest, Capabilities, Error, FencingToken, Lease, LeaseKind, LockBackend, LockName,
    LockState, LossReason, OwnerId, Result, WaitDeadline, WaitKind, async_trait, valid_until,
};
use sqlx::Row;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgPool, PgRow, Postgres};
use tokio::time::Instant;

use super::notify::Listener;
use super::queries::LeaseQueries;
use super::session::{SessionError, SessionLocks, SessionQueries, behind_transaction_pooling};
use super::{STORE, create_table, db_error, is_temporary, open_pool};
use crate::server_config::LockMode;
use crate::{PostgresConfig, PostgresFenceGate, backoff};
use fencelock_core::wake::Wakers;

use crate::in_flight::{InFlight, UndoAcquire};

/// Locks in a Postgres table, shared by every client of the database.
///
/// # How it works
/// One row per lock name (the configured prefix + the name) in the table
/// [`PostgresConfig::table`]: `name TEXT PRIMARY KEY, owner TEXT, token BIGINT,
/// expires_at BIGINT`. A row is held iff `owner IS NOT NULL AND expires_at > now`,
/// where `now` and `expires_at` are the **database's** `clock_timestamp()` in
/// microseconds; no statement uses the client's clock, so clients whose clocks
/// disagree still agree on who holds a lock.
///
/// - **acquire** is one `INSERT .. ON CONFLICT DO UPDATE .. WHERE free or expired
///   RETURNING token`.
/// - **renew** is one `UPDATE` checked by owner and token on an unexpired row;
///   [`renew_all`](LockBackend::renew_all) renews a whole watchdog tick in one
///   statement (`UPDATE .. FROM unnest(..)`).
/// - **release** is one statement that frees the row if it is still ours, reports
///   whether it was still live and `NOTIFY`s the waiters.
///
/// # Fencing tokens
/// The `token` column is the name's counter: each grant adds one in the same
/// statement, and rows are kept after release. A row created anew (first use of a
/// name, after an operator deleted it, or after the database was lost) starts from the
/// database clock in microseconds, so tokens keep rising across such losses as long as
/// the server's clock does not go back and a name is granted fewer than a million
/// times a second.
///
/// # Waiting
/// [`WaitKind::Notify`]: each backend keeps one connection `LISTEN`ing on the table's
/// channel; a release anywhere wakes the waiters on that name. A waiter also checks
/// again when the holder's lease ends by the database's clock, and at the latest
/// every [`poll_max`](PostgresConfig::poll_max), in case a notification was lost with
/// a connection. Not FIFO.
///
/// # Session mode (`mode=session`)
/// Each held lock is a session-level advisory lock,
/// `pg_advisory_lock(hashtextextended(key, 0))`, on a connection taken out of the
/// pool for as long as the lock is held; the fencing token is the same table's
/// counter, bumped on that connection right after the lock is taken. The lock ends
/// when its connection does (the server frees the locks of a session that ends: a
/// crashed client, `pg_terminate_backend`), and the backend also closes the
/// connection itself when the TTL passes without a renewal, so the TTL contract holds
/// for a client that is alive but stopped renewing. Renewal probes the connection and
/// checks that it still talks to the same server session. A client behind a pooler in
/// transaction mode (such as PgBouncer with `pool_mode = transaction`, whose
/// statements run in varying server sessions) is refused with [`Error::Unsupported`]:
/// at [`connect`](Self::connect), which compares `pg_backend_pid()` of two
/// connections (one inside a transaction) and of one connection twice, and again at
/// each acquire, whose lock and counter statements must report the same session.
/// Waiters queue on the server: the waiting connection blocks in `pg_advisory_lock`
/// with the wait's deadline as its `lock_timeout`. A waiter that is dropped has its
/// connection closed and its server session terminated with
/// `pg_terminate_backend(pid, 5000)` (Postgres 14 or later), waited for before the
/// drop returns on a multi-threaded tokio runtime, so it never takes the lock for
/// nobody.
/// Releasing a lease held by another client ends that client's session. Do not share
/// one table between lease-mode and session-mode clients.
#[derive(Clone)]
pub struct PostgresBackend {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    config: PostgresConfig,
    queries: LeaseQueries,
    wakers: Arc<Wakers>,
    /// Set in [`LockMode::Session`].
    session: Option<Session>,
    _listener: Listener,
}

struct Session {
    locks: Arc<SessionLocks>,
    queries: SessionQueries,
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.inner.config;
        f.debug_struct("PostgresBackend")
            .field("server", &config.server)
            .field("table", &config.table)
            .field("prefix", &config.prefix)
            .finish_non_exhaustive()
    }
}

impl PostgresBackend {
    /// Connects to the server of `config`, creates the lease table if it does not
    /// exist yet and starts listening for releases.
    ///
    /// Safe when many processes start at once on an empty database.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad configuration; a temporary [`Error::Backend`]
    /// naming the server when it cannot be reached; [`Error::Unsupported`] in session
    /// mode behind a transaction pooling proxy, naming the cause and the fix.
    pub async fn connect(config: PostgresConfig) -> Result<Self> {
        // One more connection than configured: the listener keeps one for itself.
        let pool = open_pool(&config, 1).await?;
        if config.mode == LockMode::Session {
            // First, before any prepared statement could be mixed up by such a proxy.
            let pooled = behind_transaction_pooling(&pool).await.map_err(|err| {
                db_error(
                    context(&config, "check for a transaction pooling proxy"),
                    err,
                )
            })?;
            if pooled {
                return Err(Error::Unsupported {
                    store: STORE,
                    what: pooling_proxy(&config),
                });
            }
        }
        let queries = LeaseQueries::new(&config.table);
        create_table(&pool, &queries.create_table)
            .await
            .map_err(|err| db_error(context(&config, "create the lease table"), err))?;
        let wakers = Arc::new(Wakers::default());
        let listener = Listener::start(&pool, &config.table, Arc::clone(&wakers))
            .await
            .map_err(|err| db_error(context(&config, "listen for releases"), err))?;
        let session = (config.mode == LockMode::Session).then(|| Session {
            locks: Arc::new(SessionLocks::new(STORE)),
            queries: SessionQueries::new(&config.table),
        });
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                config,
                queries,
                wakers,
                session,
                _listener: listener,
            }),
        })
    }

    /// [`connect`](Self::connect) to a `postgres://` URL.
    ///
    /// # Errors
    /// As [`PostgresConfig::from_url`] and [`connect`](Self::connect).
    pub async fn open(url: &str) -> Result<Self> {
        Self::connect(PostgresConfig::from_url(url)?).await
    }

    /// Creates the lease table if it does not exist. Idempotent and safe to run from
    /// many processes at once; [`connect`](Self::connect) runs it.
    ///
    /// # Errors
    /// [`Error::Backend`] naming the server and table.
    pub async fn migrate(&self) -> Result<()> {
        create_table(&self.inner.pool, &self.inner.queries.create_table)
            .await
            .map_err(|err| self.failed("create the lease table", err))
    }

    /// The connection pool, for operator statements in tests and tools. Rows are
    /// keyed by [`PostgresConfig::prefix`] + the name.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The name of the lease table.
    pub fn table(&self) -> &str {
        &self.inner.config.table
    }

    /// A [`PostgresFenceGate`] on this database's
    /// [`fence_table`](PostgresConfig::fence_table), sharing this backend's pool.
    /// Creates the table if missing.
    ///
    /// # Errors
    /// [`Error::Backend`] if the table cannot be created.
    pub async fn fence_gate(&self) -> Result<PostgresFenceGate> {
        PostgresFenceGate::with_pool(self.inner.pool.clone(), &self.inner.config.fence_table).await
    }

    fn key(&self, name: &LockName) -> String {
        format!("{}{}", self.inner.config.prefix, name)
    }

    fn failed(&self, what: impl fmt::Display, err: sqlx::Error) -> Error {
        db_error(context(&self.inner.config, what), err)
    }

    fn lost(lease: &Lease) -> Error {
        Error::Lost {
            name: lease.name().clone(),
            store: STORE,
            token: lease.token(),
            reason: LossReason::NotOurs,
        }
    }

    async fn connection(&self, what: String) -> Result<PoolConnection<Postgres>> {
        self.inner
            .pool
            .acquire()
            .await
            .map_err(|err| self.failed(what, err))
    }

    fn token_at(&self, row: &PgRow, column: usize, name: &LockName) -> Result<FencingToken> {
        let what = || format!("read the token of `{name}`");
        let value: i64 = row
            .try_get(column)
            .map_err(|err| self.failed(what(), err))?;
        u64::try_from(value).map(FencingToken).map_err(|_| {
            Error::backend(
                STORE,
                context(&self.inner.config, what()),
                false,
                format!("the stored token {value} is negative; fix or delete the row"),
            )
        })
    }

    /// Takes the lock in session mode, waiting in the server's queue as `deadline`
    /// allows: `Some` lease if granted, `None` if still held when waiting ends.
    async fn session_grant(
        &self,
        session: &Session,
        req: &AcquireRequest,
        key: &str,
        deadline: &WaitDeadline,
    ) -> Result<Option<Lease>> {
        let attempt = session
            .locks
            .acquire(&self.inner.pool, &session.queries, req, key, deadline)
            .await;
        attempt.map_err(|err| match err {
            SessionError::Sql(err) => self.failed(format_args!("acquire `{}`", req.name), err),
            SessionError::PoolingProxy => Error::Unsupported {
                store: STORE,
                what: pooling_proxy(&self.inner.config),
            },
        })
    }

    /// One attempt to take the lock in lease mode: `Some` lease if granted, `None` if
    /// held.
    async fn try_grant(&self, req: &AcquireRequest, key: &str) -> Result<Option<Lease>> {
        let conn = self.connection(format!("acquire `{}`", req.name)).await?;
        let mut in_flight = InFlight {
            backend: self,
            key,
            owner: &req.owner,
            conn: Some(conn),
        };
        let sent = Instant::now();
        let row = sqlx::query(&self.inner.queries.acquire)
            .bind(key)
            .bind(req.owner.as_str())
            .bind(micros_ceil(req.ttl))
            .fetch_optional(in_flight.connection())
            .await
            .map_err(|err| self.failed(format_args!("acquire `{}`", req.name), err))?;
        let Some(row) = row else {
            in_flight.settle();
            return Ok(None);
        };
        let token = self.token_at(&row, 0, &req.name)?;
        in_flight.settle();
        Ok(Some(Lease::new(
            req.name.clone(),
            req.owner.clone(),
            token,
            valid_until(sent, req.ttl),
        )))
    }

    async fn holder(&self, key: &str, name: &LockName) -> Result<Option<LockState>> {
        let read = |err| self.failed(format_args!("read the holder of `{name}`"), err);
        if let Some(session) = &self.inner.session {
            return SessionLocks::holder(&self.inner.pool, &session.queries, key)
                .await
                .map_err(read);
        }
        let row = sqlx::query(&self.inner.queries.holder)
            .bind(key)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(read)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let owner: String = row.try_get(0).map_err(read)?;
        let remaining_us: i64 = row.try_get(2).map_err(read)?;
        Ok(Some(LockState {
            holder: OwnerId::from_stored(owner),
            token: self.token_at(&row, 1, name)?,
            remaining: Some(Duration::from_micros(
                u64::try_from(remaining_us).unwrap_or(0),
            )),
        }))
    }

    /// The renewal statement of [`renew_all`](LockBackend::renew_all): when it was
    /// sent and the `(key, owner, token)` of every row it renewed.
    async fn renew_storable(
        &self,
        leases: &[(&Lease, Duration, i64)],
    ) -> Result<(Instant, HashSet<(String, String, i64)>), sqlx::Error> {
        let names: Vec<String> = leases.iter().map(|(l, ..)| self.key(l.name())).collect();
        let owners: Vec<&str> = leases.iter().map(|(l, ..)| l.owner().as_str()).collect();
        let tokens: Vec<i64> = leases.iter().map(|(.., token)| *token).collect();
        let ttls: Vec<i64> = leases.iter().map(|(_, ttl, _)| micros_ceil(*ttl)).collect();
        let mut conn = self.inner.pool.acquire().await?;
        let sent = Instant::now();
        let rows = sqlx::query(&self.inner.queries.renew_many)
            .bind(names)
            .bind(owners)
            .bind(tokens)
            .bind(ttls)
            .fetch_all(&mut *conn)
            .await?;
        let renewed = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect::<Result<_, sqlx::Error>>()?;
        Ok((sent, renewed))
    }
}

/// What [`Error::Unsupported`] says when a transaction-pooling proxy is in between.
fn pooling_proxy(config: &PostgresConfig) -> String {
    format!(
        "mode=session through {}: statements of one connection ran in different server \
         sessions (pg_backend_pid() changed), so a transaction pooling proxy (such as \
         PgBouncer with pool_mode=transaction) is in between, and a session lock would \
         belong to whichever client the proxy hands that server session to next; connect \
         to the Postgres server directly (or through session pooling), or use ?mode=lease",
        config.server.endpoint()
    )
}

fn context(config: &PostgresConfig, what: impl fmt::Display) -> String {
    format!(
        "{what} at {} (table `{}`)",
        config.server.endpoint(),
        config.table
    )
}

#[async_trait]
impl LockBackend for PostgresBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            store: STORE,
            fencing: true,
            fifo: false,
            wait: WaitKind::Notify,
            lease: if self.inner.session.is_some() {
                LeaseKind::Session
            } else {
                LeaseKind::Ttl
            },
            shared_between_processes: true,
        }
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Lease> {
        let key = self.key(&req.name);
        let deadline = WaitDeadline::start(req.wait);
        if let Some(session) = &self.inner.session {
            // The server's queue does the waiting.
            return self
                .session_grant(session, &req, &key, &deadline)
                .await?
                .ok_or_else(|| deadline.give_up(&req.name, STORE));
        }
        if !deadline.may_wait() {
            return self
                .try_grant(&req, &key)
                .await?
                .ok_or_else(|| deadline.give_up(&req.name, STORE));
        }
        let waiter = self.inner.wakers.join(&key);
        let (poll_min, poll_max) = (self.inner.config.poll_min, self.inner.config.poll_max);
        let mut backoff = poll_min;
        loop {
            // Made before the attempt, so a release between the attempt and the sleep
            // still wakes this waiter.
            let woken = waiter.notify().notified();
            if let Some(lease) = self.try_grant(&req, &key).await? {
                return Ok(lease);
            }
            if deadline.passed() {
                return Err(deadline.give_up(&req.name, STORE));
            }
            let Some(holder) = self.holder(&key, &req.name).await? else {
                continue; // Freed since the attempt: try again at once.
            };
            let held_for = holder.remaining.unwrap_or(poll_max);
            let pause = backoff::pause(backoff, held_for);
            backoff = (backoff * 2).min(poll_max);
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep_until(deadline.cap(Instant::now() + pause)) => {}
            }
        }
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        if let Some(session) = &self.inner.session {
            let key = self.key(lease.name());
            return session
                .locks
                .renew(&session.queries, lease, &key, ttl)
                .await;
        }
        let Some(token) = stored_token(lease) else {
            return Err(Self::lost(lease));
        };
        let mut conn = self.connection(format!("renew `{}`", lease.name())).await?;
        let sent = Instant::now();
        let done = sqlx::query(&self.inner.queries.renew)
            .bind(self.key(lease.name()))
            .bind(lease.owner().as_str())
            .bind(token)
            .bind(micros_ceil(ttl))
            .execute(&mut *conn)
            .await
            .map_err(|err| self.failed(format_args!("renew `{}`", lease.name()), err))?;
        if done.rows_affected() == 0 {
            return Err(Self::lost(lease));
        }
        Ok(lease.clone().renewed(valid_until(sent, ttl)))
    }

    async fn renew_all(&self, leases: &[(Lease, Duration)]) -> Vec<Result<Lease>> {
        if self.inner.session.is_some() {
            // One probe per held connection: there is nothing to batch.
            let renewals = leases.iter().map(|(lease, ttl)| self.renew(lease, *ttl));
            return futures_util::future::join_all(renewals).await;
        }
        // A token that does not fit BIGINT was never granted here: not ours.
        let storable: Vec<(&Lease, Duration, i64)> = leases
            .iter()
            .filter_map(|(lease, ttl)| Some((lease, *ttl, stored_token(lease)?)))
            .collect();
        let renewed = if storable.is_empty() {
            Ok((Instant::now(), HashSet::new()))
        } else {
            self.renew_storable(&storable).await
        };
        let renewed = renewed.map_err(Arc::new);
        leases
            .iter()
            .map(|(lease, ttl)| match &renewed {
                Ok((sent, rows)) => {
                    let row = stored_token(lease).map(|token| {
                        (
                            self.key(lease.name()),
                            lease.owner().as_str().to_owned(),
                            token,
                        )
                    });
                    if row.is_some_and(|row| rows.contains(&row)) {
                        Ok(lease.clone().renewed(valid_until(*sent, *ttl)))
                    } else {
                        Err(Self::lost(lease))
                    }
                }
                Err(err) => Err(Error::backend(
                    STORE,
                    context(&self.inner.config, format_args!("renew `{}`", lease.name())),
                    is_temporary(err),
                    Arc::clone(err),
                )),
            })
            .collect()
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let key = self.key(lease.name());
        if let Some(session) = &self.inner.session {
            let released = match session.locks.release(&session.queries, lease, &key).await {
                Some(released) => released,
                None => {
                    let queries = &session.queries;
                    SessionLocks::release_elsewhere(&self.inner.pool, queries, lease, &key)
                        .await
                        .map_err(|err| {
                            self.failed(format_args!("release `{}`", lease.name()), err)
                        })?
                        .then_some(())
                        .ok_or_else(|| Self::lost(lease))
                }
            };
            self.inner.wakers.wake(&key);
            return released;
        }
        let Some(token) = stored_token(lease) else {
            return Err(Self::lost(lease));
        };
        let failed = |err| self.failed(format_args!("release `{}`", lease.name()), err);
        let row = sqlx::query(&self.inner.queries.release)
            .bind(&key)
            .bind(lease.owner().as_str())
            .bind(token)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(failed)?;
        let Some(row) = row else {
            return Err(Self::lost(lease));
        };
        self.inner.wakers.wake(&key);
        let was_live: bool = row.try_get(0).map_err(failed)?;
        if !was_live {
            // Ours but expired: freed all the same, and reported as lost.
            return Err(Self::lost(lease));
        }
        Ok(())
    }

    async fn inspect(&self, name: &LockName) -> Result<Option<LockState>> {
        self.holder(&self.key(name), name).await
    }
}

impl UndoAcquire for PostgresBackend {
    type Db = Postgres;
    const STORE: &'static str = STORE;

    async fn free_by_owner(
        &self,
        conn: &mut PoolConnection<Postgres>,
        key: &str,
        owner: &OwnerId,
    ) -> Result<bool, sqlx::Error> {
        let freed = sqlx::query(&self.inner.queries.free_by_owner)
            .bind(key)
            .bind(owner.as_str())
            .fetch_optional(&mut **conn)
            .await?;
        Ok(freed.is_some())
    }

    fn wake(&self, key: &str) {
        self.inner.wakers.wake(key);
    }
}

/// The token as stored; `None` if it cannot have come from this store.
fn stored_token(lease: &Lease) -> Option<i64> {
    i64::try_from(lease.token().0).ok()
}

/// A TTL in whole microseconds, rounded up so the store never grants less than asked.
fn micros_ceil(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_nanos().div_ceil(1000)).unwrap_or(i64::MAX)
}
