//! The MySQL/MariaDB fence gate: token checks that commit together with the write they
//! guard.

use std::fmt;
use std::sync::Arc;

#[cfg(doc)]
use fencelock_core::Error;
use fencelock_core::{FenceGate, FencingToken, Result, async_trait};
use futures_util::future::BoxFuture;
use sqlx::Executor;
use sqlx::mysql::{MySql, MySqlPool};

use super::queries::FenceQueries;
use super::{STORE, create_table, is_temporary, open_pool};
use crate::MySqlConfig;
use crate::fence::{Fence, FenceSql};
use crate::identifier::check_table_name;

/// A [`FenceGate`] kept in a MySQL/MariaDB InnoDB table (`resource VARBINARY PRIMARY KEY,
/// token BIGINT`), so the token check can run **inside the transaction that writes the
/// resource**: the check and the write commit together or not at all, and the row
/// lock the check takes orders concurrent writers of one resource until commit.
///
/// # Example
/// ```no_run
/// use fencelock_core::FencingToken;
/// use fencelock_sql::MySqlFenceGate;
///
/// async fn pay_invoice(
///     gate: &MySqlFenceGate,
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
#[derive(Clone)]
pub struct MySqlFenceGate {
    inner: Arc<Fence<FenceQueries>>,
}

impl fmt::Debug for MySqlFenceGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MySqlFenceGate")
            .field("table", &self.inner.table())
            .finish_non_exhaustive()
    }
}

impl MySqlFenceGate {
    /// Connects to the server of `config` with a pool of its own and uses its
    /// [`fence_table`](MySqlConfig::fence_table), creating it if missing.
    ///
    /// # Errors
    /// As [`MySqlBackend::connect`](crate::MySqlBackend::connect).
    pub async fn connect(config: &MySqlConfig) -> Result<Self> {
        let pool = open_pool(config).await?;
        Self::with_pool(pool, &config.fence_table).await
    }

    /// A gate in `table` of the database behind `pool` (typically the application's
    /// own database, next to the resource), creating the table if missing.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad table name; [`Error::Backend`] if the table cannot
    /// be created.
    pub async fn with_pool(pool: MySqlPool, table: &str) -> Result<Self> {
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
        E: Executor<'c, Database = MySql>,
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
    pub fn pool(&self) -> &MySqlPool {
        self.inner.pool()
    }

    /// The gate's table.
    pub fn table(&self) -> &str {
        self.inner.table()
    }
}

#[async_trait]
impl FenceGate for MySqlFenceGate {
    /// Admits `token` in a statement of its own on the gate's pool; use
    /// [`admit_in`](MySqlFenceGate::admit_in) to tie the check to a write.
    async fn admit(&self, resource: &str, token: FencingToken) -> Result<()> {
        self.admit_in(self.pool(), resource, token).await
    }
}

/// MySQL's gate SQL: resources are bound as bytes (the column is binary), and the
/// stored token comes back through `LAST_INSERT_ID`.
impl FenceSql for FenceQueries {
    type Db = MySql;
    const STORE: &'static str = STORE;
    const TOKEN_TYPE: &'static str = "MySQL's BIGINT";

    fn is_temporary(err: &sqlx::Error) -> bool {
        is_temporary(err)
    }

    async fn create(&self, pool: &MySqlPool) -> Result<(), sqlx::Error> {
        create_table(pool, &self.create_table).await
    }

    fn admit<'e, 'c: 'e, E>(
        &'e self,
        executor: E,
        resource: &'e str,
        token: i64,
    ) -> BoxFuture<'e, Result<i64, sqlx::Error>>
    where
        E: 'e + Executor<'c, Database = MySql>,
    {
        Box::pin(async move {
            let done = executor
                .execute(
                    sqlx::query(&self.admit)
                        .bind(resource.as_bytes())
                        .bind(token),
                )
                .await?;
            // The statement leaves the higher token in LAST_INSERT_ID.
            Ok(i64::try_from(done.last_insert_id()).unwrap_or(i64::MAX))
        })
    }

    async fn highest(&self, pool: &MySqlPool, resource: &str) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar(&self.highest)
            .bind(resource.as_bytes())
            .fetch_optional(pool)
            .await
    }
}
