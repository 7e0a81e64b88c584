//! The host's steps: inventory, kernel headers, nouveau, NVIDIA's repository, the pinned driver, DKMS, the loaded
//! module (and the reboot it may need), and the device nodes at boot. Each `check` only reads; the pure
//! functions at the bottom decide, so they are unit-tested on facts.

use std::time::Duration;

use anyhow::{Context, Result};

use super::apply::{execute, execute_one};
use super::ctx::{Ctx, HOST_CACHE_DIR};
use super::step::{Action, Check, Step, Target};
use crate::host::facts::HostFacts;
use crate::host::{StepId, rules};
use crate::transport::Cmd;

const APT_TIMEOUT: Duration = Duration::from_secs(3600);
pub const NOUVEAU_CONF: &str = "/etc/modprobe.d/blacklist-nouveau.conf";
pub const NOUVEAU_TEXT: &str = "# Written by llmctl: nouveau must not take the GPU the NVIDIA driver needs.\nblacklist nouveau\noptions nouveau modeset=0\n";
pub const MODULES_LOAD_CONF: &str = "/etc/modules-load.d/nvidia.conf";
pub const MODULES_LOAD_TEXT: &str = "# Written by llmctl: load the NVIDIA modules at boot, uvm included (CUDA needs /dev/nvidia-uvm).\nnvidia\nnvidia_uvm\n";
pub const UDEV_RULE: &str = "/etc/udev/rules.d/70-nvidia.rules";
/// Creates the device nodes as soon as the modules load, so containers with devN entries can start at boot.
pub const UDEV_TEXT: &str = "# Written by llmctl: create /dev/nvidia* (uvm included) when the modules load.\nKERNEL==\"nvidia\", RUN+=\"/bin/bash -c '/usr/bin/nvidia-smi -L'\"\nKERNEL==\"nvidia_uvm\", RUN+=\"/bin/bash -c '/usr/bin/nvidia-modprobe -c0 -u'\"\n";

pub fn apt(args: &[&str]) -> Cmd {
    let mut argv = vec!["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"];
    argv.extend_from_slice(args);
    Cmd::new(argv).timeout(APT_TIMEOUT)
}

fn run(on: Target, argv: &[&str]) -> Action {
    Action::Run {
        on,
        cmd: Cmd::new(argv.iter().copied()),
    }
}

// ------------------------------------------------------------------------------------------------ inventory

pub struct Inventory;

impl Step<Ctx> for Inventory {
    fn id(&self) -> StepId {
        StepId::Inventory
    }
    fn title(&self) -> &'static str {
        "the host is a Proxmox VE host llmctl can provision"
    }
    fn check(&self, ctx: &mut Ctx) -> Result<Check> {
        let (version, open) = (
            ctx.cfg.driver.version.clone(),
            ctx.cfg.driver.flavor == super::config::DriverFlavor::Open,
        );
        let f = ctx.facts()?;
        Ok(inventory_check(f, &version, open))
    }
    fn apply(&self, ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
        execute(ctx, actions)
    }
}

pub fn inventory_check(f: &HostFacts, version: &str, open: bool) -> Check {
    let Some(pve) = &f.pve else {
        return Check::Refused(format!("{} is not a Proxmox VE host", f.target));
    };
    let Some(suite) = debian_suite(f) else {
        return Check::Refused(format!(
            "the host runs Debian {:?}: NVIDIA's repository has packages for Debian 12 and 13 (Proxmox VE 8 and 9)",
            f.os_release
                .get("VERSION_ID")
                .map(String::as_str)
                .unwrap_or("unknown")
        ));
    };
    // A driver that cannot run a GPU of this host is refused before anything changes (gpu-generations.md).
    if let Err(why) = rules::driver_fits_gpus(f, version, open) {
        return Check::Refused(why);
    }
    Check::Done(format!(
        "Proxmox VE {}, kernel {}, {suite}, {} GPU(s) visible to the driver",
        pve.version,
        f.kernel,
        f.gpus.len()
    ))
}

/// NVIDIA's repository name for the host's Debian release: `debian12`, `debian13`.
pub fn debian_suite(f: &HostFacts) -> Option<String> {
    suite_of(f.os_release.get("VERSION_ID").map(String::as_str))
}

