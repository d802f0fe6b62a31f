//! The [`LockBackend`] on etcd: `concurrency.Mutex`'s key layout on one session lease.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue,
    PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, WatchFilterType, WatchOptions,
    WatchStream,
};
use fencelock_core::{
    AcquireRequest, Capabilities, Error, FencingToken, Lease, LeaseKind, LockBackend, LockName,
    LockState, LossReason, OwnerId, Result, StoreEvent, WaitDeadline, WaitKind, async_trait,
    valid_until,
};
use tokio::sync::{Notify, broadcast};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::EtcdConfig;
use crate::session::{Session, lease_not_found};

/// The store's name in messages.
pub(crate) const STORE: &str = "etcd";
/// etcd's default limit on operations in one transaction.
const MAX_TXN_OPS: usize = 128;
/// Sessions started for one acquisition before giving up (a session can end mid-wait).
const MAX_SESSIONS_PER_ACQUIRE: usize = 3;
/// Wake-ups of one waiter before it gives up; each needs a deletion in its queue.
const MAX_WAKES: usize = 100_000;
/// How long one request to etcd may go unanswered before it is abandoned (and
/// retried): a request to a member that died or froze may otherwise hang, and a
/// member without a leader holds proposals for up to its own request timeout (7 s with
/// the default election timeout).
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Tries of one request before its error is returned.
const REQUEST_TRIES: usize = 5;
/// The first pause between tries; it doubles up to [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(25);
/// The longest pause between tries, and between two tries of the reaper.
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// A [`LockBackend`] on an etcd v3 cluster.
///
/// The lock `NAME` is the set of keys under `{prefix}NAME/`; an acquisition puts
/// `{prefix}NAME/{lease:x}-{owner}` on this backend's session lease, and the key with
/// the lowest create revision holds the lock (etcd's `concurrency.Mutex`, which
/// `etcdctl lock` uses, so the two exclude each other on the same name). The fencing
/// token is that key's create revision. A waiter watches only the deletion of the key
/// just before its own.
///
/// A put that went unanswered may still land later, even after its key was deleted: a
/// frozen member that read it forwards it to the leader when it resumes. So every put
/// also requires that a tombstone key, `{prefix}\0NAME/{lease:x}-{owner}/{n}` (`n`
/// counts the tries of one acquisition with a new key), does not exist, and when a key
/// any of whose puts went unanswered is deleted, that tombstone is written on the
/// session lease in the same transaction: the late put then changes nothing, and the
/// tombstone goes with the session. Lock names contain no NUL, so a tombstone is in no
/// lock's queue, ours or `etcdctl lock`'s.
///
/// One session lease per backend is kept alive by one keep-alive stream; renewals cost
/// no writes (one read batch to confirm the keys). A grant not renewed within its TTL
/// is deleted by this backend, so TTLs mean what they mean on every other store; a
/// client that stops altogether loses its grants when the session lease expires
/// ([`EtcdConfig::session_ttl`]).
pub struct EtcdBackend {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    config: EtcdConfig,
    /// Serializes starting a session, so one backend has one at a time.
    starting: tokio::sync::Mutex<()>,
    grants: Arc<Grants>,
    events: broadcast::Sender<StoreEvent>,
    reaper: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reaper.abort();
    }
}

impl fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Keys this backend wrote, so a key whose grant ran out, or whose acquisition was
/// dropped, is deleted in the background.
#[derive(Default)]
struct Grants {
    by_key: Mutex<HashMap<String, Grant>>,
    wake: Notify,
    /// The current session, if one was started; replaced once it is lost.
    session: Mutex<Option<Arc<Session>>>,
}

#[derive(Clone, Debug)]
struct Grant {
    /// The session lease the key is on.
    session: i64,
    /// The key's create revision; 0 while unknown (the put may be in flight).
    token: i64,
    /// When to delete the key; `None` while its acquisition is still running.
    reap_at: Option<Instant>,
    /// The tombstone its puts require to be absent, while one of them may still land
    /// (it was unanswered, or is in flight): deleting the key then writes it.
    tomb: Option<Box<str>>,
}

