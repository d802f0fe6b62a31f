//! [`LockBackend`] on one Redis server: one key per held lock, one script per operation.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use fencelock_core::{
    AcquireRequest, Capabilities, Error, Lease, LeaseKind, LockBackend, LockName, LockState,
    LossReason, OwnerId, Result, WaitDeadline, WaitKind, async_trait, valid_until,
};
use redis::aio::ConnectionManager;
use tokio::time::Instant;

use crate::connection::{self, backend_error};
use crate::scripts::{self, Attempt, Handed, KeySpace, Queueing, Released, Renewal};
use crate::wake::{Handoffs, WakeListener, Wakers};
use crate::{RedisConfig, RedisFenceGate, STORE};

/// Leases per renewal script: large batches are split so no script blocks the server
/// for long; the chunks go out together on one connection.
const RENEW_CHUNK: usize = 1000;

/// How long a waiter sleeps before looking again at a grant that has no expiry (one an
/// operator wrote by hand): such a grant can only end by a release, which publishes.
const NO_EXPIRY_RECHECK: Duration = Duration::from_secs(1);

/// How long a waiter without a deadline stays queued per attempt: the script caps it
/// by the holder's remaining time plus a margin anyway.
const QUEUE_FOREVER: Duration = Duration::from_secs(24 * 3600);

/// The first pause of a waiter whose attempt failed for a temporary reason (the server
/// unreachable, a command timed out); it doubles up to [`LONGEST_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(50);
/// The longest such pause.
const LONGEST_RETRY: Duration = Duration::from_secs(1);

