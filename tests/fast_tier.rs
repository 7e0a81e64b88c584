//! The fast tier (issue 11, deliverable 7): every scenario in `fixtures/scenarios`, judged in-process on a
//! [`FakeHost`] that replays what the simulated host answered, with no sim, no sshd and no root.
//!
//! * `fixtures/recorded/<scenario>.json` is a recording of the simulated host (tests/support's sim with its real
//!   sshd) answering `doctor` (no config, as tests/doctor_scenarios.rs runs it) and doctor + `provision --check`
//!   with the config tests/law.rs judges the scenario with, through the same library calls this test replays; plus
//!   the read-only commands apply's actions read (`apt-get -s install`, `stat` of a verified model).
//!   `UPDATE_RECORDINGS=1 cargo test --test fast_tier` makes them again from the sim (root), `UPDATE_RECORDINGS=
//!   healthy,fresh` only those scenarios';
//!   `INSTA_UPDATE=always` with it accepts the snapshots that follow. A probe that is not in a recording fails the
//!   replay, naming the command: that is the sign the recordings need making again.
//! * For each scenario (`the_fast_tier`):
//!   * (a) doctor's report without a config (its problems must be the scenario's `[expect]`), doctor's report with
//!     the law's config and provision's plan are snapshotted (`tests/snapshots/fast_tier__plan@<scenario>.snap`);
//!   * (b) the law: doctor is healthy exactly when the plan changes nothing, and each warn/fail finding's fix names
//!     a step the plan changes or refuses;
//!   * (c) apply executes exactly the plan: each planned step's `apply` runs on a fresh fake of the same host (which
//!     also carries out file commands on its in-memory files and accepts the planned commands), and what it
//!     issued, folded into actions (a write's backup, `mkdir` and `pct push` are the write), is exactly the plan's
//!     actions in order. Steps that plan a reboot or a deferred action are not applied (apply waits for a new boot
//!     id; a deferred action is re-planned, never executed);
//!   * (d) assess again: after a step's apply, its check runs again; where it reads back (`cat`) a file the apply
//!     wrote, it must see the file as written (and so not plan that write again, unless as part of something else
//!     it still wants: the fake does not build llama.cpp, and the build stamp is rewritten with a build).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use llmctl::config::ConfigFile;
use llmctl::doctor::checks::{self, Finding};
use llmctl::host::StepId;
use llmctl::host::facts::{self, HostFacts};
use llmctl::outcome::Outcome;
use llmctl::provision::config::{HostTarget, ProvisionConfig};
use llmctl::provision::ctx::Ctx;
use llmctl::provision::step::{Action, StepOutcome, Target};
use llmctl::transport::fake::{Event, FakeHost, Recording, RecordingTransport, output};
use llmctl::transport::{Cmd, Container, Transport};
use serde::{Deserialize, Serialize};

use support::{repo, scenarios};

/// The container every scenario's config names.
const VMID: u32 = 103;
/// What the fake host calls itself (doctor's reports name it).
const HOST_NAME: &str = "root@sim-host";
/// The llmctl binary provision installs in the container: a small stand-in (its sha256 is in the plans). While
/// recording, every sim CT holds this build's binary (`LLMCTL_SIM_LLMCTL`: checks run it) and the recording
/// says it holds the stand-in (see [`record`]).
const LLMCTL_STAND_IN: &str = "fixtures/recorded/llmctl-stand-in";
/// Sim host numbers of the recording mode (tests/support 1-99, law 150-198, doctor_scenarios 199-249).
const FIRST_SIM: u32 = 100;
const LAST_SIM: u32 = 149;

/// A scenario's recording and the config it was judged with.
#[derive(Serialize, Deserialize)]
struct Fixture {
    scenario: String,
    /// llmctl.toml (tests/support/law.rs), with `[host] target` = [`HOST_NAME`].
    config: String,
    recording: Recording,
}

fn name_of(path: &Path) -> String {
    path.file_stem().unwrap().to_string_lossy().into_owned()
}

fn fixture_path(name: &str) -> PathBuf {
    repo().join(format!("fixtures/recorded/{name}.json"))
}

// ------------------------------------------------------------------------------------------- the evaluation

/// What doctor and provision make of one host, the same calls `llmctl doctor` and `provision --check` make.
struct Judged {
    /// doctor without a config (`Err`: it could not run, e.g. not Proxmox).
    plain: Result<(HostFacts, Vec<Finding>), String>,
    /// doctor with the law's config, and provision's assessment of every step.
    law: Result<LawRun, String>,
}

