//! The simulated Proxmox VE cluster (`simhost up-cluster`, tests/support/cluster.rs): three nodes in different
//! states with different GPUs sharing one /etc/pve, reached over SSH with host-key verification; pmxcfs's
//! `.members` and `.vmlist` and pvesh's `/cluster/status` and `/cluster/resources` as the fixtures in
//! fixtures/outputs (with their sources) have them; one node down. Needs root, iproute2, openssh-server and
//! python3 >= 3.11, as every sim test.

mod support;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use llmctl::transport::{Cmd, SshTransport, Transport};
use serde_json::Value;
use support::cluster::{SimCluster, SimNode};
use support::{SimHost, repo};

/// Sim numbers of this binary's clusters (SimHost takes 1-99 from its counter).
const THREE_NODES: u32 = 100;
const PVE3_DOWN: u32 = 110;

fn run(t: &dyn Transport, argv: &[&str]) -> llmctl::transport::Output {
    t.run(&Cmd::new(argv.iter().copied()))
        .unwrap_or_else(|e| panic!("{argv:?}: {e:#}"))
}

fn ok(t: &dyn Transport, argv: &[&str]) -> String {
    let out = run(t, argv);
    assert_eq!(out.status, Some(0), "{argv:?}: {out:?}");
    out.stdout
}

