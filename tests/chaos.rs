//! The delivery guarantee under faults, from Lua: a driver publishes 20,000 QoS 1 and
//! 5,000 QoS 2 messages while the test kills and restarts its Mosquitto three times, and
//! separately while a fault-injecting proxy cuts, resets and black-holes the link. Every
//! accepted Publish must get exactly one OnPublish. Also: a black-holed link is noticed
//! within two keep-alive periods and its in-flight messages survive for Reconnect.

#[macro_use]
mod common;

use common::drivers::{SAY, TestDriver};
use common::mosquitto::{Mosquitto, MosquittoConfig};
use common::proxy::FaultProxy;
use luadriver::driver::{DriverEvent, IoThread};
use std::time::{Duration, Instant};

const QOS1: usize = 20_000;
const QOS2: usize = 5_000;

/// The publishing driver: publishes a batch on each PUBLISH command, says how many were
/// still pending at each disconnect, and at the end reports
/// `report accepted once twice missing failed`.
const PUBLISHER: &str = r#"
local counts, accepted, done, failed = {}, 0, 0, 0
local c = C4:MQTT("chaos-pub-" .. Properties["port"])
c:SetAutoReconnect(20, 300)
c:SetMaxInflightMessages(50)
c:OnConnect(function(_, rc, _, msg) say("connect", rc) end)
c:OnDisconnect(function(_, rc) say("disconnect", rc, accepted - done) end)
c:OnPublish(function(_, id, rc)
  counts[id] = (counts[id] or 0) + 1
  if rc >= 128 then failed = failed + 1 end
  done = done + 1
  if done % 2500 == 0 then say("progress", done) end
  if done == accepted then say("complete") end
end)
function ExecuteCommand(cmd, params)
  if cmd == "PUBLISH" then
    -- Payloads are unique across batches, so the subscriber can count distinct ones.
    for _ = 1, tonumber(params.qos1) do
      sequence = (sequence or 0) + 1
      if c:Publish("chaos/1", "m" .. sequence, 1) == 0 then accepted = accepted + 1 end
    end
    for _ = 1, tonumber(params.qos2) do
      sequence = (sequence or 0) + 1
      if c:Publish("chaos/2", "m" .. sequence, 2) == 0 then accepted = accepted + 1 end
    end
    say("accepted", accepted)
  elseif cmd == "REPORT" then
    local once, twice, missing = 0, 0, 0
    for id = 1, accepted do
      local n = counts[id] or 0
      if n == 1 then once = once + 1 elseif n == 0 then missing = missing + 1 else twice = twice + 1 end
    end
    say("report", accepted, once, twice, missing, failed)
  end
end
c:Connect("127.0.0.1", tonumber(Properties["port"]), 5)
"#;

/// A QoS 1 subscriber with a persistent session, counting distinct payloads.
const SUBSCRIBER: &str = r#"
local seen, distinct = {}, 0
local s = C4:MQTT("chaos-sub-" .. Properties["port"], false)
s:SetAutoReconnect(20, 300)
s:OnConnect(function(o, rc) if rc == 0 then o:Subscribe("chaos/#", 1) end end)
s:OnSubscribe(function() say("subscribed") end)
s:OnDisconnect(function(_, rc, msg) say("subscriber lost", rc, msg) end)
s:OnLog(function(_, level, line) if level <= 2 then say("subscriber log", level, line) end end)
s:OnMessage(function(_, _, _, payload)
  if not seen[payload] then seen[payload] = true; distinct = distinct + 1 end
end)
function ExecuteCommand(cmd)
  if cmd == "COUNT" then say("distinct", distinct) end
end
s:Connect("127.0.0.1", tonumber(Properties["port"]), 30)
"#;

fn command(d: &TestDriver, name: &str, params: &[(&str, String)]) {
    d.send(DriverEvent::Command {
        command: name.into(),
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    });
}

