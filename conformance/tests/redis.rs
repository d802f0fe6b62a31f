//! The conformance suite against one `redis-server` (no persistence), started per test;
//! every client is its own `RedisBackend` (own connection and pub/sub), as separate
//! processes would be.

use std::sync::Arc;

use fencelock_conformance::StoreFixture;
use fencelock_conformance::harness::{RedisServer, Server};
use fencelock_core::{Error, LockBackend, LockName, Result, async_trait};
use fencelock_redis::RedisBackend;
use fencelock_redis::redis;

struct RedisFixture {
    server: RedisServer,
}

#[async_trait]
impl StoreFixture for RedisFixture {
    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(RedisBackend::open(&self.server.url()).await?))
    }

    /// `DEL {prefix}lock:{name}` through a plain connection.
    async fn delete_behind_back(&self, name: &LockName) -> Result<()> {
        let operator = |err| Error::backend("redis", "operator DEL", true, err);
        let client = redis::Client::open(self.server.url()).map_err(operator)?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(operator)?;
        let key = format!("fencelock:lock:{name}");
        let _: i64 = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(operator)?;
        Ok(())
    }

    fn url(&self) -> Option<String> {
        Some(self.server.url())
    }
}

async fn fixture() -> RedisFixture {
    RedisFixture {
        server: RedisServer::start().await.expect("start redis-server"),
    }
}

fencelock_conformance::conformance_tests!(fixture);
fencelock_conformance::fault_tests!(fixture, env!("CARGO_BIN_EXE_fencelock-worker"));
