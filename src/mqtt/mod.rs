//! The MQTT client behind `C4:MQTT`: one worker task per client object.
//!
//! Lua thread → [`MqttCommand`] → worker → broker → ack → [`MqttEvent`] → driver loop.

pub mod codes;
pub mod outbox;
mod types;
pub mod wire;

pub use types::*;
