//! Session mode on Postgres: a lock is a session-level advisory lock
//! (`pg_advisory_lock(hashtextextended(key, 0))`) on a connection taken out of the
//! pool for as long as it is held.
//!
//! The fencing counter is the lease table's row for the name, bumped while holding.
//! Waiters queue on the server: the waiting connection runs `pg_advisory_lock`, which
//! the server grants when the lock is free, with the wait's deadline as the session's
//! `lock_timeout`. A waiter dropped while its statement runs must not leave its server
//! session in the queue (it would take the lock after the next release with nobody to
//! use it): its connection is closed and its server session terminated by pid (checked
//! against `backend_start`, so a reused pid is never hit), which frees whatever it took.
//!
//! A lock released cleanly leaves its connection on the backend's idle list for the
//! next session acquire (see [`crate::session_table`]); a reused connection that has
//! died meanwhile is closed and the attempt starts over on a fresh pool connection.
//!
//! A held lock ends when its connection does (the server frees session locks of a
//! session that ends), and also when its TTL passes without a renewal: the backend
//! then closes the connection itself, so the TTL contract holds for clients that are
//! alive but stopped renewing.

use std::sync::Arc;

use fencelock_core::{
    AcquireRequest, FencingToken, Lease, LockState, OwnerId, Result, WaitDeadline, valid_until,
};
use sqlx::postgres::{PgArguments, PgConnection, PgPool, PgRow, Postgres};
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
    try_lock: String,
    prepare_wait: String,
    lock: String,
    bump: String,
    probe: String,
    release: String,
    release_elsewhere: String,
    pub(crate) holder: String,
}

impl SessionQueries {
    pub(crate) fn new(table: &str) -> Self {
        Self {
            // $1 key. Whether we got the lock, and which server session we are on.
            try_lock: "SELECT pg_try_advisory_lock(hashtextextended($1, 0)), pg_backend_pid()"
                .to_owned(),
            // $1 lock_timeout (e.g. `250ms`, `0` for none). The server session and when
            // it started (µs since the epoch; 0 if unknown), which name it for
            // `TERMINATE`.
            prepare_wait: "SELECT pg_backend_pid(), COALESCE((SELECT (extract(epoch FROM \
                           backend_start) * 1000000)::bigint FROM pg_stat_activity \
                           WHERE pid = pg_backend_pid()), 0), \
                           set_config('lock_timeout', $1, false)"
                .to_owned(),
            // $1 key. Waits in the server's queue for the lock, up to `lock_timeout`,
            // then lifts `lock_timeout` (the targets run in order): the bump below may
            // wait a moment for the counter row, which a release keeps locked until it
            // commits, just after it freed the advisory lock; that must not fail on
            // the acquire's deadline once the lock is ours.
            lock: "SELECT pg_advisory_lock(hashtextextended($1, 0)), \
                   set_config('lock_timeout', '0', false)"
                .to_owned(),
            // $1 key, $2 owner. The next token (a new row seeds it from the clock in
            // µs), and the server session, which must be the one that took the lock.
            // `expires_at = 0`: lease-mode clients see the row as free, so one table
            // must not be shared between the two modes.
            bump: format!(
                r#"WITH now AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint AS us)
INSERT INTO "{table}" AS held (name, owner, token, expires_at)
SELECT $1, $2, now.us, 0 FROM now
ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, token = held.token + 1, expires_at = 0
RETURNING token, pg_backend_pid()"#
            ),
            probe: "SELECT pg_backend_pid()".to_owned(),
            // $1 key, $2 owner, $3 token. Clears the owner, unlocks and notifies the
            // waiters (delivered when the statement commits).
            release: format!(
                r#"WITH freed AS (
    UPDATE "{table}" SET owner = NULL WHERE name = $1 AND owner = $2 AND token = $3
    RETURNING name
)
SELECT pg_advisory_unlock(hashtextextended($1, 0)), pg_notify('{table}', $1)::text"#
            ),
            // $1 key, $2 owner, $3 token. Releases a grant held by another client: ends
            // the server session that holds the lock, if the row says it is this grant.
            release_elsewhere: format!(
                r#"WITH target AS (
    SELECT l.pid FROM "{table}" AS held JOIN pg_locks AS l
      ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
     AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended(held.name, 0)
    WHERE held.name = $1 AND held.owner = $2 AND held.token = $3
), freed AS (
    UPDATE "{table}" SET owner = NULL
    WHERE name = $1 AND owner = $2 AND token = $3 AND EXISTS (SELECT 1 FROM target)
    RETURNING name
)
SELECT pg_terminate_backend(pid), pg_notify('{table}', $1)::text FROM target"#
            ),
            // $1 key. The recorded holder, if some session holds the advisory lock now.
            holder: format!(
                r#"SELECT owner, token FROM "{table}"
WHERE name = $1 AND owner IS NOT NULL AND EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND objsubid = 1
      AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0)
)"#
            ),
        }
    }
}

