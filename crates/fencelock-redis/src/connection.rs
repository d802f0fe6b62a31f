//! Connecting to one server, checking it is fit for locks, and mapping its errors.
//!
//! Public for the Redlock driver (one connection per node); not part of the stable API.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use fencelock_core::{Error, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError};

use crate::{RedisNode, STORE};

/// How to reach one server.
#[derive(Clone, Copy, Debug)]
pub struct ConnectOptions {
    /// How long one command may take.
    pub timeout: Duration,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// Accept a `maxmemory-policy` that can evict keys, with a warning.
    pub allow_eviction: bool,
}

/// A redis-rs client for `node` (does not connect). With TLS, reads the PEM files it
/// names.
///
/// # Errors
/// [`Error::Config`] if redis-rs refuses the address, or a TLS file cannot be read or
/// parsed (naming the file and the URL option).
pub fn client(node: &RedisNode) -> Result<redis::Client> {
    let refused = |err: RedisError| {
        Error::config(format!(
            "cannot use the Redis server address {}: {err}",
            node.address()
        ))
    };
    #[cfg(feature = "tls")]
    if let Some(tls) = &node.tls {
        // redis-rs builds its rustls configuration from the process-wide provider; make
        // sure there is one (ring) unless the application installed its own.
        let _ = rustls::crypto::ring::default_provider().install_default();
        if tls.ca_file.is_none() && tls.cert_file.is_none() {
            return redis::Client::open(node.connection_info()).map_err(refused);
        }
        let root_cert = tls
            .ca_file
            .as_deref()
            .map(|path| read_pem(path, "ca", "the CA certificate to trust"))
            .transpose()?;
        let client_tls = match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read_pem(cert, "cert", "the client certificate")?,
                client_key: read_pem(key, "key", "the client certificate's key")?,
            }),
            _ => None,
        };
        let certificates = redis::TlsCertificates {
            client_tls,
            root_cert,
        };
        return redis::Client::build_with_tls(node.connection_info(), certificates).map_err(
            |err| {
                Error::config(format!(
                    "cannot use the TLS files given for {} (options ca, cert, key): {err}; give \
                     PEM files (-----BEGIN CERTIFICATE----- / -----BEGIN PRIVATE KEY-----)",
                    node.address()
                ))
            },
        );
    }
    redis::Client::open(node.connection_info()).map_err(refused)
}

/// Reads a PEM file named by URL option `option`.
#[cfg(feature = "tls")]
fn read_pem(path: &std::path::Path, option: &str, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|err| {
        Error::config(format!(
            "cannot read {what} `{}` (URL option `{option}`): {err}; give the path of a \
             readable PEM file",
            path.display()
        ))
    })
}

/// Connects to `node` with a connection that reconnects by itself after the server
/// restarts or the network drops, checks its eviction policy (see
/// [`check_eviction`]) and loads the scripts.
///
/// # Errors
/// [`Error::Backend`] (temporary) naming the address if it cannot be reached in
/// `connect_timeout`; [`Error::Config`] for an eviction policy that can free held
/// locks.
pub async fn connect(node: &RedisNode, options: ConnectOptions) -> Result<ConnectionManager> {
    let client = client(node)?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(options.timeout)
        .set_connection_timeout(options.connect_timeout)
        // Reconnection is retried by the next command; a command never waits long.
        .set_number_of_retries(1)
        .set_factor(50)
        .set_max_delay(500);
    let connecting = ConnectionManager::new_with_config(client, config);
    let mut conn = match tokio::time::timeout(options.connect_timeout, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(err)) => return Err(unreachable(node, err)),
        Err(_) => {
            return Err(unreachable(
                node,
                RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", options.connect_timeout),
                )),
            ));
        }
    };
    check_version(&mut conn, node).await?;
    check_eviction(&mut conn, node, options.allow_eviction).await?;
    crate::scripts::load_all(&conn).await.map_err(|err| {
        backend_error(
            format!("load the lock scripts into {}", node.address()),
            err,
        )
    })?;
    Ok(conn)
}

/// The oldest server the scripts run on: the acquire script swaps the token counter
/// with `SET … GET`, new in Redis 6.2.
pub const MIN_VERSION: (u32, u32) = (6, 2);

/// Fails if `node` is older than [`MIN_VERSION`] (by `redis_version` in `INFO server`;
/// Valkey and other servers that speak the protocol report a compatible version there).
/// A server that refuses `INFO` gets a warning and is used as is.
///
/// # Errors
/// [`Error::Config`] naming the version found and the one needed; a backend error if
/// the server cannot be reached.
pub async fn check_version(conn: &mut ConnectionManager, node: &RedisNode) -> Result<()> {
    let address = node.address();
    let info: String = match redis::cmd("INFO").arg("server").query_async(conn).await {
        Ok(info) => info,
        Err(err) if is_server_refusal(&err) => {
            tracing::warn!(
                server = %address,
                error = %err,
                "cannot read the version of this Redis server (INFO is not allowed);                  fencelock needs Redis 6.2 or later"
            );
            return Ok(());
        }
        Err(err) => {
            return Err(backend_error(format!("read the version of {address}"), err));
        }
    };
    let Some(version) = info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .map(str::trim)
    else {
        return Ok(());
    };
    if version_at_least(version, MIN_VERSION) {
        return Ok(());
    }
    Err(Error::config(format!(
        "the Redis server at {address} is version {version}; fencelock needs Redis {}.{} or          later (its acquire script uses `SET … GET`): upgrade the server",
        MIN_VERSION.0, MIN_VERSION.1
    )))
}

