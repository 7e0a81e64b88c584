//! A fleet from `[[hosts]]` (issue 13): two separate simulated Proxmox hosts (each its own network namespace
//! and real sshd; not a cluster), one healthy and one with an immutable resolv.conf, and a third inventory host
//! nobody listens for. `doctor` reports each host's findings under that host only, the summary table names
//! every host and the exit code is the worst one's; `status` shows each host's screen and names the unreachable
//! one; `--host NAME` selects; `provision --plan` shows each host's plan, with a per-host override merged over
//! the top-level section.
//!
//! Kept to one pair of sims and a handful of runs (about 30 s): every run reads the hosts, none changes them.

mod support;

use std::path::Path;
use std::process::Output;

use support::{SimHost, text};

fn llmctl(config: &Path, args: &[&str]) -> Output {
    support::llmctl::<&str>(config, args, &[])
}

/// The report split at its headings: (heading, the host's block), in output order, and what follows the last
/// block (the summary, which starts at its `host  target` header line).
fn blocks(stdout: &str) -> (Vec<(String, String)>, String) {
    let (body, summary) = stdout
        .split_once("\nhost ")
        .map(|(b, s)| (b.to_string(), format!("host {s}")))
        .unwrap_or_else(|| (stdout.to_string(), String::new()));
    let hosts = body
        .split("=== ")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            let (head, rest) = b.split_once(" ===\n").unwrap_or((b, ""));
            (head.to_string(), rest.to_string())
        })
        .collect();
    (hosts, summary)
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

/// Both sims' host keys in one known_hosts, and both client keys as --identity: the fleet's SSH flags are the
/// same for every host, as a user's ~/.ssh is.
fn ssh_flags(dir: &Path, sims: &[&SimHost]) -> Vec<String> {
    let known = dir.join("known_hosts");
    let lines: String = sims
        .iter()
        .map(|s| std::fs::read_to_string(s.known_hosts_path()).expect("the sim's known_hosts"))
        .collect();
    std::fs::write(&known, lines).unwrap();
    let mut flags = vec!["--known-hosts".to_string(), known.display().to_string()];
    for s in sims {
        flags.extend(["--identity".to_string(), s.key_path().display().to_string()]);
    }
    flags
}

/// An address nobody listens on: connection refused at once.
const GONE: &str = "root@127.0.0.1:1";

/// The summary's row for the unreachable host, and the exit line that names it.
fn unreachable_row_and_exit(summary: &str) {
    let g = row(summary, "gone");
    assert_eq!(g[1..3], [GONE, "unreachable"], "{summary}");
    assert!(
        g[3].starts_with("cannot reach root@127.0.0.1:1"),
        "{summary}"
    );
    assert!(
        summary.ends_with("exit 2 (could not run): gone (unreachable)\n"),
        "{summary}"
    );
}

