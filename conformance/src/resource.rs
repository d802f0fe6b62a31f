//! A fenced resource shared between processes: a counter in a SQLite file behind a
//! [`SqliteFenceGate`], with a log of every write attempt that the checker reads back.
//!
//! Whatever store the lock lives in, the resource is this file, so worker processes
//! of any store write to it the same way. Each write is a read-modify-write (read the
//! counter, then set it to what was read plus one), so two writers that interleave
//! lose an update, which the final value shows.

use std::fmt;
use std::path::{Path, PathBuf};

use fencelock_core::{Error, FencingToken, Result};
use fencelock_sql::SqliteFenceGate;
use fencelock_sql::sqlx::{self, Row};

use crate::history::{History, Write, instant_at_micros, now_micros};

/// The gate's resource key, and the counter's row.
const RESOURCE: &str = "conformance/counter";
const COUNTER_TABLE: &str = "conformance_counter";
const LOG_TABLE: &str = "conformance_writes";

/// What a write attempt came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The gate admitted the token and the counter was incremented.
    Accepted,
    /// The gate refused the token: a higher one was admitted before.
    Refused {
        /// The highest token admitted so far.
        highest: FencingToken,
    },
}

/// The counter in a SQLite file, fenced by a [`SqliteFenceGate`] in the same file,
/// and the log of every attempt: `(holder, token, start, end, accepted)` with times
/// on the shared clock ([`now_micros`]).
#[derive(Clone)]
pub struct SharedResource {
    gate: SqliteFenceGate,
    path: PathBuf,
}

