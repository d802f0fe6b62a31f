//! The conformance suite against ZooKeeper: one standalone server shared by every test
//! of this binary (each test uses its own lock names), every client its own
//! `ZooKeeperBackend` with its own session, as separate processes would have; and the
//! interop rules against a client in Apache Curator's `InterProcessMutex` layout and
//! against kazoo's `Lock` (Python).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use fencelock_conformance::StoreFixture;
use fencelock_conformance::harness::{Server, ZooKeeper};
use fencelock_core::{
    AcquireRequest, Error, LockBackend, LockName, OwnerId, Result, WaitPolicy, async_trait,
};
use fencelock_zookeeper::ZooKeeperBackend;
use fencelock_zookeeper::zookeeper_client::{Client, Error as ZkError};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::time::timeout;

/// One server for the whole binary: the harness's spawner keeps it alive across the
/// tests' runtimes and its parent-death signal stops it when the binary exits.
static SERVER: tokio::sync::OnceCell<ZooKeeper> = tokio::sync::OnceCell::const_new();

struct ZooKeeperFixture {
    url: String,
}

#[async_trait]
impl StoreFixture for ZooKeeperFixture {
    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(ZooKeeperBackend::open(&self.url).await?))
    }

    /// Deletes every node under the lock's node, as `zkCli.sh deleteall` would.
    async fn delete_behind_back(&self, name: &LockName) -> Result<()> {
        let operator = |err: ZkError| Error::backend("zookeeper", "operator delete", true, err);
        let backend = ZooKeeperBackend::open(&self.url).await?;
        let dir = backend.lock_path(name);
        let client = Client::connect(&backend.config().connect_string())
            .await
            .map_err(operator)?;
        for child in client.list_children(&dir).await.map_err(operator)? {
            match client.delete(&format!("{dir}/{child}"), None).await {
                Ok(()) | Err(ZkError::NoNode) => {}
                Err(err) => return Err(operator(err)),
            }
        }
        Ok(())
    }

    fn url(&self) -> Option<String> {
        Some(self.url.clone())
    }
}

async fn fixture() -> ZooKeeperFixture {
    let server = SERVER
        .get_or_init(|| async { ZooKeeper::start().await.expect("start ZooKeeper") })
        .await;
    ZooKeeperFixture {
        url: format!("{}/conformance?session_timeout=2s", server.url()),
    }
}

fencelock_conformance::conformance_tests!(fixture);
fencelock_conformance::fault_tests!(fixture, env!("CARGO_BIN_EXE_fencelock-worker"));

/// A client in Apache Curator's `InterProcessMutex` layout, written in Java against
/// ZooKeeper's own Java client (`conformance/java/CuratorLayoutMutex.java`), compiled
/// with `javac` and run as a child process that follows commands on stdin. Killed
/// when dropped.
struct CuratorLayoutClient {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    _classes: tempfile::TempDir,
}

/// A hang guard for one exchange with the Java client (JVM start included).
const JAVA_STEP: Duration = Duration::from_secs(60);

/// Debian's ZooKeeper client jar (its manifest names netty, jute, slf4j-api) and a
/// silent slf4j binding.
const ZOOKEEPER_JARS: &str = "/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-nop.jar";

impl CuratorLayoutClient {
    async fn start(hosts: &str, lock_path: &str) -> Self {
        let javac = which("javac").unwrap_or_else(|| {
            panic!(
                "javac (a JDK) is not installed, and the Curator-layout interop test needs it; \
                 install the test servers and a JDK with `scripts/install-stores.sh`"
            )
        });
        let java = which("java")
            .unwrap_or_else(|| panic!("java is not installed; run `scripts/install-stores.sh`"));
        assert!(
            Path::new("/usr/share/java/zookeeper.jar").is_file(),
            "ZooKeeper's Java client jar is missing; run `scripts/install-stores.sh`"
        );
        let classes = tempfile::tempdir().expect("temp dir for the Java classes");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("java/CuratorLayoutMutex.java");
        let compiled = timeout(
            JAVA_STEP,
            Command::new(javac)
                .arg("-d")
                .arg(classes.path())
                .args(["-cp", ZOOKEEPER_JARS])
                .arg(&source)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("javac within the step")
        .expect("run javac");
        assert!(
            compiled.status.success(),
            "javac failed on {}: {}",
            source.display(),
            String::from_utf8_lossy(&compiled.stderr)
        );
        let classpath = format!("{}:{ZOOKEEPER_JARS}", classes.path().display());
        let mut child = Command::new(java)
            .args(["-Xmx64m", "-XX:TieredStopAtLevel=1", "-XX:-UsePerfData"])
            .args(["-cp", &classpath, "CuratorLayoutMutex", hosts, lock_path])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the Java client");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut client = Self {
            child,
            stdin,
            stdout,
            _classes: classes,
        };
        assert_eq!(client.reply().await, "ready");
        client
    }

