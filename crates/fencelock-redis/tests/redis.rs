//! Redis-specific rules, each against a real `redis-server` started by the harness.

use std::collections::HashMap;
use std::net::{Ipv4Addr, TcpListener};
use std::time::Duration;

use fencelock_conformance::harness::{RedisServer, Server};
use fencelock_conformance::proxy::{Fault, FaultProxy};
use fencelock_core::{
    AcquireRequest, Error, FenceGate, FencingToken, LockBackend, LockName, Locker, LossReason,
    WaitPolicy,
};
use fencelock_redis::redis::{self, aio::MultiplexedConnection};
use fencelock_redis::{RedisBackend, RedisConfig};
use tokio::time::{Instant, timeout};

/// The bound on any single test.
const TEST_LIMIT: Duration = Duration::from_secs(60);

async fn server() -> RedisServer {
    RedisServer::start().await.expect("start redis-server")
}

/// A plain connection, as an operator's `redis-cli` would have.
async fn operator(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("operator connection")
}

async fn run<T: redis::FromRedisValue>(conn: &mut MultiplexedConnection, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(conn)
        .await
        .unwrap_or_else(|err| panic!("{args:?}: {err}"))
}

/// `INFO commandstats` as command name -> calls.
async fn command_calls(conn: &mut MultiplexedConnection) -> HashMap<String, u64> {
    let info: String = run(conn, &["INFO", "commandstats"]).await;
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

fn name(text: &str) -> LockName {
    LockName::new(text).expect("valid name")
}

fn request(name: &LockName, ttl: Duration, wait: WaitPolicy) -> AcquireRequest {
    AcquireRequest::new(name.clone(), ttl)
        .expect("valid ttl")
        .with_wait(wait)
}

async fn bounded<F: std::future::Future>(fut: F) -> F::Output {
    timeout(TEST_LIMIT, fut)
        .await
        .expect("the test finished within its bound")
}

/// The `set` and `del` keyspace events of one key, up to the first `del` (others, such
/// as `expire`, skipped), each awaited at most 5 s; bounded to 10 events.
async fn set_then_del(events: &mut redis::aio::PubSubStream) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..10 {
        let Ok(Some(event)) = timeout(
            Duration::from_secs(5),
            futures_util::StreamExt::next(events),
        )
        .await
        else {
            break;
        };
        let kind = String::from_utf8_lossy(event.get_payload_bytes()).into_owned();
        if kind == "set" || kind == "del" {
            seen.push(kind.clone());
        }
        if kind == "del" {
            break;
        }
    }
    seen
}

/// Tokens keep rising after a restart without persistence that lost every key (the
/// counter is re-seeded from the server clock), and a holder learns its lock is gone
/// at its next renewal, long before its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_rising_after_a_restart_that_lost_every_key() {
    bounded(async {
        let mut server = server().await;
        let backend = RedisBackend::open(&server.url()).await.expect("connect");
        let lock = name("restart");
        let before = backend
            .acquire(request(&lock, Duration::from_secs(30), WaitPolicy::NoWait))
            .await
            .expect("acquire");
        backend.release(&before).await.expect("release");

        let ttl = Duration::from_secs(3);
        let holder = Locker::new(backend.clone());
        let guard = holder.lock("restart/held").ttl(ttl).await.expect("lock");
        server.restart(false).await.expect("restart without data");
        let err = timeout(ttl, guard.lost())
            .await
            .expect("the loss is noticed before the TTL ends");
        assert!(
            matches!(
                err,
                Error::Lost {
                    reason: LossReason::NotOurs,
                    ..
                }
            ),
            "a renewal, not the expiry, must report it: {err:?}"
        );
        // Within one renewal period: the restart wiped the server's command counts, and
        // the one renewal script that reached it since (its one `GET` of the lock key)
        // is the one that reported the loss.
        let mut conn = operator(&server.url()).await;
        let calls = command_calls(&mut conn).await;
        assert_eq!(
            calls.get("get").copied(),
            Some(1),
            "renewals that reached the restarted server: {calls:?}"
        );
        let keys: i64 = run(&mut conn, &["DBSIZE"]).await;
        assert_eq!(keys, 0, "the restart kept data; the test needs it wiped");
        let after = backend
            .acquire(request(&lock, Duration::from_secs(30), WaitPolicy::NoWait))
            .await
            .expect("acquire after the restart (the connection reconnects)");
        assert!(
            after.token() > before.token(),
            "token {} after the data loss is not above {}",
            after.token(),
            before.token()
        );
    })
    .await;
}

/// The token counter expires (`token_ttl`) so unused names free their memory, and a
/// grant after it expired still gets a higher token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_counter_expires_and_a_reseeded_one_still_rises() {
    bounded(async {
        let server = server().await;
        let backend = RedisBackend::open(&format!("{}?token_ttl=60s", server.url()))
            .await
            .expect("connect");
        let lock = name("counter-ttl");
        let first = backend
            .acquire(request(&lock, Duration::from_secs(5), WaitPolicy::NoWait))
            .await
            .expect("acquire");
        let mut conn = operator(&server.url()).await;
        let counter_ttl: i64 = run(&mut conn, &["PTTL", &backend.token_key(&lock)]).await;
        assert!(
            (59_000..=60_000).contains(&counter_ttl),
            "the counter must expire token_ttl after the grant, has PTTL {counter_ttl}"
        );
        backend.release(&first).await.expect("release");
        // As if it had expired.
        let _: i64 = run(&mut conn, &["DEL", &backend.token_key(&lock)]).await;
        let second = backend
            .acquire(request(&lock, Duration::from_secs(5), WaitPolicy::NoWait))
            .await
            .expect("acquire");
        assert!(
            second.token() > first.token(),
            "{} after {}",
            second.token(),
            first.token()
        );
    })
    .await;
}

