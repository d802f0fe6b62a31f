//! Waking waiters on release: one pub/sub connection per backend receives every release
//! published under its prefix (the channel `{prefix}released`, the name as payload)
//! and wakes this process's waiters on that name.
//!
//! Public for the Redlock driver (one listener per node); not part of the stable API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::RedisResult;
use redis::aio::PubSubStream;
use tokio::sync::Notify;

/// The first pause before resubscribing after the pub/sub connection dropped.
const FIRST_PAUSE: Duration = Duration::from_millis(50);
/// The longest pause between two resubscription attempts.
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// One [`Notify`] per lock name that has waiters in this process; an entry goes when
/// its last waiter does.
#[derive(Debug, Default)]
pub struct Wakers {
    by_name: Mutex<HashMap<String, Weak<Notify>>>,
}

impl Wakers {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Weak<Notify>>> {
        // Every update is one map insert or remove: poisoning leaves nothing half-done.
        self.by_name.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a waiter on `name` until the returned value is dropped. Register
    /// before the attempt that may fail, so a release right after it is not missed.
    pub fn join(&self, name: &str) -> Waiter<'_> {
        let mut by_name = self.lock();
        let notify = match by_name.get(name).and_then(Weak::upgrade) {
            Some(notify) => notify,
            None => {
                let notify = Arc::new(Notify::new());
                by_name.insert(name.to_owned(), Arc::downgrade(&notify));
                notify
            }
        };
        Waiter {
            wakers: self,
            name: name.to_owned(),
            notify,
        }
    }

    /// Wakes every waiter on `name` whose `notified()` future exists now.
    pub fn wake(&self, name: &str) {
        // Notified under the lock, so no Arc outlives it and a leaving waiter's count
        // check stays exact.
        if let Some(notify) = self.lock().get(name).and_then(Weak::upgrade) {
            notify.notify_waiters();
        }
    }

    /// Wakes every waiter, as after releases may have been missed.
    pub fn wake_all(&self) {
        for notify in self.lock().values().filter_map(Weak::upgrade) {
            notify.notify_waiters();
        }
    }

    /// How many names have waiters.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no name has waiters.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A waiter's registration; [`notify`](Self::notify) fires when the name is released.
#[derive(Debug)]
pub struct Waiter<'a> {
    wakers: &'a Wakers,
    name: String,
    notify: Arc<Notify>,
}

impl Waiter<'_> {
    /// Fires on a release of the name: create the `notified()` future before the
    /// attempt, await it after.
    pub fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut by_name = self.wakers.lock();
        // Strong counts only grow under this lock, so 1 means we are the last waiter.
        if Arc::strong_count(&self.notify) == 1 {
            by_name.remove(&self.name);
        }
    }
}

/// The background task that feeds one server's release messages to [`Wakers`]; it
/// resubscribes (with backoff up to 1 s) when the connection drops, then wakes every
/// waiter since releases published meanwhile were lost. Stops when dropped or when the
/// wakers are gone.
#[derive(Debug)]
pub struct WakeListener {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WakeListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WakeListener {
    /// Subscribes to `channel` now, so that every waiter registered after this returns
    /// hears every later release, then listens in the background.
    ///
    /// # Errors
    /// The subscription's failure, or a timeout after `connect_timeout`.
    pub async fn subscribe(
        client: redis::Client,
        channel: String,
        wakers: &Arc<Wakers>,
        connect_timeout: Duration,
    ) -> RedisResult<Self> {
        let first = subscribe(&client, &channel, connect_timeout).await?;
        Ok(Self::spawn(
            client,
            channel,
            wakers,
            connect_timeout,
            Some(first),
        ))
    }

    /// Listens in the background, subscribing first if `first` is `None` (for servers
    /// that may be down at the start).
    pub fn spawn(
        client: redis::Client,
        channel: String,
        wakers: &Arc<Wakers>,
        connect_timeout: Duration,
        first: Option<PubSubStream>,
    ) -> Self {
        let task = tokio::spawn(listen(
            client,
            channel,
            Arc::downgrade(wakers),
            connect_timeout,
            first,
        ));
        Self { task }
    }
}

async fn subscribe(
    client: &redis::Client,
    channel: &str,
    within: Duration,
) -> RedisResult<PubSubStream> {
    let subscribing = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok(pubsub.into_on_message())
    };
    tokio::time::timeout(within, subscribing)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no pub/sub subscription within {within:?}"),
            )))
        })
}

async fn listen(
    client: redis::Client,
    channel: String,
    wakers: Weak<Wakers>,
    connect_timeout: Duration,
    mut stream: Option<PubSubStream>,
) {
    let mut pause = FIRST_PAUSE;
    // Runs for as long as its backend lives (which aborts it on drop); each round
    // either reads a live subscription or waits before one attempt to resubscribe.
    loop {
        if let Some(mut messages) = stream.take() {
            while let Some(message) = messages.next().await {
                let Some(wakers) = wakers.upgrade() else {
                    return;
                };
                if let Ok(name) = std::str::from_utf8(message.get_payload_bytes()) {
                    wakers.wake(name);
                }
            }
            tracing::debug!(channel, "fencelock pub/sub connection lost; resubscribing");
        }
        tokio::time::sleep(pause).await;
        if wakers.strong_count() == 0 {
            return;
        }
        match subscribe(&client, &channel, connect_timeout).await {
            Ok(messages) => {
                pause = FIRST_PAUSE;
                stream = Some(messages);
                if let Some(wakers) = wakers.upgrade() {
                    wakers.wake_all();
                }
            }
            Err(err) => {
                tracing::debug!(channel, error = %err, "fencelock pub/sub resubscription failed");
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wake_reaches_the_waiters_on_its_name_only_and_the_last_waiter_cleans_up() {
        let wakers = Wakers::default();
        let a = wakers.join("k");
        let b = wakers.join("k");
        let other = wakers.join("other");
        assert_eq!(wakers.len(), 2);
        let (na, nb) = (a.notify().notified(), b.notify().notified());
        let nother = other.notify().notified();
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
            "a waiter on another name was woken"
        );
        let nother = other.notify().notified();
        wakers.wake_all();
        tokio::time::timeout(Duration::from_secs(1), nother)
            .await
            .expect("wake_all reaches every name");
        drop((a, b));
        assert_eq!(
            wakers.len(),
            1,
            "the entry for `k` left with its last waiter"
        );
        drop(other);
        assert!(wakers.is_empty());
    }
}
