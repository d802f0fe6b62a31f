//! The SQL text of the Postgres store. Every time in these statements is the
//! database's clock (`clock_timestamp()`, read once per statement); no statement takes
//! a client time as a parameter. Times and TTLs are microseconds since the Unix epoch.
//!
//! A lease row is held iff `owner IS NOT NULL AND expires_at > now`. Rows are never
//! deleted by the library: the `token` column is the name's fencing counter and must
//! outlive every release.

/// The database's clock, read once for the statement that starts with it.
const NOW: &str =
    "WITH now AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint AS us)";

/// The statements of one lease table. Table names are validated identifiers and
/// double-quoted here; the table's name is also the `NOTIFY` channel of releases.
#[derive(Debug)]
pub(crate) struct LeaseQueries {
    pub(crate) create_table: String,
    pub(crate) acquire: String,
    pub(crate) holder: String,
    pub(crate) renew: String,
    pub(crate) renew_many: String,
    pub(crate) release: String,
    pub(crate) free_by_owner: String,
}

impl LeaseQueries {
    pub(crate) fn new(table: &str) -> Self {
        Self {
            create_table: format!(
                r#"CREATE TABLE IF NOT EXISTS "{table}" (
    name       TEXT   NOT NULL PRIMARY KEY,
    owner      TEXT,
    token      BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
)"#
            ),
            // $1 name, $2 owner, $3 ttl in µs. Takes a free or expired row, or creates
            // it with a counter seeded from the clock in µs, so tokens keep rising after
            // the row (or the whole database) is lost.
            acquire: format!(
                r#"{NOW}
INSERT INTO "{table}" AS held (name, owner, token, expires_at)
SELECT $1, $2, now.us, now.us + $3 FROM now
ON CONFLICT (name) DO UPDATE
SET owner = excluded.owner, token = held.token + 1, expires_at = excluded.expires_at
WHERE held.owner IS NULL OR held.expires_at <= (SELECT us FROM now)
RETURNING token"#
            ),
            // $1 name. The live holder and its remaining time in µs, or no row.
            holder: format!(
                r#"{NOW}
SELECT owner, token, expires_at - now.us FROM "{table}", now
WHERE name = $1 AND owner IS NOT NULL AND expires_at > now.us"#
            ),
            // $1 name, $2 owner, $3 token, $4 ttl in µs.
            renew: format!(
                r#"{NOW}
UPDATE "{table}" SET expires_at = now.us + $4 FROM now
WHERE name = $1 AND owner = $2 AND token = $3 AND expires_at > now.us"#
            ),
            // $1 names, $2 owners, $3 tokens, $4 ttls in µs, as arrays of one length.
            // One statement for a whole watchdog tick; returns each renewed row.
            renew_many: format!(
                r#"{NOW}
UPDATE "{table}" AS held SET expires_at = now.us + v.ttl
FROM now, unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS v(name, owner, token, ttl)
WHERE held.name = v.name AND held.owner = v.owner AND held.token = v.token
  AND held.expires_at > now.us
RETURNING held.name, held.owner, held.token"#
            ),
            // $1 name, $2 owner, $3 token. Frees our row whether or not it expired,
            // says whether it was still live, and notifies the waiters on the name
            // (delivered when the statement commits). `expires_at` is left as it was:
            // `owner IS NULL` alone marks the row free.
            release: format!(
                r#"{NOW}, freed AS (
    UPDATE "{table}" SET owner = NULL
    WHERE name = $1 AND owner = $2 AND token = $3
    RETURNING expires_at
)
SELECT freed.expires_at > now.us, pg_notify('{table}', $1)::text FROM freed, now"#
            ),
            // $1 name, $2 owner. Undoes a grant whose reply never reached its caller.
            free_by_owner: format!(
                r#"WITH freed AS (
    UPDATE "{table}" SET owner = NULL WHERE name = $1 AND owner = $2 RETURNING name
)
SELECT pg_notify('{table}', name)::text FROM freed"#
            ),
        }
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
    resource TEXT   NOT NULL PRIMARY KEY,
    token    BIGINT NOT NULL
)"#
            ),
            // $1 resource, $2 token. Stores the higher of the stored and the given token
            // and returns it: the token was admitted iff the result equals it. One
            // statement, so it can ride in the caller's transaction, where the row lock
            // it takes orders concurrent writers until commit.
            admit: format!(
                r#"INSERT INTO "{table}" AS gate (resource, token) VALUES ($1, $2)
ON CONFLICT (resource) DO UPDATE SET token = GREATEST(gate.token, excluded.token)
RETURNING token"#
            ),
            highest: format!(r#"SELECT token FROM "{table}" WHERE resource = $1"#),
        }
    }
}
