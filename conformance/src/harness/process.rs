//! One server child process owned by pid, plus what every server shares: finding
//! binaries, free loopback ports, temp dirs, the service user, and bounded waits.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Gid, Pid, Uid, User, chown};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{HarnessError, Result};

/// How often wait loops poll.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// How long one readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a clean stop may take before the process group is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// How long a server with a drop signal may take to clean up on drop.
const DROP_GRACE: Duration = Duration::from_secs(5);
/// Start attempts when the port was taken between picking it and the server binding it.
const PORT_ATTEMPTS: u32 = 3;
/// Lines of log shown in failure messages.
const LOG_TAIL_LINES: usize = 40;

/// How to start, stop and drop one server process.
#[derive(Debug)]
pub(crate) struct Launch {
    /// Shown in errors, e.g. `redis-server on 127.0.0.1:6390`.
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    /// Working directory; also holds `server.log` (stdout and stderr, appended).
    dir: PathBuf,
    run_as: Option<RunAs>,
    stop_signal: Signal,
    drop_signal: Option<Signal>,
}

impl Launch {
    /// Runs `program` in `dir` as ourselves, stopped with SIGTERM and killed on drop.
    pub(crate) fn new(name: String, program: &Path, dir: &Path) -> Self {
        Self {
            name,
            program: program.to_owned(),
            args: Vec::new(),
            dir: dir.to_owned(),
            run_as: None,
            stop_signal: Signal::SIGTERM,
            drop_signal: None,
        }
    }

    pub(crate) fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub(crate) fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub(crate) fn run_as(mut self, user: Option<RunAs>) -> Self {
        self.run_as = user;
        self
    }

    /// The signal for a clean stop (before a restart).
    pub(crate) fn stop_with(mut self, signal: Signal) -> Self {
        self.stop_signal = signal;
        self
    }

    /// A signal sent on drop before SIGKILL, for servers that leave state outside
    /// their temp dir when killed (Postgres's shared memory).
    pub(crate) fn drop_with(mut self, signal: Signal) -> Self {
        self.drop_signal = Some(signal);
        self
    }

    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// In its own process group, so signals reach every process the server forks.
    /// Killed with SIGKILL if this process dies without unwinding, where `setpriv`
    /// (util-linux) is installed.
    fn command(&self) -> Result<Command> {
        let log_path = self.log();
        let open_log = || {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| HarnessError::io(format!("open {}", log_path.display()), e))
        };
        // setpriv execs the server in place (same pid) after arranging that it gets
        // SIGKILL if we die without unwinding (Ctrl-C, a killed test binary).
        let mut command = match find_binary("setpriv") {
            Ok(setpriv) => {
                let mut command = Command::new(setpriv);
                command
                    .args(["--pdeathsig", "KILL", "--"])
                    .arg(&self.program);
                command
            }
            Err(_) => Command::new(&self.program),
        };
        command
            .args(&self.args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(open_log()?)
            .stderr(open_log()?)
            .process_group(0);
        if let Some(user) = self.run_as {
            command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        Ok(command)
    }

    fn failed(&self, reason: String, log_from: u64) -> HarnessError {
        HarnessError::Start {
            server: self.name.clone(),
            reason,
            log_tail: tail(&self.log(), log_from),
        }
    }

    /// Runs a one-shot setup command (`initdb`, `mariadb-install-db`) to completion.
    pub(crate) async fn run_once(&self, within: Duration) -> Result<()> {
        let log_from = log_len(&self.log());
        let mut child = tokio::process::Command::from(self.command()?)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| HarnessError::io(format!("run {}", self.program.display()), e))?;
        match tokio::time::timeout(within, child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(self.failed(format!("failed: {status}"), log_from)),
            Ok(Err(e)) => Err(HarnessError::io(format!("wait for {}", self.name), e)),
            Err(_) => {
                if let Some(pid) = child.id() {
                    let _ = killpg(pid_of(pid), Signal::SIGKILL);
                }
                let _ = child.wait().await;
                Err(self.failed(format!("did not finish within {within:?}"), log_from))
            }
        }
    }
}

