//! `fencelock-worker HOLDER STORE_URL RESOURCE_PATH`: takes a lock by URL and follows
//! commands on stdin, one per line, answering each with one line on stdout, so that a
//! holder (its watchdog included) can be paused or killed as a whole process.
//!
//! The protocol is documented in `fencelock_conformance::worker`, which drives this
//! binary from tests. Times are shared-clock microseconds
//! (`fencelock_conformance::history::micros_at`). The worker exits on `quit`, at the
//! end of its input, and (on Linux) when the process that started it dies.
#![forbid(unsafe_code)]

use std::io::Write as _;
use std::time::Duration;

use fencelock::{Error, LockGuard, Locker, LossReason};
use fencelock_conformance::history::{micros_at, now_micros};
use fencelock_conformance::resource::{SharedResource, WriteOutcome};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

/// How long `state` waits for the watchdog to name the reason of a loss it has not
/// reported yet (it reports within milliseconds of the validity's end).
const LOSS_REPORT_LIMIT: Duration = Duration::from_secs(2);

struct Worker {
    holder: String,
    locker: Locker,
    resource: SharedResource,
    guard: Option<LockGuard>,
    released: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    die_with_parent();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [holder, url, resource] = args.as_slice() else {
        reply("error usage: fencelock-worker HOLDER STORE_URL RESOURCE_PATH");
        std::process::exit(2);
    };
    let mut worker = match Worker::start(holder, url, resource).await {
        Ok(worker) => worker,
        Err(err) => {
            reply(&format!("error {}", one_line(&err)));
            std::process::exit(1);
        }
    };
    reply("ready");
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"quit") {
            reply("bye");
            break;
        }
        let answer = worker.follow(&words).await;
        reply(&answer);
    }
}

impl Worker {
    async fn start(holder: &str, url: &str, resource: &str) -> fencelock::Result<Self> {
        Ok(Self {
            holder: holder.to_owned(),
            locker: fencelock::connect(url).await?,
            resource: SharedResource::open(resource).await?,
            guard: None,
            released: false,
        })
    }

    async fn follow(&mut self, words: &[&str]) -> String {
        match words {
            ["acquire", name, ttl_ms, wait_ms] => match (ttl_ms.parse(), wait_ms.parse()) {
                (Ok(ttl), Ok(wait)) => self.acquire(name, ttl, wait).await,
                _ => "error acquire needs whole milliseconds: acquire NAME TTL_MS WAIT_MS".into(),
            },
            ["write"] => self.write().await,
            ["state"] => self.state().await,
            ["hold", ms] => match ms.parse() {
                Ok(ms) => self.hold(Duration::from_millis(ms)).await,
                Err(_) => "error hold needs whole milliseconds: hold MS".into(),
            },
            ["release"] => self.release().await,
            _ => format!(
                "error unknown command `{}`: use acquire, write, state, hold, release or quit",
                words.join(" ")
            ),
        }
    }

    async fn acquire(&mut self, name: &str, ttl_ms: u64, wait_ms: u64) -> String {
        if self.guard.is_some() {
            return "error this worker already holds a lock; release it first".into();
        }
        let request = self.locker.lock(name).ttl(Duration::from_millis(ttl_ms));
        let request = match wait_ms {
            0 => request.no_wait(),
            ms => request.wait(Duration::from_millis(ms)),
        };
        let requested = now_micros();
        match request.await {
            Ok(guard) => {
                let granted = now_micros();
                let valid_until = micros_at(guard.lease().valid_until());
                let answer = format!(
                    "granted {} {requested} {granted} {valid_until}",
                    guard.token()
                );
                self.guard = Some(guard);
                self.released = false;
                answer
            }
            Err(Error::Contended { .. }) => format!("contended {requested} {}", now_micros()),
            Err(Error::Timeout { .. }) => format!("timeout {requested} {}", now_micros()),
            Err(err) => format!("error {}", one_line(&err)),
        }
    }

    async fn write(&mut self) -> String {
        let Some(guard) = &self.guard else {
            return "error no lock to write under; acquire first".into();
        };
        let token = guard.token();
        match self.resource.write(&self.holder, token).await {
            Ok(WriteOutcome::Accepted) => format!("accepted {token}"),
            Ok(WriteOutcome::Refused { highest }) => format!("refused {token} {highest}"),
            Err(err) => format!("error {}", one_line(&err)),
        }
    }

    async fn state(&self) -> String {
        let Some(guard) = &self.guard else {
            return if self.released { "released" } else { "idle" }.into();
        };
        if guard.is_held() {
            let valid_until = Instant::now() + guard.remaining();
            return format!("held {} {}", guard.token(), micros_at(valid_until));
        }
        let reason = match tokio::time::timeout(LOSS_REPORT_LIMIT, guard.lost()).await {
            Ok(Error::Lost { reason, .. }) => reason_word(reason),
            _ => "expired",
        };
        format!("lost {} {reason}", guard.token())
    }

    async fn hold(&self, duration: Duration) -> String {
        if let Some(guard) = &self.guard {
            let _ = tokio::time::timeout(duration, guard.lost()).await;
        }
        self.state().await
    }

    async fn release(&mut self) -> String {
        let Some(guard) = self.guard.take() else {
            return "error no lock to release".into();
        };
        let token = guard.token();
        self.released = true;
        match guard.release().await {
            Ok(()) => format!("released {token}"),
            Err(Error::Lost { .. }) => format!("lost {token}"),
            Err(err) => format!("error {}", one_line(&err)),
        }
    }
}

fn reason_word(reason: LossReason) -> &'static str {
    match reason {
        LossReason::NotOurs => "not-ours",
        LossReason::Expired => "expired",
        LossReason::MaxHoldReached => "max-hold",
        LossReason::SessionEnded => "session-ended",
        _ => "other",
    }
}

fn one_line(err: &dyn std::fmt::Display) -> String {
    err.to_string().replace(['\n', '\r'], " ")
}

fn reply(line: &str) {
    let mut stdout = std::io::stdout().lock();
    // A closed stdout means the driver is gone; the next read ends the loop.
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// A worker left paused (SIGSTOP) by a test process that died would never read the
/// end of its input: have the kernel kill it with its parent.
fn die_with_parent() {
    #[cfg(target_os = "linux")]
    {
        let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    }
}
