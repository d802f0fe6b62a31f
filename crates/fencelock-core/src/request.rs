//! What an acquisition asks for: name, TTL, owner and how long to wait.

use std::time::Duration;

use tokio::time::Instant;

use crate::{Error, LockName, OwnerId, Result};

/// How long an acquisition waits for a held lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitPolicy {
    /// Fail at once with [`Error::Contended`] if the lock is held.
    NoWait,
    /// Wait up to this long, then fail with [`Error::Timeout`].
    Until(Duration),
    /// Wait until granted.
    Forever,
}

/// An acquisition, as the client hands it to a [`LockBackend`](crate::LockBackend).
#[derive(Clone, Debug)]
pub struct AcquireRequest {
    /// The lock.
    pub name: LockName,
    /// How long the grant lasts without renewal.
    pub ttl: Duration,
    /// How long to wait while someone else holds it.
    pub wait: WaitPolicy,
    /// The owner id of this acquisition (fresh per acquisition).
    pub owner: OwnerId,
}

impl AcquireRequest {
    /// The shortest TTL accepted: shorter ones would leave no validity after the drift
    /// allowance ([`drift_allowance`](crate::drift_allowance): 2 ms + 1%).
    pub const MIN_TTL: Duration = Duration::from_millis(10);
    /// The longest TTL accepted (30 days).
    pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

    /// A request for `name` with `ttl`, no waiting and a fresh random owner.
    ///
    /// # Errors
    /// [`Error::Config`] if `ttl` is outside [`Self::MIN_TTL`]..=[`Self::MAX_TTL`].
    pub fn new(name: LockName, ttl: Duration) -> Result<Self> {
        check_ttl(ttl)?;
        Ok(Self {
            name,
            ttl,
            wait: WaitPolicy::NoWait,
            owner: OwnerId::random(),
        })
    }

    /// The same request with another wait policy.
    pub fn with_wait(mut self, wait: WaitPolicy) -> Self {
        self.wait = wait;
        self
    }
}

/// Checks that a TTL is usable.
///
/// # Errors
/// [`Error::Config`] naming the bounds when it is not.
pub fn check_ttl(ttl: Duration) -> Result<()> {
    if ttl < AcquireRequest::MIN_TTL {
        return Err(Error::config(format!(
            "ttl {ttl:?} is too short: a lock needs a TTL of at least 10ms (typical: 10s to 60s; \
             the watchdog renews at ttl/3 while the guard lives)"
        )));
    }
    if ttl > AcquireRequest::MAX_TTL {
        return Err(Error::config(format!(
            "ttl {ttl:?} is too long: at most 30 days; use a shorter TTL, the watchdog renews it"
        )));
    }
    Ok(())
}

/// The deadline of one acquisition's wait, for backends' wait loops.
#[derive(Clone, Copy, Debug)]
pub struct WaitDeadline {
    started: Instant,
    deadline: Option<Instant>,
    policy: WaitPolicy,
}

impl WaitDeadline {
    /// Starts the clock for `policy` now.
    pub fn start(policy: WaitPolicy) -> Self {
        let started = Instant::now();
        let deadline = match policy {
            WaitPolicy::NoWait => Some(started),
            WaitPolicy::Until(d) => Some(
                started
                    .checked_add(d)
                    .unwrap_or(started + AcquireRequest::MAX_TTL),
            ),
            WaitPolicy::Forever => None,
        };
        Self {
            started,
            deadline,
            policy,
        }
    }

    /// Whether the request may wait at all.
    pub fn may_wait(&self) -> bool {
        self.policy != WaitPolicy::NoWait
    }

    /// The deadline, `None` when waiting forever.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the deadline has passed.
    pub fn passed(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// The earlier of `at` and the deadline.
    pub fn cap(&self, at: Instant) -> Instant {
        self.deadline.map_or(at, |d| d.min(at))
    }

    /// The error for a lock still held when waiting ends: [`Error::Contended`] for
    /// [`WaitPolicy::NoWait`], [`Error::Timeout`] otherwise.
    pub fn give_up(&self, name: &LockName, store: &'static str) -> Error {
        match self.policy {
            WaitPolicy::NoWait => Error::Contended {
                name: name.clone(),
                store,
            },
            _ => Error::Timeout {
                name: name.clone(),
                store,
                waited: self.started.elapsed(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_ttl_is_refused_with_the_fix() {
        let err = AcquireRequest::new(LockName::new("a").unwrap(), Duration::ZERO).unwrap_err();
        assert!(matches!(err, Error::Config { .. }));
        assert!(err.to_string().contains("at least 10ms"), "{err}");
        assert!(check_ttl(Duration::from_secs(31 * 24 * 3600)).is_err());
        assert!(check_ttl(Duration::from_millis(9)).is_err());
        assert!(check_ttl(Duration::from_millis(10)).is_ok());
        assert!(
            crate::valid_until(tokio::time::Instant::now(), AcquireRequest::MIN_TTL)
                > tokio::time::Instant::now()
        );
    }

    #[test]
    fn giving_up_without_waiting_is_contention_and_after_waiting_a_timeout() {
        let name = LockName::new("a").unwrap();
        assert!(matches!(
            WaitDeadline::start(WaitPolicy::NoWait).give_up(&name, "m"),
            Error::Contended { .. }
        ));
        let until = WaitDeadline::start(WaitPolicy::Until(Duration::from_millis(5)));
        assert!(matches!(until.give_up(&name, "m"), Error::Timeout { .. }));
        assert!(
            WaitDeadline::start(WaitPolicy::Forever)
                .deadline()
                .is_none()
        );
    }
}
