//! The fault proxy, each fault proven against a small echo server.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fencelock_conformance::proxy::{Fault, FaultProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// Long enough to trust that nothing is coming.
const SILENCE: Duration = Duration::from_millis(500);
/// Only a guard against hangs, never a rule.
const HANG_GUARD: Duration = Duration::from_secs(10);

/// An echo server that also records every byte it received.
struct Echo {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<u8>>>,
}

impl Echo {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&received);
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let mut buf = [0; 1024];
                    while let Ok(n @ 1..) = conn.read(&mut buf).await {
                        record.lock().unwrap().extend_from_slice(&buf[..n]);
                        if conn.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self { addr, received }
    }

    fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }
}

async fn proxied() -> (Echo, FaultProxy, TcpStream) {
    let echo = Echo::start().await;
    let proxy = FaultProxy::start(echo.addr).await.expect("start the proxy");
    let client = TcpStream::connect(proxy.addr()).await.expect("connect");
    (echo, proxy, client)
}

async fn round_trip(client: &mut TcpStream, message: &[u8]) -> Vec<u8> {
    client.write_all(message).await.expect("send");
    let mut reply = vec![0; message.len()];
    timeout(HANG_GUARD, client.read_exact(&mut reply))
        .await
        .expect("reply in time")
        .expect("reply");
    reply
}

/// Asserts that nothing arrives on `client` for [`SILENCE`].
async fn assert_silent(client: &mut TcpStream) {
    let mut buf = [0; 64];
    match timeout(SILENCE, client.read(&mut buf)).await {
        Err(_) => {}
        Ok(read) => panic!("expected silence, got {read:?} ({:?})", &buf[..4]),
    }
}

#[tokio::test]
async fn pass_forwards_both_ways() {
    //! Rule: under `Pass` the client talks to the server unchanged.
    let (echo, proxy, mut client) = proxied().await;
    assert_eq!(proxy.fault(), Fault::Pass);
    assert_eq!(round_trip(&mut client, b"hello").await, b"hello");
    assert_eq!(echo.received(), b"hello");
}

#[tokio::test]
async fn delay_holds_each_chunk_back_at_least_the_delay() {
    //! Rule: under `Delay(d)` a round trip takes at least 2·d (d each way), in order.
    let (_echo, proxy, mut client) = proxied().await;
    let delay = Duration::from_millis(200);
    proxy.set(Fault::Delay(delay));
    let sent = Instant::now();
    client.write_all(b"one").await.unwrap();
    client.write_all(b"two").await.unwrap();
    let mut reply = [0; 6];
    timeout(HANG_GUARD, client.read_exact(&mut reply))
        .await
        .expect("reply in time")
        .expect("reply");
    assert!(sent.elapsed() >= 2 * delay, "took {:?}", sent.elapsed());
    assert_eq!(&reply, b"onetwo");
}

#[tokio::test]
async fn blackhole_forwards_nothing_either_way_until_lifted() {
    //! Rule: under `Blackhole` nothing reaches the server or the client; lifting it restores traffic.
    let (echo, proxy, mut client) = proxied().await;
    let proxy = Arc::new(proxy);
    let switch = Arc::clone(&proxy);
    // Switchable from any thread.
    std::thread::spawn(move || switch.set(Fault::Blackhole))
        .join()
        .unwrap();
    client.write_all(b"lost").await.unwrap();
    assert_silent(&mut client).await;
    assert!(echo.received().is_empty(), "the server received a request");

    // A client accepted during the blackhole waits, then reaches the server.
    let mut late = TcpStream::connect(proxy.addr()).await.expect("connect");
    late.write_all(b"dropped").await.unwrap();
    assert_silent(&mut late).await;

    proxy.set(Fault::Pass);
    assert_eq!(round_trip(&mut client, b"back").await, b"back");
    assert_eq!(round_trip(&mut late, b"late").await, b"late");
    assert_eq!(echo.received(), b"backlate");
}

#[tokio::test]
async fn drop_replies_delivers_the_request_but_not_the_reply() {
    //! Rule: under `DropReplies` the server acts on the request and the client hears nothing.
    let (echo, proxy, mut client) = proxied().await;
    proxy.set(Fault::DropReplies);
    client.write_all(b"acted").await.unwrap();
    assert_silent(&mut client).await;
    let deadline = Instant::now() + HANG_GUARD;
    while echo.received() != b"acted" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(echo.received(), b"acted", "the server got the request");
}

#[tokio::test]
async fn reset_ends_open_and_new_connections() {
    //! Rule: `Reset` resets every open connection (RST) and every new one.
    let (_echo, proxy, mut client) = proxied().await;
    assert_eq!(round_trip(&mut client, b"up").await, b"up");
    proxy.set(Fault::Reset);
    let mut buf = [0; 8];
    let read = timeout(HANG_GUARD, client.read(&mut buf))
        .await
        .expect("the reset arrives in time");
    assert_eq!(read.map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));

    let mut fresh = TcpStream::connect(proxy.addr()).await.expect("connect");
    let read = timeout(HANG_GUARD, fresh.read(&mut buf))
        .await
        .expect("the reset arrives in time");
    assert_eq!(read.map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));
}

#[tokio::test]
async fn dropping_the_proxy_stops_listening_and_closes_connections() {
    //! Rule: a dropped proxy accepts nothing and leaves no connection open.
    let (_echo, proxy, mut client) = proxied().await;
    assert_eq!(round_trip(&mut client, b"up").await, b"up");
    let addr = proxy.addr();
    drop(proxy);
    let mut buf = [0; 8];
    let read = timeout(HANG_GUARD, client.read(&mut buf))
        .await
        .expect("the close arrives in time");
    assert!(matches!(read, Ok(0) | Err(_)), "still open: {read:?}");
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            other => panic!("the proxy still accepts: {other:?}"),
        }
    }
}
