//! The conformance suite against one Postgres server in lease mode, started per test;
//! every client is its own `PostgresBackend` (own pool and `LISTEN` connection), as
//! separate processes would be.

use std::sync::Arc;

use fencelock_conformance::StoreFixture;
use fencelock_conformance::harness::{Postgres, Server};
use fencelock_core::{Error, LockBackend, LockName, Result, async_trait};
use fencelock_sql::{PostgresBackend, sqlx};

struct PostgresFixture {
    server: Postgres,
}

#[async_trait]
impl StoreFixture for PostgresFixture {
    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(PostgresBackend::open(&self.server.url()).await?))
    }

    /// An operator's `DELETE FROM fencelock_locks WHERE name = ..`.
    async fn delete_behind_back(&self, name: &LockName) -> Result<()> {
        let operator = PostgresBackend::open(&self.server.url()).await?;
        let statement = format!("DELETE FROM {} WHERE name = $1", operator.table());
        sqlx::query(&statement)
            .bind(name.as_str())
            .execute(operator.pool())
            .await
            .map_err(|err| Error::backend("postgres", "operator DELETE", false, err))?;
        Ok(())
    }

    fn url(&self) -> Option<String> {
        Some(self.server.url())
    }
}

async fn fixture() -> PostgresFixture {
    PostgresFixture {
        server: Postgres::start().await.expect("start postgres"),
    }
}

fencelock_conformance::conformance_tests!(fixture);

fencelock_conformance::fault_tests!(fixture, env!("CARGO_BIN_EXE_fencelock-worker"));

/// The same suite in session mode (`?mode=session`): each lock is an advisory lock on
/// a connection of its own; an operator "deletes" one by terminating its session.
mod session {
    use std::sync::Arc;

    use fencelock_conformance::StoreFixture;
    use fencelock_conformance::harness::{Postgres, Server};
    use fencelock_core::{Error, LockBackend, LockName, Result, async_trait};
    use fencelock_sql::{PostgresBackend, sqlx};

    struct SessionFixture {
        server: Postgres,
    }

    impl SessionFixture {
        fn url(&self) -> String {
            format!("{}?mode=session", self.server.url())
        }
    }

    #[async_trait]
    impl StoreFixture for SessionFixture {
        async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
            Ok(Arc::new(PostgresBackend::open(&self.url()).await?))
        }

        /// `pg_terminate_backend` of the session holding the name's advisory lock.
        async fn delete_behind_back(&self, name: &LockName) -> Result<()> {
            let operator = PostgresBackend::open(&self.server.url()).await?;
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_locks
                 WHERE locktype = 'advisory' AND granted AND objsubid = 1
                   AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0)",
            )
            .bind(name.as_str())
            .execute(operator.pool())
            .await
            .map_err(|err| Error::backend("postgres", "operator terminate", false, err))?;
            Ok(())
        }

        fn url(&self) -> Option<String> {
            None
        }
    }

    async fn fixture() -> SessionFixture {
        SessionFixture {
            server: Postgres::start().await.expect("start postgres"),
        }
    }

    fencelock_conformance::conformance_tests!(fixture);
}

/// Lease mode with clients whose wall clocks are two hours off (`faketime`): all
/// expiry is the database's clock, so nothing changes.
mod skewed_client_clock {
    use std::path::Path;
    use std::sync::Arc;

    use fencelock_conformance::harness::{Postgres, Server};
    use fencelock_conformance::skew::SkewSetup;
    use fencelock_sql::PostgresBackend;

    async fn setup() -> SkewSetup {
        let server = Postgres::start().await.expect("start postgres");
        let url = server.url();
        let normal = PostgresBackend::open(&url).await.unwrap();
        let worker = Path::new(env!("CARGO_BIN_EXE_fencelock-worker"));
        SkewSetup::new(server, url, Arc::new(normal), worker).await
    }

    fencelock_conformance::skew_tests!(setup);
}
