//! The worker's events, arriving on the driver's loop, become calls of the object's `On…`
//! callbacks.

use super::{OBJECTS, props};
use crate::driver::ClientKey;
use crate::mqtt::MqttEvent;
use mlua::{AnyUserData, ErrorContext, IntoLuaMulti, Lua, MultiValue, Table, Value};

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
