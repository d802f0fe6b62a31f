//! [`PostgresConfig`]: the Postgres store's configuration, parsed from a URL.

use std::time::Duration;

use fencelock_core::Result;
use fencelock_core::url::StoreUrl;

use crate::server_config::{self, Dialect, LockMode, ServerAddress};

const DIALECT: Dialect = Dialect {
    schemes: &["postgres", "postgresql"],
    sqlx_scheme: "postgres",
    example: "postgres://USER:PASSWORD@HOST:5432/DATABASE, e.g. postgres://app@127.0.0.1/app",
    passthrough: &[
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "application_name",
    ],
    default_poll_max: Duration::from_secs(1),
};

/// How to reach the Postgres store: `postgres://USER:PASSWORD@HOST:PORT/DATABASE?...`
/// (or `postgresql://`).
///
/// URL options (all optional): `mode` (`lease`, the default, or `session`), `table`,
/// `fence_table`, `prefix`, `pool_size`, `connect_timeout`, `poll_min`, `poll_max`;
/// and, handed on to the Postgres client as they are, `sslmode`, `sslrootcert`,
/// `sslcert`, `sslkey`, `application_name`. Each field documents its default.
///
/// `Debug` and every error show the URL with its password replaced by `***`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostgresConfig {
    /// The server, user and database.
    pub server: ServerAddress,
    /// Lease rows (default) or session-level advisory locks.
    pub mode: LockMode,
    /// The table of lease rows (one per lock name). Default `fencelock_locks`. Its
    /// name is also the `LISTEN/NOTIFY` channel of releases.
    pub table: String,
    /// The table of the SQL fence gate (one row per fenced resource). Default
    /// `fencelock_fences`.
    pub fence_table: String,
    /// Prepended to every lock name to form its row key, so several applications can
    /// share one table. Default empty; end it with a separator such as `/`.
    pub prefix: String,
    /// Connections in this backend's pool, besides its one listening connection.
    /// Default 8.
    pub pool_size: u32,
    /// How long to wait for a connection (to connect, or for a pooled one to come
    /// free) before failing with a temporary error. Default 10 s.
    pub connect_timeout: Duration,
    /// The first pause of a waiter between checks of a held lock when no release
    /// notification arrives; it doubles up to `poll_max`. Default 5 ms.
    pub poll_min: Duration,
    /// The longest pause between two checks of a held lock. Default 1 s: waiters are
    /// woken by `NOTIFY` on release and at the holder's expiry, so this only bounds
    /// how long a missed notification can delay them.
    pub poll_max: Duration,
}

