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

/// One counter from etcd's own `/metrics`.
async fn metric(server: &EtcdServer, name: &str) -> f64 {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", server.port()))
        .await
        .unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).await.unwrap();
    body.lines()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncontended_acquire_and_release_cost_exactly_two_writes() {
    // Rule: on a live session, acquire + release is one put txn and one delete: the
    // store's revision rises by exactly two; renewals write nothing.
    let server = EtcdServer::start().await.expect("start etcd");
    let client = backend(&server, "").await;
    let mut op = operator(&server).await;
    let before = store_revision(&mut op).await;
    let lease = client
        .acquire(request("cost", WaitPolicy::NoWait))
        .await
        .unwrap();
    let renewed = client.renew(&lease, TTL).await.unwrap();
    assert_eq!(renewed.token(), lease.token());
    client.release(&renewed).await.unwrap();
    assert_eq!(store_revision(&mut op).await - before, 2);
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
