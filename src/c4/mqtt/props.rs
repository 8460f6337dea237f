//! MQTT 5 property tables, both ways: a driver's `props` argument → [`Props`] (checked
//! against what the packet may carry), and received [`Props`] → the table a callback gets.

use super::ApiError;
use crate::mqtt::Props;
use crate::mqtt::codes::err;
use bytes::Bytes;
use mlua::{Lua, Table, Value};

/// Which packet a props table is for: decides which names are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketKind {
    Publish,
    Will,
    Connect,
    Disconnect,
    Subscribe,
    Unsubscribe,
}

impl PacketKind {
    fn name(self) -> &'static str {
        match self {
            PacketKind::Publish => "PUBLISH",
            PacketKind::Will => "the will",
            PacketKind::Connect => "CONNECT",
            PacketKind::Disconnect => "DISCONNECT",
            PacketKind::Subscribe => "SUBSCRIBE",
            PacketKind::Unsubscribe => "UNSUBSCRIBE",
        }
    }
}

/// Names a callback can receive but a driver never sends.
const RECEIVE_ONLY: &[&str] = &[
    "RETAIN_AVAILABLE",
    "WILDCARD_SUB_AVAILABLE",
    "SUBSCRIPTION_ID_AVAILABLE",
    "SHARED_SUB_AVAILABLE",
    "MAXIMUM_QOS",
    "SERVER_KEEP_ALIVE",
    "ASSIGNED_CLIENT_IDENTIFIER",
    "SERVER_REFERENCE",
    "RESPONSE_INFORMATION",
    "AUTHENTICATION_METHOD",
    "AUTHENTICATION_DATA",
    "SUBSCRIPTION_IDENTIFIER",
    "WILL_DELAY_INTERVAL",
    "USER_PROPERTIES",
];

fn allowed(name: &str, kind: PacketKind) -> bool {
    use PacketKind::*;
    match name {
        "USER_PROPERTY" => true,
        "PAYLOAD_FORMAT_INDICATOR"
        | "MESSAGE_EXPIRY_INTERVAL"
        | "CONTENT_TYPE"
        | "RESPONSE_TOPIC"
        | "CORRELATION_DATA" => matches!(kind, Publish | Will),
        "TOPIC_ALIAS" => kind == Publish,
        "SESSION_EXPIRY_INTERVAL" => matches!(kind, Connect | Disconnect),
        "RECEIVE_MAXIMUM"
        | "MAXIMUM_PACKET_SIZE"
        | "TOPIC_ALIAS_MAXIMUM"
        | "REQUEST_PROBLEM_INFORMATION"
        | "REQUEST_RESPONSE_INFORMATION" => kind == Connect,
        "REASON_STRING" => kind == Disconnect,
        _ => false,
    }
}

fn is_known(name: &str) -> bool {
    RECEIVE_ONLY.contains(&name)
        || [
            PacketKind::Publish,
            PacketKind::Connect,
            PacketKind::Disconnect,
        ]
        .iter()
        .any(|k| allowed(name, *k))
}

/// Reads a driver's props argument. `method` names the call in messages. The checks follow
/// the spec's order: type (3), MQTT 3.x (10), unknown name or bad value (3), not allowed
/// on this packet (2).
pub fn from_lua(
    method: &str,
    value: &Value,
    kind: PacketKind,
    is_v5: bool,
) -> Result<Props, ApiError> {
    let table = match value {
        Value::Nil => return Ok(Props::default()),
        Value::Table(t) => t,
        other => {
            return Err(ApiError::inval(format!(
                "{method}: props must be a table or nil, got {}",
                crate::c4::lua_type(other)
            )));
        }
    };
    let mut entries = Vec::new();
    for pair in table.pairs::<Value, Value>() {
        let (k, v) = pair.map_err(|e| ApiError::inval(format!("{method}: props: {e}")))?;
        let Value::String(k) = k else {
            return Err(ApiError::inval(format!(
                "{method}: property names are strings like \"CONTENT_TYPE\", got a {} key",
                crate::c4::lua_type(&k)
            )));
        };
        entries.push((k.to_string_lossy(), v));
    }
    if entries.is_empty() {
        return Ok(Props::default());
    }
    if !is_v5 {
        return Err(ApiError::new(
            err::NOT_SUPPORTED,
            format!("{method}: properties need MQTT 5 (call ForceMqttVersion(5) before Connect)"),
        ));
    }
    // Unknown names and bad values first (3), then names not allowed here (2).
    for (name, _) in &entries {
        if !is_known(name) {
            return Err(ApiError::inval(format!(
                "{method}: unknown property '{name}'"
            )));
        }
    }
    let mut props = Props::default();
    for (name, v) in &entries {
        if RECEIVE_ONLY.contains(&name.as_str()) {
            continue;
        }
        set_property(method, &mut props, name, v)?;
    }
    for (name, _) in &entries {
        if !allowed(name, kind) {
            return Err(ApiError::new(
                err::PROTOCOL,
                format!(
                    "{method}: property {name} is not allowed on {}",
                    kind.name()
                ),
            ));
        }
    }
    Ok(props)
}

