//! `llmctl provision` and `llmctl init`: the whole stack on a Proxmox host, idempotently, with a plan.

pub mod apply;
pub mod config;
pub mod ct;
pub mod ctx;
pub mod diff;
pub mod host;
pub mod probe;
pub mod progress;
pub mod step;
pub mod units;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::cli::GlobalArgs;
use crate::host::StepId;
use crate::outcome::Outcome;
use crate::transport::Cmd;
use ctx::Ctx;
use step::{Mode, Step, StepOutcome};

/// The commented configuration `llmctl init` writes: the seed guide's setup.
pub const INIT_TEMPLATE: &str = include_str!("../../templates/llmctl.toml");

#[derive(Debug, Clone, Args)]
pub struct ProvisionArgs {
    /// Show every step and exactly what it would change (commands, file diffs); change nothing.
    #[arg(long, conflicts_with = "check")]
    pub plan: bool,
    /// Change nothing; exit 1 if anything would change (for cron and CI), 0 when the host is as configured.
    #[arg(long)]
    pub check: bool,
    /// Only these steps (comma-separated ids, see --plan; `driver` also takes repo, dkms and module along).
    #[arg(long, value_name = "STEPS", value_delimiter = ',')]
    pub only: Vec<String>,
    /// Do not ask for confirmation before changing the host.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// When a driver change needs a reboot, reboot the host, wait for it, and carry on.
    #[arg(long)]
    pub reboot: bool,
    /// The Proxmox host; with [[hosts]] or [cluster] in llmctl.toml, a host's (a cluster node's) name, or its
    /// target. Repeatable: several hosts are provisioned in parallel, and changing them takes --yes [default:
    /// [host] target in llmctl.toml, or every [[hosts]] entry and cluster node]
    #[arg(long, value_name = "HOST")]
    pub host: Vec<String>,
    #[command(flatten)]
    pub ssh: crate::remote::SshArgs,
    /// The llmctl binary to install in the container [default: this one]
    #[arg(long, value_name = "PATH")]
    pub llmctl_binary: Option<PathBuf>,
    /// Set by provision over a fleet whose proxies are peers: the key they all hold (`fleet::key`).
    #[arg(skip)]
    pub shared_key: Option<ctx::SharedKey>,
}

#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// Where to write the file [default: --config / LLMCTL_CONFIG when given, else ./llmctl.toml]
    #[arg(long, value_name = "PATH")]
    pub path: Option<PathBuf>,
    /// Replace an existing file (the old one is kept as PATH.bak, or PATH.bak.N when that exists).
    #[arg(long)]
    pub force: bool,
    /// Print the file instead of writing it.
    #[arg(long)]
    pub stdout: bool,
}

/// Every step, in the order they run: the host first, then the container (the order of `StepId`'s
/// registration).
pub fn all_steps() -> Vec<&'static dyn Step<Ctx>> {
    StepId::ALL.iter().map(|id| id.step()).collect()
}

/// The steps `--only` names, in run order; the read-only inventory always runs first. `driver` brings the steps
/// a working driver needs along (repository, DKMS, the loaded module).
pub fn select_steps(
    all: Vec<&'static dyn Step<Ctx>>,
    only: &[String],
) -> Result<Vec<&'static dyn Step<Ctx>>> {
    if only.is_empty() {
        return Ok(all);
    }
    let mut wanted: Vec<StepId> = vec![StepId::Inventory];
    for name in only {
        let id: StepId = name
            .parse()
            .map_err(|why| anyhow::anyhow!("--only {}: {why}", name.trim()))?;
        match id {
            StepId::Driver => {
                wanted.extend([StepId::Repo, StepId::Driver, StepId::Dkms, StepId::Module])
            }
            id => wanted.push(id),
        }
    }
    Ok(all
        .into_iter()
        .filter(|s| wanted.contains(&s.id()))
        .collect())
}

