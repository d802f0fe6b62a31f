//! `fencelock-bench --quick` runs every scenario against real servers for every store,
//! writes the table, the JSON and the chart, and the counted server operations per
//! cycle are the expected ones (Redis, etcd, Postgres and MariaDB count them). It asserts nothing about time.

use std::process::Command;

/// The stores of S1 and S4 (Redlock's S1 rows are under `redis`).
const PAIRED: &[&str] = &[
    "redis",
    "etcd",
    "zookeeper",
    "sqlite",
    "postgres (lease)",
    "postgres (session)",
    "mariadb (lease)",
    "mariadb (session)",
];

/// The stores of S2, S3, S5 and S7.
const SCENARIO_STORES: &[&str] = &[
    "redis",
    "redlock (5 nodes)",
    "etcd",
    "zookeeper",
    "postgres (lease)",
    "postgres (session)",
    "mariadb (lease)",
    "mariadb (session)",
    "sqlite",
];

fn rows<'a>(json: &'a serde_json::Value, table: &str) -> &'a Vec<serde_json::Value> {
    json[table]
        .as_array()
        .unwrap_or_else(|| panic!("results.json has no `{table}` array"))
}

fn stores_of<'a>(json: &'a serde_json::Value, table: &str) -> Vec<&'a str> {
    rows(json, table)
        .iter()
        .map(|row| row["store"].as_str().unwrap())
        .collect()
}

#[test]
fn quick_mode_runs_every_scenario_on_every_store_and_counts_the_expected_server_ops() {
    let out = tempfile::tempdir().unwrap();
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

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap())
            .unwrap();
    for store in PAIRED {
        let roles: Vec<&str> = rows(&json, "s1_acquire_release")
            .iter()
            .filter(|row| row["store"] == *store)
            .map(|row| row["role"].as_str().unwrap())
            .collect();
        assert!(
            roles.contains(&"library") && roles.contains(&"floor"),
            "S1 {store}: {roles:?}"
        );
        assert!(
            stores_of(&json, "s4_handoff").contains(store),
            "no S4 row for {store}"
        );
    }
    // Session mode against the raw server lock, hand-off by hand-off.
    for store in ["postgres (session)", "mariadb (session)"] {
        let compared = format!("{store}, fencelock vs floor");
        assert!(
            stores_of(&json, "s4_handoff").contains(&compared.as_str()),
            "no S4 row `{compared}`"
        );
    }
    for table in [
        "s2_distinct_names",
        "s3_hot_lock",
        "s5_held_many",
        "s7_holder_killed",
    ] {
        let stores = stores_of(&json, table);
        for store in SCENARIO_STORES {
            assert!(stores.contains(store), "{table}: no row for {store}");
        }
    }
    // S6: Redlock over 3 and 5 nodes, parallel (the library) against sequential.
    for nodes in [3, 5] {
        let store = format!("S6 redlock ({nodes} nodes): parallel vs sequential");
        let roles: Vec<&str> = rows(&json, "s1_acquire_release")
            .iter()
            .filter(|row| row["store"] == store.as_str())
            .map(|row| row["role"].as_str().unwrap())
            .collect();
        assert!(
            roles.contains(&"library") && roles.contains(&"floor"),
            "{store}: {roles:?}"
        );
    }
    // Redlock over 5 nodes is held to single-node Redis, not to the floor.
    let redlock_target = rows(&json, "targets").iter().any(|row| {
        row["target"]
            .as_str()
            .unwrap()
            .starts_with("S1 redis / fencelock redlock (5 nodes): p50")
            && row["target"]
                .as_str()
                .unwrap()
                .contains("× fencelock redis (1 node) (target ≤ 1.5×)")
    });
    assert!(redlock_target, "no Redlock-over-5 target against one node");
    // S3 runs 1, 8 and 64 contenders with holds of 0 and 1 ms on every store.
    assert_eq!(
        rows(&json, "s3_hot_lock").len(),
        SCENARIO_STORES.len() * 6,
        "S3 rows"
    );
    for store in ["redis", "etcd", "postgres (lease)", "mariadb (lease)"] {
        let counted = rows(&json, "server_ops_per_cycle")
            .iter()
            .any(|row| row["store"] == store);
        assert!(counted, "no server operation count for {store}");
    }
    for row in rows(&json, "server_ops_per_cycle") {
        assert_eq!(row["per_cycle"], row["expected"], "{row}");
    }

    let svg = std::fs::read_to_string(out.path().join("results.svg")).unwrap();
    let library_rows = rows(&json, "s1_acquire_release")
        .iter()
        .filter(|row| row["role"] == "library")
        .count();
    assert!(svg.starts_with("<svg"), "not an SVG:\n{svg}");
    assert!(
        svg.matches("<rect x=").count() >= library_rows,
        "fewer bars than S1 library rows ({library_rows}):\n{svg}"
    );
    assert!(
        stdout.contains("| store | variant |"),
        "no table printed:\n{stdout}"
    );
}
