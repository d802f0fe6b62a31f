//! Deliberately broken drivers, to prove that the checker and the fault scenarios
//! catch what they claim to catch.
//!
//! Each wraps a correct backend (a [`MemoryStore`](fencelock_core::MemoryStore) or any
//! other) and breaks exactly one rule of the [`LockBackend`] contract; everything else
//! passes through. They report the inner store's [`Capabilities`], as a buggy driver
//! would. Never use them outside tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fencelock_core::{
    AcquireRequest, Capabilities, FencingToken, Lease, LockBackend, LockName, LockState, OwnerId,
    Result, async_trait, valid_until,
};
use tokio::time::Instant;

/// Breaks "a grant past its TTL holds nothing": every grant and renewal is stored for
/// [`AcquireRequest::MAX_TTL`] whatever TTL was asked, while the returned lease shows
/// the TTL asked for. A holder that stops renewing (paused, killed) keeps the lock
/// for good. Caught by the liveness rule.
#[derive(Debug)]
pub struct NoTtl {
    inner: Arc<dyn LockBackend>,
}

impl NoTtl {
    /// Wraps `inner`.
    pub fn new(inner: impl LockBackend) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }
}

#[async_trait]
impl LockBackend for NoTtl {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Lease> {
        let (sent, ttl) = (Instant::now(), req.ttl);
        let forever = AcquireRequest {
            ttl: AcquireRequest::MAX_TTL,
            ..req
        };
        let lease = self.inner.acquire(forever).await?;
        Ok(lease.renewed(valid_until(sent, ttl)))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let sent = Instant::now();
        let renewed = self.inner.renew(lease, AcquireRequest::MAX_TTL).await?;
        Ok(renewed.renewed(valid_until(sent, ttl)))
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        self.inner.release(lease).await
    }

    async fn inspect(&self, name: &LockName) -> Result<Option<LockState>> {
        self.inner.inspect(name).await
    }
}

/// Breaks "release deletes only our own grant": release deletes whatever grant the
/// name has (a plain `DEL`), so a holder whose lease was lost and taken over frees its
/// successor's lock, and a third client is granted it while the successor still
/// holds it. Caught as overlapping holds.
///
/// Deletes by reading the current holder with `inspect` and releasing in its name, so
/// it works over any inner store whose release needs no store-specific locator.
#[derive(Debug)]
pub struct PlainDelete {
    inner: Arc<dyn LockBackend>,
}

impl PlainDelete {
    /// Wraps `inner`.
    pub fn new(inner: impl LockBackend) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }
}

#[async_trait]
impl LockBackend for PlainDelete {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Lease> {
        self.inner.acquire(req).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        self.inner.renew(lease, ttl).await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let Some(current) = self.inner.inspect(lease.name()).await? else {
            return Ok(()); // a plain delete of a missing key reports nothing
        };
        let whoever = Lease::new(
            lease.name().clone(),
            current.holder,
            current.token,
            lease.valid_until(),
        );
        // Whatever the inner store says, a plain delete reports success.
        let _ = self.inner.release(&whoever).await;
        Ok(())
    }

    async fn inspect(&self, name: &LockName) -> Result<Option<LockState>> {
        self.inner.inspect(name).await
    }
}

/// Breaks "each grant's token is higher than every earlier grant's": tokens are
/// random. Caught as tokens falling (or repeating) in real-time order.
#[derive(Debug)]
pub struct RandomToken {
    inner: Arc<dyn LockBackend>,
    tokens: TokenMap,
}

impl RandomToken {
    /// Wraps `inner`.
    pub fn new(inner: impl LockBackend) -> Self {
        Self {
            inner: Arc::new(inner),
            tokens: TokenMap::default(),
        }
    }
}

#[async_trait]
impl LockBackend for RandomToken {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Lease> {
        let lease = self.inner.acquire(req).await?;
        // Below i64::MAX so SQL fence gates accept it like any real token.
        let token = FencingToken(fastrand::u64(1..=i64::MAX.unsigned_abs()));
        Ok(self.tokens.hand_out(lease, token))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let renewed = self.inner.renew(&self.tokens.inner(lease), ttl).await?;
        Ok(with_token(&renewed, lease.token()))
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let inner = self.tokens.inner(lease);
        self.tokens.forget(lease);
        self.inner.release(&inner).await
    }

    async fn inspect(&self, name: &LockName) -> Result<Option<LockState>> {
        Ok(self.tokens.shown(self.inner.inspect(name).await?))
    }
}

/// Breaks "tokens keep rising across restarts": the token counter starts again at 1
/// after every `every` grants (of any name), as a store would whose counter lives in
/// memory and restarts, or whose counter key expires. Caught as repeated and falling
/// tokens.
#[derive(Debug)]
pub struct ResettingCounter {
    inner: Arc<dyn LockBackend>,
    every: u64,
    granted: Mutex<u64>,
    tokens: TokenMap,
}

impl ResettingCounter {
    /// Wraps `inner`; the counter restarts after every `every` grants (at least 1).
    pub fn new(inner: impl LockBackend, every: u64) -> Self {
        Self {
            inner: Arc::new(inner),
            every: every.max(1),
            granted: Mutex::new(0),
            tokens: TokenMap::default(),
        }
    }
}

#[async_trait]
impl LockBackend for ResettingCounter {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Lease> {
        let lease = self.inner.acquire(req).await?;
        let token = {
            let mut granted = self.granted.lock().unwrap_or_else(|p| p.into_inner());
            *granted += 1;
            FencingToken((*granted - 1) % self.every + 1)
        };
        Ok(self.tokens.hand_out(lease, token))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let renewed = self.inner.renew(&self.tokens.inner(lease), ttl).await?;
        Ok(with_token(&renewed, lease.token()))
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let inner = self.tokens.inner(lease);
        self.tokens.forget(lease);
        self.inner.release(&inner).await
    }

    async fn inspect(&self, name: &LockName) -> Result<Option<LockState>> {
        Ok(self.tokens.shown(self.inner.inspect(name).await?))
    }
}

/// The inner store's token of each lease handed out with a rewritten one, by owner
/// (owners are unique per acquisition), so renewals and releases reach the inner
/// store with the token it minted.
#[derive(Debug, Default)]
struct TokenMap {
    /// owner -> (inner token, token handed out)
    by_owner: Mutex<HashMap<OwnerId, (FencingToken, FencingToken)>>,
}

impl TokenMap {
    fn map(&self) -> MutexGuard<'_, HashMap<OwnerId, (FencingToken, FencingToken)>> {
        self.by_owner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hand_out(&self, lease: Lease, token: FencingToken) -> Lease {
        self.map()
            .insert(lease.owner().clone(), (lease.token(), token));
        with_token(&lease, token)
    }

    fn inner(&self, lease: &Lease) -> Lease {
        match self.map().get(lease.owner()) {
            Some(&(inner, _)) => with_token(lease, inner),
            None => lease.clone(),
        }
    }

    fn forget(&self, lease: &Lease) {
        self.map().remove(lease.owner());
    }

    fn shown(&self, state: Option<LockState>) -> Option<LockState> {
        state.map(|mut state| {
            if let Some(&(_, shown)) = self.map().get(&state.holder) {
                state.token = shown;
            }
            state
        })
    }
}

fn with_token(lease: &Lease, token: FencingToken) -> Lease {
    let rebuilt = Lease::new(
        lease.name().clone(),
        lease.owner().clone(),
        token,
        lease.valid_until(),
    );
    match lease.locator() {
        Some(locator) => rebuilt.with_locator(locator),
        None => rebuilt,
    }
}
