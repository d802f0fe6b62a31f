//! One Redlock node: a lazily (re)connected Redis connection and bounded requests.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use fencelock_core::{Error, Result};
use fencelock_redis::RedisNode;
use fencelock_redis::connection::{self, ConnectOptions};
use fencelock_redis::redis::RedisResult;
use fencelock_redis::redis::aio::ConnectionManager;
use tokio::sync::OnceCell;

/// A node of the store. Connected at start when it answers, otherwise on first use
/// (so a node that was down when the process started joins once it is up); the
/// connection reconnects by itself after that.
pub(crate) struct Node {
    target: RedisNode,
    address: String,
    options: ConnectOptions,
    conn: OnceCell<ConnectionManager>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.address)
    }
}

/// Why one node did not answer one request, for messages.
#[derive(Clone, Debug)]
pub(crate) struct NodeFailure {
    pub(crate) address: String,
    pub(crate) reason: String,
}

impl fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.address, self.reason)
    }
}

impl Node {
    pub(crate) fn new(target: RedisNode, options: ConnectOptions) -> Self {
        Self {
            address: target.address(),
            target,
            options,
            conn: OnceCell::new(),
        }
    }

    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    pub(crate) fn target(&self) -> &RedisNode {
        &self.target
    }

    /// The node's connection, connecting first if it has none yet.
    ///
    /// # Errors
    /// As [`connection::connect`]: unreachable (temporary) or an evicting server.
    pub(crate) async fn connection(&self) -> Result<ConnectionManager> {
        self.conn
            .get_or_try_init(|| connection::connect(&self.target, self.options))
            .await
            .cloned()
    }

    /// Runs `request` on this node, giving up after `limit` (connecting included).
    pub(crate) async fn call<T, F, Fut>(
        &self,
        limit: Duration,
        request: F,
    ) -> std::result::Result<T, NodeFailure>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let failure = |reason: String| NodeFailure {
            address: self.address.clone(),
            reason,
        };
        let attempt = async {
            let conn = self
                .connection()
                .await
                .map_err(|err: Error| failure(err.to_string()))?;
            request(conn).await.map_err(|err| failure(err.to_string()))
        };
        match tokio::time::timeout(limit, attempt).await {
            Ok(result) => result,
            Err(_) => Err(failure(format!("no answer within {limit:?}"))),
        }
    }
}
