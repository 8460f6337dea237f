//! `C4:MQTT` against a broker that lies: a scripted fake broker on an ephemeral port takes
//! the client's CONNECT, answers (or not), then sends what no honest broker would —
//! malformed lengths, reserved packet types, stray acknowledgements, impossible QoS,
//! wildcard topics, oversized packets, duplicate CONNACKs, floods, resets.
//!
//! For each case the driver must see the failure exactly once — `OnConnect` with a non-zero
//! code when the attempt failed, `OnDisconnect` when an established link ended — or see
//! nothing when the input is harmless; it must keep answering commands; and a QoS 1 message
//! the liar never acknowledged must still reach a real Mosquitto after `Reconnect` (the fake
//! broker relays the next connection to one). Also: the packet decoder never panics on
//! random bytes.

mod common;

use common::drivers::TestDriver;
use common::mosquitto::Mosquitto;
use luadriver::driver::DriverEvent;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

// ---- the fake broker ----

/// What the fake broker does with one accepted connection, given the CONNECT it read.
type Script = Box<dyn FnOnce(TcpStream, Vec<u8>) + Send>;

/// Accepts one connection per script, in order, on 127.0.0.1:`port`.
struct FakeBroker {
    port: u16,
}

impl FakeBroker {
    fn start(scripts: Vec<Script>) -> FakeBroker {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake broker");
        let port = listener.local_addr().expect("fake broker address").port();
        std::thread::spawn(move || {
            for script in scripts {
                let Ok((mut socket, _)) = listener.accept() else {
                    return;
                };
                // Nothing here may wait forever: a test that failed leaves threads behind.
                let _ = socket.set_read_timeout(Some(Duration::from_secs(30)));
                let Some((header, body)) = read_packet(&mut socket) else {
                    continue;
                };
                assert_eq!(header >> 4, 1, "the client's first packet is not CONNECT");
                let mut connect = vec![header];
                put_varint(&mut connect, body.len());
                connect.extend_from_slice(&body);
                std::thread::spawn(move || script(socket, connect));
            }
        });
        FakeBroker { port }
    }
}

/// One MQTT packet from `socket`: its first byte and body. `None` on EOF or error.
fn read_packet(socket: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut byte = [0u8; 1];
    socket.read_exact(&mut byte).ok()?;
    let header = byte[0];
    let mut len = 0usize;
    for shift in [0, 7, 14, 21] {
        socket.read_exact(&mut byte).ok()?;
        len |= ((byte[0] & 0x7F) as usize) << shift;
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    socket.read_exact(&mut body).ok()?;
    Some((header, body))
}

/// Reads packets until one of type `kind` (4 bits) comes; returns its body.
fn read_until(socket: &mut TcpStream, kind: u8) -> Option<Vec<u8>> {
    loop {
        let (header, body) = read_packet(socket)?;
        if header >> 4 == kind {
            return Some(body);
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            return;
        }
    }
}

/// The CONNECT's protocol level: 4 = MQTT 3.1.1, 5 = MQTT 5.
fn protocol_level(connect: &[u8]) -> u8 {
    let mut i = 1;
    while connect[i] & 0x80 != 0 {
        i += 1;
    }
    // Remaining length, then the protocol name "MQTT" (2 + 4 bytes), then the level.
    connect[i + 1 + 6]
}

/// A successful CONNACK in the form the client's protocol level expects.
fn connack_for(connect: &[u8]) -> Vec<u8> {
    if protocol_level(connect) == 5 {
        vec![0x20, 0x03, 0x00, 0x00, 0x00]
    } else {
        vec![0x20, 0x02, 0x00, 0x00]
    }
}

/// A PUBLISH at QoS 0 for the client's protocol level.
fn publish_qos0(v5: bool, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    let mut packet = vec![0x30];
    put_varint(&mut packet, body.len());
    packet.extend_from_slice(&body);
    packet
}

/// Reads and ignores everything until the client goes away.
fn swallow(mut socket: TcpStream) {
    let mut sink = [0u8; 4096];
    while matches!(socket.read(&mut sink), Ok(n) if n > 0) {}
}

/// Closes with RST instead of FIN (SO_LINGER 0), as a crashed host or a middlebox does.
fn reset(socket: TcpStream) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime for SO_LINGER");
    runtime.block_on(async move {
        socket.set_nonblocking(true).expect("non-blocking");
        let socket = tokio::net::TcpStream::from_std(socket).expect("tokio socket");
        #[allow(deprecated)]
        socket
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER 0");
        drop(socket);
    });
}

