//! `llmctl doctor`: find what is broken on a Proxmox host and its GPU container, and say how to fix it.
//!
//! [`crate::host::facts`] gathers read-only facts in two round trips, [`checks`] turns them into findings (pure functions),
//! and this module connects, prints the report (text or `--json`) and picks the exit code:
//! 0 healthy (warnings allowed), 1 problems found, 2 could not run.

pub mod checks;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use std::io::Write;

use crate::cli::GlobalArgs;
use crate::outcome::Outcome;
use crate::remote::{HostArgs, Remote};
use anyhow::Context as _;

use crate::host::StepId;
use checks::{Finding, FindingId, Fix, Severity};

#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub target: HostArgs,
    /// Print a machine-readable report.
    #[arg(long)]
    pub json: bool,
}

/// The machine-readable report (`--json`).
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    pub host: String,
    pub vmid: Option<u32>,
    /// `healthy`, `problems-found`, or `could-not-run` (a container that does not exist; also printed, with an
    /// `error` string and no findings, when the host cannot be reached or examined).
    pub outcome: &'static str,
    pub summary: Summary,
    pub findings: &'a [Finding],
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub ok: usize,
    pub skip: usize,
    pub warn: usize,
    pub fail: usize,
}

pub fn summarize(findings: &[Finding]) -> Summary {
    let mut s = Summary::default();
    for f in findings {
        match f.severity {
            Severity::Ok => s.ok += 1,
            Severity::Skip => s.skip += 1,
            Severity::Warn => s.warn += 1,
            Severity::Fail => s.fail += 1,
        }
    }
    s
}

/// Exit outcome: a missing container means doctor could not check what it was asked to (2); any failure → 1;
/// warnings alone are healthy (0).
pub fn outcome(findings: &[Finding]) -> Outcome {
    if findings
        .iter()
        .any(|f| f.id == FindingId::CtMissing && f.severity == Severity::Fail)
    {
        Outcome::CouldNotRun
    } else if findings.iter().any(|f| f.severity == Severity::Fail) {
        Outcome::ProblemsFound
    } else {
        Outcome::Success
    }
}

pub fn run(global: &GlobalArgs, args: DoctorArgs) -> Result<Outcome> {
    let file = crate::config::ConfigFile::load(global.config.as_deref())?;
    let ssh = args.target.ssh.options();
    let mut shared = None;
    let (file, host) = match crate::fleet::select(&file, &args.target.host, args.target.vmid, &ssh)?
    {
        crate::fleet::Selection::One {
            config,
            host,
            fleet,
            ..
        } => {
            // One host of a fleet whose proxies are peers: judged against the fleet's key, as provision would.
            if !fleet.is_empty() {
                shared = crate::fleet::key::held(&fleet, &ssh);
            }
            (config, host)
        }
        crate::fleet::Selection::Fleet { members, preface } => {
            return crate::fleet::commands::doctor(global, &args, &members, preface.as_deref());
        }
    };
    let remote = args.target.resolve_one(&file, host.as_deref())?;
    let examined = examine(&remote, &file);
    let (transport, facts) = match examined {
        Ok(f) => f,
        Err(e) if args.json => {
            // A script reading stdout gets a report either way: the host could not be examined, and why.
            let report = unexamined_json(&remote, &e);
            let mut stdout = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut stdout, &report)?;
            writeln!(stdout)?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let diagnosis = judge_in_fleet(&remote, &file, transport, facts, shared)?;
    let outcome = diagnosis.outcome();
    let mut stdout = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut stdout, &diagnosis.report())?;
        writeln!(stdout)?;
    } else {
        stdout.write_all(diagnosis.text().as_bytes())?;
    }
    if let Some(why) = diagnosis.could_not_run() {
        // The report says which container is missing; say it on stderr too so scripts see why the exit is 2.
        eprintln!("error: {why}");
    }
    Ok(outcome)
}

/// `--json`'s report for a host that could not be examined (unreachable, not Proxmox): why, and no findings.
pub fn unexamined_json(remote: &Remote, err: &anyhow::Error) -> serde_json::Value {
    serde_json::json!({
        "host": remote.host, "vmid": remote.vmid, "outcome": "could-not-run",
        "error": format!("{err:#}"), "findings": [],
    })
}

/// One host's facts, read through one connection (kept open for [`judge`]). An llmctl.toml that describes an
/// installation names where its files are in the container: the container round looks there too, so
/// provision's checks in [`judge`] run on these facts alone.
pub fn examine(
    remote: &Remote,
    file: &crate::config::ConfigFile,
) -> Result<(
    Box<dyn crate::transport::Transport>,
    crate::host::facts::HostFacts,
)> {
    let paths = crate::provision::config::install_paths_of(file);
    let transport = remote.connect()?;
    let facts = crate::host::facts::gather_with(transport.as_ref(), remote.vmid, paths.as_ref())?;
    Ok((transport, facts))
}

