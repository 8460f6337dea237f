//! Loading a driver from disk: a `.lua` file, a folder, or a `.c4z` package.
//!
//! In: a path. Out: a [`DriverPackage`] holding the main chunk's source and chunk name, where
//! `require` finds the driver's modules, the `Properties` defaults from `driver.xml` and its
//! root-level tags for `C4:GetDriverConfigInfo`; or a [`PackageError`] that reads as a
//! sentence. Nothing here runs Lua, and no input (however broken) makes it panic.
//!
//! - A `.lua` file is the main chunk as is; modules come from its folder, and a `driver.xml`
//!   beside it, if there is one, gives the name, config and properties (else the name is the
//!   file's stem).
//! - A folder holds `driver.xml` (optional) and the script it names (`driver.lua` if none).
//! - A `.c4z` is a zip holding `driver.xml` and `driver.lua` at its top level, plus Lua
//!   modules, possibly in subfolders. Only `driver.xml` and `*.lua` entries are unpacked
//!   (icons and web pages are not needed to run the driver), at most [`MAX_UNPACKED_BYTES`].
//!
//! `driver.xml`, as the DriverWorks XML reference describes it: the root `<devicedata>` has
//! `<name>`, `<version>`, `<manufacturer>`, `<model>`, `<created>`, `<modified>`, ... and a
//! `<config>` holding `<script file="driver.lua" .../>` and
//! `<properties><property><name/><type/><default/>...</property></properties>`. Types are
//! `STRING`, `LIST` (`<items><item>..`), `RANGED_INTEGER`/`RANGED_FLOAT` (`<minimum>`,
//! `<maximum>`), `DEVICE_SELECTOR`, `COLOR_SELECTOR`, `DYNAMIC_LIST`, `LINK`, `LABEL`,
//! `SCROLL`, `TRACK`, `CUSTOM_SELECT`, `PASSWORD` ... The reference does not say what a
//! property without `<default>` starts as; we take the first item of a list type, the
//! minimum of a ranged type, and `""` otherwise. A repeated property name keeps its first
//! definition. Values are trimmed of surrounding whitespace. `C4:GetDriverConfigInfo(tag)`
//! returns the inner XML of a root-level tag, so [`DriverPackage::config`] maps each
//! root-level tag to its text (unescaped) or, for a tag holding elements, its inner XML.
//! An encrypted script (`<script encryption="2">`) cannot run here and is reported as such.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

/// The most a `.c4z` may unpack to (its `driver.xml` and Lua files together).
pub const MAX_UNPACKED_BYTES: u64 = 64 * 1024 * 1024;

const DEFAULT_SCRIPT: &str = "driver.lua";
const DRIVER_XML: &str = "driver.xml";

/// A driver ready to be loaded into a Lua state.
#[derive(Debug, Clone)]
pub struct DriverPackage {
    /// The path it was loaded from.
    pub path: PathBuf,
    /// `<name>` from `driver.xml`, else the file's stem.
    pub name: String,
    /// The main chunk.
    pub main_source: Vec<u8>,
    /// `@<path>` for a `.lua` file, `@<pkg.c4z>/driver.lua` for a package, so tracebacks
    /// name the file.
    pub main_chunk_name: String,
    /// Where `require` finds the driver's own modules.
    pub modules: ModuleSource,
    /// Property names and their defaults from `driver.xml`, in document order.
    pub properties: Vec<(String, String)>,
    /// Root-level tags of `driver.xml` (`name`, `version`, `manufacturer`, `model`,
    /// `created`, `modified`, ...) for `C4:GetDriverConfigInfo`; always holds `name`.
    pub config: BTreeMap<String, String>,
}

/// Where a driver's Lua modules come from.
#[derive(Debug, Clone)]
pub enum ModuleSource {
    /// The folder of a `.lua` driver.
    Dir(PathBuf),
    /// The `.lua` entries of a `.c4z`, by their path inside it (`lib/util.lua`).
    Archive(HashMap<String, Vec<u8>>),
}

