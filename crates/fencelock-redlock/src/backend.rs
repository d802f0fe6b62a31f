//! [`LockBackend`] over N independent Redis nodes: Redlock with majority max-register
//! fencing tokens.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use fencelock_core::{
    AcquireRequest, Capabilities, Error, FencingToken, Lease, LeaseKind, LockBackend, LockName,
    LockState, LossReason, OwnerId, Result, WaitDeadline, WaitKind, async_trait, drift_allowance,
    valid_until,
};
use fencelock_redis::connection::{self, ConnectOptions};
use fencelock_redis::scripts::{self, Attempt, KeySpace, Renewal};
use fencelock_redis::wake::{WakeListener, Wakers};
use std::future::Future;
use std::pin::Pin;

use fencelock_redis::redis::aio::ConnectionManager;
use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use tokio::time::Instant;

use crate::RedlockConfig;
use crate::node::{Node, NodeFailure};

/// The store's name in messages and [`Capabilities`].
const STORE: &str = "redlock";

/// Leases per renewal script, so no script blocks a node for long.
const RENEW_CHUNK: usize = 1000;

/// How long a waiter sleeps before looking again at a grant without expiry.
const NO_EXPIRY_RECHECK: Duration = Duration::from_secs(1);

/// Locks on N independent Redis nodes (the Redlock algorithm), with fencing tokens
/// kept by a majority max-register.
///
/// # Acquire
/// 1. **Claim** on every node in parallel, each request bounded by the node timeout
///    (default `min(50 ms, ttl/10)`), one script per node: `SET {prefix}lock:{name}
///    {owner}:{count} NX PX ttl`, where `count` is the node's counter of the name plus
///    one (the server time in µs when the counter is missing), written back to the
///    counter in the same script and returned.
///    The attempt goes on as soon as the replies decide it (a majority granted, or
///    can no longer grant): the slowest nodes are not waited for. A claim they make
///    later is ours like the others and is released by owner with them.
/// 2. If at least `N/2 + 1` nodes granted and
///    `validity = ttl − elapsed − (ttl·1 % + 2 ms)` is still positive (elapsed counted
///    from before the first send), the token is the highest count among them. When a
///    majority returned exactly that count (the common case: nodes that saw the same
///    grants count alike), the token is already stored on a majority, each time together
///    with our claim, and the lock is granted: **one round trip**. Nothing re-checks
///    that those claims are still there: they are taken to last for the validity, the
///    clock assumption of mutual exclusion, which is also all that orders this token
///    after a grant returned while this attempt was in flight (see the crate docs).
///    (A name's first grant, whose counter each node seeds from its own clock, takes
///    step 3.)
/// 3. Otherwise **raise** on every node in parallel: set the counter to at least the
///    token and restamp the claim `{owner}:{token}`, in one script. The grant stands iff
///    at least `N/2 + 1` nodes did both **while our claim was live there**, before the
///    validity minus one node timeout ends (again without waiting for the slowest
///    nodes). The raise also brings lagging counters up to the others.
/// 4. Otherwise the claims are released on every node, and the attempt is retried
///    after a release message (pub/sub on every node), the holders' remaining time, or
///    a random pause up to [`retry_delay`](RedlockConfig::retry_delay), until the wait
///    ends.
///
/// Renewals extend the claim on every node in parallel (one script per node for a
/// whole watchdog tick) and count only if a majority extended before the current
/// validity ended. Releases delete by owner on every node and return once a majority
/// has answered; the other deletes finish in the background.
///
/// See the crate docs for what the fencing tokens guarantee.
#[derive(Clone)]
pub struct RedlockBackend {
    inner: Arc<Inner>,
}

struct Inner {
    nodes: Vec<Node>,
    config: RedlockConfig,
    keys: KeySpace,
    wakers: Arc<Wakers>,
    _listeners: Vec<WakeListener>,
}

impl fmt::Debug for RedlockBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedlockBackend")
            .field("nodes", &self.inner.nodes)
            .field("prefix", &self.inner.config.prefix)
            .finish_non_exhaustive()
    }
}

/// Fewer nodes answered than a majority.
#[derive(Debug)]
struct TooFewNodes {
    answered: usize,
    quorum: usize,
    total: usize,
    failures: Vec<NodeFailure>,
}

impl fmt::Display for TooFewNodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "only {} of {} Redis nodes answered and {} are needed (",
            self.answered, self.total, self.quorum
        )?;
        for (i, failure) in self.failures.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{failure}")?;
        }
        f.write_str("); check that a majority of the nodes are running and reachable")
    }
}