/// A token never lags the server clock, so a counter left behind (a replica promoted
/// after missing the last grants) still mints above every earlier token; a counter
/// ahead of the clock (two grants in one microsecond, a clock stepped back) still
/// rises by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_left_behind_or_ahead_of_the_clock_still_rises() {
    bounded(async {
        let server = server().await;
        let backend = RedisBackend::open(&server.url()).await.expect("connect");
        let mut admin = operator(&server.url()).await;
        let lock = name("counter-behind");
        let counter = backend.token_key(&lock);
        let take = || backend.acquire(request(&lock, Duration::from_secs(5), WaitPolicy::NoWait));
        let first = take().await.expect("acquire");
        backend.release(&first).await.expect("release");

        let _: () = run(&mut admin, &["SET", &counter, "7"]).await;
        let second = take().await.expect("acquire");
        backend.release(&second).await.expect("release");
        assert!(
            second.token() > first.token(),
            "a counter of 7 gave {} after {}",
            second.token(),
            first.token()
        );

        let ahead = second.token().0 + 1_000_000_000_000;
        let _: () = run(&mut admin, &["SET", &counter, &ahead.to_string()]).await;
        let third = take().await.expect("acquire");
        assert_eq!(
            third.token().0,
            ahead + 1,
            "the counter ahead of the clock rises by one"
        );
        let stored: String = run(&mut admin, &["GET", &counter]).await;
        assert_eq!(stored, (ahead + 1).to_string());
    })
    .await;
}

/// An uncontended acquire and release run exactly `TIME`, `SET … GET` (the counter),
/// `SET NX PX` (the grant), `GET` and `DEL` in two scripts, and never read the waiters'
/// queue: only a grant a waiter queued for (marked) makes its release look there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncontended_cycle_runs_five_commands_and_never_reads_the_queue() {
    bounded(async {
        let server = server().await;
        let backend = RedisBackend::open(&server.url()).await.expect("connect");
        let mut admin = operator(&server.url()).await;
        let lock = name("uncontended");
        // Once unmeasured, so the counter exists as it does for a name in use.
        let warm = backend
            .acquire(request(&lock, Duration::from_secs(5), WaitPolicy::NoWait))
            .await
            .expect("acquire");
        backend.release(&warm).await.expect("release");
        let before = command_calls(&mut admin).await;
        let lease = backend
            .acquire(request(
                &lock,
                Duration::from_secs(5),
                WaitPolicy::Until(Duration::from_secs(1)),
            ))
            .await
            .expect("acquire");
        backend.release(&lease).await.expect("release");
        let after = command_calls(&mut admin).await;
        let mut ran: Vec<(String, u64)> = after
            .into_iter()
            .filter(|(command, _)| command != "info")
            .filter_map(|(command, calls)| {
                let delta = calls - before.get(&command).copied().unwrap_or(0);
                (delta > 0).then_some((command, delta))
            })
            .collect();
        ran.sort();
        let expected: Vec<(String, u64)> = [
            ("del", 1),
            ("evalsha", 2),
            ("get", 1),
            ("set", 2),
            ("time", 1),
        ]
        .into_iter()
        .map(|(command, calls)| (command.to_owned(), calls))
        .collect();
        assert_eq!(ran, expected);
    })
    .await;
}

/// Scripts run by EVALSHA and are reloaded when the server forgot them (`SCRIPT
/// FLUSH`, or a restart): every operation still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_are_reloaded_after_script_flush() {
    bounded(async {
        let server = server().await;
        let backend = RedisBackend::open(&server.url()).await.expect("connect");
        let mut conn = operator(&server.url()).await;
        let lock = name("noscript");
        let ttl = Duration::from_secs(5);
        let lease = backend
            .acquire(request(&lock, ttl, WaitPolicy::NoWait))
            .await
            .expect("acquire");
        backend.release(&lease).await.expect("release");
        let _: String = run(&mut conn, &["SCRIPT", "FLUSH"]).await;
        let lease = backend
            .acquire(request(&lock, ttl, WaitPolicy::NoWait))
            .await
            .expect("acquire after SCRIPT FLUSH");
        let _: String = run(&mut conn, &["SCRIPT", "FLUSH"]).await;
        backend
            .renew(&lease, ttl)
            .await
            .expect("renew after SCRIPT FLUSH");
        let _: String = run(&mut conn, &["SCRIPT", "FLUSH"]).await;
        let state = backend
            .inspect(&lock)
            .await
            .expect("inspect after SCRIPT FLUSH");
        assert_eq!(state.map(|s| s.token), Some(lease.token()));
        let _: String = run(&mut conn, &["SCRIPT", "FLUSH"]).await;
        backend
            .release(&lease)
            .await
            .expect("release after SCRIPT FLUSH");
        let calls = command_calls(&mut conn).await;
        assert!(calls.get("evalsha").copied().unwrap_or(0) >= 8, "{calls:?}");
        assert!(
            !calls.contains_key("eval"),
            "scripts must be sent by hash: {calls:?}"
        );
        assert!(
            calls.get("script|load").copied().unwrap_or(0) >= 4,
            "{calls:?}"
        );
    })
    .await;
}

