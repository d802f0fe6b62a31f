//! The SQL text of the SQLite store. Every time in these statements is the database's
//! clock; no statement takes a client time as a parameter.
//!
//! A lease row is held iff `owner IS NOT NULL AND expires_at > now`. Rows are never
//! deleted by the library: the `token` column is the name's fencing counter and must
//! outlive every release.

/// The database's clock in milliseconds since the Unix epoch. SQLite fixes `'now'` for
/// the whole of one statement, so every use within a statement agrees.
const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

/// The database's clock in microseconds since the Unix epoch (SQLite reads the clock
/// with millisecond resolution, so this is a multiple of about 1000).
const NOW_US: &str = "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)";

/// The statements of one lease table, built once per backend. Table names are
/// validated identifiers and double-quoted here.
#[derive(Debug)]
pub(crate) struct LeaseQueries {
    pub(crate) create_table: String,
    pub(crate) acquire: String,
    pub(crate) holder: String,
    pub(crate) renew: String,
    pub(crate) release: String,
    pub(crate) free_by_owner: String,
    table: String,
}

impl LeaseQueries {
    pub(crate) fn new(table: &str) -> Self {
        Self {
            create_table: format!(
                r#"CREATE TABLE IF NOT EXISTS "{table}" (
    name       TEXT    NOT NULL PRIMARY KEY,
    owner      TEXT,
    token      INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
)"#
            ),
            // ?1 name, ?2 owner, ?3 ttl in ms. A new row seeds its counter from the
            // clock in µs so tokens keep rising after the row (or the file) is lost.
            acquire: format!(
                r#"INSERT INTO "{table}" (name, owner, token, expires_at)
VALUES (?1, ?2, {NOW_US}, {NOW_MS} + ?3)
ON CONFLICT (name) DO UPDATE
SET owner = excluded.owner, token = "{table}".token + 1, expires_at = excluded.expires_at
WHERE "{table}".owner IS NULL OR "{table}".expires_at <= {NOW_MS}
RETURNING token"#
            ),
            // ?1 name. The live holder and its remaining time in ms, or no row.
            holder: format!(
                r#"SELECT owner, token, expires_at - {NOW_MS} FROM "{table}"
WHERE name = ?1 AND owner IS NOT NULL AND expires_at > {NOW_MS}"#
            ),
            // ?1 name, ?2 owner, ?3 token, ?4 ttl in ms.
            renew: format!(
                r#"UPDATE "{table}" SET expires_at = {NOW_MS} + ?4
WHERE name = ?1 AND owner = ?2 AND token = ?3 AND expires_at > {NOW_MS}"#
            ),
            // ?1 name, ?2 owner, ?3 token. Frees our row whether or not it expired and
            // says whether it was still live. `expires_at` is left as it was because
            // RETURNING sees only the new row: `owner IS NULL` alone marks it free.
            release: format!(
                r#"UPDATE "{table}" SET owner = NULL
WHERE name = ?1 AND owner = ?2 AND token = ?3
RETURNING expires_at > {NOW_MS}"#
            ),
            // ?1 name, ?2 owner. Undoes a grant whose reply never reached its caller.
            free_by_owner: format!(
                r#"UPDATE "{table}" SET owner = NULL WHERE name = ?1 AND owner = ?2"#
            ),
            table: table.to_owned(),
        }
    }

    /// Renews `count` leases in one statement. Binds 4 values per lease, in order:
    /// name, owner, token, ttl in ms. Returns `name, owner, token` of each renewed row.
    pub(crate) fn renew_many(&self, count: usize) -> String {
        let table = &self.table;
        let values = vec!["(?, ?, ?, ?)"; count].join(", ");
        format!(
            r#"UPDATE "{table}" SET expires_at = {NOW_MS} + v.column4
FROM (VALUES {values}) AS v
WHERE "{table}".name = v.column1 AND "{table}".owner = v.column2
  AND "{table}".token = v.column3 AND "{table}".expires_at > {NOW_MS}
RETURNING name, owner, token"#
        )
    }
}

/// The statements of one fence-gate table.
#[derive(Debug)]
pub(crate) struct FenceQueries {
    pub(crate) create_table: String,
    pub(crate) admit: String,
    pub(crate) highest: String,
}

impl FenceQueries {
    pub(crate) fn new(table: &str) -> Self {
        Self {
            create_table: format!(
                r#"CREATE TABLE IF NOT EXISTS "{table}" (
    resource TEXT    NOT NULL PRIMARY KEY,
    token    INTEGER NOT NULL
)"#
            ),
            // ?1 resource, ?2 token. Stores the higher of the stored and the given token
            // and returns it: the token was admitted iff the result equals it. One
            // statement, so it can ride in the caller's transaction.
            admit: format!(
                r#"INSERT INTO "{table}" (resource, token) VALUES (?1, ?2)
ON CONFLICT (resource) DO UPDATE SET token = MAX("{table}".token, excluded.token)
RETURNING token"#
            ),
            highest: format!(r#"SELECT token FROM "{table}" WHERE resource = ?1"#),
        }
    }
}
