//! `C4:JsonEncode(value, formatted, encodeArrays)` and `C4:JsonDecode(s, decodeNull)`.
//!
//! In: a Lua value (encode) or JSON text (decode). Out: JSON text or a Lua value, or a
//! readable message that the Lua binding returns as `nil, message`. The sentinel
//! `c4json.null` is [`mlua::Value::NULL`] (a light userdata holding NULL).
//!
//! # What DriverWorks documents, and what we do
//!
//! From the DriverWorks API reference (JSON Interface: `c4json.null`, `JsonEncode`,
//! `JsonDecode`):
//!
//! - Encodable values are numbers, strings, booleans and tables of those; a table (at any
//!   depth) holding a function, userdata, light userdata or thread makes the call fail.
//!   Ours fails with a message naming the type and where it sits (`at value.cb.on_connect`).
//!   `c4json.null` is the one light userdata allowed: it encodes as `null`.
//! - A value that is not a table is wrapped in an object under a fabricated name:
//!   `C4:JsonEncode("Bar")` is `{":string:":"Bar"}`; `:number:` and `:boolean:` likewise.
//!   Decoding reverses it: `{":number:":42}` decodes to `42`. We unwrap only a top-level
//!   object whose single key is one of those names and whose value has that type.
//! - By default tables encode as objects, a number key becoming a string:
//!   `{"One","Two"}` is `{"1":"One","2":"Two"}`. With `encodeArrays`, a table that is a
//!   Lua array encodes as a JSON array `["One","Two"]`; a table with any other key stays an
//!   object. The docs call a table an array when every key is an integer > 0; we also
//!   require the keys to be exactly `1..n`, so a sparse table (`{[1]=a,[3]=b}`) stays an
//!   object with keys `"1"` and `"3"` instead of gaining invented `null`s (docs silent).
//! - `formatted` puts each member on its own line. The docs show a tab indent and
//!   `"key" : value`, and a short array on one line as `[ "One", "Two" ]`; we write that.
//! - `decodeNull` false (the default): JSON `null` decodes to an empty table; true: it
//!   decodes to `c4json.null`. Decoding never turns an object key back into a number:
//!   `{"1":"One"}` gives `t["1"]`, as the docs describe.
//!
//! Where the docs are silent, chosen for what a driver author expects:
//! - Integral numbers encode without a fraction (`1`, not `1.0`); others in the shortest
//!   form that reads back to the same double (`0.1`, `1e+300`). NaN and ±infinity have no
//!   JSON form and are an error. A decoded number is a Lua number.
//! - Object keys are written in a stable order, as a Lua table has none: number keys first
//!   in numeric order, then string keys in byte order. A number key and a string key that
//!   would give the same name (`t[1]` and `t["1"]`) are an error, never a silent loss.
//! - Boolean or table keys have no JSON form: error.
//! - An empty table is `{}`; with `encodeArrays` it is `[]` (vacuously an array).
//! - Strings must be UTF-8 (JSON text is); binary data wants `C4:Base64Encode` first.
//! - A table that contains itself is an error, not a stack overflow. The same table reached
//!   twice through different keys is fine and is written twice.
//! - Nesting is limited to [`MAX_DEPTH`] levels both ways, so all that encodes decodes.
//! - Broken JSON is an error ending in `at line L column C`.
//! - Top-level `nil` encodes as `null`.

use mlua::{Lua, Table, Value};
use serde_json::{Map, Number, Value as Json};
use std::ffi::c_void;

/// The deepest nesting of tables (encode) or arrays/objects (decode) accepted. It is the
/// limit of the JSON parser (serde_json refuses a 128th level), so every value this module
/// encodes can also be decoded.
pub const MAX_DEPTH: usize = 127;

/// Arrays of scalars up to this many characters are written on one line when formatted.
const INLINE_ARRAY_WIDTH: usize = 72;

