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
use crate::remote::HostArgs;
use checks::{Finding, Severity};

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
pub struct Report {
    pub host: String,
    pub vmid: Option<u32>,
    /// `healthy`, `problems-found`, or `could-not-run` (a container that does not exist; also printed, with an
    /// `error` string and no findings, when the host cannot be reached or examined).
    pub outcome: &'static str,
    pub summary: Summary,
    pub findings: Vec<Finding>,
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
        .any(|f| f.id == "ct.missing" && f.severity == Severity::Fail)
    {
        Outcome::CouldNotRun
    } else if findings.iter().any(|f| f.severity == Severity::Fail) {
        Outcome::ProblemsFound
    } else {
        Outcome::Success
    }
}

pub fn run(global: &GlobalArgs, args: DoctorArgs) -> Result<Outcome> {
    let remote = args.target.resolve(global)?;
    let (host, vmid) = (remote.host.clone(), remote.vmid);
    let gathered = remote
        .connect()
        .and_then(|t| crate::host::facts::gather(t.as_ref(), vmid));
    let facts = match gathered {
        Ok(f) => f,
        Err(e) if args.json => {
            // A script reading stdout gets a report either way: the host could not be examined, and why.
            let report = serde_json::json!({
                "host": host, "vmid": vmid, "outcome": "could-not-run",
                "error": format!("{e:#}"), "findings": [],
            });
            let mut stdout = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut stdout, &report)?;
            writeln!(stdout)?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let findings = checks::run_all(&facts);
    let outcome = outcome(&findings);
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let report = Report {
            host: facts.target.clone(),
            vmid: facts.vmid,
            outcome: match outcome {
                Outcome::Success => "healthy",
                Outcome::ProblemsFound => "problems-found",
                Outcome::CouldNotRun => "could-not-run",
            },
            summary: summarize(&findings),
            findings,
        };
        serde_json::to_writer_pretty(&mut stdout, &report)?;
        writeln!(stdout)?;
    } else {
        stdout.write_all(render_text(&facts.target, facts.vmid, &findings).as_bytes())?;
    }
    if outcome == Outcome::CouldNotRun {
        // The report says which container is missing; say it on stderr too so scripts see why the exit is 2.
        let v = facts.vmid.unwrap_or_default();
        eprintln!(
            "error: container {v} does not exist on {}: pass an existing --vmid (see `pct list`)",
            facts.target
        );
    }
    Ok(outcome)
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
                out.push_str(&format!("        fix: {}\n", fix.render()));
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