pub fn suite_of(version_id: Option<&str>) -> Option<String> {
    match version_id?.trim_matches('"') {
        v @ ("12" | "13") => Some(format!("debian{v}")),
        _ => None,
    }
}

// ------------------------------------------------------------------------------------------------ headers

pub struct Headers;

impl Step<Ctx> for Headers {
    fn id(&self) -> StepId {
        StepId::Headers
    }
    fn title(&self) -> &'static str {
        "kernel headers for every installed kernel (DKMS builds against them)"
    }
    fn check(&self, ctx: &mut Ctx) -> Result<Check> {
        Ok(headers_check(ctx.facts()?))
    }
    fn apply(&self, ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
        execute(ctx, actions)
    }
}

pub fn headers_check(f: &HostFacts) -> Check {
    let missing: Vec<String> = rules::kernels_without_headers(f)
        .iter()
        .map(|k| rules::headers_package(f, k))
        .collect();
    if missing.is_empty() {
        return Check::Done(format!(
            "headers present for {}",
            rules::kernels(f).join(", ")
        ));
    }
    let mut args = vec!["install", "-y"];
    args.extend(missing.iter().map(String::as_str));
    Check::Changes(vec![Action::Run {
        on: Target::Host,
        cmd: apt(&args),
    }])
}

// ------------------------------------------------------------------------------------------------ nouveau

pub struct Nouveau;

impl Step<Ctx> for Nouveau {
    fn id(&self) -> StepId {
        StepId::Nouveau
    }
    fn title(&self) -> &'static str {
        "nouveau blacklisted"
    }
    fn check(&self, ctx: &mut Ctx) -> Result<Check> {
        let f = ctx.facts()?;
        if rules::nouveau_blacklist_line(&f.modprobe_nouveau).is_some() {
            return Ok(Check::Done("blacklisted in modprobe.d".into()));
        }
        let old = f.file(NOUVEAU_CONF).map(str::to_string);
        Ok(Check::Changes(vec![
            Action::WriteFile {
                on: Target::Host,
                path: NOUVEAU_CONF.into(),
                old,
                new: NOUVEAU_TEXT.into(),
                mode: 0o644,
            },
            run(Target::Host, &["update-initramfs", "-u", "-k", "all"]),
        ]))
    }
    fn apply(&self, ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
        execute(ctx, actions)
    }
}

// ------------------------------------------------------------------------------------------------ repo

/// NVIDIA's keyring package for a Debian release: it installs the key and the repository's sources file.
pub fn keyring_url(suite: &str) -> String {
    format!(
        "https://developer.download.nvidia.com/compute/cuda/repos/{suite}/x86_64/cuda-keyring_1.1-1_all.deb"
    )
}

pub fn repo_list_path(suite: &str) -> String {
    format!("/etc/apt/sources.list.d/cuda-{suite}-x86_64.list")
}

pub struct HostRepo;

impl Step<Ctx> for HostRepo {
    fn id(&self) -> StepId {
        StepId::Repo
    }
    fn title(&self) -> &'static str {
        "NVIDIA's apt repository for the host's Debian release"
    }
    fn check(&self, ctx: &mut Ctx) -> Result<Check> {
        let f = ctx.facts()?;
        let suite = debian_suite(f).context("unknown Debian release")?;
        let keyring = f.package("cuda-keyring").is_some_and(|p| p.installed());
        let list = repo_list_path(&suite);
        if keyring
            && f.file(&list)
                .is_some_and(|t| t.contains(&format!("/{suite}/")))
        {
            return Ok(Check::Done(format!("cuda-keyring installed, {list}")));
        }
        Ok(Check::Changes(keyring_actions(Target::Host, &suite)))
    }
    fn apply(&self, ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
        execute(ctx, actions)
    }
}

