//! `C4:MQTT`: the Lua face of the MQTT client.
//!
//! In: method calls on a `LuaMqttClient` object. Each call validates its arguments in the
//! spec's order, then sends one [`MqttCommand`] to the client's worker without waiting and
//! returns at once. Out: [`deliver`] turns the worker's [`MqttEvent`]s, arriving on the
//! driver's loop, into calls of the object's `On…` callbacks.
//!
//! Accepted publishes are not handed to the worker inside `Publish`: they wait in
//! [`PendingPublishes`] until the Lua code that made them returns to the driver loop, which
//! calls [`flush`] (or until [`FLUSH_AT`] pile up, so a long loop still streams). Handing one
//! over can wake the worker's thread, and on a busy machine the woken thread preempts the
//! driver's; inside `Publish` that cost tens of microseconds at the 99th percentile. Any other
//! command flushes first, so each client's commands keep their order.
//!
//! Errors cross the Lua/Rust boundary in one place: every method body returns
//! `Result<_, ApiError>`, and `config_result`/`id_result` turn it into the API's return
//! shapes (`0` / `code, message` and `0, msgId` / `code, nil, message`). Nothing here
//! throws a Lua error at the driver.

mod props;
mod topic;

use crate::driver::context::DriverInfo;
use crate::driver::{ClientKey, DriverEvent};
use crate::mqtt::codes::{self, err};
use crate::mqtt::tls::{self, TlsFiles};
use crate::mqtt::{
    ConnectOptions, MqttCommand, MqttEvent, MqttHandle, MsgId, ProtocolVersion, PublishRequest,
    Secret, TlsSettings, Will, spawn_client, wire,
};
use bytes::Bytes;
use mlua::{
    AnyUserData, ErrorContext, IntoLuaMulti, Lua, MultiValue, Table, UserData, UserDataMethods,
    Value,
};
use props::{PacketKind, int_in};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Registry table of live client objects by key, weak-valued so that a driver dropping its
/// object lets it be collected (which ends its worker).
const OBJECTS: &str = "luadriver.mqtt_objects";
/// The largest payload MQTT can carry.
const MAX_PAYLOAD: usize = 268_435_455;
const DEFAULT_MAX_INFLIGHT: u16 = 20;
/// Publishes held per client before they are handed over within the same callback.
pub const FLUSH_AT: usize = 256;

/// Publishes accepted since the driver's Lua code last returned to its loop, per client.
#[derive(Default)]
pub struct PendingPublishes {
    batches: Vec<(MqttHandle, Vec<MqttCommand>)>,
}

/// Hands every pending publish to its worker. The driver loop calls this whenever Lua code
/// it ran returns; a handle kept here would otherwise keep a collected client's worker alive.
pub fn flush(lua: &Lua) {
    let batches = match lua.app_data_mut::<PendingPublishes>() {
        Some(mut pending) if !pending.batches.is_empty() => std::mem::take(&mut pending.batches),
        _ => return,
    };
    for (handle, commands) in batches {
        for cmd in commands {
            // A worker that ended has had its sink closed: the driver is stopping.
            handle.send(cmd);
        }
    }
}

fn queue_publish(lua: &Lua, handle: &MqttHandle, request: PublishRequest) {
    let cmd = MqttCommand::Publish(request);
    let Some(mut pending) = lua.app_data_mut::<PendingPublishes>() else {
        handle.send(cmd);
        return;
    };
    let index = match pending
        .batches
        .iter()
        .position(|(h, _)| h.same_client(handle))
    {
        Some(i) => i,
        None => {
            pending
                .batches
                .push((handle.clone(), Vec::with_capacity(16)));
            pending.batches.len() - 1
        }
    };
    let batch = &mut pending.batches[index].1;
    batch.push(cmd);
    if batch.len() >= FLUSH_AT {
        for cmd in batch.drain(..) {
            handle.send(cmd);
        }
    }
}

/// A failed call: the API's error code and a message naming the method and argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: i32,
    pub message: String,
}

