//! Fenced writes to Postgres: the lock lives in Postgres too, and the token check
//! commits or rolls back together with the write, inside the application's own
//! transaction. A holder that stalled past its lease has its late write refused and
//! rolled back.
//!
//!     docker compose -f docker/compose.yml up -d postgres     # or any Postgres
//!     FENCELOCK_PG_URL=postgres://fencelock:fencelock@127.0.0.1:5432/fencelock \
//!         cargo run -p fencelock-examples --example postgres_fenced_writes

use std::time::Duration;

use fencelock::sql::{PostgresBackend, PostgresFenceGate, sqlx};
use fencelock::{AcquireRequest, Error, FencingToken, LockBackend, LockName, Locker};

/// Moves `amount` into account 42, admitted only if `token` is not stale. The check
/// and the write commit together, or neither does.
async fn deposit(
    gate: &PostgresFenceGate,
    token: FencingToken,
    amount: i64,
) -> fencelock::Result<()> {
    let db = |err: sqlx::Error| Error::backend("postgres", "deposit", false, err);
    let mut tx = gate.pool().begin().await.map_err(db)?;
    gate.admit_in(&mut *tx, "accounts/42", token).await?; // StaleToken: `?` rolls back
    sqlx::query("UPDATE example_accounts SET balance = balance + $1 WHERE id = 42")
        .bind(amount)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    tx.commit().await.map_err(db)
}

#[tokio::main]
async fn main() -> fencelock::Result<()> {
    let url = std::env::var("FENCELOCK_PG_URL")
        .unwrap_or_else(|_| "postgres://fencelock:fencelock@127.0.0.1:5432/fencelock".to_owned());
    let backend = PostgresBackend::open(&url).await?;
    let gate = backend.fence_gate().await?;
    let db = |err: sqlx::Error| Error::backend("postgres", "example setup", false, err);
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS example_accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL)",
    )
    .execute(gate.pool())
    .await
    .map_err(db)?;
    sqlx::query("INSERT INTO example_accounts VALUES (42, 0) ON CONFLICT (id) DO NOTHING")
        .execute(gate.pool())
        .await
        .map_err(db)?;

    // A holder that stalls: it takes the lock for 300 ms and stops renewing.
    let name = LockName::new("accounts/42")?;
    let stalled = backend
        .acquire(AcquireRequest::new(name, Duration::from_millis(300))?)
        .await?;
    println!(
        "stalled holder: token {}, pauses past its lease",
        stalled.token()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Its successor takes the lock (the watchdog renews it) and deposits.
    let locker = Locker::new(backend.clone());
    let guard = locker
        .lock("accounts/42")
        .ttl(Duration::from_secs(10))
        .wait(Duration::from_secs(5))
        .await?;
    deposit(&gate, guard.token(), 100).await?;
    println!("successor: token {}, deposit committed", guard.token());

    // The stalled holder wakes and writes with its old token: refused, rolled back.
    match deposit(&gate, stalled.token(), 100).await {
        Err(err @ Error::StaleToken { .. }) => {
            println!("stalled holder's deposit refused and rolled back: {err}")
        }
        other => panic!("a stale token must be refused, got {other:?}"),
    }
    guard.release().await?;
    Ok(())
}