impl ModuleSource {
    /// The chunk name and source of `module` (`a.b` is `a/b.lua`, else `a/b/init.lua`).
    /// Names that could leave the folder (empty parts, slashes, `..`) find nothing; so does
    /// a file that a symbolic link places outside it. Archive chunk names are `@<entry>`;
    /// [`DriverPackage::find_module`] adds the package's path.
    pub fn find(&self, module: &str) -> Option<(String, Vec<u8>)> {
        let candidates = module_paths(module)?;
        match self {
            ModuleSource::Dir(dir) => {
                let root = dir.canonicalize().ok()?;
                candidates.iter().find_map(|relative| {
                    let path = dir.join(relative);
                    let real = path.canonicalize().ok()?;
                    if !real.starts_with(&root) || !real.is_file() {
                        return None;
                    }
                    let source = std::fs::read(&real).ok()?;
                    Some((format!("@{}", path.display()), source))
                })
            }
            ModuleSource::Archive(files) => candidates.iter().find_map(|relative| {
                let source = files.get(relative)?;
                Some((format!("@{relative}"), source.clone()))
            }),
        }
    }
}

impl DriverPackage {
    /// Like [`ModuleSource::find`], with chunk names that name the package for archives
    /// (`@<pkg.c4z>/lib/util.lua`), so tracebacks point into the right file.
    pub fn find_module(&self, module: &str) -> Option<(String, Vec<u8>)> {
        let (chunk_name, source) = self.modules.find(module)?;
        match self.modules {
            ModuleSource::Dir(_) => Some((chunk_name, source)),
            ModuleSource::Archive(_) => {
                let inner = chunk_name.trim_start_matches('@');
                Some((format!("@{}/{inner}", self.path.display()), source))
            }
        }
    }
}

/// `a.b` -> `["a/b.lua", "a/b/init.lua"]`, or `None` for a name that is not a plain module
/// path.
fn module_paths(module: &str) -> Option<[String; 2]> {
    let parts: Vec<&str> = module.split('.').collect();
    let plain = parts
        .iter()
        .all(|part| !part.is_empty() && !part.contains(['/', '\\', ':', '\0']) && *part != "~");
    if !plain {
        return None;
    }
    let base = parts.join("/");
    Some([format!("{base}.lua"), format!("{base}/init.lua")])
}

/// Why a driver could not be loaded.
#[derive(Debug)]
pub enum PackageError {
    NotFound {
        path: PathBuf,
    },
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Neither a `.lua` file, a `.c4z` file nor a folder.
    UnknownKind {
        path: PathBuf,
    },
    NotAZip {
        path: PathBuf,
        reason: String,
    },
    /// An entry of the zip could not be unpacked (corrupt, or an unsupported compression).
    BadZipEntry {
        path: PathBuf,
        entry: String,
        reason: String,
    },
    TooLarge {
        path: PathBuf,
        limit: u64,
    },
    /// The main script (`driver.lua` or the one `driver.xml` names) is missing.
    MissingScript {
        path: PathBuf,
        script: String,
        /// Where a file of that name was found instead (a zip of the driver's folder).
        found_at: Option<String>,
    },
    BadXml {
        /// The `driver.xml` (for a package: `<pkg.c4z>/driver.xml`).
        path: String,
        line: u32,
        column: u32,
        message: String,
    },
    NotDeviceData {
        path: String,
        root: String,
    },
    Encrypted {
        path: PathBuf,
        script: String,
    },
}