/// Splices the connection to a real broker on `upstream`, replaying the CONNECT.
fn relay(upstream: u16) -> Script {
    Box::new(move |client, connect| {
        let mut broker = TcpStream::connect(("127.0.0.1", upstream)).expect("reach mosquitto");
        broker.write_all(&connect).expect("replay CONNECT");
        let mut to_client = client.try_clone().expect("clone");
        let mut from_broker = broker.try_clone().expect("clone");
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from_broker, &mut to_client);
            let _ = to_client.shutdown(std::net::Shutdown::Both);
        });
        let mut from_client = client;
        let _ = from_client.set_read_timeout(None);
        let _ = std::io::copy(&mut from_client, &mut broker);
        let _ = broker.shutdown(std::net::Shutdown::Both);
    })
}

/// A script that answers CONNECT normally, waits for the client's first PUBLISH (the QoS 1
/// message the test sends, never acknowledged), then runs `then`.
fn after_publish(then: impl FnOnce(TcpStream, bool) + Send + 'static) -> Script {
    Box::new(move |mut socket, connect| {
        let v5 = protocol_level(&connect) == 5;
        socket.write_all(&connack_for(&connect)).expect("CONNACK");
        if read_until(&mut socket, 3).is_some() {
            then(socket, v5);
        }
    })
}

/// A script that writes `bytes`, then lets the client decide (reads until it hangs up).
fn send_then_listen(bytes: Vec<u8>) -> impl FnOnce(TcpStream, bool) + Send + 'static {
    move |mut socket, _| {
        let _ = socket.write_all(&bytes);
        swallow(socket);
    }
}

// ---- the driver side ----

const HARNESS: &str = r#"
PORT = tonumber(Properties["port"])
c = C4:MQTT("hostile-" .. tostring(PORT))
if Properties["version"] ~= "" then c:ForceMqttVersion(tonumber(Properties["version"])) end
c:OnConnect(function(_, rc, flags, msg) say("connect", rc, flags, msg) end)
c:OnDisconnect(function(_, rc, msg) say("disconnect", rc, msg) end)
c:OnPublish(function(_, id, rc, msg) say("published", id, rc) end)
c:OnMessage(function(_, id, topic, payload, qos) say("message", topic, payload, qos) end)
function ExecuteCommand(cmd, params)
  if cmd == "LUA" then assert(loadstring(params.code))() end
end
"#;

struct Session {
    driver: TestDriver,
    /// Every event seen so far, for the exactly-once checks.
    seen: Vec<String>,
    marks: u32,
}

impl Session {
    fn start(port: u16, version: &str) -> Session {
        let driver = TestDriver::start_with(
            &format!("{}\n{HARNESS}", common::drivers::SAY),
            &[],
            &[("port", &port.to_string()), ("version", version)],
        );
        Session {
            driver,
            seen: Vec::new(),
            marks: 0,
        }
    }

    fn lua(&self, code: &str) {
        self.driver.send(DriverEvent::Command {
            command: "LUA".into(),
            params: vec![("code".into(), code.into())],
        });
    }

    /// The next event starting with `prefix`, remembering everything passed over.
    fn wait(&mut self, prefix: &str) -> String {
        let (event, skipped) = self.driver.wait_for(|e| e.starts_with(prefix));
        self.seen.extend(skipped);
        self.seen.push(event.clone());
        event
    }

