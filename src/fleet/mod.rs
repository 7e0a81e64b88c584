//! A fleet: several Proxmox hosts from `[[hosts]]` in llmctl.toml (or several `--host` flags), each reached
//! the way one host is. This module owns which hosts a command runs on ([`select`]), running it on them in
//! parallel ([`run`]: bounded, one SSH connection per host, one host failing never stopping the others), and
//! the summary table and exit code ([`summary`]). What a command does on one host stays in that command's
//! module; [`commands`] only calls it per host.
//!
//! One host, whether from `[host]`, one `--host` or an inventory of one, is not a fleet: the command runs as
//! it always has, printing straight through, without headings or a summary.

pub mod commands;

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::config::ConfigFile;
use crate::outcome::Outcome;

/// At most this many hosts at once: each holds an SSH connection and a thread while its command runs.
pub const PARALLEL: usize = 8;

/// One host of a fleet, with its whole configuration (the top level with its overrides, and `[host]`).
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub target: String,
    pub config: ConfigFile,
}

/// What a command runs on.
#[derive(Debug)]
pub enum Selection {
    /// One host, as before fleets: `config` is what the command reads (an inventory host's own), `host` the
    /// `--host` flag when it gives the target itself.
    One {
        config: ConfigFile,
        host: Option<String>,
    },
    /// Two or more hosts, in inventory order (or the order of the flags).
    Fleet(Vec<Member>),
}

/// The hosts `--host` (repeatable) and `--vmid` select. With `[[hosts]]`: each flag is a host's name, or its
/// target (every entry with that target); none selects every host. Without: one flag (or none) is the
/// one-host command it always was; several are an ad-hoc fleet, each named by its target, sharing the file.
pub fn select(file: &ConfigFile, flags: &[String], vmid: Option<u32>) -> Result<Selection> {
    let Some(entries) = file.inventory()? else {
        return Ok(match flags {
            [] | [_] => Selection::One {
                config: file.clone(),
                host: flags.first().cloned(),
            },
            _ => {
                let section: crate::config::HostSection = file.section_or_default()?;
                let vmid = vmid.or(section.vmid);
                let mut members: Vec<Member> = Vec::new();
                for target in flags {
                    if members.iter().any(|m| &m.target == target) {
                        continue;
                    }
                    members.push(Member {
                        name: target.clone(),
                        target: target.clone(),
                        config: file.for_member(target, target, vmid, &toml::Table::new()),
                    });
                }
                one_or_fleet(members)
            }
        });
    };
    let mut chosen = vec![flags.is_empty(); entries.len()];
    for flag in flags {
        let by_name = entries.iter().position(|e| &e.name == flag);
        let hits: Vec<usize> = match by_name {
            Some(i) => vec![i],
            None => (0..entries.len())
                .filter(|&i| &entries[i].target == flag)
                .collect(),
        };
        if hits.is_empty() {
            let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
            anyhow::bail!(
                "--host {flag}: no host of that name (or target) in {}'s [[hosts]]; its hosts are: {}",
                file.name(),
                names.join(", ")
            );
        }
        for i in hits {
            chosen[i] = true;
        }
    }
    let picked: Vec<&crate::config::InventoryEntry> = entries
        .iter()
        .zip(&chosen)
        .filter_map(|(e, &c)| c.then_some(e))
        .collect();
    if vmid.is_some() && picked.len() > 1 {
        anyhow::bail!(
            "--vmid picks one container and {} hosts are selected: set each host's vmid in its [[hosts]] \
             entry, or pick one host with --host NAME",
            picked.len()
        );
    }
    let members = picked
        .into_iter()
        .map(|e| Member {
            name: e.name.clone(),
            target: e.target.clone(),
            config: file.for_member(&e.name, &e.target, vmid.or(e.vmid), &e.overrides),
        })
        .collect();
    Ok(one_or_fleet(members))
}

fn one_or_fleet(mut members: Vec<Member>) -> Selection {
    if members.len() == 1 {
        let m = members.remove(0);
        return Selection::One {
            config: m.config,
            host: None,
        };
    }
    Selection::Fleet(members)
}

/// How one host's run ended, as the summary says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// doctor: nothing failed.
    Healthy,
    /// doctor: this many failures.
    Findings(usize),
    /// provision --plan / --check: this many steps would change something.
    ToChange(usize),
    /// provision: nothing to change (and, with --yes, nothing was).
    AsConfigured,
    /// provision --yes: this many steps changed the host.
    Changed(usize),
    /// provision: a step refused (the reason says why).
    Refused,
    /// The host could not be reached (connection refused, no route, timed out).
    Unreachable,
    /// The command failed on this host after reaching it, or before (its configuration).
    Error,
}