impl Grant {
    /// How to delete the key: with the tombstone, on the key's session lease, if a put
    /// may still land.
    fn retire(&self) -> Option<(&str, i64)> {
        self.tomb.as_deref().map(|tomb| (tomb, self.session))
    }
}

impl Grants {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Grant>> {
        // Every update is a single insert, remove or field write: poisoning is harmless.
        self.by_key.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live session, if any.
    fn live_session(&self) -> Option<Arc<Session>> {
        let current = self.session.lock().unwrap_or_else(|p| p.into_inner());
        current.as_ref().filter(|s| s.deadline().is_some()).cloned()
    }

    /// Takes the keys due for deletion at `now`.
    fn due(&self, now: Instant) -> Vec<(String, Grant)> {
        let mut by_key = self.lock();
        let keys: Vec<String> = by_key
            .iter()
            .filter(|(_, grant)| grant.reap_at.is_some_and(|at| at <= now))
            .map(|(key, _)| key.clone())
            .collect();
        keys.into_iter()
            .filter_map(|key| by_key.remove_entry(&key))
            .collect()
    }

    /// The next instant a key falls due for deletion.
    fn next_due(&self) -> Option<Instant> {
        self.lock().values().filter_map(|g| g.reap_at).min()
    }

    fn schedule(&self, key: &str, at: Instant) {
        if let Some(grant) = self.lock().get_mut(key) {
            grant.reap_at = Some(at);
        }
        self.wake.notify_one();
    }

    /// The tombstone of `key`, if a put of it may still land.
    fn retire(&self, key: &str) -> Option<(String, i64)> {
        let by_key = self.lock();
        let grant = by_key.get(key)?;
        grant.retire().map(|(tomb, lease)| (tomb.to_owned(), lease))
    }
}

/// Deletes keys whose grant ran out or whose acquisition was abandoned. A deletion
/// that fails is tried again while the key's session lives: a key left behind would
/// block its lock until the session ends, which a live session never does.
async fn reap(client: Client, grants: Arc<Grants>) {
    loop {
        for (key, grant) in grants.due(Instant::now()) {
            if delete_own_key(&client, &key, grant.token, grant.retire())
                .await
                .is_ok()
            {
                continue;
            }
            let live = grants.live_session().map(|s| s.id());
            if live != Some(grant.session) {
                // The session is gone or going: its lease takes the key with it.
                continue;
            }
            tracing::debug!(
                key,
                "etcd: could not delete an expired or abandoned key yet"
            );
            grants.lock().entry(key).or_insert(Grant {
                reap_at: Some(Instant::now() + MAX_RETRY_PAUSE),
                ..grant
            });
        }
        tokio::select! {
            () = grants.wake.notified() => {}
            () = sleep_until(grants.next_due().unwrap_or_else(far_future)) => {}
        }
    }
}

/// Deletes `key` if it still has create revision `token` (any revision when `token`
/// is 0: the key is unique to one acquisition). Returns whether it was deleted.
///
/// With `retire` = `(tomb, lease)` (a put of the key may still land), deletes the key
/// whatever its create revision (a late put may have made it again), puts the
/// tombstone on `lease` in the same transaction, and reports whether the key it deleted
/// had create revision `token`. A dead `lease` took the key with it, and no put on it
/// can land any more: that is `false`, not an error.
///
/// A try that etcd may have applied without answering is retried: the retry then
/// finds the key gone and reports `false`.
async fn delete_own_key(
    client: &Client,
    key: &str,
    token: i64,
    retire: Option<(&str, i64)>,
) -> Result<bool> {
    if let Some((tomb, lease)) = retire {
        let txn = Txn::new().and_then([
            TxnOp::delete(key, Some(DeleteOptions::new().with_prev_key())),
            TxnOp::put(tomb, "", Some(PutOptions::new().with_lease(lease))),
        ]);
        let done = call("delete a lock key and write its tombstone", || {
            let (mut kv, txn) = (client.kv_client(), txn.clone());
            async move {
                match kv.txn(txn).await {
                    Err(err) if lease_not_found(&err) => Ok(None),
                    done => done.map(Some),
                }
            }
        })
        .await?;
        let deleted = done.into_iter().flat_map(|d| d.op_responses()).any(|op| {
            matches!(op, TxnOpResponse::Delete(d)
                if d.prev_kvs().iter().any(|kv| token == 0 || kv.create_revision() == token))
        });
        return Ok(deleted);
    }
    if token == 0 {
        let deleted = call("delete an abandoned key", || {
            let mut kv = client.kv_client();
            async move { kv.delete(key, None).await }
        })
        .await?;
        return Ok(deleted.deleted() > 0);
    }
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, token)])
        .and_then([TxnOp::delete(key, None)]);
    let done = call("delete a lock key", || {
        let (mut kv, txn) = (client.kv_client(), txn.clone());
        async move { kv.txn(txn).await }
    })
    .await?;
    Ok(done.succeeded())
}

