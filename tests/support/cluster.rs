//! A simulated Proxmox VE cluster (`fixtures/sim/simhost up-cluster`): each node a sim host of its own (own
//! network namespace, sshd, address 10.<net>.<n>.2), all sharing one `/etc/pve` (pmxcfs's view: `nodes/`,
//! `.vmlist`; `.members` naming the reading node). `SimCluster::start_named("three-nodes", 100)` brings up
//! `fixtures/clusters/three-nodes.toml` as sim hosts 100, 101, 102; dropping it tears everything down.
//! Every online node accepts the cluster's one client key ([`SimCluster::key`]) and is in its one known_hosts file
//! ([`SimCluster::known_hosts`]); a node with `online = false` has its address with nothing listening on it.
//! [`SimNode::cut`] makes a running node unreachable for a while (a host that goes down mid-test).

use std::path::{Path, PathBuf};
use std::process::Command;

use llmctl::transport::{SshOptions, SshTransport};

use super::{repo, simhost_script};

/// One node of a [`SimCluster`]: what a [`super::SimHost`] has, plus its cluster node name and whether it runs.
#[derive(Debug, Clone)]
pub struct SimNode {
    /// The corosync node name (`pve1`): `.members`, `.vmlist` and the API's `{node}` use it.
    pub name: String,
    /// Its sim host number (`simhost exec <n>`).
    pub n: u32,
    /// `false`: listed as a member, nothing listens at `addr` (a connection is refused at once).
    pub online: bool,
    /// `10.<net>.<n>.2`
    pub addr: String,
    /// `10.<net>.251.<n>`: its address on the cluster's LAN, where the other nodes reach it.
    pub lan: String,
    /// `root@10.<net>.<n>.2`
    pub target: String,
    /// The cluster's client key (the same file for every node).
    pub key: PathBuf,
    /// The cluster's known_hosts (every online node's host key).
    pub known_hosts: PathBuf,
    /// Its host key's public half (an offline node has one too, with no sshd serving it).
    pub host_key_pub: PathBuf,
    /// The CT the cluster file gave this node (`vmid`), if any.
    pub vmid: Option<u32>,
    /// Its sim dir (state.json, sshd.log).
    pub dir: PathBuf,
}

pub struct SimCluster {
    /// The sim number of its first node; `simhost down-cluster <n>` on drop.
    pub n: u32,
    /// `<sim root>/cluster-<n>`: the shared pve dir (`etc-pve/` is what every node sees as /etc/pve).
    pub dir: PathBuf,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    /// In the cluster file's order.
    pub nodes: Vec<SimNode>,
}

impl SimCluster {
    /// Starts `fixtures/clusters/<name>.toml` at sim number `n` (its nodes are n, n+1, ...).
    pub fn start_named(name: &str, n: u32) -> SimCluster {
        Self::start(&repo().join(format!("fixtures/clusters/{name}.toml")), n)
    }

    /// Starts any cluster file at sim number `n`. Its nodes take n, n+1, ...: pick a range no other test of the
    /// same binary uses (tests/support's SimHost takes 1-99).
    pub fn start(file: &Path, n: u32) -> SimCluster {
        Self::start_env(file, n, &[])
    }

