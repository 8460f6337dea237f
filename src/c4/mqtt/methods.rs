//! The bodies of the `C4:MQTT` methods. Each takes the borrowed client and its arguments
//! and returns `Ok` or an [`ApiError`]; `mod.rs` registers them and turns the result into
//! the API's return shape. Arguments are checked in the spec's order; nothing is sent
//! unless every check passed.

use super::args::{
    Args, arg, check_payload_format, path_arg, payload_arg, payload_bytes, qos_arg, retain_arg,
};
use super::pending::queue_publish;
use super::props::{self, PacketKind, int_in};
use super::{ApiError, LuaMqttClient, topic};
use crate::mqtt::codes::{self, err};
use crate::mqtt::tls::{self, TlsFiles};
use crate::mqtt::{
    ConnectOptions, MqttCommand, MsgId, ProtocolVersion, PublishRequest, Secret, TlsSettings, Will,
    wire,
};
use mlua::{Lua, Value};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub(super) fn force_mqtt_version(
    c: &mut LuaMqttClient,
    _: &Lua,
    args: &Args,
) -> Result<(), ApiError> {
    c.before_connect("ForceMqttVersion")?;
    c.settings.version = match int_in(arg(args, 0), 0, 1000) {
        Some(311) | Some(4) => ProtocolVersion::V311,
        Some(5) => ProtocolVersion::V5,
        Some(3) => {
            return Err(ApiError::new(
                err::NOT_SUPPORTED,
                "ForceMqttVersion: MQTT 3.1 is not supported (the client speaks 3.1.1 and 5); use 311 or 5",
            ));
        }
        _ => {
            return Err(ApiError::inval(format!(
                "ForceMqttVersion: version must be 3, 311 or 5, got {}",
                props::describe(arg(args, 0))
            )));
        }
    };
    Ok(())
}

pub(super) fn set_username_and_password(
    c: &mut LuaMqttClient,
    _: &Lua,
    args: &Args,
) -> Result<(), ApiError> {
    const M: &str = "SetUsernameAndPassword";
    c.before_connect(M)?;
    let username = match arg(args, 0) {
        Value::Nil => None,
        Value::String(s) => Some(
            s.to_str()
                .map_err(|_| {
                    ApiError::new(err::MALFORMED_UTF8, format!("{M}: user is not valid UTF-8"))
                })?
                .to_string(),
        ),
        other => {
            return Err(ApiError::inval(format!(
                "{M}: user must be a string, got {}",
                crate::c4::lua_type(other)
            )));
        }
    };
    let password = match arg(args, 1) {
        Value::Nil => None,
        Value::String(s) => Some(Secret(s.to_string_lossy())),
        other => {
            return Err(ApiError::inval(format!(
                "{M}: password must be a string, got {}",
                crate::c4::lua_type(other)
            )));
        }
    };
    if username.is_none() && password.is_some() {
        return Err(ApiError::inval(format!("{M}: a password needs a user")));
    }
    c.settings.username = username;
    c.settings.password = password;
    Ok(())
}

pub(super) fn set_will(c: &mut LuaMqttClient, lua: &Lua, args: &Args) -> Result<(), ApiError> {
    const M: &str = "SetWill";
    c.before_connect(M)?;
    let topic = topic::topic_name(M, arg(args, 0))?;
    let payload = payload_arg(M, lua, arg(args, 1))?;
    let qos = qos_arg(M, arg(args, 2))?;
    let retain = retain_arg(M, arg(args, 3))?;
    let props = props::from_lua(M, arg(args, 4), PacketKind::Will, c.is_v5())?;
    check_payload_format(M, &props, &payload.as_bytes())?;
    let payload = payload_bytes(M, &payload)?;
    c.settings.will = Some(Will {
        topic,
        payload,
        qos,
        retain,
        props,
    });
    Ok(())
}

pub(super) fn set_max_inflight(
    c: &mut LuaMqttClient,
    _: &Lua,
    args: &Args,
) -> Result<(), ApiError> {
    let n = int_in(arg(args, 0), 0, 65535).ok_or_else(|| {
        ApiError::inval(format!(
            "SetMaxInflightMessages: expected 0 (no limit) to 65535, got {}",
            props::describe(arg(args, 0))
        ))
    })?;
    c.settings.max_inflight = n as u16;
    c.send(MqttCommand::SetLimits {
        max_inflight: c.settings.max_inflight,
        max_sends: c.settings.max_sends,
    })
}