/// Locks on one Redis server.
///
/// # How it works
/// Each operation is one Lua script run by `EVALSHA` (reloaded on `NOSCRIPT`), so it
/// is atomic on the server (their text is in `src/scripts.rs`):
///
/// - **acquire**: if `{prefix}lock:{name}` does not exist, mint the token and
///   `SET {prefix}lock:{name} {owner}:{token} NX PX ttl`; otherwise return the
///   holder's `PTTL`, and, for an acquire that may wait, queue the owner for a
///   hand-off (see *Waiting*).
/// - **renew**: `PEXPIRE` the key if it still holds exactly `{owner}:{token}`;
///   [`renew_all`](LockBackend::renew_all) checks and extends a whole watchdog tick in
///   one script (one round trip for up to 1000 leases; larger ticks send several
///   scripts together).
/// - **release**: `DEL` the key if it still holds exactly `{owner}:{token}`, then hand
///   the lock to the longest-queued waiter whose entry is live: grant it in the same
///   script (new token, the TTL it asked for) and
///   `PUBLISH {prefix}handoff:{id} "{name}\0{owner}:{token}\0{attempt}"` on the channel
///   of the waiter's backend. An uncontended release publishes nothing.
///
/// Validity is computed on this side from the instant the request was sent
/// ([`valid_until`]); the TTL runs on the server from when it ran the script, which is
/// later, so the local view never outlasts the server's.
///
/// # Fencing tokens
/// The acquire script mints `token = max(counter + 1, server time in µs)` and stores
/// it in `{prefix}token:{name}`, which expires [`token_ttl`](RedisConfig::token_ttl)
/// after the last attempt (so names no longer used do not keep memory). Tokens of a name
/// therefore rise with every grant, and a counter that is missing (expired, deleted,
/// or lost with all data in a restart without persistence) is re-seeded from the
/// server's `TIME`, above every token minted before, **as long as the server's clock
/// does not go back** across the loss (a replica promoted with a slower clock, a clock
/// stepped back by hand) and fewer than a million grants of one name happen per second
/// (a single server does not reach that).
///
/// # Waiting
/// [`WaitKind::Notify`], by direct hand-off: a refused attempt that may wait queues its
/// owner on the server (`{prefix}queue:{name}`, ordered by when it first queued, and
/// `{prefix}wants:{name}` with its TTL and how long the entry lasts: the holder's
/// remaining time plus 2 s, or the end of the wait if sooner). A release grants the
/// lock to the longest-queued live waiter inside its own script (a queued waiter marks
/// the grant it waits for, and only the release of a marked grant looks at the queue,
/// so an uncontended release is a `GET` and a `DEL`) and publishes the
/// grant on that waiter's backend's channel: each backend keeps one pub/sub connection
/// on a channel of its own, `{prefix}handoff:{random id}`, named in its waiters' queue
/// entries, so a hand-off reaches only the process that waits for it, which hands the
/// waiter its token. The hand-off costs the release's round trip and the message, and
/// the waiter sends nothing. Each attempt writes its id in the waiter's entry, and the
/// message echoes the id it read: the waiter takes only a hand-off of its latest
/// attempt, which the release therefore made after that attempt ran, so its validity
/// counts from that attempt's send. A message from an earlier attempt is dropped: its
/// grant came before the latest attempt, which did not see it, so it was already gone
/// (expired while the waiter stalled, or freed by the undo of an attempt whose reply
/// was lost). If less than half the TTL is left when the message arrives, the waiter
/// confirms with one more attempt, which restarts the TTL. Other waiters keep their
/// places and are not woken.
///
/// An expiry hands nothing on, so a waiter also looks again (and re-queues) when the
/// holder's remaining time has passed; whoever asks first then takes the free lock, so
/// the order is not strictly FIFO. A waiter that gives up, or whose future is dropped,
/// leaves the queue and passes on a grant handed to it meanwhile. A waiter whose
/// process dies while queued can still be handed the lock until its entry ends; the
/// lock then ends at that waiter's TTL, as a dead holder's would.
///
/// # Cancel safety
/// An acquire whose reply was not seen (its future was dropped, the command timed out
/// or the connection failed) may still have been applied: the backend then releases
/// the name by owner (before retrying, or in the background for a dropped future),
/// and otherwise the grant ends at its TTL. A waiting acquire retries after a
/// temporary failure (pauses from 50 ms doubling to 1 s) until its deadline, and then
/// returns that failure rather than a timeout.
///
/// # Limits
/// A single server is a single point of failure, and a failover to an asynchronous
/// replica can lose a grant (two holders at once); fencing tokens from a replica whose
/// clock is behind can repeat. Use Redlock over independent servers, or another store,
/// if that matters. The server's `maxmemory-policy` must not evict keys (checked at
/// connect, see [`RedisConfig::allow_eviction`]).
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    config: RedisConfig,
    keys: KeySpace,
    address: String,
    wakers: Arc<Wakers>,
    handoffs: Arc<Handoffs>,
    /// This backend's hand-off channel, which its queued waiters name.
    channel: String,
    _listener: WakeListener,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("server", &self.inner.address)
            .field("db", &self.inner.config.node.db)
            .field("prefix", &self.inner.config.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Connects to the server of `config`, checks that its eviction policy cannot free
    /// held locks, and subscribes to a hand-off channel of its own.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad configuration or an evicting server (see
    /// [`RedisConfig::allow_eviction`]); [`Error::Backend`] (temporary) naming the
    /// address if the server cannot be reached.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        config.validate()?;
        let conn = connection::connect(&config.node, config.connect_options()).await?;
        let keys = KeySpace::new(config.prefix.clone());
        let address = config.node.address();
        let wakers = Arc::new(Wakers::default());
        let handoffs = Arc::new(Handoffs::default());
        let channel = keys.handoff_channel(OwnerId::random().as_str());
        let listener = WakeListener::subscribe_with_handoffs(
            connection::client(&config.node)?,
            channel.clone(),
            &wakers,
            &handoffs,
            config.connect_timeout,
        )
        .await
        .map_err(|err| backend_error(format!("subscribe to releases on {address}"), err))?;
        Ok(Self {
            inner: Arc::new(Inner {
                conn,
                config,
                keys,
                address,
                wakers,
                handoffs,
                channel,
                _listener: listener,
            }),
        })
    }

    /// [`connect`](Self::connect) with the configuration parsed from `url`
    /// (`redis://...`, see [`RedisConfig`]).
    ///
    /// # Errors
    /// As [`RedisConfig::from_url`] and [`connect`](Self::connect).
    pub async fn open(url: &str) -> Result<Self> {
        Self::connect(RedisConfig::from_url(url)?).await
    }

    /// The configuration in use.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// The key that holds the grant of `name` (`{prefix}lock:{name}`), for operators
    /// and tests.
    pub fn lock_key(&self, name: &LockName) -> String {
        self.inner.keys.lock(name.as_str())
    }

    /// The key that holds the token counter of `name` (`{prefix}token:{name}`).
    pub fn token_key(&self, name: &LockName) -> String {
        self.inner.keys.token(name.as_str())
    }

    /// A [`RedisFenceGate`] on this server and prefix, sharing this backend's
    /// connection.
    pub fn fence_gate(&self) -> RedisFenceGate {
        RedisFenceGate::with_connection(
            self.inner.conn.clone(),
            self.inner.keys.clone(),
            self.inner.address.clone(),
        )
    }

    fn context(&self, what: impl fmt::Display) -> String {
        format!("{what} on {}", self.inner.address)
    }

    fn failed(&self, what: impl fmt::Display, err: redis::RedisError) -> Error {
        backend_error(self.context(what), err)
    }

    fn lost(lease: &Lease) -> Error {
        Error::Lost {
            name: lease.name().clone(),
            store: STORE,
            token: lease.token(),
            reason: LossReason::NotOurs,
        }
    }

    /// One attempt: the lease if granted, else how long the holder keeps it. With
    /// `queue`, a refused attempt queues the owner for a hand-off.
    async fn attempt(
        &self,
        req: &AcquireRequest,
        queue: Option<Queued>,
    ) -> Result<std::result::Result<Lease, Option<Duration>>> {
        let mut conn = self.inner.conn.clone();
        let in_flight = InFlight {
            backend: Some(self),
            name: &req.name,
            owner: &req.owner,
        };
        let sent = Instant::now();
        let outcome = scripts::acquire(
            &mut conn,
            &self.inner.keys,
            req.name.as_str(),
            &req.owner,
            req.ttl,
            self.inner.config.token_ttl,
            queue.map(|queue| Queueing {
                at_most: queue.at_most,
                channel: self.inner.channel.as_str(),
                queued_before: queue.queued_before,
                attempt: queue.attempt,
            }),
        )
        .await;
        let outcome = match outcome {
            Ok(outcome) => {
                in_flight.settle();
                outcome
            }
            Err(err) => {
                // Maybe applied: undo it by owner before anything else is sent, so a
                // retry cannot be overtaken by this cleanup.
                in_flight.undo().await;
                return Err(self.failed(format_args!("acquire `{}`", req.name), err));
            }
        };
        Ok(match outcome {
            Attempt::Granted(token) => Ok(Lease::new(
                req.name.clone(),
                req.owner.clone(),
                token,
                valid_until(sent, req.ttl),
            )),
            Attempt::Held(remaining) => Err(remaining),
        })
    }

    /// Renews up to [`RENEW_CHUNK`] leases in one script.
    async fn renew_chunk(&self, chunk: &[(Lease, Duration)]) -> Vec<Result<Lease>> {
        let batch: Vec<Renewal<'_>> = chunk
            .iter()
            .map(|(lease, ttl)| Renewal {
                name: lease.name().as_str(),
                owner: lease.owner(),
                token: Some(lease.token()),
                ttl: *ttl,
            })
            .collect();
        let mut conn = self.inner.conn.clone();
        let sent = Instant::now();
        match scripts::renew(&mut conn, &self.inner.keys, &batch).await {
            Ok(renewed) => chunk
                .iter()
                .zip(renewed)
                .map(|((lease, ttl), renewed)| {
                    if renewed {
                        Ok(lease.clone().renewed(valid_until(sent, *ttl)))
                    } else {
                        Err(Self::lost(lease))
                    }
                })
                .collect(),
            Err(err) => {
                let temporary = connection::is_temporary(&err);
                let err = Arc::new(err);
                chunk
                    .iter()
                    .map(|(lease, _)| {
                        Err(Error::backend(
                            STORE,
                            self.context(format_args!("renew `{}`", lease.name())),
                            temporary,
                            Arc::clone(&err),
                        ))
                    })
                    .collect()
            }
        }
    }
}

