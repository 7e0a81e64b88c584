//! A Proxmox VE cluster as a fleet: `[cluster] node` names one node; its members, their addresses and which
//! node runs which container come from the cluster itself, read over one SSH connection to that node with one
//! command (`/etc/pve/.members` and `/etc/pve/.vmlist`, pmxcfs's own status files: scale-out.md §6).
//!
//! Each node is a member, named by its corosync name and reached at `<user>@<its ip>[:port]` (the user and
//! port of `[cluster] node`). Its container is `[cluster.nodes.<name>] vmid`; a container is changed only
//! through the node that runs it (`pct` acts on the local node's containers only), so when `.vmlist` says
//! another node owns that vmid the member is reached through the owning node, and its report says so. A node
//! that the cluster lists offline (or without an address) is a member reported unreachable, without trying.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::config::{Cluster, ConfigFile, NodeEntry};
use crate::pve::cluster::{Guest, Members, Node, parse_members, parse_vmlist};
use crate::transport::{Cmd, SshOptions, Transport};

/// The one remote command: both status files, each after a marker line (a file that is not there prints
/// `missing` after its marker).
const DISCOVER_SCRIPT: &str = "for f in /etc/pve/.members /etc/pve/.vmlist; do \
    printf '\\n==> %s <==\\n' \"$f\"; cat \"$f\" 2>/dev/null || printf '==> missing <==\\n'; done";

/// Why a member the cluster lists as offline is not reached: its reason in the summary.
pub const OFFLINE: &str = "offline in the cluster (.members)";

/// One node (or one container, through the node that runs it) of the cluster, as discovery found it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeMember {
    /// The node's corosync name (the one in `[cluster.nodes.<name>]`).
    pub name: String,
    /// Where commands for this member run: the node that runs its container.
    pub target: String,
    pub vmid: Option<u32>,
    /// `[cluster.nodes.<name>]`'s section overrides.
    pub overrides: toml::Table,
    /// Not reached: why, in a sentence (the node is offline in the cluster).
    pub offline: Option<String>,
    /// What the report says before the member's own output (the container runs on another node).
    pub notes: Vec<String>,
}

/// The cluster, as read through `[cluster] node`.
#[derive(Debug, Clone, PartialEq)]
pub struct Discovered {
    pub name: String,
    /// `[cluster] node`, the node it was read through.
    pub through: String,
    pub quorate: bool,
    pub nodes: Vec<Node>,
    pub members: Vec<NodeMember>,
}

impl Discovered {
    /// The line printed before the per-host reports.
    pub fn line(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                if n.online && n.ip.is_some() {
                    n.name.clone()
                } else {
                    format!("{} offline", n.name)
                }
            })
            .collect();
        let quorum = if self.quorate {
            ""
        } else {
            "; NOT quorate: /etc/pve is read-only, provision --yes cannot write container configs"
        };
        format!(
            "cluster {}: {} node{} ({}), discovered through {}{quorum}",
            self.name,
            self.nodes.len(),
            if self.nodes.len() == 1 { "" } else { "s" },
            nodes.join(", "),
            self.through
        )
    }
}

/// Splits the discovery command's output into `.members` and `.vmlist` (`None`: the file is not there).
pub fn split_discovery(stdout: &str) -> (Option<String>, Option<String>) {
    // [.members, .vmlist]; `current` is the file whose lines come now.
    let mut files: [Option<String>; 2] = [None, None];
    let mut current: Option<usize> = None;
    for line in stdout.lines() {
        match line.trim() {
            "==> /etc/pve/.members <==" => current = Some(0),
            "==> /etc/pve/.vmlist <==" => current = Some(1),
            "==> missing <==" => {
                if let Some(i) = current.take() {
                    files[i] = None;
                }
                continue;
            }
            _ => {
                if let Some(i) = current {
                    let text = files[i].get_or_insert_with(String::new);
                    text.push_str(line);
                    text.push('\n');
                }
                continue;
            }
        }
        if let Some(i) = current {
            files[i] = Some(String::new());
        }
    }
    let [members, vmlist] = files;
    (members, vmlist)
}

/// The SSH target of a node at `ip`, with the user and port of `[cluster] node`.
fn node_target(user: Option<&str>, ip: &str, port: Option<u16>) -> String {
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    let user = user.map_or(String::new(), |u| format!("{u}@"));
    let port = port.map_or(String::new(), |p| format!(":{p}"));
    format!("{user}{host}{port}")
}