    /// Proves the driver still answers commands: runs a snippet and waits for its answer,
    /// which must come within `within`.
    fn still_answers(&mut self, within: Duration) {
        self.marks += 1;
        let mark = format!("mark {}", self.marks);
        let started = Instant::now();
        self.lua(&format!("say('{mark}')"));
        self.wait(&mark);
        assert!(
            started.elapsed() < within,
            "the driver took {:?} to answer a command",
            started.elapsed()
        );
    }

    fn count(&self, prefix: &str) -> usize {
        self.seen.iter().filter(|e| e.starts_with(prefix)).count()
    }

    /// Publishes the QoS 1 message the liar will never acknowledge; it is message id 1.
    fn publish_kept(&mut self) {
        self.lua(r#"say("id", select(2, c:Publish("hostile/kept", "kept", 1)))"#);
        assert_eq!(self.wait("id"), "id 1");
    }

    /// `Reconnect` (the fake broker relays it to Mosquitto): the kept message is delivered
    /// and acknowledged exactly once, and every callback count adds up.
    fn reconnect_delivers_the_kept_message(&mut self, connects_before: usize) {
        self.lua("c:Reconnect()");
        assert_eq!(self.wait("connect"), "connect 0 0 Success");
        // 16 "No matching subscribers" (MQTT 5) is a success too.
        let published = self.wait("published 1");
        assert!(
            published == "published 1 0" || published == "published 1 16",
            "{published}"
        );
        self.still_answers(Duration::from_secs(2));
        assert_eq!(self.count("published"), 1, "{:#?}", self.seen);
        assert_eq!(
            self.count("connect"),
            connects_before + 1,
            "{:#?}",
            self.seen
        );
    }
}

fn mosquitto() -> Option<Mosquitto> {
    Mosquitto::available().then(Mosquitto::start)
}

/// Case on an established link that the client must end: the hostile bytes come after the
/// CONNACK and the client's PUBLISH. Returns the one `disconnect` event.
fn established_link_dropped(
    version: &str,
    hostile: impl FnOnce(TcpStream, bool) + Send + 'static,
) -> String {
    let Some(broker) = mosquitto() else {
        return String::new();
    };
    let fake = FakeBroker::start(vec![after_publish(hostile), relay(broker.port)]);
    let mut s = Session::start(fake.port, version);
    s.lua("c:Connect('127.0.0.1', PORT)");
    assert_eq!(s.wait("connect"), "connect 0 0 Success");
    s.publish_kept();
    let disconnect = s.wait("disconnect");
    s.still_answers(Duration::from_secs(2));
    s.reconnect_delivers_the_kept_message(1);
    assert_eq!(s.count("disconnect"), 1, "{:#?}", s.seen);
    disconnect
}

/// Case on an established link that the client must survive: after the hostile bytes the
/// fake broker sends a QoS 0 message on `probe/alive`, which must arrive with no
/// `disconnect` before it. The script gets the socket to write whatever it wants first.
fn established_link_survives(
    version: &str,
    hostile: impl FnOnce(&mut TcpStream, bool) + Send + 'static,
) -> Vec<String> {
    let Some(broker) = mosquitto() else {
        return Vec::new();
    };
    let fake = FakeBroker::start(vec![
        after_publish(move |mut socket, v5| {
            hostile(&mut socket, v5);
            let _ = socket.write_all(&publish_qos0(v5, "probe/alive", b"yes"));
            swallow(socket);
        }),
        relay(broker.port),
    ]);
    let mut s = Session::start(fake.port, version);
    s.lua("c:Connect('127.0.0.1', PORT)");
    assert_eq!(s.wait("connect"), "connect 0 0 Success");
    s.publish_kept();
    assert_eq!(s.wait("message probe/alive"), "message probe/alive yes 0");
    assert_eq!(s.count("disconnect"), 0, "{:#?}", s.seen);
    s.lua("say('stats connected', c:GetStats().connected)");
    assert_eq!(s.wait("stats"), "stats connected true");
    // A clean Disconnect keeps the unacknowledged message for the next connection.
    s.lua("c:Disconnect()");
    assert_eq!(
        s.wait("disconnect"),
        "disconnect 0 Disconnected on request."
    );
    s.reconnect_delivers_the_kept_message(1);
    assert_eq!(s.count("disconnect"), 1, "{:#?}", s.seen);
    s.seen
}

/// Case before the CONNACK: the attempt must fail through `OnConnect` alone, a QoS 1
/// message published meanwhile stays queued and reaches Mosquitto after `Reconnect`.
/// Returns the failed `connect` event.
fn attempt_fails(version: &str, script: Script) -> String {
    let Some(broker) = mosquitto() else {
        return String::new();
    };
    let fake = FakeBroker::start(vec![script, relay(broker.port)]);
    let mut s = Session::start(fake.port, version);
    s.lua("c:Connect('127.0.0.1', PORT)");
    s.publish_kept();
    let failed = s.wait("connect");
    s.still_answers(Duration::from_secs(2));
    s.reconnect_delivers_the_kept_message(1);
    assert_eq!(s.count("disconnect"), 0, "{:#?}", s.seen);
    failed
}

/// Writes `bytes` in place of a CONNACK, then holds the connection open.
fn instead_of_connack(bytes: Vec<u8>) -> Script {
    Box::new(move |mut socket, _| {
        let _ = socket.write_all(&bytes);
        swallow(socket);
    })
}

const VERSIONS: [&str; 2] = ["311", "5"];

// ---- before the CONNACK ----

#[test]
fn a_connack_that_never_comes_fails_the_attempt_within_the_connect_timeout() {
    let Some(broker) = mosquitto() else { return };
    let fake = FakeBroker::start(vec![
        Box::new(|socket, _| swallow(socket)),
        relay(broker.port),
    ]);
    let mut s = Session::start(fake.port, "311");
    let started = Instant::now();
    s.lua("c:Connect('127.0.0.1', PORT)");
    s.publish_kept();
    // While the attempt hangs, the driver keeps answering.
    s.still_answers(Duration::from_secs(1));
    // The connect timeout is 10 s; the driver's own waits are 10 s too, so wait here.
    let failed = loop {
        let event = s
            .driver
            .next_within(Duration::from_secs(15))
            .expect("no OnConnect within 15 s of a Connect to a silent broker");
        s.seen.push(event.clone());
        if event.starts_with("connect") {
            break event;
        }
    };
    let took = started.elapsed();
    assert!(
        failed.starts_with("connect 136 0 ")
            && failed.contains("timed out after 10 s waiting for the CONNACK"),
        "{failed}"
    );
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(13),
        "{took:?}"
    );
    s.still_answers(Duration::from_secs(2));
    s.reconnect_delivers_the_kept_message(1);
    assert_eq!(s.count("disconnect"), 0, "{:#?}", s.seen);
}

