//! Session mode on MySQL/MariaDB: a lock is a named server lock (`GET_LOCK`) on a
//! connection taken out of the pool for as long as it is held.
//!
//! `GET_LOCK` names are server-wide and at most 64 characters, so each is
//! `fencelock:` + 54 hex digits of the SHA-256 of database, table and key. The
//! fencing counter is the lease table's row for the name, bumped while holding, in
//! the same statement that takes the lock: an `INSERT .. SELECT` whose one row exists
//! only if `GET_LOCK` (in its WHERE, run once) granted the lock in the server session
//! we know the connection by. Its rows affected say whether the lock was taken, its
//! LAST_INSERT_ID the token. A release is one statement too: an UPDATE that clears the
//! owner and, only for our own row, calls `RELEASE_LOCK`; the row stays locked until
//! it commits, so the next holder's bump reads the cleared row.
//!
//! Waiters queue on the server: `GET_LOCK(name, seconds)` with the wait's deadline as
//! its timeout. A waiter dropped while its statement runs must not leave its server
//! session in the queue (it would take the lock after the next release with nobody to
//! use it), nor keep a lock its bump had not reported yet: its connection is closed
//! and its server session killed by `CONNECTION_ID()` (never reused by the server),
//! which frees whatever it took.
//!
//! A lock released cleanly leaves its connection, with its `CONNECTION_ID()`, on the
//! backend's idle list for the next session acquire (see [`crate::session_table`]); a
//! reused connection that has died meanwhile is closed and the attempt starts over on
//! a fresh pool connection. Statements per lock: the acquire is one on a kept
//! connection (two on a fresh one, which first reads its `CONNECTION_ID()`; one more
//! when the lock is not taken, to tell a busy lock from a moved session), the release
//! one.
//!
//! A held lock ends when its connection does (the server frees the named locks of a
//! session that ends), and also when its TTL passes without a renewal: the backend
//! then closes the connection itself, so the TTL contract holds for clients that are
//! alive but stopped renewing. The server never expires the lock by itself, so the
//! TTL (and the lease's validity) runs from when the lock statement returned. The
//! statement that learns a fresh connection's `CONNECTION_ID()` also reads its
//! `wait_timeout`, which bounds the TTLs accepted and the validity promised (see
//! [`crate::session_table`]); once a second `IS_USED_LOCK` tells whether the
//! sessions of held locks still hold them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fencelock_core::{
    AcquireRequest, FencingToken, Lease, LockState, OwnerId, Result, WaitDeadline,
};
use sqlx::mysql::{MySql, MySqlArguments, MySqlConnection, MySqlPool, MySqlQueryResult};
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
    lock: String,
    probe: String,
    release: String,
    unlock: String,
    holder_session: String,
    clear_owner: String,
    /// `IS_USED_LOCK` of the key in column `held.k`.
    held_by: String,
    pub(crate) holder: String,
}

