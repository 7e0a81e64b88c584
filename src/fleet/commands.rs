//! `doctor` and `provision` over a fleet: each host's run is the one-host command's own (`doctor::examine` and
//! `judge`, `provision::provision_one`), written into that host's buffer; this file only turns each into the
//! host's block and its line in the summary.

use std::io::Write;
use std::sync::Arc;

use anyhow::Result;

use super::{HostReport, Member, Verdict, one_line, print_block, run, summary, worst};
use crate::cli::GlobalArgs;
use crate::doctor::DoctorArgs;
use crate::outcome::Outcome;
use crate::provision::ProvisionArgs;
use crate::provision::progress::Live;

/// Live progress on stderr: only on a terminal, and not with --quiet.
fn progress(global: &GlobalArgs) -> bool {
    !global.quiet && crate::term::fancy_stderr()
}

/// `llmctl doctor` on every member: each host's report under its heading, then the summary. `--json`: one
/// document, `{"outcome", "hosts": [each host's report with its "name"]}`.
pub fn doctor(
    global: &GlobalArgs,
    args: &DoctorArgs,
    members: &[Member],
    preface: Option<&str>,
) -> Result<Outcome> {
    let mut stdout = std::io::stdout();
    if let Some(line) = preface {
        // stdout stays one JSON document with --json.
        if args.json {
            eprintln!("{line}");
        } else {
            writeln!(stdout, "{line}\n")?;
        }
    }
    let mut first = true;
    let mut write_err: Option<std::io::Error> = None;
    let reports = run(
        members,
        progress(global),
        |member, bar| Ok(doctor_one(args, member, bar)),
        |member, report| {
            if args.json {
                return;
            }
            if let Err(e) = print_block(&mut stdout, first, member, report) {
                write_err.get_or_insert(e);
            }
            first = false;
        },
    );
    if let Some(e) = write_err {
        return Err(e.into());
    }
    let outcome = worst(reports.iter().map(|r| r.outcome));
    let mut out = stdout.lock();
    if args.json {
        let hosts: Vec<&serde_json::Value> =
            reports.iter().filter_map(|r| r.json.as_ref()).collect();
        let doc = serde_json::json!({ "outcome": outcome_word(outcome), "hosts": hosts });
        serde_json::to_writer_pretty(&mut out, &doc)?;
        writeln!(out)?;
    } else {
        let rows: Vec<(&Member, &HostReport)> = members.iter().zip(&reports).collect();
        write!(out, "\n{}", summary(&rows))?;
    }
    Ok(outcome)
}

fn outcome_word(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Success => "healthy",
        Outcome::ProblemsFound => "problems-found",
        Outcome::CouldNotRun => "could-not-run",
    }
}

