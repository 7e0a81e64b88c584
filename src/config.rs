//! `llmctl.toml`: read once, and each command takes the sections it needs, each with its one schema
//! ([`sections`]), with errors that name the file, the section and the field. An unknown section or key is an
//! error that suggests the nearest valid name, for every command alike.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

mod cluster;
mod inventory;
mod sections;
pub use cluster::{CLUSTER, Cluster, NodeEntry};
pub use inventory::{Entry as InventoryEntry, HOSTS};
pub use sections::*;

/// The parsed file, kept as a table so each command deserializes only the sections it reads (a bad value in
/// `[driver]` does not stop `serve-proxy`), each with its one schema. Section names are checked for every
/// command when the file is read.
#[derive(Debug, Clone, Default)]
pub struct ConfigFile {
    pub path: Option<PathBuf>,
    table: toml::Table,
    /// The inventory host this is the configuration of (`[[hosts]]`, [`ConfigFile::for_member`]): its
    /// messages name it.
    scope: Option<String>,
    /// Where the host's own settings are written ([`ConfigFile::entry`]).
    entry: Option<String>,
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
        let mut file = ConfigFile {
            path,
            table: toml::Table::new(),
            scope: None,
            entry: None,
        };
        file.table = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", file.name()))?;
        check_top_level(&file.table).map_err(|msg| anyhow::anyhow!("{}: {msg}", file.name()))?;
        // The inventory's and the cluster's shapes are checked for every command, as section names are.
        file.inventory()?;
        file.cluster()?;
        Ok(file)
    }

    /// The file's name for messages: its path, or `llmctl.toml` when there is none; with the inventory host
    /// when this is one host's configuration (`lab.toml (host pve2)`).
    pub fn name(&self) -> String {
        let file = self
            .path
            .as_deref()
            .map_or_else(|| DEFAULT_PATH.to_string(), |p| p.display().to_string());
        match &self.scope {
            Some(host) => format!("{file} (host {host})"),
            None => file,
        }
    }

    /// The inventory host this configuration is of ([`ConfigFile::for_member`]); `None` for the file itself.
    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// Whether the file has section `[name]` at all (client-config: a `[host]` means "from the host").
    pub fn has_section(&self, name: &str) -> bool {
        self.table.contains_key(name)
    }

    /// Every [`FieldError`] as one error naming the file, or `Ok` when there are none.
    pub fn report(&self, errors: &[FieldError]) -> Result<()> {
        if errors.is_empty() {
            return Ok(());
        }
        let lines: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
        anyhow::bail!("{} has invalid values:\n{}", self.name(), lines.join("\n"))
    }

    /// Whether there was a file at all (`load` found none: an empty config).
    pub fn exists(&self) -> bool {
        self.path.is_some() || !self.table.is_empty()
    }

    /// Section `T`, with its one schema; `None` when the file has no such section. An error names the field
    /// (`[host].vmid`) and says what was expected in words.
    pub fn section<T: Section>(&self) -> Result<Option<T>> {
        let name = T::NAME;
        let Some(value) = self.table.get(name) else {
            return Ok(None);
        };
        let file = self.name();
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
                if let Some(key) = missing_key(raw) {
                    return anyhow::anyhow!(
                        "{file}: [{name}]: missing key `{key}` (required when [{name}] is there)"
                    );
                }
                if (path.is_empty() || path == ".") && !value.is_table() {
                    // `host = "root@pve"` at the top: the section itself is not a table.
                    return anyhow::anyhow!(
                        "{file}: [{name}] must be a section (a `[{name}]` header with its keys under it), found {}",
                        value_in_words(value)
                    );
                }
                let message = unknown_variant(raw).unwrap_or_else(|| in_words(raw));
                let message = match expected_in_words(name, &path) {
                    Some(expected) => with_expected(&message, expected),
                    None => message,
                };
                if path.is_empty() || path == "." {
                    anyhow::anyhow!("{file}: in [{name}]: {message}")
                } else {
                    anyhow::anyhow!("{file}: [{name}].{path}: {message}")
                }
            })
    }

    /// Section `T`, or its defaults when the file has none.
    pub fn section_or_default<T: Section>(&self) -> Result<T> {
        Ok(self.section::<T>()?.unwrap_or_default())
    }
}

