//! `etcd`: one member, or a 3-member cluster on loopback.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use super::process::{Launch, ServerProcess, ask, find_binary, on_free_ports, temp_dir, wipe};
use super::{HarnessError, Result, Server};

const READY_WITHIN: Duration = Duration::from_secs(30);

/// One `etcd` member on `127.0.0.1` (alone, or in an [`EtcdCluster`]), stopped on drop.
///
/// Started as `etcd --name mI --data-dir <tmp>/data --listen-client-urls
/// http://127.0.0.1:C --advertise-client-urls (same) --listen-peer-urls
/// http://127.0.0.1:P --initial-advertise-peer-urls (same) --initial-cluster ...
/// --initial-cluster-state new --heartbeat-interval 100 --election-timeout 1000
/// --logger zap --log-outputs stderr`. Ready when `GET /health` says
/// `"health":"true"` (a leader is elected), so a restarted cluster member needs a
/// quorum of the others up.
#[derive(Debug)]
pub struct EtcdServer {
    process: ServerProcess,
    data: PathBuf,
    cluster_size: usize,
    _dir: TempDir,
}

impl EtcdServer {
    /// Starts a one-member cluster.
    pub async fn start() -> Result<Self> {
        let mut members = start_members(1).await?;
        Ok(members.remove(0))
    }
}

impl EtcdServer {
    /// Whether this member is the leader (per `/v3/maintenance/status`), or `None`
    /// if it does not answer.
    pub async fn is_leader(&self) -> Option<bool> {
        let request = "POST /v3/maintenance/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                       Content-Type: application/json\r\nContent-Length: 2\r\n\
                       Connection: close\r\n\r\n{}";
        let reply = ask(self.process.port(), request.as_bytes()).await?;
        let member = json_string(&reply, "member_id")?;
        Some(json_string(&reply, "leader")? == member)
    }
}

impl Server for EtcdServer {
    fn process(&self) -> &ServerProcess {
        &self.process
    }

    fn process_mut(&mut self) -> &mut ServerProcess {
        &mut self.process
    }

    /// `etcd://127.0.0.1:P` (this member only).
    fn url(&self) -> String {
        format!("etcd://{}", self.process.addr())
    }

    /// For a member of a larger cluster only `keep_data = true` applies: a wiped
    /// member cannot rejoin under its old identity; use [`EtcdCluster::restart`].
    async fn restart(&mut self, keep_data: bool) -> Result<()> {
        if !keep_data && self.cluster_size > 1 {
            return Err(HarnessError::Unsupported(
                "a wiped etcd member cannot rejoin its cluster under its old identity; \
                 wipe the whole cluster with EtcdCluster::restart(false)"
                    .into(),
            ));
        }
        self.process.stop().await?;
        if !keep_data {
            wipe(&self.data, None)?;
        }
        let port = self.process.port();
        self.process
            .start_again(READY_WITHIN, || healthy(port))
            .await
    }
}

/// Three `etcd` members forming one cluster on `127.0.0.1`, stopped on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<EtcdServer>,
}

impl EtcdCluster {
    /// How many members [`start`](Self::start) runs.
    pub const MEMBERS: usize = 3;

    /// Starts three members and waits until each reports a leader.
    pub async fn start() -> Result<Self> {
        Ok(Self {
            members: start_members(Self::MEMBERS).await?,
        })
    }

    /// The members, in `--name` order (`m0`, `m1`, `m2`).
    pub fn members(&self) -> &[EtcdServer] {
        &self.members
    }

    /// One member, to pause, kill or restart (with its data) on its own.
    pub fn member_mut(&mut self, index: usize) -> &mut EtcdServer {
        &mut self.members[index]
    }

    /// The index of the member that reports itself leader, if any.
    pub async fn leader(&self) -> Option<usize> {
        for (index, member) in self.members.iter().enumerate() {
            if member.is_leader().await == Some(true) {
                return Some(index);
            }
        }
        None
    }

