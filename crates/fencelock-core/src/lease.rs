//! What a grant is: fencing token, owner, lease and the state a store reports.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::LockName;

/// A number minted with every grant of a lock, higher than every earlier grant's.
///
/// Send it with every write to the protected resource; the resource (through a
/// [`FenceGate`](crate::FenceGate)) refuses a token lower than one it already saw, so a
/// holder that paused past its lease cannot overwrite its successor's work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Who holds a grant: random per acquisition, never per thread or per process, so two
/// acquisitions from one process exclude each other like any two clients.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct OwnerId(Arc<str>);

impl OwnerId {
    /// A fresh random owner id (128 random bits as 32 hex digits).
    pub fn random() -> Self {
        Self(Arc::from(uuid::Uuid::new_v4().simple().to_string()))
    }

    /// An owner id read back from a store.
    pub fn from_stored(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }

    /// The id as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OwnerId({})", self.0)
    }
}

/// The allowance for clock drift between client and store: 1% of the TTL plus 2 ms
/// (Redlock's figure).
pub fn drift_allowance(ttl: Duration) -> Duration {
    ttl / 100 + Duration::from_millis(2)
}

/// The local instant until which a grant made for `ttl` is surely still valid, given
/// the instant `sent` at which the request that made it was sent.
///
/// The store starts the TTL no earlier than it received the request, which is after
/// `sent`, so `sent + ttl - drift` never overstates the lease.
pub fn valid_until(sent: Instant, ttl: Duration) -> Instant {
    sent + ttl.saturating_sub(drift_allowance(ttl))
}

/// A grant of a lock, as a backend returns it.
#[derive(Clone, Debug)]
pub struct Lease {
    name: LockName,
    owner: OwnerId,
    token: FencingToken,
    valid_until: Instant,
    locator: Option<Arc<str>>,
}

impl Lease {
    /// A lease of `name` held by `owner` with `token`, valid until `valid_until` (see
    /// [`valid_until`](crate::valid_until) to compute it).
    pub fn new(name: LockName, owner: OwnerId, token: FencingToken, valid_until: Instant) -> Self {
        Self {
            name,
            owner,
            token,
            valid_until,
            locator: None,
        }
    }

    /// Attaches a store-specific locator of the grant (an etcd key, a ZooKeeper node
    /// path) that the backend needs to renew or release it.
    pub fn with_locator(mut self, locator: impl Into<Arc<str>>) -> Self {
        self.locator = Some(locator.into());
        self
    }

    /// This lease with a new validity, as after a renewal.
    pub fn renewed(mut self, valid_until: Instant) -> Self {
        self.valid_until = valid_until;
        self
    }

    /// The lock.
    pub fn name(&self) -> &LockName {
        &self.name
    }

    /// The owner id of this acquisition.
    pub fn owner(&self) -> &OwnerId {
        &self.owner
    }

    /// The fencing token of this grant.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The local instant until which the grant is surely valid.
    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }

    /// The store-specific locator, if the backend set one.
    pub fn locator(&self) -> Option<&str> {
        self.locator.as_deref()
    }

    /// Time left before `valid_until`, zero once passed.
    pub fn remaining(&self) -> Duration {
        self.valid_until.saturating_duration_since(Instant::now())
    }
}

/// What a store reports about a held lock (see
/// [`LockBackend::inspect`](crate::LockBackend::inspect)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockState {
    /// The holder's owner id.
    pub holder: OwnerId,
    /// The holder's fencing token.
    pub token: FencingToken,
    /// Time left on the holder's lease by the store's clock; `None` for session stores
    /// whose grants have no TTL of their own.
    pub remaining: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_never_overstates_the_ttl() {
        let sent = Instant::now();
        let ttl = Duration::from_secs(10);
        assert_eq!(
            valid_until(sent, ttl),
            sent + Duration::from_millis(10_000 - 100 - 2)
        );
        // A TTL smaller than the drift gives no validity at all.
        assert_eq!(valid_until(sent, Duration::from_millis(1)), sent);
    }

    #[test]
    fn owner_ids_are_random_per_acquisition() {
        let a = OwnerId::random();
        assert_eq!(a.as_str().len(), 32);
        assert_ne!(a, OwnerId::random());
    }
}