/// The fleet's members from the cluster's own files: one per node, in node id order. Errors (without the file's
/// name, which the caller adds) are the file's or the cluster's, with the fix.
pub fn cluster_members(
    config: &Cluster,
    members: &Members,
    vmlist: &BTreeMap<u32, Guest>,
) -> Result<Discovered, String> {
    let Some(info) = members
        .cluster
        .as_ref()
        .filter(|_| !members.nodes.is_empty())
    else {
        return Err(format!(
            "[cluster] node {} ({}) is a standalone Proxmox VE host, not a member of a cluster \
             (/etc/pve/.members lists no cluster); describe it with [host] target = {:?} instead of \
             [cluster], or several hosts with [[hosts]]",
            config.node, members.nodename, config.node
        ));
    };
    let names: Vec<&str> = members.nodes.iter().map(|n| n.name.as_str()).collect();
    for entry in &config.nodes {
        if !names.contains(&entry.name.as_str()) {
            return Err(format!(
                "{}: cluster {} has no node {:?}; its nodes are: {} (name each [cluster.nodes.<name>] \
                 as /etc/pve/.members does)",
                NodeEntry::header(&entry.name),
                info.name,
                entry.name,
                names.join(", ")
            ));
        }
    }
    let (user, port) = if config.node == "local" {
        (None, None)
    } else {
        let spec = crate::transport::ssh_config::parse_target(&config.node)
            .map_err(|why| format!("[cluster].node: {why}"))?;
        (spec.user, spec.port)
    };
    // How each node is reached: the node read through as `[cluster] node` says, the others at their ip.
    let reach = |node: &Node| -> (String, Option<String>) {
        if node.name == members.nodename && node.online {
            return (config.node.clone(), None);
        }
        match (&node.ip, node.online) {
            (Some(ip), true) => (node_target(user.as_deref(), ip, port), None),
            (ip, online) => {
                let target =
                    node_target(user.as_deref(), ip.as_deref().unwrap_or(&node.name), port);
                let why = match (ip, online) {
                    (_, false) => "online 0",
                    _ => "no ip",
                };
                (
                    target,
                    Some(format!(
                        "{} is {OFFLINE}: /etc/pve/.members on {} says {why}; not reached",
                        node.name, members.nodename
                    )),
                )
            }
        }
    };
    let mut out: Vec<NodeMember> = Vec::with_capacity(members.nodes.len());
    for node in &members.nodes {
        let entry = config.node_entry(&node.name);
        let vmid = entry.and_then(|e| e.vmid);
        let mut runs_on = node;
        let mut notes = Vec::new();
        if let Some(v) = vmid
            && let Some(guest) = vmlist.get(&v)
        {
            if !guest.is_container() {
                return Err(format!(
                    "{}: vmid {v} is a {} guest on {}, not a container (/etc/pve/.vmlist); set vmid to the \
                     node's GPU container",
                    NodeEntry::header(&node.name),
                    if guest.kind == "qemu" {
                        "virtual machine (qemu)"
                    } else {
                        guest.kind.as_str()
                    },
                    guest.node
                ));
            }
            if guest.node != node.name {
                runs_on = members
                    .nodes
                    .iter()
                    .find(|n| n.name == guest.node)
                    .ok_or_else(|| {
                        format!(
                            "/etc/pve/.vmlist says CT {v} runs on {}, which /etc/pve/.members does not list \
                             (its nodes: {}); run again once the cluster has settled",
                            guest.node,
                            names.join(", ")
                        )
                    })?;
            }
        }
        let (target, offline) = reach(runs_on);
        if runs_on.name != node.name {
            notes.push(format!(
                "CT {} of {} runs on {} (/etc/pve/.vmlist): examined and changed through {} ({target}), the \
                 node that runs it",
                vmid.unwrap_or_default(),
                NodeEntry::header(&node.name),
                runs_on.name,
                runs_on.name
            ));
        }
        out.push(NodeMember {
            name: node.name.clone(),
            target,
            vmid,
            overrides: entry.map(|e| e.overrides.clone()).unwrap_or_default(),
            offline,
            notes,
        });
    }
    Ok(Discovered {
        name: info.name.clone(),
        through: config.node.clone(),
        quorate: info.quorate,
        nodes: members.nodes.clone(),
        members: out,
    })
}