struct LawRun {
    facts: HostFacts,
    findings: Vec<Finding>,
    plan: Vec<(StepId, &'static str, StepOutcome)>,
}

fn config(text: &str) -> ProvisionConfig {
    let file = ConfigFile::parse(text, None).expect("the law's config parses");
    let host = HostTarget {
        target: HOST_NAME.into(),
        vmid: VMID,
    };
    ProvisionConfig::with_host(&file, host).expect("the law's config is valid")
}

fn ctx_over<T: Transport + Clone + 'static>(t: &T, cfg: &str, facts: HostFacts) -> Ctx {
    let connect: llmctl::provision::ctx::Connector =
        Box::new(|| anyhow::bail!("the fast tier never reconnects"));
    let mut ctx = Ctx::over(
        Box::new(t.clone()),
        connect,
        config(cfg),
        "llmctl.toml".into(),
        PathBuf::from(LLMCTL_STAND_IN),
        facts,
    );
    ctx.stamp = "fast-tier".into();
    ctx
}

fn judge<T: Transport + Clone + 'static>(t: &T, cfg: &str) -> Judged {
    let plain = facts::gather(t, None)
        .map(|f| {
            let findings = checks::run_all(&f);
            (f, findings)
        })
        .map_err(|e| format!("{e:#}"));
    let law = (|| -> anyhow::Result<LawRun> {
        let facts = facts::gather(t, Some(VMID))?;
        let mut findings = checks::run_all(&facts);
        let mut ctx = ctx_over(t, cfg, facts.clone());
        let plan = llmctl::provision::assess(&mut ctx)?;
        llmctl::doctor::reconcile(&mut findings, &plan);
        Ok(LawRun {
            facts,
            findings,
            plan,
        })
    })()
    .map_err(|e| format!("{e:#}"));
    Judged { plain, law }
}

// ------------------------------------------------------------------------------------------- recording

fn sha256_hex(data: &[u8]) -> String {
    llmctl::provision::ct::sha256_bytes(data)
}

/// Records one scenario from its own sim host; once more on a fresh sim when the transport itself failed (a
/// command that hung past its time: on a loaded machine an SSH channel to a sim has been seen to stall).
fn record(path: &Path, n: u32) -> Fixture {
    match record_once(path, n) {
        Ok(f) => f,
        Err(first) => {
            eprintln!("{}: recording again: {first}", path.display());
            record_once(path, n).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        }
    }
}

fn record_once(path: &Path, n: u32) -> Result<Fixture, String> {
    let scenario = support::law::merged(path);
    let cfg = support::law::law_config(&scenario, HOST_NAME);
    let sim = support::SimHost::start_retrying(path, n);
    let ssh: Arc<dyn Transport> = Arc::new(sim.connect());
    let key_file = config(&cfg).proxy_key_file().into_iter().collect();
    let rec = RecordingTransport::new(ssh, key_file).with_max_timeout(Duration::from_secs(40));
    let judged = judge(&rec, &cfg);
    // The read-only commands apply's actions read: the apt proof, the size and mtime of a verified model.
    if let Ok(law) = &judged.law {
        for (_, _, outcome) in &law.plan {
            let StepOutcome::Planned(actions) = outcome else {
                continue;
            };
            for a in actions {
                let (on, cmd) = match a {
                    Action::AptProof { on, cmd, .. } => (on, cmd.clone()),
                    Action::RecordVerified { on, path, .. } => {
                        (on, Cmd::new(["stat", "-c", "%s %Y", path]))
                    }
                    _ => continue,
                };
                let _ = match on {
                    Target::Host => rec.run(&cmd),
                    Target::Container(v) => Container::new(&rec, *v).run(&cmd),
                };
            }
        }
    }
    let errors = rec.errors();
    let mut recording = rec.recording();
    // The SSH session goes before its sim: freeing a session whose peer's namespace is gone blocks until TCP
    // gives up (minutes), which is what made some recordings take four minutes.
    drop(rec);
    drop(sim);
    if !errors.is_empty() {
        return Err(format!("the transport failed: {}", errors.join("; ")));
    }
    // The CT runs this build's llmctl (its checks ask it for the model's offload plan); the recording says the CT
    // holds the stand-in, so the plans do not change with every build of llmctl.
    let real = sha256_hex(&std::fs::read(env!("CARGO_BIN_EXE_llmctl")).unwrap());
    let stand_in = sha256_hex(&std::fs::read(repo().join(LLMCTL_STAND_IN)).unwrap());
    for c in &mut recording.commands {
        if c.argv.last().map(String::as_str) == Some(llmctl::provision::units::LLMCTL_BIN)
            && c.argv.iter().any(|a| a == "sha256sum")
        {
            c.stdout = c.stdout.replace(&real, &stand_in);
        }
    }
    recording
        .check_no_secrets()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Ok(Fixture {
        scenario: name_of(path),
        config: cfg,
        recording,
    })
}

