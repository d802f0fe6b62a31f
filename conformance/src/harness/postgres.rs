//! Postgres: `initdb` into a fresh data dir, then `postgres`, never as root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use tempfile::TempDir;

use super::process::{
    Launch, RunAs, ServerProcess, find_binary, on_free_ports, succeeds, temp_dir, wipe,
};
use super::{HarnessError, Result, Server};

const INITDB_WITHIN: Duration = Duration::from_secs(60);
const READY_WITHIN: Duration = Duration::from_secs(30);
/// What a new server logs when the killed one's backends still hold its shared memory.
const SHARED_MEMORY_IN_USE: &str = "pre-existing shared memory block";
/// Restarts tried while that lasts, and the pause between them.
const RESTART_ATTEMPTS: u32 = 25;
const RESTART_PAUSE: Duration = Duration::from_millis(200);

/// A `postgres` on `127.0.0.1` with `trust` auth for user `postgres`, stopped on drop.
///
/// Runs as the `postgres` system user when we are root (Postgres refuses root).
/// `initdb -U postgres -A trust -E UTF8 --locale=C --no-sync`, then `postgres -D
/// <tmp>/data -p P -h 127.0.0.1 -k <tmp> -c fsync=off -c full_page_writes=off -c
/// shared_buffers=32MB -c max_connections=200 -c dynamic_shared_memory_type=mmap -c
/// shared_preload_libraries=pg_stat_statements`:
/// commits survive a killed server, not a lost machine. A restart stops it with
/// SIGINT (fast shutdown); drop sends SIGQUIT first so it frees its shared memory.
#[derive(Debug)]
pub struct Postgres {
    process: ServerProcess,
    initdb: Launch,
    ready: PathBuf,
    data: PathBuf,
    run_as: Option<RunAs>,
    _dir: TempDir,
}

impl Postgres {
    /// Runs `initdb`, starts the server and waits until it accepts connections.
    pub async fn start() -> Result<Self> {
        let server = find_binary("postgres")?;
        let ready = find_binary("pg_isready")?;
        let run_as = RunAs::system_user_if_root("postgres")?;
        let dir = temp_dir("postgres", run_as)?;
        let data = dir.path().join("data");
        wipe(&data, run_as)?;
        let initdb = initdb(dir.path(), &data, run_as)?;
        initdb.run_once(INITDB_WITHIN).await?;
        let process = on_free_ports(1, |ports| {
            let port = ports[0];
            let launch = launch(&server, dir.path(), &data, port, run_as);
            let ready = &ready;
            async move {
                let mut process = ServerProcess::spawn(launch, port)?;
                process
                    .wait_ready(READY_WITHIN, || answers(ready, port))
                    .await?;
                Ok(process)
            }
        })
        .await?;
        Ok(Self {
            process,
            initdb,
            ready,
            data,
            run_as,
            _dir: dir,
        })
    }
}

impl Server for Postgres {
    fn process(&self) -> &ServerProcess {
        &self.process
    }

    fn process_mut(&mut self) -> &mut ServerProcess {
        &mut self.process
    }

    /// `postgres://postgres@127.0.0.1:P/postgres`
    fn url(&self) -> String {
        format!("postgres://postgres@{}/postgres", self.process.addr())
    }

    async fn restart(&mut self, keep_data: bool) -> Result<()> {
        self.process.stop().await?;
        if !keep_data {
            wipe(&self.data, self.run_as)?;
            self.initdb.run_once(INITDB_WITHIN).await?;
        }
        let (ready, port) = (&self.ready, self.process.port());
        let mut attempt = 1;
        loop {
            match self
                .process
                .start_again(READY_WITHIN, || answers(ready, port))
                .await
            {
                // Backends of a server killed with SIGKILL may not have exited yet
                // (the kernel ends them after the postmaster was reaped): their shared
                // memory is still attached, and the new server refuses to start.
                Err(HarnessError::Start { log_tail, .. })
                    if log_tail.contains(SHARED_MEMORY_IN_USE) && attempt < RESTART_ATTEMPTS =>
                {
                    attempt += 1;
                    tokio::time::sleep(RESTART_PAUSE).await;
                }
                result => return result,
            }
        }
    }
}

fn initdb(dir: &Path, data: &Path, run_as: Option<RunAs>) -> Result<Launch> {
    let program = find_binary("initdb")?;
    Ok(Launch::new("initdb".into(), &program, dir)
        .arg("-D")
        .arg(data)
        .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
        .arg("--no-sync")
        .run_as(run_as))
}

fn launch(program: &Path, dir: &Path, data: &Path, port: u16, run_as: Option<RunAs>) -> Launch {
    let settings = [
        "fsync=off",
        "full_page_writes=off",
        "shared_buffers=32MB",
        "max_connections=200",
        // In the data dir, not /dev/shm: nothing outlives a killed server.
        "dynamic_shared_memory_type=mmap",
        // Statement counts per role for tests (`CREATE EXTENSION pg_stat_statements`
        // to read them); contrib ships with Debian's server package.
        "shared_preload_libraries=pg_stat_statements",
    ];
    let mut launch = Launch::new(format!("postgres on 127.0.0.1:{port}"), program, dir)
        .arg("-D")
        .arg(data)
        .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k"])
        .arg(dir);
    for setting in settings {
        launch = launch.args(["-c", setting]);
    }
    launch
        .run_as(run_as)
        .stop_with(Signal::SIGINT)
        .drop_with(Signal::SIGQUIT)
}

pub(super) async fn answers(pg_isready: &Path, port: u16) -> bool {
    let port = port.to_string();
    let args = [
        "-q",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-U",
        "postgres",
        "-t",
        "2",
    ];
    succeeds(pg_isready, &args).await
}
