//! ZooKeeper 3.8 run by `java` from Debian's jars: standalone, or a 3-node ensemble.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use super::process::{
    Launch, ServerProcess, ask, find_binary, on_free_ports, temp_dir, wipe, write_file,
};
use super::{HarnessError, Result, Server};

const READY_WITHIN: Duration = Duration::from_secs(40);

/// One ZooKeeper node on `127.0.0.1` (standalone, or in a [`ZooKeeperEnsemble`]),
/// stopped on drop.
///
/// Runs `java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData
/// -cp /usr/share/java/zookeeper.jar:slf4j-simple.jar QuorumPeerMain <tmp>/zoo.cfg`
/// with `tickTime=200`, session timeouts from [`MIN_SESSION_TIMEOUT`] to
/// [`MAX_SESSION_TIMEOUT`], `4lw.commands.whitelist=*`, `admin.enableServer=false`,
/// `maxClientCnxns=0` (no per-address cap: tests open dozens of sessions);
/// the log goes to `<tmp>/server.log`. Ready when `srvr` reports a `Mode:` (it
/// serves), so a restarted ensemble node needs a quorum of the others up.
///
/// [`MIN_SESSION_TIMEOUT`]: Self::MIN_SESSION_TIMEOUT
/// [`MAX_SESSION_TIMEOUT`]: Self::MAX_SESSION_TIMEOUT
#[derive(Debug)]
pub struct ZooKeeper {
    process: ServerProcess,
    data: PathBuf,
    /// The node's id in an ensemble; `None` when standalone.
    myid: Option<usize>,
    _dir: TempDir,
}

impl ZooKeeper {
    /// `tickTime`: short, so session expiry tests take seconds.
    pub const TICK: Duration = Duration::from_millis(200);
    /// The shortest session timeout the server grants (`minSessionTimeout`).
    pub const MIN_SESSION_TIMEOUT: Duration = Duration::from_secs(1);
    /// The longest session timeout the server grants (`maxSessionTimeout`); longer
    /// requests are cut to it.
    pub const MAX_SESSION_TIMEOUT: Duration = Duration::from_secs(4);

    /// Starts a standalone server.
    pub async fn start() -> Result<Self> {
        let mut nodes = start_nodes(1, false).await?;
        Ok(nodes.remove(0))
    }

    /// Starts a standalone server that logs every request it processes (its
    /// `FinalRequestProcessor` at debug level), so a test can count a session's
    /// requests by type with [`requests_of`](Self::requests_of).
    pub async fn start_logging_requests() -> Result<Self> {
        let mut nodes = start_nodes(1, true).await?;
        Ok(nodes.remove(0))
    }

    /// The requests the server has processed for session `session_id`, in order, as
    /// `(type, path)`: `("create", "/a/_c_..-lock-")`, `("getChildren", "/a")`,
    /// `("ping", "n/a")`. Empty unless started by
    /// [`start_logging_requests`](Self::start_logging_requests). The server logs a
    /// request before it answers it, so every answered request is in the list.
    ///
    /// # Errors
    /// [`HarnessError::Io`] if the log cannot be read.
    pub fn requests_of(&self, session_id: i64) -> Result<Vec<(String, String)>> {
        let log_path = self._dir.path().join("server.log");
        let log = std::fs::read_to_string(&log_path)
            .map_err(|err| HarnessError::io(format!("read {}", log_path.display()), err))?;
        let session = format!("sessionid:{session_id:#x} ");
        Ok(log
            .lines()
            .filter_map(|line| {
                line.split_once("Processing request:: ")?
                    .1
                    .strip_prefix(&session)
            })
            .filter_map(|rest| {
                let field = |key: &str| {
                    rest.split(' ')
                        .find_map(|word| word.strip_prefix(key))
                        .map(str::to_owned)
                };
                Some((field("type:")?, field("reqpath:")?))
            })
            .collect())
    }