impl ApiError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    /// Code 3, "Invalid function arguments provided".
    pub fn inval(message: impl Into<String>) -> Self {
        Self::new(err::INVAL, message)
    }
}

/// Settings a driver makes before `Connect`, used by the next connection.
struct Settings {
    client_id: String,
    clean_session: bool,
    version: ProtocolVersion,
    username: Option<String>,
    password: Option<Secret>,
    will: Option<Will>,
    tls_files: Option<TlsFiles>,
    tls_insecure: bool,
    tls: Option<TlsSettings>,
    max_inflight: u16,
    max_sends: Option<u32>,
    auto_reconnect: Option<(Duration, Duration)>,
    /// Set by `Connect`/`Reconnect`, cleared by `Disconnect`: while set, the
    /// "before Connect" settings are refused.
    session_active: bool,
    connected_once: bool,
}

/// The userdata behind `C4:MQTT(...)`.
pub struct LuaMqttClient {
    handle: MqttHandle,
    /// Publishes sent to the worker; see `ClientStatus::taken`.
    publishes_sent: u64,
    settings: Settings,
    last_msg_id: MsgId,
}

impl LuaMqttClient {
    fn next_msg_id(&mut self) -> MsgId {
        self.last_msg_id += 1;
        self.last_msg_id
    }

    fn is_v5(&self) -> bool {
        self.settings.version == ProtocolVersion::V5
    }

    fn send(&self, cmd: MqttCommand) -> Result<(), ApiError> {
        if self.handle.send(cmd) {
            Ok(())
        } else {
            Err(ApiError::new(err::UNKNOWN, "the MQTT worker has stopped"))
        }
    }

    fn before_connect(&self, method: &str) -> Result<(), ApiError> {
        if self.settings.session_active {
            return Err(ApiError::inval(format!(
                "{method}: only before Connect (or after Disconnect)"
            )));
        }
        Ok(())
    }
}

impl UserData for LuaMqttClient {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        config_method(methods, "ForceMqttVersion", force_mqtt_version);
        config_method(methods, "SetUsernameAndPassword", set_username_and_password);
        config_method(methods, "SetWill", set_will);
        config_method(methods, "ClearWill", |c, _, _| {
            c.before_connect("ClearWill")?;
            c.settings.will = None;
            Ok(())
        });
        config_method(methods, "SetMaxInflightMessages", set_max_inflight);
        config_method(methods, "SetMessageRetries", set_message_retries);
        config_method(methods, "SetTlsCertificates", set_tls_certificates);
        config_method(methods, "SetTlsInsecure", set_tls_insecure);
        config_method(methods, "SetTlsPsk", |_, _, _| {
            Err(ApiError::new(
                err::NOT_SUPPORTED,
                "SetTlsPsk: TLS-PSK is not supported: the TLS stack (rustls) has no PSK cipher suites",
            ))
        });
        config_method(methods, "SetAutoReconnect", set_auto_reconnect);
        config_method(methods, "Connect", connect);
        config_method(methods, "Disconnect", disconnect);
        config_method(methods, "Reconnect", reconnect);
        id_method(methods, "Publish", publish);
        id_method(methods, "Subscribe", subscribe);
        id_method(methods, "Unsubscribe", unsubscribe);
        for name in CALLBACKS {
            methods.add_function(*name, move |lua, args: MultiValue| {
                config_result(lua, register_callback(name, args))
            });
        }
        methods.add_function("GetStats", |lua, args: MultiValue| {
            let ud = match receiver("GetStats", &args) {
                Ok(ud) => ud,
                Err(e) => return config_result(lua, Err(e)),
            };
            let this = ud.borrow::<LuaMqttClient>()?;
            let s = &this.handle.status;
            let t = lua.create_table()?;
            // `taken` first: see `Worker::update_gauges`.
            let in_channel = this
                .publishes_sent
                .saturating_sub(s.taken.load(Ordering::Acquire));
            t.raw_set("queued", s.queued.load(Ordering::Relaxed) + in_channel)?;
            for (name, counter) in [
                ("inflight", &s.inflight),
                ("published", &s.published),
                ("acknowledged", &s.acknowledged),
                ("failed", &s.failed),
            ] {
                t.raw_set(name, counter.load(Ordering::Relaxed))?;
            }
            t.raw_set("connected", s.is_connected())?;
            Ok(MultiValue::from_iter([Value::Table(t)]))
        });
        methods.add_function("ErrorCodeToString", |lua, args: MultiValue| {
            code_text(lua, args, codes::error_code_to_string)
        });
        methods.add_function("ReasonCodeToString", |lua, args: MultiValue| {
            code_text(lua, args, codes::reason_code_to_string)
        });
        methods.add_meta_method("__tostring", |_, this, ()| {
            Ok(format!("C4MQTT({})", this.settings.client_id))
        });
    }
}

