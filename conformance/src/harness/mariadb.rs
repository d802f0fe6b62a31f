//! MariaDB: `mariadb-install-db` into a fresh datadir, then `mariadbd`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use super::process::{
    Launch, RunAs, ServerProcess, find_binary, on_free_ports, succeeds, temp_dir, wipe,
};
use super::{Result, Server};

const INSTALL_WITHIN: Duration = Duration::from_secs(60);
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A `mariadbd` on `127.0.0.1` with a database [`DATABASE`](Self::DATABASE), stopped
/// on drop.
///
/// `root` has no password (`mariadb-install-db --auth-root-authentication-method=normal`)
/// and may connect over TCP from `127.0.0.1`. Runs as the `mysql` user when we are
/// root. Started as `mariadbd --no-defaults --datadir=<tmp>/data --port=P
/// --bind-address=127.0.0.1 --socket=<tmp>/mysqld.sock --skip-name-resolve
/// --innodb-buffer-pool-size=32M --innodb-flush-log-at-trx-commit=2
/// --max-connections=500`; commits survive a killed server, not a lost machine.
#[derive(Debug)]
pub struct MariaDb {
    process: ServerProcess,
    install: Launch,
    client: PathBuf,
    data: PathBuf,
    run_as: Option<RunAs>,
    _dir: TempDir,
}

impl MariaDb {
    /// The database created for tests.
    pub const DATABASE: &str = "fencelock";

    /// Installs a fresh datadir, starts the server and creates [`DATABASE`](Self::DATABASE).
    pub async fn start() -> Result<Self> {
        let server = find_binary("mariadbd")?;
        let client = find_binary("mariadb").or_else(|_| find_binary("mysql"))?;
        let run_as = RunAs::system_user_if_root("mysql")?;
        let dir = temp_dir("mariadb", run_as)?;
        let data = dir.path().join("data");
        wipe(&data, run_as)?;
        let install = install(dir.path(), &data, run_as)?;
        install.run_once(INSTALL_WITHIN).await?;
        let process = on_free_ports(1, |ports| {
            let port = ports[0];
            let launch = launch(&server, dir.path(), &data, port, run_as);
            let client = &client;
            async move {
                let mut process = ServerProcess::spawn(launch, port)?;
                process
                    .wait_ready(READY_WITHIN, || answers(client, port))
                    .await?;
                Ok(process)
            }
        })
        .await?;
        Ok(Self {
            process,
            install,
            client,
            data,
            run_as,
            _dir: dir,
        })
    }
}

impl Server for MariaDb {
    fn process(&self) -> &ServerProcess {
        &self.process
    }

    fn process_mut(&mut self) -> &mut ServerProcess {
        &mut self.process
    }

    /// `mysql://root@127.0.0.1:P/fencelock`
    fn url(&self) -> String {
        format!("mysql://root@{}/{}", self.process.addr(), Self::DATABASE)
    }

    async fn restart(&mut self, keep_data: bool) -> Result<()> {
        self.process.stop().await?;
        if !keep_data {
            wipe(&self.data, self.run_as)?;
            self.install.run_once(INSTALL_WITHIN).await?;
        }
        let (client, port) = (&self.client, self.process.port());
        self.process
            .start_again(READY_WITHIN, || answers(client, port))
            .await
    }
}

fn install(dir: &Path, data: &Path, run_as: Option<RunAs>) -> Result<Launch> {
    let program = find_binary("mariadb-install-db")?;
    let datadir = format!("--datadir={}", data.display());
    Ok(Launch::new("mariadb-install-db".into(), &program, dir)
        .args(["--no-defaults", &datadir, "--skip-test-db"])
        .args(["--auth-root-authentication-method=normal"])
        .run_as(run_as))
}

fn launch(program: &Path, dir: &Path, data: &Path, port: u16, run_as: Option<RunAs>) -> Launch {
    Launch::new(format!("mariadbd on 127.0.0.1:{port}"), program, dir)
        .args(["--no-defaults", &format!("--datadir={}", data.display())])
        .arg(format!("--port={port}"))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--socket={}", dir.join("mysqld.sock").display()))
        .arg(format!("--pid-file={}", dir.join("mysqld.pid").display()))
        .args(["--skip-name-resolve", "--innodb-buffer-pool-size=32M"])
        .args([
            "--innodb-flush-log-at-trx-commit=2",
            "--max-connections=500",
        ])
        .run_as(run_as)
}

/// Answers over TCP as `root`, and the test database exists.
async fn answers(client: &Path, port: u16) -> bool {
    let create = format!("CREATE DATABASE IF NOT EXISTS {}", MariaDb::DATABASE);
    let port = port.to_string();
    let args = [
        "--no-defaults",
        "--protocol=TCP",
        "-h",
        "127.0.0.1",
        "-P",
        &port,
        "-u",
        "root",
        "--connect-timeout=2",
        "-e",
        &create,
    ];
    succeeds(client, &args).await
}
