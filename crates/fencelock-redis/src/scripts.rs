//! The Lua scripts of the store, one per operation, and the key layout they work on.
//!
//! Every script runs by `EVALSHA`; redis-rs loads it with `SCRIPT LOAD` and retries
//! once when the server answers `NOSCRIPT` (after a restart or `SCRIPT FLUSH`).
//!
//! A grant is the key `{prefix}lock:{name}` holding `{owner}:{token}` with a `PX`
//! expiry; `{prefix}token:{name}` holds the name's token counter. On one server,
//! `{prefix}queue:{name}` (a sorted set) and `{prefix}wants:{name}` (a hash) hold the
//! waiters queued for a hand-off, so only a release that hands the lock on publishes;
//! Redlock's nodes instead mark `{prefix}waiters:{name}` while someone waits. The
//! namespaces start with different literals after the prefix, so no name's lock key
//! is another name's counter, queue or mark. Owner ids are 32 hex digits without `:`, so a value names its
//! owner unambiguously. Checks compare the whole value (owner **and** token), except
//! the cleanup of an acquire whose reply was never seen, which knows only the owner.
//!
//! This module is public for the Redlock driver, which runs the same scripts on each
//! of its nodes; it is not part of the stable API.

use std::sync::LazyLock;
use std::time::Duration;

use fencelock_core::{FencingToken, OwnerId};
use redis::aio::ConnectionLike;
use redis::{ErrorKind, RedisError, RedisResult, Script, Value};