impl fmt::Display for PackageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PackageError::NotFound { path } => {
                write!(f, "driver file {} does not exist", path.display())
            }
            PackageError::Io { path, source } => {
                write!(f, "cannot read driver file {}: {source}", path.display())
            }
            PackageError::UnknownKind { path } => write!(
                f,
                "{} is not a driver: give a .lua file, a .c4z package or a folder holding \
                 driver.lua",
                path.display()
            ),
            PackageError::NotAZip { path, reason } => write!(
                f,
                "{} is not a valid .c4z package (a zip file): {reason}",
                path.display()
            ),
            PackageError::BadZipEntry {
                path,
                entry,
                reason,
            } => write!(f, "cannot unpack {entry} from {}: {reason}", path.display()),
            PackageError::TooLarge { path, limit } => write!(
                f,
                "{} unpacks to more than {} MiB of driver.xml and Lua files, which is more \
                 than a driver needs",
                path.display(),
                limit / (1024 * 1024)
            ),
            PackageError::MissingScript {
                path,
                script,
                found_at: Some(found_at),
            } => write!(
                f,
                "{} has no {script} at its top level (there is one at {found_at}: zip the \
                 contents of the driver's folder, not the folder)",
                path.display()
            ),
            PackageError::MissingScript { path, script, .. } => {
                write!(f, "{} has no {script}", path.display())
            }
            PackageError::BadXml {
                path,
                line,
                column,
                message,
            } => write!(
                f,
                "{path} is not well-formed XML at line {line}, column {column}: {message}"
            ),
            PackageError::NotDeviceData { path, root } => write!(
                f,
                "{path} is not a driver description: its root element is <{root}>, not \
                 <devicedata>"
            ),
            PackageError::Encrypted { path, script } => write!(
                f,
                "{script} in {} is encrypted, and luadriver can only run drivers whose \
                 source is readable: load the unencrypted driver",
                path.display()
            ),
        }
    }
}

impl std::error::Error for PackageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PackageError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Loads the driver at `path` (a `.lua` file, a `.c4z` package or a folder).
pub fn load(path: &Path) -> Result<DriverPackage, PackageError> {
    let metadata = std::fs::metadata(path).map_err(|source| io_error(path, source))?;
    if metadata.is_dir() {
        return load_folder(path);
    }
    let extension = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match extension.as_deref() {
        Some("lua") => load_lua(path),
        Some("c4z") => load_c4z(path),
        _ => Err(PackageError::UnknownKind {
            path: path.to_path_buf(),
        }),
    }
}

fn io_error(path: &Path, source: std::io::Error) -> PackageError {
    if source.kind() == std::io::ErrorKind::NotFound {
        PackageError::NotFound {
            path: path.to_path_buf(),
        }
    } else {
        PackageError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

fn load_folder(dir: &Path) -> Result<DriverPackage, PackageError> {
    let xml = read_xml_beside(dir)?;
    let script = xml
        .as_ref()
        .and_then(|xml| xml.script_file.clone())
        .unwrap_or_else(|| DEFAULT_SCRIPT.to_owned());
    let main = dir.join(&script);
    if !main.is_file() {
        return Err(PackageError::MissingScript {
            path: dir.to_path_buf(),
            script,
            found_at: None,
        });
    }
    let stem = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "driver".to_owned());
    lua_package(&main, dir, xml, stem)
}

fn load_lua(path: &Path) -> Result<DriverPackage, PackageError> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let xml = read_xml_beside(&dir)?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "driver".to_owned());
    lua_package(path, &dir, xml, stem)
}

fn lua_package(
    main: &Path,
    dir: &Path,
    xml: Option<DriverXml>,
    fallback_name: String,
) -> Result<DriverPackage, PackageError> {
    let main_source = std::fs::read(main).map_err(|source| io_error(main, source))?;
    let xml = xml.unwrap_or_default();
    let (name, config) = name_and_config(xml.config, fallback_name);
    Ok(DriverPackage {
        path: main.to_path_buf(),
        name,
        main_source,
        main_chunk_name: format!("@{}", main.display()),
        modules: ModuleSource::Dir(dir.to_path_buf()),
        properties: xml.properties,
        config,
    })
}

fn read_xml_beside(dir: &Path) -> Result<Option<DriverXml>, PackageError> {
    let path = dir.join(DRIVER_XML);
    match std::fs::read(&path) {
        Ok(bytes) => parse_driver_xml(&bytes, &path.display().to_string()).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PackageError::Io { path, source }),
    }
}

fn name_and_config(
    mut config: BTreeMap<String, String>,
    fallback_name: String,
) -> (String, BTreeMap<String, String>) {
    let name = match config.get("name").filter(|n| !n.is_empty()) {
        Some(name) => name.clone(),
        None => fallback_name,
    };
    config.insert("name".to_owned(), name.clone());
    (name, config)
}

