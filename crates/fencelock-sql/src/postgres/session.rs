//! Session mode on Postgres: a lock is a session-level advisory lock
//! (`pg_advisory_lock(hashtextextended(key, 0))`) on a connection taken out of the
//! pool for as long as it is held.
//!
//! The fencing counter is the lease table's row for the name, bumped while holding,
//! in the same statement that takes the lock: the INSERT of the bump reads its row
//! from the CTE that takes the lock, so it runs only once the lock is ours, and its
//! `ON CONFLICT DO UPDATE` updates the newest committed row (after waiting for a
//! release that has not committed yet), not the statement's older snapshot. So a
//! waiter is granted and has its token when that one statement returns: nothing runs
//! between the server's grant and the caller's.
//!
//! Waiters queue on the server: the waiting statement sets the wait's deadline as the
//! session's `lock_timeout` just before `pg_advisory_lock` and lifts it just after (a
//! timed-out wait rolls the setting back with the statement). A waiter dropped while
//! its statement runs must not leave its server session in the queue (it would take
//! the lock after the next release with nobody to use it), nor keep a lock its bump
//! had not reported yet: its connection is closed and its server session terminated
//! by pid (checked against `backend_start`, so a reused pid is never hit), which frees
//! whatever it took.
//!
//! A lock released cleanly leaves its connection, with its pid and `backend_start`,
//! on the backend's idle list for the next session acquire (see
//! [`crate::session_table`]); a reused connection that has died meanwhile is closed
//! and the attempt starts over on a fresh pool connection. Statements per lock: the
//! acquire is one on a kept connection (two on a fresh one, which first reads its pid
//! and `backend_start`), the release one.
//!
//! A held lock ends when its connection does (the server frees session locks of a
//! session that ends), and also when its TTL passes without a renewal: the backend
//! then closes the connection itself, so the TTL contract holds for clients that are
//! alive but stopped renewing. The server never expires the lock by itself, so the
//! TTL (and the lease's validity) runs from when the lock statement returned. The
//! statement that learns a fresh connection's pid also reads its
//! `idle_session_timeout`, which bounds the TTLs accepted and the validity promised
//! (see [`crate::session_table`]); the sessions of held locks are checked in
//! `pg_stat_activity` once a second.

use std::sync::Arc;
use std::time::Duration;

use fencelock_core::{
    AcquireRequest, FencingToken, Lease, LockState, OwnerId, Result, WaitDeadline,
};
use sqlx::postgres::{PgArguments, PgConnection, PgPool, PgRow, Postgres};
use sqlx::query::Query;
use sqlx::{Connection, Executor, Row};
use tokio::time::Instant;

use super::STORE;
use crate::in_flight::end_dropped_wait;
use crate::server_locks::{SessionError, SessionMode};
use crate::session_table::{HeldBy, ServerSession, SessionConn, SessionStatements};

/// The statements of session mode on one lease table.
#[derive(Debug)]
pub(crate) struct SessionQueries {
    session: String,
    try_lock: String,
    lock: String,
    probe: String,
    release: String,
    release_elsewhere: String,
    pub(crate) holder: String,
}

