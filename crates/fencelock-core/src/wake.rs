//! In-process wake-ups for drivers: waiters on a name register here, and whatever
//! learns of a release (a local release, a pub/sub message, a `NOTIFY`, a watch)
//! wakes them at once instead of at their next poll.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::Notify;

/// One [`Notify`] per key (a lock name or a store key) that has waiters in this
/// process; an entry goes when its last waiter does.
#[derive(Debug, Default)]
pub struct Wakers {
    by_key: Mutex<HashMap<String, Weak<Notify>>>,
}

impl Wakers {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Weak<Notify>>> {
        // Every update is one map insert or remove: poisoning leaves nothing half-done.
        self.by_key.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a waiter on `key` until the returned value is dropped.
    ///
    /// Create the [`Notify::notified`] future of [`Waiter::notify`] *before* the
    /// attempt that may fail, and await it after: a wake in between is not missed.
    pub fn join(&self, key: &str) -> Waiter<'_> {
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
    pub fn wake(&self, key: &str) {
        // Notified under the lock, so no Arc outlives it and a leaving waiter's count
        // check stays exact.
        if let Some(notify) = self.lock().get(key).and_then(Weak::upgrade) {
            notify.notify_waiters();
        }
    }

    /// Wakes every waiter, as after a notification channel dropped and releases may
    /// have been missed.
    pub fn wake_all(&self) {
        for notify in self.lock().values().filter_map(Weak::upgrade) {
            notify.notify_waiters();
        }
    }

    /// How many keys have waiters.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no key has waiters.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A waiter's registration; [`notify`](Self::notify) fires when its key is woken.
#[derive(Debug)]
pub struct Waiter<'a> {
    wakers: &'a Wakers,
    key: String,
    notify: Arc<Notify>,
}

impl Waiter<'_> {
    /// Fires on a wake of the key: create the `notified()` future before the attempt,
    /// await it after.
    pub fn notify(&self) -> &Notify {
        &self.notify
    }
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
        {
            let other = wakers.join("other");
            let mut nother = std::pin::pin!(other.notify().notified());
            {
                let a = wakers.join("k");
                let b = wakers.join("k");
                assert_eq!(wakers.len(), 2);
                let (na, nb) = (a.notify().notified(), b.notify().notified());
                wakers.wake("k");
                tokio::time::timeout(Duration::from_secs(10), async {
                    na.await;
                    nb.await;
                })
                .await
                .expect("both waiters on `k` were woken");
                // `notify_waiters` wakes exactly the futures that existed when it ran
                // on that key: the other key's future is not among them.
                let woken = futures_util::FutureExt::now_or_never(nother.as_mut());
                assert!(woken.is_none(), "a waiter on another key was woken");
            }
            assert_eq!(
                wakers.len(),
                1,
                "the entry for `k` left with its last waiter"
            );
            wakers.wake_all();
            let woken = futures_util::FutureExt::now_or_never(nother.as_mut());
            assert!(woken.is_some(), "wake_all wakes every key");
        }
        assert!(wakers.is_empty());
    }
}
