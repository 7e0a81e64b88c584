//! A fleet: several Proxmox hosts from `[[hosts]]` in llmctl.toml (or several `--host` flags), each reached
//! the way one host is. This module owns which hosts a command runs on ([`select`]), running it on them in
//! parallel ([`run`]: bounded, one SSH connection per host, one host failing never stopping the others), and
//! the summary table and exit code ([`summary`]). What a command does on one host stays in that command's
//! module; [`commands`] only calls it per host.
//!
//! The hosts are `[[hosts]]`'s entries and, with `[cluster]`, the nodes of a Proxmox VE cluster, found through
//! one of them ([`cluster`]); both are members alike.
//!
//! One host, whether from `[host]`, one `--host` or an inventory of one, is not a fleet: the command runs as
//! it always has, printing straight through, without headings or a summary.

pub mod cluster;
pub mod commands;
pub mod key;

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
    /// Said at the top of the member's report (a cluster node's container runs on another node).
    pub notes: Vec<String>,
    /// The member's result without running anything (a cluster node that is offline).
    pub skip: Option<HostReport>,
}

impl Member {
    fn new(name: &str, target: &str, config: ConfigFile) -> Member {
        Member {
            name: name.to_string(),
            target: target.to_string(),
            config,
            notes: Vec::new(),
            skip: None,
        }
    }
}

/// What a command runs on.
#[derive(Debug)]
pub enum Selection {
    /// One host, as before fleets: `config` is what the command reads (an inventory host's own), `host` the
    /// `--host` flag when it gives the target itself.
    /// `notes`: what the member's report would say first (printed on stderr).
    One {
        config: ConfigFile,
        host: Option<String>,
        notes: Vec<String>,
        /// Every host of the inventory when this one's proxy has peers (`upstreams = "fleet"`): the fleet's
        /// one key is theirs ([`key`]), so one host alone is judged and provisioned as in the fleet's run.
        fleet: Vec<Member>,
    },
    /// Two or more hosts, in inventory order (or the order of the flags), then the cluster's nodes; `preface`
    /// is printed before the per-host reports (the cluster line).
    Fleet {
        members: Vec<Member>,
        preface: Option<String>,
    },
}

/// [`choose`], after discovering the cluster of `[cluster]` (one SSH connection to its node, with `ssh`).
/// One host selected from a cluster: the cluster line and the host's notes go to stderr, as the one-host
/// command's output stays as it always was.
pub fn select(
    file: &ConfigFile,
    flags: &[String],
    vmid: Option<u32>,
    ssh: &crate::transport::SshOptions,
) -> Result<Selection> {
    let discovered = match file.cluster()? {
        Some(c) => Some(cluster::discover(file, &c, ssh)?),
        None => None,
    };
    let selection = choose(file, flags, vmid, discovered.as_ref())?;
    if let (Selection::One { notes, .. }, Some(d)) = (&selection, &discovered) {
        eprintln!("{}", d.line());
        for note in notes {
            eprintln!("note: {note}");
        }
    }
    Ok(selection)
}

/// A host the selection picks from: an inventory entry or a cluster node.
struct Candidate {
    name: String,
    target: String,
    vmid: Option<u32>,
    overrides: toml::Table,
    /// Where its settings are written (messages).
    entry: String,
    notes: Vec<String>,
    skip: Option<HostReport>,
}

/// The report of a member that is not reached: unreachable, and why.
fn not_reached(name: &str, target: &str, reason: &str, why: &str) -> HostReport {
    HostReport {
        outcome: Outcome::CouldNotRun,
        verdict: Verdict::Unreachable,
        reason: reason.to_string(),
        block: format!("error: {why}\n"),
        json: Some(serde_json::json!({
            "name": name, "host": target, "outcome": "could-not-run", "error": why, "findings": [],
        })),
    }
}