/// `renew_all` renews every lease of a watchdog tick with one command (one round
/// trip), extends exactly the leases still ours, and reports the others lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_all_is_one_round_trip() {
    bounded(async {
        let server = server().await;
        let backend = RedisBackend::open(&server.url()).await.expect("connect");
        let mut conn = operator(&server.url()).await;
        let short = Duration::from_secs(5);
        let mut leases = Vec::new();
        for i in 0..50 {
            let lock = name(&format!("batch/{i}"));
            leases.push(
                backend
                    .acquire(request(&lock, short, WaitPolicy::NoWait))
                    .await
                    .expect("acquire"),
            );
        }
        // One lease is taken away behind its holder's back.
        let _: i64 = run(&mut conn, &["DEL", &backend.lock_key(leases[7].name())]).await;
        let long = Duration::from_secs(60);
        // The first renewal ever loads the script (NOSCRIPT, SCRIPT LOAD, EVALSHA).
        backend.renew(&leases[0], short).await.expect("renew");
        let batch: Vec<_> = leases.iter().map(|lease| (lease.clone(), long)).collect();
        let before = command_calls(&mut conn).await;
        let results = backend.renew_all(&batch).await;
        let after = command_calls(&mut conn).await;
        let sent = |calls: &HashMap<String, u64>| calls.get("evalsha").copied().unwrap_or(0);
        assert_eq!(
            sent(&after) - sent(&before),
            1,
            "50 renewals must cost one EVALSHA"
        );
        assert_eq!(results.len(), 50);
        for (i, result) in results.iter().enumerate() {
            if i == 7 {
                assert!(matches!(result, Err(err) if err.is_lost()), "{result:?}");
                continue;
            }
            let renewed = result.as_ref().expect("a held lease renews");
            assert!(
                renewed.remaining() > short,
                "lease {i} was not extended locally"
            );
            let pttl: i64 = run(&mut conn, &["PTTL", &backend.lock_key(renewed.name())]).await;
            assert!(pttl > 50_000, "lease {i} has PTTL {pttl} on the server");
        }
        let missing: i64 = run(&mut conn, &["EXISTS", &backend.lock_key(leases[7].name())]).await;
        assert_eq!(missing, 0, "a lost lease must not be recreated by renewal");
    })
    .await;
}

/// Connecting to a server whose `maxmemory-policy` can evict lock keys fails with a
/// Config error naming the policy and the fix; `allow_eviction=true` accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicting_servers_are_refused_unless_allowed() {
    bounded(async {
        let server = server().await;
        let mut conn = operator(&server.url()).await;
        // No memory limit: nothing is ever evicted, whatever the policy.
        let _: String = run(
            &mut conn,
            &["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"],
        )
        .await;
        RedisBackend::open(&server.url())
            .await
            .expect("no maxmemory: no eviction");
        let _: String = run(&mut conn, &["CONFIG", "SET", "maxmemory", "100mb"]).await;
        for policy in ["allkeys-lru", "volatile-ttl"] {
            let _: String = run(&mut conn, &["CONFIG", "SET", "maxmemory-policy", policy]).await;
            let err = RedisBackend::open(&server.url())
                .await
                .expect_err("an evicting server");
            assert!(matches!(err, Error::Config { .. }), "{err:?}");
            let text = err.to_string();
            assert!(
                text.contains(policy)
                    && text.contains("noeviction")
                    && text.contains("allow_eviction=true"),
                "{text}"
            );
        }
        RedisBackend::open(&format!("{}?allow_eviction=true", server.url()))
            .await
            .expect("the opt-out accepts the server");
        let _: String = run(
            &mut conn,
            &["CONFIG", "SET", "maxmemory-policy", "noeviction"],
        )
        .await;
        RedisBackend::open(&server.url())
            .await
            .expect("noeviction is safe");
    })
    .await;
}

/// The Redis fence gate admits equal and higher tokens, refuses lower ones with
/// `StaleToken` naming the highest, compares tokens beyond 2^53 exactly, and a fenced
/// write with a stale token writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_gate_refuses_stale_tokens() {
    bounded(async {
        let server = server().await;
        let backend = RedisBackend::open(&server.url()).await.expect("connect");
        let gate = backend.fence_gate();
        let mut conn = operator(&server.url()).await;
        gate.set_fenced("doc", FencingToken(20), "doc:body", b"new")
            .await
            .expect("admitted");
        gate.admit("doc", FencingToken(20))
            .await
            .expect("the same holder writes again");
        let err = gate
            .set_fenced("doc", FencingToken(19), "doc:body", b"stale")
            .await
            .expect_err("a lower token");
        assert!(
            matches!(
                err,
                Error::StaleToken {
                    token: FencingToken(19),
                    highest: FencingToken(20),
                    ..
                }
            ),
            "{err:?}"
        );
        let body: String = run(&mut conn, &["GET", "doc:body"]).await;
        assert_eq!(body, "new", "a refused write must not happen");
        assert_eq!(
            gate.highest("doc").await.expect("highest"),
            Some(FencingToken(20))
        );
        assert_eq!(gate.highest("other").await.expect("highest"), None);
        // Above 2^53 a double cannot tell these apart; the gate must.
        gate.admit("big", FencingToken(u64::MAX - 1))
            .await
            .expect("admitted");
        let err = gate
            .admit("big", FencingToken(u64::MAX - 2))
            .await
            .expect_err("lower");
        assert!(matches!(err, Error::StaleToken { .. }), "{err:?}");
        gate.admit("big", FencingToken(u64::MAX))
            .await
            .expect("higher");
        gate.admit("small", FencingToken(9))
            .await
            .expect("admitted");
        gate.admit("small", FencingToken(10))
            .await
            .expect("10 > 9 though \"10\" < \"9\"");
    })
    .await;
}

