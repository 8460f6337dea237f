//! Robustness of `luadriver run`: random and broken arguments, damaged `.c4z` packages and
//! broken driver sources. Every run exits 0, 1 or 2 by itself (never a signal, never a
//! panic) with a readable message on stderr; a driver that cannot load exits 1 naming its
//! file. Each run is bounded: one that hangs is killed and fails the test.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Longest a run may take: `--for` is at most 100 ms here, the rest is start-up.
const BOUND: Duration = Duration::from_secs(15);

fn luadriver() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_luadriver"));
    cmd.env_remove("RUST_LOG").env("RUST_BACKTRACE", "0");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `luadriver ARGS`, killing it (and failing) if it outlives [`BOUND`].
fn run(args: &[OsString]) -> Output {
    let child = luadriver().args(args).spawn().expect("start luadriver");
    let pid = child.id();
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(BOUND) {
        Ok(output) => output.expect("luadriver output"),
        Err(_) => {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
            panic!("luadriver {args:?} still running after {BOUND:?}");
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Exit code in `allowed`, by itself, no panic, and a message when it failed.
fn assert_clean(args: &[OsString], out: &Output, allowed: &[i32]) {
    let err = text(&out.stderr);
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().chars().take(80).collect())
        .collect();
    assert_eq!(
        out.status.signal(),
        None,
        "{shown:?} was killed by a signal\n{err}"
    );
    let code = out.status.code().expect("exit code");
    assert!(
        allowed.contains(&code),
        "{shown:?} exited {code}, expected one of {allowed:?}\n{err}"
    );
    for broken in ["panicked at", "overflowed its stack", "fatal runtime error"] {
        assert!(!err.contains(broken), "{shown:?}: {broken}\n{err}");
    }
    if code != 0 {
        assert!(
            err.contains("luadriver: ") || err.contains("error: ") || err.contains("Usage:"),
            "{shown:?} exited {code} without a message\n{err}"
        );
    }
}

fn os(s: &str) -> OsString {
    OsString::from(s)
}

fn path_arg(p: &Path) -> OsString {
    p.as_os_str().to_owned()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write file");
    path
}

const GOOD_DRIVER: &str = r#"
function OnDriverLateInit() print("late") end
function OnDriverDestroyed() print("destroyed") end
"#;

#[test]
fn random_arguments_exit_0_1_or_2_with_a_message_and_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.lua", GOOD_DRIVER.as_bytes());
    let empty_dir = dir.path().join("empty");
    std::fs::create_dir(&empty_dir).unwrap();
    let text_file = write(dir.path(), "notes.txt", b"hello");
    let corrupt_persist = write(dir.path(), "persist.json", b"{\"format\": 3");
    let tokens: Vec<OsString> = vec![
        os("run"),
        path_arg(&good),
        path_arg(&good),
        path_arg(&good),
        path_arg(&dir.path().join("missing.lua")),
        path_arg(&empty_dir),
        path_arg(&text_file),
        os(""),
        os("-"),
        os("--prop"),
        os("Greeting=hi"),
        os("=value"),
        os("no-equals"),
        os("a==b"),
        os("--for"),
        os("100ms"),
        os("0s"),
        os("-5s"),
        os("abc"),
        os("1ns"),
        os("99999999999999999999999999s"),
        os("--device-id"),
        os("0"),
        os("4294967296"),
        os("-1"),
        os("--persist"),
        path_arg(&empty_dir),
        path_arg(&corrupt_persist),
        path_arg(&dir.path().join("new/persist.json")),
        os("--"),
        os("--unknown"),
        os("-x"),
        os("help"),
        os("--version"),
        os("--embedded-broker"),
        OsString::from_vec(vec![0xff, 0xfe, b'.', b'l', b'u', b'a']),
        os(&"a".repeat(100_000)),
        os("\u{202e}ɐnl.pǝʌᴉɹp"),
    ];
    let mut rng = StdRng::seed_from_u64(0xc1);
    let mut cases: Vec<Vec<OsString>> = (0..40)
        .map(|_| {
            let n = rng.gen_range(0..6);
            let mut args: Vec<OsString> = (0..n)
                .map(|_| tokens.choose(&mut rng).expect("tokens").clone())
                .collect();
            if rng.gen_bool(0.7) {
                args.insert(0, os("run"));
            }
            // Every run that parses ends by itself; a repeated --for is a usage error.
            args.extend([os("--for"), os("100ms")]);
            args
        })
        .collect();
    cases.push(vec![]);
    cases.push(vec![os("run")]);
    cases.push(vec![os("run"), path_arg(&good), os("--for"), os("1ns")]);

    std::thread::scope(|scope| {
        for chunk in cases.chunks(cases.len().div_ceil(3)) {
            scope.spawn(move || {
                for args in chunk {
                    let out = run(args);
                    assert_clean(args, &out, &[0, 1, 2]);
                }
            });
        }
    });
}

#[test]
fn usage_errors_exit_2_and_load_failures_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.lua", GOOD_DRIVER.as_bytes());
    for (args, code) in [
        (vec![os("run"), path_arg(&good), os("--for"), os("abc")], 2),
        (vec![os("run"), path_arg(&good), os("--prop"), os("=x")], 2),
        (
            vec![os("run"), path_arg(&good), os("--device-id"), os("-1")],
            2,
        ),
        (vec![os("run"), path_arg(&good), os("--bogus")], 2),
        (vec![os("run"), path_arg(&dir.path().join("none.lua"))], 1),
        (
            vec![os("run"), path_arg(dir.path()), os("--for"), os("100ms")],
            1,
        ),
        (
            vec![
                os("run"),
                path_arg(&good),
                os("--persist"),
                path_arg(dir.path()),
                os("--for"),
                os("100ms"),
            ],
            1,
        ),
    ] {
        let out = run(&args);
        assert_clean(&args, &out, &[code]);
    }
}

