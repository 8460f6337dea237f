//! `C4:SetTimer(ms, fn, repeat)` and the timer objects it returns.
//!
//! The schedule lives in the driver's [`DriverTimers`] (app data); the callback and the
//! timer object live in a registry table keyed by timer id, removed when the timer ends,
//! so nothing leaks and the event loop can fire a timer with one lookup.

use super::fail;
use crate::driver::context::DriverTimers;
use crate::driver::timers::{Due, TimerId};
use mlua::{AnyUserData, Function, Lua, MultiValue, Table, UserData, UserDataMethods, Value};
use std::time::Duration;

const CALLBACKS: &str = "luadriver.timers";
/// The shortest delay and period: DriverWorks timers count in milliseconds.
const MIN_DELAY: Duration = Duration::from_millis(1);
/// The longest delay: a century is never for a driver, and any instant plus it is valid.
const MAX_DELAY: Duration = Duration::from_secs(100 * 365 * 86_400);

/// What `SetTimer` returns: a handle with `:Cancel()`.
pub struct LuaTimer {
    id: TimerId,
}

impl UserData for LuaTimer {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        // `timer.Cancel()` (a '.' for a ':') is answered with `nil, message`, not thrown.
        methods.add_function("Cancel", |lua, args: MultiValue| {
            let id = match args.front() {
                Some(Value::UserData(ud)) => ud.borrow::<LuaTimer>().ok().map(|t| t.id),
                _ => None,
            };
            match id {
                Some(id) => cancel(lua, id).map(|()| MultiValue::new()),
                None => fail(
                    lua,
                    "Cancel: call it as a method, with ':' (timer:Cancel())".into(),
                ),
            }
        });
        methods.add_meta_method("__tostring", |_, this, ()| {
            Ok(format!("C4Timer({})", this.id))
        });
    }
}

pub fn install(lua: &Lua, c4: &Table) -> mlua::Result<()> {
    lua.set_named_registry_value(CALLBACKS, lua.create_table()?)?;
    c4.set("SetTimer", lua.create_function(set_timer)?)?;
    Ok(())
}

fn set_timer(
    lua: &Lua,
    (_, ms, callback, repeat): (Value, Value, Value, Value),
) -> mlua::Result<MultiValue> {
    let ms = match ms {
        Value::Integer(n) => n as f64,
        Value::Number(n) => n,
        other => {
            return fail(
                lua,
                format!(
                    "SetTimer: delay must be a number of ms, got {}",
                    crate::c4::lua_type(&other)
                ),
            );
        }
    };
    if !ms.is_finite() || ms <= 0.0 {
        return fail(lua, format!("SetTimer: delay must be > 0 ms, got {ms}"));
    }
    let Value::Function(callback) = callback else {
        return fail(
            lua,
            format!(
                "SetTimer: callback must be a function, got {}",
                crate::c4::lua_type(&callback)
            ),
        );
    };
    let repeat = match repeat {
        Value::Nil => false,
        Value::Boolean(b) => b,
        other => {
            return fail(
                lua,
                format!(
                    "SetTimer: repeat must be a boolean, got {}",
                    crate::c4::lua_type(&other)
                ),
            );
        }
    };
    // Beyond what the clock can add (1e300 ms) is "never"; below a millisecond (1e-300) is
    // a millisecond, as a repeating timer of period 0 would be due forever.
    let delay = Duration::try_from_secs_f64(ms / 1000.0)
        .unwrap_or(MAX_DELAY)
        .clamp(MIN_DELAY, MAX_DELAY);
    let id = {
        let mut timers = lua
            .app_data_mut::<DriverTimers>()
            .ok_or_else(|| mlua::Error::runtime("SetTimer called outside a driver"))?;
        let now = timers.clock.now();
        timers.heap.add(now, delay, repeat)
    };
    let object = lua.create_userdata(LuaTimer { id })?;
    let entry =
        lua.create_sequence_from([Value::Function(callback), Value::UserData(object.clone())])?;
    callbacks(lua)?.raw_set(id, entry)?;
    Ok(MultiValue::from_iter([Value::UserData(object)]))
}

fn callbacks(lua: &Lua) -> mlua::Result<Table> {
    lua.named_registry_value(CALLBACKS)
}

fn cancel(lua: &Lua, id: TimerId) -> mlua::Result<()> {
    if let Some(mut timers) = lua.app_data_mut::<DriverTimers>() {
        timers.heap.cancel(id);
    }
    callbacks(lua)?.raw_set(id, Value::Nil)
}

/// The callback of a due timer, with its arguments: `fn(timer)` or, repeating,
/// `fn(timer, skips)`. A finished timer's entry is dropped here. `None` when the timer was
/// cancelled in the meantime.
pub fn take_due(lua: &Lua, due: &Due) -> mlua::Result<Option<(Function, MultiValue)>> {
    let table = callbacks(lua)?;
    let Some(entry) = table.raw_get::<Option<Table>>(due.id)? else {
        return Ok(None);
    };
    let callback: Function = entry.raw_get(1)?;
    let object: AnyUserData = entry.raw_get(2)?;
    if due.finished {
        table.raw_set(due.id, Value::Nil)?;
    }
    let mut args = MultiValue::from_iter([Value::UserData(object)]);
    if !due.finished {
        args.push_back(Value::Integer(due.skips as i64));
    }
    Ok(Some((callback, args)))
}