/// A server child process owned by pid: signalled as a process group, killed and
/// reaped on drop.
#[derive(Debug)]
pub struct ServerProcess {
    launch: Launch,
    port: u16,
    child: Option<Child>,
    /// Length of the log when the current child started; errors show only its lines.
    log_from: u64,
}

impl ServerProcess {
    /// Starts `launch`, which listens on `port`; call [`wait_ready`](Self::wait_ready) next.
    pub(crate) fn spawn(launch: Launch, port: u16) -> Result<Self> {
        let mut process = Self {
            launch,
            port,
            child: None,
            log_from: 0,
        };
        process.respawn()?;
        Ok(process)
    }

    /// Starts the stopped server again; call [`wait_ready`](Self::wait_ready) next.
    pub(crate) fn respawn(&mut self) -> Result<()> {
        debug_assert!(self.child.is_none(), "respawn of a running server");
        self.log_from = log_len(&self.launch.log());
        let child = spawn_for_life(self.launch.command()?)
            .map_err(|e| HarnessError::io(format!("start {}", self.launch.program.display()), e))?;
        tracing::debug!(server = %self.launch.name, pid = child.id(), "started");
        self.child = Some(child);
        Ok(())
    }

    /// The loopback port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.port).into()
    }

    /// The pid of the server (its process group leader), `None` once killed.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGSTOP to the server's process group.
    pub fn pause(&self) -> Result<()> {
        self.signal_group(Signal::SIGSTOP)
    }

    /// SIGCONT to the server's process group.
    pub fn resume(&self) -> Result<()> {
        self.signal_group(Signal::SIGCONT)
    }

    /// SIGKILL to the server's process group, then reaps the server. Does nothing
    /// if it is not running.
    pub fn kill(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // Before reaping, so the group id cannot have been reused.
        let _ = killpg(pid_of(child.id()), Signal::SIGKILL);
        child
            .wait()
            .map_err(|e| HarnessError::io(format!("reap {}", self.launch.name), e))?;
        Ok(())
    }

    /// The last lines of the server's log (all its runs).
    pub fn log_tail(&self) -> String {
        tail(&self.launch.log(), 0)
    }

    fn signal_group(&self, signal: Signal) -> Result<()> {
        let pid = self.pid().ok_or_else(|| {
            HarnessError::Unsupported(format!(
                "{} is not running (killed); restart it before sending {signal}",
                self.launch.name
            ))
        })?;
        killpg(pid_of(pid), signal)
            .map_err(|e| HarnessError::io(format!("send {signal} to {}", self.launch.name), e))
    }

    /// Whether the child has exited; reaps it if so.
    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(None) => None,
            Ok(Some(status)) => {
                self.child = None;
                Some(status.to_string())
            }
            // Treated as running: callers time out, then kill.
            Err(_) => None,
        }
    }

    /// Polls `answers` until it returns true, the server exits, or `within` passes.
    pub(crate) async fn wait_ready<F, Fut>(
        &mut self,
        within: Duration,
        mut answers: F,
    ) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + within;
        let attempts = within.as_millis() / POLL_EVERY.as_millis() + 1;
        for _ in 0..attempts {
            if self.child.is_none() {
                return Err(self.failed("is not running".into()));
            }
            if let Some(status) = self.exited() {
                return Err(self.failed(format!("exited ({status}) before answering")));
            }
            if let Ok(true) = tokio::time::timeout(PROBE_TIMEOUT, answers()).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        Err(self.failed(format!("did not answer within {within:?}")))
    }

    /// Stops the server with its stop signal; kills it if it is still up after a
    /// bounded grace period. Does nothing if it is not running.
    pub(crate) async fn stop(&mut self) -> Result<()> {
        let Some(pid) = self.pid().map(pid_of) else {
            return Ok(());
        };
        let _ = kill(pid, self.launch.stop_signal);
        // A paused server must run to handle the stop signal.
        let _ = killpg(pid, Signal::SIGCONT);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(server = %self.launch.name, "did not stop within {STOP_GRACE:?}; killing it");
        self.kill()
    }

    /// Starts the stopped server again on the same port and waits until it answers.
    /// Retries (bounded) if something else holds the port meanwhile.
    pub(crate) async fn start_again<F, Fut>(
        &mut self,
        within: Duration,
        mut answers: F,
    ) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        self.note_in_log("restarting");
        let mut attempt = 1;
        loop {
            self.respawn()?;
            match self.wait_ready(within, &mut answers).await {
                Err(e) if e.is_port_clash() && attempt < PORT_ATTEMPTS => {
                    tracing::warn!(%e, "port {} is taken; retrying", self.port);
                    self.kill()?;
                    attempt += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                result => return result,
            }
        }
    }

    pub(crate) fn note_in_log(&self, what: &str) {
        use std::io::Write;
        if let Ok(mut log) = OpenOptions::new().append(true).open(self.launch.log()) {
            let _ = writeln!(log, "=== fencelock harness: {what} ===");
        }
    }

    fn failed(&self, reason: String) -> HarnessError {
        self.launch.failed(reason, self.log_from)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let (Some(signal), Some(pid)) = (self.launch.drop_signal, self.pid()) {
            let _ = kill(pid_of(pid), signal);
            let _ = killpg(pid_of(pid), Signal::SIGCONT);
            let deadline = Instant::now() + DROP_GRACE;
            while Instant::now() < deadline && self.exited().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Err(e) = self.kill() {
            tracing::warn!(%e, "could not stop a server on drop");
        }
    }
}

