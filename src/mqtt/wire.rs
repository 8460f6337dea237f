//! MQTT packets in one neutral shape for both protocol versions.
//!
//! In: bytes from the socket ([`decode`]) or a neutral [`Packet`] to send ([`encode`],
//! [`encode_publish`]). Out: neutral packets, or bytes appended to a write buffer.
//! The byte work is rumqttc's packet codecs (`mqttbytes::v4` for MQTT 3.1.1,
//! `v5::mqttbytes::v5` for MQTT 5); this module only adapts them, so the worker and the
//! outbox never see a version-specific type. Two places are written by hand because the
//! codec gets them wrong or slow: PUBLISH encoding (the hot path: no topic copy) and MQTT 5
//! DISCONNECT decoding (the codec rejects the short forms a broker may send).

use super::codes::{reason, v3_connack_to_reason};
use super::types::{Props, ProtocolVersion, PublishRequest, Will};
use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use std::fmt;

/// The largest remaining length MQTT can express.
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;
/// The largest whole packet MQTT can express: a 5-byte fixed header plus the largest
/// remaining length.
pub const MAX_PACKET_SIZE: usize = MAX_REMAINING_LENGTH + 5;

/// Every packet the client sends or receives, version-neutral.
#[derive(Debug, Clone, PartialEq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
}

/// `Debug` shows the password as `***`, so a packet can be logged whole.
#[derive(Clone, PartialEq)]
pub struct Connect {
    pub client_id: String,
    pub clean_session: bool,
    pub keepalive_secs: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub will: Option<Will>,
    pub props: Props,
}

