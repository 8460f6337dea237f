//! The driver thread's own I/O: a current-thread tokio runtime on which the driver's MQTT
//! workers run, while the driver waits for its next event and, in a long callback, at
//! every batch of publishes handed over.
//!
//! In: the driver's event receiver and its next timer deadline. Out: the next
//! [`DriverEvent`] (or word that the deadline passed, or that every sender is gone), with
//! the workers' socket work done in between.
//!
//! Why here and not on a shared I/O thread: a publish, its ack and the `OnPublish` they
//! lead to then never cross a thread. On a shared runtime each round trip paid two
//! cross-thread wake-ups (Lua → I/O → Lua), and the two busy threads of one driver took
//! CPU from the broker on small machines; a single-threaded client pays neither. The price:
//! a callback that runs for a long time without publishing holds its connection's I/O
//! too (acks wait in the socket, keep-alive pings are late — after 1.5 × the keep-alive the
//! broker drops the link, and the messages in flight are resent on reconnect, none lost).

use super::event::{DriverEvent, EventReceiver};
use crate::mqtt::{self, EventSink, MqttHandle};
use std::cell::Cell;
use std::time::{Duration, Instant};
use tokio::runtime::{Builder, Runtime};
use tokio::sync::mpsc::error::TryRecvError;
use tokio_util::task::TaskTracker;

/// Events handled back to back before the workers get a turn even if more are waiting:
/// events from the host must not starve the sockets.
const EVENTS_PER_TURN: u32 = 64;

/// What [`DriverIo::next_event`] brought.
pub enum Next {
    Event(DriverEvent),
    /// The deadline passed first.
    Deadline,
    /// Every sender is gone: the host dropped the driver.
    Closed,
}

/// One driver's runtime and the MQTT workers spawned on it.
pub struct DriverIo {
    rt: Runtime,
    workers: TaskTracker,
    /// Events handled since the workers last had a turn.
    since_turn: Cell<u32>,
    /// Something was handed to a worker since its last turn.
    wants_turn: Cell<bool>,
}

impl DriverIo {
    pub fn new() -> std::io::Result<DriverIo> {
        let rt = Builder::new_current_thread().enable_all().build()?;
        Ok(DriverIo {
            rt,
            workers: TaskTracker::new(),
            since_turn: Cell::new(0),
            wants_turn: Cell::new(false),
        })
    }

    /// Starts an MQTT client's worker on this runtime; `finish` waits for it.
    pub fn spawn_client(&self, sink: EventSink) -> MqttHandle {
        mqtt::spawn_client(self.rt.handle(), &self.workers, sink)
    }

    /// Notes that commands were handed to a worker: it gets a turn before the next event.
    pub fn wake_workers(&self) {
        self.wants_turn.set(true);
    }

    /// Lets the workers do what is ready — take commands, write, read what has arrived —
    /// without waiting for anything. Called from inside Lua code that publishes a lot, so
    /// its messages stream out while it runs; never from inside the runtime.
    pub fn turn(&self) {
        self.since_turn.set(0);
        self.wants_turn.set(false);
        self.rt.block_on(tokio::task::yield_now());
    }

    /// The next event, running the workers while none is there. Waits until `deadline` at
    /// most (forever when `None`).
    pub fn next_event(&self, events: &mut EventReceiver, deadline: Option<Instant>) -> Next {
        match events.try_recv() {
            Ok(event) => {
                // Events are waiting, so the runtime would not run before this one is
                // returned: give the workers their turn here when they need it.
                if self.wants_turn.get() || self.since_turn.get() >= EVENTS_PER_TURN {
                    self.turn();
                } else {
                    self.since_turn.set(self.since_turn.get() + 1);
                }
                return Next::Event(event);
            }
            Err(TryRecvError::Disconnected) => return Next::Closed,
            Err(TryRecvError::Empty) => {}
        }
        // Waiting runs the workers first.
        self.since_turn.set(0);
        self.wants_turn.set(false);
        self.rt.block_on(async {
            let received = match deadline {
                Some(deadline) => {
                    let deadline = tokio::time::Instant::from_std(deadline);
                    match tokio::time::timeout_at(deadline, events.recv()).await {
                        Ok(received) => received,
                        Err(_) => return Next::Deadline,
                    }
                }
                None => events.recv().await,
            };
            match received {
                Some(event) => Next::Event(event),
                None => Next::Closed,
            }
        })
    }

    /// After the driver's Lua state is gone (so every client handle is dropped): runs the
    /// workers until each has said goodbye to its broker, `limit` at most.
    pub fn finish(self, limit: Duration) {
        self.workers.close();
        let workers = self.workers.clone();
        let ended = self
            .rt
            .block_on(async { tokio::time::timeout(limit, workers.wait()).await.is_ok() });
        if !ended {
            log::debug!("MQTT workers still closing after {limit:?}; dropped");
        }
    }
}
