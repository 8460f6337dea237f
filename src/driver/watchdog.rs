//! Keeps one driver's runaway Lua from going unnoticed, and stops it where LuaJIT allows.
//!
//! In: each driver's [`Watch`], marked busy while one call into its Lua runs (the chunk, a
//! lifecycle function, a callback) and idle when it returns; the [`DriverLimits`] of the
//! driver. Out: `log::warn!` (target = driver name) and [`DriverNotice::Stuck`] once per call
//! that runs past the limit, [`DriverNotice::Responsive`] when that call ends; with
//! `stop_runaway`, a Lua error ("stopped by luadriver: callback ran longer than 5s") raised
//! inside the runaway call; with `memory_limit`, a Lua "not enough memory" error in the call
//! that would pass it. A process-wide thread (started with the first driver, waking every
//! 250 ms) does the reporting, so a driver stuck where no hook can reach it (JIT-compiled
//! code, a long C function) is still reported. Drivers run on their own threads, so a stuck
//! one never stalls another: this module only makes it visible and, if possible, ends it.
//!
//! What LuaJIT 2.1 (mlua 0.12, vendored, x64, GC64) permits — measured with mlua directly:
//!
//! - Instruction-count hooks (`Lua::set_hook`/`set_global_hook` with `every_nth_instruction`)
//!   run in the interpreter only. Once a loop is compiled to a trace (after 56 iterations),
//!   the hook never fires again: `while i < 3e9 do i = i + 1 end`, `for i = 1, 3e9 do end` and
//!   a function compiled before the hook was set all ran to the end (1.8–2.8 s) with the hook
//!   called 0 times. Setting a hook does not stop the JIT from compiling either. So with the
//!   JIT on, a runaway callback can be reported but never stopped.
//! - `jit.off()` (per Lua state, so per driver) makes every loop interpreted and the hook
//!   reliable: `while true do end`, `repeat until false`, loops in coroutines, a loop in a
//!   `pcall` inside a loop, recursion, tail calls, `gsub`/`table.sort` with Lua callbacks
//!   were all stopped within the 200 ms limit of the experiment. A `pcall` would swallow a
//!   single error; after the limit the hook is re-armed to fire on every instruction, so the
//!   error is raised again at the first instruction outside the `pcall`.
//! - Cost (`cargo test --test isolation -- --ignored --nocapture`; best of 3, two runs on a
//!   loaded 2-core machine, debug build of this crate, LuaJIT itself always -O2), relative to
//!   the JIT on, as "JIT off" / "JIT off + count hook":
//!   `string.format`+`gsub` loop 1.0–1.15× / 1.0–1.2×; building records + `table.concat`
//!   1.8× / 1.6–1.9×; `tostring` into a table 2.5–4.0× / 2.3–3.4×; an arithmetic loop
//!   1.2–1.4× / 1.7–2.1×; a tight loop of calls to a small Lua function, which the JIT inlines
//!   away, 15× / 18–21×. A hook on JIT-on code costs nothing (0.99–1.13×) since it never runs.
//!   Over the plain interpreter the hook adds up to ~50% in tight pure-Lua loops whatever its
//!   period (10³, 10⁴, 10⁵ instructions alike): the price is the interpreter's per-instruction
//!   hook dispatch, not the callback; in code that spends its time in C functions it is lost
//!   in the noise. A DriverWorks driver spends its time in C4 calls, strings and tables, where
//!   the whole price is 1–4×. Still, `stop_runaway` is off by default (report only, JIT
//!   on): a driver should run as fast here as on a controller, and the MQTT benchmarks
//!   compete with the broker for the same two cores. `luadriver run --stop-runaway` (or
//!   `stop_runaway: true`) trades the JIT for the ability to stop a runaway callback.
//! - There is no interrupt API for LuaJIT in mlua (`Lua::set_interrupt` is Luau only), and a
//!   hook cannot safely be set from another thread through mlua (`Lua` is not `Send` here).
//! - Memory: mlua creates LuaJIT states with its own allocator (GC64 allows it), so
//!   `Lua::set_memory_limit` works (returns `Ok`) and `Lua::used_memory` is exact. A
//!   `t[#t+1] = string.rep("x", 1e6)` loop under a 64 MiB limit failed with "not enough memory"
//!   after 32 ms; after a full GC the state was back at 300 kB and ran new code. A memory
//!   error is an ordinary Lua error (`pcall` can catch it), raised in the offending call.
//! - A single long C function (a pathological `string.find` pattern, a C4 call that blocks)
//!   cannot be interrupted by any hook: it is reported by the watchdog thread, and stopped at
//!   the first Lua instruction after it returns.