impl std::error::Error for TooFewNodes {}

/// One attempt's outcome when not granted.
struct Refusal {
    /// When another attempt is worth making if no release message comes first.
    retry_in: Duration,
    /// Set when too few nodes answered to decide.
    too_few: Option<TooFewNodes>,
}

impl RedlockBackend {
    /// Connects to every node of `config` in parallel (checking each one's eviction
    /// policy) and subscribes to their release channels. Succeeds when a majority
    /// answers; the others are connected on first use once they are up.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad configuration or an evicting node;
    /// [`Error::Backend`] (temporary) naming the nodes if fewer than a majority can be
    /// reached.
    pub async fn connect(config: RedlockConfig) -> Result<Self> {
        config.validate()?;
        let options = ConnectOptions {
            // A backstop only: every request carries its own, far shorter, node timeout.
            timeout: config.connect_timeout,
            connect_timeout: config.connect_timeout,
            allow_eviction: config.allow_eviction,
        };
        let nodes: Vec<Node> = config
            .nodes
            .iter()
            .map(|target| Node::new(target.clone(), options))
            .collect();
        let connected = join_all(nodes.iter().map(Node::connection)).await;
        let mut failures = Vec::new();
        for (node, result) in nodes.iter().zip(&connected) {
            match result {
                Ok(_) => {}
                Err(err @ Error::Config { .. }) => return Err(Error::config(err.to_string())),
                Err(err) => failures.push(NodeFailure {
                    address: node.address().to_owned(),
                    reason: err.to_string(),
                }),
            }
        }
        let answered = nodes.len() - failures.len();
        if answered < config.quorum() {
            return Err(Error::backend(
                STORE,
                "connect",
                true,
                TooFewNodes {
                    answered,
                    quorum: config.quorum(),
                    total: nodes.len(),
                    failures,
                },
            ));
        }
        let keys = KeySpace::new(config.prefix.clone());
        let wakers = Arc::new(Wakers::default());
        let mut listeners = Vec::with_capacity(nodes.len());
        for (node, connected) in nodes.iter().zip(&connected) {
            let client = connection::client(node.target())?;
            let listener = if connected.is_ok() {
                WakeListener::subscribe(
                    client.clone(),
                    keys.channel(),
                    &wakers,
                    config.connect_timeout,
                )
                .await
                .ok()
            } else {
                None
            };
            // A node down now is subscribed in the background once it is up.
            listeners.push(listener.unwrap_or_else(|| {
                WakeListener::spawn(
                    client,
                    keys.channel(),
                    &wakers,
                    config.connect_timeout,
                    None,
                )
            }));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                nodes,
                config,
                keys,
                wakers,
                _listeners: listeners,
            }),
        })
    }

    /// [`connect`](Self::connect) with the configuration parsed from `url`
    /// (`redlock://h1:p,h2:p,h3:p`, see [`RedlockConfig`]).
    ///
    /// # Errors
    /// As [`RedlockConfig::from_url`] and [`connect`](Self::connect).
    pub async fn open(url: &str) -> Result<Self> {
        Self::connect(RedlockConfig::from_url(url)?).await
    }

    /// The configuration in use.
    pub fn config(&self) -> &RedlockConfig {
        &self.inner.config
    }

    /// The key that holds the grant of `name` on each node (`{prefix}lock:{name}`).
    pub fn lock_key(&self, name: &LockName) -> String {
        self.inner.keys.lock(name.as_str())
    }

    /// The key that holds the token counter of `name` on each node.
    pub fn token_key(&self, name: &LockName) -> String {
        self.inner.keys.token(name.as_str())
    }

    /// The per-node timeout of releases and reads, which no lease validity depends on:
    /// four node timeouts, so a slow node still gets its release.
    fn relaxed_limit(&self) -> Duration {
        let config = &self.inner.config;
        config
            .node_timeout
            .unwrap_or(RedlockConfig::DEFAULT_NODE_TIMEOUT_CAP)
            * 4
    }

    fn quorum(&self) -> usize {
        self.inner.config.quorum()
    }

    fn lost(lease: &Lease, reason: LossReason) -> Error {
        Error::Lost {
            name: lease.name().clone(),
            store: STORE,
            token: lease.token(),
            reason,
        }
    }

    /// One Redlock attempt: claim (counting on each node), decide, and raise only when
    /// the granting nodes' counts differ; on failure the claims are released (on a
    /// majority before this returns, on the rest in the background).
    async fn attempt(&self, req: &AcquireRequest) -> std::result::Result<Lease, Refusal> {
        let owner = &req.owner;
        let config = &self.inner.config;
        let limit = config.node_timeout_for(req.ttl);
        let quorum = self.quorum();
        let mut cleanup = Cleanup {
            backend: Some(self),
            name: &req.name,
            owner,
            limit: self.relaxed_limit(),
        };
        let sent = Instant::now();
        let total = self.inner.nodes.len();
        let ttl = req.ttl;
        let token_ttl = config.token_ttl.max(req.ttl);
        // Decided as soon as a majority granted (or can no longer grant): any majority's
        // counts exceed every token granted before, and claims still in flight are ours
        // and released by owner like the rest.
        let claims = self
            .until_decided(
                limit,
                move |mut conn, keys, name, owner| async move {
                    scripts::claim(&mut conn, &keys, &name, &owner, ttl, token_ttl).await
                },
                &req.name,
                owner,
                |results| {
                    let granted = results
                        .iter()
                        .filter(|r| matches!(r, Ok(Attempt::Granted(_))))
                        .count();
                    let held = results
                        .iter()
                        .filter(|r| matches!(r, Ok(Attempt::Held(_))))
                        .count();
                    granted >= quorum || held > total - quorum
                },
            )
            .await;
        let validity_end = valid_until(sent, req.ttl);
        // A raise must land a node timeout before the validity ends (see crate docs).
        let raise_by = validity_end.checked_sub(limit).unwrap_or(sent);
        let mut counts = Vec::new();
        let mut held = Vec::new();
        let mut failures = Vec::new();
        for claim in claims {
            match claim {
                Ok(Attempt::Granted(count)) => counts.push(count),
                Ok(Attempt::Held(remaining)) => held.push(remaining),
                Err(failure) => failures.push(failure),
            }
        }
        if counts.len() >= quorum {
            let token = counts.iter().copied().max().unwrap_or(FencingToken(0));
            let agreeing = counts.iter().filter(|count| **count == token).count();
            let granted = if agreeing >= quorum {
                // Every claim stored its count with it: the token is already on a majority.
                Instant::now() < validity_end
            } else {
                Instant::now() < raise_by
                    && self
                        .raise(&req.name, owner, token, token_ttl, limit, raise_by)
                        .await
            };
            if granted {
                cleanup.backend = None;
                return Ok(Lease::new(
                    req.name.clone(),
                    owner.clone(),
                    token,
                    validity_end,
                ));
            }
        }
        cleanup.backend = None;
        self.release_everywhere(&req.name, owner, self.relaxed_limit())
            .await;
        let answered = counts.len() + held.len();
        if answered < quorum {
            return Err(Refusal {
                retry_in: jitter(config.retry_delay),
                too_few: Some(TooFewNodes {
                    answered,
                    quorum,
                    total: self.inner.nodes.len(),
                    failures,
                }),
            });
        }
        let retry_in = if held.len() >= quorum {
            // Held by others on a majority: look again when the first of them ends
            // (an expiry publishes nothing), unless a release wakes us first.
            held.iter()
                .map(|r| r.map_or(NO_EXPIRY_RECHECK, |d| d + Duration::from_millis(1)))
                .min()
                .unwrap_or(NO_EXPIRY_RECHECK)
        } else {
            // A split vote: contenders back off by random amounts so one can win.
            jitter(config.retry_delay)
        };
        Err(Refusal {
            retry_in,
            too_few: None,
        })
    }

    /// The second phase, when the granting nodes' counts differ: raises every node's
    /// counter to at least `token` and restamps our claims with it. Whether a majority
    /// did so while our claim was live there, before `raise_by` (returning as soon as
    /// the replies decide it; the other nodes catch up in the background).
    async fn raise(
        &self,
        name: &LockName,
        owner: &OwnerId,
        token: FencingToken,
        token_ttl: Duration,
        limit: Duration,
        raise_by: Instant,
    ) -> bool {
        let (total, quorum) = (self.inner.nodes.len(), self.quorum());
        let raise_limit = limit.min(raise_by.saturating_duration_since(Instant::now()));
        let raised = self
            .until_decided(
                raise_limit,
                move |mut conn, keys, name, owner| async move {
                    scripts::raise(&mut conn, &keys, &name, &owner, token, token_ttl).await
                },
                name,
                owner,
                |results| {
                    let stamped = results.iter().filter(|r| matches!(r, Ok(true))).count();
                    let refused = results.iter().filter(|r| matches!(r, Ok(false))).count();
                    stamped >= quorum || refused > total - quorum
                },
            )
            .await;
        let stamped = raised.iter().filter(|r| matches!(r, Ok(true))).count();
        if stamped >= quorum && Instant::now() < raise_by {
            return true;
        }
        tracing::debug!(lock = %name, store = STORE, stamped, quorum, "fencelock redlock token not stamped on a majority in time");
        false
    }

    /// Sends `request` to every node at once and returns the outcomes that arrived
    /// until `decided` says they settle the question (or all arrived). Callers decide
    /// on answers only, never on failures, so a failure report counts every node. Requests still
    /// in flight then finish in the background: each node's requests go out on its one
    /// connection in order, so a later request there (a release) still follows them.
    async fn until_decided<T, F, Fut>(
        &self,
        limit: Duration,
        request: F,
        name: &LockName,
        owner: &OwnerId,
        decided: impl Fn(&[std::result::Result<T, NodeFailure>]) -> bool,
    ) -> Vec<std::result::Result<T, NodeFailure>>
    where
        T: Send + 'static,
        F: Fn(ConnectionManager, KeySpace, String, OwnerId) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = fencelock_redis::redis::RedisResult<T>> + Send + 'static,
    {
        type Call<T> = Pin<Box<dyn Future<Output = std::result::Result<T, NodeFailure>> + Send>>;
        let mut pending: FuturesUnordered<Call<T>> = (0..self.inner.nodes.len())
            .map(|index| {
                let inner = Arc::clone(&self.inner);
                let request = request.clone();
                let (name, owner) = (name.as_str().to_owned(), owner.clone());
                Box::pin(async move {
                    let keys = inner.keys.clone();
                    inner.nodes[index]
                        .call(limit, move |conn| request(conn, keys, name, owner))
                        .await
                }) as Call<T>
            })
            .collect();
        let mut results = Vec::with_capacity(pending.len());
        while let Some(result) = pending.next().await {
            results.push(result);
            if decided(&results) {
                break;
            }
        }
        if !pending.is_empty() {
            tokio::spawn(async move { while pending.next().await.is_some() {} });
        }
        results
    }

    /// Deletes `owner`'s claims of `name` on every node; returns, once a majority
    /// deleted (or too many refused), how many were deleted, how many answered, and the
    /// failures. Deletes still in flight finish in the background.
    async fn release_everywhere(
        &self,
        name: &LockName,
        owner: &OwnerId,
        limit: Duration,
    ) -> (usize, usize, Vec<NodeFailure>) {
        let (total, quorum) = (self.inner.nodes.len(), self.quorum());
        let released = self
            .until_decided(
                limit,
                |mut conn, keys, name, owner| async move {
                    scripts::release(&mut conn, &keys, &name, &owner, None).await
                },
                name,
                owner,
                |results| {
                    let deleted = results.iter().filter(|r| matches!(r, Ok(true))).count();
                    let refused = results.iter().filter(|r| matches!(r, Ok(false))).count();
                    deleted >= quorum || refused > total - quorum
                },
            )
            .await;
        let mut deleted = 0;
        let mut answered = 0;
        let mut failures = Vec::new();
        for result in released {
            match result {
                Ok(true) => {
                    deleted += 1;
                    answered += 1;
                }
                Ok(false) => answered += 1,
                Err(failure) => failures.push(failure),
            }
        }
        if deleted > 0 {
            self.inner.wakers.wake(name.as_str());
        }
        (deleted, answered, failures)
    }

    /// Renews up to [`RENEW_CHUNK`] leases: one script per node, all nodes in parallel.
    async fn renew_chunk(&self, leases: &[(Lease, Duration)]) -> Vec<Result<Lease>> {
        if leases.is_empty() {
            return Vec::new();
        }
        let keys = &self.inner.keys;
        let shortest = leases.iter().map(|(_, ttl)| *ttl).min().unwrap_or_default();
        let limit = self.inner.config.node_timeout_for(shortest);
        let batch: Vec<Renewal<'_>> = leases
            .iter()
            .map(|(lease, ttl)| Renewal {
                name: lease.name().as_str(),
                owner: lease.owner(),
                // Claims not stamped on every node still carry the owner: match by it.
                token: None,
                ttl: *ttl,
            })
            .collect();
        let batch = &batch;
        let sent = Instant::now();
        let per_node = join_all(self.inner.nodes.iter().map(|node| {
            node.call(limit, |mut conn| async move {
                scripts::renew(&mut conn, keys, batch).await
            })
        }))
        .await;
        let now = Instant::now();
        let total = self.inner.nodes.len();
        let quorum = self.quorum();
        leases
            .iter()
            .enumerate()
            .map(|(i, (lease, ttl))| {
                let extended = per_node
                    .iter()
                    .filter(|r| matches!(r, Ok(v) if v[i]))
                    .count();
                let refused = per_node
                    .iter()
                    .filter(|r| matches!(r, Ok(v) if !v[i]))
                    .count();
                if extended >= quorum && now < lease.valid_until() {
                    return Ok(lease.clone().renewed(valid_until(sent, *ttl)));
                }
                if refused > total - quorum {
                    return Err(Self::lost(lease, LossReason::NotOurs));
                }
                if now >= lease.valid_until() {
                    return Err(Self::lost(lease, LossReason::Expired));
                }
                let failures = per_node
                    .iter()
                    .filter_map(|r| r.as_ref().err())
                    .cloned()
                    .collect();
                Err(self.too_few_error(
                    format!("renew `{}`", lease.name()),
                    extended + refused,
                    failures,
                ))
            })
            .collect()
    }

    fn too_few_error(&self, what: String, answered: usize, failures: Vec<NodeFailure>) -> Error {
        Error::backend(
            STORE,
            what,
            true,
            TooFewNodes {
                answered,
                quorum: self.quorum(),
                total: self.inner.nodes.len(),
                failures,
            },
        )
    }
}

