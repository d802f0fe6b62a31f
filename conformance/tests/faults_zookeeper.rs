//! ZooKeeper's own fault rules, against real servers: session expiry, a short
//! disconnect, a lost create reply, a recreated parent node and a 50-waiter line.
//! Checks that do not stop the server share one; those that pause it start their own.

use std::sync::Arc;
use std::time::Duration;

use fencelock_conformance::harness::{Server, ZooKeeper};
use fencelock_conformance::proxy::{Fault, FaultProxy};
use fencelock_core::{
    AcquireRequest, Error, Lease, LockBackend, LockName, Locker, LockerOptions, LossReason,
    MemoryFenceGate, WaitPolicy,
};
use fencelock_zookeeper::ZooKeeperBackend;
use fencelock_zookeeper::zookeeper_client::Client;
use tokio::time::timeout;

static SERVER: tokio::sync::OnceCell<ZooKeeper> = tokio::sync::OnceCell::const_new();

const SESSION: Duration = Duration::from_secs(3);
const TTL: Duration = Duration::from_secs(30);
/// A hang guard for any single step, far beyond every timeout in play.
const STEP: Duration = Duration::from_secs(20);

async fn shared() -> &'static ZooKeeper {
    SERVER
        .get_or_init(|| async { ZooKeeper::start().await.expect("start ZooKeeper") })
        .await
}

fn url_of(hosts: &str, session: Duration) -> String {
    format!(
        "zk://{hosts}/faults?session_timeout={}ms",
        session.as_millis()
    )
}

async fn backend(hosts: &str) -> Arc<ZooKeeperBackend> {
    Arc::new(
        ZooKeeperBackend::open(&url_of(hosts, SESSION))
            .await
            .expect("connect"),
    )
}

fn name(rule: &str) -> LockName {
    let suffix = fencelock_core::OwnerId::random();
    LockName::new(format!("{rule}/{}", &suffix.as_str()[..12])).unwrap()
}

fn request(name: &LockName, wait: WaitPolicy) -> AcquireRequest {
    AcquireRequest::new(name.clone(), TTL)
        .unwrap()
        .with_wait(wait)
}

async fn take(backend: &ZooKeeperBackend, name: &LockName) -> Lease {
    timeout(STEP, backend.acquire(request(name, WaitPolicy::NoWait)))
        .await
        .expect("acquire within the step")
        .expect("acquire a free lock")
}

async fn operator(hosts: &str) -> Client {
    Client::connect(hosts).await.expect("operator client")
}

