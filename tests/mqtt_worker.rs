//! The MQTT worker against real Mosquitto brokers on ephemeral ports: connecting,
//! publishing at every QoS, properties, retained messages, the in-flight window, bad
//! credentials, and the delivery guarantee across a broker killed mid-stream.

mod common;

use bytes::Bytes;
use common::mosquitto::{Mosquitto, MosquittoConfig};
use crossbeam_channel::{Receiver, unbounded};
use luadriver::mqtt::{
    ConnectOptions, EventBacklog, MqttCommand, MqttEvent, MqttHandle, MsgId, Props,
    ProtocolVersion, PublishRequest, Secret, spawn_client,
};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

struct Client {
    handle: MqttHandle,
    events: Receiver<MqttEvent>,
    next_id: MsgId,
}

impl Client {
    fn new() -> Client {
        Self::with_backlog(EventBacklog::unlimited())
    }

    /// A client whose events count in `backlog`; the test plays the driver loop.
    fn with_backlog(backlog: Arc<EventBacklog>) -> Client {
        let (tx, events) = unbounded();
        let handle = spawn_client(
            runtime().handle(),
            &tokio_util::task::TaskTracker::new(),
            Arc::new(move |event| tx.send(event).is_ok()),
            backlog,
        );
        Client {
            handle,
            events,
            next_id: 0,
        }
    }

    fn send(&self, cmd: MqttCommand) {
        assert!(self.handle.send(cmd), "worker is gone");
    }

    fn connect(&self, opts: ConnectOptions) -> MqttEvent {
        self.send(MqttCommand::Connect(Box::new(opts)));
        self.wait_for("Connected", |e| matches!(e, MqttEvent::Connected { .. }))
    }

    fn connect_ok(&self, opts: ConnectOptions) {
        match self.connect(opts) {
            MqttEvent::Connected { reason: 0, .. } => {}
            other => panic!("expected a successful connect, got {other:?}"),
        }
    }

    fn publish(&mut self, topic: &str, payload: impl Into<Bytes>, qos: u8, props: Props) -> MsgId {
        self.publish_retained(topic, payload, qos, false, props)
    }

    fn publish_retained(
        &mut self,
        topic: &str,
        payload: impl Into<Bytes>,
        qos: u8,
        retain: bool,
        props: Props,
    ) -> MsgId {
        self.next_id += 1;
        self.send(MqttCommand::Publish(PublishRequest {
            msg_id: self.next_id,
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain,
            props,
        }));
        self.next_id
    }

    fn subscribe(&mut self, filter: &str, qos: u8) {
        self.next_id += 1;
        let id = self.next_id;
        self.send(MqttCommand::Subscribe {
            msg_id: id,
            filter: filter.into(),
            qos,
            props: Props::default(),
        });
        match self.wait_for("Subscribed", |e| matches!(e, MqttEvent::Subscribed { .. })) {
            MqttEvent::Subscribed {
                msg_id, granted, ..
            } => {
                assert_eq!((msg_id, granted), (id, vec![qos]));
            }
            _ => unreachable!(),
        }
    }

    /// The next event that `wanted` accepts, skipping logs and others, within [`WAIT`].
    fn wait_for(&self, what: &str, wanted: impl Fn(&MqttEvent) -> bool) -> MqttEvent {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) if wanted(&event) => return event,
                Ok(_) => {}
                Err(_) => panic!("no {what} event within {WAIT:?}"),
            }
        }
    }

    /// Collects `Published` events until `ids` all have one; fails on any duplicate.
    fn collect_published(&self, ids: &[MsgId], within: Duration) -> HashMap<MsgId, i32> {
        let mut seen = HashMap::new();
        let deadline = Instant::now() + within;
        while seen.len() < ids.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(MqttEvent::Published { msg_id, reason, .. }) => {
                    assert!(
                        seen.insert(msg_id, reason).is_none(),
                        "message {msg_id} reported twice"
                    );
                }
                Ok(_) => {}
                Err(_) => panic!(
                    "only {} of {} publishes completed; status: queued {} inflight {}",
                    seen.len(),
                    ids.len(),
                    self.handle.status.queued.load(Ordering::Relaxed),
                    self.handle.status.inflight.load(Ordering::Relaxed),
                ),
            }
        }
        for id in ids {
            assert!(seen.contains_key(id), "message {id} never completed");
        }
        seen
    }
}

