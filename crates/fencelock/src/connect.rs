//! `connect(url)`: from a URL to a [`Locker`], through the table of known schemes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use fencelock_core::url::StoreUrl;
use fencelock_core::{
    Error, LockBackend, Locker, LockerOptions, MemoryStore, Result, WaitPolicy, check_ttl,
};

/// A URL scheme fencelock knows, and whether this build can open it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchemeInfo {
    /// The scheme, e.g. `"sqlite"`.
    pub scheme: &'static str,
    /// The store behind it.
    pub store: &'static str,
    /// The cargo feature of `fencelock` that enables it (`None`: always available).
    pub feature: Option<&'static str>,
    /// Whether this build has it (its feature, if any, is on).
    pub enabled: bool,
}

const fn scheme(
    scheme: &'static str,
    store: &'static str,
    feature: Option<&'static str>,
    enabled: bool,
) -> SchemeInfo {
    SchemeInfo {
        scheme,
        store,
        feature,
        enabled,
    }
}

const SCHEMES: &[SchemeInfo] = &[
    scheme("memory", "memory", None, true),
    scheme("sqlite", "sqlite", Some("sqlite"), cfg!(feature = "sqlite")),
    scheme("redis", "redis", Some("redis"), cfg!(feature = "redis")),
    scheme("rediss", "redis", Some("redis"), cfg!(feature = "redis")),
    scheme(
        "redlock",
        "redlock",
        Some("redlock"),
        cfg!(feature = "redlock"),
    ),
    scheme("etcd", "etcd", Some("etcd"), cfg!(feature = "etcd")),
    scheme(
        "zk",
        "zookeeper",
        Some("zookeeper"),
        cfg!(feature = "zookeeper"),
    ),
    scheme(
        "zookeeper",
        "zookeeper",
        Some("zookeeper"),
        cfg!(feature = "zookeeper"),
    ),
    scheme(
        "postgres",
        "postgres",
        Some("postgres"),
        cfg!(feature = "postgres"),
    ),
    scheme(
        "postgresql",
        "postgres",
        Some("postgres"),
        cfg!(feature = "postgres"),
    ),
    scheme("mysql", "mysql", Some("mysql"), cfg!(feature = "mysql")),
    scheme("mariadb", "mysql", Some("mysql"), cfg!(feature = "mysql")),
];

/// Every scheme fencelock knows, with what this build can open.
pub fn schemes() -> &'static [SchemeInfo] {
    SCHEMES
}

/// Connects to the store at `url` and returns a [`Locker`] over it.
///
/// The options `ttl` and `wait` (durations such as `500ms`, `10s`, `2m`) set the
/// locker's defaults; every other option goes to the store.
///
/// # Errors
/// [`Error::Config`] for a malformed URL, an unknown scheme or option, or a scheme
/// whose cargo feature is off (the message names the feature); store errors if the
/// store cannot be reached.
pub async fn connect(url: &str) -> Result<Locker> {
    let mut url = StoreUrl::parse(url)?;
    let mut options = LockerOptions::default();
    if let Some(ttl) = url.take_duration("ttl")? {
        check_ttl(ttl)?;
        options.ttl = ttl;
    }
    if let Some(wait) = url.take_duration("wait")? {
        options.wait = WaitPolicy::Until(wait);
    }
    let backend = open_backend(url).await?;
    Ok(Locker::with_options(backend, options))
}

/// Opens the backend for a parsed URL (without the locker options `ttl`/`wait`).
///
/// # Errors
/// As [`connect`].
pub async fn open_backend(url: StoreUrl) -> Result<Arc<dyn LockBackend>> {
    match url.scheme() {
        "memory" => {
            let name = url.body().trim_end_matches('/').to_owned();
            url.finish(&[])?;
            Ok(Arc::new(memory_store(&name)))
        }
        #[cfg(feature = "sqlite")]
        "sqlite" => {
            let config = fencelock_sql::SqliteConfig::from_store_url(url)?;
            Ok(Arc::new(
                fencelock_sql::SqliteBackend::connect(config).await?,
            ))
        }
        #[cfg(feature = "redis")]
        "redis" | "rediss" => {
            let config = fencelock_redis::RedisConfig::from_store_url(url)?;
            Ok(Arc::new(
                fencelock_redis::RedisBackend::connect(config).await?,
            ))
        }
        #[cfg(feature = "redlock")]
        "redlock" => {
            let config = fencelock_redlock::RedlockConfig::from_store_url(url)?;
            Ok(Arc::new(
                fencelock_redlock::RedlockBackend::connect(config).await?,
            ))
        }
        #[cfg(feature = "etcd")]
        "etcd" => {
            let config = fencelock_etcd::EtcdConfig::from_store_url(url)?;
            Ok(Arc::new(
                fencelock_etcd::EtcdBackend::connect(config).await?,
            ))
        }
        #[cfg(feature = "zookeeper")]
        "zk" | "zookeeper" => {
            let config = fencelock_zookeeper::ZooKeeperConfig::from_store_url(url)?;
            Ok(Arc::new(
                fencelock_zookeeper::ZooKeeperBackend::connect(config).await?,
            ))
        }
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => {
            let config = fencelock_sql::PostgresConfig::from_store_url(url)?;
            Ok(Arc::new(
                fencelock_sql::PostgresBackend::connect(config).await?,
            ))
        }
        #[cfg(feature = "mysql")]
        "mysql" | "mariadb" => {
            let config = fencelock_sql::MySqlConfig::from_store_url(url)?;
            Ok(Arc::new(
                fencelock_sql::MySqlBackend::connect(config).await?,
            ))
        }
        other => Err(unavailable(other)),
    }
}

