//! What every provisioning step works with: the host transport (reconnected after a reboot), the validated
//! configuration, the host facts (gathered once with doctor's probes and again only after something changed),
//! and the helpers that run commands and write files the same safe way everywhere: argv only, live output to the
//! progress view, a clear error naming the command and its stderr, a backup before any file is replaced.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::config::ProvisionConfig;
use super::progress::Live;
use super::step::Target;
use crate::host::facts::{self, HostFacts, OnDemand};
use crate::transport::{Cmd, Container, Output, Stream, Transport};

/// Where files llmctl replaces are copied first, on the host and in the container (never inside /etc/pve:
/// pmxcfs would replicate a stray copy to every node).
pub const BACKUP_DIR: &str = "/root/llmctl-backup";
/// Host-side downloads (the NVIDIA keyring packages).
pub const HOST_CACHE_DIR: &str = "/root/llmctl-cache";

pub type Connector = Box<dyn Fn() -> Result<Box<dyn Transport>>>;

pub struct Ctx {
    host: Box<dyn Transport>,
    connect: Connector,
    pub cfg: ProvisionConfig,
    /// Shown in the rendered units' "managed by" line.
    pub config_path: String,
    facts: Option<HostFacts>,
    /// The on-demand facts asked since the facts were gathered (forgotten with them).
    on_demand: std::collections::BTreeMap<OnDemand, Output>,
    /// `--reboot`: a driver change that needs a reboot may reboot the host and wait for it.
    pub allow_reboot: bool,
    /// The llmctl binary to install in the container (normally this very executable).
    pub llmctl_binary: PathBuf,
    /// A per-run stamp naming the backup folder.
    pub stamp: String,
    pub live: std::sync::Arc<Live>,
    /// The key every proxy of the fleet shares (provision and doctor over a fleet whose proxies are peers):
    /// the proxy's key file must hold it. None: any key the host has will do.
    pub shared_key: Option<SharedKey>,
}

/// The fleet's one proxy key as a host's check needs it: the sha256 its key file must have, and (provision,
/// which writes it) the key itself. doctor has the hash only: it judges, never writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedKey {
    /// sha256 of the key file's content (the key and a newline, as provision writes it).
    pub sha256: String,
    pub value: Option<crate::client_config::from_host::Secret>,
}

impl SharedKey {
    pub fn of(key: crate::client_config::from_host::Secret) -> SharedKey {
        SharedKey {
            sha256: super::ct::sha256_bytes(format!("{}\n", key.expose()).as_bytes()),
            value: Some(key),
        }
    }
}

impl Ctx {
    pub fn new(
        connect: Connector,
        cfg: ProvisionConfig,
        config_path: String,
        llmctl_binary: PathBuf,
        live: std::sync::Arc<Live>,
    ) -> Result<Ctx> {
        let host = connect()?;
        let stamp = chrono_like_stamp();
        Ok(Ctx {
            host,
            connect,
            cfg,
            config_path,
            facts: None,
            on_demand: Default::default(),
            allow_reboot: false,
            llmctl_binary,
            stamp,
            live,
            shared_key: None,
        })
    }

    /// A context over a connection that is already open and the facts already gathered through it (doctor,
    /// which judges the host with provision's own checks).
    pub fn over(
        host: Box<dyn Transport>,
        connect: Connector,
        cfg: ProvisionConfig,
        config_path: String,
        llmctl_binary: PathBuf,
        facts: HostFacts,
    ) -> Ctx {
        Ctx {
            host,
            connect,
            cfg,
            config_path,
            facts: Some(facts),
            on_demand: Default::default(),
            allow_reboot: false,
            llmctl_binary,
            stamp: chrono_like_stamp(),
            live: std::sync::Arc::new(Live::silent()),
            shared_key: None,
        }
    }

    /// Gives the connection back (after [`Self::over`]).
    pub fn into_transport(self) -> Box<dyn Transport> {
        self.host
    }

    pub fn vmid(&self) -> u32 {
        self.cfg.host.vmid
    }

    pub fn host(&self) -> &dyn Transport {
        self.host.as_ref()
    }