impl Verdict {
    pub fn text(&self) -> String {
        let n =
            |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        match self {
            Verdict::Healthy => "healthy".into(),
            Verdict::Findings(k) => n(*k, "finding", "findings"),
            Verdict::ToChange(k) => format!("{k} to change"),
            Verdict::AsConfigured => "as configured".into(),
            Verdict::Changed(k) => format!("changed ({k})"),
            Verdict::Refused => "refused".into(),
            Verdict::Unreachable => "unreachable".into(),
            Verdict::Error => "error".into(),
        }
    }
}

/// One host's result: its report (what the command prints for one host), and its line in the summary.
#[derive(Debug, Clone)]
pub struct HostReport {
    pub outcome: Outcome,
    pub verdict: Verdict,
    /// One line: why (the first failure, the error); empty when there is nothing to say.
    pub reason: String,
    /// The host's whole output, printed under its heading.
    pub block: String,
    /// The host's machine-readable report (doctor --json).
    pub json: Option<serde_json::Value>,
}

impl HostReport {
    /// A host the command failed on: unreachable when the transport said so, else an error.
    pub fn failed(err: &anyhow::Error, block: String) -> HostReport {
        let unreachable = err.chain().any(|c| {
            matches!(
                c.downcast_ref::<crate::transport::TransportError>(),
                Some(crate::transport::TransportError::Unreachable { .. })
            )
        });
        let mut block = block;
        block.push_str(&format!("error: {err:#}\n"));
        HostReport {
            outcome: Outcome::CouldNotRun,
            verdict: if unreachable {
                Verdict::Unreachable
            } else {
                Verdict::Error
            },
            reason: one_line(&format!("{err:#}")),
            block,
            json: None,
        }
    }
}

/// The first line of `text`, at most 100 characters: a reason in the summary table.
pub fn one_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default().trim();
    match line.char_indices().nth(100) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

/// Runs `job` on every member, at most [`PARALLEL`] at once, and hands each result to `done` in member order,
/// as soon as it and every member before it have finished (so blocks come out whole and in a stable order).
/// With `progress`, a line per host on stderr shows it running, then its verdict. A job's error is that host's
/// result ([`HostReport::failed`]); the others carry on.
pub fn run<J, D>(members: &[Member], progress: bool, job: J, mut done: D) -> Vec<HostReport>
where
    J: Fn(&Member, Option<&ProgressBar>) -> Result<HostReport> + Sync,
    D: FnMut(&Member, &HostReport) + Send,
{
    let multi = progress.then(MultiProgress::new);
    let bars: Vec<Option<ProgressBar>> = members
        .iter()
        .map(|m| {
            multi.as_ref().map(|multi| {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {prefix:.bold} {wide_msg:.dim}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.set_prefix(m.name.clone());
                bar.set_message(format!("{}: connecting", m.target));
                bar.enable_steady_tick(Duration::from_millis(120));
                bar
            })
        })
        .collect();
    struct Ordered<D> {
        slots: Vec<Option<HostReport>>,
        next: usize,
        done: D,
    }
    let state = Mutex::new(Ordered {
        slots: vec![None; members.len()],
        next: 0,
        done: &mut done,
    });
    let next_job = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL.min(members.len()) {
            scope.spawn(|| {
                loop {
                    let i = next_job.fetch_add(1, Ordering::SeqCst);
                    let Some(member) = members.get(i) else { break };
                    let bar = bars[i].as_ref();
                    let report =
                        job(member, bar).unwrap_or_else(|e| HostReport::failed(&e, String::new()));
                    if let Some(bar) = bar {
                        bar.set_message(report.verdict.text());
                        bar.finish();
                    }
                    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                    st.slots[i] = Some(report);
                    // Everything finished up to here in member order goes out now, whole.
                    while st.next < members.len() {
                        let k = st.next;
                        let Some(report) = st.slots[k].clone() else {
                            break;
                        };
                        match &multi {
                            Some(multi) => multi.suspend(|| (st.done)(&members[k], &report)),
                            None => (st.done)(&members[k], &report),
                        }
                        st.next += 1;
                    }
                }
            });
        }
    });
    if let Some(multi) = &multi {
        let _ = multi.clear();
    }
    state
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .slots
        .into_iter()
        .map(|r| r.expect("every member ran"))
        .collect()
}

/// The heading a host's block is printed under.
pub fn heading(member: &Member) -> String {
    if member.name == member.target {
        format!("=== {} ===\n", member.name)
    } else {
        format!("=== {} ({}) ===\n", member.name, member.target)
    }
}

