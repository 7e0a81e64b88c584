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

    /// Whether there was a file at all (`load` found none: an empty config).
    pub fn exists(&self) -> bool {
        self.path.is_some() || !self.table.is_empty()
    }

    /// Deserializes section `[name]`; `None` when the file has no such section. An error names the field
    /// (`[host].vmid`) and says what was expected in words.
    pub fn section<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        let Some(value) = self.table.get(name) else {
            return Ok(None);
        };
        let file = self
            .path
            .as_deref()
            .map_or_else(|| DEFAULT_PATH.to_string(), |p| p.display().to_string());
        serde_path_to_error::deserialize::<_, T>(value.clone())
            .map(Some)
            .map_err(|e| {
                let path = e.path().to_string();
                let raw = e.inner().message();
                if let Some(msg) = unknown_key(raw) {
                    // The path ends at the unknown key itself: name the table it is in.
                    let table = path
                        .rsplit_once('.')
                        .map_or(String::new(), |(t, _)| format!(".{t}"));
                    return anyhow::anyhow!("{file}: [{name}]{table}: {msg}");
                }
                let message = in_words(raw);
                if path.is_empty() || path == "." {
                    anyhow::anyhow!("{file}: in [{name}]: {message}")
                } else {
                    anyhow::anyhow!("{file}: [{name}].{path}: {message}")
                }
            })
    }
}

/// serde's messages speak Rust (`invalid type: string "abc", expected u32`): say the same in words.
pub fn in_words(message: &str) -> String {
    let mut m = message.trim().to_string();
    for (rust, words) in [
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u64", "expected a whole number of 0 or more"),
        ("expected usize", "expected a whole number of 0 or more"),
        ("expected i32", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected f32", "expected a number"),
        ("expected f64", "expected a number"),
        ("expected a sequence", "expected a list [..]"),
        ("expected a map", "expected a table"),
    ] {
        if let Some(rest) = m.strip_suffix(rust) {
            m = format!("{rest}{words}");
        }
    }
    if let Some(rest) = m.strip_prefix("invalid type: ") {
        // "string \"abc\", expected …" → "expected …, found the string \"abc\""
        if let Some((found, expected)) = rest.split_once(", expected ") {
            return format!("expected {expected}, found {}", found_in_words(found));
        }
    }
    if let Some(rest) = m.strip_prefix("invalid value: ")
        && let Some((found, expected)) = rest.split_once(", expected ")
    {
        return format!("expected {expected}, found {}", found_in_words(found));
    }
    m.replace("struct ", "a table ")
}

/// `unknown field `contxt`, expected one of `context`, …` → the key and the nearest valid one.
fn unknown_key(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (key, rest) = rest.split_once('`')?;
    let valid: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    let nearest = valid
        .iter()
        .map(|v| (edit_distance(key, v), *v))
        .min()
        .filter(|(d, v)| *d <= 2.max(v.len() / 3));
    let list = valid.join(", ");
    Some(match nearest {
        Some((_, v)) => format!("unknown key `{key}`; did you mean `{v}`? (valid keys: {list})"),
        None if valid.is_empty() => format!("unknown key `{key}`; this table takes no keys"),
        None => format!("unknown key `{key}` (valid keys: {list})"),
    })
}

/// Levenshtein distance, for "did you mean".
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn found_in_words(found: &str) -> String {
    let found = found.replace('`', "");
    let found = found.as_str();
    match found.split_once(' ') {
        Some(("string", v)) => format!("the text {v}"),
        Some(("integer", v)) => format!("the number {v}"),
        Some(("floating", v)) => format!("the number {}", v.trim_start_matches("point ")),
        Some(("boolean", v)) => v.to_string(),
        _ => match found {
            "sequence" => "a list".into(),
            "map" => "a table".into(),
            other => other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Host {
        target: String,
        vmid: u32,
        port: Option<u16>,
    }

    #[test]
    fn type_errors_name_the_field_and_speak_words() {
        let f = ConfigFile::parse(
            "[host]\ntarget = \"x\"\nvmid = \"abc\"\n",
            Some("a.toml".into()),
        )
        .unwrap();
        let e = f.section::<Host>("host").unwrap_err().to_string();
        assert_eq!(
            e,
            "a.toml: [host].vmid: expected a whole number from 0 to 4294967295, found the text \"abc\""
        );
        let f =
            ConfigFile::parse("[host]\ntarget = \"x\"\nvmid = 1\nport = 70000\n", None).unwrap();
        let e = f.section::<Host>("host").unwrap_err().to_string();
        assert!(e.starts_with("llmctl.toml: [host].port: "), "{e}");
        assert!(!e.contains("u16"), "{e}");
        let f = ConfigFile::parse("[host]\ntarget = 3\nvmid = 1\n", None).unwrap();
        let e = f.section::<Host>("host").unwrap_err().to_string();
        assert_eq!(
            e,
            "llmctl.toml: [host].target: expected a string, found the number 3"
        );
    }

    #[test]
    fn unknown_keys_suggest_the_nearest() {
        let f = ConfigFile::parse("[host]\ntarget = \"x\"\nvmdi = 1\n", None).unwrap();
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Strict {
            target: String,
            vmid: Option<u32>,
        }
        let e = f.section::<Strict>("host").unwrap_err().to_string();
        assert_eq!(
            e,
            "llmctl.toml: [host]: unknown key `vmdi`; did you mean `vmid`? (valid keys: target, vmid)"
        );
        assert_eq!(edit_distance("contxt", "context"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn no_file_is_not_a_file() {
        assert!(!ConfigFile::default().exists());
        assert!(ConfigFile::parse("[host]\n", None).unwrap().exists());
    }
}
