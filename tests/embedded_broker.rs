//! The embedded broker (rumqttd behind one port) with real rumqttc clients of both protocol
//! levels: delivery at each QoS, retained messages, last will, both versions on one port,
//! keep-alive 0, and what rumqttd's MQTT 5 support lacks (documented in `src/broker.rs`).

use bytes::{Bytes, BytesMut};
use luadriver::broker::EmbeddedBroker;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio::task::JoinHandle;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched for; only used for negative assertions.
const QUIET: Duration = Duration::from_millis(400);

fn broker() -> EmbeddedBroker {
    EmbeddedBroker::start("127.0.0.1:0".parse().unwrap()).expect("embedded broker starts")
}

/// MQTT 3.1.1 through rumqttc's `AsyncClient`, its event loop polled by a task.
mod v4 {
    use super::*;
    pub use rumqttc::{
        AsyncClient, ConnectReturnCode, Event, LastWill, MqttOptions, Packet, Publish, QoS,
    };

    pub struct Client {
        pub client: AsyncClient,
        pub events: UnboundedReceiver<Event>,
        poller: JoinHandle<()>,
    }

    impl Client {
        pub async fn connect(port: u16, id: &str) -> Client {
            Self::connect_with(MqttOptions::new(id, "127.0.0.1", port)).await
        }

        pub async fn connect_with(options: MqttOptions) -> Client {
            let (client, mut eventloop) = AsyncClient::new(options, 100);
            let (tx, events) = unbounded_channel();
            let poller = tokio::spawn(async move {
                while let Ok(event) = eventloop.poll().await {
                    if tx.send(event).is_err() {
                        break;
                    }
                }
            });
            let mut c = Client {
                client,
                events,
                poller,
            };
            let code = c
                .expect(|p| match p {
                    Packet::ConnAck(ack) => Some(ack.code),
                    _ => None,
                })
                .await;
            assert_eq!(code, ConnectReturnCode::Success);
            c
        }

        /// The first incoming packet `pick` accepts, within [`WAIT`].
        pub async fn expect<T>(&mut self, pick: impl FnMut(&Packet) -> Option<T>) -> T {
            self.within(WAIT, pick)
                .await
                .expect("the expected packet did not arrive")
        }

        pub async fn within<T>(
            &mut self,
            limit: Duration,
            mut pick: impl FnMut(&Packet) -> Option<T>,
        ) -> Option<T> {
            let events = &mut self.events;
            timeout(limit, async {
                loop {
                    match events.recv().await {
                        Some(Event::Incoming(packet)) => {
                            if let Some(found) = pick(&packet) {
                                return Some(found);
                            }
                        }
                        Some(Event::Outgoing(_)) => {}
                        None => return None,
                    }
                }
            })
            .await
            .ok()
            .flatten()
        }

        pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
            self.client.subscribe(filter, qos).await.unwrap();
            self.expect(|p| matches!(p, Packet::SubAck(_)).then_some(()))
                .await;
        }

        pub async fn next_publish(&mut self) -> Publish {
            self.expect(|p| match p {
                Packet::Publish(publish) => Some(publish.clone()),
                _ => None,
            })
            .await
        }

        /// Closes the socket without a DISCONNECT packet, as a crash would.
        pub fn vanish(self) {
            self.poller.abort();
        }
    }
}

/// MQTT 5 through `rumqttc::v5::AsyncClient`.
mod v5 {
    use super::*;
    pub use rumqttc::v5::mqttbytes::QoS;
    pub use rumqttc::v5::mqttbytes::v5::{
        ConnAck, ConnectReturnCode, Filter, LastWill, Packet, Publish, PublishProperties,
        RetainForwardRule, SubscribeProperties,
    };
    pub use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    pub struct Client {
        pub client: AsyncClient,
        pub events: UnboundedReceiver<Event>,
        pub connack: ConnAck,
        poller: JoinHandle<()>,
    }

    impl Client {
        pub async fn connect(port: u16, id: &str) -> Client {
            Self::connect_with(MqttOptions::new(id, "127.0.0.1", port)).await
        }