pub fn run(global: &GlobalArgs, args: ProvisionArgs) -> Result<Outcome> {
    let file = crate::config::ConfigFile::load(global.config.as_deref())?;
    let mut args = args;
    let (file, host) = match crate::fleet::select(&file, &args.host, None, &args.ssh.options())? {
        crate::fleet::Selection::One {
            config,
            host,
            fleet,
            ..
        } => {
            if !fleet.is_empty() {
                args.shared_key = Some(crate::fleet::key::shared(&fleet, &args.ssh.options())?);
            }
            (config, host)
        }
        crate::fleet::Selection::Fleet { members, preface } => {
            return crate::fleet::commands::provision(global, &args, &members, preface.as_deref());
        }
    };
    let live = std::sync::Arc::new(progress::Live::new(global.quiet));
    let mut out = std::io::stdout().lock();
    Ok(provision_one(global, &args, &file, host.as_deref(), live, &mut out)?.outcome)
}

/// How a provisioning run of one host ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    pub outcome: Outcome,
    /// Steps the plan would change.
    pub planned: usize,
    /// Steps that changed the host (`None`: nothing was applied: --plan, --check, or nothing to change).
    pub changed: Option<usize>,
    /// Why a step refused, when one did.
    pub refused: Option<String>,
}

/// Provisions one host: `file` is its configuration, `host` the `--host` flag when it gives the target; the
/// report goes to `out`, live progress to `live`. A fleet calls this once per host, each into its own buffer.
pub fn provision_one(
    global: &GlobalArgs,
    args: &ProvisionArgs,
    file: &crate::config::ConfigFile,
    host: Option<&str>,
    live: std::sync::Arc<progress::Live>,
    out: &mut dyn Write,
) -> Result<Provisioned> {
    if let Some(entry) = file.entry() {
        // An inventory host's (a cluster node's) container is its entry's vmid: say so, not `[host] vmid`.
        let section: crate::config::HostSection = file.section_or_default()?;
        if section.vmid.is_none() {
            bail!(
                "{}: no container given: set vmid in {entry} (the container to create or use, e.g. 103)",
                file.name()
            );
        }
    }
    let cfg = config::ProvisionConfig::from_file_and_flags(file, host)?;
    let config_path = file.path.as_deref().map_or_else(
        || crate::config::DEFAULT_PATH.to_string(),
        |p| p.display().to_string(),
    );
    let steps = select_steps(all_steps(), &args.only)?;
    let options = args.ssh.options();
    let target = cfg.host.target.clone();
    let connect: ctx::Connector = Box::new(move || crate::transport::connect(&target, &options));
    let binary = match &args.llmctl_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("cannot find this llmctl binary to install it")?,
    };
    let mut ctx = Ctx::new(connect, cfg, config_path.clone(), binary, live)?;
    ctx.allow_reboot = args.reboot;
    ctx.shared_key = args.shared_key.clone();
    // The next command reaches this host the way this run did: by its inventory name, or its target.
    let next_host = host
        .map(str::to_string)
        .or_else(|| file.scope().map(str::to_string));
    let next = || next_step(global, next_host.as_deref(), args);
    writeln!(
        out,
        "llmctl provision: {}, CT {} ({config_path})\n",
        ctx.host().describe(),
        ctx.vmid()
    )?;

    // Always check everything first and show it: the plan is what the user agrees to.
    let planned = execute(&steps, &mut ctx, Mode::Plan, out)?;
    let changes = step::changes(&planned);
    let refused_why = planned.iter().find_map(|o| match o {
        StepOutcome::Refused(why) => Some(why.clone()),
        _ => None,
    });
    let refused = refused_why.is_some();
    writeln!(
        out,
        "\n{} of {} steps would change something{}",
        changes,
        planned.len(),
        if refused {
            "; some are refused (see above)"
        } else {
            ""
        }
    )?;
    let clean = changes == 0 && !refused;
    let ended = |outcome, changed, refused| Provisioned {
        outcome,
        planned: changes,
        changed,
        refused,
    };
    if args.plan || args.check {
        if clean && args.only.is_empty() {
            write!(out, "{}", next())?;
        }
        let outcome = if clean || args.plan {
            Outcome::Success
        } else {
            Outcome::ProblemsFound
        };
        return Ok(ended(outcome, None, refused_why));
    }
    if changes > 0 && !args.yes {
        confirm(changes)?;
    }
    let applied = if changes > 0 {
        writeln!(out, "\napplying:\n")?;
        execute(&steps, &mut ctx, Mode::Apply, out)?
    } else {
        planned
    };
    let changed = step::changes(&applied);
    if let Some(StepOutcome::Refused(why)) = applied
        .iter()
        .find(|o| matches!(o, StepOutcome::Refused(_)))
    {
        writeln!(out, "\nstopped: {why}")?;
        return Ok(ended(
            Outcome::ProblemsFound,
            Some(changed),
            Some(why.clone()),
        ));
    }
    if args.only.is_empty() {
        smoke_test(&ctx, out)?;
    }
    writeln!(
        out,
        "\ndone: {changed} step(s) changed, {} already as configured",
        applied.len() - changed
    )?;
    if args.only.is_empty() {
        write!(out, "{}", next())?;
    }
    Ok(ended(Outcome::Success, Some(changed), None))
}

