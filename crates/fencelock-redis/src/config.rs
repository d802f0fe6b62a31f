//! Store configuration: plain data with documented defaults, parsed from a URL.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use fencelock_core::url::{StoreUrl, percent_decode};
use fencelock_core::{Error, Result};

/// One Redis server to connect to: address, database and credentials.
///
/// Written in URLs as `[user[:password]@]host[:port]`; user and password are
/// percent-decoded (write `@` as `%40`, `:` as `%3A`, `,` as `%2C`). `Debug` shows the
/// password as `***`.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisNode {
    /// Host name or IP address (an IPv6 address without brackets). Default
    /// `127.0.0.1`.
    pub host: String,
    /// TCP port. Default [`DEFAULT_PORT`](Self::DEFAULT_PORT).
    pub port: u16,
    /// The logical database (`SELECT n`). Default 0.
    pub db: i64,
    /// The ACL user (Redis 6+), if any.
    pub username: Option<String>,
    /// The password (`AUTH`), if any. Never shown in `Debug` or error text.
    pub password: Option<String>,
    /// Connect with TLS (`rediss://`), verifying the server's certificate. Default
    /// `None`: plain TCP.
    pub tls: Option<RedisTls>,
}

/// TLS settings of a server (`rediss://`): the server's certificate is always verified
/// against its host name (or IP address); nothing here turns that off.
///
/// URL options: `ca=/path/ca.pem` (trust this CA instead of the system's roots),
/// `cert=/path/client.pem` and `key=/path/client.key` (a client certificate, for
/// servers started with `tls-auth-clients yes`). Files are PEM and are read when
/// connecting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisTls {
    /// The CA certificate(s) to trust, instead of the system's root store. Default
    /// `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain to present. Default `None`. Needs
    /// [`key_file`](Self::key_file).
    pub cert_file: Option<PathBuf>,
    /// The private key of [`cert_file`](Self::cert_file). Default `None`.
    pub key_file: Option<PathBuf>,
}

impl RedisTls {
    /// The URL options of TLS.
    pub const OPTIONS: &'static [&'static str] = &["ca", "cert", "key"];

    /// Takes `ca`, `cert` and `key` out of `url`: `Some` settings if `tls` (the URL asked
    /// for TLS), and an error naming the option if one is given without TLS.
    ///
    /// # Errors
    /// [`Error::Config`] for a TLS option without TLS, an empty path, or a certificate
    /// without its key (or the reverse); [`Error::Unsupported`] for TLS in a build
    /// without the `tls` feature.
    #[doc(hidden)]
    pub fn take(url: &mut StoreUrl, tls: bool, fix: &str) -> Result<Option<Self>> {
        let mut settings = Self::default();
        for option in Self::OPTIONS {
            let Some(value) = url.take(option) else {
                continue;
            };
            if !tls {
                return Err(Error::config(format!(
                    "option `{option}` of `{url}` is a TLS setting, but this URL does not use \
                     TLS; {fix}"
                )));
            }
            if value.is_empty() {
                return Err(Error::config(format!(
                    "option `{option}` of `{url}` is empty; give the path of a PEM file"
                )));
            }
            let path = Some(PathBuf::from(value));
            match *option {
                "ca" => settings.ca_file = path,
                "cert" => settings.cert_file = path,
                _ => settings.key_file = path,
            }
        }
        if !tls {
            return Ok(None);
        }
        if !cfg!(feature = "tls") {
            return Err(tls_unsupported());
        }
        if settings.cert_file.is_some() != settings.key_file.is_some() {
            return Err(Error::config(format!(
                "`{url}` gives only one of `cert` and `key`; a client certificate needs both \
                 (cert=/path/client.pem&key=/path/client.key)"
            )));
        }
        Ok(Some(settings))
    }
}

impl RedisNode {
    /// Redis's default port.
    pub const DEFAULT_PORT: u16 = 6379;