impl SessionQueries {
    pub(crate) fn new(table: &str) -> Self {
        let lock_of = |key: &str| {
            format!(
                "CONCAT('fencelock:', LEFT(SHA2(CONCAT(DATABASE(), '/', '{table}', '/', {key}), 256), 54))"
            )
        };
        let lock = lock_of("?");
        let now =
            "CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) AS SIGNED)";
        Self {
            // ? key, ? owner, ? server session, ? key, ? seconds to wait (0: none).
            // Takes the lock and bumps the counter: one row affected (inserted) or two
            // (updated) if we got the lock, none if it was still held when the time
            // ran out, or if the statement ran in a server session other than the
            // one we know the connection by (checked first: then `GET_LOCK` does not
            // run). `GET_LOCK` runs once, in the WHERE of a SELECT without tables,
            // so the row to insert exists only once the lock is ours (a derived table
            // would be merged into the outer query and run it twice). The next token
            // comes back through LAST_INSERT_ID (a new row seeds it from the clock
            // in µs); ON DUPLICATE KEY UPDATE locks and reads the newest row, waiting
            // for a release that has not committed yet. `expires_at = 0`: lease-mode
            // clients see the row as free, so one table must not be shared between
            // the two modes.
            lock: format!(
                "INSERT INTO `{table}` (name, owner, token, expires_at)
SELECT ?, ?, LAST_INSERT_ID({now}), 0 FROM DUAL
WHERE CONNECTION_ID() = ? AND GET_LOCK({lock}, ?) = 1
ON DUPLICATE KEY UPDATE token = LAST_INSERT_ID(token + 1), owner = VALUES(owner), expires_at = 0"
            ),
            // ? key. 1 iff this very server session holds the lock.
            probe: format!("SELECT COALESCE(IS_USED_LOCK({lock}) = CONNECTION_ID(), 0)"),
            // ? key, ? owner, ? token, ? key. Clears the owner and frees the lock in
            // one statement: one row affected iff the row was ours and so was the
            // lock (`RELEASE_LOCK` runs once, and only if the row matched). The row
            // stays locked until the statement commits, so the next holder's token
            // bump reads the cleared row, and `release_elsewhere` (a locking read)
            // never sees the row name us while another session holds the lock.
            release: format!(
                "UPDATE `{table}` SET owner = NULL
WHERE name = ? AND owner = ? AND token = ? AND RELEASE_LOCK({lock}) = 1"
            ),
            // ? key. 1 if we held the lock and freed it.
            unlock: format!("SELECT COALESCE(RELEASE_LOCK({lock}), 0)"),
            // ? key, ? key, ? owner, ? token, ? key. The server session that holds
            // this very grant, per the lease table; the row stays locked until the
            // transaction ends.
            holder_session: format!(
                "SELECT CAST(IS_USED_LOCK({lock}) AS SIGNED) FROM `{table}`
WHERE name = ? AND owner = ? AND token = ? AND IS_USED_LOCK({lock}) IS NOT NULL
FOR UPDATE"
            ),
            // ? key, ? owner, ? token.
            clear_owner: format!(
                "UPDATE `{table}` SET owner = NULL WHERE name = ? AND owner = ? AND token = ?"
            ),
            held_by: format!("IS_USED_LOCK({})", lock_of("held.k")),
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

    const IDLE_SETTING: &'static str = "wait_timeout";

    fn raise_idle_limit(needed: Duration) -> String {
        let seconds = needed.as_secs() + 1;
        format!(
            "raise wait_timeout above {needed:?} for this user's sessions (SET GLOBAL \
             wait_timeout = {seconds} or more, or wait_timeout in the server's \
             configuration; sqlx connects as a non-interactive client, so \
             interactive_timeout does not apply)"
        )
    }

    /// Whether this very server session holds the named lock (the session id is
    /// checked by the server: `IS_USED_LOCK(..) = CONNECTION_ID()`).
    async fn probe(&self, conn: &mut MySqlConnection, key: &str, _session: ServerSession) -> bool {
        let ours = sqlx::query_scalar::<_, i64>(&self.probe)
            .bind(key.as_bytes())
            .fetch_one(conn)
            .await;
        ours.is_ok_and(|ours| ours == 1)
    }

    /// Clears the row and frees the lock in one statement; if the row was not ours
    /// any more (cleared by someone else), frees the lock all the same.
    async fn unlock(&self, conn: &mut MySqlConnection, key: &str, owner: &str, token: u64) -> bool {
        let released = sqlx::query(&self.release)
            .bind(key.as_bytes())
            .bind(owner)
            .bind(i64::try_from(token).unwrap_or(i64::MAX))
            .bind(key.as_bytes())
            .execute(&mut *conn)
            .await;
        match released {
            Ok(done) if done.rows_affected() == 1 => true,
            Ok(_) => sqlx::query_scalar::<_, i64>(&self.unlock)
                .bind(key.as_bytes())
                .fetch_one(conn)
                .await
                .is_ok_and(|freed| freed == 1),
            Err(_) => false,
        }
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

/// The server session of `conn` and its idle limit: one statement. sqlx connects as
/// a non-interactive client, so `wait_timeout` ends its idle sessions
/// (`interactive_timeout` does not apply).
async fn identify(conn: &mut MySqlConnection) -> Result<ServerSession, sqlx::Error> {
    let row = sqlx::query("SELECT CONNECTION_ID(), @@SESSION.wait_timeout")
        .fetch_one(conn)
        .await?;
    let (id, idle): (u64, u64) = (row.try_get(0)?, row.try_get(1)?);
    Ok(ServerSession {
        id: i64::try_from(id).unwrap_or(i64::MAX),
        started: 0,
        idle_limit: (idle > 0).then(|| Duration::from_secs(idle)),
    })
}

/// The longest `GET_LOCK` wait, a year: MariaDB refuses a negative (endless) one.
const FOREVER_SECONDS: f64 = 31_536_000.0;

/// A lock attempt whose outcome its caller has not seen yet. Dropped unsettled (the
/// acquire was cancelled, or the lock statement failed), it closes the connection and
/// kills its server session, which frees whatever it took and takes it out of the
/// server's queue.
struct InFlight {
    conn: Option<SessionConn<MySql>>,
    pool: MySqlPool,
    /// The connection's server session, once known (always before the lock
    /// statement runs).
    session: Option<ServerSession>,
}

impl InFlight {
    /// An attempt on `conn`, whose server session is known if it was kept.
    fn new(conn: SessionConn<MySql>, pool: &MySqlPool) -> Self {
        Self {
            session: conn.known_session(),
            conn: Some(conn),
            pool: pool.clone(),
        }
    }

    fn conn(&mut self) -> &mut MySqlConnection {
        self.conn.as_deref_mut().expect("taken only when settled")
    }

    /// Learns the connection's server session, if it is not known yet (a connection
    /// fresh from the pool): one statement.
    async fn identify(&mut self) -> Result<ServerSession, sqlx::Error> {
        if let Some(session) = self.session {
            return Ok(session);
        }
        let session = identify(self.conn()).await?;
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
        ttl: Duration,
        statement: impl Fn(ServerSession) -> Query<'q, MySql, MySqlArguments> + Send + Sync,
    ) -> Result<MySqlQueryResult, SessionError> {
        let session = self.identify().await?;
        session
            .check_ttl::<SessionQueries>(ttl)
            .map_err(SessionError::TtlRefused)?;
        let reused = self.conn.as_ref().is_some_and(SessionConn::is_reused);
        let done = match statement(session).execute(self.conn()).await {
            Err(err) if reused && connection_lost(&err) => {
                tracing::debug!(store = STORE, %err, "an idle session connection failed");
                if let Some(conn) = self.conn.take() {
                    let _ = conn.detach().close().await;
                }
                self.session = None;
                self.conn = Some(SessionConn::Pooled(self.pool.acquire().await?));
                let session = self.identify().await?;
                session
                    .check_ttl::<SessionQueries>(ttl)
                    .map_err(SessionError::TtlRefused)?;
                statement(session).execute(self.conn()).await
            }
            done => done,
        };
        Ok(done?)
    }
}

/// Whether `err` says the connection is gone: it failed, or the server ended its
/// session (killed, shutting down, or idle too long).
fn connection_lost(err: &sqlx::Error) -> bool {
    /// `ER_SERVER_SHUTDOWN`, `ER_CONNECTION_KILLED`, `ER_CLIENT_INTERACTION_TIMEOUT`.
    const GONE: [u16; 3] = [1053, 1927, 4031];
    match err {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        _ => super::error_number(err).is_some_and(|number| GONE.contains(&number)),
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
        let Some(id) = self
            .session
            .and_then(|session| u64::try_from(session.id).ok())
        else {
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
        let conn = locks.connection(pool).await?;
        let mut in_flight = InFlight::new(conn, pool);
        let seconds = wait_seconds(deadline);
        let lock = |session: ServerSession| {
            let query = sqlx::query(&self.lock).bind(key.as_bytes());
            let query = query.bind(req.owner.as_str()).bind(session.id);
            query.bind(key.as_bytes()).bind(seconds)
        };
        let done = match in_flight.lock(req.ttl, lock).await {
            Err(SessionError::TtlRefused(why)) => {
                // Nothing was run on the connection: it goes back where it came from.
                if let Some(conn) = in_flight.conn.take() {
                    locks.put_back(conn).await;
                }
                return Err(SessionError::TtlRefused(why));
            }
            done => done?,
        };
        // The server holds the lock until we end the session, which the TTL below
        // does: its time runs from here, after any wait.
        let returned = Instant::now();
        let session = in_flight.session.expect("known before the lock statement");
        if done.rows_affected() == 0 {
            // Not taken; and if the statement ran in another server session, nothing
            // was tried at all.
            let id = sqlx::query_scalar::<_, u64>("SELECT CONNECTION_ID()")
                .fetch_one(in_flight.conn())
                .await;
            let Some(conn) = in_flight.conn.take() else {
                return Ok(None);
            };
            match id {
                Ok(id) if i64::try_from(id).ok() == Some(session.id) => {
                    locks.put_back(conn).await;
                }
                Ok(_) => {
                    let _ = conn.detach().close().await;
                    return Err(SessionError::PoolingProxy);
                }
                // Say, the session was killed while it waited.
                Err(_) => {
                    let _ = conn.detach().close().await;
                }
            }
            return Ok(None);
        }
        let token = done.last_insert_id();
        // Out of the pool for as long as the lock is held.
        let conn = in_flight.conn.take().expect("settled here").detach();
        Ok(Some(locks.grant(req, key, token, session, conn, returned)))
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
        // The row stays locked from the read to the commit: the holder cannot
        // release meanwhile (its release waits for the row), so the session killed is
        // the one that holds this grant, not a later holder.
        let mut tx = pool.begin().await?;
        let session: Option<i64> = sqlx::query_scalar(&self.holder_session)
            .bind(key.as_bytes())
            .bind(key.as_bytes())
            .bind(lease.owner().as_str())
            .bind(token)
            .bind(key.as_bytes())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(session) = session else {
            return Ok(false);
        };
        sqlx::query(&format!("KILL {session}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&self.clear_owner)
            .bind(key.as_bytes())
            .bind(lease.owner().as_str())
            .bind(token)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// A session of a connection from `pool`.
    async fn session_of(&self, pool: &MySqlPool) -> Result<ServerSession, sqlx::Error> {
        identify(&mut *pool.acquire().await?).await
    }

    /// The locks among `held` that their server session still holds, per
    /// `IS_USED_LOCK` (connection ids start again from 1 when the server restarts, so
    /// the id alone is not enough), 1,000 per statement.
    async fn alive(&self, pool: &MySqlPool, held: &[HeldBy]) -> Result<Vec<HeldBy>, sqlx::Error> {
        let mut alive = Vec::new();
        let mut conn = pool.acquire().await?;
        for chunk in held.chunks(1000) {
            let keys = " UNION ALL SELECT ?".repeat(chunk.len() - 1);
            let sql = format!(
                "SELECT held.k, CAST(COALESCE({}, 0) AS SIGNED) FROM (SELECT ? AS k{keys}) AS held",
                self.held_by
            );
            let mut query = sqlx::query_as::<_, (Vec<u8>, i64)>(&sql);
            for (key, _) in chunk {
                query = query.bind(key.as_bytes());
            }
            let holders: HashMap<Vec<u8>, i64> = query
                .persistent(false)
                .fetch_all(&mut *conn)
                .await?
                .into_iter()
                .collect();
            alive.extend(
                chunk
                    .iter()
                    .filter(|(key, session)| holders.get(key.as_bytes()) == Some(&session.id))
                    .cloned(),
            );
        }
        Ok(alive)
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

#[cfg(test)]
mod tests {
    use fencelock_conformance::harness::{MariaDb, Server};

    use super::*;
    use crate::mysql::MySqlBackend;

    /// How many times this connection's server session holds the named lock of `key`:
    /// frees it until it is not held (at most 100 times).
    async fn holds(conn: &mut MySqlConnection, queries: &SessionQueries, key: &str) -> u32 {
        let mut count = 0;
        while count < 100 {
            let freed: i64 = sqlx::query_scalar(&queries.unlock)
                .bind(key.as_bytes())
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            if freed != 1 {
                break;
            }
            count += 1;
        }
        count
    }

    /// Runs the lock statement (no wait) as server session `id`: rows affected and
    /// the token.
    async fn lock(
        conn: &mut MySqlConnection,
        queries: &SessionQueries,
        key: &str,
        owner: &str,
        id: u64,
    ) -> (u64, u64) {
        let done = sqlx::query(&queries.lock)
            .bind(key.as_bytes())
            .bind(owner)
            .bind(id)
            .bind(key.as_bytes())
            .bind(0.0_f64)
            .execute(conn)
            .await
            .unwrap();
        (done.rows_affected(), done.last_insert_id())
    }

    async fn release(
        conn: &mut MySqlConnection,
        queries: &SessionQueries,
        key: &str,
        owner: &str,
        token: u64,
    ) -> u64 {
        sqlx::query(&queries.release)
            .bind(key.as_bytes())
            .bind(owner)
            .bind(i64::try_from(token).unwrap())
            .bind(key.as_bytes())
            .execute(conn)
            .await
            .unwrap()
            .rows_affected()
    }

    /// `GET_LOCK` runs exactly once per lock statement (a merged derived table would
    /// run it twice), and not at all in a server session other than the one named;
    /// `RELEASE_LOCK` runs exactly once per release statement, and not at all when
    /// the row is not ours. Counted on reentrant holds, which `GET_LOCK` stacks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn get_lock_and_release_lock_run_exactly_once_per_statement_and_only_when_they_should() {
        let server = MariaDb::start().await.expect("start mariadbd");
        let backend = MySqlBackend::open(&server.url()).await.unwrap();
        backend.migrate().await.unwrap();
        let queries = SessionQueries::new(backend.table());
        let mut conn = backend.pool().acquire().await.unwrap().detach();
        let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        let (rows, first) = lock(&mut conn, &queries, "k", "a", id).await;
        assert_eq!(rows, 1, "inserted");
        assert_eq!(holds(&mut conn, &queries, "k").await, 1);
        let (rows, _) = lock(&mut conn, &queries, "k", "a", id + 1).await;
        assert_eq!(rows, 0, "another session's id: not taken");
        assert_eq!(holds(&mut conn, &queries, "k").await, 0);
        // Two holds; the row names the second grant.
        let (rows, second) = lock(&mut conn, &queries, "k", "a", id).await;
        assert_eq!((rows, second), (2, first + 1), "updated, next token");
        let (_, third) = lock(&mut conn, &queries, "k", "a", id).await;
        assert_eq!(third, second + 1);
        assert_eq!(release(&mut conn, &queries, "k", "b", third).await, 0);
        assert_eq!(release(&mut conn, &queries, "k", "a", second).await, 0);
        assert_eq!(release(&mut conn, &queries, "k", "a", third).await, 1);
        assert_eq!(holds(&mut conn, &queries, "k").await, 1);
    }
}