/// A holder cut off from the server (a blackholing proxy, as in a long pause) is told
/// lost when its validity ends, which is before the server lets anyone else take the
/// lock; the next holder's token is higher and the gate refuses the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_holder_is_told_lost_before_takeover_and_its_stale_write_is_refused() {
    bounded(async {
        let server = server().await;
        let proxy = FaultProxy::start(server.addr()).await.expect("proxy");
        let holder_url = format!("redis://{}/?timeout=200ms", proxy.addr());
        let holder = Locker::new(RedisBackend::open(&holder_url).await.expect("connect"));
        let other = RedisBackend::open(&server.url()).await.expect("connect");
        let gate = other.fence_gate();
        let ttl = Duration::from_secs(1);
        let guard = holder.lock("cut-off").ttl(ttl).await.expect("lock");
        let old = guard.token();
        gate.admit("resource", old)
            .await
            .expect("the holder writes while it holds");
        proxy.set(Fault::Blackhole);
        let lost = guard.lost();
        let taken = other.acquire(request(
            &name("cut-off"),
            Duration::from_secs(30),
            WaitPolicy::Until(ttl * 5),
        ));
        let (err, new) = tokio::join!(
            async {
                let err = lost.await;
                (err, Instant::now())
            },
            async {
                let lease = taken
                    .await
                    .expect("the lock is free once the holder's TTL ran out");
                (lease, Instant::now())
            }
        );
        let ((err, lost_at), (new, granted_at)) = (err, new);
        assert!(err.is_lost(), "{err:?}");
        assert!(
            lost_at <= granted_at,
            "the old holder learned of its loss {:?} after the takeover",
            lost_at - granted_at
        );
        assert!(new.token() > old, "token {} after {old}", new.token());
        gate.admit("resource", new.token())
            .await
            .expect("the new holder's write");
        let err = gate
            .admit("resource", old)
            .await
            .expect_err("the old holder's late write");
        assert!(matches!(err, Error::StaleToken { .. }), "{err:?}");
        proxy.set(Fault::Pass);
        let err = guard.release().await.expect_err("releasing a lost guard");
        assert!(err.is_lost(), "{err:?}");
        let state = other
            .inspect(new.name())
            .await
            .expect("inspect")
            .expect("held");
        assert_eq!(
            state.token,
            new.token(),
            "the old holder's release touched the new grant"
        );
    })
    .await;
}

/// An acquire whose reply is lost (the server granted it, the client never heard)
/// leaves no ghost holder: the client releases it by owner, long before the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unseen_grant_is_released_by_owner() {
    bounded(async {
        let server = server().await;
        let proxy = FaultProxy::start(server.addr()).await.expect("proxy");
        let client = RedisBackend::open(&format!("redis://{}/?timeout=300ms", proxy.addr()))
            .await
            .expect("connect");
        let observer = RedisBackend::open(&server.url()).await.expect("connect");
        // The server's keyspace events for the lock key: a `set` then a `del` prove the
        // grant was made and then undone.
        let mut admin = operator(&server.url()).await;
        let _: () = run(
            &mut admin,
            &["CONFIG", "SET", "notify-keyspace-events", "Kg$"],
        )
        .await;
        let mut events = redis::Client::open(server.url())
            .expect("client")
            .get_async_pubsub()
            .await
            .expect("pub/sub");
        events
            .subscribe("__keyspace@0__:fencelock:lock:ghost")
            .await
            .expect("subscribe");
        let mut events = events.into_on_message();
        let lock = name("ghost");
        // Scripts loaded first: a NOSCRIPT reply that never arrives would stop the script.
        let warm_up = client
            .acquire(request(&lock, Duration::from_secs(60), WaitPolicy::NoWait))
            .await
            .expect("acquire");
        client.release(&warm_up).await.expect("release");
        assert_eq!(
            set_then_del(&mut events).await,
            ["set", "del"],
            "the warm-up's key events"
        );
        proxy.set(Fault::DropReplies);
        let err = client
            .acquire(request(&lock, Duration::from_secs(60), WaitPolicy::NoWait))
            .await
            .expect_err("no reply arrives");
        assert!(err.is_temporary(), "a timeout is temporary: {err:?}");
        assert_eq!(
            set_then_del(&mut events).await,
            ["set", "del"],
            "the unseen grant is made and released (within 5 s of a 60 s TTL)"
        );
        assert_eq!(
            observer.inspect(&lock).await.expect("inspect"),
            None,
            "a ghost holder is left"
        );
    })
    .await;
}

/// An operator's `FLUSHALL` is reported lost (not merely expired) at the holder's next
/// renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_is_reported_lost_within_one_renewal_period() {
    bounded(async {
        let server = server().await;
        let holder = Locker::new(RedisBackend::open(&server.url()).await.expect("connect"));
        let ttl = Duration::from_secs(3);
        let guard = holder.lock("flushed").ttl(ttl).await.expect("lock");
        let mut conn = operator(&server.url()).await;
        let _: String = run(&mut conn, &["FLUSHALL"]).await;
        // Counted after the flush: a renewal that ran before it is not counted.
        let renewals = |calls: &HashMap<String, u64>| calls.get("evalsha").copied().unwrap_or(0);
        let before = renewals(&command_calls(&mut conn).await);
        let err = timeout(ttl, guard.lost())
            .await
            .expect("lost before the TTL ends");
        let after = renewals(&command_calls(&mut conn).await);
        assert!(
            matches!(
                err,
                Error::Lost {
                    reason: LossReason::NotOurs,
                    ..
                }
            ),
            "{err:?}"
        );
        // The first renewal after the flush already reports the loss.
        assert!(
            after - before <= 1,
            "{} renewals ran after the flush before the loss was reported",
            after - before
        );
    })
    .await;
}

/// A server that is not there gives a temporary Backend error that names the address
/// and says to check the server, and never shows the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_named_in_a_temporary_error() {
    bounded(async {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let err = RedisBackend::open(&format!("redis://app:hunter2@127.0.0.1:{port}/"))
            .await
            .expect_err("nothing listens there");
        assert!(
            matches!(
                err,
                Error::Backend {
                    temporary: true,
                    ..
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&format!("127.0.0.1:{port}")) && text.contains("running"),
            "{text}"
        );
        assert!(
            !text.contains("hunter2") && !format!("{err:?}").contains("hunter2"),
            "{text}"
        );
        let config =
            RedisConfig::from_url(&format!("redis://app:hunter2@127.0.0.1:{port}/")).expect("url");
        assert!(!format!("{config:?}").contains("hunter2"));
    })
    .await;
}

/// Capabilities: fencing, pub/sub waiting, TTL leases, shared between processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_say_what_the_store_does() {
    let server = server().await;
    let backend = RedisBackend::open(&server.url()).await.expect("connect");
    let caps = backend.capabilities();
    assert_eq!(caps.store, "redis");
    assert!(caps.fencing && !caps.fifo && caps.shared_between_processes);
    assert_eq!(caps.wait, fencelock_core::WaitKind::Notify);
    assert_eq!(caps.lease, fencelock_core::LeaseKind::Ttl);
}