/// `provision --check`'s assessment without its output: every step checked, nothing changed. Doctor calls it
/// to judge a host against llmctl.toml with provision's own rules, so the two cannot disagree.
pub fn assess(ctx: &mut Ctx) -> Result<Vec<(StepId, &'static str, StepOutcome)>> {
    let steps = all_steps();
    let outcomes = step::run(&steps, ctx, Mode::Plan, |_, _| {}, |_, _| {})?;
    Ok(steps
        .iter()
        .zip(outcomes)
        .map(|(s, o)| (s.id(), s.title(), o))
        .collect())
}

/// What to run next once the host is as configured: point Claude Code on this machine at the proxy.
fn next_step(global: &GlobalArgs, host: Option<&str>, args: &ProvisionArgs) -> String {
    format!(
        "\nnext, on the machine you code on (codex or pi instead of claude for those clients):\n  {}\n",
        next_command(
            global.config.as_deref(),
            host,
            &args.ssh.identity,
            args.ssh.known_hosts.as_deref()
        )
    )
}

/// `llmctl client-config claude --from-host --write` with the config file, host and SSH flags this run was
/// given, so it reaches the same host the same way (its key is known by now: no --accept-new-host-key).
pub fn next_command(
    config: Option<&std::path::Path>,
    host: Option<&str>,
    identity: &[PathBuf],
    known_hosts: Option<&std::path::Path>,
) -> String {
    let mut argv: Vec<String> = vec!["llmctl".into()];
    if let Some(c) = config {
        argv.extend(["--config".into(), c.display().to_string()]);
    }
    argv.extend(["client-config", "claude", "--from-host", "--write"].map(String::from));
    if let Some(h) = host {
        argv.extend(["--host".into(), h.to_string()]);
    }
    for i in identity {
        argv.extend(["--identity".into(), i.display().to_string()]);
    }
    if let Some(k) = known_hosts {
        argv.extend(["--known-hosts".into(), k.display().to_string()]);
    }
    crate::shell::join(&argv)
}

