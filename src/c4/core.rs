//! The small `C4` calls: output, logging, time, encoding, properties, identity and events.

use super::fail;
use super::json;
use super::persist::PersistStore;
use crate::driver::context::DriverInfo;
use crate::driver::event::DriverNotice;
use base64::Engine;
use mlua::{Lua, MultiValue, Table, Value, Variadic};
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

pub fn install(lua: &Lua, c4: &Table) -> mlua::Result<()> {
    lua.globals().set("print", lua.create_function(print)?)?;

    c4.set(
        "DebugLog",
        lua.create_function(|lua, (_, msg): (Value, Value)| {
            let info = driver_info(lua)?;
            log::debug!(target: &info.name, "{}", log_text(lua, &msg));
            Ok(())
        })?,
    )?;
    c4.set(
        "ErrorLog",
        lua.create_function(|lua, (_, msg): (Value, Value)| {
            let info = driver_info(lua)?;
            log::error!(target: &info.name, "{}", log_text(lua, &msg));
            Ok(())
        })?,
    )?;
    c4.set("GetTime", lua.create_function(get_time)?)?;
    install_json(lua, c4)?;
    install_persist(lua, c4)?;
    c4.set(
        "Base64Encode",
        lua.create_function(|lua, (_, s): (Value, Value)| match s {
            Value::String(s) => Ok(MultiValue::from_iter([Value::String(lua.create_string(
                base64::engine::general_purpose::STANDARD.encode(s.as_bytes()),
            )?)])),
            other => fail(
                lua,
                format!(
                    "Base64Encode: expected a string, got {}",
                    crate::c4::lua_type(&other)
                ),
            ),
        })?,
    )?;
    c4.set(
        "Base64Decode",
        lua.create_function(|lua, (_, s): (Value, Value)| {
            let Value::String(s) = s else {
                return fail(
                    lua,
                    format!(
                        "Base64Decode: expected a string, got {}",
                        crate::c4::lua_type(&s)
                    ),
                );
            };
            // Line breaks and surrounding blanks are common in pasted base64; ignore them.
            let compact: Vec<u8> = s
                .as_bytes()
                .iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            match base64::engine::general_purpose::STANDARD.decode(&compact) {
                Ok(bytes) => Ok(MultiValue::from_iter([Value::String(
                    lua.create_string(bytes)?,
                )])),
                Err(e) => fail(lua, format!("Base64Decode: not valid base64: {e}")),
            }
        })?,
    )?;
    c4.set(
        "UpdateProperty",
        lua.create_function(|lua, (_, name, value): (Value, Value, Value)| {
            let info = driver_info(lua)?;
            let Value::String(name) = name else {
                return fail(lua, "UpdateProperty: name must be a string".into());
            };
            let name = name.to_string_lossy();
            let value = match value {
                Value::String(s) => s.to_string_lossy(),
                Value::Integer(_) | Value::Number(_) | Value::Boolean(_) => display(lua, &value)?,
                other => {
                    return fail(
                        lua,
                        format!(
                            "UpdateProperty: value of '{name}' must be a string or number, got {}",
                            crate::c4::lua_type(&other)
                        ),
                    );
                }
            };
            if !info.declared_properties.contains(&name) {
                log::warn!(target: &info.name, "UpdateProperty: the driver has no property named '{name}'");
                return fail(lua, format!("UpdateProperty: no property named '{name}'"));
            }
            let props: Table = lua.globals().get("Properties")?;
            props.set(name, value)?;
            Ok(MultiValue::new())
        })?,
    )?;
    c4.set(
        "FireEvent",
        lua.create_function(|lua, (_, name): (Value, Value)| {
            let info = driver_info(lua)?;
            let Value::String(name) = name else {
                return fail(lua, "FireEvent: event name must be a string".into());
            };
            let name = name.to_string_lossy();
            log::info!(target: &info.name, "event: {name}");
            info.notify(DriverNotice::Event { id: info.id, name });
            Ok(MultiValue::new())
        })?,
    )?;
    c4.set(
        "GetDeviceID",
        lua.create_function(|lua, _: Value| Ok(driver_info(lua)?.id))?,
    )?;
    c4.set(
        "GetDriverConfigInfo",
        lua.create_function(|lua, (_, name): (Value, Value)| {
            let info = driver_info(lua)?;
            // driver.xml tags are UTF-8: another name, or no string, names no tag.
            let Some(name) = name.as_string().and_then(|s| s.to_str().ok()) else {
                return Ok(Value::Nil);
            };
            match info.config.get(&*name) {
                Some(v) => Ok(Value::String(lua.create_string(v)?)),
                None => Ok(Value::Nil),
            }
        })?,
    )?;
    Ok(())
}