impl fmt::Debug for SharedResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedResource")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SharedResource {
    /// Opens the resource in the SQLite file at `path`, creating the file and its
    /// tables if missing. Create it once before starting the processes that share it.
    ///
    /// # Errors
    /// If the file cannot be opened or the tables created.
    pub async fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let gate = SqliteFenceGate::open(&path).await?;
        let resource = Self { gate, path };
        for statement in [
            format!(
                "CREATE TABLE IF NOT EXISTS {COUNTER_TABLE} \
                 (resource TEXT PRIMARY KEY, value INTEGER NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {LOG_TABLE} (id INTEGER PRIMARY KEY AUTOINCREMENT, \
                 holder TEXT NOT NULL, token INTEGER NOT NULL, start_us INTEGER NOT NULL, \
                 end_us INTEGER NOT NULL, accepted INTEGER NOT NULL)"
            ),
        ] {
            sqlx::query(&statement)
                .execute(resource.gate.pool())
                .await
                .map_err(|err| resource.failed("create the resource tables", err))?;
        }
        Ok(resource)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Increments the counter as `holder` with `token` and logs the attempt.
    ///
    /// Reads the counter, then in one transaction admits `token` through the gate and
    /// stores the value read plus one; a refused token rolls the transaction back.
    ///
    /// # Errors
    /// Store errors; a refused token is [`WriteOutcome::Refused`], not an error.
    pub async fn write(&self, holder: &str, token: FencingToken) -> Result<WriteOutcome> {
        let start = now_micros();
        let read = self.value().await?;
        // Give a concurrent writer room to interleave: only the fence prevents it.
        tokio::task::yield_now().await;
        let mut tx = self
            .gate
            .pool()
            .begin()
            .await
            .map_err(|err| self.failed("begin a write", err))?;
        let outcome = match self.gate.admit_in(&mut *tx, RESOURCE, token).await {
            Ok(()) => {
                let statement = format!(
                    "INSERT INTO {COUNTER_TABLE} (resource, value) VALUES (?, ?) \
                     ON CONFLICT (resource) DO UPDATE SET value = excluded.value"
                );
                sqlx::query(&statement)
                    .bind(RESOURCE)
                    .bind(to_sql(read + 1)?)
                    .execute(&mut *tx)
                    .await
                    .map_err(|err| self.failed("write the counter", err))?;
                self.log(&mut *tx, holder, token, start, true).await?;
                tx.commit()
                    .await
                    .map_err(|err| self.failed("commit a write", err))?;
                WriteOutcome::Accepted
            }
            Err(Error::StaleToken { highest, .. }) => {
                tx.rollback()
                    .await
                    .map_err(|err| self.failed("roll back a refused write", err))?;
                self.log(self.gate.pool(), holder, token, start, false)
                    .await?;
                WriteOutcome::Refused { highest }
            }
            Err(err) => return Err(err),
        };
        Ok(outcome)
    }

    /// The counter's value: the number of accepted writes if none interleaved.
    ///
    /// # Errors
    /// If the file cannot be read.
    pub async fn value(&self) -> Result<u64> {
        let statement = format!("SELECT value FROM {COUNTER_TABLE} WHERE resource = ?");
        let row = sqlx::query(&statement)
            .bind(RESOURCE)
            .fetch_optional(self.gate.pool())
            .await
            .map_err(|err| self.failed("read the counter", err))?;
        match row {
            Some(row) => {
                let value: i64 = row
                    .try_get(0)
                    .map_err(|err| self.failed("read the counter", err))?;
                Ok(u64::try_from(value).unwrap_or(0))
            }
            None => Ok(0),
        }
    }

    /// Every logged write attempt, in the order they were logged, with times mapped
    /// to this process's clock.
    ///
    /// # Errors
    /// If the file cannot be read.
    pub async fn writes(&self) -> Result<Vec<Write>> {
        let statement = format!(
            "SELECT holder, token, start_us, end_us, accepted FROM {LOG_TABLE} ORDER BY id"
        );
        let rows = sqlx::query(&statement)
            .fetch_all(self.gate.pool())
            .await
            .map_err(|err| self.failed("read the write log", err))?;
        rows.iter()
            .map(|row| {
                let read = |err| self.failed("read the write log", err);
                let token: i64 = row.try_get(1).map_err(read)?;
                let start: i64 = row.try_get(2).map_err(read)?;
                let end: i64 = row.try_get(3).map_err(read)?;
                Ok(Write {
                    holder: row.try_get(0).map_err(read)?,
                    token: FencingToken(u64::try_from(token).unwrap_or(0)),
                    start: instant_at_micros(u64::try_from(start).unwrap_or(0)),
                    end: instant_at_micros(u64::try_from(end).unwrap_or(0)),
                    accepted: row.try_get(4).map_err(read)?,
                })
            })
            .collect()
    }

    /// A [`History`] holding every logged write; add the holds, faults and attempts
    /// the processes reported.
    ///
    /// # Errors
    /// If the file cannot be read.
    pub async fn history(&self) -> Result<History> {
        Ok(History {
            writes: self.writes().await?,
            ..History::default()
        })
    }

    async fn log<'c, E>(
        &self,
        executor: E,
        holder: &str,
        token: FencingToken,
        start: u64,
        accepted: bool,
    ) -> Result<()>
    where
        E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
    {
        let statement = format!(
            "INSERT INTO {LOG_TABLE} (holder, token, start_us, end_us, accepted) \
             VALUES (?, ?, ?, ?, ?)"
        );
        sqlx::query(&statement)
            .bind(holder)
            .bind(to_sql(token.0)?)
            .bind(to_sql(start)?)
            .bind(to_sql(now_micros())?)
            .bind(accepted)
            .execute(executor)
            .await
            .map_err(|err| self.failed("log a write", err))?;
        Ok(())
    }

    fn failed(&self, what: &str, err: sqlx::Error) -> Error {
        Error::backend(
            "sqlite",
            format!("{what} of the shared resource `{}`", self.path.display()),
            false,
            err,
        )
    }
}

/// SQLite integers are signed; fencelock tokens and shared-clock readings fit.
fn to_sql(value: u64) -> Result<i64> {
    i64::try_from(value)
        .map_err(|_| Error::config(format!("{value} does not fit a SQLite INTEGER")))
}
