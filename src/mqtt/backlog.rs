//! How many of one driver's MQTT events wait for its loop, so its workers stop reading from
//! their brokers while the driver is behind.
//!
//! In: [`EventBacklog::added`] from a worker for each event it hands over, and
//! [`EventBacklog::taken`] from the driver loop for each it dispatches. Out:
//! [`EventBacklog::is_full`] for a worker about to read, and a wake-up ([`drained`]) once
//! the backlog is down to half.
//!
//! Why: a driver stuck in a long callback, or slower than what it subscribed to, would
//! otherwise have everything its brokers send piled up in memory, without bound, for as
//! long as it is behind. Paused, a worker leaves the rest in the socket and so at the
//! broker, which holds it within its own limits, as for any slow client (QoS 1/2 stay
//! queued there; a broker may drop QoS 0 for a client that does not read). Acks for the
//! driver's own publishes wait too, so its window fills and its publishing waits with it.
//! Nothing is lost on this side: reading resumes where it stopped.
//!
//! [`drained`]: EventBacklog::drained

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// One driver's count of undispatched MQTT events, shared by its workers.
#[derive(Debug)]
pub struct EventBacklog {
    queued: AtomicUsize,
    /// Workers stop reading at this many.
    high: usize,
    drained: Notify,
}

impl EventBacklog {
    /// Events a driver may be behind by before its workers pause. At a few hundred bytes
    /// each (more with large payloads), a few MB per stuck driver.
    pub const DEFAULT_LIMIT: usize = 10_000;

    /// A backlog whose workers pause at `high` waiting events (at least 2).
    pub fn new(high: usize) -> Arc<EventBacklog> {
        Arc::new(EventBacklog {
            queued: AtomicUsize::new(0),
            high: high.max(2),
            drained: Notify::new(),
        })
    }

    /// For workers whose events nobody counts back (tests, tools): never full.
    pub fn unlimited() -> Arc<EventBacklog> {
        Self::new(usize::MAX)
    }

    /// A worker handed one event over.
    pub fn added(&self) {
        self.queued.fetch_add(1, Ordering::Relaxed);
    }

    /// The driver loop dispatched one event. Passing half the limit on the way down wakes
    /// the paused workers.
    pub fn taken(&self) {
        let before = self.queued.fetch_sub(1, Ordering::AcqRel);
        if before == self.high / 2 + 1 {
            self.drained.notify_waiters();
        }
    }

    /// True when the workers should stop reading.
    pub fn is_full(&self) -> bool {
        self.queued.load(Ordering::Acquire) >= self.high
    }

    /// Completes once the backlog is down to half after this call. Enable it (or poll it)
    /// before checking [`is_full`](Self::is_full), so a drain between the two is not missed.
    pub fn drained(&self) -> Notified<'_> {
        self.drained.notified()
    }

    /// Events waiting now.
    pub fn len(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_at_the_limit_and_drained_at_half() {
        let backlog = EventBacklog::new(4);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        for _ in 0..4 {
            backlog.added();
        }
        assert!(backlog.is_full());
        let drained = backlog.drained();
        tokio::pin!(drained);
        drained.as_mut().enable();
        backlog.taken(); // 3: not full any more, but not down to half either
        assert!(!backlog.is_full());
        let woken = rt.block_on(async {
            tokio::time::timeout(std::time::Duration::ZERO, drained.as_mut())
                .await
                .is_ok()
        });
        assert!(!woken, "woken before half");
        backlog.taken(); // 2: half
        rt.block_on(drained);
        assert_eq!(backlog.len(), 2);
    }

    #[test]
    fn unlimited_is_never_full() {
        let backlog = EventBacklog::unlimited();
        for _ in 0..100_000 {
            backlog.added();
        }
        assert!(!backlog.is_full());
    }
}
