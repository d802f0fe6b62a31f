//! PgBouncer in transaction pooling mode in front of a harness [`Postgres`], for
//! tests of what a session-mode client does behind such a proxy.

use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;

use super::postgres::answers;
use super::process::{
    Launch, RunAs, ServerProcess, find_binary, on_free_ports, temp_dir, write_file,
};
use super::{Postgres, Result, Server};

const READY_WITHIN: Duration = Duration::from_secs(30);

/// A `pgbouncer` on `127.0.0.1` with `pool_mode = transaction` in front of one
/// [`Postgres`] (database `postgres`, user `postgres`, no authentication), stopped on
/// drop.
///
/// Runs as the `postgres` system user when we are root (PgBouncer refuses root). Each
/// client connection gets a server connection only for one transaction (or one
/// statement outside a transaction), so a client's statements may run in different
/// server sessions: the setup a session-mode lock must refuse.
#[derive(Debug)]
pub struct PgBouncer {
    process: ServerProcess,
    ready: std::path::PathBuf,
    _dir: TempDir,
}

impl PgBouncer {
    /// Writes the config into a fresh temp dir, starts `pgbouncer` on a free port in
    /// front of `upstream` and waits until it accepts connections.
    pub async fn start_transaction_pooling(upstream: &Postgres) -> Result<Self> {
        let program = find_binary("pgbouncer")?;
        let ready = find_binary("pg_isready")?;
        let run_as = RunAs::system_user_if_root("postgres")?;
        let dir = temp_dir("pgbouncer", run_as)?;
        let upstream_port = upstream.port();
        let process = on_free_ports(1, |ports| {
            let port = ports[0];
            let launch = config(dir.path(), port, upstream_port).map(|config| {
                Launch::new(
                    format!("pgbouncer on 127.0.0.1:{port}"),
                    &program,
                    dir.path(),
                )
                .arg(config)
                .run_as(run_as)
            });
            let ready = &ready;
            async move {
                let mut process = ServerProcess::spawn(launch?, port)?;
                process
                    .wait_ready(READY_WITHIN, || answers(ready, port))
                    .await?;
                Ok(process)
            }
        })
        .await?;
        Ok(Self {
            process,
            ready,
            _dir: dir,
        })
    }
}

/// Writes `pgbouncer.ini` for `port` in front of `upstream_port`; returns its path.
fn config(dir: &Path, port: u16, upstream_port: u16) -> Result<std::path::PathBuf> {
    let path = dir.join("pgbouncer.ini");
    // `auth_type = any`: no password, every client logs in as the database line's
    // user. sqlx sends `extra_float_digits`, which PgBouncer must be told to ignore.
    let contents = format!(
        "[databases]
postgres = host=127.0.0.1 port={upstream_port} dbname=postgres user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = 8
max_client_conn = 200
server_round_robin = 0
ignore_startup_parameters = extra_float_digits,search_path,options
"
    );
    write_file(&path, &contents)?;
    Ok(path)
}

impl Server for PgBouncer {
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

    /// Restarts the proxy (it keeps no data); the Postgres behind it is untouched.
    async fn restart(&mut self, _keep_data: bool) -> Result<()> {
        self.process.stop().await?;
        let (ready, port) = (&self.ready, self.process.port());
        self.process
            .start_again(READY_WITHIN, || answers(ready, port))
            .await
    }
}
