//! The MySQL/MariaDB store's own rules, on real MariaDB servers started per test by
//! the conformance harness: crashes, killed sessions, polling waiters, batched
//! renewals and the fence gate inside a user's transaction. (The shared contract runs
//! against it from `fencelock-conformance`.)
#![cfg(feature = "mysql")]

use std::future::Future;
use std::time::Duration;

use fencelock_conformance::harness::{MariaDb, Server};
use fencelock_conformance::proxy::{Fault, FaultProxy};
use fencelock_core::{
    AcquireRequest, Error, FenceGate, FencingToken, Lease, LeaseKind, LockBackend, LockName,
    Locker, OwnerId, WaitKind, WaitPolicy,
};
use fencelock_sql::{MySqlBackend, MySqlConfig, MySqlFenceGate, sqlx};
use tokio::time::Instant;

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// Runs a test body with a bound, so a hang fails instead of blocking CI.
async fn bounded<F: Future>(body: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(90), body)
        .await
        .expect("the test finished within 90s")
}

fn name(text: &str) -> LockName {
    LockName::new(text).unwrap()
}

fn request(lock: &str, ttl: Duration) -> AcquireRequest {
    AcquireRequest::new(name(lock), ttl).unwrap()
}

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

fn assert_lost(result: fencelock_core::Result<impl std::fmt::Debug>) {
    match result {
        Err(Error::Lost { .. }) => {}
        other => panic!("expected Error::Lost, got {other:?}"),
    }
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
        for _ in 0..3 {
            // The holder's TTL and the waiter's next poll are both an hour away: only
            // the in-process wake on release can grant it.
            let held = backend.acquire(request("handoff", HOUR)).await.unwrap();
            let waiter = backend.clone();
            let waiting = tokio::spawn(async move {
                let req = request("handoff", MINUTE).with_wait(WaitPolicy::Until(HOUR));
                waiter.acquire(req).await.unwrap()
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
            backend.release(&held).await.unwrap();
            let lease = waiting.await.unwrap();
            assert!(lease.token() > held.token());
            backend.release(&lease).await.unwrap();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_in_another_client_gets_the_lock_by_polling_after_a_release() {
    bounded(async {
        let server = server().await;
        let a = open(&server).await;
        let b = open(&server).await;
        let held = a.acquire(request("poll", HOUR)).await.unwrap();
        let waiting = tokio::spawn(async move {
            let req = request("poll", MINUTE).with_wait(WaitPolicy::Until(HOUR));
            b.acquire(req).await.unwrap()
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        a.release(&held).await.unwrap();
        // The holder's TTL is an hour: the grant can only come from polling the freed row.
        assert!(waiting.await.unwrap().token() > held.token());
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
        // No release happens and b checks once an hour: only a pause capped by the
        // holder's remaining time (by the database's clock) can grant it.
        let ttl = Duration::from_millis(600);
        let held = a.acquire(request("expire", ttl)).await.unwrap();
        let req = request("expire", ttl).with_wait(WaitPolicy::Until(HOUR));
        let lease = b.acquire(req).await.unwrap();
        assert!(Instant::now() >= held.valid_until());
        assert!(lease.token() > held.token());
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
async fn leases_and_tokens_survive_a_server_killed_and_restarted() {
    bounded(async {
        let mut server = server().await;
        let a = open(&server).await;
        let released = a.acquire(request("crash/released", MINUTE)).await.unwrap();
        a.release(&released).await.unwrap();
        let held = a.acquire(request("crash/held", HOUR)).await.unwrap();
        server.kill().unwrap();
        server.restart(true).await.unwrap();
        let b = open(&server).await;
        // The held lease's row was committed: it is still held, by the same grant.
        let state = b.inspect(&name("crash/held")).await.unwrap().unwrap();
        assert_eq!(
            (state.holder, state.token),
            (held.owner().clone(), held.token())
        );
        assert!(matches!(
            b.acquire(request("crash/held", MINUTE)).await,
            Err(Error::Contended { .. })
        ));
        // The old client's pool reconnects; its lease is still its own.
        a.renew(&held, HOUR).await.unwrap();
        let next = b.acquire(request("crash/released", MINUTE)).await.unwrap();
        assert!(next.token() > released.token());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_rising_after_the_server_loses_all_its_data() {
    bounded(async {
        let mut server = server().await;
        let before = {
            let a = open(&server).await;
            let lease = a.acquire(request("wiped", MINUTE)).await.unwrap();
            a.release(&lease).await.unwrap();
            lease.token()
        };
        server.restart(false).await.unwrap();
        let b = open(&server).await;
        let after = b.acquire(request("wiped", MINUTE)).await.unwrap();
        // The new row's counter is seeded from the database clock in microseconds.
        assert!(after.token() > before, "{:?} <= {before:?}", after.token());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_all_renews_several_leases_in_one_statement_and_reports_each_lost_one() {
    bounded(async {
        let server = server().await;
        let backend = open(&server).await;
        let short = Duration::from_millis(400);
        let mut leases = Vec::new();
        for lock in ["r/1", "r/2", "r/3"] {
            leases.push(backend.acquire(request(lock, short)).await.unwrap());
        }
        let expired = backend
            .acquire(request("r/expired", Duration::from_millis(20)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let forged = Lease::new(
            name("r/2"),
            OwnerId::random(),
            leases[1].token(),
            Instant::now(),
        );
        let batch: Vec<(Lease, Duration)> = [
            leases[0].clone(),
            forged,
            leases[1].clone(),
            expired,
            leases[2].clone(),
        ]
        .into_iter()
        .map(|lease| (lease, MINUTE))
        .collect();
        let results = backend.renew_all(&batch).await;
        assert_eq!(results.len(), 5);
        for (i, result) in results.into_iter().enumerate() {
            if i == 1 || i == 3 {
                assert_lost(result);
            } else {
                assert_eq!(result.unwrap().token(), batch[i].0.token());
            }
        }
        tokio::time::sleep(short + Duration::from_millis(100)).await;
        for (lease, lock) in leases.iter().zip(["r/1", "r/2", "r/3"]) {
            let state = backend
                .inspect(&name(lock))
                .await
                .unwrap()
                .expect("renewed");
            assert_eq!(state.holder, *lease.owner());
            assert!(state.remaining.unwrap() > Duration::from_secs(50));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_backends_starting_at_once_on_an_empty_database_all_migrate() {
    bounded(async {
        let server = server().await;
        let url = format!("{}?table=fresh_locks", server.url());
        let starts: Vec<_> = (0..8)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { MySqlBackend::open(&url).await })
            })
            .collect();
        for start in starts {
            let backend = start
                .await
                .unwrap()
                .expect("every concurrent start succeeds");
            backend.migrate().await.expect("migrate is idempotent");
        }
    })
    .await;
}

/// Adds 1 to account 1 in `tx`, fenced by `token`.
async fn fenced_write(
    gate: &MySqlFenceGate,
    tx: &mut sqlx::MySqlConnection,
    token: u64,
) -> fencelock_core::Result<()> {
    gate.admit_in(&mut *tx, "account/1", FencingToken(token))
        .await?;
    sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
        .execute(&mut *tx)
        .await
        .unwrap();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_gate_commits_and_rolls_back_with_the_users_transaction() {
    bounded(async {
        let server = server().await;
        let backend = open(&server).await;
        let gate = backend.fence_gate().await.unwrap();
        let pool = gate.pool().clone();
        sqlx::query(
            "CREATE TABLE accounts (id INT PRIMARY KEY, balance INT NOT NULL) ENGINE = InnoDB",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("INSERT INTO accounts VALUES (1, 0)")
            .execute(&pool)
            .await
            .unwrap();
        // Rolled back: neither the write nor the token stays.
        let mut tx = pool.begin().await.unwrap();
        fenced_write(&gate, &mut tx, 10).await.unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(gate.highest("account/1").await.unwrap(), None);
        // Committed: both stay.
        let mut tx = pool.begin().await.unwrap();
        fenced_write(&gate, &mut tx, 10).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            gate.highest("account/1").await.unwrap(),
            Some(FencingToken(10))
        );
        // A higher token's open transaction holds the gate's row: a lower token waits
        // for its commit and is then refused, its write never made.
        let mut newer = pool.begin().await.unwrap();
        fenced_write(&gate, &mut newer, 12).await.unwrap();
        let stale = {
            let (pool, gate) = (pool.clone(), gate.clone());
            tokio::spawn(async move {
                let mut tx = pool.begin().await.unwrap();
                fenced_write(&gate, &mut tx, 11).await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !stale.is_finished(),
            "the lower token waited for the open transaction"
        );
        newer.commit().await.unwrap();
        match stale.await.unwrap() {
            Err(Error::StaleToken { token, highest, .. }) => {
                assert_eq!((token, highest), (FencingToken(11), FencingToken(12)));
            }
            other => panic!("expected StaleToken, got {other:?}"),
        }
        let balance: i32 = sqlx::query_scalar("SELECT balance FROM accounts WHERE id = 1")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(balance, 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_temporary_error_naming_the_host_never_the_password() {
    bounded(async {
        // Port 1 on loopback: nothing listens there.
        let err = MySqlBackend::open("mysql://app:hunter2@127.0.0.1:1/db?connect_timeout=2s")
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(err.is_temporary(), "{text}");
        assert!(
            text.contains("127.0.0.1:1/db") && text.contains("check that the MySQL/MariaDB server"),
            "{text}"
        );
        assert!(
            !text.contains("hunter2") && !format!("{err:?}").contains("hunter2"),
            "{text}"
        );
    })
    .await;
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_locks_do_not_hold_pool_connections_and_are_freed_on_release() {
    bounded(async {
        let server = server().await;
        let url = format!("{}?mode=session&pool_size=1", server.url());
        let a = MySqlBackend::open(&url).await.unwrap();
        let b = MySqlBackend::open(&url).await.unwrap();
        // Each held lock has a connection of its own, outside the pool of one.
        let mut leases = Vec::new();
        for i in 0..4 {
            leases.push(a.acquire(request(&format!("s/{i}"), MINUTE)).await.unwrap());
        }
        for (i, lease) in leases.iter().enumerate() {
            let lock = format!("s/{i}");
            assert!(matches!(
                b.acquire(request(&lock, MINUTE)).await,
                Err(Error::Contended { .. })
            ));
            a.release(lease).await.unwrap();
            assert!(b.acquire(request(&lock, MINUTE)).await.unwrap().token() > lease.token());
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_cut_off_by_the_proxy_is_told_lost_and_fenced_after_a_takeover() {
    bounded(async {
        let server = server().await;
        let proxy = FaultProxy::start(server.addr()).await.unwrap();
        let cut_url = server
            .url()
            .replace(&server.addr().to_string(), &proxy.addr().to_string());
        let cut_off = Locker::new(MySqlBackend::open(&cut_url).await.unwrap());
        let other = open(&server).await;
        let gate = other.fence_gate().await.unwrap();
        let ttl = Duration::from_millis(900);
        let guard = cut_off.lock("cut").ttl(ttl).await.unwrap();
        let old = guard.lease().clone();
        gate.admit("cut", old.token()).await.unwrap();
        proxy.set(Fault::Blackhole);
        // No renewal gets through: the holder is told its lock is lost once its
        // validity has passed, and the database's clock frees the row.
        let lost = guard.lost().await;
        assert!(lost.is_lost(), "{lost:?}");
        assert!(Instant::now() >= old.valid_until());
        let next = other
            .acquire(request("cut", MINUTE).with_wait(WaitPolicy::Until(MINUTE)))
            .await
            .unwrap();
        assert!(next.token() > old.token());
        gate.admit("cut", next.token()).await.unwrap();
        assert!(matches!(
            gate.admit("cut", old.token()).await,
            Err(Error::StaleToken { .. })
        ));
        // Reconnected, the cut-off client can neither renew nor release the old grant,
        // and the new holder keeps it.
        proxy.set(Fault::Reset);
        tokio::time::sleep(Duration::from_millis(100)).await;
        proxy.set(Fault::Pass);
        let backend = cut_off.backend();
        assert_lost(backend.renew(&old, MINUTE).await);
        assert_lost(backend.release(&old).await);
        let state = other.inspect(&name("cut")).await.unwrap().unwrap();
        assert_eq!(
            (state.holder, state.token),
            (next.owner().clone(), next.token())
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

/// The server sessions running a `GET_LOCK` now: `(id, state, seconds in the
/// statement)`.
async fn get_lock_waits(operator: &MySqlBackend) -> Vec<(i64, String, i64)> {
    sqlx::query_as(
        "SELECT CAST(ID AS SIGNED), COALESCE(STATE, ''), CAST(TIME AS SIGNED)
         FROM information_schema.PROCESSLIST
         WHERE COMMAND IN ('Query', 'Execute') AND INFO LIKE 'SELECT GET_LOCK(%'",
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
        // The cancelled acquire's server session is ended (bounded: 1,000 × 20 ms).
        let mut gone = false;
        for _ in 0..1000 {
            if !session_exists(&operator, id).await {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone, "the cancelled waiter's session {id} still exists");
        assert!(get_lock_waits(&operator).await.is_empty());
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
        let mut left = get_lock_waits(&operator).await;
        for _ in 0..1000 {
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            left = get_lock_waits(&operator).await;
        }
        assert!(left.is_empty(), "GET_LOCK still running: {left:?}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_mode_acquire_and_release_are_exactly_two_statements() {
    use sqlx::Connection;
    bounded(async {
        let server = server().await;
        // One pooled connection: the client never opens another one (whose setup
        // `SET` would count) while a released one is on its way back to the pool.
        let client = MySqlBackend::open(&format!("{}?pool_size=1", server.url()))
            .await
            .unwrap();
        let operator = open(&server).await;
        let mut probe = operator.pool().acquire().await.unwrap().detach();
        // Warm up: the pool's connection is open and the statements are prepared.
        for _ in 0..2 {
            let lease = client.acquire(request("counted", MINUTE)).await.unwrap();
            client.release(&lease).await.unwrap();
        }
        // The probe's own cost: reading twice with nothing between counts one
        // question, the second read. Checked, not assumed.
        let first = counters(&mut probe).await;
        let second = counters(&mut probe).await;
        assert_eq!((second.0 - first.0, second.1 - first.1), (1, 0));
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
