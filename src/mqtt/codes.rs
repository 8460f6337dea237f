//! The numbers the MQTT API speaks: libmosquitto's `MOSQ_ERR_*` error codes (returned by
//! calls) and MQTT 5 reason codes (passed to callbacks), with their texts.

/// Error codes returned by the Lua API (libmosquitto's `MOSQ_ERR_*` values).
pub mod err {
    pub const SUCCESS: i32 = 0;
    pub const NOMEM: i32 = 1;
    pub const PROTOCOL: i32 = 2;
    pub const INVAL: i32 = 3;
    pub const NO_CONN: i32 = 4;
    pub const CONN_REFUSED: i32 = 5;
    pub const NOT_FOUND: i32 = 6;
    pub const CONN_LOST: i32 = 7;
    pub const TLS: i32 = 8;
    pub const PAYLOAD_SIZE: i32 = 9;
    pub const NOT_SUPPORTED: i32 = 10;
    pub const AUTH: i32 = 11;
    pub const ACL_DENIED: i32 = 12;
    pub const UNKNOWN: i32 = 13;
    pub const ERRNO: i32 = 14;
    pub const EAI: i32 = 15;
    pub const PROXY: i32 = 16;
    pub const MALFORMED_UTF8: i32 = 18;
    pub const DUPLICATE_PROPERTY: i32 = 22;
    pub const TLS_HANDSHAKE: i32 = 23;
    pub const QOS_NOT_SUPPORTED: i32 = 24;
    pub const OVERSIZE_PACKET: i32 = 25;
    pub const OCSP: i32 = 26;
}

/// MQTT 5 reason codes used by the runtime itself.
pub mod reason {
    pub const SUCCESS: i32 = 0;
    pub const NO_MATCHING_SUBSCRIBERS: i32 = 16;
    pub const UNSPECIFIED_ERROR: i32 = 128;
    pub const MALFORMED_PACKET: i32 = 129;
    pub const PROTOCOL_ERROR: i32 = 130;
    pub const IMPLEMENTATION_SPECIFIC_ERROR: i32 = 131;
    pub const UNSUPPORTED_PROTOCOL_VERSION: i32 = 132;
    pub const CLIENT_IDENTIFIER_NOT_VALID: i32 = 133;
    pub const BAD_USER_NAME_OR_PASSWORD: i32 = 134;
    pub const NOT_AUTHORIZED: i32 = 135;
    pub const SERVER_UNAVAILABLE: i32 = 136;
    pub const KEEP_ALIVE_TIMEOUT: i32 = 141;
    pub const PACKET_TOO_LARGE: i32 = 149;
    pub const QUOTA_EXCEEDED: i32 = 151;
}

/// `ErrorCodeToString`: libmosquitto's `mosquitto_strerror` texts.
pub fn error_code_to_string(code: i32) -> &'static str {
    match code {
        -4 => "Continue with authentication.",
        -3 => "No subscribers.",
        -2 => "Subscription already exists.",
        -1 => "Connection pending.",
        0 => "No error.",
        1 => "Out of memory.",
        2 => "A network protocol error occurred when communicating with the broker.",
        3 => "Invalid function arguments provided.",
        4 => "The client is not currently connected.",
        5 => "The connection was refused.",
        6 => "Message not found (internal error).",
        7 => "The connection was lost.",
        8 => "A TLS error occurred.",
        9 => "Payload too large.",
        10 => "This feature is not supported.",
        11 => "Authorisation failed.",
        12 => "Access denied by ACL.",
        13 => "Unknown error.",
        14 => "System error.",
        15 => "Lookup error.",
        16 => "Proxy error.",
        18 => "Malformed UTF-8",
        22 => "Duplicate property in property list.",
        23 => "TLS handshake failed.",
        24 => "Requested QoS not supported on server.",
        25 => "Packet larger than supported by the server.",
        26 => "OCSP error.",
        _ => "Unknown error.",
    }
}

/// `ReasonCodeToString`: MQTT 5 reason code texts (libmosquitto's `mosquitto_reason_string`).
pub fn reason_code_to_string(code: i32) -> &'static str {
    match code {
        0 => "Success",
        1 => "Granted QoS 1",
        2 => "Granted QoS 2",
        4 => "Disconnect with Will Message",
        16 => "No matching subscribers",
        17 => "No subscription existed",
        24 => "Continue authentication",
        25 => "Re-authenticate",
        128 => "Unspecified error",
        129 => "Malformed Packet",
        130 => "Protocol Error",
        131 => "Implementation specific error",
        132 => "Unsupported Protocol Version",
        133 => "Client Identifier not valid",
        134 => "Bad User Name or Password",
        135 => "Not authorized",
        136 => "Server unavailable",
        137 => "Server busy",
        138 => "Banned",
        139 => "Server shutting down",
        140 => "Bad authentication method",
        141 => "Keep Alive timeout",
        142 => "Session taken over",
        143 => "Topic Filter invalid",
        144 => "Topic Name invalid",
        145 => "Packet Identifier in use",
        146 => "Packet Identifier not found",
        147 => "Receive Maximum exceeded",
        148 => "Topic Alias invalid",
        149 => "Packet too large",
        150 => "Message rate too high",
        151 => "Quota exceeded",
        152 => "Administrative action",
        153 => "Payload format invalid",
        154 => "Retain not supported",
        155 => "QoS not supported",
        156 => "Use another server",
        157 => "Server moved",
        158 => "Shared Subscriptions not supported",
        159 => "Connection rate exceeded",
        160 => "Maximum connect time",
        161 => "Subscription Identifiers not supported",
        162 => "Wildcard Subscriptions not supported",
        _ => "Unknown reason",
    }
}

/// MQTT 3.x CONNACK return codes as their MQTT 5 equivalents, so drivers need one table.
pub fn v3_connack_to_reason(code: u8) -> i32 {
    match code {
        0 => reason::SUCCESS,
        1 => reason::UNSUPPORTED_PROTOCOL_VERSION,
        2 => reason::CLIENT_IDENTIFIER_NOT_VALID,
        3 => reason::SERVER_UNAVAILABLE,
        4 => reason::BAD_USER_NAME_OR_PASSWORD,
        5 => reason::NOT_AUTHORIZED,
        _ => reason::UNSPECIFIED_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v3_connack_codes_map_to_their_v5_equivalents() {
        assert_eq!(
            [1, 2, 3, 4, 5].map(v3_connack_to_reason),
            [132, 133, 136, 134, 135]
        );
    }

    #[test]
    fn every_spec_error_code_has_its_own_text() {
        for code in [
            -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 22, 23,
            24, 25, 26,
        ] {
            assert!(!error_code_to_string(code).is_empty());
        }
        assert_eq!(
            error_code_to_string(4),
            "The client is not currently connected."
        );
        assert_eq!(reason_code_to_string(16), "No matching subscribers");
    }
}
