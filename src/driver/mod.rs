//! One driver = one Lua state = one event loop on its own OS thread; its MQTT connections
//! on that thread or on the process's shared I/O thread ([`IoThread`]).
//!
//! In: a [`DriverSpec`] and [`DriverEvent`]s through its [`DriverHandle`]. Out:
//! [`DriverNotice`]s to the host, and whatever the driver does through `C4`.
//! Lifecycle: the chunk runs, then `OnDriverInit(initType)`; on `LateInit`,
//! `OnDriverLateInit(initType)`; then events until `Stop`, then `OnDriverDestroyed(reason)`.

pub mod context;
pub mod event;
mod event_loop;
pub mod io;
mod sandbox;
mod shared_io;
pub mod timers;
pub mod watchdog;

pub use event::{ClientKey, DriverEvent, DriverNotice, EventReceiver, EventSender, event_channel};
pub use event_loop::DriverLoop;
pub use io::IoThread;
pub use watchdog::DriverLimits;

use crate::package::DriverPackage;
use crossbeam_channel::Sender;
use std::thread::JoinHandle;

/// `OnDriverInit`'s argument: why the driver is starting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitType {
    #[default]
    Adding,
    Startup,
    Updating,
}

impl InitType {
    pub fn as_str(self) -> &'static str {
        match self {
            InitType::Adding => "DIT_ADDING",
            InitType::Startup => "DIT_STARTUP",
            InitType::Updating => "DIT_UPDATING",
        }
    }
}

/// Everything needed to start one driver.
#[derive(Debug, Clone)]
pub struct DriverSpec {
    /// `C4:GetDeviceID()`.
    pub id: u32,
    pub package: DriverPackage,
    /// Values given at start (command line, host config); they override driver.xml defaults.
    pub properties: Vec<(String, String)>,
    pub init_type: InitType,
    /// Where `C4:Persist*` values are kept across restarts; `None` keeps them in memory.
    pub persist_path: Option<std::path::PathBuf>,
    /// Where the driver's MQTT connections do their socket work: its own thread, or the
    /// process's shared I/O thread (for a host with many busy drivers).
    pub io: IoThread,
}

/// The host's side of a running driver.
pub struct DriverHandle {
    pub id: u32,
    pub name: String,
    events_tx: EventSender,
    thread: Option<JoinHandle<()>>,
}

impl DriverHandle {
    /// Queues an event for the driver; false when its loop has ended.
    pub fn send(&self, event: DriverEvent) -> bool {
        self.events_tx.send(event).is_ok()
    }

    /// Asks the driver to stop (`OnDriverDestroyed(reason)`) and waits for its thread.
    pub fn stop(mut self, reason: &str) {
        self.stop_and_join(reason);
    }

    fn stop_and_join(&mut self, reason: &str) {
        let _ = self.events_tx.send(DriverEvent::Stop {
            reason: reason.to_string(),
        });
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!(target: &self.name, "driver thread panicked");
        }
    }
}

impl Drop for DriverHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_and_join("DRIVER_REMOVED");
        }
    }
}

/// The native stack of a driver's thread. LuaJIT has no limit on recursion through C
/// (a `gsub` callback calling `gsub`) other than its Lua stack of 65,500 slots, which such
/// recursion reaches only after more than 64 MiB of native stack when the watchdog's hook
/// is on. Address space is only reserved: a driver pays for the pages it touches.
const DRIVER_STACK_BYTES: usize = 256 << 20;

/// Starts a driver on its own thread, with the process's default [`DriverLimits`]
/// ([`watchdog::set_default_limits`]). Load errors arrive as [`DriverNotice::Failed`].
pub fn spawn(spec: DriverSpec, notices: Sender<DriverNotice>) -> std::io::Result<DriverHandle> {
    spawn_with_limits(spec, watchdog::default_limits(), notices)
}

/// [`spawn`] with limits of its own for this driver.
pub fn spawn_with_limits(
    spec: DriverSpec,
    limits: DriverLimits,
    notices: Sender<DriverNotice>,
) -> std::io::Result<DriverHandle> {
    let (events_tx, events_rx) = event_channel();
    let id = spec.id;
    let name = spec.package.name.clone();
    let loop_tx = events_tx.clone();
    let thread = std::thread::Builder::new()
        .name(format!("driver-{name}"))
        // LuaJIT bounds recursion by its Lua stack (65,500 slots) only, and recursion
        // through C (string.gsub callbacks, print inside __tostring) reaches that bound
        // after tens of MB of native stack; 2 MB (Rust's default) aborted the process.
        // Reserved, not committed: only what a driver uses is paid for.
        .stack_size(DRIVER_STACK_BYTES)
        .spawn(move || {
            let id = spec.id;
            let loaded = DriverLoop::load_with_limits(
                spec,
                limits,
                loop_tx,
                events_rx,
                Some(notices.clone()),
            );
            match loaded {
                Ok(driver) => driver.run(),
                Err(error) => {
                    let _ = notices.send(DriverNotice::Failed { id, error });
                }
            }
        })?;
    Ok(DriverHandle {
        id,
        name,
        events_tx,
        thread: Some(thread),
    })
}
