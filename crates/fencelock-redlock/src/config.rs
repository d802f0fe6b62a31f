//! Store configuration: plain data with documented defaults, parsed from a URL.

use std::time::Duration;

use fencelock_core::url::StoreUrl;
use fencelock_core::{Error, Result};
use fencelock_redis::{
    RedisConfig, RedisNode, RedisTls, SharedOptions, check_duration, check_prefix, check_token_ttl,
};

/// How to reach the independent Redis nodes of a Redlock store:
/// `redlock://[user[:password]@]h1:p1,h2:p2,h3:p3[/db]?option=value&...`.
///
/// Each node is written as in `redis://` URLs (user and password percent-decoded; a
/// trailing `/db` applies to every node). URL options (all optional): `prefix`,
/// `node_timeout`, `connect_timeout`, `token_ttl`, `retry_delay` (durations such as
/// `50ms`, `5s`), `allow_eviction` (`true`/`false`), and `tls=true` to reach every node
/// with TLS, with the TLS options `ca`, `cert` and `key` of
/// [`RedisTls`](fencelock_redis::RedisTls) applying to every node. Each field documents
/// its default. `Debug` hides passwords.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedlockConfig {
    /// The nodes: at least 3 independent servers (not replicas of each other), each
    /// listed once. An odd number tolerates the most failures: 5 nodes keep working
    /// with 2 down.
    pub nodes: Vec<RedisNode>,
    /// Prepended to every key, as for a single server (see
    /// [`RedisConfig::prefix`]). Default `fencelock:`.
    pub prefix: String,
    /// How long one node may take to answer one request before it counts as failed
    /// for that request. `None` (the default) uses `min(50 ms, ttl / 10)` of the lock
    /// in question, far below the TTL as Redlock requires.
    pub node_timeout: Option<Duration>,
    /// How long connecting to the nodes may take. Default 5 s.
    pub connect_timeout: Duration,
    /// How long a name's token counter outlives its last grant on each node. Default
    /// 24 h (see [`RedisConfig::token_ttl`]).
    pub token_ttl: Duration,
    /// The longest random pause before retrying after an attempt that failed without a
    /// release to wait for (a split vote, unreachable nodes). Default 200 ms.
    pub retry_delay: Duration,
    /// Accept nodes whose `maxmemory-policy` may evict lock keys, with a warning.
    /// Default false.
    pub allow_eviction: bool,
}

