//! The deadline heap behind `C4:SetTimer`. Pure logic, no Lua and no clock of its own:
//! the event loop passes `now` in, so the same code runs on real or virtual time.
//!
//! In: `add` (one-shot or repeating), `cancel`. Out: `pop_due(now)` yields each due timer
//! once, with the number of whole periods a repeating timer missed (`skips`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

/// A timer's id, unique for the life of its driver.
pub type TimerId = u64;

#[derive(Debug)]
struct Schedule {
    deadline: Instant,
    period: Option<Duration>,
}

/// Timers of one driver. Cancelled timers leave a stale heap entry behind, skipped when
/// it comes up: cheaper than searching the heap on every `Cancel`.
#[derive(Debug, Default)]
pub struct TimerHeap {
    heap: BinaryHeap<Reverse<(Instant, TimerId)>>,
    live: HashMap<TimerId, Schedule>,
    next_id: TimerId,
}

/// A timer that came due.
#[derive(Debug, PartialEq, Eq)]
pub struct Due {
    pub id: TimerId,
    /// Whole periods that passed unseen since the last firing (0 when on time).
    pub skips: u64,
    /// A one-shot timer, or one cancelled: it will not fire again.
    pub finished: bool,
}

impl TimerHeap {
    pub fn add(&mut self, now: Instant, delay: Duration, repeat: bool) -> TimerId {
        self.next_id += 1;
        let id = self.next_id;
        let deadline = now + delay;
        self.live.insert(
            id,
            Schedule {
                deadline,
                period: repeat.then_some(delay),
            },
        );
        self.heap.push(Reverse((deadline, id)));
        id
    }

    /// Returns whether the timer was still live.
    pub fn cancel(&mut self, id: TimerId) -> bool {
        self.live.remove(&id).is_some()
    }

    pub fn is_live(&self, id: TimerId) -> bool {
        self.live.contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// The earliest deadline of a live timer.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((deadline, id))) = self.heap.peek().copied() {
            match self.live.get(&id) {
                Some(s) if s.deadline == deadline => return Some(deadline),
                _ => {
                    self.heap.pop();
                }
            }
        }
        None
    }

    /// The next timer due at `now`, rescheduling a repeating one. Call until `None`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Due> {
        let deadline = self.next_deadline()?;
        if deadline > now {
            return None;
        }
        let Reverse((_, id)) = self.heap.pop()?;
        let schedule = self.live.get_mut(&id)?;
        match schedule.period {
            None => {
                self.live.remove(&id);
                Some(Due {
                    id,
                    skips: 0,
                    finished: true,
                })
            }
            Some(period) => {
                // Fire once for all missed periods and keep the original phase.
                let late = now.duration_since(deadline);
                let skips = (late.as_nanos() / period.as_nanos().max(1)) as u64;
                let next = deadline + period * (skips as u32 + 1);
                schedule.deadline = next;
                self.heap.push(Reverse((next, id)));
                Some(Due {
                    id,
                    skips,
                    finished: false,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn one_shot_timers_fire_once_in_deadline_order() {
        let t0 = Instant::now();
        let mut timers = TimerHeap::default();
        let late = timers.add(t0, ms(20), false);
        let early = timers.add(t0, ms(10), false);
        assert_eq!(timers.pop_due(t0 + ms(5)), None);
        assert_eq!(timers.pop_due(t0 + ms(25)).map(|d| d.id), Some(early));
        assert_eq!(timers.pop_due(t0 + ms(25)).map(|d| d.id), Some(late));
        assert_eq!(timers.pop_due(t0 + ms(100)), None);
        assert!(timers.is_empty());
    }

    #[test]
    fn cancelled_timer_never_fires_and_frees_its_deadline() {
        let t0 = Instant::now();
        let mut timers = TimerHeap::default();
        let id = timers.add(t0, ms(10), true);
        assert!(timers.cancel(id));
        assert!(!timers.cancel(id));
        assert_eq!(timers.next_deadline(), None);
        assert_eq!(timers.pop_due(t0 + ms(50)), None);
    }

    #[test]
    fn repeating_timer_keeps_its_phase_and_counts_skipped_periods() {
        let t0 = Instant::now();
        let mut timers = TimerHeap::default();
        let id = timers.add(t0, ms(10), true);
        let first = timers.pop_due(t0 + ms(10)).expect("due");
        assert_eq!((first.id, first.skips, first.finished), (id, 0, false));
        assert_eq!(timers.next_deadline(), Some(t0 + ms(20)));
        // The loop was stuck for 35 ms: one call, three periods skipped.
        let late = timers.pop_due(t0 + ms(55)).expect("due");
        assert_eq!(late.skips, 3);
        assert_eq!(timers.next_deadline(), Some(t0 + ms(60)));
        assert_eq!(timers.pop_due(t0 + ms(55)), None);
    }
}
