//! Each fault of `FaultProxy` against a plain echo server: what the client sees, what the
//! server sees, and the connection count.

mod common;

use common::proxy::FaultProxy;
use std::io::ErrorKind;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched for; only used for negative assertions.
const QUIET: Duration = Duration::from_millis(300);

/// How a connection ended, as the echo server saw it.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Eof,
    Error(ErrorKind),
}

/// An echo server on an ephemeral port; reports how each connection ended.
async fn echo_server() -> (u16, mpsc::UnboundedReceiver<Ended>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let ended = loop {
                    match socket.read(&mut buf).await {
                        Ok(0) => break Ended::Eof,
                        Ok(n) => {
                            if let Err(e) = socket.write_all(&buf[..n]).await {
                                break Ended::Error(e.kind());
                            }
                        }
                        Err(e) => break Ended::Error(e.kind()),
                    }
                };
                let _ = tx.send(ended);
            });
        }
    });
    (port, rx)
}

async fn connect(proxy: &FaultProxy) -> TcpStream {
    TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap()
}

/// Sends `text` and reads the echo back.
async fn round_trip(stream: &mut TcpStream, text: &str) {
    stream.write_all(text.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; text.len()];
    timeout(WAIT, stream.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(buf, text.as_bytes());
}

/// The result of the next read: `Ok(0)` on FIN, an error on RST.
async fn next_read(stream: &mut TcpStream) -> std::io::Result<usize> {
    let mut buf = [0u8; 64];
    timeout(WAIT, stream.read(&mut buf))
        .await
        .expect("the read ended in time")
}

async fn server_saw(ended: &mut mpsc::UnboundedReceiver<Ended>) -> Ended {
    timeout(WAIT, ended.recv())
        .await
        .expect("the server saw the end in time")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_flow_both_ways_and_connections_are_counted() {
    let (upstream, _ended) = echo_server().await;
    let proxy = FaultProxy::start(upstream);
    assert_eq!(proxy.connections(), 0);
    let mut a = connect(&proxy).await;
    let mut b = connect(&proxy).await;
    round_trip(&mut a, "hello").await;
    round_trip(&mut b, "world").await;
    assert_eq!((proxy.connections(), proxy.accepted()), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_closes_both_sides_with_fin() {
    let (upstream, mut ended) = echo_server().await;
    let proxy = FaultProxy::start(upstream);
    let mut client = connect(&proxy).await;
    round_trip(&mut client, "before").await;

    proxy.cut();
    assert_eq!(
        next_read(&mut client).await.unwrap(),
        0,
        "the client reads EOF"
    );
    assert_eq!(server_saw(&mut ended).await, Ended::Eof);
    assert_eq!(proxy.connections(), 0);

    let mut again = connect(&proxy).await;
    round_trip(&mut again, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_closes_both_sides_with_rst() {
    let (upstream, mut ended) = echo_server().await;
    let proxy = FaultProxy::start(upstream);
    let mut client = connect(&proxy).await;
    round_trip(&mut client, "before").await;

    proxy.reset();
    let error = next_read(&mut client).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::ConnectionReset);
    assert_eq!(
        server_saw(&mut ended).await,
        Ended::Error(ErrorKind::ConnectionReset)
    );
    assert_eq!(proxy.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackhole_holds_bytes_without_closing_anything() {
    let (upstream, mut ended) = echo_server().await;
    let proxy = FaultProxy::start(upstream);
    let mut client = connect(&proxy).await;
    round_trip(&mut client, "alive").await;

    proxy.blackhole(true);
    client.write_all(b"lost?").await.unwrap();
    let mut buf = [0u8; 5];
    assert!(
        timeout(QUIET, client.read_exact(&mut buf)).await.is_err(),
        "nothing comes back through a dead link"
    );
    assert_eq!(proxy.connections(), 1, "the sockets stay open");
    assert!(ended.try_recv().is_err(), "the server saw no close");

    // New connections are accepted but are just as dead.
    let mut late = connect(&proxy).await;
    late.write_all(b"late!").await.unwrap();

    proxy.blackhole(false);
    timeout(WAIT, client.read_exact(&mut buf))
        .await
        .expect("held bytes flow once the link is back")
        .unwrap();
    assert_eq!(&buf, b"lost?");
    timeout(WAIT, late.read_exact(&mut buf))
        .await
        .expect("the late connection works too")
        .unwrap();
    assert_eq!(&buf, b"late!");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_turns_new_connections_away_and_leaves_old_ones() {
    let (upstream, _ended) = echo_server().await;
    let proxy = FaultProxy::start(upstream);
    let mut old = connect(&proxy).await;
    // Until the proxy has accepted it, `old` sits in the listener's backlog, and closing
    // the listener would reset it.
    round_trip(&mut old, "accepted").await;

    proxy.refuse(true);
    let error = TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::ConnectionRefused);
    round_trip(&mut old, "still here").await;

    proxy.refuse(false);
    let mut new = connect(&proxy).await;
    round_trip(&mut new, "welcome back").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_proxy_closes_its_port_and_connections() {
    let (upstream, mut ended) = echo_server().await;
    let proxy = FaultProxy::start(upstream);
    let port = proxy.port;
    let mut client = connect(&proxy).await;
    round_trip(&mut client, "bye").await;

    drop(proxy);
    assert_eq!(next_read(&mut client).await.unwrap(), 0);
    assert_eq!(server_saw(&mut ended).await, Ended::Eof);
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_resets_the_client() {
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_port = gone.local_addr().unwrap().port();
    drop(gone);
    let proxy = FaultProxy::start(dead_port);
    // The RST can beat `connect` returning, so either step may report it.
    let error = match TcpStream::connect(("127.0.0.1", proxy.port)).await {
        Ok(mut client) => next_read(&mut client).await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(error.kind(), ErrorKind::ConnectionReset);
}
