//! The config each scenario is judged with by the law (tests/law.rs on the sim, tests/fast_tier.rs in-process):
//! the driver the scenario's host has installed (or its `[law]` overrides) and the installation `healthy.toml`
//! describes for everything else. See tests/law.rs's header.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use super::repo;

/// The model sha256 when a scenario's container declares none (`[law] model_sha256` overrides it per scenario).
pub const MODEL_SHA256: &str = "3f5bc0e2a1b1d4fd0e3b6f0f6cc9c8b7a8a52b4e6f2e4a3d1c0b9a8f7e6d5c4b";

/// The scenario with its `base` chain merged, as the simulator itself reads it.
pub fn merged(path: &Path) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(repo().join("fixtures/sim/simtool.py"))
        .arg("scenario")
        .arg(path)
        .output()
        .expect("run python3 fixtures/sim/simtool.py");
    assert!(
        out.status.success(),
        "simtool.py scenario {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("simtool.py scenario prints JSON")
}

pub fn str_at<'a>(v: &'a serde_json::Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for key in path {
        cur = cur.get(key)?;
    }
    cur.as_str().filter(|s| !s.is_empty())
}

/// llmctl.toml for this scenario (see the module comment).
pub fn law_config(scenario: &serde_json::Value, target: &str) -> String {
    let version = str_at(scenario, &["law", "driver_version"])
        .or_else(|| str_at(scenario, &["host", "driver", "installed"]))
        .unwrap_or("595.71.05");
    let flavor = str_at(scenario, &["law", "flavor"])
        .or_else(|| str_at(scenario, &["host", "driver", "flavour"]))
        .unwrap_or("open");
    // With the test stack's real model in the CT (LLMCTL_SIM_MODEL), the sha256 is that file's.
    let real = std::env::var("LLMCTL_SIM_MODEL")
        .ok()
        .map(|m| sha256_hex(Path::new(&m)));
    let sha = str_at(scenario, &["law", "model_sha256"])
        .or(real.as_deref())
        .or_else(|| str_at(scenario, &["containers", "103", "model", "sha256"]))
        .unwrap_or(MODEL_SHA256);
    let dest =
        str_at(scenario, &["containers", "103", "model", "dest"]).unwrap_or("/models/model.gguf");
    format!(
        r#"[host]
target = "{target}"
vmid = 103

[driver]
version = "{version}"
flavor = "{flavor}"

[llama_cpp]
git_ref = "b11434"

[model]
source = "https://huggingface.co/bartowski/SmolLM2-135M-Instruct-GGUF/resolve/main/SmolLM2-135M-Instruct-Q4_K_M.gguf"
sha256 = "{sha}"
dest = "{dest}"

[server]
context = 32768
port = 8080

[proxy]
listen = "0.0.0.0:4000"
"#
    )
}

pub fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// One doctor problem: its id and the provision step its fix names (`None`: a manual command or no fix).
#[derive(Debug)]
pub struct Problem {
    pub id: String,
    pub severity: String,
    pub step: Option<String>,
    pub fix: String,
}

pub fn problems(doctor_json: &str) -> Result<Vec<Problem>, String> {
    let v: serde_json::Value = serde_json::from_str(doctor_json)
        .map_err(|e| format!("doctor --json did not print JSON ({e}): {doctor_json}"))?;
    let findings = v
        .get("findings")
        .and_then(|f| f.as_array())
        .ok_or_else(|| format!("doctor --json has no findings array: {doctor_json}"))?;
    Ok(findings
        .iter()
        .filter_map(|f| {
            let severity = f.get("severity")?.as_str()?.to_string();
            if severity != "warn" && severity != "fail" {
                return None;
            }
            let fix = f.get("fix").cloned().unwrap_or(serde_json::Value::Null);
            Some(Problem {
                id: f.get("id")?.as_str()?.to_string(),
                severity,
                step: fix_step(&fix),
                fix: fix.to_string(),
            })
        })
        .collect())
}

/// The provision step a fix names: `{"provision": "cuda"}`, or a command `llmctl provision --only cuda[,...]`
/// (the first step named).
pub fn fix_step(fix: &serde_json::Value) -> Option<String> {
    if let Some(step) = fix.get("provision").and_then(|s| s.as_str()) {
        return Some(step.to_string());
    }
    let text = fix
        .as_str()
        .or_else(|| fix.get("command").and_then(|c| c.as_str()))?;
    let rest = text.split("llmctl provision --only ").nth(1)?;
    rest.split([',', ' ']).next().map(str::to_string)
}

/// Steps `provision --check` reports as `change` or `REFUSED` (its `  <tag> <id> <detail>` lines).
pub fn plan_steps(check_stdout: &str) -> BTreeSet<String> {
    check_stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let tag = w.next()?;
            let id = w.next()?;
            (l.starts_with("  ") && !l.starts_with("   ") && (tag == "change" || tag == "REFUSED"))
                .then(|| id.to_string())
        })
        .collect()
}

/// What the law says of one state: doctor's `--json` run and `provision --check`'s, on the same host and config.
pub struct Judged {
    /// Each way the law is broken (empty: it holds).
    pub breaches: Vec<String>,
    /// Doctor's problems and the plan's steps, for a failure message.
    pub context: String,
}

/// The law (issue 11): doctor exits 0 exactly when `provision --check` exits 0, and every warn/fail finding's fix
/// names a step the plan contains (`change` or `REFUSED`).
pub fn judge_law(doctor: &Output, check: &Output) -> Judged {
    let d_exit = doctor.status.code().unwrap_or(-1);
    let c_exit = check.status.code().unwrap_or(-1);
    let steps = plan_steps(&String::from_utf8_lossy(&check.stdout));
    let mut breaches = Vec::new();
    if (d_exit == 0) != (c_exit == 0) {
        breaches.push(format!(
            "doctor exits {d_exit}, provision --check exits {c_exit}"
        ));
    }
    let found = match problems(&String::from_utf8_lossy(&doctor.stdout)) {
        Ok(p) => p,
        Err(e) => {
            // doctor could not run (exit 2, e.g. not Proxmox): the exit codes above are all the law can say.
            if d_exit != 2 {
                breaches.push(e);
            }
            Vec::new()
        }
    };
    for p in &found {
        match &p.step {
            Some(step) if steps.contains(step) => {}
            Some(step) => breaches.push(format!(
                "{} ({}): fix names step `{step}`, which the plan does not contain",
                p.id, p.severity
            )),
            None => breaches.push(format!(
                "{} ({}): fix names no provision step ({})",
                p.id, p.severity, p.fix
            )),
        }
    }
    let ids: Vec<&str> = found.iter().map(|p| p.id.as_str()).collect();
    let check_err = String::from_utf8_lossy(&check.stderr);
    let context = format!(
        "    doctor problems: [{}]\n    plan steps: [{}]{}",
        ids.join(", "),
        steps.into_iter().collect::<Vec<_>>().join(", "),
        if c_exit == 2 {
            format!("\n    provision --check stderr: {}", check_err.trim())
        } else {
            String::new()
        }
    );
    Judged { breaches, context }
}