fn options(port: u16, version: ProtocolVersion, client_id: &str) -> ConnectOptions {
    ConnectOptions {
        host: "127.0.0.1".into(),
        port,
        keepalive: Duration::from_secs(30),
        client_id: client_id.into(),
        clean_session: true,
        version,
        username: None,
        password: None,
        will: None,
        tls: None,
        props: Props::default(),
        max_inflight: 20,
        max_sends: None,
        auto_reconnect: None,
    }
}

fn broker() -> Option<Mosquitto> {
    if !Mosquitto::available() {
        eprintln!("skipped: mosquitto not on PATH");
        return None;
    }
    Some(Mosquitto::start())
}

const VERSIONS: [ProtocolVersion; 2] = [ProtocolVersion::V311, ProtocolVersion::V5];

#[test]
fn a_client_connects_and_a_disconnect_is_reported_with_reason_0() {
    let Some(broker) = broker() else { return };
    for version in VERSIONS {
        let client = Client::new();
        client.connect_ok(options(broker.port, version, "connect-ok"));
        assert!(client.handle.status.is_connected());
        client.send(MqttCommand::Disconnect {
            props: Props::default(),
        });
        match client.wait_for("Disconnected", |e| {
            matches!(e, MqttEvent::Disconnected { .. })
        }) {
            MqttEvent::Disconnected { reason, .. } => assert_eq!(reason, 0),
            _ => unreachable!(),
        }
        assert!(!client.handle.status.is_connected());
    }
}

#[test]
fn a_closed_port_fails_the_attempt_with_a_message_naming_it() {
    let port = common::free_port();
    let client = Client::new();
    match client.connect(options(port, ProtocolVersion::V311, "refused")) {
        MqttEvent::Connected {
            reason, message, ..
        } => {
            assert_eq!(reason, 136);
            assert!(
                message.contains(&format!("connect to 127.0.0.1:{port}"))
                    && message.contains("refused"),
                "{message}"
            );
        }
        _ => unreachable!(),
    }
    // A failed attempt is never also a disconnect.
    let extra = client.events.recv_timeout(Duration::from_millis(200));
    assert!(
        !matches!(extra, Ok(MqttEvent::Disconnected { .. })),
        "{extra:?}"
    );
}

#[test]
fn qos_0_1_and_2_each_complete_once_and_reach_a_subscriber_intact() {
    let Some(broker) = broker() else { return };
    for version in VERSIONS {
        let mut subscriber = Client::new();
        subscriber.connect_ok(options(broker.port, version, "sub-binary"));
        subscriber.subscribe("bin/#", 2);

        let mut publisher = Client::new();
        publisher.connect_ok(options(broker.port, version, "pub-binary"));
        let payload = Bytes::from_static(b"\x00\x01\xfe\xff not utf-8 \xc3");
        let ids: Vec<MsgId> = (0..=2)
            .map(|qos| {
                publisher.publish(
                    &format!("bin/{qos}"),
                    payload.clone(),
                    qos,
                    Props::default(),
                )
            })
            .collect();
        let done = publisher.collect_published(&ids, WAIT);
        assert!(done.values().all(|&r| r == 0), "{done:?}");

        let mut received = HashMap::new();
        while received.len() < 3 {
            if let MqttEvent::Message {
                topic,
                payload: got,
                qos,
                ..
            } = subscriber.wait_for("Message", |e| matches!(e, MqttEvent::Message { .. }))
            {
                assert_eq!(got, payload);
                assert!(received.insert(topic, qos).is_none(), "delivered twice");
            }
        }
        assert_eq!(received["bin/0"], 0);
        assert_eq!(received["bin/1"], 1);
        assert_eq!(received["bin/2"], 2);
        let status = &publisher.handle.status;
        assert_eq!(status.published.load(Ordering::Relaxed), 3);
        assert_eq!(status.acknowledged.load(Ordering::Relaxed), 2);
    }
}

#[test]
fn a_qos_0_publish_while_not_connected_is_reported_not_sent() {
    let mut client = Client::new();
    let id = client.publish("t", "x", 0, Props::default());
    match client.wait_for("Published", |e| matches!(e, MqttEvent::Published { .. })) {
        MqttEvent::Published {
            msg_id,
            reason,
            message,
            ..
        } => {
            assert_eq!((msg_id, reason), (id, 128));
            assert!(message.contains("not sent"), "{message}");
        }
        _ => unreachable!(),
    }
}

