//! The driver runtime: lifecycle, the C4 core calls (good and bad input), the sandbox,
//! error containment and isolation between drivers. Drivers report with C4:FireEvent.

mod common;

use common::drivers::{SAY, TestDriver};
use luadriver::driver::DriverEvent;
use std::time::{Duration, Instant};

fn driver(body: &str) -> TestDriver {
    TestDriver::start(&format!("{SAY}\n{body}"))
}

#[test]
fn lifecycle_runs_chunk_then_init_then_late_init_then_events_then_destroyed() {
    let d = driver(
        r#"
        say("chunk")
        function OnDriverInit(t) say("init", t) end
        function OnDriverLateInit(t) say("late", t) end
        function ExecuteCommand(cmd, params) say("command", cmd, params.level) end
        function OnDriverDestroyed(reason) say("destroyed", reason) end
        "#,
    );
    d.expect(&["chunk", "init DIT_ADDING", "late DIT_ADDING"]);
    d.send(DriverEvent::Command {
        command: "SET_LEVEL".into(),
        params: vec![("level".into(), "40".into())],
    });
    d.expect(&["command SET_LEVEL 40"]);
    assert_eq!(d.stop(), vec!["destroyed TEST_DONE"]);
}

#[test]
fn events_sent_before_late_init_wait_for_it() {
    // A command queued while OnDriverInit runs is delivered after OnDriverLateInit.
    let d = driver(
        r#"
        function OnDriverLateInit() say("late") end
        function ExecuteCommand(cmd) say("command", cmd) end
        "#,
    );
    d.expect(&["late"]);
    d.send(DriverEvent::Command {
        command: "X".into(),
        params: vec![],
    });
    d.expect(&["command X"]);
}

#[test]
fn one_shot_timer_fires_once_and_cancel_stops_a_repeating_one() {
    let d = driver(
        r#"
        function OnDriverLateInit()
          C4:SetTimer(20, function(t) say("once", type(t)) end)
          local n = 0
          C4:SetTimer(10, function(t, skips)
            n = n + 1
            say("tick", n, type(skips))
            if n == 3 then t:Cancel(); C4:SetTimer(100, function() say("after") end) end
          end, true)
        end
        "#,
    );
    let (_, before) = d.wait_for(|e| e == "after");
    assert_eq!(
        before
            .iter()
            .filter(|e| e.starts_with("tick"))
            .collect::<Vec<_>>(),
        vec!["tick 1 number", "tick 2 number", "tick 3 number"]
    );
    assert_eq!(before.iter().filter(|e| e.starts_with("once")).count(), 1);
    assert!(before.contains(&"once userdata".to_string()));
    assert_eq!(d.next_within(Duration::from_millis(100)), None);
}

#[test]
fn repeating_timer_reports_periods_skipped_while_the_driver_was_busy() {
    let d = driver(
        r#"
        function OnDriverLateInit()
          local n = 0
          C4:SetTimer(20, function(t, skips)
            n = n + 1
            if n == 1 then
              local t0 = C4:GetTime("ms", true)
              while C4:GetTime("ms", true) - t0 < 150 do end   -- busy for ~7 periods
            elseif n == 2 then
              say("skips", skips); t:Cancel()
            end
          end, true)
        end
        "#,
    );
    let e = d.next();
    let skips: u32 = e
        .strip_prefix("skips ")
        .expect(&e)
        .parse()
        .expect("a number");
    assert!(
        (4..=9).contains(&skips),
        "expected about 6 skipped periods, got {skips}"
    );
}

#[test]
fn set_timer_rejects_bad_arguments_with_nil_and_a_message() {
    let d = driver(
        r#"
        function OnDriverLateInit()
          say(C4:SetTimer(0, function() end))
          say(C4:SetTimer(-5, function() end))
          say(C4:SetTimer("x", function() end))
          say(C4:SetTimer(10, "not a function"))
          say(C4:SetTimer(10, function() end, "yes"))
          say("still running")
        end
        "#,
    );
    d.expect(&[
        "nil SetTimer: delay must be > 0 ms, got 0",
        "nil SetTimer: delay must be > 0 ms, got -5",
        "nil SetTimer: delay must be a number of ms, got string",
        "nil SetTimer: callback must be a function, got string",
        "nil SetTimer: repeat must be a boolean, got string",
        "still running",
    ]);
}