#[async_trait]
impl LockBackend for RedlockBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            store: STORE,
            fencing: true,
            fifo: false,
            wait: WaitKind::Notify,
            lease: LeaseKind::Ttl,
            shared_between_processes: true,
        }
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Lease> {
        let limit = self.inner.config.node_timeout_for(req.ttl);
        if req.ttl.saturating_sub(drift_allowance(req.ttl)) <= limit {
            return Err(Error::config(format!(
                "ttl {:?} of lock `{}` is too short for Redlock: it must exceed the node timeout \
                 ({limit:?}) plus the drift allowance (1% + 2ms); use a TTL of at least 100ms",
                req.ttl, req.name
            )));
        }
        let deadline = WaitDeadline::start(req.wait);
        let give_up = |refusal: Refusal| match refusal.too_few {
            Some(too_few) => {
                Error::backend(STORE, format!("acquire `{}`", req.name), true, too_few)
            }
            None => deadline.give_up(&req.name, STORE),
        };
        if !deadline.may_wait() {
            return self.attempt(&req).await.map_err(give_up);
        }
        let waiter = self.inner.wakers.join(req.name.as_str());
        // Ends at the deadline; each round waits for a release, the holders' expiry
        // or a random pause.
        loop {
            // Made before the attempt, so a release during it still wakes this waiter.
            let released = waiter.notify().notified();
            let refusal = match self.attempt(&req).await {
                Ok(lease) => return Ok(lease),
                Err(refusal) => refusal,
            };
            if deadline.passed() {
                return Err(give_up(refusal));
            }
            tokio::select! {
                () = released => {}
                () = tokio::time::sleep_until(deadline.cap(Instant::now() + refusal.retry_in)) => {}
            }
        }
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        self.renew_all(&[(lease.clone(), ttl)])
            .await
            .pop()
            .unwrap_or_else(|| Err(Self::lost(lease, LossReason::NotOurs)))
    }

    async fn renew_all(&self, leases: &[(Lease, Duration)]) -> Vec<Result<Lease>> {
        // Chunks go out together: a whole tick costs about one round trip per node.
        let chunks = leases
            .chunks(RENEW_CHUNK)
            .map(|chunk| self.renew_chunk(chunk));
        join_all(chunks).await.into_iter().flatten().collect()
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let limit = self.relaxed_limit();
        let (deleted, answered, failures) = self
            .release_everywhere(lease.name(), lease.owner(), limit)
            .await;
        if deleted >= self.quorum() {
            return Ok(());
        }
        // A majority said it is not ours: it could not have been held.
        if answered - deleted > self.inner.nodes.len() - self.quorum() {
            return Err(Self::lost(lease, LossReason::NotOurs));
        }
        Err(self.too_few_error(
            format!(
                "release `{}` (deleted on {deleted} nodes; the rest end at their TTL)",
                lease.name()
            ),
            answered,
            failures,
        ))
    }

    async fn inspect(&self, name: &LockName) -> Result<Option<LockState>> {
        let keys = &self.inner.keys;
        let limit = self.relaxed_limit();
        let stored = join_all(self.inner.nodes.iter().map(|node| {
            node.call(limit, |mut conn| async move {
                scripts::inspect(&mut conn, keys, name.as_str()).await
            })
        }))
        .await;
        let mut holders: Vec<(OwnerId, Option<FencingToken>, Option<Duration>)> = Vec::new();
        let mut failures = Vec::new();
        for result in stored {
            match result {
                Ok(Some((value, remaining))) => {
                    if let Some((owner, token)) = scripts::parse_value(&value) {
                        holders.push((owner, token, remaining));
                    }
                }
                Ok(None) => {}
                Err(failure) => failures.push(failure),
            }
        }
        let answered = self.inner.nodes.len() - failures.len();
        if answered < self.quorum() {
            return Err(self.too_few_error(format!("inspect `{name}`"), answered, failures));
        }
        let quorum = self.quorum();
        for (owner, _, _) in &holders {
            let of_owner: Vec<_> = holders.iter().filter(|(o, _, _)| o == owner).collect();
            if of_owner.len() < quorum {
                continue;
            }
            let token = granted_token(of_owner.iter().filter_map(|(_, t, _)| *t));
            // Held while a majority holds it: the quorum-th longest remaining time.
            let mut remaining: Vec<Duration> = of_owner
                .iter()
                .map(|(_, _, r)| r.unwrap_or(Duration::MAX))
                .collect();
            remaining.sort_unstable_by(|a, b| b.cmp(a));
            let remaining = remaining
                .get(quorum - 1)
                .copied()
                .filter(|r| *r != Duration::MAX);
            return Ok(Some(LockState {
                holder: owner.clone(),
                token,
                remaining,
            }));
        }
        Ok(None)
    }
}

