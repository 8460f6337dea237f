//! One network connection to a broker: opening it (DNS, TCP, TLS, CONNECT, CONNACK) and
//! the per-connection state the worker keeps while it lives.
//!
//! In: [`ConnectOptions`]. Out: a [`Link`] and the broker's CONNACK, or an
//! [`AttemptFailure`] with the reason code and a message saying exactly what failed.

use super::codes::{reason, reason_code_to_string};
use super::types::{ConnectOptions, Props, ProtocolVersion};
use super::wire::{self, ConnAck, Packet};
use bytes::BytesMut;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::rustls::pki_types::ServerName;

/// How long a whole attempt (DNS, TCP, TLS, CONNECT → CONNACK) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A byte stream to a broker, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A live connection and what the worker tracks about it.
pub struct Link {
    pub stream: Box<dyn Io>,
    pub version: ProtocolVersion,
    /// `host:port`, for messages.
    pub peer: String,
    pub read_buf: BytesMut,
    /// Encoded packets waiting for the next flush.
    pub out: BytesMut,
    /// QoS 0 messages encoded into `out`: reported published once `out` is flushed.
    pub qos0_in_out: Vec<u64>,
    /// Zero = keep-alive off.
    pub keepalive: Duration,
    pub last_sent: Instant,
    pub last_received: Instant,
    /// A PINGREQ went out at this time and nothing has arrived since.
    pub ping_sent: Option<Instant>,
    pub max_incoming: usize,
    /// Incoming topic aliases (MQTT 5), valid for this connection only.
    pub aliases: HashMap<u16, String>,
}

impl Link {
    /// When the keep-alive timer must next look at the link, if keep-alive is on.
    pub fn keepalive_deadline(&self) -> Option<Instant> {
        if self.keepalive.is_zero() {
            return None;
        }
        Some(match self.ping_sent {
            Some(sent) => sent + self.keepalive,
            None => self.last_sent.min(self.last_received) + self.keepalive,
        })
    }

    /// Makes room so a read never has to grow the buffer by a few bytes at a time.
    pub fn reserve_read(&mut self) {
        if self.read_buf.capacity() - self.read_buf.len() < 4096 {
            self.read_buf.reserve(64 * 1024);
        }
    }
}

/// A connection attempt that did not end in an accepted CONNACK.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptFailure {
    pub reason: i32,
    pub message: String,
    /// The CONNACK's properties when the broker refused.
    pub props: Props,
}

impl AttemptFailure {
    fn unavailable(message: String) -> AttemptFailure {
        AttemptFailure {
            reason: reason::SERVER_UNAVAILABLE,
            message,
            props: Props::default(),
        }
    }
}

const STAGE_RESOLVE: u8 = 0;
const STAGE_TCP: u8 = 1;
const STAGE_TLS: u8 = 2;
const STAGE_CONNACK: u8 = 3;

/// Opens a connection and completes the MQTT handshake, within [`CONNECT_TIMEOUT`].
pub async fn establish(opts: &ConnectOptions) -> Result<(Link, ConnAck), AttemptFailure> {
    let peer = format!("{}:{}", opts.host, opts.port);
    let stage = AtomicU8::new(STAGE_RESOLVE);
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt(opts, &peer, &stage)).await {
        Ok(result) => result,
        Err(_) => {
            let what = match stage.load(Ordering::Relaxed) {
                STAGE_RESOLVE => format!("resolving {}", opts.host),
                STAGE_TCP => "the TCP connect".to_string(),
                STAGE_TLS => "the TLS handshake".to_string(),
                _ => "the CONNACK".to_string(),
            };
            Err(AttemptFailure::unavailable(format!(
                "connect to {peer}: timed out after {} s waiting for {what}",
                CONNECT_TIMEOUT.as_secs()
            )))
        }
    }
}

