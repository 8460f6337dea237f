//! `C4:PersistSetValue(k, v)`, `C4:PersistGetValue(k)`, `C4:PersistDeleteValue(k)`.
//!
//! In: string keys and Lua values (strings, numbers, booleans, and tables of those, nested).
//! Out: the same values, with the same Lua types, as fresh Lua values; and, for a store opened
//! on a file, that file, rewritten atomically (temporary file + rename) after every change so
//! the values survive a restart of the driver.
//!
//! DriverWorks (API reference, `PersistSetValue`) accepts numbers, strings, booleans and
//! tables (nested, any mix of those) and fails for light userdata, userdata, functions and
//! threads at any depth; so does this store, with a message naming the type and place.
//! Choices where the docs are silent: setting `nil` deletes the key; a table that contains
//! itself, tables nested more than [`MAX_DEPTH`] deep, NaN and ±infinity are refused.
//!
//! The file is JSON, readable by a person:
//! `{"format": "luadriver-persist", "version": 1, "values": {KEY: STORED}}`, where STORED is
//! a JSON string, number or boolean for the Lua value of that type; a JSON array
//! `[k1, v1, k2, v2, ...]` (keys and values both STORED) for a table, so number keys stay
//! numbers; and `{"bytes": BASE64}` for a string that is not UTF-8, so binary data survives.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use mlua::{Lua, Value};
use serde_json::{Map, Number, Value as Json, json};
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The deepest nesting of tables a value may have. The file nests two levels above each
/// value and the JSON parser stops at 127, so this leaves room to read back what was saved.
pub const MAX_DEPTH: usize = 100;

const FORMAT: &str = "luadriver-persist";
const VERSION: u64 = 1;

/// A driver's persisted values, in memory or mirrored to a JSON file.
#[derive(Debug, Default)]
pub struct PersistStore {
    /// The file mirrored after every change; `None` keeps values in memory only.
    path: Option<PathBuf>,
    /// Values in their stored (JSON) form, checked when they entered the store.
    values: BTreeMap<String, Json>,
}

impl PersistStore {
    /// A store that forgets its values when dropped (`luadriver run`, tests).
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// A store backed by the file at `path`, loading the values it holds. A missing file is
    /// an empty store (the file and its folder are created on the first change); an
    /// unreadable or corrupt file is an error saying which and why.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, String> {
        let path = path.as_ref().to_path_buf();
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self {
                    path: Some(path),
                    values: BTreeMap::new(),
                });
            }
            Err(e) => {
                return Err(format!(
                    "cannot read persisted values from {}: {e}",
                    path.display()
                ));
            }
        };
        let values = parse_file(&text).map_err(|e| {
            format!(
                "the persisted values in {} are corrupt: {e}; move the file away to start \
                 with no persisted values",
                path.display()
            )
        })?;
        Ok(Self {
            path: Some(path),
            values,
        })
    }

    /// The backing file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The keys that have a value, in byte order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    /// Stores `value` under `key` (`nil` deletes it). On any error the store, and its file,
    /// keep the previous value.
    pub fn set(&mut self, key: &str, value: &Value) -> Result<(), String> {
        if value.is_nil() {
            return self.delete(key);
        }
        let stored = Storer::default().value(value)?;
        let previous = self.values.insert(key.to_owned(), stored);
        if let Err(e) = self.save() {
            match previous {
                Some(previous) => self.values.insert(key.to_owned(), previous),
                None => self.values.remove(key),
            };
            return Err(e);
        }
        Ok(())
    }

    /// The value stored under `key` as a new Lua value, or `nil` when there is none.
    pub fn get(&self, lua: &Lua, key: &str) -> mlua::Result<Value> {
        match self.values.get(key) {
            Some(stored) => to_lua(lua, stored),
            None => Ok(Value::Nil),
        }
    }

    /// Removes `key`; removing a key that has no value is not an error.
    pub fn delete(&mut self, key: &str) -> Result<(), String> {
        let Some(previous) = self.values.remove(key) else {
            return Ok(());
        };
        if let Err(e) = self.save() {
            self.values.insert(key.to_owned(), previous);
            return Err(e);
        }
        Ok(())
    }

    /// Removes every value (`C4:PersistDeleteAll`).
    pub fn delete_all(&mut self) -> Result<(), String> {
        let previous = std::mem::take(&mut self.values);
        if let Err(e) = self.save() {
            self.values = previous;
            return Err(e);
        }
        Ok(())
    }

    fn save(&self) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let values: Map<String, Json> = self
            .values
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let document = json!({ "format": FORMAT, "version": VERSION, "values": values });
        let text = serde_json::to_vec_pretty(&document)
            .map_err(|e| format!("cannot serialise persisted values: {e}"))?;
        write_atomically(path, &text)
            .map_err(|e| format!("cannot save persisted values to {}: {e}", path.display()))
    }
}

