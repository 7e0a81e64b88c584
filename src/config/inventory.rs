//! `[[hosts]]`: the inventory of a fleet in llmctl.toml. Each entry names one Proxmox host (`name`, the SSH
//! `target`, the container `vmid`) and may override any other section for that host alone (`[hosts.driver]`
//! under the entry): the override is deep-merged over the top-level section, key by key, so an older card's
//! entry says only what differs.
//!
//! The shape is checked when the file is read (for every command, as section names are): a broken inventory
//! names the file, the entry and the fix. Each host's values are then read through the ordinary sections of
//! [`ConfigFile::for_member`]'s file, so a per-host key means what the same key means at the top and a typo in
//! it is reported the same way.

use super::{ConfigFile, HostSection, SECTIONS, Section, VMID_RANGE, nearest};

/// The top-level key of the inventory (`[[hosts]]`).
pub const HOSTS: &str = "hosts";

/// The keys of one `[[hosts]]` entry besides the section overrides.
const ENTRY_KEYS: &[&str] = &["name", "target", "vmid"];

/// One inventory host, as the file gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub target: String,
    pub vmid: Option<u32>,
    /// The entry's section overrides (`[hosts.driver]` ...), by section name.
    pub overrides: toml::Table,
}

/// Checks the inventory's shape and reads its entries: `None` when the file has no `[[hosts]]`. The message
/// (without the file's name, which the caller adds) says which entry and what to write instead.
pub fn entries(table: &toml::Table) -> Result<Option<Vec<Entry>>, String> {
    let Some(value) = table.get(HOSTS) else {
        return Ok(None);
    };
    if table.contains_key(HostSection::NAME) {
        return Err(
            "has both [host] and [[hosts]]: a file describes one host ([host]) or an inventory ([[hosts]]), \
             not both; move [host]'s target and vmid into a [[hosts]] entry with a name"
                .into(),
        );
    }
    let Some(list) = value.as_array() else {
        return Err(
            "`hosts` must be [[hosts]] entries (a `[[hosts]]` header per host, with name and target under it)"
                .into(),
        );
    };
    if list.is_empty() {
        return Err(
            "`hosts` lists no host; add a [[hosts]] entry with name and target, or use [host] for one host"
                .into(),
        );
    }
    let mut out: Vec<Entry> = Vec::with_capacity(list.len());
    for (i, value) in list.iter().enumerate() {
        let entry = entry(i, value)?;
        if let Some(j) = out.iter().position(|e| e.name == entry.name) {
            return Err(format!(
                "[[hosts]] entries {} and {} are both named {:?}; give each host its own name",
                j + 1,
                i + 1,
                entry.name
            ));
        }
        out.push(entry);
    }
    Ok(Some(out))
}

