//! etcd: the library against etcd-client doing one put-if-absent txn with a lease and
//! one delete by hand.
//! etcd's Lock RPC joins S1 as a peer; in S4 fencelock also hands off against it and
//! against a put + watch floor done by hand (`peers::etcd`).

use etcd_client::{Client, Compare, CompareOp, KvClient, PutOptions, Txn, TxnOp};
use fencelock_conformance::harness::{EtcdServer, Server};

use crate::library;
use crate::measure::{Plan, Result, Role, Variant, interleaved};
use crate::peers;
use crate::report::{OpCount, Report};

/// The floor's lease: long enough for the whole run, so it needs no keep-alive.
const FLOOR_LEASE_SECS: i64 = 600;

/// Writes per cycle (the revision rises by one per write): the put and the delete.
const WRITES_PER_CYCLE: f64 = 2.0;

/// S1 (with revisions per cycle) and S4 on one etcd member.
pub(crate) async fn run(plan: &Plan, report: &mut Report) -> Result<()> {
    let server = EtcdServer::start().await?;
    let client = Client::connect([format!("http://{}", server.addr())], None).await?;
    let lease = client
        .lease_client()
        .grant(FLOOR_LEASE_SECS, None)
        .await?
        .id();

    let lib = fencelock::connect(&server.url()).await?;
    let endpoint = format!("http://{}", server.addr());
    let mut variants = vec![
        library::acquire_release("fencelock etcd", lib, "bench-s1"),
        floor(client.kv_client(), lease),
        peers::etcd::acquire_release(&endpoint, "bench-s1-peer").await?,
    ];
    let samples = interleaved(&mut variants, plan).await?;
    report.add_acquire_release("etcd", &variants, samples, 1, |_| Some(1.2));

    let mut kv = client.kv_client();
    // The library and the floor; the Lock RPC peer is not counted.
    for variant in &mut variants[..2] {
        let before = revision(&mut kv).await?;
        variant.run(plan.counted_cycles).await?;
        let after = revision(&mut kv).await?;
        report.op_counts.push(OpCount {
            store: "etcd".into(),
            variant: variant.label.clone(),
            role: variant.role,
            unit: "revisions (writes)",
            per_cycle: (after - before) as f64 / plan.counted_cycles as f64,
            expected: WRITES_PER_CYCLE,
            detail: "header revision delta".into(),
        });
    }

    let mut get = round_trip(client.kv_client());
    let measured = library::handoff(&server.url(), "bench-s4", &mut get, plan).await?;
    report.add_handoff("etcd", &get, measured, Some(2.0));

    let name = "bench-s4-peers";
    let ours = peers::Handoff::new(
        "fencelock etcd",
        Role::Library,
        peers::fencelock_side(fencelock::connect(&server.url()).await?, name),
        peers::fencelock_side(fencelock::connect(&server.url()).await?, name),
    );
    let others = peers::etcd::handoffs(&endpoint, name).await?;
    peers::compare_handoffs("etcd", ours, others, plan, report).await?;
    Ok(())
}

/// A txn putting the key with the lease if it does not exist, then a delete.
fn floor(kv: KvClient, lease: i64) -> Variant {
    const KEY: &str = "bench-floor/s1";
    Variant::new("etcd-client txn put + delete", Role::Floor, move || {
        let mut kv = kv.clone();
        async move {
            let txn = Txn::new()
                .when([Compare::create_revision(KEY, CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    KEY,
                    "floor",
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            if !kv.txn(txn).await?.succeeded() {
                return Err(format!("floor: {KEY} already existed").into());
            }
            kv.delete(KEY, None).await?;
            Ok(())
        }
    })
}

fn round_trip(kv: KvClient) -> Variant {
    Variant::new("etcd get", Role::Floor, move || {
        let mut kv = kv.clone();
        async move {
            kv.get("bench-floor/ping", None).await?;
            Ok(())
        }
    })
}

async fn revision(kv: &mut KvClient) -> Result<i64> {
    let reply = kv.get("bench-floor/revision", None).await?;
    Ok(reply
        .header()
        .ok_or("etcd sent no response header")?
        .revision())
}
