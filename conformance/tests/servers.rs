//! Smoke tests for the server harness: each server answers a real client request,
//! each fault tool does what it says, and no server outlives its handle.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use fencelock_conformance::harness::{
    EtcdCluster, EtcdServer, MariaDb, Postgres, RedisPersistence, RedisServer, Server, ZooKeeper,
    ZooKeeperEnsemble,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Runs a client CLI and returns its trimmed stdout; panics with its stderr on failure.
fn cli(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn redis_cli(server: &RedisServer, args: &[&str]) -> String {
    let port = server.port().to_string();
    cli(
        "redis-cli",
        &[&["-h", "127.0.0.1", "-p", &port], args].concat(),
    )
}

fn etcdctl(endpoint: SocketAddr, args: &[&str]) -> String {
    let endpoint = format!("--endpoints=http://{endpoint}");
    cli(
        "etcdctl",
        &[&[endpoint.as_str(), "--dial-timeout=5s"], args].concat(),
    )
}

/// Whether a pid is gone: no such process, or only a zombie left for init to reap.
fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A raw ZooKeeper `ConnectRequest`; returns the granted (session id, timeout).
async fn zk_session(addr: SocketAddr, requested: Duration) -> (i64, Duration) {
    let mut body = Vec::new();
    body.extend(0i32.to_be_bytes()); // protocol version
    body.extend(0i64.to_be_bytes()); // last zxid seen
    body.extend(i32::try_from(requested.as_millis()).unwrap().to_be_bytes());
    body.extend(0i64.to_be_bytes()); // session id: new
    body.extend(16i32.to_be_bytes()); // password length
    body.extend([0u8; 16]);
    body.push(0); // not read-only
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(&[&i32::try_from(body.len()).unwrap().to_be_bytes()[..], &body].concat())
            .await?;
        let len = usize::try_from(stream.read_i32().await?).unwrap();
        let mut reply = vec![0; len];
        stream.read_exact(&mut reply).await?;
        std::io::Result::Ok(reply)
    };
    let reply = timeout(Duration::from_secs(10), exchange)
        .await
        .expect("ZooKeeper answered the connect request in time")
        .expect("ZooKeeper connect request");
    let granted = i32::from_be_bytes(reply[4..8].try_into().unwrap());
    let session = i64::from_be_bytes(reply[8..16].try_into().unwrap());
    (
        session,
        Duration::from_millis(u64::try_from(granted).unwrap()),
    )
}

#[tokio::test]
async fn redis_answers_set_and_get() {
    //! Rule: a started Redis serves real client commands at its port and URL.
    let redis = RedisServer::start().await.expect("start redis-server");
    assert_eq!(redis_cli(&redis, &["SET", "smoke", "42"]), "OK");
    assert_eq!(redis_cli(&redis, &["GET", "smoke"]), "42");
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/", redis.port()));
}

#[tokio::test]
async fn three_redis_nodes_are_independent_servers() {
    //! Rule: `start_many` gives N separate servers (Redlock nodes) sharing no data.
    let nodes = RedisServer::start_many(3, RedisPersistence::None)
        .await
        .expect("start 3 redis-servers");
    assert_eq!(nodes.len(), 3);
    assert_eq!(redis_cli(&nodes[0], &["SET", "only-on-0", "x"]), "OK");
    for node in &nodes[1..] {
        assert_eq!(redis_cli(node, &["EXISTS", "only-on-0"]), "0");
    }
    let mut ports: Vec<u16> = nodes.iter().map(|n| n.port()).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 3, "each node has its own port");
}

#[tokio::test]
async fn etcd_member_answers_put_and_get() {
    //! Rule: a started etcd serves the v3 API at its port.
    let etcd = EtcdServer::start().await.expect("start etcd");
    assert_eq!(etcdctl(etcd.addr(), &["put", "smoke", "42"]), "OK");
    assert_eq!(
        etcdctl(etcd.addr(), &["get", "smoke", "--print-value-only"]),
        "42"
    );
    assert_eq!(etcd.url(), format!("etcd://127.0.0.1:{}", etcd.port()));
}

#[tokio::test]
async fn etcd_cluster_replicates_a_write_to_every_member() {
    //! Rule: the three members form one cluster: a write through one is read through the others.
    let cluster = EtcdCluster::start()
        .await
        .expect("start a 3-member etcd cluster");
    let members = cluster.members();
    assert_eq!(members.len(), 3);
    assert_eq!(etcdctl(members[0].addr(), &["put", "smoke", "42"]), "OK");
    for member in &members[1..] {
        assert_eq!(
            etcdctl(member.addr(), &["get", "smoke", "--print-value-only"]),
            "42"
        );
    }
    assert_eq!(cluster.url().matches("127.0.0.1:").count(), 3);
}

#[tokio::test]
async fn zookeeper_standalone_grants_sessions_within_the_configured_bounds() {
    //! Rule: a standalone ZooKeeper serves clients and caps sessions at `MAX_SESSION_TIMEOUT`.
    let zk = ZooKeeper::start().await.expect("start ZooKeeper");
    assert_eq!(zk.mode().await.as_deref(), Some("standalone"));
    let (session, granted) = zk_session(zk.addr(), Duration::from_secs(30)).await;
    assert_ne!(session, 0, "a session id was granted");
    assert_eq!(granted, ZooKeeper::MAX_SESSION_TIMEOUT);
    let (_, granted) = zk_session(zk.addr(), Duration::from_millis(100)).await;
    assert_eq!(granted, ZooKeeper::MIN_SESSION_TIMEOUT);
    assert_eq!(zk.url(), format!("zk://127.0.0.1:{}", zk.port()));
}

