//! Passwords never reach a log: the `luadriver` binary runs drivers with `RUST_LOG=trace`
//! that set an MQTT password (in the source and in a property) and a TLS key password,
//! get the key password wrong, connect to a private Mosquitto (TLS with a client
//! certificate and a password file) with a wrong and a right password, try a closed port,
//! disconnect and reconnect; every distinctive secret must be absent from stdout and
//! stderr. Also: the `Debug` forms of the connect settings and packets hide them.

mod common;

use common::certs::{self, CLIENT_KEY_PASSWORD};
use common::free_port;
use common::mosquitto::{Mosquitto, MosquittoConfig};
use luadriver::mqtt::tls::TlsFiles;
use luadriver::mqtt::wire::{self, Packet};
use luadriver::mqtt::{ConnectOptions, MqttCommand, Props, ProtocolVersion, Secret};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The right MQTT password, given to the driver as a property.
const MQTT_PASSWORD: &str = "mqtt-secret-Vq3xK9wPz";
/// A wrong MQTT password, written in the driver's source.
const WRONG_MQTT_PASSWORD: &str = "mqtt-wrong-Jr8Lm2Tc";
/// A wrong password for the encrypted client key.
const WRONG_KEY_PASSWORD: &str = "tls-wrong-Hb5Nq1Xe";

/// Every secret a test hands over; none may be printed.
const SECRETS: [&str; 4] = [
    MQTT_PASSWORD,
    WRONG_MQTT_PASSWORD,
    WRONG_KEY_PASSWORD,
    CLIENT_KEY_PASSWORD,
];

const DRIVER: &str = r#"
local P = Properties
local function out(...) print("REPORT", ...) end
local step = 0

local closed = C4:MQTT("secrets-closed")
closed:SetUsernameAndPassword("user", P["Broker Password"])
closed:OnConnect(function(_, rc, _, msg) out("closed connect", rc, msg) end)

local c = C4:MQTT("secrets-tls")
out("wrong key", c:SetTlsCertificates(P["ca"], P["cert"], P["key"], "WRONG_KEY_PASSWORD"))
out("right key", c:SetTlsCertificates(P["ca"], P["cert"], P["key"], "CLIENT_KEY_PASSWORD"))
out("wrong user", c:SetUsernameAndPassword("user", "WRONG_MQTT_PASSWORD"))
c:OnDisconnect(function(_, rc, msg) out("disconnect", rc, msg) end)
c:OnPublish(function(_, id, rc, msg) out("published", id, rc, msg) end)
c:OnConnect(function(_, rc, flags, msg)
  out("connect", rc, msg)
  step = step + 1
  if step == 1 then
    -- Refused: settings may change again after a Disconnect.
    c:Disconnect()
    out("right user", c:SetUsernameAndPassword("user", P["Broker Password"]))
    c:Connect("127.0.0.1", tonumber(P["port"]))
  elseif step == 2 then
    c:Disconnect()
    c:Reconnect()
  elseif step == 3 then
    c:Publish("secrets/t", "x", 1)
    closed:Connect("127.0.0.1", tonumber(P["closed"]))
    C4:SetTimer(300, function() c:Disconnect(); out("DONE") end)
  end
end)
c:Connect("127.0.0.1", tonumber(P["port"]))
"#;

/// A TLS listener requiring a client certificate and a password from its file.
fn tls_broker_with_passwords(certs: &certs::TestCerts, dir: &Path) -> Mosquitto {
    let pwfile = dir.join("passwd");
    let made = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&pwfile)
        .args(["user", MQTT_PASSWORD])
        .status()
        .expect("mosquitto_passwd");
    assert!(made.success());
    Mosquitto::start_with(MosquittoConfig {
        deny_anonymous: true,
        listener_extra: vec![
            format!("cafile {}", certs.ca.display()),
            format!("certfile {}", certs.server_cert.display()),
            format!("keyfile {}", certs.server_key.display()),
            "require_certificate true".to_string(),
            format!("password_file {}", pwfile.display()),
        ],
        ..Default::default()
    })
}

/// Runs `luadriver run` with `RUST_LOG=trace`; returns stdout and stderr together.
fn run_traced(driver: &Path, props: &[(&str, String)], extra: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_luadriver"));
    cmd.arg("run").arg(driver).args(["--for", "4s"]).args(extra);
    for (name, value) in props {
        cmd.arg("--prop").arg(format!("{name}={value}"));
    }
    let output = cmd
        .env("RUST_LOG", "trace")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run luadriver");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "luadriver failed:\n{text}");
    text
}

fn reports(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("REPORT\t"))
        .map(|l| l.replace('\t', " "))
        .collect()
}

fn assert_no_secret(output: &str) {
    for secret in SECRETS {
        if let Some(at) = output.find(secret) {
            let line = output[..at].lines().count();
            panic!("secret {secret:?} printed (line {line}):\n{output}");
        }
    }
}

