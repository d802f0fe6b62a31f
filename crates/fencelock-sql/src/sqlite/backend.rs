//! [`LockBackend`] on SQLite: one lease row per lock name.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fencelock_core::{
    AcquireRequest, Capabilities, Error, FencingToken, Lease, LeaseKind, LockBackend, LockName,
    LockState, LossReason, OwnerId, Result, WaitDeadline, WaitKind, async_trait, valid_until,
};
use sqlx::Row;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{Sqlite, SqlitePool, SqliteRow};
use tokio::time::Instant;

use super::queries::LeaseQueries;
use super::{STORE, db_error, is_temporary, open_pool};
use crate::{SqliteConfig, SqliteFenceGate};
use fencelock_core::wake::Wakers;

use crate::in_flight::{InFlight, UndoAcquire};

/// Leases per `renew_all` statement: 4 bound values each, far below SQLite's limit.
const RENEW_BATCH: usize = 500;

/// Locks in a SQLite file, shared by every process on the host that opens it.
///
/// # How it works
/// One row per lock name (the configured prefix + the name) in the table
/// [`SqliteConfig::table`]: `name TEXT PRIMARY KEY, owner TEXT, token INTEGER,
/// expires_at INTEGER`. A row is held iff `owner IS NOT NULL AND expires_at > now`,
/// where `now` and `expires_at` are the **database's** clock in milliseconds; no
/// statement uses the client's clock, so clients whose clocks disagree still agree on
/// who holds a lock.
///
/// - **acquire** is one upsert that takes the row when it is free or expired and
///   returns the new token.
/// - **renew** is one `UPDATE` checked by owner and token on an unexpired row;
///   [`renew_all`](LockBackend::renew_all) renews a whole watchdog tick in one
///   statement.
/// - **release** is one `UPDATE` checked by owner and token that frees the row and
///   reports whether it was still live.
///
/// # Fencing tokens
/// The `token` column is the name's counter: each grant adds one in the same
/// statement, and rows are kept after release so the counter lives on. A row created
/// anew (first use of a name, or after an operator deleted it or the whole file was
/// lost) starts from the database clock in microseconds, so tokens keep rising across
/// such losses **as long as the host's clock does not go back**. SQLite reads the clock
/// in milliseconds, so the guarantee also needs fewer than about a thousand grants of
/// one name per millisecond, and a row not re-created within the millisecond it was
/// created in.
///
/// # Waiting
/// [`WaitKind::Poll`]: a waiter retries with exponential backoff and jitter
/// ([`poll_min`](SqliteConfig::poll_min) 5 ms growing to
/// [`poll_max`](SqliteConfig::poll_max) 250 ms by default), never sleeping past the holder's remaining time (read from the
/// database) or its own deadline. A release in this process wakes this process's
/// waiters on the name at once (clones share one `SqliteBackend`); waiters in other
/// processes notice at their next poll. Not FIFO.
///
/// # Limits
/// SQLite's locking needs one host with a local filesystem: do not put the file on
/// NFS or SMB. A statement that waits longer than
/// [`busy_timeout`](SqliteConfig::busy_timeout) for another connection's write
/// fails with a temporary error.
#[derive(Clone)]
pub struct SqliteBackend {
    inner: Arc<Inner>,
}

struct Inner {
    pool: SqlitePool,
    config: SqliteConfig,
    queries: LeaseQueries,
    wakers: Wakers,
}

impl fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.inner.config;
        f.debug_struct("SqliteBackend")
            .field("path", &config.path)
            .field("table", &config.table)
            .field("prefix", &config.prefix)
            .finish_non_exhaustive()
    }
}

impl SqliteBackend {
    /// Opens (creating if missing) the database file of `config` and creates the lease
    /// table if it does not exist yet.
    ///
    /// Safe when many processes start at once on the same new file.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad configuration or a directory that does not exist;
    /// [`Error::Backend`] naming the file if it cannot be opened or migrated.
    pub async fn connect(config: SqliteConfig) -> Result<Self> {
        let pool = open_pool(&config).await?;
        let backend = Self {
            inner: Arc::new(Inner {
                queries: LeaseQueries::new(&config.table),
                pool,
                config,
                wakers: Wakers::default(),
            }),
        };
        backend.migrate().await?;
        Ok(backend)
    }