/// A release published while a waiter's connections were cut off never reaches it; once
/// they are back, the waiter looks again by itself (its pub/sub listener wakes every
/// waiter after resubscribing, and its attempts retry the broken command connection)
/// and is granted. The holder's grant lasts an hour, so no expiry fallback can be what
/// grants it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_published_while_the_waiter_was_cut_off_still_reaches_it() {
    bounded(async {
        let server = server().await;
        let proxy = FaultProxy::start(server.addr()).await.expect("proxy");
        let waiter_url = format!("redis://{}/?timeout=500ms", proxy.addr());
        let waiter = RedisBackend::open(&waiter_url).await.expect("connect");
        let holder = RedisBackend::open(&server.url()).await.expect("connect");
        let mut admin = operator(&server.url()).await;
        let lock = name("cut-off-waiter");
        let held = holder
            .acquire(request(
                &lock,
                Duration::from_secs(3600),
                WaitPolicy::NoWait,
            ))
            .await
            .expect("take");
        let attempts_before = command_calls(&mut admin).await.get("evalsha").copied();
        let waiting = tokio::spawn({
            let (waiter, lock) = (waiter.clone(), lock.clone());
            async move {
                waiter
                    .acquire(request(
                        &lock,
                        Duration::from_secs(30),
                        WaitPolicy::Until(Duration::from_secs(40)),
                    ))
                    .await
            }
        });
        // The waiter has made its attempt (the server ran one more script) and waits.
        for _ in 0..1000 {
            let attempts = command_calls(&mut admin).await.get("evalsha").copied();
            if attempts.unwrap_or(0) > attempts_before.unwrap_or(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        proxy.set(Fault::Blackhole);
        holder.release(&held).await.expect("release");
        // Cut the waiter's connections and wait until the server has dropped its
        // subscription (bounded: 1000 × 5 ms), then let it reconnect.
        proxy.set(Fault::Reset);
        for _ in 0..1000 {
            // Each backend listens on a hand-off channel of its own; the holder's stays.
            let channels: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg("fencelock:handoff:*")
                .query_async(&mut admin)
                .await
                .expect("PUBSUB CHANNELS");
            if channels.len() <= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!waiting.is_finished(), "granted while the lock was cut off");
        proxy.set(Fault::Pass);
        let lease = waiting
            .await
            .expect("waiter task")
            .expect("granted after reconnecting, long before the holder's hour");
        assert!(lease.token() > held.token());
        waiter.release(&lease).await.expect("release");
    })
    .await;
}

/// A release publishes only if it hands the lock to a queued waiter: an uncontended
/// cycle publishes nothing, nor does a release after a refused attempt that did not
/// wait; a release with a waiter queued publishes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_release_that_hands_off_publishes() {
    bounded(async {
        let server = server().await;
        let mut admin = operator(&server.url()).await;
        let holder = RedisBackend::open(&server.url()).await.expect("connect");
        let other = RedisBackend::open(&server.url()).await.expect("connect");
        let lock = name("publish-on-demand");
        let take = || request(&lock, Duration::from_secs(60), WaitPolicy::NoWait);
        let publishes = |calls: HashMap<String, u64>| calls.get("publish").copied().unwrap_or(0);
        let before = publishes(command_calls(&mut admin).await);
        for _ in 0..5 {
            let lease = holder.acquire(take()).await.expect("free");
            holder.release(&lease).await.expect("release");
        }
        let lease = holder.acquire(take()).await.expect("free");
        let err = other.acquire(take()).await.expect_err("held");
        assert!(matches!(err, Error::Contended { .. }), "{err:?}");
        holder.release(&lease).await.expect("release");
        assert_eq!(
            publishes(command_calls(&mut admin).await),
            before,
            "releases nobody was queued for published"
        );
        let lease = holder.acquire(take()).await.expect("free");
        let waiting = spawn_waiter(&other, &lock, Duration::from_secs(30));
        wait_for_queue(&mut admin, &lock, 1).await;
        holder.release(&lease).await.expect("release");
        let handed = waiting.await.expect("waiter task").expect("handed over");
        assert!(handed.token() > lease.token());
        assert_eq!(
            publishes(command_calls(&mut admin).await),
            before + 1,
            "the release that handed the lock on"
        );
        other.release(&handed).await.expect("release");
    })
    .await;
}

/// A waiting acquire on `lock` through `backend`, in a task of its own.
fn spawn_waiter(
    backend: &RedisBackend,
    lock: &LockName,
    wait: Duration,
) -> tokio::task::JoinHandle<fencelock_core::Result<fencelock_core::Lease>> {
    let (backend, lock) = (backend.clone(), lock.clone());
    tokio::spawn(async move {
        backend
            .acquire(request(
                &lock,
                Duration::from_secs(60),
                WaitPolicy::Until(wait),
            ))
            .await
    })
}

/// The owners queued for `lock` (default prefix).
async fn queued(admin: &mut MultiplexedConnection, lock: &LockName) -> i64 {
    run(admin, &["ZCARD", &format!("fencelock:queue:{lock}")]).await
}

