//! `luadriver run` as a user runs it: exit codes, messages, clean stops.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn luadriver() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_luadriver"));
    cmd.env_remove("RUST_LOG");
    cmd
}

fn write_driver(dir: &tempfile::TempDir, name: &str, source: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, source).expect("write driver");
    path
}

fn run(args: &[&str]) -> Output {
    luadriver().args(args).output().expect("run luadriver")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn run_for_a_duration_calls_every_lifecycle_function_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_driver(
        &dir,
        "life.lua",
        r#"
        print("chunk", Properties["Greeting"])
        function OnDriverInit(t) print("init", t) end
        function OnDriverLateInit(t) print("late", t) end
        function OnDriverDestroyed(r) print("destroyed", r) end
        "#,
    );
    let out = run(&[
        "run",
        path.to_str().unwrap(),
        "--prop",
        "Greeting=hi there",
        "--for",
        "200ms",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "chunk\thi there\ninit\tDIT_ADDING\nlate\tDIT_ADDING\ndestroyed\tSHUTDOWN\n"
    );
}

#[test]
fn sigterm_stops_the_driver_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_driver(
        &dir,
        "term.lua",
        r#"
        function OnDriverLateInit() print("ready") end
        function OnDriverDestroyed(r) print("destroyed", r) end
        "#,
    );
    let mut child = luadriver()
        .args(["run", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert_eq!(lines.next().unwrap().unwrap(), "destroyed\tSHUTDOWN");
    let status = wait_bounded(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

fn wait_bounded(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("luadriver did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_syntax_error_exits_1_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_driver(&dir, "broken.lua", "local x = 1\nfunction oops(\n");
    let out = run(&["run", path.to_str().unwrap(), "--for", "1s"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("{}:3:", path.display())), "{err}");
}

#[test]
fn an_error_at_load_exits_1_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_driver(&dir, "throws.lua", "\n\nerror('no broker configured')\n");
    let out = run(&["run", path.to_str().unwrap(), "--for", "1s"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("{}:3: no broker configured", path.display())),
        "{err}"
    );
}

#[test]
fn a_missing_driver_file_exits_1_and_names_it() {
    let out = run(&["run", "/nonexistent/driver.lua"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("/nonexistent/driver.lua"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn usage_errors_exit_2_and_say_what_is_wrong() {
    for (args, expected) in [
        (&["run"][..], "DRIVER"),
        (&["run", "x.lua", "--prop", "novalue"][..], "NAME=VALUE"),
        (&["run", "x.lua", "--for", "soon"][..], "duration"),
        (&["run", "x.lua", "--bogus"][..], "--bogus"),
        (&["launch"][..], "launch"),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).contains(expected),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn a_callback_error_is_logged_with_driver_name_and_traceback_and_the_driver_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_driver(
        &dir,
        "faulty.lua",
        r#"
        function OnDriverLateInit()
          C4:SetTimer(10, function() local t = nil; return t.x end)
          C4:SetTimer(60, function() print("still alive") end)
        end
        "#,
    );
    let out = run(&["run", path.to_str().unwrap(), "--for", "500ms"]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "still alive\n");
    let err = text(&out.stderr);
    assert!(err.contains("ERROR faulty"), "{err}");
    assert!(err.contains("attempt to index local 't'"), "{err}");
    assert!(err.contains("stack traceback"), "{err}");
    assert!(err.contains("faulty.lua:3"), "{err}");
}

#[test]
fn the_example_thermostat_heats_toward_its_setpoint() {
    let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/drivers/thermostat/driver.lua");
    let out = run(&[
        "run",
        driver,
        "--prop",
        "Poll Interval (ms)=100",
        "--for",
        "700ms",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let states: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert!(states.len() >= 4, "{states:?}");
    let temps: Vec<f64> = states
        .iter()
        .map(|s| s["temperature"].as_f64().unwrap())
        .collect();
    assert!(temps.windows(2).all(|w| w[1] >= w[0]), "{temps:?}");
    assert!(temps.last() > temps.first(), "{temps:?}");
    assert_eq!(states[0]["setpoint"], 21);
}

#[test]
fn a_runaway_callback_is_reported_and_with_stop_runaway_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_driver(
        &dir,
        "runaway.lua",
        r#"
        function OnDriverLateInit()
          C4:SetTimer(10, function() local t0 = C4:GetTime() while C4:GetTime() - t0 < 1500 do end end)
          C4:SetTimer(20, function() while true do end end)
          C4:SetTimer(2500, function() print("alive after the stop") end)
        end
        "#,
    );
    let out = run(&[
        "run",
        path.to_str().unwrap(),
        "--busy-limit",
        "1s",
        "--stop-runaway",
        "--for",
        "3500ms",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "alive after the stop\n");
    let err = text(&out.stderr);
    assert!(
        err.contains("stopped by luadriver: callback ran longer than 1s"),
        "{err}"
    );
    assert!(err.contains("responsive again"), "{err}");
}
