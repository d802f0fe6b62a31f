//! Session mode on MySQL/MariaDB: a lock is a named server lock (`GET_LOCK(.., 0)`)
//! on a connection taken out of the pool for as long as it is held.
//!
//! `GET_LOCK` names are server-wide and at most 64 characters, so each is
//! `fencelock:` + 54 hex digits of the SHA-256 of database, table and key. The
//! fencing counter is the lease table's row for the name, bumped while holding.
//! Waiters never queue on the server (a dropped waiter's session would take the lock
//! after the next release): they retry the try-lock with backoff.
//!
//! A held lock ends when its connection does (the server frees the named locks of a
//! session that ends), and also when its TTL passes without a renewal: the backend
//! then closes the connection itself, so the TTL contract holds for clients that are
//! alive but stopped renewing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fencelock_core::{
    AcquireRequest, Error, FencingToken, Lease, LockState, LossReason, OwnerId, Result, valid_until,
};
use sqlx::mysql::{MySql, MySqlConnection, MySqlPool};
use sqlx::pool::PoolConnection;
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
            // ? key. 1 if we got the lock.
            try_lock: format!("SELECT GET_LOCK({lock}, 0)"),
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

/// The session locks this backend holds, by owner id.
#[derive(Debug, Default)]
pub(crate) struct SessionLocks {
    held: Mutex<HashMap<String, Arc<Held>>>,
}

/// One held session lock: its connection and when its TTL ends.
#[derive(Debug)]
struct Held {
    key: String,
    token: u64,
    conn: tokio::sync::Mutex<Option<MySqlConnection>>,
    ends_at: Mutex<Instant>,
    expiry: Mutex<Option<AbortHandle>>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is one assignment or map operation: poisoning leaves nothing
    // half-done.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ends the server session of `conn`, which frees its named locks.
async fn close(conn: Option<MySqlConnection>) {
    if let Some(conn) = conn {
        let _ = conn.close().await;
    }
}

fn lost(lease: &Lease, reason: LossReason) -> Error {
    Error::Lost {
        name: lease.name().clone(),
        store: STORE,
        token: lease.token(),
        reason,
    }
}

/// A try-lock whose outcome its caller has not seen yet. Dropped unsettled, it ends
/// the connection's server session, which frees whatever the statement took.
struct InFlight {
    conn: Option<PoolConnection<MySql>>,
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
        pool: &MySqlPool,
        queries: &SessionQueries,
        req: &AcquireRequest,
        key: &str,
    ) -> Result<Option<Lease>, SessionError> {
        let conn = pool.acquire().await?;
        let mut in_flight = InFlight { conn: Some(conn) };
        let conn = in_flight.conn.as_deref_mut().expect("set above");
        let sent = Instant::now();
        let got: Option<i64> = sqlx::query_scalar(&queries.try_lock)
            .bind(key.as_bytes())
            .fetch_one(&mut *conn)
            .await?;
        if got != Some(1) {
            // Nothing taken: the connection goes back to the pool.
            in_flight.conn.take();
            return Ok(None);
        }
        let token = sqlx::query(&queries.bump)
            .bind(key.as_bytes())
            .bind(req.owner.as_str())
            .execute(&mut *conn)
            .await?
            .last_insert_id();
        let ours: i64 = sqlx::query_scalar(&queries.probe)
            .bind(key.as_bytes())
            .fetch_one(&mut *conn)
            .await?;
        if ours != 1 {
            // Dropping `in_flight` ends the session that holds the lock.
            return Err(SessionError::PoolingProxy);
        }
        let held = Arc::new(Held {
            key: key.to_owned(),
            token,
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
            FencingToken(token),
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
        (held.key == key && held.token == lease.token().0).then(|| Arc::clone(held))
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
            return Err(lost(lease, LossReason::NotOurs));
        };
        let mut conn = held.conn.lock().await;
        let sent = Instant::now();
        let probe = match conn.as_mut() {
            Some(conn) => sqlx::query_scalar::<_, i64>(&queries.probe)
                .bind(key.as_bytes())
                .fetch_one(conn)
                .await
                .ok(),
            None => None,
        };
        if probe != Some(1) {
            // The connection died, or the lock is not this session's any more.
            self.forget(lease.owner().as_str(), &held);
            close(conn.take()).await;
            return Err(lost(lease, LossReason::SessionEnded));
        }
        *locked(&held.ends_at) = sent + ttl;
        Ok(lease.clone().renewed(valid_until(sent, ttl)))
    }

    /// Unlocks and closes the lock's connection; `Lost` if the lock was not held any
    /// more. `None` if this backend does not hold the lease.
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
            Some(c) => unlock(c, queries, lease, key, held.token).await.ok(),
            None => None,
        };
        close(conn.take()).await;
        Some(if unlocked == Some(1) {
            Ok(())
        } else {
            Err(lost(lease, LossReason::SessionEnded))
        })
    }

    /// Releases a grant that another client holds (the contract lets anyone with the
    /// lease release it): kills the server session that holds it, if the lease table
    /// says that session holds this very grant.
    pub(crate) async fn release_elsewhere(
        pool: &MySqlPool,
        queries: &SessionQueries,
        lease: &Lease,
        key: &str,
    ) -> Result<bool, sqlx::Error> {
        let Ok(token) = i64::try_from(lease.token().0) else {
            return Ok(false);
        };
        let mut conn = pool.acquire().await?;
        let session: Option<i64> = sqlx::query_scalar(&queries.holder_session)
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
        sqlx::query(&queries.clear_owner)
            .bind(key.as_bytes())
            .bind(lease.owner().as_str())
            .bind(token)
            .execute(&mut *conn)
            .await?;
        Ok(true)
    }

    /// The holder of `key` per the lease table, if a session holds its lock now.
    pub(crate) async fn holder(
        pool: &MySqlPool,
        queries: &SessionQueries,
        key: &str,
    ) -> Result<Option<LockState>, sqlx::Error> {
        let row = sqlx::query(&queries.holder)
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
    lease: &Lease,
    key: &str,
    token: u64,
) -> Result<i64, sqlx::Error> {
    sqlx::query(&queries.clear_owner)
        .bind(key.as_bytes())
        .bind(lease.owner().as_str())
        .bind(i64::try_from(token).unwrap_or(i64::MAX))
        .execute(&mut *conn)
        .await?;
    sqlx::query_scalar(&queries.unlock)
        .bind(key.as_bytes())
        .fetch_one(conn)
        .await
}

/// Why a session-mode attempt failed.
#[derive(Debug)]
pub(crate) enum SessionError {
    /// A statement failed.
    Sql(sqlx::Error),
    /// The lock was not held by the server session that took it.
    PoolingProxy,
}

impl From<sqlx::Error> for SessionError {
    fn from(err: sqlx::Error) -> Self {
        Self::Sql(err)
    }
}