/// doctor on one member: its summary line, its text block and its `--json` report.
fn doctor_one(
    args: &DoctorArgs,
    member: &Member,
    bar: Option<&indicatif::ProgressBar>,
) -> HostReport {
    let failed = |e: anyhow::Error| {
        let json = serde_json::json!({
            "name": member.name, "host": member.target, "outcome": "could-not-run",
            "error": format!("{e:#}"), "findings": [],
        });
        HostReport {
            json: Some(json),
            ..HostReport::failed(&e, String::new())
        }
    };
    let remote = match args.target.resolve_one(&member.config, None) {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    if let Some(bar) = bar {
        bar.set_message(format!("{}: examining", member.target));
    }
    let diagnosis = crate::doctor::examine(&remote, &member.config)
        .and_then(|(t, facts)| crate::doctor::judge(&remote, &member.config, t, facts));
    let d = match diagnosis {
        Ok(d) => d,
        Err(e) => return failed(e),
    };
    let failures = d.failures();
    let mut block = d.text();
    let reason = match (d.could_not_run(), failures.as_slice()) {
        (Some(why), _) => {
            block.push_str(&format!("error: {why}\n"));
            why
        }
        (None, []) => String::new(),
        (None, [one]) => {
            let title = d
                .findings
                .iter()
                .find(|f| f.id.as_str() == *one)
                .map(|f| f.title.clone())
                .unwrap_or_default();
            format!("{one}: {title}")
        }
        (None, many) => many.join(", "),
    };
    let verdict = if failures.is_empty() {
        Verdict::Healthy
    } else {
        Verdict::Findings(failures.len())
    };
    let mut json = serde_json::to_value(d.report()).unwrap_or_default();
    if let Some(obj) = json.as_object_mut() {
        obj.insert("name".into(), member.name.clone().into());
    }
    HostReport {
        outcome: d.outcome(),
        verdict,
        reason: one_line(&reason),
        block,
        json: Some(json),
    }
}

/// `llmctl provision` on every member. Changing several hosts takes `--yes`: a question per host would come
/// from several hosts at once, and one question for all would be answered before their plans were read;
/// `--plan` first, then `--yes`, is the review.
pub fn provision(
    global: &GlobalArgs,
    args: &ProvisionArgs,
    members: &[Member],
    preface: Option<&str>,
) -> Result<Outcome> {
    if !(args.plan || args.check || args.yes) {
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        anyhow::bail!(
            "provision over {} hosts ({}) changes them in parallel and does not ask on each: review \
             `llmctl provision --plan` and run again with --yes, or pick one host with --host NAME",
            names.len(),
            names.join(", ")
        );
    }
    let mut stdout = std::io::stdout();
    if let Some(line) = preface {
        writeln!(stdout, "{line}\n")?;
    }
    // Proxies that are each other's peers share one key: read (or made) once, before the hosts run.
    let mut args = args.clone();
    if super::key::wanted(members) {
        args.shared_key = Some(super::key::shared(members, &args.ssh.options())?);
    }
    let args = &args;
    let mut first = true;
    let mut write_err: Option<std::io::Error> = None;
    let reports = run(
        members,
        progress(global),
        |member, bar| Ok(provision_member(global, args, member, bar)),
        |member, report| {
            if let Err(e) = print_block(&mut stdout, first, member, report) {
                write_err.get_or_insert(e);
            }
            first = false;
        },
    );
    if let Some(e) = write_err {
        return Err(e.into());
    }
    let rows: Vec<(&Member, &HostReport)> = members.iter().zip(&reports).collect();
    write!(stdout.lock(), "\n{}", summary(&rows))?;
    Ok(worst(reports.iter().map(|r| r.outcome)))
}

fn provision_member(
    global: &GlobalArgs,
    args: &ProvisionArgs,
    member: &Member,
    bar: Option<&indicatif::ProgressBar>,
) -> HostReport {
    if let Some(refused) = no_container(args, member) {
        return refused;
    }
    let live = Arc::new(Live::host_line(bar.cloned()));
    let mut buf: Vec<u8> = Vec::new();
    let result =
        crate::provision::provision_one(global, args, &member.config, None, live, &mut buf);
    let block = String::from_utf8_lossy(&buf).into_owned();
    let p = match result {
        Ok(p) => p,
        Err(e) => return HostReport::failed(&e, block),
    };
    let (verdict, reason) = match (&p.refused, p.changed) {
        (Some(why), _) => (Verdict::Refused, why.clone()),
        (None, Some(n)) if n > 0 => (Verdict::Changed(n), String::new()),
        (None, None) if p.planned > 0 => (Verdict::ToChange(p.planned), String::new()),
        _ => (Verdict::AsConfigured, String::new()),
    };
    HostReport {
        outcome: p.outcome,
        verdict,
        reason: one_line(&reason),
        block,
        json: None,
    }
}

/// A member without a container to provision (a cluster node with no vmid in its `[cluster.nodes.<name>]`):
/// refused, with the line that says where to set it. doctor still examines such a node (it finds the GPU
/// container itself); provision creates or changes a container, so it must be named.
fn no_container(args: &ProvisionArgs, member: &Member) -> Option<HostReport> {
    let entry = member.config.entry()?;
    let host: crate::config::HostSection = member.config.section_or_default().ok()?;
    if host.vmid.is_some() {
        return None;
    }
    let reason = format!("no vmid in {entry}");
    Some(HostReport {
        // As a refused step: --plan shows it, --check and --yes did not get the host where it should be.
        outcome: if args.plan {
            Outcome::Success
        } else {
            Outcome::ProblemsFound
        },
        verdict: Verdict::Refused,
        block: format!(
            "REFUSED: {reason}: set `vmid = N` there (the GPU container on {}: an existing one, or the one \
             to create) to provision it\n",
            member.name
        ),
        reason,
        json: None,
    })
}