/// Writes `bytes` beside `path` and renames it into place, so a crash leaves either the old
/// file or the new one, never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut temporary_name = path.file_name().unwrap_or_default().to_os_string();
    temporary_name.push(".tmp");
    let temporary = path.with_file_name(temporary_name);
    let written = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

fn parse_file(text: &[u8]) -> Result<BTreeMap<String, Json>, String> {
    let document: Json = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    let Json::Object(mut document) = document else {
        return Err("the file does not hold a JSON object".into());
    };
    if document.get("format") != Some(&Json::from(FORMAT)) {
        return Err(format!("the file has no \"format\": \"{FORMAT}\""));
    }
    match document.get("version").and_then(Json::as_u64) {
        Some(VERSION) => {}
        Some(other) => {
            return Err(format!(
                "the file is version {other}; this luadriver reads version {VERSION}"
            ));
        }
        None => return Err("the file has no \"version\"".into()),
    }
    let Some(Json::Object(values)) = document.remove("values") else {
        return Err("the file has no \"values\" object".into());
    };
    let mut checked = BTreeMap::new();
    for (key, stored) in values {
        check_stored(&stored).map_err(|e| format!("the value of {key:?} {e}"))?;
        checked.insert(key, stored);
    }
    Ok(checked)
}

/// Verifies the stored form, so that `get` can only fail on an out-of-memory Lua state.
fn check_stored(stored: &Json) -> Result<(), String> {
    match stored {
        Json::String(_) | Json::Bool(_) => Ok(()),
        Json::Number(n) if n.as_f64().is_some() => Ok(()),
        Json::Object(object) => match (object.len(), object.get("bytes")) {
            (1, Some(Json::String(encoded))) => BASE64
                .decode(encoded)
                .map(drop)
                .map_err(|e| format!("holds bytes that are not valid base64: {e}")),
            _ => Err("holds an object other than {\"bytes\": ...}".into()),
        },
        Json::Array(items) if items.len() % 2 == 0 => {
            for (index, item) in items.iter().enumerate() {
                if index % 2 == 0 && matches!(item, Json::Array(_)) {
                    return Err("holds a table with a table as a key".into());
                }
                check_stored(item)?;
            }
            Ok(())
        }
        Json::Array(_) => Err("holds a table with an odd number of keys and values".into()),
        _ => Err(format!("holds {stored}, which is not a stored value")),
    }
}

fn to_lua(lua: &Lua, stored: &Json) -> mlua::Result<Value> {
    Ok(match stored {
        Json::String(s) => Value::String(lua.create_string(s)?),
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::Integer(i),
            (None, Some(f)) => Value::Number(f),
            (None, None) => Value::Nil,
        },
        Json::Object(object) => {
            let encoded = object
                .get("bytes")
                .and_then(Json::as_str)
                .unwrap_or_default();
            let bytes = BASE64.decode(encoded).map_err(mlua::Error::external)?;
            Value::String(lua.create_string(bytes)?)
        }
        Json::Array(items) => {
            let table = lua.create_table_with_capacity(0, items.len() / 2)?;
            for pair in items.chunks_exact(2) {
                table.raw_set(to_lua(lua, &pair[0])?, to_lua(lua, &pair[1])?)?;
            }
            Value::Table(table)
        }
        Json::Null => Value::Nil,
    })
}