/// Whether a failed request may succeed if sent again, maybe to another member: the
/// member was unreachable, had no leader, lost it, or timed out.
fn retryable(err: &etcd_client::Error) -> bool {
    // gRPC codes: 2 Unknown, 4 DeadlineExceeded, 10 Aborted, 14 Unavailable (etcd's
    // "leader changed", "no leader", "request timed out", and connection failures).
    match err {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            matches!(i32::from(status.code()), 2 | 4 | 10 | 14)
        }
        _ => false,
    }
}

/// Sends a request made by `request`, each try bounded by [`REQUEST_TIMEOUT`], and
/// tries again (up to [`REQUEST_TRIES`] in all, with a growing pause) when the try
/// timed out or failed [temporarily](retryable). The client balances requests over
/// every endpoint, so a retry usually reaches a live member. Only for requests that
/// are safe to repeat, or whose repetition the caller recognises.
pub(crate) async fn call<T, F, Fut>(what: &str, mut request: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
{
    let mut pause = FIRST_RETRY_PAUSE;
    let mut last = None;
    for _ in 0..REQUEST_TRIES {
        match timeout(REQUEST_TIMEOUT, request()).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(err)) if retryable(&err) => last = Some(etcd_error(what, err)),
            Ok(Err(err)) => return Err(etcd_error(what, err)),
            Err(_) => {
                last = Some(Error::backend(
                    STORE,
                    what.to_owned(),
                    true,
                    format!("no answer within {REQUEST_TIMEOUT:?}"),
                ));
            }
        }
        tracing::debug!(what, error = ?last, "etcd request failed; retrying");
        sleep(pause).await;
        pause = (pause * 2).min(MAX_RETRY_PAUSE);
    }
    Err(last.unwrap_or_else(|| Error::backend(STORE, what.to_owned(), true, "no try made")))
}

/// An acquisition's key until it is granted: dropped before that, it schedules the
/// key's deletion (with its tombstone while a put of it may still land).
struct Pending<'a> {
    grants: &'a Grants,
    key: String,
    armed: bool,
}

impl<'a> Pending<'a> {
    /// Registers `key` before its put is sent: until [`answered`](Self::answered), a
    /// put of it may land at any time, so its deletion writes `tomb`.
    fn new(grants: &'a Grants, key: String, session: i64, tomb: String) -> Self {
        grants.lock().insert(
            key.clone(),
            Grant {
                session,
                token: 0,
                reap_at: None,
                tomb: Some(tomb.into_boxed_str()),
            },
        );
        Self {
            grants,
            key,
            armed: true,
        }
    }

    /// The put was answered on its only try: no put of the key can land any more.
    fn answered(&self) {
        if let Some(grant) = self.grants.lock().get_mut(&self.key) {
            grant.tomb = None;
        }
    }

    /// How to delete the key (see [`Grant::retire`]).
    fn retire(&self) -> Option<(String, i64)> {
        self.grants.retire(&self.key)
    }

