//! The container's steps: created when missing, GPU devices passed in (`devN`), running and able to start
//! again, NVIDIA's repository for its own Debian release, user-space libraries at exactly the host's driver
//! version, the CUDA toolkit the driver supports, the llmctl binary, llama.cpp built for the GPUs' architecture,
//! the model, and the two services.

use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::apply::execute;
use super::ctx::Ctx;
use super::host::{apt, keyring_actions, repo_list_path, suite_of};
use super::step::{Action, Check, Step, Target};
use super::units;
use crate::host::StepId;
use crate::host::facts::{CtStatus, HostFacts, InsideFacts, Installed, OnDemand};
use crate::host::rules::{is_gpu_node, wanted_devices};
use crate::pve::lxc::{self, LxcConfig};
use crate::transport::Cmd;

/// The user-space packages a container needs: no kernel module, no DKMS.
pub const CT_LIB_PACKAGES: &[&str] = &["nvidia-driver-cuda", "libcuda1", "libnvidia-ml1"];
/// What must never be installed inside a container (it would try to build a kernel module there).
pub const CT_FORBIDDEN: &[&str] = &["nvidia-kernel-*", "*-dkms", "firmware-nvidia-gsp"];
const BUILD_TIMEOUT: Duration = Duration::from_secs(3 * 3600);
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(12 * 3600);
pub const BUILD_DEPS: &[&str] = &["build-essential", "cmake", "git", "ca-certificates"];

fn ct(ctx: &Ctx) -> Target {
    Target::Container(ctx.vmid())
}

fn run_on(on: Target, argv: &[&str]) -> Action {
    Action::Run {
        on,
        cmd: Cmd::new(argv.iter().copied()),
    }
}

/// The container's inside facts, or the plan's placeholder when it is not running yet (apply mode never gets
/// here without a running container: the `start` step comes first).
fn inside<'a>(
    f: &'a HostFacts,
    what: &str,
    vmid: u32,
) -> std::result::Result<&'a InsideFacts, Check> {
    match f.container.as_ref().and_then(|c| c.inside.as_ref()) {
        Some(i) => Ok(i),
        None => Err(Check::Changes(vec![Action::Deferred {
            on: Target::Container(vmid),
            what: format!("{what} (once the container runs)"),
        }])),
    }
}

/// What the container round found at the configuration's paths. [`Ctx::facts`] always gathers them for a running
/// container, so their absence is a bug, not a state of the host.
fn installed(inside: &InsideFacts) -> Result<&Installed> {
    inside
        .installed
        .as_ref()
        .context("internal: the container's facts were gathered without llmctl.toml's paths")
}

// ------------------------------------------------------------------------------------------------ create

pub struct Create;

impl Step<Ctx> for Create {
    fn id(&self) -> StepId {
        StepId::Container
    }
    fn title(&self) -> &'static str {
        "the container exists"
    }
    fn check(&self, ctx: &mut Ctx) -> Result<Check> {
        let vmid = ctx.vmid();
        let argv = create_argv(&ctx.cfg, vmid);
        let f = ctx.facts()?;
        if let Some(c) = f.configs.get(&vmid) {
            return Ok(Check::Done(format!(
                "CT {vmid} exists ({})",
                c.get("hostname").unwrap_or("no hostname")
            )));
        }
        Ok(Check::Changes(vec![Action::Run {
            on: Target::Host,
            cmd: Cmd::new(argv).timeout(Duration::from_secs(1800)),
        }]))
    }
    fn apply(&self, ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
        execute(ctx, actions)
    }
}

/// `pct create` as the guide's 103.conf: Debian template, cores, memory, disk, nesting, network.
pub fn create_argv(cfg: &super::config::ProvisionConfig, vmid: u32) -> Vec<String> {
    let c = &cfg.container;
    let mut argv: Vec<String> = vec![
        "pct".into(),
        "create".into(),
        vmid.to_string(),
        c.template.clone(),
    ];
    for (k, v) in [
        ("hostname", c.hostname.clone()),
        ("cores", c.cores.to_string()),
        ("memory", c.memory_mib.to_string()),
        ("swap", c.swap_mib.to_string()),
        ("rootfs", format!("{}:{}", c.storage, c.disk_gib)),
        ("net0", c.net0.clone()),
        ("features", "nesting=1".into()),
        ("unprivileged", u8::from(c.unprivileged).to_string()),
        ("onboot", u8::from(c.onboot).to_string()),
        ("ostype", "debian".into()),
    ] {
        argv.push(format!("--{k}"));
        argv.push(v);
    }
    argv
}

// ------------------------------------------------------------------------------------------------ devices

pub struct Devices;

/// Debian's `video` group (base-passwd, fixed gid 44): the group the devices get inside the container.
pub const VIDEO_GID: u32 = 44;

impl Step<Ctx> for Devices {
    fn id(&self) -> StepId {
        StepId::Devices
    }
    fn title(&self) -> &'static str {
        "GPU device nodes passed into the container (devN entries)"
    }
    fn check(&self, ctx: &mut Ctx) -> Result<Check> {
        let vmid = ctx.vmid();
        let f = ctx.facts()?;
        if !f.configs.contains_key(&vmid) {
            return Ok(Check::Changes(vec![Action::Deferred {
                on: Target::Host,
                what: format!("add devN entries for the GPU to CT {vmid} once it exists"),
            }]));
        };
        let running = matches!(
            f.container.as_ref().map(|c| &c.status),
            Some(CtStatus::Running)
        );
        // The host round read the config exactly as on disk: a rewrite keeps every other byte.
        let (Some(cfg), Some(text)) = (f.configs.get(&vmid), f.config_texts.get(&vmid)) else {
            bail!("internal: the facts hold CT {vmid}'s config but not its text");
        };
        Ok(devices_check(f, cfg, text, vmid, running))
    }
    fn apply(&self, ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
        execute(ctx, actions)
    }
}

