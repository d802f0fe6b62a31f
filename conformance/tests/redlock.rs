//! The conformance suite against Redlock over 3 and over 5 independent `redis-server`s
//! (no persistence), started per test; plus Redlock's own rules: a minority of nodes
//! down is tolerated, a majority down fails cleanly, tokens rise as the majority
//! changes, and contenders in lock-step never share a grant.

use std::sync::Arc;
use std::time::Duration;

use fencelock_conformance::StoreFixture;
use fencelock_conformance::harness::{RedisPersistence, RedisServer, Server};
use fencelock_conformance::proxy::{Fault, FaultProxy};
use fencelock_core::{
    AcquireRequest, Error, FenceGate, FencingToken, Lease, LockBackend, LockName, MemoryFenceGate,
    Result, WaitPolicy, async_trait,
};
use fencelock_redis::redis;
use fencelock_redlock::RedlockBackend;

struct RedlockFixture {
    servers: Vec<RedisServer>,
}

impl RedlockFixture {
    async fn start(nodes: usize) -> Self {
        Self {
            servers: RedisServer::start_many(nodes, RedisPersistence::None)
                .await
                .expect("start redis-servers"),
        }
    }

    fn redlock_url(&self) -> String {
        let nodes: Vec<String> = self.servers.iter().map(|s| s.addr().to_string()).collect();
        format!("redlock://{}", nodes.join(","))
    }
}

/// A plain connection to one node.
async fn operator(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("operator connection")
}

#[async_trait]
impl StoreFixture for RedlockFixture {
    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(RedlockBackend::open(&self.redlock_url()).await?))
    }

    /// `DEL {prefix}lock:{name}` on every node.
    async fn delete_behind_back(&self, name: &LockName) -> Result<()> {
        for server in &self.servers {
            let mut conn = operator(server).await;
            let _: i64 = redis::cmd("DEL")
                .arg(format!("fencelock:lock:{name}"))
                .query_async(&mut conn)
                .await
                .map_err(|err| Error::backend("redlock", "operator DEL", true, err))?;
        }
        Ok(())
    }

    fn url(&self) -> Option<String> {
        Some(self.redlock_url())
    }
}

mod three_nodes {
    async fn fixture() -> super::RedlockFixture {
        super::RedlockFixture::start(3).await
    }

    fencelock_conformance::conformance_tests!(fixture);
    fencelock_conformance::fault_tests!(fixture, env!("CARGO_BIN_EXE_fencelock-worker"));
}

mod five_nodes {
    async fn fixture() -> super::RedlockFixture {
        super::RedlockFixture::start(5).await
    }

    fencelock_conformance::conformance_tests!(fixture);
}

const TTL: Duration = Duration::from_secs(10);

fn name(text: &str) -> LockName {
    LockName::new(text).expect("valid name")
}

fn request(name: &LockName, wait: WaitPolicy) -> AcquireRequest {
    AcquireRequest::new(name.clone(), TTL)
        .expect("valid ttl")
        .with_wait(wait)
}

async fn take(backend: &RedlockBackend, lock: &LockName) -> Lease {
    backend
        .acquire(request(lock, WaitPolicy::Until(Duration::from_secs(5))))
        .await
        .expect("a majority is up: the lock is granted")
}

/// Whether the lock key of `lock` exists on `server`.
async fn has_key(server: &RedisServer, lock: &LockName) -> bool {
    let mut conn = operator(server).await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("fencelock:lock:{lock}"))
        .query_async(&mut conn)
        .await
        .expect("EXISTS");
    exists == 1
}