impl SessionQueries {
    pub(crate) fn new(table: &str) -> Self {
        // $1 key, $2 owner, after `locked` (a CTE that takes the lock of $1, or a row
        // per lock taken). The INSERT reads its one row from `locked`, so it runs only
        // once the lock is ours. Its snapshot is older (from before a wait), but
        // `ON CONFLICT DO UPDATE` waits for and updates the newest committed row,
        // whatever the snapshot: the next token (a new row seeds it from the clock in
        // µs), and the server session, which must be the one we know the connection
        // by. `expires_at = 0`: lease-mode clients see the row as free, so one table
        // must not be shared between the two modes.
        let bump = format!(
            r#"now AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint AS us FROM locked)
INSERT INTO "{table}" AS held (name, owner, token, expires_at)
SELECT $1, $2, now.us, 0 FROM now
ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, token = held.token + 1, expires_at = 0
RETURNING token, pg_backend_pid()"#
        );
        Self {
            // The server session and when it started (µs since the epoch; 0 if
            // unknown), which name it for `TERMINATE`; and its `idle_session_timeout`
            // in ms (0: none; not there before Postgres 14).
            session: "SELECT pg_backend_pid(), COALESCE((SELECT (extract(epoch FROM \
                      backend_start) * 1000000)::bigint FROM pg_stat_activity \
                      WHERE pid = pg_backend_pid()), 0), COALESCE((SELECT setting::bigint \
                      FROM pg_settings WHERE name = 'idle_session_timeout'), 0)"
                .to_owned(),
            // $1 key, $2 owner. Takes the lock if it is free and bumps the counter;
            // no row if the lock is held.
            try_lock: format!(
                "WITH locked AS MATERIALIZED (
    SELECT 1 FROM (SELECT pg_try_advisory_lock(hashtextextended($1, 0)) AS got) AS try
    WHERE try.got
), {bump}"
            ),
            // $1 key, $2 owner, $3 lock_timeout (e.g. `250ms`, `0` for none). Waits
            // in the server's queue for the lock, up to `lock_timeout`, then lifts it
            // (the targets run in order) and bumps the counter: the bump may wait a
            // moment for the counter row, which a release keeps locked until it
            // commits, and that must not fail on the acquire's deadline once the
            // lock is ours. A `lock_timeout` error rolls `set_config` back, so the
            // setting never outlives the statement.
            lock: format!(
                "WITH locked AS MATERIALIZED (
    SELECT set_config('lock_timeout', $3, false), pg_advisory_lock(hashtextextended($1, 0)),
           set_config('lock_timeout', '0', false)
), {bump}"
            ),
            probe: "SELECT pg_backend_pid()".to_owned(),
            // $1 key, $2 owner, $3 token. Clears the owner, then (reading `freed`
            // runs the UPDATE first) unlocks. The cleared row stays locked until the
            // statement commits, so whoever takes the lock next cannot see the row
            // name us after the unlock without first waiting for the commit. No
            // `NOTIFY`: session-mode waiters wait in the server's queue, and a
            // notification would only wake every listener during the hand-off.
            release: format!(
                r#"WITH freed AS (
    UPDATE "{table}" SET owner = NULL WHERE name = $1 AND owner = $2 AND token = $3
    RETURNING name
)
SELECT pg_advisory_unlock(hashtextextended($1, 0)) FROM (SELECT count(*) FROM freed) AS done"#
            ),
            // $1 key, $2 owner, $3 token. Releases a grant held by another client: ends
            // the server session that holds the lock, if the row says it is this grant.
            // The row is read locked (waiting for a release in progress to commit, and
            // then re-checked): a holder releases by clearing the row before it
            // unlocks, so the row cannot name this grant while another session holds
            // the lock after a clean release.
            release_elsewhere: format!(
                r#"WITH target AS (
    SELECT l.pid FROM "{table}" AS held JOIN pg_locks AS l
      ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
     AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended(held.name, 0)
    WHERE held.name = $1 AND held.owner = $2 AND held.token = $3
    FOR UPDATE OF held
), freed AS (
    UPDATE "{table}" SET owner = NULL
    WHERE name = $1 AND owner = $2 AND token = $3 AND EXISTS (SELECT 1 FROM target)
    RETURNING name
)
SELECT pg_terminate_backend(pid) FROM target"#
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

    const IDLE_SETTING: &'static str = "idle_session_timeout";

    fn raise_idle_limit(needed: Duration) -> String {
        let ms = needed.as_millis() + 1;
        format!(
            "raise idle_session_timeout above {needed:?} for these sessions (ALTER ROLE or \
             ALTER DATABASE .. SET idle_session_timeout = '{ms}ms' or more, or 0 for none; \
             in postgresql.conf, followed by a reload)"
        )
    }

    async fn probe(&self, conn: &mut PgConnection, _key: &str, session: ServerSession) -> bool {
        let pid = sqlx::query_scalar::<_, i32>(&self.probe)
            .fetch_one(conn)
            .await;
        pid.is_ok_and(|pid| i64::from(pid) == session.id)
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
/// acquire was cancelled, or the lock statement failed), it closes the connection and
/// terminates its server session, which frees whatever it took and takes it out of
/// the server's queue.
struct InFlight {
    conn: Option<SessionConn<Postgres>>,
    pool: PgPool,
    /// The connection's server session, once known (always before the lock
    /// statement runs).
    session: Option<ServerSession>,
}

impl InFlight {
    /// An attempt on `conn`, whose server session is known if it was kept.
    fn new(conn: SessionConn<Postgres>, pool: &PgPool) -> Self {
        Self {
            session: conn.known_session(),
            conn: Some(conn),
            pool: pool.clone(),
        }
    }

    fn conn(&mut self) -> &mut PgConnection {
        self.conn.as_deref_mut().expect("taken only when settled")
    }

    /// Learns the connection's server session, if it is not known yet (a connection
    /// fresh from the pool): one statement.
    async fn identify(&mut self, queries: &SessionQueries) -> Result<ServerSession, sqlx::Error> {
        if let Some(session) = self.session {
            return Ok(session);
        }
        let session = identify(self.conn(), queries).await?;
        self.session = Some(session);
        Ok(session)
    }

    /// Runs the lock statement, once the connection's server session is known and
    /// can keep a lock for `ttl` (else [`SessionError::TtlRefused`], before anything is
    /// taken). A kept connection found dead (it died while idle) is closed and the
    /// statement runs again on a fresh connection from the pool. Any other failure is
    /// the caller's: the statement may have taken the lock before it failed, and only
    /// dropping the attempt ends the session for sure.
    async fn lock<'q>(
        &mut self,
        queries: &SessionQueries,
        ttl: Duration,
        statement: impl Fn() -> Query<'q, Postgres, PgArguments> + Send + Sync,
    ) -> Result<Option<PgRow>, SessionError> {
        let session = self.identify(queries).await?;
        session
            .check_ttl::<SessionQueries>(ttl)
            .map_err(SessionError::TtlRefused)?;
        let reused = self.conn.as_ref().is_some_and(SessionConn::is_reused);
        let row = match statement().fetch_optional(self.conn()).await {
            Err(err) if reused && connection_lost(&err) => {
                tracing::debug!(store = STORE, %err, "an idle session connection failed");
                if let Some(conn) = self.conn.take() {
                    let _ = conn.detach().close().await;
                }
                self.session = None;
                self.conn = Some(SessionConn::Pooled(self.pool.acquire().await?));
                let session = self.identify(queries).await?;
                session
                    .check_ttl::<SessionQueries>(ttl)
                    .map_err(SessionError::TtlRefused)?;
                statement().fetch_optional(self.conn()).await
            }
            row => row,
        };
        Ok(row?)
    }
}