pub fn devices_check(
    f: &HostFacts,
    cfg: &LxcConfig,
    text: &str,
    vmid: u32,
    running: bool,
) -> Check {
    // A lock means a backup, snapshot or migration holds the container: changing it now is unsafe.
    if let Some(lock) = cfg.lock() {
        return Check::Refused(format!(
            "CT {vmid} is locked ({lock}): Proxmox refuses changes while a {lock} task holds it. Wait for it to \
             finish, or if none runs (`ps aux | grep -E 'vzdump|pct'`), `pct unlock {vmid}`; then run again"
        ));
    }
    // Hand-written legacy passthrough (lxc.cgroup2 majors + bind mounts) is replaced by devN entries, which
    // Proxmox keeps right at every start (the uvm major is dynamic).
    let (stripped, removed) = crate::host::rules::legacy_passthrough(f, text);
    // Issue 16 item 5: a devN for a GPU the host no longer has (removed, or renumbered) makes `pct start` fail
    // with `Device /dev/nvidiaN does not exist`. Known only while the driver runs (its nodes exist then).
    let gone: Vec<(u32, String)> = if f.module.is_some() {
        cfg.devices()
            .into_iter()
            .filter(|(_, d)| is_gpu_node(&d.path) && !f.dev_nodes.iter().any(|n| n.path == d.path))
            .map(|(i, d)| (i, d.path))
            .collect()
    } else {
        Vec::new()
    };
    // Pending devN (PVE 8: added while the container ran) are configured: a restart applies them.
    let have: Vec<String> = cfg
        .devices_with_pending()
        .into_iter()
        .map(|(_, d)| d.path)
        .filter(|p| !gone.iter().any(|(_, g)| g == p))
        .collect();
    let missing: Vec<String> = wanted_devices(f)
        .into_iter()
        .filter(|p| !have.contains(p))
        .collect();
    // devN nodes appear inside at container start: one started before the host had them needs a restart.
    let inside_nodes: Vec<&str> = f
        .container
        .as_ref()
        .and_then(|c| c.inside.as_ref())
        .map(|i| i.dev_nodes.iter().map(|n| n.path.as_str()).collect())
        .unwrap_or_default();
    let stale = running && have.iter().any(|p| !inside_nodes.contains(&p.as_str()));
    let mut actions = Vec::new();
    if missing.is_empty() && removed.is_empty() && gone.is_empty() {
        if stale {
            return Check::Changes(vec![run_on(
                Target::Host,
                &["pct", "reboot", &vmid.to_string()],
            )]);
        }
        return Check::Done(format!("{} passed in", have.join(", ")));
    }
    if !removed.is_empty() {
        actions.push(Action::WriteFile {
            on: Target::Host,
            path: format!("/etc/pve/lxc/{vmid}.conf"),
            old: Some(text.to_string()),
            new: stripped,
            mode: 0o640,
        });
    }
    // After the rewrite above (which keeps devN lines), so the deletion is not written back.
    if !gone.is_empty() {
        let keys: Vec<String> = gone.iter().map(|(i, _)| format!("dev{i}")).collect();
        actions.push(Action::Backup {
            on: Target::Host,
            path: format!("/etc/pve/lxc/{vmid}.conf"),
        });
        actions.push(run_on(
            Target::Host,
            &["pct", "set", &vmid.to_string(), "--delete", &keys.join(",")],
        ));
    }
    if missing.is_empty() {
        if running {
            actions.push(run_on(Target::Host, &["pct", "reboot", &vmid.to_string()]));
        }
        return Check::Changes(actions);
    }
    // Keep the group the existing entries use; else the container's `video` group.
    let gid = cfg
        .devices()
        .into_iter()
        .find_map(|(_, d)| d.gid)
        .unwrap_or(VIDEO_GID);
    let paths: Vec<&str> = missing.iter().map(String::as_str).collect();
    // `pct set` rewrites the config itself: back it up first, outside /etc/pve (pmxcfs would replicate a copy
    // kept inside it).
    actions.push(Action::Backup {
        on: Target::Host,
        path: format!("/etc/pve/lxc/{vmid}.conf"),
    });
    actions.push(Action::Run {
        on: Target::Host,
        cmd: Cmd::new(lxc::pct_set_device_args(cfg, vmid, &paths, Some(gid))),
    });
    if running {
        // New devN entries take effect at the next start.
        actions.push(run_on(Target::Host, &["pct", "reboot", &vmid.to_string()]));
    }
    Check::Changes(actions)
}

// ------------------------------------------------------------------------------------------------ start

pub struct Start;

impl Step<Ctx> for Start {
    fn id(&self) -> StepId {
        StepId::Start
    }
    fn title(&self) -> &'static str {
        "the container runs, and can start again (no immutable resolv.conf)"
    }
    fn check(&self, ctx: &mut Ctx) -> Result<Check> {
        let vmid = ctx.vmid();
        let f = ctx.facts()?;
        let Some(c) = f.container.as_ref() else {
            return Ok(Check::Changes(vec![run_on(
                Target::Host,
                &["pct", "start", &vmid.to_string()],
            )]));
        };
        let immutable = crate::host::rules::resolv_immutable(f).is_some();
        let v = vmid.to_string();
        let mut actions = Vec::new();
        match (&c.status, immutable) {
            (CtStatus::Running, false) => {
                return Ok(Check::Done(format!("CT {vmid} is running")));
            }
            (CtStatus::Running, true) => {
                // Keep the user's DNS: Proxmox leaves resolv.conf alone when this marker exists.
                actions.push(run_on(ct(ctx), &["chattr", "-i", "/etc/resolv.conf"]));
                actions.push(run_on(ct(ctx), &["touch", "/etc/.pve-ignore.resolv.conf"]));
            }
            (_, true) => {
                let root = format!("/var/lib/lxc/{vmid}/rootfs");
                actions.push(run_on(Target::Host, &["pct", "mount", &v]));
                actions.push(run_on(
                    Target::Host,
                    &["chattr", "-i", &format!("{root}/etc/resolv.conf")],
                ));
                actions.push(run_on(
                    Target::Host,
                    &["touch", &format!("{root}/etc/.pve-ignore.resolv.conf")],
                ));
                actions.push(run_on(Target::Host, &["pct", "unmount", &v]));
                actions.push(run_on(Target::Host, &["pct", "start", &v]));
            }
            (_, false) => actions.push(run_on(Target::Host, &["pct", "start", &v])),
        }
        Ok(Check::Changes(actions))
    }
    fn apply(&self, ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
        execute(ctx, actions)
    }
}

// ------------------------------------------------------------------------------------------------ ct repo

pub struct CtRepo;

impl Step<Ctx> for CtRepo {
    fn id(&self) -> StepId {
        StepId::CtRepo
    }
    fn title(&self) -> &'static str {
        "NVIDIA's apt repository for the container's own Debian release"
    }
    fn check(&self, ctx: &mut Ctx) -> Result<Check> {
        let vmid = ctx.vmid();
        let f = ctx.facts()?;
        let inside = match inside(f, "add NVIDIA's repository", vmid) {
            Ok(i) => i,
            Err(c) => return Ok(c),
        };
        let suite = suite_of(inside.os_release.get("VERSION_ID").map(String::as_str))
            .context("the container runs a Debian release NVIDIA's repository has no packages for (12 and 13 only)")?;
        let list = repo_list_path(&suite);
        let keyring = inside.cuda_package_installed("cuda-keyring");
        let listed = inside.file(&list);
        if keyring && listed.is_some_and(|t| t.contains(&format!("/{suite}/"))) {
            return Ok(Check::Done(format!("cuda-keyring installed, {list}")));
        }
        Ok(Check::Changes(keyring_actions(
            Target::Container(vmid),
            &suite,
        )))
    }
    fn apply(&self, ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
        execute(ctx, actions)
    }
}

// ------------------------------------------------------------------------------------------------ ct libs

pub struct CtLibs;