        pub async fn connect_with(options: MqttOptions) -> Client {
            let (client, mut eventloop) = AsyncClient::new(options, 100);
            let (tx, mut events) = unbounded_channel();
            let poller = tokio::spawn(async move {
                while let Ok(event) = eventloop.poll().await {
                    if tx.send(event).is_err() {
                        break;
                    }
                }
            });
            let connack = timeout(WAIT, async {
                loop {
                    if let Some(Event::Incoming(Packet::ConnAck(ack))) = events.recv().await {
                        return ack;
                    }
                }
            })
            .await
            .expect("a CONNACK");
            assert_eq!(connack.code, ConnectReturnCode::Success);
            Client {
                client,
                events,
                connack,
                poller,
            }
        }

        pub async fn expect<T>(&mut self, pick: impl FnMut(&Packet) -> Option<T>) -> T {
            self.within(WAIT, pick)
                .await
                .expect("the expected packet did not arrive")
        }

        pub async fn within<T>(
            &mut self,
            limit: Duration,
            mut pick: impl FnMut(&Packet) -> Option<T>,
        ) -> Option<T> {
            let events = &mut self.events;
            timeout(limit, async {
                loop {
                    match events.recv().await {
                        Some(Event::Incoming(packet)) => {
                            if let Some(found) = pick(&packet) {
                                return Some(found);
                            }
                        }
                        Some(Event::Outgoing(_)) => {}
                        None => return None,
                    }
                }
            })
            .await
            .ok()
            .flatten()
        }

        pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
            self.client.subscribe(filter, qos).await.unwrap();
            self.expect(|p| matches!(p, Packet::SubAck(_)).then_some(()))
                .await;
        }

        pub async fn next_publish(&mut self) -> Publish {
            self.expect(|p| match p {
                Packet::Publish(publish) => Some(publish.clone()),
                _ => None,
            })
            .await
        }

        pub fn vanish(self) {
            self.poller.abort();
        }
    }
}

#[tokio::test]
async fn mqtt_311_delivers_at_qos_0_1_and_2_with_the_acks() {
    let broker = broker();
    let mut sub = v4::Client::connect(broker.port(), "v4-sub").await;
    // One filter per QoS, so the delivered QoS (the lower of publish and subscription)
    // is the publish QoS on any broker; see rumqttd_v5_gaps for why that matters.
    sub.subscribe("q/0", v4::QoS::AtMostOnce).await;
    sub.subscribe("q/1", v4::QoS::AtLeastOnce).await;
    sub.subscribe("q/2", v4::QoS::ExactlyOnce).await;
    let mut publisher = v4::Client::connect(broker.port(), "v4-pub").await;

    for (qos, topic) in [
        (v4::QoS::AtMostOnce, "q/0"),
        (v4::QoS::AtLeastOnce, "q/1"),
        (v4::QoS::ExactlyOnce, "q/2"),
    ] {
        let payload = format!("payload for {topic}");
        publisher
            .client
            .publish(topic, qos, false, payload.clone())
            .await
            .unwrap();
        match qos {
            v4::QoS::AtLeastOnce => {
                publisher
                    .expect(|p| matches!(p, v4::Packet::PubAck(_)).then_some(()))
                    .await
            }
            v4::QoS::ExactlyOnce => {
                publisher
                    .expect(|p| matches!(p, v4::Packet::PubRec(_)).then_some(()))
                    .await;
                publisher
                    .expect(|p| matches!(p, v4::Packet::PubComp(_)).then_some(()))
                    .await
            }
            v4::QoS::AtMostOnce => {}
        }
        let got = sub.next_publish().await;
        assert_eq!(got.topic, topic);
        assert_eq!(got.payload, Bytes::from(payload));
        assert_eq!(got.qos, qos);
    }
}