#[test]
fn a_short_connack_body_is_a_malformed_packet() {
    for version in VERSIONS {
        // Remaining length 1: the return code is missing.
        let failed = attempt_fails(version, instead_of_connack(vec![0x20, 0x01, 0x00]));
        if failed.is_empty() {
            return;
        }
        assert!(
            failed.starts_with("connect 129 0 malformed CONNACK"),
            "{version}: {failed}"
        );
    }
}

#[test]
fn a_connack_with_an_unknown_return_code_is_a_malformed_packet() {
    let failed = attempt_fails("311", instead_of_connack(vec![0x20, 0x02, 0x00, 0x09]));
    if failed.is_empty() {
        return;
    }
    assert!(
        failed.starts_with("connect 129 0 malformed CONNACK"),
        "{failed}"
    );
}

#[test]
fn a_connack_with_garbage_properties_is_a_malformed_packet() {
    // Property length 5, then an unknown property id 0x7F.
    let failed = attempt_fails(
        "5",
        instead_of_connack(vec![0x20, 0x08, 0x00, 0x00, 0x05, 0x7F, 1, 2, 3, 4]),
    );
    if failed.is_empty() {
        return;
    }
    assert!(
        failed.starts_with("connect 129 0 malformed CONNACK"),
        "{failed}"
    );
}

