//! The conformance suite against one MariaDB server in lease mode, started per test;
//! every client is its own `MySqlBackend` (own pool), as separate processes would be.

use std::sync::Arc;

use fencelock_conformance::StoreFixture;
use fencelock_conformance::harness::{MariaDb, Server};
use fencelock_core::{Error, LockBackend, LockName, Result, async_trait};
use fencelock_sql::{MySqlBackend, sqlx};

struct MariaDbFixture {
    server: MariaDb,
}

#[async_trait]
impl StoreFixture for MariaDbFixture {
    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(MySqlBackend::open(&self.server.url()).await?))
    }

    /// An operator's `DELETE FROM fencelock_locks WHERE name = ..`.
    async fn delete_behind_back(&self, name: &LockName) -> Result<()> {
        let operator = MySqlBackend::open(&self.server.url()).await?;
        let statement = format!("DELETE FROM {} WHERE name = ?", operator.table());
        sqlx::query(&statement)
            .bind(name.as_str().as_bytes())
            .execute(operator.pool())
            .await
            .map_err(|err| Error::backend("mysql", "operator DELETE", false, err))?;
        Ok(())
    }

    fn url(&self) -> Option<String> {
        Some(self.server.url())
    }
}

async fn fixture() -> MariaDbFixture {
    MariaDbFixture {
        server: start_mariadb().await,
    }
}

/// Starts a MariaDB, retrying twice: `mariadb-install-db` sometimes fails when
/// several run at once (temporary tables under `/tmp` vanish under it).
async fn start_mariadb() -> MariaDb {
    let mut attempts = 0;
    loop {
        match MariaDb::start().await {
            Ok(server) => return server,
            Err(err) if attempts < 2 => {
                attempts += 1;
                eprintln!("mariadbd did not start ({err}); trying again");
            }
            Err(err) => panic!("start mariadbd: {err}"),
        }
    }
}

fencelock_conformance::conformance_tests!(fixture);

fencelock_conformance::fault_tests!(fixture, env!("CARGO_BIN_EXE_fencelock-worker"));

/// The same suite in session mode (`?mode=session`): each lock is a `GET_LOCK` on a
/// connection of its own; an operator "deletes" one by killing its session.
mod session {
    use std::sync::Arc;

    use fencelock_conformance::StoreFixture;
    use fencelock_conformance::harness::{MariaDb, Server};
    use fencelock_core::{Error, LockBackend, LockName, Result, async_trait};
    use fencelock_sql::{MySqlBackend, sqlx};

    struct SessionFixture {
        server: MariaDb,
    }

    impl SessionFixture {
        fn url(&self) -> String {
            format!("{}?mode=session", self.server.url())
        }
    }

    #[async_trait]
    impl StoreFixture for SessionFixture {
        async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
            Ok(Arc::new(MySqlBackend::open(&self.url()).await?))
        }

        /// `KILL` of the session holding the name's `GET_LOCK`.
        async fn delete_behind_back(&self, name: &LockName) -> Result<()> {
            let operator = |err| Error::backend("mysql", "operator KILL", false, err);
            let backend = MySqlBackend::open(&self.server.url()).await?;
            let session: Option<i64> = sqlx::query_scalar(
                "SELECT CAST(IS_USED_LOCK(CONCAT('fencelock:', LEFT(SHA2(CONCAT(DATABASE(), \
                 '/', 'fencelock_locks', '/', ?), 256), 54))) AS SIGNED)",
            )
            .bind(name.as_str().as_bytes())
            .fetch_one(backend.pool())
            .await
            .map_err(operator)?;
            if let Some(session) = session {
                sqlx::query(&format!("KILL {session}"))
                    .execute(backend.pool())
                    .await
                    .map_err(operator)?;
            }
            Ok(())
        }

        fn url(&self) -> Option<String> {
            None
        }
    }

    async fn fixture() -> SessionFixture {
        SessionFixture {
            server: super::start_mariadb().await,
        }
    }

    fencelock_conformance::conformance_tests!(fixture);
}

/// Lease mode with clients whose wall clocks are two hours off (`faketime`): all
/// expiry is the database's clock, so nothing changes.
mod skewed_client_clock {
    use std::path::Path;
    use std::sync::Arc;

    use fencelock_conformance::harness::Server;
    use fencelock_conformance::skew::SkewSetup;
    use fencelock_sql::MySqlBackend;

    async fn setup() -> SkewSetup {
        let server = super::start_mariadb().await;
        let url = server.url();
        let normal = MySqlBackend::open(&url).await.unwrap();
        let worker = Path::new(env!("CARGO_BIN_EXE_fencelock-worker"));
        SkewSetup::new(server, url, Arc::new(normal), worker).await
    }

    fencelock_conformance::skew_tests!(setup);
}
