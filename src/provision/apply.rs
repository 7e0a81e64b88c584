//! The one executor: carries out a plan's actions exactly as `--plan` showed them. Every kind of change is an
//! [`Action`] variant handled here, so what a step does is what its plan says, and the safety rules (argv only,
//! a backup before a file changes, secrets never in argv or output, the apt proof before an install) hold for
//! every step alike.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::ctx::Ctx;
use super::step::{Action, Target};
use crate::transport::Cmd;

/// Runs `actions` in order and marks the host's facts stale; the first failure stops the rest.
pub fn execute(ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
    let result = actions.iter().try_for_each(|a| execute_one(ctx, a));
    ctx.invalidate();
    result
}

/// Applies one planned action.
pub fn execute_one(ctx: &mut Ctx, action: &Action) -> Result<()> {
    match action {
        Action::Run { on, cmd } => {
            ctx.run_ok(on, cmd.clone())?;
        }
        Action::AptProof {
            on,
            cmd,
            version,
            forbidden,
        } => {
            let out = ctx.run_ok(on, cmd.clone())?;
            let forbidden: Vec<&str> = forbidden.iter().map(String::as_str).collect();
            if let Err(why) = super::host::simulation_pins_exactly(&out.stdout, version, &forbidden)
            {
                bail!(
                    "refused: {why}. apt would not install exactly {version}-1 {}; nothing was installed. Check \
                     `apt-cache madison nvidia-driver-cuda` and the pinning package",
                    match on {
                        Target::Host => "on the host".to_string(),
                        Target::Container(v) => format!(
                            "in CT {v} (a container gets the user-space libraries only; the host owns the kernel module)"
                        ),
                    }
                );
            }
        }
        Action::WriteFile {
            on,
            path,
            new,
            mode,
            ..
        } => write(ctx, on, path, new.as_bytes(), *mode)?,
        Action::Backup { on, path } => match on {
            Target::Host => ctx.backup_host_file(path)?,
            Target::Container(_) => {
                bail!("internal: backups of container files come with their write")
            }
        },
        Action::Reboot { .. } => reboot_and_wait(ctx)?,
        Action::WaitHealthy { unit, url, .. } => wait_healthy(ctx, unit, url)?,
        Action::WriteSecret { on, path, value } => {
            let key = match value {
                Some(v) => v.expose().to_string(),
                None => super::ct::new_api_key()?,
            };
            write(ctx, on, path, format!("{key}\n").as_bytes(), 0o600)?;
        }
        Action::Upload {
            on,
            from,
            to,
            sha256,
            mode,
        } => {
            let data =
                std::fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
            let now = super::ct::sha256_bytes(&data);
            if &now != sha256 {
                bail!(
                    "{} changed since the plan was made (sha256 {} now, {} planned); run provision again",
                    from.display(),
                    &now[..12],
                    &sha256[..sha256.len().min(12)]
                );
            }
            ctx.live
                .note(&format!("copying {} MB", data.len() / 1_000_000));
            write(ctx, on, to, &data, *mode)?;
        }
        Action::RecordVerified {
            on,
            path,
            sha256,
            marker,
        } => {
            let stat = ctx.run_ok(on, Cmd::new(["stat", "-c", "%s %Y", path]))?;
            let text = super::ct::marker_text(sha256, stat.stdout.trim());
            write(ctx, on, marker, text.as_bytes(), 0o644)?;
        }
        Action::Deferred { on, what } => bail!(
            "[{on}] {what}: an earlier step did not leave the host where this step can start; run provision \
             again (`llmctl provision --plan` shows where it stands)"
        ),
    }
    Ok(())
}

fn write(ctx: &Ctx, on: &Target, path: &str, data: &[u8], mode: u32) -> Result<()> {
    match on {
        Target::Host => ctx.write_host_file(path, data, mode),
        Target::Container(_) => ctx.write_ct_file(path, data, mode),
    }
}

/// Reboots the host and waits until it answers again with a new boot id (the old connection dies with it).
fn reboot_and_wait(ctx: &mut Ctx) -> Result<()> {
    const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
    let before = ctx
        .host_probe(&["cat", BOOT_ID])?
        .context("cannot read the host's boot id")?;
    ctx.live.note("rebooting the host");
    // The connection may drop before `reboot` returns: that is expected, not an error.
    let _ = ctx
        .host()
        .run(&Cmd::new(["systemctl", "reboot"]).timeout(Duration::from_secs(30)))
        .ok()
        .filter(|o| o.success())
        .or_else(|| {
            ctx.host()
                .run(&Cmd::new(["reboot"]).timeout(Duration::from_secs(30)))
                .ok()
        });
    let deadline = Instant::now() + Duration::from_secs(900);
    // The first look comes soon (a host that reboots at once, or whose old boot id still answers, costs a few
    // cheap probes), then every 2 s as before.
    let mut pause = Duration::from_millis(250);
    loop {
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_secs(2));
        let now = ctx
            .host_probe(&["cat", BOOT_ID])
            .ok()
            .flatten()
            .or_else(|| {
                ctx.reconnect()
                    .ok()
                    .and_then(|_| ctx.host_probe(&["cat", BOOT_ID]).ok().flatten())
            });
        if let Some(now) = now
            && now.trim() != before.trim()
        {
            ctx.live.note("the host is back");
            ctx.invalidate();
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the host did not come back within 15 minutes of the reboot; check its console, then run provision again"
            );
        }
        ctx.live.note("waiting for the host to come back");
    }
}

/// Waits for the health endpoint (loading a large model takes minutes; the unit allows 15), but gives up at
/// once when systemd has restarted the service twice: a crash loop never turns healthy, and its journal says why.
fn wait_healthy(ctx: &Ctx, unit: &str, url: &str) -> Result<()> {
    let restarts = |ctx: &Ctx| -> Result<u64> {
        Ok(ctx
            .ct_probe(&["systemctl", "show", "-p", "NRestarts", "--value", unit])?
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0))
    };
    let first = restarts(ctx)?;
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let healthy = ctx
            .ct_probe(&[
                super::units::LLMCTL_BIN,
                "probe",
                "--health",
                url,
                "--wait",
                "5",
            ])?
            .is_some();
        if healthy {
            return Ok(());
        }
        let crashed = restarts(ctx)? >= first + 2;
        let failed = ctx.ct_probe(&["systemctl", "is-failed", unit])?.is_some();
        if crashed || failed || Instant::now() > deadline {
            let journal = ctx
                .ct_probe(&["journalctl", "-u", unit, "-n", "12", "--no-pager"])?
                .unwrap_or_default();
            let why = if crashed {
                "it keeps exiting and systemd keeps restarting it"
            } else if failed {
                "systemd says it failed"
            } else {
                "it did not answer within 15 minutes"
            };
            bail!(
                "{unit} did not become healthy at {url}: {why}. Last lines of its journal:\n{}",
                journal.trim_end()
            );
        }
        ctx.live.note(&format!("waiting for {url}"));
    }
}