#[test]
fn mqtt5_properties_travel_from_publisher_to_subscriber() {
    let Some(broker) = broker() else { return };
    let mut subscriber = Client::new();
    subscriber.connect_ok(options(broker.port, ProtocolVersion::V5, "sub-props"));
    subscriber.subscribe("props/t", 1);
    let mut publisher = Client::new();
    publisher.connect_ok(options(broker.port, ProtocolVersion::V5, "pub-props"));
    let props = Props {
        content_type: Some("application/json".into()),
        correlation_data: Some(Bytes::from_static(b"\x00corr\xff")),
        response_topic: Some("props/reply".into()),
        user_properties: vec![("k".into(), "1".into()), ("k".into(), "2".into())],
        ..Props::default()
    };
    let id = publisher.publish("props/t", "{}", 1, props.clone());
    publisher.collect_published(&[id], WAIT);
    match subscriber.wait_for("Message", |e| matches!(e, MqttEvent::Message { .. })) {
        MqttEvent::Message { props: got, .. } => {
            assert_eq!(got.content_type, props.content_type);
            assert_eq!(got.correlation_data, props.correlation_data);
            assert_eq!(got.response_topic, props.response_topic);
            assert_eq!(got.user_properties, props.user_properties);
        }
        _ => unreachable!(),
    }
}

#[test]
fn a_retained_message_is_kept_and_an_empty_retained_payload_deletes_it() {
    let Some(broker) = broker() else { return };
    let mut publisher = Client::new();
    publisher.connect_ok(options(broker.port, ProtocolVersion::V311, "pub-retain"));
    let id = publisher.publish_retained("retained/t", "kept", 1, true, Props::default());
    publisher.collect_published(&[id], WAIT);

    let mut late = Client::new();
    late.connect_ok(options(broker.port, ProtocolVersion::V311, "late-1"));
    late.subscribe("retained/t", 1);
    match late.wait_for("Message", |e| matches!(e, MqttEvent::Message { .. })) {
        MqttEvent::Message {
            payload, retain, ..
        } => {
            assert_eq!(payload, Bytes::from_static(b"kept"));
            assert!(retain);
        }
        _ => unreachable!(),
    }

    let id = publisher.publish_retained("retained/t", Bytes::new(), 1, true, Props::default());
    publisher.collect_published(&[id], WAIT);
    let mut later = Client::new();
    later.connect_ok(options(broker.port, ProtocolVersion::V311, "late-2"));
    later.subscribe("retained/t", 1);
    // A marker published after the subscribe arrives after any retained message would.
    let marker = publisher.publish("retained/t", "marker", 1, Props::default());
    publisher.collect_published(&[marker], WAIT);
    match later.wait_for("Message", |e| matches!(e, MqttEvent::Message { .. })) {
        MqttEvent::Message {
            payload, retain, ..
        } => {
            assert_eq!(
                payload,
                Bytes::from_static(b"marker"),
                "retained was deleted"
            );
            assert!(!retain);
        }
        _ => unreachable!(),
    }
}

#[test]
fn the_inflight_window_is_never_exceeded() {
    let Some(broker) = broker() else { return };
    let mut client = Client::new();
    let mut opts = options(broker.port, ProtocolVersion::V5, "window");
    opts.max_inflight = 5;
    client.connect_ok(opts);
    let status = client.handle.status.clone();
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (status, watching) = (status.clone(), watching.clone());
        std::thread::spawn(move || {
            let mut max = 0;
            while watching.load(Ordering::Relaxed) {
                max = max.max(status.inflight.load(Ordering::Relaxed));
            }
            max
        })
    };
    let ids: Vec<MsgId> = (0..2000)
        .map(|i| client.publish("window/t", "x", 1 + (i % 2) as u8, Props::default()))
        .collect();
    client.collect_published(&ids, WAIT);
    watching.store(false, Ordering::Relaxed);
    let max = watcher.join().unwrap();
    assert!(max <= 5, "inflight reached {max}");
    assert!(max >= 1, "the watcher never saw anything in flight");
    assert_eq!(status.queued.load(Ordering::Relaxed), 0);
}

