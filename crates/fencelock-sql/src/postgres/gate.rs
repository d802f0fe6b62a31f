//! The Postgres fence gate: token checks that commit together with the write they
//! guard.

use std::fmt;
use std::sync::Arc;

#[cfg(doc)]
use fencelock_core::Error;
use fencelock_core::{FenceGate, FencingToken, Result, async_trait};
use futures_util::future::BoxFuture;
use sqlx::postgres::{PgPool, Postgres};
use sqlx::{Executor, Row};

use super::queries::FenceQueries;
use super::{STORE, create_table, is_temporary, open_pool};
use crate::PostgresConfig;
use crate::fence::{Fence, FenceSql};
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
    inner: Arc<Fence<FenceQueries>>,
}

impl fmt::Debug for PostgresFenceGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresFenceGate")
            .field("table", &self.inner.table())
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
        let place = format!(" (fence table `{table}`)");
        let gate = Self {
            inner: Arc::new(Fence::new(pool, table, FenceQueries::new(table), place)),
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
        self.inner.migrate().await
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
        self.inner.admit_in(executor, resource, token).await
    }

    /// The highest token admitted for `resource`, if any.
    ///
    /// # Errors
    /// [`Error::Backend`] if the read fails.
    pub async fn highest(&self, resource: &str) -> Result<Option<FencingToken>> {
        self.inner.highest(resource).await
    }

    /// The pool the gate uses on its own (for [`FenceGate::admit`]); begin the
    /// transactions that call [`admit_in`](Self::admit_in) on it.
    pub fn pool(&self) -> &PgPool {
        self.inner.pool()
    }

    /// The gate's table.
    pub fn table(&self) -> &str {
        self.inner.table()
    }
}

#[async_trait]
impl FenceGate for PostgresFenceGate {
    /// Admits `token` in a statement of its own on the gate's pool; use
    /// [`admit_in`](PostgresFenceGate::admit_in) to tie the check to a write.
    async fn admit(&self, resource: &str, token: FencingToken) -> Result<()> {
        self.admit_in(self.pool(), resource, token).await
    }
}

/// Postgres's gate SQL: the stored token comes back through `RETURNING`.
impl FenceSql for FenceQueries {
    type Db = Postgres;
    const STORE: &'static str = STORE;
    const TOKEN_TYPE: &'static str = "Postgres's BIGINT";

    fn is_temporary(err: &sqlx::Error) -> bool {
        is_temporary(err)
    }

    async fn create(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        create_table(pool, &self.create_table).await
    }

    fn admit<'e, 'c: 'e, E>(
        &'e self,
        executor: E,
        resource: &'e str,
        token: i64,
    ) -> BoxFuture<'e, Result<i64, sqlx::Error>>
    where
        E: 'e + Executor<'c, Database = Postgres>,
    {
        Box::pin(async move {
            let row = executor
                .fetch_one(sqlx::query(&self.admit).bind(resource).bind(token))
                .await?;
            row.try_get(0)
        })
    }

    async fn highest(&self, pool: &PgPool, resource: &str) -> Result<Option<i64>, sqlx::Error> {
        let row = sqlx::query(&self.highest)
            .bind(resource)
            .fetch_optional(pool)
            .await?;
        row.map(|row| row.try_get(0)).transpose()
    }
}