/// With 2 of 5 nodes down (even before connecting), acquire, renew, inspect and
/// release all work, and tokens keep rising; the nodes join again once they are up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_of_nodes_down_is_tolerated() {
    let mut fixture = RedlockFixture::start(5).await;
    fixture.servers[0].kill().expect("kill");
    fixture.servers[4].kill().expect("kill");
    let backend = RedlockBackend::open(&fixture.redlock_url())
        .await
        .expect("connecting needs only a majority");
    let lock = name("minority-down");
    let first = take(&backend, &lock).await;
    let renewed = backend
        .renew(&first, TTL)
        .await
        .expect("renew on a majority");
    assert!(renewed.valid_until() >= first.valid_until());
    let state = backend
        .inspect(&lock)
        .await
        .expect("inspect")
        .expect("held");
    assert_eq!(
        (state.holder, state.token),
        (first.owner().clone(), first.token())
    );
    backend
        .release(&first)
        .await
        .expect("release on a majority");
    let second = take(&backend, &lock).await;
    assert!(second.token() > first.token());
    backend.release(&second).await.expect("release");

    fixture.servers[0].restart(false).await.expect("restart");
    fixture.servers[4].restart(false).await.expect("restart");
    let third = take(&backend, &lock).await;
    assert!(third.token() > second.token());
    // A grant returns once a majority claimed; the claims on the other nodes land
    // right after (bounded look: 500 × 10 ms).
    for server in &fixture.servers {
        let mut joined = false;
        for _ in 0..500 {
            if has_key(server, &lock).await {
                joined = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(joined, "node {} joined again", server.addr());
    }
    backend.release(&third).await.expect("release");
}

/// With 3 of 5 nodes down, acquiring fails with a temporary Backend error that says
/// how many nodes answered, after waiting or not, and leaves no claim behind on the
/// live nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_majority_of_nodes_down_fails_cleanly() {
    let mut fixture = RedlockFixture::start(5).await;
    let backend = RedlockBackend::open(&fixture.redlock_url())
        .await
        .expect("connect");
    for server in &mut fixture.servers[..3] {
        server.kill().expect("kill");
    }
    let lock = name("majority-down");
    for wait in [
        WaitPolicy::NoWait,
        WaitPolicy::Until(Duration::from_millis(500)),
    ] {
        let err = backend
            .acquire(request(&lock, wait))
            .await
            .expect_err("no majority: no grant");
        assert!(
            matches!(
                err,
                Error::Backend {
                    temporary: true,
                    ..
                }
            ),
            "{wait:?}: {err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("2 of 5") && text.contains("3 are needed"),
            "{text}"
        );
    }
    for server in &fixture.servers[3..] {
        assert!(
            !has_key(server, &lock).await,
            "a failed attempt left a claim on {}",
            server.addr()
        );
    }
}

/// Tokens rise from grant to grant while the majority that grants them changes, even
/// when the new majority includes nodes that lost all their data: the max-register
/// reads the highest counter across the granting majority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rise_when_the_majority_changes() {
    let mut fixture = RedlockFixture::start(5).await;
    let backend = RedlockBackend::open(&fixture.redlock_url())
        .await
        .expect("connect");
    let lock = name("changing-majority");
    let mut last = take(&backend, &lock).await;
    backend.release(&last).await.expect("release");
    // Majority {2,3,4}, then {0,1,2} with 0 and 1 restarted empty, then {0,1,4}.
    let rounds: [(&[usize], &[usize]); 3] = [(&[0, 1], &[]), (&[3, 4], &[0, 1]), (&[2], &[4])];
    for (kill, restart) in rounds {
        for &i in restart {
            fixture.servers[i]
                .restart(false)
                .await
                .expect("restart empty");
        }
        for &i in kill {
            fixture.servers[i].kill().expect("kill");
        }
        let next = take(&backend, &lock).await;
        assert!(
            next.token() > last.token(),
            "token {} after {} (killed {kill:?}, restarted {restart:?})",
            next.token(),
            last.token()
        );
        backend.release(&next).await.expect("release");
        last = next;
    }
}

