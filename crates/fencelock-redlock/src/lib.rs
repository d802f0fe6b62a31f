//! fencelock's store on N independent Redis servers: the Redlock algorithm
//! ([`RedlockBackend`]), with fencing tokens kept by a majority max-register.
//!
//! Most users reach this crate through the `fencelock` facade
//! (`fencelock::connect("redlock://h1:6379,h2:6379,h3:6379")`).
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use fencelock_core::Locker;
//! use fencelock_redlock::{RedlockBackend, RedlockConfig};
//!
//! # async fn demo() -> fencelock_core::Result<()> {
//! let config = RedlockConfig::from_url("redlock://10.0.0.1:6379,10.0.0.2:6379,10.0.0.3:6379")?;
//! let locker = Locker::new(RedlockBackend::connect(config).await?);
//! let guard = locker.lock("nightly-report").ttl(Duration::from_secs(30)).await?;
//! println!("write with token {}", guard.token());
//! guard.release().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees and limits
//! **Mutual exclusion** is Redlock's: a grant needs claims on a majority (`N/2 + 1`)
//! of the nodes, made within the lease's validity `ttl − elapsed − (1 % of ttl +
//! 2 ms)`, where elapsed counts from before the first request was sent. Two holders
//! at once are prevented while (a) nodes keep their keys for the TTL (no restart
//! without persistence, no `FLUSHALL`, no eviction; a restarted node should stay
//! down for one TTL, or run with `appendfsync always`), (b) the clocks of the nodes
//! and the client run at about the same rate (1 % drift allowed), and (c) the holder
//! does not pause past its validity. A paused holder is exactly the case fencing
//! tokens are for.
//!
//! **Fencing tokens** rise, without any clock assumption **as long as the nodes keep
//! their data**, from each grant of a name to every grant made by an attempt that
//! started after that grant was returned. Each node keeps a counter per name that
//! never goes down. A claim granted on a node adds one to that counter in the same
//! script and stamps the claim with the new count; the token is the highest count
//! among the majority that granted the claims. Before the grant is returned, the token
//! is stored (counter at least the token) on a majority: either a majority counted
//! exactly the token, so their claims stored it (one round trip, the common case), or
//! a second phase raises the counters of a majority to it, each raise checking in the
//! same script that our claim is still there (a claim that already ended refuses the
//! grant). Any two majorities share a node; a later attempt's claim there comes after
//! the earlier grant was returned, so after its token was stored there, and counts
//! above it; the later token, the highest count of its majority, is at least that
//! count.
//!
//! Between grants whose attempts overlapped in time, the order also needs each claim
//! to last until its client decides, which is the clock assumption of mutual
//! exclusion (node clocks not running ahead of the client's, no key deleted): if the
//! claims of an attempt end while it waits for their replies (a node's clock jumped
//! ahead past the TTL), another client can claim, be granted and return meanwhile,
//! and the first attempt is then still granted, in one round, on the lower counts it
//! made before. No check closes this without that assumption: a claim can end between
//! a node's last answer and the decision, whatever that answer was (the raise only
//! narrows the window). A fence gate then orders the two holders' writes by token,
//! not by when their grants were returned.
//!
//! The raise must also land a node timeout before the validity ends (a margin of the
//! two-phase design, kept). The one-round grant needs no such margin beyond Redlock's
//! own validity check, since its count is written by the claim itself.
//!
//! When that shared node lost its data in between (restart without persistence), or
//! its counter expired ([`token_ttl`](RedlockConfig::token_ttl) after its last
//! claim), the guarantee weakens: a missing counter is seeded from the node's clock
//! in microseconds. A count then gains one per claim granted (or is raised to another
//! node's count, which gained the same way), and the claims of a name on a node follow
//! each other at most once per network round trip, far slower than one per
//! microsecond; so no token exceeds the reading of the clock that seeded its counter
//! at the time of its grant. The token still rises when the shared node's clock
//! reads later than that (true unless the nodes' clocks disagree by more than the
//! time between the two grants). When a majority of nodes lost their data at once,
//! mutual exclusion itself may fail, and tokens give only that clock-based ordering.
//!
//! Not FIFO. Waiting uses each node's release messages (pub/sub), the holders'
//! remaining time, and random pauses up to
//! [`retry_delay`](RedlockConfig::retry_delay) after split votes. Requests to the
//! nodes go out in parallel, each bounded by the node timeout (default
//! `min(50 ms, ttl/10)`); a failed attempt is released on every node before it is
//! retried. TLS is not built in yet.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod config;
mod node;

pub use backend::RedlockBackend;
pub use config::RedlockConfig;
pub use fencelock_redis::RedisNode;
