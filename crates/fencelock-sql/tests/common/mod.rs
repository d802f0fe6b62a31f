//! Test bodies and helpers shared by the SQL stores' test files: each file runs the
//! bodies that fit its store, on its own servers or files.
// Each test file uses only the part that fits its store.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use fencelock_conformance::harness::Server;
use fencelock_conformance::proxy::{Fault, FaultProxy};
use fencelock_core::{
    AcquireRequest, Error, FenceGate, Lease, LockBackend, LockName, Locker, OwnerId, WaitPolicy,
};
use tokio::time::Instant;

pub(crate) const MINUTE: Duration = Duration::from_secs(60);
pub(crate) const HOUR: Duration = Duration::from_secs(3600);

/// Runs a test body with a bound, so a hang fails instead of blocking CI.
pub(crate) async fn bounded<F: Future>(body: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(90), body)
        .await
        .expect("the test finished within 90s")
}

/// Whether `check` turns true, looking every 20 ms, at most 1,000 times (so every wait
/// on the server's state is bounded).
pub(crate) async fn eventually<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..1000 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

pub(crate) fn name(text: &str) -> LockName {
    LockName::new(text).unwrap()
}

pub(crate) fn request(lock: &str, ttl: Duration) -> AcquireRequest {
    AcquireRequest::new(name(lock), ttl).unwrap()
}

pub(crate) fn assert_lost(result: fencelock_core::Result<impl std::fmt::Debug>) {
    match result {
        Err(Error::Lost { .. }) => {}
        other => panic!("expected Error::Lost, got {other:?}"),
    }
}

