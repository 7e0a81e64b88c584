//! `llmctl.toml`: read once, and each command takes its own section, typed, with errors that name the file,
//! the section and the field.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;

/// The parsed file, kept as a table so each module deserializes only the section it owns.
#[derive(Debug, Clone, Default)]
pub struct ConfigFile {
    pub path: Option<PathBuf>,
    table: toml::Table,
}

pub const DEFAULT_PATH: &str = "llmctl.toml";

impl ConfigFile {
    /// Loads `explicit` (an error when missing), else `./llmctl.toml` when present, else an empty config.
    pub fn load(explicit: Option<&Path>) -> Result<Self> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => {
                let p = PathBuf::from(DEFAULT_PATH);
                if !p.exists() {
                    return Ok(Self::default());
                }
                p
            }
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text, Some(path))
    }

    pub fn parse(text: &str, path: Option<PathBuf>) -> Result<Self> {
        let name = path
            .as_deref()
            .map_or_else(|| DEFAULT_PATH.to_string(), |p| p.display().to_string());
        let table: toml::Table =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        Ok(ConfigFile { path, table })
    }

    /// Deserializes section `[name]`; `None` when the file has no such section.
    pub fn section<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        let Some(value) = self.table.get(name) else {
            return Ok(None);
        };
        let file = self
            .path
            .as_deref()
            .map_or_else(|| DEFAULT_PATH.to_string(), |p| p.display().to_string());
        T::deserialize(value.clone())
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{file}: in [{name}]: {}", e.message()))
    }
}