fn wait(d: &TestDriver, prefix: &str) -> String {
    d.wait_for(|e| e.starts_with(prefix)).0
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn chaos_broker() -> Option<Mosquitto> {
    Mosquitto::available().then(|| {
        Mosquitto::start_with(MosquittoConfig {
            extra: vec![
                "max_inflight_messages 50".into(),
                "max_queued_messages 0".into(),
            ],
            ..Default::default()
        })
    })
}

/// Publishes one quarter of the messages; returns once the driver accepted them (they are
/// then queued or in flight: a fault injected right now hits them).
fn publish_batch(publisher: &TestDriver, batch: usize) {
    command(
        publisher,
        "PUBLISH",
        &[
            ("qos1", (QOS1 / 4).to_string()),
            ("qos2", (QOS2 / 4).to_string()),
        ],
    );
    let accepted = (QOS1 + QOS2) / 4 * batch;
    assert_eq!(wait(publisher, "accepted"), format!("accepted {accepted}"));
}

/// Waits for the OnDisconnect of a fault and checks it hit messages still pending.
fn lost_with_pending(publisher: &TestDriver, reason: i32) {
    // A black hole takes up to two keep-alive periods (10 s) to notice.
    let (lost, _) =
        publisher.wait_for_within(Duration::from_secs(20), |e| e.starts_with("disconnect"));
    let fields: Vec<&str> = lost.split(' ').collect();
    assert_eq!(fields[1], reason.to_string(), "{lost}");
    let pending: usize = fields[2].parse().expect("pending count");
    assert!(pending > 0, "the fault must hit messages in flight: {lost}");
}

fn final_report(publisher: &TestDriver) {
    let (_, _) = publisher.wait_for(|e| e == "complete");
    command(publisher, "REPORT", &[]);
    let total = QOS1 + QOS2;
    assert_eq!(
        wait(publisher, "report"),
        format!("report {total} {total} 0 0 0"),
        "accepted, exactly once, twice or more, missing, failed"
    );
}

on_either_io_thread!(exactly_one_on_publish_each_while_the_broker_is_killed_three_times);
fn exactly_one_on_publish_each_while_the_broker_is_killed_three_times(io: IoThread) {
    let Some(mut broker) = chaos_broker() else {
        return;
    };
    let rss_before = rss_kib();
    let port = broker.port.to_string();
    let publisher =
        TestDriver::start_placed(&format!("{SAY}\n{PUBLISHER}"), &[], &[("port", &port)], io);
    assert_eq!(wait(&publisher, "connect"), "connect 0");
    for batch in 1..=3 {
        publish_batch(&publisher, batch);
        broker.kill();
        lost_with_pending(&publisher, 7);
        broker.restart();
        assert_eq!(wait(&publisher, "connect 0"), "connect 0");
    }
    publish_batch(&publisher, 4);
    final_report(&publisher);
    drop(publisher);
    let grown_mib = rss_kib().saturating_sub(rss_before) / 1024;
    assert!(grown_mib < 256, "RSS grew by {grown_mib} MiB");
}

on_either_io_thread!(
    exactly_one_on_publish_each_and_every_ack_delivered_through_cuts_resets_and_a_black_hole
);
fn exactly_one_on_publish_each_and_every_ack_delivered_through_cuts_resets_and_a_black_hole(
    io: IoThread,
) {
    let Some(broker) = chaos_broker() else { return };
    let proxy = FaultProxy::start(broker.port);
    let subscriber = TestDriver::start_with(
        &format!("{SAY}\n{SUBSCRIBER}"),
        &[],
        &[("port", &broker.port.to_string())],
    );
    wait(&subscriber, "subscribed");
    let publisher = TestDriver::start_placed(
        &format!("{SAY}\n{PUBLISHER}"),
        &[],
        &[("port", &proxy.port.to_string())],
        io,
    );
    assert_eq!(wait(&publisher, "connect"), "connect 0");

    publish_batch(&publisher, 1);
    proxy.cut();
    lost_with_pending(&publisher, 7);
    assert_eq!(wait(&publisher, "connect 0"), "connect 0");

    publish_batch(&publisher, 2);
    proxy.reset();
    lost_with_pending(&publisher, 7);
    assert_eq!(wait(&publisher, "connect 0"), "connect 0");

    publish_batch(&publisher, 3);
    proxy.blackhole(true);
    let started = Instant::now();
    lost_with_pending(&publisher, 141);
    assert!(
        started.elapsed() < Duration::from_millis(10_500),
        "a dead link with keep-alive 5 s must be noticed within 10 s, took {:?}",
        started.elapsed()
    );
    proxy.blackhole(false);
    proxy.cut(); // the black-holed socket itself
    assert_eq!(wait(&publisher, "connect 0"), "connect 0");

    publish_batch(&publisher, 4);
    final_report(&publisher);
    // Every acknowledged message reached the QoS 1 subscriber at least once.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        command(&subscriber, "COUNT", &[]);
        let count: usize = wait(&subscriber, "distinct")
            .split(' ')
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("a count");
        if count == QOS1 + QOS2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the subscriber has {count} of {} distinct messages; broker log tail:\n{}",
            QOS1 + QOS2,
            broker
                .log()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_black_holed_link_is_noticed_within_two_keepalives_and_in_flight_messages_survive() {
    let Some(broker) = chaos_broker() else { return };
    let proxy = FaultProxy::start(broker.port);
    let source = r#"
                local c = C4:MQTT("keepalive-" .. Properties["port"])
        c:OnConnect(function(_, rc) say("connect", rc) end)
        c:OnDisconnect(function(_, rc, msg) say("disconnect", rc, msg) end)
        c:OnPublish(function(_, id, rc) say("published", id, rc) end)
        function ExecuteCommand(cmd)
          if cmd == "PUBLISH" then
            for i = 1, 5 do c:Publish("ka/x", tostring(i), 1) end
            say("inflight", c:GetStats().inflight + c:GetStats().queued)
          elseif cmd == "RECONNECT" then
            say("reconnect", c:Reconnect())
          end
        end
        c:Connect("127.0.0.1", tonumber(Properties["port"]), 5)
    "#;
    let d = TestDriver::start_with(
        &format!("{SAY}\n{source}"),
        &[],
        &[("port", &proxy.port.to_string())],
    );
    assert_eq!(wait(&d, "connect"), "connect 0");
    proxy.blackhole(true);
    command(&d, "PUBLISH", &[]);
    assert_eq!(wait(&d, "inflight"), "inflight 5");
    // The five PUBLISHes were the last packets sent: from them, two keep-alive periods.
    let started = Instant::now();
    let (lost, between) =
        d.wait_for_within(Duration::from_secs(20), |e| e.starts_with("disconnect"));
    let took = started.elapsed();
    assert_eq!(lost, "disconnect 141 Keep Alive timeout");
    assert!(
        took <= Duration::from_millis(10_300),
        "noticed after {took:?}"
    );
    assert!(
        between.is_empty(),
        "no OnPublish before the link was given up: {between:?}"
    );
    proxy.blackhole(false);
    command(&d, "RECONNECT", &[]);
    assert_eq!(wait(&d, "reconnect"), "reconnect 0");
    assert_eq!(wait(&d, "connect"), "connect 0");
    let mut ids: Vec<String> = (0..5).map(|_| wait(&d, "published")).collect();
    ids.sort();
    assert_eq!(
        ids,
        (1..=5)
            .map(|i| format!("published {i} 0"))
            .collect::<Vec<_>>()
    );
    // Exactly one OnDisconnect for the dead link, and nothing more after the five.
    assert!(d.next_within(Duration::from_millis(300)).is_none());
}
