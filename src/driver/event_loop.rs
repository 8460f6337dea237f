//! The single-threaded loop of one driver: waits for the next event or timer deadline,
//! dispatches it to Lua, one at a time. A Lua error in any callback is logged with the
//! driver's name and traceback, and the loop goes on. Every call into Lua is watched
//! ([`super::watchdog`]): one that runs past the driver's busy limit is reported, and stopped
//! with a Lua error if the limits say so; the loop then goes on with the next event.

use super::context::{Clock, DriverInfo, DriverTimers};
use super::event::{DriverEvent, DriverNotice, EventReceiver, EventSender};
use super::io::{DriverIo, Next};
use super::timers::TimerHeap;
use super::watchdog::{self, DriverLimits, Watch};
use super::{DriverSpec, InitType, sandbox};
use crate::c4;
use crate::c4::persist::PersistStore;
use crossbeam_channel::Sender;
use mlua::{Function, IntoLuaMulti, Lua, Table, Value};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// How long a stopping driver's MQTT workers may take to say goodbye to their brokers
/// (a clean DISCONNECT, so no will is published).
const CLOSE_LIMIT: Duration = Duration::from_secs(3);

/// A loaded driver, ready to run its loop on the current thread.
pub struct DriverLoop {
    lua: Lua,
    id: u32,
    name: String,
    init_type: InitType,
    events_rx: EventReceiver,
    /// The runtime the driver's MQTT workers run on; also in the Lua state's [`DriverInfo`].
    io: Rc<DriverIo>,
    notices: Option<Sender<DriverNotice>>,
    watch: Arc<Watch>,
}

impl DriverLoop {
    /// Builds the Lua state, runs the chunk and `OnDriverInit`. An error in the chunk fails
    /// the load (`file:line: message`); an error in `OnDriverInit` is logged, not fatal.
    /// Uses the process's default [`DriverLimits`].
    pub fn load(
        spec: DriverSpec,
        events_tx: EventSender,
        events_rx: EventReceiver,
        notices: Option<Sender<DriverNotice>>,
    ) -> Result<DriverLoop, String> {
        let limits = watchdog::default_limits();
        Self::load_with_limits(spec, limits, events_tx, events_rx, notices)
    }

    /// [`DriverLoop::load`] with limits of its own for this driver.
    pub fn load_with_limits(
        spec: DriverSpec,
        limits: DriverLimits,
        events_tx: EventSender,
        events_rx: EventReceiver,
        notices: Option<Sender<DriverNotice>>,
    ) -> Result<DriverLoop, String> {
        let package = std::sync::Arc::new(spec.package);
        let name = package.name.clone();
        let io = Rc::new(
            DriverIo::new(spec.io)
                .map_err(|e| format!("{name}: cannot start the driver's I/O: {e}"))?,
        );
        let finder = std::sync::Arc::clone(&package);
        let lua = sandbox::new_state(Box::new(move |module| finder.find_module(module)))
            .map_err(|e| format!("{name}: cannot create the Lua state: {e}"))?;
        let watch = Watch::new(spec.id, name.clone(), limits, notices.clone());
        watchdog::arm(&lua, &watch).map_err(|e| format!("{name}: cannot set limits: {e}"))?;

        // driver.xml defaults first, then what the user gave.
        let mut properties = package.properties.clone();
        for (k, v) in spec.properties {
            match properties.iter_mut().find(|(name, _)| *name == k) {
                Some(slot) => slot.1 = v,
                None => properties.push((k, v)),
            }
        }
        lua.set_app_data(DriverInfo {
            id: spec.id,
            name: name.clone(),
            config: package.config.clone(),
            declared_properties: properties.iter().map(|(k, _)| k.clone()).collect(),
            events_tx,
            notices: notices.clone(),
            io: Rc::clone(&io),
        });
        let store = match &spec.persist_path {
            Some(path) => PersistStore::open(path).map_err(|e| format!("{name}: {e}"))?,
            None => PersistStore::in_memory(),
        };
        lua.set_app_data(store);
        lua.set_app_data(DriverTimers {
            heap: TimerHeap::default(),
            clock: Clock::Real,
        });
        c4::install(&lua, &properties).map_err(|e| format!("{name}: cannot install C4: {e}"))?;

        {
            let _busy = watch.enter();
            lua.load(&package.main_source[..])
                .set_name(&package.main_chunk_name)
                .set_mode(mlua::chunk::ChunkMode::Text)
                .exec()
                .map_err(|e| load_error_message(&e, &package.main_chunk_name))?;
        }
        c4::mqtt::flush(&lua);

        let driver = DriverLoop {
            lua,
            id: spec.id,
            name,
            init_type: spec.init_type,
            events_rx,
            io,
            notices,
            watch,
        };
        driver.call_global("OnDriverInit", driver.init_type.as_str());
        driver.notify(DriverNotice::Initialized { id: driver.id });
        driver.watch.announce();
        Ok(driver)
    }