/// Waits (bounded: 2000 × 5 ms) until `count` owners are queued for `lock`.
async fn wait_for_queue(admin: &mut MultiplexedConnection, lock: &LockName, count: i64) {
    for _ in 0..2000 {
        if queued(admin, lock).await == count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{count} waiters never queued for {lock}");
}

/// A release hands the lock straight to the longest-queued waiter: the grant is made
/// by the release's own script, so the waiter sends nothing between the release and
/// its grant (the server runs exactly one script per hand-off), and waiters are served
/// in the order they queued, with rising tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_hands_the_lock_to_the_longest_queued_waiter() {
    bounded(async {
        let server = server().await;
        let mut admin = operator(&server.url()).await;
        let holder = RedisBackend::open(&server.url()).await.expect("connect");
        let lock = name("hand-off-order");
        let mut lease = holder
            .acquire(request(&lock, Duration::from_secs(60), WaitPolicy::NoWait))
            .await
            .expect("free");
        let mut backends = Vec::new();
        let mut waiting = Vec::new();
        for n in 1..=3 {
            let backend = RedisBackend::open(&server.url()).await.expect("connect");
            waiting.push(spawn_waiter(&backend, &lock, Duration::from_secs(50)));
            wait_for_queue(&mut admin, &lock, n).await;
            backends.push(backend);
        }
        let mut releaser = holder.clone();
        for (backend, waiter) in backends.iter().zip(waiting) {
            let scripts = |calls: HashMap<String, u64>| calls.get("evalsha").copied().unwrap_or(0);
            let before = scripts(command_calls(&mut admin).await);
            releaser.release(&lease).await.expect("release");
            let handed = waiter.await.expect("waiter task").expect("handed over");
            assert_eq!(
                scripts(command_calls(&mut admin).await),
                before + 1,
                "the hand-off cost more than the release's script"
            );
            assert!(handed.token() > lease.token(), "tokens must rise");
            lease = handed;
            releaser = backend.clone();
        }
        assert_eq!(queued(&mut admin, &lock).await, 0);
        releaser.release(&lease).await.expect("release");
        assert_eq!(holder.inspect(&lock).await.expect("inspect"), None);
    })
    .await;
}

/// A waiter that stops waiting leaves the queue, whether its wait timed out or its
/// future was dropped, so the next release frees the lock instead of handing it to
/// nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_stops_waiting_leaves_the_queue() {
    bounded(async {
        let server = server().await;
        let mut admin = operator(&server.url()).await;
        let holder = RedisBackend::open(&server.url()).await.expect("connect");
        let other = RedisBackend::open(&server.url()).await.expect("connect");
        let lock = name("leave-the-queue");
        let lease = holder
            .acquire(request(&lock, Duration::from_secs(60), WaitPolicy::NoWait))
            .await
            .expect("free");
        let timed_out = spawn_waiter(&other, &lock, Duration::from_millis(300));
        let err = timed_out.await.expect("task").expect_err("still held");
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        assert_eq!(
            queued(&mut admin, &lock).await,
            0,
            "a timed-out waiter stayed queued"
        );
        let wants: i64 = run(&mut admin, &["HLEN", &format!("fencelock:wants:{lock}")]).await;
        assert_eq!(wants, 0);
        let dropped = spawn_waiter(&other, &lock, Duration::from_secs(50));
        wait_for_queue(&mut admin, &lock, 1).await;
        dropped.abort();
        wait_for_queue(&mut admin, &lock, 0).await;
        holder.release(&lease).await.expect("release");
        assert_eq!(holder.inspect(&lock).await.expect("inspect"), None);
    })
    .await;
}

/// A queue entry past its time is skipped by a release; a live entry whose waiter has
/// gone (its process died while queued) is handed the lock, which then ends at that
/// waiter's TTL like a dead holder's. The entries are written by hand behind a held
/// grant; a real waiter then queues (marking the grant, so its release looks at the
/// queue) and gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_queue_entries_are_skipped_and_a_vanished_waiter_holds_only_its_ttl() {
    bounded(async {
        let server = server().await;
        let mut admin = operator(&server.url()).await;
        let holder = RedisBackend::open(&server.url()).await.expect("connect");
        let lock = name("vanished-waiter");
        let lease = holder
            .acquire(request(&lock, Duration::from_secs(60), WaitPolicy::NoWait))
            .await
            .expect("free");
        let (queue, wants) = (
            format!("fencelock:queue:{lock}"),
            format!("fencelock:wants:{lock}"),
        );
        let (now_s, _): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut admin)
            .await
            .expect("TIME");
        let now_ms = now_s * 1000;
        // Queued first but past its time, then a live entry asking for a 2 s TTL.
        let _: i64 = run(
            &mut admin,
            &[
                "ZADD",
                &queue,
                &(now_ms - 2).to_string(),
                "0123456789abcdef0123456789abcde0",
            ],
        )
        .await;
        let _: i64 = run(
            &mut admin,
            &[
                "HSET",
                &wants,
                "0123456789abcdef0123456789abcde0",
                &format!("60000:{}:fencelock:handoff:gone", now_ms - 1000),
            ],
        )
        .await;
        let _: i64 = run(
            &mut admin,
            &[
                "ZADD",
                &queue,
                &(now_ms - 1).to_string(),
                "0123456789abcdef0123456789abcde1",
            ],
        )
        .await;
        let _: i64 = run(
            &mut admin,
            &[
                "HSET",
                &wants,
                "0123456789abcdef0123456789abcde1",
                &format!("2000:{}:fencelock:handoff:gone", now_ms + 60_000),
            ],
        )
        .await;
        // As a waiter's script leaves them: lasting as long as the longest entry.
        for key in [&queue, &wants] {
            let _: i64 = run(&mut admin, &["PEXPIRE", key, "60000"]).await;
        }
        let waiter = RedisBackend::open(&server.url()).await.expect("connect");
        let gave_up = waiter
            .acquire(request(
                &lock,
                Duration::from_secs(60),
                WaitPolicy::Until(Duration::from_millis(50)),
            ))
            .await;
        assert!(gave_up.is_err(), "the lock is held: {gave_up:?}");
        assert_eq!(
            queued(&mut admin, &lock).await,
            2,
            "the waiter left the queue"
        );
        holder.release(&lease).await.expect("release");
        let state = holder
            .inspect(&lock)
            .await
            .expect("inspect")
            .expect("handed on");
        assert_eq!(state.holder.as_str(), "0123456789abcdef0123456789abcde1");
        assert!(state.token > lease.token());
        let remaining = state.remaining.expect("a TTL");
        assert!(remaining <= Duration::from_secs(2), "{remaining:?}");
        assert_eq!(queued(&mut admin, &lock).await, 0);
    })
    .await;
}

