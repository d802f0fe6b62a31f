//! Store configuration: plain data with documented defaults, parsed from a URL.

use std::fmt;
use std::time::Duration;

use fencelock_core::url::StoreUrl;
use fencelock_core::{Error, Result};

/// How to reach etcd: `etcd://[user:password@]h1:p1,h2:p2?option=value&...`.
///
/// The body is a comma-separated list of `host:port` client endpoints of one cluster
/// (plain HTTP; TLS is not supported yet). URL options (all optional): `prefix`
/// (may be empty, for interop with `etcdctl lock NAME` and Go's `concurrency.Mutex`),
/// `session_ttl` and `connect_timeout` (`500ms`, `10s`, ...). Each field below
/// documents its default. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdConfig {
    /// Client endpoints as `http://host:port`, at least one.
    pub endpoints: Vec<String>,
    /// Prepended to every lock name: the lock `NAME` lives under the keys
    /// `{prefix}NAME/`. Default [`DEFAULT_PREFIX`](Self::DEFAULT_PREFIX); empty gives
    /// `etcdctl lock`'s layout.
    pub prefix: String,
    /// The TTL of the session lease that carries every grant of one backend; the
    /// lease is kept alive every third of it. A client that stops (crash, pause,
    /// partition) holds its locks at most this long. Default 10 s; etcd rounds values
    /// below its own minimum (about 2 s with default election timeouts) up.
    pub session_ttl: Duration,
    /// How long connecting to an endpoint may take. Default 5 s.
    pub connect_timeout: Duration,
    /// User name for etcd's authentication, if any.
    pub user: Option<String>,
    /// Password for `user`. Never shown by `Debug` or in errors.
    pub password: Option<String>,
}

impl EtcdConfig {
    /// The default key prefix.
    pub const DEFAULT_PREFIX: &'static str = "fencelock/";
    /// The default session lease TTL.
    pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(10);
    /// The default connect timeout.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// The shortest session TTL accepted (etcd leases count whole seconds).
    pub const MIN_SESSION_TTL: Duration = Duration::from_secs(1);
    /// The longest session TTL accepted.
    pub const MAX_SESSION_TTL: Duration = Duration::from_secs(3600);
    /// The URL options [`from_store_url`](Self::from_store_url) understands.
    pub const OPTIONS: &'static [&'static str] = &["prefix", "session_ttl", "connect_timeout"];

    /// A configuration for `endpoints` (`host:port` or `http://host:port`) with every
    /// other field at its default.
    pub fn new<S: AsRef<str>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        Self {
            endpoints: endpoints
                .into_iter()
                .map(|e| with_scheme(e.as_ref()))
                .collect(),
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            session_ttl: Self::DEFAULT_SESSION_TTL,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            user: None,
            password: None,
        }
    }

    /// Parses a full `etcd://h1:p1,h2:p2?options` URL.
    ///
    /// # Errors
    /// As [`from_store_url`](Self::from_store_url).
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_store_url(StoreUrl::parse(url)?)
    }

    /// Builds the configuration from an already parsed URL: takes the options listed
    /// in [`OPTIONS`](Self::OPTIONS) and refuses any other (a caller handling options
    /// of its own, such as `ttl`, takes them out first).
    ///
    /// # Errors
    /// [`Error::Config`] naming the problem and the fix: another scheme, no endpoint,
    /// an endpoint without a port, an unknown option or a session TTL out of range.
    pub fn from_store_url(mut url: StoreUrl) -> Result<Self> {
        let shown = url.to_string();
        if url.scheme() != "etcd" {
            return Err(Error::config(format!(
                "`{shown}` is not an etcd URL; write etcd://HOST:PORT[,HOST:PORT...], \
                 e.g. etcd://127.0.0.1:2379"
            )));
        }
        let body = url.body().trim_end_matches('/');
        let (credentials, hosts) = match body.rsplit_once('@') {
            Some((credentials, hosts)) => (Some(credentials), hosts),
            None => (None, body),
        };
        let mut config = Self::new(Vec::<String>::new());
        if let Some(credentials) = credentials {
            let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
            config.user = Some(user.to_owned());
            config.password = Some(password.to_owned());
        }
        for host in hosts.split(',') {
            let port_ok = host
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !port_ok {
                return Err(Error::config(format!(
                    "endpoint `{host}` of `{shown}` is not HOST:PORT; e.g. etcd://127.0.0.1:2379"
                )));
            }
            config.endpoints.push(with_scheme(host));
        }
        if let Some(prefix) = url.take("prefix") {
            config.prefix = prefix;
        }
        if let Some(ttl) = url.take_duration("session_ttl")? {
            config.session_ttl = ttl;
        }
        if let Some(timeout) = url.take_duration("connect_timeout")? {
            config.connect_timeout = timeout;
        }
        url.finish(Self::OPTIONS)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values.
    ///
    /// # Errors
    /// [`Error::Config`] when there is no endpoint, the prefix contains NUL, or the
    /// session TTL is outside [`MIN_SESSION_TTL`](Self::MIN_SESSION_TTL)..=
    /// [`MAX_SESSION_TTL`](Self::MAX_SESSION_TTL).
    pub fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            return Err(Error::config(
                "no etcd endpoint given; e.g. etcd://127.0.0.1:2379",
            ));
        }
        if self.prefix.contains('\0') {
            return Err(Error::config(
                "the etcd key prefix contains NUL; use printable characters, e.g. `fencelock/`",
            ));
        }
        if !(Self::MIN_SESSION_TTL..=Self::MAX_SESSION_TTL).contains(&self.session_ttl) {
            return Err(Error::config(format!(
                "session_ttl {:?} is out of range: use 1s to 1h (default 10s); it bounds how \
                 long a crashed client keeps its locks",
                self.session_ttl
            )));
        }
        Ok(())
    }

    /// The session TTL in whole seconds, rounded up, as etcd takes it.
    pub(crate) fn session_ttl_secs(&self) -> i64 {
        let secs = self.session_ttl.as_secs() + u64::from(self.session_ttl.subsec_nanos() > 0);
        i64::try_from(secs).unwrap_or(i64::MAX)
    }
}

