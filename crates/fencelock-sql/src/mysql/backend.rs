//! [`LockBackend`] on MySQL and MariaDB: one lease row per lock name, polling
//! waiters.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use fencelock_core::{
    AcquireRequest, Capabilities, Error, FencingToken, Lease, LeaseKind, LockBackend, LockName,
    LockState, LossReason, OwnerId, Result, WaitDeadline, WaitKind, async_trait, valid_until,
};
use sqlx::Row;
use sqlx::mysql::{MySql, MySqlPool, MySqlRow};
use sqlx::pool::PoolConnection;
use tokio::time::Instant;

use super::queries::LeaseQueries;
use super::session::{SessionError, SessionLocks, SessionQueries, behind_transaction_pooling};
use super::{STORE, create_table, db_error, is_lock_conflict, is_temporary, open_pool};
use crate::server_config::LockMode;
use crate::{MySqlConfig, MySqlFenceGate, backoff};
use fencelock_core::wake::Wakers;

use crate::in_flight::{InFlight, UndoAcquire};

/// Leases per `renew_all` statement: 4 placeholders each, far below MySQL's 65,535.
const RENEW_BATCH: usize = 1000;

/// How many times one acquire attempt is re-run after InnoDB rolled it back to break
/// a deadlock.
const LOCK_CONFLICT_RETRIES: u32 = 5;

/// Locks in a MySQL or MariaDB (InnoDB) table, shared by every client of the
/// database.
///
/// # How it works
/// One row per lock name (the configured prefix + the name) in the table
/// [`MySqlConfig::table`]: `name VARBINARY(512) PRIMARY KEY, owner VARCHAR(64), token
/// BIGINT, expires_at BIGINT`. A row is held iff `expires_at > now`, where `now` and
/// `expires_at` are the **database's** `UTC_TIMESTAMP(6)` in microseconds (so neither
/// the client's clock nor a session's `time_zone` matters).
///
/// - **acquire** is one `INSERT .. ON DUPLICATE KEY UPDATE` that takes a free or
///   expired row and reports the new token through `LAST_INSERT_ID(expr)` (0 when
///   refused): one round trip.
/// - **renew** is one `UPDATE` checked by owner and token on an unexpired row;
///   [`renew_all`](LockBackend::renew_all) renews a whole watchdog tick in one
///   `UPDATE .. JOIN (SELECT .. UNION ALL ..)`; only when it renewed fewer rows than
///   asked does one `SELECT` follow to tell which.
/// - **release** is one `UPDATE` checked by owner and token on an unexpired row that
///   sets `owner = NULL, expires_at = 0`.
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
/// [`WaitKind::Poll`]: a waiter retries with exponential backoff and jitter
/// ([`poll_min`](MySqlConfig::poll_min) 5 ms growing to
/// [`poll_max`](MySqlConfig::poll_max) 250 ms by default), never sleeping past the
/// holder's remaining time (read from the database) or its own deadline. A release in
/// this process wakes this process's waiters on the name at once; waiters elsewhere
/// notice at their next poll. Not FIFO.
///
/// # Session mode (`mode=session`)
/// Each held lock is a named server lock, `GET_LOCK(name, seconds)` (the name is
/// `fencelock:` + a SHA-256 prefix of database, table and key), on a connection taken
/// out of the pool for as long as the lock is held; the fencing token is the same
/// table's counter, bumped on that connection right after the lock is taken. The lock
/// ends when its connection does (a crashed client, `KILL`), and the backend also
/// closes the connection itself when the TTL passes without a renewal. Renewal probes
/// that the lock is still held by the connection's own server session
/// (`IS_USED_LOCK(..) = CONNECTION_ID()`), which also refuses a proxy that moves
/// statements between server sessions; [`connect`](Self::connect) refuses such a
/// transaction pooling proxy up front by comparing `CONNECTION_ID()` of two
/// connections (one inside a transaction) and of one connection twice.
///
/// Waiters queue on the server: `GET_LOCK` waits up to the acquire's deadline, and the
/// server grants the lock when it is released (so session mode reports
/// [`WaitKind::Notify`]). A waiter that is dropped has its connection closed and its
/// server session killed (`KILL`, then waited for until it is gone, before the drop
/// returns on a multi-threaded tokio runtime), so it never takes the lock for nobody.
/// Releasing a lease held by another client kills that client's session. Do not share
/// one table between lease-mode and session-mode clients.
#[derive(Clone)]
pub struct MySqlBackend {
    inner: Arc<Inner>,
}

