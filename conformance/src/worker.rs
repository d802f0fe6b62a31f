//! Drives the `fencelock-worker` binary: a lock holder in a process of its own, so a
//! test can pause (SIGSTOP), resume or kill it whole, watchdog included.
//!
//! # Protocol
//! The worker is started as `fencelock-worker HOLDER STORE_URL RESOURCE_PATH` and
//! answers `ready` (or `error MESSAGE`, then exits). Then it reads one command per line
//! on stdin and answers each with one line on stdout. Times are shared-clock
//! microseconds ([`micros_at`](crate::history::micros_at)).
//!
//! | command | answers |
//! |---|---|
//! | `acquire NAME TTL_MS WAIT_MS` (`0`: no wait) | `granted TOKEN REQUESTED GRANTED VALID_UNTIL`, `contended REQUESTED ENDED`, `timeout REQUESTED ENDED` |
//! | `write` (a fenced increment of the [`SharedResource`](crate::resource::SharedResource)) | `accepted TOKEN`, `refused TOKEN HIGHEST` |
//! | `state` | `held TOKEN VALID_UNTIL`, `lost TOKEN REASON`, `released`, `idle` |
//! | `hold MS` (hold for MS or until lost) | as `state` |
//! | `release` | `released TOKEN`, `lost TOKEN` |
//! | `quit` | `bye`, then it exits |
//!
//! Any command may answer `error MESSAGE`. `REASON` is `not-ours`, `expired`,
//! `max-hold`, `session-ended` or `other`.

use std::fmt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use fencelock_core::FencingToken;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::{Instant, timeout};

use crate::history::instant_at_micros;

/// How long a worker may take to start and connect, and to answer a command beyond
/// the time the command itself asks to wait.
const REPLY_LIMIT: Duration = Duration::from_secs(20);

/// Why talking to a worker failed.
#[derive(Debug)]
pub struct WorkerError {
    worker: String,
    problem: String,
}

impl fmt::Display for WorkerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker `{}`: {}", self.worker, self.problem)
    }
}

impl std::error::Error for WorkerError {}

/// `Result` with [`WorkerError`].
pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

/// A grant the worker received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The grant's token.
    pub token: FencingToken,
    /// When the worker sent the request.
    pub requested: Instant,
    /// When the worker got the guard.
    pub granted: Instant,
    /// The lease's validity as the worker computed it.
    pub valid_until: Instant,
}

/// The outcome of [`Worker::acquire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// Granted.
    Granted(Grant),
    /// Held by someone else and the worker did not wait.
    Contended {
        /// When the request was sent.
        requested: Instant,
        /// When it was refused.
        ended: Instant,
    },
    /// Still held by someone else when the wait ran out.
    TimedOut {
        /// When the request was sent.
        requested: Instant,
        /// When the worker gave up.
        ended: Instant,
    },
}

impl Acquired {
    /// The grant, if it was granted.
    pub fn grant(self) -> Option<Grant> {
        match self {
            Acquired::Granted(grant) => Some(grant),
            _ => None,
        }
    }
}

/// The outcome of [`Worker::write`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// The fence admitted the token; the counter was incremented.
    Accepted {
        /// The token written with.
        token: FencingToken,
    },
    /// The fence refused the token.
    Refused {
        /// The token written with.
        token: FencingToken,
        /// The highest token the fence had admitted.
        highest: FencingToken,
    },
}

/// What a worker says about its lock ([`Worker::state`], [`Worker::hold`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerState {
    /// It holds no lock and released none.
    Idle,
    /// It holds the lock, surely until `valid_until`.
    Held {
        /// The grant's token.
        token: FencingToken,
        /// The current validity (the watchdog extends it).
        valid_until: Instant,
    },
    /// Its lock was lost.
    Lost {
        /// The lost grant's token.
        token: FencingToken,
        /// Why, as a word (`not-ours`, `expired`, ...).
        reason: String,
    },
    /// It released its lock.
    Released,
}

/// The outcome of [`Worker::release`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Released {
    /// Released while still held.
    Released {
        /// The released grant's token.
        token: FencingToken,
    },
    /// It had been lost before the release.
    Lost {
        /// The lost grant's token.
        token: FencingToken,
    },
}