#[tokio::test]
async fn zookeeper_ensemble_has_one_leader_and_serves_on_every_node() {
    //! Rule: the three nodes form one quorum (one leader, two followers) and each grants sessions.
    let ensemble = ZooKeeperEnsemble::start()
        .await
        .expect("start a 3-node ZooKeeper ensemble");
    let mut modes = Vec::new();
    for node in ensemble.nodes() {
        modes.push(node.mode().await.expect("every node serves"));
        let (session, _) = zk_session(node.addr(), Duration::from_secs(2)).await;
        assert_ne!(session, 0, "a session id was granted");
    }
    modes.sort();
    assert_eq!(modes, ["follower", "follower", "leader"]);
    assert!(ensemble.leader().await.is_some());
}

#[tokio::test]
async fn mariadb_answers_sql_in_the_test_database() {
    //! Rule: MariaDB accepts passwordless root over TCP and the `fencelock` database exists.
    let db = MariaDb::start().await.expect("start MariaDB");
    let port = db.port().to_string();
    let answer = cli(
        "mariadb",
        &[
            "--no-defaults",
            "--protocol=TCP",
            "-h",
            "127.0.0.1",
            "-P",
            &port,
            "-u",
            "root",
            "-N",
            MariaDb::DATABASE,
            "-e",
            "CREATE TABLE t (x INT); INSERT INTO t VALUES (42); SELECT x FROM t",
        ],
    );
    assert_eq!(answer, "42");
    assert_eq!(
        db.url(),
        format!("mysql://root@127.0.0.1:{}/fencelock", db.port())
    );
}

#[tokio::test]
async fn postgres_answers_sql_at_its_url() {
    //! Rule: Postgres accepts user `postgres` over TCP with trust auth at `url()`.
    let pg = Postgres::start().await.expect("start Postgres");
    assert_eq!(
        cli("psql", &[&pg.url(), "-X", "-tAc", "SELECT 40 + 2"]),
        "42"
    );
    let user = cli("psql", &[&pg.url(), "-X", "-tAc", "SELECT current_user"]);
    assert_eq!(user, "postgres");
}

#[tokio::test]
async fn paused_server_answers_nothing_until_resumed() {
    //! Rule: pause (SIGSTOP) leaves a request unanswered; resume (SIGCONT) answers it.
    let redis = RedisServer::start().await.expect("start redis-server");
    redis.pause().expect("pause");
    let mut conn = TcpStream::connect(redis.addr()).await.expect("connect");
    conn.write_all(b"PING\r\n").await.expect("send PING");
    let mut reply = [0; 16];
    assert!(
        timeout(Duration::from_millis(700), conn.read(&mut reply))
            .await
            .is_err(),
        "a paused server answered"
    );
    redis.resume().expect("resume");
    let n = timeout(Duration::from_secs(5), conn.read(&mut reply))
        .await
        .expect("answer after resume")
        .expect("read");
    assert_eq!(&reply[..n], b"+PONG\r\n");
}

#[tokio::test]
async fn killed_server_refuses_connections_until_restarted() {
    //! Rule: kill (SIGKILL) ends the server at once; restart brings it back on the same port.
    let mut redis = RedisServer::start().await.expect("start redis-server");
    let (port, old_pid) = (redis.port(), redis.pid().unwrap());
    redis.kill().expect("kill");
    assert_eq!(redis.pid(), None);
    assert!(is_gone(old_pid));
    let refused = TcpStream::connect(redis.addr())
        .await
        .expect_err("connected");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    redis.restart(true).await.expect("restart");
    assert_eq!(redis.port(), port);
    assert_eq!(redis_cli(&redis, &["PING"]), "PONG");
}

#[tokio::test]
async fn restart_keeping_data_keeps_an_append_only_write() {
    //! Rule: with persistence, restart(keep_data = true) keeps acknowledged writes.
    let mut redis = RedisServer::start_with(RedisPersistence::AppendOnly)
        .await
        .expect("start redis-server");
    assert_eq!(redis_cli(&redis, &["SET", "kept", "42"]), "OK");
    let old_pid = redis.pid();
    redis.restart(true).await.expect("restart");
    assert_ne!(redis.pid(), old_pid, "a new process");
    assert_eq!(redis_cli(&redis, &["GET", "kept"]), "42");
}

#[tokio::test]
async fn restart_without_data_loses_every_write() {
    //! Rule: restart(keep_data = false) comes back empty, even with persistence.
    let mut redis = RedisServer::start_with(RedisPersistence::AppendOnly)
        .await
        .expect("start redis-server");
    assert_eq!(redis_cli(&redis, &["SET", "lost", "42"]), "OK");
    redis.restart(false).await.expect("restart");
    assert_eq!(redis_cli(&redis, &["EXISTS", "lost"]), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_server_process_outlives_its_handle() {
    //! Rule: dropping a handle, also while unwinding a panic, ends the server and every process it forked.
    let pg = Postgres::start().await.expect("start Postgres");
    let postmaster = pg.pid().unwrap();
    let backends = children_of(postmaster);
    assert!(!backends.is_empty(), "Postgres forks helper processes");
    drop(pg);
    assert!(
        is_gone(postmaster),
        "postmaster {postmaster} outlived its handle"
    );
    for pid in backends {
        assert!(is_gone(pid), "Postgres child {pid} outlived its handle");
    }

    let (pid_tx, pid_rx) = tokio::sync::oneshot::channel();
    let panicked = tokio::spawn(async move {
        let redis = RedisServer::start().await.expect("start redis-server");
        pid_tx.send(redis.pid().unwrap()).unwrap();
        panic!("a test failing while it holds a server");
    })
    .await;
    assert!(panicked.is_err_and(|e| e.is_panic()));
    let pid = pid_rx.await.expect("the task started redis");
    assert!(is_gone(pid), "redis {pid} outlived a panic");
}
