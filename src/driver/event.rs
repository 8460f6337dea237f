//! What flows into a driver's Lua thread ([`DriverEvent`]) and what a driver tells its host
//! ([`DriverNotice`]). Everything a driver sees arrives as one of these events, one at a time.

use crate::mqtt::MqttEvent;
use tokio::sync::mpsc;

/// Into a driver's loop: from the host, and from the driver's own MQTT workers. Unbounded,
/// so no sender ever waits for a busy driver; the loop waits on it through its runtime.
pub type EventSender = mpsc::UnboundedSender<DriverEvent>;
pub type EventReceiver = mpsc::UnboundedReceiver<DriverEvent>;

pub fn event_channel() -> (EventSender, EventReceiver) {
    mpsc::unbounded_channel()
}

/// A `C4:MQTT` object of one driver; ids are never reused while the driver runs, so events
/// of a collected object can never reach a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(pub u64);

/// Everything that flows into a driver's event loop.
#[derive(Debug)]
pub enum DriverEvent {
    /// Every driver of the host has had its `OnDriverInit`: call `OnDriverLateInit`.
    LateInit,
    /// Set `Properties[name]` and call `OnPropertyChanged(name)`.
    PropertyChanged { name: String, value: String },
    /// Call `ExecuteCommand(command, params)`.
    Command {
        command: String,
        params: Vec<(String, String)>,
    },
    /// A result from one of the driver's MQTT clients.
    Mqtt { client: ClientKey, event: MqttEvent },
    /// Call `OnDriverDestroyed(reason)` and end the loop.
    Stop { reason: String },
}

/// What a driver tells its host. `id` is the driver's device id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverNotice {
    /// The chunk ran and `OnDriverInit` returned (or threw: that is logged, not fatal).
    Initialized { id: u32 },
    /// The driver could not be loaded: the chunk did not compile or threw.
    Failed { id: u32, error: String },
    /// `C4:FireEvent(name)`.
    Event { id: u32, name: String },
    /// `OnDriverDestroyed` returned; the thread is ending.
    Stopped { id: u32 },
    /// One call into the driver's Lua has run longer than its busy limit (reported once per
    /// call; it is being stopped if the driver's limits say so). Sent after `Initialized`.
    Stuck { id: u32, seconds: u64 },
    /// The call reported as `Stuck` has ended (returned or was stopped) after `seconds`.
    Responsive { id: u32, seconds: u64 },
    /// A call failed because the driver's Lua state reached its memory limit (bytes).
    OutOfMemory { id: u32, limit: usize },
}