/// A running `fencelock-worker` process, owned by pid: killed (SIGKILL, which also
/// ends a paused worker) when dropped, also when a test panics.
///
/// Spawn workers from a task of the test's runtime, not from `spawn_blocking`: on
/// Linux a worker dies with the thread that started it.
#[derive(Debug)]
pub struct Worker {
    name: String,
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    /// Starts the worker binary at `program` (in this crate's integration tests:
    /// `env!("CARGO_BIN_EXE_fencelock-worker")`) as holder `name`, connected to
    /// `store_url` and writing to the shared resource at `resource`, and waits until it
    /// is ready.
    ///
    /// # Errors
    /// If the binary cannot be started, or the worker cannot connect or open the
    /// resource (its message says why).
    pub async fn spawn(
        program: &Path,
        name: &str,
        store_url: &str,
        resource: &Path,
    ) -> Result<Self> {
        let failed = |problem: String| WorkerError {
            worker: name.to_owned(),
            problem,
        };
        let mut child = Command::new(program)
            .arg(name)
            .arg(store_url)
            .arg(resource)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| failed(format!("cannot start {}: {err}", program.display())))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(failed("its stdin and stdout were not piped".into()));
        };
        let mut worker = Self {
            name: name.to_owned(),
            child,
            stdin,
            stdout: BufReader::new(stdout).lines(),
        };
        match worker.read_reply(REPLY_LIMIT).await?.as_slice() {
            [ready] if ready == "ready" => Ok(worker),
            other => Err(worker.unexpected("start", other)),
        }
    }

    /// The holder name it writes under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its pid, `None` once it was killed and reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Asks for the lock `lock` with `ttl`, waiting up to `wait` (zero: no wait).
    ///
    /// # Errors
    /// Store errors the worker reports, or a worker that does not answer in time.
    pub async fn acquire(&mut self, lock: &str, ttl: Duration, wait: Duration) -> Result<Acquired> {
        let command = format!("acquire {lock} {} {}", ttl.as_millis(), wait.as_millis());
        let words = self.ask(&command, wait).await?;
        let acquired = match words.as_slice() {
            [kind, token, requested, granted, valid_until] if kind == "granted" => {
                Acquired::Granted(Grant {
                    token: self.token(token)?,
                    requested: self.instant(requested)?,
                    granted: self.instant(granted)?,
                    valid_until: self.instant(valid_until)?,
                })
            }
            [kind, requested, ended] if kind == "contended" => Acquired::Contended {
                requested: self.instant(requested)?,
                ended: self.instant(ended)?,
            },
            [kind, requested, ended] if kind == "timeout" => Acquired::TimedOut {
                requested: self.instant(requested)?,
                ended: self.instant(ended)?,
            },
            other => return Err(self.unexpected(&command, other)),
        };
        Ok(acquired)
    }

    /// Increments the shared resource through its fence with the held lock's token.
    ///
    /// # Errors
    /// No lock held, store errors, or a worker that does not answer in time.
    pub async fn write(&mut self) -> Result<Written> {
        let words = self.ask("write", Duration::ZERO).await?;
        match words.as_slice() {
            [kind, token] if kind == "accepted" => Ok(Written::Accepted {
                token: self.token(token)?,
            }),
            [kind, token, highest] if kind == "refused" => Ok(Written::Refused {
                token: self.token(token)?,
                highest: self.token(highest)?,
            }),
            other => Err(self.unexpected("write", other)),
        }
    }

    /// What the worker knows about its lock now.
    ///
    /// # Errors
    /// A worker that does not answer in time (a paused one, say).
    pub async fn state(&mut self) -> Result<WorkerState> {
        let words = self.ask("state", Duration::ZERO).await?;
        self.parse_state("state", &words)
    }

    /// Lets the worker hold its lock for `duration` (its watchdog renewing it), or
    /// until it is lost, then reports its state.
    ///
    /// # Errors
    /// A worker that does not answer in time.
    pub async fn hold(&mut self, duration: Duration) -> Result<WorkerState> {
        let command = format!("hold {}", duration.as_millis());
        let words = self.ask(&command, duration).await?;
        self.parse_state(&command, &words)
    }

    /// Releases the held lock.
    ///
    /// # Errors
    /// No lock held, store errors, or a worker that does not answer in time.
    pub async fn release(&mut self) -> Result<Released> {
        let words = self.ask("release", Duration::ZERO).await?;
        match words.as_slice() {
            [kind, token] if kind == "released" => Ok(Released::Released {
                token: self.token(token)?,
            }),
            [kind, token] if kind == "lost" => Ok(Released::Lost {
                token: self.token(token)?,
            }),
            other => Err(self.unexpected("release", other)),
        }
    }

    /// Pauses the whole process (SIGSTOP): its watchdog stops renewing.
    ///
    /// # Errors
    /// If it is no longer running.
    pub fn pause(&self) -> Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// Resumes a paused process (SIGCONT).
    ///
    /// # Errors
    /// If it is no longer running.
    pub fn resume(&self) -> Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// Kills the process (SIGKILL, as `kill -9`) and reaps it: it releases nothing.
    ///
    /// # Errors
    /// If it cannot be signalled or reaped.
    pub async fn kill(&mut self) -> Result<()> {
        let name = self.name.clone();
        let failed = |problem: String| WorkerError {
            worker: name.clone(),
            problem,
        };
        self.child
            .start_kill()
            .map_err(|err| failed(format!("cannot kill it: {err}")))?;
        timeout(REPLY_LIMIT, self.child.wait())
            .await
            .map_err(|_| failed(format!("not reaped within {REPLY_LIMIT:?} of SIGKILL")))?
            .map_err(|err| failed(format!("cannot reap it: {err}")))?;
        Ok(())
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| self.failed(format!("cannot send {signal}: it was killed")))?;
        let pid =
            i32::try_from(pid).map_err(|_| self.failed(format!("pid {pid} is out of range")))?;
        kill(Pid::from_raw(pid), signal)
            .map_err(|err| self.failed(format!("cannot send {signal}: {err}")))
    }

    /// Sends `command` and reads the answer, allowing `extra` beyond the usual limit.
    async fn ask(&mut self, command: &str, extra: Duration) -> Result<Vec<String>> {
        let line = format!("{command}\n");
        if let Err(err) = self.stdin.write_all(line.as_bytes()).await {
            return Err(self.failed(format!("cannot send `{command}`: {err}")));
        }
        if let Err(err) = self.stdin.flush().await {
            return Err(self.failed(format!("cannot send `{command}`: {err}")));
        }
        let words = self.read_reply(REPLY_LIMIT + extra).await?;
        if words.first().is_some_and(|w| w == "error") {
            return Err(self.failed(format!("`{command}` failed: {}", words[1..].join(" "))));
        }
        Ok(words)
    }

    async fn read_reply(&mut self, limit: Duration) -> Result<Vec<String>> {
        match timeout(limit, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line.split_whitespace().map(str::to_owned).collect()),
            Ok(Ok(None)) => Err(self.failed("exited without answering".into())),
            Ok(Err(err)) => Err(self.failed(format!("cannot read its answer: {err}"))),
            Err(_) => Err(self.failed(format!("did not answer within {limit:?} (paused?)"))),
        }
    }

    fn parse_state(&self, command: &str, words: &[String]) -> Result<WorkerState> {
        match words {
            [kind] if kind == "idle" => Ok(WorkerState::Idle),
            [kind] if kind == "released" => Ok(WorkerState::Released),
            [kind, token, valid_until] if kind == "held" => Ok(WorkerState::Held {
                token: self.token(token)?,
                valid_until: self.instant(valid_until)?,
            }),
            [kind, token, reason] if kind == "lost" => Ok(WorkerState::Lost {
                token: self.token(token)?,
                reason: reason.clone(),
            }),
            other => Err(self.unexpected(command, other)),
        }
    }

    fn token(&self, word: &str) -> Result<FencingToken> {
        word.parse()
            .map(FencingToken)
            .map_err(|_| self.failed(format!("`{word}` is not a token")))
    }

    fn instant(&self, word: &str) -> Result<Instant> {
        word.parse()
            .map(instant_at_micros)
            .map_err(|_| self.failed(format!("`{word}` is not a time in microseconds")))
    }

    fn unexpected(&self, command: &str, words: &[String]) -> WorkerError {
        self.failed(format!(
            "unexpected answer to `{command}`: `{}`",
            words.join(" ")
        ))
    }

    fn failed(&self, problem: String) -> WorkerError {
        WorkerError {
            worker: self.name.clone(),
            problem,
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // SIGKILL ends a paused process too; tokio reaps it in the background. Does
        // nothing once `kill` reaped it, so a reused pid is never signalled.
        let _ = self.child.start_kill();
    }
}
