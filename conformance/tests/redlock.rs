//! The conformance suite against Redlock over 3 and over 5 independent `redis-server`s
//! (no persistence), started per test; plus Redlock's own rules: a minority of nodes
//! down is tolerated, a majority down fails cleanly, tokens rise as the majority
//! changes, and contenders in lock-step never share a grant.

use std::sync::Arc;
use std::time::Duration;

use fencelock_conformance::StoreFixture;
use fencelock_conformance::harness::{RedisPersistence, RedisServer, Server};
use fencelock_core::{
    AcquireRequest, Error, Lease, LockBackend, LockName, Result, WaitPolicy, async_trait,
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
