//! Quickstart: four workers contend for one lock on the embedded SQLite default, each
//! grant prints its fencing token, and a holder that stalled past its lease has its
//! late write refused by the fence gate.
//!
//!     cargo run -p fencelock-examples --example quickstart
//!
//! Set `FENCELOCK_URL` to run the same program on another store.

use std::time::Duration;

use fencelock::{AcquireRequest, Error, LockName, MemoryFenceGate};

#[tokio::main]
async fn main() -> fencelock::Result<()> {
    let url = std::env::var("FENCELOCK_URL").unwrap_or_else(|_| {
        format!(
            "sqlite://{}",
            std::env::temp_dir()
                .join("fencelock-quickstart.db")
                .display()
        )
    });
    println!("store: {url}");
    // The resource we protect: it admits a token only if no higher one was seen.
    let gate = MemoryFenceGate::new();

    // Four workers, each with its own connection, as four processes would have.
    let mut workers = Vec::new();
    for id in 1..=4 {
        let locker = fencelock::connect(&url).await?;
        let gate = gate.clone();
        workers.push(tokio::spawn(async move {
            for _ in 0..2 {
                let guard = locker
                    .lock("quickstart/report")
                    .ttl(Duration::from_secs(10))
                    .wait(Duration::from_secs(30))
                    .await?;
                gate.admit_now("report", guard.token())?;
                println!("worker {id}: holds the lock with token {}", guard.token());
                tokio::time::sleep(Duration::from_millis(20)).await;
                guard.release().await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for worker in workers {
        worker.await.expect("worker task")?;
    }

    // A holder that stalls (GC pause, SIGSTOP) stops renewing; its lease runs out.
    let stalled = fencelock::connect(&url).await?;
    let name = LockName::new("quickstart/report")?;
    let old = stalled
        .backend()
        .acquire(AcquireRequest::new(name, Duration::from_millis(300))?)
        .await?;
    println!(
        "stalled holder: token {}, then pauses past its 300ms lease",
        old.token()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    let successor = fencelock::connect(&url).await?;
    let guard = successor
        .lock("quickstart/report")
        .wait(Duration::from_secs(5))
        .await?;
    gate.admit_now("report", guard.token())?;
    println!("successor: token {} written", guard.token());

    match gate.admit_now("report", old.token()) {
        Err(err @ Error::StaleToken { .. }) => {
            println!("stalled holder wakes and writes: refused: {err}")
        }
        other => panic!("a stale token must be refused, got {other:?}"),
    }
    guard.release().await?;
    Ok(())
}
