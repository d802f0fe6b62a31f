//! What the Postgres and MySQL configurations share: the server to reach (its
//! password kept out of `Debug` and error text), the lock mode and the table options.

use std::fmt;
use std::time::Duration;

use fencelock_core::url::StoreUrl;
use fencelock_core::{Error, Result};

use crate::identifier::check_table_name;

/// How a database server keeps a lock (URL option `mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum LockMode {
    /// `mode=lease` (the default): a lease row per name with a TTL by the database's
    /// clock, renewed by the watchdog.
    #[default]
    Lease,
    /// `mode=session`: the server's own lock (a session-level advisory lock on
    /// Postgres, `GET_LOCK` on MySQL) on a connection of its own, held while the
    /// connection lives and its TTL is renewed.
    Session,
}

/// The server a store connects to, as given in its URL.
///
/// `Debug`, [`Display`](fmt::Display) and every error show it with the password
/// replaced by `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerAddress {
    connect_url: String,
    shown: String,
    endpoint: String,
}

impl ServerAddress {
    /// The URL without its password, e.g. `postgres://app:***@db:5432/locks`.
    pub fn redacted(&self) -> &str {
        &self.shown
    }

    /// Host, port and database, e.g. `db:5432/locks`, for messages.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The full URL for sqlx, password included: never log it.
    pub(crate) fn connect_url(&self) -> &str {
        &self.connect_url
    }
}

impl fmt::Debug for ServerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerAddress({})", self.shown)
    }
}

impl fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// One server dialect's URL rules.
pub(crate) struct Dialect {
    /// The schemes it accepts, the first being the one sqlx understands.
    pub(crate) schemes: &'static [&'static str],
    pub(crate) sqlx_scheme: &'static str,
    pub(crate) example: &'static str,
    /// Connection options handed on to sqlx as they are (TLS and the like).
    pub(crate) passthrough: &'static [&'static str],
    pub(crate) default_poll_max: Duration,
}

/// Everything the two server configurations hold, parsed and checked.
pub(crate) struct ServerSettings {
    pub(crate) server: ServerAddress,
    pub(crate) mode: LockMode,
    pub(crate) table: String,
    pub(crate) fence_table: String,
    pub(crate) prefix: String,
    pub(crate) pool_size: u32,
    pub(crate) connect_timeout: Duration,
    pub(crate) poll_min: Duration,
    pub(crate) poll_max: Duration,
}

/// The default lease table.
pub(crate) const DEFAULT_TABLE: &str = "fencelock_locks";
/// The default fence-gate table.
pub(crate) const DEFAULT_FENCE_TABLE: &str = "fencelock_fences";
/// The default pool size.
pub(crate) const DEFAULT_POOL_SIZE: u32 = 8;
/// The default connect timeout.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default first polling pause.
pub(crate) const DEFAULT_POLL_MIN: Duration = Duration::from_millis(5);
/// The largest pool accepted.
pub(crate) const MAX_POOL_SIZE: u32 = 256;
/// The longest prefix accepted, in bytes.
pub(crate) const MAX_PREFIX_LEN: usize = 256;
const MAX_PAUSE: Duration = Duration::from_secs(3600);

/// The options every server URL takes, besides the dialect's pass-through ones.
pub(crate) const OPTIONS: &[&str] = &[
    "mode",
    "table",
    "fence_table",
    "prefix",
    "pool_size",
    "connect_timeout",
    "poll_min",
    "poll_max",
];

