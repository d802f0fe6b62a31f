//! Pauses of polling waiters: exponential backoff with jitter, capped by the
//! holder's remaining time.

use std::time::Duration;

/// Between half of `backoff` and all of it, so waiters spread out.
pub(crate) fn jittered(backoff: Duration) -> Duration {
    let half = backoff / 2;
    half + half.mul_f64(fastrand::f64())
}

/// The next pause of a waiter: the jittered `backoff`, but never past just after the
/// holder's lease ends (`held_for`, by the database's clock).
pub(crate) fn pause(backoff: Duration, held_for: Duration) -> Duration {
    jittered(backoff).min(held_for + Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_is_jittered_within_the_backoff_and_never_outlasts_the_holder() {
        for _ in 0..100 {
            let p = pause(Duration::from_millis(100), Duration::from_secs(10));
            assert!(p >= Duration::from_millis(50) && p <= Duration::from_millis(100));
        }
        assert_eq!(
            pause(Duration::from_secs(3600), Duration::from_millis(5)),
            Duration::from_millis(6)
        );
    }
}
