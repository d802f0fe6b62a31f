//! Lease-mode scenarios with clients whose wall clocks are two hours off
//! (`faketime`), for the SQL stores whose expiry is the database's clock only: every
//! skewed client must see exactly what a client with a right clock sees. Run them all
//! with [`skew_tests!`](crate::skew_tests).

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fencelock_core::{AcquireRequest, Error, Lease, LockBackend, LockName, Result};
use tempfile::TempDir;
use tokio::time::Instant;

use crate::resource::SharedResource;
use crate::worker::{Acquired, Released, Worker, WorkerState};

/// The lease TTL of the scenarios that do not renew.
const TTL: Duration = Duration::from_secs(30);
/// How far off a skewed worker's reported times must be to prove its clock is off.
const SKEW_SEEN: Duration = Duration::from_secs(3600);

/// One store server, a shared resource and a backend with a right clock, for the
/// skewed workers to contend with.
pub struct SkewSetup {
    normal: Arc<dyn LockBackend>,
    resource: SharedResource,
    url: String,
    worker: PathBuf,
    dir: TempDir,
    _server: Box<dyn Any + Send + Sync>,
}

impl SkewSetup {
    /// A setup on `server` (kept alive as long as the setup), reached at `url`, with
    /// `normal` connected to it; skewed workers run the `worker` binary.
    ///
    /// # Panics
    /// If the temporary directory or the shared resource cannot be made (a test
    /// setup failure).
    pub async fn new(
        server: impl Any + Send + Sync,
        url: String,
        normal: Arc<dyn LockBackend>,
        worker: &Path,
    ) -> Self {
        let dir = tempfile::tempdir().expect("make a temporary directory");
        let resource = SharedResource::open(dir.path().join("resource.db"))
            .await
            .expect("open the shared resource");
        Self {
            normal,
            resource,
            url,
            worker: worker.to_owned(),
            dir,
            _server: Box::new(server),
        }
    }

    /// A worker process whose wall clock is `offset` (e.g. `-2h`) off.
    async fn skewed_worker(&self, offset: &str) -> Worker {
        let script = self.skewed_worker_script(offset);
        Worker::spawn(
            &script,
            &format!("skewed{offset}"),
            &self.url,
            self.resource.path(),
        )
        .await
        .expect("spawn a skewed worker")
    }

    /// A script that runs the worker under `faketime -f OFFSET`, with the monotonic
    /// clock left alone (timers and the lease's local validity stay right).
    fn skewed_worker_script(&self, offset: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let script = self.dir.path().join(format!("worker{offset}.sh"));
        let body = format!(
            "#!/bin/sh\nFAKETIME_DONT_FAKE_MONOTONIC=1 exec faketime -f '{offset}' '{}' \"$@\"\n",
            self.worker.display()
        );
        std::fs::write(&script, body).expect("write the worker script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .expect("make the worker script executable");
        script
    }

    async fn try_lock(&self, lock: &str) -> Result<Lease> {
        let name = LockName::new(lock).expect("a valid lock name");
        self.normal
            .acquire(AcquireRequest::new(name, TTL).expect("a valid request"))
            .await
    }
}

/// The worker's wall clock really is two hours away from ours: the times it reports
/// (its `SystemTime`, mapped to our clock) are over an hour off.
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

/// A client two hours behind is granted a lease that holds for the full TTL by the
/// database's clock, although by its own clock the lease ended long ago.
///
/// # Panics
/// When the rule is broken.
pub async fn a_client_two_hours_behind_holds_its_lease_for_the_full_ttl(setup: &SkewSetup) {
    let mut behind = setup.skewed_worker("-2h").await;
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

/// A client two hours ahead cannot take a held lease that its own clock calls expired.
///
/// # Panics
/// When the rule is broken.
pub async fn a_client_two_hours_ahead_cannot_take_a_lease_it_thinks_expired(setup: &SkewSetup) {
    let held = setup.try_lock("ahead").await.unwrap();
    let mut ahead = setup.skewed_worker("+2h").await;
    match ahead.acquire("ahead", TTL, Duration::ZERO).await.unwrap() {
        Acquired::Contended { requested, .. } => assert_skewed(requested, true),
        other => panic!("a held lock was granted to the +2h client: {other:?}"),
    }
    setup.normal.release(&held).await.unwrap();
}

/// Clients two hours behind and ahead keep their leases by renewing them, past three
/// TTLs.
///
/// # Panics
/// When the rule is broken.
pub async fn renewals_of_skewed_clients_keep_their_leases(setup: &SkewSetup) {
    // A short TTL, held for more than three of them: only renewals keep it.
    let ttl = Duration::from_secs(2);
    for (offset, lock, ahead) in [("-2h", "renew-behind", false), ("+2h", "renew-ahead", true)] {
        let mut worker = setup.skewed_worker(offset).await;
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

/// Expands to one `#[tokio::test]` per scenario of [`skew`](crate::skew), each on the
/// [`SkewSetup`](crate::skew::SkewSetup) that `$setup().await` returns (a fresh one
/// per test).
#[macro_export]
macro_rules! skew_tests {
    ($setup:path) => {
        $crate::skew_tests!(@each $setup;
            a_client_two_hours_behind_holds_its_lease_for_the_full_ttl,
            a_client_two_hours_ahead_cannot_take_a_lease_it_thinks_expired,
            renewals_of_skewed_clients_keep_their_leases,
        );
    };
    (@each $setup:path; $($scenario:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let setup = $setup().await;
                $crate::skew::$scenario(&setup).await;
            }
        )*
    };
}
