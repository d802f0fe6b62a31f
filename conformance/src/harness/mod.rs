//! Real servers for the suite: each handle starts one server from `PATH` on a free
//! `127.0.0.1` port in a fresh temp dir, waits until it answers, owns its pid, and
//! stops it when dropped (also on panic).
//!
//! Starting and restarting are `async` (they wait, with bounded loops, until the
//! server answers); signals (`pause`, `resume`, `kill`) and `Drop` are synchronous.
//! Every handle implements [`Server`], so fault tests can be written once:
//!
//! ```no_run
//! use fencelock_conformance::harness::{RedisServer, Server};
//!
//! # async fn demo() -> fencelock_conformance::harness::Result<()> {
//! let mut redis = RedisServer::start().await?;
//! println!("connect to {}", redis.url());
//! redis.pause()?; // SIGSTOP: clients time out
//! redis.resume()?; // SIGCONT
//! redis.restart(false).await?; // same port, data wiped
//! # Ok(())
//! # }
//! ```
//!
//! A missing binary is an error naming `scripts/install-stores.sh`.

mod etcd;
mod mariadb;
mod pgbouncer;
mod postgres;
mod process;
mod redis;
mod zookeeper;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;

pub use etcd::{EtcdCluster, EtcdServer};
pub use mariadb::MariaDb;
pub use pgbouncer::PgBouncer;
pub use postgres::Postgres;
pub use process::ServerProcess;
pub use redis::{RedisPersistence, RedisServer, RedisTlsFiles, TlsClients};
pub use zookeeper::{ZooKeeper, ZooKeeperEnsemble};

/// The result of harness operations.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// Why a harness operation failed; its message says what to do next.
#[derive(Debug)]
#[non_exhaustive]
pub enum HarnessError {
    /// A server binary or jar is not installed.
    Missing {
        /// What was looked for, e.g. `redis-server`.
        what: String,
        /// Where it was looked for.
        looked_in: String,
    },
    /// A server exited or did not answer in time.
    Start {
        /// Which server, e.g. `redis-server on 127.0.0.1:6390`.
        server: String,
        /// What went wrong.
        reason: String,
        /// The last lines of the server's log.
        log_tail: String,
    },
    /// A file, process or signal operation failed.
    Io {
        /// What the harness was doing.
        action: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The operation does not apply to this server.
    Unsupported(String),
}

impl HarnessError {
    pub(crate) fn io(action: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        Self::Io {
            action: action.into(),
            source: source.into(),
        }
    }

    /// Another process took the port between picking it and the server binding it.
    pub(crate) fn is_port_clash(&self) -> bool {
        matches!(self, Self::Start { log_tail, .. }
            if log_tail.to_ascii_lowercase().contains("address already in use"))
    }
}

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing { what, looked_in } => write!(
                f,
                "{what} is not installed (looked in {looked_in}); \
                 install the test servers with `scripts/install-stores.sh`"
            ),
            Self::Start {
                server,
                reason,
                log_tail,
            } => write!(
                f,
                "{server} {reason}\n--- last lines of its log ---\n{log_tail}"
            ),
            Self::Io { action, source } => write!(f, "could not {action}: {source}"),
            Self::Unsupported(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for HarnessError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A running server owned by this process: its address, its URL for fencelock, and
/// the fault tools a test applies to it.
pub trait Server {
    /// The server's process.
    fn process(&self) -> &ServerProcess;

    /// The server's process, mutably (to kill it).
    fn process_mut(&mut self) -> &mut ServerProcess;

    /// The URL a fencelock store connects with (see DESIGN.md "URLs").
    fn url(&self) -> String;

    /// Stops the server (SIGTERM-like, bounded, then SIGKILL; a killed server is just
    /// started), wipes its data unless `keep_data`, starts it again on the same port
    /// and waits until it answers. A server without persistence comes back empty
    /// either way.
    fn restart(&mut self, keep_data: bool) -> impl Future<Output = Result<()>> + Send;

    /// `127.0.0.1:port`.
    fn addr(&self) -> SocketAddr {
        self.process().addr()
    }

    /// The loopback port clients connect to; it survives restarts.
    fn port(&self) -> u16 {
        self.process().port()
    }

    /// The server's pid, or `None` after [`kill`](Server::kill).
    fn pid(&self) -> Option<u32> {
        self.process().pid()
    }

    /// Freezes the server with SIGSTOP: connections stay open, nothing is answered.
    fn pause(&self) -> Result<()> {
        self.process().pause()
    }

    /// Thaws a paused server with SIGCONT.
    fn resume(&self) -> Result<()> {
        self.process().resume()
    }

    /// Kills the server with SIGKILL and reaps it; start it again with `restart`.
    fn kill(&mut self) -> Result<()> {
        self.process_mut().kill()
    }

    /// The last lines of the server's log, for failure messages.
    fn log_tail(&self) -> String {
        self.process().log_tail()
    }
}