impl Step<Ctx> for CtLibs {
    fn id(&self) -> StepId {
        StepId::CtLibs
    }
    fn title(&self) -> &'static str {
        "user-space driver libraries in the container at exactly the host's version, held"
    }
    fn check(&self, ctx: &mut Ctx) -> Result<Check> {
        let vmid = ctx.vmid();
        let version = ctx.cfg.driver.version.clone();
        let f = ctx.facts()?;
        let inside = match inside(f, "install the driver's user-space libraries", vmid) {
            Ok(i) => i,
            Err(c) => return Ok(c),
        };
        Ok(ct_libs_check(inside, &version, vmid))
    }
    fn apply(&self, ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
        execute(ctx, actions)
    }
}

pub fn ct_libs_check(inside: &InsideFacts, version: &str, vmid: u32) -> Check {
    let want = format!("{version}-1");
    let pkg = |n: &str| inside.packages.iter().find(|p| p.name == n);
    let wrong = crate::host::rules::libs_not_at(&inside.packages, CT_LIB_PACKAGES, version);
    let unheld: Vec<&str> = CT_LIB_PACKAGES
        .iter()
        .copied()
        .filter(|n| !pkg(n).is_some_and(|p| p.held()) && !inside.holds.iter().any(|h| h == n))
        .collect();
    if wrong.is_empty() && unheld.is_empty() {
        return Check::Done(format!("{} at {want}, held", CT_LIB_PACKAGES.join(", ")));
    }
    let on = Target::Container(vmid);
    let mut actions = Vec::new();
    let to_unhold: Vec<&str> = CT_LIB_PACKAGES
        .iter()
        .copied()
        .filter(|n| wrong.contains(n) && pkg(n).is_some_and(|p| p.held()))
        .collect();
    if !to_unhold.is_empty() {
        let mut argv = vec!["apt-mark", "unhold"];
        argv.extend(&to_unhold);
        actions.push(run_on(on.clone(), &argv));
    }
    if !wrong.is_empty() {
        let exact: Vec<String> = CT_LIB_PACKAGES
            .iter()
            .map(|n| format!("{n}={want}"))
            .collect();
        let mut sim = vec![
            "-s",
            "install",
            "--no-install-recommends",
            "--allow-downgrades",
        ];
        sim.extend(exact.iter().map(String::as_str));
        actions.push(Action::AptProof {
            on: on.clone(),
            cmd: apt(&sim),
            version: version.to_string(),
            forbidden: CT_FORBIDDEN.iter().map(|p| p.to_string()).collect(),
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
            on: on.clone(),
            cmd: apt(&install),
        });
    }
    let mut hold = vec!["apt-mark", "hold"];
    hold.extend(CT_LIB_PACKAGES);
    actions.push(run_on(on, &hold));
    Check::Changes(actions)
}

// ------------------------------------------------------------------------------------------------ cuda

pub struct Cuda;

impl Step<Ctx> for Cuda {
    fn id(&self) -> StepId {
        StepId::Cuda
    }
    fn title(&self) -> &'static str {
        "the CUDA toolkit the driver supports, in the container"
    }
    fn check(&self, ctx: &mut Ctx) -> Result<Check> {
        let vmid = ctx.vmid();
        let version = ctx.cfg.driver.version.clone();
        let f = ctx.facts()?;
        let inside = match inside(f, "install the CUDA toolkit", vmid) {
            Ok(i) => i,
            Err(c) => return Ok(c),
        };
        let cuda = cuda_version(f, &version)?;
        let pkg = cuda_package(&cuda);
        let nvcc = nvcc_path(&cuda);
        let installed = inside.cuda_package_installed(&pkg);
        let works = inside.nvcc.get(&nvcc) == Some(&cuda);
        if installed && works {
            return Ok(Check::Done(format!("{pkg} installed, {nvcc} works")));
        }
        Ok(Check::Changes(vec![Action::Run {
            on: Target::Container(vmid),
            cmd: apt(&["install", "-y", "--no-install-recommends", &pkg]),
        }]))
    }
    fn apply(&self, ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
        execute(ctx, actions)
    }
}

/// The newest CUDA the driver supports: what the host's `nvidia-smi` says (`CUDA Version: 13.2`), else NVIDIA's
/// table of driver branches.
pub fn cuda_version(f: &HostFacts, driver: &str) -> Result<String> {
    let newest = driver_cuda_version(f, driver)?;
    // CUDA 13 cannot build for a GPU older than sm_75 (Maxwell, Pascal, Volta): 12.9 is their last toolkit, and
    // the driver runs it (a driver supports every older toolkit).
    let gpus = crate::host::rules::gpus(f);
    if crate::gpu::newest_cuda_major(&gpus) == Some(12) && !newest.starts_with("12.") {
        return Ok("12.9".into());
    }
    Ok(newest)
}

/// The newest CUDA the driver supports.
fn driver_cuda_version(f: &HostFacts, driver: &str) -> Result<String> {
    if let Some(crate::pve::nvidia::SmiReport::Ok {
        cuda_version: Some(v),
        driver_version,
    }) = &f.smi
        && driver_version == driver
    {
        return Ok(v.clone());
    }
    let branch: u32 = driver
        .split('.')
        .next()
        .and_then(|b| b.parse().ok())
        .unwrap_or(0);
    let v = match branch {
        595.. => "13.2",
        590..=594 => "13.1",
        580..=589 => "13.0",
        575..=579 => "12.9",
        570..=574 => "12.8",
        565..=569 => "12.7",
        560..=564 => "12.6",
        550..=559 => "12.4",
        535..=549 => "12.2",
        _ => bail!("driver {driver} is older than llmctl supports (535 or newer)"),
    };
    Ok(v.to_string())
}

/// `13.2` → `cuda-toolkit-13-2`: the versioned meta-package (never `cuda`, which pulls a driver in).
pub fn cuda_package(cuda: &str) -> String {
    format!("cuda-toolkit-{}", cuda.replace('.', "-"))
}

pub fn nvcc_path(cuda: &str) -> String {
    format!("/usr/local/cuda-{cuda}/bin/nvcc")
}

// ------------------------------------------------------------------------------------------------ llmctl

pub struct LlmctlBinary;

impl Step<Ctx> for LlmctlBinary {
    fn id(&self) -> StepId {
        StepId::Llmctl
    }
    fn title(&self) -> &'static str {
        "this llmctl binary installed in the container (serve-proxy, downloads)"
    }
    fn check(&self, ctx: &mut Ctx) -> Result<Check> {
        let vmid = ctx.vmid();
        let local = sha256_file(&ctx.llmctl_binary)?;
        let f = ctx.facts()?;
        let inside = match inside(f, "install llmctl", vmid) {
            Ok(i) => i,
            Err(c) => return Ok(c),
        };
        let remote = installed(inside)?.llmctl_sha256.as_deref();
        if remote == Some(local.as_str()) {
            return Ok(Check::Done(format!(
                "{} is this build (sha256 {})",
                units::LLMCTL_BIN,
                &local[..12]
            )));
        }
        let on = Target::Container(vmid);
        Ok(Check::Changes(vec![
            Action::Upload {
                on: on.clone(),
                from: ctx.llmctl_binary.clone(),
                to: units::LLMCTL_BIN.into(),
                sha256: local,
                mode: 0o755,
            },
            // A running proxy keeps the old binary until it restarts.
            run_on(on, &["systemctl", "try-restart", "llmctl-proxy"]),
        ]))
    }
    fn apply(&self, ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
        execute(ctx, actions)
    }
}