/// Makes the recordings again from the sim (two sim hosts at a time): every scenario's, or those `only` names.
fn record_all(only: &str) {
    let files: Vec<PathBuf> = scenarios()
        .into_iter()
        .filter(|p| only == "1" || only.split(',').any(|n| n.trim() == name_of(p)))
        .collect();
    assert!(
        files.len() as u32 <= LAST_SIM - FIRST_SIM + 1,
        "more scenarios than this test's sim numbers {FIRST_SIM}-{LAST_SIM}"
    );
    // As tests/law.rs: the CTs get this llmctl, the test stack's real CPU llama-server as the build's binary and
    // its real GGUF as the model (the offload planner reads its header), as provision leaves them.
    let stack = |var: &str| {
        std::env::var(var).unwrap_or_else(|_| {
            panic!("{var} is not set: run `eval \"$(bash scripts/test-stack.sh)\"` first (the recordings use the test stack)")
        })
    };
    let (server, model) = (stack("LLMCTL_LLAMA_SERVER"), stack("LLMCTL_TEST_MODEL"));
    // SAFETY: set before the recording threads start; the other test of this binary waits for the recordings.
    unsafe {
        std::env::set_var("LLMCTL_SIM_LLMCTL", env!("CARGO_BIN_EXE_llmctl"));
        std::env::set_var("LLMCTL_SIM_LLAMA_SERVER", server);
        std::env::set_var("LLMCTL_SIM_MODEL", model);
    }
    let started = Instant::now();
    for (i, chunk) in files.chunks(2).enumerate() {
        let handles: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(j, path)| {
                let path = path.clone();
                let n = FIRST_SIM + (i * 2 + j) as u32;
                std::thread::spawn(move || {
                    let fixture = record(&path, n);
                    let text = serde_json::to_string_pretty(&fixture).unwrap() + "\n";
                    std::fs::write(fixture_path(&fixture.scenario), text).unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().expect("recording a scenario");
        }
    }
    eprintln!(
        "fast tier: recorded {} scenarios from the sim in {:.1} s",
        files.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Every scenario's fixture (recorded first with `UPDATE_RECORDINGS=1`).
fn fixtures() -> &'static Vec<(PathBuf, Fixture)> {
    static ALL: OnceLock<Vec<(PathBuf, Fixture)>> = OnceLock::new();
    ALL.get_or_init(|| {
        if let Ok(only) = std::env::var("UPDATE_RECORDINGS")
            && only != "0"
        {
            record_all(&only);
        }
        scenarios()
            .into_iter()
            .map(|path| {
                let name = name_of(&path);
                let file = fixture_path(&name);
                let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
                    panic!(
                        "{}: {e}: scenario {name} has no recording; make them with \
                         `UPDATE_RECORDINGS=1 cargo test --test fast_tier` (root, the sim)",
                        file.display()
                    )
                });
                let fixture: Fixture = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                (path, fixture)
            })
            .collect()
    })
}

// ------------------------------------------------------------------------------------------- (a) and (b)

fn expected_problems(path: &Path) -> (BTreeSet<String>, i64) {
    let doc: toml::Table = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let expect = doc["expect"].as_table().expect("[expect]");
    let findings: BTreeSet<String> = expect["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let exit = expect
        .get("exit")
        .and_then(|v| v.as_integer())
        .unwrap_or(if findings.is_empty() { 0 } else { 1 });
    (findings, exit)
}

fn problems(findings: &[Finding]) -> impl Iterator<Item = &Finding> {
    findings.iter().filter(|f| f.severity.is_problem())
}

fn snapshot_text(j: &Judged) -> String {
    let mut s = String::from("## doctor, no config\n\n");
    match &j.plain {
        Ok((f, findings)) => s += &llmctl::doctor::render_text(&f.target, f.vmid, findings),
        Err(e) => s += &format!("could not run: {e}\n"),
    }
    s += "\n## doctor, with the law's config\n\n";
    match &j.law {
        Ok(law) => {
            s += &llmctl::doctor::render_text(&law.facts.target, law.facts.vmid, &law.findings);
            s += "\n## provision --check\n\n";
            for (id, title, o) in &law.plan {
                s += &llmctl::provision::render_outcome(id.as_str(), title, o);
            }
        }
        Err(e) => s += &format!("could not run: {e}\n"),
    }
    s
}

/// (b): what breaks the law on this scenario.
fn law_violations(j: &Judged) -> Vec<String> {
    let law = match (&j.law, &j.plain) {
        (Ok(law), _) => law,
        // doctor could not run (exit 2, not Proxmox), and provision cannot either: the exit codes agree.
        (Err(_), Err(_)) => return Vec::new(),
        (Err(e), Ok(_)) => {
            return vec![format!(
                "doctor runs without a config, but not with one: {e}"
            )];
        }
    };
    let mut wrong = Vec::new();
    let changing: BTreeSet<StepId> = law
        .plan
        .iter()
        .filter(|(_, _, o)| matches!(o, StepOutcome::Planned(_) | StepOutcome::Refused(_)))
        .map(|(id, _, _)| *id)
        .collect();
    let healthy = llmctl::doctor::outcome(&law.findings) == Outcome::Success;
    if healthy != changing.is_empty() {
        wrong.push(format!(
            "doctor {} but the plan changes or refuses [{}]",
            if healthy {
                "is healthy"
            } else {
                "finds problems"
            },
            changing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for f in problems(&law.findings) {
        match &f.fix {
            Some(fix) if changing.contains(&fix.step) => {}
            Some(fix) => wrong.push(format!(
                "{} ({:?}): fix names step `{}`, which the plan does not change",
                f.id, f.severity, fix.step
            )),
            None => wrong.push(format!("{} ({:?}): no fix", f.id, f.severity)),
        }
    }
    wrong
}

fn expect_violations(path: &Path, j: &Judged) -> Vec<String> {
    let (want, exit) = expected_problems(path);
    match &j.plain {
        Ok((_, findings)) => {
            let got: BTreeSet<String> = problems(findings).map(|f| f.id.to_string()).collect();
            let code = match llmctl::doctor::outcome(findings) {
                Outcome::Success => 0,
                Outcome::ProblemsFound => 1,
                Outcome::CouldNotRun => 2,
            };
            let mut wrong = Vec::new();
            if got != want {
                wrong.push(format!(
                    "doctor's problems: expected {want:?}, got {got:?} (fixtures/scenarios [expect])"
                ));
            }
            if code != exit {
                wrong.push(format!("doctor's exit: expected {exit}, got {code}"));
            }
            wrong
        }
        Err(e) if exit == 2 && want.is_empty() => {
            let _ = e;
            Vec::new()
        }
        Err(e) => vec![format!("doctor could not run: {e}")],
    }
}

// ------------------------------------------------------------------------------------------- (c) and (d)

/// What apply did, at the level of the plan's actions.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Run {
        on: String,
        argv: Vec<String>,
    },
    /// `data` None: any content (a new secret, a marker of the stat it just read).
    Write {
        on: String,
        path: String,
        data: Option<Vec<u8>>,
        mode: u32,
    },
    Backup {
        on: String,
        path: String,
    },
    Wait {
        unit: String,
        url: String,
    },
    Mkdir {
        on: String,
        dir: String,
    },
}

fn same(a: &Op, b: &Op) -> bool {
    match (a, b) {
        (
            Op::Write {
                on,
                path,
                data,
                mode,
            },
            Op::Write {
                on: on2,
                path: path2,
                data: data2,
                mode: mode2,
            },
        ) => {
            on == on2
                && path == path2
                && mode == mode2
                && (data.is_none() || data2.is_none() || data == data2)
        }
        _ => a == b,
    }
}

fn on_name(t: &Target) -> String {
    t.to_string()
}

/// The ops a step's planned actions must produce; `None` when the step is not applied here (see the header).
fn expected_ops(actions: &[Action]) -> Option<Vec<Op>> {
    let mut ops = Vec::new();
    for a in actions {
        match a {
            Action::Run { on, cmd } | Action::AptProof { on, cmd, .. } => ops.push(Op::Run {
                on: on_name(on),
                argv: cmd.argv.clone(),
            }),
            Action::WriteFile {
                on,
                path,
                new,
                mode,
                ..
            } => ops.push(Op::Write {
                on: on_name(on),
                path: path.clone(),
                data: Some(new.clone().into_bytes()),
                mode: *mode,
            }),
            Action::WriteSecret { on, path, .. } => ops.push(Op::Write {
                on: on_name(on),
                path: path.clone(),
                data: None,
                mode: 0o600,
            }),
            Action::Upload {
                on, from, to, mode, ..
            } => ops.push(Op::Write {
                on: on_name(on),
                path: to.clone(),
                data: Some(std::fs::read(from).expect("the upload's local file")),
                mode: *mode,
            }),
            Action::RecordVerified {
                on, path, marker, ..
            } => {
                ops.push(Op::Run {
                    on: on_name(on),
                    argv: ["stat", "-c", "%s %Y", path].map(String::from).to_vec(),
                });
                ops.push(Op::Write {
                    on: on_name(on),
                    path: marker.clone(),
                    data: None,
                    mode: 0o644,
                });
            }
            Action::Backup { on, path } => ops.push(Op::Backup {
                on: on_name(on),
                path: path.clone(),
            }),
            Action::WaitHealthy { unit, url, .. } => ops.push(Op::Wait {
                unit: unit.clone(),
                url: url.clone(),
            }),
            Action::Reboot { .. } | Action::Deferred { .. } => return None,
        }
    }
    Some(ops)
}

fn split_on(argv: &[String]) -> (String, Vec<String>) {
    match argv {
        [pct, exec, v, dash, rest @ ..] if pct == "pct" && exec == "exec" && dash == "--" => {
            (format!("CT {v}"), rest.to_vec())
        }
        _ => ("host".to_string(), argv.to_vec()),
    }
}

fn is_backup_path(p: &str) -> bool {
    p.starts_with(llmctl::provision::ctx::BACKUP_DIR)
}

fn parent(p: &str) -> &str {
    p.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
}

/// Folds what the fake host received into ops: a container write (`mktemp`, the temp file, `pct push`, `mv`,
/// `rm`) is one write; a backup (`test -e` of the file and of its backup, `mkdir`, `cp -a`) is one backup, also
/// when there was nothing to back up; the wait for health is one wait; the backup and `mkdir` right before a
/// write of the same file are part of that write.
fn fold(events: &[Event]) -> Result<Vec<Op>, String> {
    let mut ops: Vec<Op> = Vec::new();
    let run = |e: &Event| -> Option<(String, Vec<String>)> {
        match e {
            Event::Run { argv, .. } => Some(split_on(argv)),
            _ => None,
        }
    };
    let mut i = 0;
    while i < events.len() {
        let e = &events[i];
        match e {
            Event::Write { path, data, mode } => {
                ops.push(Op::Write {
                    on: "host".into(),
                    path: path.clone(),
                    data: Some(data.clone()),
                    mode: *mode,
                });
                i += 1;
                continue;
            }
            Event::Read { path } => return Err(format!("apply read host file {path}")),
            Event::Run { .. } => {}
        }
        let (on, argv) = run(e).unwrap();
        let a: Vec<&str> = argv.iter().map(String::as_str).collect();
        match a.as_slice() {
            ["mktemp", t] if on == "host" && t.starts_with("/tmp/llmctl-ct.") => {
                // mktemp, write tmp, pct push V tmp cttmp --perms M, pct exec V -- mv -f -- cttmp path, rm -f -- tmp
                let seq = events.get(i + 1..i + 5).unwrap_or_default();
                let (data, mode) = match seq.first() {
                    Some(Event::Write { data, mode, .. }) => (data.clone(), *mode),
                    other => {
                        return Err(format!(
                            "a container write without its temp file: {other:?}"
                        ));
                    }
                };
                let push = seq.get(1).and_then(run);
                let mv = seq.get(2).and_then(run);
                let (Some((_, push)), Some((ct, mv))) = (push, mv) else {
                    return Err(format!("an unfinished container write: {seq:?}"));
                };
                if push.first().map(String::as_str) != Some("pct")
                    || mv.first().map(String::as_str) != Some("mv")
                {
                    return Err(format!("not a container write: {push:?} then {mv:?}"));
                }
                let mode = push
                    .iter()
                    .skip_while(|x| *x != "--perms")
                    .nth(1)
                    .and_then(|m| u32::from_str_radix(m, 8).ok())
                    .unwrap_or(mode);
                ops.push(Op::Write {
                    on: ct,
                    path: mv.last().cloned().unwrap_or_default(),
                    data: Some(data),
                    mode,
                });
                i += 5;
            }
            ["test", "-e", p] if !is_backup_path(p) => {
                // The backup's check: the file, then (it exists) its backup, then mkdir and cp -a.
                let mut j = i + 1;
                if let Some((o, b)) = events.get(j).and_then(run)
                    && o == on
                    && b.len() == 3
                    && b[..2] == ["test", "-e"]
                    && is_backup_path(&b[2])
                {
                    j += 1;
                    while let Some((o, c)) = events.get(j).and_then(run)
                        && o == on
                        && (c.first().map(String::as_str) == Some("mkdir")
                            && c.iter().any(|x| is_backup_path(x))
                            || c.first().map(String::as_str) == Some("cp")
                                && c.get(3).map(String::as_str) == Some(*p))
                    {
                        j += 1;
                    }
                }
                ops.push(Op::Backup {
                    on,
                    path: p.to_string(),
                });
                i = j;
            }
            ["mkdir", "-p", "--", dir] => {
                ops.push(Op::Mkdir {
                    on,
                    dir: dir.to_string(),
                });
                i += 1;
            }
            ["systemctl", "show", "-p", "NRestarts", "--value", unit] => {
                let mut j = i + 1;
                let mut url = None;
                while let Some((_, c)) = events.get(j).and_then(run)
                    && (c.get(1).map(String::as_str) == Some("probe")
                        || c.starts_with(&["systemctl".into(), "show".into()])
                        || c.starts_with(&["systemctl".into(), "is-failed".into()]))
                {
                    if c.get(2).map(String::as_str) == Some("--health") {
                        url = c.get(3).cloned();
                    }
                    j += 1;
                }
                ops.push(Op::Wait {
                    unit: unit.to_string(),
                    url: url.unwrap_or_default(),
                });
                i = j;
            }
            _ => {
                ops.push(Op::Run { on, argv });
                i += 1;
            }
        }
    }
    // A write's own backup and mkdir are part of the write.
    let mut out: Vec<Op> = Vec::new();
    for op in ops {
        if let Op::Write { on, path, .. } = &op {
            if let Some(Op::Mkdir { on: o, dir }) = out.last()
                && o == on
                && dir == parent(path)
            {
                out.pop();
            }
            if let Some(Op::Backup { on: o, path: p }) = out.last()
                && o == on
                && p == path
            {
                out.pop();
            }
        }
        out.push(op);
    }
    // A mkdir that is not a write's is a command of its own.
    Ok(out
        .into_iter()
        .map(|op| match op {
            Op::Mkdir { on, dir } => Op::Run {
                on,
                argv: ["mkdir", "-p", "--", &dir].map(String::from).to_vec(),
            },
            op => op,
        })
        .collect())
}

/// Paths (where, path) a step's check read back with `cat`.
fn cat_reads(events: &[Event]) -> BTreeSet<(String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Run { argv, .. } => {
                let (on, a) = split_on(argv);
                (a.len() == 2 && a[0] == "cat").then(|| (on, a[1].clone()))
            }
            _ => None,
        })
        .collect()
}

/// The files a plan writes with their new content: (where, path) → content.
fn file_writes(
    actions: &[Action],
) -> std::collections::BTreeMap<(String, String), (Option<String>, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::WriteFile {
                on, path, old, new, ..
            } => Some(((on_name(on), path.clone()), (old.clone(), new.clone()))),
            _ => None,
        })
        .collect()
}