async fn attempt(
    opts: &ConnectOptions,
    peer: &str,
    stage: &AtomicU8,
) -> Result<(Link, ConnAck), AttemptFailure> {
    let addrs: Vec<_> = tokio::net::lookup_host((opts.host.as_str(), opts.port))
        .await
        .map_err(|e| AttemptFailure::unavailable(format!("resolve {}: {e}", opts.host)))?
        .collect();
    stage.store(STAGE_TCP, Ordering::Relaxed);
    let mut last_error = None;
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                tcp = Some(stream);
                break;
            }
            Err(e) => last_error = Some(e),
        }
    }
    let tcp = tcp.ok_or_else(|| {
        let detail = last_error.map_or_else(|| "no address found".to_string(), |e| e.to_string());
        AttemptFailure::unavailable(format!("connect to {peer}: {detail}"))
    })?;
    // Packets are batched by the worker; Nagle would only add latency to each batch.
    let _ = tcp.set_nodelay(true);

    let mut stream: Box<dyn Io> = match &opts.tls {
        None => Box::new(tcp),
        Some(tls) => {
            stage.store(STAGE_TLS, Ordering::Relaxed);
            let name = ServerName::try_from(opts.host.clone()).map_err(|e| {
                AttemptFailure::unavailable(format!("TLS with {peer}: bad server name: {e}"))
            })?;
            let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
            let stream = connector.connect(name, tcp).await.map_err(|e| {
                AttemptFailure::unavailable(format!("TLS handshake with {peer}: {e}"))
            })?;
            Box::new(stream)
        }
    };

    stage.store(STAGE_CONNACK, Ordering::Relaxed);
    let v5 = opts.version == ProtocolVersion::V5;
    let keepalive_secs = u16::try_from(opts.keepalive.as_secs()).unwrap_or(u16::MAX);
    let connect = Packet::Connect(Box::new(wire::Connect {
        client_id: opts.client_id.clone(),
        clean_session: opts.clean_session,
        keepalive_secs,
        username: opts.username.clone(),
        password: opts.password.as_ref().map(|p| p.0.clone()),
        will: opts.will.clone().map(|mut w| {
            if !v5 {
                w.props = Props::default();
            }
            w
        }),
        props: if v5 {
            opts.props.clone()
        } else {
            Props::default()
        },
    }));
    let mut out = BytesMut::new();
    wire::encode(opts.version, &connect, &mut out)
        .map_err(|e| AttemptFailure::unavailable(format!("encode CONNECT: {e}")))?;
    let sent = async {
        stream.write_all(&out).await?;
        stream.flush().await
    };
    sent.await
        .map_err(|e| AttemptFailure::unavailable(format!("send CONNECT to {peer}: {e}")))?;
    let connected_at = Instant::now();

    let max_incoming = opts
        .props
        .maximum_packet_size
        .filter(|_| v5)
        .map_or(wire::MAX_PACKET_SIZE, |m| m as usize);
    let mut read_buf = BytesMut::with_capacity(64 * 1024);
    let connack = loop {
        match wire::decode(opts.version, &mut read_buf, max_incoming) {
            Ok(Some(Packet::ConnAck(connack))) => break connack,
            Ok(Some(other)) => {
                return Err(AttemptFailure {
                    reason: reason::PROTOCOL_ERROR,
                    message: format!("{peer} sent {} before CONNACK", packet_name(&other)),
                    props: Props::default(),
                });
            }
            Ok(None) => {}
            Err(e) => {
                return Err(AttemptFailure {
                    reason: reason::MALFORMED_PACKET,
                    message: format!("malformed CONNACK from {peer}: {e}"),
                    props: Props::default(),
                });
            }
        }
        match stream.read_buf(&mut read_buf).await {
            Ok(0) => {
                return Err(AttemptFailure::unavailable(format!(
                    "{peer} closed the connection before CONNACK"
                )));
            }
            Ok(_) => {}
            Err(e) => {
                return Err(AttemptFailure::unavailable(format!(
                    "read CONNACK from {peer}: {e}"
                )));
            }
        }
    };
    if connack.reason != 0 {
        let mut message = format!(
            "{peer} refused the connection: {}",
            reason_code_to_string(connack.reason)
        );
        if let Some(why) = &connack.props.reason_string {
            message.push_str(" (");
            message.push_str(why);
            message.push(')');
        }
        return Err(AttemptFailure {
            reason: connack.reason,
            message,
            props: connack.props,
        });
    }
    let keepalive = match connack.props.server_keep_alive {
        Some(secs) => Duration::from_secs(secs.into()),
        None => Duration::from_secs(keepalive_secs.into()),
    };
    let now = Instant::now();
    let link = Link {
        stream,
        version: opts.version,
        peer: peer.to_string(),
        read_buf,
        out: BytesMut::with_capacity(64 * 1024),
        qos0_in_out: Vec::new(),
        keepalive,
        last_sent: connected_at,
        last_received: now,
        ping_sent: None,
        max_incoming,
        aliases: HashMap::new(),
    };
    Ok((link, connack))
}

/// A packet's MQTT name, for log lines.
pub fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect(_) => "DISCONNECT",
    }
}
