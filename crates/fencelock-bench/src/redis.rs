//! Redis and Redlock: the library on one node and on 3 and 5 nodes, against redis-rs
//! sending `SET NX PX` and a compare-and-delete script by hand on one node.
//! With the `peers` feature, rslock and distributed-lock join S1 and hand off against
//! fencelock in S4 (`peers::redis`); S6 runs last (`peers::s6`).

use std::collections::BTreeMap;

use fencelock_conformance::harness::{RedisPersistence, RedisServer, Server};
use redis::Script;
use redis::aio::ConnectionManager;

use crate::library::{self, TTL};
use crate::measure::{Plan, Result, Role, Variant, interleaved};
use crate::peers;
use crate::report::{OpCount, Report};

const COMPARE_AND_DELETE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// Options of every Redlock URL here: a node timeout (default 50 ms at this TTL) long
/// enough that a loaded 2-core machine does not fail a cycle. It bounds only how long a
/// slow node is waited for, so it does not change a cycle whose nodes answer.
pub(crate) const REDLOCK_OPTIONS: &str = "?node_timeout=250ms";

/// Client requests per cycle: acquire and release are one request each, for the
/// floor and the library alike.
const REQUESTS_PER_CYCLE: f64 = 2.0;

/// S1 and S4 for Redis and Redlock, and the command counts of S1 on one node.
pub(crate) async fn run(plan: &Plan, report: &mut Report) -> Result<()> {
    let servers = RedisServer::start_many(5, RedisPersistence::None).await?;
    let single = &servers[0];
    let redlock = |nodes: usize| {
        let addrs: Vec<String> = servers[..nodes]
            .iter()
            .map(|s| s.addr().to_string())
            .collect();
        format!(
            "redlock://{}{}",
            addrs.join(","),
            crate::redis::REDLOCK_OPTIONS
        )
    };
    let (redlock3, redlock5) = (redlock(3), redlock(5));
    let conn = connect(single).await?;

    let lib = fencelock::connect(&single.url()).await?;
    let lib3 = fencelock::connect(&redlock3).await?;
    let lib5 = fencelock::connect(&redlock5).await?;
    let mut variants = vec![
        library::acquire_release("fencelock redis (1 node)", lib.clone(), "bench-s1"),
        floor(conn.clone(), "bench-floor-s1"),
        library::acquire_release("fencelock redlock (3 nodes)", lib3, "bench-s1-rl3"),
        library::acquire_release("fencelock redlock (5 nodes)", lib5, "bench-s1-rl5"),
    ];
    #[cfg(feature = "peers")]
    let (one_node, five_nodes) = (
        vec![single.url()],
        servers.iter().map(|s| s.url()).collect::<Vec<_>>(),
    );
    #[cfg(feature = "peers")]
    {
        variants.extend(peers::redis::acquire_release(&one_node, "bench-s1-peer").await?);
        variants.extend(peers::redis::acquire_release(&five_nodes, "bench-s1-peer5").await?);
    }
    let samples = interleaved(&mut variants, plan).await?;
    // Issue 4's targets: 1.2× the floor for one node; Redlock over 5 nodes within 1.5×
    // of single-node Redis (the library on one node), not of the floor; none for 3 nodes.
    report.add_acquire_release("redis", &variants, samples, 1, |variant| {
        (!variant.label.contains("nodes)")).then_some(1.2)
    });
    report.add_relative_target("redis", &variants[3].label, &variants[0].label, 1.5)?;

    let mut admin = conn.clone();
    for index in [0, 1] {
        let variant = &mut variants[index];
        let before = counters(&mut admin).await?;
        variant.run(plan.counted_cycles).await?;
        let after = counters(&mut admin).await?;
        let cycles = plan.counted_cycles as f64;
        // The second INFO's own request is counted in `after`.
        let requests = (after.reads - before.reads - 1) as f64 / cycles;
        let mut calls = String::new();
        for (command, count) in &after.calls {
            let delta = count - before.calls.get(command).copied().unwrap_or(0);
            if command != "info" && delta > 0 {
                calls.push_str(&format!("{command} {} ", delta as f64 / cycles));
            }
        }
        report.op_counts.push(OpCount {
            store: "redis".into(),
            variant: variant.label.clone(),
            role: variant.role,
            unit: "client requests (total_reads_processed)",
            per_cycle: requests,
            expected: REQUESTS_PER_CYCLE,
            detail: format!("commands incl. inside scripts: {}", calls.trim_end()),
        });
    }

    let mut round_trip = ping(conn.clone(), "PING (1 node)");
    let measured = library::handoff(&single.url(), "bench-s4", &mut round_trip, plan).await?;
    report.add_handoff("redis", &round_trip, measured, Some(3.0));
    let mut round_trip = ping(conn, "PING (1 node)");
    let measured = library::handoff(&redlock5, "bench-s4-rl5", &mut round_trip, plan).await?;
    report.add_handoff("redlock (5 nodes)", &round_trip, measured, None);

    #[cfg(feature = "peers")]
    {
        let took = peers::redis::distributed_lock_acquire_does_not_wait(&one_node).await?;
        eprintln!(
            "  distributed-lock-redis: acquire(Some(2 s)) on a held lock gave up after {took:?}"
        );
        for (store, url, nodes) in [
            ("redis", single.url(), &one_node),
            ("redlock (5 nodes)", redlock5.clone(), &five_nodes),
        ] {
            let name = format!("bench-s4-peers-{}", nodes.len());
            let ours = peers::Handoff::new(
                format!("fencelock {store}"),
                Role::Library,
                peers::fencelock_side(fencelock::connect(&url).await?, &name),
                peers::fencelock_side(fencelock::connect(&url).await?, &name),
            );
            let others = peers::redis::handoffs(nodes, &name).await?;
            peers::compare_handoffs(store, ours, others, plan, report).await?;
        }
    }

    peers::s6::run(&servers, plan, report).await?;
    Ok(())
}

