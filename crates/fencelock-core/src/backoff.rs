//! One retry and polling policy for every driver: exponential backoff with jitter,
//! never past the caller's deadline.
//!
//! Drivers own recovery from a request whose outcome is unknown (a timed-out write
//! is retried or undone by owner); they pace those retries, their polling waits and
//! their reconnects with a [`Backoff`], so that every store backs off the same way
//! and no wait outlasts the caller's `wait`.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::{Error, Result};

/// How a [`Backoff`] grows: the first delay, the cap, and the growth factor.
///
/// Each delay is drawn between half of the current step and all of it (jitter), so
/// clients that failed together spread out.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct BackoffConfig {
    /// The first step (default 10 ms).
    pub first: Duration,
    /// The largest step (default 1 s).
    pub max: Duration,
    /// How much each step grows over the last (default 2).
    pub factor: f64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            first: Duration::from_millis(10),
            max: Duration::from_secs(1),
            factor: 2.0,
        }
    }
}

impl BackoffConfig {
    /// Steps from `first`, doubling up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max: max.max(first),
            ..Self::default()
        }
    }

    /// The same with another growth factor (at least 1).
    pub fn with_factor(mut self, factor: f64) -> Self {
        self.factor = factor.max(1.0);
        self
    }
}

/// The delays of one retry or wait loop, following a [`BackoffConfig`].
#[derive(Clone, Debug)]
pub struct Backoff {
    config: BackoffConfig,
    step: Duration,
    deadline: Option<Instant>,
}

impl Backoff {
    /// A loop with no deadline of its own.
    pub fn new(config: BackoffConfig) -> Self {
        Self {
            config,
            step: config.first,
            deadline: None,
        }
    }

    /// The same loop, ending at `deadline` (the caller's wait, an operation's
    /// budget): no delay reaches past it.
    pub fn until(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }

    /// The step the next delay is drawn from.
    pub fn step(&self) -> Duration {
        self.step
    }

    /// The next delay: jittered between half the current step and all of it, and
    /// cut to what is left before the deadline. `None` once the deadline has passed.
    pub fn next_delay(&mut self) -> Option<Duration> {
        let delay = jittered(self.step);
        self.step = self.step.mul_f64(self.config.factor).min(self.config.max);
        match self.deadline {
            None => Some(delay),
            Some(deadline) => {
                let left = deadline.checked_duration_since(Instant::now())?;
                (!left.is_zero()).then(|| delay.min(left))
            }
        }
    }

    /// The next delay, but never longer than `cap` (for example the holder's
    /// remaining time, after which a polling waiter should look again at once).
    pub fn next_delay_capped(&mut self, cap: Duration) -> Option<Duration> {
        self.next_delay().map(|delay| delay.min(cap))
    }

    /// Sleeps the next delay. Returns `false`, without sleeping, once the deadline
    /// has passed.
    pub async fn wait(&mut self) -> bool {
        match self.next_delay() {
            Some(delay) => {
                tokio::time::sleep(delay).await;
                true
            }
            None => false,
        }
    }

    /// Starts again from the first step (after a success).
    pub fn reset(&mut self) {
        self.step = self.config.first;
    }
}

/// How a driver repeats a request that failed temporarily: at most `tries` tries,
/// each bounded by `try_timeout`, paced by `backoff`, never past the caller's
/// deadline. One policy type for every driver, so retries look alike everywhere.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Tries in all, the first included (at least 1).
    pub tries: u32,
    /// The bound on one try; a try that takes longer counts as a temporary failure.
    pub try_timeout: Option<Duration>,
    /// The pauses between tries.
    pub backoff: BackoffConfig,
}

impl RetryPolicy {
    /// `tries` tries, each bounded by `try_timeout`, with the default backoff.
    pub fn new(tries: u32, try_timeout: Option<Duration>) -> Self {
        Self {
            tries: tries.max(1),
            try_timeout,
            backoff: BackoffConfig::default(),
        }
    }

    /// The same with another backoff.
    pub fn with_backoff(mut self, backoff: BackoffConfig) -> Self {
        self.backoff = backoff;
        self
    }

