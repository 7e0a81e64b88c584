//! `doctor`, `status` and `provision` over a fleet: each host's run is the one-host command's own
//! (`doctor::examine` and `judge`, `status::gather`, `provision::provision_one`), written into that host's
//! buffer; this file only turns each into the host's block and its line in the summary.

use std::io::Write;
use std::sync::Arc;

use anyhow::Result;

use super::{HostReport, Member, Verdict, one_line, print_block, run, summary, worst};
use crate::cli::GlobalArgs;
use crate::doctor::DoctorArgs;
use crate::outcome::Outcome;
use crate::provision::ProvisionArgs;
use crate::provision::progress::Live;
use crate::status::{Status, StatusArgs};

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
    // Proxies that are each other's peers share one key (see `super::key`): every host is examined first, so
    // that each is judged against the key of the first host that has one, as provision over the fleet would.
    let mut examined: Vec<Option<Examined>> = Vec::new();
    let mut shared = None;
    if super::key::wanted(members) {
        examined = super::par_map(members, |m| {
            m.skip.is_none().then(|| {
                args.target
                    .resolve_one(&m.config, None)
                    .and_then(|remote| crate::doctor::examine(&remote, &m.config))
            })
        });
        let facts: Vec<Option<&crate::host::facts::HostFacts>> = examined
            .iter()
            .map(|e| e.as_ref().and_then(|r| r.as_ref().ok()).map(|(_, f)| f))
            .collect();
        shared = super::key::shared_hash(&facts);
    }
    let examined: Vec<std::sync::Mutex<Option<Examined>>> =
        examined.into_iter().map(std::sync::Mutex::new).collect();
    each_host(
        global,
        members,
        preface,
        args.json,
        outcome_word,
        |member, bar| {
            let i = members.iter().position(|m| std::ptr::eq(m, member));
            let pre = i
                .and_then(|i| examined.get(i))
                .and_then(|e| e.lock().unwrap_or_else(|p| p.into_inner()).take());
            Ok(doctor_one(args, member, bar, pre, shared.clone()))
        },
    )
}