    pub fn ct(&self) -> Container<'_> {
        Container::new(self.host.as_ref(), self.vmid())
    }

    /// Doctor's facts about the host and the configured container, with what is installed at the paths the
    /// configuration chooses; gathered on first use after a change. Facts handed in ([`Self::over`]) that looked
    /// at other paths, or at none, are gathered again.
    pub fn facts(&mut self) -> Result<&HostFacts> {
        let paths = self.cfg.install_paths();
        let other_paths = self
            .facts
            .as_ref()
            .and_then(HostFacts::inside)
            .is_some_and(|i| i.installed.as_ref().map(|x| &x.paths) != Some(&paths));
        if self.facts.is_none() || other_paths {
            let f = facts::gather_with(self.host.as_ref(), Some(self.vmid()), Some(&paths))?;
            self.facts = Some(f);
            self.on_demand.clear();
        }
        Ok(self.facts.as_ref().expect("just gathered"))
    }

    /// One of the live facts ([`OnDemand`]), asked in the container once until the facts are gathered again.
    /// A fact not asked yet is asked in one command with the [`Self::likely`] ones not asked yet either: the
    /// checks ask them one step after another with nothing changed in between (an applied step forgets them
    /// all), so one round trip answers what would otherwise take one each. A guess no check asks costs one
    /// short probe in that command; a fact no guess covered is asked when a check needs it.
    pub fn on_demand(&mut self, what: OnDemand) -> Result<&Output> {
        if !self.on_demand.contains_key(&what) {
            let mut asks = vec![what.clone()];
            for w in self.likely() {
                if !asks.contains(&w) && !self.on_demand.contains_key(&w) {
                    asks.push(w);
                }
            }
            if asks.len() == 1 {
                let out = self.ct().run(&what.cmd())?;
                self.on_demand.insert(what.clone(), out);
            } else {
                let out = self.ct().run(&OnDemand::together(&asks))?;
                let outs = OnDemand::split(&asks, &out);
                self.on_demand.extend(asks.into_iter().zip(outs));
            }
        }
        Ok(&self.on_demand[&what])
    }

    /// The live facts the checks of this configuration ask once the container runs its services: whether the
    /// configured llama-server and the proxy answer their health endpoints (the service steps ask them, after
    /// the offload planner when there is one). Replicas on other ports are asked when their step needs them.
    fn likely(&self) -> Vec<OnDemand> {
        [self.cfg.server.port, self.cfg.proxy_port()]
            .into_iter()
            .map(|port| OnDemand::Health {
                url: format!("http://127.0.0.1:{port}/health"),
            })
            .collect()
    }

    /// Something changed on the host: the next `facts()` gathers again, and live facts are asked again.
    pub fn invalidate(&mut self) {
        self.facts = None;
        self.on_demand.clear();
    }

    /// Replaces the transport (after a reboot) with a fresh connection.
    pub fn reconnect(&mut self) -> Result<()> {
        self.host = (self.connect)()?;
        self.invalidate();
        Ok(())
    }

    /// Runs on the host; live output goes to the progress view. A non-zero exit is returned, not an error.
    pub fn host_run(&self, cmd: Cmd) -> Result<Output> {
        run_live(self.host.as_ref(), &cmd, &self.live)
    }

    /// Runs on the host and fails, naming the command and its last stderr lines, unless it exits 0.
    pub fn host_ok(&self, cmd: Cmd) -> Result<Output> {
        let out = self.host_run(cmd.clone())?;
        ensure_ok(&format!("on {}", self.host.describe()), &cmd, out)
    }

    /// Runs inside the container (`pct exec`).
    pub fn ct_run(&self, cmd: Cmd) -> Result<Output> {
        run_live(&self.ct(), &cmd, &self.live)
    }

    pub fn ct_ok(&self, cmd: Cmd) -> Result<Output> {
        let out = self.ct_run(cmd.clone())?;
        ensure_ok(&format!("in CT {}", self.vmid()), &cmd, out)
    }

    /// [`Self::host_ok`] or [`Self::ct_ok`], by where a planned action runs.
    pub fn run_ok(&self, on: &Target, cmd: Cmd) -> Result<Output> {
        match on {
            Target::Host => self.host_ok(cmd),
            Target::Container(_) => self.ct_ok(cmd),
        }
    }

    /// Quiet probe inside the container: stdout when it exits 0, `None` otherwise.
    pub fn ct_probe(&self, argv: &[&str]) -> Result<Option<String>> {
        let out = self
            .ct()
            .run(&Cmd::new(argv.iter().copied()).timeout(Duration::from_secs(60)))?;
        Ok(out.success().then_some(out.stdout))
    }

    /// Quiet probe on the host.
    pub fn host_probe(&self, argv: &[&str]) -> Result<Option<String>> {
        let out = self
            .host
            .run(&Cmd::new(argv.iter().copied()).timeout(Duration::from_secs(60)))?;
        Ok(out.success().then_some(out.stdout))
    }

    /// Writes a host file atomically, after copying the old one (if any) to the run's backup folder.
    pub fn write_host_file(&self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        self.backup_host_file(path)?;
        if let Some((dir, _)) = path.rsplit_once('/')
            && !dir.is_empty()
        {
            let cmd = Cmd::new(["mkdir", "-p", "--", dir]);
            let out = self.host.run(&cmd)?;
            ensure_ok(&format!("on {}", self.host.describe()), &cmd, out)?;
        }
        self.host.write_file(path, data, mode)
    }

    /// Backs a host file up before it changes, for changes made by a command rather than by
    /// [`Self::write_host_file`] (`pct set` rewriting a container's config).
    pub fn backup_host_file(&self, path: &str) -> Result<()> {
        let backup = format!("{BACKUP_DIR}/{}/host{path}", self.stamp);
        backup_then(self.host.as_ref(), path, &backup)
    }

    /// Writes a container file atomically (`pct push` to a temp name, then `mv`), after a backup in the
    /// container's own backup folder. Secrets travel as file content, never in argv.
    pub fn write_ct_file(&self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let ct = self.ct();
        let backup = format!("{BACKUP_DIR}/{}{path}", self.stamp);
        backup_then(&ct, path, &backup)?;
        if let Some((dir, _)) = path.rsplit_once('/')
            && !dir.is_empty()
        {
            let out = ct.run(&Cmd::new(["mkdir", "-p", "--", dir]))?;
            ensure_ok(
                &format!("in CT {}", self.vmid()),
                &Cmd::new(["mkdir", "-p", dir]),
                out,
            )?;
        }
        ct.write_file(path, data, mode)
    }
}

