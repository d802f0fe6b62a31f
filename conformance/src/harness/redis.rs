//! `redis-server`: one node, or N independent nodes for Redlock.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use super::process::{Launch, ServerProcess, ask, find_binary, on_free_ports, temp_dir, wipe};
use super::{Result, Server};

const READY_WITHIN: Duration = Duration::from_secs(10);

/// Whether a Redis server keeps its data across restarts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RedisPersistence {
    /// No snapshots, no append-only file: every restart starts empty.
    #[default]
    None,
    /// An append-only file (`appendfsync everysec`): a restart with `keep_data`
    /// keeps every acknowledged write.
    AppendOnly,
}

/// A `redis-server` on `127.0.0.1`, stopped on drop.
///
/// Started as `redis-server --port P --bind 127.0.0.1 --dir <tmp>/data --save ""
/// --appendonly yes|no --appendfsync everysec --protected-mode no
/// --enable-debug-command local` (so tests may use `DEBUG SLEEP`).
#[derive(Debug)]
pub struct RedisServer {
    process: ServerProcess,
    data: PathBuf,
    _dir: TempDir,
}

impl RedisServer {
    /// Starts a server without persistence.
    pub async fn start() -> Result<Self> {
        Self::start_with(RedisPersistence::None).await
    }

    /// Starts a server with the given persistence.
    pub async fn start_with(persistence: RedisPersistence) -> Result<Self> {
        let program = find_binary("redis-server")?;
        let dir = temp_dir("redis", None)?;
        let data = dir.path().join("data");
        wipe(&data, None)?;
        let process = on_free_ports(1, |ports| {
            let port = ports[0];
            let launch = launch(&program, dir.path(), &data, port, persistence);
            async move {
                let mut process = ServerProcess::spawn(launch, port)?;
                process.wait_ready(READY_WITHIN, || answers(port)).await?;
                Ok(process)
            }
        })
        .await?;
        Ok(Self {
            process,
            data,
            _dir: dir,
        })
    }

    /// Starts `count` independent servers (Redlock nodes), one after another.
    pub async fn start_many(count: usize, persistence: RedisPersistence) -> Result<Vec<Self>> {
        let mut servers = Vec::with_capacity(count);
        for _ in 0..count {
            servers.push(Self::start_with(persistence).await?);
        }
        Ok(servers)
    }
}

impl Server for RedisServer {
    fn process(&self) -> &ServerProcess {
        &self.process
    }

    fn process_mut(&mut self) -> &mut ServerProcess {
        &mut self.process
    }

    /// `redis://127.0.0.1:P/`
    fn url(&self) -> String {
        format!("redis://{}/", self.process.addr())
    }

    async fn restart(&mut self, keep_data: bool) -> Result<()> {
        self.process.stop().await?;
        if !keep_data {
            wipe(&self.data, None)?;
        }
        let port = self.process.port();
        self.process
            .start_again(READY_WITHIN, || answers(port))
            .await
    }
}

fn launch(
    program: &Path,
    dir: &Path,
    data: &Path,
    port: u16,
    persistence: RedisPersistence,
) -> Launch {
    let append_only = match persistence {
        RedisPersistence::None => "no",
        RedisPersistence::AppendOnly => "yes",
    };
    let port = port.to_string();
    Launch::new(format!("redis-server on 127.0.0.1:{port}"), program, dir)
        .args(["--port", &port, "--bind", "127.0.0.1", "--dir"])
        .arg(data)
        .args(["--save", "", "--appendonly", append_only])
        .args(["--appendfsync", "everysec", "--protected-mode", "no"])
        .args(["--enable-debug-command", "local"])
}

async fn answers(port: u16) -> bool {
    ask(port, b"PING\r\nQUIT\r\n")
        .await
        .is_some_and(|reply| reply.starts_with("+PONG"))
}