/// The hosts `--host` (repeatable) and `--vmid` select. With `[[hosts]]`: each flag is a host's name, or its
/// target (every entry with that target); none selects every host. Without: one flag (or none) is the
/// one-host command it always was; several are an ad-hoc fleet, each named by its target, sharing the file.
/// With `[cluster]`, its nodes (`discovered`) are hosts after the inventory's, selected the same way.
pub fn choose(
    file: &ConfigFile,
    flags: &[String],
    vmid: Option<u32>,
    discovered: Option<&cluster::Discovered>,
) -> Result<Selection> {
    let inventory = file.inventory()?;
    if inventory.is_none() && discovered.is_none() {
        return Ok(match flags {
            [] | [_] => Selection::One {
                config: file.clone(),
                host: flags.first().cloned(),
                notes: Vec::new(),
                fleet: Vec::new(),
            },
            _ => {
                let section: crate::config::HostSection = file.section_or_default()?;
                let vmid = vmid.or(section.vmid);
                let mut members: Vec<Member> = Vec::new();
                for target in flags {
                    if members.iter().any(|m| &m.target == target) {
                        continue;
                    }
                    let config = file
                        .for_member(target, target, vmid, &toml::Table::new())
                        .with_entry("[host]");
                    members.push(Member::new(target, target, config));
                }
                one_or_fleet(members, None)
            }
        });
    }
    let has_inventory = inventory.is_some();
    let mut entries: Vec<Candidate> = inventory
        .unwrap_or_default()
        .into_iter()
        .map(|e| Candidate {
            entry: format!("the [[hosts]] entry named {:?}", e.name),
            name: e.name,
            target: e.target,
            vmid: e.vmid,
            overrides: e.overrides,
            notes: Vec::new(),
            skip: None,
        })
        .collect();
    if let Some(d) = discovered {
        for m in &d.members {
            if entries.iter().any(|e| e.name == m.name) {
                anyhow::bail!(
                    "{}: [[hosts]] {:?} has the name of cluster {}'s node {}; give the [[hosts]] entry another \
                     name (--host and the summary name one host)",
                    file.name(),
                    m.name,
                    d.name,
                    m.name
                );
            }
            entries.push(Candidate {
                name: m.name.clone(),
                target: m.target.clone(),
                vmid: m.vmid,
                overrides: m.overrides.clone(),
                entry: crate::config::NodeEntry::header(&m.name),
                notes: m.notes.clone(),
                skip: m
                    .offline
                    .as_deref()
                    .map(|why| not_reached(&m.name, &m.target, cluster::OFFLINE, why)),
            });
        }
    }
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
            let place = match (has_inventory, discovered) {
                (true, None) => format!("{}'s [[hosts]]", file.name()),
                (false, Some(d)) => format!("cluster {}", d.name),
                (_, Some(d)) => format!("{}'s [[hosts]] or cluster {}", file.name(), d.name),
                (false, None) => file.name(),
            };
            anyhow::bail!(
                "--host {flag}: no host of that name (or target) in {place}; its hosts are: {}",
                names.join(", ")
            );
        }
        for i in hits {
            chosen[i] = true;
        }
    }
    // Every host's configuration, the unselected too: what a host's proxy routes to depends on the others.
    let configs: Vec<ConfigFile> = entries
        .iter()
        .map(|e| {
            file.for_member(&e.name, &e.target, vmid.or(e.vmid), &e.overrides)
                .with_entry(e.entry.clone())
        })
        .collect();
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    let configs = with_fleet_peers(file, &names, configs)?;
    let all: Vec<Member> = entries
        .into_iter()
        .zip(configs)
        .map(|(e, config)| Member {
            config,
            name: e.name,
            target: e.target,
            notes: e.notes,
            skip: e.skip,
        })
        .collect();
    let picked: Vec<Member> = all
        .iter()
        .zip(&chosen)
        .filter(|(_, c)| **c)
        .map(|(m, _)| m.clone())
        .collect();
    if vmid.is_some() && picked.len() > 1 {
        anyhow::bail!(
            "--vmid picks one container and {} hosts are selected: set each host's vmid in its [[hosts]] \
             entry (or [cluster.nodes.<name>]), or pick one host with --host NAME",
            picked.len()
        );
    }
    let mut selection = one_or_fleet(picked, discovered.map(|d| d.line()));
    // One host whose proxy has peers is still judged and provisioned against the fleet's one key.
    if let Selection::One { fleet, .. } = &mut selection
        && key::wanted(&all)
    {
        *fleet = all;
    }
    Ok(selection)
}