const CALLBACKS: &[&str] = &[
    "OnConnect",
    "OnDisconnect",
    "OnPublish",
    "OnSubscribe",
    "OnUnsubscribe",
    "OnMessage",
    "OnLog",
];

type Args = Vec<Value>;

fn arg(args: &Args, i: usize) -> &Value {
    args.get(i).unwrap_or(&Value::Nil)
}

/// The object a method was called on (`obj:Method(...)`), or code 3 for `obj.Method(...)`.
fn receiver(method: &str, args: &MultiValue) -> Result<AnyUserData, ApiError> {
    match args.front() {
        Some(Value::UserData(ud)) if ud.is::<LuaMqttClient>() => Ok(ud.clone()),
        _ => Err(ApiError::inval(format!(
            "{method}: call it as a method, with ':' (mqtt:{method}(...))"
        ))),
    }
}

/// Runs a method body with the object borrowed; the borrow ends before returning to Lua.
fn with_client<R>(
    lua: &Lua,
    method: &str,
    args: MultiValue,
    body: impl FnOnce(&mut LuaMqttClient, &Lua, &Args) -> Result<R, ApiError>,
) -> Result<R, ApiError> {
    let ud = receiver(method, &args)?;
    let rest: Args = args.into_iter().skip(1).collect();
    let mut client = ud
        .borrow_mut::<LuaMqttClient>()
        .map_err(|e| ApiError::new(err::UNKNOWN, format!("{method}: {e}")))?;
    body(&mut client, lua, &rest)
}

fn config_method<M: UserDataMethods<LuaMqttClient>>(
    methods: &mut M,
    name: &'static str,
    body: fn(&mut LuaMqttClient, &Lua, &Args) -> Result<(), ApiError>,
) {
    methods.add_function(name, move |lua, args: MultiValue| {
        flush(lua);
        config_result(lua, with_client(lua, name, args, body))
    });
}

fn id_method<M: UserDataMethods<LuaMqttClient>>(
    methods: &mut M,
    name: &'static str,
    body: fn(&mut LuaMqttClient, &Lua, &Args) -> Result<MsgId, ApiError>,
) {
    methods.add_function(name, move |lua, args: MultiValue| {
        if name != "Publish" {
            flush(lua);
        }
        id_result(lua, with_client(lua, name, args, body))
    });
}

/// `0` or `code, message`.
fn config_result(lua: &Lua, r: Result<(), ApiError>) -> mlua::Result<MultiValue> {
    Ok(match r {
        Ok(()) => MultiValue::from_iter([Value::Integer(0)]),
        Err(e) => MultiValue::from_iter([
            Value::Integer(e.code as i64),
            Value::String(lua.create_string(&e.message)?),
        ]),
    })
}

/// `0, msgId` or `code, nil, message`.
fn id_result(lua: &Lua, r: Result<MsgId, ApiError>) -> mlua::Result<MultiValue> {
    Ok(match r {
        Ok(id) => MultiValue::from_iter([Value::Integer(0), Value::Integer(id as i64)]),
        Err(e) => MultiValue::from_iter([
            Value::Integer(e.code as i64),
            Value::Nil,
            Value::String(lua.create_string(&e.message)?),
        ]),
    })
}