/// The worst outcome of the fleet (its exit code), `Success` for none.
pub fn worst(outcomes: impl IntoIterator<Item = Outcome>) -> Outcome {
    outcomes
        .into_iter()
        .max_by_key(|o| o.severity())
        .unwrap_or(Outcome::Success)
}

/// The summary: one row per host (name, target, outcome, reason) in member order, then the exit code and the
/// hosts that gave it.
pub fn summary(rows: &[(&Member, &HostReport)]) -> String {
    let head = ["host", "target", "outcome", "reason"];
    let cells: Vec<[String; 4]> = rows
        .iter()
        .map(|(m, r)| {
            [
                m.name.clone(),
                m.target.clone(),
                r.verdict.text(),
                r.reason.clone(),
            ]
        })
        .collect();
    let width = |c: usize| {
        cells
            .iter()
            .map(|row| row[c].chars().count())
            .chain([head[c].len()])
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2) = (width(0), width(1), width(2));
    let line = |row: [&str; 4]| {
        format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {}",
            row[0], row[1], row[2], row[3]
        )
        .trim_end()
        .to_string()
            + "\n"
    };
    let mut out = line(head);
    for row in &cells {
        out.push_str(&line([&row[0], &row[1], &row[2], &row[3]]));
    }
    let worst = worst(rows.iter().map(|(_, r)| r.outcome));
    let culprits: Vec<String> = rows
        .iter()
        .filter(|(_, r)| r.outcome == worst)
        .map(|(m, r)| format!("{} ({})", m.name, r.verdict.text()))
        .collect();
    out.push('\n');
    out.push_str(&match worst {
        Outcome::Success => "exit 0 (success)\n".to_string(),
        Outcome::ProblemsFound => format!("exit 1 (problems found): {}\n", culprits.join(", ")),
        Outcome::CouldNotRun => format!("exit 2 (could not run): {}\n", culprits.join(", ")),
    });
    out
}

