//! Session mode on Postgres: a lock is a session-level advisory lock
//! (`pg_try_advisory_lock(hashtextextended(key, 0))`) on a connection taken out of
//! the pool for as long as it is held.
//!
//! The fencing counter is the lease table's row for the name, bumped while holding.
//! Waiters never queue on the server: a waiter that is dropped would otherwise leave
//! its server session waiting, and that session would take the lock after the next
//! release with nobody to use it. They retry `pg_try_advisory_lock`, woken by the
//! `NOTIFY` of a release and at the latest every `poll_max`.
//!
//! A held lock ends when its connection does (the server frees session locks of a
//! session that ends), and also when its TTL passes without a renewal: the backend
//! then closes the connection itself, so the TTL contract holds for clients that are
//! alive but stopped renewing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fencelock_core::{
    AcquireRequest, Error, FencingToken, Lease, LockState, LossReason, OwnerId, Result, valid_until,
};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool, Postgres};
use sqlx::{Connection, Row};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::STORE;

/// The statements of session mode on one lease table.
#[derive(Debug)]
pub(crate) struct SessionQueries {
    try_lock: String,
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

/// The session locks this backend holds, by owner id.
#[derive(Debug, Default)]
pub(crate) struct SessionLocks {
    held: Mutex<HashMap<String, Arc<Held>>>,
}

/// One held session lock: its connection and when its TTL ends.
#[derive(Debug)]
struct Held {
    key: String,
    token: i64,
    /// The server session (`pg_backend_pid()`) that holds the lock.
    pid: i32,
    conn: tokio::sync::Mutex<Option<PgConnection>>,
    ends_at: Mutex<Instant>,
    expiry: Mutex<Option<AbortHandle>>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is one assignment or map operation: poisoning leaves nothing
    // half-done.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ends the server session of `conn`, which frees its advisory locks.
async fn close(conn: Option<PgConnection>) {
    if let Some(conn) = conn {
        let _ = conn.close().await;
    }
}

fn session_ended(lease: &Lease) -> Error {
    Error::Lost {
        name: lease.name().clone(),
        store: STORE,
        token: lease.token(),
        reason: LossReason::SessionEnded,
    }
}

fn not_ours(lease: &Lease) -> Error {
    Error::Lost {
        name: lease.name().clone(),
        store: STORE,
        token: lease.token(),
        reason: LossReason::NotOurs,
    }
}

/// A try-lock whose outcome its caller has not seen yet. Dropped unsettled, it ends
/// the connection's server session, which frees whatever the statement took.
struct InFlight {
    conn: Option<PoolConnection<Postgres>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Dropping a detached connection closes its socket; the server ends the
            // session when it reads the end of the stream.
            drop(conn.detach());
        }
    }
}

impl SessionLocks {
    /// One attempt: `Some` lease if the lock was free, `None` if held.
    pub(crate) async fn try_grant(
        self: &Arc<Self>,
        pool: &PgPool,
        queries: &SessionQueries,
        req: &AcquireRequest,
        key: &str,
    ) -> Result<Option<Lease>, SessionError> {
        let conn = pool.acquire().await?;
        let mut in_flight = InFlight { conn: Some(conn) };
        let conn = in_flight.conn.as_deref_mut().expect("set above");
        let sent = Instant::now();
        let row = sqlx::query(&queries.try_lock)
            .bind(key)
            .fetch_one(&mut *conn)
            .await?;
        let (got, pid): (bool, i32) = (row.try_get(0)?, row.try_get(1)?);
        if !got {
            // Nothing taken: the connection goes back to the pool.
            in_flight.conn.take();
            return Ok(None);
        }
        let row = sqlx::query(&queries.bump)
            .bind(key)
            .bind(req.owner.as_str())
            .fetch_one(&mut *conn)
            .await?;
        let (token, bumped_on): (i64, i32) = (row.try_get(0)?, row.try_get(1)?);
        if bumped_on != pid {
            // Dropping `in_flight` ends the session that holds the lock.
            return Err(SessionError::PoolingProxy);
        }
        let held = Arc::new(Held {
            key: key.to_owned(),
            token,
            pid,
            // Out of the pool for as long as the lock is held.
            conn: tokio::sync::Mutex::new(in_flight.conn.take().map(PoolConnection::detach)),
            ends_at: Mutex::new(sent + req.ttl),
            expiry: Mutex::new(None),
        });
        let owner = req.owner.as_str().to_owned();
        locked(&self.held).insert(owner.clone(), Arc::clone(&held));
        let expiry = tokio::spawn(Arc::clone(self).expire(owner, Arc::clone(&held)));
        *locked(&held.expiry) = Some(expiry.abort_handle());
        Ok(Some(Lease::new(
            req.name.clone(),
            req.owner.clone(),
            FencingToken(u64::try_from(token).unwrap_or(0)),
            valid_until(sent, req.ttl),
        )))
    }

