//! `C4:MQTT`: the Lua face of the MQTT client.
//!
//! In: method calls on a `LuaMqttClient` object. Each call validates its arguments in the
//! spec's order, then sends one [`MqttCommand`] to the client's worker without waiting and
//! returns at once. Out: [`deliver`] turns the worker's [`MqttEvent`]s, arriving on the
//! driver's loop, into calls of the object's `On…` callbacks.
//!
//! Layout: this file holds the object, its method table and the one place errors become
//! return values; `methods` the method bodies; `args` the shared argument checks; `props`
//! and `topic` the MQTT 5 property and topic rules; `pending` the publishes held until the
//! Lua code that made them returns (see there why); `deliver` the callbacks.
//!
//! Errors cross the Lua/Rust boundary in one place: every method body returns
//! `Result<_, ApiError>`, and `config_result`/`id_result` turn it into the API's return
//! shapes (`0` / `code, message` and `0, msgId` / `code, nil, message`). Nothing here
//! throws a Lua error at the driver.

mod args;
mod deliver;
mod methods;
mod pending;
mod props;
mod topic;

pub use deliver::deliver;
pub use pending::{FLUSH_AT, PendingPublishes, flush};

use args::Args;
use methods::*;

use crate::driver::context::DriverInfo;
use crate::driver::{ClientKey, DriverEvent};
use crate::mqtt::codes::{self, err};
use crate::mqtt::tls::TlsFiles;
use crate::mqtt::{
    MqttCommand, MqttEvent, MqttHandle, MsgId, ProtocolVersion, Secret, TlsSettings, Will,
};
use mlua::{AnyUserData, Lua, MultiValue, Table, UserData, UserDataMethods, Value};
use props::int_in;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Registry table of live client objects by key, weak-valued so that a driver dropping its
/// object lets it be collected (which ends its worker).
const OBJECTS: &str = "luadriver.mqtt_objects";
/// The largest payload MQTT can carry.
const MAX_PAYLOAD: usize = 268_435_455;
const DEFAULT_MAX_INFLIGHT: u16 = 20;

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

    /// Code 4 unless connected.
    fn require_connected(&self, method: &str) -> Result<(), ApiError> {
        if self.handle.status.is_connected() {
            return Ok(());
        }
        Err(ApiError::new(
            err::NO_CONN,
            format!("{method}: {}", codes::error_code_to_string(err::NO_CONN)),
        ))
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
    let handle = {
        let info = lua
            .app_data_ref::<DriverInfo>()
            .ok_or_else(|| mlua::Error::runtime("C4:MQTT called outside a driver"))?;
        let events_tx = info.events_tx.clone();
        info.io.spawn_client(Arc::new(move |event: MqttEvent| {
            events_tx
                .send(DriverEvent::Mqtt { client: key, event })
                .is_ok()
        }))
    };
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
