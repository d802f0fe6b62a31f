//! A singleton job: five instances of a "nightly report" start at once (as five
//! replicas of a service would); exactly one runs it, the others see it taken and
//! skip. `with_lock` drops the job the moment the lock is lost.
//!
//!     cargo run -p fencelock-examples --example singleton_job
//!
//! Set `FENCELOCK_URL` to run it on another store.

use std::time::Duration;

use fencelock::HeldLock;

/// The job itself. It receives the held lock so every write can carry the token.
async fn nightly_report(replica: usize, lock: HeldLock) -> usize {
    println!(
        "replica {replica}: running the report with token {}",
        lock.token()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    replica
}

#[tokio::main]
async fn main() -> fencelock::Result<()> {
    let url = std::env::var("FENCELOCK_URL").unwrap_or_else(|_| {
        format!(
            "sqlite://{}",
            std::env::temp_dir()
                .join("fencelock-singleton.db")
                .display()
        )
    });
    let mut replicas = Vec::new();
    for replica in 1..=5 {
        let locker = fencelock::connect(&url).await?;
        replicas.push(tokio::spawn(async move {
            // No waiting: if another replica has it, this one's work is already done.
            let result = locker
                .lock("jobs/nightly-report")
                .ttl(Duration::from_secs(10))
                .no_wait()
                .run(|lock| nightly_report(replica, lock))
                .await;
            match &result {
                Ok(_) => println!("replica {replica}: done"),
                Err(fencelock::Error::Contended { .. }) => {
                    println!("replica {replica}: another replica runs it; skipping")
                }
                Err(err) => println!("replica {replica}: {err}"),
            }
            result.is_ok()
        }));
    }
    let mut ran = 0;
    for replica in replicas {
        ran += usize::from(replica.await.expect("replica task"));
    }
    println!("{ran} replica ran the job");
    Ok(())
}