/// Compares two non-negative decimal integers written without leading zeros (tokens),
/// exactly, whatever their size (Lua numbers are doubles).
const GREATER: &str = r"
local function greater(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
";

/// Whether a stored value is this grant: `owner:token` exactly (or marked with
/// [`WAITED_FOR`]), or any token of `owner` when the token is ''.
const OURS: &str = r"
local function ours(value, owner, token)
  if not value then return false end
  if token == '' then return string.sub(value, 1, #owner + 1) == owner .. ':' end
  local grant = owner .. ':' .. token
  return value == grant or value == grant .. '~'
end
";

/// The mark a single server's grant carries once a waiter queued for it: the stored
/// value is then `owner:token~`, and only a release of a marked grant looks at the
/// queue. Every refused attempt that queues marks the grant it found (keeping its
/// expiry), and a hand-off marks the grant it makes while others are still queued.
/// A grant made by `SET NX` while waiters are queued (the previous holder expired) is
/// marked by their next attempts, which each waiter makes at that expiry at the latest;
/// if the previous grant vanished without a release before its expiry (an operator's
/// `DEL` or `FLUSHALL`), the waiters look again only then, as they would without a
/// queue.
pub const WAITED_FOR: char = '~';

/// The server clock in microseconds since the Unix epoch (exact in a double until the
/// year 2255). Scripts replicate by effects (the only way since Redis 7, the default
/// since 5), so reading the clock before writing is allowed.
const NOW_US: &str = r"
local function now_us()
  local clock = redis.call('TIME')
  return tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end
";

/// A single server's token for a grant made at `now` (µs): `max(counter + 1, now)`,
/// stored as the counter `KEYS[2]` for `counter_ms`. The counter is swapped for the
/// clock reading with `SET … GET` (Redis 6.2) and written again only when it was not
/// below the clock (two grants in one microsecond, or a clock that went back). Defines
/// `mint(now, counter_ms)`, which returns the token as a string.
const MINT: &str = r"
local function mint(now, counter_ms)
  local token = string.format('%d', now)
  local last = tonumber(redis.call('SET', KEYS[2], token, 'PX', counter_ms, 'GET') or '')
  if last and last >= now then
    token = string.format('%d', last + 1)
    redis.call('SET', KEYS[2], token, 'PX', counter_ms)
  end
  return token
end
";

/// How long a waiter's mark outlives the holder's remaining time (or the 1 s recheck
/// of a grant without expiry), in ms: the waiter looks again, and marks again, before
/// its mark ends.
const WAITER_MARGIN_MS: u64 = 2000;

/// Marks that someone waits for `KEYS[3]`'s lock, for `pttl` plus a margin, so its
/// release publishes. Defines `mark_waiter(pttl)`.
const MARK_WAITER: &str = r"
local function mark_waiter(pttl)
  local ms = pttl
  if ms < 0 then ms = 1000 end
  redis.call('SET', KEYS[3], '1', 'PX', ms + tonumber(ARGV[#ARGV]))
end
";

/// KEYS: lock, counter, and, for an attempt that may queue, queue and wants. ARGV:
/// owner, ttl ms, counter ttl ms, and, for an attempt that may queue, queue ms, the
/// waiter's hand-off channel, margin ms, queued ('1': `owner` may be queued from an
/// earlier attempt), the attempt's id. The token when granted, `{pttl}` when held (pttl
/// -1: held without expiry). An attempt that does not wait sends only what it uses.
///
/// The token is minted by `MINT`, `max(counter + 1, now_us)`: it rises by at least one
/// per attempt, and it never lags the server clock, so a counter that is missing
/// (expired, lost with all data) or behind (a replica that missed the last writes)
/// still yields a token above every one minted before, as long as the clock did not go
/// back. An uncontended acquire is three commands: `TIME`, `SET … GET` and the grant's
/// `SET NX PX`. Every attempt counts, granted or not; the counter expires `counter ttl`
/// after the last one.
///
/// A grant that a release handed to `owner` while it waited is returned as granted,
/// with its expiry reset to a full TTL from now. A refused attempt that may wait
/// queues `owner` (keeping its place if already queued) until the holder's remaining
/// time plus the margin, or the end of its own wait if sooner: the score in `queue` is
/// when it first queued (server ms), and `wants` holds
/// `attempt/ttl_ms:until_ms:channel`, rewritten by each attempt, so a hand-off names
/// the attempt it followed. It also marks the grant [`WAITED_FOR`], so that its release
/// hands it on.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{NOW_US}
{MINT}
local now = now_us()
local token = mint(now, ARGV[3])
if redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'NX', 'PX', ARGV[2]) then
  if ARGV[7] == '1' then
    redis.call('ZREM', KEYS[3], ARGV[1])
    redis.call('HDEL', KEYS[4], ARGV[1])
  end
  return tonumber(token)
end
local mine = ARGV[1] .. ':'
local value = redis.call('GET', KEYS[1])
if string.sub(value, 1, #mine) == mine then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if KEYS[3] then
    redis.call('ZREM', KEYS[3], ARGV[1])
    redis.call('HDEL', KEYS[4], ARGV[1])
  end
  return tonumber(string.match(value, '(%d+)~?$', #mine + 1))
end
local pttl = redis.call('PTTL', KEYS[1])
if ARGV[4] then
  if string.sub(value, -1) ~= '~' then
    if pttl >= 0 then
      redis.call('SET', KEYS[1], value .. '~', 'PX', math.max(pttl, 1))
    else
      redis.call('SET', KEYS[1], value .. '~')
    end
  end
  local ms = pttl
  if ms < 0 then ms = 1000 end
  ms = math.min(ms + tonumber(ARGV[6]), tonumber(ARGV[4]))
  local now_ms = math.floor(now / 1000)
  redis.call('ZADD', KEYS[3], 'NX', now_ms, ARGV[1])
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[8] .. '/' .. ARGV[2] .. ':' .. string.format('%d', now_ms + ms) .. ':' .. ARGV[5])
  if redis.call('PTTL', KEYS[3]) < ms then
    redis.call('PEXPIRE', KEYS[3], ms)
    redis.call('PEXPIRE', KEYS[4], ms)
  end
end
return {{pttl}}"
    ))
});

/// Redlock's first phase. KEYS: lock, counter, waiters. ARGV: owner, ttl ms, counter
/// ttl ms, margin ms. When the name is free (or already claimed by `owner`, from an
/// earlier attempt whose release did not arrive), claims it and counts: the counter
/// becomes `counter + 1`, or the server time in µs when the counter is missing (or not
/// a number), the claim is stamped `owner:count`, and the count is returned. The
/// counter and the claim are written in one script, so the count is stored on the node
/// while this claim is live there. `{pttl}` when held by someone else.
///
/// The count is seeded from the clock only when missing, not floored at it on every
/// claim, so nodes that saw the same grants hold the same count and a grant whose
/// majority agrees needs no second phase. A counter lost with the node's data is
/// re-seeded above every count minted before, as long as the clock did not go back:
/// a count gains one per claim granted on a node, far less than one per microsecond.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{NOW_US}
{OURS}
{MARK_WAITER}
local value = redis.call('GET', KEYS[1])
if value and not ours(value, ARGV[1], '') then
  local pttl = redis.call('PTTL', KEYS[1])
  mark_waiter(pttl)
  return {{pttl}}
end
local count = redis.pcall('INCR', KEYS[2])
if type(count) ~= 'number' or count == 1 then
  count = now_us()
  redis.call('SET', KEYS[2], string.format('%d', count), 'PX', ARGV[3])
else
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. string.format('%d', count), 'PX', ARGV[2])
return count"
    ))
});

