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
/// whatever the statement may have granted, by owner, as if it had been applied.
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
