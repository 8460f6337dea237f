//! The MQTT broker inside the process, for `luadriver run --embedded-broker[=PORT]` and the
//! scripted test harness: [rumqttd] 0.20 behind one public port that serves MQTT 3.1.1 and
//! MQTT 5 clients alike.
//!
//! In: the address to listen on (port 0 = any free port). Out: an [`EmbeddedBroker`] whose
//! [`port`](EmbeddedBroker::port) clients connect to, or a readable error (port in use,
//! …). Dropping it closes the public port and every client connection.
//!
//! # How it is put together
//!
//! rumqttd speaks MQTT 3.1.1 and MQTT 5 on separate listeners, so a small front listener
//! owns the public port. It reads the start of each connection's CONNECT packet, looks at
//! the protocol level byte (5 = MQTT 5, anything else = 3.1.1) and splices the connection
//! to rumqttd's v4 or v5 listener on a loopback ephemeral port. One thread runs a
//! single-threaded tokio runtime holding the front listener and both rumqttd servers;
//! rumqttd's router has a thread of its own. Because the front binds the public port
//! itself, "address in use" comes back from [`EmbeddedBroker::start`] instead of being
//! logged by a rumqttd thread that then dies.
//!
//! The front also mends one rumqttd rule: rumqttd drops a client whose CONNECT has
//! keep-alive 0 without a CONNACK. The spec lets a driver turn keep-alive off, so the front
//! rewrites keep-alive 0 to the maximum, 65,535 s (the broker would close a silent client
//! after about 27 hours).
//!
//! # What rumqttd 0.20 lacks (tested in `tests/embedded_broker.rs`, not guessed)
//!
//! Works on both protocol levels: QoS 0/1/2 publishing with the right acknowledgements
//! (PUBACK, PUBREC/PUBCOMP), retained messages (cleared by an empty retained message; the
//! retain flag is cleared on live delivery), last will on an unexpected disconnect,
//! wildcards, one port for both versions. Works on MQTT 5: every PUBLISH property
//! (payload format, message expiry, content type, response topic, correlation data, user
//! properties) reaches subscribers, with the subscription identifier; a session with an
//! expiry interval survives a disconnect with its queued QoS 1 messages.
//!
//! Missing or wrong (each pinned by an assertion in the `rumqttd_v5_gaps` test):
//! - Delivery QoS is the subscription's, not the lower of publication and subscription: a
//!   QoS 0 message reaches a QoS 2 subscriber as QoS 2 (both versions).
//! - MQTT 5 CONNACK carries only Topic Alias Maximum (4096): no Receive Maximum, Maximum
//!   QoS or Retain Available, so clients assume the protocol defaults.
//! - MQTT 5 subscription options are ignored: No Local (a client gets its own messages),
//!   Retain As Published, Retain Handling (retained messages are always sent).
//! - No authentication or ACLs: any client on loopback is accepted. Sessions and retained
//!   messages live in memory only.
//!
//! # Logging
//!
//! rumqttd logs through `tracing` at `error` level for every client that disconnects
//! without a DISCONNECT packet, which would fill a user's terminal. The first
//! [`EmbeddedBroker::start`] therefore installs (if no `tracing` subscriber is set yet) a
//! subscriber that forwards `tracing` events to the `log` crate two levels lower: rumqttd's
//! errors and warnings become `debug`, its info and debug become `trace`. Its messages are
//! thus still there for `RUST_LOG=rumqttd=debug`.
//!
//! rumqttd's router thread has no way to be stopped; after a drop it stays parked on a
//! channel (no CPU) until the process exits.

use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How long a new connection may take to send the start of its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long rumqttd may take to open its internal listeners.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest PUBLISH payload the broker accepts.
const MAX_PAYLOAD: usize = 4 * 1024 * 1024;

