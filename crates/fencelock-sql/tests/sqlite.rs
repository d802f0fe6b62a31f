//! The SQLite store's own rules, on real database files in temporary directories.
//! (The shared contract runs against it from `fencelock-conformance`.)

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fencelock_core::{
    Error, FenceGate, FencingToken, Lease, LockBackend, OwnerId, WaitKind, WaitPolicy,
};
use fencelock_sql::{SqliteBackend, SqliteConfig, SqliteFenceGate};
use sqlx::Row;
use tempfile::TempDir;
use tokio::time::Instant;

mod common;

use common::{HOUR, MINUTE, assert_lost, bounded, name, request};

/// The database clock in ms, as the store computes it.
const DB_NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

fn db_path(dir: &TempDir) -> PathBuf {
    dir.path().join("locks.db")
}

async fn open(path: &Path) -> SqliteBackend {
    SqliteBackend::open(path).await.unwrap()
}

/// The stored `(owner, token)` of a row, read as an operator would.
async fn row(backend: &SqliteBackend, key: &str) -> Option<(Option<String>, i64)> {
    let sql = format!(
        "SELECT owner, token FROM {} WHERE name = ?1",
        backend.table()
    );
    sqlx::query(&sql)
        .bind(key)
        .fetch_optional(backend.pool())
        .await
        .unwrap()
        .map(|row| (row.get(0), row.get(1)))
}

