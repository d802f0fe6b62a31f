//! The fault scenarios against the SQLite store (a temp file): holder processes
//! killed and paused, and an in-process run with a paused holder.
//!
//! The process-level scenarios need a store shared between processes; the memory
//! store lives in one process, so for it they are not applicable (shown below).

use std::path::Path;

use fencelock_conformance::suite::Verdict;
use fencelock_conformance::{MemoryFixture, SqliteFixture, faults};

const WORKER: &str = env!("CARGO_BIN_EXE_fencelock-worker");

async fn fixture() -> SqliteFixture {
    SqliteFixture::new()
}

fencelock_conformance::fault_tests!(fixture, WORKER);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_level_scenarios_do_not_apply_to_the_process_local_memory_store() {
    // Rule: a store that cannot be shared between processes is not put through
    // process-level faults; the scenarios say so instead of passing vacuously.
    let memory = MemoryFixture::new();
    let worker = Path::new(WORKER);
    assert!(matches!(
        faults::holder_killed_frees_the_lock_after_its_ttl(&memory, worker).await,
        Verdict::NotApplicable(_)
    ));
    assert!(matches!(
        faults::holder_paused_past_its_ttl_is_told_lost_and_fenced(&memory, worker).await,
        Verdict::NotApplicable(_)
    ));
}
