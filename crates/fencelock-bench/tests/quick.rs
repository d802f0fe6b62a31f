//! `fencelock-bench --quick` runs every scenario against real servers and the counted
//! server operations per cycle are the expected ones (it asserts nothing about time).

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn quick_mode_runs_every_scenario_and_counts_the_expected_server_ops() {
    let out = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let run = Command::new(env!("CARGO_BIN_EXE_fencelock-bench"))
        .arg("--quick")
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "quick run failed:\n{stdout}\n{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "quick mode took {:?}",
        started.elapsed()
    );

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap())
            .unwrap();
    for store in ["redis", "etcd", "zookeeper", "sqlite"] {
        let rows = json["s1_acquire_release"].as_array().unwrap();
        let roles: Vec<&str> = rows
            .iter()
            .filter(|row| row["store"] == store)
            .map(|row| row["role"].as_str().unwrap())
            .collect();
        assert!(
            roles.contains(&"library") && roles.contains(&"floor"),
            "S1 {store}: {roles:?}"
        );
        let handoff = json["s4_handoff"]
            .as_array()
            .unwrap()
            .iter()
            .any(|row| row["store"] == store);
        assert!(handoff, "no S4 row for {store}");
    }
    for row in json["server_ops_per_cycle"].as_array().unwrap() {
        assert_eq!(row["per_cycle"], row["expected"], "{row}");
    }
    assert!(
        stdout.contains("| store | variant |"),
        "no table printed:\n{stdout}"
    );
}