pub(crate) fn driver_info(lua: &Lua) -> mlua::Result<mlua::AppDataRef<'_, DriverInfo>> {
    lua.app_data_ref::<DriverInfo>()
        .ok_or_else(|| mlua::Error::runtime("C4 called outside a driver"))
}

/// What `DebugLog`/`ErrorLog` write for `v`: its `tostring`, or, when a `__tostring`
/// throws or returns no string, a note saying so; logging never throws at the driver.
fn log_text(lua: &Lua, v: &Value) -> String {
    display(lua, v).unwrap_or_else(|e| {
        let first_line = e.to_string().lines().next().unwrap_or_default().to_owned();
        format!(
            "<{} that tostring cannot convert: {first_line}>",
            crate::c4::lua_type(v)
        )
    })
}

/// How deeply `print`/`C4:DebugLog` may nest inside `__tostring` metamethods (Lua 5.1's
/// C-call limit). Each level holds mlua references; without a bound, a `__tostring` that
/// logs its own table exhausts them and mlua panics.
const MAX_NESTED_TOSTRING: usize = 200;

thread_local! {
    static TOSTRING_DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Runs `f` one `tostring` level deeper, or fails once the nesting is too deep.
fn nested_tostring<R>(f: impl FnOnce() -> mlua::Result<R>) -> mlua::Result<R> {
    let depth = TOSTRING_DEPTH.with(|d| d.get());
    if depth >= MAX_NESTED_TOSTRING {
        return Err(mlua::Error::runtime(
            "C stack overflow (print or C4:DebugLog nested too deeply inside __tostring)",
        ));
    }
    TOSTRING_DEPTH.with(|d| d.set(depth + 1));
    let result = f();
    TOSTRING_DEPTH.with(|d| d.set(depth));
    result
}

/// `tostring(v)`, honouring `__tostring`.
fn display(lua: &Lua, v: &Value) -> mlua::Result<String> {
    nested_tostring(|| display_unbounded(lua, v))
}

fn display_unbounded(lua: &Lua, v: &Value) -> mlua::Result<String> {
    let tostring: mlua::Function = lua.globals().get("tostring")?;
    let s: mlua::LuaString = tostring.call(v.clone())?;
    Ok(s.to_string_lossy())
}

/// `print(...)`: the arguments joined by tabs, one line, flushed at once so a driver's
/// output interleaves correctly with other drivers' and with a test's reading of stdout.
fn print(lua: &Lua, args: Variadic<Value>) -> mlua::Result<()> {
    nested_tostring(|| print_unbounded(lua, args))
}

fn print_unbounded(lua: &Lua, args: Variadic<Value>) -> mlua::Result<()> {
    let mut line = Vec::with_capacity(64);
    let tostring: mlua::Function = lua.globals().get("tostring")?;
    for (i, v) in args.iter().enumerate() {
        if i > 0 {
            line.push(b'\t');
        }
        let s: mlua::LuaString = tostring.call(v.clone())?;
        line.extend_from_slice(&s.as_bytes());
    }
    line.push(b'\n');
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. piped into `head`) must not kill the driver.
    let _ = out.write_all(&line).and_then(|_| out.flush());
    Ok(())
}

/// `C4:GetTime(units, fractional)`: time since the Unix epoch, in ms unless told otherwise.
fn get_time(lua: &Lua, (_, units, fractional): (Value, Value, Value)) -> mlua::Result<MultiValue> {
    let units = match &units {
        Value::Nil => "ms".to_string(),
        Value::String(s) => s.to_string_lossy().to_lowercase(),
        other => {
            return fail(
                lua,
                format!(
                    "GetTime: units must be a string, got {}",
                    crate::c4::lua_type(other)
                ),
            );
        }
    };
    let nanos_per_unit: f64 = match units.as_str() {
        "ns" => 1.0,
        "us" => 1e3,
        "ms" => 1e6,
        "s" | "sec" => 1e9,
        "min" | "m" => 60e9,
        "h" => 3600e9,
        "d" => 86400e9,
        other => {
            return fail(
                lua,
                format!("GetTime: unknown units '{other}' (use ns, us, ms, s, min, h or d)"),
            );
        }
    };
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let value = since_epoch.as_nanos() as f64 / nanos_per_unit;
    let value = if matches!(fractional, Value::Boolean(true)) {
        value
    } else {
        value.floor()
    };
    Ok(MultiValue::from_iter([Value::Number(value)]))
}

