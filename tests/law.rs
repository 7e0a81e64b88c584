//! The law between doctor and provision (issue 11, "Tests"): on every scenario in `fixtures/scenarios`, with a
//! config that matches the scenario,
//!
//! 1. `llmctl doctor` exits 0 exactly when `llmctl provision --check` exits 0 (healthy ⇔ nothing to change), and
//! 2. every problem doctor reports (severity warn or fail) has a fix that names a provision step, and that step is
//!    in the plan (`change` or `REFUSED` in `provision --check`).
//!
//! Each scenario runs on its own sim host (numbers 150-198, distinct from tests/support's 1-99 and
//! tests/doctor_scenarios.rs's 199-249), one after another; run it under `flock /tmp/llmctl-sim.lock`. Every
//! violating scenario is collected and reported at once, then the test fails.
//!
//! The config is derived from the merged scenario (`simtool.py scenario`): the driver version and flavour the host
//! has installed (or the scenario's `[law] driver_version` / `flavor` where the scenario's point is a config that
//! differs from the host, e.g. an open-module config on a Pascal GPU), and the installation `healthy.toml`
//! describes for everything else (llama.cpp b11434 from GitHub's archive, the model at /models/model.gguf, a 32k
//! context on port 8080, the proxy on 4000). The CTs get this llmctl binary and, when the test stack is prepared
//! (`LLMCTL_LLAMA_SERVER`, `LLMCTL_TEST_MODEL`), its real llama-server and model, as provision leaves them.

mod support;

use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;

use support::law::{fix_step, judge_law, plan_steps, problems};
use support::law::{law_config, merged};
use support::{SimHost, scenarios};

/// Sim host numbers owned by this test binary.
const FIRST_SIM: u32 = 150;
const LAST_SIM: u32 = 198;

fn llmctl(config: &Path, sim: &SimHost, args: &[&str]) -> Output {
    let ssh = [
        OsStr::new("--identity"),
        sim.key_path().as_os_str(),
        OsStr::new("--known-hosts"),
        sim.known_hosts_path().as_os_str(),
    ];
    support::llmctl(config, args, &ssh)
}

/// What one scenario broke, or `None`.
fn judge(path: &Path, n: u32) -> Option<String> {
    let name = path.file_stem().unwrap().to_string_lossy().into_owned();
    // What provision leaves in the CT: this very llmctl binary, and (when the test stack has it) the real CPU
    // llama-server as the build's binary, so `ldd` on it works as on a real build.
    // SAFETY: set before any thread of this test reads the environment; every scenario sets the same values.
    unsafe {
        std::env::set_var("LLMCTL_SIM_LLMCTL", env!("CARGO_BIN_EXE_llmctl"));
        if let Ok(server) = std::env::var("LLMCTL_LLAMA_SERVER") {
            std::env::set_var("LLMCTL_SIM_LLAMA_SERVER", server);
        }
        // A real GGUF as the CT's model, so provision's offload planner can read it.
        if let Ok(model) = std::env::var("LLMCTL_TEST_MODEL") {
            std::env::set_var("LLMCTL_SIM_MODEL", model);
        }
    }
    let scenario = merged(path);
    let sim = SimHost::start_retrying(path, n);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("llmctl.toml");
    std::fs::write(&config, law_config(&scenario, sim.ssh_target())).unwrap();
    let doctor = llmctl(&config, &sim, &["doctor", "--json"]);
    let check = llmctl(&config, &sim, &["provision", "--check"]);
    drop(sim);
    let d_exit = doctor.status.code().unwrap_or(-1);
    let c_exit = check.status.code().unwrap_or(-1);
    let mut wrong = Vec::new();
    // Issue 16 item 12: a scenario that describes what provision leaves (`[law] healthy = true`, `healthy.toml` and
    // the scenarios that only add what changes nothing) must be healthy under the law's config, not merely agree.
    // Read from the file itself, not the merged scenario: a scenario derived from `healthy` does not inherit it.
    let own: toml::Table = std::fs::read_to_string(path)
        .expect("read the scenario")
        .parse()
        .expect("the scenario is TOML");
    let must_be_healthy = own
        .get("law")
        .and_then(|l| l.get("healthy"))
        .and_then(|h| h.as_bool())
        .unwrap_or(false);
    if must_be_healthy && (d_exit != 0 || c_exit != 0) {
        wrong.push(format!(
            "the scenario describes what provision leaves, yet doctor exits {d_exit} and provision --check \
             exits {c_exit} (the sim's container and the law's config describe different installations)"
        ));
    }
    let judged = judge_law(&doctor, &check);
    wrong.extend(judged.breaches);
    if wrong.is_empty() {
        return None;
    }
    Some(format!("{name}: {}\n{}", wrong.join("; "), judged.context))
}

#[test]
fn doctor_healthy_exactly_when_provision_has_nothing_to_change() {
    let all = scenarios();
    assert!(
        all.len() as u32 <= LAST_SIM - FIRST_SIM + 1,
        "more scenarios than this test's sim numbers {FIRST_SIM}-{LAST_SIM}"
    );
    let started = std::time::Instant::now();
    let violations: Vec<String> = all
        .iter()
        .zip(FIRST_SIM..)
        .filter_map(|(path, n)| judge(path, n))
        .collect();
    eprintln!(
        "law: {} scenarios in {:.0} s, {} violating",
        all.len(),
        started.elapsed().as_secs_f64(),
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "the law (doctor exit 0 <=> provision --check exit 0; each finding's fix is a planned step) is broken on \
         {} of {} scenarios:\n{}",
        violations.len(),
        all.len(),
        violations.join("\n")
    );
}

#[test]
fn plan_lines_and_fixes_parse() {
    let out = "llmctl provision: x\n\n  ok       inventory        fine\n  change   cuda             the toolkit\n             [CT 103] $ apt-get install\n  REFUSED  model            no sha\n\n5 of 19 steps would change something\n";
    let steps = plan_steps(out);
    assert_eq!(steps.into_iter().collect::<Vec<_>>(), ["cuda", "model"]);
    assert_eq!(
        fix_step(&serde_json::json!({"provision": "llama"})).as_deref(),
        Some("llama")
    );
    assert_eq!(
        fix_step(&serde_json::json!("llmctl provision --only driver,dkms")).as_deref(),
        Some("driver")
    );
    assert_eq!(fix_step(&serde_json::json!({"command": "reboot"})), None);
    let p = problems(r#"{"findings":[{"id":"a","severity":"ok","fix":null},{"id":"b","severity":"fail","fix":{"provision":"cuda"}}]}"#).unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].step.as_deref(), Some("cuda"));
}