/// `[proxy] upstreams = "fleet"` on a host: its proxy's peers are every other host's proxy (`[proxy] peers`,
/// set here, in each such host's configuration). Derived from the configuration alone, never from what a host
/// answers, so the proxy unit of a host is the same whichever hosts a command selects or reaches (one host's
/// `provision --check` agrees with the fleet's). A host whose proxy the others cannot be told how to reach
/// (no static address, a proxy on 127.0.0.1) is an error that names it.
fn with_fleet_peers(
    file: &ConfigFile,
    names: &[&str],
    configs: Vec<ConfigFile>,
) -> Result<Vec<ConfigFile>> {
    use crate::config::{ContainerSection, ProxySection};
    // Sections that do not parse are left to the command, which reports them with their fields.
    let proxies: Vec<Option<ProxySection>> = configs
        .iter()
        .map(|c| c.section_or_default::<ProxySection>().ok())
        .collect();
    let fleet = |p: &Option<ProxySection>| {
        p.as_ref()
            .and_then(|p| p.upstreams.as_ref())
            .is_some_and(|u| u.is_fleet())
    };
    if !proxies.iter().any(fleet) {
        return Ok(configs);
    }
    let urls: Vec<std::result::Result<String, String>> = configs
        .iter()
        .zip(&proxies)
        .map(|(c, p)| {
            let container = c
                .section_or_default::<ContainerSection>()
                .map_err(|e| format!("{e:#}"))?;
            crate::provision::config::proxy_url(&container, &p.clone().unwrap_or_default())
        })
        .collect();
    let mut out = Vec::with_capacity(configs.len());
    for (i, config) in configs.into_iter().enumerate() {
        if !fleet(&proxies[i]) {
            out.push(config);
            continue;
        }
        if proxies[i].as_ref().is_some_and(|p| p.peers.is_some()) {
            anyhow::bail!(
                "{}: host {} sets both [proxy] upstreams = \"fleet\" and [proxy] peers: keep one (\"fleet\" \
                 makes every other host's proxy a peer)",
                file.name(),
                names[i]
            );
        }
        let mut peers = Vec::new();
        for (j, url) in urls.iter().enumerate() {
            if j == i {
                continue;
            }
            match url {
                Ok(u) => peers.push(toml::Value::String(u.clone())),
                Err(why) => anyhow::bail!(
                    "{}: [proxy] upstreams = \"fleet\" on {} routes to every other host's proxy, and host {} \
                     cannot be reached: {why}",
                    file.name(),
                    names[i],
                    names[j]
                ),
            }
        }
        out.push(config.with_value("proxy", "peers", toml::Value::Array(peers)));
    }
    Ok(out)
}

/// One member is the one-host command, unless it is not to be reached at all (an offline cluster node): then
/// it is a fleet of one, so its report and the summary say why.
fn one_or_fleet(mut members: Vec<Member>, preface: Option<String>) -> Selection {
    if members.len() == 1 && members[0].skip.is_none() {
        let m = members.remove(0);
        return Selection::One {
            config: m.config,
            host: None,
            notes: m.notes,
            fleet: Vec::new(),
        };
    }
    Selection::Fleet { members, preface }
}