fn locker(backend: &Arc<ZooKeeperBackend>) -> Locker {
    Locker::with_options(
        Arc::clone(backend) as Arc<dyn LockBackend>,
        LockerOptions::default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_session_loses_every_guard_and_the_next_holder_has_a_higher_czxid() {
    // Rule: session expiry (forced by cutting the holder off past its session
    // timeout, so the server expires the session) reports every guard lost; the next
    // holder's token (czxid) is higher; the old token is refused by the fence; the
    // backend then builds a fresh session for later acquisitions.
    let server = shared().await;
    let hosts = server.addr().to_string();
    let proxy = FaultProxy::start(server.addr())
        .await
        .expect("start the fault proxy");
    let a = backend(&proxy.addr().to_string()).await;
    let holder = locker(&a);
    let (n1, n2) = (name("expiry"), name("expiry"));
    let g1 = holder.lock(&n1).ttl(TTL).await.expect("lock 1");
    let g2 = holder.lock(&n2).ttl(TTL).await.expect("lock 2");
    // No heartbeat reaches the server for twice the session timeout: it expires the
    // session and deletes its ephemeral nodes; the client learns it on reconnecting.
    proxy.set(Fault::Blackhole);
    let expired = timeout(STEP, async {
        // Bounded: at most STEP / 100 ms checks.
        while inspect_holder(&hosts, &n1).await.is_some() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    expired.expect("the server expires the cut-off session and deletes its nodes");
    proxy.set(Fault::Pass);
    for guard in [&g1, &g2] {
        let err = timeout(STEP, guard.lost())
            .await
            .expect("loss reported after expiry");
        assert!(
            matches!(
                err,
                Error::Lost {
                    // The node deletion may be heard before the expiry itself.
                    reason: LossReason::SessionEnded | LossReason::NotOurs,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(!guard.is_held());
    }
    let b = backend(&hosts).await;
    let next = take(&b, &n1).await;
    assert!(next.token() > g1.token(), "czxid did not rise");
    let gate = MemoryFenceGate::new();
    gate.admit_now("r", next.token())
        .expect("new holder admitted");
    let err = gate.admit_now("r", g1.token()).expect_err("stale write");
    assert!(matches!(err, Error::StaleToken { .. }), "{err:?}");
    b.release(&next).await.expect("release");
    // A fresh session serves later acquisitions of the same backend.
    let again = timeout(STEP, a.acquire(request(&n2, WaitPolicy::NoWait)))
        .await
        .expect("step")
        .expect("the backend acquires again on a fresh session");
    assert!(again.token() > g2.token());
    a.release(&again).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_disconnect_keeps_the_lock() {
    // Rule: a blackhole shorter than a third of the session timeout loses nothing:
    // the guard is held afterwards and nobody else can take the lock.
    let server = shared().await;
    let proxy = FaultProxy::start(server.addr()).await.expect("proxy");
    let a = backend(&proxy.addr().to_string()).await;
    let b = backend(&server.addr().to_string()).await;
    let holder = locker(&a);
    let n = name("short-disconnect");
    let guard = holder.lock(&n).ttl(TTL).await.expect("lock");
    let timeout_granted = a.session_timeout().expect("session");
    proxy.set(Fault::Blackhole);
    tokio::time::sleep(timeout_granted / 4).await;
    proxy.set(Fault::Pass);
    // Give a reconnect, if any, time to settle (bounded by the session timeout).
    tokio::time::sleep(timeout_granted / 2).await;
    assert!(guard.is_held(), "a short disconnect lost the lock");
    let err = b
        .acquire(request(&n, WaitPolicy::NoWait))
        .await
        .expect_err("still held");
    assert!(matches!(err, Error::Contended { .. }), "{err:?}");
    let state = b.inspect(&n).await.expect("inspect").expect("held");
    assert_eq!(state.token, guard.token());
    guard.release().await.expect("release after the disconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_create_reply_leaves_no_ghost_node() {
    // Rule: when the reply to our create is dropped, the acquire finds our node by
    // its uuid and uses it: exactly one node exists while held, none after release.
    let server = shared().await;
    let hosts = server.addr().to_string();
    let proxy = FaultProxy::start(server.addr()).await.expect("proxy");
    let a = backend(&proxy.addr().to_string()).await;
    let n = name("lost-reply");
    let dir = a.lock_path(&n);
    let zk = operator(&hosts).await;
    // The parent exists, so the create whose reply is lost does create our node.
    let warm = take(&a, &n).await;
    a.release(&warm).await.expect("release");
    proxy.set(Fault::DropReplies);
    let acquiring = {
        let a = Arc::clone(&a);
        let n = n.clone();
        tokio::spawn(async move { a.acquire(request(&n, WaitPolicy::NoWait)).await })
    };
    // Wait (bounded) until the server has created the node whose reply is lost.
    let mut created = false;
    for _ in 0..100 {
        if zk
            .list_children(&dir)
            .await
            .is_ok_and(|children| !children.is_empty())
        {
            created = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(created, "the create never reached the server");
    // The connection breaks with the reply lost: the client sees a connection loss.
    proxy.set(Fault::Reset);
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.set(Fault::Pass);
    let lease = timeout(STEP, acquiring)
        .await
        .expect("acquire ends after the reconnect")
        .expect("task")
        .expect("the acquire uses the node it created");
    let children = zk.list_children(&dir).await.expect("list");
    assert_eq!(children.len(), 1, "a ghost node was left: {children:?}");
    assert!(lease.locator().unwrap().ends_with(&children[0]));
    a.release(&lease).await.expect("release");
    assert!(zk.list_children(&dir).await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rise_after_the_parent_node_is_deleted_and_recreated() {
    // Rule: the token is the czxid, not the sequence suffix: after the lock's parent
    // node is deleted (the sequence restarts at 0) the next grant's token is higher.
    let hosts = shared().await.addr().to_string();
    let a = backend(&hosts).await;
    let n = name("recreated");
    let first = take(&a, &n).await;
    a.release(&first).await.expect("release");
    let second = take(&a, &n).await;
    a.release(&second).await.expect("release");
    assert!(second.locator().unwrap().ends_with("-lock-0000000001"));
    operator(&hosts)
        .await
        .delete(&a.lock_path(&n), None)
        .await
        .expect("delete the parent");
    let third = take(&a, &n).await;
    assert!(
        third.locator().unwrap().ends_with("-lock-0000000000"),
        "the sequence restarted: {:?}",
        third.locator()
    );
    assert!(third.token() > second.token() && second.token() > first.token());
    a.release(&third).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_release_wakes_exactly_one_of_fifty_waiters() {
    // Rule: no herd: each waiter watches only the node before its own, so one
    // release fires one watch and grants one waiter, the first in line.
    const WAITERS: usize = 50;
    let hosts = shared().await.addr().to_string();
    let holder = backend(&hosts).await;
    let waiters = backend(&hosts).await;
    let n = name("herd");
    let held = take(&holder, &n).await;
    let zk = operator(&hosts).await;
    let dir = holder.lock_path(&n);
    let (granted_tx, mut granted) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..WAITERS {
        let (w, n, tx) = (Arc::clone(&waiters), n.clone(), granted_tx.clone());
        tasks.push(tokio::spawn(async move {
            let lease = w.acquire(request(&n, WaitPolicy::Forever)).await;
            let _ = tx.send((i, lease));
        }));
        // In order, so the line is known: waiter 0 is right after the holder.
        let mut queued = false;
        for _ in 0..200 {
            if zk.list_children(&dir).await.expect("list").len() == i + 2 {
                queued = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(queued, "waiter {i} never queued");
    }
    assert_eq!(waiters.wakeups(), 0);
    holder.release(&held).await.expect("release");
    let (first, lease) = timeout(STEP, granted.recv())
        .await
        .expect("one waiter granted")
        .expect("channel");
    let lease = lease.expect("granted");
    assert_eq!(first, 0, "the first in line was not the one granted");
    // Let any stray wake-ups arrive before counting (bounded).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(waiters.wakeups(), 1, "more than one waiter was woken");
    assert!(granted.try_recv().is_err(), "a second waiter was granted");
    for task in &tasks[1..] {
        task.abort();
    }
    waiters.release(&lease).await.expect("release");
    // Aborted waiters delete their nodes in the background (bounded wait).
    for _ in 0..200 {
        if zk.list_children(&dir).await.expect("list").is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("dropped waiters left nodes behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_paused_past_the_session_timeout_loses_the_lock() {
    // Rule: a server unreachable past the session timeout ends the session: the guard
    // is suspended (not held) at once and reported lost; after the server is back, a
    // new holder gets a higher token and the backend acquires on a fresh session.
    let server = ZooKeeper::start().await.expect("own ZooKeeper");
    let hosts = server.addr().to_string();
    let a = Arc::new(
        ZooKeeperBackend::open(&url_of(&hosts, Duration::from_secs(1)))
            .await
            .expect("connect"),
    );
    let holder = locker(&a);
    let n = name("paused-server");
    let guard = holder.lock(&n).ttl(TTL).await.expect("lock");
    let granted = a.session_timeout().expect("session");
    server.pause().expect("pause");
    let lost = timeout(STEP, guard.lost()).await;
    server.resume().expect("resume");
    let err = lost.expect("loss reported while the server is paused");
    assert!(
        matches!(
            err,
            Error::Lost {
                reason: LossReason::SessionEnded | LossReason::Expired,
                ..
            }
        ),
        "{err:?} (session timeout {granted:?})"
    );
    let b = backend(&hosts).await;
    let next = timeout(
        STEP,
        b.acquire(request(&n, WaitPolicy::Until(Duration::from_secs(10)))),
    )
    .await
    .expect("step")
    .expect("the lock is free once the session expired on the server");
    assert!(next.token() > guard.token());
    b.release(&next).await.expect("release");
    let again = timeout(STEP, a.acquire(request(&n, WaitPolicy::NoWait)))
        .await
        .expect("step")
        .expect("a fresh session");
    a.release(&again).await.expect("release");
}

/// The holder of `name` as a fresh client sees it, or `None`.
async fn inspect_holder(hosts: &str, name: &LockName) -> Option<fencelock_core::LockState> {
    let observer = backend(hosts).await;
    observer.inspect(name).await.expect("inspect")
}