/// Writes a finished host's block under its heading (a blank line before every host but the first).
pub fn print_block(
    out: &mut dyn Write,
    first: bool,
    member: &Member,
    report: &HostReport,
) -> std::io::Result<()> {
    if !first {
        writeln!(out)?;
    }
    out.write_all(heading(member).as_bytes())?;
    out.write_all(report.block.as_bytes())?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> ConfigFile {
        ConfigFile::parse(text, Some("lab.toml".into())).unwrap()
    }

    const INVENTORY: &str = "[[hosts]]\nname = \"a\"\ntarget = \"root@10.0.0.1\"\nvmid = 103\n\
        [[hosts]]\nname = \"b\"\ntarget = \"root@10.0.0.2\"\nvmid = 104\n\
        [[hosts]]\nname = \"c\"\ntarget = \"root@10.0.0.3\"\n";

    fn names(s: &Selection) -> Vec<String> {
        match s {
            Selection::One { config, host } => {
                let h: crate::config::HostSection = config.section_or_default().unwrap();
                vec![format!("one:{:?}:{:?}", host, h.target)]
            }
            Selection::Fleet(m) => m.iter().map(|m| m.name.clone()).collect(),
        }
    }

    fn flags(f: &[&str]) -> Vec<String> {
        f.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn no_flag_selects_every_host_in_inventory_order() {
        let s = select(&file(INVENTORY), &[], None).unwrap();
        assert_eq!(names(&s), ["a", "b", "c"]);
    }

    #[test]
    fn flags_select_by_name_or_target_in_inventory_order() {
        let s = select(&file(INVENTORY), &flags(&["c", "root@10.0.0.1"]), None).unwrap();
        assert_eq!(names(&s), ["a", "c"]);
        // One selected host is the one-host command, with that host's configuration.
        let s = select(&file(INVENTORY), &flags(&["b"]), None).unwrap();
        assert_eq!(names(&s), ["one:None:Some(\"root@10.0.0.2\")"]);
        // --vmid with one host overrides its vmid.
        let Selection::One { config, .. } =
            select(&file(INVENTORY), &flags(&["b"]), Some(200)).unwrap()
        else {
            panic!("one host")
        };
        let h: crate::config::HostSection = config.section_or_default().unwrap();
        assert_eq!(h.vmid, Some(200));
    }

    #[test]
    fn an_unknown_name_lists_the_hosts() {
        let e = select(&file(INVENTORY), &flags(&["d"]), None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--host d: no host of that name (or target) in lab.toml's [[hosts]]; its hosts are: a, b, c"
        );
        let e = select(&file(INVENTORY), &[], Some(103))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--vmid picks one container and 3 hosts are selected"),
            "{e}"
        );
    }

    #[test]
    fn without_an_inventory_one_flag_is_one_host_and_several_are_a_fleet() {
        let f = file("[host]\ntarget = \"root@pve\"\nvmid = 103\n");
        assert_eq!(
            names(&select(&f, &[], None).unwrap()),
            ["one:None:Some(\"root@pve\")"]
        );
        assert_eq!(
            names(&select(&f, &flags(&["local"]), None).unwrap()),
            ["one:Some(\"local\"):Some(\"root@pve\")"]
        );
        let s = select(&f, &flags(&["root@x", "root@y", "root@x"]), None).unwrap();
        assert_eq!(names(&s), ["root@x", "root@y"]);
        let Selection::Fleet(m) = s else { panic!() };
        let h: crate::config::HostSection = m[1].config.section_or_default().unwrap();
        assert_eq!((h.target.as_deref(), h.vmid), (Some("root@y"), Some(103)));
    }

    fn member(name: &str, target: &str) -> Member {
        Member {
            name: name.into(),
            target: target.into(),
            config: ConfigFile::default(),
        }
    }

    fn report(outcome: Outcome, verdict: Verdict, reason: &str) -> HostReport {
        HostReport {
            outcome,
            verdict,
            reason: reason.into(),
            block: String::new(),
            json: None,
        }
    }

    #[test]
    fn the_summary_names_every_host_and_the_worst() {
        let (a, b, c) = (
            member("pve1", "root@10.0.0.1"),
            member("pascal", "root@10.0.0.2"),
            member("gone", "root@127.0.0.1:1"),
        );
        let (ra, rb, rc) = (
            report(Outcome::Success, Verdict::Healthy, ""),
            report(
                Outcome::ProblemsFound,
                Verdict::Findings(1),
                "ct.resolv-immutable",
            ),
            report(
                Outcome::CouldNotRun,
                Verdict::Unreachable,
                "cannot reach root@127.0.0.1:1: connection refused",
            ),
        );
        assert_eq!(
            summary(&[(&a, &ra), (&b, &rb), (&c, &rc)]),
            "host    target            outcome      reason\n\
             pve1    root@10.0.0.1     healthy\n\
             pascal  root@10.0.0.2     1 finding    ct.resolv-immutable\n\
             gone    root@127.0.0.1:1  unreachable  cannot reach root@127.0.0.1:1: connection refused\n\
             \n\
             exit 2 (could not run): gone (unreachable)\n"
        );
        assert!(
            summary(&[(&a, &ra), (&b, &rb)])
                .ends_with("exit 1 (problems found): pascal (1 finding)\n")
        );
        assert!(summary(&[(&a, &ra)]).ends_with("exit 0 (success)\n"));
        assert_eq!(worst([]), Outcome::Success);
    }

    #[test]
    fn verdicts_read_as_words() {
        assert_eq!(Verdict::Findings(2).text(), "2 findings");
        assert_eq!(Verdict::ToChange(3).text(), "3 to change");
        assert_eq!(Verdict::Changed(4).text(), "changed (4)");
        assert_eq!(one_line("first\nsecond"), "first");
        assert_eq!(one_line(&"x".repeat(150)).chars().count(), 101);
    }

    /// Results come back in member order whatever order the hosts finish in; a failing host is reported and
    /// the others still run.
    #[test]
    fn run_keeps_member_order_and_a_failure_stops_nothing() {
        let members: Vec<Member> = (0..12).map(|i| member(&format!("h{i}"), "t")).collect();
        let printed = Mutex::new(Vec::new());
        let reports = run(
            &members,
            false,
            |m, _| {
                let i: u64 = m.name[1..].parse().unwrap();
                // Later hosts finish first.
                std::thread::sleep(Duration::from_millis(60 - 5 * i));
                if i == 3 {
                    anyhow::bail!("boom on {}", m.name);
                }
                Ok(report(Outcome::Success, Verdict::Healthy, ""))
            },
            |m, _| printed.lock().unwrap().push(m.name.clone()),
        );
        let want: Vec<String> = (0..12).map(|i| format!("h{i}")).collect();
        assert_eq!(*printed.lock().unwrap(), want);
        assert_eq!(reports.len(), 12);
        assert_eq!(reports[3].verdict, Verdict::Error);
        assert_eq!(reports[3].reason, "boom on h3");
        assert_eq!(reports[3].outcome, Outcome::CouldNotRun);
        assert!(
            reports
                .iter()
                .enumerate()
                .all(|(i, r)| i == 3 || r.verdict == Verdict::Healthy)
        );
    }
}