    /// The server at `host:port`, database 0, without credentials.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            db: 0,
            username: None,
            password: None,
            tls: None,
        }
    }

    /// `host:port`, with brackets around an IPv6 host: the address shown in messages.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Parses a comma-separated list of servers, `[user[:password]@]host[:port],...`,
    /// optionally followed by `/db` (which applies to every server). An empty host
    /// means `127.0.0.1`, a missing port [`DEFAULT_PORT`](Self::DEFAULT_PORT).
    ///
    /// # Errors
    /// A description of the first malformed part, without any password, for the
    /// caller to put into its [`Error::Config`].
    pub fn parse_list(text: &str) -> Result<Vec<Self>, String> {
        // The database follows the last `/` after the last `@`, so passwords may hold `/`.
        let after_userinfo = text.rfind('@').map_or(0, |at| at + 1);
        let (hosts, db) = match text[after_userinfo..].find('/') {
            Some(slash) => text.split_at(after_userinfo + slash),
            None => (text, ""),
        };
        let db = match db.trim_start_matches('/') {
            "" => 0,
            digits => digits.parse::<i64>().ok().filter(|db| *db >= 0).ok_or_else(|| {
                format!(
                    "`/{digits}` is not a database number; write a whole number, e.g. /0 (the default)"
                )
            })?,
        };
        hosts
            .split(',')
            .map(|part| {
                let mut node = Self::parse_one(part)?;
                node.db = db;
                Ok(node)
            })
            .collect()
    }

    fn parse_one(text: &str) -> Result<Self, String> {
        let (userinfo, hostport) = match text.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, text),
        };
        let (host, port) = split_host_port(hostport)?;
        let mut node = Self::new(host, port);
        if let Some(userinfo) = userinfo {
            let (user, password) = match userinfo.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (userinfo, None),
            };
            let user =
                percent_decode(user).map_err(|problem| format!("the user name {problem}"))?;
            node.username = (!user.is_empty()).then_some(user);
            if let Some(password) = password {
                let password = percent_decode(password)
                    .map_err(|problem| format!("the password {problem}"))?;
                node.password = (!password.is_empty()).then_some(password);
            }
        }
        Ok(node)
    }

    /// What redis-rs connects with.
    pub(crate) fn connection_info(&self) -> redis::ConnectionInfo {
        let addr = match self.tls {
            None => redis::ConnectionAddr::Tcp(self.host.clone(), self.port),
            #[cfg(feature = "tls")]
            Some(_) => redis::ConnectionAddr::TcpTls {
                host: self.host.clone(),
                port: self.port,
                insecure: false,
                tls_params: None,
            },
            // Refused when the URL is parsed; a node built by hand fails here.
            #[cfg(not(feature = "tls"))]
            Some(_) => redis::ConnectionAddr::Tcp(String::new(), 0),
        };
        redis::ConnectionInfo {
            addr,
            redis: redis::RedisConnectionInfo {
                db: self.db,
                username: self.username.clone(),
                password: self.password.clone(),
                protocol: redis::ProtocolVersion::RESP2,
            },
        }
    }
}

impl fmt::Debug for RedisNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisNode")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("db", &self.db)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls", &self.tls)
            .finish()
    }
}

/// Splits `host[:port]` or `[v6]:port`; an empty host is `127.0.0.1`.
fn split_host_port(text: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("`{text}` opens `[` without closing it; write [::1]:6379"))?;
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(format!("`{text}`: write an IPv6 address as [::1]:6379")),
            },
        }
    } else {
        match text.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    let host = if host.is_empty() { "127.0.0.1" } else { host };
    if host.contains(['/', '?', '#', ' ']) {
        return Err(format!("`{host}` is not a host name"));
    }
    let port = match port {
        None | Some("") => RedisNode::DEFAULT_PORT,
        Some(port) => port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
            format!("`{port}` is not a port of `{host}`; give 1 to 65535, e.g. {host}:6379")
        })?,
    };
    Ok((host.to_owned(), port))
}

