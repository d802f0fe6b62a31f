//! fencelock's side of each scenario, the same for every store: only the URL differs.

use std::time::{Duration, Instant};

use fencelock::Locker;

use crate::measure::{CYCLE_LIMIT, Plan, Result, Role, Samples, Variant};

/// The lease asked for in every scenario (the floors use the same).
pub(crate) const TTL: Duration = Duration::from_secs(10);

/// How long the waiter of S4 gets to start waiting before the holder releases.
pub(crate) const WAITER_SETTLES: Duration = Duration::from_millis(30);

/// Round trips of the floor timed after each hand-off, so both interleave: the first
/// after the same pause as the hand-off (every thread and the server idle for
/// [`WAITER_SETTLES`], as when the release is called), the rest back to back (warm).
const ROUND_TRIPS_PER_HANDOFF: usize = 5;

/// S1: `lock(name).no_wait()` then `guard.release()`.
pub(crate) fn acquire_release(label: impl Into<String>, locker: Locker, name: &str) -> Variant {
    let name = name.to_owned();
    Variant::new(label, Role::Library, move || {
        let locker = locker.clone();
        let name = name.clone();
        async move {
            let guard = locker.lock(&name).ttl(TTL).no_wait().await?;
            guard.release().await?;
            Ok(())
        }
    })
}

/// S4: holder A (one connection) holds `name`, waiter B (another connection) waits
/// for it; the latency runs from just before A's release call to B's grant. After
/// each hand-off, `round_trip` (one trivial command on the same server) is timed
/// [`ROUND_TRIPS_PER_HANDOFF`] times, the first after the same idle pause as the
/// release. Returns (hand-offs, round trips after the pause, warm round trips).
pub(crate) async fn handoff(
    url: &str,
    name: &str,
    round_trip: &mut Variant,
    plan: &Plan,
) -> Result<(Samples, Samples, Samples)> {
    let holder = fencelock::connect(url).await?;
    let waiter = fencelock::connect(url).await?;
    round_trip.run(plan.warmup).await?;
    let mut handoffs = Samples::default();
    let mut round_trips = Samples::default();
    let mut warm_round_trips = Samples::default();
    let started = Instant::now();
    for _ in 0..plan.handoffs {
        let held = holder.lock(name).ttl(TTL).no_wait().await?;
        let next = waiter.clone();
        let next_name = name.to_owned();
        let waiting = tokio::spawn(async move {
            let guard = next.lock(&next_name).ttl(TTL).wait(CYCLE_LIMIT).await?;
            let granted_at = Instant::now();
            guard.release().await?;
            Ok::<Instant, fencelock::Error>(granted_at)
        });
        tokio::time::sleep(WAITER_SETTLES).await;
        if waiting.is_finished() {
            return Err(
                format!("S4 on {url}: the waiter was granted `{name}` while it was held").into(),
            );
        }
        let release_called = Instant::now();
        held.release().await?;
        let granted_at = tokio::time::timeout(CYCLE_LIMIT, waiting)
            .await
            .map_err(|_| format!("S4 on {url}: no hand-off within {CYCLE_LIMIT:?}"))???;
        handoffs.push(granted_at.saturating_duration_since(release_called));
        tokio::time::sleep(WAITER_SETTLES).await;
        round_trips.push(round_trip.time_once().await?);
        for _ in 1..ROUND_TRIPS_PER_HANDOFF {
            warm_round_trips.push(round_trip.time_once().await?);
        }
        if started.elapsed() > plan.budget {
            break;
        }
    }
    Ok((handoffs, round_trips, warm_round_trips))
}
