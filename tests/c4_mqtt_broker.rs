//! `C4:MQTT` end to end, from Lua, against a private Mosquitto on an ephemeral port:
//! connect results, QoS 0/1/2 with exactly one OnPublish each, messages (binary too),
//! MQTT 5 properties both ways, retained messages, credentials, TLS, Disconnect,
//! Reconnect, the will, broker limits (codes 24 and 25), and the guarantee across broker
//! restarts.
//!
//! Each test's driver loads `SAY` and `HARNESS`: every callback reports through `C4:FireEvent`, and
//! the test runs Lua snippets in the driver with `ExecuteCommand("LUA", {code = ...})`.

#[macro_use]
mod common;

use common::drivers::{SAY, TestDriver};
use common::mosquitto::{Mosquitto, MosquittoConfig};
use luadriver::driver::{DriverEvent, IoThread};
use std::collections::HashMap;

const HARNESS: &str = r#"
PORT = tonumber(Properties["port"])
clients = {}
-- A client named `name` whose callbacks all report, prefixed with its name.
function client(name, version, id)
  local c = C4:MQTT(id or (name .. "-" .. tostring(PORT)))
  if version then c:ForceMqttVersion(version) end
  c:OnConnect(function(_, rc, flags, msg) say(name, "connect", rc, flags, msg) end)
  c:OnDisconnect(function(_, rc, msg) say(name, "disconnect", rc, msg) end)
  c:OnPublish(function(_, id, rc, msg) say(name, "published", id, rc) end)
  c:OnSubscribe(function(_, id, granted) say(name, "subscribed", id, table.concat(granted, ",")) end)
  c:OnUnsubscribe(function(_, id) say(name, "unsubscribed", id) end)
  c:OnMessage(function(_, id, topic, payload, qos, retain, props)
    local keys = {}
    for k, v in pairs(props) do
      if type(v) ~= "table" then keys[#keys + 1] = k .. "=" .. tostring(v) end
    end
    table.sort(keys)
    say(name, "message", topic, C4:Base64Encode(payload), qos, retain, table.concat(keys, ";"))
    last_props = props
  end)
  clients[name] = c
  return c
end
function ExecuteCommand(cmd, params)
  if cmd == "LUA" then
    local f = assert(loadstring(params.code))
    f()
  end
end
"#;

struct Session {
    driver: TestDriver,
}

impl Session {
    fn start(broker_port: u16, setup: &str) -> Session {
        Self::start_in(IoThread::Own, broker_port, setup)
    }

    /// A session whose MQTT runs on the given I/O thread.
    fn start_in(io: IoThread, broker_port: u16, setup: &str) -> Session {
        let source = format!("{SAY}\n{HARNESS}\n{setup}");
        let port = broker_port.to_string();
        let driver = TestDriver::start_placed(&source, &[], &[("port", &port)], io);
        Session { driver }
    }

    fn lua(&self, code: &str) {
        self.driver.send(DriverEvent::Command {
            command: "LUA".into(),
            params: vec![("code".into(), code.into())],
        });
    }

    fn next(&self) -> String {
        self.driver.next()
    }

    /// Waits until an event starting with each prefix has come, in any order.
    fn wait_all(&self, prefixes: &[&str]) -> Vec<String> {
        let mut found: Vec<Option<String>> = vec![None; prefixes.len()];
        while found.iter().any(Option::is_none) {
            let e = self.next();
            if let Some(i) =
                (0..prefixes.len()).find(|&i| found[i].is_none() && e.starts_with(prefixes[i]))
            {
                found[i] = Some(e);
            }
        }
        found.into_iter().flatten().collect()
    }

    /// Waits for `n` `OnPublish` of client `name`, each with reason code 0.
    fn wait_published_ok(&self, name: &str, n: usize) {
        for _ in 0..n {
            let e = self.wait(&format!("{name} published"));
            assert!(e.ends_with(" 0"), "{e}");
        }
    }

    /// Waits for an event starting with `prefix`; returns it.
    fn wait(&self, prefix: &str) -> String {
        self.driver.wait_for(|e| e.starts_with(prefix)).0
    }
}

fn mosquitto() -> Option<Mosquitto> {
    Mosquitto::available().then(Mosquitto::start)
}

on_either_io_thread!(qos_0_1_2_each_get_exactly_one_on_publish_and_reach_a_subscriber);
fn qos_0_1_2_each_get_exactly_one_on_publish_and_reach_a_subscriber(io: IoThread) {
    let Some(broker) = mosquitto() else { return };
    for version in ["311", "5"] {
        let s = Session::start_in(
            io,
            broker.port,
            &format!(
                r#"
                local sub = client("sub", {version})
                local pub = client("pub", {version})
                sub:Connect("127.0.0.1", PORT)
                "#
            ),
        );
        assert_eq!(s.next(), "sub connect 0 0 Success");
        s.lua(r#"say("sub id", select(2, clients.sub:Subscribe("t/#", 2)))"#);
        assert_eq!(s.next(), "sub id 1");
        assert_eq!(s.next(), "sub subscribed 1 2");
        s.lua(r#"clients.pub:Connect("127.0.0.1", PORT)"#);
        assert_eq!(s.wait("pub connect"), "pub connect 0 0 Success");
        s.lua(
            r#"
            local bin = string.char(0, 255, 10, 13) .. "binary"
            say("ids", select(2, clients.pub:Publish("t/0", bin, 0)),
                       select(2, clients.pub:Publish("t/1", bin, 1)),
                       select(2, clients.pub:Publish("t/2", bin, 2)))
            "#,
        );
        assert_eq!(s.next(), "ids 1 2 3");
        let mut published = HashMap::new();
        let mut messages = Vec::new();
        while published.len() < 3 || messages.len() < 3 {
            let e = s.next();
            if let Some(rest) = e.strip_prefix("pub published ") {
                *published.entry(rest.to_string()).or_insert(0) += 1;
            } else if e.starts_with("sub message") {
                messages.push(e);
            }
        }
        let expected: HashMap<String, i32> = [("1 0", 1), ("2 0", 1), ("3 0", 1)]
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        assert_eq!(published, expected, "MQTT {version}");
        messages.sort();
        let b64 = "AP8KDWJpbmFyeQ==";
        assert_eq!(
            messages,
            vec![
                format!("sub message t/0 {b64} 0 false "),
                format!("sub message t/1 {b64} 1 false "),
                format!("sub message t/2 {b64} 2 false "),
            ]
        );
        // No second OnPublish for anything.
        s.lua(r#"say("end")"#);
        assert_eq!(s.wait("end"), "end");
        assert!(
            s.driver
                .next_within(std::time::Duration::from_millis(200))
                .is_none()
        );
    }
}

#[test]
fn mqtt5_properties_round_trip_to_a_subscriber() {
    let Some(broker) = mosquitto() else { return };
    let s = Session::start(
        broker.port,
        r#"
        local sub = client("sub", 5)
        sub:Connect("127.0.0.1", PORT)
        "#,
    );
    s.wait("sub connect 0");
    s.lua(r#"clients.sub:Subscribe("props/#", 1)"#);
    s.wait("sub subscribed");
    s.lua(
        r#"
        local pub = client("pub", 5)
        pub:OnConnect(function(o, rc)
          say("pub", o:Publish("props/x", "{}", 1, false, {
            CONTENT_TYPE = "application/json",
            RESPONSE_TOPIC = "reply/here",
            CORRELATION_DATA = "\0\1\2",
            PAYLOAD_FORMAT_INDICATOR = 1,
            MESSAGE_EXPIRY_INTERVAL = 60,
            USER_PROPERTY = { { "k", "one" }, { "k", "two" }, { "other", "x" } },
          }))
        end)
        pub:Connect("127.0.0.1", PORT)
        "#,
    );
    assert_eq!(s.wait("pub "), "pub 0 1");
    let msg = s.wait("sub message");
    assert!(
        msg.contains("CONTENT_TYPE=application/json")
            && msg.contains("RESPONSE_TOPIC=reply/here")
            && msg.contains("PAYLOAD_FORMAT_INDICATOR=1")
            && msg.contains("MESSAGE_EXPIRY_INTERVAL="),
        "{msg}"
    );
    s.lua(
        r#"
        local p = last_props
        local pairs_ = {}
        for _, kv in ipairs(p.USER_PROPERTIES) do pairs_[#pairs_ + 1] = kv[1] .. "=" .. kv[2] end
        say("user", p.USER_PROPERTY.k, p.USER_PROPERTY.other, table.concat(pairs_, ","),
            C4:Base64Encode(p.CORRELATION_DATA))
        "#,
    );
    assert_eq!(s.wait("user"), "user two x k=one,k=two,other=x AAEC");
}

#[test]
fn retained_messages_are_kept_and_deleted_by_an_empty_retained_payload() {
    let Some(broker) = mosquitto() else { return };
    let s = Session::start(
        broker.port,
        r#"
        local pub = client("pub")
        pub:Connect("127.0.0.1", PORT)
        "#,
    );
    s.wait("pub connect 0");
    s.lua(r#"clients.pub:Publish("keep/state", "on", 1, true)"#);
    s.wait("pub published 1 0");
    s.lua(r#"local c = client("late"); c:OnConnect(function(o) o:Subscribe("keep/#", 1) end); c:Connect("127.0.0.1", PORT)"#);
    assert_eq!(
        s.wait("late message"),
        "late message keep/state b24= 1 true "
    );
    // Delete it, then prove a new subscriber gets nothing before a marker sent after.
    s.lua(r#"clients.pub:Publish("keep/state", "", 1, true)"#);
    s.wait("pub published 2 0");
    s.lua(
        r#"
        local c = client("later")
        c:OnConnect(function(o) o:Subscribe("keep/#", 1) end)
        c:OnSubscribe(function() clients.pub:Publish("keep/marker", "m", 1) end)
        c:Connect("127.0.0.1", PORT)
        "#,
    );
    assert_eq!(
        s.wait("later message"),
        "later message keep/marker bQ== 1 false "
    );
}

#[test]
fn wrong_password_and_closed_port_are_reported_by_on_connect() {
    let Some(_) = mosquitto() else { return };
    let mut config = MosquittoConfig {
        deny_anonymous: true,
        ..Default::default()
    };
    let pwdir = tempfile::tempdir().unwrap();
    let pwfile = pwdir.path().join("passwd");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c", pwfile.to_str().unwrap(), "driver", "right"])
        .status()
        .expect("mosquitto_passwd");
    assert!(made.success());
    config
        .listener_extra
        .push(format!("password_file {}", pwfile.display()));
    let broker = Mosquitto::start_with(config);
    let s = Session::start(
        broker.port,
        r#"
        local ok = client("ok", 5); ok:SetUsernameAndPassword("driver", "right"); ok:Connect("127.0.0.1", PORT)
        local bad5 = client("bad5", 5); bad5:SetUsernameAndPassword("driver", "wrong"); bad5:Connect("127.0.0.1", PORT)
        local bad3 = client("bad3"); bad3:SetUsernameAndPassword("driver", "wrong"); bad3:Connect("127.0.0.1", PORT)
        local closed = client("closed"); closed:Connect("127.0.0.1", 1)
        "#,
    );
    let mut seen = HashMap::new();
    while seen.len() < 4 {
        let e = s.next();
        let name = e.split(' ').next().unwrap().to_string();
        seen.insert(name, e);
    }
    assert!(seen["ok"].starts_with("ok connect 0 "), "{}", seen["ok"]);
    let bad5: Vec<&str> = seen["bad5"].split(' ').collect();
    assert!(["134", "135"].contains(&bad5[2]), "{}", seen["bad5"]);
    let bad3: Vec<&str> = seen["bad3"].split(' ').collect();
    assert!(
        ["134", "135"].contains(&bad3[2]),
        "3.x codes are mapped to v5: {}",
        seen["bad3"]
    );
    let closed = &seen["closed"];
    assert!(!closed.starts_with("closed connect 0 "), "{closed}");
    assert!(closed.to_lowercase().contains("refused"), "{closed}");
    // A failed attempt is never also an OnDisconnect.
    s.lua(r#"say("end")"#);
    let (_, between) = s.driver.wait_for(|e| e == "end");
    assert!(
        between.iter().all(|e| !e.contains("disconnect")),
        "{between:?}"
    );
}

on_either_io_thread!(disconnect_reconnect_and_queued_messages);
fn disconnect_reconnect_and_queued_messages(io: IoThread) {
    let Some(broker) = mosquitto() else { return };
    let s = Session::start_in(
        io,
        broker.port,
        r#"
        local sub = client("sub"); sub:OnConnect(function(o) o:Subscribe("q/#", 1) end); sub:Connect("127.0.0.1", PORT)
        local c = client("c"); c:Connect("127.0.0.1", PORT)
        "#,
    );
    s.wait_all(&["sub subscribed", "c connect 0"]);
    s.lua(r#"say("disc", clients.c:Disconnect())"#);
    assert_eq!(s.wait("disc"), "disc 0");
    assert_eq!(
        s.wait("c disconnect"),
        "c disconnect 0 Disconnected on request."
    );
    s.lua(r#"say("again", clients.c:Disconnect())"#);
    assert!(s.wait("again").starts_with("again 4 "));
    // Queued while disconnected, sent after Reconnect, in order.
    s.lua(
        r#"say("queued", select(2, clients.c:Publish("q/a", "1", 1)), select(2, clients.c:Publish("q/b", "2", 2)), clients.c:GetStats().queued)
           say("qos0", clients.c:Publish("q/c", "3", 0))
           say("reconnect", clients.c:Reconnect())"#,
    );
    assert_eq!(s.wait("queued"), "queued 1 2 2");
    assert!(s.wait("qos0").starts_with("qos0 4 nil"));
    assert_eq!(s.wait("reconnect"), "reconnect 0");
    assert!(s.wait("c connect").starts_with("c connect 0 "));
    let first = s.wait("sub message");
    let second = s.wait("sub message");
    assert!(first.starts_with("sub message q/a MQ=="), "{first}");
    assert!(second.starts_with("sub message q/b Mg=="), "{second}");
}

#[test]
fn broker_limits_give_codes_24_and_25() {
    let Some(_) = mosquitto() else { return };
    let broker = Mosquitto::start_with(MosquittoConfig {
        extra: vec!["max_packet_size 300".into()],
        listener_extra: vec!["max_qos 1".into()],
        ..Default::default()
    });
    let s = Session::start(
        broker.port,
        r#"local c = client("c", 5); c:Connect("127.0.0.1", PORT)"#,
    );
    let connect = s.wait("c connect");
    assert!(connect.starts_with("c connect 0"), "{connect}");
    s.lua(
        r#"
        local c = clients.c
        say("qos2", c:Publish("t", "x", 2))
        say("big", c:Publish("t", string.rep("x", 1000), 1))
        say("ok", c:Publish("t", "x", 1))
        "#,
    );
    let qos2 = s.wait("qos2");
    assert!(qos2.starts_with("qos2 24 nil"), "{qos2}");
    let big = s.wait("big");
    assert!(big.starts_with("big 25 nil"), "{big}");
    assert_eq!(s.wait("ok"), "ok 0 1");
}

#[test]
fn tls_with_a_test_ca_connects_and_bad_files_fail_at_once() {
    let Some(_) = mosquitto() else { return };
    let dir = tempfile::tempdir().unwrap();
    let certs = common::certs::generate(dir.path());
    let broker = Mosquitto::start_with(MosquittoConfig {
        listener_extra: vec![
            format!("cafile {}", certs.ca.display()),
            format!("certfile {}", certs.server_cert.display()),
            format!("keyfile {}", certs.server_key.display()),
        ],
        ..Default::default()
    });
    let s = Session::start(
        broker.port,
        &format!(
            r#"
            local good = client("good")
            say("set", good:SetTlsCertificates("{ca}"))
            good:Connect("127.0.0.1", PORT)
            local wrong = client("wrong")
            wrong:SetTlsCertificates("{other}")
            wrong:Connect("127.0.0.1", PORT)
            local code, msg = client("missing"):SetTlsCertificates("/no/such/ca.pem")
            say("missing", code, msg)
            "#,
            ca = certs.ca.display(),
            other = certs.other_ca.display()
        ),
    );
    let mut seen = HashMap::new();
    while seen.len() < 4 {
        let e = s.next();
        seen.insert(e.split(' ').next().unwrap().to_string(), e);
    }
    assert_eq!(seen["set"], "set 0");
    assert!(
        seen["good"].starts_with("good connect 0 "),
        "{}",
        seen["good"]
    );
    assert!(
        !seen["wrong"].starts_with("wrong connect 0 "),
        "{}",
        seen["wrong"]
    );
    assert!(
        seen["missing"].starts_with("missing 8 "),
        "{}",
        seen["missing"]
    );
    assert!(
        seen["missing"].contains("/no/such/ca.pem"),
        "{}",
        seen["missing"]
    );
}

/// Publishes batches and counts `OnPublish` per message id; `report()` says
/// `report accepted once twice missing`.
const COUNTING_PUBLISHER: &str = r#"
counts, accepted, done = {}, 0, 0
local c = C4:MQTT()
c:SetAutoReconnect(50, 500)
c:OnConnect(function(_, rc) say("connect", rc) end)
c:OnDisconnect(function(_, rc) say("disconnect", rc) end)
c:OnPublish(function(_, id, rc)
  counts[id] = (counts[id] or 0) + 1
  done = done + 1
  if done == accepted and finished_publishing then say("all done") end
end)
c:Connect("127.0.0.1", PORT, 5)
function publish_batch(n, qos)
  for i = 1, n do
    local code, id = c:Publish("counted/" .. qos, tostring(i), qos)
    if code == 0 then accepted = accepted + 1 end
  end
end
function finish()
  finished_publishing = true
  if done == accepted then say("all done") end
end
function report()
  local once, twice, missing = 0, 0, 0
  for id = 1, accepted do
    local n = counts[id] or 0
    if n == 1 then once = once + 1 elseif n == 0 then missing = missing + 1 else twice = twice + 1 end
  end
  say("report", accepted, once, twice, missing)
end
"#;

on_either_io_thread!(every_accepted_publish_gets_exactly_one_on_publish_across_broker_restarts);
fn every_accepted_publish_gets_exactly_one_on_publish_across_broker_restarts(io: IoThread) {
    let Some(mut broker) = mosquitto() else {
        return;
    };
    let s = Session::start_in(io, broker.port, COUNTING_PUBLISHER);
    assert_eq!(s.wait("connect"), "connect 0");
    for round in 0..3 {
        s.lua("publish_batch(700, 1) publish_batch(200, 2) say('batch')");
        s.wait("batch");
        broker.kill();
        s.wait("disconnect");
        broker.restart();
        let c = s.wait("connect 0");
        assert_eq!(c, "connect 0", "round {round}");
    }
    s.lua("finish()");
    s.wait("all done");
    s.lua("report()");
    assert_eq!(s.wait("report"), "report 2700 2700 0 0");
}

// Its readings come from a repeating timer: on the shared thread, the driver's own runtime
// keeps only timers.
on_either_io_thread!(the_example_sensor_publishes_json_state_through_the_embedded_broker);
fn the_example_sensor_publishes_json_state_through_the_embedded_broker(io: IoThread) {
    let broker = luadriver::broker::EmbeddedBroker::start("127.0.0.1:0".parse().unwrap())
        .expect("embedded broker");
    let port = broker.port().to_string();
    let package = luadriver::package::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/drivers/mqtt-sensor/driver.lua"
    )))
    .expect("example driver loads");
    let sensor = TestDriver::start_package(
        package,
        tempfile::tempdir().unwrap(),
        &[("Broker Port", &port), ("Publish Interval (ms)", "100")],
        io,
    );
    let watcher = Session::start(
        broker.port(),
        r#"local w = client("w", 5); w:OnConnect(function(o) o:Subscribe("luadriver/sensor/state", 1) end); w:Connect("127.0.0.1", PORT)"#,
    );
    watcher.wait("w subscribed");
    for _ in 0..3 {
        let msg = watcher.wait("w message luadriver/sensor/state");
        let fields: Vec<&str> = msg.split(' ').collect();
        let payload = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, fields[3])
            .expect("base64");
        let state: serde_json::Value = serde_json::from_slice(&payload).expect("JSON state");
        assert!(state["temperature"].is_number(), "{state}");
        assert!(msg.contains("CONTENT_TYPE=application/json"), "{msg}");
    }
    drop(sensor);
}

on_either_io_thread!(the_will_is_published_when_the_link_drops_without_disconnect);
fn the_will_is_published_when_the_link_drops_without_disconnect(io: IoThread) {
    let Some(broker) = mosquitto() else { return };
    let proxy = common::proxy::FaultProxy::start(broker.port);
    let s = Session::start_in(
        io,
        broker.port,
        &format!(
            r#"
            local watcher = client("watcher")
            watcher:OnConnect(function(o) o:Subscribe("wills/#", 1) end)
            watcher:Connect("127.0.0.1", PORT)
            local dying = client("dying")
            dying:SetWill("wills/dying", "gone", 1, false)
            dying:Connect("127.0.0.1", {proxy_port})
            "#,
            proxy_port = proxy.port
        ),
    );
    s.wait_all(&["watcher subscribed", "dying connect 0"]);
    proxy.cut();
    let lost = s.wait("dying disconnect");
    assert_eq!(lost, "dying disconnect 7 The connection was lost.");
    assert_eq!(
        s.wait("watcher message"),
        "watcher message wills/dying Z29uZQ== 1 false "
    );
}

#[test]
fn message_retries_give_up_with_a_failure_reason() {
    let Some(broker) = mosquitto() else { return };
    let proxy = common::proxy::FaultProxy::start(broker.port);
    let s = Session::start(
        proxy.port,
        r#"
        local c = client("c")
        c:SetMessageRetries(1)
        c:Connect("127.0.0.1", PORT)
        "#,
    );
    s.wait("c connect 0");
    // The PUBLISH vanishes on the way; after the reconnect it may not be sent again.
    proxy.blackhole(true);
    s.lua(r#"say("pub", clients.c:Publish("r/x", "once", 1))"#);
    assert_eq!(s.wait("pub"), "pub 0 1");
    // Publishes go to the worker when the callback returns: wait until it is on the wire
    // (in flight) before cutting, or the cut would come before its first send.
    let written = common::wait_until(std::time::Duration::from_secs(10), || {
        s.lua(r#"say("inflight", clients.c:GetStats().inflight)"#);
        s.wait("inflight") == "inflight 1"
    });
    assert!(written, "the PUBLISH never went out");
    proxy.cut();
    proxy.blackhole(false);
    s.wait("c disconnect 7");
    s.lua(r#"clients.c:Reconnect()"#);
    let (published, _) = s.driver.wait_for(|e| e.starts_with("c published 1 "));
    let reason: i32 = published.split(' ').nth(3).unwrap().parse().unwrap();
    assert!(reason >= 128, "{published}");
}

#[test]
fn unsubscribe_and_log_callbacks_fire() {
    let Some(broker) = mosquitto() else { return };
    let s = Session::start(
        broker.port,
        r#"
        local c = client("c")
        c:OnLog(function(_, level, line) if not logged then logged = true; say("log", type(level), type(line)) end end)
        c:OnConnect(function(o) say("sub", o:Subscribe("u/#", 0)) end)
        c:Connect("127.0.0.1", PORT)
        "#,
    );
    s.wait_all(&["sub 0 1", "c subscribed 1 0", "log number string"]);
    s.lua(r#"say("unsub", clients.c:Unsubscribe("u/#"))"#);
    assert_eq!(s.wait("unsub"), "unsub 0 2");
    assert_eq!(s.wait("c unsubscribed"), "c unsubscribed 2");
}

on_either_io_thread!(a_collected_client_object_closes_its_connection);
fn a_collected_client_object_closes_its_connection(io: IoThread) {
    let Some(broker) = mosquitto() else { return };
    let proxy = common::proxy::FaultProxy::start(broker.port);
    let s = Session::start_in(
        io,
        proxy.port,
        r#"
        do
          local temp = C4:MQTT("temporary")
          temp:OnConnect(function(_, rc) say("temp connect", rc) end)
          temp:Connect("127.0.0.1", PORT)
        end
        "#,
    );
    s.wait("temp connect 0");
    assert_eq!(proxy.connections(), 1);
    s.lua("collectgarbage('collect') collectgarbage('collect') say('collected')");
    s.wait("collected");
    assert!(
        common::wait_until(std::time::Duration::from_secs(10), || proxy.connections()
            == 0),
        "the worker of a collected object must close its connection"
    );
}

on_either_io_thread!(stopping_a_driver_closes_its_connections);
fn stopping_a_driver_closes_its_connections(io: IoThread) {
    let Some(broker) = mosquitto() else { return };
    let proxy = common::proxy::FaultProxy::start(broker.port);
    let s = Session::start_in(
        io,
        proxy.port,
        r#"local c = client("c"); c:Connect("127.0.0.1", PORT)"#,
    );
    s.wait("c connect 0");
    assert_eq!(proxy.connections(), 1);
    s.driver.stop();
    assert!(
        common::wait_until(std::time::Duration::from_secs(10), || proxy.connections()
            == 0),
        "a stopped driver's MQTT workers must close their connections"
    );
}

on_either_io_thread!(a_stopping_driver_disconnects_cleanly_so_its_will_is_not_published);
fn a_stopping_driver_disconnects_cleanly_so_its_will_is_not_published(io: IoThread) {
    let Some(broker) = mosquitto() else { return };
    let proxy = common::proxy::FaultProxy::start(broker.port);
    let watcher = Session::start_in(
        io,
        broker.port,
        r#"
        local w = client("watcher")
        w:OnConnect(function(o) o:Subscribe("wills/#", 1) end)
        w:Connect("127.0.0.1", PORT)
        "#,
    );
    watcher.wait("watcher subscribed");
    let dying = Session::start_in(
        io,
        proxy.port,
        r#"
        local d = client("dying")
        d:SetWill("wills/dying", "gone", 1, false)
        d:Connect("127.0.0.1", PORT)
        "#,
    );
    dying.wait("dying connect 0");
    // The stop must let the workers send DISCONNECT before it reports the driver stopped
    // (a dropped runtime or a closed socket alone would make the broker publish the will).
    dying.driver.stop();
    assert!(
        common::wait_until(std::time::Duration::from_secs(10), || proxy.connections()
            == 0),
        "the stopped driver's connection is still open"
    );
    // A will would have been published when the connection closed, before this marker.
    watcher.lua(r#"clients.watcher:Publish("wills/marker", "m", 1)"#);
    let first = watcher.wait("watcher message");
    assert!(
        first.starts_with("watcher message wills/marker "),
        "the will was published on a clean stop: {first}"
    );
}

#[test]
fn a_long_callback_streams_its_publishes_before_it_returns() {
    let Some(broker) = mosquitto() else { return };
    let s = Session::start(
        broker.port,
        r#"local c = client("c"); c:Connect("127.0.0.1", PORT)"#,
    );
    s.wait("c connect 0");
    // Publishes are handed over in batches, and the worker, which shares the driver's
    // thread, gets a turn at each: messages leave while the callback still runs. (On the
    // shared I/O thread the worker runs beside the callback: see the test after this one.)
    s.lua(
        r#"
        for i = 1, 1000 do clients.c:Publish("stream/x", "m", 1) end
        local stats = clients.c:GetStats()
        say("inside", stats.published > 0, stats.queued + stats.inflight + stats.acknowledged)
        "#,
    );
    assert_eq!(s.wait("inside"), "inside true 1000");
    s.wait_published_ok("c", 1000);
}

#[test]
fn on_the_shared_io_thread_a_long_callback_does_not_hold_its_connection() {
    let Some(broker) = mosquitto() else { return };
    let s = Session::start_in(
        IoThread::Shared,
        broker.port,
        r#"local c = client("c"); c:Connect("127.0.0.1", PORT)"#,
    );
    s.wait("c connect 0");
    // 256 publishes are handed over inside the callback; the callback then spins without
    // publishing. On the shared thread the worker sends them and takes their acks
    // meanwhile (on the driver's own thread, the acks would wait for the callback to end).
    s.lua(
        r#"
        for i = 1, 256 do clients.c:Publish("busy/x", "m", 1) end
        local t = os.clock()
        while clients.c:GetStats().acknowledged < 256 and os.clock() - t < 5 do end
        say("inside", clients.c:GetStats().acknowledged)
        "#,
    );
    assert_eq!(s.wait("inside"), "inside 256");
    s.wait_published_ok("c", 256);
}

#[test]
fn drivers_sharing_the_io_thread_each_get_exactly_one_on_publish_across_a_broker_restart() {
    let Some(mut broker) = mosquitto() else {
        return;
    };
    let drivers: Vec<Session> = (0..24)
        .map(|_| Session::start_in(IoThread::Shared, broker.port, COUNTING_PUBLISHER))
        .collect();
    for d in &drivers {
        assert_eq!(d.wait("connect"), "connect 0");
    }
    for d in &drivers {
        d.lua("publish_batch(300, 1) publish_batch(100, 2) say('batch')");
    }
    for d in &drivers {
        d.wait("batch");
    }
    broker.kill();
    for d in &drivers {
        d.wait("disconnect");
    }
    broker.restart();
    for d in &drivers {
        assert_eq!(d.wait("connect 0"), "connect 0");
        d.lua("publish_batch(200, 1) publish_batch(50, 2) finish()");
    }
    for d in &drivers {
        d.wait("all done");
        d.lua("report()");
        assert_eq!(d.wait("report"), "report 650 650 0 0");
    }
}

#[test]
fn a_driver_stuck_in_a_callback_gets_every_message_once_it_returns() {
    if !common::mosquitto::Mosquitto::available() {
        return;
    }
    // The broker keeps what the stuck driver's worker leaves unread.
    let broker = Mosquitto::start_with_unlimited_queues();
    const SENT: usize = 30_000;
    let stuck = Session::start_in(
        IoThread::Shared,
        broker.port,
        r#"
        distinct, seen = 0, {}
        stuck_client = C4:MQTT("stuck-" .. PORT) -- global: a collected client disconnects
        local s = stuck_client
        s:OnConnect(function(o) o:Subscribe("counted/#", 1) end)
        s:OnSubscribe(function() say("subscribed") end)
        s:OnMessage(function(_, _, _, payload)
          if not seen[payload] then seen[payload] = true; distinct = distinct + 1 end
        end)
        s:Connect("127.0.0.1", PORT)
        "#,
    );
    stuck.wait("subscribed");
    let publisher = Session::start(broker.port, COUNTING_PUBLISHER);
    assert_eq!(publisher.wait("connect"), "connect 0");
    // Stuck until the publisher is done: its worker reads on until the driver is a full
    // backlog behind, then leaves the rest at the broker.
    stuck.lua(r#"say("stuck") local t = os.clock() while os.clock() - t < 3 do end"#);
    stuck.wait("stuck");
    publisher.lua(&format!("publish_batch({SENT}, 1) finish()"));
    publisher.wait("all done");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        stuck.lua(r#"say("distinct", distinct)"#);
        let count = stuck.wait("distinct");
        if count == format!("distinct {SENT}") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{count} of {SENT} after the callback returned"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn auto_reconnect_retries_a_first_connect_that_failed() {
    let Some(broker) = mosquitto() else { return };
    let proxy = common::proxy::FaultProxy::start(broker.port);
    proxy.refuse(true);
    let s = Session::start(
        proxy.port,
        r#"
        local c = client("c")
        c:SetAutoReconnect(20, 100)
        c:Connect("127.0.0.1", PORT)
        say("queued", c:Publish("early/bird", "hello", 1))
        "#,
    );
    assert_eq!(s.wait("queued"), "queued 0 1");
    let failed = s.wait("c connect");
    assert!(!failed.starts_with("c connect 0 "), "{failed}");
    proxy.refuse(false);
    s.wait("c connect 0");
    assert_eq!(s.wait("c published"), "c published 1 0");
}

#[test]
fn connect_and_disconnect_properties_travel_and_connack_properties_come_back() {
    let Some(_) = mosquitto() else { return };
    let broker = Mosquitto::start_with(MosquittoConfig {
        extra: vec!["max_inflight_messages 20".into()],
        ..Default::default()
    });
    let s = Session::start(
        broker.port,
        r#"
        local c = C4:MQTT("props-" .. PORT)
        clients.c = c
        c:ForceMqttVersion(5)
        c:OnConnect(function(_, rc, flags, msg, props)
          say("connect", rc, props.RECEIVE_MAXIMUM, type(props.TOPIC_ALIAS_MAXIMUM))
        end)
        c:OnDisconnect(function(_, rc) say("disconnect", rc) end)
        say("connect call", c:Connect("127.0.0.1", PORT, 30, {
          SESSION_EXPIRY_INTERVAL = 60, RECEIVE_MAXIMUM = 10, MAXIMUM_PACKET_SIZE = 100000,
          REQUEST_PROBLEM_INFORMATION = 1, USER_PROPERTY = { app = "luadriver" } }))
        "#,
    );
    assert_eq!(s.wait("connect call"), "connect call 0");
    assert_eq!(s.wait("connect "), "connect 0 20 number");
    s.lua(r#"say("bye", clients.c:Disconnect({ REASON_STRING = "bye", SESSION_EXPIRY_INTERVAL = 0 }))"#);
    assert_eq!(s.wait("bye"), "bye 0");
    assert_eq!(s.wait("disconnect"), "disconnect 0");
    let log = broker.log();
    assert!(!log.contains("protocol error"), "{log}");
}

#[test]
fn a_payload_over_the_mqtt_limit_gives_9() {
    let s = Session::start(1, r#"local c = client("c")"#);
    s.lua(
        r#"
        local huge = string.rep("x", 268435456)
        say("huge", clients.c:Publish("t", huge, 1))
        huge = nil
        collectgarbage()
        "#,
    );
    assert_eq!(
        s.wait("huge"),
        "huge 9 nil Publish: payload is 268435456 bytes; MQTT allows 268435455"
    );
}

#[test]
fn mutual_tls_with_an_encrypted_key_and_insecure_for_a_wrong_host_name() {
    let Some(_) = mosquitto() else { return };
    let dir = tempfile::tempdir().unwrap();
    let certs = common::certs::generate(dir.path());
    let mtls = Mosquitto::start_with(MosquittoConfig {
        listener_extra: vec![
            format!("cafile {}", certs.ca.display()),
            format!("certfile {}", certs.server_cert.display()),
            format!("keyfile {}", certs.server_key.display()),
            "require_certificate true".into(),
        ],
        ..Default::default()
    });
    let wrong_name = Mosquitto::start_with(MosquittoConfig {
        listener_extra: vec![
            format!("certfile {}", certs.wrong_name_cert.display()),
            format!("keyfile {}", certs.wrong_name_key.display()),
        ],
        ..Default::default()
    });
    let s = Session::start(
        mtls.port,
        &format!(
            r#"
            local m = client("mtls")
            say("certs", m:SetTlsCertificates("{ca}", "{cert}", "{key_enc}", "{password}"))
            m:Connect("127.0.0.1", PORT)
            say("nopass", select(2, client("nopass"):SetTlsCertificates("{ca}", "{cert}", "{key_enc}")) ~= nil)
            local nocert = client("nocert"); nocert:SetTlsCertificates("{ca}"); nocert:Connect("127.0.0.1", PORT)
            local strict = client("strict"); strict:SetTlsCertificates("{ca}"); strict:Connect("127.0.0.1", {wrong})
            local lax = client("lax"); lax:SetTlsCertificates("{ca}"); say("insecure", lax:SetTlsInsecure(true))
            lax:Connect("127.0.0.1", {wrong})
            "#,
            ca = certs.ca.display(),
            cert = certs.client_cert.display(),
            key_enc = certs.client_key_encrypted.display(),
            password = common::certs::CLIENT_KEY_PASSWORD,
            wrong = wrong_name.port,
        ),
    );
    let mut seen = HashMap::new();
    while seen.len() < 7 {
        let e = s.next();
        seen.insert(e.split(' ').next().unwrap().to_string(), e);
    }
    assert_eq!(seen["certs"], "certs 0");
    assert_eq!(
        seen["nopass"], "nopass true",
        "an encrypted key without its password is refused at once"
    );
    assert_eq!(seen["insecure"], "insecure 0");
    assert!(
        seen["mtls"].starts_with("mtls connect 0 "),
        "{}",
        seen["mtls"]
    );
    assert!(
        !seen["nocert"].starts_with("nocert connect 0 "),
        "{}",
        seen["nocert"]
    );
    assert!(
        !seen["strict"].starts_with("strict connect 0 "),
        "{}",
        seen["strict"]
    );
    assert!(seen["lax"].starts_with("lax connect 0 "), "{}", seen["lax"]);
}