#[tokio::test]
async fn mqtt_5_delivers_at_qos_0_1_and_2_with_the_acks() {
    let broker = broker();
    let mut sub = v5::Client::connect(broker.port(), "v5-sub").await;
    sub.subscribe("q/0", v5::QoS::AtMostOnce).await;
    sub.subscribe("q/1", v5::QoS::AtLeastOnce).await;
    sub.subscribe("q/2", v5::QoS::ExactlyOnce).await;
    let mut publisher = v5::Client::connect(broker.port(), "v5-pub").await;

    for (qos, topic) in [
        (v5::QoS::AtMostOnce, "q/0"),
        (v5::QoS::AtLeastOnce, "q/1"),
        (v5::QoS::ExactlyOnce, "q/2"),
    ] {
        let payload = format!("payload for {topic}");
        publisher
            .client
            .publish(topic, qos, false, payload.clone())
            .await
            .unwrap();
        match qos {
            v5::QoS::AtLeastOnce => {
                publisher
                    .expect(|p| matches!(p, v5::Packet::PubAck(..)).then_some(()))
                    .await
            }
            v5::QoS::ExactlyOnce => {
                publisher
                    .expect(|p| matches!(p, v5::Packet::PubComp(..)).then_some(()))
                    .await
            }
            v5::QoS::AtMostOnce => {}
        }
        let got = sub.next_publish().await;
        assert_eq!(got.topic, topic.as_bytes());
        assert_eq!(got.payload, Bytes::from(payload));
        assert_eq!(got.qos, qos);
    }
}

#[tokio::test]
async fn both_protocol_versions_share_the_one_port() {
    let broker = broker();
    let mut sub4 = v4::Client::connect(broker.port(), "mixed-v4").await;
    sub4.subscribe("mixed/#", v4::QoS::AtLeastOnce).await;
    let mut sub5 = v5::Client::connect(broker.port(), "mixed-v5").await;
    sub5.subscribe("mixed/#", v5::QoS::AtLeastOnce).await;

    sub4.client
        .publish(
            "mixed/from-v4",
            v4::QoS::AtLeastOnce,
            false,
            "hello from 3.1.1",
        )
        .await
        .unwrap();
    let got = sub5.next_publish().await;
    assert_eq!(got.topic, &b"mixed/from-v4"[..]);
    assert_eq!(got.payload, &b"hello from 3.1.1"[..]);
    assert_eq!(sub4.next_publish().await.topic, "mixed/from-v4");

    sub5.client
        .publish("mixed/from-v5", v5::QoS::AtLeastOnce, false, "hello from 5")
        .await
        .unwrap();
    let got = sub4.next_publish().await;
    assert_eq!(got.topic, "mixed/from-v5");
    assert_eq!(got.payload, &b"hello from 5"[..]);
    assert_eq!(sub5.next_publish().await.topic, &b"mixed/from-v5"[..]);
}

#[tokio::test]
async fn a_retained_message_reaches_later_subscribers_of_either_version_until_cleared() {
    let broker = broker();
    let mut publisher = v4::Client::connect(broker.port(), "retainer").await;
    publisher
        .client
        .publish("status/light", v4::QoS::AtLeastOnce, true, "on")
        .await
        .unwrap();
    publisher
        .expect(|p| matches!(p, v4::Packet::PubAck(_)).then_some(()))
        .await;

    let mut late4 = v4::Client::connect(broker.port(), "late-v4").await;
    late4.subscribe("status/#", v4::QoS::AtLeastOnce).await;
    let got = late4.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..], got.retain),
        ("status/light", &b"on"[..], true)
    );

    let mut late5 = v5::Client::connect(broker.port(), "late-v5").await;
    late5.subscribe("status/#", v5::QoS::AtLeastOnce).await;
    let got = late5.next_publish().await;
    assert_eq!(
        (&got.topic[..], &got.payload[..], got.retain),
        (&b"status/light"[..], &b"on"[..], true)
    );

    // An empty retained message clears it.
    publisher
        .client
        .publish("status/light", v4::QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    publisher
        .expect(|p| matches!(p, v4::Packet::PubAck(_)).then_some(()))
        .await;
    let mut later = v4::Client::connect(broker.port(), "later-v4").await;
    later.subscribe("status/#", v4::QoS::AtLeastOnce).await;
    let stale = later
        .within(QUIET, |p| match p {
            v4::Packet::Publish(p) if !p.payload.is_empty() => Some(p.clone()),
            _ => None,
        })
        .await;
    assert_eq!(stale, None, "the retained message was cleared");
}

