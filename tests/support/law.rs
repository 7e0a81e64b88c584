//! The config each scenario is judged with by the law (tests/law.rs on the sim, tests/fast_tier.rs in-process):
//! the driver the scenario's host has installed (or its `[law]` overrides) and the installation `healthy.toml`
//! describes for everything else. See tests/law.rs's header.

use std::path::Path;
use std::process::Command;

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
