//! The provisioning model: each step answers a read-only `check` (done, or the exact changes it would make),
//! `apply`s those changes, and is checked again afterwards to prove it converged. The runner re-checks every step
//! right before applying it, because an earlier step (or a person) may have changed the host since the plan was shown.

use std::fmt;

use anyhow::{Context, Result, bail};

use crate::transport::Cmd;

/// Where an action happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Host,
    Container(u32),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Host => write!(f, "host"),
            Target::Container(vmid) => write!(f, "CT {vmid}"),
        }
    }
}

/// One change a step would make, shown by `--plan` exactly as it will be applied: every kind of change is a
/// variant here, and [`super::apply::execute`] is the one place that carries each out, so no step decides what
/// to do by reading a note's text or adds a command the plan did not show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Run {
        on: Target,
        cmd: Cmd,
    },
    WriteFile {
        on: Target,
        path: String,
        /// The current content (None: the file does not exist yet), for the diff.
        old: Option<String>,
        new: String,
        mode: u32,
    },
    /// `apt-get -s install ...`: the proof that the real install that follows takes exactly `version` of every
    /// NVIDIA package and nothing matching `forbidden`; when it does not, nothing after it runs.
    AptProof {
        on: Target,
        cmd: Cmd,
        version: String,
        forbidden: Vec<String>,
    },
    /// Copy a file a command is about to rewrite (`pct set` on a container's config) to the run's backup folder.
    Backup {
        on: Target,
        path: String,
    },
    /// Reboot the host and wait until it answers with a new boot id.
    Reboot {
        why: String,
    },
    /// Wait until `url` answers 200 from inside the container; give up when `unit` keeps restarting or fails.
    WaitHealthy {
        on: Target,
        unit: String,
        url: String,
    },
    /// Write a secret to `path` (mode 0600): `value` (a fleet's one key), else a new random one. Its value is
    /// never shown, logged or put in argv.
    WriteSecret {
        on: Target,
        path: String,
        value: Option<crate::client_config::from_host::Secret>,
    },
    /// Install a file from this machine (`from`, with this sha256) at `to` with `mode`.
    Upload {
        on: Target,
        from: std::path::PathBuf,
        to: String,
        sha256: String,
        mode: u32,
    },
    /// Remember that `path` was verified against `sha256`, by its size and mtime now, in `marker`: a later check
    /// need not hash the whole file again.
    RecordVerified {
        on: Target,
        path: String,
        sha256: String,
        marker: String,
    },
    /// What the step will do once an earlier step has run (the container started, the driver loaded): a plan on
    /// a host that is not there yet cannot know the exact commands. Apply never runs one: every step is checked
    /// again right before it applies, and by then the exact actions are known.
    Deferred {
        on: Target,
        what: String,
    },
}

impl Action {
    /// The plan's text for this action: a command line, or a unified diff of the file.
    pub fn render(&self) -> String {
        match self {
            Action::Run { on, cmd } => format!("[{on}] $ {}", crate::shell::join(&cmd.argv)),
            Action::AptProof {
                on, cmd, version, ..
            } => format!(
                "[{on}] $ {}   # the proof: stop unless it installs exactly {version}-1",
                crate::shell::join(&cmd.argv)
            ),
            Action::WriteFile {
                on,
                path,
                old,
                new,
                mode,
            } => {
                let header = format!(
                    "[{on}] write {path} (mode {mode:04o}{})",
                    if old.is_none() { ", new file" } else { "" }
                );
                let diff = super::diff::unified(path, old.as_deref().unwrap_or(""), new, 3);
                format!("{header}\n{}", diff.trim_end())
            }
            Action::Backup { on, path } => {
                format!(
                    "[{on}] back up {path} to {}/<this run>",
                    super::ctx::BACKUP_DIR
                )
            }
            Action::Reboot { why } => {
                format!("[host] reboot the host ({why}), wait for it, and go on")
            }
            Action::WaitHealthy { on, url, .. } => format!("[{on}] wait until {url} answers 200"),
            Action::WriteSecret {
                on,
                path,
                value: None,
            } => {
                format!("[{on}] write a new random API key to {path} (mode 0600, root only)")
            }
            Action::WriteSecret {
                on,
                path,
                value: Some(_),
            } => {
                format!(
                    "[{on}] write the fleet's API key to {path} (mode 0600, root only; every proxy of the fleet shares it)"
                )
            }
            Action::Upload {
                on,
                from,
                to,
                sha256,
                mode,
            } => format!(
                "[{on}] install {} as {to} (sha256 {}, mode {mode:04o})",
                from.display(),
                &sha256[..sha256.len().min(12)]
            ),
            Action::RecordVerified {
                on, path, marker, ..
            } => format!("[{on}] record {path} as verified (its size and mtime) in {marker}"),
            Action::Deferred { on, what } => format!("[{on}] {what}"),
        }
    }
}

/// What a read-only check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Nothing to do; the evidence says why.
    Done(String),
    /// These actions would bring the step to its goal.
    Changes(Vec<Action>),
    /// Automation would be unsafe or impossible; the reason says what a person must do.
    Refused(String),
}

/// A unit of provisioning. Implementations keep `check` free of side effects.
pub trait Step<C> {
    /// Stable id, for `--only` and messages: `host.driver`, `ct.devices`, ...
    fn id(&self) -> crate::host::StepId;
    fn title(&self) -> &'static str;
    fn check(&self, ctx: &mut C) -> Result<Check>;
    /// Carries out exactly the actions `check` planned (provision's steps use the one executor,
    /// [`super::apply::execute`]).
    fn apply(&self, ctx: &mut C, actions: &[Action]) -> Result<()>;
}

