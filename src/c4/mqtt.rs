//! `C4:MQTT`: the Lua binding of the MQTT client (in progress).
use crate::driver::ClientKey;
use crate::mqtt::MqttEvent;
use mlua::{Lua, Table};

pub fn install(_lua: &Lua, _c4: &Table) -> mlua::Result<()> {
    Ok(())
}

pub fn deliver(_lua: &Lua, _client: ClientKey, _event: MqttEvent) -> mlua::Result<()> {
    Ok(())
}