    pub fn lua(&self) -> &Lua {
        &self.lua
    }

    /// Runs until `Stop`. Events that arrive before `LateInit` wait for it, so
    /// `OnDriverLateInit` always comes before anything else the driver is told.
    pub fn run(mut self) {
        let mut early = VecDeque::new();
        loop {
            match self.io.next_event(&mut self.events_rx, None) {
                Next::Event(DriverEvent::LateInit) => break,
                Next::Event(DriverEvent::Stop { reason }) => return self.stop(&reason),
                Next::Event(other) => early.push_back(other),
                Next::Deadline => {}
                Next::Closed => return self.stop("DRIVER_REMOVED"),
            }
        }
        self.call_global("OnDriverLateInit", self.init_type.as_str());
        for event in early {
            if let Some(reason) = self.dispatch(event) {
                return self.stop(&reason);
            }
        }
        loop {
            self.fire_due_timers();
            let deadline = self.next_deadline();
            match self.io.next_event(&mut self.events_rx, deadline) {
                Next::Event(event) => {
                    if let Some(reason) = self.dispatch(event) {
                        return self.stop(&reason);
                    }
                }
                Next::Deadline => {}
                Next::Closed => return self.stop("DRIVER_REMOVED"),
            }
        }
    }

    /// Handles one event; returns the stop reason when it was `Stop`.
    fn dispatch(&self, event: DriverEvent) -> Option<String> {
        // Setting a property or delivering MQTT may run the driver's metamethods too.
        let _busy = self.watch.enter();
        match event {
            DriverEvent::LateInit => {}
            DriverEvent::Stop { reason } => return Some(reason),
            DriverEvent::PropertyChanged { name, value } => {
                let set = self
                    .lua
                    .globals()
                    .get::<Table>("Properties")
                    .and_then(|props| props.set(name.as_str(), value));
                if let Err(e) = set {
                    self.report("Properties", &e);
                }
                self.call_global("OnPropertyChanged", name);
            }
            DriverEvent::Command { command, params } => {
                let args = self.lua.create_table().and_then(|t| {
                    for (k, v) in params {
                        t.set(k, v)?;
                    }
                    Ok(t)
                });
                match args {
                    Ok(t) => self.call_global("ExecuteCommand", (command, t)),
                    Err(e) => self.report("ExecuteCommand", &e),
                }
            }
            DriverEvent::Mqtt { client, event } => {
                self.io.mqtt_event_taken();
                if let Err(e) = c4::mqtt::deliver(&self.lua, client, event) {
                    self.report("MQTT callback", &e);
                }
                c4::mqtt::flush(&self.lua);
            }
        }
        None
    }

    fn next_deadline(&self) -> Option<std::time::Instant> {
        let mut timers = self.lua.app_data_mut::<DriverTimers>()?;
        match timers.clock {
            Clock::Real => timers.heap.next_deadline(),
            // Virtual time only moves when the harness says so.
            Clock::Virtual { .. } => None,
        }
    }

