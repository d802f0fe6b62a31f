//! Store configuration: plain data with documented defaults, parsed from a URL.

use std::path::PathBuf;
use std::time::Duration;

use fencelock_core::url::{StoreUrl, percent_decode};
use fencelock_core::{Error, Result};

/// How to open the SQLite store: `sqlite://PATH?option=value&...`.
///
/// Everything after `sqlite://` up to `?` is the file path, percent-decoded:
/// `sqlite://locks.db` and `sqlite://data/locks.db` are relative to the working
/// directory, `sqlite:///var/lib/app/locks.db` is absolute. The file is created if
/// missing; its directory must exist.
///
/// URL options (all optional): `table`, `fence_table`, `prefix`, `busy_timeout`
/// (`500ms`, `5s`, ...), `pool_size`, `poll_min`, `poll_max`. Each field below documents its default.
/// Nothing here is secret, so the derived `Debug` shows it all.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SqliteConfig {
    /// The database file. Created if missing; its directory must already exist.
    pub path: PathBuf,
    /// The table of lease rows (one per lock name). Default
    /// [`DEFAULT_TABLE`](Self::DEFAULT_TABLE).
    pub table: String,
    /// The table of the SQL fence gate (one row per fenced resource). Default
    /// [`DEFAULT_FENCE_TABLE`](Self::DEFAULT_FENCE_TABLE).
    pub fence_table: String,
    /// Prepended to every lock name to form its row key, so several applications can
    /// share one table. Default empty. End it with a separator such as `/` or `:` so
    /// that `app` + `1/x` and `app1` + `/x` cannot meet.
    pub prefix: String,
    /// How long a statement waits for another connection's write lock before it fails
    /// with a temporary error (SQLite's busy timeout). Default 5 s.
    pub busy_timeout: Duration,
    /// Connections in this process's pool. Default 4; SQLite runs one write at a time
    /// anyway, so more rarely helps.
    pub pool_size: u32,
    /// The first pause of a waiter polling a held lock; it doubles up to `poll_max`.
    /// Default 5 ms.
    pub poll_min: Duration,
    /// The longest pause between two polls of a held lock. Default 250 ms. A pause
    /// never outlasts the holder's remaining time or the waiter's deadline.
    pub poll_max: Duration,
}