#[derive(Default)]
struct ApplyReport {
    wrong: Vec<String>,
    applied: Vec<StepId>,
    skipped: Vec<StepId>,
    /// (step, path) whose check read the written file back and was satisfied.
    reassessed: Vec<(StepId, String)>,
}

/// (c) and (d) on one scenario.
fn apply_exactly_the_plan(fixture: &Fixture, law: &LawRun) -> ApplyReport {
    let mut report = ApplyReport::default();
    let host = FakeHost::from_recording(HOST_NAME, &fixture.recording).with_file_commands();
    // The host accepts every planned change; the services it starts answer their health check.
    let full = |on: &Target, argv: &[String]| match on {
        Target::Host => argv.to_vec(),
        Target::Container(v) => Container::new(&host, *v).exec_argv(argv),
    };
    for (_, _, o) in &law.plan {
        let StepOutcome::Planned(actions) = o else {
            continue;
        };
        for a in actions {
            let (on, argv) = match a {
                Action::Run { on, cmd } => (on, cmd.argv.clone()),
                // The proof and the stat were recorded on the host as it was before the plan's earlier actions
                // (the repository not configured yet, the model not fetched yet); where that answer would stop
                // the step, the fake answers as the host those actions leave would: the exact versions planned.
                Action::AptProof {
                    on,
                    cmd,
                    version,
                    forbidden,
                } => {
                    let argv = full(on, &cmd.argv);
                    let forbidden: Vec<&str> = forbidden.iter().map(String::as_str).collect();
                    let passes = host.peek(&argv).is_some_and(|o| {
                        o.success()
                            && llmctl::provision::host::simulation_pins_exactly(
                                &o.stdout, version, &forbidden,
                            )
                            .is_ok()
                    });
                    if !passes {
                        let inst: String = cmd
                            .argv
                            .iter()
                            .filter_map(|a| a.split_once('='))
                            .filter(|(name, _)| {
                                !name.starts_with('-') && !name.contains("FRONTEND")
                            })
                            .map(|(name, v)| format!("Inst {name} ({v} fake-host [amd64])\n"))
                            .collect();
                        host.replace_answer(argv, output(0, &inst, ""));
                    }
                    continue;
                }
                Action::RecordVerified { on, path, .. } => {
                    let argv = full(on, &["stat", "-c", "%s %Y", path].map(String::from));
                    if !host.peek(&argv).is_some_and(|o| o.success()) {
                        host.replace_answer(argv, output(0, "1 1\n", ""));
                    }
                    continue;
                }
                Action::WaitHealthy { on, unit, url } => {
                    host.answer(
                        Container::new(&host, VMID).exec_argv(
                            &["systemctl", "show", "-p", "NRestarts", "--value", unit]
                                .map(String::from),
                        ),
                        output(0, "0\n", ""),
                    );
                    let probe = [
                        llmctl::provision::units::LLMCTL_BIN,
                        "probe",
                        "--health",
                        url,
                        "--wait",
                        "5",
                    ]
                    .map(String::from);
                    (on, probe.to_vec())
                }
                _ => continue,
            };
            let argv = full(on, &argv);
            if !host.peek(&argv).is_some_and(|o| o.success()) {
                host.replace_answer(argv, output(0, "", ""));
            }
        }
    }
    let steps = llmctl::provision::all_steps();
    let mut ctx = ctx_over(&host, &fixture.config, law.facts.clone());
    for (id, _, o) in &law.plan {
        let StepOutcome::Planned(actions) = o else {
            continue;
        };
        let Some(want) = expected_ops(actions) else {
            report.skipped.push(*id);
            continue;
        };
        let step = steps.iter().find(|s| s.id() == *id).unwrap();
        host.clear_events();
        let applied = step.apply(&mut ctx, actions);
        let events = host.events();
        let got = match fold(&events) {
            Ok(g) => g,
            Err(e) => {
                report.wrong.push(format!("{id}: {e}"));
                continue;
            }
        };
        let exact = got.len() == want.len() && got.iter().zip(&want).all(|(a, b)| same(a, b));
        if let Err(e) = applied {
            report.wrong.push(format!("{id}: apply failed: {e:#}"));
        }
        if !exact {
            report.wrong.push(format!(
                "{id}: apply did not do exactly the plan\n      planned: {want:?}\n      issued:  {got:?}"
            ));
        }
        // Secrets never in argv.
        for a in actions {
            if let Action::WriteSecret { on, path, .. } = a {
                let secret = match on {
                    Target::Host => host.file(None, path),
                    Target::Container(v) => host.file(Some(*v), path),
                };
                let secret = secret.map(|f| String::from_utf8_lossy(&f.data).trim().to_string());
                if let Some(s) = secret.filter(|s| !s.is_empty())
                    && events.iter().any(|e| matches!(e, Event::Run { argv, .. } if argv.iter().any(|x| x.contains(&s))))
                {
                    report.wrong.push(format!("{id}: the new secret for {path} was in a command's argv"));
                }
            }
        }
        report.applied.push(*id);
        // (d) assess again: where the check reads back (`cat`) a file the apply wrote, it sees what was written,
        // and so no longer plans that write, or plans it again only as part of something else it still wants
        // (llama.cpp's build stamp, rewritten after every rebuild) with the file as it is now.
        host.clear_events();
        let again = step.check(&mut ctx);
        let written = file_writes(actions);
        let read_back: Vec<(String, String)> = cat_reads(&host.events())
            .into_iter()
            .filter(|p| written.contains_key(p))
            .collect();
        if read_back.is_empty() {
            continue;
        }
        let left = match again {
            Ok(llmctl::provision::step::Check::Changes(left)) => file_writes(&left),
            Ok(_) => Default::default(),
            Err(e) => {
                report
                    .wrong
                    .push(format!("{id}: its check after apply failed: {e:#}"));
                continue;
            }
        };
        for p in read_back {
            let new = &written[&p].1;
            match left.get(&p) {
                None => report.reassessed.push((*id, format!("{}: done", p.1))),
                Some((old, _)) if old.as_ref() == Some(new) => report
                    .reassessed
                    .push((*id, format!("{}: read back, rewritten with the rest", p.1))),
                Some((old, _)) => report.wrong.push(format!(
                    "{id}: after writing {} {}, its check reads it as {old:?}, not as written",
                    p.0, p.1
                )),
            }
        }
    }
    report
}

