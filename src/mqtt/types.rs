//! The vocabulary shared by the Lua binding and the MQTT worker.
//!
//! In: [`MqttCommand`]s, sent by the Lua thread (`c4::mqtt`) to a client's worker.
//! Out: [`MqttEvent`]s, sent by the worker back to the driver's event loop.
//! Both sides also share a [`ClientStatus`]: atomics the worker writes and the Lua thread
//! reads, so `Publish` can answer "not connected" or "QoS not supported" synchronously
//! without ever waiting on the worker.

use bytes::Bytes;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// A message id as the driver sees it: positive, increasing per client object, never
/// reused while the object lives. Not an MQTT packet identifier (the worker maps those).
pub type MsgId = u64;

/// The MQTT protocol level a client speaks (`ForceMqttVersion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProtocolVersion {
    /// MQTT 3.1.1, the default.
    #[default]
    V311,
    /// MQTT 5.
    V5,
}

/// A password that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// MQTT 5 properties, one neutral struct for every packet kind. Which fields are allowed
/// on which packet is checked by the Lua binding before a command is built; the worker
/// copies what the packet can carry and ignores the rest. Always empty on MQTT 3.1.1.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Props {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub topic_alias: Option<u16>,
    pub session_expiry_interval: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub maximum_packet_size: Option<u32>,
    pub topic_alias_maximum: Option<u16>,
    pub request_problem_information: Option<u8>,
    pub request_response_information: Option<u8>,
    pub reason_string: Option<String>,
    /// In wire order; a key may repeat.
    pub user_properties: Vec<(String, String)>,
    // Received only (CONNACK, PUBLISH, DISCONNECT):
    pub retain_available: Option<u8>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
    pub maximum_qos: Option<u8>,
    pub server_keep_alive: Option<u16>,
    pub assigned_client_identifier: Option<String>,
    pub server_reference: Option<String>,
    pub response_information: Option<String>,
    pub authentication_method: Option<String>,
    pub subscription_identifiers: Vec<usize>,
}

impl Props {
    /// No property at all; `const` so [`EventProps`] can point at it.
    pub const EMPTY: Props = Props {
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        topic_alias: None,
        session_expiry_interval: None,
        receive_maximum: None,
        maximum_packet_size: None,
        topic_alias_maximum: None,
        request_problem_information: None,
        request_response_information: None,
        reason_string: None,
        user_properties: Vec::new(),
        retain_available: None,
        wildcard_subscription_available: None,
        subscription_identifier_available: None,
        shared_subscription_available: None,
        maximum_qos: None,
        server_keep_alive: None,
        assigned_client_identifier: None,
        server_reference: None,
        response_information: None,
        authentication_method: None,
        subscription_identifiers: Vec::new(),
    };

    pub fn is_empty(&self) -> bool {
        *self == Props::EMPTY
    }
}

/// The properties that came with an event. Usually there are none (always on MQTT 3.1.1),
/// so they are boxed only when present: an event stays small on its way through the
/// driver's channel, and an ack without properties allocates nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventProps(Option<Box<Props>>);

impl From<Props> for EventProps {
    fn from(props: Props) -> Self {
        if props.is_empty() {
            EventProps(None)
        } else {
            EventProps(Some(Box::new(props)))
        }
    }
}

impl std::ops::Deref for EventProps {
    type Target = Props;

    fn deref(&self) -> &Props {
        static NONE: Props = Props::EMPTY;
        self.0.as_deref().unwrap_or(&NONE)
    }
}

/// The last will, as given to `SetWill`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub props: Props,
}

/// TLS for a connection: a ready rustls configuration (built and checked when the driver
/// called `SetTlsCertificates`, so file errors are reported there) and whether the host
/// name check is skipped (`SetTlsInsecure`).
#[derive(Clone)]
pub struct TlsSettings {
    pub config: Arc<tokio_rustls::rustls::ClientConfig>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsSettings(..)")
    }
}

/// Everything a connection attempt needs. Sent whole with every `Connect`; `Reconnect`
/// reuses the last one the worker received.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub host: String,
    pub port: u16,
    /// Zero turns keep-alive off.
    pub keepalive: Duration,
    pub client_id: String,
    pub clean_session: bool,
    pub version: ProtocolVersion,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub will: Option<Will>,
    pub tls: Option<TlsSettings>,
    /// CONNECT properties (MQTT 5).
    pub props: Props,
    /// QoS 1/2 messages awaiting acknowledgement at once; 0 means no limit of our own
    /// (the broker's Receive Maximum and the 65,535 packet ids still cap it).
    pub max_inflight: u16,
    /// How many times a QoS 1/2 message is sent before it is failed; `None` = never give up.
    pub max_sends: Option<u32>,
    /// `SetAutoReconnect` (extension): reconnect on its own after an unexpected loss.
    pub auto_reconnect: Option<(Duration, Duration)>,
}