use super::event::DriverNotice;
use crossbeam_channel::Sender;
use mlua::{HookTriggers, Lua, VmState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

/// How long one call into a driver's Lua may run, and how much memory its Lua may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverLimits {
    /// A call running longer is reported (once) and, with `stop_runaway`, stopped.
    pub busy_limit: Duration,
    /// Stop a call past `busy_limit` with a Lua error. This turns the driver's JIT compiler
    /// off (see the module doc for what that costs); without it a call is only reported.
    pub stop_runaway: bool,
    /// Bytes the driver's Lua state may hold; an allocation past it is a Lua memory error.
    pub memory_limit: Option<usize>,
}

impl DriverLimits {
    /// Report-only by default: stopping costs the JIT compiler (see the module doc), and
    /// drivers should run as fast here as on a controller unless asked otherwise.
    pub const DEFAULT: DriverLimits = DriverLimits {
        busy_limit: Duration::from_secs(5),
        stop_runaway: false,
        // Room for the largest MQTT payload (256 MiB) while a driver builds it.
        memory_limit: Some(1024 * 1024 * 1024),
    };
}

impl Default for DriverLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

static DEFAULT_LIMITS: RwLock<DriverLimits> = RwLock::new(DriverLimits::DEFAULT);

/// The limits of drivers started by [`super::spawn`] from now on.
pub fn set_default_limits(limits: DriverLimits) {
    match DEFAULT_LIMITS.write() {
        Ok(mut slot) => *slot = limits,
        Err(poisoned) => *poisoned.into_inner() = limits,
    }
}

pub fn default_limits() -> DriverLimits {
    match DEFAULT_LIMITS.read() {
        Ok(limits) => *limits,
        Err(poisoned) => *poisoned.into_inner(),
    }
}

/// How often the watchdog thread looks at every driver.
const TICK: Duration = Duration::from_millis(250);
/// Instructions between two looks of the hook at the clock: ~10–50 µs of interpreted Lua.
const HOOK_EVERY: u32 = 10_000;
/// The bit of [`Watch::busy`] saying this busy spell was reported.
const REPORTED: u64 = 1;

/// The busy state of one driver, shared by its thread, its hook and the watchdog thread.
pub struct Watch {
    id: u32,
    name: String,
    limits: DriverLimits,
    /// 0 when idle; else the start of the current call (ms since [`epoch`], at least 1)
    /// shifted left by one, with [`REPORTED`] as the low bit. One atomic, so a report can
    /// never be attributed to a later call than the one that ran too long.
    busy: AtomicU64,
    notices: Option<Sender<DriverNotice>>,
    /// Notices wait until the host has seen `Initialized` (it expects that one first).
    announce: AtomicBool,
}

impl Watch {
    /// A watch for one driver, looked at by the watchdog thread for as long as it lives.
    pub fn new(
        id: u32,
        name: String,
        limits: DriverLimits,
        notices: Option<Sender<DriverNotice>>,
    ) -> Arc<Watch> {
        let watch = Arc::new(Watch {
            id,
            name,
            limits,
            busy: AtomicU64::new(0),
            notices,
            announce: AtomicBool::new(false),
        });
        register(&watch);
        watch
    }

    pub fn limits(&self) -> DriverLimits {
        self.limits
    }

    /// From now on, reports also go to the host as notices.
    pub fn announce(&self) {
        self.announce.store(true, Ordering::Relaxed);
    }

    /// Marks the driver busy until the guard drops. Nested calls count as the outer one.
    pub fn enter(&self) -> BusyGuard<'_> {
        let stamp = now_ms() << 1;
        let outer = self
            .busy
            .compare_exchange(0, stamp, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        BusyGuard { watch: self, outer }
    }

