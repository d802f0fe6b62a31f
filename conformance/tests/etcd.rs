//! The conformance suite against one `etcd` member, started per test; every client is
//! its own `EtcdBackend` (own connection and session lease), as separate processes
//! would be.

use std::sync::Arc;

use fencelock_conformance::StoreFixture;
use fencelock_conformance::harness::{EtcdServer, Server};
use fencelock_core::{Error, LockBackend, LockName, Result, async_trait};
use fencelock_etcd::{EtcdBackend, EtcdConfig};

struct EtcdFixture {
    server: EtcdServer,
}

#[async_trait]
impl StoreFixture for EtcdFixture {
    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(
            EtcdBackend::connect_url(&self.session_url()).await?,
        ))
    }

    /// `etcdctl del --prefix fencelock/NAME/`, through a plain client.
    async fn delete_behind_back(&self, name: &LockName) -> Result<()> {
        let config = EtcdConfig::from_url(&self.server.url())?;
        let operator = |err| Error::backend("etcd", "operator delete", true, err);
        let mut client = fencelock_etcd::etcd_client::Client::connect(&config.endpoints, None)
            .await
            .map_err(operator)?;
        let dir = format!("{}{}/", config.prefix, name.as_str());
        client
            .delete(
                dir,
                Some(fencelock_etcd::etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await
            .map_err(operator)?;
        Ok(())
    }

    fn url(&self) -> Option<String> {
        Some(self.session_url())
    }
}

impl EtcdFixture {
    /// A short session, so a killed holder's lock frees within the fault tests' bound.
    fn session_url(&self) -> String {
        format!("{}?session_ttl=2s", self.server.url())
    }
}

async fn fixture() -> EtcdFixture {
    EtcdFixture {
        server: EtcdServer::start().await.expect("start etcd"),
    }
}

fencelock_conformance::conformance_tests!(fixture);
fencelock_conformance::fault_tests!(fixture, env!("CARGO_BIN_EXE_fencelock-worker"));

/// A guard whose TTL is many times the session's (30 s on a 2 s session) stays held
/// past several session TTLs: the driver caps a lease's validity at the session's
/// deadline, and the watchdog renews before that validity runs out, not only at ttl/3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_longer_than_the_session_keeps_its_lock_past_the_session_ttl() {
    let fixture = fixture().await;
    let locker = fencelock_core::Locker::with_options(
        fixture.backend().await.expect("connect"),
        fencelock_core::LockerOptions::default(),
    );
    let guard = locker
        .lock("long-ttl")
        .ttl(std::time::Duration::from_secs(30))
        .await
        .expect("a free lock");
    // Two and a half session TTLs: a lease still valid only to its first session
    // deadline would have been reported lost by now.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert!(
        guard.is_held(),
        "the lock was lost before its first renewal"
    );
    guard
        .release()
        .await
        .expect("the holder releases a lock it still holds");
}