/// How to reach a single Redis server and lay out the lock keys:
/// `redis://[user[:password]@]host[:port][/db]?option=value&...`.
///
/// URL options (all optional): `prefix`, `timeout`, `connect_timeout`, `token_ttl`
/// (durations such as `500ms`, `5s`, `24h`) and `allow_eviction` (`true`/`false`).
/// Each field documents its default. `rediss://` connects with TLS (see [`RedisTls`]
/// for its options `ca`, `cert` and `key`); a build without the `tls` feature refuses it
/// with [`Error::Unsupported`].
///
/// `Debug` hides the password.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The server.
    pub node: RedisNode,
    /// Prepended to every key: `{prefix}lock:{name}` holds a grant,
    /// `{prefix}token:{name}` the name's token counter, `{prefix}queue:{name}` and
    /// `{prefix}wants:{name}` the waiters queued for a hand-off (Redlock marks
    /// `{prefix}waiters:{name}` instead), `{prefix}fence:{resource}` a fence gate's highest token, and
    /// releases are published on `{prefix}released`. Default [`DEFAULT_PREFIX`](Self::DEFAULT_PREFIX). Give each
    /// application its own prefix to keep their locks apart.
    pub prefix: String,
    /// How long one command may take before it fails with a temporary error (and an
    /// acquire that timed out is undone by owner). Default 2 s.
    pub timeout: Duration,
    /// How long connecting may take. Default 5 s.
    pub connect_timeout: Duration,
    /// How long a name's token counter outlives its last acquire. Default 24 h. An
    /// expired counter is re-seeded from the server clock, so this only bounds the
    /// memory unused names keep (see [`RedisBackend`](crate::RedisBackend)).
    pub token_ttl: Duration,
    /// Accept a server whose `maxmemory-policy` may evict lock keys, with a warning
    /// instead of an error. Default false: eviction silently frees held locks.
    pub allow_eviction: bool,
}

impl RedisConfig {
    /// The default key prefix.
    pub const DEFAULT_PREFIX: &'static str = "fencelock:";
    /// The default command timeout.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
    /// The default connect timeout.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// The default lifetime of an unused token counter.
    pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
    /// The longest prefix accepted, in bytes.
    pub const MAX_PREFIX_LEN: usize = 256;
    /// The URL options [`from_url`](Self::from_url) understands.
    pub const OPTIONS: &'static [&'static str] = &[
        "prefix",
        "timeout",
        "connect_timeout",
        "token_ttl",
        "allow_eviction",
        "ca",
        "cert",
        "key",
    ];

    /// A configuration for `node` with every other field at its default.
    pub fn new(node: RedisNode) -> Self {
        Self {
            node,
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            timeout: Self::DEFAULT_TIMEOUT,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            token_ttl: Self::DEFAULT_TOKEN_TTL,
            allow_eviction: false,
        }
    }

    /// Parses a full `redis://...` URL.
    ///
    /// # Errors
    /// [`Error::Config`] naming the problem and the fix (another scheme, a malformed
    /// host, port or database, an unknown option or a bad value);
    /// [`Error::Unsupported`] for `rediss://` in a build without the `tls` feature.
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_store_url(StoreUrl::parse(url)?)
    }

    /// Builds the configuration from an already parsed URL: takes the options listed
    /// in [`OPTIONS`](Self::OPTIONS) and refuses any other (a caller handling options
    /// of its own, such as `ttl`, takes them out first).
    ///
    /// # Errors
    /// As [`from_url`](Self::from_url).
    pub fn from_store_url(mut url: StoreUrl) -> Result<Self> {
        let shown = url.to_string();
        let tls = match url.scheme() {
            "redis" => false,
            "rediss" => true,
            _ => {
                return Err(Error::config(format!(
                    "`{shown}` is not a redis URL; write redis://[user:password@]host[:port][/db], \
                     e.g. redis://127.0.0.1:6379/0"
                )));
            }
        };
        let mut nodes = RedisNode::parse_list(url.body())
            .map_err(|problem| Error::config(format!("in `{shown}`: {problem}")))?;
        if nodes.len() != 1 {
            return Err(Error::config(format!(
                "`{shown}` names {} servers; redis:// takes one (for several independent \
                 servers use redlock://h1:p,h2:p,h3:p)",
                nodes.len()
            )));
        }
        let mut config = Self::new(nodes.remove(0));
        config.node.tls =
            RedisTls::take(&mut url, tls, "write rediss:// for TLS, or drop the option")?;
        let options = SharedOptions::take(&mut url)?;
        options.apply(
            &mut config.prefix,
            &mut config.connect_timeout,
            &mut config.token_ttl,
            &mut config.allow_eviction,
        );
        if let Some(timeout) = url.take_duration("timeout")? {
            config.timeout = timeout;
        }
        url.finish(Self::OPTIONS)?;
        config.validate()?;
        Ok(config)
    }

    /// How [`connection::connect`](crate::connection::connect) reaches the server.
    pub(crate) fn connect_options(&self) -> crate::connection::ConnectOptions {
        crate::connection::ConnectOptions {
            timeout: self.timeout,
            connect_timeout: self.connect_timeout,
            allow_eviction: self.allow_eviction,
        }
    }

    /// Checks every field; [`RedisBackend::connect`](crate::RedisBackend::connect) runs
    /// this too, since the fields are public.
    ///
    /// # Errors
    /// [`Error::Config`] saying which field is wrong and how to fix it.
    pub fn validate(&self) -> Result<()> {
        check_prefix(&self.prefix)?;
        check_duration("timeout", self.timeout, Self::DEFAULT_TIMEOUT)?;
        check_duration(
            "connect_timeout",
            self.connect_timeout,
            Self::DEFAULT_CONNECT_TIMEOUT,
        )?;
        check_token_ttl(self.token_ttl)?;
        if self.node.host.is_empty() {
            return Err(Error::config(
                "the Redis host is empty; give one, e.g. redis://127.0.0.1:6379/",
            ));
        }
        Ok(())
    }
}

