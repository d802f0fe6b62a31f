//! The SQLite store: opening the file, error mapping, and the parts below.

mod backend;
mod gate;
mod queries;

use std::path::Path;
use std::time::Duration;

use fencelock_core::{Error, Result};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use tokio::time::Instant;

use crate::SqliteConfig;

pub use backend::SqliteBackend;
pub use gate::SqliteFenceGate;

/// The store's name in messages and [`Capabilities`](fencelock_core::Capabilities).
pub(crate) const STORE: &str = "sqlite";

/// SQLite's primary result codes that mean "another connection holds a lock".
const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;

/// Whether retrying may succeed: the file was locked by another connection, or no
/// pooled connection came free in time.
pub(crate) fn is_temporary(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            // Extended codes (SQLITE_BUSY_SNAPSHOT, ...) carry the primary code in the
            // low byte.
            .is_some_and(|code| matches!(code & 0xff, SQLITE_BUSY | SQLITE_LOCKED)),
        _ => false,
    }
}

/// A [`Error::Backend`] for `context`, e.g. "acquire `a` in `locks.db` (table `t`)".
pub(crate) fn db_error(context: String, err: sqlx::Error) -> Error {
    Error::backend(STORE, context, is_temporary(&err), err)
}

/// Opens a small pool on `config.path` with WAL, the busy timeout and
/// `synchronous = NORMAL`, creating the file if missing.
///
/// # Errors
/// [`Error::Config`] if the file's directory does not exist; a backend error naming
/// the file if it cannot be opened.
pub(crate) async fn open_pool(config: &SqliteConfig) -> Result<SqlitePool> {
    config.validate()?;
    let path = &config.path;
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(Error::config(format!(
            "the directory `{}` of the SQLite lock file `{}` does not exist; create it first \
             (e.g. `mkdir -p {}`) or give a path in an existing directory",
            dir.display(),
            path.display(),
            dir.display()
        )));
    }
    // journal_mode is switched below, not here: sqlx would run it on every new
    // connection, and the switch takes a lock that the busy timeout does not wait for.
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .busy_timeout(config.busy_timeout)
        .synchronous(SqliteSynchronous::Normal);
    let pool = SqlitePoolOptions::new()
        .max_connections(config.pool_size)
        .min_connections(0)
        .acquire_timeout(config.busy_timeout + Duration::from_secs(5))
        .connect_with(options)
        .await
        .map_err(|err| db_error(format!("open `{}`", path.display()), err))?;
    use_wal(&pool, config).await?;
    Ok(pool)
}

/// Puts the file in WAL mode (a persistent property of the file, so once is enough),
/// retrying while processes starting at the same moment hold the lock it needs.
async fn use_wal(pool: &SqlitePool, config: &SqliteConfig) -> Result<()> {
    let give_up_at = Instant::now() + config.busy_timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        let result = sqlx::query_scalar::<_, String>("PRAGMA journal_mode = WAL")
            .fetch_one(pool)
            .await;
        match result {
            Ok(mode) => {
                if !mode.eq_ignore_ascii_case("wal") {
                    tracing::warn!(
                        path = %config.path.display(),
                        mode,
                        "SQLite kept its journal mode instead of WAL (is the file on a network \
                         filesystem?); locks still work, with less concurrency"
                    );
                }
                return Ok(());
            }
            Err(err) if is_temporary(&err) && Instant::now() < give_up_at => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(err) => {
                return Err(db_error(
                    format!("switch `{}` to WAL mode", config.path.display()),
                    err,
                ));
            }
        }
    }
}