/// The session locks of a Postgres backend.
pub(crate) type SessionLocks = crate::session_table::SessionLocks<PgConnection>;

impl SessionStatements for SessionQueries {
    type Conn = PgConnection;

    async fn probe(&self, conn: &mut PgConnection, _key: &str, session: i64) -> bool {
        let pid = sqlx::query_scalar::<_, i32>(&self.probe)
            .fetch_one(conn)
            .await;
        pid.is_ok_and(|pid| i64::from(pid) == session)
    }

    async fn unlock(&self, conn: &mut PgConnection, key: &str, owner: &str, token: u64) -> bool {
        let unlocked = sqlx::query_scalar::<_, bool>(&self.release)
            .bind(key)
            .bind(owner)
            .bind(i64::try_from(token).unwrap_or(i64::MAX))
            .fetch_one(conn)
            .await;
        unlocked.unwrap_or(false)
    }
}

/// $1 pid, $2 `backend_start` in µs. Ends that server session if it is still the one
/// that started then, and waits (up to 5 s; Postgres 14 or later) until it has exited
/// and so freed its locks and its place in their queues.
const TERMINATE: &str = "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
    WHERE pid = $1 AND (extract(epoch FROM backend_start) * 1000000)::bigint = $2";

/// SQLSTATE `lock_not_available`: `lock_timeout` ran out.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// A lock attempt whose outcome its caller has not seen yet. Dropped unsettled (the
/// acquire was cancelled, or a statement after the lock failed), it closes the
/// connection and terminates its server session, which frees whatever it took and
/// takes it out of the server's queue.
struct InFlight {
    conn: Option<SessionConn<Postgres>>,
    pool: PgPool,
    /// `(pid, backend_start µs)` of the connection's server session, once known.
    session: Option<(i32, i64)>,
}

impl InFlight {
    fn conn(&mut self) -> &mut PgConnection {
        self.conn.as_deref_mut().expect("taken only when settled")
    }

    /// The row of the attempt's first statement, which takes nothing if it fails. A
    /// reused connection that fails it has died while idle, or is unusable: it is
    /// closed and the statement runs again on a fresh connection from the pool.
    async fn first_row<'q>(
        &mut self,
        statement: impl Fn() -> Query<'q, Postgres, PgArguments> + Send + Sync,
    ) -> Result<PgRow, sqlx::Error> {
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
        // A session blocked in `pg_advisory_lock` reads nothing until it is granted:
        // end it from another connection, and wait until it has ended.
        let Some((pid, started)) = self.session else {
            return;
        };
        let pool = self.pool.clone();
        end_dropped_wait(STORE, async move {
            sqlx::query(TERMINATE)
                .bind(pid)
                .bind(started)
                .execute(&pool)
                .await
                .map(drop)
        });
    }
}

/// `lock_timeout` for a wait until `deadline`: whole milliseconds rounded up, at
/// least 1 (0 would mean no limit); `None` if the deadline has passed.
fn lock_timeout(deadline: &WaitDeadline) -> Option<String> {
    match deadline.deadline() {
        None => Some("0".to_owned()),
        Some(at) => {
            let left = at.checked_duration_since(Instant::now())?;
            let ms = left.as_micros().div_ceil(1000).max(1);
            Some(format!("{ms}ms"))
        }
    }
}

/// Whether the server sessions behind `pool` move between its connections, as behind
/// a transaction pooling proxy: one connection's `pg_backend_pid()`, then a second
/// connection's inside an open transaction, then the first's again. Talking to the
/// server directly, two connections are two sessions and a connection keeps its
/// session; behind such a proxy the idle session of the first connection is handed to
/// the second (or the first comes back on another one). The simple query protocol
/// keeps the check itself free of prepared statements, which such a proxy mixes up
/// between clients; if one is mixed up all the same, that is the answer too.
pub(crate) async fn behind_transaction_pooling(pool: &PgPool) -> Result<bool, sqlx::Error> {
    match compare_sessions(pool).await {
        Err(sqlx::Error::Database(db))
            if matches!(
                db.code().as_deref(),
                Some(DUPLICATE_PREPARED_STATEMENT | INVALID_SQL_STATEMENT_NAME)
            ) =>
        {
            Ok(true)
        }
        other => other,
    }
}

/// SQLSTATEs of a prepared statement that exists where it should not, or not where it
/// should: another client's statements ran in this server session.
const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
const INVALID_SQL_STATEMENT_NAME: &str = "26000";