/// A running broker. Dropping it closes the public port and all client connections.
pub struct EmbeddedBroker {
    port: u16,
    shutdown: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Binds `addr` (port 0 = any free port), starts rumqttd and returns once both of its
    /// listeners accept connections.
    pub fn start(addr: SocketAddr) -> Result<EmbeddedBroker, String> {
        logging::quiet_rumqttd();

        let public = StdTcpListener::bind(addr).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                "; is another MQTT broker running there? Pick another port with \
                 --embedded-broker=PORT"
            } else {
                ""
            };
            format!("embedded broker: cannot listen on {addr}: {e}{hint}")
        })?;
        public
            .set_nonblocking(true)
            .map_err(|e| format!("embedded broker: cannot set up {addr}: {e}"))?;
        let port = public
            .local_addr()
            .map_err(|e| format!("embedded broker: cannot read the bound address: {e}"))?
            .port();
        let v4_addr = free_loopback_addr()?;
        let v5_addr = free_loopback_addr()?;

        let (shutdown, shutdown_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name("embedded-broker".to_string())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!(
                            "embedded broker: cannot start its runtime: {e}"
                        )));
                        return;
                    }
                };
                runtime.block_on(serve(public, v4_addr, v5_addr, shutdown_rx, ready_tx));
            })
            .map_err(|e| format!("embedded broker: cannot start its thread: {e}"))?;

        let mut broker = EmbeddedBroker {
            port,
            shutdown,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(STARTUP_TIMEOUT + Duration::from_secs(1)) {
            Ok(Ok(())) => Ok(broker),
            Ok(Err(e)) => {
                broker.stop();
                Err(e)
            }
            Err(_) => {
                broker.stop();
                Err("embedded broker: rumqttd did not start in time".to_string())
            }
        }
    }

    /// The public port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn stop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("port", &self.port)
            .finish()
    }
}

/// A loopback address with a port the OS just handed out. rumqttd binds it itself a moment
/// later; [`serve`] checks that it really did.
fn free_loopback_addr() -> Result<SocketAddr, String> {
    StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map_err(|e| format!("embedded broker: no free loopback port for rumqttd: {e}"))
}