/// The server session of `conn` and its idle limit: one statement.
async fn identify(
    conn: &mut PgConnection,
    queries: &SessionQueries,
) -> Result<ServerSession, sqlx::Error> {
    let row = sqlx::query(&queries.session).fetch_one(conn).await?;
    let (pid, started, idle): (i32, i64, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    Ok(ServerSession {
        id: i64::from(pid),
        started,
        idle_limit: u64::try_from(idle)
            .ok()
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis),
    })
}

/// Whether `err` says the connection is gone: it failed, or the server ended its
/// session (SQLSTATE class 57, operator intervention, or 08, connection exception).
fn connection_lost(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("57") || code.starts_with("08")),
        _ => false,
    }
}

/// Whether `err` is `lock_timeout` running out while waiting for a lock.
fn is_lock_timeout(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some(LOCK_NOT_AVAILABLE))
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
        let Some(session) = self.session else {
            return;
        };
        let Ok(pid) = i32::try_from(session.id) else {
            return;
        };
        let pool = self.pool.clone();
        end_dropped_wait(STORE, async move {
            sqlx::query(TERMINATE)
                .bind(pid)
                .bind(session.started)
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
        let conn = locks.connection(pool).await?;
        let mut in_flight = InFlight::new(conn, pool);
        let timeout = if deadline.may_wait() {
            lock_timeout(deadline)
        } else {
            None
        };
        let owner = req.owner.as_str();
        let locked = match &timeout {
            None => {
                let statement = || sqlx::query(&self.try_lock).bind(key).bind(owner);
                in_flight.lock(self, req.ttl, statement).await
            }
            Some(timeout) => {
                let statement = || {
                    let query = sqlx::query(&self.lock).bind(key).bind(owner);
                    query.bind(timeout.as_str())
                };
                in_flight.lock(self, req.ttl, statement).await
            }
        };
        // The server holds the lock until we end the session, which the TTL below
        // does: its time runs from here, after any wait.
        let returned = Instant::now();
        let row = match locked {
            Ok(Some(row)) => row,
            Ok(None) => {
                // Not taken (`pg_try_advisory_lock`): nothing changed, the connection
                // goes back where it came from.
                if let Some(conn) = in_flight.conn.take() {
                    locks.put_back(conn).await;
                }
                return Ok(None);
            }
            Err(SessionError::Sql(err)) if is_lock_timeout(&err) => {
                // Not taken, and the error rolled `lock_timeout` back: the connection
                // is as it was.
                if let Some(conn) = in_flight.conn.take() {
                    locks.put_back(conn).await;
                }
                return Ok(None);
            }
            Err(SessionError::TtlRefused(why)) => {
                // Nothing was run on the connection: it goes back where it came from.
                if let Some(conn) = in_flight.conn.take() {
                    locks.put_back(conn).await;
                }
                return Err(SessionError::TtlRefused(why));
            }
            Err(err) => return Err(err),
        };
        let (token, locked_on): (i64, i32) = (row.try_get(0)?, row.try_get(1)?);
        let session = in_flight.session.expect("known before the lock statement");
        if i64::from(locked_on) != session.id {
            // Dropping `in_flight` ends the session that holds the lock.
            return Err(SessionError::PoolingProxy);
        }
        let token = u64::try_from(token).unwrap_or(0);
        // Out of the pool for as long as the lock is held.
        let conn = in_flight.conn.take().expect("settled here").detach();
        Ok(Some(locks.grant(req, key, token, session, conn, returned)))
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

    /// A session of a connection from `pool`.
    async fn session_of(&self, pool: &PgPool) -> Result<ServerSession, sqlx::Error> {
        identify(&mut *pool.acquire().await?, self).await
    }

    /// The locks among `held` whose server session `pg_stat_activity` still lists,
    /// with the same `backend_start` (a pid may be reused): a session holds its
    /// advisory locks until it ends or we unlock them.
    async fn alive(&self, pool: &PgPool, held: &[HeldBy]) -> Result<Vec<HeldBy>, sqlx::Error> {
        let pids: Vec<i32> = held
            .iter()
            .filter_map(|(_, session)| i32::try_from(session.id).ok())
            .collect();
        let listed: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT pid, COALESCE((extract(epoch FROM backend_start) * 1000000)::bigint, 0) \
             FROM pg_stat_activity WHERE pid = ANY($1)",
        )
        .bind(pids)
        .fetch_all(pool)
        .await?;
        Ok(held
            .iter()
            .filter(|(_, session)| {
                listed.iter().any(|(pid, started)| {
                    i64::from(*pid) == session.id
                        && (session.started == 0 || *started == session.started)
                })
            })
            .cloned()
            .collect())
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

#[cfg(test)]
mod tests {
    use fencelock_conformance::harness::{Postgres, Server};
    use sqlx::postgres::PgQueryResult;

    use super::*;
    use crate::postgres::PostgresBackend;

    /// How many times this connection's server session holds the advisory lock of
    /// `key`: unlocks it until it is not held (at most 100 times).
    async fn holds(conn: &mut PgConnection, key: &str) -> u32 {
        let mut count = 0;
        while count < 100 {
            let freed: bool =
                sqlx::query_scalar("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
                    .bind(key)
                    .fetch_one(&mut *conn)
                    .await
                    .unwrap();
            if !freed {
                break;
            }
            count += 1;
        }
        count
    }

    /// The token and pid of a lock statement's row, if it took the lock.
    fn token(row: Option<PgRow>) -> Option<(i64, i32)> {
        row.map(|row| (row.get(0), row.get(1)))
    }

    /// Runs the lock statement of `key` for owner `a`: trying when `wait` is `None`,
    /// else waiting that long (as `lock_timeout` text).
    async fn lock(
        conn: &mut PgConnection,
        queries: &SessionQueries,
        key: &str,
        wait: Option<&str>,
    ) -> sqlx::Result<Option<PgRow>> {
        let query = match wait {
            None => sqlx::query(&queries.try_lock).bind(key).bind("a"),
            Some(wait) => sqlx::query(&queries.lock).bind(key).bind("a").bind(wait),
        };
        query.fetch_optional(conn).await
    }

    async fn lock_timeout(conn: &mut PgConnection) -> String {
        sqlx::query_scalar("SHOW lock_timeout")
            .fetch_one(conn)
            .await
            .unwrap()
    }

    /// Both lock statements take the advisory lock exactly once (a CTE run twice, or
    /// a bump without its lock, would show), bump the counter by one, and report the
    /// session; the waiting one leaves no `lock_timeout` behind, also when it times
    /// out. Counted on reentrant holds, which advisory locks stack.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lock_statements_take_the_lock_once_and_bump_the_counter_once() {
        let server = Postgres::start().await.expect("start postgres");
        let backend = PostgresBackend::open(&server.url()).await.unwrap();
        backend.migrate().await.unwrap();
        let queries = SessionQueries::new(backend.table());
        let mut conn = backend.pool().acquire().await.unwrap().detach();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        let tried = lock(&mut conn, &queries, "k", None).await.unwrap();
        let (first, on) = token(tried).unwrap();
        assert_eq!(on, pid);
        assert_eq!(holds(&mut conn, "k").await, 1);
        let waited = lock(&mut conn, &queries, "k", Some("1000ms"))
            .await
            .unwrap();
        assert_eq!(token(waited), Some((first + 1, pid)));
        assert_eq!(holds(&mut conn, "k").await, 1);
        assert_eq!(lock_timeout(&mut conn).await, "0");
        // Held by another session: the try takes nothing, the wait times out.
        let mut other = backend.pool().acquire().await.unwrap().detach();
        let _: PgQueryResult = sqlx::query("SELECT pg_advisory_lock(hashtextextended('k', 0))")
            .execute(&mut other)
            .await
            .unwrap();
        let tried = lock(&mut conn, &queries, "k", None).await.unwrap();
        assert!(tried.is_none());
        let waited = lock(&mut conn, &queries, "k", Some("50ms")).await;
        assert!(waited.as_ref().is_err_and(is_lock_timeout), "{waited:?}");
        assert_eq!(lock_timeout(&mut conn).await, "0");
        assert_eq!(holds(&mut conn, "k").await, 0);
        let row: i64 = sqlx::query_scalar(&format!(
            r#"SELECT token FROM "{}" WHERE name = 'k'"#,
            backend.table()
        ))
        .fetch_one(&mut other)
        .await
        .unwrap();
        assert_eq!(row, first + 1, "bumped once per grant, never without one");
    }
}
