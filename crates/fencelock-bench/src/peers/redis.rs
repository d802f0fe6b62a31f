//! Redis and Redlock peers: `rslock` 0.10 and `distributed-lock` 0.2's Redis backend
//! (`distributed-lock-redis`), each on one node and over the same 5 nodes as
//! fencelock's Redlock.

use std::time::{Duration, Instant};

use distributed_lock_core::{DistributedLock, LockHandle, LockProvider};
use distributed_lock_redis::{RedisLockHandle, RedisLockProvider};
use rslock::{LockGuard, LockManager};

use crate::library::TTL;
use crate::measure::{CYCLE_LIMIT, Result, Role, Variant};
use crate::peers::{Against, Handoff, Side};

/// How often the distributed-lock waiter of S4 looks again: its `acquire(timeout)`
/// does not wait (one attempt, then `Timeout` at once), so a user polls by hand.
pub(crate) const DISTRIBUTED_LOCK_POLL: Duration = Duration::from_millis(10);

/// The node URLs (`redis://host:port`) a peer is pointed at.
pub(crate) type Nodes = Vec<String>;

fn plural(nodes: &Nodes) -> String {
    match nodes.len() {
        1 => "1 node".to_owned(),
        n => format!("{n} nodes"),
    }
}

/// rslock with its defaults (3 tries per `lock`, random pause up to 200 ms between).
fn rslock_manager(nodes: &Nodes) -> LockManager {
    LockManager::new(nodes.clone())
}

/// distributed-lock's provider with the benchmark's TTL. Its default minimum validity
/// (27 s) exceeds a 10 s expiry and would leave no time to acquire, so it is set to
/// 90 % of the TTL, as its default is of its default expiry.
async fn provider(nodes: &Nodes) -> Result<RedisLockProvider> {
    Ok(RedisLockProvider::builder()
        .urls(nodes)
        .expiry(TTL)
        .min_validity(TTL * 9 / 10)
        .extension_cadence(TTL / 3)
        .build()
        .await?)
}

/// S1 peers on `nodes`: rslock `lock` + `release`; on one node also distributed-lock
/// `try_acquire` + `release`.
///
/// distributed-lock is left out over several nodes: its Redlock returns once a majority
/// granted and aborts the requests still in flight, and its release deletes only on the
/// nodes that had answered, so claims left on the slower nodes stay until their TTL
/// and refuse the next acquisitions (read in its source, `redlock/acquire.rs` and
/// `redlock/release.rs`).
pub(crate) async fn acquire_release(nodes: &Nodes, name: &str) -> Result<Vec<Variant>> {
    let manager = rslock_manager(nodes);
    let rslock_name = format!("{name}-rslock");
    let rslock = Variant::new(
        format!("rslock 0.10 ({})", plural(nodes)),
        Role::Peer,
        move || {
            let (manager, name) = (manager.clone(), rslock_name.clone());
            async move {
                let lock = manager.lock(name.as_str(), TTL).await?;
                lock.release().await;
                Ok(())
            }
        },
    );
    if nodes.len() > 1 {
        return Ok(vec![rslock]);
    }
    let provider = std::sync::Arc::new(provider(nodes).await?);
    let dl_name = format!("{name}-distributed-lock");
    let distributed = Variant::new(
        format!("distributed-lock-redis 0.2 ({})", plural(nodes)),
        Role::Peer,
        move || {
            let (provider, name) = (provider.clone(), dl_name.clone());
            async move {
                let handle = provider
                    .create_lock(&name)
                    .try_acquire()
                    .await?
                    .ok_or_else(|| format!("distributed-lock: {name} was already held"))?;
                handle.release().await?;
                Ok(())
            }
        },
    );
    Ok(vec![rslock, distributed])
}

fn rslock_side(nodes: &Nodes, name: &str) -> Side<LockGuard> {
    let manager = rslock_manager(nodes);
    let name = name.to_owned();
    Side::new(
        move || {
            let (manager, name) = (manager.clone(), name.clone());
            // `acquire` loops until granted: `lock` (up to 3 tries, random pauses up to
            // 200 ms between them), again and again.
            async move { Ok(manager.acquire(name.as_str(), TTL).await?) }
        },
        |guard: LockGuard| async move {
            guard.release().await;
            Ok(())
        },
    )
}

async fn distributed_lock_side(nodes: &Nodes, name: &str) -> Result<Side<RedisLockHandle>> {
    let provider = std::sync::Arc::new(provider(nodes).await?);
    let name = name.to_owned();
    Ok(Side::new(
        move || {
            let (provider, name) = (provider.clone(), name.clone());
            async move {
                let started = Instant::now();
                loop {
                    if let Some(handle) = provider.create_lock(&name).try_acquire().await? {
                        return Ok(handle);
                    }
                    if started.elapsed() > CYCLE_LIMIT {
                        return Err(format!("distributed-lock: {name} not granted").into());
                    }
                    tokio::time::sleep(DISTRIBUTED_LOCK_POLL).await;
                }
            }
        },
        |handle: RedisLockHandle| async move { Ok(handle.release().await?) },
    ))
}

/// S4 peers on `nodes`: an rslock and (on one node, see [`acquire_release`]) a
/// distributed-lock hand-off, each between two clients of their own.
pub(crate) async fn handoffs(nodes: &Nodes, name: &str) -> Result<Vec<(Handoff, Against)>> {
    let rslock_name = format!("{name}-rslock");
    let dl_name = format!("{name}-distributed-lock");
    // Issue 9: fencelock's hand-off at least 10× faster than poll-based peers at p50.
    let mut contenders = vec![(
        Handoff::new(
            format!(
                "rslock 0.10 ({}; acquire polls, pauses ≤ 200 ms)",
                plural(nodes)
            ),
            Role::Peer,
            rslock_side(nodes, &rslock_name),
            rslock_side(nodes, &rslock_name),
        ),
        Against::PollingPeer(10.0),
    )];
    if nodes.len() > 1 {
        return Ok(contenders);
    }
    contenders.push((
        Handoff::new(
            format!(
                "distributed-lock-redis 0.2 ({}; try_acquire polled every {} ms by hand)",
                plural(nodes),
                DISTRIBUTED_LOCK_POLL.as_millis()
            ),
            Role::Peer,
            distributed_lock_side(nodes, &dl_name).await?,
            distributed_lock_side(nodes, &dl_name).await?,
        ),
        Against::PollingPeer(10.0),
    ));
    Ok(contenders)
}

/// Checks what the S4 label says of distributed-lock: `acquire(Some(wait))` on a held
/// lock gives up long before `wait` instead of waiting. Returns how long it took.
pub(crate) async fn distributed_lock_acquire_does_not_wait(nodes: &Nodes) -> Result<Duration> {
    let provider = provider(nodes).await?;
    let name = "bench-peer-does-not-wait";
    let held = provider
        .create_lock(name)
        .try_acquire()
        .await?
        .ok_or("distributed-lock: the check's lock was already held")?;
    let wait = Duration::from_secs(2);
    let started = Instant::now();
    let outcome = provider.create_lock(name).acquire(Some(wait)).await;
    let took = started.elapsed();
    held.release().await?;
    match outcome {
        Ok(_) => Err("distributed-lock granted a lock that was held".into()),
        Err(_) if took >= wait => Err(format!(
            "distributed-lock's acquire waited {took:?}: it does wait; fix the S4 label"
        )
        .into()),
        Err(_) => Ok(took),
    }
}
