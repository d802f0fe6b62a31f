//! The lease-mode store, written once for every SQL database: one lease row per lock
//! name, judged by the database's clock. A [`Dialect`] owns the SQL text and the few
//! differences between databases (how the token comes back, how a release reports,
//! which errors are passing); [`LeaseStore`] owns the rest (waiting, batching renewals,
//! cancel-safety, error messages).

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fencelock_core::wake::Wakers;
use fencelock_core::{
    AcquireRequest, Error, FencingToken, Lease, LockName, LockState, LossReason, OwnerId, Result,
    WaitDeadline, WaitKind, valid_until,
};
use sqlx::pool::PoolConnection;
use sqlx::{Database, Pool};
use tokio::time::Instant;

use crate::backoff;
use crate::in_flight::{InFlight, UndoAcquire};

/// What an acquire statement granted.
pub(crate) enum Granted {
    /// The token as read from the returned row (checked to be non-negative).
    #[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
    Stored(Result<i64, sqlx::Error>),
    /// The token as the server reported it.
    #[cfg_attr(not(feature = "mysql"), allow(dead_code))]
    Minted(u64),
}

/// The lease row of a held name, as read.
pub(crate) struct HolderRow {
    /// The holder's owner id.
    pub(crate) owner: String,
    /// The stored token (checked to be non-negative).
    pub(crate) token: Result<i64, sqlx::Error>,
    /// How long the lease has left by the database's clock.
    pub(crate) remaining: Duration,
}

/// What a release statement found.
pub(crate) enum Freed {
    /// The row was not ours (or, where the database cannot tell, ours but expired).
    NotOurs,
    /// Ours and freed; whether it was still live.
    Ours(Result<bool, sqlx::Error>),
}

/// One lease to renew: key, owner, stored token and TTL.
pub(crate) type Renewal<'a> = (String, &'a str, i64, Duration);

/// The `(key, owner, token)` of every row a renewal statement renewed.
pub(crate) type Renewed = HashSet<(String, String, i64)>;

