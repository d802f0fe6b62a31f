//! The Redis fence gate: token checks for resources kept in Redis, atomic with the
//! write they guard.

use std::fmt;

use fencelock_core::{Error, FenceGate, FencingToken, Result, async_trait};
use redis::aio::ConnectionManager;

use crate::connection::{self, backend_error};
use crate::scripts::{self, KeySpace};
use crate::{RedisConfig, STORE};

/// A [`FenceGate`] kept in Redis: the highest token admitted for a resource lives in
/// `{prefix}fence:{resource}` (no expiry), and one script compares and stores it.
///
/// [`set_fenced`](Self::set_fenced) writes a Redis key **in the same script** as the
/// check, so a writer whose lock was taken over cannot overwrite its successor's value.
///
/// ```no_run
/// use fencelock_core::{Error, Locker};
/// use fencelock_redis::RedisBackend;
///
/// # async fn demo() -> fencelock_core::Result<()> {
/// let backend = RedisBackend::open("redis://127.0.0.1:6379/").await?;
/// let gate = backend.fence_gate();
/// let locker = Locker::new(backend);
/// let guard = locker.lock("report").await?;
/// match gate.set_fenced("report", guard.token(), "report:body", b"v2").await {
///     Ok(()) => {}
///     Err(Error::StaleToken { .. }) => { /* the lock was lost and taken over: stop */ }
///     Err(other) => return Err(other),
/// }
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisFenceGate {
    conn: ConnectionManager,
    keys: KeySpace,
    address: String,
}

impl fmt::Debug for RedisFenceGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisFenceGate")
            .field("server", &self.address)
            .field("prefix", &self.keys.prefix())
            .finish_non_exhaustive()
    }
}

impl RedisFenceGate {
    /// A gate on the server and prefix of `config`, with a connection of its own.
    ///
    /// # Errors
    /// As [`RedisBackend::connect`](crate::RedisBackend::connect).
    pub async fn connect(config: &RedisConfig) -> Result<Self> {
        config.validate()?;
        let conn = connection::connect(&config.node, config.connect_options()).await?;
        Ok(Self::with_connection(
            conn,
            KeySpace::new(config.prefix.clone()),
            config.node.address(),
        ))
    }

    pub(crate) fn with_connection(
        conn: ConnectionManager,
        keys: KeySpace,
        address: String,
    ) -> Self {
        Self {
            conn,
            keys,
            address,
        }
    }

    /// Admits `token` for `resource` and, in the same script, sets `key` to `value`.
    /// Neither happens if a higher token was already admitted.
    ///
    /// # Errors
    /// [`Error::StaleToken`] with the highest admitted token; [`Error::Backend`] if the
    /// server cannot be reached.
    pub async fn set_fenced(
        &self,
        resource: &str,
        token: FencingToken,
        key: &str,
        value: &[u8],
    ) -> Result<()> {
        self.run(resource, token, Some((key, value))).await
    }

    /// The highest token admitted for `resource`, if any.
    ///
    /// # Errors
    /// [`Error::Backend`] if the read fails or the key holds something else.
    pub async fn highest(&self, resource: &str) -> Result<Option<FencingToken>> {
        let mut conn = self.conn.clone();
        let key = self.keys.fence(resource);
        let stored: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(|err| self.failed(resource, "read the highest token of", err))?;
        stored
            .map(|text| {
                text.parse().map(FencingToken).map_err(|_| {
                    Error::backend(
                        STORE,
                        format!("read `{key}` on {}", self.address),
                        false,
                        format!("`{text}` is not a fencing token"),
                    )
                })
            })
            .transpose()
    }

    async fn run(
        &self,
        resource: &str,
        token: FencingToken,
        write: Option<(&str, &[u8])>,
    ) -> Result<()> {
        let mut conn = self.conn.clone();
        let verdict = scripts::admit(&mut conn, &self.keys, resource, token, write)
            .await
            .map_err(|err| self.failed(resource, "admit a token for", err))?;
        verdict.map_err(|highest| Error::StaleToken {
            resource: resource.to_owned(),
            token,
            highest,
        })
    }

    fn failed(&self, resource: &str, what: &str, err: redis::RedisError) -> Error {
        backend_error(format!("{what} `{resource}` on {}", self.address), err)
    }
}

#[async_trait]
impl FenceGate for RedisFenceGate {
    /// Admits `token` for `resource` in one script; use
    /// [`set_fenced`](RedisFenceGate::set_fenced) to tie a Redis write to the check.
    async fn admit(&self, resource: &str, token: FencingToken) -> Result<()> {
        self.run(resource, token, None).await
    }
}