fn assert_contended(result: fencelock_core::Result<Lease>) {
    match result {
        Err(Error::Contended {
            store: "sqlite", ..
        }) => {}
        other => panic!("expected Error::Contended, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_grant_of_a_name_gets_a_higher_token_than_the_last() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let backend = open(&db_path(&dir)).await;
        let mut last = FencingToken(0);
        for _ in 0..5 {
            let lease = backend.acquire(request("jobs/a", MINUTE)).await.unwrap();
            assert!(lease.token() > last, "{:?} after {last:?}", lease.token());
            last = lease.token();
            backend.release(&lease).await.unwrap();
        }
        // The row outlives every release: it carries the counter.
        assert_eq!(
            row(&backend, "jobs/a").await.map(|r| r.1),
            Some(last.0 as i64)
        );
        assert!(backend.capabilities().fencing);
        assert_eq!(backend.capabilities().wait, WaitKind::Poll);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_rising_after_an_operator_deletes_the_row() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let backend = open(&db_path(&dir)).await;
        let mut last = FencingToken(0);
        for _ in 0..3 {
            let lease = backend.acquire(request("a", MINUTE)).await.unwrap();
            last = lease.token();
            backend.release(&lease).await.unwrap();
        }
        let delete = format!("DELETE FROM {} WHERE name = 'a'", backend.table());
        sqlx::query(&delete).execute(backend.pool()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        let lease = backend.acquire(request("a", MINUTE)).await.unwrap();
        assert!(lease.token() > last, "{:?} after {last:?}", lease.token());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_rising_after_the_database_file_is_lost() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let path = db_path(&dir);
        let backend = open(&path).await;
        let mut last = FencingToken(0);
        for _ in 0..3 {
            let lease = backend.acquire(request("a", MINUTE)).await.unwrap();
            last = lease.token();
            backend.release(&lease).await.unwrap();
        }
        backend.pool().close().await;
        drop(backend);
        for suffix in ["", "-wal", "-shm"] {
            let file = PathBuf::from(format!("{}{suffix}", path.display()));
            if file.exists() {
                std::fs::remove_file(file).unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        let backend = open(&path).await;
        let lease = backend.acquire(request("a", MINUTE)).await.unwrap();
        assert!(lease.token() > last, "{:?} after {last:?}", lease.token());
        // A new row starts from the clock in microseconds.
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        assert!(
            lease.token().0.abs_diff(now_us) < 60_000_000,
            "token {:?} is not near the clock in µs ({now_us})",
            lease.token()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_backends_on_one_file_exclude_each_other() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let a = open(&db_path(&dir)).await;
        let b = open(&db_path(&dir)).await;
        let held = a.acquire(request("shared", MINUTE)).await.unwrap();
        assert_contended(b.acquire(request("shared", MINUTE)).await);
        let seen = b.inspect(&name("shared")).await.unwrap().expect("held");
        assert_eq!(
            (seen.holder, seen.token),
            (held.owner().clone(), held.token())
        );
        a.release(&held).await.unwrap();
        let next = b.acquire(request("shared", MINUTE)).await.unwrap();
        assert!(next.token() > held.token());
        assert_contended(a.acquire(request("shared", MINUTE)).await);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_judged_by_the_database_clock_only() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let a = open(&db_path(&dir)).await;
        let b = open(&db_path(&dir)).await;
        let held = a.acquire(request("clock", MINUTE)).await.unwrap();
        // The stored expiry is the database's now + ttl.
        let sql = format!(
            "SELECT expires_at - {DB_NOW_MS} FROM {} WHERE name = 'clock'",
            a.table()
        );
        let left: i64 = sqlx::query_scalar(&sql).fetch_one(a.pool()).await.unwrap();
        assert!((55_000..=60_000).contains(&left), "{left} ms left");
        // Move the expiry into the database's past: the lock is free at once, although
        // the holder's local validity still has a minute to run.
        let expire = format!(
            "UPDATE {} SET expires_at = {DB_NOW_MS} - 1 WHERE name = 'clock'",
            a.table()
        );
        sqlx::query(&expire).execute(a.pool()).await.unwrap();
        assert!(held.remaining() > Duration::from_secs(50));
        assert!(a.inspect(&name("clock")).await.unwrap().is_none());
        let taken = b.acquire(request("clock", MINUTE)).await.unwrap();
        assert_lost(a.renew(&held, MINUTE).await);
        // And inspect reports the remaining time by the database's clock.
        let extend = format!(
            "UPDATE {} SET expires_at = {DB_NOW_MS} + 30000 WHERE name = 'clock'",
            a.table()
        );
        sqlx::query(&extend).execute(a.pool()).await.unwrap();
        let state = a.inspect(&name("clock")).await.unwrap().expect("held");
        let remaining = state.remaining.unwrap();
        assert!(
            remaining > Duration::from_secs(25) && remaining <= Duration::from_secs(30),
            "{remaining:?}"
        );
        assert_eq!(state.token, taken.token());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_is_not_taken_before_its_ttl_and_is_free_after_it() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let a = open(&db_path(&dir)).await;
        let b = open(&db_path(&dir)).await;
        let held = a
            .acquire(request("ttl", Duration::from_millis(300)))
            .await
            .unwrap();
        assert_contended(b.acquire(request("ttl", MINUTE)).await);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(b.inspect(&name("ttl")).await.unwrap().is_none());
        let next = b.acquire(request("ttl", MINUTE)).await.unwrap();
        assert!(next.token() > held.token());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_and_release_act_only_for_the_same_owner_and_token() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let backend = open(&db_path(&dir)).await;
        let held = backend.acquire(request("own", MINUTE)).await.unwrap();
        let valid = Instant::now() + MINUTE;
        let other_owner = Lease::new(name("own"), OwnerId::random(), held.token(), valid);
        let other_token = Lease::new(
            name("own"),
            held.owner().clone(),
            FencingToken(held.token().0 + 1),
            valid,
        );
        for forged in [&other_owner, &other_token] {
            assert_lost(backend.renew(forged, MINUTE).await);
            assert_lost(backend.release(forged).await);
        }
        let state = backend
            .inspect(&name("own"))
            .await
            .unwrap()
            .expect("still held");
        assert_eq!(
            (state.holder, state.token),
            (held.owner().clone(), held.token())
        );

        let renewed = backend.renew(&held, MINUTE).await.unwrap();
        assert_eq!(renewed.token(), held.token());
        assert!(renewed.valid_until() >= held.valid_until());
        backend.release(&renewed).await.unwrap();
        assert!(backend.inspect(&name("own")).await.unwrap().is_none());
        assert_lost(backend.release(&renewed).await);
        assert_lost(backend.renew(&renewed, MINUTE).await);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_an_expired_lease_frees_the_row_and_reports_lost() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let backend = open(&db_path(&dir)).await;
        let held = backend
            .acquire(request("late", Duration::from_millis(50)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_lost(backend.renew(&held, MINUTE).await);
        assert_lost(backend.release(&held).await);
        assert_eq!(
            row(&backend, "late").await,
            Some((None, held.token().0 as i64))
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_after_a_takeover_reports_lost_and_leaves_the_new_holder_alone() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let a = open(&db_path(&dir)).await;
        let b = open(&db_path(&dir)).await;
        let old = a
            .acquire(request("x", Duration::from_millis(50)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let new = b.acquire(request("x", MINUTE)).await.unwrap();
        assert_lost(a.release(&old).await);
        let state = b.inspect(&name("x")).await.unwrap().expect("still held");
        assert_eq!(
            (state.holder, state.token),
            (new.owner().clone(), new.token())
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_all_renews_several_leases_and_reports_each_lost_one_in_order() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let backend = open(&db_path(&dir)).await;
        common::renew_all_renews_several_leases_and_reports_each_lost_one(&backend).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_all_renews_more_leases_than_one_statement_carries() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let backend = open(&db_path(&dir)).await;
        let mut batch = Vec::new();
        for i in 0..1200 {
            let lease = backend
                .acquire(request(&format!("many/{i}"), MINUTE))
                .await
                .unwrap();
            batch.push((lease, Duration::from_secs(120)));
        }
        let results = backend.renew_all(&batch).await;
        assert_eq!(results.len(), batch.len());
        for (result, (lease, _)) in results.iter().zip(&batch) {
            let renewed = result.as_ref().unwrap();
            assert_eq!(renewed.name(), lease.name());
            assert!(renewed.remaining() > Duration::from_secs(100));
        }
    })
    .await;
}

/// A backend whose waiters poll only once an hour: a waiter it grants within a test's
/// bound was woken by something other than its poll timer.
async fn open_never_polling(path: &Path) -> SqliteBackend {
    let mut config = SqliteConfig::new(path);
    config.poll_min = HOUR;
    config.poll_max = HOUR;
    SqliteBackend::connect(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_in_the_same_process_is_woken_by_a_release_not_by_its_poll() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let backend = open_never_polling(&db_path(&dir)).await;
        // Only the in-process wake on release can grant it.
        common::a_release_wakes_a_never_polling_waiter(&backend, &backend, "handoff").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_in_another_process_gets_the_lock_by_polling_after_a_release() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let a = open(&db_path(&dir)).await;
        let b = open(&db_path(&dir)).await;
        common::a_waiter_in_another_client_polls_after_a_release(&a, b).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_wakes_when_the_holder_expires_without_releasing() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let a = open(&db_path(&dir)).await;
        let b = open_never_polling(&db_path(&dir)).await;
        common::a_waiter_wakes_when_the_holder_expires(&a, &b, 3).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_on_a_held_lock_ends_with_timeout_and_no_wait_with_contended() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let backend = open(&db_path(&dir)).await;
        let _held = backend.acquire(request("busy", MINUTE)).await.unwrap();
        assert_contended(backend.acquire(request("busy", MINUTE)).await);
        let wait = Duration::from_millis(300);
        let req = request("busy", MINUTE).with_wait(WaitPolicy::Until(wait));
        match backend.acquire(req).await {
            Err(Error::Timeout { waited, .. }) => assert!(waited >= wait, "{waited:?}"),
            other => panic!("expected Error::Timeout, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_dropped_mid_statement_leaves_no_grant_behind() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let a = open(&db_path(&dir)).await;
        let b = open(&db_path(&dir)).await;
        // Another connection holds the write lock, so the acquire statement is sent and
        // then waits inside SQLite when its future is dropped.
        let mut blocker = b.pool().acquire().await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *blocker)
            .await
            .unwrap();
        let dropped = tokio::time::timeout(
            Duration::from_millis(200),
            a.acquire(request("cancel", MINUTE)),
        )
        .await;
        assert!(
            dropped.is_err(),
            "the acquire was still in flight when dropped"
        );
        sqlx::query("COMMIT").execute(&mut *blocker).await.unwrap();
        drop(blocker);
        // The dropped statement still ran (the row exists) and was undone by owner.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match row(&b, "cancel").await {
                Some((None, _)) => break,
                other => {
                    assert!(Instant::now() < deadline, "left behind: {other:?}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        assert!(b.inspect(&name("cancel")).await.unwrap().is_none());
        b.acquire(request("cancel", MINUTE)).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_database_is_a_temporary_error_naming_the_lock_and_the_file() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let mut config = SqliteConfig::new(db_path(&dir));
        config.busy_timeout = Duration::ZERO;
        let a = SqliteBackend::connect(config).await.unwrap();
        let b = open(&db_path(&dir)).await;
        let mut blocker = b.pool().acquire().await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *blocker)
            .await
            .unwrap();
        let err = a.acquire(request("orders/42", MINUTE)).await.unwrap_err();
        sqlx::query("ROLLBACK")
            .execute(&mut *blocker)
            .await
            .unwrap();
        assert!(err.is_temporary(), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("orders/42")
                && text.contains("sqlite")
                && text.contains(&db_path(&dir).display().to_string()),
            "{text}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_backends_opening_one_new_file_at_once_all_connect_in_wal_mode() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let path = db_path(&dir);
        let opening: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                tokio::spawn(async move { SqliteBackend::open(path).await })
            })
            .collect();
        let mut backends = Vec::new();
        for task in opening {
            backends.push(task.await.unwrap().unwrap());
        }
        backends[0].migrate().await.unwrap();
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(backends[0].pool())
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let held = backends[3].acquire(request("m", MINUTE)).await.unwrap();
        assert_eq!(
            backends[7]
                .inspect(&name("m"))
                .await
                .unwrap()
                .map(|s| s.token),
            Some(held.token())
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_directory_is_a_config_error_naming_it() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("missing").join("locks.db");
        let err = SqliteBackend::open(&path).await.unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains(&path.display().to_string()) && text.contains("mkdir -p"),
            "{text}"
        );
        assert!(
            !path.parent().unwrap().exists(),
            "the directory was not created"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_keep_the_same_name_apart_in_one_table() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let with_prefix = |prefix: &str| {
            let mut config = SqliteConfig::new(db_path(&dir));
            config.prefix = prefix.to_owned();
            SqliteBackend::connect(config)
        };
        let a = with_prefix("a/").await.unwrap();
        let b = with_prefix("b/").await.unwrap();
        let held_a = a.acquire(request("x", MINUTE)).await.unwrap();
        let held_b = b.acquire(request("x", MINUTE)).await.unwrap();
        assert_eq!(
            row(&a, "a/x").await.and_then(|r| r.0),
            Some(held_a.owner().to_string())
        );
        assert_eq!(
            row(&a, "b/x").await.and_then(|r| r.0),
            Some(held_b.owner().to_string())
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_in_a_transaction_refuses_a_stale_token_and_its_write_rolls_back() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let gate = SqliteFenceGate::open(db_path(&dir)).await.unwrap();
        sqlx::query("CREATE TABLE ledger (entry TEXT NOT NULL)")
            .execute(gate.pool())
            .await
            .unwrap();
        let write = |entry: &'static str, token: u64| {
            let gate = gate.clone();
            async move {
                let mut tx = gate.pool().begin().await.unwrap();
                sqlx::query("INSERT INTO ledger (entry) VALUES (?1)")
                    .bind(entry)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                gate.admit_in(&mut *tx, "ledger", FencingToken(token))
                    .await?;
                tx.commit().await.unwrap();
                Ok::<_, Error>(())
            }
        };
        write("first", 10).await.unwrap();
        write("same holder again", 10).await.unwrap();
        match write("stale", 5).await {
            Err(Error::StaleToken {
                resource,
                token: FencingToken(5),
                highest: FencingToken(10),
            }) => assert_eq!(resource, "ledger"),
            other => panic!("expected StaleToken, got {other:?}"),
        }
        write("next holder", 11).await.unwrap();
        let entries: Vec<String> = sqlx::query_scalar("SELECT entry FROM ledger ORDER BY rowid")
            .fetch_all(gate.pool())
            .await
            .unwrap();
        assert_eq!(entries, ["first", "same holder again", "next holder"]);

        // A check whose transaction rolls back admits nothing.
        let mut tx = gate.pool().begin().await.unwrap();
        gate.admit_in(&mut *tx, "ledger", FencingToken(99))
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(
            gate.highest("ledger").await.unwrap(),
            Some(FencingToken(11))
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_admits_equal_and_higher_tokens_per_resource_and_refuses_lower_ones() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let backend = open(&db_path(&dir)).await;
        let gate = backend.fence_gate().await.unwrap();
        let first = backend.acquire(request("res", MINUTE)).await.unwrap();
        backend.release(&first).await.unwrap();
        let second = backend.acquire(request("res", MINUTE)).await.unwrap();
        gate.admit("res", second.token()).await.unwrap();
        gate.admit("res", second.token()).await.unwrap();
        gate.admit("other", first.token()).await.unwrap();
        match gate.admit("res", first.token()).await {
            Err(Error::StaleToken { highest, .. }) => assert_eq!(highest, second.token()),
            other => panic!("expected StaleToken, got {other:?}"),
        }
        assert_eq!(gate.highest("res").await.unwrap(), Some(second.token()));
        assert_eq!(gate.highest("never").await.unwrap(), None);
        assert_eq!(gate.table(), "fencelock_fences");
    })
    .await;
}