    fn set_token(&self, token: i64) {
        if let Some(grant) = self.grants.lock().get_mut(&self.key) {
            grant.token = token;
        }
    }

    /// The key now holds the lock: delete it at `reap_at` unless renewed.
    fn granted(mut self, reap_at: Instant) {
        self.grants.schedule(&self.key, reap_at);
        self.armed = false;
    }

    /// The key was deleted: forget it.
    fn deleted(mut self) {
        self.grants.lock().remove(&self.key);
        self.armed = false;
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.grants.schedule(&self.key, Instant::now());
        }
    }
}

/// How one try with one session ended.
enum Attempt {
    Done(Result<Lease>),
    /// The session ended, or our key vanished, while waiting: try again with a new key.
    Again(Error),
}

pub(crate) fn etcd_error(context: &str, err: etcd_client::Error) -> Error {
    let temporary = !matches!(
        err,
        etcd_client::Error::InvalidArgs(_)
            | etcd_client::Error::InvalidUri(_)
            | etcd_client::Error::EndpointError(_)
            | etcd_client::Error::Utf8Error(_)
    );
    Error::backend(STORE, context.to_owned(), temporary, err)
}

fn lost(lease: &Lease, reason: LossReason) -> Error {
    Error::Lost {
        name: lease.name().clone(),
        store: STORE,
        token: lease.token(),
        reason,
    }
}

fn token_of(lease: &Lease) -> i64 {
    i64::try_from(lease.token().0).unwrap_or(i64::MAX)
}

/// The keys under `dir` in create-revision order, excluding keys of longer names
/// (`dir` = `a/` must not count `a/b/x`, which belongs to the lock `a/b`).
fn queue_options() -> GetOptions {
    GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
}

fn queue<'k>(dir: &str, kvs: &'k [KeyValue]) -> Vec<&'k KeyValue> {
    kvs.iter()
        .filter(|kv| {
            kv.key_str()
                .ok()
                .and_then(|k| k.strip_prefix(dir))
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
        })
        .collect()
}

fn revision(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision())
}

