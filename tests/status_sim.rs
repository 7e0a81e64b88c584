//! `llmctl status` and `llmctl logs` over real SSH against the simulated Proxmox host, on scenarios that need no
//! provisioning (a provisioned host, with real services, is checked in tests/provision_sim.rs).

mod support;

use std::process::{Command, Output, Stdio};

use support::SimHost;

/// `llmctl <args>` against the sim: its address, key and known_hosts, no llmctl.toml.
fn command(sim: &SimHost, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_llmctl"));
    c.args(args)
        .arg("--host")
        .arg(sim.ssh_target())
        .arg("--identity")
        .arg(sim.key_path())
        .arg("--known-hosts")
        .arg(sim.known_hosts_path())
        .env_remove("LLMCTL_CONFIG")
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null());
    c
}

fn llmctl(sim: &SimHost, args: &[&str]) -> Output {
    command(sim, args).output().expect("run llmctl")
}

/// Starts a long-running `llmctl <args>` (`--watch`, `-f`); its stdout lines arrive on the channel with the
/// moment each was read.
fn spawn_lines(
    sim: &SimHost,
    args: &[&str],
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<(std::time::Instant, String)>,
) {
    let mut child = command(sim, args).stdout(Stdio::piped()).spawn().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send((std::time::Instant::now(), line));
        }
    });
    (child, rx)
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text(o)))
}

/// The scenario's GPU and driver come back as the sim's nvidia-smi reports them; the container's services are
/// declared active but nothing answers (no llmctl installed there): down, exit 1, and the problem says why.
#[test]
fn status_reads_the_gpu_and_says_what_is_down() {
    let sim = SimHost::start("healthy");
    let started = std::time::Instant::now();
    let out = llmctl(&sim, &["status", "--json", "--vmid", "103"]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["schema"], "llmctl-status/1");
    assert_eq!(v["outcome"], "down");
    assert_eq!(v["vmid"], 103);
    assert_eq!(v["driver"]["module_version"], "595.71.05");
    assert_eq!(v["driver"]["module_flavour"], "open");
    assert_eq!(v["driver"]["nvidia_smi"], "ok");
    assert_eq!(v["driver"]["modules"][0], "nvidia_uvm");
    let g = &v["gpus"][0];
    assert_eq!(g["name"], "NVIDIA GeForce RTX 4090");
    assert_eq!(g["memory_total_mib"], 24564);
    assert_eq!(g["memory_used_mib"], 14);
    assert_eq!(g["temperature_c"], 57.0);
    assert_eq!(g["power_draw_w"], 69.0);
    assert_eq!(g["power_limit_w"], 450.0);
    assert_eq!(v["container"]["state"], "running");
    assert_eq!(v["services"]["llama-server"], "active");
    assert_eq!(v["llama_server"]["up"], false);
    assert_eq!(v["llama_server"]["url"], "http://127.0.0.1:8080");
    let problems = v["problems"].to_string();
    assert!(
        problems.contains("/usr/local/bin/llmctl is not installed in the container"),
        "{problems}"
    );
    // One SSH connection and one round trip: well under the seconds a round trip per read would take.
    assert!(took.as_secs() < 10, "status took {took:?}");

    // Without --vmid, the only container with NVIDIA devices; the text screen says the same.
    let out = llmctl(&sim, &["status"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        screen.starts_with(&format!(
            "llmctl status: {}, container 103\n",
            sim.ssh_target()
        )),
        "{screen}"
    );
    assert!(
        screen.contains(
            "gpu 0          NVIDIA GeForce RTX 4090: 0% busy, 14 / 24564 MiB, 57 C, 69 / 450 W"
        ),
        "{screen}"
    );
    assert!(
        screen.contains("DOWN  llama-server   active, http://127.0.0.1:8080"),
        "{screen}"
    );
    // Without llmctl in the container the proxy's unit cannot start either: systemd restarts it in a loop, so it
    // reads `activating` (a problem of its own) except in the instant of each restart, when it is `active`.
    let restarting = screen.contains("problem: llmctl-proxy is activating");
    let want = if restarting { 3 } else { 2 };
    assert!(
        screen.ends_with(&format!("down: {want} problem(s)\n")),
        "{screen}"
    );
}

/// --watch: a fresh reading every SECS seconds over the same connection, one JSON document per line, until stopped.
#[test]
fn watch_prints_a_reading_every_interval() {
    let sim = SimHost::start("healthy");
    let (mut watch, rx) = spawn_lines(&sim, &["status", "--json", "--watch", "1", "--vmid", "103"]);
    let wait = std::time::Duration::from_secs(20);
    let reading = |line: &str| -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["schema"], "llmctl-status/1", "{line}");
        v
    };
    let (t1, first) = rx.recv_timeout(wait).expect("a first reading");
    assert_eq!(reading(&first)["gpus"][0]["temperature_c"], 57.0, "{first}");
    // The GPU warms up (the sim's state, replaced atomically): a later reading shows it, so each is read anew.
    let state_path = sim.dir.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    state["host"]["gpus"][0]["temp_c"] = 71.into();
    let tmp = sim.dir.join("state.json.test-tmp");
    std::fs::write(&tmp, serde_json::to_string(&state).unwrap()).unwrap();
    std::fs::rename(&tmp, &state_path).unwrap();
    let (t2, second) = rx.recv_timeout(wait).expect("a second reading");
    assert!(
        t2 - t1 >= std::time::Duration::from_millis(900),
        "{:?} apart",
        t2 - t1
    );
    let mut latest = reading(&second);
    if latest["gpus"][0]["temperature_c"] != 71.0 {
        // The second reading may have started before the change.
        latest = reading(&rx.recv_timeout(wait).expect("a third reading").1);
    }
    watch.kill().unwrap();
    watch.wait().unwrap();
    assert_eq!(latest["gpus"][0]["temperature_c"], 71.0, "{latest:#}");
}

