//! The Postgres store's own rules, on real servers started per test by the
//! conformance harness: crashes, killed sessions, release notifications, batched
//! renewals and the fence gate inside a user's transaction. (The shared contract runs
//! against it from `fencelock-conformance`.)
#![cfg(feature = "postgres")]

use std::time::Duration;

use fencelock_conformance::harness::{PgBouncer, Postgres, Server};
use fencelock_core::{Error, FenceGate, LeaseKind, LockBackend, Locker, WaitKind, WaitPolicy};
use fencelock_sql::{PostgresBackend, PostgresConfig, PostgresFenceGate, sqlx};
use tokio::time::Instant;

mod common;

use common::{HOUR, MINUTE, ServerStore, bounded, eventually, name, request};

/// The Postgres store, for the shared test bodies.
struct Pg;

impl ServerStore for Pg {
    type Server = Postgres;
    type Backend = PostgresBackend;
    type Gate = PostgresFenceGate;

    const UNREACHABLE_URL: &'static str =
        "postgres://app:hunter2@127.0.0.1:1/db?connect_timeout=2s";
    const UNREACHABLE_HINT: &'static str = "check that the Postgres server";

    async fn start() -> Postgres {
        server().await
    }

    async fn open_url(url: &str) -> fencelock_core::Result<PostgresBackend> {
        PostgresBackend::open(url).await
    }

    async fn migrate(backend: &PostgresBackend) -> fencelock_core::Result<()> {
        backend.migrate().await
    }

    async fn fence_gate(backend: &PostgresBackend) -> PostgresFenceGate {
        backend.fence_gate().await.unwrap()
    }
}

common::server_store_tests!(Pg);

async fn server() -> Postgres {
    Postgres::start().await.expect("start postgres")
}

async fn open(server: &Postgres) -> PostgresBackend {
    PostgresBackend::open(&server.url()).await.unwrap()
}

/// A backend whose waiters check a held lock only once an hour: a waiter it grants
/// within a test's bound was woken by a notification.
async fn open_never_polling(server: &Postgres) -> PostgresBackend {
    let mut config = PostgresConfig::from_url(&server.url()).unwrap();
    config.poll_min = HOUR;
    config.poll_max = HOUR;
    PostgresBackend::connect(config).await.unwrap()
}