#[tokio::test]
async fn the_last_will_is_published_when_a_client_vanishes() {
    let broker = broker();
    let mut watcher = v4::Client::connect(broker.port(), "watcher").await;
    watcher.subscribe("wills/#", v4::QoS::AtLeastOnce).await;

    let mut options = v4::MqttOptions::new("doomed-v4", "127.0.0.1", broker.port());
    options.set_last_will(v4::LastWill::new(
        "wills/v4",
        "v4 gone",
        v4::QoS::AtLeastOnce,
        false,
    ));
    v4::Client::connect_with(options).await.vanish();
    let got = watcher.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("wills/v4", &b"v4 gone"[..])
    );

    let mut options = v5::MqttOptions::new("doomed-v5", "127.0.0.1", broker.port());
    options.set_last_will(v5::LastWill::new(
        "wills/v5",
        "v5 gone",
        v5::QoS::AtLeastOnce,
        false,
        None,
    ));
    v5::Client::connect_with(options).await.vanish();
    let got = watcher.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("wills/v5", &b"v5 gone"[..])
    );
}

/// rumqttd itself drops a CONNECT with keep-alive 0; the front listener rewrites it.
#[tokio::test]
async fn keep_alive_zero_is_accepted() {
    use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet};
    let broker = broker();
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", broker.port()))
        .await
        .unwrap();
    let mut connect = Connect::new("no-keepalive");
    connect.keep_alive = 0;
    let mut out = BytesMut::new();
    connect.write(&mut out).unwrap();
    stream.write_all(&out).await.unwrap();

    let mut incoming = BytesMut::new();
    let ack = timeout(WAIT, async {
        loop {
            match Packet::read(&mut incoming, 1024) {
                Ok(packet) => return Some(packet),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("decode: {e:?}"),
            }
            if stream.read_buf(&mut incoming).await.unwrap() == 0 {
                return None;
            }
        }
    })
    .await
    .expect("an answer in time");
    match ack {
        Some(Packet::ConnAck(ack)) => assert_eq!(ack.code, ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Evidence for the "what rumqttd lacks" list in `src/broker.rs`. If rumqttd improves,
/// this test fails and the list must be updated.
#[tokio::test]
async fn rumqttd_v5_gaps() {
    let broker = broker();
    let mut sub = v5::Client::connect(broker.port(), "gaps-sub").await;
    let connack = sub.connack.properties.clone().expect("CONNACK properties");
    assert_eq!(connack.topic_alias_max, Some(4096));
    assert_eq!(
        (
            connack.receive_max,
            connack.max_qos,
            connack.retain_available
        ),
        (None, None, None),
        "CONNACK announces no limits: {connack:?}"
    );

    // Works: every PUBLISH property is forwarded, with the subscription identifier.
    sub.client
        .subscribe_with_properties(
            "props/#",
            v5::QoS::AtLeastOnce,
            v5::SubscribeProperties {
                id: Some(7),
                user_properties: Vec::new(),
            },
        )
        .await
        .unwrap();
    sub.expect(|p| matches!(p, v5::Packet::SubAck(..)).then_some(()))
        .await;
    let props = v5::PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(60),
        response_topic: Some("reply/here".to_string()),
        correlation_data: Some(Bytes::from_static(b"corr-1")),
        user_properties: vec![("k".to_string(), "v".to_string())],
        content_type: Some("text/plain".to_string()),
        ..Default::default()
    };
    sub.client
        .publish_with_properties("props/a", v5::QoS::AtLeastOnce, false, "x", props.clone())
        .await
        .unwrap();
    let got = sub.next_publish().await.properties.unwrap_or_default();
    assert_eq!(
        got,
        v5::PublishProperties {
            subscription_identifiers: vec![7],
            ..props
        }
    );

    // Gap: a QoS 0 message is delivered at the subscription's QoS 1, not at the lower one.
    sub.client
        .publish("props/qos0", v5::QoS::AtMostOnce, false, "q0")
        .await
        .unwrap();
    assert_eq!(sub.next_publish().await.qos, v5::QoS::AtLeastOnce);

    // Works: a live retained message reaches existing subscribers with the flag cleared.
    sub.client
        .publish("props/retained", v5::QoS::AtLeastOnce, true, "r")
        .await
        .unwrap();
    assert!(!sub.next_publish().await.retain);

    // Gap: No Local is ignored: a subscriber gets its own messages.
    let mut own = v5::Client::connect(broker.port(), "gaps-nolocal").await;
    let mut filter = v5::Filter::new("nolocal/t", v5::QoS::AtLeastOnce);
    filter.nolocal = true;
    own.client.subscribe_many(vec![filter]).await.unwrap();
    own.expect(|p| matches!(p, v5::Packet::SubAck(..)).then_some(()))
        .await;
    own.client
        .publish("nolocal/t", v5::QoS::AtLeastOnce, false, "mine")
        .await
        .unwrap();
    assert_eq!(own.next_publish().await.payload, &b"mine"[..]);

    // Gap: Retain Handling "never" is ignored: retained messages are sent anyway.
    // Gap: Retain As Published is ignored: the live retain flag is still cleared.
    let mut never = v5::Client::connect(broker.port(), "gaps-retain-never").await;
    let mut filter = v5::Filter::new("props/retained", v5::QoS::AtLeastOnce);
    filter.retain_forward_rule = v5::RetainForwardRule::Never;
    filter.preserve_retain = true;
    never.client.subscribe_many(vec![filter]).await.unwrap();
    assert_eq!(never.next_publish().await.payload, &b"r"[..]);
    sub.client
        .publish("props/retained", v5::QoS::AtLeastOnce, true, "r2")
        .await
        .unwrap();
    let live = never.next_publish().await;
    assert_eq!((&live.payload[..], live.retain), (&b"r2"[..], false));

    // Gap, MQTT 3.1.1 too: QoS 0 is delivered at the subscription's QoS.
    let mut sub4 = v4::Client::connect(broker.port(), "gaps-v4").await;
    sub4.subscribe("v4qos/t", v4::QoS::ExactlyOnce).await;
    sub4.client
        .publish("v4qos/t", v4::QoS::AtMostOnce, false, "q0")
        .await
        .unwrap();
    assert_eq!(sub4.next_publish().await.qos, v4::QoS::ExactlyOnce);

    // Works: a session with an expiry interval survives a disconnect, queued messages too.
    let mut options = v5::MqttOptions::new("gaps-session", "127.0.0.1", broker.port());
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(300));
    let mut persistent = v5::Client::connect_with(options.clone()).await;
    persistent
        .subscribe("session/t", v5::QoS::AtLeastOnce)
        .await;
    persistent.client.disconnect().await.unwrap();
    persistent
        .within(WAIT, |p| {
            matches!(p, v5::Packet::Disconnect(..)).then_some(())
        })
        .await;
    persistent.vanish();
    sub.client
        .publish("session/t", v5::QoS::AtLeastOnce, false, "while away")
        .await
        .unwrap();
    sub.expect(|p| matches!(p, v5::Packet::PubAck(..)).then_some(()))
        .await;
    let mut back = v5::Client::connect_with(options).await;
    assert!(back.connack.session_present);
    assert_eq!(back.next_publish().await.payload, &b"while away"[..]);
}

