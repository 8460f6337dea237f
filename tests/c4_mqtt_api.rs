//! `C4:MQTT` calls that answer synchronously, without a broker: every row of the Publish
//! table that needs no broker state, the return shapes, and the "before Connect" rules.

mod common;

use common::drivers::{SAY, TestDriver};

/// Runs `body` inside OnDriverLateInit with `m` (3.1.1) and `m5` (v5) clients, and
/// returns everything it said.
fn run(body: &str, expected: usize) -> Vec<String> {
    let d = TestDriver::start(&format!(
        "{SAY}\nfunction OnDriverLateInit()\nlocal m = C4:MQTT('api-test')\nlocal m5 = C4:MQTT('api-test-5')\nm5:ForceMqttVersion(5)\n{body}\nend"
    ));
    (0..expected).map(|_| d.next()).collect()
}

#[test]
fn publish_rejects_each_bad_argument_with_the_specs_code_in_order() {
    let said = run(
        r#"
        local function code(...) local c, id, msg = ...; say(c, id) end
        code(m:Publish(nil, "x", 1))                        -- topic not a string
        code(m:Publish("", "x", 1))                         -- empty
        code(m:Publish("a/+/b", "x", 1))                    -- wildcard
        code(m:Publish("a/#", "x", 1))
        code(m:Publish("a\0b", "x", 1))                     -- NUL
        code(m:Publish("caf\233", "x", 1))                  -- not UTF-8 -> 18
        code(m:Publish(string.rep("t", 65536), "x", 1))     -- too long -> 3
        code(m:Publish("t", {}, 1))                         -- payload type
        code(m:Publish("t", "x", 3))                        -- qos
        code(m:Publish("t", "x", 1.5))
        code(m:Publish("t", "x", "1"))
        code(m:Publish("t", "x", 1, "yes"))                 -- retain
        code(m:Publish("t", "x", 1, false, "props"))        -- props type
        code(m:Publish("t", "x", 1, false, { CONTENT_TYPE = "a" }))   -- props on 3.1.1 -> 10
        code(m5:Publish("t", "x", 1, false, { NO_SUCH = 1 }))         -- unknown -> 3
        code(m5:Publish("t", "x", 1, false, { MESSAGE_EXPIRY_INTERVAL = "soon" }))  -- type -> 3
        code(m5:Publish("t", "x", 1, false, { SESSION_EXPIRY_INTERVAL = 5 }))       -- not on PUBLISH -> 2
        code(m5:Publish("t", "x", 1, false, { MAXIMUM_QOS = 1 }))                   -- receive-only -> 2
        code(m5:Publish("t", "x", 1, false, { RESPONSE_TOPIC = "r/+" }))            -- wildcard -> 3
        code(m5:Publish("t", "\255", 1, false, { PAYLOAD_FORMAT_INDICATOR = 1 }))   -- 18
        code(m:Publish("t", "x", 0))                        -- QoS 0 not connected -> 4
        code(m:Publish("t", nil, nil))                      -- QoS 0 by default -> 4
        -- the first failure wins: bad qos before the wildcard response topic
        code(m5:Publish("t", "x", 7, false, { RESPONSE_TOPIC = "r/#" }))
        "#,
        23,
    );
    let codes: Vec<&str> = said.iter().map(String::as_str).collect();
    assert_eq!(
        codes,
        vec![
            "3 nil", "3 nil", "3 nil", "3 nil", "3 nil", "18 nil", "3 nil", "3 nil", "3 nil",
            "3 nil", "3 nil", "3 nil", "3 nil", "10 nil", "3 nil", "3 nil", "2 nil", "2 nil",
            "3 nil", "18 nil", "4 nil", "4 nil", "3 nil",
        ]
    );
}

#[test]
fn failed_calls_return_code_nil_and_a_message_naming_the_argument() {
    let said = run(
        r#"
        say(m:Publish("t", "x", 9))
        say(select('#', m:Publish("t", "x", 1)))
        say(m5:Publish("t", "x", 1, false, { SESSION_EXPIRY_INTERVAL = 5 }))
        say(m.Publish("t", "x", 1))
        "#,
        4,
    );
    assert_eq!(said[0], "3 nil Publish: qos must be 0, 1 or 2, got 9");
    assert_eq!(said[1], "2", "success returns exactly code and msgId");
    assert_eq!(
        said[2],
        "2 nil Publish: property SESSION_EXPIRY_INTERVAL is not allowed on PUBLISH"
    );
    assert!(
        said[3].starts_with("3 nil Publish: call it as a method"),
        "{}",
        said[3]
    );
}

#[test]
fn qos_1_and_2_are_queued_while_disconnected_with_increasing_ids() {
    let said = run(
        r#"
        say(m:Publish("t", "a", 1))
        say(m:Publish("t", 42, 2, true))
        say(m:Publish("t", nil, 1))
        say(m5:Publish("t", "x", 1, false, { CONTENT_TYPE = "text/plain", USER_PROPERTY = { a = "1" },
                                            CORRELATION_DATA = "\0\1", MESSAGE_EXPIRY_INTERVAL = 10 }))
        say(m5:Publish("t", "x", 1, false, { USER_PROPERTY = { { "k", "1" }, { "k", "2" } } }))
        local s = m:GetStats()
        say(s.connected, type(s.queued), type(s.inflight), type(s.failed))
        "#,
        6,
    );
    assert_eq!(
        said,
        vec![
            "0 1",
            "0 2",
            "0 3",
            "0 1",
            "0 2",
            "false number number number"
        ]
    );
}

