//! [`LockBackend`] on Postgres: one lease row per lock name, waiters woken by
//! `LISTEN/NOTIFY`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

#[cfg(doc)]
use fencelock_core::LockBackend;
use fencelock_core::wake::Wakers;
use fencelock_core::{Error, OwnerId, Result, WaitKind};
use sqlx::Row;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool, Postgres};
use tokio::time::Instant;

use super::notify::Listener;
use super::queries::LeaseQueries;
use super::session::{SessionQueries, behind_transaction_pooling};
use super::{STORE, create_table, db_error, is_temporary, open_pool};
use crate::lease::{Dialect, Freed, Granted, HolderRow, LeaseStore, Renewal, Renewed, Settings};
use crate::server_config::LockMode;
use crate::server_locks::ServerLocks;
use crate::{PostgresConfig, PostgresFenceGate};

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
/// counter, bumped by the statement that takes the lock (one statement: the lock in a
/// materialized CTE, then the counter upsert that reads from it). The lock ends
/// when its connection does (the server frees the locks of a session that ends: a
/// crashed client, `pg_terminate_backend`), and the backend also closes the
/// connection itself when the TTL passes without a renewal, so the TTL contract holds
/// for a client that is alive but stopped renewing. Renewal probes the connection and
/// checks that it still talks to the same server session. A client behind a pooler in
/// transaction mode (such as PgBouncer with `pool_mode = transaction`, whose
/// statements run in varying server sessions) is refused with [`Error::Unsupported`]:
/// at [`connect`](Self::connect), which compares `pg_backend_pid()` of two
/// connections (one inside a transaction) and of one connection twice, and again at
/// each acquire, whose lock statement must report the connection's known session.
/// Waiters queue on the server: the waiting connection blocks in `pg_advisory_lock`
/// with the wait's deadline as its `lock_timeout`. A waiter that is dropped has its
/// connection closed and its server session terminated with
/// `pg_terminate_backend(pid, 5000)` (Postgres 14 or later), waited for before the
/// drop returns on a multi-threaded tokio runtime, so it never takes the lock for
/// nobody.
/// Releasing a lease held by another client ends that client's session. Do not share
/// one table between lease-mode and session-mode clients.
///
/// ## What a session lock can promise
/// The server frees a session lock the moment its session ends, and tells nobody:
/// `pg_terminate_backend`, `idle_session_timeout`, a server restart, or a connection
/// reset by a firewall or load balancer in between. The next holder may be granted at
/// once, while this client still believes it holds the lock, so:
/// - an acquire whose TTL has a probe period (ttl/3, the watchdog's renewal period)
///   not shorter than the session's `idle_session_timeout` (Postgres 14 or later; 0,
///   the default, is none) fails with [`Error::Config`] before anything is taken,
///   naming the setting, the longest TTL that fits and how to raise the setting.
///   `idle_in_transaction_session_timeout` does not apply (a held lock's connection
///   is not in a transaction), nor do `tcp_keepalives_*` and `tcp_user_timeout`
///   (they end only sessions whose client is unreachable);
/// - a lease's validity is at most `idle_session_timeout` from when its grant or last
///   probe was sent, even where the TTL is longer;
/// - once a second, while locks are held, one statement on a pool connection asks
///   `pg_stat_activity` which of the sessions holding them (held for a second or
///   more) still exist, by pid and `backend_start`; the locks of any that ended are
///   reported lost at once through [`LockBackend::events`], so a guard's `lost()`
///   resolves within about 1–2 s of the session's end (or of the server's return
///   after a restart) instead of at the next probe.
///
/// What remains: between the session's end and that report, this client may believe
/// it holds a lock that another client already holds. Only the fencing token
/// protects writes in that window. A setting changed by a reload after a lock was
/// taken is not seen until its connection is opened again, and the check and the
/// reports pause while the server cannot be reached (the lease's validity still
/// bounds the belief).
#[derive(Clone)]
pub struct PostgresBackend {
    inner: Arc<Inner>,
}