    /// Fires the timers due now. `now` is read once: a repeating timer whose callbacks
    /// take longer than its period fires once per pass, so events still get their turn.
    fn fire_due_timers(&self) {
        let Some(now) = self
            .lua
            .app_data_ref::<DriverTimers>()
            .map(|timers| timers.clock.now())
        else {
            return;
        };
        loop {
            // The borrow of the timers ends before Lua runs: a callback may set timers.
            let due = {
                let Some(mut timers) = self.lua.app_data_mut::<DriverTimers>() else {
                    return;
                };
                timers.heap.pop_due(now)
            };
            let Some(due) = due else { return };
            match c4::timer_callback(&self.lua, &due) {
                Ok(Some((callback, args))) => self.call("timer callback", &callback, args),
                Ok(None) => {}
                Err(e) => self.report("timer", &e),
            }
        }
    }

    /// `OnDriverDestroyed`, then the Lua state goes (closing every client) and the workers
    /// get up to [`CLOSE_LIMIT`] to disconnect cleanly before `Stopped` is sent.
    fn stop(self, reason: &str) {
        self.call_global("OnDriverDestroyed", reason);
        let DriverLoop {
            lua,
            id,
            io,
            notices,
            events_rx,
            ..
        } = self;
        drop(lua);
        match Rc::try_unwrap(io) {
            Ok(io) => io.finish(CLOSE_LIMIT),
            // Only the Lua state held another reference, and it is gone.
            Err(_) => log::debug!("driver I/O still shared at stop"),
        }
        drop(events_rx);
        if let Some(tx) = &notices {
            let _ = tx.send(DriverNotice::Stopped { id });
        }
    }

    /// Calls a global function of the driver if it defines one.
    fn call_global(&self, name: &str, args: impl IntoLuaMulti) {
        match self.lua.globals().get::<Value>(name) {
            Ok(Value::Function(f)) => self.call(name, &f, args),
            Ok(Value::Nil) => {}
            Ok(other) => log::warn!(
                target: &self.name,
                "{name} is a {}, not a function; not called",
                crate::c4::lua_type(&other)
            ),
            Err(e) => self.report(name, &e),
        }
    }

    fn call(&self, what: &str, f: &Function, args: impl IntoLuaMulti) {
        let _busy = self.watch.enter();
        if let Err(e) = f.call::<()>(args) {
            self.report(what, &e);
        }
        // What the driver published in this callback goes to the workers now.
        c4::mqtt::flush(&self.lua);
    }

    /// An error from Lua: logged with the driver's name (the log target) and traceback.
    fn report(&self, what: &str, error: &mlua::Error) {
        log::error!(target: &self.name, "error in {what}: {error}");
        if watchdog::is_memory_error(error) {
            let limit = self.watch.limits().memory_limit.unwrap_or(0);
            // What the failed call built is garbage now; free it before the next event.
            if let Err(e) = self.lua.gc_collect() {
                log::debug!(target: &self.name, "collection after a memory error: {e}");
            }
            log::warn!(
                target: &self.name,
                "the driver's Lua reached its memory limit of {} MiB (in use after a full \
                 collection: {} MiB)",
                limit / (1024 * 1024),
                self.lua.used_memory() / (1024 * 1024)
            );
            self.watch
                .notify(DriverNotice::OutOfMemory { id: self.id, limit });
        }
    }

    fn notify(&self, notice: DriverNotice) {
        if let Some(tx) = &self.notices {
            let _ = tx.send(notice);
        }
    }
}

/// A load error as the user needs it: `file:line: message`, then the traceback if any.
/// A message that does not name the file (`error({})` has no position, a failing
/// `__tostring` on the error gives "error in error handling") is prefixed with it.
fn load_error_message(e: &mlua::Error, chunk_name: &str) -> String {
    let message = match e {
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        other => other.to_string(),
    };
    let file = chunk_name.trim_start_matches('@');
    if message.contains(file) {
        message
    } else {
        format!("{file}: {message}")
    }
}