/// The error for TLS in a build without the `tls` feature.
#[doc(hidden)]
pub fn tls_unsupported() -> Error {
    Error::Unsupported {
        store: crate::STORE,
        what: "TLS (rediss://) in this build, which was made without the `tls` feature of \
               fencelock-redis: enable it (it is on by default), or connect with redis:// on a \
               trusted network"
            .to_owned(),
    }
}

/// The options Redis and Redlock URLs share, taken out of a URL.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct SharedOptions {
    prefix: Option<String>,
    connect_timeout: Option<Duration>,
    token_ttl: Option<Duration>,
    allow_eviction: Option<bool>,
}

impl SharedOptions {
    /// Takes `prefix`, `connect_timeout`, `token_ttl` and `allow_eviction` out of `url`.
    ///
    /// # Errors
    /// [`Error::Config`] naming an option whose value is malformed.
    pub fn take(url: &mut StoreUrl) -> Result<Self> {
        let allow_eviction = url.take_bool("allow_eviction")?;
        Ok(Self {
            prefix: url.take("prefix"),
            connect_timeout: url.take_duration("connect_timeout")?,
            token_ttl: url.take_duration("token_ttl")?,
            allow_eviction,
        })
    }

    /// Writes the options that were given over the defaults.
    pub fn apply(
        self,
        prefix: &mut String,
        connect_timeout: &mut Duration,
        token_ttl: &mut Duration,
        allow_eviction: &mut bool,
    ) {
        if let Some(value) = self.prefix {
            *prefix = value;
        }
        if let Some(value) = self.connect_timeout {
            *connect_timeout = value;
        }
        if let Some(value) = self.token_ttl {
            *token_ttl = value;
        }
        if let Some(value) = self.allow_eviction {
            *allow_eviction = value;
        }
    }
}

/// Refuses a prefix longer than [`RedisConfig::MAX_PREFIX_LEN`].
#[doc(hidden)]
pub fn check_prefix(prefix: &str) -> Result<()> {
    if prefix.len() > RedisConfig::MAX_PREFIX_LEN {
        return Err(Error::config(format!(
            "prefix of {} bytes is too long: give at most {} bytes, e.g. prefix=myapp:",
            prefix.len(),
            RedisConfig::MAX_PREFIX_LEN
        )));
    }
    Ok(())
}

