//! Session mode on MySQL/MariaDB: a lock is a named server lock (`GET_LOCK`) on a
//! connection taken out of the pool for as long as it is held.
//!
//! `GET_LOCK` names are server-wide and at most 64 characters, so each is
//! `fencelock:` + 54 hex digits of the SHA-256 of database, table and key. The
//! fencing counter is the lease table's row for the name, bumped while holding.
//! Waiters queue on the server: `GET_LOCK(name, seconds)` with the wait's deadline as
//! its timeout. A waiter dropped while its statement runs must not leave its server
//! session in the queue (it would take the lock after the next release with nobody to
//! use it): its connection is closed and its server session killed by
//! `CONNECTION_ID()` (never reused by the server), which frees whatever it took.
//!
//! A lock released cleanly leaves its connection on the backend's idle list for the
//! next session acquire (see [`crate::session_table`]); a reused connection that has
//! died meanwhile is closed and the attempt starts over on a fresh pool connection.
//!
//! A held lock ends when its connection does (the server frees the named locks of a
//! session that ends), and also when its TTL passes without a renewal: the backend
//! then closes the connection itself, so the TTL contract holds for clients that are
//! alive but stopped renewing.

use std::sync::Arc;
use std::time::Duration;

use fencelock_core::{
    AcquireRequest, FencingToken, Lease, LockState, OwnerId, Result, WaitDeadline, valid_until,
};
use sqlx::mysql::{MySql, MySqlArguments, MySqlConnection, MySqlPool, MySqlRow};
use sqlx::query::Query;
use sqlx::{Connection, Executor, Row};
use tokio::time::Instant;

use super::STORE;
use crate::in_flight::end_dropped_wait;
use crate::server_locks::{SessionError, SessionMode};
use crate::session_table::{SessionConn, SessionStatements};

/// The statements of session mode on one lease table.
#[derive(Debug)]
pub(crate) struct SessionQueries {
    lock: String,
    bump: String,
    probe: String,
    clear_owner: String,
    unlock: String,
    holder_session: String,
    pub(crate) holder: String,
}

impl SessionQueries {
    pub(crate) fn new(table: &str) -> Self {
        let lock = format!(
            "CONCAT('fencelock:', LEFT(SHA2(CONCAT(DATABASE(), '/', '{table}', '/', ?), 256), 54))"
        );
        let now =
            "CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) AS SIGNED)";
        Self {
            // ? key, ? seconds to wait (0: none). 1 if we got the lock, 0 if it was
            // still held when the time ran out; and the server session.
            lock: format!("SELECT GET_LOCK({lock}, ?), CONNECTION_ID()"),
            // ? key, ? owner. The next token through LAST_INSERT_ID (a new row seeds it
            // from the clock in µs). `expires_at = 0`: lease-mode clients see the row
            // as free, so one table must not be shared between the two modes.
            bump: format!(
                "INSERT INTO `{table}` (name, owner, token, expires_at)
VALUES (?, ?, LAST_INSERT_ID({now}), 0)
ON DUPLICATE KEY UPDATE token = LAST_INSERT_ID(token + 1), owner = VALUES(owner), expires_at = 0"
            ),
            // ? key. 1 iff this very server session holds the lock.
            probe: format!("SELECT COALESCE(IS_USED_LOCK({lock}) = CONNECTION_ID(), 0)"),
            // ? key, ? owner, ? token.
            clear_owner: format!(
                "UPDATE `{table}` SET owner = NULL WHERE name = ? AND owner = ? AND token = ?"
            ),
            // ? key. 1 if we held the lock and freed it.
            unlock: format!("SELECT COALESCE(RELEASE_LOCK({lock}), 0)"),
            // ? key, ? key, ? owner, ? token. The server session that holds this very
            // grant, per the lease table.
            holder_session: format!(
                "SELECT CAST(IS_USED_LOCK({lock}) AS SIGNED) FROM `{table}`
WHERE name = ? AND owner = ? AND token = ? AND IS_USED_LOCK({lock}) IS NOT NULL"
            ),
            // ? key, ? key. The recorded holder, if some session holds the lock now.
            holder: format!(
                "SELECT owner, token FROM `{table}`
WHERE name = ? AND owner IS NOT NULL AND IS_USED_LOCK({lock}) IS NOT NULL"
            ),
        }
    }
}

/// The session locks of a MySQL backend.
pub(crate) type SessionLocks = crate::session_table::SessionLocks<MySqlConnection>;

impl SessionStatements for SessionQueries {
    type Conn = MySqlConnection;

    /// Whether this very server session holds the named lock (the session id is
    /// checked by the server: `IS_USED_LOCK(..) = CONNECTION_ID()`).
    async fn probe(&self, conn: &mut MySqlConnection, key: &str, _session: i64) -> bool {
        let ours = sqlx::query_scalar::<_, i64>(&self.probe)
            .bind(key.as_bytes())
            .fetch_one(conn)
            .await;
        ours.is_ok_and(|ours| ours == 1)
    }

