//! Postgres and MariaDB in lease and session mode (issue 7's targets): fencelock
//! against sqlx sending by hand what the mode needs at least, and against the peers a
//! user would pick instead.
//!
//! - Lease floor: the same two statements as the library (take a free or expired row
//!   and mint the token in one upsert; free the row) on a table of its own.
//! - Session floor: the raw server lock, `pg_advisory_lock` / `pg_advisory_unlock`
//!   or `GET_LOCK` / `RELEASE_LOCK`, on a pooled connection. On MariaDB it is also
//!   the raw `GET_LOCK` peer.
//! - Peer on Postgres: sqlx's own `PgAdvisoryLock` (a session advisory lock too).
//!
//! Statements per S1 cycle are counted by the server: Postgres statements executed in
//! the benchmark's database (`pg_stat_statements`, loaded for the run), MariaDB
//! statements received (`Questions`).

use std::sync::Arc;

use fencelock_conformance::harness::{MariaDb, Postgres, Server};
use sqlx::mysql::{MySql, MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgAdvisoryLock, PgConnectOptions, PgPool, PgPoolOptions};

use crate::library::{self, TTL};
use crate::measure::{Plan, Result, Role, Variant, interleaved};
use crate::peers::{self, Against, Handoff, Side};
use crate::report::{OpCount, Report};

/// The lease table of session mode: a table must not be shared between the modes.
const SESSION_TABLE: &str = "fencelock_session_locks";

/// The floor's own lease table (the library's layout).
const FLOOR_TABLE: &str = "bench_floor";

/// S1 and S4 on a Postgres from the harness, lease and session mode.
pub(crate) async fn run_postgres(plan: &Plan, report: &mut Report) -> Result<()> {
    let mut server = Postgres::start().await?;
    let admin = pg_admin(&mut server).await?;
    let lease_url = server.url();
    let session_url = format!("{lease_url}?mode=session&table={SESSION_TABLE}");
    let pool = pg_pool(&lease_url).await?;
    sqlx::query(&pg_create(FLOOR_TABLE)).execute(&pool).await?;

    let lease = fencelock::connect(&lease_url).await?;
    let session = fencelock::connect(&session_url).await?;
    let mut variants = vec![
        library::acquire_release("fencelock postgres lease", lease, "bench-s1"),
        pg_lease_floor(pool.clone()),
        library::acquire_release("fencelock postgres session", session, "bench-s1"),
        pg_session_floor(pool.clone()),
        pg_advisory_peer(pool.clone()),
    ];
    let samples = interleaved(&mut variants, plan).await?;
    let (lease_rows, session_rows) = variants.split_at(2);
    let (lease_samples, session_samples) = samples.split_at(2);
    report.add_acquire_release(
        "postgres (lease)",
        lease_rows,
        lease_samples.to_vec(),
        1,
        |_| Some(1.2),
    );
    report.add_acquire_release(
        "postgres (session)",
        session_rows,
        session_samples.to_vec(),
        1,
        |_| Some(1.2),
    );

    // Statements per cycle, as the server counts them.
    let expected = [2.0, 2.0, 2.0, 2.0];
    for (index, expected) in expected.into_iter().enumerate() {
        let store = if index < 2 {
            "postgres (lease)"
        } else {
            "postgres (session)"
        };
        let variant = &mut variants[index];
        let before = pg_statements(&admin).await?;
        variant.run(plan.counted_cycles).await?;
        let after = pg_statements(&admin).await?;
        report.op_counts.push(OpCount {
            store: store.into(),
            variant: variant.label.clone(),
            role: variant.role,
            unit: "statements (pg_stat_statements calls)",
            per_cycle: (after - before) as f64 / plan.counted_cycles as f64,
            expected,
            detail: match (index, variant.role) {
                (2, _) => "try-lock + token bump, clear + unlock".into(),
                (_, Role::Library) => "take-row upsert, free-row update + notify".into(),
                _ => "the two statements by hand".into(),
            },
        });
    }

    // S4 against one round trip, then session mode against the raw advisory lock.
    let mut select = select_one_pg(pool.clone());
    let measured = library::handoff(&lease_url, "bench-s4", &mut select, plan).await?;
    report.add_handoff("postgres (lease)", &select, measured, None);
    let measured = library::handoff(&session_url, "bench-s4", &mut select, plan).await?;
    report.add_handoff("postgres (session)", &select, measured, None);

    // Session mode against the raw advisory lock (issue 7: within 2×) and sqlx's
    // PgAdvisoryLock, in turns.
    let name = "bench-s4-vs";
    let ours = Handoff::new(
        "fencelock postgres session",
        Role::Library,
        peers::fencelock_side(fencelock::connect(&session_url).await?, name),
        peers::fencelock_side(fencelock::connect(&session_url).await?, name),
    );
    let others = vec![
        (
            Handoff::new(
                "sqlx pg_advisory_lock (raw)",
                Role::Floor,
                pg_advisory_side(pool.clone(), name),
                pg_advisory_side(pool.clone(), name),
            ),
            Against::Floor(2.0),
        ),
        (
            Handoff::new(
                "sqlx PgAdvisoryLock",
                Role::Peer,
                pg_advisory_peer_side(pool.clone(), name),
                pg_advisory_peer_side(pool.clone(), name),
            ),
            Against::Peer,
        ),
    ];
    peers::compare_handoffs("postgres (session)", ours, others, plan, report).await?;
    Ok(())
}

