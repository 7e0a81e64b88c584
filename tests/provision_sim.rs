//! `llmctl provision` end to end against the simulated Proxmox host (real sshd, real files, real processes):
//! fresh host → provisioned → `doctor` healthy → a second run changes nothing; lockstep driver upgrades with a
//! reboot; broken scenarios repaired or refused; a run killed mid-step completes when run again; the plan.
//!
//! The container runs the real CPU llama-server of the test stack (the simulated CUDA build installs it) with the
//! real SmolLM2 model, downloaded by the llmctl binary that provision installed in the container, and the real
//! `llmctl serve-proxy`; the final smoke test sends a message through both. Needs the test stack
//! (`eval "$(bash scripts/test-stack.sh)"`): LLMCTL_LLAMA_SERVER and LLMCTL_TEST_MODEL.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

use support::SimHost;
use support::files::FileServer;

/// Provision runs are heavy on 2 cores (a real llama-server per host): one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn llmctl() -> &'static str {
    env!("CARGO_BIN_EXE_llmctl")
}

fn stack_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the tests through scripts/test.sh (it prepares the test stack)"
        )
    })
}

fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A sim host, the files its container downloads, and an llmctl.toml pointing at both.
struct Bed {
    sim: SimHost,
    _files: tempfile::TempDir,
    dir: tempfile::TempDir,
    config: PathBuf,
}

const MODEL_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

impl Bed {
    fn new(scenario: &str) -> Bed {
        Self::with_version(scenario, "595.71.05")
    }

    fn with_version(scenario: &str, version: &str) -> Bed {
        Self::with_sim_env(scenario, version, &[])
    }