/// A fixture's content: the file without its leading `#` comment lines (SOURCE and notes).
fn fixture(name: &str) -> String {
    let path = repo().join("fixtures/outputs").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn connect_all(cluster: &SimCluster) -> Vec<(SimNode, SshTransport)> {
    cluster
        .online()
        .map(|nd| (nd.clone(), nd.connect()))
        .collect()
}

#[test]
fn three_nodes_share_etc_pve_and_answer_pvesh() {
    let started = Instant::now();
    let cluster = SimCluster::start_named("three-nodes", THREE_NODES);
    eprintln!(
        "three-nodes: started in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        cluster
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.online, n.vmid))
            .collect::<Vec<_>>(),
        [
            ("pve1", true, Some(101)),
            ("pve2", true, Some(102)),
            ("pve3", true, Some(103))
        ]
    );
    // Every node through the project's SSH transport, its host key checked against the one known_hosts file.
    let nodes = connect_all(&cluster);
    assert_eq!(nodes.len(), 3);
    let t =
        |name: &str| -> &SshTransport { &nodes.iter().find(|(n, _)| n.name == name).unwrap().1 };
    // ... and with OpenSSH itself, StrictHostKeyChecking=yes.
    for nd in cluster.online() {
        let out = std::process::Command::new("ssh")
            .args([
                "-F",
                "/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes",
            ])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                cluster.known_hosts.display()
            ))
            .arg("-i")
            .arg(&cluster.key)
            .args([nd.target.as_str(), "uname", "-n"])
            .output()
            .expect("ssh");
        assert!(out.status.success(), "{}: {out:?}", nd.name);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{}\n", nd.name)
        );
    }

    // Each node its own state: the GPUs and driver of its scenario (pve2: a Blackwell card, no driver yet).
    assert!(ok(t("pve1"), &["lspci"]).contains("NVIDIA Corporation AD102"));
    assert!(ok(t("pve2"), &["lspci"]).contains("NVIDIA Corporation GB202GL"));
    assert!(
        ok(
            t("pve1"),
            &["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
        )
        .contains("RTX 4090")
    );
    assert_ne!(run(t("pve2"), &["nvidia-smi"]).status, Some(0));
    assert_eq!(ok(t("pve3"), &["uname", "-r"]), "6.17.2-1-pve\n");

    // .members: the same file on every node but for its own nodename.
    let m1 = ok(t("pve1"), &["cat", "/etc/pve/.members"]);
    let m2 = ok(t("pve2"), &["cat", "/etc/pve/.members"]);
    assert_ne!(m1, m2);
    assert_eq!(
        m1.replacen("\"nodename\": \"pve1\"", "\"nodename\": \"pve2\"", 1),
        m2
    );
    let a = |name: &str| cluster.node(name).addr.clone();
    assert_eq!(
        m1,
        format!(
            "{{\n\"nodename\": \"pve1\",\n\"version\": 6,\n\"cluster\": {{ \"name\": \"lab\", \"version\": 3, \
             \"nodes\": 3, \"quorate\": 1 }},\n\"nodelist\": {{\n  \"pve1\": {{ \"id\": 1, \"online\": 1, \
             \"ip\": \"{}\"}},\n  \"pve2\": {{ \"id\": 2, \"online\": 1, \"ip\": \"{}\"}},\n  \"pve3\": {{ \
             \"id\": 3, \"online\": 1, \"ip\": \"{}\"}}\n  }}\n}}\n",
            a("pve1"),
            a("pve2"),
            a("pve3")
        )
    );
    let members = json(&m1);
    for nd in &cluster.nodes {
        assert_eq!(members["nodelist"][&nd.name]["ip"], nd.addr.as_str());
    }

    // .vmlist: each node's CT with its node, the same file everywhere (fixtures/outputs/pmxcfs.vmlist.txt).
    let vmlist = fixture("pmxcfs.vmlist.txt");
    for (nd, tr) in &nodes {
        assert_eq!(
            ok(tr, &["cat", "/etc/pve/.vmlist"]),
            vmlist,
            "on {}",
            nd.name
        );
    }
    // /etc/pve/lxc is the local node's directory; every node's configs are under nodes/.
    assert_eq!(
        ok(t("pve2"), &["readlink", "/etc/pve/lxc", "/etc/pve/local"]),
        "nodes/pve2/lxc\nnodes/pve2\n"
    );
    assert_eq!(ok(t("pve2"), &["ls", "/etc/pve/lxc/"]), "102.conf\n");
    assert_eq!(
        ok(t("pve2"), &["ls", "/etc/pve/nodes/"]),
        "pve1\npve2\npve3\n"
    );
    assert!(
        ok(t("pve2"), &["cat", "/etc/pve/nodes/pve1/lxc/101.conf"])
            .contains("rootfs: local-lvm:vm-101-disk-0,size=120G\n")
    );
    assert!(ok(t("pve1"), &["pct", "list"]).contains("\n101 "));
    assert!(!ok(t("pve1"), &["pct", "list"]).contains("\n102 "));

    // A CT created on pve2 is in .vmlist as read on pve1 and pve3; its vmid is taken cluster-wide.
    let tpl = "local:vztmpl/debian-13-standard_13.1-2_amd64.tar.zst";
    ok(
        t("pve2"),
        &[
            "pct",
            "create",
            "104",
            tpl,
            "--hostname",
            "llm4",
            "--rootfs",
            "local-lvm:8",
        ],
    );
    for on in ["pve1", "pve3"] {
        let v = json(&ok(t(on), &["cat", "/etc/pve/.vmlist"]));
        assert_eq!(v["ids"]["104"]["node"], "pve2", "on {on}: {v}");
        assert_eq!(v["ids"]["104"]["type"], "lxc");
        assert_eq!(v["version"], 2);
    }
    assert_eq!(
        ok(t("pve1"), &["cat", "/etc/pve/nodes/pve2/lxc/104.conf"]),
        "arch: amd64\nhostname: llm4\nostype: debian\nrootfs: local-lvm:vm-104-disk-0,size=8G\n"
    );
    let dup = run(t("pve3"), &["pct", "create", "104", tpl]);
    assert_eq!(
        (dup.status, dup.stderr.as_str()),
        (
            Some(255),
            "unable to create CT 104 - CT 104 already exists on node 'pve2'\n"
        )
    );
    // pct acts on local CTs only: pve1 has no config for pve2's CT.
    let other = run(t("pve1"), &["pct", "config", "104"]);
    assert_eq!(
        other.stderr,
        "Configuration file 'nodes/pve1/lxc/104.conf' does not exist\n"
    );
    // pct destroy on the owner: gone from .vmlist everywhere.
    assert_eq!(
        ok(t("pve2"), &["pct", "destroy", "104"]),
        "  Logical volume \"vm-104-disk-0\" successfully removed.\n"
    );
    let v = json(&ok(t("pve3"), &["cat", "/etc/pve/.vmlist"]));
    assert!(v["ids"].get("104").is_none(), "{v}");
    assert_eq!(v["version"], 3);
    let running = run(t("pve1"), &["pct", "destroy", "101"]);
    assert_eq!(
        running.stderr,
        "unable to destroy CT 101 - container is running\n"
    );

    // pvesh: one compact JSON line each, naming every node; `local` is the node asked.
    for (nd, tr) in &nodes {
        let text = ok(
            tr,
            &["pvesh", "get", "/cluster/status", "--output-format", "json"],
        );
        assert_eq!(text.lines().count(), 1);
        let status = json(&text);
        let arr = status.as_array().unwrap();
        assert_eq!(arr[0]["type"], "cluster");
        assert_eq!(arr[0]["name"], "lab");
        assert_eq!(arr[0]["quorate"], 1);
        let names: Vec<_> = arr[1..]
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["pve1", "pve2", "pve3"]);
        for e in &arr[1..] {
            assert_eq!(e["local"], i64::from(e["name"] == nd.name.as_str()), "{e}");
            assert_eq!(
                e["ip"],
                cluster.node(e["name"].as_str().unwrap()).addr.as_str()
            );
        }
    }
    let res = json(&ok(
        t("pve3"),
        &[
            "pvesh",
            "get",
            "/cluster/resources",
            "--output-format",
            "json",
        ],
    ));
    let of_type = |ty: &str| -> Vec<(String, String)> {
        res.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == ty)
            .map(|e| {
                (
                    e["id"].as_str().unwrap().to_string(),
                    e["node"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        of_type("lxc"),
        pairs(&[
            ("lxc/101", "pve1"),
            ("lxc/102", "pve2"),
            ("lxc/103", "pve3")
        ])
    );
    assert_eq!(
        of_type("node"),
        pairs(&[
            ("node/pve1", "pve1"),
            ("node/pve2", "pve2"),
            ("node/pve3", "pve3")
        ])
    );
    assert_eq!(of_type("storage").len(), 6);
    let vms = json(&ok(
        t("pve1"),
        &[
            "pvesh",
            "get",
            "/cluster/resources",
            "--type",
            "vm",
            "--output-format",
            "json",
        ],
    ));
    assert!(vms.as_array().unwrap().iter().all(|e| e["type"] == "lxc"));
    assert_eq!(vms[0]["status"], "running");
    assert_eq!(vms[0]["name"], "llm-server");
    // Anything not simulated: pvesh's own error for a path without a handler.
    let none = run(
        t("pve1"),
        &["pvesh", "get", "/nodes", "--output-format", "json"],
    );
    assert_eq!(
        (none.status, none.stderr.as_str()),
        (Some(255), "no 'get' handler for '/nodes'\n")
    );
    eprintln!(
        "three-nodes: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_node_down_refuses_connections_and_stays_a_member() {
    let cluster = SimCluster::start_named("three-nodes-pve3-down", PVE3_DOWN);
    let pve3 = cluster.node("pve3");
    assert!(!pve3.online);
    assert_eq!(cluster.online().count(), 2);
    // Nothing listens at its address: refused at once, not a timeout.
    let addr: SocketAddr = format!("{}:22", pve3.addr).parse().unwrap();
    let t0 = Instant::now();
    let e = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect_err("pve3 is down");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert!(SshTransport::connect(&pve3.target, &pve3.ssh_options()).is_err());

    let nodes = connect_all(&cluster);
    let pve1 = &nodes.iter().find(|(n, _)| n.name == "pve1").unwrap().1;
    let addrs = |text: &str| {
        text.replace(&cluster.node("pve1").addr, "10.0.0.11")
            .replace(&cluster.node("pve2").addr, "10.0.0.12")
    };
    // .members: pve3 listed, offline, no address (fixtures/outputs/pmxcfs.members.txt, byte for byte).
    assert_eq!(
        addrs(&ok(pve1, &["cat", "/etc/pve/.members"])),
        fixture("pmxcfs.members.txt")
    );
    // Its CT and config stay in the cluster's /etc/pve; its vmid stays taken.
    assert_eq!(
        json(&ok(pve1, &["cat", "/etc/pve/.vmlist"]))["ids"]["103"]["node"],
        "pve3"
    );
    assert!(
        ok(pve1, &["cat", "/etc/pve/nodes/pve3/lxc/103.conf"]).contains("hostname: llm-server\n")
    );
    let dup = run(
        pve1,
        &[
            "pct",
            "create",
            "103",
            "local:vztmpl/debian-13-standard_13.1-2_amd64.tar.zst",
        ],
    );
    assert_eq!(
        dup.stderr,
        "unable to create CT 103 - CT 103 already exists on node 'pve3'\n"
    );
    // pvesh, as fixtures/outputs/pvesh.cluster-*.json.txt have it.
    let status = fixture("pvesh.cluster-status.json.txt");
    assert_eq!(
        addrs(&ok(
            pve1,
            &["pvesh", "get", "/cluster/status", "--output-format", "json"]
        )),
        status.lines().next().unwrap().to_string() + "\n"
    );
    let resources = fixture("pvesh.cluster-resources.json.txt");
    let mut lines = resources.lines();
    for ty in ["node", "vm"] {
        assert_eq!(
            addrs(&ok(
                pve1,
                &[
                    "pvesh",
                    "get",
                    "/cluster/resources",
                    "--type",
                    ty,
                    "--output-format",
                    "json"
                ]
            )),
            lines.next().unwrap().to_string() + "\n",
            "--type {ty}"
        );
    }
}

#[test]
fn a_standalone_host_has_a_standalone_members_file() {
    let sim = SimHost::start("healthy");
    let t = sim.connect();
    assert_eq!(
        ok(&t, &["cat", "/etc/pve/.members"]),
        fixture("pmxcfs.members.standalone.txt")
    );
    assert_eq!(
        ok(&t, &["cat", "/etc/pve/.vmlist"]),
        "{\n\"version\": 1,\n\"ids\": {\n\"103\": { \"node\": \"pve\", \"type\": \"lxc\", \"version\": 1 }}\n\n}\n"
    );
    let status = ok(
        &t,
        &["pvesh", "get", "/cluster/status", "--output-format", "json"],
    );
    assert_eq!(
        status.replace(&sim.addr, "10.0.0.11"),
        fixture("pvesh.cluster-status.json.txt")
            .lines()
            .nth(1)
            .unwrap()
            .to_string()
            + "\n"
    );
}