#[async_trait]
impl LockBackend for RedisBackend {
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
        let deadline = WaitDeadline::start(req.wait);
        if !deadline.may_wait() {
            return self
                .attempt(&req, None)
                .await?
                .map_err(|_| deadline.give_up(&req.name, STORE));
        }
        let waiter = self.inner.wakers.join(req.name.as_str());
        let mut handoff = self.inner.handoffs.register(&req.owner);
        // Until settled, a dropped or failed wait leaves the queue (and passes on a
        // grant handed to it meanwhile) in the background.
        let queued = InFlight {
            backend: Some(self),
            name: &req.name,
            owner: &req.owner,
        };
        let mut retry = FIRST_RETRY;
        let mut queued_before = false;
        // Ends at the deadline; each round waits for a hand-off, a wake-up (the pub/sub
        // connection came back) or the holder's expiry, or, after a temporary failure,
        // for a growing pause.
        loop {
            // Made before the attempt, so a wake-up between the attempt and the wait
            // is not missed.
            let released = waiter.notify().notified();
            // Queued for as long as this wait may last, capped in the script by the
            // holder's remaining time plus a margin.
            let at_most = deadline.deadline().map_or(QUEUE_FOREVER, |at| {
                at.saturating_duration_since(Instant::now())
            });
            // From now on only a hand-off that read this attempt's queue entry is
            // delivered: one made before this attempt ran and lost before it (this
            // attempt does not see it) grants nothing, however late its message comes.
            let attempt_id = handoff.expect_next();
            let sent = Instant::now();
            let attempt = self
                .attempt(
                    &req,
                    Some(Queued {
                        at_most,
                        queued_before,
                        attempt: attempt_id,
                    }),
                )
                .await;
            queued_before = true;
            let remaining = match attempt {
                Ok(Ok(lease)) => {
                    queued.settle();
                    return Ok(lease);
                }
                Ok(Err(remaining)) => remaining,
                // A wait outlives a store that is briefly unreachable; the last failure
                // is what the caller hears if the deadline passes meanwhile.
                Err(err) if err.is_temporary() && !deadline.passed() => {
                    tracing::debug!(lock = %req.name, store = STORE, error = %err, "attempt failed; retrying within the wait");
                    tokio::select! {
                        () = released => {}
                        () = tokio::time::sleep_until(deadline.cap(Instant::now() + retry)) => {}
                    }
                    if deadline.passed() {
                        // The failed attempt was undone, which left the queue too.
                        queued.settle();
                        return Err(err);
                    }
                    retry = (retry * 2).min(LONGEST_RETRY);
                    continue;
                }
                Err(err) => {
                    // The failed attempt was undone, which left the queue too.
                    queued.settle();
                    return Err(err);
                }
            };
            retry = FIRST_RETRY;
            if deadline.passed() {
                queued.undo().await;
                return Err(deadline.give_up(&req.name, STORE));
            }
            // An expiry hands nothing on: look again just after the holder's TTL.
            let fallback = remaining.map_or(NO_EXPIRY_RECHECK, |d| d + Duration::from_millis(1));
            tracing::debug!(
                lock = %req.name,
                store = STORE,
                held_for_ms = u64::try_from(fallback.as_millis()).unwrap_or(u64::MAX),
                "lock is held; queued for its release"
            );
            tokio::select! {
                handed = &mut handoff.receiver => {
                    if let Ok(token) = handed {
                        // Granted by a release that read this attempt's queue entry, so
                        // ran after it, and the TTL counts from no earlier than this
                        // attempt's send.
                        let lease = Lease::new(req.name.clone(), req.owner.clone(), token, valid_until(sent, req.ttl));
                        if lease.remaining() > req.ttl / 2 {
                            queued.settle();
                            return Ok(lease);
                        }
                        // Delivered late (this process was slow): the next attempt sees
                        // the grant and restarts its TTL.
                    }
                }
                () = released => {}
                () = tokio::time::sleep_until(deadline.cap(Instant::now() + fallback)) => {}
            }
        }
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        self.renew_chunk(&[(lease.clone(), ttl)])
            .await
            .pop()
            .unwrap_or_else(|| Err(Self::lost(lease)))
    }

    async fn renew_all(&self, leases: &[(Lease, Duration)]) -> Vec<Result<Lease>> {
        // Chunks go out concurrently on the one multiplexed connection: pipelined, so
        // a whole tick still costs about one round trip.
        let chunks = leases
            .chunks(RENEW_CHUNK)
            .map(|chunk| self.renew_chunk(chunk));
        futures_util::future::join_all(chunks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let mut conn = self.inner.conn.clone();
        let name = lease.name().as_str();
        let released = scripts::release_handing_off(
            &mut conn,
            &self.inner.keys,
            name,
            lease.owner(),
            Some(lease.token()),
            self.inner.config.token_ttl,
            false,
        )
        .await
        .map_err(|err| self.failed(format_args!("release `{name}`"), err))?;
        self.after_release(name, released)
            .then_some(())
            .ok_or_else(|| Self::lost(lease))
    }

    async fn inspect(&self, name: &LockName) -> Result<Option<LockState>> {
        let mut conn = self.inner.conn.clone();
        let stored = scripts::inspect(&mut conn, &self.inner.keys, name.as_str())
            .await
            .map_err(|err| self.failed(format_args!("inspect `{name}`"), err))?;
        let Some((value, remaining)) = stored else {
            return Ok(None);
        };
        let Some((holder, Some(token))) = scripts::parse_value(&value) else {
            return Err(Error::backend(
                STORE,
                self.context(format_args!("inspect `{name}`")),
                false,
                format!(
                    "the key `{}` does not hold `owner:token` as fencelock writes it; it was \
                     written by something else: delete it or give fencelock another prefix",
                    self.inner.keys.lock(name.as_str())
                ),
            ));
        };
        Ok(Some(LockState {
            holder,
            token,
            remaining,
        }))
    }
}