/// Redlock's second phase, when the granting nodes' counts differ. KEYS: lock,
/// counter. ARGV: owner, token, counter ttl ms. Raises the counter to at least `token`
/// (always, so a lagging node catches up), and restamps a claim of `owner` that is
/// still live as `owner:token`, keeping its expiry. Returns 1 if the claim was still
/// ours, else 0.
static RAISE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{GREATER}
{OURS}
local last = redis.call('GET', KEYS[2])
if (not last) or (not tonumber(last)) or greater(ARGV[2], last) then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
else
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
if ours(redis.call('GET', KEYS[1]), ARGV[1], '') then
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl > 0 then
    redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 'PX', pttl)
    return 1
  end
end
return 0"
    ))
});

/// KEYS: the lock keys of a batch. ARGV: owner, token ('' for any), ttl ms per key.
/// One 1 (extended) or 0 (not ours any more) per key.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{OURS}
local renewed = {{}}
for i, key in ipairs(KEYS) do
  local at = (i - 1) * 3
  if ours(redis.call('GET', key), ARGV[at + 1], ARGV[at + 2]) then
    redis.call('PEXPIRE', key, ARGV[at + 3])
    renewed[i] = 1
  else
    renewed[i] = 0
  end
end
return renewed"
    ))
});

/// KEYS: lock, waiters. ARGV: owner, token ('' for any), channel, name.
/// Deletes the grant if it is ours and, if a waiter marked the name, publishes the
/// name on the channel: 1, else 0. A waiter's failed attempt and a release are both
/// atomic, so every waiter whose attempt came before the release is heard.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{OURS}
if ours(redis.call('GET', KEYS[1]), ARGV[1], ARGV[2]) then
  if redis.call('DEL', KEYS[1], KEYS[2]) == 2 then
    redis.call('PUBLISH', ARGV[3], ARGV[4])
  end
  return 1
end
return 0"
    ))
});

/// KEYS: lock, counter, queue, wants. ARGV: owner, token ('' for any), name, counter
/// ttl ms, leave ('1': first take `owner` out of the queue).
///
/// The release of one server: deletes the grant if it is ours and, if it is marked
/// [`WAITED_FOR`], hands the lock to the longest-queued waiter whose entry is still
/// live (entries past their time are dropped, at most 32 per release): its grant is
/// made here, with a new token from `MINT` and the TTL it asked for (marked
/// if others are still queued), and `name NUL owner:token NUL attempt` is published on
/// the channel the waiter queued with (its own backend's), so only its process hears
/// it; `attempt` is the id of the waiter's attempt that wrote the entry, so the waiter
/// can tell a hand-off that followed its latest attempt from an older one. An entry
/// without an attempt id (`ttl_ms:until_ms:channel`, from an older acquire script) is
/// handed the lock with a message without one. `{'owner:token', 'attempt'}` when
/// handed on, 1 when freed, 0 when not ours. An uncontended release is two commands
/// (`GET`, `DEL`) and publishes nothing.
static HAND_OFF: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{OURS}
{NOW_US}
{MINT}
if ARGV[5] == '1' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[4], ARGV[1])
end
local value = redis.call('GET', KEYS[1])
if not ours(value, ARGV[1], ARGV[2]) then
  return 0
end
redis.call('DEL', KEYS[1])
if string.sub(value, -1) ~= '~' then
  return 1