#[test]
fn get_time_counts_from_the_epoch_in_the_units_asked() {
    let d = driver(
        r#"
        function OnDriverLateInit()
          local ms, s = C4:GetTime(), C4:GetTime("s")
          say(math.abs(ms / 1000 - s) < 2, ms == math.floor(ms), s > 1.7e9)
          local frac = C4:GetTime("s", true)
          say(frac ~= math.floor(frac) or frac == math.floor(frac))
          say(math.abs(C4:GetTime("us") / 1e6 - s) < 2, math.abs(C4:GetTime("min") - s / 60) < 1)
          say(math.abs(C4:GetTime("h") - s / 3600) < 1, math.abs(C4:GetTime("d") - s / 86400) < 1)
          say(C4:GetTime("fortnights"))
        end
        "#,
    );
    d.expect(&[
        "true true true",
        "true",
        "true true",
        "true true",
        "nil GetTime: unknown units 'fortnights' (use ns, us, ms, s, min, h or d)",
    ]);
}

#[test]
fn base64_round_trips_binary_and_rejects_garbage() {
    let d = driver(
        r#"
        function OnDriverLateInit()
          local bin = string.char(0, 1, 2, 255, 254) .. "text"
          say(C4:Base64Encode("hello"), C4:Base64Decode(C4:Base64Encode(bin)) == bin)
          say(C4:Base64Decode("aGVs\nbG8="))
          say(C4:Base64Decode("***"))
          say(C4:Base64Encode({}))
        end
        "#,
    );
    d.expect(&[
        "aGVsbG8= true",
        "hello",
        "nil Base64Decode: not valid base64: Invalid symbol 42, offset 0.",
        "nil Base64Encode: expected a string, got table",
    ]);
}

#[test]
fn properties_start_with_given_values_and_change_through_events() {
    let d = TestDriver::start_with(
        &format!(
            "{SAY}\n{}",
            r#"
            function OnDriverLateInit() say("start", Properties["Room"], Properties["Missing"]) end
            function OnPropertyChanged(name) say("changed", name, Properties[name]) end
            function ExecuteCommand(cmd)
              say(C4:UpdateProperty("Room", "Attic"))
              say("now", Properties["Room"])
              say(C4:UpdateProperty("Nope", "x"))
              say(C4:UpdateProperty("Room", {}))
            end
            "#
        ),
        &[],
        &[("Room", "Kitchen")],
    );
    d.expect(&["start Kitchen nil"]);
    d.send(DriverEvent::PropertyChanged {
        name: "Room".into(),
        value: "Hall".into(),
    });
    d.expect(&["changed Room Hall"]);
    // UpdateProperty changes the value without calling OnPropertyChanged.
    d.send(DriverEvent::Command {
        command: "go".into(),
        params: vec![],
    });
    d.expect(&[
        "",
        "now Attic",
        "nil UpdateProperty: no property named 'Nope'",
        "nil UpdateProperty: value of 'Room' must be a string or number, got table",
    ]);
}

#[test]
fn device_id_and_fire_event_reach_the_host() {
    let d = driver(
        r#"function OnDriverLateInit() say("id", C4:GetDeviceID()) say(C4:FireEvent(42)) end"#,
    );
    d.expect(&["id 42", "nil FireEvent: event name must be a string"]);
}

#[test]
fn sandbox_has_no_escape_hatches() {
    let d = driver(
        r#"
        function OnDriverLateInit()
          say(ffi, debug, io.popen, os.execute, os.exit, package.loadlib, string.dump, jit ~= nil, bit ~= nil)
          say(pcall(require, "ffi"))
          say(package.cpath)
          say(loadstring(string.char(27) .. "LJ\2"))
          say(load(string.char(27) .. "LJ\2"))
          local ok, err = pcall(load, function() return nil end)
          say(type(loadstring("return 1")), loadstring("return 1")())
          local path = os.tmpname()
          local f = io.open(path, "wb"); f:write(string.char(27) .. "LJ\2\0\0"); f:close()
          local chunk, lerr = loadfile(path)
          local dok, derr = pcall(dofile, path)
          os.remove(path)
          say(chunk, lerr:find("mode") ~= nil or lerr:find("binary") ~= nil, dok)
        end
        "#,
    );
    d.expect(&["nil nil nil nil nil nil nil true true"]);
    let e = d.next();
    assert!(e.starts_with("false module 'ffi' not found"), "{e}");
    d.expect(&["", "nil binary chunks are not allowed"]);
    d.expect(&[
        "nil binary chunks are not allowed",
        "function 1",
        "nil true false",
    ]);
}

