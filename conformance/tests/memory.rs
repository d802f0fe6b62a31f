//! The conformance suite against the in-memory store.

use fencelock_conformance::MemoryFixture;

async fn fixture() -> MemoryFixture {
    MemoryFixture::new()
}

fencelock_conformance::conformance_tests!(fixture);