/// S1 and S4 on a MariaDB from the harness, lease and session mode.
pub(crate) async fn run_mariadb(plan: &Plan, report: &mut Report) -> Result<()> {
    let server = MariaDb::start().await?;
    let lease_url = server.url();
    let session_url = format!("{lease_url}?mode=session&table={SESSION_TABLE}");
    let pool = my_pool(&lease_url).await?;
    sqlx::query(&my_create(FLOOR_TABLE)).execute(&pool).await?;

    let lease = fencelock::connect(&lease_url).await?;
    let session = fencelock::connect(&session_url).await?;
    let mut variants = vec![
        library::acquire_release("fencelock mariadb lease", lease, "bench-s1"),
        my_lease_floor(pool.clone()),
        library::acquire_release("fencelock mariadb session", session, "bench-s1"),
        my_session_floor(pool.clone()),
    ];
    let samples = interleaved(&mut variants, plan).await?;
    let (lease_rows, session_rows) = variants.split_at_mut(2);
    let (lease_samples, session_samples) = samples.split_at(2);
    report.add_acquire_release(
        "mariadb (lease)",
        lease_rows,
        lease_samples.to_vec(),
        1,
        |_| Some(1.2),
    );
    report.add_acquire_release(
        "mariadb (session)",
        session_rows,
        session_samples.to_vec(),
        1,
        |_| Some(1.2),
    );

    // Statements per cycle, as the server counts them (`Questions`: every statement a
    // client sends, not pings).
    let admin = my_pool(&lease_url).await?;
    // Session mode: the library's 2 statements (lock + token bump, clear + unlock; a
    // released lock's connection is kept for the next one, so no connection setup is
    // counted).
    let expected = [2.0, 2.0, 2.0, 2.0];
    for (index, expected) in expected.into_iter().enumerate() {
        let (store, variant) = if index < 2 {
            ("mariadb (lease)", &mut lease_rows[index])
        } else {
            ("mariadb (session)", &mut session_rows[index - 2])
        };
        let before = my_status(&admin).await?;
        variant.run(plan.counted_cycles).await?;
        let after = my_status(&admin).await?;
        let cycles = plan.counted_cycles as f64;
        // The second SHOW STATUS is itself one question (and one `show_status`). The
        // `SET` sqlx sends on every new connection is left out: whether a pool opens
        // one during the count depends on timing.
        let delta = |name: &str| {
            after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
        };
        let per_cycle = (delta("Questions") - 1 - delta("Com_set_option")) as f64 / cycles;
        let mut commands = String::new();
        for (name, count) in &after {
            let delta = count - before.get(name).copied().unwrap_or(0);
            if let Some(command) = name.strip_prefix("Com_") {
                let delta = if command == "show_status" {
                    delta - 1
                } else {
                    delta
                };
                if delta > 0 {
                    commands.push_str(&format!("{command} {} ", delta as f64 / cycles));
                }
            }
        }
        report.op_counts.push(OpCount {
            store: store.into(),
            variant: variant.label.clone(),
            role: variant.role,
            unit: "statements (Questions − Com_set_option)",
            per_cycle,
            expected,
            detail: format!("Com_* per cycle: {}", commands.trim_end()),
        });
    }

    let mut select = select_one_my(pool.clone());
    let measured = library::handoff(&lease_url, "bench-s4", &mut select, plan).await?;
    report.add_handoff("mariadb (lease)", &select, measured, None);
    let measured = library::handoff(&session_url, "bench-s4", &mut select, plan).await?;
    report.add_handoff("mariadb (session)", &select, measured, None);

    // Session mode against the raw named lock (which is also the raw GET_LOCK peer).
    let name = "bench-s4-vs";
    let ours = Handoff::new(
        "fencelock mariadb session",
        Role::Library,
        peers::fencelock_side(fencelock::connect(&session_url).await?, name),
        peers::fencelock_side(fencelock::connect(&session_url).await?, name),
    );
    let raw = Handoff::new(
        "sqlx GET_LOCK (raw; also the raw GET_LOCK peer)",
        Role::Floor,
        get_lock_side(pool.clone(), name),
        get_lock_side(pool.clone(), name),
    );
    peers::compare_handoffs(
        "mariadb (session)",
        ours,
        vec![(raw, Against::Floor(2.0))],
        plan,
        report,
    )
    .await?;
    Ok(())
}

