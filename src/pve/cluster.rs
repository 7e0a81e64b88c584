//! pmxcfs's status files: `/etc/pve/.members` (the cluster and its nodes) and `/etc/pve/.vmlist` (which node
//! owns each guest), as proxmox/pve-cluster's `status.c` writes them (`cfs_create_memberlist_msg`,
//! `cfs_create_vmlist_msg`; reference: scale-out.md §6).
//!
//! ```json
//! {"nodename": "pve1", "version": 7,
//!  "cluster": {"name": "lab", "version": 3, "nodes": 3, "quorate": 1},
//!  "nodelist": {"pve1": {"id": 1, "online": 1, "ip": "10.0.0.11"}, "pve3": {"id": 3, "online": 0}}}
//! ```
//! `ip` is left out when pmxcfs does not know it; a standalone node has only `nodename` and `version`.

use std::collections::BTreeMap;

use serde_json::Value;

/// `/etc/pve/.members`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members {
    /// The node that wrote the file (the one read through).
    pub nodename: String,
    /// `None`: a standalone node, not a cluster.
    pub cluster: Option<ClusterInfo>,
    /// The nodes, by their id in the cluster.
    pub nodes: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterInfo {
    pub name: String,
    /// How many nodes the cluster has (configured, online or not).
    pub nodes: u32,
    pub quorate: bool,
}

/// One member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The corosync name: what the API's `{node}` and `/etc/pve/nodes/<name>` use.
    pub name: String,
    pub id: u32,
    pub online: bool,
    /// The address corosync knows it by, when pmxcfs knows it.
    pub ip: Option<String>,
}

/// One guest of `/etc/pve/.vmlist`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    /// The node that owns (runs) it.
    pub node: String,
    /// `lxc` or `qemu`.
    pub kind: String,
}

impl Guest {
    pub fn is_container(&self) -> bool {
        self.kind == "lxc"
    }
}

fn number(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// Reads `/etc/pve/.members`. A standalone node (only `nodename` and `version`) has no `cluster` and no nodes.
pub fn parse_members(text: &str) -> Result<Members, String> {
    let doc: Value = serde_json::from_str(text)
        .map_err(|e| format!("/etc/pve/.members is not pmxcfs's JSON ({e})"))?;
    let nodename = doc
        .get("nodename")
        .and_then(Value::as_str)
        .ok_or("/etc/pve/.members has no nodename")?
        .to_string();
    let cluster = doc
        .get("cluster")
        .and_then(Value::as_object)
        .map(|c| ClusterInfo {
            name: c
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            nodes: c
                .get("nodes")
                .and_then(number)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            quorate: c.get("quorate").and_then(number) == Some(1),
        });
    let mut nodes: Vec<Node> = doc
        .get("nodelist")
        .and_then(Value::as_object)
        .map(|list| {
            list.iter()
                .map(|(name, n)| Node {
                    name: name.clone(),
                    id: n
                        .get("id")
                        .and_then(number)
                        .and_then(|i| u32::try_from(i).ok())
                        .unwrap_or(0),
                    online: n.get("online").and_then(number) == Some(1),
                    ip: n
                        .get("ip")
                        .and_then(Value::as_str)
                        .map(str::trim)
                        .filter(|ip| !ip.is_empty())
                        .map(str::to_string),
                })
                .collect()
        })
        .unwrap_or_default();
    nodes.sort_by(|a, b| (a.id, &a.name).cmp(&(b.id, &b.name)));
    Ok(Members {
        nodename,
        cluster,
        nodes,
    })
}

/// Reads `/etc/pve/.vmlist`: each guest id and the node that owns it.
pub fn parse_vmlist(text: &str) -> Result<BTreeMap<u32, Guest>, String> {
    let doc: Value = serde_json::from_str(text)
        .map_err(|e| format!("/etc/pve/.vmlist is not pmxcfs's JSON ({e})"))?;
    let Some(ids) = doc.get("ids").and_then(Value::as_object) else {
        return Ok(BTreeMap::new());
    };
    let mut out = BTreeMap::new();
    for (id, guest) in ids {
        let vmid: u32 = id
            .parse()
            .map_err(|_| format!("/etc/pve/.vmlist: {id:?} is not a guest id"))?;
        let node = guest
            .get("node")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("/etc/pve/.vmlist: guest {vmid} has no node"))?;
        out.insert(
            vmid,
            Guest {
                node: node.to_string(),
                kind: guest
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("lxc")
                    .to_string(),
            },
        );
    }
    Ok(out)
}

/// scale-out.md §6's example, as pmxcfs prints it (pve3 is offline: no ip).
#[cfg(test)]
pub(crate) const EXAMPLE_MEMBERS: &str = r#"{
"nodename": "pve1",
"version": 7,
"cluster": { "name": "lab", "version": 3, "nodes": 3, "quorate": 1 },
"nodelist": {
  "pve1": { "id": 1, "online": 1, "ip": "10.0.0.11"},
  "pve2": { "id": 2, "online": 1, "ip": "10.0.0.12"},
  "pve3": { "id": 3, "online": 0}
  }
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_of_a_cluster() {
        let m = parse_members(EXAMPLE_MEMBERS).unwrap();
        assert_eq!(m.nodename, "pve1");
        assert_eq!(
            m.cluster,
            Some(ClusterInfo {
                name: "lab".into(),
                nodes: 3,
                quorate: true
            })
        );
        assert_eq!(
            m.nodes,
            [
                Node {
                    name: "pve1".into(),
                    id: 1,
                    online: true,
                    ip: Some("10.0.0.11".into())
                },
                Node {
                    name: "pve2".into(),
                    id: 2,
                    online: true,
                    ip: Some("10.0.0.12".into())
                },
                Node {
                    name: "pve3".into(),
                    id: 3,
                    online: false,
                    ip: None
                },
            ]
        );
    }

    #[test]
    fn nodes_come_in_id_order_whatever_the_file_order() {
        let text = r#"{"nodename": "b", "version": 2, "cluster": {"name": "c", "version": 1, "nodes": 2, "quorate": 0},
            "nodelist": {"b": {"id": 2, "online": 1, "ip": "10.0.0.2"}, "a": {"id": 1, "online": 1, "ip": "10.0.0.1"}}}"#;
        let m = parse_members(text).unwrap();
        let names: Vec<&str> = m.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(!m.cluster.unwrap().quorate);
    }

    #[test]
    fn a_standalone_node_has_no_cluster() {
        let m = parse_members("{\n\"nodename\": \"pve\",\n\"version\": 0\n}\n").unwrap();
        assert_eq!(
            (m.nodename.as_str(), m.cluster, m.nodes.len()),
            ("pve", None, 0)
        );
        assert!(
            parse_members("").unwrap_err().contains("not pmxcfs's JSON"),
            "empty"
        );
        assert!(parse_members("{}").unwrap_err().contains("no nodename"));
    }

    #[test]
    fn vmlist_names_each_guests_node() {
        let text = r#"{
"version": 9,
"ids": {
"101": { "node": "pve2", "type": "lxc", "version": 4 },
"103": { "node": "pve1", "type": "lxc", "version": 2 },
"200": { "node": "pve1", "type": "qemu", "version": 5 }}

}
"#;
        let v = parse_vmlist(text).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[&101].node, "pve2");
        assert!(v[&103].is_container());
        assert!(!v[&200].is_container());
        assert_eq!(parse_vmlist("{\"version\": 1}").unwrap().len(), 0);
        assert!(
            parse_vmlist("{\"ids\": {\"x\": {\"node\": \"a\"}}}")
                .unwrap_err()
                .contains("not a guest id")
        );
    }
}