fn server_settings(name: &str, listen: SocketAddr) -> ServerSettings {
    ServerSettings {
        name: name.to_string(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: CONNECT_TIMEOUT.as_millis() as u16,
            max_payload_size: MAX_PAYLOAD,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

fn router_config() -> RouterConfig {
    RouterConfig {
        max_connections: 1024,
        max_outgoing_packet_count: 200,
        max_segment_size: MAX_PAYLOAD,
        max_segment_count: 4,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

/// The broker thread's whole life: start rumqttd, report readiness, accept and splice
/// until told to stop. Returning drops the runtime, which closes every socket.
async fn serve(
    public: StdTcpListener,
    v4_addr: SocketAddr,
    v5_addr: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
    ready: mpsc::Sender<Result<(), String>>,
) {
    let public = match TcpListener::from_std(public) {
        Ok(listener) => listener,
        Err(e) => {
            let _ = ready.send(Err(format!(
                "embedded broker: cannot use the listener: {e}"
            )));
            return;
        }
    };

    let router_tx = Router::new(0, router_config()).spawn();
    let mut v4 = Server::new(server_settings("v4", v4_addr), router_tx.clone(), V4);
    let mut v5 = Server::new(server_settings("v5", v5_addr), router_tx, V5);
    let v4_task = tokio::spawn(async move { v4.start(LinkType::Remote).await });
    let v5_task = tokio::spawn(async move { v5.start(LinkType::Remote).await });

    for (task, addr) in [(&v4_task, v4_addr), (&v5_task, v5_addr)] {
        if let Err(e) = wait_listening(task, addr).await {
            let _ = ready.send(Err(e));
            return;
        }
    }
    let _ = ready.send(Ok(()));

    let routes = Routes { v4_addr, v5_addr };
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = public.accept() => {
                if let Ok((client, _)) = accepted {
                    let stop = shutdown.clone();
                    tokio::spawn(splice(client, routes, stop));
                }
                // An accept error (out of file descriptors, …) concerns one connection;
                // the listener itself stays usable.
            }
        }
    }
}

/// Waits until rumqttd listens on `addr`, or reports why its server task ended.
async fn wait_listening<T: std::fmt::Debug>(
    task: &tokio::task::JoinHandle<Result<(), T>>,
    addr: SocketAddr,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
    loop {
        if task.is_finished() {
            return Err(format!(
                "embedded broker: rumqttd could not listen on {addr}"
            ));
        }
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "embedded broker: rumqttd did not open {addr} within {STARTUP_TIMEOUT:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[derive(Clone, Copy)]
struct Routes {
    v4_addr: SocketAddr,
    v5_addr: SocketAddr,
}

/// One client connection: read the head of its CONNECT, pick the listener, forward.
async fn splice(mut client: TcpStream, routes: Routes, mut shutdown: watch::Receiver<bool>) {
    let _ = client.set_nodelay(true);
    let forward = async {
        let Ok(Some((head, level))) =
            tokio::time::timeout(CONNECT_TIMEOUT, read_connect_head(&mut client)).await
        else {
            return;
        };
        let target = if level == 5 {
            routes.v5_addr
        } else {
            routes.v4_addr
        };
        let Ok(mut upstream) = TcpStream::connect(target).await else {
            return;
        };
        let _ = upstream.set_nodelay(true);
        if upstream.write_all(&head).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    };
    tokio::select! {
        _ = shutdown.changed() => {}
        _ = forward => {}
    }
}

/// The bytes read so far (the CONNECT head, possibly more) and the protocol level, or
/// `None` when the peer closes or sends something that is not a CONNECT.
async fn read_connect_head(client: &mut TcpStream) -> Option<(Vec<u8>, u8)> {
    let mut head = Vec::with_capacity(64);
    loop {
        match connect_head(&mut head) {
            Head::Complete { level } => return Some((head, level)),
            Head::Invalid => return None,
            Head::Incomplete => {}
        }
        let mut chunk = [0u8; 256];
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
}

enum Head {
    /// Enough of the CONNECT is here; keep-alive 0 has been rewritten in place.
    Complete {
        level: u8,
    },
    Incomplete,
    /// Not an MQTT CONNECT: the connection is closed.
    Invalid,
}

/// Looks at the start of a connection: fixed header (type 1), remaining length, protocol
/// name, level, flags and keep-alive.
fn connect_head(buf: &mut [u8]) -> Head {
    let Some(&first) = buf.first() else {
        return Head::Incomplete;
    };
    if first != 0x10 {
        return Head::Invalid;
    }
    // The remaining length is a variable-length integer of one to four bytes.
    let mut pos = 1;
    loop {
        let Some(&byte) = buf.get(pos) else {
            return Head::Incomplete;
        };
        pos += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if pos > 4 {
            return Head::Invalid;
        }
    }
    let Some(name_len) = buf.get(pos..pos + 2) else {
        return Head::Incomplete;
    };
    let name_len = u16::from_be_bytes([name_len[0], name_len[1]]) as usize;
    if name_len > 6 {
        return Head::Invalid;
    }
    let level_at = pos + 2 + name_len;
    let keepalive_at = level_at + 2;
    if buf.len() < keepalive_at + 2 {
        return Head::Incomplete;
    }
    if buf[keepalive_at..keepalive_at + 2] == [0, 0] {
        buf[keepalive_at..keepalive_at + 2].copy_from_slice(&u16::MAX.to_be_bytes());
    }
    Head::Complete {
        level: buf[level_at],
    }
}

mod logging {
    //! `tracing` (rumqttd) → `log`, two levels lower. See the module doc above.

    use std::fmt::Write as _;
    use std::sync::Once;
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::subscriber::Interest;
    use tracing::{Event, Level, Metadata, Subscriber};

    pub(super) fn quiet_rumqttd() {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            // Fails only when the program already chose a tracing subscriber: keep theirs.
            let _ = tracing::subscriber::set_global_default(DemotedToLog);
        });
    }

    struct DemotedToLog;

    fn demoted(level: &Level) -> log::Level {
        match *level {
            Level::ERROR | Level::WARN => log::Level::Debug,
            _ => log::Level::Trace,
        }
    }

    impl Subscriber for DemotedToLog {
        fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
            // The log filter may be set after the broker starts, so ask every time.
            Interest::sometimes()
        }

        fn enabled(&self, metadata: &Metadata<'_>) -> bool {
            metadata.is_event()
                && log::log_enabled!(target: metadata.target(), demoted(metadata.level()))
        }

        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }

        fn record(&self, _: &Id, _: &Record<'_>) {}

        fn record_follows_from(&self, _: &Id, _: &Id) {}

        fn event(&self, event: &Event<'_>) {
            let metadata = event.metadata();
            let mut text = Text(String::new());
            event.record(&mut text);
            log::logger().log(
                &log::Record::builder()
                    .level(demoted(metadata.level()))
                    .target(metadata.target())
                    .module_path(metadata.module_path())
                    .file(metadata.file())
                    .line(metadata.line())
                    .args(format_args!("{}", text.0))
                    .build(),
            );
        }

        fn enter(&self, _: &Id) {}

        fn exit(&self, _: &Id) {}
    }

    struct Text(String);

    impl Visit for Text {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if !self.0.is_empty() {
                self.0.push(' ');
            }
            if field.name() == "message" {
                let _ = write!(self.0, "{value:?}");
            } else {
                let _ = write!(self.0, "{}={value:?}", field.name());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_packet(level: u8, keepalive: u16) -> Vec<u8> {
        let mut p = vec![0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', level, 0x02];
        p.extend_from_slice(&keepalive.to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p
    }

    #[test]
    fn the_protocol_level_is_read_from_the_connect_head() {
        let mut v5 = connect_packet(5, 30);
        assert!(matches!(connect_head(&mut v5), Head::Complete { level: 5 }));
        let mut v4 = connect_packet(4, 30);
        assert!(matches!(connect_head(&mut v4), Head::Complete { level: 4 }));
        assert_eq!(
            v4,
            connect_packet(4, 30),
            "a non-zero keep-alive is left alone"
        );
    }

    #[test]
    fn a_partial_head_waits_and_garbage_is_refused() {
        let full = connect_packet(4, 30);
        for cut in 0..full.len() - 2 {
            let mut part = full[..cut].to_vec();
            assert!(matches!(connect_head(&mut part), Head::Incomplete), "{cut}");
        }
        assert!(matches!(
            connect_head(&mut b"GET / HTTP/1.1".to_vec()),
            Head::Invalid
        ));
        let mut long_length = vec![0x10, 0x80, 0x80, 0x80, 0x80, 0x01];
        assert!(matches!(connect_head(&mut long_length), Head::Invalid));
    }

    #[test]
    fn keep_alive_zero_becomes_the_maximum() {
        let mut packet = connect_packet(4, 0);
        assert!(matches!(
            connect_head(&mut packet),
            Head::Complete { level: 4 }
        ));
        assert_eq!(&packet[10..12], &[0xff, 0xff]);
    }

    #[test]
    fn a_port_in_use_is_a_readable_error() {
        let taken = StdTcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let error = EmbeddedBroker::start(addr).unwrap_err();
        assert!(
            error.starts_with(&format!("embedded broker: cannot listen on {addr}: ")),
            "{error}"
        );
        assert!(error.contains("--embedded-broker=PORT"), "{error}");
    }

    #[test]
    fn port_zero_gets_a_free_port_that_closes_on_drop() {
        let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = broker.port();
        assert_ne!(port, 0);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        drop(broker);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
