//! `llmctl doctor` through the real binary: readable errors (exit 2) for hosts it cannot check, and, for every
//! `fixtures/scenarios/*.toml`, the exact set of problem findings against a simulated Proxmox host with a real
//! sshd.

use std::path::Path;
use std::process::{Command, Output};

fn llmctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llmctl"))
        .args(args)
        // No ./llmctl.toml or user config leaks into the test.
        .current_dir(std::env::temp_dir())
        .env("HOME", std::env::temp_dir())
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .expect("run llmctl")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn no_host_is_a_readable_error() {
    let o = llmctl(&["doctor"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no host given: pass --host"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_machine_that_is_not_proxmox() {
    // This test machine is plain Debian: `pveversion` does not exist here.
    assert!(
        !Path::new("/usr/bin/pveversion").exists(),
        "this test needs a machine that is not a Proxmox host"
    );
    let o = llmctl(&["doctor", "--host", "local"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("local is not a Proxmox VE host"), "{err}");
    assert!(
        err.contains("Run llmctl against the Proxmox host itself"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

#[test]
fn an_unreachable_host() {
    // Nothing listens on port 1 of the loopback address: connection refused.
    let o = llmctl(&["doctor", "--host", "root@127.0.0.1:1"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot reach") && err.contains("127.0.0.1"),
        "{err}"
    );
    // --json still prints a report on stdout, saying why there are no findings.
    let o = llmctl(&["doctor", "--host", "root@127.0.0.1:1", "--json"]);
    assert_eq!(o.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&o.stdout)
        )
    });
    assert_eq!(v["outcome"], "could-not-run");
    assert!(v["error"].as_str().unwrap().contains("cannot reach"), "{v}");
    assert_eq!(v["findings"], serde_json::json!([]));
}

#[test]
fn a_bad_vmid_is_rejected_by_the_parser() {
    let o = llmctl(&["doctor", "--host", "local", "--vmid", "103;reboot"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("invalid value '103;reboot'"),
        "{}",
        stderr(&o)
    );
}

// ---- against the simulated Proxmox host (real sshd in its own network namespace) ------------------------------

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;

use support::{SimHost, repo, scenarios};

/// The sim-host tests of this file take turns: on a small shared CI machine several sshd + Python sim hosts
/// starting at once can miss simhost's start deadline.
static SIM_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn sim_turn() -> std::sync::MutexGuard<'static, ()> {
    SIM_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// doctor against a sim host, with only its key and known_hosts.
fn doctor(sim: &SimHost, extra: &[&str]) -> Output {
    let mut args = vec![
        "doctor",
        "--host",
        sim.ssh_target(),
        "--identity",
        sim.key_path().to_str().expect("utf-8 path"),
        "--known-hosts",
        sim.known_hosts_path().to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    llmctl(&args)
}

struct Expect {
    findings: BTreeSet<String>,
    exit: i32,
    /// Text stderr must contain (the could-not-run scenarios).
    stderr_contains: Option<String>,
}

fn expectation(path: &Path) -> Expect {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: toml::Table =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let expect = doc
        .get("expect")
        .and_then(|v| v.as_table())
        .unwrap_or_else(|| panic!("{} has no [expect] section", path.display()));
    let findings: BTreeSet<String> = expect
        .get("findings")
        .and_then(|v| v.as_array())
        .unwrap_or_else(|| panic!("{}: [expect] findings = [...] is missing", path.display()))
        .iter()
        .map(|v| v.as_str().expect("finding ids are strings").to_string())
        .collect();
    let exit = expect
        .get("exit")
        .and_then(|v| v.as_integer())
        .map(|i| i as i32)
        .unwrap_or(if findings.is_empty() { 0 } else { 1 });
    let stderr_contains = expect
        .get("stderr_contains")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    Expect {
        findings,
        exit,
        stderr_contains,
    }
}

/// Runs doctor --json on one scenario; Err describes any difference from its [expect].
fn check_scenario(path: &Path, n: u32) -> Result<(), String> {
    let expect = expectation(path);
    let sim = SimHost::start_provisioned(path, n);
    let out = doctor(&sim, &["--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let name = path.file_name().unwrap().to_string_lossy();
    if expect.exit == 2 && expect.findings.is_empty() {
        // Could not run: no report, one readable error line, never a panic.
        let err = stderr(&out);
        let mut problems = Vec::new();
        if out.status.code() != Some(2) {
            problems.push(format!(
                "exit code: expected 2, got {:?}",
                out.status.code()
            ));
        }
        if !err.starts_with("error: ") || err.contains("panicked") {
            problems.push(format!("stderr is not one readable error: {err}"));
        }
        if let Some(want) = &expect.stderr_contains
            && !err.contains(want.as_str())
        {
            problems.push(format!("stderr lacks {want:?}: {err}"));
        }
        return if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("{name}:\n{}", problems.join("\n")))
        };
    }
    let report: serde_json::Value = serde_json::from_str(&stdout).map_err(|e| {
        format!(
            "{name}: doctor printed no JSON report ({e}); exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status.code(),
            stderr(&out)
        )
    })?;
    let findings = report["findings"].as_array().cloned().unwrap_or_default();
    let got: BTreeSet<String> = findings
        .iter()
        .filter(|f| matches!(f["severity"].as_str(), Some("warn" | "fail")))
        .filter_map(|f| f["id"].as_str().map(str::to_string))
        .collect();
    let mut problems = Vec::new();
    if got != expect.findings {
        let details: Vec<String> = findings
            .iter()
            .filter(|f| matches!(f["severity"].as_str(), Some("warn" | "fail")))
            .map(|f| {
                format!(
                    "  {} {}: {}\n    evidence: {}",
                    f["severity"], f["id"], f["title"], f["evidence"]
                )
            })
            .collect();
        problems.push(format!(
            "findings: expected {:?}, got {:?}\n  missing: {:?}\n  unexpected: {:?}\n{}",
            expect.findings,
            got,
            expect.findings.difference(&got).collect::<Vec<_>>(),
            got.difference(&expect.findings).collect::<Vec<_>>(),
            details.join("\n")
        ));
    }
    if out.status.code() != Some(expect.exit) {
        problems.push(format!(
            "exit code: expected {}, got {:?} (stderr: {})",
            expect.exit,
            out.status.code(),
            stderr(&out)
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{name}:\n{}", problems.join("\n")))
    }
}

#[test]
fn every_scenario_reports_exactly_its_expected_findings() {
    let _turn = sim_turn();
    let files = scenarios();
    assert!(
        files.len() >= 15,
        "expected the scenario set in fixtures/scenarios, found {}",
        files.len()
    );
    // Two sim hosts at a time: each is an sshd plus short-lived Python tools.
    let mut failures = Vec::new();
    for (chunk_index, chunk) in files.chunks(2).enumerate() {
        let handles: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let path = path.clone();
                let n = 200 + (chunk_index * 2 + i) as u32 % 50;
                std::thread::spawn(move || check_scenario(&path, n))
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(e),
                Err(panic) => failures.push(
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "a scenario thread panicked".into()),
                ),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} scenarios differ:\n\n{}",
        failures.len(),
        files.len(),
        failures.join("\n\n")
    );
}

#[test]
fn readable_errors_and_the_text_report_against_a_sim_host() {
    let _turn = sim_turn();
    // Sim host numbers 199-249 are this file's (tests/support uses 1-99).
    let sim = SimHost::start_provisioned(&repo().join("fixtures/scenarios/healthy.toml"), 199);

    // Healthy, text: every check listed, a summary, exit 0.
    let o = doctor(&sim, &[]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{text}\n{}", stderr(&o));
    assert!(text.contains("ok    ct.libs-mismatch"), "{text}");
    assert!(text.contains("\nhealthy"), "{text}");

    // A container that does not exist: the report, then exit 2 with the fix on stderr.
    let o = doctor(&sim, &["--vmid", "999"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("FAIL  ct.missing"));
    assert!(
        stderr(&o).contains("container 999 does not exist") && stderr(&o).contains("--vmid"),
        "{}",
        stderr(&o)
    );

    // Host and vmid from llmctl.toml's [host] section.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("llmctl.toml");
    std::fs::write(
        &cfg,
        format!("[host]\ntarget = \"{}\"\nvmid = 999\n", sim.ssh_target()),
    )
    .unwrap();
    let o = llmctl(&[
        "--config",
        cfg.to_str().unwrap(),
        "doctor",
        "--identity",
        sim.key_path().to_str().unwrap(),
        "--known-hosts",
        sim.known_hosts_path().to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("container 999 does not exist"),
        "{}",
        stderr(&o)
    );

    // An unknown host key: refused, with the fingerprint and the flag.
    let empty_known = tmp.path().join("known_hosts");
    std::fs::write(&empty_known, "").unwrap();
    let o = llmctl(&[
        "doctor",
        "--host",
        sim.ssh_target(),
        "--identity",
        sim.key_path().to_str().unwrap(),
        "--known-hosts",
        empty_known.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("SHA256:") && stderr(&o).contains("--accept-new-host-key"),
        "{}",
        stderr(&o)
    );

    // A key the host does not accept.
    let wrong = tmp.path().join("wrong_key");
    let kg = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&wrong)
        .output()
        .unwrap();
    assert!(kg.status.success());
    let o = llmctl(&[
        "doctor",
        "--host",
        sim.ssh_target(),
        "--identity",
        wrong.to_str().unwrap(),
        "--known-hosts",
        sim.known_hosts_path().to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("authentication as root@") && stderr(&o).contains("failed"),
        "{}",
        stderr(&o)
    );
}

/// Host states beyond the scenario set, written to a temp dir beside a copy of healthy.toml (`base = "healthy"`).
fn temp_scenario(dir: &Path, name: &str, body: &str) -> PathBuf {
    let healthy = repo().join("fixtures/scenarios/healthy.toml");
    std::fs::copy(&healthy, dir.join("healthy.toml")).expect("copy healthy.toml");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, format!("base = \"healthy\"\n{body}")).expect("write scenario");
    path
}

fn problem_ids(out: &Output) -> BTreeSet<String> {
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {}", stderr(out)));
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| matches!(f["severity"].as_str(), Some("warn" | "fail")))
        .map(|f| f["id"].as_str().expect("id").to_string())
        .collect()
}

#[test]
fn more_host_states_through_the_sim() {
    let _turn = sim_turn();
    let tmp = tempfile::tempdir().unwrap();

    // Container libraries right but not held: provision holds them, so doctor fails naming that step.
    let path = temp_scenario(
        tmp.path(),
        "libs-unheld",
        "[containers.103]\nlibs_held = false\n",
    );
    let sim = SimHost::start_provisioned(&path, 240);
    let o = doctor(&sim, &["--json"]);
    assert_eq!(
        problem_ids(&o),
        BTreeSet::from(["ct.libs-not-pinned".to_string()])
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    drop(sim);

    // A stopped container with nothing else wrong.
    let path = temp_scenario(
        tmp.path(),
        "stopped",
        "[containers.103]\nstatus = \"stopped\"\n",
    );
    let sim = SimHost::start_provisioned(&path, 241);
    let o = doctor(&sim, &["--json"]);
    assert_eq!(
        problem_ids(&o),
        BTreeSet::from(["ct.not-running".to_string()])
    );
    assert_eq!(o.status.code(), Some(1));
    drop(sim);

    // Two GPU containers and no --vmid: doctor cannot guess, and says how to choose.
    let second = std::fs::read_to_string(repo().join("fixtures/scenarios/healthy.toml"))
        .unwrap()
        .split("[containers.103]")
        .nth(1)
        .and_then(|rest| rest.split("[expect]").next())
        // The sim's containers share one network namespace: the second one's services get ports of their own.
        .map(|c| {
            c.replace("hostname = \"llm-server\"", "hostname = \"llm-two\"")
                .replace("llama_port = 8080", "llama_port = 8081\nproxy_port = 4001")
        })
        .expect("healthy.toml has a [containers.103] table");
    let path = temp_scenario(
        tmp.path(),
        "two-gpu-cts",
        &format!("[containers.104]{second}"),
    );
    let sim = SimHost::start_provisioned(&path, 242);
    let o = doctor(&sim, &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot tell which container to check")
            && err.contains("103")
            && err.contains("104"),
        "{err}"
    );
    assert!(err.contains("--vmid"), "{err}");
    let o = doctor(&sim, &["--json", "--vmid", "104"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["vmid"], 104);
    assert_eq!(report["outcome"], "healthy");
}
