//! `[cluster]`: a Proxmox VE cluster in llmctl.toml. The file names one node to reach (`node`, an SSH target);
//! the members and their addresses come from the cluster itself (`crate::fleet::cluster`). What differs per
//! node is written under `[cluster.nodes.<nodename>]`: the GPU container on that node (`vmid`) and overrides of
//! any other section, exactly as a `[[hosts]]` entry has them (and merged the same way,
//! [`ConfigFile::for_member`]).
//!
//! The shape is checked when the file is read, for every command; whether each `[cluster.nodes.X]` is a member
//! can only be checked once the cluster has been asked.

use super::inventory::{overrides_of, valid_name, vmid_of};
use super::{ConfigFile, HOSTS, HostSection, Section, nearest};

/// The top-level key of the cluster (`[cluster]`).
pub const CLUSTER: &str = "cluster";

/// The keys of `[cluster]` itself.
const CLUSTER_KEYS: &[&str] = &["node", "nodes"];

/// The keys of one `[cluster.nodes.<name>]` besides the section overrides.
const NODE_KEYS: &[&str] = &["vmid"];

/// `[cluster]` as the file gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// The SSH target of the node to discover the cluster through; its user and port apply to every node.
    pub node: String,
    /// `[cluster.nodes.<name>]`, by node name.
    pub nodes: Vec<NodeEntry>,
}

/// One `[cluster.nodes.<name>]`.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeEntry {
    /// The node's name in the cluster (its corosync name, as `/etc/pve/.members` has it).
    pub name: String,
    /// The GPU container on that node.
    pub vmid: Option<u32>,
    /// Section overrides (`[cluster.nodes.pve2.driver]` ...), by section name.
    pub overrides: toml::Table,
}

impl NodeEntry {
    /// How messages name this node's settings.
    pub fn header(name: &str) -> String {
        format!("[cluster.nodes.{name}]")
    }
}

