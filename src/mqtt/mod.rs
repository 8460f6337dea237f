//! The MQTT client behind `C4:MQTT`: one worker task per client object, on the runtime of
//! the driver that made it or on the shared I/O thread (see `driver::io`).
//!
//! Lua thread → [`MqttCommand`] → worker → broker → ack → [`MqttEvent`] → driver loop.
//!
//! Layout: `types` is the vocabulary both sides share; [`wire`] turns packets into bytes
//! and back for MQTT 3.1.1 and 5 alike; [`outbox`] is the pure session state (packet ids,
//! window, resends, exactly-once completion); `link` opens a connection; `worker` is the
//! task that ties them to a socket.

mod backlog;
pub mod codes;
mod link;
pub mod outbox;
pub mod tls;
mod types;
pub mod wire;
mod worker;

pub use backlog::EventBacklog;
pub use types::*;

use std::sync::Arc;
use tokio::sync::mpsc::{self, UnboundedSender};
use tokio_util::task::TaskTracker;

/// The Lua side's end of one client: sends commands, reads live status. Cheap to clone;
/// when the last clone is dropped the worker disconnects (if connected), closes the
/// socket and ends without emitting anything more.
#[derive(Clone)]
pub struct MqttHandle {
    /// Into the worker; unbounded so the Lua thread never waits.
    commands: UnboundedSender<MqttCommand>,
    pub status: Arc<ClientStatus>,
}

impl MqttHandle {
    /// Hands `cmd` to the worker without blocking. False if the worker has ended (its
    /// event sink was closed).
    pub fn send(&self, cmd: MqttCommand) -> bool {
        self.commands.send(cmd).is_ok()
    }

    /// True once the worker has ended: nothing sent now would be taken.
    pub fn is_closed(&self) -> bool {
        self.commands.is_closed()
    }

    /// Is `other` a handle of the same client?
    pub fn same_client(&self, other: &MqttHandle) -> bool {
        Arc::ptr_eq(&self.status, &other.status)
    }
}

/// Starts one client's worker on `rt`, counted in `workers` (so its owner can wait for it
/// to close); its events go to `sink`, counted in `backlog` (it stops reading while that is
/// full). Nothing connects until a [`MqttCommand::Connect`] arrives.
pub fn spawn_client(
    rt: &tokio::runtime::Handle,
    workers: &TaskTracker,
    sink: EventSink,
    backlog: Arc<EventBacklog>,
) -> MqttHandle {
    let (commands, commands_rx) = mpsc::unbounded_channel();
    let status = Arc::new(ClientStatus::default());
    workers.spawn_on(
        worker::Worker::new(commands_rx, sink, backlog, status.clone()).run(),
        rt,
    );
    MqttHandle { commands, status }
}
