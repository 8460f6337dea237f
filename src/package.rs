//! Placeholder until the package loader lands: loads a plain `.lua` driver.
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct DriverPackage {
    pub path: PathBuf,
    pub name: String,
    pub main_source: Vec<u8>,
    pub main_chunk_name: String,
    pub modules: ModuleSource,
    pub properties: Vec<(String, String)>,
    pub config: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub enum ModuleSource {
    Dir(PathBuf),
    Archive(HashMap<String, Vec<u8>>),
}

impl ModuleSource {
    pub fn find(&self, module: &str) -> Option<(String, Vec<u8>)> {
        let rel = module.replace('.', "/") + ".lua";
        match self {
            ModuleSource::Dir(dir) => {
                let p = dir.join(&rel);
                std::fs::read(&p)
                    .ok()
                    .map(|s| (format!("@{}", p.display()), s))
            }
            ModuleSource::Archive(files) => files.get(&rel).map(|s| (rel.clone(), s.clone())),
        }
    }
}

#[derive(Debug)]
pub struct PackageError(pub String);

impl fmt::Display for PackageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PackageError {}

impl DriverPackage {
    pub fn load(path: &Path) -> Result<DriverPackage, PackageError> {
        let main_source = std::fs::read(path)
            .map_err(|e| PackageError(format!("cannot read {}: {e}", path.display())))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "driver".into());
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(DriverPackage {
            path: path.to_path_buf(),
            name,
            main_source,
            main_chunk_name: format!("@{}", path.display()),
            modules: ModuleSource::Dir(dir),
            properties: Vec::new(),
            config: BTreeMap::new(),
        })
    }
}
