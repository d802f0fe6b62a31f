//! The MySQL/MariaDB store: connecting, migrating, error mapping, and the parts
//! below.

mod backend;
mod config;
mod gate;
mod queries;
mod session;

use fencelock_core::{Error, Result};
use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError, MySqlPool, MySqlPoolOptions};

pub use backend::MySqlBackend;
pub use config::MySqlConfig;
pub use gate::MySqlFenceGate;

/// The store's name in messages and [`Capabilities`](fencelock_core::Capabilities).
pub(crate) const STORE: &str = "mysql";

/// Server error numbers after which the same statement may succeed.
const ER_CON_COUNT_ERROR: u16 = 1040;
const ER_SERVER_SHUTDOWN: u16 = 1053;
const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;
const ER_LOCK_DEADLOCK: u16 = 1213;
const ER_CONNECTION_KILLED: u16 = 1927;

/// The server's error number, if `err` came from the server.
pub(crate) fn error_number(err: &sqlx::Error) -> Option<u16> {
    match err {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .map(MySqlDatabaseError::number),
        _ => None,
    }
}

/// Whether InnoDB rolled the statement back to break a deadlock or a lock wait: it
/// did nothing, and running it again is the cure.
pub(crate) fn is_lock_conflict(err: &sqlx::Error) -> bool {
    matches!(
        error_number(err),
        Some(ER_LOCK_DEADLOCK | ER_LOCK_WAIT_TIMEOUT)
    )
}

/// Whether retrying may succeed: the connection failed or timed out, or the server
/// refused for a passing reason.
pub(crate) fn is_temporary(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => true,
        _ => matches!(
            error_number(err),
            Some(
                ER_CON_COUNT_ERROR
                    | ER_SERVER_SHUTDOWN
                    | ER_LOCK_WAIT_TIMEOUT
                    | ER_LOCK_DEADLOCK
                    | ER_CONNECTION_KILLED
            )
        ),
    }
}

/// A [`Error::Backend`] for `context`, e.g. "acquire `a` at h:3306/db (table `t`)".
pub(crate) fn db_error(context: String, err: sqlx::Error) -> Error {
    Error::backend(STORE, context, is_temporary(&err), err)
}

/// Opens a pool on `config.server`, failing fast (with a temporary error that says
/// to check the server) when it cannot be reached.
pub(crate) async fn open_pool(config: &MySqlConfig) -> Result<MySqlPool> {
    config.validate()?;
    let endpoint = config.server.endpoint();
    let options: MySqlConnectOptions = config.server.connect_url().parse().map_err(|err| {
        Error::config(format!(
            "`{}` is not a usable MySQL URL: {err}",
            config.server
        ))
    })?;
    MySqlPoolOptions::new()
        .max_connections(config.pool_size)
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
                    "{err}; check that the MySQL/MariaDB server at {endpoint} is running, \
                     reachable and accepts this user"
                ),
            )
        })
}

/// Runs `create` (a `CREATE TABLE IF NOT EXISTS`, which MySQL serialises under its
/// metadata lock, so concurrent starts are safe).
pub(crate) async fn create_table(pool: &MySqlPool, create: &str) -> Result<(), sqlx::Error> {
    sqlx::query(create).execute(pool).await.map(drop)
}