    /// `etcd://127.0.0.1:A,127.0.0.1:B,127.0.0.1:C`
    pub fn url(&self) -> String {
        let endpoints: Vec<String> = self
            .members
            .iter()
            .map(|m| m.process.addr().to_string())
            .collect();
        format!("etcd://{}", endpoints.join(","))
    }

    /// Stops every member, wipes all data unless `keep_data` (a new cluster with
    /// the same members and ports), starts them all and waits until each answers.
    pub async fn restart(&mut self, keep_data: bool) -> Result<()> {
        // Leader first: it hands over at once. Stopped last, with no followers left,
        // it can spend seconds trying to hand over.
        let leader = self.leader().await;
        let followers = (0..self.members.len()).filter(|&i| Some(i) != leader);
        for index in leader.into_iter().chain(followers) {
            let member = &mut self.members[index];
            member.process.stop().await?;
            if !keep_data {
                wipe(&member.data, None)?;
            }
        }
        // All before waiting: a lone member has no quorum.
        for member in &mut self.members {
            member
                .process
                .note_in_log("restarting with the whole cluster");
            member.process.respawn()?;
        }
        for member in &mut self.members {
            let port = member.process.port();
            member
                .process
                .wait_ready(READY_WITHIN, || healthy(port))
                .await?;
        }
        Ok(())
    }
}

async fn start_members(count: usize) -> Result<Vec<EtcdServer>> {
    let program = find_binary("etcd")?;
    let dirs = (0..count)
        .map(|_| temp_dir("etcd", None))
        .collect::<Result<Vec<_>>>()?;
    let processes = on_free_ports(2 * count, |ports| {
        let (client, peer) = ports.split_at(count);
        let initial_cluster: Vec<String> = peer
            .iter()
            .enumerate()
            .map(|(i, port)| format!("m{i}=http://127.0.0.1:{port}"))
            .collect();
        let launches: Result<Vec<(Launch, u16)>> = dirs
            .iter()
            .enumerate()
            .map(|(i, dir)| {
                // A failed attempt may have left a cluster on other ports in it.
                wipe(&dir.path().join("data"), None)?;
                let member = Member {
                    index: i,
                    client: client[i],
                    peer: peer[i],
                    initial_cluster: initial_cluster.join(","),
                    token: format!("fencelock-{}", client[0]),
                };
                Ok((member.launch(&program, dir.path()), client[i]))
            })
            .collect();
        async move {
            let mut processes = launches?
                .into_iter()
                .map(|(launch, port)| ServerProcess::spawn(launch, port))
                .collect::<Result<Vec<_>>>()?;
            for process in &mut processes {
                let port = process.port();
                process.wait_ready(READY_WITHIN, || healthy(port)).await?;
            }
            Ok(processes)
        }
    })
    .await?;
    Ok(processes
        .into_iter()
        .zip(dirs)
        .map(|(process, dir)| EtcdServer {
            process,
            data: dir.path().join("data"),
            cluster_size: count,
            _dir: dir,
        })
        .collect())
}

struct Member {
    index: usize,
    client: u16,
    peer: u16,
    initial_cluster: String,
    token: String,
}

impl Member {
    fn launch(&self, program: &Path, dir: &Path) -> Launch {
        let client_url = format!("http://127.0.0.1:{}", self.client);
        let peer_url = format!("http://127.0.0.1:{}", self.peer);
        let name = format!("m{}", self.index);
        Launch::new(
            format!("etcd member {name} on 127.0.0.1:{}", self.client),
            program,
            dir,
        )
        .args(["--name", &name, "--data-dir"])
        .arg(dir.join("data"))
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &self.initial_cluster])
        .args(["--initial-cluster-state", "new"])
        .args(["--initial-cluster-token", &self.token])
        .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
        .args(["--logger", "zap", "--log-outputs", "stderr"])
    }
}

async fn healthy(port: u16) -> bool {
    let request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    ask(port, request)
        .await
        .is_some_and(|reply| reply.contains(r#""health":"true""#))
}

/// The string value of `key` in a flat JSON reply (etcd writes ids as strings).
fn json_string<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let quoted_key = format!("\"{key}\":\"");
    let start = json.find(&quoted_key)? + quoted_key.len();
    json[start..].split('"').next()
}