// ------------------------------------------------------------------------------------------- the test

/// A command the recording lacks, named briefly: a short one whole; a long one (a probe script) by the first line
/// where it differs from the recorded command it is nearest to.
fn unrecorded(cmd: &str, rec: &Recording) -> String {
    if cmd.len() <= 200 {
        return format!("`{cmd}`");
    }
    let lines: Vec<&str> = cmd.lines().collect();
    let nearest = rec
        .commands
        .iter()
        .map(|c| llmctl::shell::join(&c.argv))
        .max_by_key(|r| r.lines().zip(&lines).take_while(|(a, b)| a == *b).count());
    let first = lines[0].chars().take(80).collect::<String>();
    match nearest {
        Some(r) => {
            let same = r.lines().zip(&lines).take_while(|(a, b)| a == *b).count();
            format!(
                "`{first}...`, which differs from the recorded one at line {}: now `{}`, recorded `{}`",
                same + 1,
                lines.get(same).unwrap_or(&"(end)"),
                r.lines().nth(same).unwrap_or("(end)")
            )
        }
        None => format!("`{first}...`"),
    }
}

#[test]
fn the_fast_tier() {
    let all = fixtures();
    let started = Instant::now();
    let mut failures = Vec::new();
    let (mut applied, mut skipped, mut reassessed) = (0, Vec::new(), BTreeSet::new());
    for (path, fixture) in all {
        let name = &fixture.scenario;
        let host = FakeHost::from_recording(HOST_NAME, &fixture.recording);
        let judged = judge(&host, &fixture.config);
        let mut wrong = Vec::new();
        for c in host.unanswered() {
            wrong.push(format!(
                "a command that is not in the recording (make the recordings again: UPDATE_RECORDINGS={name} \
                 cargo test --test fast_tier): {}",
                unrecorded(&c, &fixture.recording)
            ));
        }
        // (a)
        let text = snapshot_text(&judged);
        let snap = std::panic::catch_unwind(|| {
            insta::with_settings!({ snapshot_suffix => name.as_str(), prepend_module_to_snapshot => true, omit_expression => true }, {
                insta::assert_snapshot!("plan", text);
            });
        });
        if snap.is_err() {
            wrong.push("its snapshot differs (see above; INSTA_UPDATE=always accepts it)".into());
        }
        wrong.extend(expect_violations(path, &judged));
        // (b)
        wrong.extend(
            law_violations(&judged)
                .into_iter()
                .map(|w| format!("law: {w}")),
        );
        // (c), (d)
        if let Ok(law) = &judged.law {
            let r = apply_exactly_the_plan(fixture, law);
            applied += r.applied.len();
            skipped.extend(r.skipped.iter().map(|s| format!("{name}/{s}")));
            reassessed.extend(r.reassessed.iter().map(|(s, p)| format!("{s} ({p})")));
            wrong.extend(r.wrong);
        }
        if !wrong.is_empty() {
            failures.push(format!("{name}:\n  {}", wrong.join("\n  ")));
        }
    }
    eprintln!(
        "fast tier: {} scenarios in {:.2} s; {applied} planned steps applied and matched, not applied (reboot or \
         deferred): [{}]; assessed again after apply: [{}]",
        all.len(),
        started.elapsed().as_secs_f64(),
        skipped.join(", "),
        reassessed.into_iter().collect::<Vec<_>>().join(", ")
    );
    assert!(
        failures.is_empty(),
        "{} of {} scenarios fail the fast tier:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}

#[test]
fn folding_sees_a_command_the_plan_did_not_show() {
    // The check of (c) can fail: an extra command after the planned one is reported.
    let ev = |argv: &[&str]| Event::Run {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        stdin: None,
    };
    let planned = [Action::Run {
        on: Target::Container(103),
        cmd: Cmd::new(["systemctl", "daemon-reload"]),
    }];
    let want = expected_ops(&planned).unwrap();
    let got = fold(&[ev(&[
        "pct",
        "exec",
        "103",
        "--",
        "systemctl",
        "daemon-reload",
    ])])
    .unwrap();
    assert_eq!(got, want);
    let got = fold(&[
        ev(&["pct", "exec", "103", "--", "systemctl", "daemon-reload"]),
        ev(&["pct", "exec", "103", "--", "systemctl", "restart", "x"]),
    ])
    .unwrap();
    assert_ne!(got, want);
}