impl fmt::Debug for Connect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connect")
            .field("client_id", &self.client_id)
            .field("clean_session", &self.clean_session)
            .field("keepalive_secs", &self.keepalive_secs)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("will", &self.will)
            .field("props", &self.props)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConnAck {
    pub session_present: bool,
    /// MQTT 5 reason code; 3.1.1 return codes are mapped to their v5 equivalents.
    pub reason: i32,
    pub props: Props,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    pub topic: String,
    pub pkid: u16,
    pub payload: Bytes,
    pub props: Props,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP. `reason` is always 0 on MQTT 3.1.1.
#[derive(Debug, Clone, PartialEq)]
pub struct Ack {
    pub pkid: u16,
    pub reason: i32,
    pub props: Props,
}

impl Ack {
    pub fn success(pkid: u16) -> Ack {
        Ack {
            pkid,
            reason: 0,
            props: Props::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Subscribe {
    pub pkid: u16,
    pub filter: String,
    pub qos: u8,
    pub props: Props,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SubAck {
    pub pkid: u16,
    /// Granted QoS (0–2) or a failure code (≥ 128) per filter.
    pub reasons: Vec<u8>,
    pub props: Props,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Unsubscribe {
    pub pkid: u16,
    pub filter: String,
    pub props: Props,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UnsubAck {
    pub pkid: u16,
    /// Per filter on MQTT 5; empty on 3.1.1.
    pub reasons: Vec<u8>,
    pub props: Props,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Disconnect {
    pub reason: i32,
    pub props: Props,
}

/// Why bytes could not become a packet, or a packet could not become bytes.
#[derive(Debug)]
pub enum WireError {
    V4(v4_error::Error),
    V5(v5_error::Error),
    /// Well-formed but not something this client handles (e.g. AUTH).
    Unsupported(&'static str),
    /// Something the codec would accept but MQTT forbids.
    Invalid(String),
    /// An incoming packet bigger than the limit we set (MQTT 5 Maximum Packet Size).
    TooLarge {
        size: usize,
        max: usize,
    },
}

impl WireError {
    /// The MQTT 5 reason code for a peer that sent this: 149 "Packet too large", 130
    /// "Protocol Error" for a packet this client cannot take, otherwise 129 "Malformed
    /// Packet".
    pub fn reason_code(&self) -> i32 {
        match self {
            WireError::TooLarge { .. }
            | WireError::V4(v4_error::Error::PayloadSizeLimitExceeded(_))
            | WireError::V5(v5_error::Error::PayloadSizeLimitExceeded { .. }) => {
                reason::PACKET_TOO_LARGE
            }
            WireError::Unsupported(_) => reason::PROTOCOL_ERROR,
            _ => reason::MALFORMED_PACKET,
        }
    }
}

mod v4_error {
    pub use rumqttc::mqttbytes::Error;
}
mod v5_error {
    pub use rumqttc::v5::mqttbytes::Error;
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::V4(e) => write!(f, "{e}"),
            WireError::V5(e) => write!(f, "{e}"),
            WireError::Unsupported(what) => write!(f, "unsupported packet: {what}"),
            WireError::Invalid(what) => f.write_str(what),
            WireError::TooLarge { size, max } => write!(
                f,
                "a packet of {size} bytes exceeds the maximum packet size of {max} bytes"
            ),
        }
    }
}

impl std::error::Error for WireError {}

impl From<v4_error::Error> for WireError {
    fn from(e: v4_error::Error) -> Self {
        WireError::V4(e)
    }
}

impl From<v5_error::Error> for WireError {
    fn from(e: v5_error::Error) -> Self {
        WireError::V5(e)
    }
}

/// Takes one whole packet off the front of `buf`. `Ok(None)`: more bytes are needed, and
/// `buf` is untouched. `max_incoming` bounds the whole packet (fixed header included, as
/// MQTT 5's Maximum Packet Size counts it) a peer may announce; it is refused as soon as
/// its header is in, before its body is waited for.
pub fn decode(
    version: ProtocolVersion,
    buf: &mut BytesMut,
    max_incoming: usize,
) -> Result<Option<Packet>, WireError> {
    if let Some((header_len, remaining)) = fixed_header(buf)? {
        let size = header_len + remaining;
        if size > max_incoming {
            return Err(WireError::TooLarge {
                size,
                max: max_incoming,
            });
        }
    }
    match version {
        ProtocolVersion::V311 => match v4::Packet::read(buf, max_incoming) {
            Ok(packet) => Ok(Some(from_v4(packet)?)),
            Err(v4_error::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e.into()),
        },
        ProtocolVersion::V5 => {
            if buf.first().map(|b| b >> 4) == Some(14) {
                return decode_v5_disconnect(buf);
            }
            let max = u32::try_from(max_incoming).unwrap_or(u32::MAX);
            match v5::Packet::read(buf, Some(max)) {
                Ok(packet) => Ok(Some(from_v5(packet)?)),
                Err(v5_error::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Appends `packet` to `buf`.
pub fn encode(
    version: ProtocolVersion,
    packet: &Packet,
    buf: &mut BytesMut,
) -> Result<(), WireError> {
    if let Packet::Publish(p) = packet {
        let fields = PublishFields {
            dup: p.dup,
            qos: p.qos,
            retain: p.retain,
            topic: &p.topic,
            pkid: p.pkid,
            payload: &p.payload,
            props: &p.props,
        };
        return write_publish(version, &fields, buf);
    }
    if let Packet::Connect(c) = packet {
        // The codec patches the connect flags at an offset counted from the start of the
        // buffer, so a CONNECT must be written into a buffer of its own.
        let mut own = BytesMut::new();
        match version {
            ProtocolVersion::V311 => {
                to_v4(packet).write(&mut own, usize::MAX)?;
            }
            ProtocolVersion::V5 => {
                let (connect, will, login) = to_v5_connect(c);
                connect.write(&will, &login, &mut own)?;
            }
        }
        buf.extend_from_slice(&own);
        return Ok(());
    }
    match (version, packet) {
        (ProtocolVersion::V311, _) => {
            to_v4(packet).write(buf, usize::MAX)?;
        }
        (ProtocolVersion::V5, Packet::Disconnect(d)) => write_v5_disconnect(d, buf),
        (ProtocolVersion::V5, _) => {
            if let Some(p) = to_v5(packet) {
                p.write(buf, None)?;
            }
        }
    }
    Ok(())
}

/// MQTT 5 DISCONNECT, written by hand: the codec drops the reason code when there are no
/// properties.
fn write_v5_disconnect(d: &Disconnect, buf: &mut BytesMut) {
    let p = &d.props;
    let mut props = BytesMut::new();
    if let Some(v) = p.session_expiry_interval {
        props.put_u8(17);
        props.put_u32(v);
    }
    let put_str = |props: &mut BytesMut, s: &str| {
        let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        props.put_u16(s.len() as u16);
        props.extend_from_slice(s);
    };
    if let Some(v) = &p.reason_string {
        props.put_u8(31);
        put_str(&mut props, v);
    }
    for (k, v) in &p.user_properties {
        props.put_u8(38);
        put_str(&mut props, k);
        put_str(&mut props, v);
    }
    if let Some(v) = &p.server_reference {
        props.put_u8(28);
        put_str(&mut props, v);
    }
    buf.put_u8(0xE0);
    if d.reason == 0 && props.is_empty() {
        buf.put_u8(0);
        return;
    }
    let remaining = 1 + varint_len(props.len()) + props.len();
    put_varint(buf, remaining);
    buf.put_u8(u8::try_from(d.reason).unwrap_or(128));
    put_varint(buf, props.len());
    buf.extend_from_slice(&props);
}

/// Appends the PUBLISH for `req` with the given packet id and DUP flag. The hot path: no
/// copy of topic or payload beyond the bytes written.
pub fn encode_publish(
    version: ProtocolVersion,
    req: &PublishRequest,
    pkid: u16,
    dup: bool,
    buf: &mut BytesMut,
) -> Result<(), WireError> {
    let fields = PublishFields {
        dup,
        qos: req.qos,
        retain: req.retain,
        topic: &req.topic,
        pkid,
        payload: &req.payload,
        props: &req.props,
    };
    write_publish(version, &fields, buf)
}

/// The size in bytes of the PUBLISH packet `req` becomes (for the broker's Maximum Packet
/// Size), including the fixed header.
pub fn publish_packet_size(version: ProtocolVersion, req: &PublishRequest) -> usize {
    let props_len = match version {
        ProtocolVersion::V311 => 0,
        ProtocolVersion::V5 => publish_props_len(&req.props),
    };
    let pkid_len = if req.qos > 0 { 2 } else { 0 };
    let remaining = 2 + req.topic.len() + pkid_len + props_len + req.payload.len();
    1 + varint_len(remaining) + remaining
}

struct PublishFields<'a> {
    dup: bool,
    qos: u8,
    retain: bool,
    topic: &'a str,
    pkid: u16,
    payload: &'a Bytes,
    props: &'a Props,
}

fn write_publish(
    version: ProtocolVersion,
    p: &PublishFields<'_>,
    buf: &mut BytesMut,
) -> Result<(), WireError> {
    if p.qos > 2 {
        return Err(WireError::Invalid(format!("invalid QoS {}", p.qos)));
    }
    if p.qos > 0 && p.pkid == 0 {
        return Err(WireError::Invalid(
            "PUBLISH with QoS > 0 needs a packet id".into(),
        ));
    }
    if p.topic.len() > u16::MAX as usize {
        return Err(WireError::Invalid("topic longer than 65,535 bytes".into()));
    }
    let v5 = version == ProtocolVersion::V5;
    let props_section = if v5 && has_publish_props(p.props) {
        publish_props_section(p.props)
    } else {
        BytesMut::new()
    };
    // MQTT 5 without properties still has a property length: a single 0.
    let props_len = if v5 { props_section.len().max(1) } else { 0 };
    let pkid_len = if p.qos > 0 { 2 } else { 0 };
    let remaining = 2 + p.topic.len() + pkid_len + props_len + p.payload.len();
    if remaining > MAX_REMAINING_LENGTH {
        return Err(WireError::Invalid(format!(
            "PUBLISH of {remaining} bytes exceeds the MQTT limit"
        )));
    }
    buf.reserve(1 + 4 + remaining);
    buf.put_u8(0b0011_0000 | (p.retain as u8) | (p.qos << 1) | ((p.dup as u8) << 3));
    put_varint(buf, remaining);
    buf.put_u16(p.topic.len() as u16);
    buf.extend_from_slice(p.topic.as_bytes());
    if p.qos > 0 {
        buf.put_u16(p.pkid);
    }
    if v5 && props_section.is_empty() {
        buf.put_u8(0);
    } else {
        buf.extend_from_slice(&props_section);
    }
    buf.extend_from_slice(p.payload);
    Ok(())
}

/// The MQTT 5 PUBLISH property section: its length prefix and the properties. Empty
/// (no allocation) when there are no properties: the caller writes the single 0 byte.
fn publish_props_section(props: &Props) -> BytesMut {
    let mut section = BytesMut::new();
    if let Some(p) = publish_props_to_v5(props) {
        // Writing into an owned buffer cannot fail for lengths MQTT can express; an
        // impossible length is caught by the caller's remaining-length check.
        if p.write(&mut section).is_err() {
            section.clear();
        }
    }
    section
}

/// Whether `props` holds anything a PUBLISH carries.
fn has_publish_props(p: &Props) -> bool {
    p.payload_format_indicator.is_some()
        || p.message_expiry_interval.is_some()
        || p.topic_alias.is_some()
        || p.response_topic.is_some()
        || p.correlation_data.is_some()
        || !p.user_properties.is_empty()
        || !p.subscription_identifiers.is_empty()
        || p.content_type.is_some()
}

/// Length of the MQTT 5 property section of a PUBLISH (at least its 1-byte length).
fn publish_props_len(props: &Props) -> usize {
    if has_publish_props(props) {
        publish_props_section(props).len().max(1)
    } else {
        1
    }
}

fn varint_len(len: usize) -> usize {
    match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_varint(buf: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

/// Reads a fixed header: `(header length, remaining length)`, or `None` for more bytes.
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, WireError> {
    let mut len = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        len += ((byte & 0x7F) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((i + 2, len)));
        }
    }
    if buf.len() >= 5 {
        return Err(WireError::Invalid("malformed remaining length".into()));
    }
    Ok(None)
}

fn decode_v5_disconnect(buf: &mut BytesMut) -> Result<Option<Packet>, WireError> {
    let Some((header_len, remaining)) = fixed_header(buf)? else {
        return Ok(None);
    };
    if buf.len() < header_len + remaining {
        return Ok(None);
    }
    let mut frame = buf.split_to(header_len + remaining).freeze();
    let _ = frame.split_to(header_len);
    let reason = frame.first().copied().unwrap_or(0) as i32;
    let mut props = Props::default();
    if frame.len() > 1 {
        let _ = frame.split_to(1);
        if let Some(p) = v5::DisconnectProperties::extract(&mut frame)? {
            props.session_expiry_interval = p.session_expiry_interval;
            props.reason_string = p.reason_string;
            props.user_properties = p.user_properties;
            props.server_reference = p.server_reference;
        }
    }
    Ok(Some(Packet::Disconnect(Disconnect { reason, props })))
}

// ---- MQTT 3.1.1 ----

fn qos_v4(qos: u8) -> v4_qos::QoS {
    match qos {
        0 => v4_qos::QoS::AtMostOnce,
        1 => v4_qos::QoS::AtLeastOnce,
        _ => v4_qos::QoS::ExactlyOnce,
    }
}

mod v4_qos {
    pub use rumqttc::mqttbytes::QoS;
}
mod v5_qos {
    pub use rumqttc::v5::mqttbytes::QoS;
}

fn from_v4(packet: v4::Packet) -> Result<Packet, WireError> {
    use v4::Packet as P;
    Ok(match packet {
        P::Connect(c) => Packet::Connect(Box::new(Connect {
            client_id: c.client_id,
            clean_session: c.clean_session,
            keepalive_secs: c.keep_alive,
            username: c
                .login
                .as_ref()
                .map(|l| l.username.clone())
                .filter(|u| !u.is_empty()),
            password: c
                .login
                .as_ref()
                .map(|l| l.password.clone())
                .filter(|p| !p.is_empty()),
            will: c.last_will.map(|w| Will {
                topic: w.topic,
                payload: w.message,
                qos: w.qos as u8,
                retain: w.retain,
                props: Props::default(),
            }),
            props: Props::default(),
        })),
        P::ConnAck(c) => Packet::ConnAck(ConnAck {
            session_present: c.session_present,
            reason: v3_connack_to_reason(c.code as u8),
            props: Props::default(),
        }),
        P::Publish(p) => Packet::Publish(Publish {
            dup: p.dup,
            qos: p.qos as u8,
            retain: p.retain,
            topic: p.topic,
            pkid: p.pkid,
            payload: p.payload,
            props: Props::default(),
        }),
        P::PubAck(a) => Packet::PubAck(Ack::success(a.pkid)),
        P::PubRec(a) => Packet::PubRec(Ack::success(a.pkid)),
        P::PubRel(a) => Packet::PubRel(Ack::success(a.pkid)),
        P::PubComp(a) => Packet::PubComp(Ack::success(a.pkid)),
        P::Subscribe(s) => {
            let filter = s
                .filters
                .into_iter()
                .next()
                .ok_or_else(|| WireError::Invalid("SUBSCRIBE without a topic filter".into()))?;
            Packet::Subscribe(Subscribe {
                pkid: s.pkid,
                filter: filter.path,
                qos: filter.qos as u8,
                props: Props::default(),
            })
        }
        P::SubAck(s) => Packet::SubAck(SubAck {
            pkid: s.pkid,
            reasons: s
                .return_codes
                .iter()
                .map(|c| match c {
                    v4::SubscribeReasonCode::Success(q) => *q as u8,
                    v4::SubscribeReasonCode::Failure => 0x80,
                })
                .collect(),
            props: Props::default(),
        }),
        P::Unsubscribe(u) => Packet::Unsubscribe(Unsubscribe {
            pkid: u.pkid,
            filter: u.topics.into_iter().next().unwrap_or_default(),
            props: Props::default(),
        }),
        P::UnsubAck(u) => Packet::UnsubAck(UnsubAck {
            pkid: u.pkid,
            reasons: Vec::new(),
            props: Props::default(),
        }),
        P::PingReq => Packet::PingReq,
        P::PingResp => Packet::PingResp,
        P::Disconnect => Packet::Disconnect(Disconnect {
            reason: 0,
            props: Props::default(),
        }),
    })
}

fn v4_connack_code(reason: i32) -> v4::ConnectReturnCode {
    use v4::ConnectReturnCode as C;
    match reason {
        0 => C::Success,
        132 => C::RefusedProtocolVersion,
        133 => C::BadClientId,
        134 => C::BadUserNamePassword,
        135 => C::NotAuthorized,
        _ => C::ServiceUnavailable,
    }
}

fn to_v4(packet: &Packet) -> v4::Packet {
    use v4::Packet as P;
    match packet {
        Packet::Connect(c) => {
            let login = if c.username.is_some() || c.password.is_some() {
                Some(v4::Login {
                    username: c.username.clone().unwrap_or_default(),
                    password: c.password.clone().unwrap_or_default(),
                })
            } else {
                None
            };
            P::Connect(v4::Connect {
                protocol: v4_protocol::Protocol::V4,
                keep_alive: c.keepalive_secs,
                client_id: c.client_id.clone(),
                clean_session: c.clean_session,
                last_will: c.will.as_ref().map(|w| v4::LastWill {
                    topic: w.topic.clone(),
                    message: w.payload.clone(),
                    qos: qos_v4(w.qos),
                    retain: w.retain,
                }),
                login,
            })
        }
        Packet::ConnAck(c) => P::ConnAck(v4::ConnAck {
            session_present: c.session_present,
            code: v4_connack_code(c.reason),
        }),
        Packet::Publish(p) => P::Publish(v4::Publish {
            dup: p.dup,
            qos: qos_v4(p.qos),
            retain: p.retain,
            topic: p.topic.clone(),
            pkid: p.pkid,
            payload: p.payload.clone(),
        }),
        Packet::PubAck(a) => P::PubAck(v4::PubAck { pkid: a.pkid }),
        Packet::PubRec(a) => P::PubRec(v4::PubRec { pkid: a.pkid }),
        Packet::PubRel(a) => P::PubRel(v4::PubRel { pkid: a.pkid }),
        Packet::PubComp(a) => P::PubComp(v4::PubComp { pkid: a.pkid }),
        Packet::Subscribe(s) => P::Subscribe(v4::Subscribe {
            pkid: s.pkid,
            filters: vec![v4::SubscribeFilter::new(s.filter.clone(), qos_v4(s.qos))],
        }),
        Packet::SubAck(s) => P::SubAck(v4::SubAck {
            pkid: s.pkid,
            return_codes: s
                .reasons
                .iter()
                .map(|&r| match r {
                    0..=2 => v4::SubscribeReasonCode::Success(qos_v4(r)),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        }),
        Packet::Unsubscribe(u) => P::Unsubscribe(v4::Unsubscribe {
            pkid: u.pkid,
            topics: vec![u.filter.clone()],
        }),
        Packet::UnsubAck(u) => P::UnsubAck(v4::UnsubAck { pkid: u.pkid }),
        Packet::PingReq => P::PingReq,
        Packet::PingResp => P::PingResp,
        Packet::Disconnect(_) => P::Disconnect,
    }
}

mod v4_protocol {
    pub use rumqttc::mqttbytes::Protocol;
}

// ---- MQTT 5 ----

fn qos_v5(qos: u8) -> v5_qos::QoS {
    match qos {
        0 => v5_qos::QoS::AtMostOnce,
        1 => v5_qos::QoS::AtLeastOnce,
        _ => v5_qos::QoS::ExactlyOnce,
    }
}

fn utf8(bytes: Bytes, what: &str) -> Result<String, WireError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| WireError::Invalid(format!("{what} is not valid UTF-8")))
}

fn publish_props_to_v5(p: &Props) -> Option<v5::PublishProperties> {
    let props = v5::PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        topic_alias: p.topic_alias,
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        subscription_identifiers: p.subscription_identifiers.clone(),
        content_type: p.content_type.clone(),
    };
    (props != v5::PublishProperties::default()).then_some(props)
}

fn publish_props_from_v5(p: Option<v5::PublishProperties>) -> Props {
    let mut props = Props::default();
    if let Some(p) = p {
        props.payload_format_indicator = p.payload_format_indicator;
        props.message_expiry_interval = p.message_expiry_interval;
        props.topic_alias = p.topic_alias;
        props.response_topic = p.response_topic;
        props.correlation_data = p.correlation_data;
        props.user_properties = p.user_properties;
        props.subscription_identifiers = p.subscription_identifiers;
        props.content_type = p.content_type;
    }
    props
}

fn will_props_to_v5(p: &Props) -> Option<v5::LastWillProperties> {
    let props = v5::LastWillProperties {
        delay_interval: None,
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
    };
    let empty = props.payload_format_indicator.is_none()
        && props.message_expiry_interval.is_none()
        && props.content_type.is_none()
        && props.response_topic.is_none()
        && props.correlation_data.is_none()
        && props.user_properties.is_empty();
    (!empty).then_some(props)
}

fn connect_props_to_v5(p: &Props) -> Option<v5::ConnectProperties> {
    let props = v5::ConnectProperties {
        session_expiry_interval: p.session_expiry_interval,
        receive_maximum: p.receive_maximum,
        max_packet_size: p.maximum_packet_size,
        topic_alias_max: p.topic_alias_maximum,
        request_response_info: p.request_response_information,
        request_problem_info: p.request_problem_information,
        user_properties: p.user_properties.clone(),
        authentication_method: p.authentication_method.clone(),
        authentication_data: None,
    };
    (props != v5::ConnectProperties::new()).then_some(props)
}

fn connect_props_from_v5(p: Option<v5::ConnectProperties>) -> Props {
    let mut props = Props::default();
    if let Some(p) = p {
        props.session_expiry_interval = p.session_expiry_interval;
        props.receive_maximum = p.receive_maximum;
        props.maximum_packet_size = p.max_packet_size;
        props.topic_alias_maximum = p.topic_alias_max;
        props.request_response_information = p.request_response_info;
        props.request_problem_information = p.request_problem_info;
        props.user_properties = p.user_properties;
        props.authentication_method = p.authentication_method;
    }
    props
}

fn connack_props_from_v5(p: Option<v5::ConnAckProperties>) -> Props {
    let mut props = Props::default();
    if let Some(p) = p {
        props.session_expiry_interval = p.session_expiry_interval;
        props.receive_maximum = p.receive_max;
        props.maximum_qos = p.max_qos;
        props.retain_available = p.retain_available;
        props.maximum_packet_size = p.max_packet_size;
        props.assigned_client_identifier = p.assigned_client_identifier;
        props.topic_alias_maximum = p.topic_alias_max;
        props.reason_string = p.reason_string;
        props.user_properties = p.user_properties;
        props.wildcard_subscription_available = p.wildcard_subscription_available;
        props.subscription_identifier_available = p.subscription_identifiers_available;
        props.shared_subscription_available = p.shared_subscription_available;
        props.server_keep_alive = p.server_keep_alive;
        props.response_information = p.response_information;
        props.server_reference = p.server_reference;
        props.authentication_method = p.authentication_method;
    }
    props
}

fn connack_props_to_v5(p: &Props) -> Option<v5::ConnAckProperties> {
    if p.is_empty() {
        return None;
    }
    Some(v5::ConnAckProperties {
        session_expiry_interval: p.session_expiry_interval,
        receive_max: p.receive_maximum,
        max_qos: p.maximum_qos,
        retain_available: p.retain_available,
        max_packet_size: p.maximum_packet_size,
        assigned_client_identifier: p.assigned_client_identifier.clone(),
        topic_alias_max: p.topic_alias_maximum,
        reason_string: p.reason_string.clone(),
        user_properties: p.user_properties.clone(),
        wildcard_subscription_available: p.wildcard_subscription_available,
        subscription_identifiers_available: p.subscription_identifier_available,
        shared_subscription_available: p.shared_subscription_available,
        server_keep_alive: p.server_keep_alive,
        response_information: p.response_information.clone(),
        server_reference: p.server_reference.clone(),
        authentication_method: p.authentication_method.clone(),
        authentication_data: None,
    })
}

/// The acks' property structs all carry a reason string and user properties.
macro_rules! ack_props {
    ($to:ident, $from:ident, $ty:ty) => {
        fn $to(p: &Props) -> Option<$ty> {
            if p.reason_string.is_none() && p.user_properties.is_empty() {
                return None;
            }
            Some(<$ty>::from_parts(p))
        }

        fn $from(p: Option<$ty>) -> Props {
            let mut props = Props::default();
            if let Some(p) = p {
                props.reason_string = p.reason_string;
                props.user_properties = p.user_properties;
            }
            props
        }
    };
}

trait FromParts {
    fn from_parts(p: &Props) -> Self;
}

macro_rules! from_parts {
    ($($ty:ty),*) => {$(
        impl FromParts for $ty {
            fn from_parts(p: &Props) -> Self {
                Self {
                    reason_string: p.reason_string.clone(),
                    user_properties: p.user_properties.clone(),
                }
            }
        }
    )*};
}

from_parts!(
    v5::PubAckProperties,
    v5::PubRecProperties,
    v5::PubRelProperties,
    v5::PubCompProperties,
    v5::SubAckProperties,
    v5::UnsubAckProperties
);

ack_props!(
    puback_props_to_v5,
    puback_props_from_v5,
    v5::PubAckProperties
);
ack_props!(
    pubrec_props_to_v5,
    pubrec_props_from_v5,
    v5::PubRecProperties
);
ack_props!(
    pubrel_props_to_v5,
    pubrel_props_from_v5,
    v5::PubRelProperties
);
ack_props!(
    pubcomp_props_to_v5,
    pubcomp_props_from_v5,
    v5::PubCompProperties
);
ack_props!(
    suback_props_to_v5,
    suback_props_from_v5,
    v5::SubAckProperties
);
ack_props!(
    unsuback_props_to_v5,
    unsuback_props_from_v5,
    v5::UnsubAckProperties
);

fn puback_reason(r: v5::PubAckReason) -> i32 {
    use v5::PubAckReason as R;
    match r {
        R::Success => 0,
        R::NoMatchingSubscribers => 16,
        R::UnspecifiedError => 128,
        R::ImplementationSpecificError => 131,
        R::NotAuthorized => 135,
        R::TopicNameInvalid => 144,
        R::PacketIdentifierInUse => 145,
        R::QuotaExceeded => 151,
        R::PayloadFormatInvalid => 153,
    }
}

fn puback_reason_v5(r: i32) -> v5::PubAckReason {
    use v5::PubAckReason as R;
    match r {
        0 => R::Success,
        16 => R::NoMatchingSubscribers,
        131 => R::ImplementationSpecificError,
        135 => R::NotAuthorized,
        144 => R::TopicNameInvalid,
        145 => R::PacketIdentifierInUse,
        151 => R::QuotaExceeded,
        153 => R::PayloadFormatInvalid,
        _ => R::UnspecifiedError,
    }
}

fn pubrec_reason(r: v5::PubRecReason) -> i32 {
    use v5::PubRecReason as R;
    match r {
        R::Success => 0,
        R::NoMatchingSubscribers => 16,
        R::UnspecifiedError => 128,
        R::ImplementationSpecificError => 131,
        R::NotAuthorized => 135,
        R::TopicNameInvalid => 144,
        R::PacketIdentifierInUse => 145,
        R::QuotaExceeded => 151,
        R::PayloadFormatInvalid => 153,
    }
}

fn pubrec_reason_v5(r: i32) -> v5::PubRecReason {
    use v5::PubRecReason as R;
    match r {
        0 => R::Success,
        16 => R::NoMatchingSubscribers,
        131 => R::ImplementationSpecificError,
        135 => R::NotAuthorized,
        144 => R::TopicNameInvalid,
        145 => R::PacketIdentifierInUse,
        151 => R::QuotaExceeded,
        153 => R::PayloadFormatInvalid,
        _ => R::UnspecifiedError,
    }
}

fn pubrel_reason(r: v5::PubRelReason) -> i32 {
    match r {
        v5::PubRelReason::Success => 0,
        v5::PubRelReason::PacketIdentifierNotFound => 146,
    }
}

fn pubcomp_reason(r: v5::PubCompReason) -> i32 {
    match r {
        v5::PubCompReason::Success => 0,
        v5::PubCompReason::PacketIdentifierNotFound => 146,
    }
}

fn suback_code(c: v5::SubscribeReasonCode) -> u8 {
    use v5::SubscribeReasonCode as C;
    match c {
        C::Success(q) => q as u8,
        C::Failure | C::Unspecified => 128,
        C::ImplementationSpecific => 131,
        C::NotAuthorized => 135,
        C::TopicFilterInvalid => 143,
        C::PkidInUse => 145,
        C::QuotaExceeded => 151,
        C::SharedSubscriptionsNotSupported => 158,
        C::SubscriptionIdNotSupported => 161,
        C::WildcardSubscriptionsNotSupported => 162,
    }
}

fn suback_code_v5(c: u8) -> v5::SubscribeReasonCode {
    use v5::SubscribeReasonCode as C;
    match c {
        0..=2 => C::Success(qos_v5(c)),
        131 => C::ImplementationSpecific,
        135 => C::NotAuthorized,
        143 => C::TopicFilterInvalid,
        145 => C::PkidInUse,
        151 => C::QuotaExceeded,
        158 => C::SharedSubscriptionsNotSupported,
        161 => C::SubscriptionIdNotSupported,
        162 => C::WildcardSubscriptionsNotSupported,
        _ => C::Unspecified,
    }
}

fn unsuback_code(r: v5::UnsubAckReason) -> u8 {
    use v5::UnsubAckReason as R;
    match r {
        R::Success => 0,
        R::NoSubscriptionExisted => 17,
        R::UnspecifiedError => 128,
        R::ImplementationSpecificError => 131,
        R::NotAuthorized => 135,
        R::TopicFilterInvalid => 143,
        R::PacketIdentifierInUse => 145,
    }
}

fn unsuback_code_v5(c: u8) -> v5::UnsubAckReason {
    use v5::UnsubAckReason as R;
    match c {
        0 => R::Success,
        17 => R::NoSubscriptionExisted,
        131 => R::ImplementationSpecificError,
        135 => R::NotAuthorized,
        143 => R::TopicFilterInvalid,
        145 => R::PacketIdentifierInUse,
        _ => R::UnspecifiedError,
    }
}

fn connack_code_v5(reason: i32) -> v5::ConnectReturnCode {
    use v5::ConnectReturnCode as C;
    match reason {
        0 => C::Success,
        129 => C::MalformedPacket,
        130 => C::ProtocolError,
        131 => C::ImplementationSpecificError,
        132 => C::UnsupportedProtocolVersion,
        133 => C::ClientIdentifierNotValid,
        134 => C::BadUserNamePassword,
        135 => C::NotAuthorized,
        136 => C::ServerUnavailable,
        137 => C::ServerBusy,
        138 => C::Banned,
        140 => C::BadAuthenticationMethod,
        144 => C::TopicNameInvalid,
        149 => C::PacketTooLarge,
        151 => C::QuotaExceeded,
        153 => C::PayloadFormatInvalid,
        154 => C::RetainNotSupported,
        155 => C::QoSNotSupported,
        156 => C::UseAnotherServer,
        157 => C::ServerMoved,
        159 => C::ConnectionRateExceeded,
        _ => C::UnspecifiedError,
    }
}

fn connack_reason(code: v5::ConnectReturnCode) -> i32 {
    use v5::ConnectReturnCode as C;
    match code {
        C::Success => 0,
        C::RefusedProtocolVersion => 132,
        C::BadClientId => 133,
        C::ServiceUnavailable => 136,
        C::UnspecifiedError => 128,
        C::MalformedPacket => 129,
        C::ProtocolError => 130,
        C::ImplementationSpecificError => 131,
        C::UnsupportedProtocolVersion => 132,
        C::ClientIdentifierNotValid => 133,
        C::BadUserNamePassword => 134,
        C::NotAuthorized => 135,
        C::ServerUnavailable => 136,
        C::ServerBusy => 137,
        C::Banned => 138,
        C::BadAuthenticationMethod => 140,
        C::TopicNameInvalid => 144,
        C::PacketTooLarge => 149,
        C::QuotaExceeded => 151,
        C::PayloadFormatInvalid => 153,
        C::RetainNotSupported => 154,
        C::QoSNotSupported => 155,
        C::UseAnotherServer => 156,
        C::ServerMoved => 157,
        C::ConnectionRateExceeded => 159,
    }
}

fn to_v5_connect(c: &Connect) -> (v5::Connect, Option<v5::LastWill>, Option<v5::Login>) {
    let connect = v5::Connect {
        keep_alive: c.keepalive_secs,
        client_id: c.client_id.clone(),
        clean_start: c.clean_session,
        properties: connect_props_to_v5(&c.props),
    };
    let will = c.will.as_ref().map(|w| v5::LastWill {
        topic: Bytes::copy_from_slice(w.topic.as_bytes()),
        message: w.payload.clone(),
        qos: qos_v5(w.qos),
        retain: w.retain,
        properties: will_props_to_v5(&w.props),
    });
    let login = if c.username.is_some() || c.password.is_some() {
        Some(v5::Login {
            username: c.username.clone().unwrap_or_default(),
            password: c.password.clone().unwrap_or_default(),
        })
    } else {
        None
    };
    (connect, will, login)
}

fn from_v5(packet: v5::Packet) -> Result<Packet, WireError> {
    use v5::Packet as P;
    Ok(match packet {
        P::Auth(_) => return Err(WireError::Unsupported("AUTH")),
        P::Connect(c, will, login) => {
            let will = match will {
                Some(w) => Some(Will {
                    topic: utf8(w.topic, "will topic")?,
                    payload: w.message,
                    qos: w.qos as u8,
                    retain: w.retain,
                    props: w
                        .properties
                        .map(|p| Props {
                            payload_format_indicator: p.payload_format_indicator,
                            message_expiry_interval: p.message_expiry_interval,
                            content_type: p.content_type,
                            response_topic: p.response_topic,
                            correlation_data: p.correlation_data,
                            user_properties: p.user_properties,
                            ..Props::default()
                        })
                        .unwrap_or_default(),
                }),
                None => None,
            };
            Packet::Connect(Box::new(Connect {
                client_id: c.client_id,
                clean_session: c.clean_start,
                keepalive_secs: c.keep_alive,
                username: login
                    .as_ref()
                    .map(|l| l.username.clone())
                    .filter(|u| !u.is_empty()),
                password: login
                    .as_ref()
                    .map(|l| l.password.clone())
                    .filter(|p| !p.is_empty()),
                will,
                props: connect_props_from_v5(c.properties),
            }))
        }
        P::ConnAck(c) => Packet::ConnAck(ConnAck {
            session_present: c.session_present,
            reason: connack_reason(c.code),
            props: connack_props_from_v5(c.properties),
        }),
        P::Publish(p) => Packet::Publish(Publish {
            dup: p.dup,
            qos: p.qos as u8,
            retain: p.retain,
            topic: utf8(p.topic, "topic")?,
            pkid: p.pkid,
            payload: p.payload,
            props: publish_props_from_v5(p.properties),
        }),
        P::PubAck(a) => Packet::PubAck(Ack {
            pkid: a.pkid,
            reason: puback_reason(a.reason),
            props: puback_props_from_v5(a.properties),
        }),
        P::PubRec(a) => Packet::PubRec(Ack {
            pkid: a.pkid,
            reason: pubrec_reason(a.reason),
            props: pubrec_props_from_v5(a.properties),
        }),
        P::PubRel(a) => Packet::PubRel(Ack {
            pkid: a.pkid,
            reason: pubrel_reason(a.reason),
            props: pubrel_props_from_v5(a.properties),
        }),
        P::PubComp(a) => Packet::PubComp(Ack {
            pkid: a.pkid,
            reason: pubcomp_reason(a.reason),
            props: pubcomp_props_from_v5(a.properties),
        }),
        P::Subscribe(s) => {
            let filter = s
                .filters
                .into_iter()
                .next()
                .ok_or_else(|| WireError::Invalid("SUBSCRIBE without a topic filter".into()))?;
            let mut props = Props::default();
            if let Some(p) = s.properties {
                props.subscription_identifiers.extend(p.id);
                props.user_properties = p.user_properties;
            }
            Packet::Subscribe(Subscribe {
                pkid: s.pkid,
                filter: filter.path,
                qos: filter.qos as u8,
                props,
            })
        }
        P::SubAck(s) => Packet::SubAck(SubAck {
            pkid: s.pkid,
            reasons: s.return_codes.into_iter().map(suback_code).collect(),
            props: suback_props_from_v5(s.properties),
        }),
        P::Unsubscribe(u) => Packet::Unsubscribe(Unsubscribe {
            pkid: u.pkid,
            filter: u.filters.into_iter().next().unwrap_or_default(),
            props: Props {
                user_properties: u.properties.map(|p| p.user_properties).unwrap_or_default(),
                ..Props::default()
            },
        }),
        P::UnsubAck(u) => Packet::UnsubAck(UnsubAck {
            pkid: u.pkid,
            reasons: u.reasons.into_iter().map(unsuback_code).collect(),
            props: unsuback_props_from_v5(u.properties),
        }),
        P::PingReq(_) => Packet::PingReq,
        P::PingResp(_) => Packet::PingResp,
        P::Disconnect(d) => Packet::Disconnect(Disconnect {
            reason: d.reason_code as i32,
            props: d
                .properties
                .map(|p| Props {
                    session_expiry_interval: p.session_expiry_interval,
                    reason_string: p.reason_string,
                    user_properties: p.user_properties,
                    server_reference: p.server_reference,
                    ..Props::default()
                })
                .unwrap_or_default(),
        }),
    })
}

/// `None` for DISCONNECT, which [`write_v5_disconnect`] writes.
fn to_v5(packet: &Packet) -> Option<v5::Packet> {
    use v5::Packet as P;
    Some(match packet {
        Packet::Connect(c) => {
            let (connect, will, login) = to_v5_connect(c);
            P::Connect(connect, will, login)
        }
        Packet::ConnAck(c) => P::ConnAck(v5::ConnAck {
            session_present: c.session_present,
            code: connack_code_v5(c.reason),
            properties: connack_props_to_v5(&c.props),
        }),
        Packet::Publish(p) => P::Publish(v5::Publish {
            dup: p.dup,
            qos: qos_v5(p.qos),
            retain: p.retain,
            topic: Bytes::copy_from_slice(p.topic.as_bytes()),
            pkid: p.pkid,
            payload: p.payload.clone(),
            properties: publish_props_to_v5(&p.props),
        }),
        Packet::PubAck(a) => P::PubAck(v5::PubAck {
            pkid: a.pkid,
            reason: puback_reason_v5(a.reason),
            properties: puback_props_to_v5(&a.props),
        }),
        Packet::PubRec(a) => P::PubRec(v5::PubRec {
            pkid: a.pkid,
            reason: pubrec_reason_v5(a.reason),
            properties: pubrec_props_to_v5(&a.props),
        }),
        Packet::PubRel(a) => P::PubRel(v5::PubRel {
            pkid: a.pkid,
            reason: if a.reason == 146 {
                v5::PubRelReason::PacketIdentifierNotFound
            } else {
                v5::PubRelReason::Success
            },
            properties: pubrel_props_to_v5(&a.props),
        }),
        Packet::PubComp(a) => P::PubComp(v5::PubComp {
            pkid: a.pkid,
            reason: if a.reason == 146 {
                v5::PubCompReason::PacketIdentifierNotFound
            } else {
                v5::PubCompReason::Success
            },
            properties: pubcomp_props_to_v5(&a.props),
        }),
        Packet::Subscribe(s) => {
            let properties = if s.props.subscription_identifiers.is_empty()
                && s.props.user_properties.is_empty()
            {
                None
            } else {
                Some(v5::SubscribeProperties {
                    id: s.props.subscription_identifiers.first().copied(),
                    user_properties: s.props.user_properties.clone(),
                })
            };
            P::Subscribe(v5::Subscribe {
                pkid: s.pkid,
                filters: vec![v5::Filter::new(s.filter.clone(), qos_v5(s.qos))],
                properties,
            })
        }
        Packet::SubAck(s) => P::SubAck(v5::SubAck {
            pkid: s.pkid,
            return_codes: s.reasons.iter().map(|&c| suback_code_v5(c)).collect(),
            properties: suback_props_to_v5(&s.props),
        }),
        Packet::Unsubscribe(u) => P::Unsubscribe(v5::Unsubscribe {
            pkid: u.pkid,
            filters: vec![u.filter.clone()],
            properties: (!u.props.user_properties.is_empty()).then(|| v5::UnsubscribeProperties {
                user_properties: u.props.user_properties.clone(),
            }),
        }),
        Packet::UnsubAck(u) => P::UnsubAck(v5::UnsubAck {
            pkid: u.pkid,
            reasons: u.reasons.iter().map(|&c| unsuback_code_v5(c)).collect(),
            properties: unsuback_props_to_v5(&u.props),
        }),
        Packet::PingReq => P::PingReq(v5::PingReq),
        Packet::PingResp => P::PingResp(v5::PingResp),
        Packet::Disconnect(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: [ProtocolVersion; 2] = [ProtocolVersion::V311, ProtocolVersion::V5];

    fn round_trip(version: ProtocolVersion, packet: &Packet) -> Packet {
        let mut buf = BytesMut::new();
        encode(version, packet, &mut buf).expect("encode");
        let whole = buf.clone();
        // Every proper prefix asks for more bytes and leaves the buffer alone.
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(
                decode(version, &mut part, MAX_REMAINING_LENGTH).expect("prefix"),
                None,
                "prefix of {cut} bytes of {packet:?}"
            );
            assert_eq!(part.len(), cut);
        }
        let decoded = decode(version, &mut buf, MAX_REMAINING_LENGTH)
            .expect("decode")
            .expect("a whole packet");
        assert!(buf.is_empty(), "decode consumed the whole packet");
        decoded
    }

    fn rich_props() -> Props {
        Props {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(300),
            content_type: Some("application/json".into()),
            response_topic: Some("reply/here".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
            user_properties: vec![("k".into(), "v1".into()), ("k".into(), "v2".into())],
            ..Props::default()
        }
    }

    fn publish(qos: u8, props: Props) -> Publish {
        Publish {
            dup: qos > 0,
            qos,
            retain: true,
            topic: "home/sensor/state".into(),
            pkid: if qos > 0 { 4711 } else { 0 },
            payload: Bytes::from_static(b"\x00\xffbinary"),
            props,
        }
    }

    #[test]
    fn publishes_of_every_qos_round_trip_on_both_versions() {
        for version in BOTH {
            for qos in 0..=2 {
                let packet = Packet::Publish(publish(qos, Props::default()));
                assert_eq!(round_trip(version, &packet), packet);
            }
        }
    }

    #[test]
    fn publish_properties_round_trip_on_mqtt5() {
        let packet = Packet::Publish(publish(1, rich_props()));
        assert_eq!(round_trip(ProtocolVersion::V5, &packet), packet);
    }

    #[test]
    fn the_hand_written_publish_matches_the_codec_byte_for_byte() {
        let p = publish(2, Props::default());
        let mut ours = BytesMut::new();
        encode(
            ProtocolVersion::V311,
            &Packet::Publish(p.clone()),
            &mut ours,
        )
        .unwrap();
        let mut theirs = BytesMut::new();
        to_v4(&Packet::Publish(p.clone()))
            .write(&mut theirs, usize::MAX)
            .unwrap();
        assert_eq!(ours, theirs);

        for p in [publish(0, Props::default()), publish(1, rich_props())] {
            let mut ours = BytesMut::new();
            encode(ProtocolVersion::V5, &Packet::Publish(p.clone()), &mut ours).unwrap();
            let mut theirs = BytesMut::new();
            to_v5(&Packet::Publish(p))
                .unwrap()
                .write(&mut theirs, None)
                .unwrap();
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn publish_packet_size_is_the_encoded_length() {
        for version in BOTH {
            for (qos, props) in [(0, Props::default()), (1, rich_props()), (2, rich_props())] {
                let props = if version == ProtocolVersion::V311 {
                    Props::default()
                } else {
                    props
                };
                let req = PublishRequest {
                    msg_id: 1,
                    topic: "t".repeat(200),
                    payload: Bytes::from(vec![7u8; 20_000]),
                    qos,
                    retain: false,
                    props,
                };
                let mut buf = BytesMut::new();
                encode_publish(version, &req, 9, false, &mut buf).unwrap();
                assert_eq!(publish_packet_size(version, &req), buf.len());
            }
        }
    }

    #[test]
    fn connect_with_will_and_login_round_trips_on_both_versions() {
        for version in BOTH {
            let v5 = version == ProtocolVersion::V5;
            let packet = Packet::Connect(Box::new(Connect {
                client_id: "living-room".into(),
                clean_session: false,
                keepalive_secs: 60,
                username: Some("user".into()),
                password: Some("secret".into()),
                will: Some(Will {
                    topic: "will/topic".into(),
                    payload: Bytes::from_static(b"gone"),
                    qos: 1,
                    retain: true,
                    props: if v5 { rich_props() } else { Props::default() },
                }),
                props: if v5 {
                    Props {
                        session_expiry_interval: Some(3600),
                        receive_maximum: Some(100),
                        user_properties: vec![("a".into(), "b".into())],
                        ..Props::default()
                    }
                } else {
                    Props::default()
                },
            }));
            assert_eq!(round_trip(version, &packet), packet);
        }
    }

    #[test]
    fn a_connect_lands_intact_after_other_bytes_in_the_buffer() {
        let connect = Packet::Connect(Box::new(Connect {
            client_id: "c".into(),
            clean_session: true,
            keepalive_secs: 5,
            username: Some("u".into()),
            password: None,
            will: None,
            props: Props::default(),
        }));
        for version in BOTH {
            let mut buf = BytesMut::new();
            encode(version, &Packet::PingReq, &mut buf).unwrap();
            encode(version, &connect, &mut buf).unwrap();
            assert_eq!(
                decode(version, &mut buf, MAX_REMAINING_LENGTH).unwrap(),
                Some(Packet::PingReq)
            );
            assert_eq!(
                decode(version, &mut buf, MAX_REMAINING_LENGTH).unwrap(),
                Some(connect.clone())
            );
        }
    }

    #[test]
    fn connack_codes_of_mqtt311_arrive_as_v5_reasons() {
        for reason in [0, 132, 133, 134, 135, 136] {
            let packet = Packet::ConnAck(ConnAck {
                session_present: reason == 0,
                reason,
                props: Props::default(),
            });
            assert_eq!(round_trip(ProtocolVersion::V311, &packet), packet);
        }
    }

    #[test]
    fn connack_properties_round_trip_on_mqtt5() {
        let packet = Packet::ConnAck(ConnAck {
            session_present: true,
            reason: 0,
            props: Props {
                receive_maximum: Some(20),
                maximum_qos: Some(1),
                retain_available: Some(1),
                maximum_packet_size: Some(1024),
                assigned_client_identifier: Some("auto-1".into()),
                server_keep_alive: Some(30),
                user_properties: vec![("x".into(), "y".into())],
                ..Props::default()
            },
        });
        assert_eq!(round_trip(ProtocolVersion::V5, &packet), packet);
    }

    #[test]
    fn acks_round_trip_with_reasons_and_properties() {
        let props = Props {
            reason_string: Some("why".into()),
            user_properties: vec![("k".into(), "v".into())],
            ..Props::default()
        };
        for version in BOTH {
            let v5 = version == ProtocolVersion::V5;
            let ack = |reason: i32| Ack {
                pkid: 65535,
                reason: if v5 { reason } else { 0 },
                props: if v5 { props.clone() } else { Props::default() },
            };
            for packet in [
                Packet::PubAck(ack(16)),
                Packet::PubAck(ack(135)),
                Packet::PubRec(ack(0)),
                Packet::PubRel(ack(146)),
                Packet::PubComp(ack(146)),
                Packet::PubAck(Ack::success(1)),
            ] {
                assert_eq!(round_trip(version, &packet), packet);
            }
        }
    }

    #[test]
    fn subscribe_and_unsubscribe_and_their_acks_round_trip() {
        for version in BOTH {
            let v5 = version == ProtocolVersion::V5;
            let packets = [
                Packet::Subscribe(Subscribe {
                    pkid: 7,
                    filter: "home/+/set".into(),
                    qos: 2,
                    props: Props::default(),
                }),
                Packet::SubAck(SubAck {
                    pkid: 7,
                    reasons: vec![1, 128],
                    props: Props::default(),
                }),
                Packet::Unsubscribe(Unsubscribe {
                    pkid: 8,
                    filter: "home/#".into(),
                    props: Props::default(),
                }),
                Packet::UnsubAck(UnsubAck {
                    pkid: 8,
                    reasons: if v5 { vec![17] } else { Vec::new() },
                    props: Props::default(),
                }),
                Packet::PingReq,
                Packet::PingResp,
            ];
            for packet in packets {
                assert_eq!(round_trip(version, &packet), packet);
            }
        }
    }

    #[test]
    fn disconnects_round_trip_and_short_v5_forms_decode() {
        let normal = Packet::Disconnect(Disconnect {
            reason: 0,
            props: Props::default(),
        });
        assert_eq!(round_trip(ProtocolVersion::V311, &normal), normal);
        assert_eq!(round_trip(ProtocolVersion::V5, &normal), normal);
        let taken_over = Packet::Disconnect(Disconnect {
            reason: 142,
            props: Props {
                reason_string: Some("another client".into()),
                ..Props::default()
            },
        });
        assert_eq!(round_trip(ProtocolVersion::V5, &taken_over), taken_over);
        let bare_reason = Packet::Disconnect(Disconnect {
            reason: 139,
            props: Props::default(),
        });
        assert_eq!(round_trip(ProtocolVersion::V5, &bare_reason), bare_reason);

        for bytes in [&[0xE0, 0x00][..], &[0xE0, 0x01, 0x8B]] {
            let mut buf = BytesMut::from(bytes);
            let packet = decode(ProtocolVersion::V5, &mut buf, MAX_REMAINING_LENGTH)
                .unwrap()
                .unwrap();
            let expected = if bytes.len() == 2 { 0 } else { 139 };
            assert_eq!(
                packet,
                Packet::Disconnect(Disconnect {
                    reason: expected,
                    props: Props::default()
                })
            );
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for version in BOTH {
            let mut buf = BytesMut::from(&[0xF0, 0x00][..]);
            assert!(decode(version, &mut buf, MAX_REMAINING_LENGTH).is_err());
            let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F][..]);
            assert!(decode(version, &mut buf, MAX_REMAINING_LENGTH).is_err());
        }
    }

    #[test]
    fn an_oversized_incoming_packet_is_refused() {
        let mut buf = BytesMut::new();
        encode(
            ProtocolVersion::V311,
            &Packet::Publish(publish(0, Props::default())),
            &mut buf,
        )
        .unwrap();
        assert!(decode(ProtocolVersion::V311, &mut buf, 4).is_err());
    }
}