    /// [`connect`](Self::connect) with [`SqliteConfig::new(path)`](SqliteConfig::new):
    /// every option at its default.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn open(path: impl Into<PathBuf>) -> Result<Self> {
        Self::connect(SqliteConfig::new(path)).await
    }

    /// Creates the lease table if it does not exist. Idempotent; [`connect`](Self::connect)
    /// runs it.
    ///
    /// # Errors
    /// [`Error::Backend`] naming the file and table.
    pub async fn migrate(&self) -> Result<()> {
        sqlx::query(&self.inner.queries.create_table)
            .execute(&self.inner.pool)
            .await
            .map_err(|err| self.failed("create the lease table", err))?;
        Ok(())
    }

    /// The connection pool, for operator statements in tests and tools (an operator
    /// `DELETE` of a row, say). Rows are keyed by [`SqliteConfig::prefix`] + the name.
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }

    /// The name of the lease table.
    pub fn table(&self) -> &str {
        &self.inner.config.table
    }

    /// A [`SqliteFenceGate`] on this file's [`fence_table`](SqliteConfig::fence_table),
    /// sharing this backend's pool. Creates the table if missing.
    ///
    /// # Errors
    /// [`Error::Backend`] if the table cannot be created.
    pub async fn fence_gate(&self) -> Result<SqliteFenceGate> {
        SqliteFenceGate::with_pool(self.inner.pool.clone(), &self.inner.config.fence_table).await
    }

    /// The row key of `name`.
    fn key(&self, name: &LockName) -> String {
        format!("{}{}", self.inner.config.prefix, name)
    }

    /// A backend error for `what`, naming the file and the table.
    fn failed(&self, what: impl fmt::Display, err: sqlx::Error) -> Error {
        db_error(self.context(what), err)
    }

    fn context(&self, what: impl fmt::Display) -> String {
        let config = &self.inner.config;
        format!(
            "{what} in `{}` (table `{}`)",
            config.path.display(),
            config.table
        )
    }

    fn lost(lease: &Lease) -> Error {
        Error::Lost {
            name: lease.name().clone(),
            store: STORE,
            token: lease.token(),
            reason: LossReason::NotOurs,
        }
    }

    async fn connection(&self, what: String) -> Result<PoolConnection<Sqlite>> {
        self.inner
            .pool
            .acquire()
            .await
            .map_err(|err| self.failed(what, err))
    }

    /// Reads a stored token; a negative one was written by hand and is refused.
    fn token_at(&self, row: &SqliteRow, column: usize, name: &LockName) -> Result<FencingToken> {
        let value: i64 = row
            .try_get(column)
            .map_err(|err| self.failed(format_args!("read the token of `{name}`"), err))?;
        u64::try_from(value).map(FencingToken).map_err(|_| {
            Error::backend(
                STORE,
                self.context(format_args!("read the token of `{name}`")),
                false,
                format!("the stored token {value} is negative; fix or delete the row"),
            )
        })
    }

    /// One attempt to take the lock: `Some` lease if granted, `None` if held.
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
            .bind(millis_ceil(req.ttl))
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

    /// The live holder of `key` and its remaining time by the database's clock.
    async fn holder(&self, key: &str, name: &LockName) -> Result<Option<LockState>> {
        let row = sqlx::query(&self.inner.queries.holder)
            .bind(key)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(|err| self.failed(format_args!("read the holder of `{name}`"), err))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let read = |err| self.failed(format_args!("read the holder of `{name}`"), err);
        let owner: String = row.try_get(0).map_err(read)?;
        let remaining_ms: i64 = row.try_get(2).map_err(read)?;
        Ok(Some(LockState {
            holder: OwnerId::from_stored(owner),
            token: self.token_at(&row, 1, name)?,
            remaining: Some(Duration::from_millis(
                u64::try_from(remaining_ms).unwrap_or(0),
            )),
        }))
    }

    /// Renews up to [`RENEW_BATCH`] leases in one statement.
    async fn renew_batch(&self, batch: &[(Lease, Duration)]) -> Vec<Result<Lease>> {
        // A token that does not fit SQLite's INTEGER was never granted here: not ours.
        let storable: Vec<(&Lease, Duration, i64)> = batch
            .iter()
            .filter_map(|(lease, ttl)| Some((lease, *ttl, stored_token(lease)?)))
            .collect();
        let renewed = if storable.is_empty() {
            Ok((Instant::now(), HashSet::new()))
        } else {
            self.renew_storable(&storable).await
        };
        let renewed = renewed.map_err(Arc::new);
        batch
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
                    self.context(format_args!("renew `{}`", lease.name())),
                    is_temporary(err),
                    Arc::clone(err),
                )),
            })
            .collect()
    }

    /// The renewal statement of [`renew_batch`](Self::renew_batch): when it was sent
    /// and the `(key, owner, token)` of every row it renewed.
    async fn renew_storable(
        &self,
        leases: &[(&Lease, Duration, i64)],
    ) -> Result<(Instant, HashSet<(String, String, i64)>), sqlx::Error> {
        let sql = self.inner.queries.renew_many(leases.len());
        let mut query = sqlx::query(&sql);
        for (lease, ttl, token) in leases {
            query = query
                .bind(self.key(lease.name()))
                .bind(lease.owner().as_str())
                .bind(*token)
                .bind(millis_ceil(*ttl));
        }
        let mut conn = self.inner.pool.acquire().await?;
        let sent = Instant::now();
        let rows = query.persistent(false).fetch_all(&mut *conn).await?;
        let renewed = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect::<Result<_, sqlx::Error>>()?;
        Ok((sent, renewed))
    }
}

