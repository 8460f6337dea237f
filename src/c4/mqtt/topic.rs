//! Topic names and filters, checked as MQTT and libmosquitto check them.

use super::ApiError;
use crate::mqtt::codes::err;
use mlua::Value;

const MAX_TOPIC_LEN: usize = 65_535;

/// A topic name for `Publish`/`SetWill`: a non-empty string without `+`, `#` or NUL (3),
/// valid UTF-8 (18), at most 65,535 bytes (3).
pub fn topic_name(method: &str, v: &Value) -> Result<String, ApiError> {
    let bytes = topic_bytes(method, "topic", v)?;
    if bytes.iter().any(|b| matches!(b, b'+' | b'#' | 0)) {
        return Err(ApiError::inval(format!(
            "{method}: topic must not contain '+', '#' or NUL"
        )));
    }
    let text = utf8(method, "topic", bytes)?;
    length(method, "topic", &text)?;
    Ok(text)
}

/// A topic filter for `Subscribe`/`Unsubscribe`: `+` and `#` only as whole levels, `#`
/// last.
pub fn topic_filter(method: &str, v: &Value) -> Result<String, ApiError> {
    let bytes = topic_bytes(method, "filter", v)?;
    if bytes.contains(&0) {
        return Err(ApiError::inval(format!(
            "{method}: filter must not contain NUL"
        )));
    }
    let text = utf8(method, "filter", bytes)?;
    length(method, "filter", &text)?;
    let levels: Vec<&str> = text.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let wild = level.contains(['+', '#']);
        let ok = !wild || *level == "+" || (*level == "#" && i == levels.len() - 1);
        if !ok {
            return Err(ApiError::inval(format!(
                "{method}: '{text}' is not a valid filter ('+' and '#' must fill a whole level, '#' only last)"
            )));
        }
    }
    Ok(text)
}

fn topic_bytes(method: &str, what: &str, v: &Value) -> Result<Vec<u8>, ApiError> {
    match v {
        Value::String(s) if !s.as_bytes().is_empty() => Ok(s.as_bytes().to_vec()),
        Value::String(_) => Err(ApiError::inval(format!(
            "{method}: {what} must not be empty"
        ))),
        other => Err(ApiError::inval(format!(
            "{method}: {what} must be a string, got {}",
            crate::c4::lua_type(other)
        ))),
    }
}

fn utf8(method: &str, what: &str, bytes: Vec<u8>) -> Result<String, ApiError> {
    String::from_utf8(bytes).map_err(|_| {
        ApiError::new(
            err::MALFORMED_UTF8,
            format!("{method}: {what} is not valid UTF-8"),
        )
    })
}

fn length(method: &str, what: &str, text: &str) -> Result<(), ApiError> {
    if text.len() > MAX_TOPIC_LEN {
        return Err(ApiError::inval(format!(
            "{method}: {what} is {} bytes; at most {MAX_TOPIC_LEN}",
            text.len()
        )));
    }
    Ok(())
}