/// Spawns from one thread that lives as long as this process: the parent-death
/// signal fires when the spawning *thread* exits, and a test's thread may end before
/// a server shared between tests.
fn spawn_for_life(command: Command) -> std::io::Result<Child> {
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("fencelock-harness-spawner".into())
            .spawn(move || {
                for (mut command, reply) in queue {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("start the harness's spawner thread");
        jobs
    });
    let gone = || std::io::Error::other("the harness's spawner thread is gone");
    let (reply, spawned) = mpsc::channel();
    spawner.send((command, reply)).map_err(|_| gone())?;
    spawned.recv().map_err(|_| gone())?
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).expect("pids fit in i32"))
}

/// Starts a server on `count` fresh free ports, picking new ones (bounded) if another
/// process took one before the server bound it.
pub(crate) async fn on_free_ports<T, F, Fut>(count: usize, mut start: F) -> Result<T>
where
    F: FnMut(Vec<u16>) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        match start(free_ports(count)?).await {
            Err(e) if e.is_port_clash() && attempt < PORT_ATTEMPTS => {
                tracing::warn!(%e, "a port was taken before the server bound it; retrying");
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Distinct free loopback ports: all bound at once on `127.0.0.1:0`, then released.
fn free_ports(count: usize) -> Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| HarnessError::io("pick a free loopback port", e))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| HarnessError::io("read a loopback port", e))
}

/// Finds a server binary in `PATH`, then in Debian's sbin and per-version Postgres
/// dirs (newest first).
pub(crate) fn find_binary(name: &str) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from));
    let mut postgres: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .collect();
    postgres.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    dirs.extend(postgres.into_iter().map(|(_, dir)| dir));
    dirs.iter()
        .map(|dir| dir.join(name))
        .find(|path| {
            fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| HarnessError::Missing {
            what: format!("`{name}`"),
            looked_in: "PATH, /usr/sbin, /usr/lib/postgresql/*/bin".into(),
        })
}

/// A fresh temp dir, owned by `user` if given.
pub(crate) fn temp_dir(server: &str, user: Option<RunAs>) -> Result<TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("fencelock-{server}-"))
        .tempdir()
        .map_err(|e| HarnessError::io("create a temp dir", e))?;
    give(dir.path(), user)?;
    Ok(dir)
}