/// Five clients asking at the same instant for a free lock on 5 nodes: exactly one is
/// granted within the wait, the others time out (never a double grant).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contenders_in_lock_step_never_double_grant() {
    let fixture = RedlockFixture::start(5).await;
    let lock = name("lock-step");
    for round in 0..3 {
        let mut clients = Vec::new();
        // The rule is about double grants, not node timeouts: a generous per-node
        // timeout keeps a loaded 2-core machine from turning slow replies into failures.
        let url = format!("{}?node_timeout=1s", fixture.redlock_url());
        for _ in 0..5 {
            clients.push(RedlockBackend::open(&url).await.expect("connect"));
        }
        let start = Arc::new(tokio::sync::Barrier::new(clients.len()));
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|client| {
                let (start, lock) = (Arc::clone(&start), lock.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    let granted = client
                        .acquire(request(&lock, WaitPolicy::Until(Duration::from_secs(2))))
                        .await;
                    (client, granted)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            let (client, granted) = task.await.expect("client task");
            match granted {
                Ok(lease) => winners.push((client, lease)),
                Err(Error::Timeout { .. }) => {}
                Err(other) => panic!("round {round}: unexpected {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {} grants", winners.len());
        let (client, lease) = winners.pop().expect("one winner");
        client.release(&lease).await.expect("release");
    }
}

/// A TTL that leaves no validity after the node timeout and the drift allowance is
/// refused with a Config error before any node is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_too_short_for_redlock_is_refused() {
    let fixture = RedlockFixture::start(3).await;
    let url = format!("{}?node_timeout=50ms", fixture.redlock_url());
    let backend = RedlockBackend::open(&url).await.expect("connect");
    let lock = name("tiny-ttl");
    let tiny = AcquireRequest::new(lock.clone(), Duration::from_millis(20)).expect("valid ttl");
    let err = backend.acquire(tiny).await.expect_err("no validity left");
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    assert!(err.to_string().contains("too short for Redlock"), "{err}");
    for server in &fixture.servers {
        assert!(!has_key(server, &lock).await, "a node was asked");
    }
}

/// The `calls` of `command` in `server`'s `INFO commandstats` (commands run inside
/// scripts count too), 0 if it never ran.
async fn calls(server: &RedisServer, command: &str) -> u64 {
    let mut conn = operator(server).await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("INFO commandstats");
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |count| count.parse().expect("calls is a number"))
}

/// Scripts run (`EVALSHA`) and claims made (the claim script is the only one that
/// counts with `INCR`: one each, when it claims) on every node so far.
async fn scripts_and_claims(servers: &[RedisServer]) -> Vec<(u64, u64)> {
    let mut counts = Vec::with_capacity(servers.len());
    for server in servers {
        counts.push((calls(server, "evalsha").await, calls(server, "incr").await));
    }
    counts
}

async fn get(server: &RedisServer, key: &str) -> Option<String> {
    let mut conn = operator(server).await;
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("GET")
}

async fn set(server: &RedisServer, key: &str, value: &str) {
    let mut conn = operator(server).await;
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query_async(&mut conn)
        .await
        .expect("SET");
}

/// Waits until `key` on `server` holds `value` (`None`: is gone), looking 500 times
/// every 10 ms; a grant or release returns once a majority answered, and the other
/// nodes' requests land right after.
async fn until_value(server: &RedisServer, key: &str, value: Option<&str>) {
    for _ in 0..500 {
        if get(server, key).await.as_deref() == value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{key} on {} is {:?}, expected {value:?}",
        server.addr(),
        get(server, key).await
    );
}

/// An uncontended acquire on nodes whose counters agree is granted after one round:
/// every node runs exactly one claim and no raise (acquire + release cost exactly two
/// scripts per node), and the token, the agreed count plus one, is stored on every
/// node with the claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncontended_acquire_is_granted_after_one_round() {
    let fixture = RedlockFixture::start(5).await;
    // The rule is about rounds, not timeouts: a loaded machine must not fail a node.
    let url = format!("{}?node_timeout=1s", fixture.redlock_url());
    let backend = RedlockBackend::open(&url).await.expect("connect");
    let lock = name("one-round");
    let (lock_key, counter) = (backend.lock_key(&lock), backend.token_key(&lock));
    for server in &fixture.servers {
        set(server, &counter, "1000").await;
    }
    let before = scripts_and_claims(&fixture.servers).await;
    let lease = backend
        .acquire(request(&lock, WaitPolicy::NoWait))
        .await
        .expect("free: granted");
    assert_eq!(lease.token(), FencingToken(1001));
    let stamp = format!("{}:1001", lease.owner().as_str());
    for server in &fixture.servers {
        until_value(server, &lock_key, Some(&stamp)).await;
    }
    let held = scripts_and_claims(&fixture.servers).await;
    for ((server, (scripts0, claims0)), (scripts, claims)) in
        fixture.servers.iter().zip(&before).zip(&held)
    {
        // A raise reaches a majority before the grant returns: it would show here.
        assert_eq!(
            (scripts - scripts0, claims - claims0),
            (1, 1),
            "scripts and claims on {} while held (a raise would make 2 scripts)",
            server.addr()
        );
        assert_eq!(get(server, &counter).await.as_deref(), Some("1001"));
    }
    backend.release(&lease).await.expect("release");
    for server in &fixture.servers {
        until_value(server, &lock_key, None).await;
    }
    let released = scripts_and_claims(&fixture.servers).await;
    for ((server, (scripts0, claims0)), (scripts, claims)) in
        fixture.servers.iter().zip(&before).zip(&released)
    {
        assert_eq!(
            (scripts - scripts0, claims - claims0),
            (2, 1),
            "claim + release on {}, nothing else",
            server.addr()
        );
    }
}

