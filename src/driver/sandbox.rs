//! A fresh Lua state with only what a DriverWorks driver may use.
//!
//! In: a module finder over the driver's folder or package. Out: a LuaJIT state with the Lua 5.1 libraries and
//! `bit`, without `ffi`, `debug`, `io.popen`, `os.execute`, `os.exit`, `package.loadlib`,
//! `string.dump`, C modules or binary (bytecode) chunks, and a `require` that finds Lua
//! modules in the driver's own folder or package, then in the runtime's `lua/` folder.

use mlua::{Function, Lua, LuaOptions, StdLib, Table, Value};

/// Lua modules shipped with the runtime (`lua/`), compiled in so the binary stands alone.
const RUNTIME_MODULES: &[(&str, &str)] = &[("prelude", include_str!("../../lua/prelude.lua"))];

/// Builds the sandboxed state. The prelude (Lua-side wrappers that must exist before the
/// driver runs) is loaded here too.
/// Finds a Lua module by name: its chunk name (for tracebacks) and source.
pub type ModuleFinder = Box<dyn Fn(&str) -> Option<(String, Vec<u8>)> + Send>;

pub fn new_state(modules: ModuleFinder) -> mlua::Result<Lua> {
    // ALL_SAFE on LuaJIT: everything but ffi and debug.
    let lua = Lua::new_with(StdLib::ALL_SAFE, LuaOptions::default())?;
    let globals = lua.globals();

    for (lib, names) in [
        ("os", &["execute", "exit"][..]),
        ("io", &["popen"][..]),
        ("package", &["loadlib"][..]),
        ("string", &["dump"][..]),
    ] {
        let table: Table = globals.get(lib)?;
        for name in names {
            table.raw_set(*name, Value::Nil)?;
        }
    }

    install_require(&lua, modules)?;
    run_runtime_module(&lua, "prelude")?;
    Ok(lua)
}

/// Replaces `package.loaders` with the preload searcher and one of ours, so `require`
/// never reaches the file system's C loaders.
fn install_require(lua: &Lua, modules: ModuleFinder) -> mlua::Result<()> {
    let package: Table = lua.globals().get("package")?;
    package.set("cpath", "")?;
    package.set("path", "")?;
    let loaders: Table = package.get("loaders")?;
    let preload: Function = loaders.get(1)?;

    let searcher = lua.create_function(move |lua, name: String| {
        if let Some((chunk_name, source)) = modules(&name) {
            let loader = lua
                .load(source)
                .set_name(chunk_name)
                .set_mode(mlua::chunk::ChunkMode::Text)
                .into_function()?;
            return Ok(Value::Function(loader));
        }
        if let Some((_, source)) = RUNTIME_MODULES.iter().find(|(n, _)| *n == name) {
            let loader = lua
                .load(*source)
                .set_name(format!("@lua/{name}.lua"))
                .into_function()?;
            return Ok(Value::Function(loader));
        }
        Ok(Value::String(lua.create_string(format!(
            "\n\tno module '{name}' in the driver's folder or package, nor in the runtime's lua/"
        ))?))
    })?;

    let new_loaders = lua.create_sequence_from([preload, searcher])?;
    package.set("loaders", new_loaders)?;
    Ok(())
}

fn run_runtime_module(lua: &Lua, name: &str) -> mlua::Result<()> {
    let (_, source) = RUNTIME_MODULES
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| mlua::Error::runtime(format!("no runtime module {name}")))?;
    lua.load(*source)
        .set_name(format!("@lua/{name}.lua"))
        .exec()
}
