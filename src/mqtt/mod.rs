//! The MQTT client behind `C4:MQTT`: one worker task per client object.
//!
//! Lua thread → [`MqttCommand`] → worker → broker → ack → [`MqttEvent`] → driver loop.

pub mod codes;
mod types;
pub mod wire;

pub use types::*;
