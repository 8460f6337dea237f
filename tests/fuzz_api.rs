//! Robustness of the Lua API: thousands of `C4` and `C4:MQTT` calls with random argument
//! lists, generated here from a fixed seed as Lua source and run inside one driver.
//!
//! Every call goes through `pcall` in a Lua harness that checks the spec's return shapes
//! (`0` / `code, message` for configuration calls; `0, msgId` with increasing ids /
//! `code, nil, message` for `Publish`, `Subscribe`, `Unsubscribe`; `nil, message` for a
//! C4 call that refuses its input) and reports each violation with `C4:FireEvent`. The test
//! then checks that the driver still answers commands, stops cleanly, and that no thread of
//! the process panicked. No broker is needed: `Connect` only ever names 127.0.0.1 port 1.

mod common;

use common::drivers::TestDriver;
use luadriver::driver::DriverEvent;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Marks the harness's own events, so the fuzzed `C4:FireEvent` calls cannot fake them.
const MARK: &str = "\u{1}FZ ";
/// Calls per batch; each batch is one `ExecuteCommand`, so timers fire between batches.
const BATCH: usize = 100;

/// Panics on any thread but a test's own (driver threads, MQTT workers).
static FOREIGN_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_foreign_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("");
            if name.starts_with("driver-") || name.starts_with("tokio") {
                FOREIGN_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            default(info);
        }));
    });
}

/// The harness: the value pool `P`, the checks, and the call helpers `CC` (`obj:Method`)
/// and `CD` (`obj.Method`, no receiver).
const HARNESS: &str = r#"
local MARK = "\1FZ "
local ERR = {}
for _, c in ipairs({ -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                     18, 22, 23, 24, 25, 26 }) do ERR[c] = true end
local N, BAD = 0, {}
local last_id = setmetatable({}, { __mode = "k" })