impl PostgresConfig {
    /// The URL options [`from_url`](Self::from_url) understands, besides the
    /// pass-through TLS options.
    pub const OPTIONS: &'static [&'static str] = server_config::OPTIONS;

    /// Parses a full `postgres://...` URL.
    ///
    /// # Errors
    /// [`Error::Config`](fencelock_core::Error::Config) naming the problem and the fix.
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_store_url(StoreUrl::parse(url)?)
    }

    /// Builds the configuration from an already parsed URL: takes the options it
    /// knows and refuses any other (a caller handling options of its own, such as
    /// `ttl`, takes them out first).
    ///
    /// # Errors
    /// As [`from_url`](Self::from_url).
    pub fn from_store_url(url: StoreUrl) -> Result<Self> {
        let s = DIALECT.parse(url)?;
        let config = Self {
            server: s.server,
            mode: s.mode,
            table: s.table,
            fence_table: s.fence_table,
            prefix: s.prefix,
            pool_size: s.pool_size,
            connect_timeout: s.connect_timeout,
            poll_min: s.poll_min,
            poll_max: s.poll_max,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks every field; [`PostgresBackend::connect`](crate::PostgresBackend::connect)
    /// runs this too, since the fields are public.
    ///
    /// # Errors
    /// [`Error::Config`](fencelock_core::Error::Config) saying which field is wrong.
    pub fn validate(&self) -> Result<()> {
        server_config::validate(
            &self.table,
            &self.fence_table,
            &self.prefix,
            self.pool_size,
            self.connect_timeout,
            self.poll_min,
            self.poll_max,
        )
    }
}

#[cfg(test)]
mod tests {
    use fencelock_core::Error;

    use super::*;

    fn config_error(url: &str) -> String {
        match PostgresConfig::from_url(url) {
            Err(err @ Error::Config { .. }) => err.to_string(),
            other => panic!("{url}: expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn a_bare_url_gets_every_default() {
        let config = PostgresConfig::from_url("postgres://app@127.0.0.1:5432/db").unwrap();
        assert_eq!(config.mode, LockMode::Lease);
        assert_eq!(config.table, "fencelock_locks");
        assert_eq!(config.fence_table, "fencelock_fences");
        assert_eq!(config.prefix, "");
        assert_eq!(config.pool_size, 8);
        assert_eq!(config.server.endpoint(), "127.0.0.1:5432/db");
        assert_eq!(
            config.server.connect_url(),
            "postgres://app@127.0.0.1:5432/db"
        );
    }

    #[test]
    fn both_schemes_and_every_option_are_read() {
        let config = PostgresConfig::from_url(
            "postgresql://h/db?mode=session&table=t1&fence_table=f1&prefix=app%2F&pool_size=3\
             &connect_timeout=2s&poll_min=1ms&poll_max=2s&sslmode=require",
        )
        .unwrap();
        assert_eq!(config.mode, LockMode::Session);
        assert_eq!(
            (config.table.as_str(), config.fence_table.as_str()),
            ("t1", "f1")
        );
        assert_eq!(config.prefix, "app/");
        assert_eq!(config.pool_size, 3);
        assert_eq!(config.connect_timeout, Duration::from_secs(2));
        assert_eq!(
            (config.poll_min, config.poll_max),
            (Duration::from_millis(1), Duration::from_secs(2))
        );
        assert_eq!(
            config.server.connect_url(),
            "postgres://h/db?sslmode=require"
        );
    }

    #[test]
    fn passwords_never_show_in_debug_or_errors() {
        let config = PostgresConfig::from_url("postgres://app:hunter2@h:5432/db").unwrap();
        let shown = format!("{config:?} {}", config.server);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("app:***@h:5432/db"), "{shown}");
        let err = config_error("postgres://app:hunter2@h/db?tabel=x");
        assert!(
            !err.contains("hunter2") && err.contains("unknown option `tabel`"),
            "{err}"
        );
        let err = config_error("postgres://app:hunter2@h/db?mode=sessoin");
        assert!(
            !err.contains("hunter2") && err.contains("mode=lease"),
            "{err}"
        );
    }

    #[test]
    fn another_scheme_or_no_server_is_refused_with_an_example() {
        let err = config_error("mysql://h/db");
        assert!(err.contains("not a postgres/postgresql URL"), "{err}");
        for url in ["postgres://", "postgres:///db", "postgres://u@/db"] {
            let err = config_error(url);
            assert!(
                err.contains("names no server") && err.contains("postgres://"),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn bad_tables_prefixes_pools_and_pauses_are_refused() {
        for (url, expected) in [
            ("postgres://h/d?table=a-b", "start with a letter"),
            ("postgres://h/d?table=x&fence_table=X", "two tables"),
            ("postgres://h/d?prefix=a%00b", "without NUL"),
            ("postgres://h/d?pool_size=0", "pool_size"),
            ("postgres://h/d?pool_size=many", "pool_size"),
            ("postgres://h/d?poll_min=2s&poll_max=1s", "poll_min"),
            ("postgres://h/d?connect_timeout=0ms", "connect_timeout"),
        ] {
            let err = config_error(url);
            assert!(err.contains(expected), "{url}: {err}");
        }
    }
}
