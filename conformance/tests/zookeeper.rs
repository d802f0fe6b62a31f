//! The conformance suite against ZooKeeper: one standalone server shared by every test
//! of this binary (each test uses its own lock names), every client its own
//! `ZooKeeperBackend` with its own session, as separate processes would have.

use std::sync::Arc;

use fencelock_conformance::StoreFixture;
use fencelock_conformance::harness::{Server, ZooKeeper};
use fencelock_core::{Error, LockBackend, LockName, Result, async_trait};
use fencelock_zookeeper::ZooKeeperBackend;
use fencelock_zookeeper::zookeeper_client::{Client, Error as ZkError};

/// One server for the whole binary: the harness's spawner keeps it alive across the
/// tests' runtimes and its parent-death signal stops it when the binary exits.
static SERVER: tokio::sync::OnceCell<ZooKeeper> = tokio::sync::OnceCell::const_new();

struct ZooKeeperFixture {
    url: String,
}

#[async_trait]
impl StoreFixture for ZooKeeperFixture {
    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(ZooKeeperBackend::open(&self.url).await?))
    }

    /// Deletes every node under the lock's node, as `zkCli.sh deleteall` would.
    async fn delete_behind_back(&self, name: &LockName) -> Result<()> {
        let operator = |err: ZkError| Error::backend("zookeeper", "operator delete", true, err);
        let backend = ZooKeeperBackend::open(&self.url).await?;
        let dir = backend.lock_path(name);
        let client = Client::connect(&backend.config().connect_string())
            .await
            .map_err(operator)?;
        for child in client.list_children(&dir).await.map_err(operator)? {
            match client.delete(&format!("{dir}/{child}"), None).await {
                Ok(()) | Err(ZkError::NoNode) => {}
                Err(err) => return Err(operator(err)),
            }
        }
        Ok(())
    }

    fn url(&self) -> Option<String> {
        Some(self.url.clone())
    }
}

async fn fixture() -> ZooKeeperFixture {
    let server = SERVER
        .get_or_init(|| async { ZooKeeper::start().await.expect("start ZooKeeper") })
        .await;
    ZooKeeperFixture {
        url: format!("{}/conformance?session_timeout=2s", server.url()),
    }
}

fencelock_conformance::conformance_tests!(fixture);
fencelock_conformance::fault_tests!(fixture, env!("CARGO_BIN_EXE_fencelock-worker"));
