//! [`MySqlConfig`]: the MySQL/MariaDB store's configuration, parsed from a URL.

use std::time::Duration;

use fencelock_core::Result;
use fencelock_core::url::StoreUrl;

use crate::server_config::{self, Dialect, LockMode, ServerAddress};

const DIALECT: Dialect = Dialect {
    schemes: &["mysql", "mariadb"],
    sqlx_scheme: "mysql",
    example: "mysql://USER:PASSWORD@HOST:3306/DATABASE (or mariadb://...), e.g. mysql://app@127.0.0.1/app",
    passthrough: &["ssl-mode", "ssl-ca", "ssl-cert", "ssl-key", "socket"],
    default_poll_max: Duration::from_millis(250),
};

/// How to reach the MySQL or MariaDB store:
/// `mysql://USER:PASSWORD@HOST:PORT/DATABASE?...` (or `mariadb://`, the same).
///
/// URL options (all optional): `mode` (`lease`, the default, or `session`), `table`,
/// `fence_table`, `prefix`, `pool_size`, `connect_timeout`, `poll_min`, `poll_max`;
/// and, handed on to the MySQL client as they are, `ssl-mode`, `ssl-ca`,
/// `ssl-cert`, `ssl-key`, `socket`. Each field documents its default.
///
/// `Debug` and every error show the URL with its password replaced by `***`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MySqlConfig {
    /// The server, user and database.
    pub server: ServerAddress,
    /// Lease rows (default) or named server locks (`GET_LOCK`).
    pub mode: LockMode,
    /// The table of lease rows (one per lock name). Default `fencelock_locks`.
    pub table: String,
    /// The table of the SQL fence gate (one row per fenced resource). Default
    /// `fencelock_fences`.
    pub fence_table: String,
    /// Prepended to every lock name to form its row key, so several applications can
    /// share one table. Default empty; end it with a separator such as `/`.
    pub prefix: String,
    /// Connections in this backend's pool. Default 8.
    pub pool_size: u32,
    /// How long to wait for a connection (to connect, or for a pooled one to come
    /// free) before failing with a temporary error. Default 10 s.
    pub connect_timeout: Duration,
    /// The first pause of a waiter polling a held lock; it doubles up to `poll_max`.
    /// Default 5 ms.
    pub poll_min: Duration,
    /// The longest pause between two polls of a held lock. Default 250 ms. A pause
    /// never outlasts the holder's remaining time (by the database's clock) or the
    /// waiter's deadline; a release in this process wakes its waiters at once.
    pub poll_max: Duration,
}

impl MySqlConfig {
    /// The URL options [`from_url`](Self::from_url) understands, besides the
    /// pass-through TLS options.
    pub const OPTIONS: &'static [&'static str] = server_config::OPTIONS;

    /// Parses a full `mysql://...` URL.
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

    /// Checks every field; [`MySqlBackend::connect`](crate::MySqlBackend::connect)
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
        match MySqlConfig::from_url(url) {
            Err(err @ Error::Config { .. }) => err.to_string(),
            other => panic!("{url}: expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn a_bare_url_gets_every_default() {
        let config = MySqlConfig::from_url("mysql://root@127.0.0.1:3306/db").unwrap();
        assert_eq!(config.mode, LockMode::Lease);
        assert_eq!(config.table, "fencelock_locks");
        assert_eq!(config.fence_table, "fencelock_fences");
        assert_eq!(config.pool_size, 8);
        assert_eq!(config.poll_max, Duration::from_millis(250));
        assert_eq!(config.server.endpoint(), "127.0.0.1:3306/db");
    }

    #[test]
    fn mariadb_urls_are_mysql_urls_for_the_client() {
        let config =
            MySqlConfig::from_url("mariadb://app@h:3307/db?prefix=p%3A&ssl-mode=required").unwrap();
        assert_eq!(
            config.server.connect_url(),
            "mysql://app@h:3307/db?ssl-mode=required"
        );
        assert_eq!(config.prefix, "p:");
        assert!(config.server.redacted().starts_with("mariadb://"));
    }

    #[test]
    fn passwords_never_show_in_debug_or_errors() {
        let config = MySqlConfig::from_url("mysql://app:hunter2@h/db").unwrap();
        let shown = format!("{config:?} {}", config.server);
        assert!(
            !shown.contains("hunter2") && shown.contains("app:***@h/db"),
            "{shown}"
        );
        let err = config_error("mysql://app:hunter2@h/db?pool_size=x");
        assert!(
            !err.contains("hunter2") && err.contains("pool_size"),
            "{err}"
        );
    }

    #[test]
    fn another_scheme_no_server_or_a_bad_option_is_refused() {
        assert!(config_error("postgres://h/db").contains("not a mysql/mariadb URL"));
        assert!(config_error("mysql://").contains("names no server"));
        assert!(config_error("mysql://h/db?table=1x").contains("start with a letter"));
        assert!(config_error("mysql://h/db?mode=x").contains("mode=session"));
        assert!(config_error("mysql://h/db?ttl=1s").contains("unknown option `ttl`"));
    }
}