/// Entry `i` (0-based; messages count from 1 and name the host once its name is known).
fn entry(i: usize, value: &toml::Value) -> Result<Entry, String> {
    let at = format!("[[hosts]] entry {}", i + 1);
    let Some(table) = value.as_table() else {
        return Err(format!(
            "{at} must be a table (a `[[hosts]]` header with name and target under it)"
        ));
    };
    let name = match table.get("name") {
        None => {
            return Err(format!(
                "{at} has no name; add `name = \"pve1\"` (how output and --host name this host)"
            ));
        }
        Some(toml::Value::String(s)) if valid_name(s) => s.clone(),
        Some(toml::Value::String(s)) => {
            return Err(format!(
                "{at}: name {s:?} is not a host name (letters, digits, '-', '_' and '.', no spaces)"
            ));
        }
        Some(other) => {
            return Err(format!(
                "{at}: name: expected a string, found {}",
                super::value_in_words(other)
            ));
        }
    };
    let at = format!("[[hosts]] {name:?}");
    let target = match table.get("target") {
        None => {
            return Err(format!(
                "{at} has no target; add `target = \"root@pve1\"` (user@host[:port], an ssh alias, or \"local\")"
            ));
        }
        Some(toml::Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(other) => {
            return Err(format!(
                "{at}: target: expected {}, found {}",
                super::expected_in_words("host", "target").unwrap_or("a string"),
                super::value_in_words(other)
            ));
        }
    };
    let vmid = vmid_of(&at, table.get("vmid"))?;
    let overrides = overrides_of(&at, table, ENTRY_KEYS, HOSTS)?;
    Ok(Entry {
        name,
        target,
        vmid,
        overrides,
    })
}

/// An entry's `vmid` (`at` names the entry in messages): absent, or a Proxmox guest id.
pub(super) fn vmid_of(at: &str, value: Option<&toml::Value>) -> Result<Option<u32>, String> {
    match value {
        None => Ok(None),
        Some(toml::Value::Integer(n))
            if u32::try_from(*n).is_ok_and(|v| VMID_RANGE.contains(&v)) =>
        {
            Ok(u32::try_from(*n).ok())
        }
        Some(toml::Value::Integer(n)) => Err(format!(
            "{at}: vmid: {n} is not a Proxmox guest id (100 to 999999999)"
        )),
        Some(other) => Err(format!(
            "{at}: vmid: expected {}, found {}",
            super::expected_in_words("host", "vmid").unwrap_or("a whole number"),
            super::value_in_words(other)
        )),
    }
}

/// An entry's section overrides: every key of `table` besides `keys` must be a section's name (not `host`)
/// with a table of that section's keys. `header` is the table the entry is (`hosts`, `cluster.nodes.pve1`),
/// for the `[<header>.driver]` an override is written as.
pub(super) fn overrides_of(
    at: &str,
    table: &toml::Table,
    keys: &[&str],
    header: &str,
) -> Result<toml::Table, String> {
    let mut overrides = toml::Table::new();
    for (key, value) in table {
        if keys.contains(&key.as_str()) {
            continue;
        }
        if key == HostSection::NAME {
            return Err(format!(
                "{at}: [{header}.host] is not an override; set {} on the entry itself",
                if keys.contains(&"target") {
                    "target and vmid"
                } else {
                    "vmid"
                }
            ));
        }
        if !SECTIONS.contains(&key.as_str()) {
            let valid: Vec<&str> = keys
                .iter()
                .copied()
                .chain(SECTIONS.iter().copied().filter(|s| *s != HostSection::NAME))
                .collect();
            let hint = nearest(key, valid.iter().copied())
                .map_or(String::new(), |v| format!("; did you mean `{v}`?"));
            return Err(format!(
                "{at}: unknown key `{key}`{hint} (valid keys: {}; a section's name overrides that section for this host)",
                valid.join(", ")
            ));
        }
        if !value.is_table() {
            return Err(format!(
                "{at}: `{key}` must be a table of [{key}]'s keys (a `[{header}.{key}]` header under the entry), found {}",
                super::value_in_words(value)
            ));
        }
        overrides.insert(key.clone(), value.clone());
    }
    Ok(overrides)
}

/// Names as they are typed after `--host` and shown in tables: no spaces or shell metacharacters.
pub(super) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `over` merged into `base`: tables merge key by key, at every depth; any other value in `over` (a string, a
/// list) replaces `base`'s.
pub fn deep_merge(base: &mut toml::Table, over: &toml::Table) {
    for (key, value) in over {
        match (base.get_mut(key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => deep_merge(b, o),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

/// One host's whole configuration: the top-level sections with the entry's overrides merged over them, and a
/// `[host]` with its target and container, so every command reads it as it reads a one-host file.
pub fn member_table(
    top: &toml::Table,
    target: &str,
    vmid: Option<u32>,
    overrides: &toml::Table,
) -> toml::Table {
    let mut table: toml::Table = top
        .iter()
        .filter(|(k, _)| {
            k.as_str() != HOSTS && k.as_str() != HostSection::NAME && k.as_str() != super::CLUSTER
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    deep_merge(&mut table, overrides);
    let mut host = toml::Table::new();
    host.insert("target".into(), toml::Value::String(target.to_string()));
    if let Some(v) = vmid {
        host.insert("vmid".into(), toml::Value::Integer(i64::from(v)));
    }
    table.insert(HostSection::NAME.into(), toml::Value::Table(host));
    table
}

impl ConfigFile {
    /// The inventory's entries, in file order; `None` for a file without `[[hosts]]` (one host, `[host]`).
    pub fn inventory(&self) -> anyhow::Result<Option<Vec<Entry>>> {
        entries(&self.table).map_err(|msg| anyhow::anyhow!("{}: {msg}", self.name()))
    }

    /// The file as host `name` sees it: [`member_table`], its errors naming the file and the host.
    pub fn for_member(
        &self,
        name: &str,
        target: &str,
        vmid: Option<u32>,
        overrides: &toml::Table,
    ) -> ConfigFile {
        ConfigFile {
            path: self.path.clone(),
            table: member_table(&self.table, target, vmid, overrides),
            scope: Some(name.to_string()),
            entry: Some(format!("the [[hosts]] entry named {name:?}")),
        }
    }

    /// The same configuration with `[section] key = value` set (what llmctl derives for a member from the
    /// whole fleet, e.g. `[proxy] peers`).
    pub fn with_value(mut self, section: &str, key: &str, value: toml::Value) -> ConfigFile {
        let entry = self
            .table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(t) = entry {
            t.insert(key.to_string(), value);
        }
        self
    }

    /// The same configuration, its host's settings said to be in `entry` (`[cluster.nodes.pve2]`).
    pub fn with_entry(mut self, entry: impl Into<String>) -> ConfigFile {
        self.entry = Some(entry.into());
        self
    }

    /// Where this host's own settings (its vmid, its overrides) are written: `the [[hosts]] entry named
    /// "pve2"`, `[cluster.nodes.pve2]`; `None` for the file itself.
    pub fn entry(&self) -> Option<&str> {
        self.entry.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<ConfigFile> {
        ConfigFile::parse(text, Some("lab.toml".into()))
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(f) => panic!("expected an error, parsed {f:?}"),
            Err(e) => e.to_string(),
        }
    }

    const FLEET: &str = r#"
[driver]
version = "595.71.05"
flavor = "open"

[server]
context = 32768
port = 8080

[[hosts]]
name = "pve1"
target = "root@10.0.0.1"
vmid = 103

[[hosts]]
name = "pascal"
target = "root@10.0.0.2"
vmid = 104
[hosts.driver]
version = "580.95.05"
[hosts.server]
context = 8192
"#;

    #[test]
    fn entries_keep_file_order_and_their_overrides() {
        let file = parse(FLEET).unwrap();
        let hosts = file.inventory().unwrap().unwrap();
        let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["pve1", "pascal"]);
        assert_eq!(hosts[1].target, "root@10.0.0.2");
        assert_eq!(hosts[1].vmid, Some(104));
        assert!(hosts[0].overrides.is_empty());
        assert_eq!(
            hosts[1].overrides.keys().collect::<Vec<_>>(),
            ["driver", "server"]
        );
        // A one-host file has no inventory.
        assert_eq!(
            parse("[host]\ntarget = \"x\"\n")
                .unwrap()
                .inventory()
                .unwrap(),
            None
        );
    }

    #[test]
    fn a_per_host_value_replaces_the_top_level_one_key_by_key() {
        let file = parse(FLEET).unwrap();
        let hosts = file.inventory().unwrap().unwrap();
        let h = &hosts[1];
        let pascal = file.for_member(&h.name, &h.target, h.vmid, &h.overrides);
        let driver: crate::config::DriverSection = pascal.section().unwrap().unwrap();
        assert_eq!(driver.version, "580.95.05");
        // Not overridden: the top-level value stays.
        assert_eq!(driver.flavor, crate::config::DriverFlavor::Open);
        let server: crate::config::ServerSection = pascal.section_or_default().unwrap();
        assert_eq!((server.context, server.port), (8192, 8080));
        let host: HostSection = pascal.section().unwrap().unwrap();
        assert_eq!(
            host,
            HostSection {
                target: Some("root@10.0.0.2".into()),
                vmid: Some(104)
            }
        );
        // The other host sees the top level as it is.
        let h = &hosts[0];
        let pve1 = file.for_member(&h.name, &h.target, h.vmid, &h.overrides);
        let driver: crate::config::DriverSection = pve1.section().unwrap().unwrap();
        assert_eq!(driver.version, "595.71.05");
        assert!(!pve1.has_section(HOSTS));
    }

    #[test]
    fn deep_merge_merges_tables_and_replaces_everything_else() {
        let mut base: toml::Table = toml::from_str(
            "a = 1\nlist = [1, 2]\n[t]\nx = 1\ny = 2\n[t.inner]\np = \"base\"\nq = \"base\"\n",
        )
        .unwrap();
        let over: toml::Table =
            toml::from_str("list = [3]\nnew = true\n[t]\ny = 20\n[t.inner]\nq = \"over\"\n")
                .unwrap();
        deep_merge(&mut base, &over);
        let want: toml::Table = toml::from_str(
            "a = 1\nlist = [3]\nnew = true\n[t]\nx = 1\ny = 20\n[t.inner]\np = \"base\"\nq = \"over\"\n",
        )
        .unwrap();
        assert_eq!(base, want);
    }

    #[test]
    fn a_typo_in_an_override_is_reported_like_one_at_the_top_naming_the_host() {
        let text = FLEET.replace("version = \"580.95.05\"", "versoin = \"580.95.05\"");
        let file = parse(&text).unwrap();
        let hosts = file.inventory().unwrap().unwrap();
        let h = &hosts[1];
        let e = file
            .for_member(&h.name, &h.target, h.vmid, &h.overrides)
            .section::<crate::config::DriverSection>()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "lab.toml (host pascal): [driver]: unknown key `versoin`; did you mean `version`?"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_broken_inventory_names_the_file_the_host_and_the_fix() {
        for (text, want) in [
            (
                "[host]\ntarget = \"a\"\n[[hosts]]\nname = \"b\"\ntarget = \"b\"\n",
                "lab.toml: has both [host] and [[hosts]]",
            ),
            (
                "[[hosts]]\nname = \"a\"\ntarget = \"x\"\n[[hosts]]\nname = \"a\"\ntarget = \"y\"\n",
                "lab.toml: [[hosts]] entries 1 and 2 are both named \"a\"; give each host its own name",
            ),
            (
                "[[hosts]]\nname = \"pve2\"\nvmid = 103\n",
                "lab.toml: [[hosts]] \"pve2\" has no target; add `target = ",
            ),
            (
                "[[hosts]]\ntarget = \"root@x\"\n",
                "lab.toml: [[hosts]] entry 1 has no name; add `name = ",
            ),
            (
                "[[hosts]]\nname = \"two words\"\ntarget = \"x\"\n",
                "is not a host name",
            ),
            (
                "[[hosts]]\nname = \"a\"\ntarget = \"x\"\nvmid = 7\n",
                "lab.toml: [[hosts]] \"a\": vmid: 7 is not a Proxmox guest id",
            ),
            (
                "[[hosts]]\nname = \"a\"\ntarget = \"x\"\nvmid = \"103\"\n",
                "vmid: expected a whole number (a container id such as 103), found the string \"103\"",
            ),
            (
                "[[hosts]]\nname = \"a\"\ntarget = \"x\"\nvmdi = 103\n",
                "lab.toml: [[hosts]] \"a\": unknown key `vmdi`; did you mean `vmid`?",
            ),
            (
                "[[hosts]]\nname = \"a\"\ntarget = \"x\"\n[hosts.modle]\nsource = \"y\"\n",
                "unknown key `modle`; did you mean `model`?",
            ),
            (
                "[[hosts]]\nname = \"a\"\ntarget = \"x\"\n[hosts.host]\nvmid = 1\n",
                "set target and vmid on the entry itself",
            ),
            (
                "[[hosts]]\nname = \"a\"\ntarget = \"x\"\ndriver = \"595\"\n",
                "`driver` must be a table of [driver]'s keys",
            ),
            ("hosts = []\n", "`hosts` lists no host"),
            ("hosts = \"pve\"\n", "`hosts` must be [[hosts]] entries"),
        ] {
            let e = err(text);
            assert!(e.contains(want), "{text:?}:\n{e}");
        }
    }
}