fn load_c4z(path: &Path) -> Result<DriverPackage, PackageError> {
    let bytes = std::fs::read(path).map_err(|source| io_error(path, source))?;
    let mut files = unpack(path, bytes)?;
    let xml_path = format!("{}/{DRIVER_XML}", path.display());
    let xml = match files.remove(DRIVER_XML) {
        Some(bytes) => parse_driver_xml(&bytes, &xml_path)?,
        None => DriverXml::default(),
    };
    if let Some(script) = xml.encrypted_script.clone() {
        return Err(PackageError::Encrypted {
            path: path.to_path_buf(),
            script,
        });
    }
    let script = xml
        .script_file
        .clone()
        .unwrap_or_else(|| DEFAULT_SCRIPT.to_owned());
    let (main_source, main_chunk_name) = match (files.get(&script), &xml.inline_script) {
        (Some(source), _) => (source.clone(), format!("@{}/{script}", path.display())),
        (None, Some(inline)) if xml.script_file.is_none() => {
            (inline.clone().into_bytes(), format!("@{xml_path}"))
        }
        (None, _) => {
            let suffix = format!("/{script}");
            let mut elsewhere: Vec<&String> = files
                .keys()
                .filter(|name| name.ends_with(&suffix))
                .collect();
            elsewhere.sort();
            return Err(PackageError::MissingScript {
                path: path.to_path_buf(),
                script,
                found_at: elsewhere.first().map(|name| (*name).clone()),
            });
        }
    };
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "driver".to_owned());
    let (name, config) = name_and_config(xml.config, stem);
    Ok(DriverPackage {
        path: path.to_path_buf(),
        name,
        main_source,
        main_chunk_name,
        modules: ModuleSource::Archive(files),
        properties: xml.properties,
        config,
    })
}

/// The `driver.xml` and `*.lua` entries of a zip, by normalised path (`lib/util.lua`).
fn unpack(path: &Path, bytes: Vec<u8>) -> Result<HashMap<String, Vec<u8>>, PackageError> {
    let not_a_zip = |reason: String| PackageError::NotAZip {
        path: path.to_path_buf(),
        reason,
    };
    let mut archive =
        zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| not_a_zip(e.to_string()))?;
    let mut files = HashMap::new();
    let mut unpacked: u64 = 0;
    for index in 0..archive.len() {
        let mut entry = archive
            .by_index(index)
            .map_err(|e| not_a_zip(e.to_string()))?;
        if entry.is_dir() || entry.enclosed_name().is_none() {
            continue;
        }
        let name = normalise_entry_name(entry.name());
        let wanted = name == DRIVER_XML || name.to_ascii_lowercase().ends_with(".lua");
        if !wanted || name.is_empty() {
            continue;
        }
        let budget = MAX_UNPACKED_BYTES - unpacked;
        let mut content = Vec::new();
        (&mut entry)
            .take(budget + 1)
            .read_to_end(&mut content)
            .map_err(|e| PackageError::BadZipEntry {
                path: path.to_path_buf(),
                entry: name.clone(),
                reason: e.to_string(),
            })?;
        unpacked += content.len() as u64;
        if unpacked > MAX_UNPACKED_BYTES {
            return Err(PackageError::TooLarge {
                path: path.to_path_buf(),
                limit: MAX_UNPACKED_BYTES,
            });
        }
        files.insert(name, content);
    }
    Ok(files)
}

