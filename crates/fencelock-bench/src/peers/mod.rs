//! Peers, the hand-made S4 floors and S6 (issue 9): the crates a user would pick
//! instead of fencelock, measured interleaved with fencelock and the floor.
//!
//! - S1 peers are plain [`Variant`](crate::measure::Variant)s added to each store's
//!   S1 run (`redis` needs the `peers` feature; [`etcd`] and [`zookeeper`] use the
//!   client crates fencelock already depends on).
//! - S4 hand-offs of fencelock, a hand-made floor and the peers run here in turns
//!   (A B C A B C …), one hand-off of each per round: see [`handoffs`] and
//!   [`compare_handoffs`].
//! - S6 (Redlock over 3 and 5 nodes, parallel vs sequential) is in [`s6`].

pub(crate) mod etcd;
#[cfg(feature = "peers")]
pub(crate) mod redis;
pub(crate) mod s6;
pub(crate) mod zookeeper;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fencelock::Locker;

use crate::library::TTL;
use crate::measure::{CYCLE_LIMIT, Plan, Result, Role, Samples};

/// How long the waiter of a hand-off gets to start waiting before the holder
/// releases (the same as fencelock's own S4), plus a random part below
/// [`SETTLE_JITTER`].
const WAITER_SETTLES: Duration = Duration::from_millis(30);

/// The release comes at a uniformly random point of a polling peer's interval (10 ms
/// for distributed-lock; rslock's pauses are random already) rather than in step with
/// it: a fixed wait of 30 ms would put it just before every third poll.
const SETTLE_JITTER: Duration = Duration::from_millis(20);

type Step<T> = Pin<Box<dyn Future<Output = Result<T>> + Send>>;
type HandoffFuture = Pin<Box<dyn Future<Output = Result<Duration>> + Send>>;

/// One client of a hand-off: how it takes the lock (waiting if held) and gives it back.
pub(crate) struct Side<H> {
    acquire: Arc<dyn Fn() -> Step<H> + Send + Sync>,
    release: Arc<dyn Fn(H) -> Step<()> + Send + Sync>,
}

impl<H> Clone for Side<H> {
    fn clone(&self) -> Self {
        Self {
            acquire: Arc::clone(&self.acquire),
            release: Arc::clone(&self.release),
        }
    }
}

impl<H: Send + 'static> Side<H> {
    /// `acquire` must wait while the lock is held (by notification, polling or
    /// whatever the crate does) and return once granted.
    pub(crate) fn new<A, AF, R, RF>(acquire: A, release: R) -> Self
    where
        A: Fn() -> AF + Send + Sync + 'static,
        AF: Future<Output = Result<H>> + Send + 'static,
        R: Fn(H) -> RF + Send + Sync + 'static,
        RF: Future<Output = Result<()>> + Send + 'static,
    {
        Self {
            acquire: Arc::new(move || Box::pin(acquire())),
            release: Arc::new(move |held| Box::pin(release(held))),
        }
    }
}

/// fencelock through `locker`: `lock(name).wait(..)` and `guard.release()`.
pub(crate) fn fencelock_side(locker: Locker, name: &str) -> Side<fencelock::LockGuard> {
    let name = name.to_owned();
    Side::new(
        move || {
            let (locker, name) = (locker.clone(), name.clone());
            async move { Ok(locker.lock(&name).ttl(TTL).wait(CYCLE_LIMIT).await?) }
        },
        |guard: fencelock::LockGuard| async move { Ok(guard.release().await?) },
    )
}

/// One contender of S4: a label and one timed hand-off between two clients.
pub(crate) struct Handoff {
    pub(crate) label: String,
    pub(crate) role: Role,
    once: Box<dyn FnMut() -> HandoffFuture + Send>,
}

impl Handoff {
    /// A hand-off from `holder` to `waiter` (two clients of the same kind): the holder
    /// takes the lock, the waiter starts waiting, and after [`WAITER_SETTLES`] (plus a
    /// random part below [`SETTLE_JITTER`]) the holder releases; the time runs from just
    /// before the release call to the grant.
    pub(crate) fn new<H: Send + 'static>(
        label: impl Into<String>,
        role: Role,
        holder: Side<H>,
        waiter: Side<H>,
    ) -> Self {
        let label = label.into();
        let name = label.clone();
        Self {
            label,
            role,
            once: Box::new(move || {
                let (holder, waiter, name) = (holder.clone(), waiter.clone(), name.clone());
                Box::pin(async move { handoff_once(&name, holder, waiter).await })
            }),
        }
    }
}