    /// The next line the Java client prints.
    async fn reply(&mut self) -> String {
        timeout(JAVA_STEP, self.stdout.next_line())
            .await
            .expect("the Java client answers within the step")
            .expect("read the Java client's output")
            .expect("the Java client exited")
    }

    /// Sends one command; returns without waiting for the answer.
    async fn send(&mut self, command: &str) {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .expect("write to the Java client");
        self.stdin.flush().await.expect("flush");
    }

    async fn ask(&mut self, command: &str) -> String {
        self.send(command).await;
        self.reply().await
    }
}

impl Drop for CuratorLayoutClient {
    fn drop(&mut self) {
        // Our own child, by its handle (pid); kill_on_drop reaps it too.
        let _ = self.child.start_kill();
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curator_layout_client_and_this_driver_exclude_each_other() {
    // Rule: a lock held through this driver excludes a client following Curator's
    // InterProcessMutex algorithm on the same path, and the other way round; each
    // side is granted once the other releases.
    let fixture = fixture().await;
    let ours = ZooKeeperBackend::open(&fixture.url).await.expect("connect");
    let suffix = OwnerId::random();
    let name = LockName::new(format!("interop/{}", &suffix.as_str()[..12])).unwrap();
    let path = ours.lock_path(&name);
    let hosts = ours.config().connect_string();
    let mut java = CuratorLayoutClient::start(&hosts, &path).await;
    let request = |wait| {
        AcquireRequest::new(name.clone(), Duration::from_secs(30))
            .unwrap()
            .with_wait(wait)
    };

    // The Java client holds: we are refused, then granted right after its release.
    let reply = java.ask("acquire 30000").await;
    let java_node = reply
        .strip_prefix("acquired ")
        .unwrap_or_else(|| panic!("the Java client did not acquire a free lock: {reply}"));
    assert!(
        java_node.starts_with(&format!("{path}/_c_")) && java_node.contains("-lock-"),
        "not Curator's protected layout: {java_node}"
    );
    let err = ours
        .acquire(request(WaitPolicy::NoWait))
        .await
        .expect_err("held by the Java client");
    assert!(matches!(err, Error::Contended { .. }), "{err:?}");
    assert_eq!(java.ask("release").await, "released");
    let lease = ours
        .acquire(request(WaitPolicy::NoWait))
        .await
        .expect("granted once the Java client released");

    // We hold: the Java client's timed acquire fails, and it is granted (woken by
    // its watch on our node) once we release.
    assert_eq!(java.ask("acquire 1000").await, "timeout");
    let zk = Client::connect(&hosts).await.expect("operator client");
    assert_eq!(
        zk.list_children(&path).await.expect("list").len(),
        1,
        "the Java client's timed-out attempt left its node behind"
    );
    java.send("acquire 60000").await;
    let mut queued = false;
    for _ in 0..600 {
        if zk.list_children(&path).await.expect("list").len() == 2 {
            queued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(queued, "the Java client never queued behind us");
    let err = ours
        .acquire(request(WaitPolicy::NoWait))
        .await
        .expect_err("still ours");
    assert!(matches!(err, Error::Contended { .. }), "{err:?}");
    ours.release(&lease).await.expect("release");
    let reply = java.reply().await;
    assert!(
        reply.starts_with("acquired "),
        "the Java client was not granted after our release: {reply}"
    );
    let state = ours.inspect(&name).await.expect("inspect").expect("held");
    assert!(
        state.token > lease.token(),
        "the Java holder's czxid is higher"
    );
    assert_eq!(java.ask("release").await, "released");
    assert!(ours.inspect(&name).await.expect("inspect").is_none());
    java.send("quit").await;
}

/// kazoo's `Lock` (Python), run by `python3 conformance/python/kazoo_lock.py` as a
/// child process that follows commands on stdin. Killed when dropped.
struct KazooClient {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl KazooClient {
    /// The Python that imports kazoo: Debian's (`/usr/bin/python3`, where the
    /// `python3-kazoo` package puts it) first, then the first `python3` on `PATH`.
    async fn python() -> PathBuf {
        let candidates = [Some(PathBuf::from("/usr/bin/python3")), which("python3")];
        for python in candidates.into_iter().flatten() {
            if !python.is_file() {
                continue;
            }
            let imports = timeout(
                JAVA_STEP,
                Command::new(&python)
                    .args(["-c", "import kazoo.recipe.lock"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .status(),
            )
            .await
            .is_ok_and(|status| status.is_ok_and(|s| s.success()));
            if imports {
                return python;
            }
        }
        panic!(
            "kazoo (Python's ZooKeeper client) is not installed, and the kazoo interop test \
             needs it; install it with `scripts/install-stores.sh` (Debian package \
             python3-kazoo)"
        )
    }

    async fn start(hosts: &str, lock_path: &str) -> Self {
        let python = Self::python().await;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/kazoo_lock.py");
        let mut child = Command::new(python)
            .arg(&script)
            .args([hosts, lock_path])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the kazoo client");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut client = Self {
            child,
            stdin,
            stdout,
        };
        assert_eq!(client.reply().await, "ready");
        client
    }

    /// The next line the kazoo client prints.
    async fn reply(&mut self) -> String {
        timeout(JAVA_STEP, self.stdout.next_line())
            .await
            .expect("the kazoo client answers within the step")
            .expect("read the kazoo client's output")
            .expect("the kazoo client exited")
    }

    /// Sends one command; returns without waiting for the answer.
    async fn send(&mut self, command: &str) {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .expect("write to the kazoo client");
        self.stdin.flush().await.expect("flush");
    }

    async fn ask(&mut self, command: &str) -> String {
        self.send(command).await;
        self.reply().await
    }
}

impl Drop for KazooClient {
    fn drop(&mut self) {
        // Our own child, by its handle (pid); kill_on_drop reaps it too.
        let _ = self.child.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kazoo_lock_and_this_driver_exclude_each_other() {
    // Rule: a lock held by kazoo's `Lock` (nodes `{uuid}__lock__NNNNNNNNNN`, with
    // `extra_lock_patterns=["-lock-"]` so it counts our nodes) excludes this driver on
    // the same path, and a lock held through this driver excludes kazoo; a waiter on
    // either side is granted (woken by its watch) once the other releases.
    let fixture = fixture().await;
    let ours = ZooKeeperBackend::open(&fixture.url).await.expect("connect");
    let suffix = OwnerId::random();
    let name = LockName::new(format!("kazoo/{}", &suffix.as_str()[..12])).unwrap();
    let path = ours.lock_path(&name);
    let hosts = ours.config().connect_string();
    let mut kazoo = KazooClient::start(&hosts, &path).await;
    let request = |wait| {
        AcquireRequest::new(name.clone(), Duration::from_secs(30))
            .unwrap()
            .with_wait(wait)
    };

    // kazoo holds: we are refused, and our waiter is granted once kazoo releases.
    let reply = kazoo.ask("acquire 30000").await;
    let kazoo_node = reply
        .strip_prefix("acquired ")
        .unwrap_or_else(|| panic!("kazoo did not acquire a free lock: {reply}"));
    assert!(
        kazoo_node.starts_with(&format!("{path}/")) && kazoo_node.contains("__lock__"),
        "not kazoo's layout: {kazoo_node}"
    );
    let err = ours
        .acquire(request(WaitPolicy::NoWait))
        .await
        .expect_err("held by kazoo: a client that skips kazoo's nodes takes it");
    assert!(matches!(err, Error::Contended { .. }), "{err:?}");
    let ours = Arc::new(ours);
    let waiting = {
        let (ours, request) = (Arc::clone(&ours), request(WaitPolicy::Until(JAVA_STEP)));
        tokio::spawn(async move { ours.acquire(request).await })
    };
    let zk = Client::connect(&hosts).await.expect("operator client");
    let mut queued = false;
    for _ in 0..600 {
        if zk.list_children(&path).await.expect("list").len() == 2 {
            queued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(queued, "our waiter never queued behind kazoo");
    assert!(
        !waiting.is_finished(),
        "our waiter was granted while kazoo held"
    );
    assert_eq!(kazoo.ask("release").await, "released");
    let lease = timeout(JAVA_STEP, waiting)
        .await
        .expect("our waiter is woken by kazoo's release")
        .expect("task")
        .expect("granted once kazoo released");

    // We hold: kazoo's timed acquire fails, and it is granted (woken by its watch on
    // our node) once we release.
    assert_eq!(kazoo.ask("acquire 1000").await, "timeout");
    assert_eq!(
        zk.list_children(&path).await.expect("list").len(),
        1,
        "kazoo's timed-out attempt left its node behind"
    );
    kazoo.send("acquire 60000").await;
    let mut queued = false;
    for _ in 0..600 {
        if zk.list_children(&path).await.expect("list").len() == 2 {
            queued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(queued, "kazoo never queued behind us");
    ours.release(&lease).await.expect("release");
    let reply = kazoo.reply().await;
    assert!(
        reply.starts_with("acquired "),
        "kazoo was not granted after our release: {reply}"
    );
    let state = ours.inspect(&name).await.expect("inspect").expect("held");
    assert!(state.token > lease.token(), "kazoo's czxid is higher");
    let err = ours
        .acquire(request(WaitPolicy::NoWait))
        .await
        .expect_err("held by kazoo again");
    assert!(matches!(err, Error::Contended { .. }), "{err:?}");
    assert_eq!(kazoo.ask("release").await, "released");
    assert!(ours.inspect(&name).await.expect("inspect").is_none());
    kazoo.send("quit").await;
}
