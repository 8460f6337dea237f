//! The process's shared MQTT I/O thread: one current-thread tokio runtime, on a thread of
//! its own, running the MQTT workers of every driver placed there ([`IoThread::Shared`]).
//!
//! In: the first request for it (it starts then, and lives as long as the process). Out: a
//! runtime handle the drivers spawn their workers on. It never runs Lua: a worker's events
//! go to its driver's loop through the driver's event channel, as on the driver's own thread.
//!
//! Why a shared thread, when each driver has a thread anyway: with many busy drivers, a
//! driver thread that does its own socket work is woken once per ack, and every wake-up is
//! a context switch into a cold thread. One thread serving every connection takes all the
//! sockets that are ready in one `epoll_wait`, as a single rumqttc runtime with many clients
//! does. Measured with 1,000 drivers publishing QoS 1 to Mosquitto on 2 cores
//! (`cargo bench --bench publish -- --only scale`): 36–44k msg/s with each driver's I/O
//! on its own thread, 92–137k on the shared thread (raw rumqttc, 1,000 clients on one
//! runtime, 139–186k). For a lone driver the own thread is faster (no thread between
//! `Publish` and the socket), which is why that stays the default.
//!
//! One thread, not a pool: on the small machines this runs on, the broker often shares the
//! cores, and raw rumqttc too does best there with all its clients on one thread. Its
//! ceiling is one core's worth of socket work, far above what a home's drivers publish.
//!
//! [`IoThread::Shared`]: super::IoThread::Shared

use std::sync::Mutex;
use tokio::runtime::{Builder, Handle};

static SHARED: Mutex<Option<Handle>> = Mutex::new(None);

/// The shared runtime, started on first use.
pub fn handle() -> std::io::Result<Handle> {
    // A poisoned lock only means a panic while starting: the state is still an Option.
    let mut shared = SHARED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(handle) = shared.as_ref() {
        return Ok(handle.clone());
    }
    let rt = Builder::new_current_thread()
        .enable_all()
        // Its blocking pool (name lookups) runs beside it.
        .thread_name("luadriver-io-blocking")
        .build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("luadriver-io".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))?;
    *shared = Some(handle.clone());
    Ok(handle)
}