impl Dialect {
    /// Parses `url` per this dialect.
    pub(crate) fn parse(&self, mut url: StoreUrl) -> Result<ServerSettings> {
        let shown_url = url.to_string();
        if !self.schemes.contains(&url.scheme()) {
            return Err(Error::config(format!(
                "`{shown_url}` is not a {} URL; write {}",
                self.schemes.join("/"),
                self.example
            )));
        }
        let body = url.body().to_owned();
        let endpoint = body
            .rsplit_once('@')
            .map_or(body.as_str(), |(_, host)| host);
        if endpoint.is_empty() || endpoint.starts_with('/') || endpoint.starts_with(':') {
            return Err(Error::config(format!(
                "`{shown_url}` names no server; write {}",
                self.example
            )));
        }
        let endpoint = endpoint.to_owned();
        let mut settings = ServerSettings {
            server: ServerAddress {
                connect_url: String::new(),
                shown: StoreUrl::parse(&format!("{}://{body}", url.scheme()))?.redacted(),
                endpoint,
            },
            mode: LockMode::Lease,
            table: DEFAULT_TABLE.to_owned(),
            fence_table: DEFAULT_FENCE_TABLE.to_owned(),
            prefix: String::new(),
            pool_size: DEFAULT_POOL_SIZE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            poll_min: DEFAULT_POLL_MIN,
            poll_max: self.default_poll_max,
        };
        if let Some(mode) = url.take("mode") {
            settings.mode = match mode.as_str() {
                "lease" => LockMode::Lease,
                "session" => LockMode::Session,
                _ => {
                    return Err(Error::config(format!(
                        "option `mode` of `{shown_url}` is `{mode}`; give mode=lease (the default) \
                         or mode=session"
                    )));
                }
            };
        }
        if let Some(table) = url.take("table") {
            settings.table = table;
        }
        if let Some(table) = url.take("fence_table") {
            settings.fence_table = table;
        }
        if let Some(prefix) = url.take("prefix") {
            settings.prefix = prefix;
        }
        if let Some(size) = url.take("pool_size") {
            settings.pool_size = size.parse().map_err(|_| {
                Error::config(format!(
                    "option `pool_size` of `{shown_url}` is `{size}`; give a whole number from 1 \
                     to {MAX_POOL_SIZE}, e.g. pool_size=8"
                ))
            })?;
        }
        if let Some(timeout) = url.take_duration("connect_timeout")? {
            settings.connect_timeout = timeout;
        }
        if let Some(pause) = url.take_duration("poll_min")? {
            settings.poll_min = pause;
        }
        if let Some(pause) = url.take_duration("poll_max")? {
            settings.poll_max = pause;
        }
        let mut passthrough = form_urlencoded::Serializer::new(String::new());
        let mut any = false;
        for key in self.passthrough {
            if let Some(value) = url.take(key) {
                passthrough.append_pair(key, &value);
                any = true;
            }
        }
        let known: Vec<&str> = OPTIONS.iter().chain(self.passthrough).copied().collect();
        url.finish(&known)?;
        settings.server.connect_url = format!("{}://{body}", self.sqlx_scheme);
        if any {
            settings.server.connect_url.push('?');
            settings.server.connect_url.push_str(&passthrough.finish());
        }
        Ok(settings)
    }
}

/// Checks the fields both server configurations share.
#[allow(clippy::too_many_arguments)]
pub(crate) fn validate(
    table: &str,
    fence_table: &str,
    prefix: &str,
    pool_size: u32,
    connect_timeout: Duration,
    poll_min: Duration,
    poll_max: Duration,
) -> Result<()> {
    check_table_name("table", table)?;
    check_table_name("fence_table", fence_table)?;
    if table.eq_ignore_ascii_case(fence_table) {
        return Err(Error::config(format!(
            "`table` and `fence_table` are both `{table}`; the lease rows and the fence gate \
             need two tables, e.g. fence_table={DEFAULT_FENCE_TABLE}"
        )));
    }
    if prefix.len() > MAX_PREFIX_LEN || prefix.contains('\0') {
        return Err(Error::config(format!(
            "prefix {prefix:?} is not usable: give at most {MAX_PREFIX_LEN} bytes without NUL, \
             e.g. prefix=myapp/"
        )));
    }
    if pool_size == 0 || pool_size > MAX_POOL_SIZE {
        return Err(Error::config(format!(
            "pool_size {pool_size} is out of range: give 1 to {MAX_POOL_SIZE} (default \
             {DEFAULT_POOL_SIZE})"
        )));
    }
    if connect_timeout.is_zero() || connect_timeout > MAX_PAUSE {
        return Err(Error::config(format!(
            "connect_timeout {connect_timeout:?} is not usable: give 1ms to 1h (default 10s)"
        )));
    }
    if poll_min < Duration::from_millis(1) || poll_min > poll_max || poll_max > MAX_PAUSE {
        return Err(Error::config(format!(
            "poll_min {poll_min:?} and poll_max {poll_max:?} are not usable: give 1ms <= \
             poll_min <= poll_max <= 1h"
        )));
    }
    Ok(())
}