    /// Runs `attempt` until it succeeds, fails for good, or the tries or `deadline`
    /// run out. A try is repeated only when it failed with a temporary
    /// [`Error::Backend`] (or timed out: then `store` and `what` name the failure).
    /// Only for requests that are safe to repeat, or whose repetition the caller
    /// recognises.
    ///
    /// # Errors
    /// The last try's error.
    pub async fn run<T, F, Fut>(
        &self,
        store: &'static str,
        what: &str,
        deadline: Option<Instant>,
        mut attempt: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut backoff = Backoff::new(self.backoff).until(deadline);
        let mut tries = 0;
        loop {
            tries += 1;
            let outcome = match self.try_timeout {
                None => attempt().await,
                Some(limit) => match tokio::time::timeout(limit, attempt()).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(Error::backend(
                        store,
                        what.to_owned(),
                        true,
                        format!("no answer within {limit:?}"),
                    )),
                },
            };
            let err = match outcome {
                Ok(answer) => return Ok(answer),
                Err(err) => err,
            };
            let repeatable = matches!(err, Error::Backend { .. }) && err.is_temporary();
            if !repeatable || tries >= self.tries {
                return Err(err);
            }
            tracing::debug!(store, what, error = %err, tries, "request failed; retrying");
            if !backoff.wait().await {
                return Err(err);
            }
        }
    }
}

/// Between half of `step` and all of it, so clients spread out.
pub fn jittered(step: Duration) -> Duration {
    let half = step / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_jittered_within_each_step_and_grow_to_the_cap() {
        let mut backoff = Backoff::new(BackoffConfig::new(
            Duration::from_millis(10),
            Duration::from_millis(40),
        ));
        let mut steps = Vec::new();
        for _ in 0..5 {
            let step = backoff.step();
            let delay = backoff.next_delay().expect("no deadline");
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} outside {step:?}"
            );
            steps.push(step.as_millis());
        }
        assert_eq!(steps, [10, 20, 40, 40, 40]);
        backoff.reset();
        assert_eq!(backoff.step(), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn no_delay_reaches_past_the_deadline_and_none_follows_it() {
        let deadline = Instant::now() + Duration::from_millis(25);
        let mut backoff = Backoff::new(BackoffConfig::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
        ))
        .until(Some(deadline));
        assert_eq!(backoff.next_delay(), Some(Duration::from_millis(25)));
        tokio::time::advance(Duration::from_millis(25)).await;
        assert_eq!(backoff.next_delay(), None);
        assert!(!backoff.wait().await);
    }

    #[test]
    fn a_cap_shortens_a_delay() {
        let mut backoff = Backoff::new(BackoffConfig::new(
            Duration::from_secs(1),
            Duration::from_secs(1),
        ));
        assert_eq!(
            backoff.next_delay_capped(Duration::from_millis(3)),
            Some(Duration::from_millis(3))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_policy_repeats_temporary_failures_only_and_stops_at_its_tries() {
        let policy = RetryPolicy::new(3, Some(Duration::from_millis(100)));
        let mut calls = 0;
        let result: Result<()> = policy
            .run("memory", "probe", None, || {
                calls += 1;
                async { Err(Error::backend("memory", "probe", true, "busy")) }
            })
            .await;
        assert!(result.is_err());
        assert_eq!(calls, 3, "three tries in all");

        let mut calls = 0;
        let result: Result<()> = policy
            .run("memory", "probe", None, || {
                calls += 1;
                async { Err(Error::config("bad")) }
            })
            .await;
        assert!(matches!(result, Err(Error::Config { .. })));
        assert_eq!(calls, 1, "a permanent failure is not repeated");

        let mut calls = 0;
        let answer = policy
            .run("memory", "probe", None, || {
                calls += 1;
                let hang = calls == 1;
                async move {
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    Ok(7)
                }
            })
            .await;
        assert_eq!(
            answer.unwrap(),
            7,
            "a try that hangs times out and is repeated"
        );
        assert_eq!(calls, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_policy_stops_at_the_callers_deadline() {
        let policy = RetryPolicy::new(100, None).with_backoff(BackoffConfig::new(
            Duration::from_millis(100),
            Duration::from_millis(100),
        ));
        let started = Instant::now();
        let deadline = started + Duration::from_millis(250);
        let mut calls = 0;
        let result: Result<()> = policy
            .run("memory", "probe", Some(deadline), || {
                calls += 1;
                async { Err(Error::backend("memory", "probe", true, "busy")) }
            })
            .await;
        assert!(result.is_err());
        assert!(Instant::now() <= deadline, "no pause past the deadline");
        assert!(
            calls < 100,
            "stopped by the deadline, not the tries: {calls}"
        );
    }
}
