//! What a store can do, as data.

/// How a store wakes waiters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitKind {
    /// The store notifies waiters (pub/sub, watches, `LISTEN/NOTIFY`, in-process notify).
    Notify,
    /// Waiters poll with backoff capped by the holder's remaining time.
    Poll,
}

/// What keeps a grant alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseKind {
    /// A TTL the watchdog renews.
    Ttl,
    /// A session (etcd lease, ZooKeeper session, database connection).
    Session,
}

/// What a store can do; tests and the client branch on these, never on store names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// The store's name for messages, e.g. `"sqlite"`.
    pub store: &'static str,
    /// Grants carry fencing tokens that rise with every grant of a name.
    pub fencing: bool,
    /// Waiters are granted in arrival order.
    pub fifo: bool,
    /// How waiters are woken.
    pub wait: WaitKind,
    /// What keeps a grant alive.
    pub lease: LeaseKind,
    /// All holders see one store: grants survive a client's crash only until the TTL,
    /// and two clients of the store exclude each other. False only for stores local to
    /// one process (memory), which cannot be shared between processes.
    pub shared_between_processes: bool,
}