/// Download NVIDIA's keyring package on the host, install it (on the host, or pushed into the container), and
/// refresh the package lists.
pub fn keyring_actions(on: Target, suite: &str) -> Vec<Action> {
    let deb = format!("{HOST_CACHE_DIR}/{suite}/cuda-keyring_1.1-1_all.deb");
    let dir = format!("{HOST_CACHE_DIR}/{suite}");
    let url = keyring_url(suite);
    let mut actions = vec![
        run(Target::Host, &["mkdir", "-p", &dir]),
        run(Target::Host, &["curl", "-fsSL", "-o", &deb, &url]),
    ];
    match on {
        Target::Host => actions.push(run(Target::Host, &["dpkg", "-i", &deb])),
        Target::Container(vmid) => {
            let v = vmid.to_string();
            actions.push(run(
                Target::Host,
                &["pct", "push", &v, &deb, "/root/cuda-keyring_1.1-1_all.deb"],
            ));
            actions.push(run(
                on.clone(),
                &["dpkg", "-i", "/root/cuda-keyring_1.1-1_all.deb"],
            ));
        }
    }
    actions.push(Action::Run {
        on,
        cmd: apt(&["update"]),
    });
    actions
}

// ------------------------------------------------------------------------------------------------ driver

/// The host's driver packages at one exact version: the DKMS module and the user-space libraries, so the
/// libraries can never move away from the module.
pub fn host_driver_packages(open: bool) -> Vec<&'static str> {
    vec![
        if open {
            "nvidia-kernel-open-dkms"
        } else {
            "nvidia-kernel-dkms"
        },
        "nvidia-driver-cuda",
        "libcuda1",
        "libnvidia-ml1",
        "nvidia-persistenced",
        "nvidia-modprobe",
    ]
}

pub struct Driver;

impl Step<Ctx> for Driver {
    fn id(&self) -> StepId {
        StepId::Driver
    }
    fn title(&self) -> &'static str {
        "the NVIDIA driver at exactly the configured version, pinned and held"
    }
    fn check(&self, ctx: &mut Ctx) -> Result<Check> {
        let version = ctx.cfg.driver.version.clone();
        let open = ctx.cfg.driver.flavor == super::config::DriverFlavor::Open;
        Ok(driver_check(ctx.facts()?, &version, open))
    }
    fn apply(&self, ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
        execute(ctx, actions)
    }
}

pub fn driver_check(f: &HostFacts, version: &str, open: bool) -> Check {
    // An interrupted install first: apt refuses everything until dpkg finishes it (that runs the DKMS build the
    // Ctrl-C stopped), and only then can the packages be judged.
    let unfinished = rules::dpkg_interrupted(f);
    if !unfinished.is_empty() {
        let mut actions = vec![run(Target::Host, &["dpkg", "--configure", "-a"])];
        if let Check::Changes(more) = driver_check_finished(f, version, open) {
            actions.extend(more);
        }
        return Check::Changes(actions);
    }
    driver_check_finished(f, version, open)
}