pub fn sha256_bytes(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(data))
}

pub fn sha256_file(path: &std::path::Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

// ------------------------------------------------------------------------------------------------ llama.cpp

pub struct Llama;

/// Written beside the build after a successful one: what was built, so a changed ref or arch rebuilds.
pub fn build_stamp(archive_url: &str, archs: &str, cuda: &str) -> String {
    format!("source={archive_url}\ncuda_architectures={archs}\ncuda={cuda}\n")
}

impl Step<Ctx> for Llama {
    fn id(&self) -> StepId {
        StepId::Llama
    }
    fn title(&self) -> &'static str {
        "llama.cpp at the pinned ref, built with CUDA for the GPUs' architecture"
    }
    fn check(&self, ctx: &mut Ctx) -> Result<Check> {
        let vmid = ctx.vmid();
        let driver = ctx.cfg.driver.version.clone();
        let dir = ctx
            .cfg
            .llama_cpp
            .install_dir
            .trim_end_matches('/')
            .to_string();
        let url = ctx.cfg.llama_cpp.archive_url();
        let f = ctx.facts()?;
        let inside = match inside(f, "build llama.cpp", vmid) {
            Ok(i) => i,
            Err(c) => return Ok(c),
        };
        if f.gpus.is_empty() {
            // Planning before the driver runs: the architecture is read from the GPU once it does.
            return Ok(Check::Changes(vec![Action::Deferred {
                on: Target::Container(vmid),
                what: format!(
                    "build llama.cpp from {url} with CUDA for the GPUs' architecture (read from nvidia-smi once \
                     the driver runs)"
                ),
            }]));
        }
        let archs = crate::host::rules::cuda_architectures(f).map_err(anyhow::Error::msg)?;
        let cuda = cuda_version(f, &driver)?;
        let want = build_stamp(&url, &archs, &cuda);
        let built = installed(inside)?;
        let stamp = built.llama_stamp.clone();
        let server = format!("{dir}/build/bin/llama-server");
        if stamp.as_deref() == Some(want.as_str()) && built.llama_linked {
            return Ok(Check::Done(format!(
                "{server} built from {url} for CUDA architectures {archs}; ldd finds every library"
            )));
        }
        let replicas = crate::host::rules::replica_gpus(inside);
        Ok(Check::Changes(llama_actions(
            &ctx.cfg, vmid, &url, &archs, &cuda, stamp, &replicas,
        )))
    }
    fn apply(&self, ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
        execute(ctx, actions)
    }
}

/// Fails (naming the line) when the built server links a library the container lacks. A constant script: the
/// path travels as `$1`.
const LDD_CHECK: &str = r#"out=$(ldd "$1") || exit 1; if printf '%s\n' "$out" | grep 'not found' >&2; then echo "the build links a library the container lacks" >&2; exit 1; fi"#;

/// Puts a finished build in place of the running one: the old tree is moved aside only once the new one is
/// complete, and removed last, so an interrupted rebuild never leaves the service without a binary. `$1` is the
/// install folder.
const SWITCH_BUILD: &str = r#"set -e; cd "$1"; rm -rf src.prev build.prev; if [ -e build ]; then mv build build.prev; fi; mv build.next build; if [ -e src ]; then mv src src.prev; fi; mv src.next src; rm -rf src.prev build.prev"#;

/// Fetch the pinned source, build it beside the current build (`src.next`, `build.next`), check that it links,
/// switch it in, stamp what was built, and restart a running server onto it (each replica on `replicas`' GPUs too).
pub fn llama_actions(
    cfg: &super::config::ProvisionConfig,
    vmid: u32,
    url: &str,
    archs: &str,
    cuda: &str,
    old_stamp: Option<String>,
    replicas: &[u32],
) -> Vec<Action> {
    let on = Target::Container(vmid);
    let dir = cfg.llama_cpp.install_dir.trim_end_matches('/');
    let tarball = format!("{dir}/source.tar.gz");
    let (src, build) = (format!("{dir}/src.next"), format!("{dir}/build.next"));
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(BUILD_DEPS);
    let mut fetch: Vec<String> = vec![
        units::LLMCTL_BIN.into(),
        "model".into(),
        "fetch".into(),
        url.into(),
        "--dest".into(),
        tarball.clone(),
    ];
    if !cfg.llama_cpp.archive_sha256.is_empty() {
        fetch.push("--sha256".into());
        fetch.push(cfg.llama_cpp.archive_sha256.clone());
    }
    let jobs = cfg.container.cores.max(1).to_string();
    vec![
        Action::Run {
            on: on.clone(),
            cmd: apt(&install),
        },
        run_on(on.clone(), &["mkdir", "-p", dir]),
        Action::Run {
            on: on.clone(),
            cmd: Cmd::new(fetch).timeout(DOWNLOAD_TIMEOUT),
        },
        run_on(on.clone(), &["rm", "-rf", &src, &build]),
        run_on(on.clone(), &["mkdir", "-p", &src]),
        run_on(
            on.clone(),
            &["tar", "-xzf", &tarball, "-C", &src, "--strip-components=1"],
        ),
        Action::Run {
            on: on.clone(),
            cmd: Cmd::new([
                "cmake".to_string(),
                "-S".into(),
                src.clone(),
                "-B".into(),
                build.clone(),
                "-DGGML_CUDA=ON".into(),
                format!("-DCMAKE_CUDA_ARCHITECTURES={archs}"),
                format!("-DCMAKE_CUDA_COMPILER={}", nvcc_path(cuda)),
                "-DLLAMA_CURL=OFF".into(),
                "-DBUILD_SHARED_LIBS=OFF".into(),
                "-DCMAKE_BUILD_TYPE=Release".into(),
            ])
            .timeout(BUILD_TIMEOUT),
        },
        Action::Run {
            on: on.clone(),
            cmd: Cmd::new([
                "cmake",
                "--build",
                &build,
                "--target",
                "llama-server",
                "-j",
                &jobs,
            ])
            .timeout(BUILD_TIMEOUT),
        },
        run_on(
            on.clone(),
            &[
                "sh",
                "-c",
                LDD_CHECK,
                "llmctl-ldd",
                &format!("{build}/bin/llama-server"),
            ],
        ),
        run_on(
            on.clone(),
            &["sh", "-c", SWITCH_BUILD, "llmctl-switch", dir],
        ),
        Action::WriteFile {
            on: on.clone(),
            path: format!("{dir}/.llmctl-build"),
            old: old_stamp,
            new: build_stamp(url, archs, cuda),
            mode: 0o644,
        },
        // A running server keeps the old binary until it restarts.
        Action::Run {
            on,
            cmd: Cmd::new(
                [
                    "systemctl".to_string(),
                    "try-restart".into(),
                    "llama-server".into(),
                ]
                .into_iter()
                .chain(
                    replicas
                        .iter()
                        .map(|i| crate::host::facts::replica_unit(*i)),
                ),
            ),
        },
    ]
}

