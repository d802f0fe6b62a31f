//! The same program on two stores: only the URL changes. Each URL given on the command
//! line (default: `memory://` and an SQLite file) runs the same contention scenario.
//!
//!     cargo run -p fencelock-examples --example two_stores
//!     cargo run -p fencelock-examples --example two_stores -- sqlite:///tmp/a.db memory://
//!
//! With the `redis` feature built in, `redis://127.0.0.1:6379/` works the same way.

use std::time::Duration;

use fencelock::{Locker, MemoryFenceGate};

/// Three workers take turns on one lock and write through a fence gate. Nothing in
/// here knows which store it runs on.
async fn contend(locker: Locker) -> fencelock::Result<Vec<u64>> {
    let gate = MemoryFenceGate::new();
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let guard = locker
            .lock("examples/two-stores")
            .ttl(Duration::from_secs(5))
            .wait(Duration::from_secs(5))
            .await?;
        gate.admit_now("ledger", guard.token())?;
        tokens.push(guard.token().0);
        guard.release().await?;
    }
    Ok(tokens)
}

#[tokio::main]
async fn main() -> fencelock::Result<()> {
    let mut urls: Vec<String> = std::env::args().skip(1).collect();
    if urls.is_empty() {
        urls = vec![
            "memory://".to_owned(),
            format!(
                "sqlite://{}",
                std::env::temp_dir()
                    .join("fencelock-two-stores.db")
                    .display()
            ),
        ];
    }
    for url in urls {
        let locker = fencelock::connect(&url).await?;
        let store = locker.capabilities().store;
        let tokens = contend(locker).await?;
        println!("{store:>8} ({url}): tokens {tokens:?}");
    }
    Ok(())
}