fn code_text(lua: &Lua, args: MultiValue, text: fn(i32) -> &'static str) -> mlua::Result<Value> {
    // No code in either table: its text is the one for an unknown code.
    const NOT_A_CODE: i32 = i32::MAX;
    // Works as obj:ErrorCodeToString(c) and as obj.ErrorCodeToString(c). Whatever the
    // argument, the result is a string, so `"failed: " .. obj:ErrorCodeToString(rc)` can
    // never throw.
    let code = args
        .iter()
        .find(|v| !matches!(v, Value::UserData(_)))
        .and_then(|v| int_in(v, i32::MIN as i64, i32::MAX as i64))
        .map_or(NOT_A_CODE, |c| c as i32);
    Ok(Value::String(lua.create_string(text(code))?))
}

fn register_callback(name: &str, args: MultiValue) -> Result<(), ApiError> {
    let ud = receiver(name, &args)?;
    let f = args.get(1).cloned().unwrap_or(Value::Nil);
    if !matches!(f, Value::Function(_) | Value::Nil) {
        return Err(ApiError::inval(format!(
            "{name}: expected a function or nil, got {}",
            crate::c4::lua_type(&f)
        )));
    }
    // Kept as a user value of the object: no registry key to leak, and a callback that
    // refers to its own object does not keep it alive.
    ud.set_named_user_value(name, f)
        .map_err(|e| ApiError::new(err::UNKNOWN, format!("{name}: {e}")))
}

