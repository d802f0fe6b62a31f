//! [`LockBackend`] on SQLite: one lease row per lock name.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[cfg(doc)]
use fencelock_core::Error;
use fencelock_core::wake::Wakers;
use fencelock_core::{
    AcquireRequest, Capabilities, Lease, LeaseKind, LockBackend, LockName, LockState, OwnerId,
    Result, WaitKind, async_trait,
};
use sqlx::Row;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{Sqlite, SqliteConnection, SqlitePool};
use tokio::time::Instant;

use super::queries::LeaseQueries;
use super::{STORE, is_temporary, open_pool};
use crate::lease::{Dialect, Freed, Granted, HolderRow, LeaseStore, Renewal, Renewed, Settings};
use crate::{SqliteConfig, SqliteFenceGate};

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
    lease: LeaseStore<LeaseQueries>,
    config: SqliteConfig,
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
        let settings = Settings {
            prefix: config.prefix.clone(),
            poll: (config.poll_min, config.poll_max),
            place: format!(" in `{}` (table `{}`)", config.path.display(), config.table),
        };
        let queries = LeaseQueries::new(&config.table);
        let wakers = Arc::new(Wakers::default());
        let backend = Self {
            inner: Arc::new(Inner {
                lease: LeaseStore::new(pool, queries, wakers, settings),
                config,
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
        let lease = &self.inner.lease;
        sqlx::query(&lease.dialect().create_table)
            .execute(lease.pool())
            .await
            .map_err(|err| lease.failed("create the lease table", err))?;
        Ok(())
    }

    /// The connection pool, for operator statements in tests and tools (an operator
    /// `DELETE` of a row, say). Rows are keyed by [`SqliteConfig::prefix`] + the name.
    pub fn pool(&self) -> &SqlitePool {
        self.inner.lease.pool()
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
        SqliteFenceGate::with_pool(self.pool().clone(), &self.inner.config.fence_table).await
    }
}

#[async_trait]
impl LockBackend for SqliteBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            store: STORE,
            fencing: true,
            fifo: false,
            wait: <LeaseQueries as Dialect>::WAIT,
            lease: LeaseKind::Ttl,
            shared_between_processes: true,
        }
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Lease> {
        let lease = &self.inner.lease;
        lease.acquire(&req, &lease.key(&req.name)).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        self.inner.lease.renew(lease, ttl).await
    }

    async fn renew_all(&self, leases: &[(Lease, Duration)]) -> Vec<Result<Lease>> {
        self.inner.lease.renew_all(leases).await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        self.inner.lease.release(lease).await
    }

    async fn inspect(&self, name: &LockName) -> Result<Option<LockState>> {
        let lease = &self.inner.lease;
        lease.holder(&lease.key(name), name).await
    }
}

/// SQLite's lease SQL: times in milliseconds, the token comes back through
/// `RETURNING`, a release reports whether the row was still live (as an integer).
impl Dialect for LeaseQueries {
    type Db = Sqlite;
    const STORE: &'static str = STORE;
    const WAIT: WaitKind = WaitKind::Poll;
    const RENEW_BATCH: usize = RENEW_BATCH;

    fn is_temporary(err: &sqlx::Error) -> bool {
        is_temporary(err)
    }

    async fn acquire(
        &self,
        conn: &mut SqliteConnection,
        key: &str,
        owner: &OwnerId,
        ttl: Duration,
    ) -> Result<Option<Granted>, sqlx::Error> {
        let row = sqlx::query(&self.acquire)
            .bind(key)
            .bind(owner.as_str())
            .bind(millis_ceil(ttl))
            .fetch_optional(conn)
            .await?;
        Ok(row.map(|row| Granted::Stored(row.try_get(0))))
    }

    async fn holder(&self, pool: &SqlitePool, key: &str) -> Result<Option<HolderRow>, sqlx::Error> {
        let row = sqlx::query(&self.holder)
            .bind(key)
            .fetch_optional(pool)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let owner: String = row.try_get(0)?;
        let remaining_ms: i64 = row.try_get(2)?;
        Ok(Some(HolderRow {
            owner,
            token: row.try_get(1),
            remaining: Duration::from_millis(u64::try_from(remaining_ms).unwrap_or(0)),
        }))
    }

    async fn renew(
        &self,
        conn: &mut SqliteConnection,
        key: &str,
        owner: &str,
        token: i64,
        ttl: Duration,
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(&self.renew)
            .bind(key)
            .bind(owner)
            .bind(token)
            .bind(millis_ceil(ttl))
            .execute(conn)
            .await?;
        Ok(done.rows_affected())
    }

    async fn renew_many(
        &self,
        pool: &SqlitePool,
        leases: &[Renewal<'_>],
    ) -> Result<(Instant, Renewed), sqlx::Error> {
        let sql = self.renew_many(leases.len());
        let mut query = sqlx::query(&sql);
        for (key, owner, token, ttl) in leases {
            query = query
                .bind(key.as_str())
                .bind(*owner)
                .bind(*token)
                .bind(millis_ceil(*ttl));
        }
        let mut conn = pool.acquire().await?;
        let sent = Instant::now();
        let rows = query.persistent(false).fetch_all(&mut *conn).await?;
        let renewed = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect::<Result<_, sqlx::Error>>()?;
        Ok((sent, renewed))
    }

    async fn release(
        &self,
        pool: &SqlitePool,
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
        Ok(row.map_or(Freed::NotOurs, |row| {
            Freed::Ours(row.try_get::<i64, _>(0).map(|was_live| was_live != 0))
        }))
    }

    async fn free_by_owner(
        &self,
        conn: &mut PoolConnection<Sqlite>,
        key: &str,
        owner: &OwnerId,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(&self.free_by_owner)
            .bind(key)
            .bind(owner.as_str())
            .execute(&mut **conn)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

/// A TTL in whole milliseconds, rounded up so the store never grants less than asked.
fn millis_ceil(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_micros().div_ceil(1000)).unwrap_or(i64::MAX)
}
