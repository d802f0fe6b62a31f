//! etcd-specific rules against a real `etcd`: session loss, write cost, no herd,
//! compaction while waiting, and interop with `etcdctl lock`.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use fencelock_conformance::harness::{EtcdServer, Server};
use fencelock_core::{
    AcquireRequest, Error, LockBackend, LockName, Locker, LockerOptions, MemoryFenceGate,
    WaitPolicy,
};
use fencelock_etcd::etcd_client::{Client, CompactionOptions, GetOptions};
use fencelock_etcd::{EtcdBackend, EtcdConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::time::{sleep, timeout};

/// The bound on any single step.
const STEP: Duration = Duration::from_secs(20);
const TTL: Duration = Duration::from_secs(30);

async fn step<F: std::future::IntoFuture>(what: &str, fut: F) -> F::Output {
    timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP:?}"))
}

async fn backend(server: &EtcdServer, options: &str) -> Arc<EtcdBackend> {
    let url = format!("{}?{options}", server.url());
    Arc::new(EtcdBackend::connect_url(&url).await.expect("connect"))
}

async fn operator(server: &EtcdServer) -> Client {
    let config = EtcdConfig::from_url(&server.url()).unwrap();
    Client::connect(&config.endpoints, None).await.unwrap()
}

fn request(name: &str, wait: WaitPolicy) -> AcquireRequest {
    AcquireRequest::new(LockName::new(name).unwrap(), TTL)
        .unwrap()
        .with_wait(wait)
}

/// The cluster's current revision: it rises by exactly one per write.
async fn store_revision(client: &mut Client) -> i64 {
    let got = client.get("\0", None).await.unwrap();
    got.header().unwrap().revision()
}

/// etcd's own `/metrics` page. Asked in HTTP/1.0, so the body is not chunked (chunk
/// sizes would split lines).
async fn metrics(server: &EtcdServer) -> String {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", server.port()))
        .await
        .unwrap();
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).await.unwrap();
    body
}

/// One counter from etcd's own `/metrics`.
async fn metric(server: &EtcdServer, name: &str) -> f64 {
    metrics(server)
        .await
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("etcd reports no metric {name}"))
}

