//! `fencelock run` end to end on a server store: a real `redis-server` started on a
//! loopback port by the conformance harness.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{finish, wait_for_file};
use fencelock_conformance::harness::{RedisServer, Server};

const BIN: &str = env!("CARGO_BIN_EXE_fencelock");
const LOST: i32 = 76;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_runs_on_redis_serialise_and_see_rising_tokens() {
    let server = RedisServer::start().await.expect("start redis-server");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let script = format!(
        "echo start $FENCELOCK_TOKEN >> {log}; sleep 0.3; echo end >> {log}",
        log = log.display()
    );
    let runs: Vec<_> = (0..2)
        .map(|_| {
            Command::new(BIN)
                .args([
                    "run",
                    "--url",
                    &server.url(),
                    "--name",
                    "job",
                    "--wait",
                    "20s",
                    "--",
                    "sh",
                    "-c",
                    &script,
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
    assert!(
        lines[0].starts_with("start ") && lines[1] == "end",
        "{text}"
    );
    assert!(
        lines[2].starts_with("start ") && lines[3] == "end",
        "{text}"
    );
    let token = |line: &str| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap();
    assert!(token(lines[2]) > token(lines[0]), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_deleted_on_redis_stops_the_command_with_the_lost_code() {
    let server = RedisServer::start().await.expect("start redis-server");
    let dir = tempfile::tempdir().unwrap();
    let (ready, termed) = (dir.path().join("holding"), dir.path().join("got-sigterm"));
    let script = format!(
        "trap 'touch {termed}; exit 0' TERM; touch {ready}; while true; do sleep 0.05; done",
        termed = termed.display(),
        ready = ready.display()
    );
    let run = Command::new(BIN)
        .args([
            "run",
            "--url",
            &server.url(),
            "--name",
            "doomed",
            "--ttl",
            "900ms",
            "--grace",
            "5s",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .spawn()
        .unwrap();
    wait_for_file(&ready, Duration::from_secs(20));
    // An operator deletes the lock key (`DEL`) behind the holder's back.
    let client = fencelock_redis::redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let deleted: i64 = fencelock_redis::redis::cmd("DEL")
        .arg("fencelock:lock:doomed")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted, 1, "the lock key is where the Redis store keeps it");
    let status = finish(run, Duration::from_secs(20));
    assert_eq!(status.code(), Some(LOST));
    assert!(
        termed.exists(),
        "the command must get SIGTERM when the lock is lost"
    );
}