// --- Postgres ---------------------------------------------------------------------

/// A pool like the library's (sqlx defaults, pings before reuse included).
async fn pg_pool(url: &str) -> Result<PgPool> {
    let options: PgConnectOptions = url.parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await?)
}

/// Loads `pg_stat_statements` (a restart, data kept) and returns a connection to
/// `template1`, so the counting queries are not counted with the benchmark's database.
pub(crate) async fn pg_admin(server: &mut Postgres) -> Result<PgPool> {
    let url = format!("postgres://postgres@{}/template1", server.addr());
    {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await?;
        sqlx::raw_sql("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            .execute(&admin)
            .await?;
        admin.close().await;
    }
    server.restart(true).await?;
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await?;
    sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&admin)
        .await?;
    Ok(admin)
}

/// Statements executed so far in the benchmark's database (preparing one is not
/// executing it; pings are no statements).
pub(crate) async fn pg_statements(admin: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'postgres')",
    )
    .fetch_one(admin)
    .await?)
}

fn pg_create(table: &str) -> String {
    format!(
        r#"CREATE TABLE IF NOT EXISTS "{table}" (
    name TEXT NOT NULL PRIMARY KEY, owner TEXT, token BIGINT NOT NULL, expires_at BIGINT NOT NULL)"#
    )
}

const PG_NOW: &str =
    "WITH now AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint AS us)";

/// The library's two lease statements: take the row (minting the token), then free it
/// and notify the waiters.
fn pg_lease_floor(pool: PgPool) -> Variant {
    let acquire = format!(
        r#"{PG_NOW}
INSERT INTO "{FLOOR_TABLE}" AS held (name, owner, token, expires_at)
SELECT $1, $2, now.us, now.us + $3 FROM now
ON CONFLICT (name) DO UPDATE
SET owner = excluded.owner, token = held.token + 1, expires_at = excluded.expires_at
WHERE held.owner IS NULL OR held.expires_at <= (SELECT us FROM now)
RETURNING token"#
    );
    let release = format!(
        r#"{PG_NOW}, freed AS (
    UPDATE "{FLOOR_TABLE}" SET owner = NULL WHERE name = $1 AND owner = $2 AND token = $3
    RETURNING expires_at
)
SELECT freed.expires_at > now.us, pg_notify('{FLOOR_TABLE}', $1)::text FROM freed, now"#
    );
    let ttl_us = TTL.as_micros() as i64;
    Variant::new("sqlx upsert + update", Role::Floor, move || {
        let (pool, acquire, release) = (pool.clone(), acquire.clone(), release.clone());
        async move {
            let token: Option<i64> = sqlx::query_scalar(&acquire)
                .bind("s1")
                .bind("floor")
                .bind(ttl_us)
                .fetch_optional(&pool)
                .await?;
            let token = token.ok_or("floor: the row was already held")?;
            let live: Option<bool> = sqlx::query_scalar(&release)
                .bind("s1")
                .bind("floor")
                .bind(token)
                .fetch_optional(&pool)
                .await?;
            if live != Some(true) {
                return Err("floor: the row was not ours at release".into());
            }
            Ok(())
        }
    })
}