impl RedlockConfig {
    /// The fewest nodes accepted.
    pub const MIN_NODES: usize = 3;
    /// The largest per-node timeout used when [`node_timeout`](Self::node_timeout) is
    /// not set.
    pub const DEFAULT_NODE_TIMEOUT_CAP: Duration = Duration::from_millis(50);
    /// The default longest retry pause.
    pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_millis(200);
    /// The URL options [`from_url`](Self::from_url) understands.
    pub const OPTIONS: &'static [&'static str] = &[
        "prefix",
        "node_timeout",
        "connect_timeout",
        "token_ttl",
        "retry_delay",
        "allow_eviction",
        "tls",
        "ca",
        "cert",
        "key",
    ];

    /// A configuration for `nodes` with every other field at its default.
    pub fn new(nodes: Vec<RedisNode>) -> Self {
        Self {
            nodes,
            prefix: RedisConfig::DEFAULT_PREFIX.to_owned(),
            node_timeout: None,
            connect_timeout: RedisConfig::DEFAULT_CONNECT_TIMEOUT,
            token_ttl: RedisConfig::DEFAULT_TOKEN_TTL,
            retry_delay: Self::DEFAULT_RETRY_DELAY,
            allow_eviction: false,
        }
    }

    /// Parses a full `redlock://...` URL.
    ///
    /// # Errors
    /// [`Error::Config`] naming the problem and the fix.
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
        if url.scheme() != "redlock" {
            return Err(Error::config(format!(
                "`{shown}` is not a redlock URL; write redlock://h1:6379,h2:6379,h3:6379"
            )));
        }
        let nodes = RedisNode::parse_list(url.body())
            .map_err(|problem| Error::config(format!("in `{shown}`: {problem}")))?;
        let tls = url.take_bool("tls")?.unwrap_or(false);
        let tls = RedisTls::take(&mut url, tls, "add tls=true for TLS, or drop the option")?;
        let mut config = Self::new(nodes);
        for node in &mut config.nodes {
            node.tls.clone_from(&tls);
        }
        SharedOptions::take(&mut url)?.apply(
            &mut config.prefix,
            &mut config.connect_timeout,
            &mut config.token_ttl,
            &mut config.allow_eviction,
        );
        if let Some(timeout) = url.take_duration("node_timeout")? {
            config.node_timeout = Some(timeout);
        }
        if let Some(delay) = url.take_duration("retry_delay")? {
            config.retry_delay = delay;
        }
        url.finish(Self::OPTIONS)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every field; [`RedlockBackend::connect`](crate::RedlockBackend::connect)
    /// runs this too.
    ///
    /// # Errors
    /// [`Error::Config`] saying which field is wrong and how to fix it.
    pub fn validate(&self) -> Result<()> {
        if self.nodes.len() < Self::MIN_NODES {
            return Err(Error::config(format!(
                "Redlock needs at least {} independent nodes, got {}; list them as \
                 redlock://h1:6379,h2:6379,h3:6379, or use redis:// for a single server",
                Self::MIN_NODES,
                self.nodes.len()
            )));
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let twice = self.nodes[..i]
                .iter()
                .any(|n| (&n.host, n.port, n.db) == (&node.host, node.port, node.db));
            if twice {
                return Err(Error::config(format!(
                    "node {} is listed twice; Redlock counts votes per node, so each must be \
                     a different server",
                    node.address()
                )));
            }
        }
        check_prefix(&self.prefix)?;
        if let Some(timeout) = self.node_timeout {
            check_duration("node_timeout", timeout, Self::DEFAULT_NODE_TIMEOUT_CAP)?;
        }
        check_duration(
            "connect_timeout",
            self.connect_timeout,
            RedisConfig::DEFAULT_CONNECT_TIMEOUT,
        )?;
        check_duration("retry_delay", self.retry_delay, Self::DEFAULT_RETRY_DELAY)?;
        check_token_ttl(self.token_ttl)
    }

    /// How many nodes make a majority: `N / 2 + 1`.
    pub fn quorum(&self) -> usize {
        self.nodes.len() / 2 + 1
    }

    /// The per-node timeout for requests about a lock with `ttl`.
    pub fn node_timeout_for(&self, ttl: Duration) -> Duration {
        self.node_timeout
            .unwrap_or_else(|| (ttl / 10).min(Self::DEFAULT_NODE_TIMEOUT_CAP))
            .max(Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_error(url: &str) -> String {
        match RedlockConfig::from_url(url) {
            Err(err @ Error::Config { .. }) => err.to_string(),
            other => panic!("{url}: expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn a_host_list_gets_every_default() {
        let config = RedlockConfig::from_url("redlock://a:1,b:2,c:3").unwrap();
        let addresses: Vec<_> = config.nodes.iter().map(RedisNode::address).collect();
        assert_eq!(addresses, ["a:1", "b:2", "c:3"]);
        assert_eq!(config.prefix, "fencelock:");
        assert_eq!(config.node_timeout, None);
        assert_eq!(config.retry_delay, Duration::from_millis(200));
        assert_eq!(config.quorum(), 2);
        assert_eq!(
            config.node_timeout_for(Duration::from_secs(30)),
            Duration::from_millis(50)
        );
        assert_eq!(
            config.node_timeout_for(Duration::from_millis(200)),
            Duration::from_millis(20)
        );
    }

    #[test]
    fn every_option_is_read() {
        let config = RedlockConfig::from_url(
            "redlock://:pw@a:1,b:2,c:3,d:4,e:5/2?prefix=x%3A&node_timeout=20ms&connect_timeout=1s\
             &token_ttl=1h&retry_delay=50ms&allow_eviction=true",
        )
        .unwrap();
        assert_eq!(config.nodes.len(), 5);
        assert_eq!(config.quorum(), 3);
        assert!(config.nodes.iter().all(|n| n.db == 2));
        assert_eq!(config.nodes[0].password.as_deref(), Some("pw"));
        assert_eq!(config.prefix, "x:");
        assert_eq!(config.node_timeout, Some(Duration::from_millis(20)));
        assert_eq!(
            config.node_timeout_for(Duration::from_secs(30)),
            Duration::from_millis(20)
        );
        assert_eq!(config.connect_timeout, Duration::from_secs(1));
        assert_eq!(config.token_ttl, Duration::from_secs(3600));
        assert_eq!(config.retry_delay, Duration::from_millis(50));
        assert!(config.allow_eviction);
    }

    #[test]
    fn tls_applies_to_every_node_and_its_options_need_it() {
        let config = RedlockConfig::from_url("redlock://a:1,b:2,c:3?tls=true&ca=/ca.pem").unwrap();
        for node in &config.nodes {
            let tls = node.tls.as_ref().expect("tls=true reaches every node");
            assert_eq!(
                tls.ca_file.as_deref(),
                Some(std::path::Path::new("/ca.pem"))
            );
        }
        let plain = RedlockConfig::from_url("redlock://a:1,b:2,c:3?tls=false").unwrap();
        assert!(plain.nodes.iter().all(|node| node.tls.is_none()));
        let err = config_error("redlock://a:1,b:2,c:3?ca=/ca.pem");
        assert!(err.contains("tls=true"), "{err}");
        let err = config_error("redlock://a:1,b:2,c:3?tls=maybe");
        assert!(err.contains("true or false"), "{err}");
    }

    #[test]
    fn too_few_or_repeated_nodes_are_refused() {
        let err = config_error("redlock://a:1,b:2");
        assert!(
            err.contains("at least 3") && err.contains("redis://"),
            "{err}"
        );
        let err = config_error("redlock://a:1,b:2,a:1");
        assert!(err.contains("a:1") && err.contains("twice"), "{err}");
        let err = config_error("redis://a:1,b:2,c:3");
        assert!(err.contains("redlock://"), "{err}");
        let err = config_error("redlock://a:1,b:2,c:3?node_timeot=5ms");
        assert!(
            err.contains("node_timeot") && err.contains("node_timeout"),
            "{err}"
        );
        let err = config_error("redlock://a:1,b:x,c:3");
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn passwords_never_show() {
        let config = RedlockConfig::from_url("redlock://u:hunter2@a:1,b:2,c:3").unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
        let err = config_error("redlock://u:hunter2@a:1,b:2,c:3?bad=1");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