    /// A bed whose `simhost up` also gets `env` (e.g. `LLMCTL_SIM_MODEL`: the scenario's CT already has the model).
    fn with_sim_env(scenario: &str, version: &str, env: &[(&str, &str)]) -> Bed {
        // The simulated CUDA build installs the test stack's real CPU llama-server.
        // SAFETY: set before any thread of this test reads the environment; every test sets the same value.
        unsafe { std::env::set_var("LLMCTL_SIM_LLAMA_SERVER", stack_var("LLMCTL_LLAMA_SERVER")) };
        let sim = SimHost::start_env(scenario, env);
        let test_side = sim
            .addr
            .rsplit_once('.')
            .map(|(net, _)| format!("{net}.1"))
            .unwrap();
        let files = tempfile::tempdir().unwrap();
        let model = PathBuf::from(stack_var("LLMCTL_TEST_MODEL"));
        std::fs::copy(&model, files.path().join(MODEL_NAME)).unwrap();
        // A source archive shaped like GitHub's (one top folder); the simulated CUDA build only needs CMakeLists.txt.
        let src = files.path().join("llama.cpp-b11434");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(
            src.join("CMakeLists.txt"),
            "cmake_minimum_required(VERSION 3.14)\nproject(llama.cpp)\n",
        )
        .unwrap();
        let st = Command::new("tar")
            .args(["-czf", "llama.cpp-b11434.tar.gz", "llama.cpp-b11434"])
            .current_dir(files.path())
            .status()
            .unwrap();
        assert!(st.success());
        let server = FileServer::start(&test_side, files.path().to_path_buf());
        let base = format!("http://{test_side}:{}", server.port);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("llmctl.toml");
        std::fs::write(
            &config,
            format!(
                r#"[host]
target = "{target}"
vmid = 103

[container]
cores = 2
memory_mib = 4096

[driver]
version = "{version}"

[llama_cpp]
git_ref = "b11434"
archive_url = "{base}/llama.cpp-{{ref}}.tar.gz"

[model]
source = "{base}/{MODEL_NAME}"
sha256 = "{sha}"
dest = "/models/smollm2.gguf"

[server]
context = 32768
threads = 2
cache_type_k = "f16"
cache_type_v = "f16"
port = 8080

[proxy]
listen = "0.0.0.0:4000"
"#,
                target = sim.target,
                sha = sha256_hex(&model),
            ),
        )
        .unwrap();
        Bed {
            sim,
            _files: files,
            dir,
            config,
        }
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--identity".into(),
            self.sim.key.display().to_string(),
            "--known-hosts".into(),
            self.sim.known_hosts.display().to_string(),
        ]
    }

    fn llmctl(&self, cmd: &str, extra: &[&str]) -> Output {
        let mut c = Command::new(llmctl());
        c.arg("--config").arg(&self.config).arg(cmd);
        c.args(self.args()).args(extra).stdin(Stdio::null());
        c.output().expect("run llmctl")
    }

    /// Runs provision; after every run that may change the host (`--yes`), the law must hold on the state it left
    /// (issue 11: "on every state reached during the provision tests"), whether the run succeeded or not.
    fn provision(&self, extra: &[&str]) -> Output {
        let out = self.llmctl("provision", extra);
        if extra.contains(&"--yes") {
            self.assert_law(&format!("provision {}", extra.join(" ")));
        }
        out
    }

    /// doctor exits 0 exactly when `provision --check` does, and each finding's fix names a planned step.
    fn assert_law(&self, after: &str) {
        let doctor = self.llmctl("doctor", &["--json"]);
        let check = self.llmctl("provision", &["--check"]);
        let judged = support::law::judge_law(&doctor, &check);
        assert!(
            judged.breaches.is_empty(),
            "the law is broken on the state `{after}` left: {}\n{}\ndoctor:\n{}\nprovision --check:\n{}",
            judged.breaches.join("; "),
            judged.context,
            text(&doctor),
            text(&check)
        );
    }

    fn doctor(&self) -> Output {
        self.llmctl("doctor", &[])
    }

    /// A file in CT 103, as `pct exec 103 -- cat` prints it (empty when it is missing).
    fn ct_file(&self, path: &str) -> String {
        let out = self.sim.exec(&["pct", "exec", "103", "--", "cat", path]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Adds a line to the `[container]` section.
    fn container_option(&self, line: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(
            &self.config,
            text.replace("[container]\n", &format!("[container]\n{line}\n")),
        )
        .unwrap();
    }

    /// Adds a line to the `[server]` section.
    fn server_option(&self, line: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(
            &self.config,
            text.replace("[server]\n", &format!("[server]\n{line}\n")),
        )
        .unwrap();
    }

    fn set_version(&self, version: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let re = regex::Regex::new(r#"version = "[0-9.]+""#).unwrap();
        std::fs::write(
            &self.config,
            re.replace(&text, format!("version = \"{version}\""))
                .as_ref(),
        )
        .unwrap();
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn assert_ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what} failed:\n{}", text(o));
}

fn assert_healthy(bed: &Bed) {
    let d = bed.doctor();
    assert_eq!(
        d.status.code(),
        Some(0),
        "doctor after provision:\n{}",
        text(&d)
    );
    assert!(stdout(&d).contains("\nhealthy"), "{}", text(&d));
}

#[test]
fn fresh_host_is_provisioned_and_a_second_run_changes_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::new("fresh");
    // Claude Code answers through this host at the end: its ~20k-token first prompt needs one 32k slot (the tiny
    // model was trained on 8k), and +5 on SmolLM2's end-of-turn token keeps its reply short on a CPU (see the
    // claude role in tests/e2e/stack.py).
    bed.server_option(
        r#"extra_args = ["-np", "1", "--override-kv", "llama.context_length=int:32768", "--logit-bias", "2+5"]"#,
    );
    let before = bed.doctor();
    assert_eq!(
        before.status.code(),
        Some(1),
        "a fresh host has problems:\n{}",
        text(&before)
    );

    let check = bed.provision(&["--check"]);
    assert_eq!(
        check.status.code(),
        Some(1),
        "--check on a fresh host:\n{}",
        text(&check)
    );

    let first = bed.provision(&["--yes"]);
    assert_ok(&first, "provision of a fresh host");
    let out = stdout(&first);
    assert!(out.contains("smoke test: reply"), "{}", text(&first));
    assert!(out.contains("changed  driver"), "{}", text(&first));
    assert_healthy(&bed);

    let second = bed.provision(&["--yes"]);
    assert_ok(&second, "second provision");
    let out = stdout(&second);
    assert!(
        out.contains("0 of 19 steps would change something"),
        "{}\n--- what llmctl status and the journals said after this run:\n{}",
        text(&second),
        post_mortem(&bed)
    );
    assert!(out.contains("done: 0 step(s) changed"), "{}", text(&second));
    let check = bed.provision(&["--check"]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "--check after provision:\n{}",
        text(&check)
    );

    // Nothing secret in the rendered unit, and the key file is root-only.
    let unit = bed.sim.exec(&[
        "pct",
        "exec",
        "103",
        "--",
        "cat",
        "/etc/systemd/system/llmctl-proxy.service",
    ]);
    let unit = String::from_utf8_lossy(&unit.stdout);
    let key = bed.sim.exec(&[
        "pct",
        "exec",
        "103",
        "--",
        "cat",
        "/etc/llmctl/proxy-api-key",
    ]);
    let key = String::from_utf8_lossy(&key.stdout).trim().to_string();
    assert_eq!(key.len(), 64, "a 256-bit hex key");
    assert!(
        !unit.contains(&key),
        "the key must not be in the unit:\n{unit}"
    );
    let mode = bed.sim.exec(&[
        "pct",
        "exec",
        "103",
        "--",
        "stat",
        "-c",
        "%a",
        "/etc/llmctl/proxy-api-key",
    ]);
    assert_eq!(String::from_utf8_lossy(&mode.stdout).trim(), "600");
    assert!(
        !text(&first).contains(&key),
        "the key must never be printed"
    );

    // provision ends with the next command, on its own and once everything is in place.
    let next = format!(
        "llmctl --config {} client-config claude --from-host --write --identity {} --known-hosts {}",
        bed.config.display(),
        bed.sim.key.display(),
        bed.sim.known_hosts.display()
    );
    assert!(stdout(&first).contains(&next), "{}", text(&first));
    assert!(stdout(&check).contains(&next), "{}", text(&check));

    the_last_mile_claude_code_answers_on_a_laptop(&bed, &key);
    // Last: it stops the proxy to see status report it down.
    status_and_logs_on_a_provisioned_host(&bed, &key);
}

/// `client-config claude --from-host` on "a laptop" (this side of the sim's veth) reads the container's address
/// and the proxy's key over SSH and writes them into a fresh HOME; then the real Claude Code, configured by that
/// settings file alone, answers `claude -p` through the provisioned proxy.
fn the_last_mile_claude_code_answers_on_a_laptop(bed: &Bed, key: &str) {
    let home = tempfile::tempdir().unwrap();
    let client_config = |extra: &[&str]| {
        let mut c = Command::new(llmctl());
        c.arg("--config").arg(&bed.config).arg("client-config");
        c.args(bed.args()).arg("claude").args(extra);
        c.env("HOME", home.path()).stdin(Stdio::null());
        c.output().expect("run llmctl client-config")
    };
    let proxy = format!("http://{}:4000", bed.sim.addr);

    // Without --write: the settings on stdout, the key left out.
    let shown = client_config(&["--from-host"]);
    assert_ok(&shown, "client-config claude --from-host");
    assert!(!text(&shown).contains(key), "{}", text(&shown));
    let v: serde_json::Value =
        serde_json::from_slice(&shown.stdout).expect("settings JSON on stdout");
    assert_eq!(v["env"]["ANTHROPIC_BASE_URL"], proxy.as_str());
    assert!(
        v["env"]["ANTHROPIC_AUTH_TOKEN"]
            .as_str()
            .unwrap()
            .contains("--show-key")
    );

    // The laptop's settings already hold a stale key and an apiKeyHelper: Claude Code would send either instead
    // of the proxy's key, get 401 four times and hang (issue 14 item 4); --write must remove both and keep the rest.
    let settings = home.path().join(".claude/settings.json");
    std::fs::create_dir_all(settings.parent().unwrap()).unwrap();
    std::fs::write(
        &settings,
        r#"{"apiKeyHelper": "/bin/false", "theme": "dark", "env": {"ANTHROPIC_API_KEY": "sk-stale"}}"#,
    )
    .unwrap();
    let started = std::time::Instant::now();
    let written = client_config(&["--from-host", "--write"]);
    assert_ok(&written, "client-config claude --from-host --write");
    let out = stdout(&written);
    eprintln!(
        "client-config claude --from-host --write ({:.1} s):\n{out}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        !text(&written).contains(key),
        "the key is never printed:\n{}",
        text(&written)
    );
    assert!(
        out.contains(&format!("address   {} (eth0 in CT 103", bed.sim.addr)),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "checked   POST {proxy}/v1/messages with the key: answered in"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "updated {} (previous version: ",
            settings.display()
        )) && out.contains("removed env.ANTHROPIC_API_KEY")
            && out.contains("removed apiKeyHelper"),
        "{out}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&settings).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the settings file holds the key");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&settings).unwrap()).unwrap();
    assert_eq!(v["env"]["ANTHROPIC_BASE_URL"], proxy.as_str());
    assert_eq!(v["env"]["ANTHROPIC_AUTH_TOKEN"], key);
    assert_eq!(v["env"]["CLAUDE_CODE_AUTO_COMPACT_WINDOW"], "32768");
    assert_eq!(v["theme"], "dark", "other settings are kept");
    assert!(
        v.get("apiKeyHelper").is_none() && v["env"].get("ANTHROPIC_API_KEY").is_none(),
        "{v}"
    );

    // The real Claude Code with nothing but that HOME: no key or URL in its environment.
    let work = home.path().join("proj");
    std::fs::create_dir(&work).unwrap();
    let started = std::time::Instant::now();
    // The 135M test model, sampling at Claude Code's temperature, can fall into a loop that only max_tokens ends
    // (32k tokens: half an hour on two cores). A bound on the answer keeps the test about the stack; a run cut at
    // the bound (Claude Code's own "exceeded the ... output token maximum", after three continuations) is the
    // model's chance, so another greeting is tried, at most three.
    let mut claude = None;
    for prompt in ["Say hello", "Say hi", "Say hey"] {
        let o = Command::new("timeout")
            .arg("900")
            .arg(stack_var("LLMCTL_CLAUDE_BIN"))
            .args(["-p", prompt])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home.path())
            .env("CLAUDE_CODE_MAX_OUTPUT_TOKENS", "256")
            .current_dir(&work)
            .stdin(Stdio::null())
            .output()
            .expect("run claude");
        let rambled = !o.status.success() && stdout(&o).contains("output token maximum");
        claude = Some(o);
        if !rambled {
            break;
        }
        eprintln!("{prompt:?}: the model rambled past 256 output tokens; another greeting");
    }
    let claude = claude.expect("one run");
    let took = started.elapsed().as_secs_f64();
    let journal = |unit: &str| {
        let o = bed.sim.exec(&[
            "pct",
            "exec",
            "103",
            "--",
            "journalctl",
            "-u",
            unit,
            "--no-pager",
            "-o",
            "cat",
        ]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(
        claude.status.success(),
        "claude -p \"Say hello\" with the written settings failed after {took:.0} s:\n{}\n--- llmctl-proxy's \
         journal\n{}\n--- llama-server's journal (end)\n{}",
        text(&claude),
        journal("llmctl-proxy"),
        journal("llama-server")
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let reply = stdout(&claude);
    eprintln!(
        "claude -p \"Say hello\" answered in {took:.0} s: {:?}",
        reply.trim()
    );
    assert!(!reply.trim().is_empty(), "{}", text(&claude));
    // It went through the provisioned proxy: Claude Code streams, the check above did not.
    let log = journal("llmctl-proxy");
    // One JSON line per request (LLMCTL_LOG_FORMAT=json in the unit).
    let streamed = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["path"] == "/v1/messages" && v["status"] == 200 && v["stream"] == true)
        .count();
    assert!(
        streamed >= 1,
        "no streamed /v1/messages in the proxy's log:\n{log}"
    );
}

/// For a failure message: the stack as `llmctl status` sees it and the services' last journal lines (seen
/// failing under heavy load: the second run found both services unhealthy and restarted them).
fn post_mortem(bed: &Bed) -> String {
    [
        ("status", vec![]),
        ("logs", vec!["llama", "-n", "40"]),
        ("logs", vec!["proxy", "-n", "20"]),
    ]
    .into_iter()
    .map(|(cmd, args)| {
        format!(
            "$ llmctl {cmd} {}\n{}",
            args.join(" "),
            text(&bed.llmctl(cmd, &args))
        )
    })
    .collect::<Vec<_>>()
    .join("\n")
}

/// `llmctl status` and `llmctl logs` on the provisioned host, with the real llama-server and serve-proxy: all up
/// with the model, its context and tokens/s (provision's smoke test went through both), then down with exit 1
/// once the proxy is stopped.
fn status_and_logs_on_a_provisioned_host(bed: &Bed, key: &str) {
    let st = bed.llmctl("status", &["--json"]);
    assert_eq!(
        st.status.code(),
        Some(0),
        "status after provision:\n{}",
        text(&st)
    );
    assert!(!text(&st).contains(key), "the key must never be printed");
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["outcome"], "up", "{v:#}");
    assert_eq!(v["problems"], serde_json::json!([]), "{v:#}");
    assert_eq!(v["vmid"], 103);
    assert_eq!(v["driver"]["module_version"], "595.71.05", "{v:#}");
    assert_eq!(v["gpus"][0]["memory_total_mib"], 24564, "{v:#}");
    assert_eq!(v["container"]["state"], "running");
    assert_eq!(v["services"]["llama-server"], "active");
    assert_eq!(v["services"]["llmctl-proxy"], "active");
    let l = &v["llama_server"];
    assert_eq!(l["url"], "http://127.0.0.1:8080", "{v:#}");
    assert_eq!(l["model"], "smollm2.gguf", "{v:#}");
    // What llama-server itself says (its n_ctx per slot is capped by the model's training context).
    let props = bed.sim.exec(&[
        "pct",
        "exec",
        "103",
        "--",
        "/usr/local/bin/llmctl",
        "probe",
        "--get",
        "http://127.0.0.1:8080/props",
    ]);
    let props: serde_json::Value = serde_json::from_slice(&props.stdout).unwrap();
    assert_eq!(
        l["context_per_slot"], props["default_generation_settings"]["n_ctx"],
        "{v:#}"
    );
    assert_eq!(l["slots_total"], props["total_slots"], "{v:#}");
    assert_eq!(
        l["metrics"], true,
        "provision runs llama-server with --metrics: {v:#}"
    );
    assert!(
        l["generated_tokens_total"].as_u64().unwrap() > 0,
        "the smoke test generated tokens: {v:#}"
    );
    assert!(l["prompt_tokens_per_s"].as_f64().unwrap() > 0.0, "{v:#}");
    assert!(
        l["generation_tokens_per_s"].as_f64().unwrap() > 0.0,
        "{v:#}"
    );
    let p = &v["proxy"];
    assert_eq!(p["url"], "http://127.0.0.1:4000", "{v:#}");
    assert_eq!(p["up"], true, "{v:#}");
    assert!(
        p["requests_total"].as_u64().unwrap() >= 1,
        "the smoke test went through the proxy: {v:#}"
    );
    assert_eq!(p["errors_total"], 0, "{v:#}");
    let screen = bed.llmctl("status", &[]);
    assert_eq!(screen.status.code(), Some(0), "{}", text(&screen));
    assert!(stdout(&screen).ends_with("all up\n"), "{}", text(&screen));

    let logs = bed.llmctl("logs", &["llama", "-n", "400"]);
    assert_ok(&logs, "logs llama");
    assert!(stdout(&logs).contains("llama-server["), "{}", text(&logs));
    let logs = bed.llmctl("logs", &["proxy"]);
    assert_ok(&logs, "logs proxy");
    assert!(
        stdout(&logs).contains("/v1/messages"),
        "the smoke test's request: {}",
        text(&logs)
    );
    assert!(!text(&logs).contains(key), "the key must never be printed");

    let stop = bed.sim.exec(&[
        "pct",
        "exec",
        "103",
        "--",
        "systemctl",
        "stop",
        "llmctl-proxy",
    ]);
    assert!(stop.status.success(), "{stop:?}");
    let down = bed.llmctl("status", &["--json"]);
    assert_eq!(
        down.status.code(),
        Some(1),
        "status with the proxy stopped:\n{}",
        text(&down)
    );
    let v: serde_json::Value = serde_json::from_slice(&down.stdout).unwrap();
    assert_eq!(v["outcome"], "down", "{v:#}");
    assert_eq!(v["services"]["llmctl-proxy"], "inactive", "{v:#}");
    assert_eq!(v["proxy"]["up"], false, "{v:#}");
    assert_eq!(v["llama_server"]["up"], true, "{v:#}");
    assert!(
        v["problems"][0]
            .as_str()
            .unwrap()
            .starts_with("llmctl-proxy is inactive"),
        "{v:#}"
    );
}

