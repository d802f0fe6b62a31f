//! ZooKeeper: the peer is zookeeper-client's own lock recipe (`Client::lock` with
//! Curator's layout; it is released by dropping it, which deletes the node in the
//! background); the S4 floor is a hand-off done by hand with the same crate: an
//! ephemeral node and an exists-watch on it.

use std::time::Duration;

use zookeeper_client::{
    Acls, Client, CreateMode, Error as ZkError, LockOptions, LockPrefix, OwnedLockClient,
};

use crate::measure::{Result, Role, Variant};
use crate::peers::{Against, Handoff, Side};

/// Where the peer's and the floor's nodes live.
const DIR: &str = "/bench-peer";

/// Every client here: the same session timeout as the floor of S1.
async fn connect(addr: &str) -> Result<Client> {
    Ok(Client::connector()
        .with_session_timeout(Duration::from_secs(4))
        .connect(addr)
        .await?)
}

/// Creates `path` (persistent) unless it exists.
async fn ensure_dir(client: &Client, path: &str) -> Result<()> {
    let persistent = CreateMode::Persistent.with_acls(Acls::anyone_all());
    match client.create(path, b"", &persistent).await {
        Ok(_) | Err(ZkError::NodeExists) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// The recipe's lock on `{DIR}/{name}`: ephemeral-sequential
/// `_c_{uuid}-lock-NNNNNNNNNN`, waiting on its predecessor.
async fn recipe_lock(client: &Client, dir: &str) -> Result<OwnedLockClient> {
    let prefix = LockPrefix::new_curator(dir, "lock-")?;
    let lock = client
        .lock(prefix, b"", LockOptions::new(Acls::anyone_all()))
        .await?;
    Ok(lock.into_owned())
}

/// S1 peer: `lock` then drop (the crate's release).
pub(crate) async fn acquire_release(addr: &str, name: &str) -> Result<Variant> {
    let client = connect(addr).await?;
    ensure_dir(&client, DIR).await?;
    let dir = format!("{DIR}/{name}");
    ensure_dir(&client, &dir).await?;
    Ok(Variant::new(
        "zookeeper-client lock recipe (lock + drop)",
        Role::Peer,
        move || {
            let (client, dir) = (client.clone(), dir.clone());
            async move {
                let lock = recipe_lock(&client, &dir).await?;
                drop(lock);
                Ok(())
            }
        },
    ))
}

async fn recipe_side(addr: &str, dir: &str) -> Result<Side<OwnedLockClient>> {
    let client = connect(addr).await?;
    let dir = dir.to_owned();
    Ok(Side::new(
        move || {
            let (client, dir) = (client.clone(), dir.clone());
            async move { recipe_lock(&client, &dir).await }
        },
        |lock: OwnedLockClient| async move {
            drop(lock);
            Ok(())
        },
    ))
}

/// The hand-made floor: create the ephemeral `path`; if it exists, watch it with
/// `exists` and try again once it changes.
async fn floor_side(addr: &str, path: &str) -> Result<Side<()>> {
    let client = connect(addr).await?;
    let path = path.to_owned();
    let (releaser, release_path) = (client.clone(), path.clone());
    Ok(Side::new(
        move || {
            let (client, path) = (client.clone(), path.clone());
            async move {
                let ephemeral = CreateMode::Ephemeral.with_acls(Acls::anyone_all());
                loop {
                    match client.create(&path, b"floor", &ephemeral).await {
                        Ok(_) => return Ok(()),
                        Err(ZkError::NodeExists) => {}
                        Err(err) => return Err(err.into()),
                    }
                    let (stat, watcher) = client.check_and_watch_stat(&path).await?;
                    if stat.is_some() {
                        watcher.changed().await;
                    }
                }
            }
        },
        move |()| {
            let (client, path) = (releaser.clone(), release_path.clone());
            async move {
                client.delete(&path, None).await?;
                Ok(())
            }
        },
    ))
}

/// S4 on one ZooKeeper: the hand-made exists-watch floor, then the recipe peer, each
/// with what fencelock is held to against it.
pub(crate) async fn handoffs(addr: &str, name: &str) -> Result<Vec<(Handoff, Against)>> {
    let setup = connect(addr).await?;
    ensure_dir(&setup, DIR).await?;
    let dir = format!("{DIR}/{name}");
    ensure_dir(&setup, &dir).await?;
    let floor_path = format!("{DIR}/{name}-floor");
    Ok(vec![
        (
            Handoff::new(
                "hand-made floor: zookeeper-client ephemeral node + exists-watch",
                Role::Floor,
                floor_side(addr, &floor_path).await?,
                floor_side(addr, &floor_path).await?,
            ),
            // Issue 6: hand-off p50 within 2× of this floor.
            Against::Floor(2.0),
        ),
        (
            Handoff::new(
                "zookeeper-client lock recipe (predecessor watch; release by drop)",
                Role::Peer,
                recipe_side(addr, &dir).await?,
                recipe_side(addr, &dir).await?,
            ),
            Against::Peer,
        ),
    ])
}