#[test]
fn subscribe_and_unsubscribe_need_a_connection_and_valid_filters() {
    let said = run(
        r#"
        say(m:Subscribe("home/+/set", 1))
        say(m:Subscribe("home/#/x", 1))
        say(m:Subscribe("home/a+", 1))
        say(m:Subscribe("home/x", 3))
        say(m:Unsubscribe("home/#"))
        say(m:Unsubscribe(""))
        "#,
        6,
    );
    assert_eq!(
        said[0],
        "4 nil Subscribe: The client is not currently connected."
    );
    assert!(
        said[1].starts_with("3 nil Subscribe: 'home/#/x' is not a valid filter"),
        "{}",
        said[1]
    );
    assert!(said[2].starts_with("3 nil"), "{}", said[2]);
    assert!(said[3].starts_with("3 nil Subscribe: qos"), "{}", said[3]);
    assert_eq!(
        said[4],
        "4 nil Unsubscribe: The client is not currently connected."
    );
    assert_eq!(said[5], "3 nil Unsubscribe: filter must not be empty");
}

#[test]
fn configuration_calls_return_zero_or_code_and_message() {
    let said = run(
        r#"
        say(m:ForceMqttVersion(5))
        say(m:ForceMqttVersion(311))
        say(m:ForceMqttVersion(3))
        say(m:ForceMqttVersion(7))
        say(m:SetUsernameAndPassword("user", "secret"))
        say(m:SetUsernameAndPassword(nil, "secret"))
        say(m:SetWill("will/topic", "gone", 1, true))
        say(m:SetWill("will/+", "gone"))
        say(m:ClearWill())
        say(m:SetMaxInflightMessages(0), m:SetMaxInflightMessages(100))
        say(m:SetMaxInflightMessages(-1))
        say(m:SetMessageRetries(3))
        say(m:SetTlsPsk("abcd", "id"))
        say(m:SetAutoReconnect(100, 5000))
        say(m:SetAutoReconnect(5000, 100))
        say(m:Disconnect())
        say(m:Reconnect())
        say(m:Connect("", 1883))
        say(m:Connect("localhost", 70000))
        say(m:Connect("localhost", 1883, 3))
        say(m:OnPublish(function() end), m:OnPublish(nil), m:OnPublish(5))
        "#,
        21,
    );
    let expected = [
        "0",
        "0",
        "10 ForceMqttVersion: MQTT 3.1 is not supported (the client speaks 3.1.1 and 5); use 311 or 5",
        "3 ForceMqttVersion: version must be 3, 311 or 5, got 7",
        "0",
        "3 SetUsernameAndPassword: a password needs a user",
        "0",
        "3 SetWill: topic must not contain '+', '#' or NUL",
        "0",
        "0 0",
        "3 SetMaxInflightMessages: expected 0 (no limit) to 65535, got -1",
        "0",
        "10 SetTlsPsk: TLS-PSK is not supported: the TLS stack (rustls) has no PSK cipher suites",
        "0",
        "3 SetAutoReconnect: expected minDelayMs and maxDelayMs, 1 <= min <= max (ms), or nil to turn it off",
        "4 Disconnect: The client is not currently connected.",
        "3 Reconnect: call Connect first",
        "3 Connect: host must be a non-empty string, got \"\"",
        "3 Connect: port must be 1 to 65535, got 70000",
        "3 Connect: keepalive must be 0 (off) or 5 to 65535 seconds, got 3",
        "0 0 3 OnPublish: expected a function or nil, got number",
    ];
    assert_eq!(said, expected);
}

#[test]
fn settings_that_shape_a_connection_are_refused_after_connect() {
    let said = run(
        r#"
        say(m:Connect("127.0.0.1", 1, 0))
        say(m:ForceMqttVersion(5))
        say(m:SetUsernameAndPassword("u"))
        say(m:SetWill("w", "x"))
        say(m:SetMaxInflightMessages(5))
        "#,
        5,
    );
    assert_eq!(said[0], "0");
    assert_eq!(
        said[1],
        "3 ForceMqttVersion: only before Connect (or after Disconnect)"
    );
    assert_eq!(
        said[2],
        "3 SetUsernameAndPassword: only before Connect (or after Disconnect)"
    );
    assert_eq!(
        said[3],
        "3 SetWill: only before Connect (or after Disconnect)"
    );
    assert_eq!(said[4], "0", "the in-flight window may change at any time");
}

#[test]
fn code_texts_and_client_creation_errors() {
    let said = run(
        r#"
        say(m:ErrorCodeToString(4))
        say(m:ReasonCodeToString(135))
        say(m:ReasonCodeToString(16))
        say(C4:MQTT(5))
        say(C4:MQTT(nil, false))
        say(C4:MQTT("id", "yes"))
        say(tostring(C4:MQTT("named")))
        "#,
        7,
    );
    assert_eq!(
        said,
        vec![
            "The client is not currently connected.",
            "Not authorized",
            "No matching subscribers",
            "nil MQTT: clientId must be a string or nil, got number",
            "nil MQTT: cleanSession = false needs a clientId (a session is kept per client id)",
            "nil MQTT: cleanSession must be a boolean, got string",
            "C4MQTT(named)",
        ]
    );
}
