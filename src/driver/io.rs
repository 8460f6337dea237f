//! The driver thread's own I/O: a current-thread tokio runtime on which the driver waits
//! for its next event and timer, and on which its MQTT workers run when the driver is
//! placed on its own thread ([`IoThread::Own`]): while the driver waits and, in a long
//! callback, at every batch of publishes handed over. Placed on the shared I/O thread
//! ([`IoThread::Shared`], see [`super::shared_io`]), the workers run there instead.
//!
//! In: the driver's event receiver and its next timer deadline. Out: the next
//! [`DriverEvent`] (or word that the deadline passed, or that every sender is gone), with
//! the workers' socket work done in between when they are here.
//!
//! Why the driver's own thread by default: a publish, its ack and the `OnPublish` they
//! lead to then never cross a thread. On a shared runtime each round trip pays two
//! cross-thread wake-ups (Lua → I/O → Lua), and the two busy threads of one driver take
//! CPU from the broker on small machines; a single-threaded client pays neither. The price:
//! a callback that runs for a long time without publishing holds its connection's I/O
//! too (acks wait in the socket, keep-alive pings are late — after 1.5 × the keep-alive the
//! broker drops the link, and the messages in flight are resent on reconnect, none lost).
//! Many busy drivers are better served by the shared thread: see [`super::shared_io`].

use super::event::{DriverEvent, EventReceiver};
use super::shared_io;
use crate::mqtt::{self, EventBacklog, EventSink, MqttHandle};
use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::{Builder, Handle, Runtime};
use tokio::sync::mpsc::error::TryRecvError;
use tokio_util::task::TaskTracker;

/// Events handled back to back before the workers get a turn even if more are waiting:
/// events from the host must not starve the sockets.
const EVENTS_PER_TURN: u32 = 64;

/// Where a driver's MQTT workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoThread {
    /// On the driver's own thread: fastest for one driver, or a few.
    #[default]
    Own,
    /// On the process's shared I/O thread: for a host with many busy drivers.
    Shared,
}

/// What [`DriverIo::next_event`] brought.
pub enum Next {
    Event(DriverEvent),
    /// The deadline passed first.
    Deadline,
    /// Every sender is gone: the host dropped the driver.
    Closed,
}

/// One driver's runtime, and its MQTT workers wherever they run.
pub struct DriverIo {
    rt: Runtime,
    /// The shared I/O thread's runtime, when the workers run there.
    shared: Option<Handle>,
    workers: TaskTracker,
    /// MQTT events the workers handed over and the loop has not dispatched yet.
    backlog: Arc<EventBacklog>,
    /// Events handled since the workers last had a turn.
    since_turn: Cell<u32>,
    /// Something was handed to a worker since its last turn.
    wants_turn: Cell<bool>,
}

impl DriverIo {
    pub fn new(placement: IoThread) -> std::io::Result<DriverIo> {
        let (rt, shared) = match placement {
            IoThread::Own => (Builder::new_current_thread().enable_all().build()?, None),
            // Only timers and the event channel here: without sockets the thread sleeps on
            // a futex, which is cheaper to wake than an epoll set.
            IoThread::Shared => (
                Builder::new_current_thread().enable_time().build()?,
                Some(shared_io::handle()?),
            ),
        };
        Ok(DriverIo {
            rt,
            shared,
            workers: TaskTracker::new(),
            backlog: EventBacklog::new(EventBacklog::DEFAULT_LIMIT),
            since_turn: Cell::new(0),
            wants_turn: Cell::new(false),
        })
    }

    /// Starts an MQTT client's worker where this driver's workers run; `finish` waits
    /// for it.
    pub fn spawn_client(&self, sink: EventSink) -> MqttHandle {
        let rt = self.shared.as_ref().unwrap_or(self.rt.handle());
        mqtt::spawn_client(rt, &self.workers, sink, Arc::clone(&self.backlog))
    }

    /// The loop dispatched one MQTT event: the workers may read again once enough are.
    pub fn mqtt_event_taken(&self) {
        self.backlog.taken();
    }

    /// Notes that commands were handed to a worker: it gets a turn before the next event.
    /// (On the shared thread the hand-over itself woke it.)
    pub fn wake_workers(&self) {
        if self.shared.is_none() {
            self.wants_turn.set(true);
        }
    }

    /// Lets the workers do what is ready — take commands, write, read what has arrived —
    /// without waiting for anything. Called from inside Lua code that publishes a lot, so
    /// its messages stream out while it runs; never from inside the runtime. Nothing to do
    /// when they run on the shared thread.
    pub fn turn(&self) {
        if self.shared.is_some() {
            return;
        }
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