    /// Reports the current call if it has run past the limit and was not reported yet;
    /// true while it is past the limit.
    fn check(&self, now: u64) -> bool {
        let state = self.busy.load(Ordering::Acquire);
        if state == 0 {
            return false;
        }
        let ran = Duration::from_millis(now.saturating_sub(state >> 1));
        if ran <= self.limits.busy_limit {
            return false;
        }
        if state & REPORTED == 0
            && self
                .busy
                .compare_exchange(state, state | REPORTED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let action = if self.limits.stop_runaway {
                "; stopping it"
            } else {
                " (it cannot be stopped with stop_runaway off; the JIT is on)"
            };
            log::warn!(
                target: &self.name,
                "busy in one call for {} s, longer than the limit of {}{action}",
                ran.as_secs(),
                humantime::format_duration(self.limits.busy_limit)
            );
            self.notify(DriverNotice::Stuck {
                id: self.id,
                seconds: ran.as_secs(),
            });
        }
        true
    }

    /// Sends a notice to the host once it has seen `Initialized`.
    pub fn notify(&self, notice: DriverNotice) {
        if let Some(tx) = &self.notices
            && self.announce.load(Ordering::Relaxed)
        {
            let _ = tx.send(notice);
        }
    }
}

/// Marks a driver busy for as long as it lives; see [`Watch::enter`].
pub struct BusyGuard<'a> {
    watch: &'a Watch,
    outer: bool,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        if !self.outer {
            return;
        }
        let state = self.watch.busy.swap(0, Ordering::AcqRel);
        if state & REPORTED != 0 {
            let ran = Duration::from_millis(now_ms().saturating_sub(state >> 1));
            log::warn!(
                target: &self.watch.name,
                "responsive again after {:.1} s in one call",
                ran.as_secs_f64()
            );
            self.watch.notify(DriverNotice::Responsive {
                id: self.watch.id,
                seconds: ran.as_secs(),
            });
        }
    }
}

/// Applies the limits to a fresh Lua state: the memory limit, and with `stop_runaway` the
/// JIT off and an instruction-count hook that raises a Lua error in a call past the limit.
pub fn arm(lua: &Lua, watch: &Arc<Watch>) -> mlua::Result<()> {
    let limits = watch.limits;
    if let Some(bytes) = limits.memory_limit
        && let Err(e) = lua.set_memory_limit(bytes)
    {
        log::warn!(target: &watch.name, "no memory limit for this driver: {e}");
    }
    if limits.stop_runaway {
        // Compiled traces never run hooks; the interpreter always does. `jit.on` is made a
        // no-op so the driver cannot take itself out of reach.
        lua.load("jit.off(); jit.flush(); jit.on = function() end")
            .set_name("=luadriver")
            .exec()?;
        install_hook(lua, Arc::downgrade(watch), HOOK_EVERY)?;
    }
    Ok(())
}

/// The hook looks at the clock every `every` instructions. Once a call is past its limit, it
/// fires on every instruction so that a `pcall` in the runaway code cannot swallow the stop;
/// the first look in a later call puts it back to [`HOOK_EVERY`].
fn install_hook(lua: &Lua, watch: Weak<Watch>, every: u32) -> mlua::Result<()> {
    let triggers = HookTriggers::new().every_nth_instruction(every);
    lua.set_global_hook(triggers, move |lua, _| {
        let Some(w) = watch.upgrade() else {
            return Ok(VmState::Continue);
        };
        if w.check(now_ms()) {
            if every != 1 {
                install_hook(lua, watch.clone(), 1)?;
            }
            return Err(mlua::Error::runtime(format!(
                "stopped by luadriver: callback ran longer than {}",
                humantime::format_duration(w.limits.busy_limit)
            )));
        }
        if every == 1 {
            install_hook(lua, watch.clone(), HOOK_EVERY)?;
        }
        Ok(VmState::Continue)
    })
}

/// True when `error` is (or wraps) a Lua memory error.
pub fn is_memory_error(error: &mlua::Error) -> bool {
    match error {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => is_memory_error(cause),
        mlua::Error::WithContext { cause, .. } => is_memory_error(cause),
        _ => false,
    }
}

/// Milliseconds since the first use, at least 1 (0 means idle in [`Watch::busy`]).
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX >> 2) + 1
}

