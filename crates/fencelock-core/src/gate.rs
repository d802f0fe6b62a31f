//! The resource side of fencing: refuse writes from holders whose lock was taken over.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::{Error, FencingToken, Result};

/// Guards a resource against writers whose lock was lost.
///
/// Each writer passes the fencing token of its grant; the gate admits a token that is
/// not lower than the highest it has admitted for that resource (the same holder may
/// write many times) and records it, and refuses a lower one.
#[async_trait]
pub trait FenceGate: Send + Sync + Debug {
    /// Admits `token` for `resource` and records it as the highest if it is.
    ///
    /// # Errors
    /// [`Error::StaleToken`] if a higher token was already admitted for `resource`;
    /// store errors for gates kept in a store.
    async fn admit(&self, resource: &str, token: FencingToken) -> Result<()>;
}

/// A fence gate in process memory, for resources that live in this process and for
/// tests. Clones share one table.
#[derive(Clone, Debug, Default)]
pub struct MemoryFenceGate {
    highest: Arc<Mutex<HashMap<String, FencingToken>>>,
}

impl MemoryFenceGate {
    /// An empty gate.
    pub fn new() -> Self {
        Self::default()
    }

    /// The check of [`FenceGate::admit`], without an `await`.
    ///
    /// # Errors
    /// [`Error::StaleToken`] if a higher token was already admitted for `resource`.
    pub fn admit_now(&self, resource: &str, token: FencingToken) -> Result<()> {
        let mut highest = self.highest.lock().unwrap_or_else(|p| p.into_inner());
        match highest.get(resource) {
            Some(&seen) if seen > token => Err(Error::StaleToken {
                resource: resource.to_owned(),
                token,
                highest: seen,
            }),
            _ => {
                highest.insert(resource.to_owned(), token);
                Ok(())
            }
        }
    }

    /// The highest token admitted for `resource`.
    pub fn highest(&self, resource: &str) -> Option<FencingToken> {
        self.highest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(resource)
            .copied()
    }
}

#[async_trait]
impl FenceGate for MemoryFenceGate {
    async fn admit(&self, resource: &str, token: FencingToken) -> Result<()> {
        self.admit_now(resource, token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_equal_and_higher_tokens_and_refuses_lower_ones_per_resource() {
        let gate = MemoryFenceGate::new();
        gate.admit_now("a", FencingToken(5)).unwrap();
        gate.admit_now("a", FencingToken(5)).unwrap();
        gate.admit_now("b", FencingToken(1)).unwrap();
        let err = gate.admit_now("a", FencingToken(4)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::StaleToken {
                    token: FencingToken(4),
                    highest: FencingToken(5),
                    ..
                }
            ),
            "{err:?}"
        );
        gate.admit_now("a", FencingToken(9)).unwrap();
        assert_eq!(gate.highest("a"), Some(FencingToken(9)));
    }
}
