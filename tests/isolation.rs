//! Isolation between drivers in one process: a driver in an endless loop or allocating
//! without bound neither stalls nor takes down another; it is reported (`Stuck`,
//! `Responsive`, `OutOfMemory` notices), stopped where LuaJIT allows, and then answers again.
//! A throwing callback never stops its driver. Each driver here gets its own limits (a 1 s
//! busy limit, a 64 MiB memory limit), so the tests run in seconds and in parallel.
//!
//! The last tests pin down the LuaJIT facts the watchdog is built on; the cost measurement
//! behind its module doc is `cargo test --test isolation -- --ignored --nocapture`.

use crossbeam_channel::Receiver;
use luadriver::driver::{
    self, DriverEvent, DriverHandle, DriverLimits, DriverNotice, DriverSpec, InitType, IoThread,
};
use mlua::{HookTriggers, Lua, LuaOptions, StdLib, VmState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

const LIMITS: DriverLimits = DriverLimits {
    busy_limit: Duration::from_secs(1),
    stop_runaway: true,
    memory_limit: Some(64 * 1024 * 1024),
};

/// `say(...)`: fires one event holding the arguments' tostring, space-separated; `ping`
/// answers `pong`, so a test can tell the driver still handles events.
const PRELUDE: &str = r#"
local function say(...)
  local parts = {}
  for i = 1, select('#', ...) do parts[#parts + 1] = tostring((select(i, ...))) end
  C4:FireEvent(table.concat(parts, " "))
end
local commands = {}
function ExecuteCommand(cmd, params)
  if cmd == "ping" then return say("pong") end
  commands[cmd]()
end
"#;

struct Driver {
    handle: Option<DriverHandle>,
    notices: Receiver<DriverNotice>,
    _dir: tempfile::TempDir,
}

/// Loads `PRELUDE` + `body` with `limits`; the load's first notice (`Initialized` or `Failed`).
fn load(body: &str, limits: DriverLimits) -> (Driver, DriverNotice) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("driver.lua");
    std::fs::write(&path, format!("{PRELUDE}\n{body}")).expect("write driver");
    let package = luadriver::package::load(&path).expect("load package");
    let (tx, notices) = crossbeam_channel::unbounded();
    let spec = DriverSpec {
        id: 9,
        package,
        properties: vec![],
        init_type: InitType::Adding,
        persist_path: None,
        io: IoThread::Own,
    };
    let handle = driver::spawn_with_limits(spec, limits, tx).expect("spawn driver");
    let first = notices.recv_timeout(WAIT).expect("a load notice");
    let d = Driver {
        handle: Some(handle),
        notices,
        _dir: dir,
    };
    (d, first)
}

fn start_with(body: &str, limits: DriverLimits) -> Driver {
    let (d, first) = load(body, limits);
    assert!(
        matches!(first, DriverNotice::Initialized { .. }),
        "driver did not initialize: {first:?}"
    );
    d.send(DriverEvent::LateInit);
    d
}

fn start(body: &str) -> Driver {
    start_with(body, LIMITS)
}

impl Driver {
    fn send(&self, event: DriverEvent) {
        assert!(
            self.handle.as_ref().expect("running").send(event),
            "driver loop ended"
        );
    }

    fn command(&self, command: &str) {
        self.send(DriverEvent::Command {
            command: command.into(),
            params: vec![],
        });
    }

    fn next_notice(&self) -> DriverNotice {
        self.notices
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("no notice from the driver within {WAIT:?}"))
    }

    /// The next notice must be the event `text`.
    fn expect_event(&self, text: &str) {
        match self.next_notice() {
            DriverNotice::Event { name, .. } => assert_eq!(name, text),
            other => panic!("expected event {text:?}, got {other:?}"),
        }
    }

    fn next_event(&self) -> String {
        match self.next_notice() {
            DriverNotice::Event { name, .. } => name,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    /// The next notices must be `Stuck` then `Responsive`, both about one call stopped at the
    /// 1 s limit; returns how long that call ran, in whole seconds, as reported.
    fn expect_stopped(&self) -> u64 {
        match self.next_notice() {
            DriverNotice::Stuck { id: 9, seconds: 1 } => {}
            other => panic!("expected Stuck after 1 s, got {other:?}"),
        }
        match self.next_notice() {
            DriverNotice::Responsive { id: 9, seconds } if (1..=2).contains(&seconds) => seconds,
            other => panic!("expected Responsive after 1–2 s, got {other:?}"),
        }
    }

    /// Sends `ping` and expects `pong` as the very next notice.
    fn assert_answers(&self) {
        self.command("ping");
        self.expect_event("pong");
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            if std::thread::panicking() {
                // A failed test may leave the driver in its loop; joining it would hang.
                std::mem::forget(handle);
            } else {
                handle.stop("TEST_DONE");
            }
        }
    }
}

fn ticker() -> Driver {
    start(
        r#"
        function OnDriverLateInit()
          local n = 0
          C4:SetTimer(50, function() n = n + 1; say("tick", n) end, true)
        end
        "#,
    )
}

/// Reads the ticker's ticks for `span`; returns how many came and the longest gap.
fn ticks_during(ticker: &Driver, span: Duration) -> (u32, Duration) {
    let start = Instant::now();
    let mut last = Instant::now();
    let (mut ticks, mut worst) = (0, Duration::ZERO);
    while start.elapsed() < span {
        assert!(ticker.next_event().starts_with("tick"));
        worst = worst.max(last.elapsed());
        last = Instant::now();
        ticks += 1;
    }
    (ticks, worst)
}

#[test]
fn an_endless_loop_is_reported_and_stopped_without_delaying_another_driver() {
    let stuck = start(
        r#"
        commands.hang = function() say("hanging", (jit.status())) while true do end end
        "#,
    );
    let ticker = ticker();
    stuck.command("hang");
    stuck.expect_event("hanging false");
    let hung_at = Instant::now();

    let (ticks, worst) = ticks_during(&ticker, Duration::from_millis(1500));
    assert!(
        ticks >= 20,
        "only {ticks} ticks in 1.5 s with a 50 ms timer"
    );
    assert!(
        worst < Duration::from_millis(300),
        "a tick came {worst:?} late"
    );

    stuck.expect_stopped();
    let stopped_after = hung_at.elapsed();
    assert!(
        stopped_after < Duration::from_millis(2500),
        "stopped only after {stopped_after:?}"
    );
    stuck.assert_answers();
    // Stopping it is not a one-off: the next runaway call is stopped too.
    stuck.command("hang");
    stuck.expect_event("hanging false");
    stuck.expect_stopped();
    stuck.assert_answers();
}

#[test]
fn a_pcall_inside_the_loop_cannot_swallow_the_stop() {
    let d = start(
        r#"
        commands.hang = function()
          say("hanging")
          local caught = 0
          while true do
            pcall(function() while true do end end)
            caught = caught + 1
          end
        end
        commands.hang_in_coroutine = function()
          say("hanging in a coroutine")
          coroutine.wrap(function() while true do end end)()
        end
        "#,
    );
    d.command("hang");
    d.expect_event("hanging");
    d.expect_stopped();
    d.assert_answers();
    d.command("hang_in_coroutine");
    d.expect_event("hanging in a coroutine");
    d.expect_stopped();
    d.assert_answers();
}

#[test]
fn a_runaway_timer_callback_is_stopped_and_its_driver_keeps_its_other_timers() {
    let d = start(
        r#"
        function OnDriverLateInit()
          C4:SetTimer(10, function() say("spinning") while true do end end)
          C4:SetTimer(1500, function() say("later timer") end)
        end
        "#,
    );
    d.expect_event("spinning");
    d.expect_stopped();
    d.expect_event("later timer");
    d.assert_answers();
}

#[test]
fn an_endless_loop_in_the_chunk_fails_the_load_with_the_reason() {
    let (_d, first) = load("while true do end", LIMITS);
    match first {
        DriverNotice::Failed { error, .. } => assert!(
            error.contains("stopped by luadriver: callback ran longer than 1s"),
            "{error}"
        ),
        other => panic!("expected the load to fail, got {other:?}"),
    }
}

#[test]
fn with_stop_runaway_off_the_jit_stays_on_and_a_long_call_is_reported_then_finishes() {
    let limits = DriverLimits {
        busy_limit: Duration::from_millis(300),
        stop_runaway: false,
        ..LIMITS
    };
    let d = start_with(
        r#"
        commands.busy = function()
          say("busy", (jit.status()))
          local t0 = C4:GetTime("ms", true)
          while C4:GetTime("ms", true) - t0 < 1200 do end
          say("done")
        end
        "#,
        limits,
    );
    d.command("busy");
    d.expect_event("busy true");
    // Reported while it still runs (the watchdog thread, not a hook), then it finishes.
    assert_eq!(d.next_notice(), DriverNotice::Stuck { id: 9, seconds: 0 });
    d.expect_event("done");
    assert_eq!(
        d.next_notice(),
        DriverNotice::Responsive { id: 9, seconds: 1 }
    );
    d.assert_answers();
}

#[test]
fn unbounded_allocation_fails_the_call_not_the_process_and_the_driver_recovers() {
    let hog = start(
        r#"
        commands.hog = function()
          say("hogging")
          local t = {} while true do t[#t+1] = string.rep("x", 1e6) .. #t end
        end
        commands.memory = function() say(collectgarbage("count") < 8 * 1024) end
        "#,
    );
    let ticker = ticker();
    hog.command("hog");
    hog.expect_event("hogging");
    assert_eq!(
        hog.next_notice(),
        DriverNotice::OutOfMemory {
            id: 9,
            limit: 64 * 1024 * 1024
        }
    );
    hog.assert_answers();
    hog.command("memory");
    hog.expect_event("true");
    let (ticks, worst) = ticks_during(&ticker, Duration::from_millis(300));
    assert!(ticks >= 3 && worst < Duration::from_millis(300));
}

#[test]
fn a_throwing_callback_never_stops_its_driver() {
    let d = start(
        r#"
        commands.boom = function() error("boom") end
        commands.table_error = function() error({ code = 42 }) end
        commands.nil_call = function() local f; f() end
        local throws = 0
        function OnPropertyChanged(name) error("bad property " .. name) end
        function OnDriverLateInit()
          C4:SetTimer(20, function(t)
            throws = throws + 1
            if throws > 3 then t:Cancel(); say("threw", throws - 1, "times") return end
            error("timer " .. throws)
          end, true)
        end
        "#,
    );
    d.expect_event("threw 3 times");
    for cmd in ["boom", "table_error", "nil_call", "not_a_command"] {
        d.command(cmd);
        d.assert_answers();
    }
    d.send(DriverEvent::PropertyChanged {
        name: "Level".into(),
        value: "3".into(),
    });
    d.assert_answers();
}

#[test]
fn luajit_runs_no_count_hook_inside_compiled_code_but_always_in_the_interpreter() {
    // The fact the watchdog rests on: a hook is no way to stop a JIT-compiled loop.
    for (jit_on, expect_calls) in [(true, false), (false, true)] {
        let lua = Lua::new_with(StdLib::ALL_SAFE, LuaOptions::default()).unwrap();
        if !jit_on {
            lua.load("jit.off()").exec().unwrap();
        }
        let calls = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&calls);
        lua.set_global_hook(
            HookTriggers::new().every_nth_instruction(1000),
            move |_, _| {
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(VmState::Continue)
            },
        )
        .unwrap();
        lua.load("local i = 0 while i < 2e7 do i = i + 1 end")
            .exec()
            .unwrap();
        let calls = calls.load(Ordering::Relaxed);
        assert_eq!(
            calls > 0,
            expect_calls,
            "jit on: {jit_on}, hook calls: {calls}"
        );
    }
    // And the memory limit is available on LuaJIT states.
    let lua = Lua::new_with(StdLib::ALL_SAFE, LuaOptions::default()).unwrap();
    assert_eq!(lua.set_memory_limit(1 << 20).unwrap(), 0);
    assert!(lua.load("local s = string.rep('x', 2e6)").exec().is_err());
}

/// The numbers behind the watchdog's module doc: a few workloads with the JIT, without it,
/// and without it plus the count hook at several periods. Best of 3 runs each.
#[test]
#[ignore = "a measurement, not a check: run with --ignored --nocapture"]
fn measure_what_stopping_runaways_costs() {
    const WORKLOADS: &[(&str, &str)] = &[
        (
            "arithmetic 1e7",
            "local x=0 for i=1,1e7 do x = x + i % 7 end return x",
        ),
        (
            "Lua calls 5e6",
            "local function f(a) return a+1 end local x=0 for i=1,5e6 do x=f(x) end return x",
        ),
        (
            "tostring into table 3e5",
            "local t={} for i=1,3e5 do t[i]=tostring(i)..'x' end local s=0 for i=1,#t do s=s+#t[i] end return s",
        ),
        (
            "format+gsub 1e5",
            "local n=0 for i=1,1e5 do local s = string.format('{\"a\":%d,\"b\":\"%s\"}', i, 'v'..i); local r, c = s:gsub('%d','') n = n + c end return n",
        ),
        (
            "records+concat 2e5",
            "local n=0 for k=1,10 do local t={} for i=1,2e4 do t[#t+1]={id=i, name='n'..i} end local parts={} for _,v in ipairs(t) do parts[#parts+1]=v.name end n = n + #table.concat(parts, ',') end return n",
        ),
    ];
    fn best_of_3(jit: bool, every: Option<u32>, code: &str) -> Duration {
        (0..3)
            .map(|_| {
                let lua = Lua::new_with(StdLib::ALL_SAFE, LuaOptions::default()).unwrap();
                if !jit {
                    lua.load("jit.off()").exec().unwrap();
                }
                if let Some(n) = every {
                    let start = Instant::now();
                    lua.set_global_hook(
                        HookTriggers::new().every_nth_instruction(n),
                        move |_, _| {
                            if start.elapsed() > Duration::from_secs(3600) {
                                return Err(mlua::Error::runtime("stop"));
                            }
                            Ok(VmState::Continue)
                        },
                    )
                    .unwrap();
                }
                let f = lua.load(code).into_function().unwrap();
                let t = Instant::now();
                let _: f64 = f.call(()).unwrap();
                t.elapsed()
            })
            .min()
            .unwrap_or_default()
    }
    for (name, code) in WORKLOADS {
        let base = best_of_3(true, None, code);
        let mut line = format!("{name:26} JIT {base:>8.1?}");
        for (label, jit, every) in [
            ("JIT+hook1e4", true, Some(10_000)),
            ("no JIT", false, None),
            ("no JIT+hook1e3", false, Some(1_000)),
            ("no JIT+hook1e4", false, Some(10_000)),
            ("no JIT+hook1e5", false, Some(100_000)),
        ] {
            let d = best_of_3(jit, every, code);
            let ratio = d.as_secs_f64() / base.as_secs_f64();
            line += &format!(" | {label} {d:>8.1?} {ratio:.2}x");
        }
        println!("{line}");
    }
}
