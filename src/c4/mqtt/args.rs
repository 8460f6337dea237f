//! Reading the common arguments of MQTT methods (qos, retain, payload, paths), each check
//! failing with the spec's code and a message naming the method and argument.

use super::props::{self, int_in};
use super::{ApiError, MAX_PAYLOAD};
use crate::mqtt::codes::err;
use bytes::Bytes;
use mlua::{Lua, Value};

/// The arguments after the object, as the method received them.
pub(super) type Args = Vec<Value>;

pub(super) fn arg(args: &Args, i: usize) -> &Value {
    args.get(i).unwrap_or(&Value::Nil)
}

/// QoS argument: nil (0) or an integer 0–2.
pub(super) fn qos_arg(method: &str, v: &Value) -> Result<u8, ApiError> {
    match v {
        Value::Nil => Ok(0),
        _ => int_in(v, 0, 2).map(|q| q as u8).ok_or_else(|| {
            ApiError::inval(format!(
                "{method}: qos must be 0, 1 or 2, got {}",
                props::describe(v)
            ))
        }),
    }
}

pub(super) fn retain_arg(method: &str, v: &Value) -> Result<bool, ApiError> {
    match v {
        Value::Nil => Ok(false),
        Value::Boolean(b) => Ok(*b),
        other => Err(ApiError::inval(format!(
            "{method}: retain must be a boolean, got {}",
            crate::c4::lua_type(other)
        ))),
    }
}

/// Payload argument: nil (empty), a string, or a number sent as its `tostring`. Not
/// copied yet: the size check comes later in the spec's order, and a payload that fails
/// it may be hundreds of megabytes.
pub(super) fn payload_arg(method: &str, lua: &Lua, v: &Value) -> Result<mlua::LuaString, ApiError> {
    match v {
        Value::Nil => lua
            .create_string("")
            .map_err(|e| ApiError::new(err::NOMEM, format!("{method}: {e}"))),
        Value::String(s) => Ok(s.clone()),
        Value::Integer(_) | Value::Number(_) => lua
            .globals()
            .get::<mlua::Function>("tostring")
            .and_then(|f| f.call::<mlua::LuaString>(v.clone()))
            .map_err(|e| ApiError::new(err::UNKNOWN, format!("{method}: {e}"))),
        other => Err(ApiError::inval(format!(
            "{method}: payload must be a string, number or nil, got {}",
            crate::c4::lua_type(other)
        ))),
    }
}

/// The payload's bytes, once every check before the size check has passed.
pub(super) fn payload_bytes(method: &str, payload: &mlua::LuaString) -> Result<Bytes, ApiError> {
    let bytes = payload.as_bytes();
    if bytes.len() > MAX_PAYLOAD {
        return Err(ApiError::new(
            err::PAYLOAD_SIZE,
            format!(
                "{method}: payload is {} bytes; MQTT allows {MAX_PAYLOAD}",
                bytes.len()
            ),
        ));
    }
    Ok(Bytes::copy_from_slice(&bytes))
}

pub(super) fn check_payload_format(
    method: &str,
    props: &crate::mqtt::Props,
    payload: &[u8],
) -> Result<(), ApiError> {
    if props.payload_format_indicator == Some(1) && std::str::from_utf8(payload).is_err() {
        return Err(ApiError::new(
            err::MALFORMED_UTF8,
            format!("{method}: PAYLOAD_FORMAT_INDICATOR is 1 but the payload is not valid UTF-8"),
        ));
    }
    Ok(())
}

pub(super) fn path_arg(
    method: &str,
    what: &str,
    v: &Value,
) -> Result<Option<std::path::PathBuf>, ApiError> {
    match v {
        Value::Nil => Ok(None),
        Value::String(s) if s.as_bytes().is_empty() => Ok(None),
        Value::String(s) => Ok(Some(std::path::PathBuf::from(s.to_string_lossy()))),
        other => Err(ApiError::inval(format!(
            "{method}: {what} must be a file path, got {}",
            crate::c4::lua_type(other)
        ))),
    }
}