/// Replaces `dir` with an empty one, owned by `user` if given.
pub(crate) fn wipe(dir: &Path, user: Option<RunAs>) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir)
            .map_err(|e| HarnessError::io(format!("wipe {}", dir.display()), e))?;
    }
    fs::create_dir(dir).map_err(|e| HarnessError::io(format!("create {}", dir.display()), e))?;
    give(dir, user)
}

/// Writes a config file.
pub(crate) fn write_file(path: &Path, contents: &str) -> Result<()> {
    fs::write(path, contents).map_err(|e| HarnessError::io(format!("write {}", path.display()), e))
}

fn give(path: &Path, user: Option<RunAs>) -> Result<()> {
    match user {
        Some(user) => chown(path, Some(user.uid), Some(user.gid))
            .map_err(|e| HarnessError::io(format!("chown {}", path.display()), e)),
        None => Ok(()),
    }
}

/// The user a database server runs as.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RunAs {
    uid: Uid,
    gid: Gid,
}

impl RunAs {
    /// The system user `name` when we are root (Postgres refuses to run as root, and
    /// MariaDB should not); `None` otherwise: the server runs as us.
    pub(crate) fn system_user_if_root(name: &str) -> Result<Option<Self>> {
        if !Uid::effective().is_root() {
            return Ok(None);
        }
        let user = User::from_name(name)
            .map_err(|e| HarnessError::io(format!("look up user `{name}`"), e))?
            .ok_or_else(|| {
                HarnessError::Unsupported(format!(
                    "running as root, but the system user `{name}` does not exist to run the \
                     server as; install the servers with `scripts/install-stores.sh` \
                     (the Debian packages create it) or run the tests as a normal user"
                ))
            })?;
        Ok(Some(Self {
            uid: user.uid,
            gid: user.gid,
        }))
    }
}

/// Sends `request` to `127.0.0.1:port` and returns what the server says before it
/// closes the connection; `None` if it does not within the probe timeout.
pub(crate) async fn ask(port: u16, request: &[u8]) -> Option<String> {
    let exchange = async {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.ok()?;
        stream.write_all(request).await.ok()?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.ok()?;
        Some(String::from_utf8_lossy(&reply).into_owned())
    };
    tokio::time::timeout(PROBE_TIMEOUT, exchange).await.ok()?
}

/// Whether a client command (`pg_isready`, `mariadb -e ...`) exits successfully.
pub(crate) async fn succeeds(program: &Path, args: &[&str]) -> bool {
    tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .is_ok_and(|status| status.success())
}

fn log_len(log: &Path) -> u64 {
    fs::metadata(log).map_or(0, |m| m.len())
}

/// The last lines of `log` from byte `from` on.
fn tail(log: &Path, from: u64) -> String {
    let Ok(bytes) = fs::read(log) else {
        return format!("(no log at {})", log.display());
    };
    let start = usize::try_from(from).unwrap_or(0).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[start..]);
    let lines: Vec<&str> = text.lines().collect();
    let shown = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    if shown.is_empty() {
        format!("(log {} is empty)", log.display())
    } else {
        shown.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_names_the_install_script() {
        //! Rule: a missing server binary fails with the command that installs it.
        let error = find_binary("fencelock-no-such-server").unwrap_err();
        assert!(matches!(error, HarnessError::Missing { .. }));
        let message = error.to_string();
        assert!(message.contains("fencelock-no-such-server"), "{message}");
        assert!(message.contains("scripts/install-stores.sh"), "{message}");
    }

    #[test]
    fn a_bind_failure_in_the_log_is_a_port_clash() {
        //! Rule: only "address already in use" in the server's log makes start retry on new ports.
        let failed = |log_tail: &str| HarnessError::Start {
            server: "redis-server on 127.0.0.1:1".into(),
            reason: "exited".into(),
            log_tail: log_tail.into(),
        };
        assert!(failed("bind: Address already in use").is_port_clash());
        assert!(!failed("FATAL: data directory has wrong ownership").is_port_clash());
    }

    #[test]
    fn free_ports_are_distinct() {
        //! Rule: ports picked together never collide (cluster members need distinct ports).
        let mut ports = free_ports(6).unwrap();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 6);
    }
}