/// [`driver_check`] once dpkg has nothing half-done.
fn driver_check_finished(f: &HostFacts, version: &str, open: bool) -> Check {
    // Debian's own packaging of the same driver is the same driver (issue 16 item 3): only the upstream version
    // must match, and holds pin it as they pin NVIDIA's.
    if let Some(pkgs) = rules::debian_driver_packages(f, open) {
        let off: Vec<&str> = pkgs
            .iter()
            .copied()
            .filter(|n| f.package(n).is_none_or(|p| p.upstream_version() != version))
            .collect();
        if !off.is_empty() {
            return Check::Refused(format!(
                "the host has Debian's own packaging of the NVIDIA driver, and {} is not at {version}. llmctl \
                 installs NVIDIA's packages and will not mix them with Debian's: set [driver] version to the \
                 version Debian installed, or remove Debian's driver (`apt-get purge {}`) and run provision again",
                off.join(", "),
                pkgs.join(" ")
            ));
        }
        let unheld = rules::unheld(f, &pkgs);
        if unheld.is_empty() {
            return Check::Done(format!("Debian's {} at {version}, held", pkgs.join(", ")));
        }
        let mut hold = vec!["apt-mark", "hold"];
        hold.extend(&unheld);
        return Check::Changes(vec![run(Target::Host, &hold)]);
    }
    let want = format!("{version}-1");
    let pkgs = host_driver_packages(open);
    let branch = version.split('.').next().unwrap_or(version);
    let pinning = format!("nvidia-driver-pinning-{branch}");
    let wrong: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|n| {
            !f.package(n)
                .is_some_and(|p| p.installed() && p.version == want)
        })
        .collect();
    let unheld: Vec<&str> = pkgs.iter().copied().filter(|n| !f.is_held(n)).collect();
    let other_pinning: Vec<String> = f
        .packages
        .iter()
        .filter(|p| {
            p.installed() && p.name.starts_with("nvidia-driver-pinning-") && p.name != pinning
        })
        .map(|p| p.name.clone())
        .collect();
    let pinned = f.package(&pinning).is_some_and(|p| p.installed());
    // The other flavour's module package would fight this one for the same module.
    let other_flavour = if open {
        "nvidia-kernel-dkms"
    } else {
        "nvidia-kernel-open-dkms"
    };
    let conflicting = f.package(other_flavour).is_some_and(|p| p.installed());
    // Holds keep the exact version (rules::unheld); the pinning package is installed with the driver, as
    // NVIDIA documents, but a driver already at the version and held needs nothing more.
    if wrong.is_empty() && unheld.is_empty() && other_pinning.is_empty() && !conflicting {
        return Check::Done(format!("{} at {want}, held", pkgs.join(", ")));
    }
    let mut actions = Vec::new();
    let mut remove: Vec<String> = other_pinning;
    if conflicting {
        remove.push(other_flavour.to_string());
    }
    // A held package at another version must be released first (lockstep upgrades and downgrades).
    let to_unhold: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|n| f.package(n).is_some_and(|p| p.held() && p.version != want))
        .collect();
    if !to_unhold.is_empty() {
        let mut argv = vec!["apt-mark", "unhold"];
        argv.extend(&to_unhold);
        actions.push(run(Target::Host, &argv));
    }
    if !remove.is_empty() {
        let mut args = vec!["remove", "-y"];
        args.extend(remove.iter().map(String::as_str));
        actions.push(Action::Run {
            on: Target::Host,
            cmd: apt(&args),
        });
    }
    if !pinned && !wrong.is_empty() {
        // NVIDIA: install the pinning package before the driver.
        actions.push(Action::Run {
            on: Target::Host,
            cmd: apt(&["install", "-y", &pinning]),
        });
    }
    let exact: Vec<String> = pkgs.iter().map(|n| format!("{n}={want}")).collect();
    if !wrong.is_empty() {
        let mut sim = vec![
            "-s",
            "install",
            "--no-install-recommends",
            "--allow-downgrades",
        ];
        sim.extend(exact.iter().map(String::as_str));
        actions.push(Action::AptProof {
            on: Target::Host,
            cmd: apt(&sim),
            version: version.to_string(),
            forbidden: Vec::new(),
        });
        let mut install = vec![
            "install",
            "-y",
            "--no-install-recommends",
            "--allow-downgrades",
            "--allow-change-held-packages",
        ];
        install.extend(exact.iter().map(String::as_str));
        actions.push(Action::Run {
            on: Target::Host,
            cmd: apt(&install),
        });
    }
    let mut hold = vec!["apt-mark", "hold"];
    hold.extend(&pkgs);
    actions.push(run(Target::Host, &hold));
    Check::Changes(actions)
}

/// Reads `apt-get -s install` output: every NVIDIA package it would install must be at exactly `<version>-1`,
/// and none may match `forbidden` (kernel module packages inside a container).
pub fn simulation_pins_exactly(
    out: &str,
    version: &str,
    forbidden: &[&str],
) -> std::result::Result<(), String> {
    let want = format!("{version}-1");
    let mut seen = 0;
    for line in out.lines() {
        let Some(rest) = line.strip_prefix("Inst ") else {
            continue;
        };
        seen += 1;
        let name = rest.split_whitespace().next().unwrap_or("");
        // `Inst name [old] (new origin [arch])`: the new version is the first word after '('.
        let new = rest
            .split_once('(')
            .and_then(|(_, r)| r.split_whitespace().next())
            .unwrap_or("");
        if forbidden.iter().any(|p| glob_match(p, name)) {
            return Err(format!(
                "the installation would pull in {name} {new}, a kernel module package"
            ));
        }
        let nvidia = name.starts_with("nvidia-")
            || name.starts_with("libnvidia-")
            || name.starts_with("libcuda")
            || name.starts_with("firmware-nvidia");
        if nvidia && !name.starts_with("nvidia-driver-pinning-") && new != want {
            return Err(format!("the simulation installs {name} {new}, not {want}"));
        }
    }
    if seen == 0 {
        return Err("the simulation installs nothing".into());
    }
    Ok(())
}

