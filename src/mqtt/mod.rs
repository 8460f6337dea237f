//! The MQTT client behind `C4:MQTT`: one worker task per client object.
//!
//! Lua thread → [`MqttCommand`] → worker → broker → ack → [`MqttEvent`] → driver loop.

pub mod codes;
pub mod tls;
mod types;

pub use types::*;
mod shim;
pub use shim::{MqttHandle, spawn_client, wire};