/// A tokio runtime on a thread of its own that a test can stall whole, as a GC pause or
/// SIGSTOP stalls a process: while it is stalled none of its tasks runs (the acquire
/// loop, its timers, the pub/sub listener), and what the server sends meanwhile waits in
/// the socket.
struct Stallable {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stallable {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the stalled side");
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async {
                let _ = stopped.await;
            });
        });
        Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Runs `fut` on this runtime.
    async fn run<F>(&self, fut: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle
            .spawn(fut)
            .await
            .expect("task on the stallable runtime")
    }

    /// Stalls every task of this runtime until the returned sender is used or dropped
    /// (at most [`TEST_LIMIT`]).
    async fn stall(&self) -> std::sync::mpsc::Sender<()> {
        let (resume, resumed) = std::sync::mpsc::channel::<()>();
        let (stalled, is_stalled) = tokio::sync::oneshot::channel::<()>();
        self.handle.spawn(async move {
            let _ = stalled.send(());
            // Blocks the runtime's only thread, as a pause would.
            let _ = resumed.recv_timeout(TEST_LIMIT);
        });
        is_stalled.await.expect("the runtime stalled");
        resume
    }
}

impl Drop for Stallable {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits (bounded: 2000 × 5 ms) until nobody holds `lock`.
async fn wait_until_free(backend: &RedisBackend, lock: &LockName) {
    for _ in 0..2000 {
        if backend.inspect(lock).await.expect("inspect").is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{lock} was never free");
}

/// Mutual exclusion while valid: a hand-off message that a waiter reads only after a
/// later attempt of its own was refused is from before that attempt, and grants
/// nothing. The waiter is handed the lock, then stalls (its whole runtime, as in a GC
/// pause) past that grant's 4 s TTL; another client takes the free lock; the waiter
/// resumes, its fallback attempt is refused, and the old message reaches it about 1 s
/// later (the waiter's link delays it 5 s), well within half a TTL of that attempt.
/// While the other client holds, the waiter must not be granted; once it releases, the
/// waiter is, with a higher token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_off_read_after_a_later_refused_attempt_grants_nothing() {
    bounded(async {
        let server = server().await;
        let proxy = FaultProxy::start(server.addr()).await.expect("proxy");
        let mut admin = operator(&server.url()).await;
        let first = RedisBackend::open(&server.url()).await.expect("connect");
        let other = RedisBackend::open(&server.url()).await.expect("connect");
        let stallable = Stallable::start();
        let waiter_url = format!("redis://{}/?timeout=30s", proxy.addr());
        let waiter = stallable
            .run(async move { RedisBackend::open(&waiter_url).await })
            .await
            .expect("connect");
        let lock = name("stale-hand-off");
        // The waiter's fallback comes at the first holder's remaining time: 2 s.
        let fallback = Duration::from_secs(2);
        let held = first
            .acquire(request(&lock, fallback, WaitPolicy::NoWait))
            .await
            .expect("free");
        let waiter_ttl = Duration::from_secs(4);
        let waiting = {
            let (waiter, lock) = (waiter.clone(), lock.clone());
            stallable.handle.spawn(async move {
                let result = waiter
                    .acquire(request(
                        &lock,
                        waiter_ttl,
                        WaitPolicy::Until(Duration::from_secs(40)),
                    ))
                    .await;
                (result, Instant::now())
            })
        };
        wait_for_queue(&mut admin, &lock, 1).await;
        let queued_at = Instant::now();
        // The first holder stays well past the waiter's fallback, and releases first.
        let held = first
            .renew(&held, Duration::from_secs(60))
            .await
            .expect("renew");
        let resume = stallable.stall().await;
        let delay = Duration::from_secs(5);
        proxy.set(Fault::Delay(delay));
        first.release(&held).await.expect("release");
        let released_at = Instant::now();
        let handed = first
            .inspect(&lock)
            .await
            .expect("inspect")
            .expect("handed to the waiter");
        assert_ne!(&handed.holder, held.owner(), "not handed on");
        // The waiter's grant ends at its TTL while it is stalled.
        wait_until_free(&first, &lock).await;
        let taken = other
            .acquire(request(&lock, Duration::from_secs(60), WaitPolicy::NoWait))
            .await
            .expect("free once the stalled waiter's TTL ran out");
        assert!(taken.token() > handed.token);
        // The waiter's next attempt goes through at once; the hand-off message, already
        // in the proxy, stays delayed.
        proxy.set(Fault::Pass);
        assert!(
            Instant::now() > queued_at + fallback
                && Instant::now() + Duration::from_millis(500) < released_at + delay,
            "setup too slow: the message would arrive before the waiter's fallback"
        );
        drop(resume);
        // The other client holds until well after the message arrived, unless the
        // waiter is granted first.
        let mut waiting = waiting;
        let hold_until = released_at + delay + Duration::from_secs(3);
        let early = tokio::select! {
            finished = &mut waiting => Some(finished.expect("waiter task")),
            () = tokio::time::sleep_until(hold_until) => None,
        };
        if let Some((result, at)) = early {
            let still_held = other.inspect(&lock).await.expect("inspect");
            panic!(
                "the waiter got {result:?} {:?} after the first release while the other client held \
                 the lock (token {}, server says {still_held:?})",
                at - released_at,
                taken.token()
            );
        }
        other.release(&taken).await.expect("the other client still held");
        let other_released_at = Instant::now();
        let (result, at) = waiting.await.expect("waiter task");
        let lease = result.expect("handed over after the other client's release");
        assert!(
            lease.token() > taken.token(),
            "token {} after {}",
            lease.token(),
            taken.token()
        );
        assert!(at >= other_released_at);
    })
    .await;
}

/// A wait costs no requests while the lock is held, also after a hand-off arrived too
/// late to use: the waiter's next registration stays in place. The waiter is handed
/// the lock while it is stalled past that grant's TTL; another client takes the lock;
/// the waiter resumes, reads the late hand-off, makes one attempt, and then waits for
/// the other client's release without asking again (its attempts are counted as the
/// server's `EVALSHA` calls during a 1 s window of that hold).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_hand_off_leaves_the_waiter_registered_and_quiet() {
    bounded(async {
        let server = server().await;
        let mut admin = operator(&server.url()).await;
        let first = RedisBackend::open(&server.url()).await.expect("connect");
        let other = RedisBackend::open(&server.url()).await.expect("connect");
        let stallable = Stallable::start();
        let waiter_url = server.url();
        let waiter = stallable
            .run(async move { RedisBackend::open(&waiter_url).await })
            .await
            .expect("connect");
        let lock = name("late-hand-off");
        let held = first
            .acquire(request(&lock, Duration::from_secs(60), WaitPolicy::NoWait))
            .await
            .expect("free");
        let waiting = {
            let (waiter, lock) = (waiter.clone(), lock.clone());
            stallable.handle.spawn(async move {
                waiter
                    .acquire(request(
                        &lock,
                        Duration::from_millis(300),
                        WaitPolicy::Until(Duration::from_secs(30)),
                    ))
                    .await
            })
        };
        wait_for_queue(&mut admin, &lock, 1).await;
        let resume = stallable.stall().await;
        first.release(&held).await.expect("release");
        wait_until_free(&first, &lock).await;
        let taken = other
            .acquire(request(&lock, Duration::from_secs(60), WaitPolicy::NoWait))
            .await
            .expect("free once the stalled waiter's TTL ran out");
        let scripts = |calls: HashMap<String, u64>| calls.get("evalsha").copied().unwrap_or(0);
        let before = scripts(command_calls(&mut admin).await);
        drop(resume);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let during = scripts(command_calls(&mut admin).await) - before;
        assert!(
            during <= 2,
            "the waiter ran {during} scripts in 1 s while the lock was held"
        );
        assert!(!waiting.is_finished(), "granted while the lock was held");
        other.release(&taken).await.expect("release");
        let lease = waiting
            .await
            .expect("waiter task")
            .expect("handed over after the release");
        assert!(lease.token() > taken.token());
    })
    .await;
}