    /// The server's `mntr` report as `(name, value)` pairs (`zk_packets_received`,
    /// `zk_cnt_{namespace}_write_per_namespace`, `zk_sum_node_deleted_watch_count`,
    /// ...), `None` if the node does not answer. Lines whose value is no integer are
    /// left out.
    pub async fn metrics(&self) -> Option<std::collections::HashMap<String, i64>> {
        let reply = ask(self.process.port(), b"mntr").await?;
        let metrics: std::collections::HashMap<String, i64> = reply
            .lines()
            .filter_map(|line| {
                let (name, value) = line.split_once('\t')?;
                Some((name.trim().to_owned(), value.trim().parse().ok()?))
            })
            .collect();
        (!metrics.is_empty()).then_some(metrics)
    }

    /// What `srvr` reports as `Mode:` (`standalone`, `leader`, `follower`), or
    /// `None` if the node does not serve.
    pub async fn mode(&self) -> Option<String> {
        let reply = ask(self.process.port(), b"srvr").await?;
        let mode = reply.lines().find_map(|line| line.strip_prefix("Mode: "))?;
        Some(mode.trim().to_owned())
    }
}

impl Server for ZooKeeper {
    fn process(&self) -> &ServerProcess {
        &self.process
    }

    fn process_mut(&mut self) -> &mut ServerProcess {
        &mut self.process
    }

    /// `zk://127.0.0.1:P` (this node only).
    fn url(&self) -> String {
        format!("zk://{}", self.process.addr())
    }

    /// An ensemble node restarted without data catches up from the leader.
    async fn restart(&mut self, keep_data: bool) -> Result<()> {
        self.process.stop().await?;
        if !keep_data {
            wipe_data(&self.data, self.myid)?;
        }
        let port = self.process.port();
        self.process
            .start_again(READY_WITHIN, || serves(port))
            .await
    }
}

/// Three ZooKeeper nodes forming one ensemble on `127.0.0.1`, stopped on drop.
#[derive(Debug)]
pub struct ZooKeeperEnsemble {
    nodes: Vec<ZooKeeper>,
}

impl ZooKeeperEnsemble {
    /// How many nodes [`start`](Self::start) runs.
    pub const NODES: usize = 3;

    /// Starts three nodes and waits until each serves (a leader is elected).
    pub async fn start() -> Result<Self> {
        Ok(Self {
            nodes: start_nodes(Self::NODES, false).await?,
        })
    }

    /// The nodes, in `myid` order (1, 2, 3).
    pub fn nodes(&self) -> &[ZooKeeper] {
        &self.nodes
    }

    /// One node, to pause, kill or restart on its own.
    pub fn node_mut(&mut self, index: usize) -> &mut ZooKeeper {
        &mut self.nodes[index]
    }

    /// The index of the node that reports `Mode: leader`, if any.
    pub async fn leader(&self) -> Option<usize> {
        for (index, node) in self.nodes.iter().enumerate() {
            if node.mode().await.as_deref() == Some("leader") {
                return Some(index);
            }
        }
        None
    }

    /// `zk://127.0.0.1:A,127.0.0.1:B,127.0.0.1:C`
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| n.process.addr().to_string())
            .collect();
        format!("zk://{}", hosts.join(","))
    }

    /// Stops every node, wipes all data unless `keep_data`, starts them all and
    /// waits until each serves.
    pub async fn restart(&mut self, keep_data: bool) -> Result<()> {
        for node in &mut self.nodes {
            node.process.stop().await?;
            if !keep_data {
                wipe_data(&node.data, node.myid)?;
            }
        }
        // All before waiting: a lone node has no quorum.
        for node in &mut self.nodes {
            node.process
                .note_in_log("restarting with the whole ensemble");
            node.process.respawn()?;
        }
        for node in &mut self.nodes {
            let port = node.process.port();
            node.process
                .wait_ready(READY_WITHIN, || serves(port))
                .await?;
        }
        Ok(())
    }
}

