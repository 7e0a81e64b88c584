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

use std::collections::BTreeSet;
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A running sim host (`fixtures/sim/simhost up`), torn down on drop.
struct Sim {
    n: u32,
    target: String,
    key: String,
    known_hosts: String,
}

impl Sim {
    fn up(scenario: &Path, n: u32) -> Sim {
        let simhost = repo().join("fixtures/sim/simhost");
        // A leftover from a crashed run is cleaned first (down is idempotent).
        let _ = Command::new("bash")
            .arg(&simhost)
            .args(["down", &n.to_string()])
            .output();
        let out = Command::new("bash")
            .arg(&simhost)
            .arg("up")
            .arg(scenario)
            .arg(n.to_string())
            .output()
            .expect("run fixtures/sim/simhost");
        assert!(
            out.status.success(),
            "cannot start the simulated Proxmox host for {} (these tests need root, ip netns, sshd, python3 >= 3.11):\n{}{}",
            scenario.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("simhost up printed no {k}= line:\n{text}"))
                .to_string()
        };
        Sim {
            n,
            target: get("SIM_TARGET"),
            key: get("SIM_KEY"),
            known_hosts: get("SIM_KNOWN_HOSTS"),
        }
    }

    fn doctor(&self, extra: &[&str]) -> Output {
        let mut args = vec![
            "doctor",
            "--host",
            &self.target,
            "--identity",
            &self.key,
            "--known-hosts",
            &self.known_hosts,
        ];
        args.extend_from_slice(extra);
        llmctl(&args)
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("fixtures/sim/simhost"))
            .args(["down", &self.n.to_string()])
            .output();
    }
}

struct Expect {
    findings: BTreeSet<String>,
    exit: i32,
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
    Expect { findings, exit }
}

fn scenarios() -> Vec<PathBuf> {
    let dir = repo().join("fixtures/scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

/// Runs doctor --json on one scenario; Err describes any difference from its [expect].
fn check_scenario(path: &Path, n: u32) -> Result<(), String> {
    let expect = expectation(path);
    let sim = Sim::up(path, n);
    let out = sim.doctor(&["--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let name = path.file_name().unwrap().to_string_lossy();
    let report: serde_json::Value = serde_json::from_str(&stdout).map_err(|e| {
        format!("{name}: doctor printed no JSON report ({e}); exit {:?}\nstdout:\n{stdout}\nstderr:\n{}", out.status.code(), stderr(&out))
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
    let files = scenarios();
    assert!(
        files.len() >= 15,
        "expected the scenario set in fixtures/scenarios, found {}",
        files.len()
    );
    // A few sim hosts at a time: each is an sshd plus short-lived Python tools.
    let mut failures = Vec::new();
    for (chunk_index, chunk) in files.chunks(4).enumerate() {
        let handles: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let path = path.clone();
                let n = 200 + (chunk_index * 4 + i) as u32 % 50;
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
    let sim = Sim::up(&repo().join("fixtures/scenarios/healthy.toml"), 199);

    // Healthy, text: every check listed, a summary, exit 0.
    let o = sim.doctor(&[]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{text}\n{}", stderr(&o));
    assert!(text.contains("ok    ct.libs-mismatch"), "{text}");
    assert!(text.contains("\nhealthy"), "{text}");

    // A container that does not exist: the report, then exit 2 with the fix on stderr.
    let o = sim.doctor(&["--vmid", "999"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("FAIL  ct.missing"));
    assert!(
        stderr(&o).contains("container 999 does not exist") && stderr(&o).contains("--vmid"),
        "{}",
        stderr(&o)
    );

    // An unknown host key: refused, with the fingerprint and the flag.
    let tmp = tempfile::tempdir().unwrap();
    let empty_known = tmp.path().join("known_hosts");
    std::fs::write(&empty_known, "").unwrap();
    let o = llmctl(&[
        "doctor",
        "--host",
        &sim.target,
        "--identity",
        &sim.key,
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
        &sim.target,
        "--identity",
        wrong.to_str().unwrap(),
        "--known-hosts",
        &sim.known_hosts,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("authentication as root@") && stderr(&o).contains("failed"),
        "{}",
        stderr(&o)
    );
}
