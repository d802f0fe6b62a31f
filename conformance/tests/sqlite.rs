//! The conformance suite against the SQLite store: every client is its own connection
//! pool on one database file, as separate processes would be.

use fencelock_conformance::SqliteFixture;

async fn fixture() -> SqliteFixture {
    SqliteFixture::new()
}

fencelock_conformance::conformance_tests!(fixture);
