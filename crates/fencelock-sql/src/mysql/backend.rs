//! [`LockBackend`] on MySQL and MariaDB: one lease row per lock name, polling
//! waiters.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

#[cfg(doc)]
use fencelock_core::LockBackend;
use fencelock_core::wake::Wakers;
use fencelock_core::{Error, OwnerId, Result, WaitKind};
use sqlx::Row;
use sqlx::mysql::{MySql, MySqlConnection, MySqlPool};
use sqlx::pool::PoolConnection;
use tokio::time::Instant;

use super::queries::LeaseQueries;
use super::session::{SessionQueries, behind_transaction_pooling};
use super::{STORE, create_table, db_error, is_lock_conflict, is_temporary, open_pool};
use crate::lease::{Dialect, Freed, Granted, HolderRow, LeaseStore, Renewal, Renewed, Settings};
use crate::server_config::LockMode;
use crate::server_locks::ServerLocks;
use crate::{MySqlConfig, MySqlFenceGate};

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
/// table's counter, bumped by the statement that takes the lock (`INSERT … SELECT …
/// WHERE GET_LOCK(..) = 1 ON DUPLICATE KEY UPDATE`). The lock
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
///
/// ## What a session lock can promise
/// The server frees a named lock the moment its session ends, and tells nobody:
/// `KILL`, `wait_timeout`, a server restart, or a connection reset by a firewall or
/// load balancer in between. The next holder may be granted at once, while this
/// client still believes it holds the lock, so:
/// - an acquire whose TTL has a probe period (ttl/3, the watchdog's renewal period)
///   not shorter than the session's `wait_timeout` fails with [`Error::Config`] before
///   anything is taken, naming the setting, the longest TTL that fits and how to
///   raise the setting (sqlx connects as a non-interactive client, so
///   `interactive_timeout` does not apply; MariaDB's `idle_*transaction_timeout` do
///   not either, as a held lock's connection is not in a transaction);
/// - a lease's validity is at most `wait_timeout` from when its grant or last probe
///   was sent, even where the TTL is longer;
/// - once a second, while locks are held, one statement on a pool connection asks
///   `IS_USED_LOCK` whether the sessions holding them (held for a second or more)
///   still do; the locks of any that do not are reported lost at once through
///   [`LockBackend::events`], so a guard's `lost()` resolves within about 1–2 s of
///   the session's end (or of the server's return after a restart) instead of at the
///   next probe.
///
/// What remains: between the session's end and that report, this client may believe
/// it holds a lock that another client already holds. Only the fencing token
/// protects writes in that window. A `SET GLOBAL wait_timeout` after a lock was taken
/// is not seen until its connection is opened again, and the check and the reports
/// pause while the server cannot be reached (the lease's validity still bounds the
/// belief).
#[derive(Clone)]
pub struct MySqlBackend {
    inner: Arc<Inner>,
}