    /// [`Self::start`] with simhost's environment (`LLMCTL_SIM_LLMCTL`: the llmctl every container has as
    /// /usr/local/bin/llmctl, as provision leaves it, so a scenario's `llmctl-proxy` service really runs).
    pub fn start_env(file: &Path, n: u32, env: &[(&str, &str)]) -> SimCluster {
        let out = Command::new("bash")
            .arg(simhost_script())
            .arg("up-cluster")
            .arg(file)
            .arg(n.to_string())
            .envs(env.iter().copied())
            .output()
            .expect("cannot run bash fixtures/sim/simhost");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            // Whatever it left (a node that did start) goes now.
            let _ = Command::new("bash")
                .arg(simhost_script())
                .args(["down-cluster", &n.to_string()])
                .output();
            panic!(
                "cannot start the simulated cluster {} at {n} (needs root, ip netns, openssh-server, \
                 python3 >= 3.11):\n{stdout}{}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let get = |k: &str| -> String {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("simhost up-cluster printed no {k}= line:\n{stdout}"))
                .to_string()
        };
        let key = PathBuf::from(get("CLUSTER_KEY"));
        let known_hosts = PathBuf::from(get("CLUSTER_KNOWN_HOSTS"));
        let nodes = stdout
            .lines()
            .filter(|l| l.starts_with("NODE="))
            .map(|l| {
                let field = |k: &str| -> String {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(&format!("{k}=")))
                        .unwrap_or_else(|| panic!("no {k}= in simhost's line {l:?}"))
                        .to_string()
                };
                SimNode {
                    name: field("NODE"),
                    n: field("N").parse().expect("N= is a number"),
                    online: field("ONLINE") == "1",
                    addr: field("ADDR"),
                    lan: field("LAN"),
                    target: field("TARGET"),
                    key: key.clone(),
                    known_hosts: known_hosts.clone(),
                    host_key_pub: field("HOST_KEY_PUB").into(),
                    vmid: field("VMID").parse().ok(),
                    dir: field("DIR").into(),
                }
            })
            .collect::<Vec<_>>();
        assert!(
            !nodes.is_empty(),
            "simhost up-cluster printed no NODE= lines:\n{stdout}"
        );
        SimCluster {
            n,
            dir: get("CLUSTER_DIR").into(),
            key,
            known_hosts,
            nodes,
        }
    }

    /// The node called `name` (panics if the cluster has none).
    pub fn node(&self, name: &str) -> &SimNode {
        self.nodes
            .iter()
            .find(|nd| nd.name == name)
            .unwrap_or_else(|| panic!("the cluster has no node {name}"))
    }

    /// The nodes that run (an sshd answers).
    pub fn online(&self) -> impl Iterator<Item = &SimNode> {
        self.nodes.iter().filter(|nd| nd.online)
    }

    /// The file every node sees as `/etc/pve/<rel>` (read from outside the sims, e.g. `.vmlist`).
    pub fn etc_pve(&self, rel: &str) -> PathBuf {
        self.dir.join("etc-pve").join(rel)
    }
}

impl SimNode {
    /// Options that use only the cluster's key and known_hosts (no agent, no ~/.ssh).
    pub fn ssh_options(&self) -> SshOptions {
        super::isolated_ssh_options(&self.key, &self.known_hosts)
    }

    pub fn connect(&self) -> SshTransport {
        SshTransport::connect(&self.target, &self.ssh_options()).unwrap_or_else(|e| {
            panic!(
                "cannot connect to the sim node {} ({}): {e:#}",
                self.name, self.target
            )
        })
    }

    /// Runs a command inside the node's namespaces without SSH (online nodes only).
    pub fn exec(&self, argv: &[&str]) -> std::process::Output {
        assert!(
            self.online,
            "node {} is offline: nothing runs there",
            self.name
        );
        Command::new("bash")
            .arg(simhost_script())
            .arg("exec")
            .arg(self.n.to_string())
            .args(argv)
            .output()
            .expect("simhost exec")
    }
}

/// A node cut off from the test side ([`SimNode::cut`]) until this is dropped.
pub struct Cut<'a>(&'a SimNode);

impl SimNode {
    /// Makes the node unreachable from here (`simhost cut`: "no route to host" at once), as a host that went
    /// down, while it keeps running; dropping the guard (also on a failed assertion) reaches it again.
    pub fn cut(&self) -> Cut<'_> {
        let out = self.simhost("cut").expect("run simhost cut");
        assert!(
            out.status.success(),
            "simhost cut {} failed: {}",
            self.n,
            String::from_utf8_lossy(&out.stderr)
        );
        Cut(self)
    }

    fn simhost(&self, cmd: &str) -> std::io::Result<std::process::Output> {
        Command::new("bash")
            .arg(simhost_script())
            .arg(cmd)
            .arg(self.n.to_string())
            .output()
    }
}

impl Drop for Cut<'_> {
    fn drop(&mut self) {
        // No assertion here: a panic while unwinding aborts; `simhost down` mends it anyway.
        let _ = self.0.simhost("mend");
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(simhost_script())
            .arg("down-cluster")
            .arg(self.n.to_string())
            .output();
    }
}
