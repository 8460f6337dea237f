//! Publishes held until the Lua code that made them returns to the driver loop.
//!
//! Workers on the driver's own thread (`driver::io`) could not move anything a `Publish`
//! hands over before Lua returns anyway; on the shared I/O thread they could, but would be
//! woken once per publish. Holding them here makes `Publish` an append, and the hand-over
//! one batch (one wake-up) per callback. The loop calls [`flush`] when Lua returns; a long
//! loop of publishes hands each [`FLUSH_AT`] over and gives the workers a turn, so its
//! messages stream out (and acks come in) while it runs. Any other command flushes first,
//! so each client's commands keep their order.

use crate::driver::context::DriverInfo;
use crate::mqtt::{MqttCommand, MqttHandle, PublishRequest};
use mlua::Lua;

/// Publishes held per client before they are handed over within the same callback.
pub const FLUSH_AT: usize = 256;

/// Publishes accepted since the driver's Lua code last returned to its loop, per client.
#[derive(Default)]
pub struct PendingPublishes {
    batches: Vec<(MqttHandle, Vec<MqttCommand>)>,
    /// Emptied batches, kept with their room: a new batch allocated at the first publish
    /// of a callback was a large allocation that made glibc's malloc consolidate what the
    /// worker had just freed, 5–20 µs inside `Publish` (the 99th percentile of its cost).
    spare: Vec<Vec<MqttCommand>>,
}

/// Emptied batches kept for reuse; one per client that publishes in the same callback.
const SPARE_BATCHES: usize = 8;

/// Hands every pending publish to its worker. The driver loop calls this whenever Lua code
/// it ran returns; a handle kept here would otherwise keep a collected client's worker alive.
pub fn flush(lua: &Lua) {
    {
        let Some(mut pending) = lua.app_data_mut::<PendingPublishes>() else {
            return;
        };
        if pending.batches.is_empty() {
            return;
        }
        // Sending runs no Lua, so the borrow may be held throughout.
        let PendingPublishes { batches, spare } = &mut *pending;
        for (handle, mut commands) in batches.drain(..) {
            for cmd in commands.drain(..) {
                // A worker that ended has had its sink closed: the driver is stopping.
                handle.send(cmd);
            }
            if spare.len() < SPARE_BATCHES {
                spare.push(commands);
            }
        }
    }
    if let Some(info) = lua.app_data_ref::<DriverInfo>() {
        info.io.wake_workers();
    }
}

pub(super) fn queue_publish(lua: &Lua, handle: &MqttHandle, request: PublishRequest) {
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
            let batch = pending
                .spare
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(FLUSH_AT));
            pending.batches.push((handle.clone(), batch));
            pending.batches.len() - 1
        }
    };
    let batch = &mut pending.batches[index].1;
    batch.push(cmd);
    if batch.len() < FLUSH_AT {
        return;
    }
    for cmd in batch.drain(..) {
        handle.send(cmd);
    }
    drop(pending);
    // Not inside the runtime: Lua runs only between the driver loop's waits.
    if let Some(info) = lua.app_data_ref::<DriverInfo>() {
        info.io.turn();
    }
}