/// Refuses a duration option outside 1 ms ..= 1 h.
#[doc(hidden)]
pub fn check_duration(option: &str, value: Duration, default: Duration) -> Result<()> {
    if value < Duration::from_millis(1) || value > Duration::from_secs(3600) {
        return Err(Error::config(format!(
            "{option} {value:?} is out of range: give 1ms to 1h (default {default:?})"
        )));
    }
    Ok(())
}

/// Refuses a token counter lifetime outside 1 s ..= 366 days.
#[doc(hidden)]
pub fn check_token_ttl(value: Duration) -> Result<()> {
    if value < Duration::from_secs(1) || value > Duration::from_secs(366 * 24 * 3600) {
        return Err(Error::config(format!(
            "token_ttl {value:?} is out of range: give 1s to 366 days (default 24h); the counter \
             of a name unused that long expires and is re-seeded from the server clock"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_error(url: &str) -> String {
        match RedisConfig::from_url(url) {
            Err(err @ Error::Config { .. }) => err.to_string(),
            other => panic!("{url}: expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn a_bare_url_gets_every_default() {
        let config = RedisConfig::from_url("redis://").unwrap();
        assert_eq!(config, RedisConfig::new(RedisNode::new("127.0.0.1", 6379)));
        assert_eq!(config.prefix, "fencelock:");
        assert_eq!(config.timeout, Duration::from_secs(2));
        assert_eq!(config.connect_timeout, Duration::from_secs(5));
        assert_eq!(config.token_ttl, Duration::from_secs(24 * 3600));
        assert!(!config.allow_eviction);
        let config = RedisConfig::from_url("redis://127.0.0.1/").unwrap();
        assert_eq!(config.node, RedisNode::new("127.0.0.1", 6379));
    }

    #[test]
    fn host_port_database_and_credentials_are_read_and_decoded() {
        let config =
            RedisConfig::from_url("redis://app:p%40ss%3Aw%2Frd@cache.local:6380/3").unwrap();
        let node = &config.node;
        assert_eq!(
            (node.host.as_str(), node.port, node.db),
            ("cache.local", 6380, 3)
        );
        assert_eq!(node.username.as_deref(), Some("app"));
        assert_eq!(node.password.as_deref(), Some("p@ss:w/rd"));
        let node = RedisConfig::from_url("redis://:secret@[::1]:7000")
            .unwrap()
            .node;
        assert_eq!((node.host.as_str(), node.port), ("::1", 7000));
        assert_eq!(
            (node.username, node.password.as_deref()),
            (None, Some("secret"))
        );
        assert_eq!(RedisNode::new("::1", 7000).address(), "[::1]:7000");
        // A password may hold `/` unescaped: the database follows the last `@`.
        let node = RedisConfig::from_url("redis://u:a/b@h:1/2").unwrap().node;
        assert_eq!((node.password.as_deref(), node.db), (Some("a/b"), 2));
    }

    #[test]
    fn every_option_is_read() {
        let config = RedisConfig::from_url(
            "redis://h?prefix=billing%3A&timeout=250ms&connect_timeout=1s&token_ttl=2h&allow_eviction=true",
        )
        .unwrap();
        assert_eq!(config.prefix, "billing:");
        assert_eq!(config.timeout, Duration::from_millis(250));
        assert_eq!(config.connect_timeout, Duration::from_secs(1));
        assert_eq!(config.token_ttl, Duration::from_secs(7200));
        assert!(config.allow_eviction);
        assert_eq!(
            RedisConfig::from_url("redis://h?prefix=").unwrap().prefix,
            ""
        );
    }

    #[test]
    fn malformed_urls_are_refused_with_the_fix() {
        let err = config_error("redis://h:0");
        assert!(err.contains("1 to 65535"), "{err}");
        let err = config_error("redis://h:port");
        assert!(err.contains("port"), "{err}");
        let err = config_error("redis://h/x");
        assert!(err.contains("database number"), "{err}");
        let err = config_error("redis://h/-1");
        assert!(err.contains("database number"), "{err}");
        let err = config_error("redis://[::1");
        assert!(err.contains("[::1]:6379"), "{err}");
        let err = config_error("redis://a:1,b:2");
        assert!(err.contains("redlock://"), "{err}");
        let err = config_error("postgres://h");
        assert!(err.contains("redis://"), "{err}");
        let err = config_error("redis://h?tiemout=1s");
        assert!(
            err.contains("unknown option `tiemout`") && err.contains("timeout"),
            "{err}"
        );
        let err = config_error("redis://h?timeout=0ms");
        assert!(err.contains("1ms to 1h"), "{err}");
        let err = config_error("redis://h?token_ttl=10ms");
        assert!(err.contains("token_ttl"), "{err}");
        let err = config_error("redis://h?allow_eviction=maybe");
        assert!(err.contains("true or false"), "{err}");
        let err = config_error(&format!("redis://h?prefix={}", "p".repeat(300)));
        assert!(err.contains("at most 256"), "{err}");
        let err = config_error("redis://u:p%zz@h");
        assert!(err.contains("password") && err.contains("%25"), "{err}");
    }

    #[test]
    fn rediss_urls_ask_for_tls_with_their_files() {
        let config =
            RedisConfig::from_url("rediss://h:6380/1?ca=/etc/ca.pem&cert=/c.pem&key=/c.key")
                .unwrap();
        let tls = config.node.tls.expect("rediss asks for TLS");
        assert_eq!(
            tls.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(
            tls.cert_file.as_deref(),
            Some(std::path::Path::new("/c.pem"))
        );
        assert_eq!(
            tls.key_file.as_deref(),
            Some(std::path::Path::new("/c.key"))
        );
        assert_eq!((config.node.port, config.node.db), (6380, 1));
        // Without files: the system's roots, no client certificate.
        let tls = RedisConfig::from_url("rediss://h")
            .unwrap()
            .node
            .tls
            .unwrap();
        assert_eq!(tls, RedisTls::default());
        assert_eq!(RedisConfig::from_url("redis://h").unwrap().node.tls, None);
    }

    #[test]
    fn tls_options_without_tls_or_half_a_client_certificate_are_refused() {
        let err = config_error("redis://h?ca=/etc/ca.pem");
        assert!(err.contains("`ca`") && err.contains("rediss://"), "{err}");
        let err = config_error("rediss://h?cert=/c.pem");
        assert!(err.contains("cert") && err.contains("key"), "{err}");
        let err = config_error("rediss://h?ca=");
        assert!(err.contains("empty") && err.contains("PEM"), "{err}");
    }

    #[test]
    fn tls_errors_never_show_the_password() {
        let err = config_error("redis://u:hunter2@h?ca=/x.pem");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn passwords_never_show_in_debug_or_errors() {
        let config = RedisConfig::from_url("redis://user:hunter2@h:1/0").unwrap();
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("***"),
            "{shown}"
        );
        let err = config_error("redis://user:hunter2@h:1/0?bogus=1");
        assert!(!err.contains("hunter2"), "{err}");
        let err = config_error("redis://user:hunter2@h:99999");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn a_host_list_applies_its_database_to_every_node() {
        let nodes = RedisNode::parse_list("a:1,:pw@b:2,[::1]:3/4").unwrap();
        let shown: Vec<_> = nodes.iter().map(|n| (n.address(), n.db)).collect();
        assert_eq!(
            shown,
            [
                ("a:1".to_owned(), 4),
                ("b:2".to_owned(), 4),
                ("[::1]:3".to_owned(), 4)
            ]
        );
        assert_eq!(nodes[1].password.as_deref(), Some("pw"));
        assert!(RedisNode::parse_list("a:1,b:x").is_err());
    }
}