/// How a waiting acquire's attempt queues its owner when refused.
#[derive(Clone, Copy, Debug)]
struct Queued {
    /// The longest the owner stays queued (the rest of its wait).
    at_most: Duration,
    /// An earlier attempt of the same wait was sent (so the owner may be queued).
    queued_before: bool,
    /// The attempt's id, which a hand-off that reads its queue entry echoes.
    attempt: u64,
}

/// An acquire whose outcome its caller has not seen yet: one attempt in flight, or a
/// whole wait while its owner may be queued on the server. Dropped unsettled (the
/// future was dropped mid-flight or mid-wait), it releases by owner, in the background,
/// whatever the script may have granted or a release may have handed over meanwhile,
/// and takes the owner out of the queue ([`RedisBackend::undo_unseen`]).
///
/// The cleanup goes out on the same multiplexed connection, after the command it
/// undoes (unless that connection broke, in which case the grant ends at its TTL and
/// the queue entry at its time).
struct InFlight<'a> {
    backend: Option<&'a RedisBackend>,
    name: &'a LockName,
    owner: &'a OwnerId,
}

impl InFlight<'_> {
    /// The caller saw the outcome: nothing to undo.
    fn settle(mut self) {
        self.backend = None;
    }

    /// Undoes it now: the attempt failed, or the wait gives up.
    async fn undo(mut self) {
        if let Some(backend) = self.backend.take() {
            backend.undo_unseen(self.name, self.owner).await;
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let Some(backend) = self.backend.take() else {
            return;
        };
        // Without a runtime the grant, if any, ends at its TTL.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let backend = backend.clone();
        let name = self.name.clone();
        let owner = self.owner.clone();
        runtime.spawn(async move { backend.undo_unseen(&name, &owner).await });
    }
}