// ------------------------------------------------------------------------------------------------ model

pub struct Model;

impl Step<Ctx> for Model {
    fn id(&self) -> StepId {
        StepId::Model
    }
    fn title(&self) -> &'static str {
        "the model file downloaded and its sha256 verified"
    }
    fn check(&self, ctx: &mut Ctx) -> Result<Check> {
        let vmid = ctx.vmid();
        let m = ctx.cfg.model.clone();
        let config_path = ctx.config_path.clone();
        let f = ctx.facts()?;
        let inside = match inside(f, "download the model", vmid) {
            Ok(i) => i,
            Err(c) => return Ok(c),
        };
        if m.sha256.is_empty() {
            return Ok(Check::Refused(format!(
                "[model].sha256 is empty in {}: provision verifies the model before it is used. Copy the file's \
                 SHA-256 from its download page (on Hugging Face: the file's page, \"SHA256\") or run `sha256sum` \
                 on a copy you trust, and set it",
                config_path
            )));
        }
        let have = installed(inside)?;
        if let (Some(marker), Some(stat)) = (&have.model_marker, &have.model_size_mtime)
            && *marker == marker_text(&m.sha256, stat)
        {
            return Ok(Check::Done(format!(
                "{} verified (sha256 {})",
                m.dest,
                &m.sha256[..12]
            )));
        }
        Ok(Check::Changes(model_actions(&m, vmid)))
    }
    fn apply(&self, ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
        execute(ctx, actions)
    }
}

/// Fetch (verifying the sha256 as it downloads), then remember the verified file by size and mtime so a later
/// check need not hash many GB again.
pub fn model_actions(m: &super::config::ModelSection, vmid: u32) -> Vec<Action> {
    let on = Target::Container(vmid);
    let mut actions = Vec::new();
    if let Some((dir, _)) = m.dest.rsplit_once('/')
        && !dir.is_empty()
    {
        actions.push(run_on(on.clone(), &["mkdir", "-p", "--", dir]));
    }
    actions.push(Action::Run {
        on: on.clone(),
        cmd: model_fetch_cmd(m),
    });
    actions.push(Action::RecordVerified {
        on,
        path: m.dest.clone(),
        sha256: m.sha256.clone(),
        marker: verified_marker(&m.dest),
    });
    actions
}

pub fn verified_marker(dest: &str) -> String {
    format!("{dest}.llmctl-verified")
}

pub fn marker_text(sha256: &str, size_mtime: &str) -> String {
    format!(
        "sha256={} size_mtime={size_mtime}\n",
        sha256.to_ascii_lowercase()
    )
}

pub fn model_fetch_cmd(m: &super::config::ModelSection) -> Cmd {
    Cmd::new([
        units::LLMCTL_BIN,
        "model",
        "fetch",
        &m.source,
        "--sha256",
        &m.sha256,
        "--dest",
        &m.dest,
    ])
    .timeout(DOWNLOAD_TIMEOUT)
}

// ------------------------------------------------------------------------------------------------ services

/// One systemd unit: its file rendered, enabled, active, and answering its health endpoint.
pub struct Service {
    pub id: StepId,
    pub title: &'static str,
    pub unit: &'static str,
    pub path: &'static str,
}

pub const LLAMA_SERVICE: Service = Service {
    id: StepId::LlamaService,
    title: "llama-server's systemd unit rendered, enabled, running and healthy",
    unit: "llama-server",
    path: units::LLAMA_SERVER_UNIT_PATH,
};

pub const PROXY_SERVICE: Service = Service {
    id: StepId::ProxyService,
    title: "llmctl serve-proxy's systemd unit and API key, enabled, running and healthy",
    unit: "llmctl-proxy",
    path: units::PROXY_UNIT_PATH,
};

impl Service {
    fn is_llama(&self) -> bool {
        self.id == StepId::LlamaService
    }

    /// The llama-servers this installation runs and their offload. `gpu_layers = "auto"`: planned from the model
    /// file (its GGUF header, in the container) and each GPU's real memory with `llmctl model plan --gpu MIB ...`:
    /// one replica per GPU when each holds the model, else one llama-server split across them (or partly on the
    /// CPU). A context that cannot fit is refused with the planner's reason (by llama-server's step; the proxy's
    /// keeps the one upstream it has without a plan). Before the model is there (a plan on a fresh host)
    /// llama-server's own `auto` stands in, on one llama-server.
    fn layout(&self, ctx: &mut Ctx) -> Result<std::result::Result<units::Layout, Check>> {
        let fixed = units::Layout::single(&ctx.cfg, units::Offload::from_config(&ctx.cfg));
        if ctx.cfg.server.gpu_layers != super::config::GpuLayers::Auto {
            return Ok(Ok(fixed));
        }
        let sizes: Vec<u64> = ctx
            .facts()?
            .gpus
            .iter()
            .filter_map(|g| g.memory_total_mib)
            .collect();
        if sizes.iter().sum::<u64>() == 0 {
            return Ok(Ok(fixed));
        }
        let present = ctx
            .facts()?
            .inside()
            .and_then(|i| i.installed.as_ref())
            .is_some_and(|i| i.model_is_file);
        if !present {
            return Ok(Ok(fixed));
        }
        // The planner sizes every cache type [server] accepts (the container has no llmctl.toml to read).
        let cache = ctx.cfg.server.cache_type_k.clone();
        let argv = plan_argv(&ctx.cfg, &sizes, &cache);
        let out = ctx.on_demand(OnDemand::OffloadPlan { argv })?.clone();
        if !out.success() {
            if !self.is_llama() {
                return Ok(Ok(fixed));
            }
            return Ok(Err(Check::Refused(format!(
                "the offload planner refuses this setup: {}",
                out.stderr.trim().trim_start_matches("error: ")
            ))));
        }
        Ok(Ok(layout_from_plan(&ctx.cfg, &out.stdout)?))
    }
}

/// One unit a service step wants: its name, file, rendered text and health endpoint.
struct WantedUnit {
    name: String,
    path: String,
    text: String,
    health_url: String,
}