/// One `Publish` that passed every synchronous check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRequest {
    pub msg_id: MsgId,
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub props: Props,
}

/// Everything that flows into a client's worker.
#[derive(Debug)]
pub enum MqttCommand {
    /// Connect (or connect again with new settings). Result: `MqttEvent::Connected`.
    Connect(Box<ConnectOptions>),
    /// Connect again with the last options; resend in-flight (DUP) and queued messages.
    Reconnect,
    /// Clean disconnect; queued QoS 1/2 messages stay queued.
    Disconnect {
        props: Props,
    },
    Publish(PublishRequest),
    Subscribe {
        msg_id: MsgId,
        filter: String,
        qos: u8,
        props: Props,
    },
    Unsubscribe {
        msg_id: MsgId,
        filter: String,
        props: Props,
    },
    /// `SetMaxInflightMessages` / `SetMessageRetries` after `Connect`.
    SetLimits {
        max_inflight: u16,
        max_sends: Option<u32>,
    },
    /// `SetAutoReconnect` (extension); `None` turns it off.
    SetAutoReconnect(Option<(Duration, Duration)>),
}

/// Everything that flows out of a worker, to the driver's event loop. Each variant maps to
/// one Lua callback.
#[derive(Debug, Clone, PartialEq)]
pub enum MqttEvent {
    /// `OnConnect(obj, reasonCode, flags, message, props)`. A failed attempt has a non-zero
    /// reason code (v5 reason codes; 3.x return codes mapped to them).
    Connected {
        reason: i32,
        session_present: bool,
        message: String,
        props: EventProps,
    },
    /// `OnDisconnect(obj, reasonCode, message, props)`: once per established connection.
    Disconnected {
        reason: i32,
        message: String,
        props: EventProps,
    },
    /// `OnPublish(obj, msgId, reasonCode, message, props)`: exactly once per accepted publish.
    /// The message is nearly always a reason code's fixed text: borrowed, it costs no
    /// allocation on the I/O side and no free on the driver's.
    Published {
        msg_id: MsgId,
        reason: i32,
        message: Cow<'static, str>,
        props: EventProps,
    },
    /// `OnSubscribe(obj, msgId, grantedQoS, props)`.
    Subscribed {
        msg_id: MsgId,
        granted: Vec<u8>,
        props: EventProps,
    },
    /// `OnUnsubscribe(obj, msgId, props)`.
    Unsubscribed { msg_id: MsgId, props: EventProps },
    /// `OnMessage(obj, msgId, topic, payload, qos, retain, props)`.
    Message {
        msg_id: u16,
        topic: String,
        payload: Bytes,
        qos: u8,
        retain: bool,
        props: EventProps,
    },
    /// `OnLog(obj, level, line)`: 0 FATAL, 1 ERROR, 2 WARN, 3 INFO, 4 DEBUG, 5 TRACE.
    Log { level: u8, line: String },
}

/// Where a worker delivers its events. Must never block: the driver side is an unbounded
/// channel. Returns false once nobody listens any more (the driver stopped).
pub type EventSink = Arc<dyn Fn(MqttEvent) -> bool + Send + Sync>;

/// Live state of one client, written by its worker, read by the Lua thread.
#[derive(Debug)]
pub struct ClientStatus {
    pub connected: AtomicBool,
    /// The broker's Maximum QoS (MQTT 5 CONNACK); 2 when it said nothing.
    pub max_qos: AtomicU8,
    /// The broker's Maximum Packet Size; 0 when it said nothing.
    pub max_packet_size: AtomicU32,
    pub queued: AtomicU64,
    /// Publishes the worker has taken from its command channel. The Lua side counts what
    /// it sent, so the difference (still in the channel) shows in `GetStats().queued` at
    /// once, before the worker has run.
    pub taken: AtomicU64,
    pub inflight: AtomicU64,
    /// Messages handed to the socket (each message counted once, resends not counted).
    pub published: AtomicU64,
    pub acknowledged: AtomicU64,
    pub failed: AtomicU64,
}

impl Default for ClientStatus {
    fn default() -> Self {
        ClientStatus {
            connected: AtomicBool::new(false),
            max_qos: AtomicU8::new(2),
            max_packet_size: AtomicU32::new(0),
            queued: AtomicU64::new(0),
            taken: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            published: AtomicU64::new(0),
            acknowledged: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }
}

impl ClientStatus {
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }
}
