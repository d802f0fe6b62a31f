//! S6: Redlock over 3 and 5 nodes, fencelock (per-node requests in parallel) against
//! the same two-phase algorithm done by hand with the same redis crate and the same
//! scripts (`fencelock::redis::scripts`: claim, raise, release), one node after the
//! other.

use fencelock::redis::RedisConfig;
use fencelock::redis::scripts::{self, Attempt, KeySpace};
use fencelock::{FencingToken, OwnerId};
use fencelock_conformance::harness::{RedisServer, Server};
use redis::aio::ConnectionManager;

use crate::library::{self, TTL};
use crate::measure::{Plan, Result, Role, Variant, interleaved};
use crate::report::Report;

/// The by-hand variant's keys, apart from the library's.
const PREFIX: &str = "bench-s6:";

/// S6 on the first 3 and on all 5 of `servers`; one S1-style row pair per node count,
/// the sequential variant as the row the ratios are taken to.
pub(crate) async fn run(servers: &[RedisServer], plan: &Plan, report: &mut Report) -> Result<()> {
    for nodes in [3, 5] {
        let chosen = servers
            .get(..nodes)
            .ok_or_else(|| format!("S6 needs {nodes} Redis nodes, {} started", servers.len()))?;
        let addrs: Vec<String> = chosen.iter().map(|s| s.addr().to_string()).collect();
        let url = format!(
            "redlock://{}{}",
            addrs.join(","),
            crate::redis::REDLOCK_OPTIONS
        );
        let mut conns = Vec::with_capacity(nodes);
        for server in chosen {
            conns.push(
                redis::Client::open(server.url())?
                    .get_connection_manager()
                    .await?,
            );
        }
        let locker = fencelock::connect(&url).await?;
        let mut variants = vec![
            library::acquire_release(
                format!("fencelock redlock ({nodes} nodes, parallel)"),
                locker,
                &format!("bench-s6-{nodes}"),
            ),
            sequential(nodes, conns, &format!("bench-s6-seq-{nodes}")),
        ];
        let samples = interleaved(&mut variants, plan).await?;
        report.add_acquire_release(
            &format!("S6 redlock ({nodes} nodes): parallel vs sequential"),
            &variants,
            samples,
            1,
            |_| None,
        );
    }
    Ok(())
}

/// Claim on every node, one after the other; the token is the highest count; raise on
/// every node, one after the other, only when fewer than a majority returned it (as the
/// library does); release on every node, one after the other.
fn sequential(nodes: usize, conns: Vec<ConnectionManager>, name: &str) -> Variant {
    let name = name.to_owned();
    let keys = KeySpace::new(PREFIX);
    Variant::new(
        format!("by hand, same scripts ({nodes} nodes, sequential)"),
        Role::Floor,
        move || {
            let (mut conns, keys, name) = (conns.clone(), keys.clone(), name.clone());
            async move {
                let owner = OwnerId::random();
                let mut counts = Vec::with_capacity(conns.len());
                for conn in &mut conns {
                    match scripts::claim(
                        conn,
                        &keys,
                        &name,
                        &owner,
                        TTL,
                        RedisConfig::DEFAULT_TOKEN_TTL,
                    )
                    .await?
                    {
                        Attempt::Granted(count) => counts.push(count.0),
                        Attempt::Held(_) => {
                            return Err(format!("S6: {name} was already held").into());
                        }
                    }
                }
                let highest = counts.iter().copied().max().unwrap_or(0);
                let agreeing = counts.iter().filter(|&&count| count == highest).count();
                let token = FencingToken(highest);
                let raise_needed = agreeing < conns.len() / 2 + 1;
                for conn in conns.iter_mut().filter(|_| raise_needed) {
                    let ttl = RedisConfig::DEFAULT_TOKEN_TTL;
                    if !scripts::raise(conn, &keys, &name, &owner, token, ttl).await? {
                        return Err(format!("S6: our claim of {name} was gone at raise").into());
                    }
                }
                for conn in &mut conns {
                    if !scripts::release(conn, &keys, &name, &owner, None).await? {
                        return Err(format!("S6: {name} was not ours at release").into());
                    }
                }
                Ok(())
            }
        },
    )
}