/// `memory://` is a fresh store; `memory://NAME` is one store per name in this process,
/// so code that connects twice sees the same locks.
fn memory_store(name: &str) -> MemoryStore {
    if name.is_empty() {
        return MemoryStore::new();
    }
    static NAMED: OnceLock<Mutex<HashMap<String, MemoryStore>>> = OnceLock::new();
    let mut named = NAMED
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    named.entry(name.to_owned()).or_default().clone()
}

fn unavailable(scheme: &str) -> Error {
    let available: Vec<String> = SCHEMES
        .iter()
        .filter(|s| s.enabled)
        .map(|s| format!("{}://", s.scheme))
        .collect();
    let available = available.join(", ");
    let message = match SCHEMES.iter().find(|s| s.scheme == scheme) {
        Some(info) => format!(
            "`{scheme}://` needs fencelock's cargo feature `{feature}`, which this build does not have: \
             add it, e.g. fencelock = {{ version = \"0.1\", features = [\"{feature}\"] }}; this build opens: {available}",
            feature = info.feature.unwrap_or_default()
        ),
        None => format!("unknown store scheme `{scheme}://`; this build opens: {available}"),
    };
    Error::config(message)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn config_error(url: &str) -> String {
        match block_on(connect(url)) {
            Err(err @ Error::Config { .. }) => err.to_string(),
            other => panic!("{url}: expected a Config error, got {other:?}"),
        }
    }

    #[test]
    fn unknown_scheme_is_refused_naming_what_this_build_opens() {
        let err = config_error("mongodb://127.0.0.1/");
        assert!(
            err.contains("unknown store scheme `mongodb://`") && err.contains("memory://"),
            "{err}"
        );
    }

    #[test]
    fn a_store_whose_feature_is_off_names_the_feature_to_enable() {
        let off = schemes().iter().filter(|s| !s.enabled);
        for info in off {
            let err = config_error(&format!("{}://127.0.0.1:1/", info.scheme));
            let feature = info.feature.unwrap_or_default();
            assert!(
                err.contains(&format!("cargo feature `{feature}`"))
                    && err.contains(&format!("features = [\"{feature}\"]")),
                "{err}"
            );
        }
    }

    #[cfg(not(feature = "sqlite"))]
    #[test]
    fn sqlite_without_its_feature_names_the_feature_to_enable() {
        let err = config_error("sqlite://locks.db");
        assert!(
            err.contains("cargo feature `sqlite`") && err.contains("features = [\"sqlite\"]"),
            "{err}"
        );
    }

    #[test]
    fn a_url_without_a_scheme_shows_an_example() {
        let err = config_error("locks.db");
        assert!(
            err.contains("scheme://") && err.contains("sqlite://"),
            "{err}"
        );
    }

    #[test]
    fn ttl_and_wait_options_become_the_locker_defaults() {
        let locker = block_on(connect("memory://?ttl=250ms&wait=2s")).unwrap();
        assert_eq!(locker.options().ttl, Duration::from_millis(250));
        assert_eq!(
            locker.options().wait,
            WaitPolicy::Until(Duration::from_secs(2))
        );
        assert_eq!(locker.capabilities().store, "memory");
    }

    #[test]
    fn zero_ttl_and_bad_durations_in_the_url_are_refused() {
        assert!(config_error("memory://?ttl=0s").contains("too short"));
        assert!(config_error("memory://?ttl=10").contains("500ms"));
        assert!(config_error("memory://?wait=soon").contains("500ms"));
    }

    #[test]
    fn unknown_options_are_refused() {
        let err = config_error("memory://?tll=1s");
        assert!(err.contains("unknown option `tll`"), "{err}");
    }

    #[test]
    fn named_memory_stores_are_shared_in_the_process_and_plain_ones_are_not() {
        block_on(async {
            let a = connect("memory://shared-test").await.unwrap();
            let b = connect("memory://shared-test").await.unwrap();
            let c = connect("memory://").await.unwrap();
            let guard = a.lock("n").no_wait().await.unwrap();
            assert!(
                b.try_lock("n").await.unwrap().is_none(),
                "same name, same store"
            );
            assert!(
                c.try_lock("n").await.unwrap().is_some(),
                "a plain memory:// is private"
            );
            guard.release().await.unwrap();
        });
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn sqlite_urls_open_a_file_store_and_keep_tokens_across_connections() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/locks.db?ttl=5s", dir.path().display());
        block_on(async {
            let first = connect(&url).await.unwrap();
            assert_eq!(first.capabilities().store, "sqlite");
            let guard = first.lock("job").no_wait().await.unwrap();
            let token = guard.token();
            guard.release().await.unwrap();
            let second = connect(&url).await.unwrap();
            let guard = second.lock("job").no_wait().await.unwrap();
            assert!(guard.token() > token);
            guard.release().await.unwrap();
        });
    }

    #[test]
    fn every_scheme_in_the_design_is_known() {
        for s in [
            "memory",
            "sqlite",
            "redis",
            "rediss",
            "redlock",
            "etcd",
            "zk",
            "zookeeper",
            "postgres",
            "postgresql",
            "mysql",
            "mariadb",
        ] {
            assert!(schemes().iter().any(|i| i.scheme == s), "{s}");
        }
    }
}