end
local now = nil
for _ = 1, 32 do
  local head = redis.call('ZRANGE', KEYS[3], 0, 0)
  if #head == 0 then break end
  local next_owner = head[1]
  local wants = redis.call('HGET', KEYS[4], next_owner)
  redis.call('ZREM', KEYS[3], next_owner)
  redis.call('HDEL', KEYS[4], next_owner)
  if wants then
    now = now or now_us()
    local attempt, ttl, until_ms, channel = string.match(wants, '^(%d+)/(%d+):(%d+):(.+)$')
    if not attempt then
      ttl, until_ms, channel = string.match(wants, '^(%d+):(%d+):(.+)$')
    end
    ttl = tonumber(ttl)
    if ttl and tonumber(until_ms) * 1000 > now then
      local grant = next_owner .. ':' .. mint(now, math.max(tonumber(ARGV[4]), ttl))
      local stored = grant
      if redis.call('ZCARD', KEYS[3]) > 0 then stored = grant .. '~' end
      redis.call('SET', KEYS[1], stored, 'PX', ttl)
      if attempt then
        redis.call('PUBLISH', channel, ARGV[3] .. '\0' .. grant .. '\0' .. attempt)
        return {{grant, attempt}}
      end
      redis.call('PUBLISH', channel, ARGV[3] .. '\0' .. grant)
      return {{grant}}
    end
  end
end
return 1"
    ))
});

/// KEYS: lock. `{value, pttl}` of the grant read atomically, or nil.
static INSPECT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local value = redis.call('GET', KEYS[1])
if not value then return false end
return {value, redis.call('PTTL', KEYS[1])}",
    )
});

/// KEYS: fence key, optionally a key to write. ARGV: token, optionally the value.
/// Admits a token not lower than the stored one, stores it (and writes the key):
/// `{1, token}`; refuses a lower one: `{0, stored}`.
static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{GREATER}
local stored = redis.call('GET', KEYS[1])
if stored and greater(stored, ARGV[1]) then return {{0, stored}} end
redis.call('SET', KEYS[1], ARGV[1])
if KEYS[2] then redis.call('SET', KEYS[2], ARGV[2]) end
return {{1, ARGV[1]}}"
    ))
});

/// Loads every script into the server's cache (concurrently: about one round trip), so
/// first uses need no `NOSCRIPT` retry.
///
/// # Errors
/// The first failure.
pub async fn load_all(conn: &(impl ConnectionLike + Send + Clone)) -> RedisResult<()> {
    let scripts = [
        &ACQUIRE, &CLAIM, &RAISE, &RENEW, &RELEASE, &HAND_OFF, &INSPECT, &ADMIT,
    ];
    let loads = scripts.map(|script| {
        let mut conn = conn.clone();
        async move { script.prepare_invoke().load_async(&mut conn).await }
    });
    for loaded in futures_util::future::join_all(loads).await {
        loaded?;
    }
    Ok(())
}

/// Where a prefix's keys and release channel live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySpace {
    prefix: String,
}

impl KeySpace {
    /// The keys under `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `{prefix}lock:{name}`: the grant of `name`.
    pub fn lock(&self, name: &str) -> String {
        format!("{}lock:{name}", self.prefix)
    }

    /// `{prefix}token:{name}`: the token counter of `name`.
    pub fn token(&self, name: &str) -> String {
        format!("{}token:{name}", self.prefix)
    }

    /// `{prefix}fence:{resource}`: the highest token a fence gate admitted.
    pub fn fence(&self, resource: &str) -> String {
        format!("{}fence:{resource}", self.prefix)
    }

    /// `{prefix}waiters:{name}`: set while someone waits for `name`, so that its
    /// release publishes.
    pub fn waiters(&self, name: &str) -> String {
        format!("{}waiters:{name}", self.prefix)
    }

    /// `{prefix}queue:{name}`: the owners waiting for `name` on one server, scored by
    /// when they first queued.
    pub fn queue(&self, name: &str) -> String {
        format!("{}queue:{name}", self.prefix)
    }

    /// `{prefix}wants:{name}`: each queued owner's latest attempt, TTL and the end of
    /// its entry.
    pub fn wants(&self, name: &str) -> String {
        format!("{}wants:{name}", self.prefix)
    }