#[test]
fn a_connack_cut_short_by_eof_fails_the_attempt() {
    for version in VERSIONS {
        let failed = attempt_fails(
            version,
            Box::new(|mut socket, _| {
                let _ = socket.write_all(&[0x20, 0x02, 0x00]);
            }),
        );
        if failed.is_empty() {
            return;
        }
        assert!(
            failed.starts_with("connect 136 0 ")
                && failed.contains("closed the connection before CONNACK"),
            "{version}: {failed}"
        );
    }
}

#[test]
fn a_bad_remaining_length_instead_of_a_connack_is_a_malformed_packet() {
    for version in VERSIONS {
        let failed = attempt_fails(
            version,
            instead_of_connack(vec![0x20, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
        );
        if failed.is_empty() {
            return;
        }
        assert!(
            failed.starts_with("connect 129 0 malformed CONNACK"),
            "{version}: {failed}"
        );
    }
}

#[test]
fn a_publish_before_the_connack_is_a_protocol_error() {
    let failed = attempt_fails(
        "311",
        instead_of_connack(publish_qos0(false, "early", b"x")),
    );
    if failed.is_empty() {
        return;
    }
    assert!(
        failed.starts_with("connect 130 0 ") && failed.contains("PUBLISH before CONNACK"),
        "{failed}"
    );
}

#[test]
fn a_reset_before_the_connack_fails_the_attempt() {
    let failed = attempt_fails("311", Box::new(|socket, _| reset(socket)));
    if failed.is_empty() {
        return;
    }
    assert!(failed.starts_with("connect 136 0 "), "{failed}");
}

// ---- on an established link: dropped ----

#[test]
fn a_remaining_length_of_five_bytes_drops_the_link() {
    for version in VERSIONS {
        let d = established_link_dropped(
            version,
            send_then_listen(vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
        );
        assert_eq!(
            d, "disconnect 129 Malformed Packet: undecodable packet: malformed remaining length",
            "{version}"
        );
    }
}

#[test]
fn a_length_larger_than_the_data_then_eof_drops_the_link() {
    for version in VERSIONS {
        let d = established_link_dropped(version, |mut socket, _| {
            let _ = socket.write_all(&[0x30, 0x7F, 0x00, 0x01, b'a']);
        });
        assert_eq!(d, "disconnect 7 The connection was lost.", "{version}");
    }
}

#[test]
fn reserved_packet_types_drop_the_link() {
    for version in VERSIONS {
        for packet in [vec![0x00, 0x00], vec![0xF0, 0x00]] {
            let d = established_link_dropped(version, send_then_listen(packet.clone()));
            assert!(
                d.starts_with("disconnect 129 Malformed Packet: "),
                "{version} {packet:02x?}: {d}"
            );
        }
    }
}

#[test]
fn a_publish_with_qos_3_drops_the_link() {
    for version in VERSIONS {
        let d = established_link_dropped(version, |mut socket, v5| {
            let mut packet = publish_qos0(v5, "t", b"x");
            packet[0] |= 0b0110;
            let _ = socket.write_all(&packet);
            swallow(socket);
        });
        // The two codecs word it "Invalid QoS level: 3" and "Invalid QoS level = 3".
        assert!(
            d.starts_with("disconnect 129 Malformed Packet: undecodable packet: Invalid QoS level")
                && d.ends_with('3'),
            "{version}: {d}"
        );
    }
}

#[test]
fn a_publish_with_a_wildcard_topic_drops_the_link() {
    for version in VERSIONS {
        for topic in ["a/+", "#", "a/#"] {
            let d = established_link_dropped(version, move |mut socket, v5| {
                let _ = socket.write_all(&publish_qos0(v5, topic, b"x"));
                swallow(socket);
            });
            assert_eq!(
                d,
                format!(
                    "disconnect 130 Protocol Error: the broker sent PUBLISH with invalid topic name {topic:?}"
                ),
                "{version}"
            );
        }
    }
}

#[test]
fn an_empty_topic_or_an_unknown_topic_alias_drops_the_link() {
    let d = established_link_dropped("311", |mut socket, _| {
        let _ = socket.write_all(&publish_qos0(false, "", b"x"));
        swallow(socket);
    });
    assert_eq!(
        d,
        "disconnect 130 Protocol Error: the broker sent PUBLISH with invalid topic name \"\""
    );
    let d = established_link_dropped("5", |mut socket, _| {
        // Empty topic, properties: Topic Alias (0x23) = 5, never defined; payload "x".
        let _ = socket.write_all(&[0x30, 0x07, 0x00, 0x00, 0x03, 0x23, 0x00, 0x05, b'x']);
        swallow(socket);
    });
    assert_eq!(
        d,
        "disconnect 130 Protocol Error: the broker sent PUBLISH with unknown topic alias 5"
    );
}

#[test]
fn a_disconnect_with_garbage_properties_drops_the_link_as_malformed() {
    // Reason 0x8E, property length 5, but only one byte follows.
    let d = established_link_dropped("5", send_then_listen(vec![0xE0, 0x03, 0x8E, 0x05, 0x7F]));
    assert!(d.starts_with("disconnect 129 Malformed Packet: "), "{d}");
}

#[test]
fn a_second_connack_drops_the_link() {
    for version in VERSIONS {
        let d = established_link_dropped(version, |mut socket, v5| {
            let connack: &[u8] = if v5 {
                &[0x20, 3, 0, 0, 0]
            } else {
                &[0x20, 2, 0, 0]
            };
            let _ = socket.write_all(connack);
            swallow(socket);
        });
        assert_eq!(
            d, "disconnect 130 Protocol Error: the broker sent CONNACK",
            "{version}"
        );
    }
}

#[test]
fn a_packet_over_the_advertised_maximum_packet_size_drops_the_link() {
    let Some(broker) = mosquitto() else { return };
    let fake = FakeBroker::start(vec![
        after_publish(|mut socket, v5| {
            // 1,024 bytes in all is allowed; 1,025 is one too many.
            let _ = socket.write_all(&publish_qos0(v5, "fits", &vec![b'x'; 1014]));
            let _ = socket.write_all(&publish_qos0(v5, "big", &vec![b'x'; 1016]));
            swallow(socket);
        }),
        relay(broker.port),
    ]);
    let mut s = Session::start(fake.port, "5");
    s.lua("c:Connect('127.0.0.1', PORT, 60, { MAXIMUM_PACKET_SIZE = 1024 })");
    assert_eq!(s.wait("connect"), "connect 0 0 Success");
    s.publish_kept();
    assert!(s.wait("message fits").starts_with("message fits xxx"));
    assert_eq!(
        s.wait("disconnect"),
        "disconnect 149 Packet too large: undecodable packet: \
         a packet of 1025 bytes exceeds the maximum packet size of 1024 bytes"
    );
    s.still_answers(Duration::from_secs(2));
    s.reconnect_delivers_the_kept_message(1);
}

#[test]
fn a_huge_remaining_length_then_eof_drops_the_link() {
    // 268,435,455: the largest length MQTT can express; then a few bytes and EOF.
    let d = established_link_dropped("311", |mut socket, _| {
        let _ = socket.write_all(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F, 0x00, 0x01, b'a']);
    });
    assert_eq!(d, "disconnect 7 The connection was lost.");
}

#[test]
fn bytes_then_a_reset_drop_the_link() {
    for version in VERSIONS {
        let d = established_link_dropped(version, |mut socket, _| {
            let _ = socket.write_all(&[0x30, 0x10, 0x00]);
            reset(socket);
        });
        assert_eq!(d, "disconnect 7 The connection was lost.", "{version}");
    }
}

// ---- on an established link: survived ----

#[test]
fn stray_acknowledgements_for_unused_packet_ids_are_answered_or_ignored() {
    for version in VERSIONS {
        let (answers_tx, answers_rx) = mpsc::channel();
        let seen = established_link_survives(version, move |socket, v5| {
            // The kept message has packet id 1; these use ids never sent.
            let mut bytes = Vec::new();
            for kind in [0x40u8, 0x50, 0x70] {
                bytes.extend_from_slice(&[kind, 0x02, 0x30, 0x39]);
            }
            bytes.extend_from_slice(&[0x62, 0x02, 0x30, 0x3A]);
            let _ = socket.write_all(&bytes);
            // PUBREC and PUBREL still get their next step (146 on MQTT 5: not found), so
            // the broker can let go of the id; PUBACK and PUBCOMP need no answer.
            let pubrel = read_until(socket, 6);
            let pubcomp = read_until(socket, 7);
            let _ = answers_tx.send((v5, pubrel, pubcomp));
        });
        if seen.is_empty() {
            return;
        }
        let (v5, pubrel, pubcomp) = answers_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("answers");
        let pubrel = pubrel.expect("a PUBREL for the stray PUBREC");
        let pubcomp = pubcomp.expect("a PUBCOMP for the stray PUBREL");
        if v5 {
            // Packet id, 146 "Packet Identifier not found", maybe an empty property list.
            assert_eq!(pubrel[..3], [0x30, 0x39, 146], "{version}");
            assert_eq!(pubcomp[..3], [0x30, 0x3A, 146], "{version}");
        } else {
            assert_eq!(pubrel, vec![0x30, 0x39], "{version}");
            assert_eq!(pubcomp, vec![0x30, 0x3A], "{version}");
        }
    }
}

#[test]
fn a_pingresp_flood_is_harmless_and_the_driver_keeps_answering() {
    for version in VERSIONS {
        let seen = established_link_survives(version, |socket, _| {
            let flood = [0xD0u8, 0x00].repeat(100_000);
            let _ = socket.write_all(&flood);
        });
        if seen.is_empty() {
            return;
        }
    }
}

// ---- the decoder ----

#[test]
fn the_decoder_never_panics_on_random_bytes() {
    use luadriver::mqtt::ProtocolVersion;
    use luadriver::mqtt::wire::decode;
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let started = Instant::now();
    let mut decoded = 0usize;
    for round in 0..200_000u32 {
        let len = rng.gen_range(0..64);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
        // Most rounds start with a plausible fixed header, so the decoder gets past it.
        if round % 4 != 0 && len >= 2 {
            bytes[1] = (len - 2) as u8 & 0x7F;
        }
        for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
            let mut buf = bytes::BytesMut::from(&bytes[..]);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut n = 0;
                while let Ok(Some(_)) = decode(version, &mut buf, 1 << 20) {
                    n += 1;
                }
                n
            }));
            match result {
                Ok(n) => decoded += n,
                Err(_) => panic!("decode({version:?}) panicked on {bytes:02x?}"),
            }
        }
    }
    assert!(
        decoded > 0,
        "nothing decoded: the generator is too random to test anything"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn disconnect_abandons_an_attempt_waiting_for_a_silent_broker() {
    // A broker that accepts TCP and never answers the CONNECT.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (accepted_tx, accepted) = mpsc::channel();
    let closed = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        accepted_tx.send(()).unwrap();
        let mut buf = [0u8; 256];
        // Returns when the client closes the socket.
        while socket.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
        Instant::now()
    });
    let d = TestDriver::start_with(
        &format!(
            "{}\n{}",
            common::drivers::SAY,
            r#"
            local c = C4:MQTT("abandon")
            c:OnConnect(function(_, rc) say("connect", rc) end)
            c:Connect("127.0.0.1", tonumber(Properties["port"]))
            function ExecuteCommand() say("disconnect", c:Disconnect()) end
            "#
        ),
        &[],
        &[("port", &port.to_string())],
    );
    accepted
        .recv_timeout(Duration::from_secs(10))
        .expect("the client connects");
    let asked = Instant::now();
    d.send(DriverEvent::Command {
        command: "x".into(),
        params: vec![],
    });
    assert!(d.next().starts_with("disconnect 4"));
    let closed = closed.join().unwrap();
    assert!(
        closed.duration_since(asked) < Duration::from_secs(3),
        "the attempt must be abandoned at once, not after the CONNACK timeout"
    );
    assert!(
        d.next_within(Duration::from_millis(200)).is_none(),
        "no OnConnect for an abandoned attempt"
    );
}