pub(super) fn set_message_retries(
    c: &mut LuaMqttClient,
    _: &Lua,
    args: &Args,
) -> Result<(), ApiError> {
    let n = int_in(arg(args, 0), 0, u32::MAX as i64).ok_or_else(|| {
        ApiError::inval(format!(
            "SetMessageRetries: expected a count of sends (0 = never give up), got {}",
            props::describe(arg(args, 0))
        ))
    })?;
    c.settings.max_sends = (n > 0).then_some(n as u32);
    c.send(MqttCommand::SetLimits {
        max_inflight: c.settings.max_inflight,
        max_sends: c.settings.max_sends,
    })
}

pub(super) fn set_tls_certificates(
    c: &mut LuaMqttClient,
    _: &Lua,
    args: &Args,
) -> Result<(), ApiError> {
    const M: &str = "SetTlsCertificates";
    c.before_connect(M)?;
    let files = TlsFiles {
        ca: path_arg(M, "cafile", arg(args, 0))?,
        cert: path_arg(M, "certfile", arg(args, 1))?,
        key: path_arg(M, "keyfile", arg(args, 2))?,
        key_password: match arg(args, 3) {
            Value::Nil => None,
            Value::String(s) => Some(Secret(s.to_string_lossy())),
            other => {
                return Err(ApiError::inval(format!(
                    "{M}: password must be a string, got {}",
                    crate::c4::lua_type(other)
                )));
            }
        },
    };
    let config = tls::build_client_config(&files, c.settings.tls_insecure)
        .map_err(|e| ApiError::new(err::TLS, e))?;
    c.settings.tls = Some(TlsSettings { config });
    c.settings.tls_files = Some(files);
    Ok(())
}

pub(super) fn set_tls_insecure(
    c: &mut LuaMqttClient,
    _: &Lua,
    args: &Args,
) -> Result<(), ApiError> {
    const M: &str = "SetTlsInsecure";
    c.before_connect(M)?;
    let Value::Boolean(insecure) = arg(args, 0) else {
        return Err(ApiError::inval(format!(
            "{M}: expected true or false, got {}",
            crate::c4::lua_type(arg(args, 0))
        )));
    };
    c.settings.tls_insecure = *insecure;
    if let Some(files) = &c.settings.tls_files {
        let config =
            tls::build_client_config(files, *insecure).map_err(|e| ApiError::new(err::TLS, e))?;
        c.settings.tls = Some(TlsSettings { config });
    }
    Ok(())
}

pub(super) fn set_auto_reconnect(
    c: &mut LuaMqttClient,
    _: &Lua,
    args: &Args,
) -> Result<(), ApiError> {
    const M: &str = "SetAutoReconnect";
    let setting = match (arg(args, 0), arg(args, 1)) {
        (Value::Nil, Value::Nil) => None,
        (Value::Boolean(false), _) => None,
        (min, max) => {
            let min = int_in(min, 1, 86_400_000);
            let max = int_in(max, 1, 86_400_000);
            match (min, max) {
                (Some(min), Some(max)) if min <= max => Some((
                    Duration::from_millis(min as u64),
                    Duration::from_millis(max as u64),
                )),
                _ => {
                    return Err(ApiError::inval(format!(
                        "{M}: expected minDelayMs and maxDelayMs, 1 <= min <= max (ms), or nil to turn it off"
                    )));
                }
            }
        }
    };
    c.settings.auto_reconnect = setting;
    c.send(MqttCommand::SetAutoReconnect(setting))
}

pub(super) fn connect(c: &mut LuaMqttClient, _: &Lua, args: &Args) -> Result<(), ApiError> {
    const M: &str = "Connect";
    let host = match arg(args, 0) {
        Value::String(s) if !s.as_bytes().is_empty() => s.to_string_lossy(),
        other => {
            return Err(ApiError::inval(format!(
                "{M}: host must be a non-empty string, got {}",
                props::describe(other)
            )));
        }
    };
    let port = match arg(args, 1) {
        Value::Nil if c.settings.tls.is_some() => 8883,
        Value::Nil => 1883,
        v => int_in(v, 1, 65535).ok_or_else(|| {
            ApiError::inval(format!(
                "{M}: port must be 1 to 65535, got {}",
                props::describe(v)
            ))
        })? as u16,
    };
    let keepalive = match arg(args, 2) {
        Value::Nil => 60,
        v => match int_in(v, 0, 65535) {
            Some(k) if k == 0 || k >= 5 => k as u64,
            _ => {
                return Err(ApiError::inval(format!(
                    "{M}: keepalive must be 0 (off) or 5 to 65535 seconds, got {}",
                    props::describe(v)
                )));
            }
        },
    };
    let props = props::from_lua(M, arg(args, 3), PacketKind::Connect, c.is_v5())?;
    let s = &c.settings;
    let options = ConnectOptions {
        host,
        port,
        keepalive: Duration::from_secs(keepalive),
        client_id: s.client_id.clone(),
        clean_session: s.clean_session,
        version: s.version,
        username: s.username.clone(),
        password: s.password.clone(),
        will: s.will.clone(),
        tls: s.tls.clone(),
        props,
        max_inflight: s.max_inflight,
        max_sends: s.max_sends,
        auto_reconnect: s.auto_reconnect,
    };
    c.send(MqttCommand::Connect(Box::new(options)))?;
    c.settings.session_active = true;
    c.settings.connected_once = true;
    Ok(())
}