fn register(watch: &Arc<Watch>) {
    static WATCHED: OnceLock<Mutex<Vec<Weak<Watch>>>> = OnceLock::new();
    let watched = WATCHED.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("luadriver-watchdog".into())
            .spawn(|| watchdog_loop(WATCHED.get_or_init(Default::default)));
        if let Err(e) = spawned {
            log::error!("cannot start the watchdog thread; stuck drivers go unreported: {e}");
        }
        Mutex::new(Vec::new())
    });
    match watched.lock() {
        Ok(mut list) => list.push(Arc::downgrade(watch)),
        Err(poisoned) => poisoned.into_inner().push(Arc::downgrade(watch)),
    }
}

fn watchdog_loop(watched: &Mutex<Vec<Weak<Watch>>>) {
    loop {
        std::thread::sleep(TICK);
        let live: Vec<Arc<Watch>> = {
            let mut list = match watched.lock() {
                Ok(list) => list,
                Err(poisoned) => poisoned.into_inner(),
            };
            list.retain(|w| w.strong_count() > 0);
            list.iter().filter_map(Weak::upgrade).collect()
        };
        let now = now_ms();
        for watch in live {
            watch.check(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(limit: Duration) -> (Arc<Watch>, crossbeam_channel::Receiver<DriverNotice>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let limits = DriverLimits {
            busy_limit: limit,
            ..DriverLimits::DEFAULT
        };
        let w = Watch::new(3, "unit".into(), limits, Some(tx));
        w.announce();
        (w, rx)
    }

    #[test]
    fn a_long_call_is_reported_once_and_its_end_once() {
        let (w, rx) = watch(Duration::from_millis(10));
        {
            let _busy = w.enter();
            assert!(!w.check(now_ms()), "reported before the limit");
            // The call outlives its limit: time has to pass, there is no event to wait for.
            std::thread::sleep(Duration::from_millis(30));
            assert!(w.check(now_ms()));
            assert!(w.check(now_ms()));
            assert_eq!(rx.try_recv(), Ok(DriverNotice::Stuck { id: 3, seconds: 0 }));
            assert!(rx.try_recv().is_err(), "reported twice");
        }
        assert_eq!(
            rx.try_recv(),
            Ok(DriverNotice::Responsive { id: 3, seconds: 0 })
        );
        assert!(!w.check(now_ms()));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_nested_call_counts_as_the_outer_one_and_short_calls_are_not_reported() {
        let (w, rx) = watch(Duration::from_secs(60));
        let outer = w.enter();
        let started = w.busy.load(Ordering::Acquire);
        drop(w.enter());
        assert_eq!(
            w.busy.load(Ordering::Acquire),
            started,
            "inner call cleared it"
        );
        assert!(!w.check(now_ms()));
        drop(outer);
        assert_eq!(w.busy.load(Ordering::Acquire), 0);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn notices_wait_for_announce_and_memory_errors_are_recognised_through_callbacks() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let w = Watch::new(4, "quiet".into(), DriverLimits::DEFAULT, Some(tx));
        w.notify(DriverNotice::Stopped { id: 4 });
        assert!(rx.try_recv().is_err());
        w.announce();
        w.notify(DriverNotice::Stopped { id: 4 });
        assert_eq!(rx.try_recv(), Ok(DriverNotice::Stopped { id: 4 }));

        let lua = Lua::new();
        lua.set_memory_limit(1 << 20).unwrap();
        let err = lua
            .load("local s = string.rep('x', 4e6)")
            .exec()
            .unwrap_err();
        assert!(is_memory_error(&err), "{err:?}");
        // The same error, raised in Lua code run by a Rust function called from Lua.
        let inner = lua
            .create_function(|lua, ()| lua.load("local s = string.rep('y', 4e6)").exec())
            .unwrap();
        lua.globals().set("inner", inner).unwrap();
        let wrapped = lua.load("inner()").exec().unwrap_err();
        assert!(
            matches!(wrapped, mlua::Error::CallbackError { .. }),
            "{wrapped:?}"
        );
        assert!(is_memory_error(&wrapped));
        assert!(!is_memory_error(&mlua::Error::runtime("not enough memory")));
    }
}
