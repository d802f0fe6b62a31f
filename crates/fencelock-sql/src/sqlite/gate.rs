//! The SQL fence gate: token checks that commit together with the write they guard.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

#[cfg(doc)]
use fencelock_core::Error;
use fencelock_core::{FenceGate, FencingToken, Result, async_trait};
use futures_util::future::BoxFuture;
use sqlx::sqlite::{Sqlite, SqlitePool};
use sqlx::{Executor, Row};

use super::queries::FenceQueries;
use super::{STORE, is_temporary, open_pool};
use crate::SqliteConfig;
use crate::config::check_table_name;
use crate::fence::{Fence, FenceSql};

/// A [`FenceGate`] kept in a SQLite table (`resource TEXT PRIMARY KEY, token
/// INTEGER`), so the token check can run **inside the transaction that writes the
/// resource**: the check and the write commit together or not at all.
///
/// Put the gate's table in the database that holds the resource (see
/// [`with_pool`](Self::with_pool)); the lock file itself may be another one.
///
/// # Example
/// ```no_run
/// use fencelock_core::FencingToken;
/// use fencelock_sql::SqliteFenceGate;
///
/// async fn pay_invoice(
///     gate: &SqliteFenceGate,
///     token: FencingToken, // from the lock guard: `guard.token()`
/// ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
///     let mut tx = gate.pool().begin().await?;
///     // Refused (Error::StaleToken) if a later holder already wrote: `?` drops the
///     // transaction, which rolls it back.
///     gate.admit_in(&mut *tx, "invoice/7", token).await?;
///     sqlx::query("UPDATE invoices SET paid = 1 WHERE id = 7")
///         .execute(&mut *tx)
///         .await?;
///     tx.commit().await?;
///     Ok(())
/// }
/// ```
///
/// Call [`admit_in`](Self::admit_in) first in the transaction: it writes, so the
/// transaction takes SQLite's write lock at once rather than upgrading from a read
/// later (which SQLite may refuse with a busy error).
#[derive(Clone)]
pub struct SqliteFenceGate {
    inner: Arc<Inner>,
}

struct Inner {
    fence: Fence<FenceQueries>,
    path: PathBuf,
}

impl fmt::Debug for SqliteFenceGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteFenceGate")
            .field("path", &self.inner.path)
            .field("table", &self.inner.fence.table())
            .finish_non_exhaustive()
    }
}

impl SqliteFenceGate {
    /// Opens the file of `config` with a pool of its own and uses its
    /// [`fence_table`](SqliteConfig::fence_table), creating it if missing.
    ///
    /// # Errors
    /// As [`SqliteBackend::connect`](crate::SqliteBackend::connect).
    pub async fn connect(config: &SqliteConfig) -> Result<Self> {
        let pool = open_pool(config).await?;
        Self::with_pool(pool, &config.fence_table).await
    }

    /// [`connect`](Self::connect) with every option at its default.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn open(path: impl Into<PathBuf>) -> Result<Self> {
        Self::connect(&SqliteConfig::new(path)).await
    }

    /// A gate in `table` of the database behind `pool` (typically the application's
    /// own database, next to the resource), creating the table if missing.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad table name; [`Error::Backend`] if the table cannot
    /// be created.
    pub async fn with_pool(pool: SqlitePool, table: &str) -> Result<Self> {
        check_table_name("fence_table", table)?;
        let path = pool.connect_options().get_filename().to_owned();
        let place = format!(" in `{}` (table `{table}`)", path.display());
        let gate = Self {
            inner: Arc::new(Inner {
                fence: Fence::new(pool, table, FenceQueries::new(table), place),
                path,
            }),
        };
        gate.migrate().await?;
        Ok(gate)
    }

    /// Creates the gate's table if it does not exist. Idempotent.
    ///
    /// # Errors
    /// [`Error::Backend`] naming the file and table.
    pub async fn migrate(&self) -> Result<()> {
        self.inner.fence.migrate().await
    }

    /// Admits `token` for `resource` through `executor`, which may be the connection
    /// of the caller's open transaction (`&mut *tx`), so that the check commits or
    /// rolls back with the caller's write.
    ///
    /// One statement: it stores the higher of the stored token and `token`, and admits
    /// iff that is `token` (a token equal to the highest is admitted, so one holder may
    /// write many times).
    ///
    /// # Errors
    /// [`Error::StaleToken`] with the highest admitted token if `token` is lower (roll
    /// the transaction back: dropping it does); [`Error::Config`] for a token above
    /// `i64::MAX`, which no fencelock store mints; [`Error::Backend`] if the statement
    /// fails.
    pub async fn admit_in<'c, E>(
        &self,
        executor: E,
        resource: &str,
        token: FencingToken,
    ) -> Result<()>
    where
        E: Executor<'c, Database = Sqlite>,
    {
        self.inner.fence.admit_in(executor, resource, token).await
    }

    /// The highest token admitted for `resource`, if any.
    ///
    /// # Errors
    /// [`Error::Backend`] if the read fails.
    pub async fn highest(&self, resource: &str) -> Result<Option<FencingToken>> {
        self.inner.fence.highest(resource).await
    }

    /// The pool the gate uses on its own (for [`FenceGate::admit`]); begin the
    /// transactions that call [`admit_in`](Self::admit_in) on it.
    pub fn pool(&self) -> &SqlitePool {
        self.inner.fence.pool()
    }

    /// The gate's table.
    pub fn table(&self) -> &str {
        self.inner.fence.table()
    }
}

#[async_trait]
impl FenceGate for SqliteFenceGate {
    /// Admits `token` in a statement of its own on the gate's pool; use
    /// [`admit_in`](SqliteFenceGate::admit_in) to tie the check to a write.
    async fn admit(&self, resource: &str, token: FencingToken) -> Result<()> {
        self.admit_in(self.pool(), resource, token).await
    }
}

/// SQLite's gate SQL: the stored token comes back through `RETURNING`.
impl FenceSql for FenceQueries {
    type Db = Sqlite;
    const STORE: &'static str = STORE;
    const TOKEN_TYPE: &'static str = "SQLite's INTEGER";

    fn is_temporary(err: &sqlx::Error) -> bool {
        is_temporary(err)
    }

    async fn create(&self, pool: &SqlitePool) -> Result<(), sqlx::Error> {
        sqlx::query(&self.create_table)
            .execute(pool)
            .await
            .map(drop)
    }

    fn admit<'e, 'c: 'e, E>(
        &'e self,
        executor: E,
        resource: &'e str,
        token: i64,
    ) -> BoxFuture<'e, Result<i64, sqlx::Error>>
    where
        E: 'e + Executor<'c, Database = Sqlite>,
    {
        Box::pin(async move {
            let row = executor
                .fetch_one(sqlx::query(&self.admit).bind(resource).bind(token))
                .await?;
            row.try_get(0)
        })
    }

    async fn highest(&self, pool: &SqlitePool, resource: &str) -> Result<Option<i64>, sqlx::Error> {
        let row = sqlx::query(&self.highest)
            .bind(resource)
            .fetch_optional(pool)
            .await?;
        row.map(|row| row.try_get(0)).transpose()
    }
}