struct Inner {
    pool: MySqlPool,
    config: MySqlConfig,
    queries: LeaseQueries,
    wakers: Wakers,
    /// Set in [`LockMode::Session`].
    session: Option<Session>,
}

struct Session {
    locks: Arc<SessionLocks>,
    queries: SessionQueries,
}

impl fmt::Debug for MySqlBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.inner.config;
        f.debug_struct("MySqlBackend")
            .field("server", &config.server)
            .field("table", &config.table)
            .field("prefix", &config.prefix)
            .finish_non_exhaustive()
    }
}

impl MySqlBackend {
    /// Connects to the server of `config` and creates the lease table if it does not
    /// exist yet.
    ///
    /// Safe when many processes start at once on an empty database.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad configuration; a temporary [`Error::Backend`]
    /// naming the server when it cannot be reached; [`Error::Unsupported`] in session
    /// mode behind a transaction pooling proxy, naming the cause and the fix.
    pub async fn connect(config: MySqlConfig) -> Result<Self> {
        let pool = open_pool(&config).await?;
        if config.mode == LockMode::Session {
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
        let session = (config.mode == LockMode::Session).then(|| Session {
            locks: Arc::new(SessionLocks::new(STORE)),
            queries: SessionQueries::new(&config.table),
        });
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                config,
                queries,
                wakers: Wakers::default(),
                session,
            }),
        })
    }

    /// [`connect`](Self::connect) to a `mysql://` or `mariadb://` URL.
    ///
    /// # Errors
    /// As [`MySqlConfig::from_url`] and [`connect`](Self::connect).
    pub async fn open(url: &str) -> Result<Self> {
        Self::connect(MySqlConfig::from_url(url)?).await
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
    /// keyed by [`MySqlConfig::prefix`] + the name.
    pub fn pool(&self) -> &MySqlPool {
        &self.inner.pool
    }

    /// The name of the lease table.
    pub fn table(&self) -> &str {
        &self.inner.config.table
    }

    /// A [`MySqlFenceGate`] on this database's
    /// [`fence_table`](MySqlConfig::fence_table), sharing this backend's pool.
    /// Creates the table if missing.
    ///
    /// # Errors
    /// [`Error::Backend`] if the table cannot be created.
    pub async fn fence_gate(&self) -> Result<MySqlFenceGate> {
        MySqlFenceGate::with_pool(self.inner.pool.clone(), &self.inner.config.fence_table).await
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

    async fn connection(&self, what: String) -> Result<PoolConnection<MySql>> {
        self.inner
            .pool
            .acquire()
            .await
            .map_err(|err| self.failed(what, err))
    }

    fn token_at(&self, row: &MySqlRow, column: usize, name: &LockName) -> Result<FencingToken> {
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
        let mut conflicts = 0;
        loop {
            match self.grant_once(req, key).await {
                // InnoDB may pick a new row's insert as a deadlock victim when many
                // clients create it at once; it did nothing, so try again (bounded).
                Err(err) if is_lock_conflict(&err) && conflicts < LOCK_CONFLICT_RETRIES => {
                    conflicts += 1;
                    tokio::time::sleep(backoff::jittered(Duration::from_millis(2 << conflicts)))
                        .await;
                }
                result => {
                    return result
                        .map_err(|err| self.failed(format_args!("acquire `{}`", req.name), err));
                }
            }
        }
    }

    async fn grant_once(
        &self,
        req: &AcquireRequest,
        key: &str,
    ) -> Result<Option<Lease>, sqlx::Error> {
        let conn = self.inner.pool.acquire().await?;
        let mut in_flight = InFlight {
            backend: self,
            key,
            owner: &req.owner,
            conn: Some(conn),
        };
        let sent = Instant::now();
        let done = sqlx::query(&self.inner.queries.acquire)
            .bind(key.as_bytes())
            .bind(req.owner.as_str())
            .bind(micros_ceil(req.ttl))
            .execute(in_flight.connection())
            .await?;
        in_flight.settle();
        // The statement leaves the new token in LAST_INSERT_ID, or 0 when refused.
        let token = done.last_insert_id();
        if token == 0 {
            return Ok(None);
        }
        Ok(Some(Lease::new(
            req.name.clone(),
            req.owner.clone(),
            FencingToken(token),
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
            .bind(key.as_bytes())
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(read)?;
        let Some(row) = row else {
            return Ok(None);
        };
        // Read as bytes: sqlx calls the ascii_bin column binary.
        let owner: Vec<u8> = row.try_get(0).map_err(read)?;
        let owner = String::from_utf8_lossy(&owner).into_owned();
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
    ) -> Result<(Instant, HashSet<(Vec<u8>, Vec<u8>, i64)>), sqlx::Error> {
        let keys: Vec<String> = leases.iter().map(|(l, ..)| self.key(l.name())).collect();
        let sql = self.inner.queries.renew_many(leases.len());
        let mut query = sqlx::query(&sql);
        for (key, (lease, ttl, token)) in keys.iter().zip(leases) {
            query = query
                .bind(key.as_bytes())
                .bind(lease.owner().as_str())
                .bind(*token)
                .bind(micros_ceil(*ttl));
        }
        let mut conn = self.inner.pool.acquire().await?;
        let sent = Instant::now();
        let done = query.persistent(false).execute(&mut *conn).await?;
        if done.rows_affected() == leases.len() as u64 {
            // Every lease was renewed (rows are counted when matched, changed or not).
            let all = keys
                .into_iter()
                .zip(leases)
                .map(|(key, (lease, _, token))| {
                    (
                        key.into_bytes(),
                        lease.owner().as_str().as_bytes().to_vec(),
                        *token,
                    )
                })
                .collect();
            return Ok((sent, all));
        }
        // Some were not ours any more: the live rows that are ours were renewed just
        // now; one renewed and expired since is reported lost, which is safe.
        let sql = self.inner.queries.live_among(keys.len());
        let mut query = sqlx::query(&sql);
        for key in &keys {
            query = query.bind(key.as_bytes());
        }
        let rows = query.persistent(false).fetch_all(&mut *conn).await?;
        let live = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect::<Result<_, sqlx::Error>>()?;
        Ok((sent, live))
    }
}

/// What [`Error::Unsupported`] says when a transaction pooling proxy is in between.
fn pooling_proxy(config: &MySqlConfig) -> String {
    format!(
        "mode=session through {}: statements of one connection ran in different server \
         sessions (CONNECTION_ID() changed), so a transaction pooling proxy (such as \
         ProxySQL with multiplexing) is in between, and a named lock would belong to \
         whichever client the proxy hands that server session to next; connect to the \
         MySQL server directly, or use ?mode=lease",
        config.server.endpoint()
    )
}

fn context(config: &MySqlConfig, what: impl fmt::Display) -> String {
    format!(
        "{what} at {} (table `{}`)",
        config.server.endpoint(),
        config.table
    )
}

#[async_trait]
impl LockBackend for MySqlBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            store: STORE,
            fencing: true,
            fifo: false,
            // In session mode the server's queue wakes the waiter.
            wait: if self.inner.session.is_some() {
                WaitKind::Notify
            } else {
                WaitKind::Poll
            },
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
            .bind(micros_ceil(ttl))
            .bind(self.key(lease.name()).into_bytes())
            .bind(lease.owner().as_str())
            .bind(token)
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
        let mut results = Vec::with_capacity(leases.len());
        for batch in leases.chunks(RENEW_BATCH) {
            results.extend(self.renew_batch(batch).await);
        }
        results
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
        let done = sqlx::query(&self.inner.queries.release)
            .bind(key.as_bytes())
            .bind(lease.owner().as_str())
            .bind(token)
            .execute(&self.inner.pool)
            .await
            .map_err(|err| self.failed(format_args!("release `{}`", lease.name()), err))?;
        if done.rows_affected() == 0 {
            // Not ours, or ours but expired (and so free already).
            return Err(Self::lost(lease));
        }
        self.inner.wakers.wake(&key);
        Ok(())
    }

    async fn inspect(&self, name: &LockName) -> Result<Option<LockState>> {
        self.holder(&self.key(name), name).await
    }
}

impl MySqlBackend {
    /// Renews up to [`RENEW_BATCH`] leases in one statement.
    async fn renew_batch(&self, leases: &[(Lease, Duration)]) -> Vec<Result<Lease>> {
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
                            self.key(lease.name()).into_bytes(),
                            lease.owner().as_str().as_bytes().to_vec(),
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
}

impl UndoAcquire for MySqlBackend {
    type Db = MySql;
    const STORE: &'static str = STORE;

    async fn free_by_owner(
        &self,
        conn: &mut PoolConnection<MySql>,
        key: &str,
        owner: &OwnerId,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(&self.inner.queries.free_by_owner)
            .bind(key.as_bytes())
            .bind(owner.as_str())
            .execute(&mut **conn)
            .await?;
        Ok(done.rows_affected() > 0)
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