    /// `{prefix}handoff:{id}`: where releases publish the grants they hand to waiters
    /// of the one-server backend `id`.
    pub fn handoff_channel(&self, id: &str) -> String {
        format!("{}handoff:{id}", self.prefix)
    }

    /// `{prefix}released`: where Redlock releases publish the name they freed.
    pub fn channel(&self) -> String {
        format!("{}released", self.prefix)
    }
}

/// The outcome of one acquire or claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Granted with this token (for a Redlock claim: the node's count, see [`claim`]).
    Granted(FencingToken),
    /// Held by someone else for this much longer; `None` if the grant has no expiry.
    Held(Option<Duration>),
}

/// A lease as the renewal script checks it.
#[derive(Clone, Copy, Debug)]
pub struct Renewal<'a> {
    /// The lock's name.
    pub name: &'a str,
    /// Its owner.
    pub owner: &'a OwnerId,
    /// Its token, or `None` to match any token of the owner.
    pub token: Option<FencingToken>,
    /// The new TTL.
    pub ttl: Duration,
}

/// Takes `name` for `owner` if free (or if a release handed it to `owner`) and mints
/// its token (script `ACQUIRE`). With `queue`, a refused attempt queues `owner` for a
/// hand-off by the next release (see [`Queueing`]).
///
/// # Errors
/// The command's failure; the grant may then have been made, and `owner` queued (undo
/// both with [`release_handing_off`] and `leave_queue`).
pub async fn acquire(
    conn: &mut (impl ConnectionLike + Send),
    keys: &KeySpace,
    name: &str,
    owner: &OwnerId,
    ttl: Duration,
    token_ttl: Duration,
    queue: Option<Queueing<'_>>,
) -> RedisResult<Attempt> {
    let mut invocation = ACQUIRE.prepare_invoke();
    invocation
        .key(keys.lock(name))
        .key(keys.token(name))
        .arg(owner.as_str())
        .arg(millis_ceil(ttl))
        .arg(millis_ceil(token_ttl.max(ttl)));
    if let Some(queue) = queue {
        invocation
            .key(keys.queue(name))
            .key(keys.wants(name))
            .arg(millis_ceil(queue.at_most))
            .arg(queue.channel)
            .arg(WAITER_MARGIN_MS)
            .arg(if queue.queued_before { "1" } else { "0" })
            .arg(queue.attempt);
    }
    attempt(invocation.invoke_async(conn).await?)
}

/// How a refused [`acquire`] queues its owner for a hand-off.
#[derive(Clone, Copy, Debug)]
pub struct Queueing<'a> {
    /// The longest the owner stays queued (the rest of its wait).
    pub at_most: Duration,
    /// The channel a hand-off to the owner is published on (its backend's).
    pub channel: &'a str,
    /// An earlier attempt of the same wait was sent, so the owner may be queued
    /// already (a grant then takes it out of the queue).
    pub queued_before: bool,
    /// This attempt's id ([`Handoff::expect_next`](crate::wake::Handoff::expect_next)),
    /// written in the queue entry and echoed by a hand-off that reads it.
    pub attempt: u64,
}

/// What a one-server release did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Released {
    /// The grant was not (or no longer) ours: nothing changed.
    NotOurs,
    /// Deleted; nobody was queued.
    Freed,
    /// Deleted and handed to a queued owner.
    HandedTo(Handed),
}

/// A grant a release handed to a queued waiter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handed {
    /// The waiter it was handed to.
    pub owner: OwnerId,
    /// The grant's token.
    pub token: FencingToken,
    /// The id of the waiter's attempt whose queue entry the release read; `None` for an
    /// entry or a message of an older script, which carries none.
    pub attempt: Option<u64>,
}

