//! etcd: the peer is etcd's own Lock RPC through etcd-client (`lock` with a lease,
//! `unlock`); the S4 floor is a hand-off done by hand with the same crate: the waiter
//! watches the holder's key for its delete, then puts its own.

use etcd_client::{
    Client, Compare, CompareOp, EventType, LockOptions, PutOptions, Txn, TxnOp, WatchFilterType,
    WatchOptions,
};

use crate::measure::{Result, Role, Variant};
use crate::peers::{Against, Handoff, Side};

/// Every lease here outlives the whole run, so none needs a keep-alive.
const LEASE_SECS: i64 = 600;

/// A client of its own and a lease of its own (two Lock RPC callers sharing a lease
/// would count as one acquisition).
async fn client_with_lease(endpoint: &str) -> Result<(Client, i64)> {
    let client = Client::connect([endpoint], None).await?;
    let lease = client.lease_client().grant(LEASE_SECS, None).await?.id();
    Ok((client, lease))
}

/// S1 peer: `lock(name, with_lease)` then `unlock(key)`.
pub(crate) async fn acquire_release(endpoint: &str, name: &str) -> Result<Variant> {
    let (client, lease) = client_with_lease(endpoint).await?;
    let name = name.to_owned();
    Ok(Variant::new(
        "etcd-client Lock RPC (lock + unlock)",
        Role::Peer,
        move || {
            let (mut client, name) = (client.clone(), name.clone());
            async move {
                let locked = client
                    .lock(name, Some(LockOptions::new().with_lease(lease)))
                    .await?;
                client.unlock(locked.key()).await?;
                Ok(())
            }
        },
    ))
}

async fn lock_rpc_side(endpoint: &str, name: &str) -> Result<Side<Vec<u8>>> {
    let (client, lease) = client_with_lease(endpoint).await?;
    let name = name.to_owned();
    let unlocker = client.clone();
    Ok(Side::new(
        move || {
            let (mut client, name) = (client.clone(), name.clone());
            async move {
                let locked = client
                    .lock(name, Some(LockOptions::new().with_lease(lease)))
                    .await?;
                Ok(locked.key().to_vec())
            }
        },
        move |key: Vec<u8>| {
            let mut client = unlocker.clone();
            async move {
                client.unlock(key).await?;
                Ok(())
            }
        },
    ))
}

/// The hand-made floor: put `key` with our lease iff it does not exist; if it does,
/// watch it from the next revision for its delete, then try the put again.
async fn floor_side(endpoint: &str, key: &str) -> Result<Side<()>> {
    let (client, lease) = client_with_lease(endpoint).await?;
    let key = key.to_owned();
    let (releaser, release_key) = (client.clone(), key.clone());
    Ok(Side::new(
        move || {
            let (mut client, key) = (client.clone(), key.clone());
            async move {
                loop {
                    let txn = Txn::new()
                        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(
                            key.as_str(),
                            "floor",
                            Some(PutOptions::new().with_lease(lease)),
                        )]);
                    let put = client.txn(txn).await?;
                    if put.succeeded() {
                        return Ok(());
                    }
                    let seen = put
                        .header()
                        .ok_or("etcd sent no response header")?
                        .revision();
                    let options = WatchOptions::new()
                        .with_start_revision(seen + 1)
                        .with_filters([WatchFilterType::NoPut]);
                    let mut stream = client.watch(key.as_str(), Some(options)).await?;
                    while let Some(reply) = stream.message().await? {
                        if reply.canceled() {
                            return Err(format!(
                                "etcd canceled the watch of {key}: {}",
                                reply.cancel_reason()
                            )
                            .into());
                        }
                        if reply
                            .events()
                            .iter()
                            .any(|event| event.event_type() == EventType::Delete)
                        {
                            break;
                        }
                    }
                }
            }
        },
        move |()| {
            let (mut client, key) = (releaser.clone(), release_key.clone());
            async move {
                client.delete(key, None).await?;
                Ok(())
            }
        },
    ))
}

/// S4 on one etcd: the hand-made put+watch floor, then the Lock RPC peer, each with
/// what fencelock is held to against it.
pub(crate) async fn handoffs(endpoint: &str, name: &str) -> Result<Vec<(Handoff, Against)>> {
    let floor_key = format!("bench-floor/{name}");
    let peer_name = format!("{name}-lock-rpc");
    Ok(vec![
        (
            Handoff::new(
                "hand-made floor: etcd-client put-if-absent + watch for the delete",
                Role::Floor,
                floor_side(endpoint, &floor_key).await?,
                floor_side(endpoint, &floor_key).await?,
            ),
            // Issue 5: hand-off p50 within 2× of this floor.
            Against::Floor(2.0),
        ),
        (
            Handoff::new(
                "etcd-client Lock RPC (server-side wait)",
                Role::Peer,
                lock_rpc_side(endpoint, &peer_name).await?,
                lock_rpc_side(endpoint, &peer_name).await?,
            ),
            Against::Peer,
        ),
    ])
}