fn glob_match(pattern: &str, name: &str) -> bool {
    match (pattern.strip_prefix('*'), pattern.strip_suffix('*')) {
        (Some(suffix), _) => name.ends_with(suffix),
        (_, Some(prefix)) => name.starts_with(prefix),
        _ => name == pattern,
    }
}

// ------------------------------------------------------------------------------------------------ dkms

pub struct Dkms;

impl Step<Ctx> for Dkms {
    fn id(&self) -> StepId {
        StepId::Dkms
    }
    fn title(&self) -> &'static str {
        "the NVIDIA module built and installed by DKMS for every installed kernel"
    }
    fn check(&self, ctx: &mut Ctx) -> Result<Check> {
        let version = ctx.cfg.driver.version.clone();
        Ok(dkms_check(ctx.facts()?, &version))
    }
    fn apply(&self, ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
        let version = ctx.cfg.driver.version.clone();
        for a in actions {
            if let Err(e) = execute_one(ctx, a) {
                // The kernel this build was for (issue 16 item 6: not the running one, which may work fine).
                let kernel = match a {
                    Action::Run { cmd, .. } => cmd
                        .argv
                        .iter()
                        .skip_while(|x| *x != "-k")
                        .nth(1)
                        .cloned()
                        .unwrap_or_default(),
                    _ => String::new(),
                };
                let branch: u32 = version
                    .split('.')
                    .next()
                    .and_then(|b| b.parse().ok())
                    .unwrap_or(0);
                let hint = if branch < 570 {
                    format!(
                        " Driver {version} is probably too old for kernel {kernel}: choose a newer driver in \
                         llmctl.toml, or keep booting the kernel it works on and pin it (`proxmox-boot-tool kernel \
                         pin`) and remove {kernel}"
                    )
                } else {
                    String::new()
                };
                return Err(e.context(format!(
                    "DKMS could not build the NVIDIA module for kernel {kernel}.{hint} (the build log is in \
                     /var/lib/dkms/nvidia/{version}/build/make.log)"
                )));
            }
        }
        ctx.invalidate();
        Ok(())
    }
}

pub fn dkms_check(f: &HostFacts, version: &str) -> Check {
    let missing = rules::kernels_without_module(f, Some(version));
    // A build known to fail is refused in the plan, naming the kernel it fails for (issue 16 item 6).
    if let Some(why) = missing
        .iter()
        .find_map(|k| rules::known_build_failure(version, k))
    {
        return Check::Refused(format!(
            "{why}. Choose a newer driver in llmctl.toml, or keep the kernel it works on: `proxmox-boot-tool \
             kernel pin {}` and remove the newer kernel",
            f.kernel
        ));
    }
    if missing.is_empty() {
        return Check::Done(format!(
            "nvidia/{version} installed for {}",
            rules::kernels(f).join(", ")
        ));
    }
    Check::Changes(
        missing
            .iter()
            .map(|k| Action::Run {
                on: Target::Host,
                cmd: Cmd::new([
                    "dkms",
                    "install",
                    "-m",
                    "nvidia",
                    "-v",
                    version,
                    "-k",
                    k.as_str(),
                ])
                .timeout(Duration::from_secs(1800)),
            })
            .collect(),
    )
}

// ------------------------------------------------------------------------------------------------ module

pub struct Module;

impl Step<Ctx> for Module {
    fn id(&self) -> StepId {
        StepId::Module
    }
    fn title(&self) -> &'static str {
        "the loaded kernel module is the installed driver"
    }
    fn check(&self, ctx: &mut Ctx) -> Result<Check> {
        let version = ctx.cfg.driver.version.clone();
        let open = ctx.cfg.driver.flavor == super::config::DriverFlavor::Open;
        let allow = ctx.allow_reboot;
        Ok(module_check(ctx.facts()?, &version, open, allow))
    }
    fn apply(&self, ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
        execute(ctx, actions)
    }
}

