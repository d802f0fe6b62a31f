//! Timing: the variants of a scenario, their interleaved runs, and percentiles.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

/// Any error of a benchmark run; the run stops and prints it.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The result of benchmark steps.
pub(crate) type Result<T, E = BoxError> = std::result::Result<T, E>;

type CycleFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// The longest one cycle (acquire+release, or one round trip) may take before the run
/// fails: every loop is bounded in time as well as in count.
pub(crate) const CYCLE_LIMIT: Duration = Duration::from_secs(10);

/// How much to measure; `quick` checks that everything runs, `full` is for the README.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    /// Unmeasured cycles per variant before the first repetition.
    pub(crate) warmup: usize,
    /// Rounds of A B A B …
    pub(crate) repetitions: usize,
    /// Consecutive cycles of one variant within a repetition.
    pub(crate) per_repetition: usize,
    /// Hand-offs measured per store in S4.
    pub(crate) handoffs: usize,
    /// Cycles run between two server-counter snapshots.
    pub(crate) counted_cycles: usize,
    /// No new repetition starts after this long in one scenario of one store.
    pub(crate) budget: Duration,
}

impl Plan {
    pub(crate) const QUICK: Plan = Plan {
        warmup: 5,
        repetitions: 2,
        per_repetition: 20,
        handoffs: 5,
        counted_cycles: 20,
        budget: Duration::from_secs(3),
    };

    pub(crate) const FULL: Plan = Plan {
        warmup: 50,
        repetitions: 10,
        per_repetition: 200,
        handoffs: 100,
        counted_cycles: 200,
        budget: Duration::from_secs(20),
    };
}

/// What a variant stands for in the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// fencelock itself.
    Library,
    /// The same client crate doing the minimal commands by hand.
    Floor,
    /// A crate a user would pick instead of fencelock.
    Peer,
}

impl Role {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Library => "library",
            Role::Floor => "floor",
            Role::Peer => "peer",
        }
    }
}

/// One contender of a scenario: a label and one cycle to time.
pub(crate) struct Variant {
    pub(crate) label: String,
    pub(crate) role: Role,
    cycle: Box<dyn FnMut() -> CycleFuture + Send>,
}

impl Variant {
    pub(crate) fn new<F, Fut>(label: impl Into<String>, role: Role, mut cycle: F) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        Self {
            label: label.into(),
            role,
            cycle: Box::new(move || Box::pin(cycle())),
        }
    }

    /// Runs one cycle and returns how long it took.
    pub(crate) async fn time_once(&mut self) -> Result<Duration> {
        let start = Instant::now();
        match tokio::time::timeout(CYCLE_LIMIT, (self.cycle)()).await {
            Ok(done) => done.map_err(|err| format!("{}: {err}", self.label))?,
            Err(_) => {
                return Err(format!("{}: one cycle took over {CYCLE_LIMIT:?}", self.label).into());
            }
        }
        Ok(start.elapsed())
    }

    /// Runs `count` cycles without keeping their times.
    pub(crate) async fn run(&mut self, count: usize) -> Result<()> {
        for _ in 0..count {
            self.time_once().await?;
        }
        Ok(())
    }
}

/// Latencies of one variant, in microseconds.
#[derive(Clone, Debug, Default)]
pub(crate) struct Samples {
    micros: Vec<f64>,
    sorted: bool,
}

impl Samples {
    pub(crate) fn push(&mut self, took: Duration) {
        self.micros.push(took.as_secs_f64() * 1e6);
        self.sorted = false;
    }

    pub(crate) fn len(&self) -> usize {
        self.micros.len()
    }

    /// The nearest-rank percentile `q` (0..=100); 0 when empty.
    pub(crate) fn percentile(&mut self, q: f64) -> f64 {
        if self.micros.is_empty() {
            return 0.0;
        }
        if !self.sorted {
            self.micros.sort_by(f64::total_cmp);
            self.sorted = true;
        }
        let rank = ((q / 100.0) * self.micros.len() as f64).ceil() as usize;
        self.micros[rank.clamp(1, self.micros.len()) - 1]
    }
}

/// Warms every variant up, then runs them in turn (A B C A B C …) for
/// `plan.repetitions` rounds of `plan.per_repetition` cycles each, so drift in the
/// machine's load hits all of them alike. Stops early, after a whole round, once
/// `plan.budget` is spent.
pub(crate) async fn interleaved(variants: &mut [Variant], plan: &Plan) -> Result<Vec<Samples>> {
    for variant in variants.iter_mut() {
        variant.run(plan.warmup).await?;
    }
    let mut samples = vec![Samples::default(); variants.len()];
    let started = Instant::now();
    for _ in 0..plan.repetitions {
        for (variant, samples) in variants.iter_mut().zip(&mut samples) {
            for _ in 0..plan.per_repetition {
                samples.push(variant.time_once().await?);
            }
        }
        if started.elapsed() > plan.budget {
            break;
        }
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let mut samples = Samples::default();
        for micros in (1..=100).rev() {
            samples.push(Duration::from_micros(micros));
        }
        assert_eq!(samples.percentile(50.0), 50.0);
        assert_eq!(samples.percentile(99.0), 99.0);
        assert_eq!(samples.percentile(100.0), 100.0);
    }
}