async fn connect(server: &RedisServer) -> Result<ConnectionManager> {
    Ok(redis::Client::open(server.url())?
        .get_connection_manager()
        .await?)
}

/// `SET key value NX PX ttl`, then the compare-and-delete script by `EVALSHA`.
fn floor(conn: ConnectionManager, key: &str) -> Variant {
    let key = key.to_owned();
    let script = Script::new(COMPARE_AND_DELETE);
    let ttl_ms = TTL.as_millis() as u64;
    let mut cycle: u64 = 0;
    Variant::new("redis-rs SET NX PX + EVALSHA", Role::Floor, move || {
        cycle += 1;
        let value = format!("{:016x}:{cycle}", std::process::id());
        let (mut conn, script, key) = (conn.clone(), script.clone(), key.clone());
        async move {
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&value)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms)
                .query_async(&mut conn)
                .await?;
            if set.is_none() {
                return Err(format!("floor: {key} was already held").into());
            }
            let deleted: i64 = script.key(&key).arg(&value).invoke_async(&mut conn).await?;
            if deleted != 1 {
                return Err(format!("floor: {key} was not ours at release").into());
            }
            Ok(())
        }
    })
}

fn ping(conn: ConnectionManager, label: &str) -> Variant {
    Variant::new(label, Role::Floor, move || {
        let mut conn = conn.clone();
        async move {
            let _: String = redis::cmd("PING").query_async(&mut conn).await?;
            Ok(())
        }
    })
}

/// What the server counted so far: calls per command and requests read.
struct Counters {
    calls: BTreeMap<String, u64>,
    reads: u64,
}

async fn counters(conn: &mut ConnectionManager) -> Result<Counters> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .arg("stats")
        .query_async(conn)
        .await?;
    let mut calls = BTreeMap::new();
    let mut reads = None;
    for line in info.lines() {
        if let Some(rest) = line.strip_prefix("cmdstat_") {
            let parsed = rest.split_once(":calls=").and_then(|(command, rest)| {
                let count = rest.split(',').next()?.parse::<u64>().ok()?;
                Some((command.to_owned(), count))
            });
            if let Some((command, count)) = parsed {
                calls.insert(command, count);
            }
        } else if let Some(count) = line.strip_prefix("total_reads_processed:") {
            reads = count.trim().parse::<u64>().ok();
        }
    }
    let reads = reads.ok_or("INFO stats has no total_reads_processed (Redis 6 or newer needed)")?;
    Ok(Counters { calls, reads })
}
