//! `ZooKeeperConfig`: where the ensemble is, where locks live, how long a session lasts.

use std::time::Duration;

use fencelock_core::url::StoreUrl;
use fencelock_core::{Error, Result};

/// How to reach ZooKeeper and where the locks live. Plain data; parse a URL with
/// [`from_store_url`](Self::from_store_url) or [`from_url`](Self::from_url).
///
/// `zk://h1:2181,h2:2181,h3:2181/root?session_timeout=10s&connect_timeout=5s`
/// (also `zookeeper://`):
/// - hosts: comma-separated `host:port`, port 2181 when left out;
/// - root: the parent of every lock node, default [`DEFAULT_ROOT`](Self::DEFAULT_ROOT);
///   `/` puts lock nodes right under the ZooKeeper root;
/// - `session_timeout`: the session timeout asked of the server (default 10 s; the
///   server clamps it to its `minSessionTimeout..=maxSessionTimeout`);
/// - `connect_timeout`: how long establishing a session may take (default 10 s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZooKeeperConfig {
    /// `host:port` of each server.
    pub hosts: Vec<String>,
    /// Absolute path of the node under which each lock has its own node; no trailing
    /// slash (`""` for the ZooKeeper root).
    pub root: String,
    /// The session timeout asked of the server.
    pub session_timeout: Duration,
    /// How long establishing a session may take before `connect` fails.
    pub connect_timeout: Duration,
}

impl ZooKeeperConfig {
    /// The root when the URL names none.
    pub const DEFAULT_ROOT: &'static str = "/fencelock";
    /// The session timeout when the URL names none.
    pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);
    /// The connect timeout when the URL names none.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    /// The options a URL may carry.
    pub const OPTIONS: &'static [&'static str] = &["session_timeout", "connect_timeout"];

    /// Parses a `zk://` or `zookeeper://` URL.
    ///
    /// # Errors
    /// [`Error::Config`] naming what is wrong.
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_store_url(StoreUrl::parse(url)?)
    }

    /// Reads a parsed `zk://` or `zookeeper://` URL.
    ///
    /// # Errors
    /// [`Error::Config`] for another scheme, no host, a bad port, a bad root, user
    /// credentials (not supported), an unknown option or a bad duration.
    pub fn from_store_url(mut url: StoreUrl) -> Result<Self> {
        if !matches!(url.scheme(), "zk" | "zookeeper") {
            return Err(Error::config(format!(
                "`{url}` is not a ZooKeeper URL: write zk://host:2181,host2:2181/root"
            )));
        }
        let body = url.body().to_owned();
        let (hosts_part, root) = match body.find('/') {
            Some(at) => (&body[..at], &body[at..]),
            None => (body.as_str(), ""),
        };
        if hosts_part.contains('@') {
            return Err(Error::config(format!(
                "`{url}`: ZooKeeper URLs take no credentials; remove the `user@` part"
            )));
        }
        let mut hosts = Vec::new();
        for host in hosts_part.split(',') {
            hosts.push(parse_host(host, &url)?);
        }
        let root = parse_root(root, &url)?;
        let session_timeout = url
            .take_duration("session_timeout")?
            .unwrap_or(Self::DEFAULT_SESSION_TIMEOUT);
        let connect_timeout = url
            .take_duration("connect_timeout")?
            .unwrap_or(Self::DEFAULT_CONNECT_TIMEOUT);
        for (key, value) in [
            ("session_timeout", session_timeout),
            ("connect_timeout", connect_timeout),
        ] {
            if value.is_zero() {
                return Err(Error::config(format!(
                    "option `{key}` of `{url}` is zero; give a duration such as 10s"
                )));
            }
        }
        url.finish(Self::OPTIONS)?;
        Ok(Self {
            hosts,
            root,
            session_timeout,
            connect_timeout,
        })
    }

    /// The connect string the client library takes: `h1:p,h2:p`.
    pub fn connect_string(&self) -> String {
        self.hosts.join(",")
    }
}

fn parse_host(host: &str, url: &StoreUrl) -> Result<String> {
    let host = host.trim();
    if host.is_empty() {
        return Err(Error::config(format!(
            "`{url}` names an empty host; write zk://host:2181,host2:2181/root"
        )));
    }
    // `[::1]:2181`, `host:2181`, or a bare host.
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !name.is_empty() && (!name.contains(':') || name.ends_with(']')) => {
            (name, Some(port))
        }
        _ => (host, None),
    };
    let port = match port {
        None => 2181,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                Error::config(format!(
                    "`{url}`: `{port}` is not a port of host `{name}`; use 1 to 65535"
                ))
            })?,
    };
    Ok(format!("{name}:{port}"))
}

fn parse_root(root: &str, url: &StoreUrl) -> Result<String> {
    if root.is_empty() {
        return Ok(ZooKeeperConfig::DEFAULT_ROOT.to_owned());
    }
    if root == "/" {
        return Ok(String::new());
    }
    let trimmed = root.strip_suffix('/').unwrap_or(root);
    let bad = trimmed[1..].split('/').any(|part| {
        part.is_empty()
            || part == "."
            || part == ".."
            || part.chars().any(|c| c.is_control() || c == '\0')
    });
    if bad {
        return Err(Error::config(format!(
            "`{url}`: root `{root}` is not a ZooKeeper path; write /name or /a/b without empty, `.` or `..` parts"
        )));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_root_and_options_are_read_with_defaults() {
        let config =
            ZooKeeperConfig::from_url("zk://a:1,b,[::1]:3/locks/app?session_timeout=4s").unwrap();
        assert_eq!(config.hosts, ["a:1", "b:2181", "[::1]:3"]);
        assert_eq!(config.root, "/locks/app");
        assert_eq!(config.session_timeout, Duration::from_secs(4));
        assert_eq!(
            config.connect_timeout,
            ZooKeeperConfig::DEFAULT_CONNECT_TIMEOUT
        );
        assert_eq!(config.connect_string(), "a:1,b:2181,[::1]:3");

        let config = ZooKeeperConfig::from_url("zookeeper://h:2181").unwrap();
        assert_eq!(config.root, ZooKeeperConfig::DEFAULT_ROOT);
        assert_eq!(
            config.session_timeout,
            ZooKeeperConfig::DEFAULT_SESSION_TIMEOUT
        );
        assert_eq!(ZooKeeperConfig::from_url("zk://h/").unwrap().root, "");
        assert_eq!(ZooKeeperConfig::from_url("zk://h/r/").unwrap().root, "/r");
    }

    #[test]
    fn bad_urls_are_refused_with_what_to_fix() {
        for (url, says) in [
            ("redis://h", "not a ZooKeeper URL"),
            ("zk:///r", "empty host"),
            ("zk://a,,b/r", "empty host"),
            ("zk://h:99999/r", "not a port"),
            ("zk://h:0/r", "not a port"),
            ("zk://h/a//b", "not a ZooKeeper path"),
            ("zk://h/a/../b", "not a ZooKeeper path"),
            ("zk://u:pw@h/r", "no credentials"),
            (
                "zk://h/r?sesion_timeout=1s",
                "unknown option `sesion_timeout`",
            ),
            ("zk://h/r?session_timeout=10", "not a duration"),
            ("zk://h/r?session_timeout=0s", "is zero"),
        ] {
            let err = ZooKeeperConfig::from_url(url).unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{url}: {err:?}");
            assert!(err.to_string().contains(says), "{url}: {err}");
            assert!(!err.to_string().contains("pw"), "{url}: {err}");
        }
    }
}
