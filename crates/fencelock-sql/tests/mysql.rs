//! The MySQL/MariaDB store's own rules, on real MariaDB servers started per test by
//! the conformance harness: crashes, killed sessions, polling waiters, batched
//! renewals and the fence gate inside a user's transaction. (The shared contract runs
//! against it from `fencelock-conformance`.)
#![cfg(feature = "mysql")]

use std::time::Duration;

use fencelock_conformance::harness::{MariaDb, Server};
use fencelock_core::{Error, FenceGate, LeaseKind, LockBackend, Locker, WaitKind, WaitPolicy};
use fencelock_sql::{MySqlBackend, MySqlConfig, MySqlFenceGate, sqlx};
use tokio::time::Instant;

mod common;

use common::{HOUR, MINUTE, ServerStore, bounded, eventually, name, request};

/// The MySQL/MariaDB store, for the shared test bodies.
struct MySql;

impl ServerStore for MySql {
    type Server = MariaDb;
    type Backend = MySqlBackend;
    type Gate = MySqlFenceGate;

    const UNREACHABLE_URL: &'static str = "mysql://app:hunter2@127.0.0.1:1/db?connect_timeout=2s";
    const UNREACHABLE_HINT: &'static str = "check that the MySQL/MariaDB server";

    async fn start() -> MariaDb {
        server().await
    }

    async fn open_url(url: &str) -> fencelock_core::Result<MySqlBackend> {
        MySqlBackend::open(url).await
    }

    async fn migrate(backend: &MySqlBackend) -> fencelock_core::Result<()> {
        backend.migrate().await
    }

    async fn fence_gate(backend: &MySqlBackend) -> MySqlFenceGate {
        backend.fence_gate().await.unwrap()
    }
}

common::server_store_tests!(MySql);

/// Starts a MariaDB, retrying twice: `mariadb-install-db` sometimes fails when
/// several run at once (temporary tables under `/tmp` vanish under it).
async fn server() -> MariaDb {
    let mut attempts = 0;
    loop {
        match MariaDb::start().await {
            Ok(server) => return server,
            Err(err) if attempts < 2 => {
                attempts += 1;
                eprintln!("mariadbd did not start ({err}); trying again");
            }
            Err(err) => panic!("start mariadbd: {err}"),
        }
    }
}

async fn open(server: &MariaDb) -> MySqlBackend {
    MySqlBackend::open(&server.url()).await.unwrap()
}

/// A backend whose waiters poll only once an hour: a waiter it grants within a
/// test's bound was woken by something other than its poll timer.
async fn open_never_polling(server: &MariaDb) -> MySqlBackend {
    let mut config = MySqlConfig::from_url(&server.url()).unwrap();
    config.poll_min = HOUR;
    config.poll_max = HOUR;
    MySqlBackend::connect(config).await.unwrap()
}