fn broker_with_password() -> Option<(Mosquitto, tempfile::TempDir)> {
    if !Mosquitto::available() {
        eprintln!("skipped: mosquitto not on PATH");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwords");
    let status = std::process::Command::new("mosquitto_passwd")
        .arg("-b")
        .arg("-c")
        .arg(&file)
        .args(["driver", "right"])
        .status()
        .expect("mosquitto_passwd");
    assert!(status.success());
    // Mosquitto started as root reads its files as the `mosquitto` user.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let broker = Mosquitto::start_with(MosquittoConfig {
        extra: vec![format!("password_file {}", file.display())],
        deny_anonymous: true,
        ..MosquittoConfig::default()
    });
    Some((broker, dir))
}

#[test]
fn wrong_credentials_are_refused_with_the_brokers_reason() {
    let Some((broker, _dir)) = broker_with_password() else {
        return;
    };
    for version in VERSIONS {
        let client = Client::new();
        let mut opts = options(broker.port, version, "creds");
        opts.username = Some("driver".into());
        opts.password = Some(Secret("wrong".into()));
        let reason = match client.connect(opts.clone()) {
            MqttEvent::Connected {
                reason, message, ..
            } => {
                assert!(!message.contains("wrong"), "password leaked: {message}");
                reason
            }
            _ => unreachable!(),
        };
        // Mosquitto 2.0.11 answers "not authorized" (5 → 135 on 3.1.1, 135 on MQTT 5)
        // where a broker may also say "bad user name or password" (134).
        assert!(reason == 134 || reason == 135, "{version:?}: {reason}");
        opts.password = Some(Secret("right".into()));
        client.connect_ok(opts);
    }
}

/// Waits for an event `wanted` accepts, recording every `Published` on the way (a
/// second report for one message fails the test).
fn record_until(
    client: &Client,
    seen: &mut HashMap<MsgId, i32>,
    wanted: impl Fn(&MqttEvent) -> bool,
) -> MqttEvent {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = client
            .events
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no awaited event within {WAIT:?}"));
        if let MqttEvent::Published { msg_id, reason, .. } = &event {
            assert!(
                seen.insert(*msg_id, *reason).is_none(),
                "message {msg_id} reported twice"
            );
        }
        if wanted(&event) {
            return event;
        }
    }
}

/// Publishes 2,000 QoS 1 and 500 QoS 2 messages while the broker is killed mid-stream and
/// restarted; `recover` brings the client back. Every message must complete exactly once,
/// successfully.
fn survive_a_broker_kill(version: ProtocolVersion, auto: bool) {
    let Some(mut broker) = broker() else { return };
    let mut client = Client::new();
    let mut opts = options(
        broker.port,
        version,
        if auto { "kill-auto" } else { "kill-manual" },
    );
    opts.keepalive = Duration::from_secs(5);
    if auto {
        opts.auto_reconnect = Some((Duration::from_millis(20), Duration::from_millis(200)));
    }
    client.connect_ok(opts);

    let publish_batch = |client: &mut Client, n: usize| -> Vec<MsgId> {
        (0..n)
            .map(|i| {
                let qos = if i % 5 == 4 { 2 } else { 1 };
                client.publish("guarantee/t", format!("m{i}"), qos, Props::default())
            })
            .collect()
    };
    let mut ids = publish_batch(&mut client, 1250);
    let mut seen: HashMap<MsgId, i32> = HashMap::new();
    // Wait until the stream is flowing, then pull the plug.
    while seen.len() < 100 {
        record_until(&client, &mut seen, |e| {
            matches!(e, MqttEvent::Published { .. })
        });
    }
    broker.kill();
    let status = client.handle.status.clone();
    match record_until(&client, &mut seen, |e| {
        matches!(e, MqttEvent::Disconnected { .. })
    }) {
        MqttEvent::Disconnected { reason, .. } => assert_eq!(reason, 7),
        _ => unreachable!(),
    }
    let pending = status.queued.load(Ordering::Relaxed) + status.inflight.load(Ordering::Relaxed);
    assert!(
        pending > 0,
        "everything completed before the kill; the test proved nothing"
    );

    // More messages while down: queued, in order, behind the ones in flight.
    ids.extend(publish_batch(&mut client, 1250));
    broker.restart();
    if !auto {
        client.send(MqttCommand::Reconnect);
    }
    loop {
        match record_until(&client, &mut seen, |e| {
            matches!(e, MqttEvent::Connected { .. })
        }) {
            MqttEvent::Connected { reason: 0, .. } => break,
            MqttEvent::Connected { reason, .. } if auto => assert_eq!(reason, 136),
            other => panic!("reconnect failed: {other:?}"),
        }
    }
    let rest: Vec<MsgId> = ids
        .iter()
        .copied()
        .filter(|id| !seen.contains_key(id))
        .collect();
    let done = client.collect_published(&rest, Duration::from_secs(30));
    for (id, reason) in done {
        assert!(
            seen.insert(id, reason).is_none(),
            "message {id} reported twice"
        );
    }
    assert_eq!(seen.len(), 2500);
    assert!(
        seen.values().all(|&r| r == 0 || r == 16),
        "a message failed: {:?}",
        seen.values()
            .filter(|&&r| r != 0 && r != 16)
            .collect::<Vec<_>>()
    );
    // Nothing more may follow.
    let extra = client.events.recv_timeout(Duration::from_millis(300));
    assert!(
        !matches!(extra, Ok(MqttEvent::Published { .. })),
        "{extra:?}"
    );
    assert_eq!(status.queued.load(Ordering::Relaxed), 0);
    assert_eq!(status.inflight.load(Ordering::Relaxed), 0);
}