/// `pg_advisory_lock` then `pg_advisory_unlock` on one pooled connection.
fn pg_session_floor(pool: PgPool) -> Variant {
    Variant::new(
        "sqlx pg_advisory_lock + pg_advisory_unlock",
        Role::Floor,
        move || {
            let pool = pool.clone();
            async move {
                let mut conn = pool.acquire().await?;
                sqlx::query("SELECT pg_advisory_lock($1)")
                    .bind(FLOOR_KEY)
                    .execute(&mut *conn)
                    .await?;
                let freed: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
                    .bind(FLOOR_KEY)
                    .fetch_one(&mut *conn)
                    .await?;
                if !freed {
                    return Err("floor: the advisory lock was not held at unlock".into());
                }
                Ok(())
            }
        },
    )
}

/// The key of the raw advisory-lock floor in S1.
const FLOOR_KEY: i64 = 0x6265_6e63_6800_0001;

/// sqlx's `PgAdvisoryLock`: `acquire` then `release_now` on a pooled connection.
fn pg_advisory_peer(pool: PgPool) -> Variant {
    let lock = Arc::new(PgAdvisoryLock::new("bench-s1-peer"));
    Variant::new("sqlx PgAdvisoryLock", Role::Peer, move || {
        let (pool, lock) = (pool.clone(), Arc::clone(&lock));
        async move {
            let conn = pool.acquire().await?;
            let guard = lock.acquire(conn).await?;
            guard.release_now().await?;
            Ok(())
        }
    })
}

fn select_one_pg(pool: PgPool) -> Variant {
    Variant::new("SELECT 1", Role::Floor, move || {
        let pool = pool.clone();
        async move {
            let _: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&pool).await?;
            Ok(())
        }
    })
}

/// The raw advisory lock as one client of a hand-off: `pg_advisory_lock` waits in the
/// server's queue.
fn pg_advisory_side(pool: PgPool, name: &str) -> Side<PoolConnection<sqlx::Postgres>> {
    let key = (name.len() as i64) << 32 | 0x5334;
    Side::new(
        move || {
            let pool = pool.clone();
            async move {
                let mut conn = pool.acquire().await?;
                sqlx::query("SELECT pg_advisory_lock($1)")
                    .bind(key)
                    .execute(&mut *conn)
                    .await?;
                Ok(conn)
            }
        },
        move |mut conn: PoolConnection<sqlx::Postgres>| async move {
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(key)
                .execute(&mut *conn)
                .await?;
            Ok(())
        },
    )
}

fn pg_advisory_peer_side(pool: PgPool, name: &str) -> Side<PoolConnection<sqlx::Postgres>> {
    let lock = Arc::new(PgAdvisoryLock::new(format!("{name}-peer")));
    let release_lock = Arc::clone(&lock);
    Side::new(
        move || {
            let (pool, lock) = (pool.clone(), Arc::clone(&lock));
            async move {
                let conn = pool.acquire().await?;
                // Kept as a plain connection; `force_release` below gives it back.
                Ok(lock.acquire(conn).await?.leak())
            }
        },
        move |conn: PoolConnection<sqlx::Postgres>| {
            let lock = Arc::clone(&release_lock);
            async move {
                let (_, freed) = lock.force_release(conn).await?;
                if !freed {
                    return Err("PgAdvisoryLock: not held at release".into());
                }
                Ok(())
            }
        },
    )
}

// --- MariaDB ----------------------------------------------------------------------

async fn my_pool(url: &str) -> Result<MySqlPool> {
    let options: MySqlConnectOptions = url.parse()?;
    Ok(MySqlPoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await?)
}

fn my_create(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS `{table}` (
    name VARBINARY(512) NOT NULL PRIMARY KEY,
    owner VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
    token BIGINT NOT NULL, expires_at BIGINT NOT NULL) ENGINE = InnoDB"
    )
}

const MY_NOW: &str =
    "CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) AS SIGNED)";

