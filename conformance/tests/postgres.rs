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
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use fencelock_conformance::harness::{Postgres, Server};
    use fencelock_conformance::resource::SharedResource;
    use fencelock_conformance::worker::{Acquired, Released, Worker, WorkerState};
    use fencelock_core::{AcquireRequest, Error, LockBackend, LockName};
    use fencelock_sql::PostgresBackend;
    use tempfile::TempDir;
    use tokio::time::Instant;

    const TTL: Duration = Duration::from_secs(30);
    const SKEW_SEEN: Duration = Duration::from_secs(3600);

    /// A script that runs the worker under `faketime -f OFFSET`, with the monotonic
    /// clock left alone (timers and the lease's local validity stay right).
    fn skewed_worker_script(dir: &Path, offset: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join(format!("worker{offset}.sh"));
        let body = format!(
            "#!/bin/sh\nFAKETIME_DONT_FAKE_MONOTONIC=1 exec faketime -f '{offset}' '{}' \"$@\"\n",
            env!("CARGO_BIN_EXE_fencelock-worker")
        );
        std::fs::write(&script, body).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    struct Setup {
        server: Postgres,
        dir: TempDir,
        resource: SharedResource,
        normal: PostgresBackend,
    }

    async fn setup() -> Setup {
        let server = Postgres::start().await.expect("start postgres");
        let dir = tempfile::tempdir().unwrap();
        let resource = SharedResource::open(dir.path().join("resource.db"))
            .await
            .unwrap();
        let normal = PostgresBackend::open(&server.url()).await.unwrap();
        Setup {
            server,
            dir,
            resource,
            normal,
        }
    }

    impl Setup {
        async fn worker(&self, offset: &str) -> Worker {
            let script = skewed_worker_script(self.dir.path(), offset);
            Worker::spawn(
                &script,
                &format!("skewed{offset}"),
                &self.server.url(),
                self.resource.path(),
            )
            .await
            .unwrap()
        }

        async fn try_lock(&self, lock: &str) -> fencelock_core::Result<fencelock_core::Lease> {
            let name = LockName::new(lock).unwrap();
            self.normal
                .acquire(AcquireRequest::new(name, TTL).unwrap())
                .await
        }
    }

    /// The worker's wall clock really is `offset` away from ours: the times it
    /// reports (its `SystemTime`, mapped to our clock) are over an hour off.
    fn assert_skewed(requested: Instant, ahead: bool) {
        let now = Instant::now();
        if ahead {
            assert!(
                requested > now + SKEW_SEEN,
                "the +2h worker's clock is not ahead"
            );
        } else {
            assert!(
                requested + SKEW_SEEN < now,
                "the -2h worker's clock is not behind"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_two_hours_behind_holds_its_lease_for_the_full_ttl() {
        let setup = setup().await;
        let mut behind = setup.worker("-2h").await;
        let Acquired::Granted(grant) = behind.acquire("behind", TTL, Duration::ZERO).await.unwrap()
        else {
            panic!("the lock was free");
        };
        assert_skewed(grant.requested, false);
        // By its clock the lease ended two hours ago; by the database's it holds.
        assert!(matches!(
            setup.try_lock("behind").await,
            Err(Error::Contended { .. })
        ));
        let state = setup
            .normal
            .inspect(&LockName::new("behind").unwrap())
            .await
            .unwrap();
        let state = state.expect("held");
        assert_eq!(state.token, grant.token);
        assert!(state.remaining.unwrap() > TTL / 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_two_hours_ahead_cannot_take_a_lease_it_thinks_expired() {
        let setup = setup().await;
        let held = setup.try_lock("ahead").await.unwrap();
        let mut ahead = setup.worker("+2h").await;
        match ahead.acquire("ahead", TTL, Duration::ZERO).await.unwrap() {
            Acquired::Contended { requested, .. } => assert_skewed(requested, true),
            other => panic!("a held lock was granted to the +2h client: {other:?}"),
        }
        setup.normal.release(&held).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn renewals_of_skewed_clients_keep_their_leases() {
        let setup = setup().await;
        // A short TTL, held for more than three of them: only renewals keep it.
        let ttl = Duration::from_secs(2);
        for (offset, lock, ahead) in [("-2h", "renew-behind", false), ("+2h", "renew-ahead", true)]
        {
            let mut worker = setup.worker(offset).await;
            let Acquired::Granted(grant) = worker.acquire(lock, ttl, Duration::ZERO).await.unwrap()
            else {
                panic!("the lock was free");
            };
            assert_skewed(grant.requested, ahead);
            match worker.hold(ttl * 3 + ttl / 2).await.unwrap() {
                WorkerState::Held { token, .. } => assert_eq!(token, grant.token),
                other => panic!("the {offset} client lost its renewed lease: {other:?}"),
            }
            assert!(matches!(
                setup.try_lock(lock).await,
                Err(Error::Contended { .. })
            ));
            assert_eq!(
                worker.release().await.unwrap(),
                Released::Released { token: grant.token }
            );
        }
    }
}