#[test]
fn no_message_is_lost_or_doubled_across_a_broker_kill_and_reconnect() {
    survive_a_broker_kill(ProtocolVersion::V311, false);
}

#[test]
fn no_message_is_lost_or_doubled_across_a_broker_kill_with_mqtt5() {
    survive_a_broker_kill(ProtocolVersion::V5, false);
}

#[test]
fn auto_reconnect_recovers_from_a_broker_kill_without_losing_messages() {
    survive_a_broker_kill(ProtocolVersion::V311, true);
}

type Session = Box<dyn FnOnce(std::net::TcpStream) + Send>;

/// A fake broker on an ephemeral port that accepts one connection per entry of
/// `sessions`, answers its CONNECT with a CONNACK (MQTT 5 form when `v5`), and then runs
/// the entry on the socket. For behaviour Mosquitto will not show: silence, hanging up on
/// a PUBLISH, a DISCONNECT with a reason.
fn fake_broker(v5: bool, sessions: Vec<Session>) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for session in sessions {
            let (mut socket, _) = listener.accept().unwrap();
            let mut connect = [0u8; 512];
            let _ = socket.read(&mut connect).unwrap();
            let connack: &[u8] = if v5 {
                &[0x20, 0x03, 0x00, 0x00, 0x00]
            } else {
                &[0x20, 0x02, 0x00, 0x00]
            };
            socket.write_all(connack).unwrap();
            session(socket);
        }
    });
    port
}

/// Reads and ignores everything until the peer goes away: a black hole.
fn swallow(mut socket: std::net::TcpStream) {
    use std::io::Read;
    let mut sink = [0u8; 4096];
    while matches!(socket.read(&mut sink), Ok(n) if n > 0) {}
}

#[test]
fn a_silent_broker_is_noticed_within_two_keepalives() {
    let port = fake_broker(false, vec![Box::new(swallow)]);
    let client = Client::new();
    let mut opts = options(port, ProtocolVersion::V311, "keepalive");
    opts.keepalive = Duration::from_secs(1);
    client.connect_ok(opts);
    let connected_at = Instant::now();
    match client.wait_for("Disconnected", |e| {
        matches!(e, MqttEvent::Disconnected { .. })
    }) {
        MqttEvent::Disconnected { reason, .. } => assert_eq!(reason, 141),
        _ => unreachable!(),
    }
    let took = connected_at.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(2800),
        "{took:?}"
    );
}