#[test]
fn plan_shows_everything_and_changes_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::new("fresh");
    let state = |bed: &Bed| std::fs::read_to_string(bed.sim.dir.join("state.json")).unwrap();
    let before = state(&bed);
    let plan = bed.provision(&["--plan"]);
    assert_ok(&plan, "provision --plan");
    assert_eq!(before, state(&bed), "--plan must not change the host");
    let out = stdout(&plan);
    let redacted = redact(&out, &bed);
    insta::assert_snapshot!("provision_plan_fresh", redacted);
}

/// Names that differ per run (addresses, ports, temp dirs, this build's sha256) become placeholders.
fn redact(out: &str, bed: &Bed) -> String {
    let test_side = bed
        .sim
        .addr
        .rsplit_once('.')
        .map(|(n, _)| format!("{n}.1"))
        .unwrap();
    let mut s = out
        .replace(&bed.sim.addr, "SIM_HOST")
        .replace(&test_side, "TEST_SIDE")
        .replace(&bed.config.display().to_string(), "CONFIG")
        .replace(&bed.dir.path().display().to_string(), "TMP")
        .replace(llmctl(), "LLMCTL_BIN");
    let port = regex::Regex::new(r"TEST_SIDE:\d+").unwrap();
    s = port.replace_all(&s, "TEST_SIDE:PORT").into_owned();
    let sha = regex::Regex::new(r"sha256 [0-9a-f]{12,64}").unwrap();
    s = sha.replace_all(&s, "sha256 SHA").into_owned();
    let stamp = regex::Regex::new(r"llmctl-backup/\d{8}-\d{6}").unwrap();
    stamp.replace_all(&s, "llmctl-backup/STAMP").into_owned()
}