impl Step<Ctx> for Service {
    fn id(&self) -> StepId {
        self.id
    }
    fn title(&self) -> &'static str {
        self.title
    }
    fn check(&self, ctx: &mut Ctx) -> Result<Check> {
        let vmid = ctx.vmid();
        let on = Target::Container(vmid);
        {
            let f = ctx.facts()?;
            if let Err(c) = inside(f, &format!("install and start {}", self.unit), vmid) {
                return Ok(c);
            }
        }
        let layout = match self.layout(ctx)? {
            Ok(l) => l,
            Err(refused) => return Ok(refused),
        };
        let wanted: Vec<WantedUnit> = if self.is_llama() {
            layout
                .servers
                .iter()
                .map(|s| {
                    Ok(WantedUnit {
                        name: s.unit(),
                        path: s.path(),
                        text: units::render_llama_server_unit(&ctx.cfg, &layout.offload, s)?,
                        health_url: s.health_url(),
                    })
                })
                .collect::<Result<_>>()?
        } else {
            vec![WantedUnit {
                name: self.unit.into(),
                path: self.path.into(),
                text: units::render_proxy_unit(&ctx.cfg, &layout)?,
                health_url: format!("http://127.0.0.1:{}/health", ctx.cfg.proxy_port()),
            }]
        };
        let key_file = ctx.cfg.proxy_key_file().filter(|_| !self.is_llama());
        let shared_key = ctx.shared_key.clone();
        let f = ctx.facts()?;
        let Some(inside) = f.inside() else {
            bail!("internal: the container's facts changed during the check");
        };
        // A key only root can read, and not empty; in a fleet whose proxies are peers, the fleet's one key.
        let inst = installed(inside)?;
        let key_ok = inst
            .key_file
            .is_some_and(|(mode, size)| mode == 0o600 && size > 0)
            && shared_key
                .as_ref()
                .is_none_or(|k| inst.key_sha256.as_deref() == Some(k.sha256.as_str()));
        let is_active = |unit: &str| {
            inside
                .services
                .get(unit)
                .is_some_and(|s| crate::host::facts::is_active_state(s))
        };
        let is_enabled = |unit: &str| inside.enabled.get(unit) == Some(&true);
        // llama-server's units that the layout no longer has: the single unit when there are replicas, a
        // replica whose GPU gets none (rules::stray_llama_units).
        let keep: Vec<&str> = wanted.iter().map(|w| w.name.as_str()).collect();
        let strays: Vec<(String, String)> = if self.is_llama() {
            crate::host::rules::stray_llama_units(inside, &keep)
        } else {
            Vec::new()
        };
        let olds: Vec<Option<String>> = wanted
            .iter()
            .map(|w| inside.file(&w.path).map(str::to_string))
            .collect();
        let enabled: Vec<bool> = wanted.iter().map(|w| is_enabled(&w.name)).collect();
        let active: Vec<bool> = wanted.iter().map(|w| is_active(&w.name)).collect();
        let mut actions = Vec::new();
        if let Some(key_file) = key_file
            && !key_ok
        {
            actions.push(Action::WriteSecret {
                on: on.clone(),
                path: key_file,
                value: shared_key.as_ref().and_then(|k| k.value.clone()),
            });
        }
        for (unit, path) in &strays {
            actions.push(run_on(on.clone(), &["systemctl", "disable", "--now", unit]));
            actions.push(run_on(on.clone(), &["rm", "-f", path]));
        }
        let mut changed = vec![false; wanted.len()];
        for (k, w) in wanted.iter().enumerate() {
            if olds[k].as_deref() != Some(w.text.as_str()) {
                changed[k] = true;
                actions.push(Action::WriteFile {
                    on: on.clone(),
                    path: w.path.clone(),
                    old: olds[k].clone(),
                    new: w.text.clone(),
                    mode: 0o644,
                });
            }
        }
        if changed.iter().any(|c| *c) || !strays.is_empty() {
            actions.push(run_on(on.clone(), &["systemctl", "daemon-reload"]));
        }
        for (k, w) in wanted.iter().enumerate() {
            if !enabled[k] {
                actions.push(run_on(on.clone(), &["systemctl", "enable", &w.name]));
            }
        }
        let secret = actions
            .iter()
            .any(|a| matches!(a, Action::WriteSecret { .. }));
        let mut restarts = Vec::new();
        for (k, w) in wanted.iter().enumerate() {
            let healthy = active[k]
                && ctx
                    .on_demand(OnDemand::Health {
                        url: w.health_url.clone(),
                    })?
                    .success();
            if changed[k] || !enabled[k] || secret || !healthy {
                restarts.push(k);
            }
        }
        if actions.is_empty() && restarts.is_empty() {
            let done: Vec<String> = wanted
                .iter()
                .map(|w| {
                    format!(
                        "{} matches the configuration, enabled, active, {} answers",
                        w.path, w.health_url
                    )
                })
                .collect();
            return Ok(Check::Done(done.join("; ")));
        }
        for k in restarts {
            let w = &wanted[k];
            actions.push(run_on(on.clone(), &["systemctl", "restart", &w.name]));
            actions.push(Action::WaitHealthy {
                on: on.clone(),
                unit: w.name.clone(),
                url: w.health_url.clone(),
            });
        }
        Ok(Check::Changes(actions))
    }
    fn apply(&self, ctx: &mut Ctx, actions: &[Action]) -> Result<()> {
        execute(ctx, actions)
    }
}

/// `llmctl model plan` for the configured model, context, cache and batch on the GPUs of these sizes (MiB, in
/// nvidia-smi's order, one `--gpu` each) with `[server].port` as the first server's port and the container's
/// memory as the RAM budget.
pub fn plan_argv(
    cfg: &super::config::ProvisionConfig,
    gpus_mib: &[u64],
    cache: &str,
) -> Vec<String> {
    let mut argv: Vec<String> = vec![
        units::LLMCTL_BIN.into(),
        "model".into(),
        "plan".into(),
        cfg.model.dest.clone(),
    ];
    for g in gpus_mib {
        argv.extend(["--gpu".to_string(), g.to_string()]);
    }
    argv.extend([
        "--port".into(),
        cfg.server.port.to_string(),
        "--ram".into(),
        cfg.container.memory_mib.to_string(),
        "--ctx".into(),
        cfg.server.context.to_string(),
        "--cache-type".into(),
        cache.into(),
        "--ubatch".into(),
        cfg.server.ubatch.to_string(),
        "--json".into(),
    ]);
    argv
}

/// The chosen offload of `llmctl model plan --json`.
pub fn offload_from_plan(json: &str) -> Result<units::Offload> {
    let v: serde_json::Value =
        serde_json::from_str(json).context("llmctl model plan printed no JSON")?;
    offload_of(&v)
}

fn offload_of(v: &serde_json::Value) -> Result<units::Offload> {
    let chosen = &v["chosen"];
    let ngl = chosen["ngl"]
        .as_u64()
        .context("llmctl model plan: no chosen.ngl")?;
    let moe = chosen["n_cpu_moe"].as_u64().unwrap_or(0);
    Ok(units::Offload {
        gpu_layers: units::GpuLayersArg::Count(u32::try_from(ngl).unwrap_or(u32::MAX)),
        n_cpu_moe: (moe > 0).then(|| u32::try_from(moe).unwrap_or(u32::MAX)),
        tensor_split: None,
    })
}

