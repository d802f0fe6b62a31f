//! The SQL text of the MySQL/MariaDB store. Every time in these statements is the
//! database's clock; no statement takes a client time as a parameter. Times and TTLs
//! are microseconds since the Unix epoch, from `UTC_TIMESTAMP(6)`: fixed for the whole
//! of one statement (so every use within a statement agrees) and independent of the
//! session's `time_zone`.
//!
//! A lease row is held iff `expires_at > now`; a release sets `owner = NULL,
//! expires_at = 0`. Rows are never deleted by the library: the `token` column is the
//! name's fencing counter and must outlive every release.
//!
//! MySQL has no `RETURNING` for `INSERT .. ON DUPLICATE KEY UPDATE` or `UPDATE`, so
//! the grant reports its token through `LAST_INSERT_ID(expr)`, which the server sends
//! back in the statement's OK packet: no second round trip.

/// The database's clock in microseconds since the Unix epoch.
const NOW: &str =
    "CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) AS SIGNED)";

/// The statements of one lease table. Table names are validated identifiers and
/// backquoted here.
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
            // Binary names: every byte counts, no collation folds case or trailing
            // spaces. The longest key is a 256-byte prefix plus a 256-byte name.
            create_table: format!(
                "CREATE TABLE IF NOT EXISTS `{table}` (
    name       VARBINARY(512) NOT NULL PRIMARY KEY,
    owner      VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
    token      BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
) ENGINE = InnoDB"
            ),
            // ? name, ? owner, ? ttl in µs. A new row seeds its counter from the clock
            // in µs (so tokens keep rising after the row or the database is lost) and
            // reports it through LAST_INSERT_ID. On a conflict the assignments run left
            // to right and later ones see earlier results, so every condition reads
            // only `expires_at`, which is assigned last. The grant sets LAST_INSERT_ID
            // to the new token, a refusal to 0.
            acquire: format!(
                "INSERT INTO `{table}` (name, owner, token, expires_at)
VALUES (?, ?, LAST_INSERT_ID({NOW}), {NOW} + ?)
ON DUPLICATE KEY UPDATE
    token = IF(expires_at <= {NOW}, LAST_INSERT_ID(token + 1), token + 0 * LAST_INSERT_ID(0)),
    owner = IF(expires_at <= {NOW}, VALUES(owner), owner),
    expires_at = IF(expires_at <= {NOW}, VALUES(expires_at), expires_at)"
            ),
            // ? name. The live holder and its remaining time in µs, or no row.
            holder: format!(
                "SELECT owner, token, expires_at - {NOW} FROM `{table}`
WHERE name = ? AND expires_at > {NOW}"
            ),
            // ? ttl in µs, ? name, ? owner, ? token.
            renew: format!(
                "UPDATE `{table}` SET expires_at = {NOW} + ?
WHERE name = ? AND owner = ? AND token = ? AND expires_at > {NOW}"
            ),
            // ? name, ? owner, ? token. Frees our row if it is still live; an expired
            // one is free already.
            release: format!(
                "UPDATE `{table}` SET owner = NULL, expires_at = 0
WHERE name = ? AND owner = ? AND token = ? AND expires_at > {NOW}"
            ),
            // ? name, ? owner. Undoes a grant whose reply never reached its caller.
            free_by_owner: format!(
                "UPDATE `{table}` SET owner = NULL, expires_at = 0 WHERE name = ? AND owner = ?"
            ),
            table: table.to_owned(),
        }
    }

    /// Renews `count` leases in one statement. Binds 4 values per lease, in order:
    /// name, owner, token, ttl in µs. Reports only how many rows it renewed.
    pub(crate) fn renew_many(&self, count: usize) -> String {
        let table = &self.table;
        let first = "SELECT ? AS name, ? AS owner, ? AS token, ? AS ttl";
        let rest = " UNION ALL SELECT ?, ?, ?, ?".repeat(count.saturating_sub(1));
        format!(
            "UPDATE `{table}` AS held JOIN ({first}{rest}) AS v
    ON held.name = v.name AND held.owner = v.owner AND held.token = v.token
SET held.expires_at = {NOW} + v.ttl
WHERE held.expires_at > {NOW}"
        )
    }

    /// The live rows among `count` names (bound in order), with owner and token: after
    /// a batch renewal that did not renew every lease, the ones it did renew.
    pub(crate) fn live_among(&self, count: usize) -> String {
        let table = &self.table;
        let names = vec!["?"; count].join(", ");
        format!(
            "SELECT name, owner, token FROM `{table}` WHERE name IN ({names}) AND expires_at > {NOW}"
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
                "CREATE TABLE IF NOT EXISTS `{table}` (
    resource VARBINARY(1024) NOT NULL PRIMARY KEY,
    token    BIGINT NOT NULL
) ENGINE = InnoDB"
            ),
            // ? resource, ? token. Stores the higher of the stored and the given token
            // and reports it through LAST_INSERT_ID: the token was admitted iff that
            // equals it. One statement, so it can ride in the caller's transaction,
            // where the row lock it takes orders concurrent writers until commit.
            admit: format!(
                "INSERT INTO `{table}` (resource, token) VALUES (?, LAST_INSERT_ID(?))
ON DUPLICATE KEY UPDATE token = LAST_INSERT_ID(GREATEST(token, VALUES(token)))"
            ),
            highest: format!("SELECT token FROM `{table}` WHERE resource = ?"),
        }
    }
}