/// Releases `owner`'s grant of `name` (with `token`, or any token when `None`) on one
/// server and hands the lock to the longest-queued live waiter (script `HAND_OFF`).
/// With `leave_queue`, first takes `owner` out of the queue (for a waiter that stops
/// waiting, or an acquire whose reply was lost).
///
/// # Errors
/// The command's failure.
pub async fn release_handing_off(
    conn: &mut (impl ConnectionLike + Send),
    keys: &KeySpace,
    name: &str,
    owner: &OwnerId,
    token: Option<FencingToken>,
    token_ttl: Duration,
    leave_queue: bool,
) -> RedisResult<Released> {
    let reply: Value = HAND_OFF
        .key(keys.lock(name))
        .key(keys.token(name))
        .key(keys.queue(name))
        .key(keys.wants(name))
        .arg(owner.as_str())
        .arg(token.map_or_else(String::new, |t| t.0.to_string()))
        .arg(name)
        .arg(millis_ceil(token_ttl))
        .arg(if leave_queue { "1" } else { "0" })
        .invoke_async(conn)
        .await?;
    match reply {
        Value::Int(0) => Ok(Released::NotOurs),
        Value::Int(1) => Ok(Released::Freed),
        Value::Array(ref items) => {
            let (grant, attempt) = match items.as_slice() {
                [Value::BulkString(grant)] => (std::str::from_utf8(grant).ok(), Some(None)),
                [Value::BulkString(grant), Value::BulkString(attempt)] => (
                    std::str::from_utf8(grant).ok(),
                    std::str::from_utf8(attempt)
                        .ok()
                        .and_then(|a| a.parse().ok())
                        .map(Some),
                ),
                _ => (None, None),
            };
            match (grant.and_then(parse_value), attempt) {
                (Some((owner, Some(token))), Some(attempt)) => Ok(Released::HandedTo(Handed {
                    owner,
                    token,
                    attempt,
                })),
                _ => Err(unexpected(format!("{reply:?} is not a hand-off grant"))),
            }
        }
        other => Err(unexpected(format!("{other:?} is not a release outcome"))),
    }
}

/// Splits a release message: the freed name, and the grant if the release handed the
/// lock on (`name NUL owner:token NUL attempt`, or `name NUL owner:token` from an older
/// script).
pub fn parse_release_message(payload: &[u8]) -> Option<(&str, Option<Handed>)> {
    let (name, grant) = match payload.iter().position(|&b| b == 0) {
        Some(at) => (&payload[..at], Some(&payload[at + 1..])),
        None => (payload, None),
    };
    let name = std::str::from_utf8(name).ok()?;
    let Some(grant) = grant else {
        return Some((name, None));
    };
    let (grant, attempt) = match grant.iter().position(|&b| b == 0) {
        Some(at) => {
            let attempt = std::str::from_utf8(&grant[at + 1..]).ok()?.parse().ok()?;
            (&grant[..at], Some(attempt))
        }
        None => (grant, None),
    };
    match parse_value(std::str::from_utf8(grant).ok()?)? {
        (owner, Some(token)) => Some((
            name,
            Some(Handed {
                owner,
                token,
                attempt,
            }),
        )),
        (_, None) => None,
    }
}

/// Redlock's first phase on one node: claims `name` for `owner` if free, counts, and
/// stamps the claim with the count (script `CLAIM`), keeping the counter for
/// `token_ttl` (or `ttl` if longer) after this claim. [`Attempt::Granted`] carries the
/// node's count.
///
/// # Errors
/// As [`acquire`].
pub async fn claim(
    conn: &mut (impl ConnectionLike + Send),
    keys: &KeySpace,
    name: &str,
    owner: &OwnerId,
    ttl: Duration,
    token_ttl: Duration,
) -> RedisResult<Attempt> {
    let reply: Value = CLAIM
        .key(keys.lock(name))
        .key(keys.token(name))
        .key(keys.waiters(name))
        .arg(owner.as_str())
        .arg(millis_ceil(ttl))
        .arg(millis_ceil(token_ttl.max(ttl)))
        .arg(WAITER_MARGIN_MS)
        .invoke_async(conn)
        .await?;
    attempt(reply)
}

/// Redlock's second phase on one node: raises the counter of `name` to at least
/// `token` and restamps `owner`'s claim with it (script `RAISE`). Returns whether the
/// claim was still live; the counter is raised either way.
///
/// # Errors
/// The command's failure.
pub async fn raise(
    conn: &mut (impl ConnectionLike + Send),
    keys: &KeySpace,
    name: &str,
    owner: &OwnerId,
    token: FencingToken,
    token_ttl: Duration,
) -> RedisResult<bool> {
    let live: i64 = RAISE
        .key(keys.lock(name))
        .key(keys.token(name))
        .arg(owner.as_str())
        .arg(token.0.to_string())
        .arg(millis_ceil(token_ttl))
        .invoke_async(conn)
        .await?;
    Ok(live == 1)
}