/// Encodes `value` as JSON text (see the module doc for the rules).
pub fn encode(value: &Value, formatted: bool, encode_arrays: bool) -> Result<String, String> {
    let mut encoder = Encoder {
        encode_arrays,
        path: Vec::new(),
        open_tables: Vec::new(),
    };
    let fabricated_name = match value {
        Value::Boolean(_) => Some(":boolean:"),
        Value::Integer(_) | Value::Number(_) => Some(":number:"),
        Value::String(_) => Some(":string:"),
        _ => None,
    };
    let json = match fabricated_name {
        Some(name) => {
            let mut object = Map::new();
            object.insert(name.to_owned(), encoder.value(value)?);
            Json::Object(object)
        }
        None => encoder.value(value)?,
    };
    if formatted {
        let mut out = String::new();
        write_formatted(&mut out, &json, 0);
        Ok(out)
    } else {
        Ok(json.to_string())
    }
}

/// Decodes JSON `text` into a Lua value (see the module doc for the rules).
pub fn decode(lua: &Lua, text: &str, decode_null: bool) -> Result<Value, String> {
    let json: Json = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    decode_json(lua, &json, decode_null)
}

/// Like [`decode`] for text that may not be UTF-8 (a Lua string is bytes); invalid UTF-8 is
/// reported with its line and column like any other syntax error.
pub fn decode_bytes(lua: &Lua, text: &[u8], decode_null: bool) -> Result<Value, String> {
    let json: Json = serde_json::from_slice(text).map_err(|e| format!("invalid JSON: {e}"))?;
    decode_json(lua, &json, decode_null)
}

fn decode_json(lua: &Lua, json: &Json, decode_null: bool) -> Result<Value, String> {
    let unwrapped = match json {
        Json::Object(object) if object.len() == 1 => {
            object.iter().next().and_then(|(name, inner)| {
                let wrapped = matches!(
                    (name.as_str(), inner),
                    (":number:", Json::Number(_))
                        | (":string:", Json::String(_))
                        | (":boolean:", Json::Bool(_))
                );
                wrapped.then_some(inner)
            })
        }
        _ => None,
    };
    to_lua(lua, unwrapped.unwrap_or(json), decode_null)
        .map_err(|e| format!("cannot build the decoded value: {e}"))
}

fn to_lua(lua: &Lua, json: &Json, decode_null: bool) -> mlua::Result<Value> {
    Ok(match json {
        Json::Null if decode_null => Value::NULL,
        Json::Null => Value::Table(lua.create_table()?),
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::Integer(i),
            (None, Some(f)) => Value::Number(f),
            (None, None) => Value::Nil,
        },
        Json::String(s) => Value::String(lua.create_string(s)?),
        Json::Array(items) => {
            let table = lua.create_table_with_capacity(items.len(), 0)?;
            for (index, item) in items.iter().enumerate() {
                table.raw_set(index + 1, to_lua(lua, item, decode_null)?)?;
            }
            Value::Table(table)
        }
        Json::Object(members) => {
            let table = lua.create_table_with_capacity(0, members.len())?;
            for (name, member) in members {
                table.raw_set(name.as_str(), to_lua(lua, member, decode_null)?)?;
            }
            Value::Table(table)
        }
    })
}

/// Walks a Lua value into a `serde_json::Value`, remembering where it is for messages.
struct Encoder {
    encode_arrays: bool,
    /// Keys from the top value to the one being encoded, already rendered (`.name`, `[2]`).
    path: Vec<String>,
    /// The tables being encoded, outermost first: meeting one again is a cycle.
    open_tables: Vec<*const c_void>,
}

/// A table key as JSON can name it.
enum Key {
    Integer(i64),
    Float(f64),
    Text(String),
}

impl Key {
    fn sort_number(&self) -> Option<f64> {
        match self {
            Key::Integer(i) => Some(*i as f64),
            Key::Float(f) => Some(*f),
            Key::Text(_) => None,
        }
    }

