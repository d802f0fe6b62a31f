//! Cancel safety for the SQL stores' acquire statement, written once.

use std::future::Future;

use fencelock_core::OwnerId;
use sqlx::Database;
use sqlx::pool::PoolConnection;

/// What a backend does to undo a grant whose acquirer never saw it.
pub(crate) trait UndoAcquire: Clone + Send + Sync + 'static {
    /// The database the backend speaks.
    type Db: Database;

    /// The store's name, for logs.
    const STORE: &'static str;

    /// Frees the row `key` if `owner` holds it, on `conn`; whether it freed one.
    fn free_by_owner(
        &self,
        conn: &mut PoolConnection<Self::Db>,
        key: &str,
        owner: &OwnerId,
    ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send;

    /// Wakes this process's waiters on `key`.
    fn wake(&self, key: &str);
}

/// An acquire statement whose outcome its caller has not seen yet. Dropped unsettled
/// (the acquire future was dropped mid-statement, or the statement failed), it frees
/// whatever the statement may have granted, by owner, as if it had been applied. A
/// statement the database rolled back (a lock conflict) is settled instead: it granted
/// nothing, and the undo would race the retry's grant, which has the same owner.
///
/// The cleanup runs on the same connection, which finishes the statement it undoes
/// before it runs the next, so it cannot overtake it.
pub(crate) struct InFlight<'a, B: UndoAcquire> {
    pub(crate) backend: &'a B,
    pub(crate) key: &'a str,
    pub(crate) owner: &'a OwnerId,
    pub(crate) conn: Option<PoolConnection<B::Db>>,
}

impl<B: UndoAcquire> InFlight<'_, B> {
    /// The connection the acquire statement runs on.
    pub(crate) fn connection(&mut self) -> &mut <B::Db as Database>::Connection {
        self.conn
            .as_deref_mut()
            .expect("the connection is taken only when settled or dropped")
    }

    /// The caller saw the outcome: nothing to undo.
    pub(crate) fn settle(mut self) {
        self.conn = None;
    }
}

impl<B: UndoAcquire> Drop for InFlight<'_, B> {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // Without a runtime the grant, if any, ends at its TTL.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let backend = self.backend.clone();
        let key = self.key.to_owned();
        let owner = self.owner.clone();
        runtime.spawn(async move {
            match backend.free_by_owner(&mut conn, &key, &owner).await {
                Ok(true) => {
                    tracing::debug!(
                        key,
                        store = B::STORE,
                        "freed a grant its acquirer never saw"
                    );
                    backend.wake(&key);
                }
                Ok(false) => {}
                Err(err) => tracing::warn!(
                    key,
                    store = B::STORE,
                    error = %err,
                    "could not free an unseen grant; it ends at its TTL"
                ),
            }
        });
    }
}

/// The longest a dropped session-mode wait's cleanup may block its dropper.
#[cfg(any(feature = "postgres", feature = "mysql"))]
const END_WAIT_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `end`, which ends the server session of a dropped session-mode wait, before
/// returning where possible: on a multi-threaded tokio runtime the dropping thread
/// blocks (at most 5 s) until it is done, so the dropped waiter's place in the
/// server's queue is gone before the code that dropped it goes on (a release right
/// after must not grant the lock to nobody). On a current-thread runtime it can only
/// be spawned; outside a runtime it cannot run at all (the closed socket then ends
/// the session once the server writes to it).
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) fn end_dropped_wait<F>(store: &'static str, end: F)
where
    F: Future<Output = Result<(), sqlx::Error>> + Send + 'static,
{
    use tokio::runtime::{Handle, RuntimeFlavor};
    let Ok(runtime) = Handle::try_current() else {
        return;
    };
    let bounded = async move {
        match tokio::time::timeout(END_WAIT_WITHIN, end).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(
                store,
                %err,
                "could not end the server session of a cancelled lock wait; the server \
                 ends it when it next writes to the closed connection"
            ),
            Err(_) => tracing::warn!(
                store,
                "ending the server session of a cancelled lock wait took over {END_WAIT_WITHIN:?}"
            ),
        }
    };
    if runtime.runtime_flavor() == RuntimeFlavor::MultiThread {
        // A runtime that is shutting down (dropping its tasks, this wait among them)
        // panics at the first timer or connection: then the closed socket has to do.
        let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tokio::task::block_in_place(|| runtime.block_on(bounded));
        }));
        if ended.is_err() {
            tracing::debug!(
                store,
                "no cleanup of a cancelled lock wait: runtime shutting down"
            );
        }
    } else {
        runtime.spawn(bounded);
    }
}