    /// Ends `held` once its TTL passes without a renewal. Runs until then or until
    /// the lock is released (which aborts it).
    async fn expire(self: Arc<Self>, owner: String, held: Arc<Held>) {
        loop {
            let ends_at = *locked(&held.ends_at);
            tokio::time::sleep_until(ends_at).await;
            if *locked(&held.ends_at) <= Instant::now() {
                break;
            }
        }
        self.forget(&owner, &held);
        close(held.conn.lock().await.take()).await;
        tracing::debug!(
            key = held.key,
            store = STORE,
            "session lock ran out its TTL"
        );
    }

    /// Removes `held` from the table if it is still the entry of `owner`.
    fn forget(&self, owner: &str, held: &Arc<Held>) {
        let mut table = locked(&self.held);
        if table
            .get(owner)
            .is_some_and(|entry| Arc::ptr_eq(entry, held))
        {
            table.remove(owner);
        }
    }

    /// The entry of `lease`, if this backend still holds exactly that grant.
    fn entry(&self, lease: &Lease, key: &str) -> Option<Arc<Held>> {
        let table = locked(&self.held);
        let held = table.get(lease.owner().as_str())?;
        let same = held.key == key && u64::try_from(held.token).ok() == Some(lease.token().0);
        same.then(|| Arc::clone(held))
    }

    /// Probes the lock's connection and extends its TTL.
    pub(crate) async fn renew(
        &self,
        queries: &SessionQueries,
        lease: &Lease,
        key: &str,
        ttl: Duration,
    ) -> Result<Lease> {
        let Some(held) = self.entry(lease, key) else {
            return Err(not_ours(lease));
        };
        let mut conn = held.conn.lock().await;
        let sent = Instant::now();
        let probe = match conn.as_mut() {
            Some(conn) => sqlx::query_scalar::<_, i32>(&queries.probe)
                .fetch_one(conn)
                .await
                .ok(),
            None => None,
        };
        if probe != Some(held.pid) {
            // The connection died, or a proxy moved it to another server session:
            // either way the session that held the lock is gone.
            self.forget(lease.owner().as_str(), &held);
            close(conn.take()).await;
            return Err(session_ended(lease));
        }
        *locked(&held.ends_at) = sent + ttl;
        Ok(lease.clone().renewed(valid_until(sent, ttl)))
    }

    /// Unlocks and closes the lock's connection; `Lost` if the lock was not held any
    /// more. `Ok(None)` if this backend does not hold the lease.
    pub(crate) async fn release(
        &self,
        queries: &SessionQueries,
        lease: &Lease,
        key: &str,
    ) -> Option<Result<()>> {
        let held = self.entry(lease, key)?;
        self.forget(lease.owner().as_str(), &held);
        if let Some(expiry) = locked(&held.expiry).take() {
            expiry.abort();
        }
        let mut conn = held.conn.lock().await;
        let unlocked = match conn.as_mut() {
            Some(c) => sqlx::query_scalar::<_, bool>(&queries.release)
                .bind(key)
                .bind(lease.owner().as_str())
                .bind(held.token)
                .fetch_one(c)
                .await
                .ok(),
            None => None,
        };
        close(conn.take()).await;
        Some(if unlocked == Some(true) {
            Ok(())
        } else {
            Err(session_ended(lease))
        })
    }

    /// Releases a grant that another client holds (the contract lets anyone with the
    /// lease release it): ends the server session that holds it, if the lease table
    /// says that session holds this very grant.
    pub(crate) async fn release_elsewhere(
        pool: &PgPool,
        queries: &SessionQueries,
        lease: &Lease,
        key: &str,
    ) -> Result<bool, sqlx::Error> {
        let Ok(token) = i64::try_from(lease.token().0) else {
            return Ok(false);
        };
        let ended = sqlx::query(&queries.release_elsewhere)
            .bind(key)
            .bind(lease.owner().as_str())
            .bind(token)
            .fetch_optional(pool)
            .await?;
        Ok(ended.is_some())
    }

    /// The holder of `key` per the lease table, if a session holds its lock now.
    pub(crate) async fn holder(
        pool: &PgPool,
        queries: &SessionQueries,
        key: &str,
    ) -> Result<Option<LockState>, sqlx::Error> {
        let row = sqlx::query(&queries.holder)
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

/// Why a session-mode attempt failed.
#[derive(Debug)]
pub(crate) enum SessionError {
    /// A statement failed.
    Sql(sqlx::Error),
    /// The statements of one connection ran in different server sessions.
    PoolingProxy,
}

impl From<sqlx::Error> for SessionError {
    fn from(err: sqlx::Error) -> Self {
        Self::Sql(err)
    }
}