    fn path_segment(&self) -> String {
        match self {
            Key::Integer(i) => format!("[{i}]"),
            Key::Float(f) => format!("[{f}]"),
            Key::Text(s) if is_identifier(s) => format!(".{s}"),
            Key::Text(s) => format!("[{s:?}]"),
        }
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Encoder {
    fn at(&self) -> String {
        if self.path.is_empty() {
            String::new()
        } else {
            format!(" (at value{})", self.path.concat())
        }
    }

    fn value(&mut self, value: &Value) -> Result<Json, String> {
        match value {
            Value::Nil => Ok(Json::Null),
            Value::LightUserData(p) if p.0.is_null() => Ok(Json::Null),
            Value::Boolean(b) => Ok(Json::Bool(*b)),
            Value::Integer(i) => Ok(Json::Number((*i).into())),
            Value::Number(n) => self.number(*n).map(Json::Number),
            Value::String(s) => match s.to_str() {
                Ok(text) => Ok(Json::String(text.to_owned())),
                Err(_) => Err(format!(
                    "cannot encode a string that is not valid UTF-8 as JSON{} \
                     (encode binary data with C4:Base64Encode first)",
                    self.at()
                )),
            },
            Value::Table(table) => self.table(table),
            other => Err(format!(
                "cannot encode a {} as JSON{}",
                other.type_name(),
                self.at()
            )),
        }
    }

    fn number(&self, n: f64) -> Result<Number, String> {
        if !n.is_finite() {
            let name = if n.is_nan() {
                "nan"
            } else if n > 0.0 {
                "inf"
            } else {
                "-inf"
            };
            return Err(format!(
                "cannot encode the number {name} as JSON, which has no NaN or infinity{}",
                self.at()
            ));
        }
        // |n| < 2^63 keeps the cast exact; -0.0 lands here too and is written as 0.
        if n.fract() == 0.0 && n.abs() < 9.223_372_036_854_776e18 {
            return Ok(Number::from(n as i64));
        }
        Number::from_f64(n).ok_or_else(|| format!("cannot encode the number {n}{}", self.at()))
    }

    fn key(&self, key: &Value) -> Result<Key, String> {
        match key {
            Value::Integer(i) => Ok(Key::Integer(*i)),
            Value::Number(n) if n.is_finite() => Ok(Key::Float(*n)),
            Value::Number(n) => Err(format!(
                "cannot encode a table with the key {n}: JSON has no name for it{}",
                self.at()
            )),
            Value::String(s) => match s.to_str() {
                Ok(text) => Ok(Key::Text(text.to_owned())),
                Err(_) => Err(format!(
                    "cannot encode a table key that is not valid UTF-8 as JSON{}",
                    self.at()
                )),
            },
            other => Err(format!(
                "cannot encode a table with a {} key as JSON: object keys are strings \
                 or numbers{}",
                other.type_name(),
                self.at()
            )),
        }
    }

    fn table(&mut self, table: &Table) -> Result<Json, String> {
        let pointer = table.to_pointer();
        if self.open_tables.contains(&pointer) {
            return Err(format!(
                "cannot encode a table that contains itself as JSON{}",
                self.at()
            ));
        }
        if self.open_tables.len() >= MAX_DEPTH {
            return Err(format!(
                "cannot encode tables nested more than {MAX_DEPTH} levels deep as JSON{}",
                self.at()
            ));
        }
        let mut entries = Vec::new();
        for pair in table.pairs::<Value, Value>() {
            let (key, value) =
                pair.map_err(|e| format!("cannot read a table: {e}{}", self.at()))?;
            entries.push((self.key(&key)?, value));
        }

        self.open_tables.push(pointer);
        let json = if self.encode_arrays && is_sequence(&entries) {
            self.array(entries)
        } else {
            self.object(entries)
        };
        self.open_tables.pop();
        json
    }

    fn array(&mut self, mut entries: Vec<(Key, Value)>) -> Result<Json, String> {
        entries.sort_by_key(|(key, _)| match key {
            Key::Integer(i) => *i,
            _ => 0,
        });
        let mut items = Vec::with_capacity(entries.len());
        for (key, value) in &entries {
            self.path.push(key.path_segment());
            let item = self.value(value);
            self.path.pop();
            items.push(item?);
        }
        Ok(Json::Array(items))
    }

    fn object(&mut self, mut entries: Vec<(Key, Value)>) -> Result<Json, String> {
        entries.sort_by(
            |(a, _), (b, _)| match (a.sort_number(), b.sort_number(), a, b) {
                (Some(x), Some(y), _, _) => x.total_cmp(&y),
                (Some(_), None, _, _) => std::cmp::Ordering::Less,
                (None, Some(_), _, _) => std::cmp::Ordering::Greater,
                (None, None, Key::Text(x), Key::Text(y)) => x.cmp(y),
                (None, None, _, _) => std::cmp::Ordering::Equal,
            },
        );
        let mut members = Map::with_capacity(entries.len());
        for (key, value) in &entries {
            let name = match key {
                Key::Integer(i) => i.to_string(),
                Key::Float(f) => self.number(*f)?.to_string(),
                Key::Text(s) => s.clone(),
            };
            if members.contains_key(&name) {
                return Err(format!(
                    "cannot encode a table with both a number key and a string key \
                     named \"{name}\" as JSON{}",
                    self.at()
                ));
            }
            self.path.push(key.path_segment());
            let member = self.value(value);
            self.path.pop();
            members.insert(name, member?);
        }
        Ok(Json::Object(members))
    }
}

/// True when the keys are exactly the integers 1..=n (any n, including 0).
fn is_sequence(entries: &[(Key, Value)]) -> bool {
    let count = entries.len() as i64;
    entries
        .iter()
        .all(|(key, _)| matches!(key, Key::Integer(i) if (1..=count).contains(i)))
}

fn is_scalar(json: &Json) -> bool {
    !matches!(json, Json::Array(_) | Json::Object(_))
}

fn write_indent(out: &mut String, depth: usize) {
    out.extend(std::iter::repeat_n('\t', depth));
}

fn write_formatted(out: &mut String, json: &Json, depth: usize) {
    match json {
        Json::Object(members) if members.is_empty() => out.push_str("{}"),
        Json::Array(items) if items.is_empty() => out.push_str("[]"),
        Json::Object(members) => {
            out.push_str("{\n");
            for (index, (name, member)) in members.iter().enumerate() {
                write_indent(out, depth + 1);
                out.push_str(&Json::from(name.as_str()).to_string());
                out.push_str(" : ");
                write_formatted(out, member, depth + 1);
                if index + 1 < members.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            write_indent(out, depth);
            out.push('}');
        }
        Json::Array(items) => {
            if items.iter().all(is_scalar) {
                let parts: Vec<String> = items.iter().map(Json::to_string).collect();
                let inline = format!("[ {} ]", parts.join(", "));
                if inline.len() <= INLINE_ARRAY_WIDTH {
                    out.push_str(&inline);
                    return;
                }
            }
            out.push_str("[\n");
            for (index, item) in items.iter().enumerate() {
                write_indent(out, depth + 1);
                write_formatted(out, item, depth + 1);
                if index + 1 < items.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            write_indent(out, depth);
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(lua: &Lua, code: &str) -> Value {
        lua.load(code).eval().expect("test Lua evaluates")
    }

    fn encode_lua(code: &str, formatted: bool, encode_arrays: bool) -> Result<String, String> {
        let lua = Lua::new();
        lua.globals()
            .set("null", Value::NULL)
            .expect("set the null sentinel");
        encode(&eval(&lua, code), formatted, encode_arrays)
    }

    #[test]
    fn a_table_with_string_keys_encodes_as_an_object_with_sorted_keys() {
        let json = encode_lua(
            "return { Qux = 'Norf', Biz = 'Baz', a = true }",
            false,
            false,
        );
        assert_eq!(
            json.as_deref(),
            Ok(r#"{"Biz":"Baz","Qux":"Norf","a":true}"#)
        );
    }

    #[test]
    fn an_array_encodes_as_an_object_with_string_keys_unless_encode_arrays_is_set() {
        let code = "return { 'One', 'Two', 'Three' }";
        assert_eq!(
            encode_lua(code, false, false).as_deref(),
            Ok(r#"{"1":"One","2":"Two","3":"Three"}"#)
        );
        assert_eq!(
            encode_lua(code, false, true).as_deref(),
            Ok(r#"["One","Two","Three"]"#)
        );
    }

    #[test]
    fn number_keys_are_ordered_numerically_before_string_keys() {
        let code = "local t = {} for i = 1, 11 do t[i] = i end t.x = 0 t[2.5] = 'h' return t";
        assert_eq!(
            encode_lua(code, false, false).as_deref(),
            Ok(
                r#"{"1":1,"2":2,"2.5":"h","3":3,"4":4,"5":5,"6":6,"7":7,"8":8,"9":9,"10":10,"11":11,"x":0}"#
            )
        );
    }

    #[test]
    fn encode_arrays_leaves_tables_with_other_keys_as_objects() {
        assert_eq!(
            encode_lua("return { Biz = 'Baz', list = { 1, 2 } }", false, true).as_deref(),
            Ok(r#"{"Biz":"Baz","list":[1,2]}"#)
        );
        assert_eq!(
            encode_lua("return { 'a', 'b', x = 1 }", false, true).as_deref(),
            Ok(r#"{"1":"a","2":"b","x":1}"#)
        );
    }

    #[test]
    fn a_sparse_array_stays_an_object_even_with_encode_arrays() {
        assert_eq!(
            encode_lua("return { [1] = 'a', [3] = 'c' }", false, true).as_deref(),
            Ok(r#"{"1":"a","3":"c"}"#)
        );
        assert_eq!(
            encode_lua("return { [0] = 'z', [1] = 'a' }", false, true).as_deref(),
            Ok(r#"{"0":"z","1":"a"}"#)
        );
    }

    #[test]
    fn an_empty_table_is_an_object_or_with_encode_arrays_an_array() {
        assert_eq!(encode_lua("return {}", false, false).as_deref(), Ok("{}"));
        assert_eq!(encode_lua("return {}", false, true).as_deref(), Ok("[]"));
        assert_eq!(
            encode_lua("return { a = {} }", true, false).as_deref(),
            Ok("{\n\t\"a\" : {}\n}")
        );
    }

    #[test]
    fn integers_encode_without_a_fraction_and_floats_in_shortest_form() {
        assert_eq!(
            encode_lua(
                "return { 1, 1.0, -3, 0.1, 2^53, 1e300, -0.0, 1/3 }",
                false,
                true
            )
            .as_deref(),
            Ok("[1,1,-3,0.1,9007199254740992,1e+300,0,0.3333333333333333]")
        );
    }

    #[test]
    fn nan_and_infinity_are_errors_that_say_where_they_are() {
        let err = encode_lua("return { x = { 0/0 } }", false, true).unwrap_err();
        assert!(
            err.contains("nan") && err.contains("at value.x[1]"),
            "{err}"
        );
        let err = encode_lua("return { y = math.huge }", false, false).unwrap_err();
        assert!(err.contains("inf") && err.contains("at value.y"), "{err}");
        let err = encode_lua("return { [math.huge] = 1 }", false, false).unwrap_err();
        assert!(err.contains("inf"), "{err}");
    }

    #[test]
    fn a_value_that_is_not_a_table_is_wrapped_under_a_fabricated_name() {
        assert_eq!(
            encode_lua("return 'Bar'", false, false).as_deref(),
            Ok(r#"{":string:":"Bar"}"#)
        );
        assert_eq!(
            encode_lua("return 42", false, false).as_deref(),
            Ok(r#"{":number:":42}"#)
        );
        assert_eq!(
            encode_lua("return false", false, false).as_deref(),
            Ok(r#"{":boolean:":false}"#)
        );
        assert_eq!(
            encode_lua("return nil", false, false).as_deref(),
            Ok("null")
        );
    }

    #[test]
    fn functions_userdata_and_threads_are_errors_naming_the_type_and_place() {
        let err = encode_lua("return { cb = { on_connect = print } }", false, false).unwrap_err();
        assert!(
            err.contains("function") && err.contains("at value.cb.on_connect"),
            "{err}"
        );
        let err = encode_lua("return { coroutine.create(print) }", false, true).unwrap_err();
        assert!(
            err.contains("thread") && err.contains("at value[1]"),
            "{err}"
        );
        let err = encode_lua("return { ['a b'] = io.stdout }", false, false).unwrap_err();
        assert!(
            err.contains("userdata") && err.contains("at value[\"a b\"]"),
            "{err}"
        );
        let err = encode_lua("return print", false, false).unwrap_err();
        assert!(err.starts_with("cannot encode a function"), "{err}");
    }

    #[test]
    fn boolean_and_table_keys_are_errors() {
        let err = encode_lua("return { [true] = 1 }", false, false).unwrap_err();
        assert!(err.contains("boolean key"), "{err}");
        let err = encode_lua("return { [{}] = 1 }", false, false).unwrap_err();
        assert!(err.contains("table key"), "{err}");
    }

    #[test]
    fn a_number_key_and_a_string_key_with_the_same_name_are_an_error() {
        let err = encode_lua("return { [1] = 'n', ['1'] = 's' }", false, false).unwrap_err();
        assert!(err.contains("named \"1\""), "{err}");
    }

    #[test]
    fn the_null_sentinel_encodes_as_null() {
        assert_eq!(
            encode_lua("return { 1, null, 3 }", false, true).as_deref(),
            Ok("[1,null,3]")
        );
        assert_eq!(
            encode_lua("return { a = null }", false, false).as_deref(),
            Ok(r#"{"a":null}"#)
        );
        assert_eq!(
            encode_lua("return null", false, false).as_deref(),
            Ok("null")
        );
    }

    #[test]
    fn a_table_that_contains_itself_is_an_error_not_a_stack_overflow() {
        let err =
            encode_lua("local t = { a = { } } t.a.back = t return t", false, false).unwrap_err();
        assert!(
            err.contains("contains itself") && err.contains("at value.a.back"),
            "{err}"
        );
    }

    #[test]
    fn the_same_table_reached_twice_is_encoded_twice() {
        assert_eq!(
            encode_lua("local s = { 1 } return { a = s, b = s }", false, true).as_deref(),
            Ok(r#"{"a":[1],"b":[1]}"#)
        );
    }

    #[test]
    fn strings_are_escaped_and_non_utf8_strings_are_an_error() {
        assert_eq!(
            encode_lua(
                r#"return { "quote\" back\\ nl\n tab\t \1 é" }"#,
                false,
                true
            )
            .as_deref(),
            Ok(r#"["quote\" back\\ nl\n tab\t \u0001 é"]"#)
        );
        let err = encode_lua(r#"return { bin = "\255\254" }"#, false, false).unwrap_err();
        assert!(err.contains("UTF-8") && err.contains("Base64"), "{err}");
    }

    #[test]
    fn formatted_output_uses_tabs_and_spaced_colons_and_short_arrays_inline() {
        let json = encode_lua(
            "return { Biz = 'Baz', list = { 'One', 'Two' }, nested = { { x = 1 } } }",
            true,
            true,
        );
        assert_eq!(
            json.as_deref(),
            Ok(
                "{\n\t\"Biz\" : \"Baz\",\n\t\"list\" : [ \"One\", \"Two\" ],\n\t\"nested\" : [\n\t\t{\n\t\t\t\"x\" : 1\n\t\t}\n\t]\n}"
            )
        );
    }

    #[test]
    fn formatted_long_arrays_take_one_line_per_item() {
        let json = encode_lua(
            "local t = {} for i = 1, 30 do t[i] = i * 1000 end return t",
            true,
            true,
        )
        .expect("encodes");
        assert!(json.starts_with("[\n\t1000,\n\t2000,\n"), "{json}");
        assert!(json.ends_with("\t30000\n]"), "{json}");
    }

    fn nested_tables(lua: &Lua, depth: usize) -> Value {
        let code = format!(
            "local t = {{}} local top = t for i = 2, {depth} do local n = {{}} t[1] = n t = n end return top"
        );
        eval(lua, &code)
    }

    #[test]
    fn tables_nested_up_to_max_depth_encode_and_decode_and_one_more_is_an_error() {
        let lua = Lua::new();
        let json = encode(&nested_tables(&lua, MAX_DEPTH), false, true).expect("MAX_DEPTH encodes");
        decode(&lua, &json, false).expect("what encodes also decodes");
        let err = encode(&nested_tables(&lua, MAX_DEPTH + 1), false, true).unwrap_err();
        assert!(err.contains("nested more than"), "{err}");
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_crash() {
        let lua = Lua::new();
        let text = "[".repeat(100_000);
        let err = decode(&lua, &text, false).unwrap_err();
        assert!(err.contains("recursion limit"), "{err}");
    }

    #[test]
    fn decoding_gives_tables_with_array_indices_and_string_keys() {
        let lua = Lua::new();
        let value = decode(
            &lua,
            r#"{"Contents":["Asia","Africa"],"n":1.5,"i":7,"ok":true,"1":"one"}"#,
            false,
        )
        .expect("decodes");
        lua.globals().set("v", value).expect("set");
        let check: bool = lua
            .load(
                r#"return v.Contents[1] == "Asia" and v.Contents[2] == "Africa" and #v.Contents == 2
                   and v.n == 1.5 and v.i == 7 and math.type == nil and v.ok == true
                   and v["1"] == "one" and v[1] == nil"#,
            )
            .eval()
            .expect("check runs");
        assert!(check);
    }

    #[test]
    fn null_decodes_to_an_empty_table_by_default_and_to_the_sentinel_with_decode_null() {
        let lua = Lua::new();
        lua.globals().set("null", Value::NULL).expect("set");
        let text = r#"{"a":null,"list":[1,null,3]}"#;
        lua.globals()
            .set("plain", decode(&lua, text, false).expect("decodes"))
            .expect("set");
        lua.globals()
            .set("sentinel", decode(&lua, text, true).expect("decodes"))
            .expect("set");
        let check: bool = lua
            .load(
                r#"return type(plain.a) == "table" and next(plain.a) == nil
                   and type(plain.list[2]) == "table" and plain.list[3] == 3
                   and sentinel.a == null and sentinel.list[2] == null and sentinel.list[3] == 3"#,
            )
            .eval()
            .expect("check runs");
        assert!(check);
        assert_eq!(decode(&lua, "null", true), Ok(Value::NULL));
    }

    #[test]
    fn a_fabricated_name_at_the_top_decodes_to_the_bare_value() {
        let lua = Lua::new();
        assert_eq!(
            decode(&lua, r#"{":number:":42}"#, false),
            Ok(Value::Integer(42))
        );
        assert_eq!(
            decode(&lua, r#"{":boolean:":true}"#, false),
            Ok(Value::Boolean(true))
        );
        let text = decode(&lua, r#"{":string:":"Bar"}"#, false).expect("decodes");
        assert_eq!(
            text.as_string().map(|s| s.to_string_lossy()),
            Some("Bar".into())
        );
        // Only a single member of the matching type is a wrapper.
        assert!(
            decode(&lua, r#"{":number:":"x"}"#, false)
                .expect("decodes")
                .is_table()
        );
    }

    #[test]
    fn a_value_round_trips_through_encode_and_decode() {
        let lua = Lua::new();
        for code in ["return 'Bar'", "return 12.5", "return true"] {
            let value = eval(&lua, code);
            let json = encode(&value, false, false).expect("encodes");
            assert_eq!(decode(&lua, &json, false).as_ref(), Ok(&value), "{json}");
        }
    }

    #[test]
    fn broken_json_is_an_error_with_line_and_column() {
        let lua = Lua::new();
        let err = decode(&lua, "{\n  \"a\": 1,\n  \"b\": x\n}", false).unwrap_err();
        assert!(err.ends_with("expected value at line 3 column 8"), "{err}");
        let err = decode(&lua, "", false).unwrap_err();
        assert!(err.contains("line 1 column 0"), "{err}");
        let err = decode(&lua, "[1] x", false).unwrap_err();
        assert!(
            err.contains("trailing characters at line 1 column 5"),
            "{err}"
        );
        let err = decode_bytes(&lua, b"[\"\xff\"]", false).unwrap_err();
        assert!(err.contains("line 1 column"), "{err}");
    }
}