impl SqliteConfig {
    /// The default lease table.
    pub const DEFAULT_TABLE: &'static str = "fencelock_locks";
    /// The default fence-gate table.
    pub const DEFAULT_FENCE_TABLE: &'static str = "fencelock_fences";
    /// The default busy timeout.
    pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
    /// The default pool size.
    pub const DEFAULT_POOL_SIZE: u32 = 4;
    /// The default first polling pause.
    pub const DEFAULT_POLL_MIN: Duration = Duration::from_millis(5);
    /// The default longest polling pause.
    pub const DEFAULT_POLL_MAX: Duration = Duration::from_millis(250);
    /// The longest busy timeout accepted.
    pub const MAX_BUSY_TIMEOUT: Duration = Duration::from_secs(3600);
    /// The largest pool accepted.
    pub const MAX_POOL_SIZE: u32 = 64;
    /// The longest prefix accepted, in bytes.
    pub const MAX_PREFIX_LEN: usize = 256;
    /// The URL options [`from_url`](Self::from_url) understands.
    pub const OPTIONS: &'static [&'static str] = &[
        "table",
        "fence_table",
        "prefix",
        "busy_timeout",
        "pool_size",
        "poll_min",
        "poll_max",
    ];

    /// A configuration for the database file at `path` with every other field at its
    /// default.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            table: Self::DEFAULT_TABLE.to_owned(),
            fence_table: Self::DEFAULT_FENCE_TABLE.to_owned(),
            prefix: String::new(),
            busy_timeout: Self::DEFAULT_BUSY_TIMEOUT,
            pool_size: Self::DEFAULT_POOL_SIZE,
            poll_min: Self::DEFAULT_POLL_MIN,
            poll_max: Self::DEFAULT_POLL_MAX,
        }
    }

    /// Parses a full `sqlite://PATH?options` URL.
    ///
    /// # Errors
    /// [`Error::Config`] naming the problem and the fix: not a URL, another scheme, an
    /// empty path, `:memory:`, an unknown option or a bad value (see
    /// [`validate`](Self::validate)).
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
        if url.scheme() != "sqlite" {
            return Err(Error::config(format!(
                "`{shown}` is not a sqlite URL; write sqlite://PATH, e.g. sqlite://locks.db \
                 or sqlite:///var/lib/app/locks.db"
            )));
        }
        let path = percent_decode(url.body())
            .map_err(|problem| Error::config(format!("the path of `{shown}` {problem}")))?;
        if path.is_empty() {
            return Err(Error::config(format!(
                "`{shown}` names no database file; write sqlite://PATH, e.g. sqlite://locks.db \
                 (relative) or sqlite:///var/lib/app/locks.db (absolute)"
            )));
        }
        if path == ":memory:" || path.starts_with("file:") {
            return Err(Error::config(format!(
                "`{shown}`: give a plain file path after sqlite://, e.g. sqlite://locks.db; \
                 for locks inside one process use memory://"
            )));
        }
        let mut config = Self::new(path);
        if let Some(table) = url.take("table") {
            config.table = table;
        }
        if let Some(table) = url.take("fence_table") {
            config.fence_table = table;
        }
        if let Some(prefix) = url.take("prefix") {
            config.prefix = prefix;
        }
        if let Some(timeout) = url.take_duration("busy_timeout")? {
            config.busy_timeout = timeout;
        }
        if let Some(size) = url.take("pool_size") {
            config.pool_size = size.parse().map_err(|_| {
                Error::config(format!(
                    "option `pool_size` of `{shown}` is `{size}`; give a whole number from 1 to {}, e.g. pool_size=4",
                    Self::MAX_POOL_SIZE
                ))
            })?;
        }
        if let Some(pause) = url.take_duration("poll_min")? {
            config.poll_min = pause;
        }
        if let Some(pause) = url.take_duration("poll_max")? {
            config.poll_max = pause;
        }
        url.finish(Self::OPTIONS)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every field; [`SqliteBackend::connect`](crate::SqliteBackend::connect)
    /// runs this too, since the fields are public.
    ///
    /// # Errors
    /// [`Error::Config`] saying which field is wrong and how to fix it.
    pub fn validate(&self) -> Result<()> {
        if self.path.as_os_str().is_empty() {
            return Err(Error::config(
                "the SQLite path is empty; give a database file, e.g. sqlite://locks.db",
            ));
        }
        check_table_name("table", &self.table)?;
        check_table_name("fence_table", &self.fence_table)?;
        // SQLite matches table names without regard to ASCII case.
        if self.table.eq_ignore_ascii_case(&self.fence_table) {
            return Err(Error::config(format!(
                "`table` and `fence_table` are both `{}`; the lease rows and the fence gate need \
                 two tables, e.g. fence_table={}",
                self.table,
                Self::DEFAULT_FENCE_TABLE
            )));
        }
        if self.prefix.len() > Self::MAX_PREFIX_LEN || self.prefix.contains('\0') {
            return Err(Error::config(format!(
                "prefix {:?} is not usable: give at most {} bytes without NUL, e.g. prefix=myapp/",
                self.prefix,
                Self::MAX_PREFIX_LEN
            )));
        }
        if self.busy_timeout > Self::MAX_BUSY_TIMEOUT {
            return Err(Error::config(format!(
                "busy_timeout {:?} is too long: at most 1h (default 5s)",
                self.busy_timeout
            )));
        }
        if self.poll_min < Duration::from_millis(1)
            || self.poll_min > self.poll_max
            || self.poll_max > Self::MAX_BUSY_TIMEOUT
        {
            return Err(Error::config(format!(
                "poll_min {:?} and poll_max {:?} are not usable: give 1ms <= poll_min <= poll_max <= 1h \
                 (defaults 5ms and 250ms)",
                self.poll_min, self.poll_max
            )));
        }
        if self.pool_size == 0 || self.pool_size > Self::MAX_POOL_SIZE {
            return Err(Error::config(format!(
                "pool_size {} is out of range: give 1 to {} (default {})",
                self.pool_size,
                Self::MAX_POOL_SIZE,
                Self::DEFAULT_POOL_SIZE
            )));
        }
        Ok(())
    }
}