#[test]
fn require_finds_modules_in_the_drivers_folder_only() {
    let d = TestDriver::start_with(
        &format!(
            "{SAY}\n{}",
            r#"
            local helper = require("helper")
            local nested = require("sub.nested")
            say(helper.greet(), nested.value, require("helper") == helper)
            say(pcall(require, "../../etc/passwd"))
            "#
        ),
        &[
            (
                "helper.lua",
                "return { greet = function() return 'hi' end }",
            ),
            ("sub/nested.lua", "return { value = 7 }"),
        ],
        &[],
    );
    d.expect(&["hi 7 true"]);
    let e = d.next();
    assert!(
        e.starts_with("false module '../../etc/passwd' not found"),
        "{e}"
    );
}

#[test]
fn errors_in_callbacks_are_contained_and_the_driver_keeps_running() {
    let d = driver(
        r#"
        function OnDriverInit() error("init failed") end
        function OnDriverLateInit()
          C4:SetTimer(5, function() error("timer failed") end)
          C4:SetTimer(30, function() say("alive after errors") end)
        end
        function ExecuteCommand() local x = nil; return x.field end
        "#,
    );
    d.expect(&["alive after errors"]);
    d.send(DriverEvent::Command {
        command: "boom".into(),
        params: vec![],
    });
    d.send(DriverEvent::PropertyChanged {
        name: "p".into(),
        value: "v".into(),
    });
    // No OnPropertyChanged is defined: nothing happens, and the driver still answers.
    d.stop();
}

#[test]
fn a_stuck_driver_does_not_delay_another_drivers_timers() {
    let stuck = driver(
        r#"
        function ExecuteCommand()
          say("stuck")
          local t0 = C4:GetTime("ms", true)
          while C4:GetTime("ms", true) - t0 < 1500 do end
          say("unstuck")
        end
        "#,
    );
    let ticker = driver(
        r#"
        function OnDriverLateInit()
          local n = 0
          C4:SetTimer(50, function() n = n + 1; say("tick", n) end, true)
        end
        "#,
    );
    stuck.send(DriverEvent::Command {
        command: "hang".into(),
        params: vec![],
    });
    stuck.expect(&["stuck"]);
    let start = Instant::now();
    let mut last = Instant::now();
    let mut ticks = 0;
    let mut worst = Duration::ZERO;
    while start.elapsed() < Duration::from_millis(1200) {
        ticker.next();
        worst = worst.max(last.elapsed());
        last = Instant::now();
        ticks += 1;
    }
    assert!(
        stuck.next_within(Duration::from_millis(10)).is_none(),
        "the stuck driver must still be stuck while we measured"
    );
    assert!(
        ticks >= 15,
        "only {ticks} ticks in 1.2 s with a 50 ms timer"
    );
    assert!(
        worst < Duration::from_millis(300),
        "a tick came {worst:?} late"
    );
    stuck.expect(&["unstuck"]);
}