/// Waits (bounded) until the lock's queue under `dir` has `n` keys.
async fn wait_for_queue(client: &mut Client, dir: &str, n: i64) {
    for _ in 0..400 {
        let got = client
            .get(dir, Some(GetOptions::new().with_prefix().with_count_only()))
            .await
            .unwrap();
        if got.count() >= n {
            return;
        }
        sleep(Duration::from_millis(25)).await;
    }
    panic!("the queue under {dir} never reached {n} keys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_session_lease_loses_every_guard_and_fences_stale_writes() {
    // Rule: when an operator revokes the session lease, every guard of that Locker
    // reports lost, the stale holder's write is refused, and a later acquisition
    // starts a new session.
    let server = EtcdServer::start().await.expect("start etcd");
    let holder = backend(&server, "session_ttl=3s").await;
    let locker = Locker::with_options(holder.clone(), LockerOptions::default());
    let first = step("lock a", locker.lock("revoke/a").ttl(TTL))
        .await
        .unwrap();
    let second = step("lock b", locker.lock("revoke/b").ttl(TTL))
        .await
        .unwrap();
    let lease = holder.session_lease().expect("a live session");

    operator(&server).await.lease_revoke(lease).await.unwrap();
    let (lost_a, lost_b) = step("both guards told lost", async {
        tokio::join!(first.lost(), second.lost())
    })
    .await;
    assert!(
        lost_a.is_lost() && lost_b.is_lost(),
        "{lost_a:?} {lost_b:?}"
    );
    assert!(!first.is_held() && !second.is_held());

    let other = backend(&server, "").await;
    let taken = step(
        "another client takes the lock",
        other.acquire(request("revoke/a", WaitPolicy::NoWait)),
    )
    .await
    .expect("the revoked lease's keys are gone");
    let gate = MemoryFenceGate::new();
    gate.admit_now("resource", taken.token()).unwrap();
    let stale = gate.admit_now("resource", first.token()).unwrap_err();
    assert!(matches!(stale, Error::StaleToken { .. }), "{stale:?}");

    let again = step("lock after the loss", locker.lock("revoke/b").ttl(TTL))
        .await
        .expect("a later acquisition starts a new session");
    assert_ne!(holder.session_lease(), Some(lease), "a new session lease");
    assert!(again.token() > second.token());
    again.release().await.unwrap();
    other.release(&taken).await.unwrap();
}

/// etcd's count of raft entries committed: every write (put, delete, txn with a write
/// or a failed compare, lease grant or revoke) is one; reads and lease keep-alives are
/// none.
const PROPOSALS: &str = "etcd_server_proposals_committed_total";
/// Keys put, and keys deleted, by the MVCC store (only when the write happened).
const PUTS: &str = "etcd_mvcc_put_total";
const DELETES: &str = "etcd_mvcc_delete_total";
/// Lease keep-alives the server acknowledged.
const RENEWED: &str = "etcd_debugging_lease_renewed_total";
/// Lease keep-alive streams the server accepted.
const KEEP_ALIVE_STREAMS: &str = "grpc_server_started_total{grpc_method=\"LeaseKeepAlive\",\
                                  grpc_service=\"etcdserverpb.Lease\",grpc_type=\"bidi_stream\"}";
/// Range operations the MVCC store served (each key confirmed by a renewal is one).
const RANGES: &str = "etcd_mvcc_range_total";
/// Txn requests the server answered (the watchdog's confirming reads are txns).
const TXNS_HANDLED: &str = "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Txn\",\
                            grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncontended_acquire_and_release_cost_exactly_two_writes() {
    // Rule: on a live session, an uncontended acquire + release through a Locker is
    // exactly two writes, the put txn and the delete, counted by etcd itself: 20 cycles
    // commit exactly 40 raft entries (20 puts, 20 deletes), and the store's revision
    // rises by exactly 40.
    const CYCLES: usize = 20;
    let server = EtcdServer::start().await.expect("start etcd");
    let client = backend(&server, "").await;
    let locker = Locker::with_options(client.clone(), LockerOptions::default());
    let mut op = operator(&server).await;
    // The session is live (started by connect) before counting.
    assert!(client.session_lease().is_some());
    let (proposals, puts, deletes) = (
        metric(&server, PROPOSALS).await,
        metric(&server, PUTS).await,
        metric(&server, DELETES).await,
    );
    let revision = store_revision(&mut op).await;
    let mut last = None;
    for _ in 0..CYCLES {
        let guard = step("lock", locker.lock("cost").ttl(TTL).no_wait())
            .await
            .unwrap();
        assert!(last < Some(guard.token()), "tokens rise");
        last = Some(guard.token());
        step("release", guard.release()).await.unwrap();
    }
    let cycles = CYCLES as f64;
    assert_eq!(metric(&server, PROPOSALS).await - proposals, 2.0 * cycles);
    assert_eq!(metric(&server, PUTS).await - puts, cycles);
    assert_eq!(metric(&server, DELETES).await - deletes, cycles);
    assert_eq!(store_revision(&mut op).await - revision, 2 * CYCLES as i64);
    assert!(client.session_lease().is_some(), "the session lives on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_held_locks_cost_one_keep_alive_stream_and_no_writes_to_renew() {
    // Rule: one Locker holding 10,000 locks keeps them across at least two renewal
    // periods (keep-alives and watchdog ticks, counted by etcd) with zero writes (no
    // raft entry, no put) and without opening another keep-alive stream; every guard
    // is still held at the end.
    const LOCKS: usize = 10_000;
    const GRANT_TTL: Duration = Duration::from_secs(3);
    let server = EtcdServer::start().await.expect("start etcd");
    let client = backend(&server, "session_ttl=3s").await;
    let locker = Locker::with_options(client.clone(), LockerOptions::default());
    let session = client.session_lease().expect("a live session");
    let guards: Vec<_> = {
        use futures_util::StreamExt;
        futures_util::stream::iter(0..LOCKS)
            .map(|i| {
                let locker = locker.clone();
                async move {
                    step(
                        "lock",
                        locker.lock(format!("many/{i}")).ttl(GRANT_TTL).no_wait(),
                    )
                    .await
                    .unwrap()
                }
            })
            .buffer_unordered(64)
            .collect()
            .await
    };
    assert_eq!(guards.len(), LOCKS);
    let (proposals, puts, streams, renewed, txns, ranges) = (
        metric(&server, PROPOSALS).await,
        metric(&server, PUTS).await,
        metric(&server, KEEP_ALIVE_STREAMS).await,
        metric(&server, RENEWED).await,
        metric(&server, TXNS_HANDLED).await,
        metric(&server, RANGES).await,
    );
    assert!(streams >= 1.0, "no keep-alive stream");
    // Two renewal periods, counted rather than slept: three more keep-alives and at
    // least two watchdog ticks' confirming reads (one txn per 128 locks each).
    let reads_per_tick = LOCKS.div_ceil(128) as f64;
    let mut periods_seen = false;
    // Bounded: 600 polls, 50 ms apart.
    for _ in 0..600 {
        let renewals = metric(&server, RENEWED).await - renewed;
        let reads = metric(&server, TXNS_HANDLED).await - txns;
        if renewals >= 3.0 && reads >= 2.0 * reads_per_tick {
            periods_seen = true;
            break;
        }
        sleep(Duration::from_millis(50)).await;
    }
    assert!(periods_seen, "fewer than two renewal periods were observed");
    // For the record (the renewal cost at this size), not asserted.
    eprintln!(
        "renewal reads for {LOCKS} locks: {} txns, {} range ops over {} keep-alives",
        metric(&server, TXNS_HANDLED).await - txns,
        metric(&server, RANGES).await - ranges,
        metric(&server, RENEWED).await - renewed,
    );
    assert_eq!(
        metric(&server, PROPOSALS).await,
        proposals,
        "renewals wrote"
    );
    assert_eq!(metric(&server, PUTS).await, puts, "renewals put keys");
    assert_eq!(
        metric(&server, KEEP_ALIVE_STREAMS).await,
        streams,
        "a second keep-alive stream was opened"
    );
    assert_eq!(client.session_lease(), Some(session), "the session changed");
    let not_held = guards.iter().filter(|g| !g.is_held()).count();
    assert_eq!(
        not_held, 0,
        "{not_held} of {LOCKS} guards are no longer held"
    );
    drop(guards);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_release_wakes_one_of_fifty_waiters() {
    // Rule: waiters watch only their predecessor, so one release sends exactly one
    // watch event (etcd's own events counter) and grants exactly one waiter.
    let server = EtcdServer::start().await.expect("start etcd");
    let client = backend(&server, "").await;
    let mut op = operator(&server).await;
    let dir = client.key_dir(&LockName::new("herd").unwrap());
    let held = client
        .acquire(request("herd", WaitPolicy::NoWait))
        .await
        .unwrap();
    let (granted_tx, mut granted) = tokio::sync::mpsc::unbounded_channel();
    let mut waiters = Vec::new();
    for _ in 0..50 {
        let (client, granted_tx) = (client.clone(), granted_tx.clone());
        waiters.push(tokio::spawn(async move {
            let lease = client.acquire(request("herd", WaitPolicy::Forever)).await;
            let _ = granted_tx.send(lease);
        }));
    }
    wait_for_queue(&mut op, &dir, 51).await;
    for _ in 0..400 {
        if metric(&server, "etcd_debugging_mvcc_watcher_total").await >= 50.0 {
            break;
        }
        sleep(Duration::from_millis(25)).await;
    }
    assert!(metric(&server, "etcd_debugging_mvcc_watcher_total").await >= 50.0);
    let events_before = metric(&server, "etcd_debugging_mvcc_events_total").await;

    client.release(&held).await.unwrap();
    let next = step("the next waiter", granted.recv())
        .await
        .unwrap()
        .expect("granted");
    assert!(next.token() > held.token());
    // Give any herd time to show itself; then exactly one was woken and granted.
    sleep(Duration::from_millis(500)).await;
    let sent = metric(&server, "etcd_debugging_mvcc_events_total").await - events_before;
    assert_eq!(sent, 1.0, "one release sent {sent} watch events");
    assert!(granted.try_recv().is_err(), "a second waiter was granted");
    wait_for_queue(&mut op, &dir, 50).await;

    for waiter in &waiters {
        waiter.abort();
    }
    client.release(&next).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_waiting_neither_fails_nor_grants_early() {
    // Rule: compacting the history while a waiter waits does not fail its wait and
    // does not grant it before the holder releases.
    let server = EtcdServer::start().await.expect("start etcd");
    let (a, b) = (backend(&server, "").await, backend(&server, "").await);
    let mut op = operator(&server).await;
    let held = a
        .acquire(request("compact", WaitPolicy::NoWait))
        .await
        .unwrap();
    let waiter =
        tokio::spawn(async move { b.acquire(request("compact", WaitPolicy::Forever)).await });
    let dir = a.key_dir(&LockName::new("compact").unwrap());
    wait_for_queue(&mut op, &dir, 2).await;
    // Writes after the waiter's watch started, then compaction past them.
    for i in 0..5 {
        op.put(format!("filler/{i}"), "x", None).await.unwrap();
    }
    let rev = store_revision(&mut op).await;
    op.compact(rev, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    sleep(Duration::from_millis(500)).await;
    assert!(!waiter.is_finished(), "the waiter ended before the release");
    a.release(&held).await.unwrap();
    let granted = step("the waiter after compaction", waiter)
        .await
        .unwrap()
        .expect("granted after the release");
    assert!(granted.token() > held.token());
}

fn etcdctl(server: &EtcdServer, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new("etcdctl");
    command
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=127.0.0.1:{}", server.port()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lock_and_this_driver_exclude_each_other_with_an_empty_prefix() {
    // Rule: with prefix= empty, a lock we hold blocks `etcdctl lock NAME`, and a lock
    // `etcdctl lock NAME` holds blocks us; each gets it once the other lets go.
    let server = EtcdServer::start().await.expect("start etcd");
    let ours = backend(&server, "prefix=").await;
    let mut op = operator(&server).await;

    // We hold; etcdctl waits, then runs its command once we release.
    let held = ours
        .acquire(request("interop-a", WaitPolicy::NoWait))
        .await
        .unwrap();
    let mut theirs = etcdctl(&server, &["lock", "interop-a", "echo", "etcdctl-ran"])
        .spawn()
        .expect("etcdctl on PATH (Debian package etcd-client)");
    wait_for_queue(&mut op, "interop-a/", 2).await;
    sleep(Duration::from_millis(300)).await;
    assert!(
        theirs.try_wait().unwrap().is_none(),
        "etcdctl took a lock we hold"
    );
    ours.release(&held).await.unwrap();
    let out = step("etcdctl after our release", theirs.wait_with_output())
        .await
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("etcdctl-ran"));

    // etcdctl holds; we are refused, then granted once it unlocks on SIGINT.
    let mut theirs = etcdctl(&server, &["lock", "interop-b"]).spawn().unwrap();
    let mut lines = BufReader::new(theirs.stdout.take().unwrap()).lines();
    let their_key = step("etcdctl holds", lines.next_line())
        .await
        .unwrap()
        .expect("etcdctl prints its key once it holds the lock");
    assert!(their_key.starts_with("interop-b/"), "{their_key}");
    let err = ours
        .acquire(request("interop-b", WaitPolicy::NoWait))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Contended { .. }), "{err:?}");
    let state = ours
        .inspect(&LockName::new("interop-b").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.holder.as_str(), &their_key["interop-b/".len()..]);
    let pid = nix::unistd::Pid::from_raw(theirs.id().unwrap() as i32);
    let waiting = {
        let ours = ours.clone();
        tokio::spawn(async move {
            ours.acquire(request("interop-b", WaitPolicy::Forever))
                .await
        })
    };
    wait_for_queue(&mut op, "interop-b/", 2).await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let granted = step("our waiter after etcdctl unlocks", waiting)
        .await
        .unwrap()
        .expect("granted");
    assert!(granted.token() > state.token);
    ours.release(&granted).await.unwrap();
    let _ = step("etcdctl exits", theirs.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_client_reports_lost_before_the_server_expires_its_lease() {
    // Rule: a client cut off by the network is told lost from its own deadline
    // (measured from when each keep-alive was sent), before etcd expires the lease and
    // hands the lock on.
    use fencelock_conformance::proxy::{Fault, FaultProxy};
    let server = EtcdServer::start().await.expect("start etcd");
    let upstream = format!("127.0.0.1:{}", server.port()).parse().unwrap();
    let proxy = FaultProxy::start(upstream).await.unwrap();
    let url = format!("etcd://{}?session_ttl=2s", proxy.addr());
    let holder = Arc::new(EtcdBackend::connect_url(&url).await.unwrap());
    let locker = Locker::with_options(holder.clone(), LockerOptions::default());
    let guard = step("lock", locker.lock("blackhole").ttl(TTL))
        .await
        .unwrap();
    let mut op = operator(&server).await;
    let dir = holder.key_dir(&LockName::new("blackhole").unwrap());

    proxy.set(Fault::Blackhole);
    let lost = step("the holder told lost", guard.lost()).await;
    assert!(lost.is_lost(), "{lost:?}");
    // The server still holds the key at that moment or later: poll until it is gone.
    let mut server_had_it_after_loss = false;
    for _ in 0..800 {
        let got = op
            .get(
                dir.as_str(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .unwrap();
        if got.count() == 0 {
            break;
        }
        server_had_it_after_loss = true;
        sleep(Duration::from_millis(10)).await;
    }
    assert!(
        server_had_it_after_loss,
        "the server expired the lease before the client reported the loss"
    );
    let other = backend(&server, "").await;
    let taken = other
        .acquire(request("blackhole", WaitPolicy::NoWait))
        .await
        .expect("free once the lease expired");
    assert!(taken.token() > guard.token());
}

/// One client of the leader-kill run: takes turns on `lock` through its own backend
/// (own connection and session) until `stop`, recording holds, attempts and fenced
/// writes. Returns its history and the errors it met (when, what), for the report.
async fn leader_kill_client(
    who: String,
    url: String,
    counter: fencelock_conformance::history::FencedCounter,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (
    fencelock_conformance::history::History,
    Vec<(tokio::time::Instant, String)>,
) {
    use fencelock_conformance::history::{Attempt, History, Hold};
    use tokio::time::Instant;
    let mut history = History::default();
    let mut errors = Vec::new();
    let backend = step("connect a client", EtcdBackend::connect_url(&url))
        .await
        .expect("connect");
    let locker = Locker::with_options(Arc::new(backend), LockerOptions::default());
    // Bounded: at most 10,000 turns, and the test stops it well before.
    for _ in 0..10_000 {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        let start = Instant::now();
        let taken = locker
            .lock("leader-kill")
            .ttl(TTL)
            .wait(Duration::from_secs(5))
            .await;
        let granted_at = Instant::now();
        let guard = match taken {
            Ok(guard) => guard,
            Err(err) => {
                errors.push((granted_at, format!("{who}: acquire: {err}")));
                history.attempts.push(Attempt {
                    holder: who.clone(),
                    start,
                    end: granted_at,
                    granted: None,
                });
                sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // The hold ends where this client stops being sure it holds the lock.
        let valid_until = granted_at + guard.remaining();
        history.attempts.push(Attempt {
            holder: who.clone(),
            start,
            end: granted_at,
            granted: Some(guard.token()),
        });
        let _ = counter.increment(&who, guard.token()).await;
        sleep(Duration::from_millis(5)).await;
        history.holds.push(Hold {
            holder: who.clone(),
            token: guard.token(),
            start: granted_at,
            end: Instant::now().min(valid_until),
        });
        if let Err(err) = guard.release().await {
            // Lost to the election or the session: the key's TTL or session frees it.
            errors.push((Instant::now(), format!("{who}: release: {err}")));
        }
    }
    (history, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_mid_run_keeps_mutual_exclusion_and_acquisitions_resume() {
    // Rule: in a 3-member cluster, killing the leader while 3 clients (each its own
    // Locker, connection and session) contend for one lock never lets two hold it at
    // once or lets tokens repeat or fall (the history checker), and every client is
    // granted the lock again after the kill. (A killed member refuses connections: a
    // third of all requests fail at once until retried on another member.)
    run_with_a_leader_fault(LeaderFault::Killed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_frozen_mid_run_keeps_mutual_exclusion_and_acquisitions_resume() {
    // Rule: as above with the leader frozen (SIGSTOP) instead: its connections stay
    // open and requests sent to it go unanswered, so only per-request deadlines and
    // re-opened streams let the clients carry on with the other two members.
    run_with_a_leader_fault(LeaderFault::Frozen).await;
}

/// What happens to the leader mid-run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LeaderFault {
    /// SIGKILL: gone for the rest of the run.
    Killed,
    /// SIGSTOP: alive to TCP, silent to every request, for the rest of the run.
    Frozen,
}

async fn run_with_a_leader_fault(fault: LeaderFault) {
    use fencelock_conformance::harness::EtcdCluster;
    use fencelock_conformance::history::{FencedCounter, History, check, describe};
    let mut cluster = step("start a 3-member etcd", EtcdCluster::start())
        .await
        .expect("start a 3-member etcd");
    let url = format!("{}?session_ttl=5s", cluster.url());
    let counter = FencedCounter::new();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|i| {
            tokio::spawn(leader_kill_client(
                format!("client-{i}"),
                url.clone(),
                counter.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let accepted = |counter: &FencedCounter| counter.writes().iter().filter(|w| w.accepted).count();
    // Bounded wait for the run to get going.
    for _ in 0..600 {
        if accepted(&counter) >= 10 {
            break;
        }
        sleep(Duration::from_millis(50)).await;
    }
    let before_kill = accepted(&counter);
    assert!(
        before_kill >= 10,
        "only {before_kill} grants before the kill"
    );
    let leader = step("find the leader", cluster.leader())
        .await
        .expect("a leader");
    match fault {
        LeaderFault::Killed => cluster.member_mut(leader).kill().unwrap(),
        LeaderFault::Frozen => cluster.member_mut(leader).pause().unwrap(),
    }
    let killed_at = tokio::time::Instant::now();
    // Resumed = every client is granted (and writes) at least twice after the kill.
    let writers_after = |counter: &FencedCounter| {
        let mut per_client = std::collections::HashMap::<String, usize>::new();
        for w in counter.writes() {
            if w.accepted && w.start > killed_at {
                *per_client.entry(w.holder).or_default() += 1;
            }
        }
        per_client
    };
    // Bounded: 60 s for an election and every client's recovery, checked every 50 ms.
    let mut resumed = false;
    for _ in 0..1200 {
        let per_client = writers_after(&counter);
        if per_client.len() == 3 && per_client.values().all(|&n| n >= 2) {
            resumed = true;
            break;
        }
        sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut history = History::default();
    let mut errors = Vec::new();
    // Stopping clients may wait on requests to the frozen member: bounded by `step`.
    for client in clients {
        // Bounded: a turn is at most a 5 s wait plus a few bounded, retried requests.
        let (part, errs) = timeout(Duration::from_secs(90), client)
            .await
            .expect("a client stops within 90 s")
            .unwrap();
        history.holds.extend(part.holds);
        history.attempts.extend(part.attempts);
        errors.extend(errs);
    }
    history.writes = counter.writes();
    errors.sort_by_key(|(at, _)| *at);
    let shown: Vec<String> = errors
        .iter()
        .map(|(at, what)| {
            let ms = |d: Duration| d.as_millis() as i128;
            let offset = if *at >= killed_at {
                ms(*at - killed_at)
            } else {
                -ms(killed_at - *at)
            };
            format!("\n  {offset:+} ms after the kill: {what}")
        })
        .collect();
    assert!(
        resumed,
        "grants did not resume for every client after the leader was {fault:?}: {:?}; errors:{}",
        writers_after(&counter),
        shown.concat()
    );
    if let Err(violations) = check(&history, false) {
        panic!(
            "{} holds, {} writes: {}",
            history.holds.len(),
            history.writes.len(),
            describe(&violations)
        );
    }
}

/// How the acquisition whose put was abandoned at the frozen member ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LateEnd {
    /// It is granted (the retry's put, on a live member) and then released.
    Released,
    /// Another client holds the name: it gives up (`NoWait`) and deletes its key.
    GaveUp,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_abandoned_at_a_frozen_member_leaves_no_key_after_release_once_it_resumes() {
    // Rule: an acquisition whose put went to a frozen member (a follower, which
    // forwards proposals to the leader), was abandoned there and retried on a live
    // member, then released: once the frozen member resumes and has caught up, no key
    // of our session remains under the name, and another client acquires it. (The
    // client's cancellation of the abandoned try is lost on the way, as in a
    // partition, so the resumed member surely proposes the put: with the cancellation
    // right behind the request in its socket, it proposes it in about half the runs.)
    late_put_after(LateEnd::Released, Frozen::Follower).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_abandoned_at_a_frozen_member_leaves_no_key_after_giving_up_once_it_resumes() {
    // Rule: as above, with the acquisition refused (`NoWait` behind another holder)
    // instead of granted and released: once the frozen member resumes and has caught
    // up, no key of our session remains, and the name is free after the holder's
    // release.
    late_put_after(LateEnd::GaveUp, Frozen::Follower).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_abandoned_at_a_frozen_leader_leaves_no_key_after_release_once_it_resumes() {
    // Rule: as the first, with the leader frozen instead: the others elect a new one,
    // and the resumed old leader either proposes our put before it learns it was
    // deposed (the entry is then dropped) or forwards it to the new leader, which
    // applies it. Either way, once it has answered the put, no key of our session
    // remains and another client acquires the name.
    late_put_after(LateEnd::Released, Frozen::Leader).await;
}

/// Which member the abandoned put is sent to, frozen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frozen {
    /// A follower: it forwards the put to the leader when it resumes, always.
    Follower,
    /// The leader: deposed while frozen; it may drop the put or forward it.
    Leader,
}

/// Bytes sent to loopback `port` and not yet read by the process listening there
/// (`/proc/net/tcp`'s `rx_queue`, summed over that port's connections): what a
/// frozen member has been sent meanwhile.
fn unread_bytes(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
            let listening = *fields.get(3)? == "0A";
            let unread = u64::from_str_radix(fields.get(4)?.split(':').nth(1)?, 16).ok()?;
            (local == port && !listening).then_some(unread)
        })
        .sum()
}

/// The sum of every sample of `family` whose labels contain `label` (e.g. every
/// `grpc_code` of one method), from one member's `/metrics`.
async fn metric_sum(server: &EtcdServer, family: &str, label: &str) -> f64 {
    metrics(server)
        .await
        .lines()
        .filter(|line| line.starts_with(&format!("{family}{{")) && line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The keys under `dir` attached to `lease`.
async fn keys_on_lease(client: &mut Client, dir: &str, lease: i64) -> Vec<String> {
    let got = client
        .get(dir, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    got.kvs()
        .iter()
        .filter(|kv| kv.lease() == lease)
        .map(|kv| kv.key_str().unwrap_or_default().to_owned())
        .collect()
}

async fn late_put_after(end: LateEnd, which: Frozen) {
    use fencelock_conformance::harness::EtcdCluster;
    use fencelock_conformance::proxy::{Fault, FaultProxy};
    use fencelock_etcd::etcd_client::{EventType, WatchOptions};
    const NAME: &str = "late-put";
    /// Txn requests a member answered, and those it applied.
    const TXN: &str = "grpc_method=\"Txn\"";
    const TXN_OK: &str = "grpc_code=\"OK\",grpc_method=\"Txn\"";
    let cluster = step("start a 3-member etcd", EtcdCluster::start())
        .await
        .expect("start a 3-member etcd");
    let leader = step("find the leader", cluster.leader())
        .await
        .expect("a leader");
    let frozen = match which {
        Frozen::Leader => leader,
        Frozen::Follower => (0..EtcdCluster::MEMBERS)
            .find(|&i| i != leader)
            .expect("a follower"),
    };
    let endpoint = |i: usize| format!("http://{}", cluster.members()[i].addr());
    let live: Vec<String> = (0..EtcdCluster::MEMBERS)
        .filter(|&i| i != frozen)
        .map(endpoint)
        .collect();
    let member = &cluster.members()[frozen];

    // Our client knows only the follower (through a proxy) at first, so its first put
    // goes there.
    let proxy = FaultProxy::start(member.addr()).await.unwrap();
    let ours = Arc::new(
        step(
            "connect to the follower",
            EtcdBackend::connect_url(&format!("etcd://{}", proxy.addr())),
        )
        .await
        .expect("connect"),
    );
    let session = ours.session_lease().expect("a live session");
    let dir = ours.key_dir(&LockName::new(NAME).unwrap());
    let other = Arc::new(
        EtcdBackend::connect(EtcdConfig::new(live.iter().map(String::as_str)))
            .await
            .expect("connect another client to the live members"),
    );
    let mut op = Client::connect(&live, None).await.unwrap();
    let held = match end {
        LateEnd::Released => None,
        LateEnd::GaveUp => Some(
            other
                .acquire(request(NAME, WaitPolicy::NoWait))
                .await
                .expect("the other client holds the name first"),
        ),
    };
    let answered_before = metric_sum(member, "grpc_server_handled_total", TXN).await;
    let applied_before = metric_sum(member, "grpc_server_handled_total", TXN_OK).await;

    member.pause().unwrap();
    let before = unread_bytes(member.port());
    let acquiring = {
        let ours = ours.clone();
        tokio::spawn(async move { ours.acquire(request(NAME, WaitPolicy::NoWait)).await })
    };
    // Bounded: 500 polls, 10 ms apart, until the put txn (a few hundred bytes) sits
    // unread in the frozen member's socket.
    let mut sent = false;
    for _ in 0..500 {
        if unread_bytes(member.port()) >= before + 150 {
            sent = true;
            break;
        }
        sleep(Duration::from_millis(10)).await;
    }
    assert!(sent, "the put never reached the frozen member's socket");
    // Nothing more reaches the member on that connection: not the client's
    // cancellation of the try, nor the connection's end.
    proxy.set(Fault::Blackhole);
    // The retry goes to the live members only.
    for live in &live {
        ours.client().add_endpoint(live).await.unwrap();
    }
    ours.client()
        .remove_endpoint(format!("http://{}", proxy.addr()))
        .await
        .unwrap();
    let outcome = step("the acquisition, retried on a live member", acquiring)
        .await
        .unwrap();
    match (end, outcome) {
        (LateEnd::Released, Ok(lease)) => {
            step("release", ours.release(&lease)).await.unwrap();
        }
        (LateEnd::GaveUp, Err(Error::Contended { .. })) => {}
        (end, outcome) => panic!("{end:?}: unexpected outcome {outcome:?}"),
    }
    if let Some(held) = &held {
        other.release(held).await.unwrap();
    }
    assert!(
        keys_on_lease(&mut op, &dir, session).await.is_empty(),
        "a key of ours remained before the member resumed"
    );
    // Every put of a key of ours from now on is a late one (for the record).
    let from = store_revision(&mut op).await + 1;
    let mut late_puts = op
        .watch(
            dir.as_str(),
            Some(WatchOptions::new().with_prefix().with_start_revision(from)),
        )
        .await
        .unwrap();

    member.resume().unwrap();
    // Caught up: the member answered our late put. Answered OK, the cluster applied
    // it; answered otherwise, its entry was dropped (a deposed leader's) or never
    // proposed. A follower whose connection stayed open always proposes it.
    let mut answered = false;
    // Bounded: 800 polls, 25 ms apart (etcd answers a proposal that is not applied
    // after its 7 s request timeout).
    for _ in 0..800 {
        if metric_sum(member, "grpc_server_handled_total", TXN).await > answered_before {
            answered = true;
            break;
        }
        sleep(Duration::from_millis(25)).await;
    }
    assert!(answered, "the resumed member never answered our late put");
    let applied = metric_sum(member, "grpc_server_handled_total", TXN_OK).await > applied_before;
    assert!(
        applied || which == Frozen::Leader,
        "the resumed follower did not apply our late put"
    );
    let landed = {
        let mut landed = 0;
        // Bounded: at most 100 replies, each within 200 ms.
        for _ in 0..100 {
            let Ok(Ok(Some(reply))) =
                timeout(Duration::from_millis(200), late_puts.message()).await
            else {
                break;
            };
            landed += reply
                .events()
                .iter()
                .filter(|e| {
                    e.event_type() == EventType::Put
                        && e.kv().is_some_and(|kv| kv.lease() == session)
                })
                .count();
        }
        landed
    };
    eprintln!(
        "{end:?}, {which:?} frozen: the late put applied: {applied}; it made a key of ours \
         {landed} time(s)"
    );

    let left = keys_on_lease(&mut op, &dir, session).await;
    assert!(
        left.is_empty(),
        "{end:?}, {which:?} frozen: keys of ours remain after it caught up: {left:?}"
    );
    let taken = step(
        "another client acquires the name",
        other.acquire(request(NAME, WaitPolicy::Until(Duration::from_secs(10)))),
    )
    .await
    .expect("the name is free once the frozen member caught up");
    other.release(&taken).await.unwrap();
    assert_eq!(ours.session_lease(), Some(session), "our session lives on");
}