/// `./lib\util.lua` -> `lib/util.lua`.
fn normalise_entry_name(name: &str) -> String {
    name.replace('\\', "/")
        .split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// What `driver.xml` says that matters for running the driver.
#[derive(Debug, Default)]
struct DriverXml {
    config: BTreeMap<String, String>,
    properties: Vec<(String, String)>,
    /// `<config><script file="..."/>`.
    script_file: Option<String>,
    /// The text of `<config><script>` when it holds the script itself.
    inline_script: Option<String>,
    /// Set (to the script's name) when `<script encryption="N">` with N other than 0.
    encrypted_script: Option<String>,
}

fn parse_driver_xml(bytes: &[u8], path: &str) -> Result<DriverXml, PackageError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let before = &bytes[..e.valid_up_to()];
        let line = before.iter().filter(|b| **b == b'\n').count() as u32 + 1;
        let column = before.iter().rev().take_while(|b| **b != b'\n').count() as u32 + 1;
        PackageError::BadXml {
            path: path.to_owned(),
            line,
            column,
            message: "the text is not UTF-8".to_owned(),
        }
    })?;
    let document = roxmltree::Document::parse(text).map_err(|e| PackageError::BadXml {
        path: path.to_owned(),
        line: e.pos().row,
        column: e.pos().col,
        message: e.to_string(),
    })?;
    let root = document.root_element();
    if root.tag_name().name() != "devicedata" {
        return Err(PackageError::NotDeviceData {
            path: path.to_owned(),
            root: root.tag_name().name().to_owned(),
        });
    }

    let mut xml = DriverXml::default();
    for tag in root.children().filter(roxmltree::Node::is_element) {
        let name = tag.tag_name().name().to_owned();
        xml.config
            .entry(name)
            .or_insert_with(|| inner_xml(text, tag));
    }
    let config = child(root, "config");
    if let Some(script) = config.and_then(|c| child(c, "script")) {
        xml.script_file = script
            .attribute("file")
            .map(normalise_entry_name)
            .filter(|f| !f.is_empty());
        let inline = text_of(script);
        if !inline.is_empty() {
            xml.inline_script = Some(inline);
        }
        let encryption = script.attribute("encryption").map(str::trim).unwrap_or("0");
        if !encryption.is_empty() && encryption != "0" {
            xml.encrypted_script = Some(
                xml.script_file
                    .clone()
                    .unwrap_or_else(|| DEFAULT_SCRIPT.to_owned()),
            );
        }
    }
    let properties = config.and_then(|c| child(c, "properties"));
    for property in properties
        .into_iter()
        .flat_map(|p| p.children())
        .filter(|n| n.has_tag_name("property"))
    {
        let Some(name) = child(property, "name")
            .map(text_of)
            .filter(|n| !n.is_empty())
        else {
            continue;
        };
        if xml.properties.iter().any(|(existing, _)| *existing == name) {
            continue;
        }
        xml.properties.push((name, property_default(property)));
    }
    Ok(xml)
}

fn property_default(property: roxmltree::Node) -> String {
    if let Some(default) = child(property, "default") {
        return text_of(default);
    }
    let kind = child(property, "type")
        .map(text_of)
        .unwrap_or_default()
        .to_ascii_uppercase();
    let fallback = match kind.as_str() {
        "LIST" | "DYNAMIC_LIST" | "CUSTOM_SELECT" => child(property, "items")
            .and_then(|items| items.children().find(|n| n.has_tag_name("item")))
            .map(text_of),
        "RANGED_INTEGER" | "RANGED_FLOAT" | "SCROLL" | "TRACK" => {
            child(property, "minimum").map(text_of)
        }
        _ => None,
    };
    fallback.unwrap_or_default()
}

fn child<'a, 'input>(
    node: roxmltree::Node<'a, 'input>,
    name: &str,
) -> Option<roxmltree::Node<'a, 'input>> {
    node.children().find(|n| n.has_tag_name(name))
}

/// The element's text (entities and CDATA resolved), trimmed.
fn text_of(node: roxmltree::Node) -> String {
    let text: String = node
        .descendants()
        .filter(roxmltree::Node::is_text)
        .filter_map(|n| n.text())
        .collect();
    text.trim().to_owned()
}