#[test]
fn a_driver_change_moves_host_and_container_together_with_a_reboot() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::new("fresh");
    assert_ok(&bed.provision(&["--yes"]), "first provision");

    bed.set_version("590.48.01");
    let stop = bed.provision(&["--yes"]);
    assert_eq!(
        stop.status.code(),
        Some(1),
        "a module change without --reboot stops:\n{}",
        text(&stop)
    );
    assert!(
        stdout(&stop).contains("a reboot is needed"),
        "{}",
        text(&stop)
    );

    let go = bed.provision(&["--yes", "--reboot"]);
    assert_ok(&go, "provision --reboot");
    assert_healthy(&bed);
    let libs = bed.sim.exec(&[
        "pct",
        "exec",
        "103",
        "--",
        "dpkg-query",
        "-W",
        "-f",
        "${Version}\n",
        "libcuda1",
        "libnvidia-ml1",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&libs.stdout),
        "590.48.01-1\n590.48.01-1\n"
    );
    let smi = bed.sim.exec(&[
        "nvidia-smi",
        "--query-gpu=driver_version",
        "--format=csv,noheader",
    ]);
    assert_eq!(String::from_utf8_lossy(&smi.stdout).trim(), "590.48.01");
}

#[test]
fn a_run_killed_mid_step_completes_when_run_again() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::new("fresh");
    let mut child = Command::new(llmctl())
        .arg("--config")
        .arg(&bed.config)
        .arg("provision")
        .arg("--yes")
        .args(bed.args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill it in the middle of the container's library installation (after the host's driver went in).
    let mut err = child.stderr.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = err.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        if seen.contains("ct-libs:") && seen[seen.find("ct-libs:").unwrap()..].contains("$ ") {
            child.kill().unwrap();
            break;
        }
    }
    let _ = child.wait();
    assert!(
        seen.contains("ct-libs:"),
        "the run never reached ct-libs:\n{seen}"
    );
    let again = bed.provision(&["--yes"]);
    assert_ok(&again, "the run after the interrupted one");
    assert!(
        stdout(&again).contains("smoke test: reply"),
        "{}",
        text(&again)
    );
    assert_healthy(&bed);
}