/// Copies `path` to `backup` when it exists (cp -a keeps mode and owner), creating the backup's folder;
/// unless this run already backed it up: a file changed twice in one run keeps the backup of how it was
/// before the run, not of the run's own first change.
fn backup_then(t: &dyn Transport, path: &str, backup: &str) -> Result<()> {
    let exists = t.run(&Cmd::new(["test", "-e", path]))?.success();
    if !exists || t.run(&Cmd::new(["test", "-e", backup]))?.success() {
        return Ok(());
    }
    let dir = backup.rsplit_once('/').map(|(d, _)| d).unwrap_or("/");
    for cmd in [
        Cmd::new(["mkdir", "-p", "-m", "0700", "--", dir]),
        Cmd::new(["cp", "-a", "--", path, backup]),
    ] {
        let out = t.run(&cmd)?;
        ensure_ok(&format!("on {}", t.describe()), &cmd, out)
            .with_context(|| format!("cannot back up {path} before changing it"))?;
    }
    Ok(())
}

fn run_live(t: &dyn Transport, cmd: &Cmd, live: &Live) -> Result<Output> {
    let shown = cmd.display();
    live.command(&shown);
    t.run_streaming(cmd, &mut |stream, line| {
        live.line(stream == Stream::Stderr, line)
    })
}

/// Turns a non-zero exit into an error that names the command, where it ran, and the tail of its output.
pub fn ensure_ok(place: &str, cmd: &Cmd, out: Output) -> Result<Output> {
    if out.success() {
        return Ok(out);
    }
    let mut tail: Vec<&str> = out
        .stderr
        .lines()
        .chain(out.stdout.lines())
        .filter(|l| !l.trim().is_empty())
        .collect();
    if tail.len() > 8 {
        tail.drain(..tail.len() - 8);
    }
    let status = out
        .status
        .map_or_else(|| "was killed".to_string(), |c| format!("exited with {c}"));
    bail!(
        "`{}` {place} {status}:\n  {}",
        cmd.display(),
        if tail.is_empty() {
            "(no output)".to_string()
        } else {
            tail.join("\n  ")
        }
    )
}

/// `20261129-114233`: sortable, and safe in a path.
fn chrono_like_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a (year, month, day) in the proleptic Gregorian calendar (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_421), (2025, 11, 29));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn errors_name_the_command_and_the_output_tail() {
        let out = Output {
            status: Some(100),
            stdout: "Reading package lists...\n".into(),
            stderr: "E: Unable to locate package nvidia-driver-pinning-595\n".into(),
        };
        let err = ensure_ok(
            "on root@pve",
            &Cmd::new(["apt-get", "install", "-y", "nvidia-driver-pinning-595"]),
            out,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with(
                "`apt-get install -y nvidia-driver-pinning-595` on root@pve exited with 100"
            ),
            "{err}"
        );
        assert!(err.contains("E: Unable to locate package"), "{err}");
    }
}