/// The library's two lease statements: take the row (the token comes back through
/// `LAST_INSERT_ID`), then free it.
fn my_lease_floor(pool: MySqlPool) -> Variant {
    let acquire = format!(
        "INSERT INTO `{FLOOR_TABLE}` (name, owner, token, expires_at)
VALUES (?, ?, LAST_INSERT_ID({MY_NOW}), {MY_NOW} + ?)
ON DUPLICATE KEY UPDATE
    token = IF(expires_at <= {MY_NOW}, LAST_INSERT_ID(token + 1), token + 0 * LAST_INSERT_ID(0)),
    owner = IF(expires_at <= {MY_NOW}, VALUES(owner), owner),
    expires_at = IF(expires_at <= {MY_NOW}, VALUES(expires_at), expires_at)"
    );
    let release = format!(
        "UPDATE `{FLOOR_TABLE}` SET owner = NULL, expires_at = 0
WHERE name = ? AND owner = ? AND token = ? AND expires_at > {MY_NOW}"
    );
    let ttl_us = TTL.as_micros() as i64;
    Variant::new("sqlx upsert + update", Role::Floor, move || {
        let (pool, acquire, release) = (pool.clone(), acquire.clone(), release.clone());
        async move {
            let taken = sqlx::query(&acquire)
                .bind("s1".as_bytes())
                .bind("floor")
                .bind(ttl_us)
                .execute(&pool)
                .await?;
            let token = taken.last_insert_id();
            if token == 0 {
                return Err("floor: the row was already held".into());
            }
            let freed = sqlx::query(&release)
                .bind("s1".as_bytes())
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

/// `GET_LOCK` then `RELEASE_LOCK` on one pooled connection.
fn my_session_floor(pool: MySqlPool) -> Variant {
    Variant::new(
        "sqlx GET_LOCK + RELEASE_LOCK (raw; also the raw GET_LOCK peer)",
        Role::Floor,
        move || {
            let pool = pool.clone();
            async move {
                let mut conn = pool.acquire().await?;
                let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 10)")
                    .bind("bench-s1-floor")
                    .fetch_one(&mut *conn)
                    .await?;
                if got != Some(1) {
                    return Err("floor: GET_LOCK did not grant".into());
                }
                let freed: Option<i64> = sqlx::query_scalar("SELECT RELEASE_LOCK(?)")
                    .bind("bench-s1-floor")
                    .fetch_one(&mut *conn)
                    .await?;
                if freed != Some(1) {
                    return Err("floor: the named lock was not ours at release".into());
                }
                Ok(())
            }
        },
    )
}

/// `Questions` and the `Com_*` counters of the server so far.
async fn my_status(admin: &MySqlPool) -> Result<std::collections::BTreeMap<String, i64>> {
    use sqlx::Row;
    let rows = sqlx::raw_sql(
        "SHOW GLOBAL STATUS WHERE Variable_name = 'Questions' OR Variable_name LIKE 'Com\\_%'",
    )
    .fetch_all(admin)
    .await?;
    let mut status = std::collections::BTreeMap::new();
    for row in rows {
        let (name, value): (String, String) = (row.try_get(0)?, row.try_get(1)?);
        if let Ok(value) = value.parse() {
            status.insert(name, value);
        }
    }
    if !status.contains_key("Questions") {
        return Err("SHOW GLOBAL STATUS has no Questions".into());
    }
    Ok(status)
}

fn select_one_my(pool: MySqlPool) -> Variant {
    Variant::new("SELECT 1", Role::Floor, move || {
        let pool = pool.clone();
        async move {
            let _: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&pool).await?;
            Ok(())
        }
    })
}

/// The raw named lock as one client of a hand-off: `GET_LOCK` waits in the server.
fn get_lock_side(pool: MySqlPool, name: &str) -> Side<PoolConnection<MySql>> {
    let (key, release_key) = (format!("{name}-raw"), format!("{name}-raw"));
    Side::new(
        move || {
            let (pool, key) = (pool.clone(), key.clone());
            async move {
                let mut conn = pool.acquire().await?;
                let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 10)")
                    .bind(&key)
                    .fetch_one(&mut *conn)
                    .await?;
                if got != Some(1) {
                    return Err("GET_LOCK did not grant within 10 s".into());
                }
                Ok(conn)
            }
        },
        move |mut conn: PoolConnection<MySql>| {
            let key = release_key.clone();
            async move {
                sqlx::query("SELECT RELEASE_LOCK(?)")
                    .bind(&key)
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            }
        },
    )
}