/// Broken host states from the doctor's scenarios: provision repairs them, or refuses with the reason.
#[test]
fn broken_scenarios_are_repaired() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for scenario in [
        "bare",
        "cgroup-major-mismatch",
        "container-libs-mismatch",
        "resolv-immutable",
        "uvm-missing",
        "devn-in-snapshot-only",
        "headers-missing",
        "services-down",
        "small-context",
        "wrong-cuda-arch",
    ] {
        let bed = Bed::new(scenario);
        let conf = "/etc/pve/lxc/103.conf";
        let before = bed.sim.exec(&["cat", conf]).stdout;
        let run = bed.provision(&["--yes"]);
        assert_ok(&run, &format!("provision of scenario {scenario}"));
        let d = bed.doctor();
        assert_eq!(
            d.status.code(),
            Some(0),
            "{scenario}: doctor after provision:\n{}\n{}",
            text(&d),
            text(&run)
        );
        // Nothing is lost: a config the run changed (devN entries, legacy lines removed) has one backup,
        // holding it as it was before the run.
        if bed.sim.exec(&["cat", conf]).stdout != before {
            let listed = bed.sim.exec(&[
                "sh",
                "-c",
                "ls -d /root/llmctl-backup/*/host/etc/pve/lxc/103.conf",
            ]);
            let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
            let backups: Vec<&str> = listed.lines().collect();
            assert_eq!(
                backups.len(),
                1,
                "{scenario}: backups of {conf}: {backups:?}"
            );
            assert_eq!(
                bed.sim.exec(&["cat", backups[0]]).stdout,
                before,
                "{scenario}: the backup of {conf} is not the config as it was before the run"
            );
        }
    }
}

