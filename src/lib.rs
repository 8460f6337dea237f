//! luadriver: runs Control4 DriverWorks-style Lua drivers outside a controller.
//!
//! # Layout
//!
//! - [`driver`]: one driver's thread: the sandboxed Lua state, its event loop
//!   ([`driver::DriverLoop`]), timers, and the events that flow in and out.
//! - [`c4`]: the `C4` table a driver calls: core calls, timers, JSON, persisted values,
//!   and [`c4::mqtt`], the Lua face of the MQTT client.
//! - [`mqtt`]: the MQTT client itself: the command/event vocabulary, packet codecs over
//!   rumqttc's, the pure [`mqtt::outbox::Outbox`] and the per-client worker task.
//! - [`package`]: `.lua` files, folders and `.c4z` packages with their `driver.xml`.
//! - [`broker`]: the embedded broker (`--embedded-broker`, tests).
//! - [`cli`]: the `luadriver` command line.
//!
//! # Threads and channels
//!
//! Each driver owns one OS thread and one Lua state; nothing else touches the state. The
//! driver's MQTT workers are tasks on a current-thread tokio runtime of that same thread
//! ([`driver::io`]), run whenever the driver waits for its next event, so a publish and
//! its ack never cross a thread. The data path of a publish:
//!
//! ```text
//! Lua mqtt:Publish ─ checks ─▶ held until the callback returns (or 256 are held)
//!   (returns 0, msgId at once)   │ MqttCommand::Publish, tokio unbounded
//!                                ▼
//!                            worker task ─ outbox ─▶ socket ─▶ broker
//!                                                               │ ack
//! Lua OnPublish ◀─ DriverLoop ◀─ tokio unbounded ◀─ MqttEvent::Published
//! ```
//!
//! Both channels are unbounded so neither side ever blocks on the other: Lua never waits
//! for the network, and the host never waits for a busy driver.

pub mod broker;
pub mod c4;
pub mod cli;
pub mod driver;
pub mod mqtt;
pub mod package;