/// Whether a `major.minor.patch` version is at least `(major, minor)`; an unreadable
/// one passes (the scripts then fail with the server's own error).
fn version_at_least(version: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = version.split('.').map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(found_major)), Some(Ok(found_minor))) => {
            (found_major, found_minor) >= (major, minor)
        }
        _ => true,
    }
}

/// Fails if `node` may evict keys (`maxmemory` set and a `maxmemory-policy` other than
/// `noeviction`: even `volatile-*` policies evict lock keys, which all have a TTL),
/// or only warns when `allow_eviction`. A server that refuses `CONFIG` (managed Redis)
/// gets a warning and is used as is.
///
/// # Errors
/// [`Error::Config`] naming the policy and the fix; a backend error if the server
/// cannot be reached.
pub async fn check_eviction(
    conn: &mut ConnectionManager,
    node: &RedisNode,
    allow_eviction: bool,
) -> Result<()> {
    let address = node.address();
    let reply: redis::RedisResult<HashMap<String, String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory*")
        .query_async(conn)
        .await;
    let settings = match reply {
        Ok(settings) => settings,
        Err(err) if is_server_refusal(&err) => {
            tracing::warn!(
                server = %address,
                error = %err,
                "cannot read the eviction policy of this Redis server (CONFIG is not allowed); \
                 make sure its maxmemory-policy is noeviction, or held locks may vanish"
            );
            return Ok(());
        }
        Err(err) => {
            return Err(backend_error(
                format!("read the settings of {address}"),
                err,
            ));
        }
    };
    let policy = settings
        .get("maxmemory-policy")
        .map_or("noeviction", String::as_str);
    let maxmemory: u64 = settings
        .get("maxmemory")
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if maxmemory == 0 || policy == "noeviction" {
        return Ok(());
    }
    let problem = format!(
        "the Redis server at {address} has maxmemory {maxmemory} bytes with maxmemory-policy \
         `{policy}`, so it may evict lock keys under memory pressure and silently free held \
         locks"
    );
    if allow_eviction {
        tracing::warn!(server = %address, policy, maxmemory, "{problem} (allowed by allow_eviction=true)");
        return Ok(());
    }
    Err(Error::config(format!(
        "{problem}; run `CONFIG SET maxmemory-policy noeviction` (and set it in redis.conf), \
         use a server of its own for locks, or accept the risk with the URL option \
         allow_eviction=true"
    )))
}

/// A [`Error::Backend`] for `context` (e.g. "acquire `a` on 127.0.0.1:6379").
pub fn backend_error(context: String, err: RedisError) -> Error {
    let temporary = is_temporary(&err);
    Error::backend(STORE, context, temporary, err)
}

/// Whether retrying may succeed: network failures and timeouts, and the server's
/// "busy/loading/try again" replies.
pub fn is_temporary(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || matches!(
            err.kind(),
            ErrorKind::BusyLoadingError
                | ErrorKind::TryAgain
                | ErrorKind::MasterDown
                | ErrorKind::ClusterDown
                | ErrorKind::ReadOnly
        )
        || err.code() == Some("BUSY")
}

/// Whether the server answered with an error reply (as opposed to a network failure).
fn is_server_refusal(err: &RedisError) -> bool {
    !err.is_io_error() && err.code().is_some()
}

/// The error for a failed connect: a server that could not be reached is temporary and
/// the message says to check it; a refused login says to check the credentials.
fn unreachable(node: &RedisNode, err: RedisError) -> Error {
    let address = node.address();
    if err.kind() == ErrorKind::AuthenticationFailed {
        return backend_error(
            format!("log in to {address} (check the user name and password of the URL)"),
            err,
        );
    }
    if !(err.is_io_error() || err.kind() == ErrorKind::ClientError) {
        return backend_error(format!("connect to {address}"), err);
    }
    Error::backend(
        STORE,
        format!("connect to {address}"),
        true,
        Unreachable {
            address,
            tls: node.tls.is_some(),
            err,
        },
    )
}

/// A connection failure with the hint to check the server.
#[derive(Debug)]
struct Unreachable {
    address: String,
    tls: bool,
    err: RedisError,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}; check that the Redis server at {} is running and reachable",
            self.err, self.address
        )?;
        if self.tls {
            write!(
                f,
                ", that it speaks TLS on this port, and that its certificate is valid for this \
                 host name and signed by a CA you trust (URL option `ca`)"
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Unreachable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_before_6_2_are_too_old() {
        for old in ["5.0.14", "6.0.20", "6.1.0"] {
            assert!(!version_at_least(old, MIN_VERSION), "{old}");
        }
        for new in ["6.2.0", "6.2.14", "7.0.15", "7.2.4", "8.0.1", "10.0.0"] {
            assert!(version_at_least(new, MIN_VERSION), "{new}");
        }
        assert!(version_at_least("unknown", MIN_VERSION));
    }
}