#[test]
fn states_that_need_a_reboot_are_repaired_with_reboot() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for scenario in [
        "nouveau-loaded",
        "host-libs-upgraded-old-module",
        "dkms-not-built",
    ] {
        let bed = Bed::new(scenario);
        let run = bed.provision(&["--yes", "--reboot"]);
        assert_ok(&run, &format!("provision --reboot of scenario {scenario}"));
        let d = bed.doctor();
        assert_eq!(
            d.status.code(),
            Some(0),
            "{scenario}: doctor after provision:\n{}\n{}",
            text(&d),
            text(&run)
        );
    }
}

#[test]
fn a_locked_container_is_refused_with_the_reason() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::new("config-locked");
    let conf_before = bed.sim.exec(&["cat", "/etc/pve/lxc/103.conf"]).stdout;
    let run = bed.provision(&["--yes"]);
    assert_eq!(run.status.code(), Some(1), "{}", text(&run));
    assert!(
        stdout(&run).contains("is locked (backup)"),
        "{}",
        text(&run)
    );
    assert!(stdout(&run).contains("pct unlock 103"), "{}", text(&run));
    assert_eq!(
        bed.sim.exec(&["cat", "/etc/pve/lxc/103.conf"]).stdout,
        conf_before
    );
}

#[test]
fn a_missing_container_is_created_unprivileged_and_provisioned() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::new("no-container");
    bed.container_option("unprivileged = true");
    let run = bed.provision(&["--yes"]);
    assert_ok(&run, "provision of a host without the container");
    assert!(
        stdout(&run).contains("changed  container"),
        "{}",
        text(&run)
    );
    assert!(stdout(&run).contains("smoke test: reply"), "{}", text(&run));
    let conf = bed.sim.exec(&["cat", "/etc/pve/lxc/103.conf"]);
    let conf = String::from_utf8_lossy(&conf.stdout);
    for line in [
        "unprivileged: 1",
        "features: nesting=1",
        "dev0: /dev/nvidia0,gid=44",
        "dev3: /dev/nvidia-uvm-tools,gid=44",
    ] {
        assert!(conf.contains(line), "{line:?} missing from:\n{conf}");
    }
    assert_healthy(&bed);
}

#[test]
fn a_host_that_is_not_proxmox_is_a_readable_error() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::new("not-proxmox");
    let run = bed.provision(&["--yes"]);
    assert_eq!(run.status.code(), Some(2), "{}", text(&run));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("is not a Proxmox VE host"), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn the_offload_is_planned_from_the_model_and_the_gpu() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::new("fresh");
    assert_ok(&bed.provision(&["--yes"]), "provision");
    let unit = bed.ct_file("/etc/systemd/system/llama-server.service");
    // SmolLM2-135M (30 layers) fits a 24 GB RTX 4090 entirely: every layer and the output on the GPU.
    assert!(unit.contains(" -ngl 31 "), "{unit}");
    // A GPU and container too small for the configured context: refused with the planner's reason.
    let text_cfg = std::fs::read_to_string(&bed.config).unwrap();
    std::fs::write(
        &bed.config,
        text_cfg.replace("memory_mib = 4096", "memory_mib = 300"),
    )
    .unwrap();
    // 1000 MiB: more than the 512 MiB CUDA reserve (a GPU below it is a flag-range refusal, not a plan), far
    // less than the 32768-token context needs. This sim's own state only: other runs' sims are not ours to edit.
    let state = bed.sim.dir.join("state.json");
    bed.sim.exec(&[
        "sed",
        "-i",
        "s/\"memory_mib\": 24564/\"memory_mib\": 1000/",
        state.to_str().unwrap(),
    ]);
    let run = bed.provision(&["--yes"]);
    assert_eq!(run.status.code(), Some(1), "{}", text(&run));
    assert!(stdout(&run).contains("does not fit"), "{}", text(&run));
}

