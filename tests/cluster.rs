//! A Proxmox VE cluster from `[cluster]` (issue 13): a simulated 3-node cluster (fixtures/clusters/, each node
//! its own network namespace and sshd, one shared /etc/pve) in three states with different GPUs. llmctl.toml
//! names one node; the members come from the cluster's /etc/pve/.members and .vmlist. `doctor` finds each
//! node's problems and only them, `provision --plan` shows each node's own plan, `--host pve2` selects one, an
//! offline node is named in the summary and gives the exit code, a node without vmid is refused by provision,
//! and a node's container that runs on another node is reached through that node.
//!
//! `provision --yes` over the cluster with the healthy node unreachable converges the other two (the fresh one and
//! the one whose DKMS cannot build, in parallel) and names it in the summary; `status` shows each node's screen
//! and the unreachable one; once it is back, `provision --check` finds nothing to change on any node, doctor is
//! healthy and status up on every one. Then `[proxy] upstreams = "fleet"`: one endpoint for every node's GPU.
//!
//! Three clusters, one per test (they run side by side). The two that only read the hosts take about 30 s; the
//! one that provisions needs the test stack (`eval "$(bash scripts/test-stack.sh)"`: a real CPU llama-server and
//! model in every container) and takes about a minute.

mod support;

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

use support::cluster::SimCluster;
use support::text;

/// llmctl with the cluster's one key and known_hosts, as a user's ~/.ssh is for every node.
fn llmctl(config: &Path, cluster: &SimCluster, args: &[&str]) -> Output {
    let ssh = [
        OsStr::new("--known-hosts"),
        cluster.known_hosts.as_os_str(),
        OsStr::new("--identity"),
        cluster.key.as_os_str(),
    ];
    support::llmctl(config, args, &ssh)
}

/// The report: the cluster line, each host's (heading, block) in output order, and the summary.
fn report(stdout: &str) -> (String, Vec<(String, String)>, String) {
    let (first, rest) = stdout.split_once('\n').unwrap_or((stdout, ""));
    let (body, summary) = rest
        .split_once("\nhost ")
        .map(|(b, s)| (b.to_string(), format!("host {s}")))
        .unwrap_or_else(|| (rest.to_string(), String::new()));
    let hosts = body
        .split("=== ")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            let (head, rest) = b.split_once(" ===\n").unwrap_or((b, ""));
            (head.to_string(), rest.to_string())
        })
        .collect();
    (first.to_string(), hosts, summary)
}

/// The summary row of host `name` (its cells split on runs of two or more spaces).
fn row<'a>(summary: &'a str, name: &str) -> Vec<&'a str> {
    let line = summary
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no summary row for {name}:\n{summary}"));
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

/// The ids of a doctor block's failures.
fn failures(block: &str) -> Vec<&str> {
    block
        .lines()
        .filter_map(|l| l.strip_prefix("FAIL"))
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

/// A provision plan's word for step `step` (`ok`, `change`, `REFUSED`).
fn step<'a>(plan: &'a str, step: &str) -> &'a str {
    plan.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            let status = w.next()?;
            (w.next() == Some(step)).then_some(status)
        })
        .unwrap_or_else(|| panic!("no step {step} in the plan:\n{plan}"))
}