impl RedisBackend {
    /// Releases by owner a grant its acquirer never saw (its reply was lost, or the
    /// acquire was dropped mid-flight), and takes the owner out of the queue; failures
    /// are logged: the grant then ends at its TTL, and the queue entry at its time.
    async fn undo_unseen(&self, name: &LockName, owner: &OwnerId) {
        let mut conn = self.inner.conn.clone();
        let freed = scripts::release_handing_off(
            &mut conn,
            &self.inner.keys,
            name.as_str(),
            owner,
            None,
            self.inner.config.token_ttl,
            true,
        )
        .await;
        match freed {
            Ok(released) => {
                if self.after_release(name.as_str(), released) {
                    tracing::debug!(lock = %name, store = STORE, "freed a grant its acquirer never saw");
                }
            }
            Err(err) => tracing::warn!(
                lock = %name,
                store = STORE,
                error = %err,
                "could not free a grant its acquirer never saw; it ends at its TTL"
            ),
        }
    }

    /// Wakes what a release concerns in this process: the waiter it handed the lock to,
    /// if it is ours (its process hears it by pub/sub otherwise), or the local waiters
    /// on a freed name. Whether the grant was ours.
    fn after_release(&self, name: &str, released: Released) -> bool {
        match released {
            Released::NotOurs => false,
            Released::Freed => {
                self.inner.wakers.wake(name);
                true
            }
            Released::HandedTo(Handed {
                owner,
                token,
                attempt: Some(attempt),
            }) => {
                self.inner.handoffs.deliver(&owner, attempt, token);
                true
            }
            // Handed to an entry of an older acquire script: its waiter hears the
            // published message, or looks again at its fallback.
            Released::HandedTo(Handed { attempt: None, .. }) => true,
        }
    }
}
