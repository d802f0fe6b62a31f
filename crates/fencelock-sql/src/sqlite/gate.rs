//! The SQL fence gate: token checks that commit together with the write they guard.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use fencelock_core::{Error, FenceGate, FencingToken, Result, async_trait};
use sqlx::sqlite::{Sqlite, SqlitePool};
use sqlx::{Executor, Row};

use super::queries::FenceQueries;
use super::{db_error, open_pool};
use crate::SqliteConfig;
use crate::config::check_table_name;

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
    pool: SqlitePool,
    table: String,
    path: PathBuf,
    queries: FenceQueries,
}

impl fmt::Debug for SqliteFenceGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteFenceGate")
            .field("path", &self.inner.path)
            .field("table", &self.inner.table)
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
        let gate = Self {
            inner: Arc::new(Inner {
                queries: FenceQueries::new(table),
                table: table.to_owned(),
                path,
                pool,
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
        sqlx::query(&self.inner.queries.create_table)
            .execute(&self.inner.pool)
            .await
            .map_err(|err| db_error(self.context("create the fence table"), err))?;
        Ok(())
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
        let stored = i64::try_from(token.0).map_err(|_| {
            Error::config(format!(
                "token {token} for resource `{resource}` does not fit SQLite's INTEGER \
                 (at most {}); pass the token of a fencelock grant",
                i64::MAX
            ))
        })?;
        let what = || self.context(format_args!("admit token {token} for `{resource}`"));
        let row = executor
            .fetch_one(
                sqlx::query(&self.inner.queries.admit)
                    .bind(resource)
                    .bind(stored),
            )
            .await
            .map_err(|err| db_error(what(), err))?;
        let highest: i64 = row.try_get(0).map_err(|err| db_error(what(), err))?;
        if highest == stored {
            return Ok(());
        }
        Err(Error::StaleToken {
            resource: resource.to_owned(),
            token,
            highest: FencingToken(u64::try_from(highest).unwrap_or(u64::MAX)),
        })
    }

    /// The highest token admitted for `resource`, if any.
    ///
    /// # Errors
    /// [`Error::Backend`] if the read fails.
    pub async fn highest(&self, resource: &str) -> Result<Option<FencingToken>> {
        let what = || self.context(format_args!("read the highest token of `{resource}`"));
        let row = sqlx::query(&self.inner.queries.highest)
            .bind(resource)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(|err| db_error(what(), err))?;
        row.map(|row| {
            let token: i64 = row.try_get(0).map_err(|err| db_error(what(), err))?;
            Ok(FencingToken(u64::try_from(token).unwrap_or(0)))
        })
        .transpose()
    }

    /// The pool the gate uses on its own (for [`FenceGate::admit`]); begin the
    /// transactions that call [`admit_in`](Self::admit_in) on it.
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }

    /// The gate's table.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    fn context(&self, what: impl fmt::Display) -> String {
        format!(
            "{what} in `{}` (table `{}`)",
            self.inner.path.display(),
            self.inner.table
        )
    }
}

#[async_trait]
impl FenceGate for SqliteFenceGate {
    /// Admits `token` in a statement of its own on the gate's pool; use
    /// [`admit_in`](SqliteFenceGate::admit_in) to tie the check to a write.
    async fn admit(&self, resource: &str, token: FencingToken) -> Result<()> {
        self.admit_in(&self.inner.pool, resource, token).await
    }
}