/// When the granting majority's counts differ (one node's counter lags), the grant
/// takes the raise: its token is the highest count, above every earlier token, and the
/// lagging node's counter and claim are brought up to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_counter_takes_the_raise_and_catches_up() {
    let fixture = RedlockFixture::start(3).await;
    let url = format!("{}?node_timeout=1s", fixture.redlock_url());
    let backend = RedlockBackend::open(&url).await.expect("connect");
    let lock = name("lagging-counter");
    let (lock_key, counter) = (backend.lock_key(&lock), backend.token_key(&lock));
    for server in &fixture.servers {
        set(server, &counter, "1000").await;
    }
    let first = take(&backend, &lock).await;
    assert_eq!(first.token(), FencingToken(1001));
    backend.release(&first).await.expect("release");
    for server in &fixture.servers {
        until_value(server, &lock_key, None).await;
    }

    // Node 0 lags (a minority: as if it had missed grants); node 2 cannot answer, so
    // the majority is exactly {0, 1} and their counts differ (501 and 1002).
    let (lagging, current, paused) = (
        &fixture.servers[0],
        &fixture.servers[1],
        &fixture.servers[2],
    );
    set(lagging, &counter, "500").await;
    let before = scripts_and_claims(&fixture.servers[..2]).await;
    paused.pause().expect("pause node 2");
    let granted = backend.acquire(request(&lock, WaitPolicy::NoWait)).await;
    let after = scripts_and_claims(&fixture.servers[..2]).await;
    let state = backend.inspect(&lock).await;
    paused.resume().expect("resume node 2");
    let second = granted.expect("a majority is up and free: granted");
    assert_eq!(second.token(), FencingToken(1002), "the highest count");
    assert!(second.token() > first.token());
    for ((server, (scripts0, claims0)), (scripts, claims)) in
        fixture.servers.iter().zip(&before).zip(&after)
    {
        assert_eq!(
            (scripts - scripts0, claims - claims0),
            (2, 1),
            "claim + raise on {}",
            server.addr()
        );
    }
    let stamp = format!("{}:1002", second.owner().as_str());
    for server in [lagging, current] {
        assert_eq!(get(server, &counter).await.as_deref(), Some("1002"));
        assert_eq!(
            get(server, &lock_key).await.as_deref(),
            Some(stamp.as_str())
        );
    }
    let state = state.expect("inspect").expect("held");
    assert_eq!(
        (state.holder, state.token),
        (second.owner().clone(), second.token())
    );
    backend.release(&second).await.expect("release");

    // Node 2 ran its queued claim, raise and release on resuming, before this claim.
    let third = take(&backend, &lock).await;
    assert!(
        third.token() > second.token(),
        "{} after {}",
        third.token(),
        second.token()
    );
    backend.release(&third).await.expect("release");
}

/// Tokens keep rising after every node restarted without its data: a missing counter
/// is seeded from the node's clock in µs, which is ahead of every earlier count (a
/// count gains one per grant, far less than one per µs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rise_after_every_node_restarted_empty() {
    let mut fixture = RedlockFixture::start(3).await;
    let backend = RedlockBackend::open(&fixture.redlock_url())
        .await
        .expect("connect");
    let lock = name("all-restarted");
    let counter = backend.token_key(&lock);
    let mut last = FencingToken(0);
    for _ in 0..20 {
        let lease = take(&backend, &lock).await;
        assert!(lease.token() > last, "{} after {last}", lease.token());
        backend.release(&lease).await.expect("release");
        last = lease.token();
    }
    for server in &mut fixture.servers {
        server.restart(false).await.expect("restart empty");
        assert_eq!(get(server, &counter).await, None, "the counter was lost");
    }
    let next = take(&backend, &lock).await;
    assert!(next.token() > last, "{} after {last}", next.token());
    backend.release(&next).await.expect("release");
}