    async fn unlock(&self, conn: &mut MySqlConnection, key: &str, owner: &str, token: u64) -> bool {
        unlock(conn, self, owner, key, token)
            .await
            .is_ok_and(|freed| freed == 1)
    }
}

/// Whether the server sessions behind `pool` move between its connections, as behind
/// a transaction pooling proxy (such as ProxySQL with multiplexing): one connection's
/// `CONNECTION_ID()`, then a second connection's inside an open transaction, then the
/// first's again. Talking to the server directly, two connections are two sessions
/// and a connection keeps its session. Plain text queries: no prepared statement a
/// proxy could mix up.
pub(crate) async fn behind_transaction_pooling(pool: &MySqlPool) -> Result<bool, sqlx::Error> {
    const ID: &str = "SELECT CONNECTION_ID()";
    let mut first = pool.acquire().await?;
    let mut second = MySqlConnection::connect_with(&*pool.connect_options()).await?;
    let before: u64 = (&mut *first).fetch_one(ID).await?.try_get(0)?;
    second.execute("START TRANSACTION").await?;
    let other: u64 = second.fetch_one(ID).await?.try_get(0)?;
    let after: u64 = (&mut *first).fetch_one(ID).await?.try_get(0)?;
    second.execute("ROLLBACK").await?;
    let _ = second.close().await;
    Ok(other == before || after != before)
}

/// The longest `GET_LOCK` wait, a year: MariaDB refuses a negative (endless) one.
const FOREVER_SECONDS: f64 = 31_536_000.0;

/// A lock attempt whose outcome its caller has not seen yet. Dropped unsettled (the
/// acquire was cancelled, or a statement after the lock failed), it closes the
/// connection and kills its server session, which frees whatever it took and takes it
/// out of the server's queue.
struct InFlight {
    conn: Option<SessionConn<MySql>>,
    pool: MySqlPool,
    /// `CONNECTION_ID()` of the connection's server session, once known.
    session: Option<u64>,
}

impl InFlight {
    fn conn(&mut self) -> &mut MySqlConnection {
        self.conn.as_deref_mut().expect("taken only when settled")
    }

    /// The row of the attempt's first statement, which takes nothing if it fails. A
    /// reused connection that fails it has died while idle, or is unusable: it is
    /// closed and the statement runs again on a fresh connection from the pool.
    async fn first_row<'q>(
        &mut self,
        statement: impl Fn() -> Query<'q, MySql, MySqlArguments> + Send + Sync,
    ) -> Result<MySqlRow, sqlx::Error> {
        let reused = self.conn.as_ref().is_some_and(SessionConn::is_reused);
        match statement().fetch_one(self.conn()).await {
            Err(err) if reused => {
                tracing::debug!(store = STORE, %err, "an idle session connection failed");
                if let Some(conn) = self.conn.take() {
                    let _ = conn.detach().close().await;
                }
                self.conn = Some(SessionConn::Pooled(self.pool.acquire().await?));
                statement().fetch_one(self.conn()).await
            }
            row => row,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        // Dropping a detached connection closes its socket; the server ends an idle
        // session when it reads the end of the stream.
        drop(conn.detach());
        // A session blocked in `GET_LOCK` may not notice before it is granted: kill
        // it from another connection, and wait until it has ended.
        let Some(id) = self.session else {
            return;
        };
        let pool = self.pool.clone();
        end_dropped_wait(STORE, async move { kill_and_wait(&pool, id).await });
    }
}

/// How often, and how many times, [`kill_and_wait`] looks for the killed session.
const GONE_CHECK_EVERY: Duration = Duration::from_millis(5);
const GONE_CHECKS: u32 = 1000;

/// Kills server session `id` and waits until it is gone from the process list, so
/// its locks and its place in their queues are freed. Connection ids are never
/// reused, so this kills nobody else.
async fn kill_and_wait(pool: &MySqlPool, id: u64) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    if let Err(err) = sqlx::query(&format!("KILL {id}")).execute(&mut *conn).await {
        // "Unknown thread id": it has ended by itself.
        tracing::debug!(id, store = STORE, %err, "kill of a cancelled lock wait");
    }
    for _ in 0..GONE_CHECKS {
        let left: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = ?")
                .bind(id)
                .fetch_one(&mut *conn)
                .await?;
        if left == 0 {
            return Ok(());
        }
        tokio::time::sleep(GONE_CHECK_EVERY).await;
    }
    Err(sqlx::Error::Protocol(format!(
        "server session {id} was killed but is still listed"
    )))
}

/// `GET_LOCK`'s timeout for a wait until `deadline`, in seconds (microseconds are
/// kept); 0 for no wait.
fn wait_seconds(deadline: &WaitDeadline) -> f64 {
    if !deadline.may_wait() {
        return 0.0;
    }
    match deadline.deadline() {
        None => FOREVER_SECONDS,
        Some(at) => at
            .checked_duration_since(Instant::now())
            .map_or(0.0, |left| left.as_secs_f64().min(FOREVER_SECONDS)),
    }
}

impl SessionMode for SessionQueries {
    type Db = MySql;