/// `C4:JsonEncode`, `C4:JsonDecode` and the `c4json.null` sentinel.
fn install_json(lua: &Lua, c4: &Table) -> mlua::Result<()> {
    let c4json = lua.create_table()?;
    c4json.set("null", Value::NULL)?;
    lua.globals().set("c4json", c4json)?;
    c4.set(
        "JsonEncode",
        lua.create_function(
            |lua, (_, value, formatted, arrays): (Value, Value, Value, Value)| match json::encode(
                &value,
                formatted.as_boolean() == Some(true),
                arrays.as_boolean() == Some(true),
            ) {
                Ok(text) => Ok(MultiValue::from_iter([Value::String(
                    lua.create_string(text)?,
                )])),
                Err(e) => fail(lua, format!("JsonEncode: {e}")),
            },
        )?,
    )?;
    c4.set(
        "JsonDecode",
        lua.create_function(|lua, (_, text, decode_null): (Value, Value, Value)| {
            let Value::String(text) = text else {
                return fail(
                    lua,
                    format!(
                        "JsonDecode: expected a string, got {}",
                        crate::c4::lua_type(&text)
                    ),
                );
            };
            match json::decode_bytes(
                lua,
                &text.as_bytes(),
                decode_null.as_boolean() == Some(true),
            ) {
                Ok(v) => Ok(MultiValue::from_iter([v])),
                Err(e) => fail(lua, format!("JsonDecode: {e}")),
            }
        })?,
    )?;
    Ok(())
}

/// `C4:PersistSetValue`, `PersistGetValue`, `PersistDeleteValue`: the store is the
/// driver's [`PersistStore`] (in memory, or a file that survives restarts).
fn install_persist(lua: &Lua, c4: &Table) -> mlua::Result<()> {
    fn key(lua: &Lua, method: &str, k: &Value) -> Result<String, mlua::Result<MultiValue>> {
        match k {
            Value::String(s) => Ok(s.to_string_lossy()),
            other => Err(fail(
                lua,
                format!(
                    "{method}: key must be a string, got {}",
                    crate::c4::lua_type(other)
                ),
            )),
        }
    }
    c4.set(
        "PersistSetValue",
        lua.create_function(|lua, (_, k, v): (Value, Value, Value)| {
            let k = match key(lua, "PersistSetValue", &k) {
                Ok(k) => k,
                Err(r) => return r,
            };
            let result = match lua.app_data_mut::<PersistStore>() {
                Some(mut store) => store.set(&k, &v),
                None => Err("no store".to_string()),
            };
            match result {
                Ok(()) => Ok(MultiValue::new()),
                Err(e) => fail(lua, format!("PersistSetValue: {e}")),
            }
        })?,
    )?;
    c4.set(
        "PersistGetValue",
        lua.create_function(|lua, (_, k): (Value, Value)| {
            let k = match key(lua, "PersistGetValue", &k) {
                Ok(k) => k,
                Err(r) => return r,
            };
            let value = match lua.app_data_ref::<PersistStore>() {
                Some(store) => store.get(lua, &k)?,
                None => Value::Nil,
            };
            Ok(MultiValue::from_iter([value]))
        })?,
    )?;
    c4.set(
        "PersistDeleteValue",
        lua.create_function(|lua, (_, k): (Value, Value)| {
            let k = match key(lua, "PersistDeleteValue", &k) {
                Ok(k) => k,
                Err(r) => return r,
            };
            let result = match lua.app_data_mut::<PersistStore>() {
                Some(mut store) => store.delete(&k),
                None => Ok(()),
            };
            match result {
                Ok(()) => Ok(MultiValue::new()),
                Err(e) => fail(lua, format!("PersistDeleteValue: {e}")),
            }
        })?,
    )?;
    Ok(())
}
