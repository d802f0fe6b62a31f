//! A loopback TCP proxy that a test puts between a client and a server, and switches
//! between faults at runtime.
//!
//! ```no_run
//! use std::time::Duration;
//! use fencelock_conformance::proxy::{Fault, FaultProxy};
//!
//! # async fn demo(server: std::net::SocketAddr) -> std::io::Result<()> {
//! let proxy = FaultProxy::start(server).await?;
//! // connect the client to proxy.addr(), then:
//! proxy.set(Fault::Delay(Duration::from_millis(200)));
//! proxy.set(Fault::DropReplies); // the server acts, the client never hears
//! proxy.set(Fault::Pass);
//! # Ok(())
//! # }
//! ```

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// What the proxy does to traffic; applies to existing and new connections alike.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Forward both ways unchanged.
    #[default]
    Pass,
    /// Forward both ways, each chunk held back this long from when it arrived; order
    /// is kept, so a round trip takes at least twice the delay.
    Delay(Duration),
    /// Accept and read, forward nothing either way; connections stay open.
    /// Clients accepted meanwhile reach the server once the fault changes.
    Blackhole,
    /// Forward client to server, discard everything the server sends back.
    DropReplies,
    /// Reset every open connection on both sides (RST, via `SO_LINGER` 0), and
    /// every new one as soon as it is accepted.
    Reset,
}

impl Fault {
    /// Whether traffic (data or a close) flows in `direction`.
    fn passes(self, direction: Direction) -> bool {
        match self {
            Fault::Pass | Fault::Delay(_) => true,
            Fault::DropReplies => direction == Direction::Requests,
            Fault::Blackhole | Fault::Reset => false,
        }
    }
}

/// Which way a chunk travels.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to server.
    Requests,
    /// Server to client.
    Replies,
}

/// A TCP proxy on `127.0.0.1` in front of one upstream server.
///
/// Runs on the tokio runtime it was started in; dropping it stops listening and
/// closes every connection. Switch faults with [`set`](Self::set) from any task or
/// thread (share it with an `Arc`).
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    fault: watch::Sender<Fault>,
    serving: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free `127.0.0.1` port and forwards to `upstream`, passing
    /// traffic unchanged until [`set`](Self::set) says otherwise.
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (fault, faults) = watch::channel(Fault::Pass);
        let serving = tokio::spawn(serve(listener, upstream, faults));
        Ok(Self {
            addr,
            fault,
            serving,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches to `fault` now, for open and new connections.
    pub fn set(&self, fault: Fault) {
        tracing::debug!(proxy = %self.addr, ?fault, "fault switched");
        self.fault.send_replace(fault);
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Drops the listener and, with the JoinSet, every connection task.
        self.serving.abort();
    }
}

async fn serve(listener: TcpListener, upstream: SocketAddr, faults: watch::Receiver<Fault>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    connections.spawn(relay(client, upstream, faults.clone()));
                }
                Err(e) => {
                    // Such as too many open files: back off instead of spinning.
                    tracing::warn!(%e, "fault proxy could not accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn relay(mut client: TcpStream, upstream: SocketAddr, mut faults: watch::Receiver<Fault>) {
    let fault = *faults.borrow();
    if fault == Fault::Blackhole && !sit_out_blackhole(&mut client, &mut faults).await {
        return;
    }
    if *faults.borrow() == Fault::Reset {
        return reset(client);
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return reset(client);
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let ended_cleanly = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let both_ways = async {
            tokio::try_join!(
                forward(
                    client_read,
                    server_write,
                    Direction::Requests,
                    faults.clone()
                ),
                forward(
                    server_read,
                    client_write,
                    Direction::Replies,
                    faults.clone()
                ),
            )
        };
        tokio::select! {
            result = both_ways => result.is_ok(),
            () = until_reset(faults.clone()) => false,
        }
    };
    // A reset, or an error on one side, resets both sides.
    if !ended_cleanly {
        reset(client);
        reset(server);
    }
}

/// Holds a client accepted during a blackhole, reading and discarding, until the
/// fault changes. False if the client left or the proxy is gone.
async fn sit_out_blackhole(client: &mut TcpStream, faults: &mut watch::Receiver<Fault>) -> bool {
    let mut discard = [0; 4096];
    loop {
        tokio::select! {
            changed = faults.wait_for(|fault| *fault != Fault::Blackhole) => {
                return changed.is_ok();
            }
            read = client.read(&mut discard) => {
                if matches!(read, Ok(0) | Err(_)) {
                    return false;
                }
            }
        }
    }
}

/// Copies `from` to `to` under the fault in force when each chunk arrives, then
/// half-closes `to` once `from` ends.
async fn forward<R, W>(
    mut from: R,
    mut to: W,
    direction: Direction,
    mut faults: watch::Receiver<Fault>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Chunks wait here until due, so a delay does not slow down reading.
    let (queue, mut queued) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0; 16 * 1024];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                // A close is traffic too: held while this direction is cut.
                let _ = faults.wait_for(|fault| fault.passes(direction)).await;
                return Ok::<_, io::Error>(());
            }
            let fault = *faults.borrow();
            let due = match fault {
                Fault::Delay(delay) => Instant::now() + delay,
                _ if fault.passes(direction) => Instant::now(),
                _ => continue,
            };
            // The writer only stops early on an error, which ends this copy anyway.
            let _ = queue.send((due, buf[..n].to_vec()));
        }
    };
    let write = async move {
        while let Some((due, chunk)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            to.write_all(&chunk).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(read, write).map(|_| ())
}

async fn until_reset(mut faults: watch::Receiver<Fault>) {
    if faults
        .wait_for(|fault| *fault == Fault::Reset)
        .await
        .is_err()
    {
        // The proxy is gone; its drop aborts this task.
        std::future::pending::<()>().await;
    }
}

/// Closes with RST rather than FIN.
fn reset(stream: TcpStream) {
    if let Err(e) = stream.set_zero_linger() {
        tracing::debug!(%e, "could not set SO_LINGER 0; closing normally");
    }
}
