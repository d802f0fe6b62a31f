//! Release notifications: one `LISTEN` connection per backend wakes this backend's
//! waiters on the name a `NOTIFY` carries.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::task::AbortHandle;

use super::STORE;
use fencelock_core::wake::Wakers;

/// The listening task; stops when dropped.
#[derive(Debug)]
pub(crate) struct Listener {
    task: AbortHandle,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Listener {
    /// Listens on `channel` on a connection of `pool`, waking `wakers` by the key in
    /// each notification.
    pub(crate) async fn start(
        pool: &PgPool,
        channel: &str,
        wakers: Arc<Wakers>,
    ) -> Result<Self, sqlx::Error> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(channel).await?;
        let task = tokio::spawn(async move {
            let mut pause = Duration::from_millis(50);
            // Runs until the backend drops the Listener.
            loop {
                match listener.try_recv().await {
                    Ok(Some(notification)) => {
                        pause = Duration::from_millis(50);
                        wakers.wake(notification.payload());
                    }
                    Ok(None) => {
                        // The connection was lost and is re-established by the next
                        // call: notifications may have been missed meanwhile.
                        tracing::debug!(store = STORE, "release listener reconnecting");
                        wakers.wake_all();
                    }
                    Err(err) => {
                        tracing::warn!(
                            store = STORE,
                            error = %err,
                            "release listener failed; waiters fall back to polling until it reconnects"
                        );
                        wakers.wake_all();
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        Ok(Self {
            task: task.abort_handle(),
        })
    }
}