fn force_mqtt_version(c: &mut LuaMqttClient, _: &Lua, args: &Args) -> Result<(), ApiError> {
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

fn set_username_and_password(c: &mut LuaMqttClient, _: &Lua, args: &Args) -> Result<(), ApiError> {
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

/// QoS argument: nil (0) or an integer 0–2.
fn qos_arg(method: &str, v: &Value) -> Result<u8, ApiError> {
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

fn retain_arg(method: &str, v: &Value) -> Result<bool, ApiError> {
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
fn payload_arg(method: &str, lua: &Lua, v: &Value) -> Result<mlua::LuaString, ApiError> {
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
fn payload_bytes(method: &str, payload: &mlua::LuaString) -> Result<Bytes, ApiError> {
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

fn set_will(c: &mut LuaMqttClient, lua: &Lua, args: &Args) -> Result<(), ApiError> {
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

fn check_payload_format(
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

fn set_max_inflight(c: &mut LuaMqttClient, _: &Lua, args: &Args) -> Result<(), ApiError> {
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

fn set_message_retries(c: &mut LuaMqttClient, _: &Lua, args: &Args) -> Result<(), ApiError> {
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

fn path_arg(method: &str, what: &str, v: &Value) -> Result<Option<std::path::PathBuf>, ApiError> {
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

fn set_tls_certificates(c: &mut LuaMqttClient, _: &Lua, args: &Args) -> Result<(), ApiError> {
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

fn set_tls_insecure(c: &mut LuaMqttClient, _: &Lua, args: &Args) -> Result<(), ApiError> {
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

fn set_auto_reconnect(c: &mut LuaMqttClient, _: &Lua, args: &Args) -> Result<(), ApiError> {
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

fn connect(c: &mut LuaMqttClient, _: &Lua, args: &Args) -> Result<(), ApiError> {
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

fn disconnect(c: &mut LuaMqttClient, _: &Lua, args: &Args) -> Result<(), ApiError> {
    const M: &str = "Disconnect";
    let props = props::from_lua(M, arg(args, 0), PacketKind::Disconnect, c.is_v5())?;
    let was_connected = c.handle.status.is_connected();
    // Sent even when not connected: it stops a pending attempt or automatic reconnection.
    c.send(MqttCommand::Disconnect { props })?;
    c.settings.session_active = false;
    if !was_connected {
        return Err(ApiError::new(
            err::NO_CONN,
            format!("{M}: {}", codes::error_code_to_string(err::NO_CONN)),
        ));
    }
    Ok(())
}

fn reconnect(c: &mut LuaMqttClient, _: &Lua, _: &Args) -> Result<(), ApiError> {
    if !c.settings.connected_once {
        return Err(ApiError::inval("Reconnect: call Connect first"));
    }
    c.send(MqttCommand::Reconnect)?;
    c.settings.session_active = true;
    Ok(())
}

fn publish(c: &mut LuaMqttClient, lua: &Lua, args: &Args) -> Result<MsgId, ApiError> {
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

fn subscribe(c: &mut LuaMqttClient, _: &Lua, args: &Args) -> Result<MsgId, ApiError> {
    const M: &str = "Subscribe";
    let filter = topic::topic_filter(M, arg(args, 0))?;
    let qos = qos_arg(M, arg(args, 1))?;
    let props = props::from_lua(M, arg(args, 2), PacketKind::Subscribe, c.is_v5())?;
    if !c.handle.status.is_connected() {
        return Err(ApiError::new(
            err::NO_CONN,
            format!("{M}: {}", codes::error_code_to_string(err::NO_CONN)),
        ));
    }
    let msg_id = c.next_msg_id();
    c.send(MqttCommand::Subscribe {
        msg_id,
        filter,
        qos,
        props,
    })?;
    Ok(msg_id)
}

fn unsubscribe(c: &mut LuaMqttClient, _: &Lua, args: &Args) -> Result<MsgId, ApiError> {
    const M: &str = "Unsubscribe";
    let filter = topic::topic_filter(M, arg(args, 0))?;
    let props = props::from_lua(M, arg(args, 1), PacketKind::Unsubscribe, c.is_v5())?;
    if !c.handle.status.is_connected() {
        return Err(ApiError::new(
            err::NO_CONN,
            format!("{M}: {}", codes::error_code_to_string(err::NO_CONN)),
        ));
    }
    let msg_id = c.next_msg_id();
    c.send(MqttCommand::Unsubscribe {
        msg_id,
        filter,
        props,
    })?;
    Ok(msg_id)
}

/// Client keys are unique in the process, so an event can never reach the wrong object.
static NEXT_CLIENT_KEY: AtomicU64 = AtomicU64::new(1);

/// Installs `C4:MQTT(clientId, cleanSession)`.
pub fn install(lua: &Lua, c4: &Table) -> mlua::Result<()> {
    let objects = lua.create_table()?;
    let weak = lua.create_table()?;
    weak.raw_set("__mode", "v")?;
    objects.set_metatable(Some(weak))?;
    lua.set_named_registry_value(OBJECTS, objects)?;
    lua.set_app_data(PendingPublishes::default());
    c4.set("MQTT", lua.create_function(new_client)?)?;
    Ok(())
}

fn new_client(lua: &Lua, (_, id, clean): (Value, Value, Value)) -> mlua::Result<MultiValue> {
    let client_id = match id {
        Value::Nil => None,
        Value::String(s) if s.as_bytes().is_empty() => None,
        Value::String(s) => match s.to_str() {
            Ok(s) if s.len() <= 65535 => Some(s.to_string()),
            _ => {
                return super::fail(
                    lua,
                    "MQTT: clientId must be valid UTF-8, at most 65535 bytes".into(),
                );
            }
        },
        other => {
            return super::fail(
                lua,
                format!(
                    "MQTT: clientId must be a string or nil, got {}",
                    crate::c4::lua_type(&other)
                ),
            );
        }
    };
    let clean_session = match clean {
        Value::Nil => true,
        Value::Boolean(b) => b,
        other => {
            return super::fail(
                lua,
                format!(
                    "MQTT: cleanSession must be a boolean, got {}",
                    crate::c4::lua_type(&other)
                ),
            );
        }
    };
    if client_id.is_none() && !clean_session {
        return super::fail(
            lua,
            "MQTT: cleanSession = false needs a clientId (a session is kept per client id)".into(),
        );
    }
    let client_id =
        client_id.unwrap_or_else(|| format!("luadriver-{:016x}", rand::random::<u64>()));

    let key = ClientKey(NEXT_CLIENT_KEY.fetch_add(1, Ordering::Relaxed));
    let (events_tx, rt) = {
        let info = lua
            .app_data_ref::<DriverInfo>()
            .ok_or_else(|| mlua::Error::runtime("C4:MQTT called outside a driver"))?;
        (info.events_tx.clone(), info.rt.clone())
    };
    let sink = Arc::new(move |event: MqttEvent| {
        events_tx
            .send(DriverEvent::Mqtt { client: key, event })
            .is_ok()
    });
    let handle = spawn_client(&rt, sink);
    let client = LuaMqttClient {
        handle,
        publishes_sent: 0,
        settings: Settings {
            client_id,
            clean_session,
            version: ProtocolVersion::V311,
            username: None,
            password: None,
            will: None,
            tls_files: None,
            tls_insecure: false,
            tls: None,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            max_sends: None,
            auto_reconnect: None,
            session_active: false,
            connected_once: false,
        },
        last_msg_id: 0,
    };
    let ud = lua.create_userdata(client)?;
    lua.named_registry_value::<Table>(OBJECTS)?
        .raw_set(key.0, ud.clone())?;
    Ok(MultiValue::from_iter([Value::UserData(ud)]))
}

/// Calls the callback an event is for, on the driver's loop. Events of an object that was
/// collected are dropped: "exactly once while the object lives".
pub fn deliver(lua: &Lua, client: ClientKey, event: MqttEvent) -> mlua::Result<()> {
    let objects: Table = lua.named_registry_value(OBJECTS)?;
    let Some(ud) = objects.raw_get::<Option<AnyUserData>>(client.0)? else {
        log::debug!("event for a collected MQTT object dropped: {event:?}");
        return Ok(());
    };
    let obj = ud.clone();
    let props = |p: &crate::mqtt::Props| props::to_lua(lua, p);
    // Lua strings are bytes: topics and payloads go in as such.
    let bytes = |b: &[u8]| lua.create_string(b);
    let (name, args): (&str, MultiValue) = match event {
        MqttEvent::Connected {
            reason,
            session_present,
            message,
            props: p,
        } => (
            "OnConnect",
            (obj, reason, session_present as i64, message, props(&p)?).into_lua_multi(lua)?,
        ),
        MqttEvent::Disconnected {
            reason,
            message,
            props: p,
        } => (
            "OnDisconnect",
            (obj, reason, message, props(&p)?).into_lua_multi(lua)?,
        ),
        MqttEvent::Published {
            msg_id,
            reason,
            message,
            props: p,
        } => (
            "OnPublish",
            (obj, msg_id, reason, message, props(&p)?).into_lua_multi(lua)?,
        ),
        MqttEvent::Subscribed {
            msg_id,
            granted,
            props: p,
        } => (
            "OnSubscribe",
            (obj, msg_id, granted, props(&p)?).into_lua_multi(lua)?,
        ),
        MqttEvent::Unsubscribed { msg_id, props: p } => (
            "OnUnsubscribe",
            (obj, msg_id, props(&p)?).into_lua_multi(lua)?,
        ),
        MqttEvent::Message {
            msg_id,
            topic,
            payload,
            qos,
            retain,
            props: p,
        } => (
            "OnMessage",
            (
                obj,
                msg_id,
                bytes(topic.as_bytes())?,
                bytes(&payload)?,
                qos,
                retain,
                props(&p)?,
            )
                .into_lua_multi(lua)?,
        ),
        MqttEvent::Log { level, line } => ("OnLog", (obj, level, line).into_lua_multi(lua)?),
    };
    match ud.named_user_value::<Value>(name)? {
        Value::Function(f) => f.call::<()>(args).with_context(|_| name.to_string()),
        _ => Ok(()),
    }
}