/// An attempt whose outcome its caller has not seen. Dropped while armed (the acquire
/// future was dropped mid-flight), it releases the claims by owner on every node in the
/// background, as if they had been made.
struct Cleanup<'a> {
    backend: Option<&'a RedlockBackend>,
    name: &'a LockName,
    owner: &'a OwnerId,
    limit: Duration,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let Some(backend) = self.backend.take() else {
            return;
        };
        // Without a runtime the claims, if any, end at their TTL.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let backend = backend.clone();
        let (name, owner, limit) = (self.name.clone(), self.owner.clone(), self.limit);
        runtime.spawn(async move {
            backend.release_everywhere(&name, &owner, limit).await;
        });
    }
}

/// The token of a grant from its claims' stamps: the one stamped on the most nodes
/// (a grant stamps its token on a majority; a claim that landed after the decision
/// carries its own node's count until a raise restamps it), the higher on a tie; 0
/// when there is no stamp (claims of an older version, not yet stamped).
fn granted_token(stamps: impl Iterator<Item = FencingToken>) -> FencingToken {
    let mut tally: Vec<(FencingToken, usize)> = Vec::new();
    for stamp in stamps {
        match tally.iter_mut().find(|(token, _)| *token == stamp) {
            Some((_, seen)) => *seen += 1,
            None => tally.push((stamp, 1)),
        }
    }
    tally
        .into_iter()
        .max_by_key(|(token, seen)| (*seen, *token))
        .map_or(FencingToken(0), |(token, _)| token)
}

/// A random pause between 0 and `most`.
fn jitter(most: Duration) -> Duration {
    most.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inspect reports the token stamped on the most nodes: a late claim's own count
    /// (higher or lower) does not hide the grant's token.
    #[test]
    fn inspected_token_is_the_one_stamped_on_the_most_nodes() {
        let stamps = |values: &[u64]| granted_token(values.iter().copied().map(FencingToken));
        assert_eq!(stamps(&[7, 7, 7, 8, 6]), FencingToken(7));
        assert_eq!(stamps(&[8, 7, 7]), FencingToken(7));
        assert_eq!(stamps(&[5, 9]), FencingToken(9), "a tie goes to the higher");
        assert_eq!(stamps(&[]), FencingToken(0), "no stamp: 0");
    }
}
