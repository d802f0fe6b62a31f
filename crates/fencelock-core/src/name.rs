//! Validated lock names.

use std::fmt;
use std::sync::Arc;

use crate::{Error, Result};

/// The name of a lock: 1 to [`LockName::MAX_LEN`] bytes of UTF-8 without NUL.
///
/// Any other character is allowed (slashes, spaces, unicode); each store escapes the
/// name for its own keyspace, so two different names never map to one key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockName(Arc<str>);

impl LockName {
    /// The longest name accepted, in bytes.
    pub const MAX_LEN: usize = 256;

    /// Validates `name`.
    ///
    /// # Errors
    /// [`Error::InvalidName`] if it is empty, longer than [`Self::MAX_LEN`] bytes or
    /// contains a NUL byte.
    pub fn new(name: impl AsRef<str>) -> Result<Self> {
        let name = name.as_ref();
        let problem = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > Self::MAX_LEN {
            Some("it is longer than 256 bytes")
        } else if name.contains('\0') {
            Some("it contains a NUL byte")
        } else {
            None
        };
        match problem {
            Some(problem) => Err(Error::InvalidName {
                shown: shown(name),
                problem,
            }),
            None => Ok(Self(Arc::from(name))),
        }
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A short, escaped rendering of a rejected name for error messages.
fn shown(name: &str) -> String {
    const KEEP: usize = 48;
    let mut out: String = name
        .chars()
        .take(KEEP)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if name.chars().count() > KEEP {
        out.push_str("...");
    }
    format!("\"{out}\" ({} bytes)", name.len())
}

impl fmt::Display for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for LockName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for LockName {
    type Error = Error;
    fn try_from(value: &str) -> Result<Self> {
        Self::new(value)
    }
}

impl TryFrom<String> for LockName {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        Self::new(value)
    }
}

impl std::str::FromStr for LockName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_unicode_slashes_and_exactly_256_bytes() {
        assert_eq!(
            LockName::new("orders/42/änderung ✓").unwrap().as_str(),
            "orders/42/änderung ✓"
        );
        let max = "é".repeat(128);
        assert_eq!(max.len(), 256);
        assert!(LockName::new(&max).is_ok());
    }

    #[test]
    fn rejects_empty_nul_and_257_bytes_with_the_reason() {
        for (name, reason) in [
            (String::new(), "empty"),
            ("a\0b".to_string(), "NUL"),
            ("x".repeat(257), "longer than 256"),
        ] {
            let err = LockName::new(&name).unwrap_err();
            assert!(matches!(err, Error::InvalidName { .. }), "{err:?}");
            assert!(err.to_string().contains(reason), "{err}");
        }
    }

    #[test]
    fn error_text_of_a_long_name_is_truncated_and_escaped() {
        let err = LockName::new(format!("\0{}", "y".repeat(300)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\\0"), "{err}");
        assert!(err.contains("...") && err.len() < 300, "{err}");
    }
}
