//! SQLite: the library against sqlx doing one upsert and one update by hand, on the
//! same file with the same pool settings (WAL, `synchronous = NORMAL`).

use std::path::Path;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions, SqliteSynchronous};

use crate::library::{self, TTL};
use crate::measure::{Plan, Result, Role, Variant, interleaved};
use crate::report::Report;

const CREATE: &str = "CREATE TABLE IF NOT EXISTS bench_floor (
    name TEXT NOT NULL PRIMARY KEY, owner TEXT, token INTEGER NOT NULL, expires_at INTEGER NOT NULL)";
const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

/// S1 and S4 on a SQLite file in a fresh temp dir.
pub(crate) async fn run(plan: &Plan, report: &mut Report) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("locks.db");
    let url = format!("sqlite://{}", file.display());
    let lib = fencelock::connect(&url).await?;
    let pool = open(&file).await?;
    sqlx::query(CREATE).execute(&pool).await?;

    let mut variants = vec![
        library::acquire_release("fencelock sqlite", lib, "bench-s1"),
        floor(pool.clone()),
    ];
    let samples = interleaved(&mut variants, plan).await?;
    report.add_acquire_release("sqlite", &variants, samples, 1, |_| Some(1.2));

    let mut select = round_trip(pool);
    let measured = library::handoff(&url, "bench-s4", &mut select, plan).await?;
    report.add_handoff("sqlite", &select, measured, None);
    Ok(())
}

async fn open(file: &Path) -> Result<SqlitePool> {
    let options = SqliteConnectOptions::new()
        .filename(file)
        .busy_timeout(Duration::from_secs(5))
        .synchronous(SqliteSynchronous::Normal);
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await?;
    sqlx::query("PRAGMA journal_mode = WAL")
        .execute(&pool)
        .await?;
    Ok(pool)
}

/// An upsert taking the row if free (returning the token), then an update freeing it.
fn floor(pool: SqlitePool) -> Variant {
    let acquire = format!(
        "INSERT INTO bench_floor (name, owner, token, expires_at) VALUES (?1, ?2, 1, {NOW_MS} + ?3)
ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, token = bench_floor.token + 1,
  expires_at = excluded.expires_at
WHERE bench_floor.owner IS NULL OR bench_floor.expires_at <= {NOW_MS}
RETURNING token"
    );
    let release =
        "UPDATE bench_floor SET owner = NULL WHERE name = ?1 AND owner = ?2 AND token = ?3";
    let ttl_ms = TTL.as_millis() as i64;
    Variant::new("sqlx upsert + update", Role::Floor, move || {
        let (pool, acquire) = (pool.clone(), acquire.clone());
        async move {
            let token: Option<i64> = sqlx::query_scalar(&acquire)
                .bind("s1")
                .bind("floor")
                .bind(ttl_ms)
                .fetch_optional(&pool)
                .await?;
            let token = token.ok_or("floor: the row was already held")?;
            let freed = sqlx::query(release)
                .bind("s1")
                .bind("floor")
                .bind(token)
                .execute(&pool)
                .await?;
            if freed.rows_affected() != 1 {
                return Err("floor: the row was not ours at release".into());
            }
            Ok(())
        }
    })
}

fn round_trip(pool: SqlitePool) -> Variant {
    Variant::new("SELECT 1", Role::Floor, move || {
        let pool = pool.clone();
        async move {
            let _: i64 = sqlx::query_scalar("SELECT 1").fetch_one(&pool).await?;
            Ok(())
        }
    })
}