/// A release wakes `waiter`, whose waiters check a held lock only once an hour,
/// three times over: the holder's TTL and the waiter's next check are both an hour
/// away, so only the wake-up on release (in-process, or a notification) can grant it.
pub(crate) async fn a_release_wakes_a_never_polling_waiter<B>(holder: &B, waiter: &B, lock: &str)
where
    B: LockBackend + Clone + 'static,
{
    for _ in 0..3 {
        let held = holder.acquire(request(lock, HOUR)).await.unwrap();
        let waiting = {
            let (waiter, lock) = (waiter.clone(), lock.to_owned());
            tokio::spawn(async move {
                let req = request(&lock, MINUTE).with_wait(WaitPolicy::Until(HOUR));
                waiter.acquire(req).await.unwrap()
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        holder.release(&held).await.unwrap();
        let lease = waiting.await.unwrap();
        assert!(lease.token() > held.token());
        waiter.release(&lease).await.unwrap();
    }
}

/// `b`, a client of its own, gets the lock `a` releases by polling: the holder's TTL
/// is an hour and nothing in `b`'s process is woken.
pub(crate) async fn a_waiter_in_another_client_polls_after_a_release<B>(a: &B, b: B)
where
    B: LockBackend + 'static,
{
    let held = a.acquire(request("poll", HOUR)).await.unwrap();
    let waiting = tokio::spawn(async move {
        let req = request("poll", MINUTE).with_wait(WaitPolicy::Until(HOUR));
        b.acquire(req).await.unwrap()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.release(&held).await.unwrap();
    // The holder's TTL is an hour: the grant can only come from polling the freed row.
    let lease = waiting.await.unwrap();
    assert!(lease.token() > held.token());
}

/// `b`, whose waiters check once an hour, is granted a lock that `a` never releases
/// just after `a`'s lease ends, `rounds` times: only a pause capped by the holder's
/// remaining time (by the database's clock) can grant it.
pub(crate) async fn a_waiter_wakes_when_the_holder_expires<B: LockBackend>(
    a: &B,
    b: &B,
    rounds: u32,
) {
    let ttl = Duration::from_millis(600);
    for _ in 0..rounds {
        let held = a.acquire(request("expire", ttl)).await.unwrap();
        let req = request("expire", ttl).with_wait(WaitPolicy::Until(HOUR));
        let lease = b.acquire(req).await.unwrap();
        assert!(
            Instant::now() >= held.valid_until(),
            "granted before the holder's lease ended"
        );
        assert!(lease.token() > held.token());
        b.release(&lease).await.unwrap();
    }
}

/// `renew_all` renews every live lease of a batch for the new TTL and reports, in
/// order, each one that is not ours (a forged owner, an expired lease) as lost.
pub(crate) async fn renew_all_renews_several_leases_and_reports_each_lost_one(
    backend: &impl LockBackend,
) {
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
            let renewed = result.unwrap();
            assert_eq!(renewed.token(), batch[i].0.token());
            assert!(renewed.remaining() > Duration::from_secs(50));
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
}

/// A SQL store on a database server that the conformance harness starts.
pub(crate) trait ServerStore {
    /// The server.
    type Server: Server + Send + Sync;
    /// The store's backend.
    type Backend: LockBackend + Clone + 'static;
    /// The store's fence gate.
    type Gate: FenceGate;

    /// A URL of a closed loopback port, with the password `hunter2`.
    const UNREACHABLE_URL: &'static str;
    /// What the error of an unreachable server advises.
    const UNREACHABLE_HINT: &'static str;

    /// Starts a server.
    fn start() -> impl Future<Output = Self::Server> + Send;

    /// A backend on `url`.
    fn open_url(url: &str) -> impl Future<Output = fencelock_core::Result<Self::Backend>> + Send;

    /// The backend's `migrate()`.
    fn migrate(backend: &Self::Backend) -> impl Future<Output = fencelock_core::Result<()>> + Send;

    /// The backend's `fence_gate()`.
    fn fence_gate(backend: &Self::Backend) -> impl Future<Output = Self::Gate> + Send;
}

/// A backend on `server`'s URL.
pub(crate) async fn open<S: ServerStore>(server: &S::Server) -> S::Backend {
    S::open_url(&server.url()).await.unwrap()
}

/// Leases and tokens are rows the server commits: killed and restarted with its data,
/// it still knows every holder, and tokens keep rising.
pub(crate) async fn leases_and_tokens_survive_a_server_killed_and_restarted<S: ServerStore>() {
    let mut server = S::start().await;
    let a = open::<S>(&server).await;
    let released = a.acquire(request("crash/released", MINUTE)).await.unwrap();
    a.release(&released).await.unwrap();
    let held = a.acquire(request("crash/held", HOUR)).await.unwrap();
    server.kill().unwrap();
    server.restart(true).await.unwrap();
    let b = open::<S>(&server).await;
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
}

/// A server that lost all its data still grants higher tokens than before: a new
/// row's counter is seeded from the database clock in microseconds.
pub(crate) async fn tokens_keep_rising_after_the_server_loses_all_its_data<S: ServerStore>() {
    let mut server = S::start().await;
    let before = {
        let a = open::<S>(&server).await;
        let lease = a.acquire(request("wiped", MINUTE)).await.unwrap();
        a.release(&lease).await.unwrap();
        lease.token()
    };
    server.restart(false).await.unwrap();
    let b = open::<S>(&server).await;
    let after = b.acquire(request("wiped", MINUTE)).await.unwrap();
    assert!(after.token() > before, "{:?} <= {before:?}", after.token());
}

/// Eight backends opened at once on a database without the table all start, and
/// migrating again changes nothing.
pub(crate) async fn many_backends_starting_at_once_on_an_empty_database_all_migrate<
    S: ServerStore,
>() {
    let server = S::start().await;
    let url = format!("{}?table=fresh_locks", server.url());
    let starts: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { S::open_url(&url).await })
        })
        .collect();
    for start in starts {
        let backend = start
            .await
            .unwrap()
            .expect("every concurrent start succeeds");
        S::migrate(&backend).await.expect("migrate is idempotent");
    }
}

/// An unreachable server is a temporary error that names the host and says what to
/// check, and never shows the password.
pub(crate) async fn an_unreachable_server_is_a_temporary_error_naming_the_host_never_the_password<
    S: ServerStore,
>() {
    // Port 1 on loopback: nothing listens there.
    let err = S::open_url(S::UNREACHABLE_URL).await.unwrap_err();
    let text = err.to_string();
    assert!(err.is_temporary(), "{text}");
    assert!(
        text.contains("127.0.0.1:1/db") && text.contains(S::UNREACHABLE_HINT),
        "{text}"
    );
    assert!(
        !text.contains("hunter2") && !format!("{err:?}").contains("hunter2"),
        "{text}"
    );
}

/// In session mode each held lock has a connection of its own, outside a pool of
/// one, and a release frees it for the next client.
pub(crate) async fn session_mode_locks_do_not_hold_pool_connections_and_are_freed_on_release<
    S: ServerStore,
>() {
    let server = S::start().await;
    let url = format!("{}?mode=session&pool_size=1", server.url());
    let a = S::open_url(&url).await.unwrap();
    let b = S::open_url(&url).await.unwrap();
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
}

/// A holder cut off from the server by a fault proxy is told its lock is lost once
/// its validity has passed; the next holder gets a higher token, the gate refuses
/// the old one, and the reconnected old holder can neither renew nor release.
pub(crate) async fn a_holder_cut_off_by_the_proxy_is_told_lost_and_fenced_after_a_takeover<
    S: ServerStore,
>() {
    let server = S::start().await;
    let proxy = FaultProxy::start(server.addr()).await.unwrap();
    let cut_url = server
        .url()
        .replace(&server.addr().to_string(), &proxy.addr().to_string());
    let cut_off = Locker::new(S::open_url(&cut_url).await.unwrap());
    let other = open::<S>(&server).await;
    let gate = S::fence_gate(&other).await;
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
}

/// In session mode, waiters queued in the server are granted one by one after a
/// release, each with the next token: every grant's token bump reads the row its
/// predecessor's release had just committed. `queued()` counts the sessions the server
/// has queued for the lock `queue`; the four waiters must all be queued before the
/// holder releases.
pub(crate) async fn session_mode_queued_waiters_are_granted_one_by_one_each_with_the_next_token<
    B,
    Q,
    F,
>(
    holder: &B,
    waiters: Vec<B>,
    queued: Q,
) where
    B: LockBackend + 'static,
    Q: Fn() -> F,
    F: Future<Output = usize>,
{
    assert_eq!(waiters.len(), 4);
    let held = holder.acquire(request("queue", HOUR)).await.unwrap();
    // Each waiter notes its token while it holds the lock, so the notes are in grant
    // order.
    let granted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for waiter in waiters {
        let granted = std::sync::Arc::clone(&granted);
        tasks.push(tokio::spawn(async move {
            let req = request("queue", HOUR).with_wait(WaitPolicy::Until(MINUTE));
            let lease = waiter.acquire(req).await.unwrap();
            granted.lock().unwrap().push(lease.token());
            waiter.release(&lease).await.unwrap();
        }));
    }
    // All four queue in the server before the release (bounded: 1,000 × 20 ms).
    let mut count = 0;
    for _ in 0..1000 {
        count = queued().await;
        if count == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count, 4);
    holder.release(&held).await.unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    let granted = granted.lock().unwrap().clone();
    let expected: Vec<_> = (1..=4)
        .map(|n| fencelock_core::FencingToken(held.token().0 + n))
        .collect();
    assert_eq!(granted, expected);
}

/// In session mode, a lock statement that fails after it took the lock (its token
/// bump is refused) leaves the lock free, with and without a wait: the failed
/// statement's session is ended before the error comes back. `refuse_owners(true)`
/// makes the lease table refuse every owner (a check constraint), `false` lifts it;
/// `lock_is_free()` asks the server whether anyone holds the lock `fails`.
pub(crate) async fn session_mode_a_lock_statement_that_fails_after_taking_the_lock_leaves_it_free<
    B,
    R,
    RF,
    L,
    LF,
>(
    client: &B,
    refuse_owners: R,
    lock_is_free: L,
) where
    B: LockBackend,
    R: Fn(bool) -> RF,
    RF: Future<Output = ()>,
    L: Fn() -> LF,
    LF: Future<Output = bool>,
{
    let first = client.acquire(request("fails", HOUR)).await.unwrap();
    client.release(&first).await.unwrap();
    // From now on the token bump fails, after the lock was taken in the same statement.
    refuse_owners(true).await;
    for wait in [false, true] {
        let mut req = request("fails", HOUR);
        if wait {
            req = req.with_wait(WaitPolicy::Until(MINUTE));
        }
        let result = client.acquire(req).await;
        assert!(matches!(result, Err(Error::Backend { .. })), "{result:?}");
        assert!(
            lock_is_free().await,
            "the failed statement's lock is still held"
        );
    }
    refuse_owners(false).await;
    let next = client.acquire(request("fails", HOUR)).await.unwrap();
    assert!(next.token() > first.token());
    client.release(&next).await.unwrap();
}

/// One `#[tokio::test]` per shared server-store body, each bounded, on `$store` (a
/// [`ServerStore`]).
#[allow(unused_macros)] // The SQLite tests have no server.
macro_rules! server_store_tests {
    ($store:ty) => {
        $crate::common::server_store_tests!(@each $store;
            leases_and_tokens_survive_a_server_killed_and_restarted,
            tokens_keep_rising_after_the_server_loses_all_its_data,
            many_backends_starting_at_once_on_an_empty_database_all_migrate,
            an_unreachable_server_is_a_temporary_error_naming_the_host_never_the_password,
            session_mode_locks_do_not_hold_pool_connections_and_are_freed_on_release,
            a_holder_cut_off_by_the_proxy_is_told_lost_and_fenced_after_a_takeover,
        );
    };
    (@each $store:ty; $($body:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $body() {
                $crate::common::bounded($crate::common::$body::<$store>()).await;
            }
        )*
    };
}
#[allow(unused_imports)] // As the macro.
pub(crate) use server_store_tests;

/// The fence gate test of a server store, for a file that has `server()` and
/// `open(&server)`: the gate's check commits and rolls back with the user's
/// transaction, and a lower token waits for a higher one's open transaction and is
/// then refused. `$create_accounts` creates the table `accounts (id INT PRIMARY KEY,
/// balance INT NOT NULL)` in the store's SQL.
#[allow(unused_macros)] // The SQLite tests have their own.
macro_rules! fence_gate_transaction_test {
    (gate: $gate:ty, conn: $conn:ty, create_accounts: $create_accounts:expr $(,)?) => {
        /// Adds 1 to account 1 in `tx`, fenced by `token`.
        async fn fenced_write(
            gate: &$gate,
            tx: &mut $conn,
            token: u64,
        ) -> fencelock_core::Result<()> {
            gate.admit_in(&mut *tx, "account/1", fencelock_core::FencingToken(token))
                .await?;
            fencelock_sql::sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
                .execute(&mut *tx)
                .await
                .unwrap();
            Ok(())
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn the_fence_gate_commits_and_rolls_back_with_the_users_transaction() {
            $crate::common::bounded(async {
                let server = server().await;
                let backend = open(&server).await;
                let gate = backend.fence_gate().await.unwrap();
                let pool = gate.pool().clone();
                fencelock_sql::sqlx::query($create_accounts)
                    .execute(&pool)
                    .await
                    .unwrap();
                fencelock_sql::sqlx::query("INSERT INTO accounts VALUES (1, 0)")
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
                    Some(fencelock_core::FencingToken(10))
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
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                assert!(
                    !stale.is_finished(),
                    "the lower token waited for the open transaction"
                );
                newer.commit().await.unwrap();
                match stale.await.unwrap() {
                    Err(fencelock_core::Error::StaleToken { token, highest, .. }) => {
                        assert_eq!(
                            (token, highest),
                            (
                                fencelock_core::FencingToken(11),
                                fencelock_core::FencingToken(12)
                            )
                        );
                    }
                    other => panic!("expected StaleToken, got {other:?}"),
                }
                let balance: i32 =
                    fencelock_sql::sqlx::query_scalar("SELECT balance FROM accounts WHERE id = 1")
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                assert_eq!(balance, 2);
            })
            .await;
        }
    };
}
#[allow(unused_imports)] // As the macro.
pub(crate) use fence_gate_transaction_test;