#[test]
fn doctor_and_provision_over_two_sim_hosts_and_an_unreachable_one() {
    // The sims' containers run this llmctl as their proxy (and the test stack's llama-server and model when
    // the environment has them), as provision leaves them: the healthy scenario is then healthy.
    let mut env: Vec<(&str, String)> = vec![(
        "LLMCTL_SIM_LLMCTL",
        env!("CARGO_BIN_EXE_llmctl").to_string(),
    )];
    if let Ok(server) = std::env::var("LLMCTL_LLAMA_SERVER") {
        env.push(("LLMCTL_SIM_LLAMA_SERVER", server));
    }
    let model = std::env::var("LLMCTL_TEST_MODEL").ok();
    if let Some(m) = &model {
        env.push(("LLMCTL_SIM_MODEL", m.clone()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let good = SimHost::start_env("healthy", &env);
    let broken = SimHost::start_env("resolv-immutable", &env);
    let dir = tempfile::tempdir().unwrap();
    let ssh = ssh_flags(dir.path(), &[&good, &broken]);
    let with_ssh = |args: &[&str]| -> Vec<String> {
        args.iter()
            .map(|s| s.to_string())
            .chain(ssh.iter().cloned())
            .collect()
    };
    let run = |config: &Path, args: &[&str]| {
        let argv = with_ssh(args);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        llmctl(config, &argv)
    };

    // doctor judging the hosts alone (no [driver]/[model]): each host's own findings.
    let inventory = dir.path().join("fleet.toml");
    std::fs::write(
        &inventory,
        format!(
            "[[hosts]]\nname = \"good\"\ntarget = \"{}\"\nvmid = 103\n\n\
             [[hosts]]\nname = \"broken\"\ntarget = \"{}\"\n\n\
             [[hosts]]\nname = \"gone\"\ntarget = \"{GONE}\"\nvmid = 103\n",
            good.ssh_target(),
            broken.ssh_target()
        ),
    )
    .unwrap();

    // All three: the two sims are diagnosed, the unreachable one is reported, and it gives the exit code.
    let o = run(&inventory, &["doctor"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}\n{err}");
    let (hosts, summary) = blocks(&out);
    let heads: Vec<&str> = hosts.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(
        heads,
        [
            format!("good ({})", good.ssh_target()),
            format!("broken ({})", broken.ssh_target()),
            format!("gone ({GONE})"),
        ],
        "{out}"
    );
    let (good_block, broken_block, gone_block) = (&hosts[0].1, &hosts[1].1, &hosts[2].1);
    assert!(
        good_block.starts_with(&format!(
            "llmctl doctor: {}, container 103",
            good.ssh_target()
        )),
        "{good_block}"
    );
    assert!(!good_block.contains("FAIL"), "{good_block}");
    assert!(good_block.contains("\nhealthy: 0 failed"), "{good_block}");
    let fails: Vec<&str> = broken_block
        .lines()
        .filter(|l| l.starts_with("FAIL"))
        .collect();
    assert_eq!(fails.len(), 1, "{broken_block}");
    assert!(fails[0].contains("ct.resolv-immutable"), "{broken_block}");
    assert!(
        gone_block.contains("cannot reach root@127.0.0.1:1"),
        "{gone_block}"
    );
    assert_eq!(row(&summary, "good")[1..3], [good.ssh_target(), "healthy"]);
    let b = row(&summary, "broken");
    assert_eq!(b[2], "1 finding", "{summary}");
    assert!(b[3].starts_with("ct.resolv-immutable: "), "{summary}");
    unreachable_row_and_exit(&summary);
    // Off a terminal no progress lines: stderr has nothing to say.
    assert_eq!(err, "", "{err}");

    // The two sims (by name): the broken one gives the exit code; --json is one document with both reports.
    let o = run(
        &inventory,
        &["doctor", "--host", "good", "--host", "broken", "--json"],
    );
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("one JSON document");
    assert_eq!(doc["outcome"], "problems-found", "{doc}");
    let hosts = doc["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 2, "{doc}");
    assert_eq!(
        (&hosts[0]["name"], &hosts[0]["outcome"]),
        (&"good".into(), &"healthy".into())
    );
    assert_eq!(hosts[1]["name"], "broken");
    let failed: Vec<&str> = hosts[1]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == "fail")
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["ct.resolv-immutable"], "{doc}");

    // One host by name is the one-host doctor, printed as always: no heading, no summary.
    let o = run(&inventory, &["doctor", "--host", "broken"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert!(
        out.starts_with(&format!(
            "llmctl doctor: {}, container 103",
            broken.ssh_target()
        )),
        "{out}"
    );
    assert!(!out.contains("=== ") && !out.contains("\nhost "), "{out}");

    // status over all three: each sim's screen under its heading, the unreachable one named; the exit code is
    // its. --json: one document, each host's status with its name.
    let o = run(&inventory, &["status"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}\n{err}");
    let (hosts, summary) = blocks(&out);
    assert_eq!(hosts.len(), 3, "{out}");
    for (i, sim) in [&good, &broken].into_iter().enumerate() {
        assert_eq!(
            hosts[i].0,
            format!("{} ({})", ["good", "broken"][i], sim.ssh_target())
        );
        assert!(
            hosts[i].1.starts_with(&format!(
                "llmctl status: {}, container 103\n",
                sim.ssh_target()
            )),
            "{}",
            hosts[i].1
        );
    }
    assert!(
        hosts[0].1.trim_end().ends_with("\nall up"),
        "{}",
        hosts[0].1
    );
    assert!(
        hosts[2]
            .1
            .starts_with("error: cannot reach root@127.0.0.1:1"),
        "{}",
        hosts[2].1
    );
    assert_eq!(row(&summary, "good")[1..3], [good.ssh_target(), "up"]);
    unreachable_row_and_exit(&summary);
    assert_eq!(err, "", "{err}");
    let o = run(&inventory, &["status", "--json"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}\n{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("one JSON document");
    assert_eq!(doc["outcome"], "unreachable", "{doc}");
    let hosts = doc["hosts"].as_array().unwrap();
    let names: Vec<&str> = hosts.iter().map(|h| h["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["good", "broken", "gone"], "{doc}");
    assert_eq!(
        (&hosts[0]["outcome"], &hosts[0]["vmid"]),
        (&"up".into(), &103.into()),
        "{doc}"
    );
    assert_eq!(hosts[2]["outcome"], "unreachable", "{doc}");
    assert!(
        hosts[2]["error"]
            .as_str()
            .unwrap()
            .starts_with("cannot reach root@127.0.0.1:1"),
        "{doc}"
    );

    // provision --plan over the two sims, with a per-host override: the healthy host's context is 16384 there.
    let plan_config = dir.path().join("plan.toml");
    std::fs::write(
        &plan_config,
        format!(
            r#"{}
[[hosts]]
name = "good"
target = "{}"
vmid = 103
[hosts.server]
context = 16384

[[hosts]]
name = "broken"
target = "{}"
vmid = 103
"#,
            support::files::installation(),
            good.ssh_target(),
            broken.ssh_target()
        ),
    )
    .unwrap();
    let o = run(&plan_config, &["provision", "--plan"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    let (hosts, summary) = blocks(&out);
    assert_eq!(hosts.len(), 2, "{out}");
    let (good_plan, broken_plan) = (&hosts[0].1, &hosts[1].1);
    assert!(
        good_plan.starts_with(&format!("llmctl provision: {}, CT 103", good.ssh_target())),
        "{good_plan}"
    );
    assert!(
        broken_plan.starts_with(&format!(
            "llmctl provision: {}, CT 103",
            broken.ssh_target()
        )),
        "{broken_plan}"
    );
    // Each host's own plan: the override changes only the healthy host's unit; only the broken host starts
    // its container.
    assert!(
        good_plan.contains("+ExecStart=") && good_plan.contains(" -c 16384 "),
        "{good_plan}"
    );
    assert!(!broken_plan.contains("16384"), "{broken_plan}");
    assert!(broken_plan.contains("$ pct start 103"), "{broken_plan}");
    assert!(!good_plan.contains("pct start"), "{good_plan}");
    for name in ["good", "broken"] {
        let r = row(&summary, name);
        assert!(r[2].ends_with(" to change"), "{summary}");
    }
    assert!(summary.ends_with("exit 0 (success)\n"), "{summary}");
    drop((good, broken));
}

/// What needs no host: a name that matches none, changing several hosts without --yes, a broken inventory.
#[test]
fn selection_and_inventory_errors_are_readable() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = dir.path().join("fleet.toml");
    std::fs::write(
        &inventory,
        format!(
            "[[hosts]]\nname = \"a\"\ntarget = \"{GONE}\"\nvmid = 103\n\n\
             [[hosts]]\nname = \"b\"\ntarget = \"root@127.0.0.1:2\"\nvmid = 104\n"
        ),
    )
    .unwrap();
    let o = llmctl(&inventory, &["doctor", "--host", "c"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--host c: no host of that name (or target)")
            && err.contains("its hosts are: a, b"),
        "{err}"
    );

    // status --watch redraws one host's screen: over several it says how to pick one, before reaching any.
    let o = llmctl(&inventory, &["status", "--watch"]);
    let (out, err) = text(&o);
    assert_eq!((o.status.code(), out.as_str()), (Some(2), ""), "{err}");
    assert!(
        err.contains("--watch refreshes one host's status and 2 hosts are selected (a, b)"),
        "{err}"
    );

    // Changing several hosts takes --yes, asked before any host is touched.
    let o = llmctl(&inventory, &["provision"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(out, "");
    assert!(
        err.contains("provision over 2 hosts (a, b)") && err.contains("--yes"),
        "{err}"
    );

    std::fs::write(
        &inventory,
        "[host]\ntarget = \"root@pve\"\n\n[[hosts]]\nname = \"a\"\ntarget = \"root@pve2\"\n",
    )
    .unwrap();
    let o = llmctl(&inventory, &["doctor"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("fleet.toml: has both [host] and [[hosts]]") && !err.contains("panicked"),
        "{err}"
    );
}