/// Kills every other connection of the server, as an operator would with `KILL`;
/// returns how many.
async fn kill_other_sessions(operator: &MySqlBackend) -> usize {
    let mut conn = operator.pool().acquire().await.unwrap();
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM information_schema.PROCESSLIST
         WHERE id <> CONNECTION_ID() AND user = 'root'",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    for id in &ids {
        // A connection may end by itself meanwhile: its KILL then fails, harmlessly.
        let _ = sqlx::query(&format!("KILL {id}")).execute(&mut *conn).await;
    }
    ids.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_in_the_same_process_is_woken_by_a_release_not_by_its_poll() {
    bounded(async {
        let server = server().await;
        let backend = open_never_polling(&server).await;
        assert_eq!(backend.capabilities().wait, WaitKind::Poll);
        // Only the in-process wake on release can grant it.
        common::a_release_wakes_a_never_polling_waiter(&backend, &backend, "handoff").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_in_another_client_gets_the_lock_by_polling_after_a_release() {
    bounded(async {
        let server = server().await;
        let a = open(&server).await;
        let b = open(&server).await;
        common::a_waiter_in_another_client_polls_after_a_release(&a, b).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_differing_in_case_or_trailing_spaces_are_different_locks() {
    bounded(async {
        let server = server().await;
        let backend = open(&server).await;
        // Binary keys: no collation folds case, accents or trailing spaces.
        for lock in ["lock", "LOCK", "lock ", "löck", "lo\\ck", "lo%ck"] {
            backend
                .acquire(request(lock, MINUTE))
                .await
                .unwrap_or_else(|err| panic!("{lock:?}: {err}"));
        }
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
async fn killed_sessions_do_not_lose_a_lease_and_nobody_else_gets_it() {
    bounded(async {
        let server = server().await;
        let operator = open(&server).await;
        let holder = Locker::new(open(&server).await);
        let b = open(&server).await;
        let ttl = Duration::from_millis(900);
        let guard = holder.lock("killed").ttl(ttl).await.unwrap();
        assert!(kill_other_sessions(&operator).await >= 2);
        // A lease is a row, not a session: the watchdog reconnects and keeps it.
        tokio::time::sleep(ttl * 3).await;
        assert!(guard.is_held(), "the lease survived its sessions");
        let state = operator.inspect(&name("killed")).await.unwrap().unwrap();
        assert_eq!(state.token, guard.token());
        assert!(matches!(
            b.acquire(request("killed", MINUTE)).await,
            Err(Error::Contended { .. })
        ));
        let token = guard.token();
        guard.release().await.unwrap();
        assert!(b.acquire(request("killed", MINUTE)).await.unwrap().token() > token);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_time_zone_changes_nothing_expiry_is_database_epoch_time() {
    bounded(async {
        let server = server().await;
        let operator = open(&server).await;
        // a's one session runs 13 hours ahead of UTC, b's 12 hours behind: NOW()
        // differs by a day between them, UTC_TIMESTAMP() does not.
        let set_zone = |zone: &'static str| {
            let pool = operator.pool().clone();
            async move {
                sqlx::query(&format!("SET GLOBAL time_zone = '{zone}'"))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        };
        let one_session = format!("{}?pool_size=1", server.url());
        set_zone("+13:00").await;
        let a = MySqlBackend::open(&one_session).await.unwrap();
        set_zone("-12:00").await;
        let b = MySqlBackend::open(&one_session).await.unwrap();
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
    gate: MySqlFenceGate,
    conn: sqlx::MySqlConnection,
    create_accounts: "CREATE TABLE accounts (id INT PRIMARY KEY, balance INT NOT NULL) \
                      ENGINE = InnoDB",
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_killed_holder_session_is_lost_frees_the_lock_and_is_fenced() {
    bounded(async {
        let server = server().await;
        let session_url = format!("{}?mode=session", server.url());
        let holder = Locker::new(MySqlBackend::open(&session_url).await.unwrap());
        let other = MySqlBackend::open(&session_url).await.unwrap();
        assert_eq!(other.capabilities().lease, LeaseKind::Session);
        let operator = open(&server).await;
        let gate = operator.fence_gate().await.unwrap();
        let ttl = Duration::from_secs(6);
        let guard = holder.lock("session").ttl(ttl).await.unwrap();
        let old = guard.lease().clone();
        gate.admit("session", old.token()).await.unwrap();
        let session: i64 = sqlx::query_scalar(
            "SELECT CAST(IS_USED_LOCK(CONCAT('fencelock:', LEFT(SHA2(CONCAT(DATABASE(), '/', \
             'fencelock_locks', '/', ?), 256), 54))) AS SIGNED)",
        )
        .bind("session".as_bytes())
        .fetch_one(operator.pool())
        .await
        .unwrap();
        sqlx::query(&format!("KILL {session}"))
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
async fn open_session_never_polling(server: &MariaDb) -> MySqlBackend {
    let url = format!("{}?mode=session", server.url());
    let mut config = MySqlConfig::from_url(&url).unwrap();
    config.poll_min = HOUR;
    config.poll_max = HOUR;
    MySqlBackend::connect(config).await.unwrap()
}

/// The server sessions running a session-mode lock statement (`GET_LOCK` and the
/// token bump) now: `(id, state, seconds in the statement)`.
async fn get_lock_waits(operator: &MySqlBackend) -> Vec<(i64, String, i64)> {
    sqlx::query_as(
        "SELECT CAST(ID AS SIGNED), COALESCE(STATE, ''), CAST(TIME AS SIGNED)
         FROM information_schema.PROCESSLIST
         WHERE COMMAND IN ('Query', 'Execute') AND INFO LIKE 'INSERT INTO%GET_LOCK(%'",
    )
    .fetch_all(operator.pool())
    .await
    .unwrap()
}

/// The one server session waiting in `GET_LOCK`, once it shows up (checked every
/// 20 ms, at most 1,000 times).
async fn get_lock_waiter(operator: &MySqlBackend) -> (i64, String) {
    for _ in 0..1000 {
        let waits = get_lock_waits(operator).await;
        assert!(waits.len() <= 1, "one waiter, one wait: {waits:?}");
        if let Some((id, state, _)) = waits.into_iter().next() {
            return (id, state);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no server session waited in GET_LOCK");
}

/// The server session holding the named lock of `key`, per `IS_USED_LOCK`.
async fn named_lock_holder(operator: &MySqlBackend, key: &str) -> Option<i64> {
    let statement = format!(
        "SELECT CAST(IS_USED_LOCK(CONCAT('fencelock:', LEFT(SHA2(CONCAT(DATABASE(), '/', \
         '{}', '/', ?), 256), 54))) AS SIGNED)",
        operator.table()
    );
    sqlx::query_scalar(&statement)
        .bind(key.as_bytes())
        .fetch_one(operator.pool())
        .await
        .unwrap()
}

async fn session_exists(operator: &MySqlBackend, id: i64) -> bool {
    let count: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = ?")
            .bind(id)
            .fetch_one(operator.pool())
            .await
            .unwrap();
    count > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_waiter_waits_in_get_lock_and_is_granted_on_release() {
    bounded(async {
        let server = server().await;
        let holder = open_session_never_polling(&server).await;
        let waiter = open_session_never_polling(&server).await;
        assert_eq!(waiter.capabilities().wait, WaitKind::Notify);
        let operator = open(&server).await;
        let held = holder.acquire(request("queued", MINUTE)).await.unwrap();
        let holder_id = named_lock_holder(&operator, "queued").await.unwrap();
        let waiting = tokio::spawn(async move {
            let lease = waiter
                .acquire(request("queued", MINUTE).with_wait(WaitPolicy::Forever))
                .await;
            (waiter, lease)
        });
        // The waiter is one server session inside one GET_LOCK, in the server's
        // user-lock wait; still the same one later: it does not retry.
        let (id, state) = get_lock_waiter(&operator).await;
        assert!(state.to_lowercase().contains("lock"), "{state}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(get_lock_waiter(&operator).await.0, id);
        assert_eq!(
            named_lock_holder(&operator, "queued").await,
            Some(holder_id)
        );
        // Its poll is an hour away: the release itself lets the server grant it, to
        // that very session.
        holder.release(&held).await.unwrap();
        let (waiter, lease) = waiting.await.unwrap();
        let lease = lease.unwrap();
        assert!(lease.token() > held.token());
        assert_eq!(named_lock_holder(&operator, "queued").await, Some(id));
        waiter.release(&lease).await.unwrap();
        assert_eq!(named_lock_holder(&operator, "queued").await, None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_cancelled_get_lock_wait_is_killed_and_never_takes_the_lock() {
    bounded(async {
        let server = server().await;
        let holder = open_session_never_polling(&server).await;
        let waiter = open_session_never_polling(&server).await;
        let operator = open(&server).await;
        let held = holder.acquire(request("cancel", MINUTE)).await.unwrap();
        let holder_id = named_lock_holder(&operator, "cancel").await.unwrap();
        let waiting = tokio::spawn(async move {
            waiter
                .acquire(request("cancel", MINUTE).with_wait(WaitPolicy::Forever))
                .await
        });
        let (id, _) = get_lock_waiter(&operator).await;
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
        // The cancelled acquire's server session is ended.
        let gone = session_ends(&operator, id).await;
        // On failure, say what the session was doing: still waiting in `GET_LOCK` means
        // the kill never reached it.
        let waits = get_lock_waits(&operator).await;
        assert!(
            gone,
            "the cancelled waiter's session {id} still exists; lock statements running: {waits:?}"
        );
        assert!(waits.is_empty(), "{waits:?}");
        assert_eq!(
            named_lock_holder(&operator, "cancel").await,
            Some(holder_id)
        );
        holder.release(&held).await.unwrap();
        assert_eq!(named_lock_holder(&operator, "cancel").await, None);
        let other = open_session_never_polling(&server).await;
        let next = other.acquire(request("cancel", MINUTE)).await.unwrap();
        assert!(next.token() > held.token());
        other.release(&next).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_wait_deadline_is_get_locks_timeout() {
    bounded(async {
        let server = server().await;
        let holder = open_session_never_polling(&server).await;
        let waiter = open_session_never_polling(&server).await;
        let operator = open(&server).await;
        let held = holder.acquire(request("deadline", MINUTE)).await.unwrap();
        let holder_id = named_lock_holder(&operator, "deadline").await.unwrap();
        let wait = Duration::from_millis(300);
        let start = Instant::now();
        let result = waiter
            .acquire(request("deadline", MINUTE).with_wait(WaitPolicy::Until(wait)))
            .await;
        assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
        assert!(start.elapsed() >= wait);
        // The timed-out GET_LOCK took nothing; its server thread may still list the
        // finished statement for a moment after the reply (bounded: 1,000 × 20 ms).
        assert_eq!(
            named_lock_holder(&operator, "deadline").await,
            Some(holder_id)
        );
        let done = eventually(|| async { get_lock_waits(&operator).await.is_empty() }).await;
        assert!(
            done,
            "GET_LOCK still running: {:?}",
            get_lock_waits(&operator).await
        );
        holder.release(&held).await.unwrap();
        let next = waiter.acquire(request("deadline", MINUTE)).await.unwrap();
        assert!(next.token() > held.token());
    })
    .await;
}

/// The server's `Questions` (statements clients sent: each execution of a prepared
/// statement counts; `COM_PING` and prepares do not) and `Connections` (connections
/// opened, each of which sqlx starts with one `SET`) counters. The `SHOW` that reads
/// them counts itself as one question.
async fn counters(probe: &mut sqlx::MySqlConnection) -> (i64, i64) {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SHOW GLOBAL STATUS WHERE Variable_name IN ('Questions', 'Connections')")
            .fetch_all(probe)
            .await
            .unwrap();
    let value = |name: &str| -> i64 {
        let (_, value) = rows.iter().find(|(n, _)| n == name).unwrap();
        value.parse().unwrap()
    };
    (value("Questions"), value("Connections"))
}

/// A client of `server` with `options` (each `&name=value`) and one pooled connection (so it never opens
/// another one, whose setup `SET` would count, while a released one is on its way
/// back), warmed up by two cycles on `counted` (its connection open, its statements
/// prepared); the operator; and a probe connection for [`counters`], whose own cost
/// (one question per read) is checked, not assumed.
async fn counted_client(
    server: &MariaDb,
    options: &str,
) -> (MySqlBackend, MySqlBackend, sqlx::MySqlConnection) {
    let client = MySqlBackend::open(&format!("{}?pool_size=1{options}", server.url()))
        .await
        .unwrap();
    let operator = open(server).await;
    let mut probe = operator.pool().acquire().await.unwrap().detach();
    for _ in 0..2 {
        let lease = client.acquire(request("counted", MINUTE)).await.unwrap();
        client.release(&lease).await.unwrap();
    }
    let first = counters(&mut probe).await;
    let second = counters(&mut probe).await;
    assert_eq!((second.0 - first.0, second.1 - first.1), (1, 0));
    (client, operator, probe)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_mode_acquire_and_release_are_exactly_two_statements() {
    use sqlx::Connection;
    bounded(async {
        let server = server().await;
        let (client, _operator, mut probe) = counted_client(&server, "").await;
        let rounds = 5;
        let before = counters(&mut probe).await;
        for _ in 0..rounds {
            let lease = client.acquire(request("counted", MINUTE)).await.unwrap();
            client.release(&lease).await.unwrap();
        }
        let after = counters(&mut probe).await;
        assert_eq!(after.1 - before.1, 0, "no connection was opened meanwhile");
        assert_eq!(
            after.0 - before.0 - 1,
            2 * rounds,
            "statements for {rounds} acquire+release"
        );
        probe.close().await.unwrap();
    })
    .await;
}

/// Connections the server has accepted since it started (`Connections`).
async fn connections_accepted(operator: &MySqlBackend) -> i64 {
    let (_, value): (String, String) = sqlx::query_as("SHOW GLOBAL STATUS LIKE 'Connections'")
        .fetch_one(operator.pool())
        .await
        .unwrap();
    value.parse().unwrap()
}

/// Waits (bounded) until server session `id` has ended; whether it did.
async fn session_ends(operator: &MySqlBackend, id: i64) -> bool {
    eventually(|| async { !session_exists(operator, id).await }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_20_lock_cycles_open_no_new_connection() {
    bounded(async {
        let server = server().await;
        // One pooled connection: the pool itself may not open another when a returned
        // connection is still on its way back, so every new connection would be a
        // lock's.
        let backend = MySqlBackend::open(&format!("{}?mode=session&pool_size=1", server.url()))
            .await
            .unwrap();
        // The operator's reads too: its pool must not open a connection either.
        let operator = MySqlBackend::open(&format!("{}?pool_size=1", server.url()))
            .await
            .unwrap();
        // One cycle first: it opens the connection the others reuse.
        let first = backend.acquire(request("reuse", HOUR)).await.unwrap();
        let holder = named_lock_holder(&operator, "reuse").await.unwrap();
        backend.release(&first).await.unwrap();
        let before = connections_accepted(&operator).await;
        let mut last = first.token();
        for cycle in 0..20 {
            // Both ways of taking the lock: trying, and waiting in `GET_LOCK`.
            let mut req = request("reuse", HOUR);
            if cycle % 2 == 1 {
                req = req.with_wait(WaitPolicy::Until(MINUTE));
            }
            let lease = backend.acquire(req).await.unwrap();
            assert!(lease.token() > last);
            last = lease.token();
            assert_eq!(named_lock_holder(&operator, "reuse").await, Some(holder));
            backend.release(&lease).await.unwrap();
        }
        assert_eq!(connections_accepted(&operator).await, before);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_kept_connection_that_died_is_replaced_and_the_acquire_succeeds() {
    bounded(async {
        let server = server().await;
        let backend = MySqlBackend::open(&format!("{}?mode=session", server.url()))
            .await
            .unwrap();
        let operator = open(&server).await;
        for wait in [false, true] {
            let lease = backend.acquire(request("dies", HOUR)).await.unwrap();
            let id = named_lock_holder(&operator, "dies").await.unwrap();
            backend.release(&lease).await.unwrap();
            // The released lock's connection is kept; its server session is killed.
            sqlx::query(&format!("KILL {id}"))
                .execute(operator.pool())
                .await
                .unwrap();
            assert!(session_ends(&operator, id).await);
            let mut req = request("dies", HOUR);
            if wait {
                req = req.with_wait(WaitPolicy::Until(MINUTE));
            }
            let next = backend.acquire(req).await.unwrap();
            assert!(next.token() > lease.token());
            let now = named_lock_holder(&operator, "dies").await.unwrap();
            assert_ne!(now, id);
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
        let backend = MySqlBackend::open(&url).await.unwrap();
        let operator = open(&server).await;
        let keys = ["k0", "k1", "k2", "k3", "k4"];
        let mut rounds = Vec::new();
        for _ in 0..2 {
            // Five locks held at once, more than the pool's connections.
            let mut leases = Vec::new();
            let mut sessions = std::collections::HashSet::new();
            for key in keys {
                leases.push(backend.acquire(request(key, HOUR)).await.unwrap());
                sessions.insert(named_lock_holder(&operator, key).await.unwrap());
            }
            assert_eq!(sessions.len(), keys.len());
            for lease in &leases {
                backend.release(lease).await.unwrap();
            }
            rounds.push(sessions);
        }
        // As many of the first round's connections as the pool's size were kept and
        // served the second round; the others were closed.
        let pool_size = backend.pool().options().get_max_connections();
        assert!(pool_size < 5, "{pool_size}");
        let kept = rounds[0].intersection(&rounds[1]).count();
        assert_eq!(kept, usize::try_from(pool_size).unwrap(), "{rounds:?}");
        for id in rounds[0].difference(&rounds[1]) {
            assert!(session_ends(&operator, *id).await, "{id}");
        }
    })
    .await;
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
        let queued = || async move { get_lock_waits(operator).await.len() };
        common::session_mode_queued_waiters_are_granted_one_by_one_each_with_the_next_token(
            &holder, waiters, queued,
        )
        .await;
        assert_eq!(named_lock_holder(operator, "queue").await, None);
    })
    .await;
}

/// Whether server session `id` waits for a row lock (InnoDB lists it as waiting).
async fn waits_for_a_row(operator: &MySqlBackend, id: i64) -> bool {
    let count: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.INNODB_TRX
         WHERE trx_mysql_thread_id = ? AND trx_state = 'LOCK WAIT'",
    )
    .bind(id)
    .fetch_one(operator.pool())
    .await
    .unwrap();
    count > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_waiter_dropped_while_its_token_bump_waits_does_not_keep_the_lock() {
    bounded(async {
        let server = server().await;
        let holder = open_session_never_polling(&server).await;
        let waiter = open_session_never_polling(&server).await;
        let operator = open(&server).await;
        let held = holder.acquire(request("bump", HOUR)).await.unwrap();
        let holder_id = named_lock_holder(&operator, "bump").await.unwrap();
        // An operator's transaction keeps the counter row locked.
        let mut row_lock = operator.pool().begin().await.unwrap();
        sqlx::query(&format!(
            "SELECT token FROM `{}` WHERE name = ? FOR UPDATE",
            operator.table()
        ))
        .bind("bump".as_bytes())
        .fetch_one(&mut *row_lock)
        .await
        .unwrap();
        let waiting = tokio::spawn(async move {
            let req = request("bump", HOUR).with_wait(WaitPolicy::Forever);
            waiter.acquire(req).await
        });
        let (id, _) = get_lock_waiter(&operator).await;
        // The holder's session ends without touching the row: the waiter gets the
        // named lock, and its statement then waits for the row.
        sqlx::query(&format!("KILL {holder_id}"))
            .execute(operator.pool())
            .await
            .unwrap();
        let blocked = eventually(|| async {
            named_lock_holder(&operator, "bump").await == Some(id)
                && waits_for_a_row(&operator, id).await
        })
        .await;
        assert!(
            blocked,
            "session {id} never held the lock and waited for the row"
        );
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
        // Its server session is ended before the drop returns, and with it the lock.
        assert!(!session_exists(&operator, id).await);
        assert_eq!(named_lock_holder(&operator, "bump").await, None);
        row_lock.rollback().await.unwrap();
        let other = open_session_never_polling(&server).await;
        let next = other.acquire(request("bump", HOUR)).await.unwrap();
        assert!(next.token() > held.token());
        other.release(&next).await.unwrap();
    })
    .await;
}

/// The owner the lease table's row of `key` names.
async fn row_owner(operator: &MySqlBackend, key: &str) -> Option<Vec<u8>> {
    let statement = format!("SELECT owner FROM `{}` WHERE name = ?", operator.table());
    sqlx::query_scalar(&statement)
        .bind(key.as_bytes())
        .fetch_one(operator.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_release_clears_the_owner_and_frees_the_lock_in_one_statement() {
    use sqlx::Connection;
    bounded(async {
        let server = server().await;
        // The lock's connection is kept between cycles, its server session known.
        let (client, operator, mut probe) = counted_client(&server, "&mode=session").await;
        for round in 0..4 {
            let mut req = request("counted", MINUTE);
            if round % 2 == 1 {
                req = req.with_wait(WaitPolicy::Until(MINUTE));
            }
            let before = counters(&mut probe).await;
            let lease = client.acquire(req).await.unwrap();
            let acquired = counters(&mut probe).await;
            assert_eq!(
                row_owner(&operator, "counted").await.as_deref(),
                Some(lease.owner().as_str().as_bytes())
            );
            assert!(named_lock_holder(&operator, "counted").await.is_some());
            let read = counters(&mut probe).await;
            client.release(&lease).await.unwrap();
            let released = counters(&mut probe).await;
            // (The operator's reads in between may open connections of its own.)
            assert_eq!(acquired.1 - before.1, 0, "no connection was opened");
            assert_eq!(released.1 - read.1, 0, "no connection was opened");
            assert_eq!(acquired.0 - before.0 - 1, 1, "statements to acquire");
            assert_eq!(released.0 - read.0 - 1, 1, "statements to release");
            // That one statement cleared the owner and freed the lock.
            assert_eq!(row_owner(&operator, "counted").await, None);
            assert_eq!(named_lock_holder(&operator, "counted").await, None);
        }
        probe.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_release_frees_the_lock_even_if_someone_cleared_the_row() {
    bounded(async {
        let server = server().await;
        let client = open_session_never_polling(&server).await;
        let operator = open(&server).await;
        let lease = client.acquire(request("cleared", HOUR)).await.unwrap();
        let holder = named_lock_holder(&operator, "cleared").await.unwrap();
        // An operator clears the owner behind the holder's back: the release's
        // one statement matches no row and so frees nothing itself.
        let cleared = sqlx::query(&format!(
            "UPDATE `{}` SET owner = NULL WHERE name = ?",
            operator.table()
        ))
        .bind("cleared".as_bytes())
        .execute(operator.pool())
        .await
        .unwrap();
        assert_eq!(cleared.rows_affected(), 1);
        // The lock is still ours, so the release frees it all the same.
        client.release(&lease).await.unwrap();
        assert_eq!(named_lock_holder(&operator, "cleared").await, None);
        assert!(session_exists(&operator, holder).await, "freed, not killed");
        let other = open_session_never_polling(&server).await;
        let next = other.acquire(request("cleared", HOUR)).await.unwrap();
        assert!(next.token() > lease.token());
        other.release(&next).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_releasing_another_clients_lease_waits_for_a_release_in_progress_and_kills_nobody()
 {
    use sqlx::Connection;
    bounded(async {
        let server = server().await;
        let holder = open_session_never_polling(&server).await;
        let other = open_session_never_polling(&server).await;
        let operator = open(&server).await;
        let lease = holder.acquire(request("elsewhere", HOUR)).await.unwrap();
        let holder_id = named_lock_holder(&operator, "elsewhere").await.unwrap();
        // A release in progress, as the holder's one statement leaves it between
        // freeing the lock and committing: the row locked and cleared but not
        // committed, the lock free.
        let mut releasing = operator.pool().begin().await.unwrap();
        sqlx::query(&format!(
            "UPDATE `{}` SET owner = NULL WHERE name = ?",
            operator.table()
        ))
        .bind("elsewhere".as_bytes())
        .execute(&mut *releasing)
        .await
        .unwrap();
        sqlx::query(&format!("KILL {holder_id}"))
            .execute(operator.pool())
            .await
            .unwrap();
        assert!(session_ends(&operator, holder_id).await);
        // The next holder takes the lock meanwhile.
        let mut next = operator.pool().acquire().await.unwrap().detach();
        let next_id: i64 = sqlx::query_scalar("SELECT CAST(CONNECTION_ID() AS SIGNED)")
            .fetch_one(&mut next)
            .await
            .unwrap();
        let got: i64 = sqlx::query_scalar(&format!(
            "SELECT GET_LOCK(CONCAT('fencelock:', LEFT(SHA2(CONCAT(DATABASE(), '/', '{}', '/', ?), \
             256), 54)), 0)",
            operator.table()
        ))
        .bind("elsewhere".as_bytes())
        .fetch_one(&mut next)
        .await
        .unwrap();
        assert_eq!(got, 1);
        // Another client releases the old lease: its read of the row shows up
        // (bounded: 1,000 × 20 ms) and must then wait for the row, not finish.
        let releasing_elsewhere = tokio::spawn(async move { other.release(&lease).await });
        let mut reading = false;
        for _ in 0..1000 {
            let running: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST
                 WHERE COMMAND = 'Execute' AND INFO LIKE 'SELECT CAST(IS_USED_LOCK(%FOR UPDATE'",
            )
            .fetch_one(operator.pool())
            .await
            .unwrap();
            if running > 0 || releasing_elsewhere.is_finished() {
                reading = running > 0;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(reading, "the release elsewhere never read the row");
        // Then the release in progress commits.
        releasing.commit().await.unwrap();
        common::assert_lost(releasing_elsewhere.await.unwrap());
        // The next holder was not killed and still holds the lock.
        assert!(session_exists(&operator, next_id).await);
        assert_eq!(
            named_lock_holder(&operator, "elsewhere").await,
            Some(next_id)
        );
        next.close().await.unwrap();
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
                format!("ALTER TABLE `{table}` ADD CONSTRAINT refuse_owners CHECK (owner IS NULL)")
            } else {
                format!("ALTER TABLE `{table}` DROP CONSTRAINT refuse_owners")
            };
            sqlx::query(&change).execute(operator.pool()).await.unwrap();
        };
        let lock_is_free = || async move { named_lock_holder(operator, "fails").await.is_none() };
        common::session_mode_a_lock_statement_that_fails_after_taking_the_lock_leaves_it_free(
            &client,
            refuse_owners,
            lock_is_free,
        )
        .await;
    })
    .await;
}

/// A global status counter of the server.
async fn global_status(operator: &MySqlBackend, name: &str) -> i64 {
    let (_, value): (String, String) = sqlx::query_as(&format!("SHOW GLOBAL STATUS LIKE '{name}'"))
        .fetch_one(operator.pool())
        .await
        .unwrap();
    value.parse().unwrap()
}

/// An acquire statement that InnoDB rolled back (here a lock wait timeout, 1205) did
/// nothing, so its retry runs without an undo: an undo sent after such a failure
/// (`UPDATE .. SET owner = NULL`, by owner, on the failed statement's connection) can
/// reach the row after the retry's grant and clear the fresh grant, which carries the
/// same owner. The row lock an operator transaction holds makes the first attempt fail
/// deterministically; the client sends no UPDATE at all, and the grant stays ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_mode_a_lock_conflict_retry_sends_no_undo_that_could_clear_its_own_grant() {
    use sqlx::Connection;
    bounded(async {
        let server = server().await;
        let operator = open(&server).await;
        // Every session opened from now on gives up a row lock wait after 1 s.
        sqlx::query("SET GLOBAL innodb_lock_wait_timeout = 1")
            .execute(operator.pool())
            .await
            .unwrap();
        let client = MySqlBackend::open(&server.url()).await.unwrap();
        let first = operator.acquire(request("conflict", MINUTE)).await.unwrap();
        operator.release(&first).await.unwrap();
        // The operator's transaction holds the row: the client's acquire waits for it.
        let mut blocker = operator.pool().acquire().await.unwrap().detach();
        let mut tx = blocker.begin().await.unwrap();
        sqlx::query(&format!(
            "SELECT token FROM `{}` WHERE name = ? FOR UPDATE",
            operator.table()
        ))
        .bind("conflict".as_bytes())
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        let waits = global_status(&operator, "Innodb_row_lock_waits").await;
        let updates = global_status(&operator, "Com_update").await;
        let acquiring = {
            let client = client.clone();
            tokio::spawn(async move { client.acquire(request("conflict", MINUTE)).await })
        };
        // The first attempt waited, timed out (1205) and a second wait began: the
        // retry's (the undo's, too, if one was sent).
        assert!(
            eventually(|| async {
                global_status(&operator, "Innodb_row_lock_waits").await >= waits + 2
            })
            .await,
            "the acquire never retried after a lock wait timeout"
        );
        tx.commit().await.unwrap();
        let lease = acquiring.await.unwrap().expect("the retry was granted");
        assert!(lease.token() > first.token());
        assert_eq!(
            global_status(&operator, "Com_update").await - updates,
            0,
            "an undo UPDATE was sent for an attempt that InnoDB had rolled back"
        );
        let state = operator.inspect(&name("conflict")).await.unwrap().unwrap();
        assert_eq!(
            (state.holder, state.token),
            (lease.owner().clone(), lease.token())
        );
        client.renew(&lease, MINUTE).await.unwrap();
        blocker.close().await.unwrap();
    })
    .await;
}

/// In session mode a renewal that succeeds keeps the lock: the backend's TTL timer,
/// which fires while the renewal's probe is still on its way (the server is paused
/// across the old TTL's end), looks again once it has the connection and finds the
/// TTL extended, instead of closing the connection (and so freeing the lock) just
/// after the renewal reported success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_renewal_that_succeeds_as_the_ttl_ends_keeps_the_lock() {
    bounded(async {
        let server = server().await;
        let client = MySqlBackend::open(&format!("{}?mode=session", server.url()))
            .await
            .unwrap();
        let operator = open(&server).await;
        let ttl = Duration::from_secs(2);
        let lease = client.acquire(request("renewed", ttl)).await.unwrap();
        // The backend's TTL ends at the latest `ttl` after this.
        let granted = Instant::now();
        let session = named_lock_holder(&operator, "renewed").await.unwrap();
        tokio::time::sleep_until(granted + ttl / 2).await;
        server.pause().unwrap();
        let renewing = {
            let (client, lease) = (client.clone(), lease.clone());
            tokio::spawn(async move { client.renew(&lease, ttl).await })
        };
        // The old TTL ends while the probe waits for the paused server.
        tokio::time::sleep_until(granted + ttl + Duration::from_millis(200)).await;
        server.resume().unwrap();
        let renewed = renewing
            .await
            .unwrap()
            .expect("the probe found the lock held");
        // The renewal said the lock is held for another TTL: it is, and renews again.
        let again = client.renew(&renewed, ttl).await;
        assert!(again.is_ok(), "renewed, then lost at once: {again:?}");
        assert_eq!(named_lock_holder(&operator, "renewed").await, Some(session));
        client.release(&again.unwrap()).await.unwrap();
    })
    .await;
}

/// In session mode a TTL whose probe period (ttl/3) is not shorter than the server's
/// `wait_timeout` is refused before anything is taken, with an error that names the
/// setting and both fixes: the server would end the idle session (freeing the lock)
/// between two probes. A TTL that fits is granted, its validity bounded by
/// `wait_timeout` from when the grant was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_refuses_a_ttl_whose_probe_period_outlasts_wait_timeout_and_bounds_validity_by_it()
 {
    bounded(async {
        let server = server().await;
        let operator = open(&server).await;
        sqlx::query("SET GLOBAL wait_timeout = 3")
            .execute(operator.pool())
            .await
            .unwrap();
        let client = MySqlBackend::open(&format!("{}?mode=session", server.url()))
            .await
            .unwrap();
        // Checked up front, right after connecting, for a default TTL.
        let checked = client.check_ttl(Duration::from_secs(30)).await;
        assert!(
            matches!(&checked, Err(Error::Config { message }) if message.contains("wait_timeout = 3s")),
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
            message.contains("wait_timeout = 3s")
                && message.contains("below 9s")
                && message.contains("SET GLOBAL wait_timeout = 11"),
            "{message}"
        );
        assert_eq!(named_lock_holder(&operator, "idle").await, None);
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

/// In session mode a holder whose server session is killed (`KILL`) is told its lock
/// is lost within seconds (the backend asks the server every second which held
/// locks' sessions still exist), not at the watchdog's next probe, ttl/3 = 20 s after
/// the grant. The other client is granted the lock the moment the session ends; the
/// holder hears of it later, so the instants are recorded and the gap is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_killed_holder_session_is_reported_lost_within_seconds_not_at_the_next_probe()
 {
    bounded(async {
        let server = server().await;
        let session_url = format!("{}?mode=session", server.url());
        let holder = Locker::new(MySqlBackend::open(&session_url).await.unwrap());
        let other = MySqlBackend::open(&session_url).await.unwrap();
        let operator = open(&server).await;
        let guard = holder.lock("killed").ttl(MINUTE).await.unwrap();
        let session = named_lock_holder(&operator, "killed").await.unwrap();
        let lost = guard.lost();
        let lost = tokio::spawn(async move { (lost.await, Instant::now()) });
        sqlx::query(&format!("KILL {session}"))
            .execute(operator.pool())
            .await
            .unwrap();
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
/// of the held locks' sessions), not at the watchdog's next probe, ttl/3 = 20 s after
/// the grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_a_server_restart_is_reported_lost_within_seconds_of_its_return() {
    bounded(async {
        let mut server = server().await;
        let holder = Locker::new(
            MySqlBackend::open(&format!("{}?mode=session", server.url()))
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
