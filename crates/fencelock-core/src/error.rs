//! The one error type of fencelock.

use std::fmt;
use std::time::Duration;

use crate::{FencingToken, LockName};

/// A boxed error from a store's client library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with fencelock's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when taking, keeping or using a lock.
///
/// Messages name the lock, the store and what to do next. Decide on retries with
/// [`Error::is_temporary`], never by matching message text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Someone else holds the lock and the request did not wait.
    #[error(
        "lock `{name}` on {store} is held by another owner; wait for it (`.wait(..)`) or try again later"
    )]
    Contended {
        /// The lock.
        name: LockName,
        /// The store it lives in.
        store: &'static str,
    },
    /// The lock stayed held for the whole wait.
    #[error(
        "gave up on lock `{name}` on {store} after waiting {waited:?}; wait longer or find the holder with `inspect`"
    )]
    Timeout {
        /// The lock.
        name: LockName,
        /// The store it lives in.
        store: &'static str,
        /// How long the request waited.
        waited: Duration,
    },
    /// The lease is no longer ours: stop the work it protects.
    #[error(
        "lock `{name}` on {store} (token {token}) was lost: {reason}; stop writing: writes fenced with this token will be refused"
    )]
    Lost {
        /// The lock.
        name: LockName,
        /// The store it lived in.
        store: &'static str,
        /// The token of the lost grant.
        token: FencingToken,
        /// Why it counts as lost.
        reason: LossReason,
    },
    /// A fence gate refused a token lower than one it already admitted.
    #[error(
        "token {token} for resource `{resource}` is stale: token {highest} was already admitted, so this writer's lock was lost and taken over; stop and re-acquire"
    )]
    StaleToken {
        /// The fenced resource.
        resource: String,
        /// The refused token.
        token: FencingToken,
        /// The highest token admitted so far.
        highest: FencingToken,
    },
    /// The lock name is not acceptable.
    #[error("invalid lock name {shown}: {problem}; use 1 to 256 bytes of UTF-8 without NUL")]
    InvalidName {
        /// The rejected name, escaped and shortened for display.
        shown: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A URL, option or argument is wrong; the message says which and how to fix it.
    #[error("{message}")]
    Config {
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The store cannot do what was asked.
    #[error("{store} does not support {what}")]
    Unsupported {
        /// The store.
        store: &'static str,
        /// What it cannot do.
        what: String,
    },
    /// The store or the connection to it failed.
    #[error("{store}: {context} failed: {source} ({})", if *temporary {
        "temporary: retrying may succeed"
    } else {
        "not temporary: check the store's URL, credentials and health"
    })]
    Backend {
        /// The store.
        store: &'static str,
        /// What was being done, e.g. "acquire `orders/42`".
        context: String,
        /// Whether the same request may succeed later.
        temporary: bool,
        /// The client library's error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// Whether retrying the same request later may succeed.
    ///
    /// True for [`Error::Contended`], [`Error::Timeout`] and temporary backend errors;
    /// false for everything a retry cannot fix.
    pub fn is_temporary(&self) -> bool {
        match self {
            Error::Contended { .. } | Error::Timeout { .. } => true,
            Error::Backend { temporary, .. } => *temporary,
            _ => false,
        }
    }

    /// A [`Error::Config`] with `message`.
    pub fn config(message: impl Into<String>) -> Self {
        Error::Config {
            message: message.into(),
        }
    }

    /// A [`Error::Backend`] from a client library's error.
    pub fn backend(
        store: &'static str,
        context: impl Into<String>,
        temporary: bool,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Backend {
            store,
            context: context.into(),
            temporary,
            source: source.into(),
        }
    }

    /// Whether this is [`Error::Lost`].
    pub fn is_lost(&self) -> bool {
        matches!(self, Error::Lost { .. })
    }
}

/// Why a lease counts as lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LossReason {
    /// The store no longer holds this owner's grant: it expired, was taken over or
    /// was deleted by someone else.
    NotOurs,
    /// The lease's validity ran out before a renewal succeeded.
    Expired,
    /// `max_hold` was reached, so renewals stopped and the lease ran out.
    MaxHoldReached,
    /// The store session that carried the grant ended.
    SessionEnded,
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LossReason::NotOurs => {
                "the store no longer holds it for this owner (expired, taken over or deleted)"
            }
            LossReason::Expired => "its validity ran out before a renewal succeeded",
            LossReason::MaxHoldReached => "max_hold was reached, so renewal stopped",
            LossReason::SessionEnded => "the store session that carried it ended",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_errors_are_exactly_contention_timeouts_and_temporary_backend_failures() {
        let name = LockName::new("n").unwrap();
        let io = || std::io::Error::other("boom");
        assert!(
            Error::Contended {
                name: name.clone(),
                store: "memory"
            }
            .is_temporary()
        );
        assert!(
            Error::Timeout {
                name: name.clone(),
                store: "memory",
                waited: Duration::ZERO
            }
            .is_temporary()
        );
        assert!(Error::backend("sqlite", "acquire `n`", true, io()).is_temporary());
        assert!(!Error::backend("sqlite", "acquire `n`", false, io()).is_temporary());
        assert!(!Error::config("bad").is_temporary());
        let lost = Error::Lost {
            name,
            store: "memory",
            token: FencingToken(3),
            reason: LossReason::Expired,
        };
        assert!(!lost.is_temporary() && lost.is_lost());
    }

    #[test]
    fn messages_name_the_lock_the_store_and_the_next_step() {
        let name = LockName::new("orders/42").unwrap();
        let text = Error::Contended {
            name: name.clone(),
            store: "sqlite",
        }
        .to_string();
        assert!(
            text.contains("orders/42") && text.contains("sqlite") && text.contains("wait"),
            "{text}"
        );
        let text = Error::backend(
            "sqlite",
            "acquire `orders/42`",
            true,
            std::io::Error::other("busy"),
        )
        .to_string();
        assert!(
            text.contains("acquire `orders/42`")
                && text.contains("busy")
                && text.contains("retrying"),
            "{text}"
        );
    }
}