/// Every top-level name must be a known section: a misspelt `[modle]` would otherwise be ignored and its
/// settings silently replaced by defaults. A key outside any section is usually a forgotten header.
fn check_top_level(table: &toml::Table) -> std::result::Result<(), String> {
    let list = SECTIONS
        .iter()
        .map(|s| format!("[{s}]"))
        .collect::<Vec<_>>()
        .join(", ");
    for (name, value) in table {
        // The inventory and the cluster are not sections: `inventory::entries` and `cluster::cluster` check them.
        if SECTIONS.contains(&name.as_str()) || name == HOSTS || name == CLUSTER {
            continue;
        }
        if !value.is_table() {
            return Err(match section_with_key(name) {
                Some(section) => format!(
                    "`{name}` is outside any section; it belongs under [{section}] (put the line after a `[{section}]` header)"
                ),
                None => format!(
                    "`{name}` is outside any section and no section has such a key (sections: {list})"
                ),
            });
        }
        return Err(match nearest(name, SECTIONS.iter().copied()) {
            Some(s) => format!("unknown section [{name}]; did you mean [{s}]? (sections: {list})"),
            None => format!("unknown section [{name}] (sections: {list})"),
        });
    }
    Ok(())
}

/// The section whose schema has key `key`.
fn section_with_key(key: &str) -> Option<&'static str> {
    section_keys()
        .into_iter()
        .find(|(_, keys)| keys.iter().any(|k| k == key))
        .map(|(section, _)| section)
}

/// Each section's keys, found by asking its schema (serde's unknown-key message lists them), so the answer
/// cannot drift from the structs. In the order of [`SECTIONS`] (a test holds the two lists together).
fn section_keys() -> Vec<(&'static str, Vec<String>)> {
    fn keys_of<T: Section>() -> (&'static str, Vec<String>) {
        let mut probe = toml::Table::new();
        // No schema has this key, so serde answers with the list of those it has.
        probe.insert("\u{1}".into(), toml::Value::Boolean(true));
        let keys = match T::deserialize(toml::Value::Table(probe)) {
            Ok(_) => Vec::new(),
            Err(e) => e
                .message()
                .split_once("expected ")
                .map_or_else(Vec::new, |(_, rest)| {
                    rest.split('`')
                        .skip(1)
                        .step_by(2)
                        .map(str::to_string)
                        .collect()
                }),
        };
        (T::NAME, keys)
    }
    vec![
        keys_of::<HostSection>(),
        keys_of::<ContainerSection>(),
        keys_of::<DriverSection>(),
        keys_of::<LlamaCppSection>(),
        keys_of::<ModelSection>(),
        keys_of::<ServerSection>(),
        keys_of::<ProxySection>(),
    ]
}

/// The valid name closest to `name`, when it is close enough to be a typo of it, or one is the other with a
/// part added or left off (`listen_addr`, `sha` for `sha256`).
fn nearest<'a>(name: &str, valid: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let affix =
        |v: &str| name.len().min(v.len()) >= 3 && (name.starts_with(v) || v.starts_with(name));
    valid
        .map(|v| (edit_distance(name, v), v))
        .filter(|(d, v)| *d <= 2.max(v.len() / 3) || affix(v))
        .min()
        .map(|(_, v)| v)
}