impl Cluster {
    /// The settings of node `name`, when the file has any.
    pub fn node_entry(&self, name: &str) -> Option<&NodeEntry> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// Checks `[cluster]`'s shape and reads it: `None` when the file has none. The message (without the file's
/// name, which the caller adds) names the key and the fix.
pub fn cluster(table: &toml::Table) -> Result<Option<Cluster>, String> {
    let Some(value) = table.get(CLUSTER) else {
        return Ok(None);
    };
    if table.contains_key(HostSection::NAME) {
        return Err(
            "has both [host] and [cluster]: a file describes one host ([host]) or a cluster ([cluster], \
             whose nodes come from the cluster itself), not both; move [host]'s target to [cluster] node \
             and its vmid into [cluster.nodes.<nodename>]"
                .into(),
        );
    }
    let Some(section) = value.as_table() else {
        return Err(format!(
            "`cluster` must be a section (a `[cluster]` header with `node = \"root@10.0.0.11\"` under it), found {}",
            super::value_in_words(value)
        ));
    };
    for key in section.keys() {
        if !CLUSTER_KEYS.contains(&key.as_str()) {
            let hint = nearest(key, CLUSTER_KEYS.iter().copied())
                .map_or(String::new(), |v| format!("; did you mean `{v}`?"));
            return Err(format!(
                "[cluster]: unknown key `{key}`{hint} (valid keys: node, nodes; a node's own settings go \
                 under [cluster.nodes.<nodename>])"
            ));
        }
    }
    let node = match section.get("node") {
        None => {
            return Err(
                "[cluster] has no node; add `node = \"root@10.0.0.11\"` (the SSH target of any one node of \
                 the cluster; its user and port apply to every node)"
                    .into(),
            );
        }
        Some(toml::Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(other) => {
            return Err(format!(
                "[cluster].node: expected the SSH target of one node (\"root@10.0.0.11\"), found {}",
                super::value_in_words(other)
            ));
        }
    };
    if node != "local" {
        crate::transport::ssh_config::parse_target(&node)
            .map_err(|why| format!("[cluster].node: {why}"))?;
    }
    let mut nodes: Vec<NodeEntry> = Vec::new();
    match section.get("nodes") {
        None => {}
        Some(toml::Value::Table(list)) => {
            for (name, value) in list {
                nodes.push(node_entry(name, value)?);
            }
        }
        Some(other) => {
            return Err(format!(
                "[cluster].nodes must be tables, one per node (`[cluster.nodes.pve1]` with `vmid = 103` under \
                 it), found {}",
                super::value_in_words(other)
            ));
        }
    }
    for (i, a) in nodes.iter().enumerate() {
        if let Some(b) = nodes[i + 1..]
            .iter()
            .find(|b| a.vmid.is_some() && b.vmid == a.vmid)
        {
            return Err(format!(
                "{} and {} both have vmid {}: a container runs on one node; give each node its own GPU \
                 container",
                NodeEntry::header(&a.name),
                NodeEntry::header(&b.name),
                a.vmid.unwrap_or_default()
            ));
        }
    }
    // Names stay unique across the inventory and the cluster: `--host NAME` and the summary name one host.
    if let Some(hosts) = table.get(HOSTS).and_then(|h| h.as_array()) {
        for host in hosts {
            if let Some(name) = host.get("name").and_then(|n| n.as_str())
                && nodes.iter().any(|n| n.name == name)
            {
                return Err(format!(
                    "[[hosts]] {name:?} has the name of the cluster's node {}; give the [[hosts]] entry \
                     another name (--host and the summary name one host)",
                    NodeEntry::header(name)
                ));
            }
        }
    }
    Ok(Some(Cluster { node, nodes }))
}

fn node_entry(name: &str, value: &toml::Value) -> Result<NodeEntry, String> {
    let at = NodeEntry::header(name);
    if !valid_name(name) {
        return Err(format!(
            "{at}: {name:?} is not a node name (letters, digits, '-', '_' and '.', as the cluster names it)"
        ));
    }
    let Some(table) = value.as_table() else {
        return Err(format!(
            "[cluster].nodes.{name} must be a table (a `{at}` header with `vmid = 103` under it), found {}",
            super::value_in_words(value)
        ));
    };
    let vmid = vmid_of(&at, table.get("vmid"))?;
    let overrides = overrides_of(&at, table, NODE_KEYS, &format!("cluster.nodes.{name}"))?;
    Ok(NodeEntry {
        name: name.to_string(),
        vmid,
        overrides,
    })
}

impl ConfigFile {
    /// `[cluster]`, checked; `None` for a file without one.
    pub fn cluster(&self) -> anyhow::Result<Option<Cluster>> {
        cluster(&self.table).map_err(|msg| anyhow::anyhow!("{}: {msg}", self.name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<ConfigFile> {
        ConfigFile::parse(text, Some("lab.toml".into()))
    }

    const LAB: &str = r#"
[driver]
version = "595.71.05"
flavor = "open"

[cluster]
node = "root@10.0.0.11:2222"

[cluster.nodes.pve1]
vmid = 103

[cluster.nodes.pascal]
vmid = 104
[cluster.nodes.pascal.driver]
version = "580.95.05"
"#;

    #[test]
    fn cluster_reads_the_node_and_each_nodes_settings() {
        let file = parse(LAB).unwrap();
        let c = file.cluster().unwrap().unwrap();
        assert_eq!(c.node, "root@10.0.0.11:2222");
        assert_eq!(c.node_entry("pve1").unwrap().vmid, Some(103));
        let pascal = c.node_entry("pascal").unwrap();
        assert_eq!(pascal.vmid, Some(104));
        assert_eq!(pascal.overrides.keys().collect::<Vec<_>>(), ["driver"]);
        // The inventory's merge: the node's override over the top level, key by key.
        let member = file
            .for_member("pascal", "root@10.0.0.12", pascal.vmid, &pascal.overrides)
            .with_entry(NodeEntry::header("pascal"));
        let driver: crate::config::DriverSection = member.section().unwrap().unwrap();
        assert_eq!(
            (driver.version.as_str(), driver.flavor),
            ("580.95.05", crate::config::DriverFlavor::Open)
        );
        assert!(!member.has_section(CLUSTER));
        assert_eq!(member.entry(), Some("[cluster.nodes.pascal]"));
        assert_eq!(
            parse("[host]\ntarget = \"x\"\n")
                .unwrap()
                .cluster()
                .unwrap(),
            None
        );
        // [[hosts]] beside [cluster] is a fleet of both.
        let both = format!("{LAB}\n[[hosts]]\nname = \"old\"\ntarget = \"root@10.0.0.50\"\n");
        assert!(parse(&both).unwrap().cluster().unwrap().is_some());
    }

    #[test]
    fn a_broken_cluster_names_the_file_the_key_and_the_fix() {
        for (text, want) in [
            (
                "[host]\ntarget = \"a\"\n[cluster]\nnode = \"root@b\"\n",
                "lab.toml: has both [host] and [cluster]",
            ),
            (
                "[cluster]\n[cluster.nodes.pve1]\nvmid = 103\n",
                "lab.toml: [cluster] has no node; add `node = \"root@10.0.0.11\"`",
            ),
            (
                "[cluster]\nnode = 3\n",
                "lab.toml: [cluster].node: expected the SSH target of one node",
            ),
            (
                "[cluster]\nnode = \"root@x:99999\"\n",
                "lab.toml: [cluster].node: `root@x:99999`: `99999` is not a port number",
            ),
            (
                "[cluster]\nnodde = \"root@x\"\n",
                "lab.toml: [cluster]: unknown key `nodde`; did you mean `node`?",
            ),
            ("cluster = \"x\"\n", "`cluster` must be a section"),
            (
                "[cluster]\nnode = \"root@x\"\nnodes = 3\n",
                "[cluster].nodes must be tables",
            ),
            (
                "[cluster]\nnode = \"root@x\"\n[cluster.nodes.pve1]\nvmid = 7\n",
                "lab.toml: [cluster.nodes.pve1]: vmid: 7 is not a Proxmox guest id",
            ),
            (
                "[cluster]\nnode = \"root@x\"\n[cluster.nodes.pve1]\nvmdi = 103\n",
                "lab.toml: [cluster.nodes.pve1]: unknown key `vmdi`; did you mean `vmid`?",
            ),
            (
                "[cluster]\nnode = \"root@x\"\n[cluster.nodes.pve1.host]\nvmid = 103\n",
                "[cluster.nodes.pve1.host] is not an override; set vmid on the entry itself",
            ),
            (
                "[cluster]\nnode = \"root@x\"\n[cluster.nodes.pve1]\ndriver = \"595\"\n",
                "a `[cluster.nodes.pve1.driver]` header under the entry",
            ),
            (
                "[cluster]\nnode = \"root@x\"\n[cluster.nodes.a]\nvmid = 103\n[cluster.nodes.b]\nvmid = 103\n",
                "[cluster.nodes.a] and [cluster.nodes.b] both have vmid 103",
            ),
            (
                "[cluster]\nnode = \"root@x\"\n[cluster.nodes.\"two words\"]\nvmid = 103\n",
                "is not a node name",
            ),
            (
                "[cluster]\nnode = \"root@x\"\n[cluster.nodes.pve1]\nvmid = 103\n\
                 [[hosts]]\nname = \"pve1\"\ntarget = \"root@y\"\n",
                "[[hosts]] \"pve1\" has the name of the cluster's node [cluster.nodes.pve1]",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}:\n{e}");
        }
    }
}
