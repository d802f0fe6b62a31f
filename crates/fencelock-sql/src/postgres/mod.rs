//! The Postgres store: connecting, migrating, error mapping, and the parts below.

mod backend;
mod config;
mod gate;
mod notify;
mod queries;
mod session;

use fencelock_core::{Error, Result};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

pub use backend::PostgresBackend;
pub use config::PostgresConfig;
pub use gate::PostgresFenceGate;

/// The store's name in messages and [`Capabilities`](fencelock_core::Capabilities).
pub(crate) const STORE: &str = "postgres";

/// Any key of `pg_advisory_xact_lock` serialises schema creation, so many processes
/// starting at once on an empty database do not race on the catalog.
const MIGRATION_LOCK: i64 = 0x666c_6f63_6b5f_6d67;

/// Whether retrying may succeed: the connection failed or timed out, or the server
/// refused for a passing reason (shutting down, too many connections, a deadlock or
/// serialization failure).
pub(crate) fn is_temporary(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08")
                || code.starts_with("53")
                || matches!(
                    &*code,
                    "40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03"
                )
        }),
        _ => false,
    }
}

/// A [`Error::Backend`] for `context`, e.g. "acquire `a` at h:5432/db (table `t`)".
pub(crate) fn db_error(context: String, err: sqlx::Error) -> Error {
    Error::backend(STORE, context, is_temporary(&err), err)
}

/// Opens a pool on `config.server`, failing fast (with a temporary error that says
/// to check the server) when it cannot be reached.
pub(crate) async fn open_pool(config: &PostgresConfig, extra: u32) -> Result<PgPool> {
    config.validate()?;
    let endpoint = config.server.endpoint();
    let options: PgConnectOptions = config.server.connect_url().parse().map_err(|err| {
        Error::config(format!(
            "`{}` is not a usable Postgres URL: {err}",
            config.server
        ))
    })?;
    PgPoolOptions::new()
        .max_connections(config.pool_size + extra)
        .min_connections(0)
        .acquire_timeout(config.connect_timeout)
        .connect_with(options)
        .await
        .map_err(|err| {
            let temporary = is_temporary(&err);
            Error::backend(
                STORE,
                format!("connect to {endpoint}"),
                temporary,
                format!(
                    "{err}; check that the Postgres server at {endpoint} is running, reachable \
                     and accepts this user"
                ),
            )
        })
}

/// Runs `create` (a `CREATE TABLE IF NOT EXISTS`) under the migration lock.
pub(crate) async fn create_table(pool: &PgPool, create: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query(create).execute(&mut *tx).await?;
    tx.commit().await
}