/// `unknown variant `opne`, expected `open` or `proprietary`` → what was expected, what was found, and the
/// nearest of the valid words.
fn unknown_variant(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown variant `")?;
    let (word, rest) = rest.split_once('`')?;
    let valid: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    let list = match valid.as_slice() {
        [] => return None,
        [one] => format!("{one:?}"),
        [init @ .., last] => format!(
            "{} or {last:?}",
            init.iter()
                .map(|v| format!("{v:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let hint = nearest(word, valid.iter().copied())
        .map_or(String::new(), |v| format!("; did you mean {v:?}?"));
    Some(format!("expected {list}, found the string {word:?}{hint}"))
}

/// `missing field `version`` → `version`.
fn missing_key(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")?
        .split_once('`')
        .map(|(key, _)| key)
}

/// Replaces what serde says was expected (`expected a whole number from 0 to 4294967295, found …`) with the
/// field's own words, keeping what was found.
fn with_expected(message: &str, expected: &str) -> String {
    match message.split_once(", found ") {
        Some((_, found)) if message.starts_with("expected ") => {
            format!("expected {expected}, found {found}")
        }
        _ => message.to_string(),
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
    let list = valid.join(", ");
    Some(match nearest(key, valid.iter().copied()) {
        Some(v) => format!("unknown key `{key}`; did you mean `{v}`? (valid keys: {list})"),
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

/// A TOML value as an error says what was found.
fn value_in_words(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("the string {s:?}"),
        toml::Value::Integer(n) => format!("the number {n}"),
        toml::Value::Float(f) => format!("the number {f}"),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => format!("the date {d}"),
        toml::Value::Array(_) => "a list".into(),
        toml::Value::Table(_) => "a table".into(),
    }
}

fn found_in_words(found: &str) -> String {
    let found = found.replace('`', "");
    let found = found.as_str();
    match found.split_once(' ') {
        Some(("string", v)) => format!("the string {v}"),
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

    fn err<T: Section + std::fmt::Debug>(text: &str) -> String {
        ConfigFile::parse(text, Some("a.toml".into()))
            .and_then(|f| f.section::<T>())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn type_errors_name_the_field_and_speak_words() {
        assert_eq!(
            err::<HostSection>("[host]\ntarget = \"x\"\nvmid = \"abc\"\n"),
            "a.toml: [host].vmid: expected a whole number (a container id such as 103), found the string \"abc\""
        );
        assert_eq!(
            err::<HostSection>("[host]\ntarget = 3\n"),
            "a.toml: [host].target: expected a string (\"root@pve\", an ssh alias, or \"local\"), found the number 3"
        );
        let e = err::<ServerSection>("[server]\nport = 70000\n");
        assert!(e.starts_with("a.toml: [server].port: "), "{e}");
        assert!(!e.contains("u16"), "{e}");
        assert_eq!(
            err::<ServerSection>("[server]\nmmap = \"no\"\n"),
            "a.toml: [server].mmap: expected true or false, found the string \"no\""
        );
        assert_eq!(
            err::<ProxySection>("[proxy]\nping_interval_secs = \"5s\"\n"),
            "a.toml: [proxy].ping_interval_secs: expected a number of seconds (such as 5 or 2.5), found the string \"5s\""
        );
        // Nested tables: the path goes on inside the section.
        assert_eq!(
            err::<ProxySection>("[proxy.models]\nclaude = 3\n"),
            "a.toml: [proxy].models.claude: expected a string, found the number 3"
        );
        // A field without words of its own still speaks words, not Rust.
        let e = err::<ContainerSection>("[container]\nhostname = 1\n");
        assert_eq!(
            e,
            "a.toml: [container].hostname: expected a string, found the number 1"
        );
        let e = err::<ServerSection>("[server]\ngpu_layers = true\n");
        assert!(
            e.contains("[server].gpu_layers: expected \"auto\" or a number of layers"),
            "{e}"
        );
    }

    #[test]
    fn enum_values_list_the_valid_words_and_suggest_the_nearest() {
        assert_eq!(
            err::<DriverSection>("[driver]\nversion = \"595.71.05\"\nflavor = \"opne\"\n"),
            "a.toml: [driver].flavor: expected \"open\" or \"proprietary\", found the string \"opne\"; did you mean \"open\"?"
        );
    }

    #[test]
    fn a_section_that_is_not_a_table_says_so() {
        assert_eq!(
            err::<HostSection>("host = \"root@pve\"\n"),
            "a.toml: [host] must be a section (a `[host]` header with its keys under it), found the string \"root@pve\""
        );
    }

    #[test]
    fn missing_required_keys_are_named() {
        assert_eq!(
            err::<DriverSection>("[driver]\nflavor = \"open\"\n"),
            "a.toml: [driver]: missing key `version` (required when [driver] is there)"
        );
    }

    #[test]
    fn unknown_keys_suggest_the_nearest_in_every_section() {
        assert_eq!(
            err::<HostSection>("[host]\ntarget = \"x\"\nvmdi = 1\n"),
            "a.toml: [host]: unknown key `vmdi`; did you mean `vmid`? (valid keys: target, vmid)"
        );
        for (text, want) in [
            (
                "[container]\ncore = 2\n",
                "[container]: unknown key `core`; did you mean `cores`?",
            ),
            (
                "[driver]\nversion = \"1.2.3\"\nflavour = \"open\"\n",
                "[driver]: unknown key `flavour`; did you mean `flavor`?",
            ),
            (
                "[llama_cpp]\ngit_rev = \"b1\"\n",
                "[llama_cpp]: unknown key `git_rev`; did you mean `git_ref`?",
            ),
            (
                "[model]\nsource = \"a\"\ndest = \"/b\"\nsha = \"\"\n",
                "[model]: unknown key `sha`; did you mean `sha256`?",
            ),
            (
                "[server]\ncontxt = 1\n",
                "[server]: unknown key `contxt`; did you mean `context`?",
            ),
            (
                "[proxy]\nlisten_addr = \"x\"\n",
                "[proxy]: unknown key `listen_addr`; did you mean `listen`?",
            ),
            (
                "[proxy]\napi_key = \"x\"\n",
                "[proxy]: unknown key `api_key`; did you mean `api_key_file`?",
            ),
        ] {
            let f = ConfigFile::parse(text, None).unwrap();
            let e = match text.split(']').next().unwrap_or_default() {
                "[container" => f.section::<ContainerSection>().map(|_| ()),
                "[driver" => f.section::<DriverSection>().map(|_| ()),
                "[llama_cpp" => f.section::<LlamaCppSection>().map(|_| ()),
                "[model" => f.section::<ModelSection>().map(|_| ()),
                "[server" => f.section::<ServerSection>().map(|_| ()),
                _ => f.section::<ProxySection>().map(|_| ()),
            }
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.contains("valid keys: "), "{text:?}: {e}");
        }
        assert_eq!(edit_distance("contxt", "context"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn unknown_sections_suggest_the_nearest() {
        let e = ConfigFile::parse("[modle]\nsource = \"x\"\n", Some("a.toml".into()))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "a.toml: unknown section [modle]; did you mean [model]? (sections: [host], [container], [driver], [llama_cpp], [model], [server], [proxy])"
        );
        let e = ConfigFile::parse("[llama.cpp]\ngit_ref = \"x\"\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown section [llama]"), "{e}");
        let e = ConfigFile::parse("[telemetry]\non = true\n", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown section [telemetry] (sections: [host],"),
            "{e}"
        );
        // A key before any header: name the section it belongs in.
        let e = ConfigFile::parse("vmid = 103\n[host]\ntarget = \"x\"\n", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`vmid` is outside any section; it belongs under [host]"),
            "{e}"
        );
        let e = ConfigFile::parse("colour = 1\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no section has such a key"), "{e}");
        // Every section the schema knows parses, empty ones included.
        let all: String = SECTIONS.iter().map(|s| format!("[{s}]\n")).collect();
        assert!(ConfigFile::parse(&all, None).is_ok());
    }

    #[test]
    fn every_section_has_its_schema_and_its_keys() {
        let keys = section_keys();
        assert_eq!(
            keys.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
            SECTIONS
        );
        for (name, keys) in &keys {
            assert!(!keys.is_empty(), "[{name}] lists no keys");
        }
        assert_eq!(section_with_key("flavor"), Some("driver"));
        assert_eq!(section_with_key("api_key_file"), Some("proxy"));
        assert_eq!(
            section_with_key("origin"),
            None,
            "not a key: skipped by serde"
        );
    }

    #[test]
    fn no_file_is_not_a_file() {
        assert!(!ConfigFile::default().exists());
        assert!(ConfigFile::parse("[host]\n", None).unwrap().exists());
    }
}