/// Accepts `[A-Za-z_][A-Za-z0-9_]{0,62}`, not starting with SQLite's reserved
/// `sqlite_`. Validated names are safe to write into SQL text.
pub(crate) fn check_table_name(option: &str, name: &str) -> Result<()> {
    crate::identifier::check_table_name(option, name)?;
    if name.to_ascii_lowercase().starts_with("sqlite_") {
        return Err(Error::config(format!(
            "{option} `{name}` starts with `sqlite_`, which SQLite reserves; pick another name, \
             e.g. {option}=my_app_locks"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_error(url: &str) -> String {
        match SqliteConfig::from_url(url) {
            Err(err @ Error::Config { .. }) => err.to_string(),
            other => panic!("{url}: expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn a_bare_path_gets_every_default() {
        let config = SqliteConfig::from_url("sqlite://locks.db").unwrap();
        assert_eq!(config, SqliteConfig::new("locks.db"));
        assert_eq!(config.table, "fencelock_locks");
        assert_eq!(config.fence_table, "fencelock_fences");
        assert_eq!(config.prefix, "");
        assert_eq!(config.busy_timeout, Duration::from_secs(5));
        assert_eq!(config.pool_size, 4);
    }

    #[test]
    fn relative_absolute_and_percent_encoded_paths_are_kept_as_written() {
        let path = |url| SqliteConfig::from_url(url).unwrap().path;
        assert_eq!(
            path("sqlite://data/locks.db"),
            PathBuf::from("data/locks.db")
        );
        assert_eq!(
            path("sqlite:///var/lib/a.db"),
            PathBuf::from("/var/lib/a.db")
        );
        assert_eq!(
            path("SQLITE://my%20dir/a%3F.db"),
            PathBuf::from("my dir/a?.db")
        );
    }

    #[test]
    fn every_option_is_read() {
        let config = SqliteConfig::from_url(
            "sqlite://l.db?table=t1&fence_table=f1&prefix=app%2F&busy_timeout=250ms&pool_size=2",
        )
        .unwrap();
        assert_eq!(config.table, "t1");
        assert_eq!(config.fence_table, "f1");
        assert_eq!(config.prefix, "app/");
        assert_eq!(config.busy_timeout, Duration::from_millis(250));
        assert_eq!(config.pool_size, 2);
    }

    #[test]
    fn an_empty_path_is_refused_with_an_example() {
        for url in ["sqlite://", "sqlite://?table=t"] {
            let err = config_error(url);
            assert!(
                err.contains("names no database file") && err.contains("sqlite://locks.db"),
                "{err}"
            );
        }
    }

    #[test]
    fn another_scheme_or_no_scheme_is_refused() {
        let err = config_error("redis://127.0.0.1/");
        assert!(err.contains("not a sqlite URL"), "{err}");
        let err = config_error("locks.db");
        assert!(err.contains("scheme://"), "{err}");
    }

    #[test]
    fn in_memory_and_uri_filenames_are_refused_pointing_at_alternatives() {
        for url in ["sqlite://:memory:", "sqlite://file:x.db?mode=memory"] {
            let err = config_error(url);
            assert!(
                err.contains("memory://") && err.contains("plain file path"),
                "{err}"
            );
        }
    }

    #[test]
    fn bad_table_names_are_refused_with_the_rule() {
        for table in ["", "1abc", "a-b", "a%20b", "x%3B%20DROP", &"t".repeat(64)] {
            let err = config_error(&format!("sqlite://l.db?table={table}"));
            assert!(err.contains("start with a letter or `_`"), "{table}: {err}");
        }
        let err = config_error("sqlite://l.db?fence_table=Sqlite_x");
        assert!(
            err.contains("reserves") && err.contains("fence_table"),
            "{err}"
        );
        assert!(
            SqliteConfig::from_url(&format!("sqlite://l.db?table=_{}", "a".repeat(62))).is_ok()
        );
    }

    #[test]
    fn one_table_for_leases_and_fences_is_refused() {
        for url in [
            "sqlite://l.db?table=x&fence_table=x",
            "sqlite://l.db?table=Locks&fence_table=locks",
        ] {
            let err = config_error(url);
            assert!(err.contains("two tables"), "{url}: {err}");
        }
    }

    #[test]
    fn a_prefix_with_nul_or_too_long_is_refused() {
        for prefix in ["a%00b".to_owned(), "p".repeat(257)] {
            let err = config_error(&format!("sqlite://l.db?prefix={prefix}"));
            assert!(err.contains("at most 256 bytes without NUL"), "{err}");
        }
    }

    #[test]
    fn poll_pauses_are_read_and_bad_ones_refused() {
        let config = SqliteConfig::from_url("sqlite://l.db?poll_min=1ms&poll_max=2s").unwrap();
        assert_eq!(
            (config.poll_min, config.poll_max),
            (Duration::from_millis(1), Duration::from_secs(2))
        );
        for bad in ["poll_min=0ms", "poll_min=2s&poll_max=1s", "poll_max=2h"] {
            let err = config_error(&format!("sqlite://l.db?{bad}"));
            assert!(
                err.contains("poll_min") && err.contains("250ms"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn bad_busy_timeouts_and_pool_sizes_are_refused() {
        let err = config_error("sqlite://l.db?busy_timeout=5");
        assert!(
            err.contains("busy_timeout") && err.contains("500ms"),
            "{err}"
        );
        let err = config_error("sqlite://l.db?busy_timeout=2h");
        assert!(err.contains("at most 1h"), "{err}");
        for size in ["0", "65", "many", "-1"] {
            let err = config_error(&format!("sqlite://l.db?pool_size={size}"));
            assert!(
                err.contains("pool_size") && err.contains("64"),
                "{size}: {err}"
            );
        }
    }

    #[test]
    fn unknown_options_are_named_with_the_known_ones() {
        let err = config_error("sqlite://l.db?tabel=x");
        assert!(
            err.contains("unknown option `tabel`") && err.contains("busy_timeout"),
            "{err}"
        );
        // `ttl` belongs to the Locker: the facade takes it out before this parser runs.
        assert!(config_error("sqlite://l.db?ttl=10s").contains("unknown option `ttl`"));
    }

    #[test]
    fn broken_percent_escapes_are_refused() {
        let err = config_error("sqlite://a%zz.db");
        assert!(err.contains("%25"), "{err}");
        let err = config_error("sqlite://a%ff.db");
        assert!(err.contains("not UTF-8"), "{err}");
    }

    #[test]
    fn a_parsed_store_url_can_carry_options_for_the_caller() {
        let mut url = StoreUrl::parse("sqlite://l.db?ttl=10s&prefix=p:").unwrap();
        assert_eq!(url.take("ttl").as_deref(), Some("10s"));
        let config = SqliteConfig::from_store_url(url).unwrap();
        assert_eq!(config.prefix, "p:");
    }
}