/// What doctor found on one host.
#[derive(Debug)]
pub struct Diagnosis {
    pub target: String,
    pub vmid: Option<u32>,
    pub findings: Vec<Finding>,
}

impl Diagnosis {
    pub fn outcome(&self) -> Outcome {
        outcome(&self.findings)
    }

    /// The text report.
    pub fn text(&self) -> String {
        render_text(&self.target, self.vmid, &self.findings)
    }

    /// The `--json` report.
    pub fn report(&self) -> Report<'_> {
        Report {
            host: self.target.clone(),
            vmid: self.vmid,
            outcome: match self.outcome() {
                Outcome::Success => "healthy",
                Outcome::ProblemsFound => "problems-found",
                Outcome::CouldNotRun => "could-not-run",
            },
            summary: summarize(&self.findings),
            findings: &self.findings,
        }
    }

    /// Why doctor could not check what it was asked to (the container does not exist), when that is so.
    pub fn could_not_run(&self) -> Option<String> {
        (self.outcome() == Outcome::CouldNotRun).then(|| {
            format!(
                "container {} does not exist on {}: pass an existing --vmid (see `pct list`)",
                self.vmid.unwrap_or_default(),
                self.target
            )
        })
    }

    /// The failing findings' ids, for a one-line reason.
    pub fn failures(&self) -> Vec<&'static str> {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Fail)
            .map(|f| f.id.as_str())
            .collect()
    }
}

/// Judges one examined host: doctor's checks, and with an llmctl.toml that describes an installation also
/// provision's own checks (whatever `provision --check` would change is a failure here too).
pub fn judge(
    remote: &Remote,
    file: &crate::config::ConfigFile,
    transport: Box<dyn crate::transport::Transport>,
    facts: crate::host::facts::HostFacts,
) -> Result<Diagnosis> {
    judge_in_fleet(remote, file, transport, facts, None)
}

/// [`judge`] for a host of a fleet whose proxies share one key (`shared_key`: what provision over the fleet
/// would want in its key file), so that doctor over the fleet finds what `provision --check` over it would.
pub fn judge_in_fleet(
    remote: &Remote,
    file: &crate::config::ConfigFile,
    transport: Box<dyn crate::transport::Transport>,
    facts: crate::host::facts::HostFacts,
    shared_key: Option<crate::provision::ctx::SharedKey>,
) -> Result<Diagnosis> {
    let mut findings = checks::run_all(&facts);
    if let Some(cfg) = desired(file, &facts)? {
        let config_path = file.path.as_deref().map_or_else(
            || crate::config::DEFAULT_PATH.to_string(),
            |p| p.display().to_string(),
        );
        let again = remote.clone();
        let connect: crate::provision::ctx::Connector = Box::new(move || again.connect());
        let binary = std::env::current_exe().context("cannot find this llmctl binary")?;
        let mut ctx = crate::provision::ctx::Ctx::over(
            transport,
            connect,
            cfg,
            config_path,
            binary,
            facts.clone(),
        );
        ctx.shared_key = shared_key;
        let plan = crate::provision::assess(&mut ctx)?;
        reconcile(&mut findings, &plan);
    }
    Ok(Diagnosis {
        target: facts.target.clone(),
        vmid: facts.vmid,
        findings,
    })
}

/// The provisioning configuration to judge the host against: llmctl.toml's, when it describes an installation
/// (`[driver]` and `[model]`), for the container doctor looks at. `None`: doctor judges by what the host itself
/// implies (the installed driver's version, the container's own units).
fn desired(
    file: &crate::config::ConfigFile,
    facts: &crate::host::facts::HostFacts,
) -> Result<Option<crate::provision::config::ProvisionConfig>> {
    let describes = file.has_section("driver") && file.has_section("model");
    let Some(vmid) = facts.vmid.filter(|_| describes) else {
        return Ok(None);
    };
    let host = crate::provision::config::HostTarget {
        target: facts.target.clone(),
        vmid,
    };
    crate::provision::config::ProvisionConfig::with_host(file, host).map(Some)
}

