//! Per-driver state kept in the Lua state's app data, for the `C4` functions to reach.

use super::event::{DriverNotice, EventSender};
use super::io::DriverIo;
use super::timers::TimerHeap;
use crossbeam_channel::Sender;
use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;
use std::time::Instant;

/// Who the driver is and how it reaches the rest of the process. Read-only after load.
pub struct DriverInfo {
    pub id: u32,
    pub name: String,
    /// `driver.xml` fields for `C4:GetDriverConfigInfo`.
    pub config: BTreeMap<String, String>,
    /// Properties the driver declares (driver.xml) or was given (`--prop`).
    pub declared_properties: HashSet<String>,
    /// Into this driver's own loop: MQTT workers deliver their events here.
    pub events_tx: EventSender,
    /// To the host: `C4:FireEvent` and lifecycle notices.
    pub notices: Option<Sender<DriverNotice>>,
    /// The driver thread's runtime, and where its MQTT workers run.
    pub io: Rc<DriverIo>,
}

impl DriverInfo {
    pub fn notify(&self, notice: DriverNotice) {
        if let Some(tx) = &self.notices {
            // The host may be gone during shutdown; nothing to do about it then.
            let _ = tx.send(notice);
        }
    }
}

/// The driver's clock: real time, or (in the test harness) time that only moves when told.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    Real,
    Virtual { now: Instant },
}

impl Clock {
    pub fn now(&self) -> Instant {
        match self {
            Clock::Real => Instant::now(),
            Clock::Virtual { now } => *now,
        }
    }
}

/// The timers of one driver, with their clock.
pub struct DriverTimers {
    pub heap: TimerHeap,
    pub clock: Clock,
}
