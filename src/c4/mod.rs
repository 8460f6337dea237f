//! The `C4` global a driver calls: one table of functions, called with `:`.
//!
//! In: Lua calls from the driver. Out: return values, log lines, host notices, timers and
//! MQTT clients. Misuse is answered with `nil, message` (or the MQTT API's return codes),
//! never with a Lua error thrown at the driver.

mod core;
pub mod json;
pub mod mqtt;
pub mod persist;
mod timer;

pub(crate) use timer::take_due as timer_callback;

use mlua::{Lua, Table};

/// Builds `C4`, `Properties` and `c4json` in the driver's globals.
pub fn install(lua: &Lua, properties: &[(String, String)]) -> mlua::Result<()> {
    let c4 = lua.create_table()?;
    core::install(lua, &c4)?;
    timer::install(lua, &c4)?;
    mqtt::install(lua, &c4)?;
    let globals = lua.globals();
    globals.set("C4", c4)?;

    let props: Table = lua.create_table()?;
    for (name, value) in properties {
        props.set(name.as_str(), value.as_str())?;
    }
    globals.set("Properties", props)?;
    Ok(())
}

/// The `nil, message` pair C4 calls return on misuse.
pub(crate) fn fail(lua: &Lua, message: String) -> mlua::Result<mlua::MultiValue> {
    Ok(mlua::MultiValue::from_iter([
        mlua::Value::Nil,
        mlua::Value::String(lua.create_string(message)?),
    ]))
}

/// A value's type as Lua 5.1 names it (`type(v)`): integers are numbers.
pub(crate) fn lua_type(v: &mlua::Value) -> &'static str {
    match v {
        mlua::Value::Integer(_) => "number",
        other => other.type_name(),
    }
}
