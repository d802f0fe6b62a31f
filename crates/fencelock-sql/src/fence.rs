//! The fence gates' logic, written once for every SQL database: a [`FenceSql`] owns
//! the SQL text of one gate table, [`Fence`] the token rules and error messages.

use std::fmt;
use std::future::Future;

use fencelock_core::{Error, FencingToken, Result};
use futures_util::future::BoxFuture;
use sqlx::{Database, Executor, Pool};

/// A database's SQL for a fence gate's table.
pub(crate) trait FenceSql: Send + Sync + 'static {
    /// The database.
    type Db: Database;

    /// The store's name in messages.
    const STORE: &'static str;

    /// The token column's type, for messages: e.g. "Postgres's BIGINT".
    const TOKEN_TYPE: &'static str;

    /// Whether retrying may succeed.
    fn is_temporary(err: &sqlx::Error) -> bool;

    /// Creates the table if it does not exist.
    fn create(&self, pool: &Pool<Self::Db>)
    -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Stores the higher of the stored token of `resource` and `token` through
    /// `executor`, and returns it.
    ///
    /// Boxed, with the executor's lifetimes spelled out, so that callers' futures are
    /// `Send` for any executor.
    fn admit<'e, 'c: 'e, E>(
        &'e self,
        executor: E,
        resource: &'e str,
        token: i64,
    ) -> BoxFuture<'e, Result<i64, sqlx::Error>>
    where
        E: 'e + Executor<'c, Database = Self::Db>;

    /// The stored token of `resource`, if any.
    fn highest(
        &self,
        pool: &Pool<Self::Db>,
        resource: &str,
    ) -> impl Future<Output = Result<Option<i64>, sqlx::Error>> + Send;
}

/// A fence gate's table in one database.
pub(crate) struct Fence<F: FenceSql> {
    pool: Pool<F::Db>,
    table: String,
    sql: F,
    /// Where the table is, for messages: `"{what}{place}"`.
    place: String,
}

impl<F: FenceSql> Fence<F> {
    /// A gate on `table` (a checked name) behind `pool`, speaking `sql`, named in
    /// messages as `"{what}{place}"`.
    pub(crate) fn new(pool: Pool<F::Db>, table: &str, sql: F, place: String) -> Self {
        Self {
            pool,
            table: table.to_owned(),
            sql,
            place,
        }
    }

    /// The gate's own pool.
    pub(crate) fn pool(&self) -> &Pool<F::Db> {
        &self.pool
    }

    /// The gate's table.
    pub(crate) fn table(&self) -> &str {
        &self.table
    }

    fn failed(&self, what: impl fmt::Display, err: sqlx::Error) -> Error {
        Error::backend(
            F::STORE,
            format!("{what}{}", self.place),
            F::is_temporary(&err),
            err,
        )
    }

    /// Creates the table if it does not exist.
    pub(crate) async fn migrate(&self) -> Result<()> {
        self.sql
            .create(&self.pool)
            .await
            .map_err(|err| self.failed("create the fence table", err))
    }

    /// Admits `token` for `resource` through `executor` iff no higher token was
    /// admitted before.
    pub(crate) async fn admit_in<'c, E>(
        &self,
        executor: E,
        resource: &str,
        token: FencingToken,
    ) -> Result<()>
    where
        E: Executor<'c, Database = F::Db>,
    {
        let stored = i64::try_from(token.0).map_err(|_| {
            Error::config(format!(
                "token {token} for resource `{resource}` does not fit {} \
                 (at most {}); pass the token of a fencelock grant",
                F::TOKEN_TYPE,
                i64::MAX
            ))
        })?;
        let highest = self
            .sql
            .admit(executor, resource, stored)
            .await
            .map_err(|err| {
                self.failed(format_args!("admit token {token} for `{resource}`"), err)
            })?;
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
    pub(crate) async fn highest(&self, resource: &str) -> Result<Option<FencingToken>> {
        let token = self
            .sql
            .highest(&self.pool, resource)
            .await
            .map_err(|err| {
                self.failed(format_args!("read the highest token of `{resource}`"), err)
            })?;
        Ok(token.map(|token| FencingToken(u64::try_from(token).unwrap_or(0))))
    }
}
