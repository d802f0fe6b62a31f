//! `fencelock run`: run a command while holding a lock.

use std::future::IntoFuture;
use std::io::{IsTerminal, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitCode;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};

use crate::{RunArgs, exit, failed, store_url};

/// The signals passed on to the command.
const FORWARDED: [(Signal, SignalKind); 6] = [
    (Signal::SIGINT, SignalKind::interrupt()),
    (Signal::SIGTERM, SignalKind::terminate()),
    (Signal::SIGHUP, SignalKind::hangup()),
    (Signal::SIGQUIT, SignalKind::quit()),
    (Signal::SIGUSR1, SignalKind::user_defined1()),
    (Signal::SIGUSR2, SignalKind::user_defined2()),
];

pub(crate) async fn run(args: RunArgs) -> ExitCode {
    let locker = match store_url(&args.store) {
        Ok(url) => fencelock::connect(&url).await,
        Err(err) => Err(err),
    };
    let locker = match locker {
        Ok(locker) => locker,
        Err(err) => return failed(&err),
    };
    let mut request = locker.lock(&args.name).ttl(args.ttl);
    request = match args.wait {
        Some(wait) if wait.is_zero() => request.no_wait(),
        Some(wait) => request.wait(wait),
        None => request.wait_forever(),
    };
    if let Some(max_hold) = args.max_hold {
        request = request.max_hold(max_hold);
    }
    let guard = match with_progress(&args.name, request.into_future()).await {
        Ok(guard) => guard,
        Err(err) => return failed(&err),
    };

    let (program, rest) = args.command.split_first().expect("clap requires a command");
    // Its own process group: a terminal's Ctrl-C reaches fencelock only, which passes it
    // on once, and a loss stops the command's whole process tree.
    let spawned = Command::new(program)
        .args(rest)
        .env("FENCELOCK_TOKEN", guard.token().to_string())
        .env("FENCELOCK_NAME", guard.name().as_str())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            eprintln!("fencelock: cannot run {}: {err}", program.to_string_lossy());
            let _ = guard.release().await;
            return ExitCode::from(match err.kind() {
                std::io::ErrorKind::NotFound => exit::NOT_FOUND,
                _ => exit::NOT_EXECUTABLE,
            });
        }
    };
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);

    let mut signals = Vec::new();
    for (sig, kind) in FORWARDED {
        match signal(kind) {
            Ok(stream) => signals.push((sig, stream)),
            Err(err) => eprintln!("fencelock: cannot pass {sig} on to the command: {err}"),
        }
    }
    let lost = guard.lost();
    tokio::pin!(lost);
    let outcome = loop {
        let forwarded = next_signal(&mut signals);
        tokio::select! {
            status = child.wait() => break Ok(status),
            err = &mut lost => break Err(err),
            sig = forwarded => {
                if let Some(group) = group {
                    let _ = killpg(group, sig);
                }
            }
        }
    };
    match outcome {
        Ok(status) => {
            let code = match status {
                Ok(status) => status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
                Err(err) => {
                    eprintln!("fencelock: lost track of the command: {err}");
                    i32::from(exit::STORE_FAILED)
                }
            };
            match guard.release().await {
                Ok(()) => ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)),
                Err(err @ fencelock::Error::Lost { .. }) => {
                    eprintln!("fencelock: the command finished but {err}");
                    ExitCode::from(exit::LOST)
                }
                Err(err) => {
                    // The lock frees itself when its TTL runs out; the command's own
                    // result stands.
                    eprintln!("fencelock: warning: release failed: {err}");
                    ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1))
                }
            }
        }
        Err(err) => {
            eprintln!("fencelock: {err}; stopping the command");
            stop(&mut child, group, args.grace).await;
            ExitCode::from(exit::LOST)
        }
    }
}

/// SIGTERM to the command's process group, then SIGKILL after `grace`.
async fn stop(child: &mut Child, group: Option<Pid>, grace: Duration) {
    if let Some(group) = group {
        let _ = killpg(group, Signal::SIGTERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        if let Some(group) = group {
            let _ = killpg(group, Signal::SIGKILL);
        }
        let _ = child.kill().await;
    }
}

/// The next signal received on any of `signals`.
async fn next_signal(signals: &mut [(Signal, tokio::signal::unix::Signal)]) -> Signal {
    if signals.is_empty() {
        return std::future::pending().await;
    }
    let receives = signals.iter_mut().map(|(sig, stream)| {
        Box::pin(async move {
            stream.recv().await;
            *sig
        })
    });
    futures_util::future::select_all(receives).await.0
}

/// Awaits `acquire`, showing a one-line indicator on stderr while it waits, only when
/// stderr is a terminal.
async fn with_progress<F: std::future::Future>(name: &str, acquire: F) -> F::Output {
    if !std::io::stderr().is_terminal() {
        return acquire.await;
    }
    tokio::pin!(acquire);
    let started = tokio::time::Instant::now();
    let mut shown = false;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.tick().await;
    let result = loop {
        tokio::select! {
            result = &mut acquire => break result,
            _ = tick.tick() => {
                shown = true;
                eprint!("\rfencelock: waiting for lock `{name}` ({:.0}s)\x1b[K", started.elapsed().as_secs_f64());
                let _ = std::io::stderr().flush();
            }
        }
    };
    if shown {
        eprint!("\r\x1b[K");
    }
    result
}