#[test]
fn a_message_that_used_up_its_sends_fails_once_on_reconnect() {
    // First connection: take the PUBLISH, never acknowledge it, hang up.
    fn hang_up_after_publish(mut socket: std::net::TcpStream) {
        use std::io::Read;
        let mut publish = [0u8; 512];
        let _ = socket.read(&mut publish);
    }
    let port = fake_broker(
        false,
        vec![Box::new(hang_up_after_publish), Box::new(swallow)],
    );
    let mut client = Client::new();
    let mut opts = options(port, ProtocolVersion::V311, "retries");
    opts.max_sends = Some(1);
    client.connect_ok(opts);
    let id = client.publish("t", "once", 1, Props::default());
    match client.wait_for("Disconnected", |e| {
        matches!(e, MqttEvent::Disconnected { .. })
    }) {
        MqttEvent::Disconnected { reason, .. } => assert_eq!(reason, 7),
        _ => unreachable!(),
    }
    client.send(MqttCommand::Reconnect);
    client.wait_for("Connected", |e| {
        matches!(e, MqttEvent::Connected { reason: 0, .. })
    });
    match client.wait_for("Published", |e| matches!(e, MqttEvent::Published { .. })) {
        MqttEvent::Published {
            msg_id,
            reason,
            message,
            ..
        } => {
            assert_eq!((msg_id, reason), (id, 128));
            assert!(message.contains("given up after 1 send"), "{message}");
        }
        _ => unreachable!(),
    }
    assert_eq!(client.handle.status.failed.load(Ordering::Relaxed), 1);
}

#[test]
fn a_broker_disconnect_reports_its_reason_and_reason_string() {
    let port = fake_broker(
        true,
        vec![Box::new(|mut socket| {
            use std::io::Write;
            let mut disconnect = vec![0xE0, 10, 0x8B, 8, 0x1F, 0, 5];
            disconnect.extend_from_slice(b"maint");
            socket.write_all(&disconnect).unwrap();
        })],
    );
    let client = Client::new();
    client.connect_ok(options(port, ProtocolVersion::V5, "told-to-go"));
    match client.wait_for("Disconnected", |e| {
        matches!(e, MqttEvent::Disconnected { .. })
    }) {
        MqttEvent::Disconnected {
            reason,
            message,
            props,
        } => {
            assert_eq!(reason, 139);
            assert!(message.contains("Server shutting down"), "{message}");
            assert_eq!(props.reason_string.as_deref(), Some("maint"));
        }
        _ => unreachable!(),
    }
    // Exactly one Disconnected for the connection, though the socket also closed.
    let extra = client.events.recv_timeout(Duration::from_millis(200));
    assert!(
        !matches!(extra, Ok(MqttEvent::Disconnected { .. })),
        "{extra:?}"
    );
}

#[test]
fn subscribe_and_unsubscribe_complete_and_a_subscribe_while_down_is_only_logged() {
    let Some(broker) = broker() else { return };
    let mut client = Client::new();
    client.next_id = 41;
    client.send(MqttCommand::Subscribe {
        msg_id: 42,
        filter: "a/#".into(),
        qos: 1,
        props: Props::default(),
    });
    match client.wait_for("Log", |e| matches!(e, MqttEvent::Log { .. })) {
        MqttEvent::Log { level, line } => {
            assert_eq!(level, 2);
            assert!(line.contains("Subscribe 42 not sent"), "{line}");
        }
        _ => unreachable!(),
    }
    client.connect_ok(options(broker.port, ProtocolVersion::V5, "sub-unsub"));
    client.next_id = 42;
    client.subscribe("a/#", 1);
    client.send(MqttCommand::Unsubscribe {
        msg_id: 44,
        filter: "a/#".into(),
        props: Props::default(),
    });
    match client.wait_for("Unsubscribed", |e| {
        matches!(e, MqttEvent::Unsubscribed { .. })
    }) {
        MqttEvent::Unsubscribed { msg_id, .. } => assert_eq!(msg_id, 44),
        _ => unreachable!(),
    }
}

#[test]
fn dropping_the_last_handle_disconnects_cleanly() {
    let (bytes_tx, bytes_rx) = unbounded();
    let port = fake_broker(
        false,
        vec![Box::new(move |mut socket| {
            use std::io::Read;
            let mut received = Vec::new();
            let _ = socket.read_to_end(&mut received);
            let _ = bytes_tx.send(received);
        })],
    );
    let mut client = Client::new();
    client.connect_ok(options(port, ProtocolVersion::V311, "drop-me"));
    let status = client.handle.status.clone();
    client.publish("last/words", "bye", 1, Props::default());
    drop(client);
    let received = bytes_rx.recv_timeout(WAIT).expect("the socket was closed");
    assert!(
        received.windows(3).any(|w| w == b"bye"),
        "what was sent before the drop goes out first: {received:x?}"
    );
    assert!(received.ends_with(&[0xE0, 0x00]), "{received:x?}");
    assert!(!status.is_connected());
}