struct Inner {
    locks: ServerLocks<LeaseQueries, SessionQueries>,
    config: PostgresConfig,
    /// Lease mode only: session-mode waiters queue in the server, and session
    /// releases notify nobody.
    _listener: Option<Listener>,
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
    /// exist yet and, in lease mode, starts listening for releases.
    ///
    /// Safe when many processes start at once on an empty database.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad configuration; a temporary [`Error::Backend`]
    /// naming the server when it cannot be reached; [`Error::Unsupported`] in session
    /// mode behind a transaction pooling proxy, naming the cause and the fix.
    pub async fn connect(config: PostgresConfig) -> Result<Self> {
        // In lease mode, one more connection than configured: the listener keeps one
        // for itself.
        let lease_mode = config.mode == LockMode::Lease;
        let pool = open_pool(&config, u32::from(lease_mode)).await?;
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
        let listener = if lease_mode {
            let listener = Listener::start(&pool, &config.table, Arc::clone(&wakers))
                .await
                .map_err(|err| db_error(context(&config, "listen for releases"), err))?;
            Some(listener)
        } else {
            None
        };
        let session =
            (config.mode == LockMode::Session).then(|| SessionQueries::new(&config.table));
        let settings = Settings {
            prefix: config.prefix.clone(),
            poll: (config.poll_min, config.poll_max),
            place: context(&config, ""),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                locks: ServerLocks::new(
                    LeaseStore::new(pool, queries, wakers, settings),
                    session,
                    pooling_proxy(&config),
                ),
                config,
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
        let lease = self.locks().lease();
        create_table(lease.pool(), &lease.dialect().create_table)
            .await
            .map_err(|err| lease.failed("create the lease table", err))
    }

    /// Checks that a lock with `ttl` can be kept, before any is taken: for the
    /// default TTL a service will use, right after [`connect`](Self::connect). In
    /// session mode the server's idle timeout for a new session (`idle_session_timeout`) must be
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
    /// keyed by [`PostgresConfig::prefix`] + the name.
    pub fn pool(&self) -> &PgPool {
        self.locks().lease().pool()
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
        PostgresFenceGate::with_pool(self.pool().clone(), &self.inner.config.fence_table).await
    }

    /// The locks, in lease or session mode.
    fn locks(&self) -> &ServerLocks<LeaseQueries, SessionQueries> {
        &self.inner.locks
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

crate::server_locks::lock_backend_on_server_locks!(PostgresBackend);

/// Postgres's lease SQL: the token comes back through `RETURNING`, a release reports
/// whether the row was still live, and renewals of a whole tick go in one
/// `UPDATE .. FROM unnest(..)`.
impl Dialect for LeaseQueries {
    type Db = Postgres;
    const STORE: &'static str = STORE;
    const WAIT: WaitKind = WaitKind::Notify;
    const RENEW_BATCH: usize = usize::MAX;

    fn is_temporary(err: &sqlx::Error) -> bool {
        is_temporary(err)
    }

    async fn acquire(
        &self,
        conn: &mut PgConnection,
        key: &str,
        owner: &OwnerId,
        ttl: Duration,
    ) -> Result<Option<Granted>, sqlx::Error> {
        let row = sqlx::query(&self.acquire)
            .bind(key)
            .bind(owner.as_str())
            .bind(micros_ceil(ttl))
            .fetch_optional(conn)
            .await?;
        Ok(row.map(|row| Granted::Stored(row.try_get(0))))
    }

    async fn holder(&self, pool: &PgPool, key: &str) -> Result<Option<HolderRow>, sqlx::Error> {
        let row = sqlx::query(&self.holder)
            .bind(key)
            .fetch_optional(pool)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let owner: String = row.try_get(0)?;
        let remaining_us: i64 = row.try_get(2)?;
        Ok(Some(HolderRow {
            owner,
            token: row.try_get(1),
            remaining: Duration::from_micros(u64::try_from(remaining_us).unwrap_or(0)),
        }))
    }

    async fn renew(
        &self,
        conn: &mut PgConnection,
        key: &str,
        owner: &str,
        token: i64,
        ttl: Duration,
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(&self.renew)
            .bind(key)
            .bind(owner)
            .bind(token)
            .bind(micros_ceil(ttl))
            .execute(conn)
            .await?;
        Ok(done.rows_affected())
    }

    async fn renew_many(
        &self,
        pool: &PgPool,
        leases: &[Renewal<'_>],
    ) -> Result<(Instant, Renewed), sqlx::Error> {
        let names: Vec<&str> = leases.iter().map(|(key, ..)| key.as_str()).collect();
        let owners: Vec<&str> = leases.iter().map(|(_, owner, ..)| *owner).collect();
        let tokens: Vec<i64> = leases.iter().map(|(_, _, token, _)| *token).collect();
        let ttls: Vec<i64> = leases.iter().map(|(.., ttl)| micros_ceil(*ttl)).collect();
        let mut conn = pool.acquire().await?;
        let sent = Instant::now();
        let rows = sqlx::query(&self.renew_many)
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

    async fn release(
        &self,
        pool: &PgPool,
        key: &str,
        owner: &str,
        token: i64,
    ) -> Result<Freed, sqlx::Error> {
        let row = sqlx::query(&self.release)
            .bind(key)
            .bind(owner)
            .bind(token)
            .fetch_optional(pool)
            .await?;
        Ok(row.map_or(Freed::NotOurs, |row| Freed::Ours(row.try_get(0))))
    }

    async fn free_by_owner(
        &self,
        conn: &mut PoolConnection<Postgres>,
        key: &str,
        owner: &OwnerId,
    ) -> Result<bool, sqlx::Error> {
        let freed = sqlx::query(&self.free_by_owner)
            .bind(key)
            .bind(owner.as_str())
            .fetch_optional(&mut **conn)
            .await?;
        Ok(freed.is_some())
    }
}

/// A TTL in whole microseconds, rounded up so the store never grants less than asked.
fn micros_ceil(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_nanos().div_ceil(1000)).unwrap_or(i64::MAX)
}