fn set_property(method: &str, props: &mut Props, name: &str, v: &Value) -> Result<(), ApiError> {
    let wrong = |expected: &str| {
        ApiError::inval(format!(
            "{method}: property {name} must be {expected}, got {}",
            describe(v)
        ))
    };
    match name {
        "PAYLOAD_FORMAT_INDICATOR" => {
            props.payload_format_indicator =
                Some(int_in(v, 0, 1).ok_or_else(|| wrong("0 or 1"))? as u8)
        }
        "REQUEST_PROBLEM_INFORMATION" => {
            props.request_problem_information =
                Some(int_in(v, 0, 1).ok_or_else(|| wrong("0 or 1"))? as u8)
        }
        "REQUEST_RESPONSE_INFORMATION" => {
            props.request_response_information =
                Some(int_in(v, 0, 1).ok_or_else(|| wrong("0 or 1"))? as u8)
        }
        "MESSAGE_EXPIRY_INTERVAL" => {
            props.message_expiry_interval = Some(
                int_in(v, 0, u32::MAX as i64).ok_or_else(|| wrong("seconds, 0 to 4294967295"))?
                    as u32,
            )
        }
        "SESSION_EXPIRY_INTERVAL" => {
            props.session_expiry_interval = Some(
                int_in(v, 0, u32::MAX as i64).ok_or_else(|| wrong("seconds, 0 to 4294967295"))?
                    as u32,
            )
        }
        "MAXIMUM_PACKET_SIZE" => {
            props.maximum_packet_size = Some(
                int_in(v, 1, u32::MAX as i64)
                    .ok_or_else(|| wrong("an integer from 1 to 4294967295"))?
                    as u32,
            )
        }
        "TOPIC_ALIAS" => {
            props.topic_alias =
                Some(int_in(v, 1, 65535).ok_or_else(|| wrong("an integer from 1 to 65535"))? as u16)
        }
        "RECEIVE_MAXIMUM" => {
            props.receive_maximum =
                Some(int_in(v, 1, 65535).ok_or_else(|| wrong("an integer from 1 to 65535"))? as u16)
        }
        "TOPIC_ALIAS_MAXIMUM" => {
            props.topic_alias_maximum =
                Some(int_in(v, 0, 65535).ok_or_else(|| wrong("an integer from 0 to 65535"))? as u16)
        }
        "CONTENT_TYPE" => props.content_type = Some(utf8(method, name, v)?),
        "REASON_STRING" => props.reason_string = Some(utf8(method, name, v)?),
        "RESPONSE_TOPIC" => {
            let topic = utf8(method, name, v)?;
            if topic.is_empty() || topic.contains(['+', '#']) {
                return Err(ApiError::inval(format!(
                    "{method}: RESPONSE_TOPIC must be a topic name without wildcards"
                )));
            }
            props.response_topic = Some(topic);
        }
        "CORRELATION_DATA" => match v {
            Value::String(s) => {
                props.correlation_data = Some(Bytes::copy_from_slice(&s.as_bytes()))
            }
            _ => return Err(wrong("a (binary) string")),
        },
        "USER_PROPERTY" => props.user_properties = user_properties(method, v)?,
        _ => {
            return Err(ApiError::inval(format!(
                "{method}: unknown property '{name}'"
            )));
        }
    }
    Ok(())
}

/// `{ key = "value" }` or an array of `{key, value}` pairs (to repeat a key). Values may be
/// numbers too: they are sent as their `tostring`.
fn user_properties(method: &str, v: &Value) -> Result<Vec<(String, String)>, ApiError> {
    let bad = || {
        ApiError::inval(format!(
            "{method}: USER_PROPERTY must be {{ key = \"value\" }} or {{ {{key, value}}, ... }}"
        ))
    };
    let Value::Table(t) = v else {
        return Err(bad());
    };
    let mut out = Vec::new();
    let len = t.raw_len();
    if len > 0 {
        for i in 1..=len {
            let Ok(Value::Table(pair)) = t.raw_get::<Value>(i) else {
                return Err(bad());
            };
            let key = pair.raw_get::<Value>(1).map_err(|_| bad())?;
            let value = pair.raw_get::<Value>(2).map_err(|_| bad())?;
            out.push((
                text(method, &key).ok_or_else(bad)??,
                text(method, &value).ok_or_else(bad)??,
            ));
        }
        // Keys beyond the array part would be silently lost: refuse instead.
        if t.pairs::<Value, Value>().count() != len {
            return Err(bad());
        }
    } else {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for pair in t.pairs::<Value, Value>() {
            let (k, val) = pair.map_err(|_| bad())?;
            pairs.push((
                text(method, &k).ok_or_else(bad)??,
                text(method, &val).ok_or_else(bad)??,
            ));
        }
        // Lua tables have no order; sort so the wire order is stable.
        pairs.sort();
        out = pairs;
    }
    Ok(out)
}