/// Waits (bounded: 1000 × 10 ms) until `key` on `server` holds a value ending in
/// `suffix`, and returns it.
async fn until_suffix(server: &RedisServer, key: &str, suffix: &str) -> String {
    for _ in 0..1000 {
        if let Some(value) = get(server, key).await.filter(|v| v.ends_with(suffix)) {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{key} on {} never ended in {suffix}", server.addr());
}

/// Tokens rise, without a clock assumption, from a grant to every grant made by an
/// attempt that started after it was returned, even when claims end before their
/// acquirer decides (as on nodes whose clocks jump ahead past the TTL). Between grants
/// whose attempts overlapped, the order is only as good as that clock assumption: a
/// grant decided in one round on claims that ended meanwhile carries a lower token
/// than a grant returned before it, and the fence gate then refuses it.
///
/// Scenario on 3 nodes with agreeing counters (every grant is decided in one round): a
/// late client's claims land on every node (its links delay each way by 2 s), then
/// end there (deleted, as an expiry on a clock that jumped would); an early client
/// takes the free lock, writes through the gate and releases, all before the late
/// client's claim replies arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rise_for_every_attempt_started_after_a_grant_even_when_claims_end_early() {
    let fixture = RedlockFixture::start(3).await;
    let mut proxies = Vec::new();
    for server in &fixture.servers {
        proxies.push(FaultProxy::start(server.addr()).await.expect("proxy"));
    }
    let through: Vec<String> = proxies.iter().map(|p| p.addr().to_string()).collect();
    let late = RedlockBackend::open(&format!("redlock://{}?node_timeout=8s", through.join(",")))
        .await
        .expect("connect");
    let early = RedlockBackend::open(&format!("{}?node_timeout=1s", fixture.redlock_url()))
        .await
        .expect("connect");
    let gate = MemoryFenceGate::new();
    let lock = name("claims-end-early");
    let (lock_key, counter) = (late.lock_key(&lock), late.token_key(&lock));
    for server in &fixture.servers {
        set(server, &counter, "1000").await;
    }
    for proxy in &proxies {
        proxy.set(Fault::Delay(Duration::from_secs(2)));
    }
    let late_attempt = {
        let (late, lock) = (late.clone(), lock.clone());
        tokio::spawn(async move {
            let req = AcquireRequest::new(lock, Duration::from_secs(20)).expect("valid ttl");
            let granted = late.acquire(req).await;
            (granted, tokio::time::Instant::now())
        })
    };
    for server in &fixture.servers {
        until_suffix(server, &lock_key, ":1001").await;
    }
    // The late client's claims end on every node; the counters stay.
    for server in &fixture.servers {
        let mut conn = operator(server).await;
        let _: i64 = redis::cmd("DEL")
            .arg(&lock_key)
            .query_async(&mut conn)
            .await
            .expect("DEL");
    }
    let first = early
        .acquire(request(&lock, WaitPolicy::NoWait))
        .await
        .expect("free: granted");
    gate.admit("resource", first.token())
        .await
        .expect("the first holder writes");
    early.release(&first).await.expect("release");
    let returned_first = tokio::time::Instant::now();
    let (late_granted, late_returned) = late_attempt.await.expect("late client task");
    assert!(
        late_returned > returned_first,
        "the scenario needs the late grant returned after the first one"
    );
    if let Ok(late_lease) = &late_granted {
        // Not ordered with the first grant (their attempts overlapped); the gate keeps
        // the writes in token order.
        if late_lease.token() < first.token() {
            let err = gate
                .admit("resource", late_lease.token())
                .await
                .expect_err("a lower token after the first holder's write");
            assert!(matches!(err, Error::StaleToken { .. }), "{err:?}");
        }
    }
    for proxy in &proxies {
        proxy.set(Fault::Pass);
    }
    let next = early
        .acquire(request(&lock, WaitPolicy::Until(Duration::from_secs(5))))
        .await
        .expect("free again: granted");
    let highest = late_granted
        .as_ref()
        .map_or(first.token(), |l| l.token().max(first.token()));
    assert!(
        next.token() > highest,
        "token {} of an attempt started after both grants is not above {highest}",
        next.token()
    );
    early.release(&next).await.expect("release");
}