/// The llama-servers of `llmctl model plan --gpu ... --json`: its `layout` and `servers`. `replicas` over more
/// than one GPU: one unit per server (its GPU, port and `env`); otherwise the one `llama-server` unit on
/// `[server].port`, with the plan's `tensor_split` when it spans several GPUs.
pub fn layout_from_plan(cfg: &super::config::ProvisionConfig, json: &str) -> Result<units::Layout> {
    let v: serde_json::Value =
        serde_json::from_str(json).context("llmctl model plan printed no JSON")?;
    let mut offload = offload_of(&v)?;
    let servers = v["servers"].as_array().cloned().unwrap_or_default();
    if v["layout"] == "replicas" && servers.len() > 1 {
        let servers = servers
            .iter()
            .map(|s| {
                let gpus = s["gpus"]
                    .as_array()
                    .context("llmctl model plan: a server without gpus")?;
                let gpu = match gpus.as_slice() {
                    [g] => g.as_u64().and_then(|g| u32::try_from(g).ok()),
                    _ => None,
                }
                .context("llmctl model plan: a replica that is not on one GPU")?;
                let port = s["port"]
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .context("llmctl model plan: a server without a port")?;
                let env = s["env"]
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(units::LlamaServer {
                    gpu: Some(gpu),
                    port,
                    env,
                })
            })
            .collect::<Result<_>>()?;
        return Ok(units::Layout { offload, servers });
    }
    let spans = servers
        .first()
        .and_then(|s| s["gpus"].as_array())
        .is_some_and(|g| g.len() > 1);
    if spans && let Some(split) = v["tensor_split"].as_array() {
        offload.tensor_split = Some(
            split
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    Ok(units::Layout::single(cfg, offload))
}

/// 32 random bytes from the OS, hex: the proxy's API key.
pub fn new_api_key() -> Result<String> {
    use std::io::Read;
    let mut buf = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("cannot read /dev/urandom for a new API key")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_follows_the_driver_branch() {
        let f = HostFacts::default();
        assert_eq!(cuda_version(&f, "595.71.05").unwrap(), "13.2");
        assert_eq!(cuda_version(&f, "550.163.01").unwrap(), "12.4");
        assert_eq!(cuda_package("13.2"), "cuda-toolkit-13-2");
        assert!(cuda_version(&f, "470.1").is_err());
    }

    #[test]
    fn legacy_passthrough_lines_are_stripped_from_the_live_section_only() {
        let text = "arch: amd64\nlxc.cgroup2.devices.allow: c 195:* rwm\nlxc.cgroup2.devices.allow: c 508:* rwm\nlxc.cgroup2.devices.allow: c 226:* rwm\nlxc.mount.entry: /dev/nvidia0 dev/nvidia0 none bind,optional,create=file\nlxc.mount.entry: /dev/dri dev/dri none bind,optional,create=dir\n\n[snap]\nlxc.cgroup2.devices.allow: c 195:* rwm\n";
        let f = HostFacts {
            proc_devices: [
                ("drm".to_string(), 226),
                ("mem".to_string(), 1),
                ("tty".to_string(), 5),
            ]
            .into_iter()
            .collect(),
            ..HostFacts::default()
        };
        let (out, removed) = crate::host::rules::legacy_passthrough(&f, text);
        assert_eq!(
            out,
            "arch: amd64\nlxc.cgroup2.devices.allow: c 226:* rwm\nlxc.mount.entry: /dev/dri dev/dri none bind,optional,create=dir\n\n[snap]\nlxc.cgroup2.devices.allow: c 195:* rwm\n"
        );
        assert_eq!(removed.len(), 3);
    }

    #[test]
    fn the_planner_decides_the_offload() {
        let o = offload_from_plan(
            r#"{"chosen":{"strategy":{"kind":"experts_on_cpu"},"ngl":31,"n_cpu_moe":18}}"#,
        )
        .unwrap();
        assert_eq!(o.gpu_layers, units::GpuLayersArg::Count(31));
        assert_eq!(o.n_cpu_moe, Some(18));
        let o = offload_from_plan(r#"{"chosen":{"ngl":12,"n_cpu_moe":0}}"#).unwrap();
        assert_eq!(o.n_cpu_moe, None);
        assert!(offload_from_plan("not json").is_err());
    }

    fn guide_config() -> super::super::config::ProvisionConfig {
        let text = include_str!("../../templates/llmctl.toml");
        super::super::config::ProvisionConfig::from_file(
            &crate::config::ConfigFile::parse(text, None).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn plan_argv_passes_each_gpu_and_the_port() {
        let cfg = guide_config();
        let argv = plan_argv(&cfg, &[24564, 12288], "q8_0").join(" ");
        assert!(
            argv.contains(&format!(
                "--gpu 24564 --gpu 12288 --port {}",
                cfg.server.port
            )),
            "{argv}"
        );
        assert!(!argv.contains("--vram"), "{argv}");
    }

    #[test]
    fn replicas_get_one_unit_each_pinned_to_its_gpu_and_the_proxy_routes_to_all() {
        let cfg = guide_config();
        let json = r#"{"layout":"replicas","chosen":{"ngl":31,"n_cpu_moe":0},"servers":[
            {"gpus":[0],"port":8080,"env":{"CUDA_DEVICE_ORDER":"PCI_BUS_ID","CUDA_VISIBLE_DEVICES":"0"},"args":[]},
            {"gpus":[1],"port":8081,"env":{"CUDA_DEVICE_ORDER":"PCI_BUS_ID","CUDA_VISIBLE_DEVICES":"1"},"args":[]}]}"#;
        let l = layout_from_plan(&cfg, json).unwrap();
        assert_eq!(l.servers.len(), 2);
        assert_eq!(l.servers[1].unit(), "llama-server-gpu1");
        assert_eq!(
            l.servers[1].path(),
            "/etc/systemd/system/llama-server-gpu1.service"
        );
        let unit = units::render_llama_server_unit(&cfg, &l.offload, &l.servers[1]).unwrap();
        assert!(
            unit.contains("\nEnvironment=CUDA_DEVICE_ORDER=PCI_BUS_ID\nEnvironment=CUDA_VISIBLE_DEVICES=1\nRestart="),
            "{unit}"
        );
        assert!(unit.contains("--port 8081 "), "{unit}");
        assert!(unit.contains(" on GPU 1\n"), "{unit}");
        assert!(
            crate::host::rules::replica_pin_problems(&unit, 1, 2).is_empty(),
            "{unit}"
        );
        assert_eq!(
            crate::host::rules::replica_pin_problems(&unit, 1, 1).len(),
            1
        );
        assert_eq!(
            crate::host::rules::replica_pin_problems(&unit, 0, 2).len(),
            1,
            "pins GPU 1, not 0"
        );
        let proxy = units::render_proxy_unit(&cfg, &l).unwrap();
        assert!(
            proxy.contains("--upstream http://127.0.0.1:8080 --upstream http://127.0.0.1:8081"),
            "{proxy}"
        );
        assert!(
            proxy.contains(
                "After=network-online.target llama-server-gpu0.service llama-server-gpu1.service\n"
            ),
            "{proxy}"
        );
    }

    #[test]
    fn a_split_keeps_one_unit_with_the_tensor_split() {
        let cfg = guide_config();
        let json = r#"{"layout":"partial","chosen":{"ngl":17,"n_cpu_moe":0},"tensor_split":[9,8],"servers":[
            {"gpus":[0,1],"port":8080,"env":{"CUDA_DEVICE_ORDER":"PCI_BUS_ID","CUDA_VISIBLE_DEVICES":"0,1"},"args":[]}]}"#;
        let l = layout_from_plan(&cfg, json).unwrap();
        assert_eq!(l, units::Layout::single(&cfg, l.offload.clone()));
        assert_eq!(l.offload.tensor_split.as_deref(), Some("9,8"));
        let unit = units::render_llama_server_unit(&cfg, &l.offload, &l.servers[0]).unwrap();
        assert!(
            unit.contains("-ngl 17 --split-mode layer --tensor-split 9,8 "),
            "{unit}"
        );
        assert!(!unit.contains("Environment="), "{unit}");
        // One replica (one GPU) is the one llama-server unit.
        let json = r#"{"layout":"replicas","chosen":{"ngl":31,"n_cpu_moe":0},"servers":[
            {"gpus":[0],"port":8080,"env":{"CUDA_DEVICE_ORDER":"PCI_BUS_ID","CUDA_VISIBLE_DEVICES":"0"},"args":[]}]}"#;
        let l = layout_from_plan(&cfg, json).unwrap();
        assert_eq!(l.servers[0].unit(), "llama-server");
        assert_eq!(l.offload.tensor_split, None);
    }

    #[test]
    fn llama_units_outside_the_layout_are_strays() {
        use crate::host::facts::InsideFacts;
        let mut ins = InsideFacts::default();
        ins.files
            .insert(units::LLAMA_SERVER_UNIT_PATH.into(), "x".into());
        for i in [0, 1, 2] {
            ins.files
                .insert(crate::host::facts::replica_unit_path(i), "x".into());
        }
        let strays = crate::host::rules::stray_llama_units(
            &ins,
            &["llama-server-gpu0", "llama-server-gpu1"],
        );
        let names: Vec<&str> = strays.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(names, ["llama-server", "llama-server-gpu2"]);
        let strays = crate::host::rules::stray_llama_units(&ins, &["llama-server"]);
        assert_eq!(strays.len(), 3);
        assert_eq!(strays[0].1, "/etc/systemd/system/llama-server-gpu0.service");
    }

    #[test]
    fn api_keys_are_random_hex() {
        let (a, b) = (new_api_key().unwrap(), new_api_key().unwrap());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;
    use crate::pve::system::DevNode;

    fn node(path: &str) -> DevNode {
        DevNode {
            path: path.into(),
            kind: 'c',
            major: Some(195),
            minor: None,
            line: String::new(),
        }
    }

    #[test]
    fn devices_are_wanted_in_gpu_order() {
        let f = HostFacts {
            dev_nodes: [
                "/dev/nvidia10",
                "/dev/nvidia2",
                "/dev/nvidia0",
                "/dev/nvidiactl",
            ]
            .map(node)
            .to_vec(),
            ..HostFacts::default()
        };
        assert_eq!(
            wanted_devices(&f),
            [
                "/dev/nvidia0",
                "/dev/nvidia2",
                "/dev/nvidia10",
                "/dev/nvidiactl",
                "/dev/nvidia-uvm",
                "/dev/nvidia-uvm-tools"
            ]
        );
    }

    fn argv(a: &Action) -> String {
        match a {
            Action::Run { cmd, .. } => crate::shell::join(&cmd.argv),
            other => other.render(),
        }
    }

    /// Issue 16: a Ctrl-C during a rebuild must leave the working build in place. Nothing removes or replaces
    /// `build` or `src` before the new build exists and links; the stamp is written only after the switch.
    #[test]
    fn a_rebuild_keeps_the_old_build_until_the_new_one_links() {
        let text = include_str!("../../templates/llmctl.toml");
        let cfg = crate::provision::config::ProvisionConfig::from_file(
            &crate::config::ConfigFile::parse(text, None).unwrap(),
        )
        .unwrap();
        let actions = llama_actions(&cfg, 103, "https://x/l.tar.gz", "89", "13.2", None, &[]);
        let lines: Vec<String> = actions.iter().map(argv).collect();
        let at = |needle: &str| {
            lines
                .iter()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no action with {needle:?} in {lines:#?}"))
        };
        let (build, ldd, switch, stamp) = (
            at("cmake --build /opt/llama.cpp/build.next"),
            at("llmctl-ldd /opt/llama.cpp/build.next/bin/llama-server"),
            at("llmctl-switch /opt/llama.cpp"),
            at("write /opt/llama.cpp/.llmctl-build"),
        );
        assert!(build < ldd && ldd < switch && switch < stamp, "{lines:#?}");
        for (i, l) in lines.iter().enumerate().take(switch) {
            for old in ["/opt/llama.cpp/build", "/opt/llama.cpp/src"] {
                let touches_old = l.split_whitespace().any(|w| w == old);
                assert!(
                    !touches_old,
                    "action {i} touches {old} before the switch: {l}"
                );
            }
        }
    }

    /// Issue 16 item 5: a devN whose GPU is gone is taken out (else `pct start` fails on it), not counted as
    /// passed in.
    #[test]
    fn a_devn_for_a_removed_gpu_is_deleted() {
        let text = "arch: amd64\ndev0: /dev/nvidia0,gid=44\ndev1: /dev/nvidiactl,gid=44\ndev2: /dev/nvidia-uvm,gid=44\ndev3: /dev/nvidia-uvm-tools,gid=44\ndev4: /dev/nvidia1,gid=44\n";
        let cfg = LxcConfig::parse(text);
        let f = HostFacts {
            module: Some(crate::pve::nvidia::LoadedModule {
                version: "595.71.05".into(),
                flavour: crate::pve::nvidia::ModuleFlavour::Open,
                line: String::new(),
            }),
            dev_nodes: [
                "/dev/nvidia0",
                "/dev/nvidiactl",
                "/dev/nvidia-uvm",
                "/dev/nvidia-uvm-tools",
            ]
            .map(node)
            .to_vec(),
            ..HostFacts::default()
        };
        let Check::Changes(actions) = devices_check(&f, &cfg, text, 103, false) else {
            panic!("a devN for a missing GPU must be a change");
        };
        let lines: Vec<String> = actions.iter().map(argv).collect();
        assert_eq!(
            lines.last().unwrap(),
            "pct set 103 --delete dev4",
            "{lines:#?}"
        );
        // Without the driver running the nodes are unknown: nothing is deleted.
        let unknown = HostFacts {
            module: None,
            ..f.clone()
        };
        assert!(matches!(
            devices_check(&unknown, &cfg, text, 103, false),
            Check::Done(_)
        ));
    }
}