async fn start_nodes(count: usize, log_requests: bool) -> Result<Vec<ZooKeeper>> {
    let java = find_binary("java")?;
    let classpath = classpath()?;
    let dirs = (0..count)
        .map(|_| temp_dir("zookeeper", None))
        .collect::<Result<Vec<_>>>()?;
    let ensemble = count > 1;
    let processes = on_free_ports(3 * count, |ports| {
        let (client, quorum) = ports.split_at(count);
        let servers: String = (0..count)
            .filter(|_| ensemble)
            .map(|i| {
                let (peer, election) = (quorum[2 * i], quorum[2 * i + 1]);
                format!("server.{}=127.0.0.1:{peer}:{election}\n", i + 1)
            })
            .collect();
        let launches: Result<Vec<(Launch, u16)>> = dirs
            .iter()
            .enumerate()
            .map(|(i, dir)| {
                let data = dir.path().join("data");
                // A failed attempt may have left an ensemble on other ports in it.
                wipe_data(&data, ensemble.then_some(i + 1))?;
                let config = dir.path().join("zoo.cfg");
                write_file(&config, &zoo_cfg(&data, client[i], &servers))?;
                let name = format!("ZooKeeper node {} on 127.0.0.1:{}", i + 1, client[i]);
                let launch = Launch::new(name, &java, dir.path())
                    .args(["-Xmx256m", "-Xms32m", "-XX:+UseSerialGC"])
                    .args(["-XX:TieredStopAtLevel=1", "-XX:-UsePerfData"])
                    .args(["-Djava.net.preferIPv4Stack=true"])
                    // Faster re-election when a peer is down.
                    .args(["-Dzookeeper.cnxTimeout=1000"])
                    .args(["-Dorg.slf4j.simpleLogger.showDateTime=true"])
                    .args(log_requests.then_some(
                        "-Dorg.slf4j.simpleLogger.log.org.apache.zookeeper.server.FinalRequestProcessor=debug",
                    ))
                    .args(["-cp", &classpath])
                    .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
                    .arg(config);
                Ok((launch, client[i]))
            })
            .collect();
        async move {
            let mut processes = launches?
                .into_iter()
                .map(|(launch, port)| ServerProcess::spawn(launch, port))
                .collect::<Result<Vec<_>>>()?;
            for process in &mut processes {
                let port = process.port();
                process.wait_ready(READY_WITHIN, || serves(port)).await?;
            }
            Ok(processes)
        }
    })
    .await?;
    Ok(processes
        .into_iter()
        .zip(dirs)
        .enumerate()
        .map(|(i, (process, dir))| ZooKeeper {
            process,
            data: dir.path().join("data"),
            myid: ensemble.then_some(i + 1),
            _dir: dir,
        })
        .collect())
}

fn zoo_cfg(data: &Path, client_port: u16, servers: &str) -> String {
    let tick = ZooKeeper::TICK.as_millis();
    let min = ZooKeeper::MIN_SESSION_TIMEOUT.as_millis();
    let max = ZooKeeper::MAX_SESSION_TIMEOUT.as_millis();
    format!(
        "tickTime={tick}\n\
         initLimit=50\n\
         syncLimit=10\n\
         dataDir={data}\n\
         clientPort={client_port}\n\
         clientPortAddress=127.0.0.1\n\
         minSessionTimeout={min}\n\
         maxSessionTimeout={max}\n\
         4lw.commands.whitelist=*\n\
         maxClientCnxns=0\n\
         admin.enableServer=false\n\
         forceSync=no\n\
         preAllocSize=1024\n\
         {servers}",
        data = data.display(),
    )
}

/// Empties a node's data dir, keeping its ensemble id.
fn wipe_data(data: &Path, myid: Option<usize>) -> Result<()> {
    wipe(data, None)?;
    match myid {
        Some(id) => write_file(&data.join("myid"), &format!("{id}\n")),
        None => Ok(()),
    }
}

/// Debian's `zookeeper.jar` names its dependencies in its manifest; slf4j-simple
/// sends the log to stderr, which goes to the node's log file.
fn classpath() -> Result<String> {
    let debian = Path::new("/usr/share/java/zookeeper.jar");
    if debian.is_file() {
        let simple = Path::new("/usr/share/java/slf4j-simple.jar");
        return Ok(if simple.is_file() {
            format!("{}:{}", debian.display(), simple.display())
        } else {
            debian.display().to_string()
        });
    }
    if let Some(home) = std::env::var_os("ZOOKEEPER_HOME") {
        return Ok(format!("{}/lib/*", Path::new(&home).display()));
    }
    Err(HarnessError::Missing {
        what: "ZooKeeper's jars".into(),
        looked_in: "/usr/share/java/zookeeper.jar and $ZOOKEEPER_HOME/lib".into(),
    })
}

async fn serves(port: u16) -> bool {
    ask(port, b"srvr")
        .await
        .is_some_and(|reply| reply.contains("Mode: "))
}
