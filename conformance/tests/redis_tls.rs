//! `rediss://`: the conformance suite over TLS against one `redis-server` with a test
//! CA, and the refusals a TLS user meets (an untrusted server certificate, a missing
//! client certificate, a CA file that cannot be read).

use std::sync::Arc;

use fencelock_conformance::StoreFixture;
use fencelock_conformance::harness::{RedisServer, Server, TlsClients};
use fencelock_core::{Error, LockBackend, LockName, Result, async_trait};
use fencelock_redis::RedisBackend;
use fencelock_redis::redis;

struct RedisTlsFixture {
    server: RedisServer,
}

impl RedisTlsFixture {
    fn tls_url(&self) -> String {
        self.server.tls_url().expect("started with TLS")
    }
}

#[async_trait]
impl StoreFixture for RedisTlsFixture {
    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(RedisBackend::open(&self.tls_url()).await?))
    }

    /// `DEL {prefix}lock:{name}` through the server's plain loopback port.
    async fn delete_behind_back(&self, name: &LockName) -> Result<()> {
        let operator = |err| Error::backend("redis", "operator DEL", true, err);
        let client = redis::Client::open(self.server.url()).map_err(operator)?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(operator)?;
        let _: i64 = redis::cmd("DEL")
            .arg(format!("fencelock:lock:{name}"))
            .query_async(&mut conn)
            .await
            .map_err(operator)?;
        Ok(())
    }

    fn url(&self) -> Option<String> {
        Some(self.tls_url())
    }
}

async fn fixture() -> RedisTlsFixture {
    RedisTlsFixture {
        server: RedisServer::start_tls(TlsClients::Optional)
            .await
            .expect("start redis-server with TLS"),
    }
}

fencelock_conformance::conformance_tests!(fixture);

/// The client really speaks TLS: the server counts the connection as a TLS one.
#[tokio::test]
async fn grants_go_over_tls() {
    let fixture = fixture().await;
    let backend = RedisBackend::open(&fixture.tls_url()).await.unwrap();
    let locker = fencelock_core::Locker::new(backend);
    let guard = locker.try_lock("over-tls").await.unwrap().expect("free");
    assert!(guard.token().0 > 0);
    guard.release().await.unwrap();
    let client = redis::Client::open(fixture.server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap();
    // Redis 7 lists the connection's flags; its TLS port serves only TLS connections,
    // so a client connected there (laddr ends with the TLS port) spoke TLS.
    // The trailing space ends the field, so port 6380 does not match 63801.
    let on_tls_port = format!("laddr=127.0.0.1:{} ", fixture.server.tls().unwrap().port);
    assert!(
        clients.lines().any(|line| line.contains(&on_tls_port)),
        "no client on the TLS port: {clients}"
    );
}

#[tokio::test]
async fn a_server_certificate_from_an_untrusted_ca_is_refused_with_a_hint() {
    let server = RedisServer::start_tls(TlsClients::Optional).await.unwrap();
    let tls = server.tls().unwrap();
    let url = format!(
        "rediss://127.0.0.1:{}/?ca={}&connect_timeout=5s",
        tls.port,
        tls.other_ca.display()
    );
    let err = RedisBackend::open(&url).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    assert!(
        text.contains("certificate") && text.contains("`ca`"),
        "the error names the certificate problem and the option: {text}"
    );
}

#[tokio::test]
async fn a_server_that_requires_client_certificates_gets_one_from_cert_and_key() {
    let server = RedisServer::start_tls(TlsClients::Required).await.unwrap();
    let tls = server.tls().unwrap();
    let base = format!("rediss://127.0.0.1:{}/?ca={}", tls.port, tls.ca.display());
    let with_cert = format!(
        "{base}&cert={}&key={}",
        tls.client_cert.display(),
        tls.client_key.display()
    );
    let locker = fencelock_core::Locker::new(RedisBackend::open(&with_cert).await.unwrap());
    let guard = locker.try_lock("mutual-tls").await.unwrap().expect("free");
    guard.release().await.unwrap();
    // Without a client certificate the server ends the handshake.
    let err = RedisBackend::open(&format!("{base}&connect_timeout=5s"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
}

#[tokio::test]
async fn an_unreadable_ca_file_is_a_config_error_naming_the_file_and_option() {
    let err = RedisBackend::open("rediss://127.0.0.1:1/?ca=/nonexistent/ca.pem")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    assert!(
        text.contains("/nonexistent/ca.pem") && text.contains("`ca`"),
        "{text}"
    );
}