#[test]
fn no_password_reaches_stdout_or_stderr_at_trace_level() {
    let Some(_) = Mosquitto::available().then_some(()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let certs = certs::generate(dir.path());
    let broker = tls_broker_with_passwords(&certs, dir.path());
    let source = DRIVER
        .replace("WRONG_KEY_PASSWORD", WRONG_KEY_PASSWORD)
        .replace("CLIENT_KEY_PASSWORD", CLIENT_KEY_PASSWORD)
        .replace("WRONG_MQTT_PASSWORD", WRONG_MQTT_PASSWORD);
    let driver = dir.path().join("secrets.lua");
    std::fs::write(&driver, source).unwrap();
    let output = run_traced(
        &driver,
        &[
            ("port", broker.port.to_string()),
            ("closed", free_port().to_string()),
            ("ca", certs.ca.display().to_string()),
            ("cert", certs.client_cert.display().to_string()),
            ("key", certs.client_key_encrypted.display().to_string()),
            ("Broker Password", MQTT_PASSWORD.to_string()),
        ],
        &[],
    );
    assert!(
        output.lines().count() > 50,
        "RUST_LOG=trace printed almost nothing:\n{output}"
    );
    let r = reports(&output);
    // The flow really happened: each step's report is there.
    let wrong_key = r
        .iter()
        .find(|l| l.starts_with("wrong key "))
        .unwrap_or_else(|| panic!("{output}"));
    assert!(
        wrong_key.starts_with("wrong key 8 SetTlsCertificates"),
        "{wrong_key}"
    );
    assert!(wrong_key.contains("password"), "{wrong_key}");
    for want in ["right key 0", "wrong user 0", "right user 0", "DONE"] {
        assert!(r.iter().any(|l| l == want), "no {want:?} in {r:#?}");
    }
    let connects: Vec<&String> = r.iter().filter(|l| l.starts_with("connect ")).collect();
    assert_eq!(connects.len(), 3, "{r:#?}");
    assert!(
        connects[0].starts_with("connect 134 ") || connects[0].starts_with("connect 135 "),
        "{r:#?}"
    );
    assert!(connects[1].starts_with("connect 0 ") && connects[2].starts_with("connect 0 "));
    assert!(r.iter().any(|l| l.starts_with("published 1 0")), "{r:#?}");
    assert!(
        r.iter()
            .any(|l| l.starts_with("closed connect ") && !l.starts_with("closed connect 0")),
        "{r:#?}"
    );
    assert_no_secret(&output);
}

#[test]
fn no_password_reaches_the_log_through_the_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let driver = dir.path().join("embedded.lua");
    std::fs::write(
        &driver,
        format!(
            r#"
            local c = C4:MQTT("secrets-embedded")
            c:SetUsernameAndPassword("user", "{MQTT_PASSWORD}")
            c:OnConnect(function(_, rc) print("REPORT", "connect", rc); c:Disconnect() end)
            c:OnDisconnect(function(_, rc) print("REPORT", "disconnect", rc) end)
            c:Connect("127.0.0.1", {port})
            "#
        ),
    )
    .unwrap();
    let output = run_traced(&driver, &[], &["--embedded-broker", &port.to_string()]);
    let r = reports(&output);
    assert_eq!(r, vec!["connect 0", "disconnect 0"], "{output}");
    assert_no_secret(&output);
}

#[test]
fn debug_forms_of_settings_and_packets_hide_passwords() {
    let options = ConnectOptions {
        host: "127.0.0.1".into(),
        port: 1883,
        keepalive: Duration::from_secs(60),
        client_id: "debug".into(),
        clean_session: true,
        version: ProtocolVersion::V5,
        username: Some("user".into()),
        password: Some(Secret(MQTT_PASSWORD.into())),
        will: None,
        tls: None,
        props: Props::default(),
        max_inflight: 20,
        max_sends: None,
        auto_reconnect: None,
    };
    let files = TlsFiles {
        ca: None,
        cert: None,
        key: None,
        key_password: Some(Secret(CLIENT_KEY_PASSWORD.into())),
    };
    let packet = Packet::Connect(Box::new(wire::Connect {
        client_id: "debug".into(),
        clean_session: true,
        keepalive_secs: 60,
        username: Some("user".into()),
        password: Some(MQTT_PASSWORD.into()),
        will: None,
        props: Props::default(),
    }));
    let shown = [
        format!("{options:?}"),
        format!("{options:#?}"),
        format!("{:?}", MqttCommand::Connect(Box::new(options.clone()))),
        format!("{files:?}"),
        format!("{packet:?}"),
        format!("{packet:#?}"),
    ];
    for text in &shown {
        assert_no_secret(text);
        assert!(text.contains("***"), "no sign of the password: {text}");
    }
    assert!(
        shown[0].contains("\"user\""),
        "the user name is no secret: {}",
        shown[0]
    );
    // The password is still there to be sent.
    let mut bytes = bytes::BytesMut::new();
    wire::encode(ProtocolVersion::V5, &packet, &mut bytes).unwrap();
    let raw = String::from_utf8_lossy(&bytes);
    assert!(raw.contains(MQTT_PASSWORD));
}