    /// Takes the lock, waiting in the server's queue as `deadline` allows: `Some`
    /// lease if granted, `None` if still held when waiting ends.
    async fn acquire(
        &self,
        locks: &Arc<SessionLocks>,
        pool: &MySqlPool,
        req: &AcquireRequest,
        key: &str,
        deadline: &WaitDeadline,
    ) -> Result<Option<Lease>, SessionError> {
        let conn = match locks.reuse() {
            Some(conn) => SessionConn::Reused(conn),
            None => SessionConn::Pooled(pool.acquire().await?),
        };
        let mut in_flight = InFlight {
            conn: Some(conn),
            pool: pool.clone(),
            session: None,
        };
        let seconds = wait_seconds(deadline);
        let lock = || sqlx::query(&self.lock).bind(key.as_bytes()).bind(seconds);
        let row = if seconds > 0.0 {
            let id: u64 = in_flight
                .first_row(|| sqlx::query("SELECT CONNECTION_ID()"))
                .await?
                .try_get(0)?;
            in_flight.session = Some(id);
            lock().fetch_one(in_flight.conn()).await?
        } else {
            in_flight.first_row(lock).await?
        };
        let got: Option<i64> = row.try_get(0)?;
        if got != Some(1) {
            // Nothing taken: the connection goes back where it came from, unless
            // `GET_LOCK` failed (NULL: say, the session was killed).
            if let Some(conn) = in_flight.conn.take() {
                if got == Some(0) {
                    locks.put_back(conn).await;
                }
            }
            return Ok(None);
        }
        // Measured from the bump, not from the start of the wait: the lock was
        // granted before it, and the TTL runs from here.
        let sent = Instant::now();
        let token = sqlx::query(&self.bump)
            .bind(key.as_bytes())
            .bind(req.owner.as_str())
            .execute(in_flight.conn())
            .await?
            .last_insert_id();
        let ours: i64 = sqlx::query_scalar(&self.probe)
            .bind(key.as_bytes())
            .fetch_one(in_flight.conn())
            .await?;
        if ours != 1 {
            // Dropping `in_flight` ends the session that holds the lock.
            return Err(SessionError::PoolingProxy);
        }
        let id = in_flight.session;
        // Out of the pool for as long as the lock is held.
        let conn = in_flight.conn.take().expect("settled here").detach();
        let session = id.and_then(|id| i64::try_from(id).ok()).unwrap_or(0);
        locks.insert(
            req.owner.as_str(),
            key,
            token,
            session,
            conn,
            sent + req.ttl,
        );
        Ok(Some(Lease::new(
            req.name.clone(),
            req.owner.clone(),
            FencingToken(token),
            valid_until(sent, req.ttl),
        )))
    }

    /// Releases a grant that another client holds (the contract lets anyone with the
    /// lease release it): kills the server session that holds it, if the lease table
    /// says that session holds this very grant.
    async fn release_elsewhere(
        &self,
        pool: &MySqlPool,
        lease: &Lease,
        key: &str,
    ) -> Result<bool, sqlx::Error> {
        let Ok(token) = i64::try_from(lease.token().0) else {
            return Ok(false);
        };
        let mut conn = pool.acquire().await?;
        let session: Option<i64> = sqlx::query_scalar(&self.holder_session)
            .bind(key.as_bytes())
            .bind(key.as_bytes())
            .bind(lease.owner().as_str())
            .bind(token)
            .bind(key.as_bytes())
            .fetch_optional(&mut *conn)
            .await?;
        let Some(session) = session else {
            return Ok(false);
        };
        sqlx::query(&format!("KILL {session}"))
            .execute(&mut *conn)
            .await?;
        sqlx::query(&self.clear_owner)
            .bind(key.as_bytes())
            .bind(lease.owner().as_str())
            .bind(token)
            .execute(&mut *conn)
            .await?;
        Ok(true)
    }

    /// The holder of `key` per the lease table, if a session holds its lock now.
    async fn holder(&self, pool: &MySqlPool, key: &str) -> Result<Option<LockState>, sqlx::Error> {
        let row = sqlx::query(&self.holder)
            .bind(key.as_bytes())
            .bind(key.as_bytes())
            .fetch_optional(pool)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        // Read as bytes: sqlx calls the ascii_bin column binary.
        let owner: Vec<u8> = row.try_get(0)?;
        let token: i64 = row.try_get(1)?;
        Ok(Some(LockState {
            holder: OwnerId::from_stored(String::from_utf8_lossy(&owner).into_owned()),
            token: FencingToken(u64::try_from(token).unwrap_or(0)),
            remaining: None,
        }))
    }
}

/// Clears the row's owner and frees the named lock; 1 if it was ours.
async fn unlock(
    conn: &mut MySqlConnection,
    queries: &SessionQueries,
    owner: &str,
    key: &str,
    token: u64,
) -> Result<i64, sqlx::Error> {
    sqlx::query(&queries.clear_owner)
        .bind(key.as_bytes())
        .bind(owner)
        .bind(i64::try_from(token).unwrap_or(i64::MAX))
        .execute(&mut *conn)
        .await?;
    sqlx::query_scalar(&queries.unlock)
        .bind(key.as_bytes())
        .fetch_one(conn)
        .await
}