/// Runs the steps, printing one line per step (and the actions a change takes) as each finishes.
fn execute(
    steps: &[&'static dyn Step<Ctx>],
    ctx: &mut Ctx,
    mode: Mode,
    out: &mut dyn Write,
) -> Result<Vec<StepOutcome>> {
    let total = steps.len();
    let live = ctx.live.clone();
    let mut report_err: Option<std::io::Error> = None;
    let steps: Vec<&dyn Step<Ctx>> = steps.to_vec();
    let outcomes = step::run(
        &steps,
        ctx,
        mode,
        |i, s| {
            if mode == Mode::Apply {
                live.step_started(i + 1, total, s.id().as_str(), s.title());
            }
        },
        |s, o| {
            live.step_finished();
            if let Err(e) = write!(out, "{}", render_outcome(s.id().as_str(), s.title(), o)) {
                report_err.get_or_insert(e);
            }
        },
    );
    live.step_finished();
    if let Some(e) = report_err {
        return Err(e.into());
    }
    outcomes
}

/// One step's lines in the report.
pub fn render_outcome(id: &str, title: &str, outcome: &StepOutcome) -> String {
    let (tag, detail, actions) = match outcome {
        StepOutcome::AlreadyDone(why) => ("ok", why.clone(), &[][..]),
        StepOutcome::Planned(a) => ("change", title.to_string(), &a[..]),
        StepOutcome::Applied(a) => ("changed", title.to_string(), &a[..]),
        StepOutcome::Refused(why) => ("REFUSED", why.clone(), &[][..]),
    };
    let mut s = format!("  {tag:<8} {id:<16} {detail}\n");
    for a in actions {
        for (i, line) in a.render().lines().enumerate() {
            let indent = if i == 0 {
                "             "
            } else {
                "               "
            };
            s.push_str(&format!("{indent}{line}\n"));
        }
    }
    s
}

fn confirm(changes: usize) -> Result<()> {
    if !std::io::stdin().is_terminal() {
        bail!(
            "{changes} step(s) would change the host and there is no terminal to confirm on: review the plan \
             above (`llmctl provision --plan`) and run again with --yes"
        );
    }
    eprint!("apply these changes? [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        bail!("nothing was changed");
    }
    Ok(())
}

/// One message through the proxy, from inside the container: the stack works end to end.
fn smoke_test(ctx: &Ctx, out: &mut dyn Write) -> Result<()> {
    let port = ctx.cfg.proxy_port();
    let mut argv = vec![
        units::LLMCTL_BIN.to_string(),
        "probe".into(),
        "--message".into(),
        format!("http://127.0.0.1:{port}"),
    ];
    if let Some(k) = &ctx.cfg.proxy_key_file() {
        argv.push("--api-key-file".into());
        argv.push(k.clone());
    }
    use crate::transport::Transport as _;
    let o = ctx
        .ct()
        .run(&Cmd::new(argv.clone()).timeout(Duration::from_secs(660)))?;
    if !o.success() {
        bail!(
            "smoke test failed: one message through the proxy in CT {} did not come back: {}{}",
            ctx.vmid(),
            o.stderr.trim(),
            o.stdout.trim()
        );
    }
    writeln!(out, "\nsmoke test: {}", o.stdout.trim())?;
    Ok(())
}

pub fn init(global: &GlobalArgs, args: InitArgs) -> Result<Outcome> {
    if args.stdout {
        std::io::stdout()
            .lock()
            .write_all(INIT_TEMPLATE.as_bytes())?;
        return Ok(Outcome::Success);
    }
    // The file every other command will read: --config / LLMCTL_CONFIG, as they do.
    let path = args
        .path
        .or_else(|| global.config.clone())
        .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_PATH));
    let backup = write_new_file(&path, INIT_TEMPLATE.as_bytes(), args.force)?;
    if let Some(b) = backup {
        eprintln!("kept the previous file as {}", b.display());
    }
    eprintln!("{}", init_hint(&path));
    Ok(Outcome::Success)
}

/// What to set before the first run: every value provision cannot guess, `[model].sha256` included.
fn init_hint(path: &std::path::Path) -> String {
    format!(
        "wrote {}: set [host].target and [host].vmid, and [model].sha256 (the model file's checksum, which provision verifies), then run `llmctl provision --plan`",
        path.display()
    )
}