async fn compare_sessions(pool: &PgPool) -> Result<bool, sqlx::Error> {
    const PID: &str = "SELECT pg_backend_pid()";
    let mut first = pool.acquire().await?.detach();
    let mut second = PgConnection::connect_with(&*pool.connect_options()).await?;
    // A bare `&str` runs as a simple query: no prepared statement.
    let before: i32 = first.fetch_one(PID).await?.try_get(0)?;
    second.execute("BEGIN").await?;
    let other: i32 = second.fetch_one(PID).await?.try_get(0)?;
    let after: i32 = first.fetch_one(PID).await?.try_get(0)?;
    second.execute("ROLLBACK").await?;
    let _ = second.close().await;
    let _ = first.close().await;
    Ok(other == before || after != before)
}

impl SessionMode for SessionQueries {
    type Db = Postgres;

    /// Takes the lock, waiting in the server's queue as `deadline` allows: `Some`
    /// lease if granted, `None` if still held when waiting ends.
    async fn acquire(
        &self,
        locks: &Arc<SessionLocks>,
        pool: &PgPool,
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
        let timeout = if deadline.may_wait() {
            lock_timeout(deadline)
        } else {
            None
        };
        let pid = match timeout {
            None => {
                let row = in_flight
                    .first_row(|| sqlx::query(&self.try_lock).bind(key))
                    .await?;
                let (got, pid): (bool, i32) = (row.try_get(0)?, row.try_get(1)?);
                if !got {
                    // Nothing taken: the connection goes back where it came from.
                    if let Some(conn) = in_flight.conn.take() {
                        locks.put_back(conn).await;
                    }
                    return Ok(None);
                }
                pid
            }
            Some(timeout) => {
                let row = in_flight
                    .first_row(|| sqlx::query(&self.prepare_wait).bind(timeout.clone()))
                    .await?;
                let (pid, started): (i32, i64) = (row.try_get(0)?, row.try_get(1)?);
                in_flight.session = Some((pid, started));
                let waited = sqlx::query(&self.lock)
                    .bind(key)
                    .execute(in_flight.conn())
                    .await;
                match waited {
                    Ok(_) => pid,
                    Err(sqlx::Error::Database(db))
                        if db.code().as_deref() == Some(LOCK_NOT_AVAILABLE) =>
                    {
                        // Not taken. The connection keeps its `lock_timeout`, so it
                        // is not kept for reuse.
                        if let Some(conn) = in_flight.conn.take() {
                            let _ = conn.detach().close().await;
                        }
                        return Ok(None);
                    }
                    Err(err) => return Err(err.into()),
                }
            }
        };
        // Measured from the bump, not from the start of the wait: the lock was
        // granted before it, and the TTL runs from here.
        let sent = Instant::now();
        let row = sqlx::query(&self.bump)
            .bind(key)
            .bind(req.owner.as_str())
            .fetch_one(in_flight.conn())
            .await?;
        let (token, bumped_on): (i64, i32) = (row.try_get(0)?, row.try_get(1)?);
        if bumped_on != pid {
            // Dropping `in_flight` ends the session that holds the lock.
            return Err(SessionError::PoolingProxy);
        }
        let token = u64::try_from(token).unwrap_or(0);
        // Out of the pool for as long as the lock is held.
        let conn = in_flight.conn.take().expect("settled here").detach();
        locks.insert(
            req.owner.as_str(),
            key,
            token,
            i64::from(pid),
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
    /// lease release it): ends the server session that holds it, if the lease table
    /// says that session holds this very grant.
    async fn release_elsewhere(
        &self,
        pool: &PgPool,
        lease: &Lease,
        key: &str,
    ) -> Result<bool, sqlx::Error> {
        let Ok(token) = i64::try_from(lease.token().0) else {
            return Ok(false);
        };
        let ended = sqlx::query(&self.release_elsewhere)
            .bind(key)
            .bind(lease.owner().as_str())
            .bind(token)
            .fetch_optional(pool)
            .await?;
        Ok(ended.is_some())
    }

    /// The holder of `key` per the lease table, if a session holds its lock now.
    async fn holder(&self, pool: &PgPool, key: &str) -> Result<Option<LockState>, sqlx::Error> {
        let row = sqlx::query(&self.holder)
            .bind(key)
            .fetch_optional(pool)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let owner: String = row.try_get(0)?;
        let token: i64 = row.try_get(1)?;
        Ok(Some(LockState {
            holder: OwnerId::from_stored(owner),
            token: FencingToken(u64::try_from(token).unwrap_or(0)),
            remaining: None,
        }))
    }
}