/// rumqttd logs at `error` for connections that end before CONNECT (the start-up probes
/// are such), at `info` for every disconnect; at a user's default log level none of that
/// may show, yet it must still be there, demoted, for `RUST_LOG=rumqttd=trace`.
#[tokio::test]
async fn rumqttd_is_quiet_at_the_default_level_and_heard_when_asked() {
    use std::sync::Mutex;

    struct Capture(Mutex<Vec<(log::Level, String)>>);
    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            if record.target().starts_with("rumqttd") {
                let line = format!("{}: {}", record.target(), record.args());
                self.0.lock().unwrap().push((record.level(), line));
            }
        }
        fn flush(&self) {}
    }
    static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));
    log::set_logger(&CAPTURE).expect("no other logger in this test binary");
    log::set_max_level(log::LevelFilter::Trace);

    let broker = broker();
    v4::Client::connect(broker.port(), "vanishing")
        .await
        .vanish();
    let heard = timeout(WAIT, async {
        loop {
            let found = {
                let records = CAPTURE.0.lock().unwrap();
                let demoted_error = records.iter().any(|(level, line)| {
                    *level == log::Level::Debug
                        && line.contains("Error while handling MQTT connect")
                });
                let demoted_info = records.iter().any(|(level, line)| {
                    *level == log::Level::Trace && line.contains("disconnected")
                });
                demoted_error && demoted_info
            };
            if found {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let records = CAPTURE.0.lock().unwrap().clone();
    assert!(heard.is_ok(), "demoted records are missing: {records:#?}");
    let loud: Vec<_> = records
        .iter()
        .filter(|(level, _)| *level <= log::Level::Info)
        .collect();
    assert!(
        loud.is_empty(),
        "rumqttd logged at info or above: {loud:#?}"
    );
}