local function shape(...)
  local t = {}
  for i = 1, select('#', ...) do
    local v = select(i, ...)
    t[#t + 1] = type(v) == "string" and string.format("%q", v:sub(1, 100)) or tostring(v)
  end
  return "(" .. table.concat(t, ", ") .. ")"
end

local function bad(i, what)
  if #BAD < 30 then BAD[#BAD + 1] = i .. " " .. what end
end

local function is_client(v)
  return type(v) == "userdata" and (tostring(v) or ""):sub(1, 7) == "C4MQTT("
end

local function fails(n, a, b) return n == 2 and a == nil and type(b) == "string" and #b > 0 end

-- kind: config | id | text | stats | c4:<what success returns>
local function check(i, kind, obj, ok, ...)
  N = N + 1
  if not ok then return bad(i, "threw: " .. tostring((...))) end
  local n = select('#', ...)
  local a, b, c = ...
  local good
  if kind == "config" then
    good = (n == 1 and a == 0 and obj ~= nil)
        or (n == 2 and ERR[a] and type(b) == "string" and #b > 0)
  elseif kind == "id" then
    if n == 2 and a == 0 and obj ~= nil and type(b) == "number" and b >= 1 and b % 1 == 0 then
      if b <= (last_id[obj] or 0) then
        return bad(i, "msgId " .. b .. " after " .. last_id[obj])
      end
      last_id[obj] = b
      good = true
    else
      good = n == 3 and ERR[a] and b == nil and type(c) == "string" and #c > 0
    end
  elseif kind == "text" then
    good = n == 1 and type(a) == "string" and #a > 0
  elseif kind == "stats" then
    if obj ~= nil then
      good = n == 1 and type(a) == "table" and type(a.connected) == "boolean"
      for _, k in ipairs({ "queued", "inflight", "published", "acknowledged", "failed" }) do
        good = good and type(a[k]) == "number" and a[k] >= 0
      end
    else
      good = n == 2 and a == 3 and type(b) == "string"
    end
  elseif kind == "c4:none" then good = n == 0 or fails(n, a, b)
  elseif kind == "c4:any" then good = n == 1 or fails(n, a, b)
  elseif kind == "c4:string?" then good = n == 1 and (a == nil or type(a) == "string")
  elseif kind == "c4:timer" then
    good = (n == 1 and type(a) == "userdata" and tostring(a):sub(1, 8) == "C4Timer(")
        or fails(n, a, b)
    if n == 1 and good then P.timers[#P.timers + 1] = a end
  elseif kind == "c4:client" then
    good = (n == 1 and is_client(a)) or fails(n, a, b)
  else
    good = n == 1 and type(a) == kind:sub(4) or fails(n, a, b)
  end
  if not good then bad(i, kind .. " returned " .. shape(...)) end
end

function CC(i, kind, obj, name, ...)
  return check(i, kind, is_client(obj) and obj or nil, pcall(obj[name], obj, ...))
end

function CD(i, kind, obj, name, ...)
  local first = ...
  return check(i, kind, is_client(first) and first or nil, pcall(obj[name], ...))
end

-- Runs a call inside a coroutine too: C4 calls work there and nothing escapes.
function CO(i, f)
  local ok, err = coroutine.resume(coroutine.create(f))
  if not ok then bad(i, "coroutine: " .. tostring(err)) end
end

local function recurse(n) return 1 + recurse(n + 1) end

P = {
  big = string.rep("x", 300000),
  long_topic = string.rep("t", 65536),
  max_topic = string.rep("t", 65535),
  deep_json = string.rep("[", 100000) .. string.rep("]", 100000),
  timers = {},
  f_noop = function() end,
  f_err = function() error("callback error") end,
  f_errt = function() error({}) end,
  f_recurse = function(t) if t then t:Cancel() end return recurse(1) end,
  f_settimer = function() C4:SetTimer(5, function() end) end,
  f_yield = coroutine.yield,
  f_c = tostring,
}
P.cyc = {}; P.cyc.self = P.cyc; P.cyc[1] = P.cyc
P.deep = {}
do local t = P.deep; for _ = 1, 300 do t[1] = {}; t = t[1] end end
P.meta = setmetatable({}, {
  __index = function() error("index") end,
  __newindex = function() error("newindex") end,
  __tostring = function() error("tostring") end,
  __len = function() error("len") end,
  __eq = function() error("eq") end,
  __lt = function() error("lt") end,
  __concat = function() error("concat") end,
  __call = function() error("call") end,
})
P.meta_str = setmetatable({}, { __tostring = function() return {} end })
P.props_meta = setmetatable({ CONTENT_TYPE = "a" }, { __index = function() error("idx") end })
P.co = coroutine.create(function() coroutine.yield() end)
P.co_dead = coroutine.create(function() end); coroutine.resume(P.co_dead)
P.m = C4:MQTT("fuzz-311")
P.m5 = C4:MQTT("fuzz-5"); P.m5:ForceMqttVersion(5)
P.c = C4:MQTT("fuzz-connected"); P.c:ForceMqttVersion(5); P.c:Connect("127.0.0.1", 1, 0)
P.timer = C4:SetTimer(3600000, function() end)

function ExecuteCommand(cmd)
  if cmd == "ALIVE" then
    C4:FireEvent(MARK .. "alive " .. N)
    return
  end
  local batch = _G[cmd]
  batch()
  collectgarbage()
  for _, b in ipairs(BAD) do C4:FireEvent(MARK .. "BAD " .. b) end
  BAD = {}
  C4:FireEvent(MARK .. "done " .. cmd .. " " .. N)
end

function OnDriverDestroyed() C4:FireEvent(MARK .. "destroyed") end
"#;

/// What a call returns when it succeeds, for the harness's `check`.
#[derive(Clone, Copy)]
enum Kind {
    Config,
    Id,
    Text,
    Stats,
    C4(&'static str),
}

impl Kind {
    fn lua(self) -> String {
        match self {
            Kind::Config => "\"config\"".into(),
            Kind::Id => "\"id\"".into(),
            Kind::Text => "\"text\"".into(),
            Kind::Stats => "\"stats\"".into(),
            Kind::C4(what) => format!("\"c4:{what}\""),
        }
    }
}

const MQTT_METHODS: &[(&str, Kind)] = &[
    ("ForceMqttVersion", Kind::Config),
    ("SetUsernameAndPassword", Kind::Config),
    ("SetWill", Kind::Config),
    ("ClearWill", Kind::Config),
    ("SetMaxInflightMessages", Kind::Config),
    ("SetMessageRetries", Kind::Config),
    ("SetTlsCertificates", Kind::Config),
    ("SetTlsInsecure", Kind::Config),
    ("SetTlsPsk", Kind::Config),
    ("SetAutoReconnect", Kind::Config),
    ("Connect", Kind::Config),
    ("Disconnect", Kind::Config),
    ("Reconnect", Kind::Config),
    ("Publish", Kind::Id),
    ("Publish", Kind::Id),
    ("Publish", Kind::Id),
    ("Subscribe", Kind::Id),
    ("Unsubscribe", Kind::Id),
    ("ErrorCodeToString", Kind::Text),
    ("ReasonCodeToString", Kind::Text),
    ("GetStats", Kind::Stats),
    ("OnConnect", Kind::Config),
    ("OnDisconnect", Kind::Config),
    ("OnPublish", Kind::Config),
    ("OnSubscribe", Kind::Config),
    ("OnUnsubscribe", Kind::Config),
    ("OnMessage", Kind::Config),
    ("OnLog", Kind::Config),
];

const C4_FUNCTIONS: &[(&str, Kind)] = &[
    ("SetTimer", Kind::C4("timer")),
    ("GetTime", Kind::C4("number")),
    ("JsonEncode", Kind::C4("string")),
    ("JsonDecode", Kind::C4("any")),
    ("Base64Encode", Kind::C4("string")),
    ("Base64Decode", Kind::C4("string")),
    ("UpdateProperty", Kind::C4("none")),
    ("FireEvent", Kind::C4("none")),
    ("PersistSetValue", Kind::C4("none")),
    ("PersistGetValue", Kind::C4("any")),
    ("PersistDeleteValue", Kind::C4("none")),
    ("GetDeviceID", Kind::C4("number")),
    ("GetDriverConfigInfo", Kind::C4("string?")),
    ("MQTT", Kind::C4("client")),
    ("DebugLog", Kind::C4("none")),
    ("ErrorLog", Kind::C4("none")),
];

/// The object `C4:SetTimer` returns.
const TIMER_METHODS: &[(&str, Kind)] = &[("Cancel", Kind::C4("none"))];

const PROPERTY_NAMES: &[&str] = &[
    "PAYLOAD_FORMAT_INDICATOR",
    "MESSAGE_EXPIRY_INTERVAL",
    "CONTENT_TYPE",
    "RESPONSE_TOPIC",
    "CORRELATION_DATA",
    "TOPIC_ALIAS",
    "SESSION_EXPIRY_INTERVAL",
    "RECEIVE_MAXIMUM",
    "MAXIMUM_PACKET_SIZE",
    "TOPIC_ALIAS_MAXIMUM",
    "REQUEST_PROBLEM_INFORMATION",
    "REQUEST_RESPONSE_INFORMATION",
    "REASON_STRING",
    "USER_PROPERTY",
    "USER_PROPERTIES",
    "MAXIMUM_QOS",
    "SUBSCRIPTION_IDENTIFIER",
    "NO_SUCH_PROPERTY",
    "content_type",
    "",
];

/// Generates Lua expressions: random values, and plausible arguments per method.
struct Gen {
    rng: StdRng,
}

impl Gen {
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items.choose(&mut self.rng).copied().unwrap_or("nil")
    }

    fn string_literal(bytes: &[u8]) -> String {
        let mut s = String::from("\"");
        for b in bytes {
            match b {
                b'"' => s.push_str("\\\""),
                b'\\' => s.push_str("\\\\"),
                0x20..=0x7e => s.push(*b as char),
                _ => s.push_str(&format!("\\{b:03}")),
            }
        }
        s.push('"');
        s
    }

    fn number(f: f64) -> String {
        if f.is_nan() {
            "(0/0)".into()
        } else if f.is_infinite() {
            if f > 0.0 {
                "(1/0)".into()
            } else {
                "(-1/0)".into()
            }
        } else if f == 0.0 && f.is_sign_negative() {
            "(-0.0)".into()
        } else {
            format!("({f:e})")
        }
    }

    fn integer(&mut self) -> String {
        match self.rng.gen_range(0..4) {
            0 => self
                .pick(&[
                    "0",
                    "1",
                    "2",
                    "3",
                    "4",
                    "5",
                    "-1",
                    "311",
                    "65535",
                    "65536",
                    "2147483647",
                    "2147483648",
                    "4294967295",
                    "4294967296",
                    "9007199254740993",
                    "9223372036854775807",
                    "-9223372036854775808",
                    "1e15",
                    "-2147483649",
                ])
                .to_string(),
            1 => self.rng.gen_range(-5i64..300).to_string(),
            2 => format!("({})", self.rng.r#gen::<i32>()),
            _ => format!("({})", self.rng.r#gen::<i64>()),
        }
    }

    fn float(&mut self) -> String {
        match self.rng.gen_range(0..3) {
            0 => self
                .pick(&[
                    "(0/0)", "(1/0)", "(-1/0)", "(-0.0)", "0.5", "1.5", "1e300", "-1e300",
                    "1e-300", "1e20", "2.5e9", "4.9e-324",
                ])
                .to_string(),
            1 => Self::number(self.rng.gen_range(-1e6..1e6)),
            _ => Self::number(f64::from_bits(self.rng.r#gen())),
        }
    }

    fn string(&mut self) -> String {
        match self.rng.gen_range(0..6) {
            0 => self
                .pick(&[
                    "\"\"",
                    "\"t\"",
                    "\"a/b\"",
                    "\"a/+/b\"",
                    "\"#\"",
                    "\"a/#\"",
                    "\"+\"",
                    "\"a\\0b\"",
                    "\"caf\\233\"",
                    "\"\\192\\128\"",
                    "\"\\255\\254\"",
                    "\"\\237\\160\\128\"",
                    "\"ms\"",
                    "\"us\"",
                    "\"ns\"",
                    "\"s\"",
                    "\"min\"",
                    "\"h\"",
                    "\"d\"",
                    "\"name\"",
                    "\"version\"",
                    "\"Greeting\"",
                    "\"null\"",
                    "\"{}\"",
                    "\"[1,2]\"",
                    "\"{\\\"a\\\":1}\"",
                    "\"aGVsbG8=\"",
                    "\"====\"",
                    "\"311\"",
                    "\"1\"",
                    "\"127.0.0.1\"",
                    "\"\\t\\n\"",
                    "\"\\226\\130\\172\"",
                ])
                .to_string(),
            1 => self
                .pick(&["P.big", "P.long_topic", "P.max_topic", "P.deep_json"])
                .to_string(),
            2 => "string.rep(\"\\0\", 1000)".into(),
            _ => {
                let len = self.rng.gen_range(0..40);
                let bytes: Vec<u8> = (0..len).map(|_| self.rng.r#gen()).collect();
                Self::string_literal(&bytes)
            }
        }
    }

    fn function(&mut self) -> String {
        self.pick(&[
            "P.f_noop",
            "P.f_err",
            "P.f_errt",
            "P.f_recurse",
            "P.f_settimer",
            "P.f_yield",
            "P.f_c",
            "function(...) return ... end",
        ])
        .to_string()
    }

    fn userdata(&mut self) -> String {
        self.pick(&[
            "P.m",
            "P.m5",
            "P.c",
            "P.timer",
            "c4json.null",
            "io.stdout",
            "C4:MQTT()",
        ])
        .to_string()
    }

    fn table(&mut self, depth: u32) -> String {
        match self.rng.gen_range(0..8) {
            0 => "{}".into(),
            1 => self
                .pick(&[
                    "P.cyc",
                    "P.deep",
                    "P.meta",
                    "P.meta_str",
                    "P.props_meta",
                    "P",
                ])
                .to_string(),
            2 | 3 => self.props(),
            _ => {
                let n = self.rng.gen_range(0..5);
                let mut parts = Vec::new();
                for _ in 0..n {
                    let v = self.value(depth + 1);
                    match self.rng.gen_range(0..3) {
                        0 => parts.push(v),
                        1 => parts.push(format!("k{} = {v}", self.rng.gen_range(0..5))),
                        _ => {
                            let k = self.key();
                            parts.push(format!("[{k}] = {v}"));
                        }
                    }
                }
                format!("{{ {} }}", parts.join(", "))
            }
        }
    }

    /// A table key expression that is never nil or NaN (both would throw at construction).
    fn key(&mut self) -> String {
        match self.rng.gen_range(0..5) {
            0 => self.integer(),
            1 => self.string(),
            2 => "true".into(),
            3 => "P.m".into(),
            _ => "{}".into(),
        }
    }

    /// A random value: every Lua type, edge cases first.
    fn value(&mut self, depth: u32) -> String {
        let top = if depth > 2 { 9 } else { 11 };
        match self.rng.gen_range(0..top) {
            0 => "nil".into(),
            1 => self.pick(&["true", "false"]).into(),
            2 | 3 => self.integer(),
            4 => self.float(),
            5 | 6 => self.string(),
            7 => self.function(),
            8 => {
                if self.rng.gen_bool(0.5) {
                    self.userdata()
                } else {
                    self.pick(&["P.co", "P.co_dead"]).into()
                }
            }
            _ => self.table(depth),
        }
    }

    /// A props table with known and unknown names and plausible or random values.
    fn props(&mut self) -> String {
        let n = self.rng.gen_range(0..4);
        let mut parts = Vec::new();
        for _ in 0..n {
            let name = self.pick(PROPERTY_NAMES);
            let value = if self.rng.gen_bool(0.6) {
                self.property_value(name)
            } else {
                self.value(3)
            };
            parts.push(format!("[\"{name}\"] = {value}"));
        }
        if self.rng.gen_bool(0.1) {
            let v = self.value(3);
            parts.push(format!("[1] = {v}"));
        }
        format!("{{ {} }}", parts.join(", "))
    }

    fn property_value(&mut self, name: &str) -> String {
        match name {
            "CONTENT_TYPE" | "REASON_STRING" | "CORRELATION_DATA" => self.string(),
            "RESPONSE_TOPIC" => self
                .pick(&["\"r/t\"", "\"r/+\"", "\"\"", "\"\\255\""])
                .into(),
            "USER_PROPERTY" => self
                .pick(&[
                    "{ a = \"1\" }",
                    "{ { \"k\", \"1\" }, { \"k\", \"2\" } }",
                    "{ { \"k\" } }",
                    "{ { \"k\", \"v\" }, x = 1 }",
                    "{ [true] = \"x\" }",
                    "{ a = { } }",
                    "{ a = \"\\255\" }",
                    "{ [\"\\255\"] = \"a\" }",
                    "{ a = 1.5, b = 2 }",
                    "{}",
                    "P.cyc",
                ])
                .into(),
            _ => {
                if self.rng.gen_bool(0.5) {
                    self.integer()
                } else {
                    self.float()
                }
            }
        }
    }

    fn qos(&mut self) -> String {
        self.pick(&["0", "1", "2", "1", "2", "3", "-1", "1.5", "nil", "\"1\""])
            .into()
    }

    fn topic(&mut self) -> String {
        match self.rng.gen_range(0..4) {
            0 | 1 => self.pick(&["\"t\"", "\"a/b/c\"", "\"fuzz/x\""]).into(),
            2 => self.string(),
            _ => self.value(0),
        }
    }

    /// Arguments that may pass a method's checks, each position sometimes random.
    fn plausible(&mut self, method: &str) -> Vec<String> {
        let args: Vec<String> = match method {
            "ForceMqttVersion" => vec![self.pick(&["3", "4", "5", "311", "31", "5.0"]).into()],
            "SetUsernameAndPassword" => vec![
                self.pick(&["\"user\"", "nil", "\"\\255\""]).into(),
                self.pick(&["\"pw\"", "nil", "\"\""]).into(),
            ],
            "SetWill" | "Publish" => vec![
                self.topic(),
                self.pick(&["\"payload\"", "nil", "42", "1.5", "\"\\255\"", "P.big"])
                    .into(),
                self.qos(),
                self.pick(&["true", "false", "nil"]).into(),
                if self.rng.gen_bool(0.5) {
                    "nil".into()
                } else {
                    self.props()
                },
            ],
            "SetMaxInflightMessages" | "SetMessageRetries" => vec![self.integer()],
            "SetTlsCertificates" => (0..4)
                .map(|_| {
                    self.pick(&["\"/nonexistent/luadriver-fuzz.pem\"", "\"\"", "nil"])
                        .into()
                })
                .collect(),
            "SetTlsInsecure" => vec![self.pick(&["true", "false"]).into()],
            "SetTlsPsk" => vec!["\"abcd\"".into(), "\"id\"".into()],
            "SetAutoReconnect" => vec![self.integer(), self.integer()],
            "Connect" => return self.connect_args(),
            "Disconnect" => vec![self.props()],
            "Subscribe" | "Unsubscribe" => vec![
                self.pick(&["\"a/+/b\"", "\"#\"", "\"a/#/b\"", "\"a+\"", "\"t\"", "\"\""])
                    .into(),
                self.qos(),
                self.props(),
            ],
            "ErrorCodeToString" | "ReasonCodeToString" => vec![self.integer()],
            "SetTimer" => vec![
                self.pick(&[
                    "1", "5", "20", "0", "-1", "(0/0)", "(1/0)", "1e300", "1e20", "1e-300", "0.5",
                    "2.5e9",
                ])
                .into(),
                self.function(),
                self.pick(&["true", "false", "nil", "1"]).into(),
            ],
            "GetTime" => vec![self.string(), self.pick(&["true", "false", "nil"]).into()],
            "JsonDecode" => vec![self.string(), self.pick(&["true", "nil"]).into()],
            "UpdateProperty" => vec![
                self.pick(&["\"Greeting\"", "\"Weird \\255 name\"", "\"nope\""])
                    .into(),
                self.value(1),
            ],
            "PersistSetValue" | "PersistGetValue" | "PersistDeleteValue" => vec![
                self.pick(&["\"k\"", "\"\"", "\"\\255\""]).into(),
                self.value(0),
            ],
            "MQTT" => vec![self.string(), self.pick(&["true", "false", "nil"]).into()],
            _ if method.starts_with("On") => vec![self.function()],
            _ => vec![],
        };
        args.into_iter()
            .map(|a| {
                if self.rng.gen_bool(0.2) {
                    self.value(0)
                } else {
                    a
                }
            })
            .collect()
    }

    /// `Connect` never names another host than 127.0.0.1 nor another valid port than 1,
    /// and never leaves the port out (that would mean 1883, a real broker).
    fn connect_args(&mut self) -> Vec<String> {
        let host = if self.rng.gen_bool(0.7) {
            "\"127.0.0.1\"".to_string()
        } else {
            self.pick(&["\"\"", "nil", "42", "{}", "true", "P.m"])
                .into()
        };
        let port = self
            .pick(&[
                "1", "1", "1", "0", "65536", "-1", "1.5", "\"1\"", "{}", "true", "(0/0)",
            ])
            .into();
        let keepalive = self
            .pick(&["0", "5", "60", "3", "-1", "65536", "nil", "1.5", "\"x\""])
            .into();
        let props = if self.rng.gen_bool(0.5) {
            "nil".into()
        } else {
            self.props()
        };
        vec![host, port, keepalive, props]
    }

    fn args(&mut self, method: &str) -> Vec<String> {
        if method == "Connect" {
            return self.connect_args();
        }
        if self.rng.gen_bool(0.6) {
            self.plausible(method)
        } else {
            let n = self.rng.gen_range(0..7);
            (0..n).map(|_| self.value(0)).collect()
        }
    }

    /// One checked call as a Lua statement.
    fn call(&mut self, index: usize, object: &str, method: &str, kind: Kind) -> String {
        let args = self.args(method);
        let colon = self.rng.gen_bool(0.8);
        let statement = if colon {
            let mut list = vec![
                index.to_string(),
                kind.lua(),
                object.into(),
                format!("{method:?}"),
            ];
            list.extend(args);
            format!("CC({})", list.join(", "))
        } else {
            // `obj.Method(a, b)`: the first argument is taken as the receiver.
            let mut list = vec![
                index.to_string(),
                kind.lua(),
                object.into(),
                format!("{method:?}"),
            ];
            if method == "Connect" {
                // Still only 127.0.0.1:1 should the first argument be a client.
                list.push(self.pick(&["P.m", "\"127.0.0.1\"", "1"]).into());
            }
            list.extend(args);
            format!("CD({})", list.join(", "))
        };
        if self.rng.gen_bool(0.05) {
            format!("CO({index}, function() {statement} end)")
        } else {
            statement
        }
    }
}

type Group<'a> = (&'a [&'a str], &'a [(&'a str, Kind)]);

/// Generates `calls` calls, each of a method of one group on one of that group's objects,
/// runs them in a driver in batches, and checks every result, the driver's health and the
/// absence of panics.
fn fuzz(seed: u64, calls: usize, groups: &[Group]) {
    count_foreign_panics();
    let mut g = Gen {
        rng: StdRng::seed_from_u64(seed),
    };
    let mut source = String::from(HARNESS);
    let mut lines = Vec::with_capacity(calls);
    let batches = calls.div_ceil(BATCH);
    for b in 0..batches {
        source.push_str(&format!("function B{b}()\n"));
        for i in b * BATCH..((b + 1) * BATCH).min(calls) {
            let &(objects, methods) = groups.choose(&mut g.rng).expect("groups");
            let object = g.pick(objects);
            let &(method, kind) = methods.choose(&mut g.rng).expect("methods");
            let line = g.call(i, object, method, kind);
            source.push_str(&line);
            source.push('\n');
            lines.push(line);
        }
        source.push_str("end\n");
    }

    let d = TestDriver::start_with(
        &source,
        &[],
        &[("Greeting", "hello"), ("Weird \u{1} name", "x")],
    );
    let mut violations = Vec::new();
    for b in 0..batches {
        d.send(DriverEvent::Command {
            command: format!("B{b}"),
            params: vec![],
        });
        let done = format!("{MARK}done B{b} ");
        let (event, skipped) = d.wait_for(|e| e.starts_with(&done));
        let ran: usize = event[done.len()..].parse().expect("call count");
        assert_eq!(
            ran,
            ((b + 1) * BATCH).min(calls),
            "batch B{b} did not finish"
        );
        for e in skipped {
            if let Some(report) = e.strip_prefix(&format!("{MARK}BAD ")) {
                let index: usize = report
                    .split(' ')
                    .next()
                    .and_then(|i| i.parse().ok())
                    .unwrap_or(usize::MAX);
                let line = lines.get(index).map(String::as_str).unwrap_or("?");
                let line: String = line.chars().take(300).collect();
                violations.push(format!("{report}\n    call: {line}"));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "seed {seed}: {} calls broke the contract:\n{}",
        violations.len(),
        violations.join("\n")
    );

    // Still alive: timers set by the fuzz may fire, commands are still answered.
    std::thread::sleep(Duration::from_millis(50));
    d.send(DriverEvent::Command {
        command: "ALIVE".into(),
        params: vec![],
    });
    let (alive, _) = d.wait_for(|e| e.starts_with(&format!("{MARK}alive")));
    assert_eq!(alive, format!("{MARK}alive {calls}"));
    let after = d.stop();
    assert!(
        after.iter().any(|e| *e == format!("{MARK}destroyed")),
        "OnDriverDestroyed did not run"
    );
    assert_eq!(
        FOREIGN_PANICS.load(Ordering::SeqCst),
        0,
        "a driver or MQTT thread panicked (see the test's output)"
    );
}

const CLIENTS: &[&str] = &["P.m", "P.m5", "P.c"];

#[test]
fn mqtt_methods_with_random_arguments_return_only_the_specs_shapes() {
    fuzz(0x4d51_5454, 3000, &[(CLIENTS, MQTT_METHODS)]);
}

#[test]
fn mqtt_methods_on_v5_clients_with_random_properties() {
    fuzz(0x0005_0005, 2000, &[(&["P.m5", "P.c"], MQTT_METHODS)]);
}

#[test]
fn c4_functions_with_random_arguments_refuse_with_nil_and_a_message() {
    fuzz(0x0000_00c4, 3000, &[(&["C4"], C4_FUNCTIONS)]);
}

#[test]
fn c4_and_mqtt_calls_interleaved() {
    fuzz(
        0x1_2345,
        2000,
        &[
            (&["C4"], C4_FUNCTIONS),
            (CLIENTS, MQTT_METHODS),
            (&["P.timer", "(P.timers[1] or P.timer)"], TIMER_METHODS),
        ],
    );
}