fn with_scheme(endpoint: &str) -> String {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    }
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("session_ttl", &self.session_ttl)
            .field("connect_timeout", &self.connect_timeout)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_options_parse_with_documented_defaults() {
        let config = EtcdConfig::from_url("etcd://127.0.0.1:2379,h2:2380").unwrap();
        assert_eq!(
            config.endpoints,
            ["http://127.0.0.1:2379", "http://h2:2380"]
        );
        assert_eq!(config.prefix, "fencelock/");
        assert_eq!(config.session_ttl, Duration::from_secs(10));
        let config =
            EtcdConfig::from_url("etcd://h:1/?prefix=&session_ttl=3s&connect_timeout=500ms")
                .unwrap();
        assert_eq!(config.prefix, "", "an empty prefix is allowed for interop");
        assert_eq!(config.session_ttl_secs(), 3);
        assert_eq!(config.connect_timeout, Duration::from_millis(500));
        let mut config = EtcdConfig::new(["h:1"]);
        config.session_ttl = Duration::from_millis(1500);
        assert_eq!(config.session_ttl_secs(), 2, "etcd takes whole seconds");
    }

    #[test]
    fn bad_urls_are_refused_with_the_fix() {
        for (url, says) in [
            ("redis://h:1", "not an etcd URL"),
            ("etcd://h", "not HOST:PORT"),
            ("etcd://h:1,", "not HOST:PORT"),
            ("etcd://h:1?tll=1s", "unknown option `tll`"),
            ("etcd://h:1?session_ttl=0s", "out of range"),
            ("etcd://h:1?session_ttl=2h", "out of range"),
            ("etcd://h:1?session_ttl=5", "not a duration"),
        ] {
            let err = EtcdConfig::from_url(url).unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{url}: {err:?}");
            assert!(err.to_string().contains(says), "{url}: {err}");
        }
    }

    #[test]
    fn passwords_never_show_in_debug_or_errors() {
        let config = EtcdConfig::from_url("etcd://root:hunter2@h:1").unwrap();
        assert_eq!(config.user.as_deref(), Some("root"));
        assert_eq!(config.password.as_deref(), Some("hunter2"));
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("***"),
            "{shown}"
        );
        let err = EtcdConfig::from_url("etcd://root:hunter2@h?x=1")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