impl EtcdBackend {
    /// Connects to the cluster in `config` and starts a session.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration; a temporary
    /// [`Error::Backend`] when no endpoint answers or the session lease cannot be
    /// granted.
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        config.validate()?;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some(user) = &config.user {
            options = options.with_user(user.clone(), config.password.clone().unwrap_or_default());
        }
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(|err| etcd_error("connect", err))?;
        let grants = Arc::new(Grants::default());
        let (events, _) = broadcast::channel(64);
        let reaper = tokio::spawn(reap(client.clone(), Arc::clone(&grants)));
        let backend = Self {
            inner: Arc::new(Inner {
                client,
                config,
                starting: tokio::sync::Mutex::new(()),
                grants,
                events,
                reaper,
            }),
        };
        backend.session().await?;
        Ok(backend)
    }

    /// Connects by URL (`etcd://h1:p1,h2:p2?prefix=...`).
    ///
    /// # Errors
    /// As [`EtcdConfig::from_url`] and [`connect`](Self::connect).
    pub async fn connect_url(url: &str) -> Result<Self> {
        Self::connect(EtcdConfig::from_url(url)?).await
    }

    /// The configuration this backend was connected with.
    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }

    /// The etcd client this backend uses, for tools and tests.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The id of the current session lease, if a live session exists.
    pub fn session_lease(&self) -> Option<i64> {
        self.live_session().map(|s| s.id())
    }

    /// The key directory of `name`: `{prefix}{name}/`.
    pub fn key_dir(&self, name: &LockName) -> String {
        format!("{}{}/", self.inner.config.prefix, name.as_str())
    }

    /// The tombstone of the `attempt`-th key of an acquisition, `key` =
    /// `{prefix}NAME/{lease:x}-{owner}`: `{prefix}\0NAME/{lease:x}-{owner}/{attempt}`.
    fn tomb_key(&self, key: &str, attempt: usize) -> String {
        let prefix = &self.inner.config.prefix;
        let rest = key.strip_prefix(prefix.as_str()).unwrap_or(key);
        format!("{prefix}\0{rest}/{attempt}")
    }

    fn live_session(&self) -> Option<Arc<Session>> {
        self.inner.grants.live_session()
    }

    /// The live session, starting a new one if there is none.
    async fn session(&self) -> Result<Arc<Session>> {
        if let Some(session) = self.live_session() {
            return Ok(session);
        }
        let _starting = self.inner.starting.lock().await;
        if let Some(session) = self.live_session() {
            return Ok(session);
        }
        let session = Arc::new(
            Session::start(
                &self.inner.client,
                self.inner.config.session_ttl_secs(),
                self.inner.events.clone(),
            )
            .await?,
        );
        *self
            .inner
            .grants
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&session));
        Ok(session)
    }

    /// Reads the queue of `dir`: its keys in create order, and the read's revision.
    async fn read_queue(&self, dir: &str) -> Result<(Vec<KeyValue>, i64)> {
        let got = call("read a lock's queue", || {
            let mut kv = self.inner.client.kv_client();
            async move { kv.get(dir, Some(queue_options().with_keys_only())).await }
        })
        .await?;
        let rev = revision(got.header());
        Ok((queue(dir, got.kvs()).into_iter().cloned().collect(), rev))
    }

    /// One try to be granted `req` with `session`, the `number`-th of the acquisition.
    async fn attempt(
        &self,
        req: &AcquireRequest,
        session: &Session,
        wait: &WaitDeadline,
        number: usize,
    ) -> Attempt {
        let dir = self.key_dir(&req.name);
        let key = format!("{dir}{:x}-{}", session.id(), req.owner);
        let tomb = self.tomb_key(&key, number);
        let pending = Pending::new(&self.inner.grants, key.clone(), session.id(), tomb.clone());
        let mut sent = Instant::now();
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                Compare::version(tomb.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(
                    key.as_str(),
                    req.owner.as_str(),
                    Some(PutOptions::new().with_lease(session.id())),
                ),
                TxnOp::get(dir.as_str(), Some(queue_options().with_keys_only())),
            ])
            .or_else([TxnOp::get(key.as_str(), None)]);
        // A try that etcd applied without answering is recognised on the next try:
        // the key then exists on our session lease, and we carry on with it. One that
        // etcd has not applied yet may still be applied later: unless the first try
        // was answered, deleting the key writes the tombstone that makes it a no-op.
        let mut tries = 0_usize;
        let put = match call(&format!("acquire `{}`", req.name), || {
            tries += 1;
            let (mut kv, txn) = (self.inner.client.kv_client(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await
        {
            Ok(put) => put,
            Err(err) => return Attempt::Done(Err(err)),
        };
        if tries == 1 {
            pending.answered();
        }
        let (mine, keys) = if put.succeeded() {
            let mine = revision(put.header());
            let keys = match put.op_responses().into_iter().nth(1) {
                Some(TxnOpResponse::Get(got)) => {
                    queue(&dir, got.kvs()).into_iter().cloned().collect()
                }
                _ => Vec::new(),
            };
            (mine, keys)
        } else {
            let ours = match put.op_responses().into_iter().next() {
                Some(TxnOpResponse::Get(got)) => got
                    .kvs()
                    .first()
                    .filter(|kv| kv.lease() == session.id())
                    .map(KeyValue::create_revision),
                _ => None,
            };
            let Some(mine) = ours else {
                return Attempt::Done(Err(Error::backend(
                    STORE,
                    format!("acquire `{}`", req.name),
                    false,
                    format!("the key {key} already existed; owner ids must be unique"),
                )));
            };
            match self.read_queue(&dir).await {
                Ok((keys, _)) => (mine, keys),
                Err(err) => {
                    pending.set_token(mine);
                    return Attempt::Done(Err(err));
                }
            }
        };
        pending.set_token(mine);
        let mut keys = keys;
        let mut read_at = mine;
        for _ in 0..MAX_WAKES {
            // Our key must still be there (the Jepsen check: a waiter whose session
            // expired must not take the lock just because its predecessor went away).
            let Some(place) = keys.iter().position(|kv| kv.create_revision() == mine) else {
                // The next attempt may reuse the key: a put of this one must not land.
                if let Some((tomb, lease)) = pending.retire() {
                    let retired = delete_own_key(
                        &self.inner.client,
                        &key,
                        mine,
                        Some((tomb.as_str(), lease)),
                    )
                    .await;
                    if let Err(err) = retired {
                        return Attempt::Done(Err(err));
                    }
                }
                pending.deleted();
                return Attempt::Again(lost_while_waiting(&req.name));
            };
            if place == 0 {
                let Some(session_deadline) = session.deadline() else {
                    return Attempt::Again(lost_while_waiting(&req.name));
                };
                let token = FencingToken(u64::try_from(mine).unwrap_or(0));
                let valid = valid_until(sent, req.ttl).min(session_deadline);
                pending.granted(sent + req.ttl);
                let lease = Lease::new(req.name.clone(), req.owner.clone(), token, valid);
                return Attempt::Done(Ok(lease.with_locator(key)));
            }
            if !wait.may_wait() || wait.passed() {
                return Attempt::Done(Err(self.give_up(pending, &key, mine, req, wait).await));
            }
            let before = keys[place - 1].key().to_vec();
            let woken = tokio::select! {
                woken = watch_deletion(&self.inner.client, before, read_at + 1) => woken,
                () = session.lost() => return Attempt::Again(lost_while_waiting(&req.name)),
                () = sleep_until(wait.deadline().unwrap_or_else(far_future)) => {
                    return Attempt::Done(Err(self.give_up(pending, &key, mine, req, wait).await));
                }
            };
            if let Err(err) = woken {
                return Attempt::Done(Err(err));
            }
            sent = Instant::now();
            match self.read_queue(&dir).await {
                Ok((now, at)) => (keys, read_at) = (now, at),
                Err(err) => return Attempt::Done(Err(err)),
            }
        }
        Attempt::Done(Err(Error::backend(
            STORE,
            format!("acquire `{}`", req.name),
            true,
            format!("woken {MAX_WAKES} times without being granted"),
        )))
    }

    /// Deletes a waiter's key before it reports `Contended`/`Timeout`, so the next
    /// acquirer does not queue behind it.
    async fn give_up(
        &self,
        pending: Pending<'_>,
        key: &str,
        token: i64,
        req: &AcquireRequest,
        wait: &WaitDeadline,
    ) -> Error {
        let retire = pending.retire();
        let retire = retire.as_ref().map(|(tomb, lease)| (tomb.as_str(), *lease));
        if delete_own_key(&self.inner.client, key, token, retire)
            .await
            .is_ok()
        {
            pending.deleted();
        }
        wait.give_up(&req.name, STORE)
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

fn lost_while_waiting(name: &LockName) -> Error {
    Error::backend(
        STORE,
        format!("acquire `{name}`"),
        true,
        "the session ended (or the waiting key was deleted) while waiting; retry",
    )
}

/// Waits until `key` is deleted at or after `from` (or the watch is cancelled, e.g.
/// by compaction, or the stream ends: the caller re-reads the queue either way).
async fn watch_deletion(client: &Client, key: Vec<u8>, from: i64) -> Result<()> {
    let options = WatchOptions::new()
        .with_start_revision(from)
        .with_filters([WatchFilterType::NoPut]);
    let mut stream: WatchStream = call("watch the key before ours", || {
        let (mut watch, key, options) = (client.watch_client(), key.clone(), options.clone());
        async move { watch.watch(key, Some(options)).await }
    })
    .await?;
    // Bounded: each message is either the creation notice, a progress notice or the end.
    for _ in 0..MAX_WAKES {
        match stream.message().await {
            Ok(Some(reply)) => {
                if reply.canceled()
                    || reply.compact_revision() > 0
                    || reply
                        .events()
                        .iter()
                        .any(|e| e.event_type() == EventType::Delete)
                {
                    return Ok(());
                }
            }
            Ok(None) | Err(_) => return Ok(()),
        }
    }
    Ok(())
}

#[async_trait]
impl LockBackend for EtcdBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            store: STORE,
            fencing: true,
            fifo: true,
            wait: WaitKind::Notify,
            lease: LeaseKind::Session,
            shared_between_processes: true,
        }
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Lease> {
        fencelock_core::check_ttl(req.ttl)?;
        let wait = WaitDeadline::start(req.wait);
        let mut last = None;
        for number in 0..MAX_SESSIONS_PER_ACQUIRE {
            let session = self.session().await?;
            match self.attempt(&req, &session, &wait, number).await {
                Attempt::Done(result) => return result,
                Attempt::Again(err) => last = Some(err),
            }
            if wait.passed() {
                return Err(wait.give_up(&req.name, STORE));
            }
        }
        Err(last.unwrap_or_else(|| lost_while_waiting(&req.name)))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let mut results = self.renew_all(&[(lease.clone(), ttl)]).await;
        results
            .pop()
            .unwrap_or_else(|| Err(lost(lease, LossReason::NotOurs)))
    }

    /// Costs no write: checks locally that the session lives and the grant has not
    /// run out, then confirms every key with one read per 128 leases.
    async fn renew_all(&self, leases: &[(Lease, Duration)]) -> Vec<Result<Lease>> {
        let sent = Instant::now();
        let session = self.live_session();
        let mut results: Vec<Option<Result<Lease>>> = Vec::with_capacity(leases.len());
        {
            let grants = self.inner.grants.lock();
            for (lease, _) in leases {
                let grant = lease.locator().and_then(|key| grants.get(key));
                let verdict = match (&session, grant) {
                    (None, _) => Some(Err(lost(lease, LossReason::SessionEnded))),
                    (Some(s), Some(g)) if g.session != s.id() => {
                        Some(Err(lost(lease, LossReason::SessionEnded)))
                    }
                    (Some(_), Some(g))
                        if g.token == token_of(lease) && g.reap_at.is_some_and(|at| at > sent) =>
                    {
                        None
                    }
                    _ => Some(Err(lost(lease, LossReason::NotOurs))),
                };
                results.push(verdict);
            }
        }
        let unknown: Vec<usize> = (0..leases.len())
            .filter(|&i| results[i].is_none())
            .collect();
        for chunk in unknown.chunks(MAX_TXN_OPS) {
            let reads: Vec<TxnOp> = chunk
                .iter()
                .map(|&i| {
                    let key = leases[i].0.locator().unwrap_or_default();
                    TxnOp::get(key, Some(GetOptions::new().with_keys_only()))
                })
                .collect();
            let txn = Txn::new().and_then(reads);
            let answer = call("confirm held lock keys", || {
                let (mut kv, txn) = (self.inner.client.kv_client(), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await;
            let answer = match answer {
                Ok(answer) => answer.op_responses(),
                Err(err) => {
                    let text = err.to_string();
                    for &i in chunk {
                        results[i] = Some(Err(Error::backend(STORE, "renew", true, text.clone())));
                    }
                    continue;
                }
            };
            let session_deadline = session.as_ref().and_then(|s| s.deadline());
            let mut grants = self.inner.grants.lock();
            for (&i, reply) in chunk.iter().zip(answer) {
                let (lease, ttl) = &leases[i];
                let token = token_of(lease);
                let present = matches!(&reply, TxnOpResponse::Get(got)
                    if got.kvs().first().is_some_and(|kv| kv.create_revision() == token));
                let key = lease.locator().unwrap_or_default();
                let grant = grants.get_mut(key).filter(|g| g.token == token);
                results[i] = Some(match (present, grant, session_deadline) {
                    (true, Some(grant), Some(deadline)) => {
                        grant.reap_at = Some(sent + *ttl);
                        Ok(lease.clone().renewed(valid_until(sent, *ttl).min(deadline)))
                    }
                    (_, _, None) => Err(lost(lease, LossReason::SessionEnded)),
                    _ => {
                        // A put of the key that may still land would make it again:
                        // the reaper deletes it and writes the tombstone.
                        if let Some(mut gone) = grants.remove(key).filter(|g| g.tomb.is_some()) {
                            gone.reap_at = Some(Instant::now());
                            grants.insert(key.to_owned(), gone);
                            self.inner.grants.wake.notify_one();
                        }
                        let _ = self.inner.events.send(StoreEvent::LeaseLost {
                            name: lease.name().clone(),
                            owner: lease.owner().clone(),
                        });
                        Err(lost(lease, LossReason::NotOurs))
                    }
                });
            }
        }
        results
            .into_iter()
            .zip(leases)
            .map(|(r, (lease, _))| r.unwrap_or_else(|| Err(lost(lease, LossReason::NotOurs))))
            .collect()
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let Some(key) = lease.locator() else {
            return Err(lost(lease, LossReason::NotOurs));
        };
        let token = token_of(lease);
        let known = self.inner.grants.lock().remove(key);
        let retire = known.as_ref().and_then(Grant::retire);
        match delete_own_key(&self.inner.client, key, token, retire).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(lost(lease, LossReason::NotOurs)),
            Err(err) => {
                // Leave the deletion to the reaper rather than to the session's end.
                if let Some(mut grant) = known {
                    grant.reap_at = Some(Instant::now());
                    self.inner.grants.lock().insert(key.to_owned(), grant);
                    self.inner.grants.wake.notify_one();
                }
                Err(err)
            }
        }
    }

    fn events(&self) -> Option<broadcast::Receiver<StoreEvent>> {
        Some(self.inner.events.subscribe())
    }

    async fn inspect(&self, name: &LockName) -> Result<Option<LockState>> {
        let dir = self.key_dir(name);
        let got = call(&format!("inspect `{name}`"), || {
            let mut kv = self.inner.client.kv_client();
            let dir = dir.as_str();
            async move { kv.get(dir, Some(queue_options())).await }
        })
        .await?;
        let keys = queue(&dir, got.kvs());
        Ok(keys.first().map(|kv| {
            // Keys from `etcdctl lock` or Go's Mutex have an empty value: show the key.
            let holder = match kv.value_str() {
                Ok(owner) if !owner.is_empty() => owner.to_owned(),
                _ => kv.key_str().unwrap_or_default()[dir.len()..].to_owned(),
            };
            LockState {
                holder: OwnerId::from_stored(holder),
                token: FencingToken(u64::try_from(kv.create_revision()).unwrap_or(0)),
                remaining: None,
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn unreachable_member() -> etcd_client::Error {
        etcd_client::Error::IoError(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    }

    #[tokio::test]
    async fn temporary_failures_are_retried_a_bounded_number_of_times() {
        let tries = AtomicUsize::new(0);
        let err = call("probe", || {
            tries.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(unreachable_member()) }
        })
        .await
        .unwrap_err();
        assert_eq!(tries.load(Ordering::SeqCst), REQUEST_TRIES);
        assert!(err.is_temporary(), "{err}");

        let tries = AtomicUsize::new(0);
        let answer = call("probe", || {
            let n = tries.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(unreachable_member())
                } else {
                    Ok(n)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(answer, 2, "the third try's answer");
    }

    #[tokio::test]
    async fn permanent_failures_are_not_retried() {
        let tries = AtomicUsize::new(0);
        let err = call("probe", || {
            tries.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(etcd_client::Error::InvalidArgs("bad".into())) }
        })
        .await
        .unwrap_err();
        assert_eq!(tries.load(Ordering::SeqCst), 1);
        assert!(!err.is_temporary(), "{err}");
    }
}