/// Mutual exclusion while valid, without any pause: a grant handed to a waiter that an
/// attempt of its own then undid (the attempt's reply timed out, and its undo released
/// the grant by owner and handed it to the next waiter) grants nothing when its message
/// arrives after the waiter's next attempt was refused. The waiter's link delays 3 s
/// each way while its fallback attempt goes out (its 2 s timeout expires, the undo
/// follows it on the same connection, then the next attempt), and the first holder's
/// release hands the lock to the waiter just before that attempt. The other waiter,
/// handed the lock by the undo, must hold it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_off_undone_by_a_timed_out_attempt_grants_nothing() {
    bounded(async {
        let server = server().await;
        let proxy = FaultProxy::start(server.addr()).await.expect("proxy");
        let mut admin = operator(&server.url()).await;
        let first = RedisBackend::open(&server.url()).await.expect("connect");
        let other = RedisBackend::open(&server.url()).await.expect("connect");
        let waiter = RedisBackend::open(&format!("redis://{}/?timeout=2s", proxy.addr()))
            .await
            .expect("connect");
        let lock = name("undone-hand-off");
        // The waiter's fallback attempt goes out at the first holder's remaining time.
        let fallback = Duration::from_secs(3);
        let held = first
            .acquire(request(&lock, fallback, WaitPolicy::NoWait))
            .await
            .expect("free");
        let waiting = {
            let (waiter, lock) = (waiter.clone(), lock.clone());
            tokio::spawn(async move {
                let result = waiter
                    .acquire(request(
                        &lock,
                        Duration::from_secs(10),
                        WaitPolicy::Until(Duration::from_secs(40)),
                    ))
                    .await;
                (result, Instant::now())
            })
        };
        wait_for_queue(&mut admin, &lock, 1).await;
        let queued_at = Instant::now();
        let taken = spawn_waiter(&other, &lock, Duration::from_secs(40));
        wait_for_queue(&mut admin, &lock, 2).await;
        let held = first
            .renew(&held, Duration::from_secs(60))
            .await
            .expect("renew");
        let delay = Duration::from_secs(3);
        tokio::time::sleep_until(queued_at + fallback - Duration::from_millis(1500)).await;
        proxy.set(Fault::Delay(delay));
        tokio::time::sleep_until(queued_at + fallback - Duration::from_secs(1)).await;
        first.release(&held).await.expect("release");
        let released_at = Instant::now();
        // After the fallback attempt went out, and before its (and the undo's, and the
        // next attempt's) requests reach the server; the hand-off message stays
        // delayed.
        tokio::time::sleep_until(queued_at + fallback + Duration::from_secs(1)).await;
        proxy.set(Fault::Pass);
        assert!(
            Instant::now() < released_at + delay,
            "setup too slow: the hand-off message passed before the fallback attempt"
        );
        let taken = taken
            .await
            .expect("other waiter task")
            .expect("handed over by the undo");
        let mut waiting = waiting;
        let hold_until = released_at + delay + Duration::from_secs(3);
        let early = tokio::select! {
            finished = &mut waiting => Some(finished.expect("waiter task")),
            () = tokio::time::sleep_until(hold_until) => None,
        };
        if let Some((result, at)) = early {
            let still_held = other.inspect(&lock).await.expect("inspect");
            panic!(
                "the waiter got {result:?} {:?} after the first release while the other \
                 client held the lock (token {}, server says {still_held:?})",
                at - released_at,
                taken.token()
            );
        }
        other
            .release(&taken)
            .await
            .expect("the other client still held");
        let other_released_at = Instant::now();
        let (result, at) = waiting.await.expect("waiter task");
        let lease = result.expect("handed over after the other client's release");
        assert!(
            lease.token() > taken.token(),
            "token {} after {}",
            lease.token(),
            taken.token()
        );
        assert!(at >= other_released_at);
    })
    .await;
}