/// What `C4:GetDriverConfigInfo` returns for a root-level tag: the inner XML of a tag that
/// holds elements, else its text.
fn inner_xml(source: &str, node: roxmltree::Node) -> String {
    if !node.children().any(|n| n.is_element()) {
        return text_of(node);
    }
    let (Some(first), Some(last)) = (node.first_child(), node.last_child()) else {
        return String::new();
    };
    source
        .get(first.range().start..last.range().end)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::io::Write;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(Path::new(FIXTURES).join(name)).expect("fixture exists")
    }

    /// Writes a zip of `entries` to `dir/name` and returns its path.
    fn write_c4z(dir: &Path, name: &str, entries: &[(&str, &[u8])]) -> PathBuf {
        let path = dir.join(name);
        let file = std::fs::File::create(&path).expect("create zip");
        let mut zip = zip::ZipWriter::new(file);
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (entry, content) in entries {
            if entry.ends_with('/') {
                zip.add_directory(*entry, options).expect("add dir");
            } else {
                zip.start_file(*entry, options).expect("start file");
                zip.write_all(content).expect("write entry");
            }
        }
        zip.finish().expect("finish zip");
        path
    }

    fn props(package: &DriverPackage) -> Vec<(&str, &str)> {
        package
            .properties
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn a_c4z_gives_source_chunk_name_properties_and_config() {
        let dir = tempfile::tempdir().expect("temp dir");
        let xml = fixture("driver.xml");
        let path = write_c4z(
            dir.path(),
            "sample.c4z",
            &[
                ("driver.xml", &xml),
                ("driver.lua", b"print('hi')"),
                ("lib/", b""),
                ("lib/util.lua", b"return 1"),
                ("lib/net/init.lua", b"return 2"),
                ("www/icon.png", b"\x89PNG"),
            ],
        );
        let package = load(&path).expect("loads");
        assert_eq!(package.name, "Sample MQTT Sensor");
        assert_eq!(package.main_source, b"print('hi')");
        assert_eq!(
            package.main_chunk_name,
            format!("@{}/driver.lua", path.display())
        );
        assert_eq!(
            props(&package),
            [
                ("Broker Address", "127.0.0.1"),
                ("Broker Port", "1883"),
                ("Log Level", "Info"),
                ("Mode", "Auto"),
                ("Poll Seconds", "5"),
                ("Password", ""),
                ("Note", "a & b"),
            ]
        );
        assert_eq!(
            package.config.get("version").map(String::as_str),
            Some("12")
        );
        assert_eq!(
            package.config.get("manufacturer").map(String::as_str),
            Some("Example Co")
        );
        assert_eq!(
            package.config.get("model").map(String::as_str),
            Some("MQTT-1")
        );
        assert_eq!(
            package.config.get("created").map(String::as_str),
            Some("01/02/2024 10:00 AM")
        );
        assert_eq!(
            package.config.get("custom_tag").map(String::as_str),
            Some("custom value")
        );
        let proxies = package.config.get("proxies").expect("proxies tag");
        assert!(proxies.starts_with("<proxy"), "{proxies}");
        match &package.modules {
            ModuleSource::Archive(files) => {
                assert!(!files.contains_key("www/icon.png"), "only Lua is unpacked");
            }
            ModuleSource::Dir(_) => panic!("a package's modules come from the archive"),
        }
        assert_eq!(
            package.modules.find("lib.util"),
            Some(("@lib/util.lua".to_owned(), b"return 1".to_vec()))
        );
        assert_eq!(
            package.find_module("lib.net"),
            Some((
                format!("@{}/lib/net/init.lua", path.display()),
                b"return 2".to_vec()
            ))
        );
        assert_eq!(package.find_module("lib.missing"), None);
    }

    #[test]
    fn a_lua_file_uses_its_folder_and_the_driver_xml_beside_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let main = dir.path().join("my_driver.lua");
        std::fs::write(&main, b"-- driver").expect("write");
        std::fs::create_dir(dir.path().join("lib")).expect("mkdir");
        std::fs::write(dir.path().join("lib").join("util.lua"), b"return 'u'").expect("write");

        let package = load(&main).expect("loads without driver.xml");
        assert_eq!(package.name, "my_driver");
        assert_eq!(
            package.config.get("name").map(String::as_str),
            Some("my_driver")
        );
        assert!(package.properties.is_empty());
        assert_eq!(package.main_chunk_name, format!("@{}", main.display()));
        let (chunk, source) = package.find_module("lib.util").expect("module found");
        assert_eq!(
            chunk,
            format!("@{}", dir.path().join("lib/util.lua").display())
        );
        assert_eq!(source, b"return 'u'");

        std::fs::write(dir.path().join("driver.xml"), fixture("driver.xml")).expect("write");
        let package = load(&main).expect("loads with driver.xml");
        assert_eq!(package.name, "Sample MQTT Sensor");
        assert_eq!(
            package.properties[0],
            ("Broker Address".into(), "127.0.0.1".into())
        );
    }

    #[test]
    fn a_folder_loads_the_script_driver_xml_names() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            dir.path().join("driver.xml"),
            br#"<devicedata><name>Folder</name><config><script file="main.lua"/></config></devicedata>"#,
        )
        .expect("write");
        let err = load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("has no main.lua"), "{err}");
        std::fs::write(dir.path().join("main.lua"), b"x = 1").expect("write");
        let package = load(dir.path()).expect("loads");
        assert_eq!(package.name, "Folder");
        assert_eq!(package.main_source, b"x = 1");
    }

    #[test]
    fn module_names_cannot_escape_the_driver_folder() {
        let dir = tempfile::tempdir().expect("temp dir");
        let inner = dir.path().join("driver");
        std::fs::create_dir(&inner).expect("mkdir");
        std::fs::write(dir.path().join("secret.lua"), b"return 'secret'").expect("write");
        let modules = ModuleSource::Dir(inner.clone());
        for name in [
            "..secret",
            ".secret",
            "a..b",
            "../secret",
            "/etc/passwd",
            "a\\b",
            "",
        ] {
            assert_eq!(modules.find(name), None, "{name:?}");
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.path().join("secret.lua"), inner.join("link.lua"))
                .expect("symlink");
            assert_eq!(
                modules.find("link"),
                None,
                "a link out of the folder is not followed"
            );
        }
        let archive = ModuleSource::Archive(HashMap::from([("a/b.lua".to_owned(), b"x".to_vec())]));
        assert!(archive.find("a.b").is_some());
        assert_eq!(archive.find("a/b"), None);
    }

    #[test]
    fn a_c4z_of_the_folder_instead_of_its_contents_says_where_driver_lua_is() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = write_c4z(
            dir.path(),
            "nested.c4z",
            &[
                ("mydriver/driver.lua", b"x"),
                ("mydriver/driver.xml", b"<devicedata/>"),
            ],
        );
        let err = load(&path).unwrap_err();
        assert!(matches!(err, PackageError::MissingScript { .. }), "{err:?}");
        assert!(err.to_string().contains("mydriver/driver.lua"), "{err}");
    }

    #[test]
    fn an_inline_script_in_driver_xml_is_the_main_chunk() {
        let dir = tempfile::tempdir().expect("temp dir");
        let xml = b"<devicedata><name>Old</name><config><script><![CDATA[x = 'inline' < 1]]></script></config></devicedata>";
        let path = write_c4z(dir.path(), "old.c4z", &[("driver.xml", xml)]);
        let package = load(&path).expect("loads");
        assert_eq!(package.main_source, b"x = 'inline' < 1");
        assert_eq!(
            package.main_chunk_name,
            format!("@{}/driver.xml", path.display())
        );
    }

    #[test]
    fn an_encrypted_driver_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().expect("temp dir");
        let xml = br#"<devicedata><config><script file="driver.lua" encryption="2"/></config></devicedata>"#;
        let path = write_c4z(
            dir.path(),
            "enc.c4z",
            &[("driver.xml", xml), ("driver.lua", b"\x01\x02")],
        );
        let err = load(&path).unwrap_err();
        assert!(err.to_string().contains("encrypted"), "{err}");
    }

    #[test]
    fn broken_driver_xml_names_the_line_and_column() {
        let dir = tempfile::tempdir().expect("temp dir");
        let xml = b"<devicedata>\n  <name>x</name>\n  <version>1</versio>\n</devicedata>";
        let path = write_c4z(
            dir.path(),
            "bad.c4z",
            &[("driver.xml", xml), ("driver.lua", b"")],
        );
        let err = load(&path).unwrap_err();
        match &err {
            PackageError::BadXml { line, .. } => assert_eq!(*line, 3),
            other => panic!("expected BadXml, got {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("bad.c4z/driver.xml is not well-formed XML at line 3"),
            "{text}"
        );

        let path = write_c4z(
            dir.path(),
            "root.c4z",
            &[("driver.xml", b"<driver/>"), ("driver.lua", b"")],
        );
        let err = load(&path).unwrap_err();
        assert!(
            err.to_string().contains("<driver>, not <devicedata>"),
            "{err}"
        );

        let path = write_c4z(
            dir.path(),
            "latin.c4z",
            &[
                (
                    "driver.xml",
                    b"<devicedata>\n<name>\xe9</name></devicedata>",
                ),
                ("driver.lua", b""),
            ],
        );
        let err = load(&path).unwrap_err();
        assert!(
            err.to_string()
                .contains("line 2, column 7: the text is not UTF-8"),
            "{err}"
        );
    }

    #[test]
    fn missing_files_and_unknown_kinds_are_readable_errors() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = load(&dir.path().join("nope.lua")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let txt = dir.path().join("notes.txt");
        std::fs::write(&txt, b"hi").expect("write");
        let err = load(&txt).unwrap_err();
        assert!(err.to_string().contains("not a driver"), "{err}");
        let fake = dir.path().join("fake.c4z");
        std::fs::write(&fake, b"print('not a zip')").expect("write");
        let err = load(&fake).unwrap_err();
        assert!(
            err.to_string().contains("is not a valid .c4z package"),
            "{err}"
        );
        let empty = write_c4z(dir.path(), "empty.c4z", &[("readme.txt", b"x")]);
        let err = load(&empty).unwrap_err();
        assert!(err.to_string().ends_with("has no driver.lua"), "{err}");
    }

    #[test]
    fn random_and_truncated_bytes_as_a_c4z_never_panic() {
        let dir = tempfile::tempdir().expect("temp dir");
        let xml = fixture("driver.xml");
        let good = write_c4z(
            dir.path(),
            "good.c4z",
            &[
                ("driver.xml", &xml),
                ("driver.lua", b"print(1)"),
                ("lib/a.lua", b"return 1"),
            ],
        );
        let good_bytes = std::fs::read(&good).expect("read");
        let target = dir.path().join("fuzz.c4z");
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x0c4c);
        let mut outcomes = (0, 0);
        for round in 0..3000 {
            let bytes = match round % 3 {
                0 => good_bytes[..rng.gen_range(0..good_bytes.len())].to_vec(),
                1 => {
                    let mut bytes = good_bytes.clone();
                    for _ in 0..rng.gen_range(1..8) {
                        let at = rng.gen_range(0..bytes.len());
                        bytes[at] = rng.r#gen();
                    }
                    bytes
                }
                _ => (0..rng.gen_range(0..512)).map(|_| rng.r#gen()).collect(),
            };
            std::fs::write(&target, &bytes).expect("write");
            match load(&target) {
                Ok(_) => outcomes.0 += 1,
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    outcomes.1 += 1;
                }
            }
        }
        assert!(
            outcomes.1 > 300,
            "most damaged packages are refused: {outcomes:?}"
        );
    }

    #[test]
    fn a_property_without_default_takes_the_first_item_or_the_minimum() {
        let xml = br#"<devicedata><config><properties>
            <property><name>L</name><type>LIST</type><items><item> first </item><item>second</item></items></property>
            <property><name>R</name><type>RANGED_FLOAT</type><minimum>0.5</minimum><maximum>9</maximum></property>
            <property><name>S</name><type>STRING</type></property>
            <property><name>L</name><type>STRING</type><default>dup</default></property>
            <property><type>STRING</type><default>nameless</default></property>
        </properties></config></devicedata>"#;
        let parsed = parse_driver_xml(xml, "driver.xml").expect("parses");
        assert_eq!(
            parsed.properties,
            [
                ("L".to_owned(), "first".to_owned()),
                ("R".to_owned(), "0.5".to_owned()),
                ("S".to_owned(), String::new())
            ]
        );
    }
}
