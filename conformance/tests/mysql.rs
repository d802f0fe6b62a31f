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
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use fencelock_conformance::harness::Server;
    use fencelock_conformance::resource::SharedResource;
    use fencelock_conformance::worker::{Acquired, Released, Worker, WorkerState};
    use fencelock_core::{AcquireRequest, Error, LockBackend, LockName};
    use fencelock_sql::MySqlBackend;
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
        server: fencelock_conformance::harness::MariaDb,
        dir: TempDir,
        resource: SharedResource,
        normal: MySqlBackend,
    }

    async fn setup() -> Setup {
        let server = super::start_mariadb().await;
        let dir = tempfile::tempdir().unwrap();
        let resource = SharedResource::open(dir.path().join("resource.db"))
            .await
            .unwrap();
        let normal = MySqlBackend::open(&server.url()).await.unwrap();
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