#[test]
fn a_worker_stops_reading_while_its_driver_is_behind_and_loses_nothing() {
    if !Mosquitto::available() {
        return;
    }
    // The broker keeps what the paused subscriber does not read.
    let broker = Mosquitto::start_with_unlimited_queues();
    const LIMIT: usize = 100;
    const SENT: usize = 2_000;
    let backlog = EventBacklog::new(LIMIT);
    let mut subscriber = Client::with_backlog(Arc::clone(&backlog));
    subscriber.connect_ok(options(broker.port, ProtocolVersion::V5, "sub-behind"));
    subscriber.subscribe("behind/#", 1);
    // The Connected and Subscribed events were "dispatched" by the test.
    while !backlog.is_empty() {
        backlog.taken();
    }

    let mut publisher = Client::new();
    publisher.connect_ok(options(broker.port, ProtocolVersion::V5, "pub-behind"));
    // 1 KB each: one read of the subscriber takes at most 64 of them.
    let ids: Vec<MsgId> = (0..SENT)
        .map(|i| {
            let payload = format!("{i:>1024}");
            publisher.publish("behind/x", payload, 1, Props::default())
        })
        .collect();
    publisher.collect_published(&ids, Duration::from_secs(30));

    // Not dispatching anything: the worker must stop near the limit.
    let mut seen = std::collections::HashSet::new();
    let take = |seen: &mut std::collections::HashSet<Bytes>, event: MqttEvent| {
        if let MqttEvent::Message { payload, .. } = event {
            assert!(seen.insert(payload), "a message was delivered twice");
        }
    };
    while let Ok(event) = subscriber.events.recv_timeout(Duration::from_millis(500)) {
        take(&mut seen, event);
    }
    let held = backlog.len();
    assert!(
        (LIMIT..LIMIT + 200).contains(&held),
        "{held} events handed over while the driver dispatched none (limit {LIMIT})"
    );
    // Dispatching them lets the worker read on, until every message has come, once.
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < SENT {
        while !backlog.is_empty() {
            backlog.taken();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match subscriber.events.recv_timeout(left) {
            Ok(event) => take(&mut seen, event),
            Err(_) => panic!(
                "{} of {SENT} messages after the driver caught up",
                seen.len()
            ),
        }
    }
}

#[test]
fn a_paused_worker_keeps_its_link_alive_past_two_keepalives() {
    if !Mosquitto::available() {
        return;
    }
    let broker = Mosquitto::start_with_unlimited_queues();
    let backlog = EventBacklog::new(10);
    let mut subscriber = Client::with_backlog(Arc::clone(&backlog));
    let mut opts = options(broker.port, ProtocolVersion::V311, "sub-paused");
    opts.keepalive = Duration::from_secs(5);
    subscriber.connect_ok(opts);
    subscriber.subscribe("paused/#", 1);
    while !backlog.is_empty() {
        backlog.taken();
    }
    let mut publisher = Client::new();
    publisher.connect_ok(options(broker.port, ProtocolVersion::V311, "pub-paused"));
    let ids: Vec<MsgId> = (0..100)
        .map(|i| publisher.publish("paused/x", format!("{i:>1024}"), 1, Props::default()))
        .collect();
    publisher.collect_published(&ids, WAIT);
    // Paused for longer than the broker's 1.5 and our 2 keep-alive periods: neither side
    // may give up on the link (PINGRESPs wait in the socket with everything else).
    let paused_until = Instant::now() + Duration::from_secs(12);
    let mut messages = 0;
    while let Ok(event) = subscriber
        .events
        .recv_timeout(paused_until.saturating_duration_since(Instant::now()))
    {
        match event {
            MqttEvent::Message { .. } => messages += 1,
            MqttEvent::Disconnected { .. } => panic!("link dropped while paused: {event:?}"),
            _ => {}
        }
    }
    assert!(messages < 100, "the worker read on while full");
    let deadline = Instant::now() + WAIT;
    while messages < 100 {
        while !backlog.is_empty() {
            backlog.taken();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match subscriber.events.recv_timeout(left) {
            Ok(MqttEvent::Message { .. }) => messages += 1,
            Ok(event @ MqttEvent::Disconnected { .. }) => panic!("link dropped: {event:?}"),
            Ok(_) => {}
            Err(_) => panic!("{messages} of 100 messages after the driver caught up"),
        }
    }
}