/// The cluster, its containers running this llmctl as their proxy (and the test stack's llama-server and model
/// when the environment has them), as provision leaves them: the healthy node is then healthy.
fn start(name: &str, n: u32) -> SimCluster {
    let mut env: Vec<(&str, String)> = vec![(
        "LLMCTL_SIM_LLMCTL",
        env!("CARGO_BIN_EXE_llmctl").to_string(),
    )];
    if let Ok(server) = std::env::var("LLMCTL_LLAMA_SERVER") {
        env.push(("LLMCTL_SIM_LLAMA_SERVER", server));
    }
    if let Ok(m) = std::env::var("LLMCTL_TEST_MODEL") {
        env.push(("LLMCTL_SIM_MODEL", m));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    SimCluster::start_env(
        &support::repo().join(format!("fixtures/clusters/{name}.toml")),
        n,
        &env,
    )
}

#[test]
fn doctor_and_plan_over_a_three_node_cluster_in_three_states() {
    let cluster = start("three-nodes", 110);
    let (pve1, pve2, pve3) = (
        cluster.node("pve1"),
        cluster.node("pve2"),
        cluster.node("pve3"),
    );
    let dir = tempfile::tempdir().unwrap();

    // doctor judging the nodes alone (no [driver]/[model]), discovered through pve2: every node, in node order.
    let config = dir.path().join("lab.toml");
    std::fs::write(
        &config,
        format!(
            "[cluster]\nnode = \"{}\"\n\n[cluster.nodes.pve1]\nvmid = 101\n\n[cluster.nodes.pve2]\nvmid = 102\n\n\
             [cluster.nodes.pve3]\nvmid = 103\n",
            pve2.target
        ),
    )
    .unwrap();
    let o = llmctl(&config, &cluster, &["doctor"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    let (line, hosts, summary) = report(&out);
    assert_eq!(
        line,
        format!(
            "cluster lab: 3 nodes (pve1, pve2, pve3), discovered through {}",
            pve2.target
        )
    );
    let heads: Vec<&str> = hosts.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(
        heads,
        [
            format!("pve1 ({})", pve1.target),
            format!("pve2 ({})", pve2.target),
            format!("pve3 ({})", pve3.target),
        ],
        "{out}"
    );
    // Each node's own problems, and only them: healthy; fresh (no driver, nothing in the CT); a DKMS build
    // that fails for the booted kernel.
    assert!(
        hosts[0]
            .1
            .starts_with(&format!("llmctl doctor: {}, container 101", pve1.target)),
        "{}",
        hosts[0].1
    );
    assert_eq!(failures(&hosts[0].1), Vec::<&str>::new(), "{}", hosts[0].1);
    assert_eq!(
        failures(&hosts[1].1),
        [
            "driver.not-installed",
            "llama.not-installed",
            "svc.llama-server-down",
            "svc.proxy-down"
        ],
        "{}",
        hosts[1].1
    );
    assert_eq!(
        failures(&hosts[2].1),
        ["dkms.build-failed"],
        "{}",
        hosts[2].1
    );
    assert_eq!(
        row(&summary, "pve1")[1..],
        [pve1.target.as_str(), "healthy"]
    );
    assert_eq!(row(&summary, "pve2")[2], "4 findings", "{summary}");
    assert!(
        row(&summary, "pve3")[3].starts_with("dkms.build-failed: "),
        "{summary}"
    );
    assert!(
        summary.ends_with("exit 1 (problems found): pve2 (4 findings), pve3 (1 finding)\n"),
        "{summary}"
    );
    assert_eq!(err, "", "off a terminal, nothing on stderr");

    // provision --plan, with an override for pve2 (a different context): each node's own plan.
    let plan = dir.path().join("plan.toml");
    std::fs::write(
        &plan,
        format!(
            "{}\n[cluster]\nnode = \"{}\"\n\n[cluster.nodes.pve1]\nvmid = 101\n\n[cluster.nodes.pve2]\nvmid = 102\n\
             [cluster.nodes.pve2.server]\ncontext = 16384\n\n[cluster.nodes.pve3]\nvmid = 103\n",
            support::files::installation(),
            pve1.target
        ),
    )
    .unwrap();
    let o = llmctl(&plan, &cluster, &["provision", "--plan"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    let (line, hosts, summary) = report(&out);
    assert!(
        line.ends_with(&format!("discovered through {}", pve1.target)),
        "{line}"
    );
    assert_eq!(hosts.len(), 3, "{out}");
    let plans: Vec<&str> = hosts.iter().map(|(_, b)| b.as_str()).collect();
    for (plan, (node, vmid)) in plans.iter().zip([(pve1, 101), (pve2, 102), (pve3, 103)]) {
        assert!(
            plan.starts_with(&format!("llmctl provision: {}, CT {vmid}", node.target)),
            "{plan}"
        );
    }
    // The driver: as configured on pve1, to install on pve2, to replace (550 cannot build) on pve3.
    assert_eq!(step(plans[0], "driver"), "ok", "{}", plans[0]);
    assert_eq!(step(plans[1], "driver"), "change", "{}", plans[1]);
    assert_eq!(step(plans[2], "driver"), "change", "{}", plans[2]);
    // pve2's override is pve2's alone.
    assert!(plans[1].contains(" -c 16384 "), "{}", plans[1]);
    assert!(!plans[0].contains("16384") && !plans[2].contains("16384"));
    for name in ["pve2", "pve3"] {
        assert!(row(&summary, name)[2].ends_with(" to change"), "{summary}");
    }
    drop(cluster);
}

#[test]
fn an_offline_node_is_named_and_a_container_goes_through_the_node_that_runs_it() {
    let cluster = start("three-nodes-pve3-down", 120);
    let (pve1, pve2) = (cluster.node("pve1"), cluster.node("pve2"));
    let dir = tempfile::tempdir().unwrap();

    // No vmid anywhere: doctor finds each node's GPU container itself; pve3 is not tried.
    let config = dir.path().join("lab.toml");
    std::fs::write(&config, format!("[cluster]\nnode = \"{}\"\n", pve1.target)).unwrap();
    let o = llmctl(&config, &cluster, &["doctor"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}\n{err}");
    let (line, hosts, summary) = report(&out);
    assert_eq!(
        line,
        format!(
            "cluster lab: 3 nodes (pve1, pve2, pve3 offline), discovered through {}",
            pve1.target
        )
    );
    assert_eq!(hosts.len(), 3, "{out}");
    for (i, (node, vmid)) in [(pve1, 101), (pve2, 102)].into_iter().enumerate() {
        assert!(
            hosts[i]
                .1
                .starts_with(&format!("llmctl doctor: {}, container {vmid}", node.target)),
            "{}",
            hosts[i].1
        );
    }
    assert_eq!(failures(&hosts[0].1), Vec::<&str>::new(), "{}", hosts[0].1);
    assert_eq!(failures(&hosts[1].1).len(), 4, "{}", hosts[1].1);
    assert_eq!(hosts[2].0, "pve3 (root@pve3)");
    assert!(
        hosts[2]
            .1
            .contains("pve3 is offline in the cluster (.members)"),
        "{}",
        hosts[2].1
    );
    assert_eq!(
        row(&summary, "pve3")[1..],
        [
            "root@pve3",
            "unreachable",
            "offline in the cluster (.members)"
        ],
        "{summary}"
    );
    assert!(
        summary.ends_with("exit 2 (could not run): pve3 (unreachable)\n"),
        "{summary}"
    );

    // pve2's container is given as 101, which .vmlist says runs on pve1: it is examined through pve1.
    std::fs::write(
        &config,
        format!(
            "[cluster]\nnode = \"{}\"\n\n[cluster.nodes.pve2]\nvmid = 101\n",
            pve1.target
        ),
    )
    .unwrap();
    // --host pve2: one node, the one-host doctor as always (through pve1); the cluster line and the note on
    // stderr.
    let o = llmctl(&config, &cluster, &["doctor", "--host", "pve2"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    assert!(
        out.starts_with(&format!("llmctl doctor: {}, container 101", pve1.target)),
        "{out}"
    );
    assert!(!out.contains("=== ") && !out.contains("\nhost "), "{out}");
    assert_eq!(
        err.lines().collect::<Vec<_>>(),
        [
            format!(
                "cluster lab: 3 nodes (pve1, pve2, pve3 offline), discovered through {}",
                pve1.target
            ),
            format!(
                "note: CT 101 of [cluster.nodes.pve2] runs on pve1 (/etc/pve/.vmlist): examined and changed \
                 through pve1 ({}), the node that runs it",
                pve1.target
            ),
        ],
        "{err}"
    );

    // provision --plan over the cluster: the nodes without vmid are refused with the line that says where to
    // set it; the offline node gives the exit code.
    let plan = dir.path().join("plan.toml");
    std::fs::write(
        &plan,
        format!(
            "{}\n[cluster]\nnode = \"{}\"\n\n[cluster.nodes.pve3]\nvmid = 103\n",
            support::files::installation(),
            pve2.target
        ),
    )
    .unwrap();
    let o = llmctl(&plan, &cluster, &["provision", "--plan"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}\n{err}");
    let (_, hosts, summary) = report(&out);
    for (i, name) in ["pve1", "pve2"].into_iter().enumerate() {
        assert!(
            hosts[i]
                .1
                .starts_with(&format!("REFUSED: no vmid in [cluster.nodes.{name}]")),
            "{}",
            hosts[i].1
        );
        assert_eq!(
            row(&summary, name)[2..],
            ["refused", &format!("no vmid in [cluster.nodes.{name}]")],
            "{summary}"
        );
    }
    assert_eq!(row(&summary, "pve3")[2], "unreachable", "{summary}");
    assert!(
        summary.ends_with("exit 2 (could not run): pve3 (unreachable)\n"),
        "{summary}"
    );

    // Discovery through the offline node: the command stops as for an unreachable host, naming [cluster] node.
    let gone = cluster.node("pve3");
    std::fs::write(&config, format!("[cluster]\nnode = \"{}\"\n", gone.target)).unwrap();
    let o = llmctl(&config, &cluster, &["doctor"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}\n{err}");
    assert_eq!(out, "");
    assert!(
        err.contains(&format!(
            "cannot discover the cluster through [cluster] node {}: cannot reach {}",
            gone.target, gone.target
        )),
        "{err}"
    );
    drop(cluster);
}

/// The summary's outcome cell for each node, in order.
fn outcomes<'a>(summary: &'a str, names: &[&str]) -> Vec<&'a str> {
    names.iter().map(|n| row(summary, n)[2]).collect()
}

#[test]
fn provision_converges_every_reachable_node_and_a_second_run_changes_nothing() {
    let model = std::env::var("LLMCTL_TEST_MODEL")
        .expect("LLMCTL_TEST_MODEL is not set: eval \"$(bash scripts/test-stack.sh)\" first");
    assert!(
        std::env::var("LLMCTL_LLAMA_SERVER").is_ok(),
        "LLMCTL_LLAMA_SERVER is not set: eval \"$(bash scripts/test-stack.sh)\" first"
    );
    let cluster = start("three-nodes", 130);
    let names = ["pve1", "pve2", "pve3"];
    let pve1 = cluster.node("pve1");

    // The fresh node downloads the model and llama.cpp's source archive (one top folder, as GitHub's; the
    // simulated CUDA build needs only CMakeLists.txt) from a file server on its own link.
    let files = tempfile::tempdir().unwrap();
    std::fs::copy(&model, files.path().join("model.gguf")).unwrap();
    let src = files.path().join("llama.cpp-b11434");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("CMakeLists.txt"), "project(llama.cpp)\n").unwrap();
    let st = Command::new("tar")
        .args(["-czf", "llama.cpp-b11434.tar.gz", "llama.cpp-b11434"])
        .current_dir(files.path())
        .status()
        .unwrap();
    assert!(st.success());
    let pve2 = cluster.node("pve2");
    let test_side = format!("{}.1", pve2.addr.rsplit_once('.').unwrap().0);
    let server = support::files::FileServer::start(&test_side, files.path().to_path_buf());
    let base = format!("http://{test_side}:{}", server.port);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lab.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[cluster]\nnode = \"{}\"\n\n[cluster.nodes.pve1]\nvmid = 101\n\n[cluster.nodes.pve2]\nvmid = 102\n\
             [cluster.nodes.pve2.llama_cpp]\narchive_url = \"{base}/llama.cpp-{{ref}}.tar.gz\"\n\
             [cluster.nodes.pve2.model]\nsource = \"{base}/model.gguf\"\n\
             [cluster.nodes.pve2.proxy]\nlisten = \"0.0.0.0:4001\"\n\n[cluster.nodes.pve3]\nvmid = 103\n",
            support::files::installation(),
            pve2.target
        ),
    )
    .unwrap();

    // pve1 goes down before the run (the cluster is found through pve2): the two others, the fresh node and the
    // one whose DKMS cannot build, are converged in parallel all the same, each verified and smoke-tested; pve1
    // is named in the summary and gives the exit code.
    let cut = pve1.cut();
    let o = llmctl(&config, &cluster, &["provision", "--yes"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}\n{err}");
    let (_, hosts, summary) = report(&out);
    assert_eq!(hosts.len(), 3, "{out}");
    let got = outcomes(&summary, &names);
    assert_eq!(got[0], "unreachable", "{summary}");
    assert!(got[1].starts_with("changed ("), "{summary}");
    assert!(got[2].starts_with("changed ("), "{summary}");
    let why = row(&summary, "pve1")[3];
    assert!(
        why.starts_with(&format!("cannot reach {}", pve1.target))
            && why.contains("No route to host"),
        "{summary}"
    );
    assert!(
        summary.ends_with("exit 2 (could not run): pve1 (unreachable)\n"),
        "{summary}"
    );
    for (_, block) in &hosts[1..] {
        assert!(block.contains("smoke test: reply"), "{block}");
    }

    // status while pve1 is down: every node's screen under its heading, a row each, pve1 named.
    let o = llmctl(&config, &cluster, &["status"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}\n{err}");
    let (_, hosts, summary) = report(&out);
    let heads: Vec<&str> = hosts.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(
        heads,
        names.map(|n| format!("{n} ({})", cluster.node(n).target)),
        "{out}"
    );
    for (i, vmid) in [(1, 102), (2, 103)] {
        let block = &hosts[i].1;
        let node = cluster.node(names[i]);
        assert!(
            block.starts_with(&format!(
                "llmctl status: {}, container {vmid}\n",
                node.target
            )),
            "{block}"
        );
        assert!(block.trim_end().ends_with("\nall up"), "{block}");
    }
    // pve2's own [proxy] listen (its override), where its unit has the proxy listen.
    assert!(
        hosts[1]
            .1
            .contains("llmctl-proxy   active, http://127.0.0.1:4001: "),
        "{}",
        hosts[1].1
    );
    assert!(
        hosts[0]
            .1
            .starts_with(&format!("error: cannot reach {}", pve1.target)),
        "{}",
        hosts[0].1
    );
    assert_eq!(
        outcomes(&summary, &names),
        ["unreachable", "up", "up"],
        "{summary}"
    );
    assert!(
        summary.ends_with("exit 2 (could not run): pve1 (unreachable)\n"),
        "{summary}"
    );

    // pve1 is back (it was healthy): every node is now as configured.
    drop(cut);

    // A second run would change nothing, on any node.
    let o = llmctl(&config, &cluster, &["provision", "--check"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    let (_, hosts, summary) = report(&out);
    assert_eq!(hosts.len(), 3, "{out}");
    assert_eq!(
        outcomes(&summary, &names),
        ["as configured"; 3],
        "{summary}"
    );
    for (head, block) in &hosts {
        assert!(
            block.contains("\n0 of 19 steps would change something\n"),
            "{head}:\n{block}"
        );
    }
    assert!(summary.ends_with("exit 0 (success)\n"), "{summary}");
    // Each node as its own GPUs and kernel want it: the Blackwell node's llama.cpp built for sm_120, the 4090s'
    // for sm_89; pve3's new driver built by DKMS for its booted 6.17 kernel too.
    assert!(
        hosts[1].1.contains("for CUDA architectures 120;"),
        "{}",
        hosts[1].1
    );
    assert!(
        hosts[2].1.contains("for CUDA architectures 89;"),
        "{}",
        hosts[2].1
    );
    assert!(
        hosts[2]
            .1
            .contains("nvidia/595.71.05 installed for 6.14.8-2-pve, 6.17.2-1-pve"),
        "{}",
        hosts[2].1
    );

    // ... and doctor, judging by the same rules, is healthy on every node.
    let o = llmctl(&config, &cluster, &["doctor"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    let (_, hosts, summary) = report(&out);
    assert_eq!(hosts.len(), 3, "{out}");
    for (head, block) in &hosts {
        assert_eq!(failures(block), Vec::<&str>::new(), "{head}:\n{block}");
    }
    assert_eq!(outcomes(&summary, &names), ["healthy"; 3], "{summary}");
    assert!(summary.ends_with("exit 0 (success)\n"), "{summary}");

    // ... and status is up on every node: one JSON document, each node's status with its name.
    let o = llmctl(&config, &cluster, &["status", "--json"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("one JSON document");
    assert_eq!(doc["outcome"], "up", "{doc}");
    let hosts = doc["hosts"].as_array().unwrap();
    let got: Vec<(&str, &str)> = hosts
        .iter()
        .map(|h| (h["name"].as_str().unwrap(), h["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(got, names.map(|n| (n, "up")), "{doc}");
    assert_eq!(hosts[1]["proxy"]["url"], "http://127.0.0.1:4001", "{doc}");

    serve_over_the_fleet(&cluster, &config);
    drop(cluster);
}

/// A GET (or, with a body, a POST) from the test side, its answer as JSON.
fn http_json(url: &str, key: Option<&str>, body: Option<serde_json::Value>) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let mut rb = match body {
            Some(b) => http.post(url).json(&b),
            None => http.get(url),
        };
        if let Some(k) = key {
            rb = rb.header("x-api-key", k);
        }
        let resp = rb.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
        let text = resp.text().await.unwrap();
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("{url} answered no JSON: {text}"))
    })
}

/// `[proxy] upstreams = "fleet"` on the converged cluster: each node's proxy gets the others' as peers (over
/// the cluster's LAN, where `[cluster.nodes.X.proxy] url` says they are), every proxy the fleet's one key, and
/// a request to one node's proxy is served by another node's llama-server when its own is down.
fn serve_over_the_fleet(cluster: &SimCluster, config: &Path) {
    let names = ["pve1", "pve2", "pve3"];
    let mut toml = std::fs::read_to_string(config).unwrap();
    toml = toml.replacen(
        "listen = \"0.0.0.0:4000\"\n",
        "listen = \"0.0.0.0:4000\"\nupstreams = \"fleet\"\n",
        1,
    );
    // pve2's proxy listens on 4001 (its own [proxy] listen).
    for (name, port) in [("pve1", 4000), ("pve2", 4001), ("pve3", 4000)] {
        let header = format!("[cluster.nodes.{name}.proxy]\n");
        let url = format!("url = \"http://{}:{port}\"\n", cluster.node(name).lan);
        if toml.contains(&header) {
            toml = toml.replacen(&header, &format!("{header}{url}"), 1);
        } else {
            toml.push_str(&format!("\n{header}{url}"));
        }
    }
    std::fs::write(config, toml).unwrap();

    let o = llmctl(config, cluster, &["provision", "--yes"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    let (_, hosts, summary) = report(&out);
    for (head, block) in &hosts {
        assert!(
            block.contains("--peer") && block.contains("smoke test: reply"),
            "{head}:\n{block}"
        );
    }
    assert!(summary.ends_with("exit 0 (success)\n"), "{summary}");
    let o = llmctl(config, cluster, &["provision", "--check"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    assert_eq!(
        outcomes(&report(&out).2, &names),
        ["as configured"; 3],
        "{out}"
    );
    let o = llmctl(config, cluster, &["doctor"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).0);

    // One key for the fleet, in every container.
    let keys: Vec<String> = cluster
        .nodes
        .iter()
        .map(|nd| {
            let out = Command::new("bash")
                .arg(support::simhost_script())
                .args(["exec", &nd.n.to_string(), "pct", "exec"])
                .arg(nd.vmid.unwrap().to_string())
                .args(["--", "cat", "/etc/llmctl/proxy-api-key"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        })
        .collect();
    assert!(
        !keys[0].is_empty() && keys.iter().all(|k| k == &keys[0]),
        "one key for the fleet"
    );

    // A host whose key is not the fleet's: doctor over the fleet finds it as provision --check does (the
    // proxy-service step), and provision --yes writes the fleet's key there again.
    let pve3 = cluster.node("pve3");
    let ct = |n: u32, vmid: &str, cmd: &str| {
        let out = Command::new("bash")
            .arg(support::simhost_script())
            .args([
                "exec",
                &n.to_string(),
                "pct",
                "exec",
                vmid,
                "--",
                "sh",
                "-c",
                cmd,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    ct(
        pve3.n,
        "103",
        "echo another-key > /etc/llmctl/proxy-api-key",
    );
    let o = llmctl(config, cluster, &["doctor"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    let (_, hosts, summary) = report(&out);
    assert_eq!(
        failures(&hosts[2].1),
        ["plan.proxy-service"],
        "{}",
        hosts[2].1
    );
    assert_eq!(outcomes(&summary, &names)[..2], ["healthy"; 2], "{summary}");
    let o = llmctl(config, cluster, &["provision", "--check"]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert_eq!(
        step(&report(&out).1[2].1, "proxy-service"),
        "change",
        "{out}"
    );
    let o = llmctl(config, cluster, &["provision", "--plan"]);
    let (out, _) = text(&o);
    let plans = report(&out).1;
    assert!(plans[2].1.contains("write the fleet's API key"), "{out}");
    assert!(!plans[0].1.contains("API key to"), "{out}");
    // One host alone is judged and provisioned against the fleet's key too.
    let o = llmctl(config, cluster, &["doctor", "--host", "pve3"]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert_eq!(failures(&out), ["plan.proxy-service"], "{out}");
    let o = llmctl(config, cluster, &["provision", "--plan", "--host", "pve3"]);
    assert!(
        text(&o).0.contains("write the fleet's API key"),
        "{}",
        text(&o).0
    );
    let o = llmctl(config, cluster, &["provision", "--yes"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).0);
    let o = llmctl(config, cluster, &["doctor"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).0);

    // pve1's proxy: its own llama-server and two peers, all up. With its llama-server stopped, it still answers,
    // from a peer's.
    let pve1 = cluster.node("pve1");
    let proxy = format!("http://{}:4000", pve1.addr);
    let health = http_json(&format!("{proxy}/health"), None, None);
    let replicas = health["replicas"].as_array().unwrap();
    let peers: Vec<&serde_json::Value> = replicas.iter().filter(|r| r["peer"] == true).collect();
    assert_eq!(peers.len(), 2, "{health}");
    let wait_up = |want: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let h = http_json(&format!("{proxy}/health"), None, None);
            let up = h["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["peer"] == true && r["up"] == true)
                .count();
            if up == want || std::time::Instant::now() > deadline {
                return (up, h);
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    let (up, h) = wait_up(2);
    assert_eq!(up, 2, "both peers up: {h}");
    let stop = Command::new("bash")
        .arg(support::simhost_script())
        .args([
            "exec",
            &pve1.n.to_string(),
            "pct",
            "exec",
            "101",
            "--",
            "systemctl",
            "stop",
            "llama-server",
        ])
        .output()
        .unwrap();
    assert!(stop.status.success(), "{stop:?}");
    let answer = http_json(
        &format!("{proxy}/v1/messages"),
        Some(&keys[0]),
        Some(
            serde_json::json!({"model": "claude-sonnet-4-5", "max_tokens": 8,
                                "messages": [{"role": "user", "content": "Say hi"}]}),
        ),
    );
    assert_eq!(
        answer["type"], "message",
        "served by a peer while pve1's llama-server is down: {answer}"
    );
    let h = http_json(&format!("{proxy}/health"), None, None);
    assert_eq!(
        h["replicas"][0]["up"], false,
        "pve1's own llama-server is down: {h}"
    );
}
