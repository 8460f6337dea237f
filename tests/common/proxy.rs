//! A fault-injecting TCP proxy for fault tests: clients connect to `proxy.port`, bytes go
//! to and from 127.0.0.1:`upstream_port`, and the test breaks the link on demand.
//!
//! In: commands from the test (`cut`, `reset`, `blackhole`, `refuse`). Out: the faults,
//! applied before the call returns, and the count of open connections. The proxy runs on a
//! thread of its own (a single-threaded tokio runtime), so it serves sync and async tests
//! alike, and stops, closing every socket, when dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

/// How a connection is ended by the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// FIN both ways: an orderly close.
    Fin,
    /// RST both ways (SO_LINGER 0): a crash or a middlebox dropping state.
    Rst,
}

enum Command {
    Close(Close, std_mpsc::Sender<()>),
    Blackhole(bool, std_mpsc::Sender<()>),
    Refuse(bool, std_mpsc::Sender<()>),
}

pub struct FaultProxy {
    pub port: u16,
    commands: mpsc::UnboundedSender<Command>,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    pub fn start(upstream_port: u16) -> FaultProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy port");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("proxy address").port();
        let (commands, command_rx) = mpsc::unbounded_channel();
        let open = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let proxy = Proxy {
            port,
            upstream_port,
            open: open.clone(),
            accepted: accepted.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{port}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                runtime.block_on(proxy.run(listener, command_rx));
            })
            .expect("proxy thread");
        FaultProxy {
            port,
            commands,
            open,
            accepted,
            thread: Some(thread),
        }
    }

    /// Closes every current connection with FIN, both towards the client and upstream.
    pub fn cut(&self) {
        self.command(|done| Command::Close(Close::Fin, done));
    }

    /// Closes every current connection with RST (SO_LINGER 0), both ways.
    pub fn reset(&self) {
        self.command(|done| Command::Close(Close::Rst, done));
    }

    /// `true`: sockets stay open but no byte is forwarded either way, as on a dead link.
    /// Bytes already read wait in the proxy and flow again after `blackhole(false)`.
    pub fn blackhole(&self, on: bool) {
        self.command(|done| Command::Blackhole(on, done));
    }

    /// `true`: the proxy stops listening, so new connections are refused
    /// (`ECONNREFUSED`); current ones are left alone. `false` listens on the same port again.
    pub fn refuse(&self, on: bool) {
        self.command(|done| Command::Refuse(on, done));
    }

    /// Connections open right now.
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Sends a command and waits until the proxy has applied it.
    fn command(&self, make: impl FnOnce(std_mpsc::Sender<()>) -> Command) {
        let (done, applied) = std_mpsc::channel();
        self.commands
            .send(make(done))
            .expect("the proxy thread is running");
        applied
            .recv_timeout(Duration::from_secs(5))
            .expect("the proxy applied the command");
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Closing the command channel ends the proxy loop; dropping its runtime closes
        // every socket it holds.
        let (closed, _) = mpsc::unbounded_channel();
        self.commands = closed;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Proxy {
    port: u16,
    upstream_port: u16,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
}

struct Connection {
    close: oneshot::Sender<Close>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn run(
        self,
        listener: std::net::TcpListener,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
        let mut listener = Some(TcpListener::from_std(listener).expect("tokio listener"));
        let (blackhole, blackhole_rx) = watch::channel(false);
        let mut connections: HashMap<u64, Connection> = HashMap::new();
        let mut next_id = 0u64;

        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Close(how, done)) => {
                        for (_, connection) in connections.drain() {
                            let _ = connection.close.send(how);
                            let _ = connection.task.await;
                        }
                        let _ = done.send(());
                    }
                    Some(Command::Blackhole(on, done)) => {
                        blackhole.send_replace(on);
                        let _ = done.send(());
                    }
                    Some(Command::Refuse(on, done)) => {
                        if on {
                            listener = None;
                        } else if listener.is_none() {
                            listener = Some(
                                TcpListener::bind(("127.0.0.1", self.port))
                                    .await
                                    .expect("listen on the proxy port again"),
                            );
                        }
                        let _ = done.send(());
                    }
                },
                accepted = accept(listener.as_ref()) => {
                    let Ok((client, _)) = accepted else { continue };
                    connections.retain(|_, c| !c.task.is_finished());
                    self.accepted.fetch_add(1, Ordering::SeqCst);
                    let (close, close_rx) = oneshot::channel();
                    let open = OpenGuard::new(self.open.clone());
                    let task = tokio::spawn(relay(
                        client,
                        self.upstream_port,
                        blackhole_rx.clone(),
                        close_rx,
                        open,
                    ));
                    connections.insert(next_id, Connection { close, task });
                    next_id += 1;
                }
            }
        }
    }
}

async fn accept(
    listener: Option<&TcpListener>,
) -> std::io::Result<(TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Counts a connection as open from accept until its task ends.
struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    fn new(open: Arc<AtomicUsize>) -> OpenGuard {
        open.fetch_add(1, Ordering::SeqCst);
        OpenGuard(open)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn relay(
    mut client: TcpStream,
    upstream_port: u16,
    blackhole: watch::Receiver<bool>,
    mut close: oneshot::Receiver<Close>,
    _open: OpenGuard,
) {
    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
        finish(client, None, Close::Rst).await;
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);

    let how = {
        let (mut client_read, mut client_write) = client.split();
        let (mut upstream_read, mut upstream_write) = upstream.split();
        let to_upstream = pump(&mut client_read, &mut upstream_write, blackhole.clone());
        let to_client = pump(&mut upstream_read, &mut client_write, blackhole);
        tokio::pin!(to_upstream, to_client);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                how = &mut close => break how.unwrap_or(Close::Fin),
                ended = &mut to_upstream, if !up_done => {
                    if ended.is_err() { break Close::Rst }
                    up_done = true;
                }
                ended = &mut to_client, if !down_done => {
                    if ended.is_err() { break Close::Rst }
                    down_done = true;
                }
            }
            if up_done && down_done {
                break Close::Fin;
            }
        }
    };
    finish(client, Some(upstream), how).await;
}

async fn finish(client: TcpStream, upstream: Option<TcpStream>, how: Close) {
    for mut socket in std::iter::once(client).chain(upstream) {
        match how {
            Close::Fin => {
                let _ = socket.shutdown().await;
            }
            // SO_LINGER 0 makes close send RST; with a zero timeout the close never blocks,
            // which is what tokio's deprecation warns about.
            #[allow(deprecated)]
            Close::Rst => {
                let _ = socket.set_linger(Some(Duration::ZERO));
            }
        }
        drop(socket);
    }
}

/// Copies one direction until EOF (then passes the FIN on) or an error, holding bytes back
/// while the blackhole is on.
async fn pump(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    mut blackhole: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if blackhole.wait_for(|on| !*on).await.is_err() {
            return Ok(());
        }
        let read = tokio::select! {
            read = from.read(&mut buf) => read?,
            _ = blackhole.changed() => continue,
        };
        if read == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        if blackhole.wait_for(|on| !*on).await.is_err() {
            return Ok(());
        }
        to.write_all(&buf[..read]).await?;
    }
}
