//! `fencelock` end to end on the embedded SQLite store: real processes, real files.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{finish, wait_for_file};

const BIN: &str = env!("CARGO_BIN_EXE_fencelock");
const LOST: i32 = 76;
const NOT_ACQUIRED: i32 = 75;
const CONFIG: i32 = 78;

struct Store {
    dir: tempfile::TempDir,
}

impl Store {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn url(&self) -> String {
        format!("sqlite://{}", self.db().display())
    }
    fn db(&self) -> PathBuf {
        self.dir.path().join("locks.db")
    }
    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn fencelock(&self) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env("FENCELOCK_URL", self.url())
            .env_remove("XDG_STATE_HOME");
        cmd
    }
}

/// Waits (bounded) until `path` holds one whole line (the shell creates the file
/// before it writes to it) and parses it as a token.
fn read_token(path: &Path, limit: Duration) -> u64 {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.strip_suffix('\n') {
            return line
                .parse()
                .unwrap_or_else(|err| panic!("{line:?} is not a token: {err}"));
        }
        assert!(
            started.elapsed() < limit,
            "{} held no whole line within {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops a running `fencelock run` as a user would: SIGTERM, passed on to its command.
fn stop(run: std::process::Child) {
    let pid = nix::unistd::Pid::from_raw(run.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    finish(run, Duration::from_secs(20));
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn two_concurrent_runs_serialise_and_see_rising_tokens() {
    let store = Store::new();
    let log = store.file("log");
    let script = format!(
        "echo start $FENCELOCK_NAME $FENCELOCK_TOKEN >> {log}; sleep 0.3; echo end >> {log}",
        log = log.display()
    );
    let runs: Vec<_> = (0..2)
        .map(|_| {
            store
                .fencelock()
                .args([
                    "run", "--name", "job", "--wait", "20s", "--", "sh", "-c", &script,
                ])
                .spawn()
                .unwrap()
        })
        .collect();
    for run in runs {
        assert!(finish(run, Duration::from_secs(30)).success());
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    // Serialised: each start is followed by its own end before the next start.
    assert!(
        lines[0].starts_with("start job ") && lines[1] == "end",
        "{text}"
    );
    assert!(
        lines[2].starts_with("start job ") && lines[3] == "end",
        "{text}"
    );
    let token = |line: &str| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap();
    assert!(token(lines[2]) > token(lines[0]), "{text}");
}

#[test]
fn the_command_exit_status_is_passed_through() {
    let store = Store::new();
    let status = store
        .fencelock()
        .args(["run", "--name", "exit", "--", "sh", "-c", "exit 7"])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(7));
}

#[test]
fn a_wait_that_runs_out_gives_its_code_without_running_the_command() {
    let store = Store::new();
    let ready = store.file("holding");
    let holder = store
        .fencelock()
        .args([
            "run",
            "--name",
            "busy",
            "--",
            "sh",
            "-c",
            &format!("touch {}; sleep 30", ready.display()),
        ])
        .spawn()
        .unwrap();
    wait_for_file(&ready, Duration::from_secs(20));
    let marker = store.file("ran");
    let output = store
        .fencelock()
        .args([
            "run",
            "--name",
            "busy",
            "--wait",
            "300ms",
            "--",
            "touch",
            marker.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(NOT_ACQUIRED),
        "{}",
        stderr(&output)
    );
    assert!(stderr(&output).contains("busy"), "{}", stderr(&output));
    assert!(
        !marker.exists(),
        "the command must not run without the lock"
    );
    let nowait = store
        .fencelock()
        .args(["run", "--name", "busy", "--wait", "0s", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(
        nowait.status.code(),
        Some(NOT_ACQUIRED),
        "{}",
        stderr(&nowait)
    );
    stop(holder);
}

#[test]
fn a_lost_lock_stops_the_command_and_gives_its_code() {
    let store = Store::new();
    let ready = store.file("holding");
    let termed = store.file("got-sigterm");
    let script = format!(
        "trap 'touch {termed}; exit 0' TERM; touch {ready}; while true; do sleep 0.05; done",
        termed = termed.display(),
        ready = ready.display()
    );
    let run = store
        .fencelock()
        .args([
            "run", "--name", "doomed", "--ttl", "600ms", "--grace", "5s", "--", "sh", "-c", &script,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_file(&ready, Duration::from_secs(20));
    // An operator deletes the lease row behind the holder's back.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let backend = fencelock_sql::SqliteBackend::open(store.db())
                .await
                .unwrap();
            let statement = format!("DELETE FROM {} WHERE name = 'doomed'", backend.table());
            sqlx::query(&statement)
                .execute(backend.pool())
                .await
                .unwrap();
        });
    let status = finish(run, Duration::from_secs(20));
    assert_eq!(status.code(), Some(LOST));
    assert!(
        termed.exists(),
        "the command must get SIGTERM when the lock is lost"
    );
}

#[test]
fn signals_sent_to_fencelock_reach_the_command() {
    let store = Store::new();
    let ready = store.file("holding");
    let got = store.file("got-usr1");
    let script = format!(
        "trap 'touch {got}; exit 3' USR1; touch {ready}; while true; do sleep 0.05; done",
        got = got.display(),
        ready = ready.display()
    );
    let run = store
        .fencelock()
        .args(["run", "--name", "sig", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    wait_for_file(&ready, Duration::from_secs(20));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.id() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    let status = finish(run, Duration::from_secs(20));
    assert!(got.exists(), "the command must receive the signal");
    assert_eq!(status.code(), Some(3));
}

#[test]
fn status_reports_the_holder_and_token_as_text_and_json() {
    let store = Store::new();
    let free = store
        .fencelock()
        .args(["status", "report", "--json"])
        .output()
        .unwrap();
    assert!(free.status.success(), "{}", stderr(&free));
    let json: serde_json::Value = serde_json::from_slice(&free.stdout).unwrap();
    assert_eq!(json["held"], false);

    let ready = store.file("holding");
    let holder = store
        .fencelock()
        .args([
            "run",
            "--name",
            "report",
            "--",
            "sh",
            "-c",
            &format!("echo $FENCELOCK_TOKEN > {}; sleep 30", ready.display()),
        ])
        .spawn()
        .unwrap();
    let token = read_token(&ready, Duration::from_secs(20));
    let held = store
        .fencelock()
        .args(["status", "report", "--json"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&held.stdout).unwrap();
    assert_eq!(
        (
            json["held"].as_bool(),
            json["token"].as_u64(),
            json["store"].as_str()
        ),
        (Some(true), Some(token), Some("sqlite"))
    );
    let text = store
        .fencelock()
        .args(["status", "report"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("held by") && text.contains(&token.to_string()),
        "{text}"
    );
    stop(holder);
}

#[test]
fn bad_flags_and_urls_get_clear_errors() {
    let store = Store::new();
    let bad_ttl = store
        .fencelock()
        .args(["run", "--name", "x", "--ttl", "10", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(bad_ttl.status.code(), Some(2));
    assert!(stderr(&bad_ttl).contains("500ms"), "{}", stderr(&bad_ttl));

    let no_cmd = store
        .fencelock()
        .args(["run", "--name", "x"])
        .output()
        .unwrap();
    assert_eq!(no_cmd.status.code(), Some(2));
    assert!(stderr(&no_cmd).contains("CMD"), "{}", stderr(&no_cmd));

    let scheme = Command::new(BIN)
        .args(["run", "--url", "mongodb://h/", "--name", "x", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(scheme.status.code(), Some(CONFIG));
    assert!(
        stderr(&scheme).contains("unknown store scheme `mongodb://`"),
        "{}",
        stderr(&scheme)
    );

    let zero = store
        .fencelock()
        .args(["run", "--name", "x", "--ttl", "0s", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(zero.status.code(), Some(CONFIG));
    assert!(stderr(&zero).contains("too short"), "{}", stderr(&zero));

    let empty = store
        .fencelock()
        .args(["run", "--name", "", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(empty.status.code(), Some(CONFIG));
    assert!(stderr(&empty).contains("empty"), "{}", stderr(&empty));

    let missing = store
        .fencelock()
        .args(["run", "--name", "x", "--", "/nonexistent/cmd"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(127), "{}", stderr(&missing));
}

#[test]
fn help_documents_every_exit_code() {
    let help = Command::new(BIN).args(["run", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    for needle in [
        "75",
        "76",
        "69",
        "78",
        "127",
        "--wait",
        "--max-hold",
        "--grace",
        "FENCELOCK_TOKEN",
        "FENCELOCK_URL",
    ] {
        assert!(text.contains(needle), "--help lacks {needle}:\n{text}");
    }
}

#[test]
fn without_a_url_the_store_is_a_sqlite_file_in_the_state_directory() {
    let store = Store::new();
    let output = Command::new(BIN)
        .env_remove("FENCELOCK_URL")
        .env("XDG_STATE_HOME", store.dir.path())
        .args(["run", "--name", "default", "--", "true"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(store.dir.path().join("fencelock/locks.db").exists());
}

#[test]
fn waiting_on_a_terminal_shows_a_progress_line_and_off_a_terminal_nothing() {
    // `script` (Debian's essential bsdutils) gives fencelock a pseudo-terminal.
    let store = Store::new();
    let ready = store.file("holding");
    let holder = store
        .fencelock()
        .args([
            "run",
            "--name",
            "tty",
            "--",
            "sh",
            "-c",
            &format!("touch {}; sleep 30", ready.display()),
        ])
        .spawn()
        .unwrap();
    wait_for_file(&ready, Duration::from_secs(20));
    let waiting = format!("{BIN} run --name tty --wait 1s -- true");
    let on_tty = Command::new("script")
        .args(["-qec", &waiting, "/dev/null"])
        .env("FENCELOCK_URL", store.url())
        .output()
        .expect("script(1) from util-linux runs the command on a pseudo-terminal");
    let shown = String::from_utf8_lossy(&on_tty.stdout);
    assert!(
        shown.contains("waiting for lock `tty`"),
        "no progress line on a terminal: {shown:?}"
    );
    let off_tty = store
        .fencelock()
        .args(["run", "--name", "tty", "--wait", "1s", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(off_tty.status.code(), Some(NOT_ACQUIRED));
    assert!(
        !stderr(&off_tty).contains("waiting for lock"),
        "progress shown off a terminal: {}",
        stderr(&off_tty)
    );
    stop(holder);
}
