//! ZooKeeper's own fault rules, against real servers: session expiry, a short
//! disconnect, a cut-off holder told it lost before the next waiter is granted, a
//! release whose outcome is unknown, a lost create reply, a recreated parent node, a
//! 50-waiter line, the requests of an uncontended acquire+release, and a 3-node
//! ensemble losing its leader.
//! Checks that neither stop the server nor count its metrics share one; the others
//! start their own.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fencelock_conformance::harness::{Server, ZooKeeper, ZooKeeperEnsemble};
use fencelock_conformance::history::{FencedCounter, History, Hold, check, describe};
use fencelock_conformance::proxy::{Fault, FaultProxy};
use fencelock_core::{
    AcquireRequest, Error, Lease, LockBackend, LockName, Locker, LockerOptions, LossReason,
    MemoryFenceGate, StoreEvent, WaitPolicy,
};
use fencelock_zookeeper::ZooKeeperBackend;
use fencelock_zookeeper::zookeeper_client::{Client, EventType};
use tokio::time::{Instant, timeout};

static SERVER: tokio::sync::OnceCell<ZooKeeper> = tokio::sync::OnceCell::const_new();

const SESSION: Duration = Duration::from_secs(3);
const TTL: Duration = Duration::from_secs(30);
/// A TTL no test outlives.
const HOUR: Duration = Duration::from_secs(3600);
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
                    // The node deletion may be heard before the expiry itself, and
                    // the guard's validity, capped at the session's deadline, runs
                    // out before the server expires the session.
                    reason: LossReason::SessionEnded | LossReason::NotOurs | LossReason::Expired,
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
    // The guard reads "not held" while disconnected and held again once the session
    // is back (a loss would be final); look until then, within half the session
    // timeout (bounded: 10 ms steps).
    let back = tokio::time::Instant::now() + timeout_granted / 2;
    while !guard.is_held() && tokio::time::Instant::now() < back {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
    // release makes the server fire exactly one watch (counted by the server's
    // `mntr`), wakes one waiter and grants the first in line.
    const WAITERS: usize = 50;
    // Its own server: the watch counters are server-wide. Each waiter has its own
    // session, as separate processes would, so a herd could not hide behind one
    // session's shared watch.
    let server = ZooKeeper::start().await.expect("own ZooKeeper");
    let hosts = server.addr().to_string();
    let holder = backend(&hosts).await;
    let n = name("herd");
    // A long TTL: the holder's own deletion watch is armed only after a third of it,
    // so the release fires the waiters' watches alone.
    let held = timeout(
        STEP,
        holder.acquire(AcquireRequest::new(n.clone(), HOUR).unwrap()),
    )
    .await
    .expect("step")
    .expect("acquire a free lock");
    let zk = operator(&hosts).await;
    let dir = holder.lock_path(&n);
    let (granted_tx, mut granted) = tokio::sync::mpsc::unbounded_channel();
    let mut waiters = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..WAITERS {
        let w = backend(&hosts).await;
        waiters.push(Arc::clone(&w));
        let (n, tx) = (n.clone(), granted_tx.clone());
        tasks.push(tokio::spawn(async move {
            let lease = w.acquire(request(&n, WaitPolicy::Forever)).await;
            let _ = tx.send((i, lease));
        }));
        // In order, so the line is known: waiter 0 is right after the holder.
        let mut queued = false;
        for _ in 0..400 {
            if zk.list_children(&dir).await.expect("list").len() == i + 2 {
                queued = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(queued, "waiter {i} never queued");
    }
    let wakeups =
        |waiters: &[Arc<ZooKeeperBackend>]| -> u64 { waiters.iter().map(|w| w.wakeups()).sum() };
    assert_eq!(wakeups(&waiters), 0);
    let before = server.metrics().await.expect("mntr before");
    holder.release(&held).await.expect("release");
    // The server fires a delete's watches before it answers the delete.
    let after = server.metrics().await.expect("mntr after");
    let fired = |metric: &str| {
        after.get(metric).copied().unwrap_or(0) - before.get(metric).copied().unwrap_or(0)
    };
    assert_eq!(
        fired("zk_sum_node_deleted_watch_count"),
        1,
        "one release must fire exactly one watch on the server"
    );
    assert_eq!(
        fired("zk_sum_node_children_watch_count"),
        0,
        "nobody may watch the lock's children"
    );
    let (first, lease) = timeout(STEP, granted.recv())
        .await
        .expect("one waiter granted")
        .expect("channel");
    let lease = lease.expect("granted");
    assert_eq!(first, 0, "the first in line was not the one granted");
    assert_eq!(wakeups(&waiters), 1, "more than one waiter was woken");
    assert!(granted.try_recv().is_err(), "a second waiter was granted");
    for task in &tasks[1..] {
        task.abort();
    }
    waiters[0].release(&lease).await.expect("release");
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
async fn uncontended_acquire_and_release_send_create_one_listing_and_delete_only() {
    // Rule: an uncontended acquire+release costs exactly one create, one children
    // listing and one delete, as the server counts them: by type in its request log
    // (our session only, pings apart) and in `mntr`'s per-namespace read and write
    // counts (which leave pings out).
    const CYCLES: usize = 25;
    let server = ZooKeeper::start_logging_requests()
        .await
        .expect("own ZooKeeper");
    let hosts = server.addr().to_string();
    let a = Arc::new(
        ZooKeeperBackend::open(&format!("zk://{hosts}/opcount?session_timeout=4s"))
            .await
            .expect("connect"),
    );
    let session = a.session().expect("a session").id().0;
    let n = name("uncontended");
    // Warm up: the first acquisition also creates the parent nodes.
    let warm = take(&a, &n).await;
    a.release(&warm).await.expect("release");
    let logged_before = server.requests_of(session).expect("request log").len();
    let before = server.metrics().await.expect("mntr before");
    let mut tokens = Vec::new();
    for _ in 0..CYCLES {
        let lease = take(&a, &n).await;
        tokens.push(lease.token());
        a.release(&lease).await.expect("release");
    }
    let after = server.metrics().await.expect("mntr after");
    assert_eq!(
        a.session().expect("a session").id().0,
        session,
        "the session changed mid-run"
    );
    let requests: Vec<(String, String)> = server.requests_of(session).expect("request log")
        [logged_before..]
        .iter()
        .filter(|(kind, _)| kind != "ping")
        .cloned()
        .collect();
    // The log names a write by its type only (its path is `n/a`).
    let dir = a.lock_path(&n);
    assert_eq!(requests.len(), 3 * CYCLES, "requests: {requests:?}");
    for (i, cycle) in requests.chunks(3).enumerate() {
        let kinds: Vec<&str> = cycle.iter().map(|(kind, _)| kind.as_str()).collect();
        assert!(
            matches!(kinds[..], ["create" | "create2", "getChildren", "delete"])
                && cycle[1].1 == dir,
            "cycle {i} sent {cycle:?}, not create, getChildren {dir}, delete"
        );
    }
    let delta = |metric: &str| {
        after.get(metric).copied().unwrap_or(0) - before.get(metric).copied().unwrap_or(0)
    };
    let writes = delta("zk_cnt_opcount_write_per_namespace");
    let reads = delta("zk_cnt_opcount_read_per_namespace");
    let packets = delta("zk_packets_received");
    eprintln!(
        "{CYCLES} uncontended acquire+release: {} requests logged for our session \
         (create, getChildren, delete each cycle); mntr: {writes} writes, {reads} reads, \
         {packets} packets received (pings and the first mntr included)",
        requests.len()
    );
    let cycles = i64::try_from(CYCLES).unwrap();
    assert_eq!(writes, 2 * cycles, "one create and one delete per cycle");
    assert_eq!(reads, cycles, "one read per cycle");
    assert_eq!(delta("zk_znode_count"), 0, "every created node was deleted");
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "tokens rise");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensemble_leader_killed_mid_run_keeps_mutual_exclusion_and_acquisitions_resume() {
    // Rule: on a 3-node ensemble, killing the leader while clients contend for one
    // lock breaks no mutual exclusion (the history checker finds no overlapping
    // holds, no interleaved fenced writes, no falling token) and grants resume
    // after a new leader is elected.
    const CLIENTS: usize = 4;
    const GRANTS_BEFORE: usize = 20;
    const GRANTS_AFTER: usize = 20;
    /// Each client's bound on its own loop.
    const MAX_ROUNDS: usize = 5_000;
    let mut ensemble = ZooKeeperEnsemble::start()
        .await
        .expect("start a 3-node ensemble");
    let url = format!("{}/ensemble?session_timeout=4s", ensemble.url());
    let n = name("ensemble");
    let counter = FencedCounter::new();
    let holds: Arc<Mutex<Vec<Hold>>> = Arc::default();
    let errors = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    // Clients that saw their session disconnected: the leader's death makes every
    // node drop its clients until a new leader is elected.
    let cut_off = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    let mut listeners = Vec::new();
    for c in 0..CLIENTS {
        let backend = Arc::new(ZooKeeperBackend::open(&url).await.expect("connect"));
        let mut events = backend.events().expect("session events");
        let cut = Arc::clone(&cut_off);
        listeners.push(tokio::spawn(async move {
            // Bounded: ends at the first Suspended, or when the backend is dropped.
            while let Ok(event) = events.recv().await {
                if matches!(event, StoreEvent::Suspended) {
                    cut.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
        }));
        let (n, counter, holds, errors, stop) = (
            n.clone(),
            counter.clone(),
            Arc::clone(&holds),
            Arc::clone(&errors),
            Arc::clone(&stop),
        );
        clients.push(tokio::spawn(async move {
            let holder = format!("client-{c}");
            for _ in 0..MAX_ROUNDS {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let wait = WaitPolicy::Until(Duration::from_secs(5));
                let lease = match backend.acquire(request(&n, wait)).await {
                    Ok(lease) => lease,
                    Err(_) => {
                        // Mostly connection losses while the ensemble elects.
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let start = Instant::now();
                let _ = counter.increment(&holder, lease.token()).await;
                holds.lock().unwrap().push(Hold {
                    holder: holder.clone(),
                    token: lease.token(),
                    start,
                    end: Instant::now(),
                });
                // Bounded retries; a release that never lands ends with the TTL.
                for _ in 0..50 {
                    match backend.release(&lease).await {
                        Err(err) if err.is_temporary() => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        _ => break,
                    }
                }
            }
        }));
    }
    let grants_since = |at: Instant| {
        holds
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.start > at)
            .count()
    };
    wait_for(
        || grants_since(began) >= GRANTS_BEFORE,
        "grants before the kill",
    )
    .await;
    let mut leader = None;
    for _ in 0..100 {
        leader = ensemble.leader().await;
        if leader.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leader = leader.expect("the ensemble has a leader");
    let killed_at = Instant::now();
    ensemble.node_mut(leader).kill().expect("kill the leader");
    let mut new_leader = None;
    for _ in 0..600 {
        new_leader = ensemble.leader().await;
        if new_leader.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elected_at = Instant::now();
    assert_ne!(new_leader, Some(leader), "the killed node still leads");
    let new_leader = new_leader.expect("a new leader is elected");
    wait_for(
        || grants_since(killed_at) >= GRANTS_AFTER && grants_since(elected_at) >= GRANTS_AFTER,
        "grants after the leader was killed and a new one elected",
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        timeout(Duration::from_secs(60), client)
            .await
            .expect("client stops")
            .expect("client task");
    }
    for listener in &listeners {
        listener.abort();
    }
    assert_eq!(
        cut_off.load(Ordering::SeqCst),
        CLIENTS,
        "every client's session must have been disconnected by the leader's death"
    );
    let history = History {
        holds: holds.lock().unwrap().clone(),
        writes: counter.writes(),
        ..History::default()
    };
    let after = grants_since(killed_at);
    eprintln!(
        "{} grants ({after} after the kill of leader node {}; node {} leads now), \
         {} errors retried",
        history.holds.len(),
        leader + 1,
        new_leader + 1,
        errors.load(Ordering::Relaxed)
    );
    if let Err(violations) = check(&history, false) {
        panic!("mutual exclusion broken: {}", describe(&violations));
    }
    assert!(
        history.writes.iter().all(|w| w.accepted),
        "a holder's fenced write was refused"
    );
    assert_eq!(counter.value(), history.holds.len() as u64);
}

/// Waits until `done` (checked every 50 ms, at most 120 s: a hang guard).
async fn wait_for(done: impl Fn() -> bool, what: &str) {
    for _ in 0..2_400 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never reached: {what}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_holder_is_told_it_lost_before_the_next_waiter_is_granted() {
    // Rule: a holder cut off from the server is told it lost the lock (`lost()`
    // resolves, `is_held()` is false) before the server expires its session and so
    // grants the next waiter, whatever the TTL: one guard whose TTL is 1.5 times the
    // session timeout and one whose TTL is 10 times it. The order is asserted on
    // instants recorded at the events: the holder's loss, and the deletion of its node
    // (the server grants the waiter by deleting it), seen by an operator's watch.
    let server = shared().await;
    let hosts = server.addr().to_string();
    let proxy = FaultProxy::start(server.addr()).await.expect("proxy");
    let a = backend(&proxy.addr().to_string()).await;
    let holder = locker(&a);
    let session = a.session_timeout().expect("session");
    let zk = operator(&hosts).await;
    let mut cases = Vec::new();
    for ttl in [session * 3 / 2, session * 10] {
        let n = name("cut-off");
        let guard = holder.lock(&n).ttl(ttl).await.expect("lock");
        let node = guard.lease().locator().expect("node path").to_owned();
        let lost = guard.lost();
        let lost_at = tokio::spawn(async move {
            let err = lost.await;
            (Instant::now(), err)
        });
        let (stat, watch) = zk.check_and_watch_stat(&node).await.expect("watch");
        assert!(stat.is_some(), "the holder's node exists");
        let deleted_at = tokio::spawn(async move {
            let event = watch.changed().await;
            (Instant::now(), event.event_type)
        });
        let w = backend(&hosts).await;
        let waiter = {
            let n = n.clone();
            tokio::spawn(async move {
                let lease = w.acquire(request(&n, WaitPolicy::Forever)).await;
                (Instant::now(), lease, w)
            })
        };
        let dir = a.lock_path(&n);
        let mut queued = false;
        for _ in 0..400 {
            if zk.list_children(&dir).await.expect("list").len() == 2 {
                queued = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(queued, "the waiter never queued");
        cases.push((ttl, guard, lost_at, deleted_at, waiter));
    }
    proxy.set(Fault::Blackhole);
    let cut_at = Instant::now();
    let mut failures = Vec::new();
    for (ttl, guard, lost_at, deleted_at, waiter) in cases {
        let (lost_at, err) = timeout(STEP, lost_at)
            .await
            .expect("the cut-off holder is told it lost within the step")
            .expect("task");
        assert!(matches!(err, Error::Lost { .. }), "{err:?}");
        assert!(!guard.is_held(), "lost, yet held");
        let (deleted_at, kind) = timeout(STEP, deleted_at)
            .await
            .expect("the server expires the session within the step")
            .expect("task");
        assert_eq!(
            kind,
            EventType::NodeDeleted,
            "the holder's node was deleted"
        );
        let (granted_at, lease, w) = timeout(STEP, waiter)
            .await
            .expect("the waiter is granted within the step")
            .expect("task");
        let lease = lease.expect("the waiter is granted");
        assert!(lease.token() > guard.token(), "czxid did not rise");
        w.release(&lease).await.expect("release");
        let since = |at: Instant| at.saturating_duration_since(cut_at);
        eprintln!(
            "ttl {ttl:?}, session {session:?}: holder told it lost {:?} after the cut, \
             its node deleted after {:?}, waiter granted after {:?} ({err})",
            since(lost_at),
            since(deleted_at),
            since(granted_at)
        );
        if lost_at >= deleted_at {
            failures.push(format!(
                "ttl {ttl:?}: the holder was told it lost {:?} after the cut, but the \
                 server had deleted its node (granting the waiter) {:?} after it",
                since(lost_at),
                since(deleted_at)
            ));
        }
    }
    proxy.set(Fault::Pass);
    assert!(failures.is_empty(), "{}", failures.join("; "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_with_an_unknown_outcome_deletes_the_node_while_the_session_lives() {
    // Rule: a release whose delete got no answer (the connection broke with the
    // request swallowed, after the grant's TTL task had ended) still deletes the node
    // while the session lives: the next client is granted while the holder's session
    // is still the same, live one.
    let server = shared().await;
    let hosts = server.addr().to_string();
    let proxy = FaultProxy::start(server.addr()).await.expect("proxy");
    let a = backend(&proxy.addr().to_string()).await;
    let b = backend(&hosts).await;
    let n = name("release-unknown");
    // A short TTL: the grant's TTL task wakes at a third of it (to arm its deletion
    // watch) while the release below is in flight, finds the grant gone and ends.
    let ttl = Duration::from_millis(1500);
    let lease = timeout(
        STEP,
        a.acquire(AcquireRequest::new(n.clone(), ttl).unwrap()),
    )
    .await
    .expect("step")
    .expect("acquire a free lock");
    let session = a.session().expect("a session").id().0;
    let session_timeout = a.session_timeout().expect("session");
    proxy.set(Fault::Blackhole);
    let releasing = {
        let (a, lease) = (Arc::clone(&a), lease.clone());
        tokio::spawn(async move { a.release(&lease).await })
    };
    // The delete is swallowed; past the TTL task's wake-up, the connection breaks and
    // the client sees a connection loss: the release's outcome is unknown to it.
    tokio::time::sleep(ttl / 3 + Duration::from_millis(200)).await;
    proxy.set(Fault::Reset);
    let released = timeout(STEP, releasing)
        .await
        .expect("the release ends once the connection broke")
        .expect("task");
    proxy.set(Fault::Pass);
    if let Err(err) = &released {
        assert!(
            err.is_temporary(),
            "an unknown outcome is temporary: {err:?}"
        );
    }
    let granted = timeout(
        STEP,
        b.acquire(request(&n, WaitPolicy::Until(session_timeout * 2))),
    )
    .await
    .expect("step");
    assert_eq!(
        a.session().map(|s| s.id().0),
        Some(session),
        "the holder's session ended: its node went with the session"
    );
    let next = granted.unwrap_or_else(|err| {
        panic!(
            "the node of a release whose outcome was unknown ({released:?}) was still there \
             {:?} later while the holder's session lived: {err}",
            session_timeout * 2
        )
    });
    // The holder's session still serves: its node went by the retried delete.
    a.inspect(&n).await.expect("the holder's session serves");
    assert_eq!(a.session().map(|s| s.id().0), Some(session));
    assert!(next.token() > lease.token());
    b.release(&next).await.expect("release");
}