/// Issue 16 item 7: the driver packages were swapped to the open flavour while the proprietary module of the same
/// version still runs. The module step is done only once the configured flavour runs: `--check` refuses without
/// `--reboot` and plans the reboot with it, and the run reboots the host into the open module.
#[test]
fn a_swapped_module_flavour_is_loaded_with_a_reboot() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::new("flavour-swapped-not-rebooted");
    let loaded = |bed: &Bed| {
        String::from_utf8_lossy(&bed.sim.exec(&["cat", "/proc/driver/nvidia/version"]).stdout)
            .into_owned()
    };
    // The scenario as the kernel shows it: the proprietary module's version line, the open packages installed.
    assert!(
        loaded(&bed).starts_with("NVRM version: NVIDIA UNIX x86_64 Kernel Module  595.71.05  "),
        "{}",
        loaded(&bed)
    );
    let module_line = |o: &Output| {
        stdout(o)
            .lines()
            .skip_while(|l| l.split_whitespace().nth(1) != Some("module"))
            .take(2)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let check = bed.provision(&["--check"]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    let line = module_line(&check);
    assert!(
        line.starts_with("  REFUSED  module")
            && line.contains(
                "proprietary NVIDIA module loaded and the installed driver is the open one"
            ),
        "{}",
        text(&check)
    );
    let check = bed.provision(&["--check", "--reboot"]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    let line = module_line(&check);
    assert!(
        line.starts_with("  change   module") && line.contains("[host] reboot the host"),
        "{}",
        text(&check)
    );

    let run = bed.provision(&["--yes", "--reboot"]);
    assert_ok(&run, "provision --reboot");
    assert!(
        loaded(&bed)
            .starts_with("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  595.71.05  "),
        "after provision --reboot: {}\n{}",
        loaded(&bed),
        text(&run)
    );
    assert_healthy(&bed);
}

/// A two-GPU scenario whose CT already has the test model (at the config's dest: healthy's /models/model.gguf)
/// and this llmctl, so `--check` runs the real planner there; `-ub 128` as the model_plan tests plan it.
fn two_gpu_bed(scenario: &str) -> Bed {
    let model = stack_var("LLMCTL_TEST_MODEL");
    let bed = Bed::with_sim_env(
        scenario,
        "595.71.05",
        &[
            ("LLMCTL_SIM_MODEL", &model),
            ("LLMCTL_SIM_LLMCTL", llmctl()),
        ],
    );
    bed.server_option("ubatch = 128");
    let cfg = std::fs::read_to_string(&bed.config).unwrap();
    std::fs::write(
        &bed.config,
        cfg.replace(
            "dest = \"/models/smollm2.gguf\"",
            "dest = \"/models/model.gguf\"",
        ),
    )
    .unwrap();
    bed
}

/// Issue 16 item 10: two GPUs are not one GPU of their summed memory. The scenario's two GPUs hold the test model
/// entirely when their memory is added under one CUDA reserve, and only part of it with a reserve and compute
/// buffers on each; the unit provision plans must carry the per-GPU offload.
#[test]
fn two_gpus_are_planned_with_a_cuda_context_and_compute_buffers_each() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let model = stack_var("LLMCTL_TEST_MODEL");
    let bed = two_gpu_bed("two-gpus-model-fits-only-the-sum");
    // The GPUs as the driver reports them.
    let smi = bed.sim.exec(&[
        "nvidia-smi",
        "--query-gpu=memory.total",
        "--format=csv,noheader,nounits",
    ]);
    let sizes: Vec<u64> = String::from_utf8_lossy(&smi.stdout)
        .lines()
        .map(|l| l.trim().parse().expect("memory.total in MiB"))
        .collect();
    assert_eq!(sizes.len(), 2, "{sizes:?}");
    let vram = sizes.iter().sum::<u64>().to_string();
    // The planner on this machine, with the config's context, cache, batch and container memory.
    let plan = |gpus: &str| -> serde_json::Value {
        let out = Command::new(llmctl())
            .args(["model", "plan", &model, "--vram", &vram, "--gpus", gpus])
            .args(["--ram", "4096", "--ctx", "32768", "--cache-type", "f16"])
            .args(["--ubatch", "128", "--json"])
            .current_dir(bed.dir.path())
            .output()
            .unwrap();
        assert_ok(&out, "llmctl model plan");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // The scenario's premise: the summed memory under one reserve holds every layer and the output.
    let pooled = plan("1");
    assert_eq!(
        pooled["chosen"]["strategy"]["kind"], "all_on_gpu",
        "the scenario's GPUs no longer hold the whole model as one GPU: resize them\n{pooled:#}"
    );
    let all = pooled["chosen"]["ngl"].as_u64().unwrap();
    let per_gpu = plan("2")["chosen"]["ngl"].as_u64().unwrap();

    let check = bed.provision(&["--check"]);
    let out = stdout(&check);
    // The -ngl of the unit provision would write, or (nothing to write) of the unit in place.
    let ngl_in = |s: &str| -> Option<u64> {
        s.lines()
            .map(|l| l.trim_start())
            .filter(|l| l.starts_with("+ExecStart=") || l.starts_with("ExecStart="))
            .find_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let i = w.iter().position(|x| *x == "-ngl")?;
                w.get(i + 1)?.parse().ok()
            })
    };
    let unit = bed.ct_file("/etc/systemd/system/llama-server.service");
    let planned = ngl_in(
        &out.lines()
            .filter(|l| l.trim_start().starts_with('+'))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .or_else(|| ngl_in(&unit))
    .unwrap_or_else(|| {
        panic!(
            "no -ngl N in the planned or the present unit:\n{}",
            text(&check)
        )
    });
    assert!(
        planned < all,
        "provision plans -ngl {planned}, every layer and the output (-ngl {all}), as if two GPUs were one GPU \
         of their summed memory with one CUDA reserve\n{}",
        text(&check)
    );
    assert_eq!(
        planned,
        per_gpu,
        "provision's -ngl is not the planner's for 2 GPUs\n{}",
        text(&check)
    );
    // One llama-server across both GPUs, its layers split as the planner counted them (`llmctl model plan --gpu`).
    let split = Command::new(llmctl())
        .args(["model", "plan", &model])
        .args(
            sizes
                .iter()
                .flat_map(|s| ["--gpu".to_string(), s.to_string()]),
        )
        .args(["--ram", "4096", "--ctx", "32768", "--cache-type", "f16"])
        .args(["--ubatch", "128", "--json"])
        .current_dir(bed.dir.path())
        .output()
        .unwrap();
    assert_ok(&split, "llmctl model plan --gpu");
    let split: serde_json::Value = serde_json::from_slice(&split.stdout).unwrap();
    let tensor_split = split["tensor_split"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .expect("a plan across two GPUs has a tensor_split");
    assert!(
        out.contains(&format!(
            " --split-mode layer --tensor-split {tensor_split} "
        )),
        "provision does not plan the planner's --tensor-split {tensor_split}\n{}",
        text(&check)
    );
}

/// Issue 12 item 5: two GPUs that each hold the model with its context get one llama-server per GPU, each pinned to
/// its GPU (`CUDA_DEVICE_ORDER=PCI_BUS_ID`, `CUDA_VISIBLE_DEVICES=<i>`) on port 8080 + i, behind one proxy that
/// routes across both; the single llama-server.service of an older installation is stopped and removed. A second
/// run changes nothing, and when one GPU goes away the installation converges back to the one llama-server.
#[test]
fn two_gpus_that_each_hold_the_model_get_one_replica_each_behind_one_proxy() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bed = two_gpu_bed("two-gpus-model-fits-each");
    let unit_of = |i: u32| bed.ct_file(&format!("/etc/systemd/system/llama-server-gpu{i}.service"));
    let in_ct = |argv: &[&str]| -> String {
        let mut all = vec!["pct", "exec", "103", "--"];
        all.extend_from_slice(argv);
        String::from_utf8_lossy(&bed.sim.exec(&all).stdout).into_owned()
    };

    let check = bed.provision(&["--check"]);
    assert_ne!(check.status.code(), Some(0), "{}", text(&check));
    let plan = stdout(&check);
    for want in [
        "llama-server-gpu0.service",
        "llama-server-gpu1.service",
        "systemctl disable --now llama-server",
    ] {
        assert!(
            plan.contains(want),
            "--check does not plan {want}:\n{}",
            text(&check)
        );
    }

    let t = std::time::Instant::now();
    let run = bed.provision(&["--yes"]);
    assert_ok(&run, "provision --yes");
    eprintln!("provision --yes (one replica per GPU): {:?}", t.elapsed());
    for (i, port) in [(0u32, 8080u16), (1, 8081)] {
        let unit = unit_of(i);
        assert!(
            unit.contains("\nEnvironment=CUDA_DEVICE_ORDER=PCI_BUS_ID\n")
                && unit.contains(&format!("\nEnvironment=CUDA_VISIBLE_DEVICES={i}\n")),
            "replica {i} is not pinned to GPU {i}:\n{unit}"
        );
        assert!(unit.contains(&format!(" --port {port} ")), "{unit}");
        assert_eq!(
            in_ct(&["systemctl", "is-active", &format!("llama-server-gpu{i}")]).trim(),
            "active"
        );
        let health = bed
            .sim
            .exec(&["curl", "-fsS", &format!("http://127.0.0.1:{port}/health")]);
        assert!(health.status.success(), "replica {i}: no /health on {port}");
        let props = bed
            .sim
            .exec(&["curl", "-fsS", &format!("http://127.0.0.1:{port}/props")]);
        let props: serde_json::Value =
            serde_json::from_slice(&props.stdout).expect("/props is JSON");
        // n_ctx per slot: the configured context is shared by llama-server's slots.
        let slot_ctx = props["default_generation_settings"]["n_ctx"].as_u64();
        let slots = props["total_slots"].as_u64();
        assert_eq!(
            slot_ctx.zip(slots).map(|(c, n)| c * n),
            Some(32768),
            "replica {i}: /props {props}"
        );
    }
    assert_eq!(
        bed.ct_file("/etc/systemd/system/llama-server.service"),
        "",
        "the single unit is removed"
    );
    assert_ne!(
        in_ct(&["systemctl", "is-active", "llama-server"]).trim(),
        "active"
    );
    let proxy = bed.ct_file("/etc/systemd/system/llmctl-proxy.service");
    assert!(
        proxy.contains("--upstream http://127.0.0.1:8080 --upstream http://127.0.0.1:8081 "),
        "{proxy}"
    );
    assert_eq!(
        in_ct(&["systemctl", "is-active", "llmctl-proxy"]).trim(),
        "active"
    );
    assert_healthy(&bed);
    eprintln!(
        "doctor after one replica per GPU:\n{}",
        stdout(&bed.doctor())
    );
    let again = bed.provision(&["--check"]);
    assert_eq!(
        again.status.code(),
        Some(0),
        "a second run would change:\n{}",
        text(&again)
    );

    // One GPU goes away (this sim's own state): back to the one llama-server, the replicas removed.
    let state = bed.sim.dir.join("state.json");
    let st = Command::new("python3")
        .args([
            "-c",
            "import json,sys; p=sys.argv[1]; s=json.load(open(p)); h=s['host']; h['gpus']=h['gpus'][:1]; \
             m=h['module']; m['driven']=[i for i in m.get('driven') or [] if i < 1]; \
             m['minors']={k: v for k, v in (m.get('minors') or {}).items() if int(k) < 1}; \
             json.dump(s, open(p, 'w'))",
            state.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let run = bed.provision(&["--yes"]);
    assert_ok(&run, "provision --yes with one GPU");
    let unit = bed.ct_file("/etc/systemd/system/llama-server.service");
    assert!(
        unit.contains(" --port 8080 ") && !unit.contains("Environment="),
        "{unit}"
    );
    assert_eq!(unit_of(0), "");
    assert_eq!(unit_of(1), "");
    let proxy = bed.ct_file("/etc/systemd/system/llmctl-proxy.service");
    assert!(
        proxy.contains("--upstream http://127.0.0.1:8080 ") && !proxy.contains(":8081"),
        "{proxy}"
    );
    assert_healthy(&bed);
    let again = bed.provision(&["--check"]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
}