/// A string or number as UTF-8 text; `None` for other types.
fn text(method: &str, v: &Value) -> Option<Result<String, ApiError>> {
    match v {
        Value::String(s) => Some(match std::str::from_utf8(&s.as_bytes()) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => Err(ApiError::new(
                err::MALFORMED_UTF8,
                format!("{method}: USER_PROPERTY is not valid UTF-8"),
            )),
        }),
        Value::Integer(i) => Some(Ok(i.to_string())),
        Value::Number(n) => Some(Ok(lua_number_text(*n))),
        _ => None,
    }
}

fn utf8(method: &str, name: &str, v: &Value) -> Result<String, ApiError> {
    let Value::String(s) = v else {
        return Err(ApiError::inval(format!(
            "{method}: property {name} must be a string, got {}",
            describe(v)
        )));
    };
    std::str::from_utf8(&s.as_bytes())
        .map(str::to_string)
        .map_err(|_| {
            ApiError::new(
                err::MALFORMED_UTF8,
                format!("{method}: property {name} is not valid UTF-8"),
            )
        })
}

/// An integral Lua number within `[lo, hi]`.
pub fn int_in(v: &Value, lo: i64, hi: i64) -> Option<i64> {
    let n = match v {
        Value::Integer(i) => *i,
        Value::Number(f) if f.fract() == 0.0 && f.is_finite() && f.abs() < 9.0e15 => *f as i64,
        _ => return None,
    };
    (lo..=hi).contains(&n).then_some(n)
}

/// How Lua 5.1 would print a number: integers without ".0".
pub fn lua_number_text(n: f64) -> String {
    if n.fract() == 0.0 && n.is_finite() && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

pub fn describe(v: &Value) -> String {
    match v {
        Value::Integer(i) => i.to_string(),
        Value::Number(n) => lua_number_text(*n),
        Value::String(s) => format!("\"{}\"", s.to_string_lossy()),
        other => crate::c4::lua_type(other).to_string(),
    }
}

/// Received properties as the table a callback gets. `USER_PROPERTY` is a `{ key = value }`
/// map (last value wins) and `USER_PROPERTIES` the pairs in wire order.
pub fn to_lua(lua: &Lua, props: &Props) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    macro_rules! put {
        ($name:literal, $field:expr) => {
            if let Some(v) = &$field {
                t.raw_set($name, v.clone())?;
            }
        };
    }
    put!("PAYLOAD_FORMAT_INDICATOR", props.payload_format_indicator);
    put!("MESSAGE_EXPIRY_INTERVAL", props.message_expiry_interval);
    put!("CONTENT_TYPE", props.content_type);
    put!("RESPONSE_TOPIC", props.response_topic);
    put!("TOPIC_ALIAS", props.topic_alias);
    put!("SESSION_EXPIRY_INTERVAL", props.session_expiry_interval);
    put!("RECEIVE_MAXIMUM", props.receive_maximum);
    put!("MAXIMUM_PACKET_SIZE", props.maximum_packet_size);
    put!("TOPIC_ALIAS_MAXIMUM", props.topic_alias_maximum);
    put!(
        "REQUEST_PROBLEM_INFORMATION",
        props.request_problem_information
    );
    put!(
        "REQUEST_RESPONSE_INFORMATION",
        props.request_response_information
    );
    put!("REASON_STRING", props.reason_string);
    put!("RETAIN_AVAILABLE", props.retain_available);
    put!(
        "WILDCARD_SUB_AVAILABLE",
        props.wildcard_subscription_available
    );
    put!(
        "SUBSCRIPTION_ID_AVAILABLE",
        props.subscription_identifier_available
    );
    put!("SHARED_SUB_AVAILABLE", props.shared_subscription_available);
    put!("MAXIMUM_QOS", props.maximum_qos);
    put!("SERVER_KEEP_ALIVE", props.server_keep_alive);
    put!(
        "ASSIGNED_CLIENT_IDENTIFIER",
        props.assigned_client_identifier
    );
    put!("SERVER_REFERENCE", props.server_reference);
    put!("RESPONSE_INFORMATION", props.response_information);
    put!("AUTHENTICATION_METHOD", props.authentication_method);
    if let Some(data) = &props.correlation_data {
        t.raw_set("CORRELATION_DATA", lua.create_string(&data[..])?)?;
    }
    match props.subscription_identifiers.as_slice() {
        [] => {}
        [one] => t.raw_set("SUBSCRIPTION_IDENTIFIER", *one as i64)?,
        many => t.raw_set(
            "SUBSCRIPTION_IDENTIFIER",
            lua.create_sequence_from(many.iter().map(|i| *i as i64))?,
        )?,
    }
    if !props.user_properties.is_empty() {
        let map = lua.create_table()?;
        let pairs = lua.create_table()?;
        for (i, (k, v)) in props.user_properties.iter().enumerate() {
            map.raw_set(k.as_str(), v.as_str())?;
            pairs.raw_set(i + 1, lua.create_sequence_from([k.as_str(), v.as_str()])?)?;
        }
        t.raw_set("USER_PROPERTY", map)?;
        t.raw_set("USER_PROPERTIES", pairs)?;
    }
    Ok(t)
}