pub fn module_check(f: &HostFacts, version: &str, open: bool, allow_reboot: bool) -> Check {
    use crate::pve::nvidia::ModuleFlavour;
    // Loading would fail: only a person at the console can enroll the key.
    if let Some(why) = rules::secure_boot_blocks(f) {
        return Check::Refused(why);
    }
    let want = if open {
        ModuleFlavour::Open
    } else {
        ModuleFlavour::Proprietary
    };
    let loaded = f.module.as_ref();
    if let Some(m) = loaded
        && m.version == version
        && m.flavour == want
    {
        return Check::Done(format!(
            "NVIDIA module {version} ({}) loaded",
            rules::flavour_name(want)
        ));
    }
    let nouveau = f.has_module("nouveau");
    let why = match (loaded, nouveau) {
        // Issue 16 item 7: the packages were swapped, but the old flavour's module still runs until a reboot.
        (Some(m), _) if m.version == version => Some(format!(
            "the running kernel has the {} NVIDIA module loaded and the installed driver is the {} one",
            rules::flavour_name(m.flavour),
            rules::flavour_name(want)
        )),
        (Some(m), _) => Some(format!(
            "the running kernel has NVIDIA module {} loaded and the installed driver is {version}",
            m.version
        )),
        (None, true) => {
            Some("nouveau has the GPU; the blacklist takes effect at the next boot".to_string())
        }
        (None, false) => None,
    };
    match why {
        None => Check::Changes(vec![
            run(Target::Host, &["modprobe", "nvidia"]),
            run(Target::Host, &["modprobe", "nvidia_uvm"]),
            run(Target::Host, &["nvidia-modprobe", "-c0", "-u"]),
        ]),
        Some(why) if allow_reboot => Check::Changes(vec![Action::Reboot { why }]),
        Some(why) => Check::Refused(format!(
            "a reboot is needed: {why}. Containers with onboot: 1 start again by themselves. Reboot the host \
             (`reboot`) and run provision again, or run it with --reboot to do both"
        )),
    }
}

// ------------------------------------------------------------------------------------------------ devices-at-boot

pub struct DevicesAtBoot;

impl Step<Ctx> for DevicesAtBoot {
    fn id(&self) -> StepId {
        StepId::DevicesAtBoot
    }
    fn title(&self) -> &'static str {
        "/dev/nvidia* (uvm included) present now and after every boot"
    }
    fn check(&self, ctx: &mut Ctx) -> Result<Check> {
        let f = ctx.facts()?;
        let modules_load = f.file(MODULES_LOAD_CONF).map(str::to_string);
        let udev = f.file(UDEV_RULE).map(str::to_string);
        Ok(devices_at_boot_check(f, modules_load, udev))
    }
    fn apply(&self, ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
        execute(ctx, actions)
    }
}