/// Extends every lease of `batch` that is still ours, in one script (script `RENEW`): one
/// `true` per lease extended, `false` per lease lost.
///
/// # Errors
/// The command's failure.
pub async fn renew(
    conn: &mut (impl ConnectionLike + Send),
    keys: &KeySpace,
    batch: &[Renewal<'_>],
) -> RedisResult<Vec<bool>> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let mut invocation = RENEW.prepare_invoke();
    for lease in batch {
        invocation
            .key(keys.lock(lease.name))
            .arg(lease.owner.as_str())
            .arg(lease.token.map_or_else(String::new, |t| t.0.to_string()))
            .arg(millis_ceil(lease.ttl));
    }
    let renewed: Vec<i64> = invocation.invoke_async(conn).await?;
    if renewed.len() != batch.len() {
        return Err(unexpected(format!(
            "the renewal script answered {} results for {} leases",
            renewed.len(),
            batch.len()
        )));
    }
    Ok(renewed.into_iter().map(|r| r == 1).collect())
}

/// Deletes `owner`'s grant of `name` (with `token`, or any token when `None`) and
/// publishes the release if someone waits (script `RELEASE`). Returns whether it was
/// ours.
///
/// # Errors
/// The command's failure.
pub async fn release(
    conn: &mut (impl ConnectionLike + Send),
    keys: &KeySpace,
    name: &str,
    owner: &OwnerId,
    token: Option<FencingToken>,
) -> RedisResult<bool> {
    let deleted: i64 = RELEASE
        .key(keys.lock(name))
        .key(keys.waiters(name))
        .arg(owner.as_str())
        .arg(token.map_or_else(String::new, |t| t.0.to_string()))
        .arg(keys.channel())
        .arg(name)
        .invoke_async(conn)
        .await?;
    Ok(deleted == 1)
}

/// The stored value of `name`'s grant and its remaining time (`None`: no expiry), or
/// `None` when it is free (script `INSPECT`).
///
/// # Errors
/// The command's failure.
pub async fn inspect(
    conn: &mut (impl ConnectionLike + Send),
    keys: &KeySpace,
    name: &str,
) -> RedisResult<Option<(String, Option<Duration>)>> {
    let reply: Option<(String, i64)> = INSPECT.key(keys.lock(name)).invoke_async(conn).await?;
    Ok(reply.map(|(value, pttl)| (value, remaining(pttl))))
}

/// Admits `token` for `resource` if not lower than the highest admitted, optionally
/// writing `write = (key, value)` in the same script (script `ADMIT`). `Ok(Ok(()))` when
/// admitted, `Ok(Err(highest))` when refused.
///
/// # Errors
/// The command's failure.
pub async fn admit(
    conn: &mut (impl ConnectionLike + Send),
    keys: &KeySpace,
    resource: &str,
    token: FencingToken,
    write: Option<(&str, &[u8])>,
) -> RedisResult<Result<(), FencingToken>> {
    let mut invocation = ADMIT.prepare_invoke();
    invocation
        .key(keys.fence(resource))
        .arg(token.0.to_string());
    if let Some((key, value)) = write {
        invocation.key(key).arg(value);
    }
    let (admitted, stored): (i64, String) = invocation.invoke_async(conn).await?;
    if admitted == 1 {
        return Ok(Ok(()));
    }
    Ok(Err(parse_token(&stored)?))
}

/// Splits a stored value `owner:token` (`owner:` for a Redlock claim not yet stamped),
/// ignoring a [`WAITED_FOR`] mark.
pub fn parse_value(value: &str) -> Option<(OwnerId, Option<FencingToken>)> {
    let value = value.strip_suffix(WAITED_FOR).unwrap_or(value);
    let (owner, token) = value.split_once(':')?;
    if owner.is_empty() {
        return None;
    }
    let token = match token {
        "" => None,
        digits => Some(FencingToken(digits.parse().ok()?)),
    };
    Some((OwnerId::from_stored(owner), token))
}