/// Walks a Lua value into its stored form, remembering where it is for messages.
#[derive(Default)]
struct Storer {
    /// Keys from the top value to the one being stored, rendered (`.name`, `[2]`).
    path: Vec<String>,
    /// The tables being stored, outermost first: meeting one again is a cycle.
    open_tables: Vec<*const c_void>,
}

impl Storer {
    fn at(&self) -> String {
        if self.path.is_empty() {
            String::new()
        } else {
            format!(" (at value{})", self.path.concat())
        }
    }

    fn scalar(&self, value: &Value, role: &str) -> Result<Json, String> {
        match value {
            Value::Boolean(b) => Ok(Json::Bool(*b)),
            Value::Integer(i) => Ok(Json::Number((*i).into())),
            Value::Number(n) => Number::from_f64(*n)
                .map(Json::Number)
                .ok_or_else(|| format!("cannot persist the number {n} as a {role}{}", self.at())),
            Value::String(s) => Ok(match s.to_str() {
                Ok(text) => Json::String(text.to_owned()),
                Err(_) => json!({ "bytes": BASE64.encode(s.as_bytes()) }),
            }),
            other => Err(format!(
                "cannot persist a {} as a {role}{}",
                other.type_name(),
                self.at()
            )),
        }
    }

    fn value(&mut self, value: &Value) -> Result<Json, String> {
        let Value::Table(table) = value else {
            return self.scalar(value, "value");
        };
        let pointer = table.to_pointer();
        if self.open_tables.contains(&pointer) {
            return Err(format!(
                "cannot persist a table that contains itself{}",
                self.at()
            ));
        }
        if self.open_tables.len() >= MAX_DEPTH {
            return Err(format!(
                "cannot persist tables nested more than {MAX_DEPTH} levels deep{}",
                self.at()
            ));
        }
        let mut entries = Vec::new();
        for pair in table.pairs::<Value, Value>() {
            entries.push(pair.map_err(|e| format!("cannot read a table: {e}{}", self.at()))?);
        }
        self.open_tables.push(pointer);
        let mut items = Vec::with_capacity(entries.len() * 2);
        let mut result = Ok(());
        for (key, value) in &entries {
            let stored_key = match self.scalar(key, "table key") {
                Ok(stored_key) => stored_key,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            self.path.push(path_segment(key));
            let stored_value = self.value(value);
            self.path.pop();
            match stored_value {
                Ok(stored_value) => items.extend([stored_key, stored_value]),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.open_tables.pop();
        result.map(|()| Json::Array(items))
    }
}

fn path_segment(key: &Value) -> String {
    match key {
        Value::String(s) => {
            let text = s.to_string_lossy();
            let mut chars = text.chars();
            let identifier = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if identifier {
                format!(".{text}")
            } else {
                format!("[{text:?}]")
            }
        }
        Value::Integer(i) => format!("[{i}]"),
        Value::Number(n) => format!("[{n}]"),
        other => format!("[{}]", other.type_name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(lua: &Lua, code: &str) -> Value {
        lua.load(code).eval().expect("test Lua evaluates")
    }

    /// Runs `check` (a Lua expression over `v`) against the value read back for `key`.
    fn holds(lua: &Lua, store: &PersistStore, key: &str, check: &str) -> bool {
        let value = store.get(lua, key).expect("get succeeds");
        lua.globals().set("v", value).expect("set v");
        lua.load(check).eval().expect("check runs")
    }

    #[test]
    fn values_come_back_with_the_same_lua_types() {
        let lua = Lua::new();
        let mut store = PersistStore::in_memory();
        for (key, code) in [
            ("number", "return 1"),
            ("float", "return 2.5"),
            ("text", "return '1'"),
            ("flag", "return false"),
        ] {
            store.set(key, &eval(&lua, code)).expect("set succeeds");
        }
        assert!(holds(
            &lua,
            &store,
            "number",
            "return type(v) == 'number' and v == 1"
        ));
        assert!(holds(&lua, &store, "float", "return v == 2.5"));
        assert!(holds(
            &lua,
            &store,
            "text",
            "return type(v) == 'string' and v == '1'"
        ));
        assert!(holds(&lua, &store, "flag", "return v == false"));
    }

    #[test]
    fn nested_tables_keep_their_number_and_string_keys() {
        let lua = Lua::new();
        let mut store = PersistStore::in_memory();
        let value = eval(
            &lua,
            "return { 'a', 'b', ['1'] = 'string one', [2.5] = true, sub = { x = { 10, 20 } } }",
        );
        store.set("t", &value).expect("set succeeds");
        assert!(holds(
            &lua,
            &store,
            "t",
            "return v[1] == 'a' and v[2] == 'b' and v['1'] == 'string one' and v[2.5] == true
                and v.sub.x[2] == 20 and #v.sub.x == 2",
        ));
    }

    #[test]
    fn a_value_read_back_is_a_copy_not_the_stored_table() {
        let lua = Lua::new();
        let mut store = PersistStore::in_memory();
        let value = eval(&lua, "return { n = 1 }");
        store.set("t", &value).expect("set succeeds");
        lua.globals().set("orig", value).expect("set");
        lua.load("orig.n = 2").exec().expect("mutate");
        assert!(holds(&lua, &store, "t", "return v.n == 1"));
    }

    #[test]
    fn an_absent_key_is_nil_and_nil_or_delete_removes_a_key() {
        let lua = Lua::new();
        let mut store = PersistStore::in_memory();
        assert_eq!(store.get(&lua, "missing").expect("get"), Value::Nil);
        store.set("a", &Value::Boolean(true)).expect("set");
        store.set("b", &Value::Boolean(true)).expect("set");
        store.set("a", &Value::Nil).expect("setting nil");
        store.delete("b").expect("delete");
        store.delete("never there").expect("deleting an absent key");
        assert_eq!(store.keys().count(), 0);
    }

    #[test]
    fn functions_userdata_and_cycles_are_errors_and_leave_the_old_value() {
        let lua = Lua::new();
        let mut store = PersistStore::in_memory();
        store.set("k", &Value::Integer(7)).expect("set");
        let err = store
            .set("k", &eval(&lua, "return { cb = { print } }"))
            .unwrap_err();
        assert!(
            err.contains("function") && err.contains("at value.cb[1]"),
            "{err}"
        );
        let err = store.set("k", &eval(&lua, "return io.stdout")).unwrap_err();
        assert!(err.contains("userdata"), "{err}");
        let err = store.set("k", &Value::NULL).unwrap_err();
        assert!(err.contains("lightuserdata"), "{err}");
        let err = store
            .set("k", &eval(&lua, "local t = {} t.me = t return t"))
            .unwrap_err();
        assert!(err.contains("contains itself"), "{err}");
        let err = store
            .set("k", &eval(&lua, "return { [{}] = 1 }"))
            .unwrap_err();
        assert!(err.contains("table key"), "{err}");
        let err = store.set("k", &eval(&lua, "return { 0/0 }")).unwrap_err();
        assert!(err.contains("NaN") && err.contains("at value[1]"), "{err}");
        assert_eq!(store.get(&lua, "k").expect("get"), Value::Integer(7));
    }

    #[test]
    fn values_survive_reopening_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state").join("driver-1.json");
        let lua = Lua::new();
        {
            let mut store = PersistStore::open(&path).expect("a missing file opens empty");
            store.set("count", &Value::Integer(3)).expect("set");
            store.set("name", &eval(&lua, "return '007'")).expect("set");
            store
                .set(
                    "cfg",
                    &eval(&lua, "return { hosts = { 'a', 'b' }, port = 1883 }"),
                )
                .expect("set");
            store
                .set("bin", &eval(&lua, r#"return "\0\255\1""#))
                .expect("set");
            store.set("gone", &Value::Boolean(true)).expect("set");
            store.delete("gone").expect("delete");
        }
        let store = PersistStore::open(&path).expect("reopens");
        assert_eq!(
            store.keys().collect::<Vec<_>>(),
            ["bin", "cfg", "count", "name"]
        );
        assert!(holds(&lua, &store, "count", "return v == 3"));
        assert!(holds(&lua, &store, "name", "return v == '007'"));
        assert!(holds(
            &lua,
            &store,
            "cfg",
            "return v.hosts[2] == 'b' and v.port == 1883"
        ));
        assert!(holds(&lua, &store, "bin", r#"return v == "\0\255\1""#));
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().expect("parent"))
            .expect("list")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            leftovers,
            ["driver-1.json"],
            "no temporary file is left behind"
        );
    }

    #[test]
    fn delete_all_empties_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("p.json");
        let mut store = PersistStore::open(&path).expect("opens");
        store.set("a", &Value::Integer(1)).expect("set");
        store.delete_all().expect("delete all");
        assert_eq!(
            PersistStore::open(&path).expect("reopens").keys().count(),
            0
        );
    }

    #[test]
    fn a_corrupt_file_is_a_readable_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("p.json");
        for (content, expected) in [
            (&b"{\"format\": \"luadriver-persist\", \"ver"[..], "line 1 column"),
            (b"[]", "not hold a JSON object"),
            (b"{\"format\": \"other\"}", "format"),
            (b"{\"format\": \"luadriver-persist\", \"version\": 9, \"values\": {}}", "version 9"),
            (
                b"{\"format\": \"luadriver-persist\", \"version\": 1, \"values\": {\"k\": [1]}}",
                "the value of \"k\"",
            ),
            (
                b"{\"format\": \"luadriver-persist\", \"version\": 1, \"values\": {\"k\": {\"bytes\": \"!\"}}}",
                "base64",
            ),
            (b"\xff\xfe", "line 1 column"),
        ] {
            std::fs::write(&path, content).expect("write");
            let err = PersistStore::open(&path).unwrap_err();
            assert!(err.contains("corrupt") && err.contains(expected), "{err}");
            assert!(err.contains(&path.display().to_string()), "{err}");
        }
    }

    #[test]
    fn a_failed_save_keeps_the_previous_value() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("p.json");
        let mut store = PersistStore::open(&path).expect("opens empty");
        store.set("a", &Value::Integer(1)).expect("set");
        // A folder where the temporary file goes makes the next save fail.
        std::fs::create_dir(dir.path().join("p.json.tmp")).expect("mkdir");
        let err = store.set("a", &Value::Integer(2)).unwrap_err();
        assert!(err.contains("cannot save"), "{err}");
        let err = store.delete("a").unwrap_err();
        assert!(err.contains("cannot save"), "{err}");
        let lua = Lua::new();
        assert_eq!(store.get(&lua, "a").expect("get"), Value::Integer(1));
        let reopened = PersistStore::open(&path).expect("reopens");
        assert_eq!(reopened.get(&lua, "a").expect("get"), Value::Integer(1));
    }

    #[test]
    fn tables_nested_max_depth_deep_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("p.json");
        let lua = Lua::new();
        let nested = |depth: usize| {
            eval(
                &lua,
                &format!(
                    "local t = {{ s = '\\255' }} local top = t for i = 2, {depth} do local n = {{ s = '\\255' }} t[1] = n t = n end return top"
                ),
            )
        };
        let mut store = PersistStore::open(&path).expect("opens");
        store
            .set("deep", &nested(MAX_DEPTH))
            .expect("MAX_DEPTH persists");
        let err = store.set("deeper", &nested(MAX_DEPTH + 1)).unwrap_err();
        assert!(err.contains("nested more than"), "{err}");
        let store = PersistStore::open(&path).expect("reopens");
        assert!(store.get(&lua, "deep").expect("get").is_table());
    }
}
