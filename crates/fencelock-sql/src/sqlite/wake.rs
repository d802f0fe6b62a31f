//! In-process wake-ups: a release in this process wakes this process's waiters on the
//! same name at once, instead of at their next poll.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::Notify;

/// One [`Notify`] per row key that has waiters; entries go when the last waiter does.
#[derive(Debug, Default)]
pub(crate) struct Wakers {
    by_key: Mutex<HashMap<String, Weak<Notify>>>,
}

impl Wakers {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Weak<Notify>>> {
        // Every update is one map insert or remove: poisoning leaves nothing half-done.
        self.by_key.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a waiter on `key` until the returned value is dropped.
    pub(crate) fn join(&self, key: &str) -> Waiter<'_> {
        let mut by_key = self.lock();
        let notify = match by_key.get(key).and_then(Weak::upgrade) {
            Some(notify) => notify,
            None => {
                let notify = Arc::new(Notify::new());
                by_key.insert(key.to_owned(), Arc::downgrade(&notify));
                notify
            }
        };
        Waiter {
            wakers: self,
            key: key.to_owned(),
            notify,
        }
    }

    /// Wakes every waiter on `key` whose `notified()` future exists now.
    pub(crate) fn wake(&self, key: &str) {
        // Notified under the lock, so no Arc outlives it and a leaving waiter's count
        // check below stays exact.
        if let Some(notify) = self.lock().get(key).and_then(Weak::upgrade) {
            notify.notify_waiters();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// A waiter's registration; its [`Notify`] fires when this process frees the name.
pub(crate) struct Waiter<'a> {
    wakers: &'a Wakers,
    key: String,
    pub(crate) notify: Arc<Notify>,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut by_key = self.wakers.lock();
        // Strong counts only grow under this lock, so 1 means we are the last waiter.
        if Arc::strong_count(&self.notify) == 1 {
            by_key.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_wake_reaches_the_waiters_on_its_key_only_and_the_last_waiter_cleans_up() {
        let wakers = Wakers::default();
        let a = wakers.join("k");
        let b = wakers.join("k");
        let other = wakers.join("other");
        assert_eq!(wakers.len(), 2);
        let (na, nb) = (a.notify.notified(), b.notify.notified());
        let nother = other.notify.notified();
        wakers.wake("k");
        tokio::time::timeout(Duration::from_secs(1), async {
            na.await;
            nb.await;
        })
        .await
        .expect("both waiters on `k` were woken");
        assert!(
            tokio::time::timeout(Duration::from_millis(20), nother)
                .await
                .is_err(),
            "a waiter on another key was woken"
        );
        drop((a, b));
        assert_eq!(
            wakers.len(),
            1,
            "the entry for `k` left with its last waiter"
        );
        drop(other);
        assert_eq!(wakers.len(), 0);
    }
}