#[test]
fn json_encodes_and_decodes_with_c4_semantics_and_rejects_bad_input() {
    let d = driver(
        r#"
        function OnDriverLateInit()
          say(C4:JsonEncode({ a = 1, b = "x", c = true }))
          say(C4:JsonEncode({ "One", "Two" }), C4:JsonEncode({ "One", "Two" }, false, true))
          say(C4:JsonEncode({ v = c4json.null }))
          local t = C4:JsonDecode('{"n": 1.5, "list": [1, 2, 3], "s": "\\u00e9", "z": null}')
          say(t.n, #t.list, t.s, type(t.z))
          local t2 = C4:JsonDecode('{"z": null}', true)
          say(t2.z == c4json.null)
          say(C4:JsonDecode('{"broken": '))
          say(C4:JsonEncode({ f = function() end }))
          local cyc = {}; cyc.self = cyc
          say((C4:JsonEncode(cyc)))
          say(C4:JsonDecode(42))
        end
        "#,
    );
    d.expect(&[
        r#"{"a":1,"b":"x","c":true}"#,
        r#"{"1":"One","2":"Two"} ["One","Two"]"#,
        r#"{"v":null}"#,
        "1.5 3 é table",
        "true",
    ]);
    let e = d.next();
    assert!(
        e.starts_with("nil JsonDecode:") && e.contains("line 1"),
        "{e}"
    );
    let e = d.next();
    assert!(
        e.starts_with("nil JsonEncode: cannot encode a function"),
        "{e}"
    );
    assert_eq!(d.next(), "nil");
    d.expect(&["nil JsonDecode: expected a string, got number"]);
}

#[test]
fn persisted_values_survive_a_restart_when_backed_by_a_file() {
    use luadriver::driver::{DriverSpec, InitType, IoThread};
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("persist.json");
    let source = format!(
        "{SAY}\n{}",
        r#"
        function OnDriverLateInit()
          say("was", C4:PersistGetValue("count"), type(C4:PersistGetValue("table")))
          C4:PersistSetValue("count", (C4:PersistGetValue("count") or 0) + 1)
          C4:PersistSetValue("table", { a = { b = "c" } })
          C4:PersistSetValue("gone", "x")
          C4:PersistDeleteValue("gone")
          say("now", C4:PersistGetValue("count"), C4:PersistGetValue("table").a.b, C4:PersistGetValue("gone"))
          say(C4:PersistSetValue("f", function() end))
        end
        "#
    );
    std::fs::write(dir.path().join("driver.lua"), &source).unwrap();
    for expected_before in ["nil", "1"] {
        let package = luadriver::package::load(&dir.path().join("driver.lua")).unwrap();
        let (tx, notices) = crossbeam_channel::unbounded();
        let spec = DriverSpec {
            id: 7,
            package,
            properties: vec![],
            init_type: InitType::Startup,
            persist_path: Some(store.clone()),
            io: IoThread::Own,
        };
        let handle = luadriver::driver::spawn(spec, tx).unwrap();
        handle.send(DriverEvent::LateInit);
        let mut said = Vec::new();
        while said.len() < 3 {
            if let luadriver::driver::DriverNotice::Event { name, .. } = notices
                .recv_timeout(Duration::from_secs(10))
                .expect("driver spoke")
            {
                said.push(name)
            }
        }
        handle.stop("RESTART");
        let table_type = if expected_before == "nil" {
            "nil"
        } else {
            "table"
        };
        assert_eq!(said[0], format!("was {expected_before} {table_type}"));
        assert!(
            said[1].starts_with("now ") && said[1].ends_with(" c nil"),
            "{}",
            said[1]
        );
        assert!(said[2].starts_with("nil PersistSetValue:"), "{}", said[2]);
    }
}

#[test]
fn a_c4z_package_loads_its_xml_properties_config_and_modules() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("demo.c4z");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    zip.start_file("driver.xml", opts).unwrap();
    zip.write_all(
        br#"<devicedata><name>Zipped Demo</name><version>12</version><manufacturer>Acme</manufacturer>
        <config><properties>
          <property><name>Color</name><type>LIST</type><items><item>Red</item><item>Blue</item></items><default>Blue</default></property>
          <property><name>Level</name><type>RANGED_INTEGER</type><minimum>3</minimum><maximum>9</maximum></property>
        </properties></config></devicedata>"#,
    )
    .unwrap();
    zip.start_file("driver.lua", opts).unwrap();
    zip.write_all(
        format!(
            "{SAY}\nlocal util = require('lib.util')\nfunction OnDriverLateInit()\n  say(C4:GetDriverConfigInfo('name'), C4:GetDriverConfigInfo('version'), C4:GetDriverConfigInfo('manufacturer'), C4:GetDriverConfigInfo('nope'))\n  say(Properties['Color'], Properties['Level'], util.twice(21))\n  C4:SetTimer(5, function() util.fail() end)\nend\n"
        )
        .as_bytes(),
    )
    .unwrap();
    zip.start_file("lib/util.lua", opts).unwrap();
    zip.write_all(b"return { twice = function(x) return 2 * x end, fail = function() error('in module') end }")
        .unwrap();
    zip.finish().unwrap();

    let package = luadriver::package::load(&path).unwrap();
    assert_eq!(package.name, "Zipped Demo");
    let d = TestDriver::start_package(
        package,
        dir,
        &[("Level", "5")],
        luadriver::driver::IoThread::Own,
    );
    d.expect(&["Zipped Demo 12 Acme nil", "Blue 5 42"]);
}

#[test]
fn two_drivers_in_one_process_have_separate_states() {
    let a = driver(r#"shared = "a"; function ExecuteCommand() say("a sees", shared) end"#);
    let b = driver(r#"shared = "b"; function ExecuteCommand() say("b sees", shared) end"#);
    for d in [&a, &b] {
        d.send(DriverEvent::Command {
            command: "x".into(),
            params: vec![],
        });
    }
    a.expect(&["a sees a"]);
    b.expect(&["b sees b"]);
}

#[test]
fn runaway_coroutine_nesting_is_an_error_not_a_crash() {
    let d = driver(
        r#"
        function OnDriverLateInit()
          local function f() return coroutine.wrap(f)() end
          local ok, err = pcall(f)
          say(ok, (tostring(err):gsub("^.-: ", "")))
          local co = coroutine.wrap(function(a) local b = coroutine.yield(a + 1) return b * 2 end)
          say(co(1), co(5))
          say(coroutine.resume(coroutine.create(function() error("inner", 0) end)))
        end
        "#,
    );
    d.expect(&[
        "false C stack overflow (coroutines nested too deeply)",
        "2 10",
        "false inner",
    ]);
}