pub fn devices_at_boot_check(
    f: &HostFacts,
    modules_load: Option<String>,
    udev: Option<String>,
) -> Check {
    let mut actions = Vec::new();
    let at_boot = rules::uvm_at_boot(f);
    if at_boot.is_err() && !rules::uvm_loaded_at_boot(f) {
        actions.push(Action::WriteFile {
            on: Target::Host,
            path: MODULES_LOAD_CONF.into(),
            old: modules_load,
            new: MODULES_LOAD_TEXT.into(),
            mode: 0o644,
        });
    }
    if rules::uvm_udev_line(f).is_none() {
        actions.push(Action::WriteFile {
            on: Target::Host,
            path: UDEV_RULE.into(),
            old: udev,
            new: UDEV_TEXT.into(),
            mode: 0o644,
        });
    }
    let node = |p: &str| f.dev_nodes.iter().any(|n| n.path == p && n.kind == 'c');
    let gpu_node = f
        .dev_nodes
        .iter()
        .any(|n| n.kind == 'c' && rules::is_gpu_node(&n.path));
    if f.module.is_some() && !(node("/dev/nvidiactl") && gpu_node) {
        // The control node and one per GPU; nvidia-smi creates the nodes of every GPU it finds.
        actions.push(run(Target::Host, &["nvidia-modprobe", "-c0"]));
        actions.push(run(Target::Host, &["nvidia-smi", "-L"]));
    }
    let uvm_now = node("/dev/nvidia-uvm") && node("/dev/nvidia-uvm-tools");
    if f.module.is_some() && !uvm_now {
        actions.push(run(Target::Host, &["modprobe", "nvidia_uvm"]));
        actions.push(run(Target::Host, &["nvidia-modprobe", "-c0", "-u"]));
    }
    if actions.is_empty() {
        Check::Done(
            "nvidia_uvm loads at boot, the udev rule creates its nodes, and they exist".into(),
        )
    } else {
        Check::Changes(actions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_apt_simulation_must_install_exactly_the_version() {
        let ok = "Inst nvidia-kernel-open-dkms (595.71.05-1 cuda-debian13-x86_64 [amd64])\nInst libcuda1 [590.48.01-1] (595.71.05-1 cuda-debian13-x86_64 [amd64])\nInst dkms (3.2.2-1 Debian:13 [all])\nConf libcuda1 (595.71.05-1 cuda-debian13-x86_64 [amd64])\n";
        assert_eq!(simulation_pins_exactly(ok, "595.71.05", &[]), Ok(()));
        let drift = "Inst libcuda1 (595.71.05-1 x [amd64])\nInst libnvidia-gpucomp (600.10.01-1 x [amd64])\n";
        let err = simulation_pins_exactly(drift, "595.71.05", &[]).unwrap_err();
        assert!(err.contains("libnvidia-gpucomp 600.10.01-1"), "{err}");
        let kernel = "Inst nvidia-kernel-open-dkms (595.71.05-1 x [amd64])\n";
        let err = simulation_pins_exactly(kernel, "595.71.05", &["nvidia-kernel-*", "*-dkms"])
            .unwrap_err();
        assert!(err.contains("kernel module package"), "{err}");
        assert!(simulation_pins_exactly("0 upgraded\n", "595.71.05", &[]).is_err());
    }

    #[test]
    fn suites() {
        assert_eq!(suite_of(Some("13")).as_deref(), Some("debian13"));
        assert_eq!(suite_of(Some("\"12\"")).as_deref(), Some("debian12"));
        assert_eq!(suite_of(Some("11")), None);
    }

    /// Issue 16 item 7: a swap of the packages from the proprietary to the open flavour is done only once the
    /// open module runs.
    #[test]
    fn the_module_step_wants_the_configured_flavour_loaded() {
        use crate::pve::nvidia::{LoadedModule, ModuleFlavour};
        let mut f = HostFacts {
            module: Some(LoadedModule {
                version: "595.71.05".into(),
                flavour: ModuleFlavour::Proprietary,
                line: String::new(),
            }),
            ..HostFacts::default()
        };
        assert!(matches!(
            module_check(&f, "595.71.05", false, false),
            Check::Done(_)
        ));
        match module_check(&f, "595.71.05", true, false) {
            Check::Refused(why) => assert!(
                why.contains("proprietary NVIDIA module loaded") && why.contains("open one"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            module_check(&f, "595.71.05", true, true),
            Check::Changes(a) if matches!(a[..], [Action::Reboot { .. }])
        ));
        f.module.as_mut().unwrap().flavour = ModuleFlavour::Open;
        assert!(matches!(
            module_check(&f, "595.71.05", true, false),
            Check::Done(_)
        ));
    }

    /// Issue 16 item 3: Debian's own packaging of the configured driver is that driver.
    #[test]
    fn debians_packaging_of_the_same_driver_is_done() {
        let dpkg = |status: &str| {
            crate::pve::packages::parse_dpkg_query(&format!(
                "nvidia-open-kernel-dkms\t595.71.05-2\t{status}\nnvidia-smi\t595.71.05-2\t{status}\n\
                 libcuda1\t595.71.05-2\t{status}\nlibnvidia-ml1\t595.71.05-2\t{status}\n"
            ))
        };
        let held = HostFacts {
            packages: dpkg("hi "),
            ..HostFacts::default()
        };
        assert!(matches!(
            driver_check(&held, "595.71.05", true),
            Check::Done(_)
        ));
        assert!(
            matches!(driver_check(&held, "595.71.08", true), Check::Refused(w) if w.contains("Debian"))
        );
        let unheld = HostFacts {
            packages: dpkg("ii "),
            ..HostFacts::default()
        };
        match driver_check(&unheld, "595.71.05", true) {
            Check::Changes(a) => assert_eq!(
                a.iter().map(Action::render).collect::<Vec<_>>(),
                [
                    "[host] $ apt-mark hold nvidia-open-kernel-dkms nvidia-smi libcuda1 libnvidia-ml1"
                ]
            ),
            other => panic!("{other:?}"),
        }
    }
}