/// Runs `job` on every member (see [`run`]) and prints the fleet's report: each host's block whole, in member
/// order, then the summary; with `json`, one document `{"outcome": word(outcome), "hosts": [...]}` instead (the
/// preface then goes to stderr, so stdout stays one document). The exit code is the worst host's.
fn each_host<J>(
    global: &GlobalArgs,
    members: &[Member],
    preface: Option<&str>,
    json: bool,
    word: fn(Outcome) -> &'static str,
    job: J,
) -> Result<Outcome>
where
    J: Fn(&Member, Option<&indicatif::ProgressBar>) -> Result<HostReport> + Sync,
{
    let mut stdout = std::io::stdout();
    if let Some(line) = preface {
        if json {
            eprintln!("{line}");
        } else {
            writeln!(stdout, "{line}\n")?;
        }
    }
    let mut first = true;
    let mut write_err: Option<std::io::Error> = None;
    let reports = run(members, progress(global), job, |member, report| {
        if json {
            return;
        }
        if let Err(e) = print_block(&mut stdout, first, member, report) {
            write_err.get_or_insert(e);
        }
        first = false;
    });
    if let Some(e) = write_err {
        return Err(e.into());
    }
    let outcome = worst(reports.iter().map(|r| r.outcome));
    let mut out = stdout.lock();
    if json {
        let hosts: Vec<&serde_json::Value> =
            reports.iter().filter_map(|r| r.json.as_ref()).collect();
        let doc = serde_json::json!({ "outcome": word(outcome), "hosts": hosts });
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

/// A host examined ahead of judging: its connection and facts, or why it could not be examined.
type Examined = Result<(
    Box<dyn crate::transport::Transport>,
    crate::host::facts::HostFacts,
)>;

/// doctor on one member: its summary line, its text block and its `--json` report. `pre`: the member already
/// examined (a fleet whose proxies share a key); `shared`: that key, as provision over the fleet would want it.
fn doctor_one(
    args: &DoctorArgs,
    member: &Member,
    bar: Option<&indicatif::ProgressBar>,
    pre: Option<Examined>,
    shared: Option<crate::provision::ctx::SharedKey>,
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
    let examined = pre.unwrap_or_else(|| crate::doctor::examine(&remote, &member.config));
    let diagnosis = examined.and_then(|(t, facts)| {
        crate::doctor::judge_in_fleet(&remote, &member.config, t, facts, shared)
    });
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

/// `llmctl status` on every member: each host's screen under its heading, then the summary. `--json`: one
/// document, `{"outcome", "hosts": [each host's status, with its "name"]}`.
pub fn status(
    global: &GlobalArgs,
    args: &StatusArgs,
    members: &[Member],
    preface: Option<&str>,
) -> Result<Outcome> {
    if args.watch.is_some() {
        // A screen redrawn in place holds one host; several would scroll away between refreshes.
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        anyhow::bail!(
            "--watch refreshes one host's status and {} hosts are selected ({}): pick one with --host NAME, or \
             run `llmctl status` without --watch for all of them",
            names.len(),
            names.join(", ")
        );
    }
    let members: Vec<Member> = members.iter().cloned().map(status_skip).collect();
    each_host(
        global,
        &members,
        preface,
        args.json,
        status_word,
        |member, bar| Ok(status_one(args, member, bar)),
    )
}

/// A member that is not reached (an offline cluster node) with the status document of a host that could not be
/// read, in place of doctor's that [`super::select`] gave it: `--json` is then one schema throughout.
fn status_skip(mut m: Member) -> Member {
    let vmid = m
        .config
        .section_or_default::<crate::config::HostSection>()
        .ok()
        .and_then(|h| h.vmid);
    if let Some(skip) = &mut m.skip {
        let why = skip
            .json
            .as_ref()
            .and_then(|j| j["error"].as_str())
            .unwrap_or(&skip.reason)
            .to_string();
        let json = crate::status::unreachable_json(&m.target, vmid, &why);
        skip.json = Some(named(json, &m.name));
    }
    m
}

/// The fleet's `outcome` in status's words: every host up, some host down, some host not read at all.
fn status_word(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Success => "up",
        Outcome::ProblemsFound => "down",
        Outcome::CouldNotRun => "unreachable",
    }
}

/// `json` with the member's `name` added (the fleet's documents name each host as the summary does).
fn named(mut json: serde_json::Value, name: &str) -> serde_json::Value {
    if let Some(obj) = json.as_object_mut() {
        obj.insert("name".into(), name.into());
    }
    json
}

/// status on one member, read with the member's own configuration (its target and vmid): its screen, its
/// summary line and its `--json` document. The ports are the ones its units name, as for one host.
fn status_one(
    args: &StatusArgs,
    member: &Member,
    bar: Option<&indicatif::ProgressBar>,
) -> HostReport {
    let remote = match args.target.resolve_one(&member.config, None) {
        Ok(r) => r,
        Err(e) => {
            let json = crate::status::unreachable_json(&member.target, None, &format!("{e:#}"));
            return HostReport {
                json: Some(named(json, &member.name)),
                ..HostReport::failed(&e, String::new())
            };
        }
    };
    if let Some(bar) = bar {
        bar.set_message(format!("{}: reading", member.target));
    }
    let read = remote
        .connect()
        .and_then(|t| crate::status::gather(t.as_ref(), remote.vmid));
    let s = match read {
        Ok(s) => s,
        Err(e) => {
            let json =
                crate::status::unreachable_json(&remote.host, remote.vmid, &format!("{e:#}"));
            return HostReport {
                json: Some(named(json, &member.name)),
                ..HostReport::failed(&e, String::new())
            };
        }
    };
    let (verdict, reason) = status_verdict(&s);
    HostReport {
        outcome: crate::status::outcome(&s),
        verdict,
        reason,
        block: crate::status::render_text(&s),
        json: Some(named(
            serde_json::to_value(&s).unwrap_or_default(),
            &member.name,
        )),
    }
}

/// A status's line in the summary: up, or down with its first problem (and how many more there are).
fn status_verdict(s: &Status) -> (Verdict, String) {
    match s.problems.as_slice() {
        [] => (Verdict::Up, String::new()),
        [one] => (Verdict::Down(1), one_line(one)),
        [first, rest @ ..] => (
            Verdict::Down(1 + rest.len()),
            format!("{} (+{} more)", one_line(first), rest.len()),
        ),
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
    // Proxies that are each other's peers share one key: read (or made) once, before the hosts run.
    let mut args = args.clone();
    if super::key::wanted(members) {
        args.shared_key = Some(super::key::shared(members, &args.ssh.options())?);
    }
    let args = &args;
    each_host(
        global,
        members,
        preface,
        false,
        outcome_word,
        |member, bar| Ok(provision_member(global, args, member, bar)),
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A status read from nothing, with the given problems.
    fn status(problems: &[&str]) -> Status {
        let mut s = crate::status::assess("root@pve", Some(103), &Default::default());
        s.problems = problems.iter().map(|p| p.to_string()).collect();
        s
    }

    #[test]
    fn a_status_reads_as_up_or_down_with_its_first_problem() {
        assert_eq!(status_verdict(&status(&[])), (Verdict::Up, String::new()));
        assert_eq!(
            status_verdict(&status(&[
                "llmctl-proxy is failed (`llmctl logs` shows why)"
            ])),
            (
                Verdict::Down(1),
                "llmctl-proxy is failed (`llmctl logs` shows why)".to_string()
            )
        );
        let long = "x".repeat(150);
        let (verdict, reason) = status_verdict(&status(&[&long, "b", "c"]));
        assert_eq!(verdict, Verdict::Down(3));
        // The count survives the cut of a long first problem.
        assert!(reason.ends_with("… (+2 more)"), "{reason}");
        assert_eq!(Verdict::Down(3).text(), "down, 3 problems");
        assert_eq!(Verdict::Down(1).text(), "down, 1 problem");
        assert_eq!(Verdict::Up.text(), "up");
    }

    #[test]
    fn an_offline_node_gets_the_status_document_of_an_unread_host() {
        let config = crate::config::ConfigFile::parse("[host]\nvmid = 103\n", None).unwrap();
        let mut m = Member::new("pve3", "root@pve3", config);
        m.skip = Some(super::super::not_reached(
            "pve3",
            "root@pve3",
            super::super::cluster::OFFLINE,
            "pve3 is offline in the cluster (.members)",
        ));
        let m = status_skip(m);
        let skip = m.skip.unwrap();
        assert_eq!(
            skip.json.unwrap(),
            serde_json::json!({
                "schema": crate::status::SCHEMA, "host": "root@pve3", "vmid": 103, "name": "pve3",
                "outcome": "unreachable", "error": "pve3 is offline in the cluster (.members)",
            })
        );
        assert_eq!(skip.verdict, Verdict::Unreachable);
    }

    #[test]
    fn the_fleets_status_document_names_each_host() {
        let e = "cannot reach root@127.0.0.1:1: connection refused";
        let json = named(
            crate::status::unreachable_json("root@127.0.0.1:1", Some(103), e),
            "gone",
        );
        assert_eq!(
            json,
            serde_json::json!({
                "schema": crate::status::SCHEMA, "host": "root@127.0.0.1:1", "vmid": 103, "name": "gone",
                "outcome": "unreachable", "error": "cannot reach root@127.0.0.1:1: connection refused",
            })
        );
        assert_eq!(
            [
                Outcome::Success,
                Outcome::ProblemsFound,
                Outcome::CouldNotRun
            ]
            .map(status_word),
            ["up", "down", "unreachable"]
        );
    }
}