/// A database's SQL for the lease rows and its behavioural differences.
pub(crate) trait Dialect: Send + Sync + 'static {
    /// The database.
    type Db: Database;

    /// The store's name in messages and capabilities.
    const STORE: &'static str;

    /// How a waiter learns of a release in lease mode.
    const WAIT: WaitKind;

    /// Leases per renewal statement.
    const RENEW_BATCH: usize;

    /// How many times one acquire attempt is re-run after the database rolled it back
    /// to break a lock conflict (see [`is_lock_conflict`](Self::is_lock_conflict)).
    const LOCK_CONFLICT_RETRIES: u32 = 0;

    /// Whether retrying may succeed.
    fn is_temporary(err: &sqlx::Error) -> bool;

    /// Whether the database rolled the statement back to break a lock conflict: it did
    /// nothing (so a failed acquire needs no undo), and running it again is the cure.
    fn is_lock_conflict(_err: &sqlx::Error) -> bool {
        false
    }

    /// Runs the acquire statement for `key` on `conn`: `None` if the row is held.
    fn acquire(
        &self,
        conn: &mut <Self::Db as Database>::Connection,
        key: &str,
        owner: &OwnerId,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<Granted>, sqlx::Error>> + Send;

    /// Reads the row of `key` if it is held.
    fn holder(
        &self,
        pool: &Pool<Self::Db>,
        key: &str,
    ) -> impl Future<Output = Result<Option<HolderRow>, sqlx::Error>> + Send;

    /// Renews the row of `key` on `conn` if `owner` holds it with `token`: how many
    /// rows it renewed.
    fn renew(
        &self,
        conn: &mut <Self::Db as Database>::Connection,
        key: &str,
        owner: &str,
        token: i64,
        ttl: Duration,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;

    /// Renews up to [`RENEW_BATCH`](Self::RENEW_BATCH) leases (never none) on a
    /// connection of `pool`: when the statement was sent and the rows it renewed.
    fn renew_many(
        &self,
        pool: &Pool<Self::Db>,
        leases: &[Renewal<'_>],
    ) -> impl Future<Output = Result<(Instant, Renewed), sqlx::Error>> + Send;

    /// Frees the row of `key` if `owner` holds it with `token`.
    fn release(
        &self,
        pool: &Pool<Self::Db>,
        key: &str,
        owner: &str,
        token: i64,
    ) -> impl Future<Output = Result<Freed, sqlx::Error>> + Send;

    /// Frees the row of `key` if `owner` holds it, on `conn`; whether it freed one.
    fn free_by_owner(
        &self,
        conn: &mut PoolConnection<Self::Db>,
        key: &str,
        owner: &OwnerId,
    ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send;
}

/// Lease-mode locking on one table of one database.
pub(crate) struct LeaseStore<D: Dialect> {
    inner: Arc<Inner<D>>,
}

impl<D: Dialect> Clone for LeaseStore<D> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<D: Dialect> {
    pool: Pool<D::Db>,
    dialect: D,
    wakers: Arc<Wakers>,
    prefix: String,
    poll: (Duration, Duration),
    place: String,
}

/// How a [`LeaseStore`] is set up.
pub(crate) struct Settings {
    /// Prepended to every lock name to make its row's key.
    pub(crate) prefix: String,
    /// The shortest and longest pause between two polls of a waiter.
    pub(crate) poll: (Duration, Duration),
    /// Where the table is, for messages: `"{what}{place}"`, e.g. `" at h:5432/db
    /// (table `t`)"`.
    pub(crate) place: String,
}

impl<D: Dialect> LeaseStore<D> {
    /// A store on `pool`, waking this process's waiters through `wakers`.
    pub(crate) fn new(
        pool: Pool<D::Db>,
        dialect: D,
        wakers: Arc<Wakers>,
        settings: Settings,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                dialect,
                wakers,
                prefix: settings.prefix,
                poll: settings.poll,
                place: settings.place,
            }),
        }
    }

    /// The pool.
    pub(crate) fn pool(&self) -> &Pool<D::Db> {
        &self.inner.pool
    }

    /// The SQL.
    pub(crate) fn dialect(&self) -> &D {
        &self.inner.dialect
    }

    /// Wakes this process's waiters on `key`.
    pub(crate) fn wake(&self, key: &str) {
        self.inner.wakers.wake(key);
    }

    /// The row key of `name`.
    pub(crate) fn key(&self, name: &LockName) -> String {
        format!("{}{}", self.inner.prefix, name)
    }

    /// `what` and where, for an error message.
    pub(crate) fn context(&self, what: impl fmt::Display) -> String {
        format!("{what}{}", self.inner.place)
    }

    /// A [`Error::Backend`] for `what` failing with `err`.
    pub(crate) fn failed(&self, what: impl fmt::Display, err: sqlx::Error) -> Error {
        Error::backend(D::STORE, self.context(what), D::is_temporary(&err), err)
    }

    /// The error for a lease that is not ours (any more).
    pub(crate) fn lost(lease: &Lease) -> Error {
        Error::Lost {
            name: lease.name().clone(),
            store: D::STORE,
            token: lease.token(),
            reason: LossReason::NotOurs,
        }
    }

    fn token(&self, value: Result<i64, sqlx::Error>, name: &LockName) -> Result<FencingToken> {
        let what = || format!("read the token of `{name}`");
        let value = value.map_err(|err| self.failed(what(), err))?;
        u64::try_from(value).map(FencingToken).map_err(|_| {
            Error::backend(
                D::STORE,
                self.context(what()),
                false,
                format!("the stored token {value} is negative; fix or delete the row"),
            )
        })
    }

    /// Takes the lock, waiting as `req.wait` allows.
    pub(crate) async fn acquire(&self, req: &AcquireRequest, key: &str) -> Result<Lease> {
        let deadline = WaitDeadline::start(req.wait);
        if !deadline.may_wait() {
            return self
                .try_grant(req, key)
                .await?
                .ok_or_else(|| deadline.give_up(&req.name, D::STORE));
        }
        let waiter = self.inner.wakers.join(key);
        let (poll_min, poll_max) = self.inner.poll;
        let mut backoff = poll_min;
        loop {
            // Made before the attempt, so a release between the attempt and the sleep
            // still wakes this waiter.
            let woken = waiter.notify().notified();
            if let Some(lease) = self.try_grant(req, key).await? {
                return Ok(lease);
            }
            if deadline.passed() {
                return Err(deadline.give_up(&req.name, D::STORE));
            }
            let Some(holder) = self.holder(key, &req.name).await? else {
                continue; // Freed since the attempt: try again at once.
            };
            let held_for = holder.remaining.unwrap_or(poll_max);
            // Wake just after the holder's lease ends, if that comes first.
            let pause = backoff::pause(backoff, held_for);
            backoff = (backoff * 2).min(poll_max);
            tracing::debug!(
                lock = %req.name,
                store = D::STORE,
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

    /// One attempt to take the lock: `Some` lease if granted, `None` if held.
    async fn try_grant(&self, req: &AcquireRequest, key: &str) -> Result<Option<Lease>> {
        let mut conflicts = 0;
        loop {
            match self.grant_once(req, key).await {
                // A database may pick a new row's insert as a deadlock victim when many
                // clients create it at once; it did nothing, so try again (bounded).
                Err(Attempt::Sql(err))
                    if D::is_lock_conflict(&err) && conflicts < D::LOCK_CONFLICT_RETRIES =>
                {
                    conflicts += 1;
                    tokio::time::sleep(backoff::jittered(Duration::from_millis(2 << conflicts)))
                        .await;
                }
                Err(Attempt::Sql(err)) => {
                    return Err(self.failed(format_args!("acquire `{}`", req.name), err));
                }
                Err(Attempt::Failed(err)) => return Err(err),
                Ok(lease) => return Ok(lease),
            }
        }
    }

    async fn grant_once(&self, req: &AcquireRequest, key: &str) -> Result<Option<Lease>, Attempt> {
        let conn = self.inner.pool.acquire().await?;
        let mut in_flight = InFlight {
            backend: self,
            key,
            owner: &req.owner,
            conn: Some(conn),
        };
        let sent = Instant::now();
        let granted = match self
            .inner
            .dialect
            .acquire(in_flight.connection(), key, &req.owner, req.ttl)
            .await
        {
            Ok(granted) => granted,
            Err(err) if D::is_lock_conflict(&err) => {
                // The database rolled the statement back: it granted nothing, so there
                // is nothing to undo. An undo sent now could also reach the row after
                // the retry's grant (same owner) and clear it.
                in_flight.settle();
                return Err(err.into());
            }
            // Dropping `in_flight` undoes whatever the statement may have granted.
            Err(err) => return Err(err.into()),
        };
        let token = match granted {
            None => {
                in_flight.settle();
                return Ok(None);
            }
            // Read before settling: a grant whose token cannot be read is undone.
            Some(Granted::Stored(value)) => self.token(value, &req.name)?,
            Some(Granted::Minted(token)) => FencingToken(token),
        };
        in_flight.settle();
        Ok(Some(Lease::new(
            req.name.clone(),
            req.owner.clone(),
            token,
            valid_until(sent, req.ttl),
        )))
    }

    /// The holder of `key` (the row of `name`), if it is held.
    pub(crate) async fn holder(&self, key: &str, name: &LockName) -> Result<Option<LockState>> {
        let read = |err| self.failed(format_args!("read the holder of `{name}`"), err);
        let row = self
            .inner
            .dialect
            .holder(&self.inner.pool, key)
            .await
            .map_err(read)?;
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(Some(LockState {
            holder: OwnerId::from_stored(row.owner),
            token: self.token(row.token, name)?,
            remaining: Some(row.remaining),
        }))
    }

    /// Renews `lease` for `ttl` if it is still ours.
    pub(crate) async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let Some(token) = stored_token(lease) else {
            return Err(Self::lost(lease));
        };
        let failed = |err| self.failed(format_args!("renew `{}`", lease.name()), err);
        let mut conn = self.inner.pool.acquire().await.map_err(failed)?;
        let sent = Instant::now();
        let key = self.key(lease.name());
        let renewed = self
            .inner
            .dialect
            .renew(&mut conn, &key, lease.owner().as_str(), token, ttl)
            .await
            .map_err(failed)?;
        if renewed == 0 {
            return Err(Self::lost(lease));
        }
        Ok(lease.clone().renewed(valid_until(sent, ttl)))
    }

    /// Renews every lease, [`RENEW_BATCH`](Dialect::RENEW_BATCH) per statement.
    pub(crate) async fn renew_all(&self, leases: &[(Lease, Duration)]) -> Vec<Result<Lease>> {
        let mut results = Vec::with_capacity(leases.len());
        for batch in leases.chunks(D::RENEW_BATCH) {
            results.extend(self.renew_batch(batch).await);
        }
        results
    }

    async fn renew_batch(&self, batch: &[(Lease, Duration)]) -> Vec<Result<Lease>> {
        // A token that does not fit the token column was never granted here: not ours.
        let storable: Vec<Renewal<'_>> = batch
            .iter()
            .filter_map(|(lease, ttl)| {
                let token = stored_token(lease)?;
                Some((self.key(lease.name()), lease.owner().as_str(), token, *ttl))
            })
            .collect();
        let renewed = if storable.is_empty() {
            Ok((Instant::now(), HashSet::new()))
        } else {
            self.inner
                .dialect
                .renew_many(&self.inner.pool, &storable)
                .await
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
                    D::STORE,
                    self.context(format_args!("renew `{}`", lease.name())),
                    D::is_temporary(err),
                    Arc::clone(err),
                )),
            })
            .collect()
    }

    /// Frees `lease` if it is still ours, waking this process's waiters.
    pub(crate) async fn release(&self, lease: &Lease) -> Result<()> {
        let Some(token) = stored_token(lease) else {
            return Err(Self::lost(lease));
        };
        let key = self.key(lease.name());
        let failed = |err| self.failed(format_args!("release `{}`", lease.name()), err);
        let freed = self
            .inner
            .dialect
            .release(&self.inner.pool, &key, lease.owner().as_str(), token)
            .await
            .map_err(failed)?;
        let Freed::Ours(was_live) = freed else {
            return Err(Self::lost(lease));
        };
        self.wake(&key);
        if !was_live.map_err(failed)? {
            // Ours but expired: freed all the same, and reported as lost.
            return Err(Self::lost(lease));
        }
        Ok(())
    }
}

/// Why one acquire attempt failed.
enum Attempt {
    /// A statement failed (perhaps a lock conflict worth another try).
    Sql(sqlx::Error),
    /// Anything else, with its message made.
    Failed(Error),
}

impl From<sqlx::Error> for Attempt {
    fn from(err: sqlx::Error) -> Self {
        Self::Sql(err)
    }
}

impl From<Error> for Attempt {
    fn from(err: Error) -> Self {
        Self::Failed(err)
    }
}

impl<D: Dialect> UndoAcquire for LeaseStore<D> {
    type Db = D::Db;
    const STORE: &'static str = D::STORE;

    async fn free_by_owner(
        &self,
        conn: &mut PoolConnection<D::Db>,
        key: &str,
        owner: &OwnerId,
    ) -> Result<bool, sqlx::Error> {
        self.inner.dialect.free_by_owner(conn, key, owner).await
    }

    fn wake(&self, key: &str) {
        self.inner.wakers.wake(key);
    }
}

/// The token as stored; `None` if it cannot have come from this store.
pub(crate) fn stored_token(lease: &Lease) -> Option<i64> {
    i64::try_from(lease.token().0).ok()
}