#[test]
fn a_huge_for_runs_until_sigterm_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.lua", GOOD_DRIVER.as_bytes());
    for duration in ["18446744073709551615s", "500000000000y"] {
        let mut child = luadriver()
            .args([
                path_arg(Path::new("run")),
                path_arg(&good),
                os("--for"),
                os(duration),
            ])
            .spawn()
            .expect("start luadriver");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read stdout");
        let pid = child.id();
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        if line == "late\n" {
            let killed = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .expect("kill");
            assert!(killed.success());
        }
        let mut out = match rx.recv_timeout(BOUND) {
            Ok(out) => out.expect("output"),
            Err(_) => {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status();
                panic!("--for {duration}: SIGTERM did not stop luadriver");
            }
        };
        stdout.read_to_end(&mut out.stdout).expect("rest of stdout");
        let args = [os("run"), path_arg(&good), os("--for"), os(duration)];
        // humantime may refuse the larger one (usage error); it must not panic.
        assert_clean(&args, &out, &[0, 2]);
        if out.status.code() == Some(0) {
            assert_eq!(line, "late\n");
            assert_eq!(text(&out.stdout), "destroyed\n");
        }
    }
}

#[test]
fn a_driver_stuck_while_loading_is_given_up_when_for_elapses() {
    let dir = tempfile::tempdir().unwrap();
    let stuck = write(dir.path(), "stuck.lua", b"while true do end");
    let args = [os("run"), path_arg(&stuck), os("--for"), os("100ms")];
    let out = run(&args);
    assert_clean(&args, &out, &[1]);
    assert!(text(&out.stderr).contains("still loading"));
}

/// A `.c4z` with these entries (stored or deflated).
fn zip_bytes(entries: &[(&str, &[u8])], deflate: bool) -> Vec<u8> {
    let mut buffer = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buffer);
        let method = if deflate {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        };
        let options = zip::write::SimpleFileOptions::default().compression_method(method);
        for (name, bytes) in entries {
            zip.start_file(*name, options).expect("zip entry");
            zip.write_all(bytes).expect("zip write");
        }
        zip.finish().expect("zip finish");
    }
    buffer.into_inner()
}

const XML: &str = r#"<devicedata><name>Fuzzed</name><version>7</version>
<config><script file="driver.lua"/><properties>
<property><name>Greeting</name><type>STRING</type><default>hi</default></property>
</properties></config></devicedata>"#;