/// The sim answers `--query-gpu` in nvidia-smi's real format: its header for a real capture's query is that
/// capture's header, byte for byte.
#[test]
fn the_sims_query_gpu_header_is_nvidia_smis() {
    let sim = SimHost::start("healthy");
    let fixture = std::fs::read_to_string(
        support::repo().join("fixtures/outputs/nvidia-smi.query-gpu.gb10.txt"),
    )
    .unwrap();
    let body: Vec<&str> = fixture.lines().filter(|l| !l.starts_with('#')).collect();
    let query = "name,driver_version,temperature.gpu,utilization.gpu,utilization.memory,power.draw,power.limit,memory.used,memory.total";
    for format in ["csv", "csv,nounits"] {
        let out = sim.exec(&[
            "nvidia-smi",
            &format!("--query-gpu={query}"),
            &format!("--format={format}"),
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(stdout.lines().next(), Some(body[0]), "{format}:\n{stdout}");
    }
    let out = sim.exec(&[
        "nvidia-smi",
        &format!("--query-gpu={query}"),
        "--format=csv,noheader",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "NVIDIA GeForce RTX 4090, 595.71.05, 57, 0 %, 0 %, 69.00 W, 450.00 W, 14 MiB, 24564 MiB\n"
    );
}

/// services-down: llama-server failed, the proxy stopped, the container otherwise fine.
#[test]
fn stopped_services_are_down_with_exit_1() {
    let sim = SimHost::start("services-down");
    let out = llmctl(&sim, &["status", "--json", "--vmid", "103"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["outcome"], "down");
    assert_eq!(v["services"]["llama-server"], "failed", "{v:#}");
    assert_eq!(v["services"]["llmctl-proxy"], "inactive", "{v:#}");
    let problems: Vec<String> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("llama-server is failed")),
        "{problems:#?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("llmctl-proxy is inactive")),
        "{problems:#?}"
    );
}

/// A host that cannot be reached: exit 2, and with --json still one document on stdout saying why.
#[test]
fn an_unreachable_host_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_llmctl"))
        .args([
            "status",
            "--json",
            "--host",
            "root@127.0.0.1:1",
            "--vmid",
            "103",
        ])
        .env_remove("LLMCTL_CONFIG")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["outcome"], "unreachable");
    assert!(
        v["error"].as_str().unwrap().contains("cannot reach"),
        "{v:#}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("error: "),
        "{}",
        text(&out)
    );
    // Bad input is a clear error, not a panic: no host at all, a zero refresh interval.
    let out = Command::new(env!("CARGO_BIN_EXE_llmctl"))
        .args(["status"])
        .env_remove("LLMCTL_CONFIG")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no host given: pass --host"),
        "{}",
        text(&out)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_llmctl"))
        .args(["status", "--host", "local", "--watch", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--watch"),
        "{}",
        text(&out)
    );
}

/// `logs` prints the unit's journal in the container: what a service start wrote there.
#[test]
fn logs_print_the_units_journal() {
    let sim = SimHost::start("services-down");
    // A start the sim's supervisor journals (the stub binary is missing here: systemd's own lines say so).
    let start = sim.exec(&[
        "pct",
        "exec",
        "103",
        "--",
        "systemctl",
        "start",
        "llmctl-proxy",
    ]);
    let _ = start;
    let journal = |n: &str| {
        let out = sim.exec(&[
            "pct",
            "exec",
            "103",
            "--",
            "journalctl",
            "-u",
            "llmctl-proxy",
            "-n",
            n,
            "--no-pager",
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let expected = journal("3");
    assert!(
        !expected.contains("No entries"),
        "the sim journaled nothing:\n{expected}"
    );
    // The unit restarts every 2 s here (Restart=on-failure, its binary missing), so the journal may grow
    // between two reads on a loaded machine: `logs -n 3` must print 3 consecutive lines of the journal, the
    // last of them the journal's last when it ran (the last read before it, or one written since).
    let out = llmctl(&sim, &["logs", "proxy", "-n", "3"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let after = journal("200");
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    let printed: Vec<&str> = printed.lines().collect();
    let lines: Vec<&str> = after.lines().collect();
    let at = lines.windows(3).position(|w| w == printed.as_slice());
    let last_before = lines
        .iter()
        .position(|l| Some(*l) == expected.lines().last());
    assert!(
        printed.len() == 3 && at.is_some() && at.map(|i| i + 2) >= last_before,
        "logs -n 3 printed {printed:?}, not the journal's last 3 lines when it ran:\n{after}"
    );

    // -f: the lines so far, then each new one as the unit writes it, until stopped.
    let (mut follow, rx) = spawn_lines(&sim, &["logs", "proxy", "-f", "-n", "1"]);
    let wait = std::time::Duration::from_secs(20);
    let (_, first) = rx
        .recv_timeout(wait)
        .expect("logs -f printed the last line");
    // The unit restarts every 2 s here (Restart=on-failure, its binary missing): `-n 1` prints the last line
    // when it ran, which is `expected`'s last or one written since (on a loaded machine the start takes longer).
    let since = sim.exec(&[
        "pct",
        "exec",
        "103",
        "--",
        "journalctl",
        "-u",
        "llmctl-proxy",
        "-n",
        "200",
        "--no-pager",
    ]);
    let since = String::from_utf8_lossy(&since.stdout).into_owned();
    let last = expected.lines().last().unwrap();
    let newer: Vec<&str> = since.lines().skip_while(|l| *l != last).collect();
    assert!(
        newer.contains(&first.as_str()),
        "{first:?} is not the last line of {expected:?} nor one written since:\n{since}"
    );
    let _ = sim.exec(&[
        "pct",
        "exec",
        "103",
        "--",
        "systemctl",
        "start",
        "llmctl-proxy",
    ]);
    let (_, next) = rx
        .recv_timeout(wait)
        .expect("logs -f printed a line written after it started");
    assert!(
        next.contains("llmctl-proxy") || next.contains("llmctl"),
        "{next}"
    );
    follow.kill().unwrap();
    follow.wait().unwrap();

    let out = llmctl(&sim, &["logs", "llama", "--vmid", "103"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "-- No entries --\n",
        "{}",
        text(&out)
    );
    let out = llmctl(&sim, &["logs", "proxy", "--vmid", "999"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("container 999 does not exist"),
        "{}",
        text(&out)
    );
}

/// One llama-server per GPU (`two-gpus-pascal-ada`: `llama_replicas = 2`, as provision leaves a host whose GPUs
/// each hold the model), started already provisioned: the test stack's real CPU llama-server and model as each
/// replica, this llmctl as the proxy routing to both. `status` shows a row per replica (its GPU, /health, context,
/// the proxy's figures for it) and no llama-server.service; `logs llama` merges both replicas' journals, each
/// line naming its unit; `logs llama-gpu1` is one replica's; a replica that is not there is a clear error.
#[test]
fn replicas_each_get_a_status_row_and_their_journals() {
    let stack = |var: &str| {
        std::env::var(var).unwrap_or_else(|_| {
            panic!("{var} is not set: run `eval \"$(bash scripts/test-stack.sh)\"` first (the replicas are real llama-servers)")
        })
    };
    let (server, model) = (stack("LLMCTL_LLAMA_SERVER"), stack("LLMCTL_TEST_MODEL"));
    // Its own number: the other tests of this file take theirs from tests/support's counter (1 and up).
    let sim = SimHost::start_n_env(
        &support::repo().join("fixtures/scenarios/two-gpus-pascal-ada.toml"),
        90,
        &[
            ("LLMCTL_SIM_LLMCTL", env!("CARGO_BIN_EXE_llmctl")),
            ("LLMCTL_SIM_LLAMA_SERVER", &server),
            ("LLMCTL_SIM_MODEL", &model),
        ],
    );
    // The replicas load the model after the sim comes up: read until both answer (a few seconds).
    let started = std::time::Instant::now();
    let v = loop {
        let out = llmctl(&sim, &["status", "--json", "--vmid", "103"]);
        let v = json(&out);
        if v["outcome"] == "up" {
            assert_eq!(out.status.code(), Some(0), "{}", text(&out));
            break v;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the replicas did not come up:\n{}",
            text(&out)
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let services: Vec<&String> = v["services"].as_object().unwrap().keys().collect();
    assert_eq!(
        services,
        ["llama-server-gpu0", "llama-server-gpu1", "llmctl-proxy"],
        "{v:#}"
    );
    let replicas = v["replicas"].as_array().expect("replicas");
    assert_eq!(replicas.len(), 2, "{v:#}");
    for (i, r) in replicas.iter().enumerate() {
        let url = format!("http://127.0.0.1:{}", 8080 + i);
        assert_eq!(r["unit"], format!("llama-server-gpu{i}"), "{r:#}");
        assert_eq!(r["gpu"], i, "{r:#}");
        assert_eq!(r["active"], "active", "{r:#}");
        assert_eq!(r["health"], "ok", "{r:#}");
        assert_eq!(r["url"], url.as_str(), "{r:#}");
        assert_eq!(r["up"], true, "{r:#}");
        assert_eq!(r["model"], "model.gguf", "{r:#}");
        assert!(r["context_per_slot"].as_u64().unwrap_or(0) > 0, "{r:#}");
        assert_eq!(r["metrics"], true, "{r:#}");
        // The proxy's router names each upstream as the unit it routes to.
        assert_eq!(r["proxy"]["url"], url.as_str(), "{r:#}");
        assert_eq!(r["proxy"]["requests_total"], 0, "{r:#}");
    }
    let out = llmctl(&sim, &["status", "--vmid", "103"]);
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        screen.contains("up    llama-server-gpu1 active, gpu 1, http://127.0.0.1:8081, health ok, model.gguf, context "),
        "{screen}"
    );
    assert!(!screen.contains("llama-server   "), "{screen}");
    assert!(
        screen.contains("\n                     proxy: "),
        "{screen}"
    );

    // Both replicas' journals, merged, each line with its unit.
    let out = llmctl(&sim, &["logs", "llama", "-n", "400", "--vmid", "103"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let merged = String::from_utf8_lossy(&out.stdout);
    for unit in ["llama-server-gpu0.service[", "llama-server-gpu1.service["] {
        assert!(merged.contains(unit), "no {unit} line:\n{merged}");
    }
    // One replica: its own journal, as journalctl gives it.
    let expected = sim.exec(&[
        "pct",
        "exec",
        "103",
        "--",
        "journalctl",
        "-u",
        "llama-server-gpu1",
        "-n",
        "5",
        "--no-pager",
    ]);
    let out = llmctl(&sim, &["logs", "llama-gpu1", "-n", "5", "--vmid", "103"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&expected.stdout),
        "{}",
        text(&out)
    );
    let out = llmctl(&sim, &["logs", "llama-gpu7", "--vmid", "103"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "container 103 has no llama-server-gpu7.service: its replicas are llama-server-gpu0, llama-server-gpu1"
        ),
        "{}",
        text(&out)
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}