pub(super) fn disconnect(c: &mut LuaMqttClient, _: &Lua, args: &Args) -> Result<(), ApiError> {
    const M: &str = "Disconnect";
    let props = props::from_lua(M, arg(args, 0), PacketKind::Disconnect, c.is_v5())?;
    let connected = c.require_connected(M);
    // Sent even when not connected: it stops a pending attempt or automatic reconnection.
    c.send(MqttCommand::Disconnect { props })?;
    c.settings.session_active = false;
    connected
}

pub(super) fn reconnect(c: &mut LuaMqttClient, _: &Lua, _: &Args) -> Result<(), ApiError> {
    if !c.settings.connected_once {
        return Err(ApiError::inval("Reconnect: call Connect first"));
    }
    c.send(MqttCommand::Reconnect)?;
    c.settings.session_active = true;
    Ok(())
}

pub(super) fn publish(c: &mut LuaMqttClient, lua: &Lua, args: &Args) -> Result<MsgId, ApiError> {
    const M: &str = "Publish";
    let status = Arc::clone(&c.handle.status);
    let topic = topic::topic_name(M, arg(args, 0))?;
    let payload = payload_arg(M, lua, arg(args, 1))?;
    let qos = qos_arg(M, arg(args, 2))?;
    let max_qos = status.max_qos.load(Ordering::Relaxed);
    if qos > max_qos {
        return Err(ApiError::new(
            err::QOS_NOT_SUPPORTED,
            format!("{M}: the broker supports QoS up to {max_qos}, not {qos}"),
        ));
    }
    let retain = retain_arg(M, arg(args, 3))?;
    let props = props::from_lua(M, arg(args, 4), PacketKind::Publish, c.is_v5())?;
    check_payload_format(M, &props, &payload.as_bytes())?;
    let payload = payload_bytes(M, &payload)?;
    let mut request = PublishRequest {
        msg_id: 0,
        topic,
        payload,
        qos,
        retain,
        props,
    };
    let limit = status.max_packet_size.load(Ordering::Relaxed);
    if limit > 0 {
        let size = wire::publish_packet_size(c.settings.version, &request);
        if size > limit as usize {
            return Err(ApiError::new(
                err::OVERSIZE_PACKET,
                format!("{M}: the packet is {size} bytes; the broker accepts at most {limit}"),
            ));
        }
    }
    if qos == 0 && !status.is_connected() {
        return Err(ApiError::new(
            err::NO_CONN,
            format!(
                "{M}: {} (QoS 0 is not queued)",
                codes::error_code_to_string(err::NO_CONN)
            ),
        ));
    }
    if c.handle.is_closed() {
        return Err(ApiError::new(err::UNKNOWN, "the MQTT worker has stopped"));
    }
    request.msg_id = c.next_msg_id();
    queue_publish(lua, &c.handle, request);
    c.publishes_sent += 1;
    Ok(c.last_msg_id)
}

pub(super) fn subscribe(c: &mut LuaMqttClient, _: &Lua, args: &Args) -> Result<MsgId, ApiError> {
    const M: &str = "Subscribe";
    let filter = topic::topic_filter(M, arg(args, 0))?;
    let qos = qos_arg(M, arg(args, 1))?;
    let props = props::from_lua(M, arg(args, 2), PacketKind::Subscribe, c.is_v5())?;
    c.require_connected(M)?;
    let msg_id = c.next_msg_id();
    c.send(MqttCommand::Subscribe {
        msg_id,
        filter,
        qos,
        props,
    })?;
    Ok(msg_id)
}

pub(super) fn unsubscribe(c: &mut LuaMqttClient, _: &Lua, args: &Args) -> Result<MsgId, ApiError> {
    const M: &str = "Unsubscribe";
    let filter = topic::topic_filter(M, arg(args, 0))?;
    let props = props::from_lua(M, arg(args, 1), PacketKind::Unsubscribe, c.is_v5())?;
    c.require_connected(M)?;
    let msg_id = c.next_msg_id();
    c.send(MqttCommand::Unsubscribe {
        msg_id,
        filter,
        props,
    })?;
    Ok(msg_id)
}