/// Writes `data` to `path` atomically (temp file in the same directory, fsync, rename). An existing file is an
/// error unless `force`, and then it is kept first as `<path>.bak`, or `<path>.bak.1`, `.bak.2`, … when earlier
/// backups exist: nothing a user wrote is ever lost, not even by a second `--force`. Returns the backup's path.
fn write_new_file(path: &std::path::Path, data: &[u8], force: bool) -> Result<Option<PathBuf>> {
    let mut kept = None;
    if path.exists() {
        if !force {
            anyhow::bail!(
                "{} already exists; use --force to replace it (the old file is kept as {}.bak)",
                path.display(),
                path.display()
            );
        }
        let backup = free_backup_path(path);
        std::fs::copy(path, &backup).with_context(|| {
            format!("cannot back up {} to {}", path.display(), backup.display())
        })?;
        kept = Some(backup);
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("llmctl.toml"),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))?;
    Ok(kept)
}

/// `<path>.bak` if free, else the first free `<path>.bak.N`.
fn free_backup_path(path: &std::path::Path) -> PathBuf {
    let first = PathBuf::from(format!("{}.bak", path.display()));
    if !first.exists() {
        return first;
    }
    (1..)
        .map(|n| PathBuf::from(format!("{}.bak.{n}", path.display())))
        .find(|p| !p.exists())
        .unwrap_or(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_command_reaches_the_host_the_same_way() {
        assert_eq!(
            next_command(None, None, &[], None),
            "llmctl client-config claude --from-host --write"
        );
        let id = [PathBuf::from("/root/.ssh/pve key")];
        assert_eq!(
            next_command(
                Some(std::path::Path::new("lab/llmctl.toml")),
                Some("root@10.0.0.2"),
                &id,
                Some(std::path::Path::new("/tmp/kh"))
            ),
            "llmctl --config lab/llmctl.toml client-config claude --from-host --write --host root@10.0.0.2 \
             --identity '/root/.ssh/pve key' --known-hosts /tmp/kh"
        );
    }

    #[test]
    fn a_second_force_keeps_both_backups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmctl.toml");
        std::fs::write(&path, "first").unwrap();
        assert_eq!(
            write_new_file(&path, b"second", true).unwrap(),
            Some(dir.path().join("llmctl.toml.bak"))
        );
        assert_eq!(
            write_new_file(&path, b"third", true).unwrap(),
            Some(dir.path().join("llmctl.toml.bak.1"))
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("llmctl.toml.bak")).unwrap(),
            "first"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("llmctl.toml.bak.1")).unwrap(),
            "second"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "third");
        assert!(write_new_file(&path, b"x", false).is_err());
    }

    #[test]
    fn the_init_hint_names_the_checksum() {
        let hint = init_hint(std::path::Path::new("llmctl.toml"));
        assert!(hint.contains("[model].sha256"), "{hint}");
    }

    #[test]
    fn init_writes_where_config_points() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("site.toml");
        let global = GlobalArgs {
            config: Some(target.clone()),
            verbose: 0,
            quiet: true,
            log_format: crate::cli::LogFormat::Text,
        };
        let args = InitArgs {
            path: None,
            force: false,
            stdout: false,
        };
        init(&global, args).unwrap();
        assert!(target.exists());
    }

    #[test]
    fn only_selects_steps_in_run_order_with_the_inventory_first() {
        let ids = |only: &[&str]| -> Vec<&'static str> {
            let only: Vec<String> = only.iter().map(|s| s.to_string()).collect();
            select_steps(all_steps(), &only)
                .unwrap()
                .iter()
                .map(|s| s.id().as_str())
                .collect()
        };
        assert_eq!(ids(&[]).len(), 19);
        assert_eq!(
            ids(&["llama-service", "nouveau"]),
            ["inventory", "nouveau", "llama-service"]
        );
        assert_eq!(
            ids(&["driver"]),
            ["inventory", "repo", "driver", "dkms", "module"]
        );
        let err = match select_steps(all_steps(), &["drivers".to_string()]) {
            Ok(_) => panic!("an unknown step must be an error"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("--only drivers: no such step") && err.contains("devices-at-boot"),
            "{err}"
        );
    }

    #[test]
    fn the_steps_run_in_the_order_step_ids_list_them() {
        let ids: Vec<StepId> = all_steps().iter().map(|s| s.id()).collect();
        assert_eq!(ids, StepId::ALL);
        // The order users have seen in plans: a registration line moved by mistake changes it.
        assert_eq!(
            StepId::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            [
                "inventory",
                "container",
                "headers",
                "nouveau",
                "repo",
                "driver",
                "dkms",
                "module",
                "devices-at-boot",
                "devices",
                "start",
                "ct-repo",
                "ct-libs",
                "cuda",
                "llmctl",
                "llama",
                "model",
                "llama-service",
                "proxy-service"
            ]
        );
    }

    #[test]
    fn init_refuses_to_overwrite_and_backs_up_with_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmctl.toml");
        write_new_file(&path, b"first", false).unwrap();
        let err = write_new_file(&path, b"second", false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("already exists") && err.contains("--force"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        write_new_file(&path, b"second", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(
            std::fs::read(dir.path().join("llmctl.toml.bak")).unwrap(),
            b"first"
        );
    }
}

#[cfg(test)]
mod assess_tests {
    use super::*;
    use crate::host::facts::{self, CT_ROUND_SCRIPT, HOST_SCRIPT};
    use crate::transport::{Output, Stream, Transport};
    use std::sync::{Arc, Mutex};

    /// Answers the two rounds from text, the planner with a choice, and anything else with an empty success;
    /// records every command.
    struct Scripted {
        calls: Arc<Mutex<Vec<Vec<String>>>>,
    }

    const HOST: &str = "==> pveversion <==\npve-manager/9.0.3/025864202ebb6109 (running kernel: 6.14.8-2-pve)\n==> rc=0 <==\n\
==> uname <==\n6.14.8-2-pve\n==> rc=0 <==\n\
==> os-release <==\nVERSION_ID=\"13\"\n==> rc=0 <==\n\
==> query-gpu <==\nNVIDIA GeForce RTX 4090, 595.71.05, 8.9, 24564, 14\n==> rc=0 <==\n\
==> ct-config 103 <==\nhostname: llm\nmemory: 40000\n<llmctl-eof>\n==> rc=0 <==\n";

    const CT: &str = "==> ct-status <==\nstatus: running\n==> rc=0 <==\n\
==> ct-os-release <==\nVERSION_ID=\"12\"\n==> rc=0 <==\n\
==> ct-services <==\nactive\nactive\n==> rc=0 <==\n\
==> ct-enabled llama-server <==\nenabled\n==> rc=0 <==\n\
==> ct-enabled llmctl-proxy <==\nenabled\n==> rc=0 <==\n\
==> ct-model-file <==\n\n==> rc=0 <==\n";

    const PLAN: &str = r#"{"chosen":{"ngl":31,"n_cpu_moe":0}}"#;

    impl Transport for Scripted {
        fn run_streaming(&self, cmd: &Cmd, _: &mut dyn FnMut(Stream, &str)) -> Result<Output> {
            self.calls.lock().unwrap().push(cmd.argv.clone());
            let script = cmd.argv.get(2).map(String::as_str);
            let stdout = if script == Some(HOST_SCRIPT) {
                HOST.to_string()
            } else if script == Some(CT_ROUND_SCRIPT) {
                CT.to_string()
            } else if cmd.argv.iter().any(|a| a == "plan") {
                PLAN.to_string()
            } else if let Some(script) = cmd.argv.iter().find(|a| a.contains("\nask 0 ")) {
                // The on-demand facts asked together (OnDemand::together): each in its sections.
                script
                    .lines()
                    .filter_map(|l| l.strip_prefix("ask ")?.split_once(' '))
                    .map(|(n, c)| {
                        let out = if c.contains(" plan ") { PLAN } else { "" };
                        format!(
                            "==> {n} <==\n{out}\n==> rc=0 <==\n==> {n} stderr <==\n\n==> rc=0 <==\n"
                        )
                    })
                    .collect()
            } else {
                String::new()
            };
            Ok(Output {
                status: Some(0),
                stdout,
                stderr: String::new(),
            })
        }
        fn read_file(&self, path: &str) -> Result<Vec<u8>> {
            self.calls
                .lock()
                .unwrap()
                .push(vec!["read".into(), path.into()]);
            bail!("a check reads the facts, not files")
        }
        fn write_file(&self, _: &str, _: &[u8], _: u32) -> Result<()> {
            bail!("a check never writes")
        }
        fn describe(&self) -> String {
            "root@scripted".into()
        }
    }

    /// Issue 11: a check reads the gathered facts; the only commands besides the two rounds are the on-demand
    /// facts (the planner, the health probes), each asked once until something changes, and asked anew after.
    /// Issue 13: asked together, in one command (one round trip).
    #[test]
    fn checks_run_nothing_but_the_rounds_and_the_on_demand_facts() {
        let file =
            crate::config::ConfigFile::parse(include_str!("../../templates/llmctl.toml"), None)
                .unwrap();
        let cfg = config::ProvisionConfig::from_file(&file).unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let t = Scripted {
            calls: calls.clone(),
        };
        let facts =
            facts::gather_with(&t, Some(cfg.host.vmid), Some(&cfg.install_paths())).unwrap();
        let binary = tempfile::NamedTempFile::new().unwrap();
        let connect: ctx::Connector =
            Box::new(|| -> Result<Box<dyn Transport>> { bail!("no reconnect in this test") });
        let asks = [
            facts::OnDemand::OffloadPlan {
                argv: ct::plan_argv(&cfg, &[24564], &cfg.server.cache_type_k),
            },
            facts::OnDemand::Health {
                url: format!("http://127.0.0.1:{}/health", cfg.server.port),
            },
            facts::OnDemand::Health {
                url: format!("http://127.0.0.1:{}/health", cfg.proxy_port()),
            },
        ];
        let together = facts::OnDemand::together(&asks);
        for a in &asks {
            assert!(
                together.argv[2].contains(&crate::shell::join(&a.cmd().argv)),
                "{a:?} is not in {}",
                together.argv[2]
            );
        }
        let wanted = ["pct exec 103 -- sh -c <script> llmctl-ask"];
        let mut ctx = Ctx::over(
            Box::new(t),
            connect,
            cfg,
            "llmctl.toml".into(),
            binary.path().into(),
            facts,
        );
        let shown = |calls: &[Vec<String>]| -> Vec<String> {
            calls
                .iter()
                .map(|a| {
                    a.iter()
                        .map(|w| if w.len() > 60 { "<script>" } else { w.as_str() })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect()
        };
        let first = assess(&mut ctx).unwrap();
        assert_eq!(first.len(), StepId::ALL.len());
        let after_first = calls.lock().unwrap().clone();
        let on_demand: Vec<String> = shown(&after_first[2..]);
        assert_eq!(on_demand, wanted, "{:#?}", shown(&after_first));
        // Asked again on the same facts: nothing runs.
        assert_eq!(assess(&mut ctx).unwrap(), first);
        assert_eq!(calls.lock().unwrap().len(), after_first.len());
        // After a change (what execute does), the rounds and the live facts are asked anew.
        ctx.invalidate();
        assert_eq!(assess(&mut ctx).unwrap(), first);
        let all = calls.lock().unwrap().clone();
        assert_eq!(shown(&all[after_first.len()..]), shown(&after_first));
    }
}