#[async_trait]
impl LockBackend for SqliteBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            store: STORE,
            fencing: true,
            fifo: false,
            wait: WaitKind::Poll,
            lease: LeaseKind::Ttl,
            shared_between_processes: true,
        }
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Lease> {
        let key = self.key(&req.name);
        let deadline = WaitDeadline::start(req.wait);
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
            // Wake just after the holder's lease ends, if that comes first.
            let pause = crate::backoff::pause(backoff, held_for);
            backoff = (backoff * 2).min(poll_max);
            tracing::debug!(
                lock = %req.name,
                store = STORE,
                pause_ms = pause.as_millis() as u64,
                held_for_ms = held_for.as_millis() as u64,
                "lock is held; polling again"
            );
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep_until(deadline.cap(Instant::now() + pause)) => {}
            }
        }
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let Some(token) = stored_token(lease) else {
            return Err(Self::lost(lease));
        };
        let mut conn = self.connection(format!("renew `{}`", lease.name())).await?;
        let sent = Instant::now();
        let done = sqlx::query(&self.inner.queries.renew)
            .bind(self.key(lease.name()))
            .bind(lease.owner().as_str())
            .bind(token)
            .bind(millis_ceil(ttl))
            .execute(&mut *conn)
            .await
            .map_err(|err| self.failed(format_args!("renew `{}`", lease.name()), err))?;
        if done.rows_affected() == 0 {
            return Err(Self::lost(lease));
        }
        Ok(lease.clone().renewed(valid_until(sent, ttl)))
    }

    async fn renew_all(&self, leases: &[(Lease, Duration)]) -> Vec<Result<Lease>> {
        let mut results = Vec::with_capacity(leases.len());
        for batch in leases.chunks(RENEW_BATCH) {
            results.extend(self.renew_batch(batch).await);
        }
        results
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let Some(token) = stored_token(lease) else {
            return Err(Self::lost(lease));
        };
        let key = self.key(lease.name());
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
        let was_live: i64 = row.try_get(0).map_err(failed)?;
        if was_live == 0 {
            // Ours but expired: freed all the same, and reported as lost.
            return Err(Self::lost(lease));
        }
        Ok(())
    }

    async fn inspect(&self, name: &LockName) -> Result<Option<LockState>> {
        self.holder(&self.key(name), name).await
    }
}

impl UndoAcquire for SqliteBackend {
    type Db = Sqlite;
    const STORE: &'static str = STORE;

    async fn free_by_owner(
        &self,
        conn: &mut PoolConnection<Sqlite>,
        key: &str,
        owner: &OwnerId,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(&self.inner.queries.free_by_owner)
            .bind(key)
            .bind(owner.as_str())
            .execute(&mut **conn)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    fn wake(&self, key: &str) {
        self.inner.wakers.wake(key);
    }
}

/// The token as SQLite stores it; `None` if it cannot have come from this store.
fn stored_token(lease: &Lease) -> Option<i64> {
    i64::try_from(lease.token().0).ok()
}

/// A TTL in whole milliseconds, rounded up so the store never grants less than asked.
fn millis_ceil(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_micros().div_ceil(1000)).unwrap_or(i64::MAX)
}