#[test]
fn broken_c4z_packages_exit_1_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = zip_bytes(
        &[
            ("driver.xml", XML.as_bytes()),
            ("driver.lua", GOOD_DRIVER.as_bytes()),
        ],
        true,
    );
    let mut rng = StdRng::seed_from_u64(0xc42);
    let mut packages: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, size) in [0usize, 1, 4, 22, 100, 5000].into_iter().enumerate() {
        let mut bytes: Vec<u8> = (0..size).map(|_| rng.r#gen()).collect();
        if i % 2 == 1 && size >= 4 {
            bytes[..4].copy_from_slice(b"PK\x03\x04");
        }
        packages.push((format!("random{i}.c4z"), bytes));
    }
    for i in 0..8 {
        let cut = rng.gen_range(0..good.len());
        packages.push((format!("truncated{i}.c4z"), good[..cut].to_vec()));
    }
    let mut flipped = good.clone();
    for _ in 0..20 {
        let at = rng.gen_range(0..flipped.len());
        flipped[at] ^= 0xff;
    }
    packages.push(("flipped.c4z".into(), flipped));
    let lua = GOOD_DRIVER.as_bytes();
    for (name, entries) in [
        ("only_xml.c4z", vec![("driver.xml", XML.as_bytes())]),
        ("nested.c4z", vec![("folder/driver.lua", lua)]),
        ("empty_zip.c4z", vec![]),
        (
            "bad_xml.c4z",
            vec![("driver.xml", &b"<devicedata><name>x</devicedata>"[..]), ("driver.lua", lua)],
        ),
        (
            "binary_xml.c4z",
            vec![("driver.xml", &b"\xff\xfe<\x00d\x00"[..]), ("driver.lua", lua)],
        ),
        (
            "wrong_root.c4z",
            vec![("driver.xml", &b"<html></html>"[..]), ("driver.lua", lua)],
        ),
        (
            "entities.c4z",
            vec![
                (
                    "driver.xml",
                    &br#"<!DOCTYPE d [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;"><!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;"><!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">]><devicedata><name>&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;</name>"#[..],
                ),
                ("driver.lua", lua),
            ],
        ),
        (
            "encrypted.c4z",
            vec![
                (
                    "driver.xml",
                    &br#"<devicedata><config><script file="driver.lua" encryption="2"/></config></devicedata>"#[..],
                ),
                ("driver.lua", lua),
            ],
        ),
        (
            "syntax.c4z",
            vec![("driver.xml", XML.as_bytes()), ("driver.lua", &b"function ("[..])],
        ),
        (
            "throws.c4z",
            vec![("driver.xml", XML.as_bytes()), ("driver.lua", &b"\n\nerror('at load')"[..])],
        ),
    ] {
        packages.push((name.into(), zip_bytes(&entries, name.len() % 2 == 0)));
    }

    std::thread::scope(|scope| {
        for chunk in packages.chunks(packages.len().div_ceil(3)) {
            let dir = dir.path();
            scope.spawn(move || {
                for (name, bytes) in chunk {
                    let path = write(dir, name, bytes);
                    let args = [os("run"), path_arg(&path), os("--for"), os("100ms")];
                    let out = run(&args);
                    assert_clean(&args, &out, &[1]);
                    let err = text(&out.stderr);
                    assert!(err.contains(name.as_str()), "{name}: not named in\n{err}");
                }
            });
        }
    });
}

#[test]
fn odd_but_valid_driver_xml_properties_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut properties = String::new();
    for i in 0..3000 {
        properties.push_str(&format!(
            "<property><name>P{i}</name><type>STRING</type><default>{i}</default></property>"
        ));
    }
    let big = "x".repeat(1 << 20);
    let xml = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<devicedata><name>{name}</name><version>&lt;1&gt;</version><config><properties>
{properties}
<property><name>Big</name><type>STRING</type><default>{big}</default></property>
<property><name> Spaced  name = odd ✓ </name><default><![CDATA[<raw> & "quoted"]]></default></property>
<property><name></name><default>nameless</default></property>
<property><name>P1</name><default>duplicate</default></property>
<property><name>List</name><type>LIST</type><items></items></property>
<property><name>Range</name><type>RANGED_INTEGER</type><minimum>-5</minimum></property>
<property><type>STRING</type></property>
</properties></config><unknown a="b"><x/></unknown></devicedata>"#,
        name = "Ödd driver name ".repeat(200)
    );
    let source = r#"
local n = 0
for _ in pairs(Properties) do n = n + 1 end
print(n, #Properties["Big"], Properties["P1"], Properties["Spaced  name = odd ✓"],
      Properties["List"], Properties["Range"], C4:GetDriverConfigInfo("version"))