async fn handoff_once<H: Send + 'static>(
    label: &str,
    holder: Side<H>,
    waiter: Side<H>,
) -> Result<Duration> {
    let held = tokio::time::timeout(CYCLE_LIMIT, (holder.acquire)())
        .await
        .map_err(|_| format!("{label}: the holder was not granted within {CYCLE_LIMIT:?}"))??;
    let waiting = tokio::spawn(async move {
        let next = tokio::time::timeout(CYCLE_LIMIT, (waiter.acquire)())
            .await
            .map_err(|_| format!("the waiter was not granted within {CYCLE_LIMIT:?}"))??;
        let granted_at = Instant::now();
        (waiter.release)(next).await?;
        Ok::<Instant, crate::measure::BoxError>(granted_at)
    });
    let jitter = SETTLE_JITTER.mul_f64(fastrand::f64());
    tokio::time::sleep(WAITER_SETTLES + jitter).await;
    if waiting.is_finished() {
        let outcome = waiting.await?;
        // Give the lock back so the next round starts from a free lock.
        (holder.release)(held).await?;
        return Err(match outcome {
            Ok(_) => format!("{label}: the waiter was granted while the lock was held").into(),
            Err(err) => {
                format!("{label}: the waiter gave up while the lock was held: {err}").into()
            }
        });
    }
    let release_called = Instant::now();
    (holder.release)(held).await?;
    let granted_at = tokio::time::timeout(CYCLE_LIMIT, waiting)
        .await
        .map_err(|_| format!("{label}: no hand-off within {CYCLE_LIMIT:?}"))???;
    Ok(granted_at.saturating_duration_since(release_called))
}

/// Runs one hand-off of each contender per round (A B C A B C …), `plan.warmup / 5`
/// (at least 1) unmeasured rounds first, up to `plan.handoffs` measured rounds or until
/// `plan.budget` is spent (after a whole round, so every contender has as many).
pub(crate) async fn handoffs(contenders: &mut [Handoff], plan: &Plan) -> Result<Vec<Samples>> {
    for _ in 0..(plan.warmup / 5).max(1) {
        for contender in contenders.iter_mut() {
            (contender.once)().await?;
        }
    }
    let mut samples = vec![Samples::default(); contenders.len()];
    let started = Instant::now();
    for _ in 0..plan.handoffs {
        for (contender, samples) in contenders.iter_mut().zip(&mut samples) {
            samples.push((contender.once)().await?);
        }
        if started.elapsed() > plan.budget {
            break;
        }
    }
    Ok(samples)
}

/// What fencelock's hand-off is held to against one other contender of S4.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Against {
    /// A hand-off done by hand with the same client crate: fencelock within `x` times.
    Floor(f64),
    /// A peer that waits by polling: fencelock at least `x` times faster.
    #[cfg_attr(not(feature = "peers"), allow(dead_code))]
    PollingPeer(f64),
    /// A peer that waits by notification: reported, no target.
    Peer,
}

impl Against {
    /// The bound on fencelock's p50 as a multiple of the other's p50, if any.
    pub(crate) fn bound(self) -> Option<f64> {
        match self {
            Against::Floor(within) => Some(within),
            Against::PollingPeer(faster) => Some(1.0 / faster),
            Against::Peer => None,
        }
    }
}

/// S4 comparison rows for `store`: `fencelock` (its own hand-off) and `others`, run in
/// turns by [`handoffs`]; one row per other contender with fencelock's p50 as a
/// multiple of that contender's p50 (the row's "round trip" is the contender compared
/// with). A target `≥ x× faster` is written as the bound `1/x` on that multiple.
pub(crate) async fn compare_handoffs(
    store: &str,
    fencelock: Handoff,
    others: Vec<(Handoff, Against)>,
    plan: &Plan,
    report: &mut crate::report::Report,
) -> Result<()> {
    let mut contenders = vec![fencelock];
    let mut against = Vec::new();
    for (contender, held_to) in others {
        contenders.push(contender);
        against.push(held_to);
    }
    let mut samples = handoffs(&mut contenders, plan).await?;
    let ours_p50 = samples[0].percentile(50.0);
    let ours_p99 = samples[0].percentile(99.0);
    let ours_count = samples[0].len();
    for ((contender, theirs), held_to) in contenders[1..].iter().zip(&mut samples[1..]).zip(against)
    {
        let theirs_p50 = theirs.percentile(50.0);
        let target = held_to.bound();
        report.handoffs.push(crate::report::Handoff {
            store: format!("{store}, fencelock vs {}", contender.role.as_str()),
            handoffs: ours_count,
            p50_us: ours_p50,
            p99_us: ours_p99,
            round_trip: format!(
                "{} (its p99 {:.0} µs)",
                contender.label,
                theirs.percentile(99.0)
            ),
            round_trip_p50_us: theirs_p50,
            ratio: ours_p50 / theirs_p50,
            target,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_times_faster_than_a_polling_peer_is_a_bound_of_a_tenth() {
        let bound = Against::PollingPeer(10.0).bound().unwrap();
        // 0.5 ms against a peer's 20 ms is 40× faster: met; 5 ms against 20 ms is not.
        assert!(0.5 / 20.0 <= bound);
        assert!(5.0 / 20.0 > bound);
        assert_eq!(Against::Floor(2.0).bound(), Some(2.0));
        assert_eq!(Against::Peer.bound(), None);
    }
}