/// What happened to one step in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    AlreadyDone(String),
    Planned(Vec<Action>),
    Applied(Vec<Action>),
    Refused(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Check every step and show what would change; change nothing.
    Plan,
    /// Check, then apply and verify each step in turn.
    Apply,
}

/// Runs `steps` in order. In apply mode a refused step stops the run (later steps depend on earlier ones); a plan
/// goes on, so it shows everything at once. A step that is still not done after its apply is an error naming it,
/// so a run never reports success on a host that did not converge. `started` is told before each step.
pub fn run<C>(
    steps: &[&dyn Step<C>],
    ctx: &mut C,
    mode: Mode,
    mut started: impl FnMut(usize, &dyn Step<C>),
    mut report: impl FnMut(&dyn Step<C>, &StepOutcome),
) -> Result<Vec<StepOutcome>> {
    let mut outcomes = Vec::with_capacity(steps.len());
    for (i, step) in steps.iter().enumerate() {
        started(i, *step);
        let checked = step
            .check(ctx)
            .with_context(|| format!("step {} could not check the host", step.id()))?;
        let outcome = match checked {
            Check::Done(why) => StepOutcome::AlreadyDone(why),
            Check::Refused(why) => StepOutcome::Refused(why),
            Check::Changes(actions) if mode == Mode::Plan => StepOutcome::Planned(actions),
            Check::Changes(actions) => {
                step.apply(ctx, &actions)
                    .with_context(|| format!("step {} failed", step.id()))?;
                match step
                    .check(ctx)
                    .with_context(|| format!("step {} could not verify its result", step.id()))?
                {
                    Check::Done(_) => StepOutcome::Applied(actions),
                    Check::Changes(left) => bail!(
                        "step {} did not converge: after applying it, it still wants to: {}",
                        step.id(),
                        left.iter()
                            .map(Action::render)
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                    Check::Refused(why) => {
                        bail!("step {} failed its check after applying: {why}", step.id())
                    }
                }
            }
        };
        report(*step, &outcome);
        let refused = matches!(outcome, StepOutcome::Refused(_));
        outcomes.push(outcome);
        if refused && mode == Mode::Apply {
            break;
        }
    }
    Ok(outcomes)
}

/// How many steps changed (or, in plan mode, would change) something.
pub fn changes(outcomes: &[StepOutcome]) -> usize {
    outcomes
        .iter()
        .filter(|o| matches!(o, StepOutcome::Planned(_) | StepOutcome::Applied(_)))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step whose goal is `ctx.value == target`.
    struct SetValue {
        target: u32,
        /// Simulates a broken apply that does not reach the goal.
        broken: bool,
    }

    struct Ctx {
        value: u32,
        applies: u32,
    }

    impl Step<Ctx> for SetValue {
        fn id(&self) -> crate::host::StepId {
            crate::host::StepId::Nouveau
        }
        fn title(&self) -> &'static str {
            "value set"
        }
        fn check(&self, ctx: &mut Ctx) -> Result<Check> {
            Ok(if ctx.value == self.target {
                Check::Done(format!("value is {}", ctx.value))
            } else {
                Check::Changes(vec![Action::Run {
                    on: Target::Host,
                    cmd: Cmd::new(["set-value", &self.target.to_string()]),
                }])
            })
        }
        fn apply(&self, ctx: &mut Ctx, _actions: &[Action]) -> Result<()> {
            ctx.applies += 1;
            if !self.broken {
                ctx.value = self.target;
            }
            Ok(())
        }
    }

    #[test]
    fn plan_changes_nothing_apply_converges_and_a_second_run_is_a_no_op() {
        let step = SetValue {
            target: 7,
            broken: false,
        };
        let mut ctx = Ctx {
            value: 1,
            applies: 0,
        };
        let planned = run(&[&step], &mut ctx, Mode::Plan, |_, _| {}, |_, _| {}).unwrap();
        assert!(matches!(&planned[0], StepOutcome::Planned(a) if a.len() == 1));
        assert_eq!((ctx.value, ctx.applies), (1, 0));

        let applied = run(&[&step], &mut ctx, Mode::Apply, |_, _| {}, |_, _| {}).unwrap();
        assert_eq!(changes(&applied), 1);
        assert_eq!((ctx.value, ctx.applies), (7, 1));

        let again = run(&[&step], &mut ctx, Mode::Apply, |_, _| {}, |_, _| {}).unwrap();
        assert_eq!(changes(&again), 0);
        assert_eq!(ctx.applies, 1);
    }

    #[test]
    fn a_step_that_does_not_converge_is_an_error() {
        let step = SetValue {
            target: 7,
            broken: true,
        };
        let mut ctx = Ctx {
            value: 1,
            applies: 0,
        };
        let err = run(&[&step], &mut ctx, Mode::Apply, |_, _| {}, |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nouveau did not converge") && err.contains("set-value 7"),
            "{err}"
        );
    }

    #[test]
    fn file_actions_render_as_diffs() {
        let a = Action::WriteFile {
            on: Target::Container(103),
            path: "/etc/x.conf".into(),
            old: Some("a\n".into()),
            new: "a\nb\n".into(),
            mode: 0o644,
        };
        assert_eq!(
            a.render(),
            "[CT 103] write /etc/x.conf (mode 0644)\n--- /etc/x.conf\n+++ /etc/x.conf (planned)\n@@ -1 +1,2 @@\n a\n+b"
        );
    }
}