"#;
    let path = write(
        dir.path(),
        "odd.c4z",
        &zip_bytes(
            &[
                ("driver.xml", xml.as_bytes()),
                ("driver.lua", source.as_bytes()),
            ],
            true,
        ),
    );
    let args = [os("run"), path_arg(&path), os("--for"), os("100ms")];
    let out = run(&args);
    assert_clean(&args, &out, &[0]);
    assert_eq!(
        text(&out.stdout),
        "3004\t1048576\t1\t<raw> & \"quoted\"\t\t-5\t<1>\n"
    );
}

#[test]
fn broken_driver_sources_exit_1_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[u8], &str)] = &[
        ("syntax.lua", b"local x = 1\nfunction (", "syntax.lua:2:"),
        ("throws.lua", b"\n\nerror('boom')", "throws.lua:3: boom"),
        ("table_error.lua", b"error({})", "table_error.lua"),
        ("nil_error.lua", b"error(nil)", "nil_error.lua"),
        (
            "bad_tostring_error.lua",
            b"error(setmetatable({}, {__tostring = function() error('x') end}))",
            "bad_tostring_error.lua",
        ),
        ("binary_message.lua", b"error('\\255\\0\\254')", "binary_message.lua:1:"),
        (
            "recursion.lua",
            b"local function f() return 1 + f() end\nf()",
            "stack overflow",
        ),
        (
            "gsub_recursion.lua",
            b"local function f(s) return (s:gsub('.', f)) end\nf('ab')",
            "stack overflow",
        ),
        (
            "print_recursion.lua",
            b"local t = setmetatable({}, {__tostring = function(s) print(s) return 'x' end})\nprint(t)",
            "print_recursion.lua",
        ),
        (
            "log_recursion.lua",
            b"local t = setmetatable({}, {__tostring = function(s) C4:DebugLog(s) return 'x' end})\nC4:DebugLog(t)\nerror('after')",
            "log_recursion.lua:3: after",
        ),
        (
            "index_recursion.lua",
            b"local t = setmetatable({}, {__index = function(t, k) return t[k] end})\nlocal x = t[1]",
            "stack overflow",
        ),
        ("bytecode.lua", b"\x1bLJ\x02\x00garbage", "binary chunk"),
        ("missing_module.lua", b"require('no.such.module')", "no.such.module"),
        ("os_exit.lua", b"os.exit(3)", "os_exit.lua:1:"),
        ("huge_error.lua", b"error(string.rep('e', 1000000))", "huge_error.lua:1:"),
    ];
    std::thread::scope(|scope| {
        for chunk in cases.chunks(cases.len().div_ceil(3)) {
            let dir = dir.path();
            scope.spawn(move || {
                for (name, source, expected) in chunk {
                    let path = write(dir, name, source);
                    // They fail while loading; the bound is for a slow one (4,000 nested
                    // prints in a debug build), which --for would otherwise cut short.
                    let args = [os("run"), path_arg(&path), os("--for"), os("10s")];
                    let out = run(&args);
                    assert_clean(&args, &out, &[1]);
                    let err = text(&out.stderr);
                    let shown: String = err.chars().take(2000).collect();
                    assert!(err.contains(name), "{name}: file not named in\n{shown}");
                    assert!(
                        err.contains(expected),
                        "{name}: no '{expected}' in\n{shown}"
                    );
                }
            });
        }
    });
}

#[test]
fn odd_sources_that_are_valid_run_and_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[u8])] = &[
        ("empty.lua", b""),
        ("comment_only.lua", b"-- \xff\xfe not UTF-8 in a comment"),
        ("binary_string.lua", b"local s = '\xff\x00\xfe' print(#s)"),
        (
            "init_throws.lua",
            b"function OnDriverInit() error('in init') end",
        ),
        (
            "late_throws.lua",
            b"function OnDriverLateInit() error({}) end",
        ),
        (
            "destroyed_recurses.lua",
            b"local function f() return 1 + f() end\nfunction OnDriverDestroyed() f() end",
        ),
        ("shebang.lua", b"#!/usr/bin/env luadriver\nprint('ok')"),
    ];
    for (name, source) in cases {
        let path = write(dir.path(), name, source);
        let args = [os("run"), path_arg(&path), os("--for"), os("100ms")];
        let out = run(&args);
        assert_clean(&args, &out, &[0]);
    }
}