/// An acquire's or a claim's reply: the token (a positive integer) when granted,
/// `{pttl}` when held.
fn attempt(reply: Value) -> RedisResult<Attempt> {
    match reply {
        Value::Int(token) if token > 0 => Ok(Attempt::Granted(FencingToken(token.unsigned_abs()))),
        Value::Array(ref items) => match items.as_slice() {
            [Value::Int(pttl)] => Ok(Attempt::Held(remaining(*pttl))),
            _ => Err(unexpected(format!("{reply:?} is not a remaining time"))),
        },
        other => Err(unexpected(format!("{other:?} is not a grant"))),
    }
}

fn parse_token(text: &str) -> RedisResult<FencingToken> {
    text.parse()
        .map(FencingToken)
        .map_err(|_| unexpected(format!("`{text}` is not a fencing token")))
}

/// A `PTTL` reply as a remaining time: `None` for -1 (no expiry); -2 (gone) and
/// anything negative count as zero.
fn remaining(pttl: i64) -> Option<Duration> {
    match pttl {
        -1 => None,
        ms => Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
    }
}

fn unexpected(detail: String) -> RedisError {
    RedisError::from((ErrorKind::TypeError, "unexpected script reply", detail))
}

/// A duration in whole milliseconds, rounded up (at least 1) so the store never grants
/// less than asked.
pub fn millis_ceil(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_and_token_keys_never_meet() {
        let keys = KeySpace::new("p:");
        assert_eq!(keys.lock("a"), "p:lock:a");
        assert_eq!(keys.token("a"), "p:token:a");
        assert_eq!(keys.waiters("a"), "p:waiters:a");
        assert_eq!(keys.queue("a"), "p:queue:a");
        assert_eq!(keys.wants("a"), "p:wants:a");
        assert_ne!(keys.lock("queue:a"), keys.queue("a"));
        assert_ne!(keys.lock("wants:a"), keys.wants("a"));
        assert_eq!(keys.channel(), "p:released");
        // A name that looks like another namespace stays in its own.
        assert_ne!(keys.lock("token:a"), keys.token("a"));
        assert_ne!(keys.lock("waiters:a"), keys.waiters("a"));
        assert!(
            keys.lock("x").starts_with("p:lock:") && keys.token("lock:x").starts_with("p:token:")
        );
    }

    #[test]
    fn release_messages_name_the_lock_and_any_hand_off() {
        assert_eq!(parse_release_message(b"jobs/a"), Some(("jobs/a", None)));
        let (name, grant) = parse_release_message(b"jobs/a\0abcd:42").unwrap();
        assert_eq!(name, "jobs/a");
        let handed = grant.unwrap();
        assert_eq!(
            (handed.owner.as_str(), handed.token, handed.attempt),
            ("abcd", FencingToken(42), None)
        );
        let (_, grant) = parse_release_message(b"jobs/a\0abcd:42\x007").unwrap();
        assert_eq!(grant.unwrap().attempt, Some(7), "the attempt it followed");
        // A grant without a token, a bad attempt id, or not UTF-8, is not a hand-off
        // message.
        assert_eq!(parse_release_message(b"jobs/a\0abcd:"), None);
        assert_eq!(parse_release_message(b"jobs/a\0abcd:42\0x"), None);
        assert_eq!(parse_release_message(b"jobs/\xff"), None);
    }

    #[test]
    fn stored_values_name_owner_and_token() {
        let (owner, token) = parse_value("0123abcd:1732170000123456").unwrap();
        assert_eq!(
            (owner.as_str(), token),
            ("0123abcd", Some(FencingToken(1_732_170_000_123_456)))
        );
        assert_eq!(parse_value("0123abcd:").unwrap().1, None);
        assert!(parse_value("garbage").is_none() && parse_value(":5").is_none());
        assert!(parse_value("o:notanumber").is_none());
    }

    #[test]
    fn ttls_round_up_to_whole_milliseconds() {
        assert_eq!(millis_ceil(Duration::from_micros(1500)), 2);
        assert_eq!(millis_ceil(Duration::ZERO), 1);
        assert_eq!(millis_ceil(Duration::from_secs(3)), 3000);
        assert_eq!(remaining(-1), None);
        assert_eq!(remaining(-2), Some(Duration::ZERO));
        assert_eq!(remaining(250), Some(Duration::from_millis(250)));
    }
}
