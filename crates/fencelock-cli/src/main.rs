//! `fencelock`: run a command under a distributed lock with a fencing token, or inspect
//! a lock. `fencelock --help` documents every flag and exit code.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod exit;
mod run;
mod status;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Run commands under distributed locks with fencing tokens.
#[derive(Debug, Parser)]
#[command(name = "fencelock", version, after_help = exit::TABLE)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run CMD while holding lock NAME and renewing it. CMD sees FENCELOCK_TOKEN (the
    /// grant's fencing token: send it with every write) and FENCELOCK_NAME. If the lock
    /// is lost, CMD gets SIGTERM, then SIGKILL after --grace. Signals sent to fencelock
    /// (INT, TERM, HUP, QUIT, USR1, USR2) are passed on to CMD.
    #[command(after_help = exit::TABLE)]
    Run(RunArgs),
    /// Show who holds lock NAME: holder, token and remaining time.
    #[command(after_help = exit::TABLE)]
    Status(StatusArgs),
}

/// Where the locks are: `--url`, else `FENCELOCK_URL`, else an embedded SQLite file.
#[derive(Debug, Args)]
struct StoreArgs {
    /// Store URL, e.g. sqlite://locks.db, memory://, redis://127.0.0.1:6379/.
    /// [default: $FENCELOCK_URL, else sqlite://$XDG_STATE_HOME/fencelock/locks.db,
    /// i.e. ~/.local/state/fencelock/locks.db]
    #[arg(long, env = "FENCELOCK_URL", value_name = "URL")]
    url: Option<String>,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The lock's name (1 to 256 bytes).
    #[arg(long, value_name = "NAME")]
    name: String,
    /// Lease TTL; the lock is renewed every TTL/3 while CMD runs.
    #[arg(long, value_name = "D", value_parser = duration, default_value = "30s")]
    ttl: Duration,
    /// How long to wait for a held lock (0s: do not wait). [default: forever]
    #[arg(long, value_name = "D", value_parser = duration)]
    wait: Option<Duration>,
    /// Stop renewing after D: the lock then ends and CMD is stopped as on a loss.
    #[arg(long, value_name = "D", value_parser = duration)]
    max_hold: Option<Duration>,
    /// Time between SIGTERM and SIGKILL when CMD must stop after a loss.
    #[arg(long, value_name = "D", value_parser = duration, default_value = "10s")]
    grace: Duration,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The lock's name.
    name: String,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    json: bool,
}

/// Durations read like `500ms`, `10s`, `2m`, `1h`.
fn duration(text: &str) -> Result<Duration, String> {
    fencelock::driver::url::parse_duration(text).map_err(|err| err.to_string())
}

/// The store URL to use, or a message saying how to give one.
fn store_url(store: &StoreArgs) -> Result<String, fencelock::Error> {
    if let Some(url) = &store.url {
        return Ok(url.clone());
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".local/state")))
        .ok_or_else(|| fencelock::Error::config("no store given and no HOME to keep the default SQLite file in; pass --url or set FENCELOCK_URL"))?;
    let dir = state.join("fencelock");
    std::fs::create_dir_all(&dir).map_err(|err| {
        fencelock::Error::config(format!(
            "cannot create {} for the default SQLite store: {err}; pass --url or set FENCELOCK_URL",
            dir.display()
        ))
    })?;
    Ok(format!("sqlite://{}", dir.join("locks.db").display()))
}

/// Reports `err` and gives the exit code for it.
fn failed(err: &fencelock::Error) -> ExitCode {
    eprintln!("fencelock: {err}");
    ExitCode::from(match err {
        fencelock::Error::Config { .. }
        | fencelock::Error::InvalidName { .. }
        | fencelock::Error::Unsupported { .. } => exit::CONFIG,
        fencelock::Error::Contended { .. } | fencelock::Error::Timeout { .. } => exit::NOT_ACQUIRED,
        fencelock::Error::Lost { .. } => exit::LOST,
        _ => exit::STORE_FAILED,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("fencelock: cannot start the async runtime: {err}");
            return ExitCode::from(exit::STORE_FAILED);
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(args).await,
            Command::Status(args) => status::status(args).await,
        }
    })
}