struct Inner {
    locks: ServerLocks<LeaseQueries, SessionQueries>,
    config: MySqlConfig,
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
        let session =
            (config.mode == LockMode::Session).then(|| SessionQueries::new(&config.table));
        let settings = Settings {
            prefix: config.prefix.clone(),
            poll: (config.poll_min, config.poll_max),
            place: context(&config, ""),
        };
        let wakers = Arc::new(Wakers::default());
        Ok(Self {
            inner: Arc::new(Inner {
                locks: ServerLocks::new(
                    LeaseStore::new(pool, queries, wakers, settings),
                    session,
                    pooling_proxy(&config),
                ),
                config,
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
        let lease = self.locks().lease();
        create_table(lease.pool(), &lease.dialect().create_table)
            .await
            .map_err(|err| lease.failed("create the lease table", err))
    }

    /// Checks that a lock with `ttl` can be kept, before any is taken: for the
    /// default TTL a service will use, right after [`connect`](Self::connect). In
    /// session mode the server's idle timeout for a new session (`wait_timeout`) must be
    /// longer than the watchdog's probe period, ttl/3; an acquire with a TTL that does
    /// not fit fails the same way. Always `Ok` in lease mode.
    ///
    /// # Errors
    /// [`Error::Config`] naming the setting, the longest TTL that fits and how to
    /// raise the setting; [`Error::Backend`] if the server cannot be asked.
    pub async fn check_ttl(&self, ttl: Duration) -> Result<()> {
        self.locks().check_ttl(ttl).await
    }

    /// The connection pool, for operator statements in tests and tools. Rows are
    /// keyed by [`MySqlConfig::prefix`] + the name.
    pub fn pool(&self) -> &MySqlPool {
        self.locks().lease().pool()
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
        MySqlFenceGate::with_pool(self.pool().clone(), &self.inner.config.fence_table).await
    }

    /// The locks, in lease or session mode.
    fn locks(&self) -> &ServerLocks<LeaseQueries, SessionQueries> {
        &self.inner.locks
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

crate::server_locks::lock_backend_on_server_locks!(MySqlBackend);

/// MySQL's lease SQL: keys are bound as bytes (the column is binary), the token comes
/// back through `LAST_INSERT_ID(expr)`, a release or renewal reports only how many rows
/// it matched, and InnoDB's deadlock victims are re-run.
impl Dialect for LeaseQueries {
    type Db = MySql;
    const STORE: &'static str = STORE;
    const WAIT: WaitKind = WaitKind::Poll;
    const RENEW_BATCH: usize = RENEW_BATCH;
    const LOCK_CONFLICT_RETRIES: u32 = LOCK_CONFLICT_RETRIES;

    fn is_temporary(err: &sqlx::Error) -> bool {
        is_temporary(err)
    }

    fn is_lock_conflict(err: &sqlx::Error) -> bool {
        is_lock_conflict(err)
    }

    async fn acquire(
        &self,
        conn: &mut MySqlConnection,
        key: &str,
        owner: &OwnerId,
        ttl: Duration,
    ) -> Result<Option<Granted>, sqlx::Error> {
        let done = sqlx::query(&self.acquire)
            .bind(key.as_bytes())
            .bind(owner.as_str())
            .bind(micros_ceil(ttl))
            .execute(conn)
            .await?;
        // The statement leaves the new token in LAST_INSERT_ID, or 0 when refused.
        let token = done.last_insert_id();
        Ok((token != 0).then_some(Granted::Minted(token)))
    }

    async fn holder(&self, pool: &MySqlPool, key: &str) -> Result<Option<HolderRow>, sqlx::Error> {
        let row = sqlx::query(&self.holder)
            .bind(key.as_bytes())
            .fetch_optional(pool)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        // Read as bytes: sqlx calls the ascii_bin column binary.
        let owner: Vec<u8> = row.try_get(0)?;
        let owner = String::from_utf8_lossy(&owner).into_owned();
        let remaining_us: i64 = row.try_get(2)?;
        Ok(Some(HolderRow {
            owner,
            token: row.try_get(1),
            remaining: Duration::from_micros(u64::try_from(remaining_us).unwrap_or(0)),
        }))
    }

    async fn renew(
        &self,
        conn: &mut MySqlConnection,
        key: &str,
        owner: &str,
        token: i64,
        ttl: Duration,
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(&self.renew)
            .bind(micros_ceil(ttl))
            .bind(key.as_bytes())
            .bind(owner)
            .bind(token)
            .execute(conn)
            .await?;
        Ok(done.rows_affected())
    }

    async fn renew_many(
        &self,
        pool: &MySqlPool,
        leases: &[Renewal<'_>],
    ) -> Result<(Instant, Renewed), sqlx::Error> {
        let sql = self.renew_many(leases.len());
        let mut query = sqlx::query(&sql);
        for (key, owner, token, ttl) in leases {
            query = query
                .bind(key.as_bytes())
                .bind(*owner)
                .bind(*token)
                .bind(micros_ceil(*ttl));
        }
        let mut conn = pool.acquire().await?;
        let sent = Instant::now();
        let done = query.persistent(false).execute(&mut *conn).await?;
        if done.rows_affected() == leases.len() as u64 {
            // Every lease was renewed (rows are counted when matched, changed or not).
            let all = leases
                .iter()
                .map(|(key, owner, token, _)| (key.clone(), (*owner).to_owned(), *token))
                .collect();
            return Ok((sent, all));
        }
        // Some were not ours any more: the live rows that are ours were renewed just
        // now; one renewed and expired since is reported lost, which is safe.
        let sql = self.live_among(leases.len());
        let mut query = sqlx::query(&sql);
        for (key, ..) in leases {
            query = query.bind(key.as_bytes());
        }
        let rows = query.persistent(false).fetch_all(&mut *conn).await?;
        let mut live = Renewed::new();
        for row in &rows {
            let (key, owner): (Vec<u8>, Vec<u8>) = (row.try_get(0)?, row.try_get(1)?);
            // A key or owner that is not UTF-8 is none of ours.
            if let (Ok(key), Ok(owner)) = (String::from_utf8(key), String::from_utf8(owner)) {
                live.insert((key, owner, row.try_get(2)?));
            }
        }
        Ok((sent, live))
    }

    async fn release(
        &self,
        pool: &MySqlPool,
        key: &str,
        owner: &str,
        token: i64,
    ) -> Result<Freed, sqlx::Error> {
        let done = sqlx::query(&self.release)
            .bind(key.as_bytes())
            .bind(owner)
            .bind(token)
            .execute(pool)
            .await?;
        // Not ours, or ours but expired (and so free already).
        Ok(if done.rows_affected() == 0 {
            Freed::NotOurs
        } else {
            Freed::Ours(Ok(true))
        })
    }

    async fn free_by_owner(
        &self,
        conn: &mut PoolConnection<MySql>,
        key: &str,
        owner: &OwnerId,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(&self.free_by_owner)
            .bind(key.as_bytes())
            .bind(owner.as_str())
            .execute(&mut **conn)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

/// A TTL in whole microseconds, rounded up so the store never grants less than asked.
fn micros_ceil(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_nanos().div_ceil(1000)).unwrap_or(i64::MAX)
}
