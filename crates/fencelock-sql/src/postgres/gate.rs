//! The Postgres fence gate: token checks that commit together with the write they
//! guard.

use std::fmt;
use std::sync::Arc;

use fencelock_core::{Error, FenceGate, FencingToken, Result, async_trait};
use sqlx::postgres::{PgPool, Postgres};
use sqlx::{Executor, Row};

use super::queries::FenceQueries;
use super::{create_table, db_error, open_pool};
use crate::PostgresConfig;
use crate::identifier::check_table_name;

/// A [`FenceGate`] kept in a Postgres table (`resource TEXT PRIMARY KEY, token
/// BIGINT`), so the token check can run **inside the transaction that writes the
/// resource**: the check and the write commit together or not at all, and the row
/// lock the check takes orders concurrent writers of one resource until commit.
///
/// # Example
/// ```no_run
/// use fencelock_core::FencingToken;
/// use fencelock_sql::PostgresFenceGate;
///
/// async fn pay_invoice(
///     gate: &PostgresFenceGate,
///     token: FencingToken, // from the lock guard: `guard.token()`
/// ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
///     let mut tx = gate.pool().begin().await?;
///     // Refused (Error::StaleToken) if a later holder already wrote: `?` drops the
///     // transaction, which rolls it back.
///     gate.admit_in(&mut *tx, "invoice/7", token).await?;
///     sqlx::query("UPDATE invoices SET paid = true WHERE id = 7")
///         .execute(&mut *tx)
///         .await?;
///     tx.commit().await?;
///     Ok(())
/// }
/// ```
#[derive(Clone)]
pub struct PostgresFenceGate {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    table: String,
    queries: FenceQueries,
}

impl fmt::Debug for PostgresFenceGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresFenceGate")
            .field("table", &self.inner.table)
            .finish_non_exhaustive()
    }
}

impl PostgresFenceGate {
    /// Connects to the server of `config` with a pool of its own and uses its
    /// [`fence_table`](PostgresConfig::fence_table), creating it if missing.
    ///
    /// # Errors
    /// As [`PostgresBackend::connect`](crate::PostgresBackend::connect).
    pub async fn connect(config: &PostgresConfig) -> Result<Self> {
        let pool = open_pool(config, 0).await?;
        Self::with_pool(pool, &config.fence_table).await
    }

    /// A gate in `table` of the database behind `pool` (typically the application's
    /// own database, next to the resource), creating the table if missing.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad table name; [`Error::Backend`] if the table cannot
    /// be created.
    pub async fn with_pool(pool: PgPool, table: &str) -> Result<Self> {
        check_table_name("fence_table", table)?;
        let gate = Self {
            inner: Arc::new(Inner {
                queries: FenceQueries::new(table),
                table: table.to_owned(),
                pool,
            }),
        };
        gate.migrate().await?;
        Ok(gate)
    }

    /// Creates the gate's table if it does not exist. Idempotent and safe to run from
    /// many processes at once.
    ///
    /// # Errors
    /// [`Error::Backend`] naming the table.
    pub async fn migrate(&self) -> Result<()> {
        create_table(&self.inner.pool, &self.inner.queries.create_table)
            .await
            .map_err(|err| db_error(self.context("create the fence table"), err))
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
        E: Executor<'c, Database = Postgres>,
    {
        let stored = i64::try_from(token.0).map_err(|_| {
            Error::config(format!(
                "token {token} for resource `{resource}` does not fit Postgres's BIGINT \
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
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The gate's table.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    fn context(&self, what: impl fmt::Display) -> String {
        format!("{what} (fence table `{}`)", self.inner.table)
    }
}

#[async_trait]
impl FenceGate for PostgresFenceGate {
    /// Admits `token` in a statement of its own on the gate's pool; use
    /// [`admit_in`](PostgresFenceGate::admit_in) to tie the check to a write.
    async fn admit(&self, resource: &str, token: FencingToken) -> Result<()> {
        self.admit_in(&self.inner.pool, resource, token).await
    }
}