/// Reads the cluster's status files through `transport` (one command) and makes its members.
pub fn discover_with(transport: &dyn Transport, config: &Cluster) -> Result<Discovered> {
    let out = transport
        .run(&Cmd::new(["sh", "-c", DISCOVER_SCRIPT]).timeout(Duration::from_secs(30)))
        .context("cannot read /etc/pve/.members")?;
    let (members, vmlist) = split_discovery(&out.stdout);
    let Some(members) = members else {
        anyhow::bail!(
            "{} has no /etc/pve/.members (exit {:?}{}): it is not a Proxmox VE node, or its cluster \
             filesystem (pve-cluster.service) is not running",
            transport.describe(),
            out.status,
            out.stderr
                .lines()
                .next()
                .map_or(String::new(), |l| format!(": {}", l.trim()))
        );
    };
    let members = parse_members(&members).map_err(anyhow::Error::msg)?;
    let vmlist = match vmlist {
        Some(text) => parse_vmlist(&text).map_err(anyhow::Error::msg)?,
        None => BTreeMap::new(),
    };
    cluster_members(config, &members, &vmlist).map_err(anyhow::Error::msg)
}

/// Discovers the cluster of `file`'s `[cluster]` through its `node`, over one SSH connection, which is then
/// kept for that node's own run ([`crate::transport::keep`]: the member whose target is written as `node` is).
pub fn discover(file: &ConfigFile, config: &Cluster, ssh: &SshOptions) -> Result<Discovered> {
    let at = || {
        format!(
            "{}: cannot discover the cluster through [cluster] node {}",
            file.name(),
            config.node
        )
    };
    let transport = crate::transport::connect(&config.node, ssh).with_context(at)?;
    let discovered = discover_with(transport.as_ref(), config).with_context(at)?;
    crate::transport::keep(&config.node, ssh, transport);
    Ok(discovered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pve::cluster::EXAMPLE_MEMBERS;

    fn config(text: &str) -> Cluster {
        ConfigFile::parse(text, Some("lab.toml".into()))
            .unwrap()
            .cluster()
            .unwrap()
            .unwrap()
    }

    const VMLIST: &str = r#"{
"version": 9,
"ids": {
"103": { "node": "pve1", "type": "lxc", "version": 4 },
"104": { "node": "pve1", "type": "lxc", "version": 2 },
"300": { "node": "pve2", "type": "qemu", "version": 5 }}
}
"#;

    fn discovered(cfg: &str, vmlist: &str) -> Result<Discovered, String> {
        cluster_members(
            &config(cfg),
            &parse_members(EXAMPLE_MEMBERS).unwrap(),
            &parse_vmlist(vmlist).unwrap(),
        )
    }

    #[test]
    fn each_node_is_a_member_at_its_ip_with_the_user_and_port_of_the_node_setting() {
        let d = discovered(
            "[cluster]\nnode = \"admin@10.0.0.11:2222\"\n[cluster.nodes.pve1]\nvmid = 103\n\
             [cluster.nodes.pve2]\nvmid = 105\n[cluster.nodes.pve2.server]\ncontext = 8192\n",
            VMLIST,
        )
        .unwrap();
        assert_eq!(d.name, "lab");
        let rows: Vec<(&str, &str, Option<u32>)> = d
            .members
            .iter()
            .map(|m| (m.name.as_str(), m.target.as_str(), m.vmid))
            .collect();
        assert_eq!(
            rows,
            [
                ("pve1", "admin@10.0.0.11:2222", Some(103)),
                // 105 is not in .vmlist: a container to create, on the node configured.
                ("pve2", "admin@10.0.0.12:2222", Some(105)),
                ("pve3", "admin@pve3:2222", None),
            ]
        );
        assert_eq!(
            d.members[1].overrides.keys().collect::<Vec<_>>(),
            ["server"]
        );
        assert!(d.members.iter().all(|m| m.notes.is_empty()));
        assert_eq!(
            d.line(),
            "cluster lab: 3 nodes (pve1, pve2, pve3 offline), discovered through admin@10.0.0.11:2222"
        );
    }

    #[test]
    fn an_offline_node_is_a_member_not_reached() {
        let d = discovered("[cluster]\nnode = \"root@10.0.0.11\"\n", VMLIST).unwrap();
        let pve3 = &d.members[2];
        assert_eq!(pve3.name, "pve3");
        assert_eq!(
            pve3.offline.as_deref(),
            Some(
                "pve3 is offline in the cluster (.members): /etc/pve/.members on pve1 says online 0; not reached"
            )
        );
        assert!(d.members[..2].iter().all(|m| m.offline.is_none()));
        // Online but with no address known: not reached either.
        let members = EXAMPLE_MEMBERS.replace(
            "\"pve2\": { \"id\": 2, \"online\": 1, \"ip\": \"10.0.0.12\"}",
            "\"pve2\": { \"id\": 2, \"online\": 1}",
        );
        let d = cluster_members(
            &config("[cluster]\nnode = \"root@10.0.0.11\"\n"),
            &parse_members(&members).unwrap(),
            &BTreeMap::new(),
        )
        .unwrap();
        assert!(
            d.members[1]
                .offline
                .as_deref()
                .unwrap()
                .contains("says no ip"),
            "{:?}",
            d.members[1]
        );
        assert_eq!(d.members[1].target, "root@pve2");
    }

    #[test]
    fn a_container_on_another_node_is_reached_through_the_node_that_runs_it() {
        // pve2's vmid 104 runs on pve1 (migrated): commands for it go to pve1.
        let d = discovered(
            "[cluster]\nnode = \"root@10.0.0.11\"\n[cluster.nodes.pve1]\nvmid = 103\n\
             [cluster.nodes.pve2]\nvmid = 104\n",
            VMLIST,
        )
        .unwrap();
        let pve2 = &d.members[1];
        assert_eq!(
            (pve2.name.as_str(), pve2.target.as_str(), pve2.vmid),
            ("pve2", "root@10.0.0.11", Some(104))
        );
        assert_eq!(
            pve2.notes,
            [
                "CT 104 of [cluster.nodes.pve2] runs on pve1 (/etc/pve/.vmlist): examined and changed through \
              pve1 (root@10.0.0.11), the node that runs it"
            ]
        );
        // A container that runs on an offline node is not reached.
        let vmlist = VMLIST.replace(
            "\"104\": { \"node\": \"pve1\"",
            "\"104\": { \"node\": \"pve3\"",
        );
        let d = discovered(
            "[cluster]\nnode = \"root@10.0.0.11\"\n[cluster.nodes.pve2]\nvmid = 104\n",
            &vmlist,
        )
        .unwrap();
        assert!(
            d.members[1]
                .offline
                .as_deref()
                .unwrap()
                .starts_with("pve3 is offline")
        );
        assert!(d.members[1].notes[0].contains("runs on pve3"));
    }

    #[test]
    fn the_file_and_the_cluster_must_agree() {
        let e = discovered(
            "[cluster]\nnode = \"root@10.0.0.11\"\n[cluster.nodes.pve4]\nvmid = 110\n",
            VMLIST,
        )
        .unwrap_err();
        assert_eq!(
            e,
            "[cluster.nodes.pve4]: cluster lab has no node \"pve4\"; its nodes are: pve1, \
             pve2, pve3 (name each [cluster.nodes.<name>] as /etc/pve/.members does)"
        );
        let e = discovered(
            "[cluster]\nnode = \"root@10.0.0.11\"\n[cluster.nodes.pve2]\nvmid = 300\n",
            VMLIST,
        )
        .unwrap_err();
        assert!(
            e.starts_with(
                "[cluster.nodes.pve2]: vmid 300 is a virtual machine (qemu) guest on pve2"
            ),
            "{e}"
        );
        let e = cluster_members(
            &config("[cluster]\nnode = \"root@pve\"\n"),
            &parse_members("{\"nodename\": \"pve\", \"version\": 0}").unwrap(),
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert!(
            e.starts_with("[cluster] node root@pve (pve) is a standalone Proxmox VE host, not a member of a cluster")
                && e.contains("[host] target = \"root@pve\""),
            "{e}"
        );
    }

    #[test]
    fn one_command_reads_both_files() {
        let out = format!(
            "\n==> /etc/pve/.members <==\n{EXAMPLE_MEMBERS}\n==> /etc/pve/.vmlist <==\n{VMLIST}"
        );
        let (m, v) = split_discovery(&out);
        assert_eq!(parse_members(&m.unwrap()).unwrap().nodes.len(), 3);
        assert_eq!(parse_vmlist(&v.unwrap()).unwrap().len(), 3);
        let (m, v) = split_discovery(
            "\n==> /etc/pve/.members <==\n==> missing <==\n\n==> /etc/pve/.vmlist <==\n==> missing <==\n",
        );
        assert_eq!((m, v), (None, None));

        let host = crate::transport::fake::FakeHost::new("root@10.0.0.11");
        host.answer(
            ["sh", "-c", DISCOVER_SCRIPT],
            crate::transport::fake::output(0, &out, ""),
        );
        let d = discover_with(&host, &config("[cluster]\nnode = \"root@10.0.0.11\"\n")).unwrap();
        assert_eq!(d.members.len(), 3);
        // What a real shell makes of the script.
        let sh = std::process::Command::new("sh")
            .args(["-c", DISCOVER_SCRIPT])
            .output()
            .unwrap();
        let (m, v) = split_discovery(&String::from_utf8_lossy(&sh.stdout));
        if !std::path::Path::new("/etc/pve/.members").exists() {
            assert_eq!((m, v), (None, None));
        }
    }
}
