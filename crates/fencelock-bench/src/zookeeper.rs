//! ZooKeeper: the library against zookeeper-client creating an ephemeral-sequential
//! node, listing the children and deleting the node by hand.
//! zookeeper-client's lock recipe joins S1 as a peer; in S4 fencelock also hands off
//! against it and against an exists-watch floor done by hand
//! (`peers::zookeeper`).

use std::time::Duration;

use fencelock_conformance::harness::{Server, ZooKeeper};
use zookeeper_client::{Acls, Client, CreateMode};

use crate::library;
use crate::measure::{Plan, Result, Role, Variant, interleaved};
use crate::peers;
use crate::report::Report;

const FLOOR_DIR: &str = "/bench-floor";

/// S1 and S4 on one standalone ZooKeeper.
pub(crate) async fn run(plan: &Plan, report: &mut Report) -> Result<()> {
    let server = ZooKeeper::start().await?;
    let client = Client::connector()
        .with_session_timeout(Duration::from_secs(4))
        .connect(&server.addr().to_string())
        .await?;
    let persistent = CreateMode::Persistent.with_acls(Acls::anyone_all());
    match client.create(FLOOR_DIR, b"", &persistent).await {
        Ok(_) | Err(zookeeper_client::Error::NodeExists) => {}
        Err(err) => return Err(err.into()),
    }

    let lib = fencelock::connect(&server.url()).await?;
    let addr = server.addr().to_string();
    let mut variants = vec![
        library::acquire_release("fencelock zookeeper", lib, "bench-s1"),
        floor(client.clone()),
        peers::zookeeper::acquire_release(&addr, "s1").await?,
    ];
    let samples = interleaved(&mut variants, plan).await?;
    report.add_acquire_release("zookeeper", &variants, samples, 1, |_| Some(1.2));

    let mut exists = round_trip(client);
    let measured = library::handoff(&server.url(), "bench-s4", &mut exists, plan).await?;
    report.add_handoff("zookeeper", &exists, measured, None);

    let name = "bench-s4-peers";
    let ours = peers::Handoff::new(
        "fencelock zookeeper",
        Role::Library,
        peers::fencelock_side(fencelock::connect(&server.url()).await?, name),
        peers::fencelock_side(fencelock::connect(&server.url()).await?, name),
    );
    let others = peers::zookeeper::handoffs(&addr, "s4").await?;
    peers::compare_handoffs("zookeeper", ours, others, plan, report).await?;
    Ok(())
}

/// create ephemeral-sequential + get_children + delete.
fn floor(client: Client) -> Variant {
    Variant::new(
        "zookeeper-client create + children + delete",
        Role::Floor,
        move || {
            let client = client.clone();
            async move {
                let ephemeral = CreateMode::EphemeralSequential.with_acls(Acls::anyone_all());
                let prefix = format!("{FLOOR_DIR}/lock-");
                let (_, sequence) = client.create(&prefix, b"floor", &ephemeral).await?;
                let path = format!("{prefix}{sequence}");
                let (children, _) = client.get_children(FLOOR_DIR).await?;
                if children.len() != 1 {
                    return Err(
                        format!("floor: {FLOOR_DIR} has {} children", children.len()).into(),
                    );
                }
                client.delete(&path, None).await?;
                Ok(())
            }
        },
    )
}

fn round_trip(client: Client) -> Variant {
    Variant::new("zookeeper exists", Role::Floor, move || {
        let client = client.clone();
        async move {
            client.check_stat(FLOOR_DIR).await?;
            Ok(())
        }
    })
}