/// Makes the report agree with provision's assessment: every step `provision --check` would change or refuses
/// gets a failure naming it, unless a finding that names it already fails (with its own evidence).
pub fn reconcile(
    findings: &mut Vec<Finding>,
    plan: &[(StepId, &'static str, crate::provision::step::StepOutcome)],
) {
    use crate::provision::step::StepOutcome;
    for (step, title, outcome) in plan {
        let evidence: Vec<String> = match outcome {
            StepOutcome::Planned(actions) => actions
                .iter()
                .map(|a| {
                    let text = a.render();
                    let first = text.lines().next().unwrap_or_default().to_string();
                    format!("provision would: {first}")
                })
                .collect(),
            StepOutcome::Refused(why) => vec![format!("provision refuses: {why}")],
            StepOutcome::AlreadyDone(_) | StepOutcome::Applied(_) => continue,
        };
        let named = findings.iter().any(|f| {
            f.severity == Severity::Fail && f.fix.as_ref().is_some_and(|x| x.step == *step)
        });
        if named {
            continue;
        }
        findings.push(Finding {
            id: FindingId::Plan(*step),
            severity: Severity::Fail,
            title: format!("not as llmctl.toml describes: {title}"),
            evidence,
            fix: Some(Fix::step(*step)),
        });
    }
}

/// The text report: each check as `ok`/`skip`/`warn`/`FAIL` + title, problems with their evidence and fix,
/// then a summary line.
pub fn render_text(target: &str, vmid: Option<u32>, findings: &[Finding]) -> String {
    let mut out = format!(
        "llmctl doctor: {target}{}\n\n",
        vmid.map(|v| format!(", container {v}")).unwrap_or_default()
    );
    for f in findings {
        let tag = match f.severity {
            Severity::Ok => "ok  ",
            Severity::Skip => "skip",
            Severity::Warn => "warn",
            Severity::Fail => "FAIL",
        };
        out.push_str(&format!("{tag}  {:<26} {}\n", f.id, f.title));
        if f.severity.is_problem() {
            for line in &f.evidence {
                out.push_str(&format!("        {line}\n"));
            }
            if let Some(fix) = &f.fix {
                let text = fix.render();
                let mut lines = text.lines();
                out.push_str(&format!(
                    "        fix: {}\n",
                    lines.next().unwrap_or_default()
                ));
                for line in lines {
                    out.push_str(&format!("             {line}\n"));
                }
            }
        }
    }
    let s = summarize(findings);
    let verdict = if s.fail > 0 {
        "problems found"
    } else if s.warn > 0 {
        "healthy, with warnings"
    } else {
        "healthy"
    };
    out.push_str(&format!(
        "\n{verdict}: {} failed, {} warnings, {} ok, {} skipped\n",
        s.fail, s.warn, s.ok, s.skip
    ));
    out
}

#[cfg(test)]
mod reconcile_tests {
    use super::*;
    use crate::provision::step::{Action, StepOutcome, Target};
    use crate::transport::Cmd;

    fn fail(id: FindingId, step: StepId) -> Finding {
        Finding {
            id,
            severity: Severity::Fail,
            title: "x".into(),
            evidence: Vec::new(),
            fix: Some(Fix::step(step)),
        }
    }

    /// The law, in doctor: whatever provision would change or refuses is a failure that names the step.
    #[test]
    fn every_planned_step_fails_doctor_and_names_itself() {
        let mut findings = vec![fail(FindingId::DriverNotPinned, StepId::Driver)];
        let plan = vec![
            (
                StepId::Nouveau,
                "nouveau blacklisted",
                StepOutcome::AlreadyDone("ok".into()),
            ),
            (
                StepId::Driver,
                "the driver",
                StepOutcome::Planned(vec![Action::Run {
                    on: Target::Host,
                    cmd: Cmd::new(["apt-mark", "hold", "libcuda1"]),
                }]),
            ),
            (
                StepId::Cuda,
                "the CUDA toolkit",
                StepOutcome::Planned(vec![Action::Run {
                    on: Target::Container(103),
                    cmd: Cmd::new(["apt-get", "install", "cuda-toolkit-13-2"]),
                }]),
            ),
            (
                StepId::Model,
                "the model",
                StepOutcome::Refused("no sha256".into()),
            ),
        ];
        reconcile(&mut findings, &plan);
        let ids: Vec<&str> = findings.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(ids, ["driver.not-pinned", "plan.cuda", "plan.model"]);
        assert!(findings.iter().all(|f| f.severity == Severity::Fail));
        assert_eq!(findings[1].fix, Some(Fix::step(StepId::Cuda)));
        assert_eq!(
            findings[1].evidence,
            ["provision would: [CT 103] $ apt-get install cuda-toolkit-13-2"]
        );
        assert_eq!(findings[2].evidence, ["provision refuses: no sha256"]);
        assert_eq!(outcome(&findings), Outcome::ProblemsFound);
    }
}