/// Terminates every other session of the database, as an operator would with
/// `pg_terminate_backend`; returns how many.
async fn terminate_other_sessions(operator: &PostgresBackend) -> i64 {
    sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE pid <> pg_backend_pid() AND datname = current_database()",
    )
    .fetch_one(operator.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_woken_by_notify_not_by_polling() {
    bounded(async {
        let server = server().await;
        let a = open(&server).await;
        let b = open_never_polling(&server).await;
        assert_eq!(b.capabilities().wait, WaitKind::Notify);
        // Only the NOTIFY of a's release, through b's own listener, can grant it.
        common::a_release_wakes_a_never_polling_waiter(&a, &b, "notify").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_wakes_when_the_holder_expires_without_releasing() {
    bounded(async {
        let server = server().await;
        let a = open(&server).await;
        let b = open_never_polling(&server).await;
        common::a_waiter_wakes_when_the_holder_expires(&a, &b, 1).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_all_renews_several_leases_in_one_statement_and_reports_each_lost_one() {
    bounded(async {
        let server = server().await;
        let backend = open(&server).await;
        common::renew_all_renews_several_leases_and_reports_each_lost_one(&backend).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sessions_do_not_lose_a_lease_and_the_listener_comes_back() {
    bounded(async {
        let server = server().await;
        let operator = open(&server).await;
        let holder = Locker::new(open(&server).await);
        let b = open_never_polling(&server).await;
        let ttl = Duration::from_millis(900);
        let guard = holder.lock("killed").ttl(ttl).await.unwrap();
        // Every session but the operator's: the holder's pool and listener, and b's.
        assert!(terminate_other_sessions(&operator).await >= 2);
        // A lease is a row, not a session: the watchdog reconnects and keeps it.
        tokio::time::sleep(ttl * 3).await;
        assert!(guard.is_held(), "the lease survived its sessions");
        let state = operator.inspect(&name("killed")).await.unwrap().unwrap();
        assert_eq!(state.token, guard.token());
        assert!(matches!(
            b.acquire(request("killed", MINUTE)).await,
            Err(Error::Contended { .. })
        ));
        guard.release().await.unwrap();
        // b's listener reconnected: a release wakes b's waiter, which checks the lock
        // once an hour and whose holder's TTL is an hour.
        let held = operator.acquire(request("killed", HOUR)).await.unwrap();
        let waiter = b.clone();
        let waiting = tokio::spawn(async move {
            let req = request("killed", MINUTE).with_wait(WaitPolicy::Until(HOUR));
            waiter.acquire(req).await.unwrap()
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        operator.release(&held).await.unwrap();
        assert!(waiting.await.unwrap().token() > held.token());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_time_zone_changes_nothing_expiry_is_database_epoch_time() {
    bounded(async {
        let server = server().await;
        let operator = open(&server).await;
        // New sessions of a start 14 hours ahead of UTC, of b 12 hours behind.
        let set_zone = |zone: &'static str| {
            let pool = operator.pool().clone();
            async move {
                sqlx::query(&format!("ALTER DATABASE postgres SET timezone = '{zone}'"))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        };
        set_zone("Etc/GMT-14").await;
        let a = open(&server).await;
        set_zone("Etc/GMT+12").await;
        let b = open(&server).await;
        let ttl = Duration::from_millis(1500);
        let held = a.acquire(request("zones", ttl)).await.unwrap();
        assert!(matches!(
            b.acquire(request("zones", ttl)).await,
            Err(Error::Contended { .. })
        ));
        let remaining = b.inspect(&name("zones")).await.unwrap().unwrap().remaining;
        assert!(remaining.unwrap() <= ttl, "{remaining:?}");
        let lease = b
            .acquire(request("zones", ttl).with_wait(WaitPolicy::Until(MINUTE)))
            .await
            .unwrap();
        assert!(Instant::now() >= held.valid_until());
        assert!(lease.token() > held.token());
    })
    .await;
}

common::fence_gate_transaction_test!(
    gate: PostgresFenceGate,
    conn: sqlx::PgConnection,
    create_accounts: "CREATE TABLE accounts (id INT PRIMARY KEY, balance INT NOT NULL)",
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_killed_holder_session_is_lost_frees_the_lock_and_is_fenced() {
    bounded(async {
        let server = server().await;
        let session_url = format!("{}?mode=session", server.url());
        let holder = Locker::new(PostgresBackend::open(&session_url).await.unwrap());
        let other = PostgresBackend::open(&session_url).await.unwrap();
        assert_eq!(other.capabilities().lease, LeaseKind::Session);
        let operator = open(&server).await;
        let gate = operator.fence_gate().await.unwrap();
        let ttl = Duration::from_secs(6);
        let guard = holder.lock("session").ttl(ttl).await.unwrap();
        let old = guard.lease().clone();
        gate.admit("session", old.token()).await.unwrap();
        let pid: i32 = sqlx::query_scalar(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
               AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0)",
        )
        .bind("session")
        .fetch_one(operator.pool())
        .await
        .unwrap();
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(operator.pool())
            .await
            .unwrap();
        let next = other
            .acquire(request("session", MINUTE).with_wait(WaitPolicy::Until(MINUTE)))
            .await
            .unwrap();
        // Granted within the holder's TTL: only the end of its session freed it.
        assert!(Instant::now() < old.valid_until());
        assert!(next.token() > old.token());
        // The watchdog's next probe (at ttl/3) finds the session gone.
        let lost = guard.lost().await;
        assert!(lost.is_lost(), "{lost:?}");
        gate.admit("session", next.token()).await.unwrap();
        assert!(matches!(
            gate.admit("session", old.token()).await,
            Err(Error::StaleToken { .. })
        ));
        let state = other.inspect(&name("session")).await.unwrap().unwrap();
        assert_eq!(
            (state.holder, state.token, state.remaining),
            (next.owner().clone(), next.token(), None)
        );
    })
    .await;
}

/// A session-mode backend whose waiters would poll only once an hour, if they polled.
async fn open_session_never_polling(server: &Postgres) -> PostgresBackend {
    let url = format!("{}?mode=session", server.url());
    let mut config = PostgresConfig::from_url(&url).unwrap();
    config.poll_min = HOUR;
    config.poll_max = HOUR;
    PostgresBackend::connect(config).await.unwrap()
}

/// The advisory lock entries of `key` in `pg_locks`: `(pid, granted)`, with when the
/// session's current statement started (µs since the epoch).
async fn advisory_entries(operator: &PostgresBackend, key: &str) -> Vec<(i32, bool, i64)> {
    sqlx::query_as(
        "SELECT l.pid, l.granted, (extract(epoch FROM a.query_start) * 1000000)::bigint
         FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.objsubid = 1
           AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended($1, 0)
         ORDER BY l.granted DESC, l.pid",
    )
    .bind(key)
    .fetch_all(operator.pool())
    .await
    .unwrap()
}

/// The one server session waiting for the advisory lock of `key`, once it shows up
/// (checked every 20 ms, at most 1,000 times).
async fn waiting_session(operator: &PostgresBackend, key: &str) -> (i32, i64) {
    for _ in 0..1000 {
        let waiting: Vec<_> = advisory_entries(operator, key)
            .await
            .into_iter()
            .filter(|(_, granted, _)| !granted)
            .collect();
        assert!(
            waiting.len() <= 1,
            "one waiter, one queue entry: {waiting:?}"
        );
        if let Some(&(pid, _, started)) = waiting.first() {
            return (pid, started);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no server session waited for `{key}`");
}

/// Whether the server session `pid` still exists.
async fn session_exists(operator: &PostgresBackend, pid: i32) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
        .bind(pid)
        .fetch_one(operator.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_waiter_waits_in_the_servers_queue_and_is_granted_on_release() {
    bounded(async {
        let server = server().await;
        let holder = open_session_never_polling(&server).await;
        let waiter = open_session_never_polling(&server).await;
        let operator = open(&server).await;
        let held = holder.acquire(request("queued", MINUTE)).await.unwrap();
        let waiting = tokio::spawn(async move {
            let lease = waiter
                .acquire(request("queued", MINUTE).with_wait(WaitPolicy::Forever))
                .await;
            (waiter, lease)
        });
        // The waiter is one server session blocked in the lock's queue
        // (`granted = false`), on one statement that is still the same one later: it
        // does not retry.
        let (pid, started) = waiting_session(&operator, "queued").await;
        let (reason, statement): (String, String) =
            sqlx::query_as("SELECT wait_event_type, query FROM pg_stat_activity WHERE pid = $1")
                .bind(pid)
                .fetch_one(operator.pool())
                .await
                .unwrap();
        assert_eq!(reason, "Lock");
        assert!(statement.contains("pg_advisory_lock("), "{statement}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(waiting_session(&operator, "queued").await, (pid, started));
        // Its poll is an hour away: the release itself lets the server grant it, to
        // that very session.
        holder.release(&held).await.unwrap();
        let (waiter, lease) = waiting.await.unwrap();
        let lease = lease.unwrap();
        assert!(lease.token() > held.token());
        let entries = advisory_entries(&operator, "queued").await;
        assert_eq!(
            entries.iter().map(|(p, g, _)| (*p, *g)).collect::<Vec<_>>(),
            vec![(pid, true)]
        );
        waiter.release(&lease).await.unwrap();
        assert!(advisory_entries(&operator, "queued").await.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_cancelled_waiter_leaves_the_queue_and_never_takes_the_lock() {
    bounded(async {
        let server = server().await;
        let holder = open_session_never_polling(&server).await;
        let waiter = open_session_never_polling(&server).await;
        let operator = open(&server).await;
        let held = holder.acquire(request("cancel", MINUTE)).await.unwrap();
        let waiting = tokio::spawn(async move {
            waiter
                .acquire(request("cancel", MINUTE).with_wait(WaitPolicy::Forever))
                .await
        });
        let (pid, _) = waiting_session(&operator, "cancel").await;
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
        // The cancelled acquire's server session is ended.
        let gone = session_ends(&operator, pid).await;
        assert!(gone, "the cancelled waiter's session {pid} still exists");
        // Nobody queues any more; after the release the lock is free for anyone.
        let entries = advisory_entries(&operator, "cancel").await;
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert!(entries[0].1);
        holder.release(&held).await.unwrap();
        assert!(advisory_entries(&operator, "cancel").await.is_empty());
        let other = open_session_never_polling(&server).await;
        let next = other.acquire(request("cancel", MINUTE)).await.unwrap();
        assert!(next.token() > held.token());
        other.release(&next).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_wait_deadline_ends_the_servers_wait_with_timeout() {
    bounded(async {
        let server = server().await;
        let holder = open_session_never_polling(&server).await;
        let waiter = open_session_never_polling(&server).await;
        let operator = open(&server).await;
        let held = holder.acquire(request("deadline", MINUTE)).await.unwrap();
        let wait = Duration::from_millis(300);
        let start = Instant::now();
        let result = waiter
            .acquire(request("deadline", MINUTE).with_wait(WaitPolicy::Until(wait)))
            .await;
        assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
        assert!(start.elapsed() >= wait);
        // Only the holder is left: the timed-out wait left no queue entry.
        let entries = advisory_entries(&operator, "deadline").await;
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert!(entries[0].1);
        // The waiter's pool still works, and the lock is the holder's.
        assert!(matches!(
            waiter.acquire(request("deadline", MINUTE)).await,
            Err(Error::Contended { .. })
        ));
        holder.release(&held).await.unwrap();
        let next = waiter.acquire(request("deadline", MINUTE)).await.unwrap();
        assert!(next.token() > held.token());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_refuses_a_transaction_pooling_pgbouncer_and_says_what_to_do() {
    bounded(async {
        let server = server().await;
        let bouncer = PgBouncer::start_transaction_pooling(&server).await.unwrap();
        // Refused at connect, every time, naming the cause and the fix.
        for _ in 0..3 {
            let result = PostgresBackend::open(&format!("{}?mode=session", bouncer.url())).await;
            match result {
                Err(Error::Unsupported { store, what }) => {
                    assert_eq!(store, "postgres");
                    assert!(what.contains("transaction pooling proxy"), "{what}");
                    assert!(what.contains("pg_backend_pid() changed"), "{what}");
                    assert!(what.contains("directly"), "{what}");
                    assert!(what.contains("?mode=lease"), "{what}");
                    assert!(what.contains(&bouncer.addr().to_string()), "{what}");
                }
                other => panic!("expected Error::Unsupported, got {other:?}"),
            }
        }
        // The same URL straight to the server is fine.
        let direct = PostgresBackend::open(&format!("{}?mode=session", server.url()))
            .await
            .unwrap();
        let lease = direct.acquire(request("bounced", MINUTE)).await.unwrap();
        direct.release(&lease).await.unwrap();
    })
    .await;
}

/// Statements run by role `locker`, as `pg_stat_statements` counts them (every
/// execution, including utility statements; protocol-level syncs and pings are not
/// statements).
async fn statements_of_locker(operator: &PostgresBackend) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(sum(s.calls), 0)::bigint FROM pg_stat_statements AS s
         JOIN pg_roles AS r ON r.oid = s.userid WHERE r.rolname = 'locker'",
    )
    .fetch_one(operator.pool())
    .await
    .unwrap()
}

/// The operator (running as `postgres`) and a client of `server` with `options` whose
/// every statement runs as role `locker`, so [`statements_of_locker`] counts exactly
/// the client's.
async fn locker_client(server: &Postgres, options: &str) -> (PostgresBackend, PostgresBackend) {
    let operator = open(server).await;
    for statement in [
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
        "CREATE ROLE locker LOGIN SUPERUSER",
    ] {
        sqlx::query(statement)
            .execute(operator.pool())
            .await
            .unwrap();
    }
    let url = format!("{}{options}", server.url().replace("postgres@", "locker@"));
    let client = PostgresBackend::open(&url).await.unwrap();
    (operator, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_mode_acquire_and_release_are_exactly_two_statements() {
    bounded(async {
        let server = server().await;
        let (operator, client) = locker_client(&server, "").await;
        // Warm up: the pool's connection is open and the statements are prepared.
        for _ in 0..2 {
            let lease = client.acquire(request("counted", MINUTE)).await.unwrap();
            client.release(&lease).await.unwrap();
        }
        let rounds = 5;
        let before = statements_of_locker(&operator).await;
        for _ in 0..rounds {
            let lease = client.acquire(request("counted", MINUTE)).await.unwrap();
            client.release(&lease).await.unwrap();
        }
        let after = statements_of_locker(&operator).await;
        assert_eq!(
            after - before,
            2 * rounds,
            "statements for {rounds} acquire+release"
        );
        // And nothing else ran meanwhile: the count is still.
        assert_eq!(statements_of_locker(&operator).await, after);
    })
    .await;
}

/// The server session holding the advisory lock of `key`: its pid and when it
/// started (µs since the epoch), which together name it even if a pid is reused.
async fn advisory_holder(operator: &PostgresBackend, key: &str) -> (i32, i64) {
    sqlx::query_as(
        "SELECT l.pid, (extract(epoch FROM a.backend_start) * 1000000)::bigint
         FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
           AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended($1, 0)",
    )
    .bind(key)
    .fetch_one(operator.pool())
    .await
    .unwrap()
}

/// Waits (bounded) until server session `pid` has ended; whether it did.
async fn session_ends(operator: &PostgresBackend, pid: i32) -> bool {
    eventually(|| async { !session_exists(operator, pid).await }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_20_lock_cycles_run_on_one_server_session() {
    bounded(async {
        let server = server().await;
        let backend = PostgresBackend::open(&format!("{}?mode=session", server.url()))
            .await
            .unwrap();
        let operator = open(&server).await;
        let mut sessions = std::collections::HashSet::new();
        let mut last = None;
        for cycle in 0..20 {
            // Both ways of taking the lock: trying, and waiting in the server's queue
            // (which sets and lifts `lock_timeout`).
            let mut req = request("reuse", HOUR);
            if cycle % 2 == 1 {
                req = req.with_wait(WaitPolicy::Until(MINUTE));
            }
            let lease = backend.acquire(req).await.unwrap();
            assert!(last.is_none_or(|last| lease.token() > last));
            last = Some(lease.token());
            sessions.insert(advisory_holder(&operator, "reuse").await);
            backend.release(&lease).await.unwrap();
        }
        assert_eq!(sessions.len(), 1, "{sessions:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_kept_connection_that_died_is_replaced_and_the_acquire_succeeds() {
    bounded(async {
        let server = server().await;
        let backend = PostgresBackend::open(&format!("{}?mode=session", server.url()))
            .await
            .unwrap();
        let operator = open(&server).await;
        for wait in [false, true] {
            let lease = backend.acquire(request("dies", HOUR)).await.unwrap();
            let (pid, _) = advisory_holder(&operator, "dies").await;
            backend.release(&lease).await.unwrap();
            // The released lock's connection is kept; its server session is ended.
            let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
                .bind(pid)
                .fetch_one(operator.pool())
                .await
                .unwrap();
            assert!(ended && session_ends(&operator, pid).await);
            let mut req = request("dies", HOUR);
            if wait {
                req = req.with_wait(WaitPolicy::Until(MINUTE));
            }
            let next = backend.acquire(req).await.unwrap();
            assert!(next.token() > lease.token());
            assert_ne!(advisory_holder(&operator, "dies").await.0, pid);
            backend.release(&next).await.unwrap();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_at_most_pool_size_released_connections_and_closes_the_rest() {
    bounded(async {
        let server = server().await;
        let url = format!("{}?mode=session&pool_size=2", server.url());
        let backend = PostgresBackend::open(&url).await.unwrap();
        let operator = open(&server).await;
        let keys = ["k0", "k1", "k2", "k3", "k4"];
        let mut rounds = Vec::new();
        for _ in 0..2 {
            // Five locks held at once, more than the pool's connections.
            let mut leases = Vec::new();
            let mut sessions = std::collections::HashSet::new();
            for key in keys {
                leases.push(backend.acquire(request(key, HOUR)).await.unwrap());
                sessions.insert(advisory_holder(&operator, key).await);
            }
            assert_eq!(sessions.len(), keys.len());
            for lease in &leases {
                backend.release(lease).await.unwrap();
            }
            rounds.push(sessions);
        }
        // As many of the first round's connections as the pool's size (two, and one
        // for the listener) were kept and served the second round; the others were
        // closed.
        let pool_size = backend.pool().options().get_max_connections();
        assert!(pool_size < 5, "{pool_size}");
        let kept = rounds[0].intersection(&rounds[1]).count();
        assert_eq!(kept, usize::try_from(pool_size).unwrap(), "{rounds:?}");
        for (pid, started) in rounds[0].difference(&rounds[1]) {
            assert!(
                session_ends(&operator, *pid).await,
                "{pid} started {started}"
            );
        }
    })
    .await;
}

/// Whether server session `pid` holds (granted) the advisory lock of `key` and is
/// blocked waiting for a row lock.
async fn holds_and_waits_for_a_row(operator: &PostgresBackend, key: &str, pid: i32) -> bool {
    let holds = advisory_entries(operator, key)
        .await
        .iter()
        .any(|&(p, granted, _)| p == pid && granted);
    let waits: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock')",
    )
    .bind(pid)
    .fetch_one(operator.pool())
    .await
    .unwrap();
    holds && waits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_queued_waiters_are_granted_one_by_one_each_with_the_next_token() {
    bounded(async {
        let server = server().await;
        let holder = open_session_never_polling(&server).await;
        let operator = &open(&server).await;
        let mut waiters = Vec::new();
        for _ in 0..4 {
            waiters.push(open_session_never_polling(&server).await);
        }
        let queued = || async move {
            let entries = advisory_entries(operator, "queue").await;
            entries.iter().filter(|(_, granted, _)| !granted).count()
        };
        common::session_mode_queued_waiters_are_granted_one_by_one_each_with_the_next_token(
            &holder, waiters, queued,
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_waiter_dropped_while_its_token_bump_waits_does_not_keep_the_lock() {
    bounded(async {
        let server = server().await;
        let holder = open_session_never_polling(&server).await;
        let waiter = open_session_never_polling(&server).await;
        let operator = open(&server).await;
        let held = holder.acquire(request("bump", HOUR)).await.unwrap();
        let (holder_pid, _) = advisory_holder(&operator, "bump").await;
        // An operator's transaction keeps the counter row locked.
        let mut row_lock = operator.pool().begin().await.unwrap();
        sqlx::query(&format!(
            r#"SELECT token FROM "{}" WHERE name = $1 FOR UPDATE"#,
            operator.table()
        ))
        .bind("bump")
        .fetch_one(&mut *row_lock)
        .await
        .unwrap();
        let waiting = tokio::spawn(async move {
            let req = request("bump", HOUR).with_wait(WaitPolicy::Forever);
            waiter.acquire(req).await
        });
        let (pid, _) = waiting_session(&operator, "bump").await;
        // The holder's session ends without touching the row: the waiter gets the
        // advisory lock, and its statement then waits for the row.
        let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
            .bind(holder_pid)
            .fetch_one(operator.pool())
            .await
            .unwrap();
        assert!(ended);
        let blocked = eventually(|| holds_and_waits_for_a_row(&operator, "bump", pid)).await;
        assert!(
            blocked,
            "session {pid} never held the lock and waited for the row"
        );
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
        // Its server session is ended before the drop returns, and with it the lock.
        assert!(!session_exists(&operator, pid).await);
        assert!(advisory_entries(&operator, "bump").await.is_empty());
        row_lock.rollback().await.unwrap();
        let other = open_session_never_polling(&server).await;
        let next = other.acquire(request("bump", HOUR)).await.unwrap();
        assert!(next.token() > held.token());
        other.release(&next).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_acquire_and_release_on_a_kept_connection_are_exactly_two_statements() {
    bounded(async {
        let server = server().await;
        let (operator, client) = locker_client(&server, "?mode=session").await;
        // Warm up: the connection is kept and its statements are prepared.
        for wait in [false, true, false, true] {
            let mut req = request("counted", MINUTE);
            if wait {
                req = req.with_wait(WaitPolicy::Until(MINUTE));
            }
            let lease = client.acquire(req).await.unwrap();
            client.release(&lease).await.unwrap();
        }
        let rounds = 6;
        let before = statements_of_locker(&operator).await;
        for round in 0..rounds {
            // Both ways: trying, and waiting in the server's queue.
            let mut req = request("counted", MINUTE);
            if round % 2 == 1 {
                req = req.with_wait(WaitPolicy::Until(MINUTE));
            }
            let lease = client.acquire(req).await.unwrap();
            client.release(&lease).await.unwrap();
        }
        let after = statements_of_locker(&operator).await;
        assert_eq!(
            after - before,
            2 * rounds,
            "statements for {rounds} acquire+release"
        );
        assert_eq!(statements_of_locker(&operator).await, after);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_lock_statement_that_fails_after_taking_the_lock_leaves_it_free() {
    bounded(async {
        let server = server().await;
        let client = open_session_never_polling(&server).await;
        let operator = &open(&server).await;
        let table = operator.table();
        let refuse_owners = |refuse: bool| async move {
            let change = if refuse {
                format!(
                    r#"ALTER TABLE "{table}" ADD CONSTRAINT refuse_owners CHECK (owner IS NULL)"#
                )
            } else {
                format!(r#"ALTER TABLE "{table}" DROP CONSTRAINT refuse_owners"#)
            };
            sqlx::query(&change).execute(operator.pool()).await.unwrap();
        };
        let lock_is_free = || async move { advisory_entries(operator, "fails").await.is_empty() };
        common::session_mode_a_lock_statement_that_fails_after_taking_the_lock_leaves_it_free(
            &client,
            refuse_owners,
            lock_is_free,
        )
        .await;
    })
    .await;
}

/// In session mode a TTL whose probe period (ttl/3) is not shorter than the session's
/// `idle_session_timeout` is refused before anything is taken, with an error that
/// names the setting and both fixes: the server would end the idle session (freeing
/// the lock) between two probes. A TTL that fits is granted, its validity bounded by
/// `idle_session_timeout` from when the grant was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_refuses_a_ttl_whose_probe_period_outlasts_idle_session_timeout_and_bounds_validity_by_it()
 {
    bounded(async {
        let server = server().await;
        let operator = open(&server).await;
        for statement in [
            "CREATE ROLE locker LOGIN SUPERUSER",
            "ALTER ROLE locker SET idle_session_timeout = '3s'",
        ] {
            sqlx::query(statement)
                .execute(operator.pool())
                .await
                .unwrap();
        }
        let url = format!(
            "{}?mode=session",
            server.url().replace("postgres@", "locker@")
        );
        let client = PostgresBackend::open(&url).await.unwrap();
        // Checked up front, right after connecting, for a default TTL.
        let checked = client.check_ttl(Duration::from_secs(30)).await;
        assert!(
            matches!(&checked, Err(Error::Config { message }) if message.contains("idle_session_timeout = 3s")),
            "{checked:?}"
        );
        client.check_ttl(Duration::from_secs(6)).await.unwrap();
        // Lease mode keeps no session for a lock: any TTL will do.
        operator.check_ttl(Duration::from_secs(30)).await.unwrap();
        let refused = client
            .acquire(request("idle", Duration::from_secs(30)))
            .await;
        let Err(Error::Config { message }) = &refused else {
            panic!("expected Error::Config, got {refused:?}");
        };
        assert!(
            message.contains("idle_session_timeout = 3s")
                && message.contains("below 9s")
                && message.contains("SET idle_session_timeout = '10001ms'"),
            "{message}"
        );
        assert!(advisory_entries(&operator, "idle").await.is_empty());
        let sent = Instant::now();
        let lease = client
            .acquire(request("idle", Duration::from_secs(6)))
            .await
            .unwrap();
        assert!(
            lease.valid_until() <= sent + Duration::from_secs(3),
            "valid for longer than the server keeps an idle session"
        );
        client.release(&lease).await.unwrap();
    })
    .await;
}

/// In session mode a holder whose server session is terminated
/// (`pg_terminate_backend`) is told its lock is lost within seconds (the backend asks
/// the server every second which held locks' sessions still exist), not at the
/// watchdog's next probe, ttl/3 = 20 s after the grant. The other client is granted
/// the lock the moment the session ends; the holder hears of it later, so the
/// instants are recorded and the gap is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_terminated_holder_session_is_reported_lost_within_seconds_not_at_the_next_probe()
 {
    bounded(async {
        let server = server().await;
        let session_url = format!("{}?mode=session", server.url());
        let holder = Locker::new(PostgresBackend::open(&session_url).await.unwrap());
        let other = PostgresBackend::open(&session_url).await.unwrap();
        let operator = open(&server).await;
        let guard = holder.lock("killed").ttl(MINUTE).await.unwrap();
        let (pid, _) = advisory_holder(&operator, "killed").await;
        let lost = guard.lost();
        let lost = tokio::spawn(async move { (lost.await, Instant::now()) });
        let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(operator.pool())
            .await
            .unwrap();
        assert!(terminated);
        let killed = Instant::now();
        let next = other
            .acquire(request("killed", MINUTE).with_wait(WaitPolicy::Until(MINUTE)))
            .await
            .unwrap();
        let granted = Instant::now();
        let (err, lost_at) = tokio::time::timeout(Duration::from_secs(5), lost)
            .await
            .expect("reported lost within 5 s of the kill, not at the next probe (20 s)")
            .unwrap();
        assert!(err.is_lost(), "{err:?}");
        assert!(!guard.is_held());
        assert!(next.token() > guard.token());
        eprintln!(
            "lost reported {:?} after the kill, {:?} after the other client's grant",
            lost_at - killed,
            lost_at.saturating_duration_since(granted)
        );
    })
    .await;
}

/// In session mode a server restart ends every held lock's session, and the holder is
/// told its lock is lost within seconds of the server's return (the backend's check
/// of the held locks' sessions, by pid and `backend_start`), not at the watchdog's
/// next probe, ttl/3 = 20 s after the grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_server_restart_is_reported_lost_within_seconds_of_its_return() {
    bounded(async {
        let mut server = server().await;
        let holder = Locker::new(
            PostgresBackend::open(&format!("{}?mode=session", server.url()))
                .await
                .unwrap(),
        );
        let guard = holder.lock("restart").ttl(MINUTE).await.unwrap();
        let lost = guard.lost();
        let lost = tokio::spawn(async move { (lost.await, Instant::now()) });
        server.restart(true).await.unwrap();
        let back = Instant::now();
        let (err, lost_at) = tokio::time::timeout(Duration::from_secs(5), lost)
            .await
            .expect("reported lost within 5 s of the server's return, not at the next probe")
            .unwrap();
        assert!(err.is_lost(), "{err:?}");
        assert!(!guard.is_held());
        eprintln!(
            "lost reported {:?} after the server was back",
            lost_at.saturating_duration_since(back)
        );
    })
    .await;
}