/// `f` of every member, in parallel (at most [`PARALLEL`] at once), in member order: for reads that every host
/// must finish before any is judged (doctor's facts when the hosts' proxies share a key).
pub fn par_map<T: Send, F>(members: &[Member], f: F) -> Vec<T>
where
    F: Fn(&Member) -> T + Sync,
{
    let next = AtomicUsize::new(0);
    let out: Vec<Mutex<Option<T>>> = members.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL.min(members.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(m) = members.get(i) else { break };
                    let value = f(m);
                    *out[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
                }
            });
        }
    });
    out.into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every member mapped")
        })
        .collect()
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
    /// status: everything up.
    Up,
    /// status: this many problems (the reason is the first).
    Down(usize),
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
            Verdict::Up => "up".into(),
            Verdict::Down(k) => format!("down, {}", n(*k, "problem", "problems")),
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
    // Members with one target (two containers on one node) run one after the other: a node's packages and
    // its /etc/pve are changed by one run at a time.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, m) in members.iter().enumerate() {
        match groups.iter_mut().find(|g| members[g[0]].target == m.target) {
            Some(g) => g.push(i),
            None => groups.push(vec![i]),
        }
    }
    let next_group = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL.min(groups.len()) {
            scope.spawn(|| {
                loop {
                    let g = next_group.fetch_add(1, Ordering::SeqCst);
                    let Some(group) = groups.get(g) else { break };
                    for &i in group {
                        let member = &members[i];
                        let bar = bars[i].as_ref();
                        let mut report = match &member.skip {
                            Some(report) => report.clone(),
                            None => job(member, bar)
                                .unwrap_or_else(|e| HostReport::failed(&e, String::new())),
                        };
                        if !member.notes.is_empty() {
                            let notes: String = member
                                .notes
                                .iter()
                                .map(|n| format!("note: {n}\n"))
                                .collect();
                            report.block = format!("{notes}\n{}", report.block);
                            if report.reason.is_empty() {
                                report.reason = one_line(&member.notes[0]);
                            }
                        }
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

    #[test]
    fn fleet_upstreams_make_every_other_hosts_proxy_a_peer_whatever_is_selected() {
        let f = file(
            "[proxy]\nupstreams = \"fleet\"\n\
             [[hosts]]\nname = \"a\"\ntarget = \"root@10.0.0.1\"\nvmid = 103\n\
             [hosts.container]\nnet0 = \"name=eth0,bridge=vmbr0,ip=192.168.1.50/24\"\n\
             [[hosts]]\nname = \"b\"\ntarget = \"root@10.0.0.2\"\nvmid = 104\n\
             [hosts.proxy]\nurl = \"http://llm-b.lan:4000\"\n",
        );
        let peers = |c: &ConfigFile| -> Vec<String> {
            let p: crate::config::ProxySection = c.section_or_default().unwrap();
            p.peers.unwrap()
        };
        let Selection::Fleet { members, .. } = choose(&f, &[], None, None).unwrap() else {
            panic!("two hosts are a fleet");
        };
        assert_eq!(peers(&members[0].config), ["http://llm-b.lan:4000"]);
        assert_eq!(peers(&members[1].config), ["http://192.168.1.50:4000"]);
        // One host selected: the same peers, so its proxy unit is the fleet's.
        let Selection::One { config, .. } = choose(&f, &flags(&["b"]), None, None).unwrap() else {
            panic!("one host");
        };
        assert_eq!(peers(&config), ["http://192.168.1.50:4000"]);
        // A host the others cannot reach is named, with the fix.
        let f = file(
            "[proxy]\nupstreams = \"fleet\"\n\
             [[hosts]]\nname = \"a\"\ntarget = \"root@10.0.0.1\"\nvmid = 103\n\
             [[hosts]]\nname = \"b\"\ntarget = \"root@10.0.0.2\"\nvmid = 104\n",
        );
        let e = choose(&f, &[], None, None).unwrap_err().to_string();
        assert!(
            e.contains("host b cannot be reached") && e.contains("ip=dhcp"),
            "{e}"
        );
    }

    fn file(text: &str) -> ConfigFile {
        ConfigFile::parse(text, Some("lab.toml".into())).unwrap()
    }

    const INVENTORY: &str = "[[hosts]]\nname = \"a\"\ntarget = \"root@10.0.0.1\"\nvmid = 103\n\
        [[hosts]]\nname = \"b\"\ntarget = \"root@10.0.0.2\"\nvmid = 104\n\
        [[hosts]]\nname = \"c\"\ntarget = \"root@10.0.0.3\"\n";

    fn names(s: &Selection) -> Vec<String> {
        match s {
            Selection::One { config, host, .. } => {
                let h: crate::config::HostSection = config.section_or_default().unwrap();
                vec![format!("one:{:?}:{:?}", host, h.target)]
            }
            Selection::Fleet { members, .. } => members.iter().map(|m| m.name.clone()).collect(),
        }
    }

    fn flags(f: &[&str]) -> Vec<String> {
        f.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn no_flag_selects_every_host_in_inventory_order() {
        let s = choose(&file(INVENTORY), &[], None, None).unwrap();
        assert_eq!(names(&s), ["a", "b", "c"]);
    }

    #[test]
    fn flags_select_by_name_or_target_in_inventory_order() {
        let s = choose(
            &file(INVENTORY),
            &flags(&["c", "root@10.0.0.1"]),
            None,
            None,
        )
        .unwrap();
        assert_eq!(names(&s), ["a", "c"]);
        // One selected host is the one-host command, with that host's configuration.
        let s = choose(&file(INVENTORY), &flags(&["b"]), None, None).unwrap();
        assert_eq!(names(&s), ["one:None:Some(\"root@10.0.0.2\")"]);
        // --vmid with one host overrides its vmid.
        let Selection::One { config, .. } =
            choose(&file(INVENTORY), &flags(&["b"]), Some(200), None).unwrap()
        else {
            panic!("one host")
        };
        let h: crate::config::HostSection = config.section_or_default().unwrap();
        assert_eq!(h.vmid, Some(200));
    }

    #[test]
    fn an_unknown_name_lists_the_hosts() {
        let e = choose(&file(INVENTORY), &flags(&["d"]), None, None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--host d: no host of that name (or target) in lab.toml's [[hosts]]; its hosts are: a, b, c"
        );
        let e = choose(&file(INVENTORY), &[], Some(103), None)
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
            names(&choose(&f, &[], None, None).unwrap()),
            ["one:None:Some(\"root@pve\")"]
        );
        assert_eq!(
            names(&choose(&f, &flags(&["local"]), None, None).unwrap()),
            ["one:Some(\"local\"):Some(\"root@pve\")"]
        );
        let s = choose(&f, &flags(&["root@x", "root@y", "root@x"]), None, None).unwrap();
        assert_eq!(names(&s), ["root@x", "root@y"]);
        let Selection::Fleet { members: m, .. } = s else {
            panic!()
        };
        let h: crate::config::HostSection = m[1].config.section_or_default().unwrap();
        assert_eq!((h.target.as_deref(), h.vmid), (Some("root@y"), Some(103)));
    }

    /// The reference's cluster (pve3 offline), with pve2's container 104 running on pve1.
    fn lab() -> (ConfigFile, cluster::Discovered) {
        let f = file(
            "[cluster]\nnode = \"root@10.0.0.11\"\n[cluster.nodes.pve1]\nvmid = 103\n\
             [cluster.nodes.pve2]\nvmid = 104\n[cluster.nodes.pve2.server]\ncontext = 8192\n\
             [[hosts]]\nname = \"old\"\ntarget = \"root@10.0.0.50\"\nvmid = 110\n",
        );
        let vmlist =
            r#"{"version": 3, "ids": {"104": {"node": "pve1", "type": "lxc", "version": 1}}}"#;
        let d = cluster::cluster_members(
            &f.cluster().unwrap().unwrap(),
            &crate::pve::cluster::parse_members(crate::pve::cluster::EXAMPLE_MEMBERS).unwrap(),
            &crate::pve::cluster::parse_vmlist(vmlist).unwrap(),
        )
        .unwrap();
        (f, d)
    }

    #[test]
    fn a_clusters_nodes_are_hosts_after_the_inventorys() {
        let (f, d) = lab();
        let Selection::Fleet { members, preface } = choose(&f, &[], None, Some(&d)).unwrap() else {
            panic!("a fleet")
        };
        assert_eq!(
            preface.as_deref(),
            Some(
                "cluster lab: 3 nodes (pve1, pve2, pve3 offline), discovered through root@10.0.0.11"
            )
        );
        let rows: Vec<(&str, &str)> = members
            .iter()
            .map(|m| (m.name.as_str(), m.target.as_str()))
            .collect();
        assert_eq!(
            rows,
            [
                ("old", "root@10.0.0.50"),
                ("pve1", "root@10.0.0.11"),
                ("pve2", "root@10.0.0.11"),
                ("pve3", "root@pve3"),
            ]
        );
        // Each node's configuration: its vmid and its overrides, its settings named for messages.
        let pve2 = &members[2];
        let h: crate::config::HostSection = pve2.config.section_or_default().unwrap();
        assert_eq!(
            (h.target.as_deref(), h.vmid),
            (Some("root@10.0.0.11"), Some(104))
        );
        let server: crate::config::ServerSection = pve2.config.section_or_default().unwrap();
        assert_eq!(server.context, 8192);
        assert_eq!(pve2.config.entry(), Some("[cluster.nodes.pve2]"));
        assert_eq!(pve2.config.name(), "lab.toml (host pve2)");
        assert!(pve2.notes[0].contains("runs on pve1"), "{:?}", pve2.notes);
        let pve3 = members[3].skip.as_ref().expect("pve3 is not reached");
        assert_eq!(
            (pve3.verdict.clone(), pve3.reason.as_str(), pve3.outcome),
            (
                Verdict::Unreachable,
                "offline in the cluster (.members)",
                Outcome::CouldNotRun
            )
        );
        let h: crate::config::HostSection = members[3].config.section_or_default().unwrap();
        assert_eq!(h.vmid, None);
    }

    #[test]
    fn host_flags_select_cluster_nodes_as_inventory_hosts() {
        let (f, d) = lab();
        // One node is the one-host command, with its notes.
        let Selection::One { config, notes, .. } =
            choose(&f, &flags(&["pve2"]), None, Some(&d)).unwrap()
        else {
            panic!("one host")
        };
        let h: crate::config::HostSection = config.section_or_default().unwrap();
        assert_eq!(
            (h.target.as_deref(), h.vmid),
            (Some("root@10.0.0.11"), Some(104))
        );
        assert_eq!(notes.len(), 1);
        // An offline node alone is still a fleet: its report and the summary say why.
        let s = choose(&f, &flags(&["pve3"]), None, Some(&d)).unwrap();
        assert!(matches!(&s, Selection::Fleet { members, .. } if members.len() == 1));
        assert_eq!(
            names(&choose(&f, &flags(&["pve1", "old"]), None, Some(&d)).unwrap()),
            ["old", "pve1"]
        );
        let e = choose(&f, &flags(&["pve9"]), None, Some(&d))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--host pve9: no host of that name (or target) in lab.toml's [[hosts]] or cluster lab; its hosts \
             are: old, pve1, pve2, pve3"
        );
        // A [[hosts]] name that a discovered node has too.
        let f = file(
            "[cluster]\nnode = \"root@10.0.0.11\"\n[[hosts]]\nname = \"pve2\"\ntarget = \"root@x\"\n",
        );
        let e = choose(&f, &[], None, Some(&d)).unwrap_err().to_string();
        assert!(
            e.starts_with("lab.toml: [[hosts]] \"pve2\" has the name of cluster lab's node pve2"),
            "{e}"
        );
    }

    /// A member that is not reached is reported without running; notes head the report; members with one
    /// target run one after the other.
    #[test]
    fn run_skips_the_unreached_and_serializes_one_target() {
        let mut members: Vec<Member> = ["a", "b", "c"]
            .iter()
            .map(|n| member(n, "root@same"))
            .collect();
        members.push(member("off", "root@off"));
        members[3].skip = Some(not_reached(
            "off",
            "root@off",
            cluster::OFFLINE,
            "off is offline",
        ));
        members[1].notes = vec!["CT 104 runs on pve1".into()];
        let running = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let reports = run(
            &members,
            false,
            |m, _| {
                assert_ne!(m.name, "off", "an offline member is not run");
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(report(Outcome::Success, Verdict::Healthy, ""))
            },
            |_, _| {},
        );
        assert_eq!(
            most.load(Ordering::SeqCst),
            1,
            "one target, one run at a time"
        );
        assert_eq!(reports[3].verdict, Verdict::Unreachable);
        assert_eq!(reports[3].block, "error: off is offline\n");
        assert_eq!(reports[1].block, "note: CT 104 runs on pve1\n\n");
        assert_eq!(reports[1].reason, "CT 104 runs on pve1");
    }

    fn member(name: &str, target: &str) -> Member {
        Member::new(name, target, ConfigFile::default())
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
