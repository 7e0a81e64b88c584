//! The checks: pure functions from [`HostFacts`] to findings. Each check reports its own id once: `ok` when the
//! thing it guards is fine, `skip` when something it depends on is broken (and reported by its own check), and
//! `warn`/`FAIL` with the exact lines it saw and the fix. Reporting a symptom only under its root cause keeps the
//! output to the one thing to fix first (no "GPU not visible" on a host whose driver is not even built).

use serde::Serialize;

use crate::host::facts::{CtStatus, HostFacts, LLAMA_UNIT, PROXY_UNIT};
use crate::host::rules::is_gpu_node;
use crate::host::{StepId, rules};
use crate::pve::dkms::DkmsState;
use crate::pve::llama::{self, ArchFit};
use crate::pve::lxc::LxcConfig;
use crate::pve::nvidia::{self, SmiReport};
use crate::pve::packages::upstream_version;
use crate::pve::system;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    /// Not evaluated because a prerequisite is broken or absent.
    Skip,
    Warn,
    Fail,
}

impl Severity {
    pub fn is_problem(self) -> bool {
        matches!(self, Severity::Warn | Severity::Fail)
    }
}

/// How to fix a finding: always a provision step (the law: every problem doctor reports is one `provision`
/// would change or refuses, so the step is typed, and a fix cannot name a step that does not exist), and, for
/// what only a person can do (enroll a key at the console, end a stale lock), the command to run first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fix {
    #[serde(rename = "provision")]
    pub step: StepId,
    #[serde(rename = "command", skip_serializing_if = "Option::is_none")]
    pub by_hand: Option<String>,
}

impl Fix {
    pub const fn step(step: StepId) -> Fix {
        Fix {
            step,
            by_hand: None,
        }
    }

    pub fn by_hand(step: StepId, command: impl Into<String>) -> Fix {
        Fix {
            step,
            by_hand: Some(command.into()),
        }
    }

    pub fn render(&self) -> String {
        match &self.by_hand {
            None => format!("llmctl provision --only {}", self.step),
            Some(c) => format!("{c}\nthen: llmctl provision --only {}", self.step),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub id: FindingId,
    pub severity: Severity,
    pub title: String,
    /// The exact lines seen, or what was looked for and not found.
    pub evidence: Vec<String>,
    pub fix: Option<Fix>,
}

impl Finding {
    fn ok(id: FindingId, title: impl Into<String>) -> Finding {
        Finding {
            id,
            severity: Severity::Ok,
            title: title.into(),
            evidence: Vec::new(),
            fix: None,
        }
    }
    fn skip(id: FindingId, why: impl Into<String>) -> Finding {
        Finding {
            id,
            severity: Severity::Skip,
            title: why.into(),
            evidence: Vec::new(),
            fix: None,
        }
    }
    fn problem(
        id: FindingId,
        severity: Severity,
        title: impl Into<String>,
        evidence: Vec<String>,
        fix: Fix,
    ) -> Finding {
        Finding {
            id,
            severity,
            title: title.into(),
            evidence,
            fix: Some(fix),
        }
    }
}

/// Declares every check once, in the order a user should fix things, with the ids of the findings it reports:
/// `CHECKS`, the `FindingId` enum, `FindingId::ALL` and `as_str` all follow from this one list, so adding a
/// check is its function and one line here (and its row in docs/doctor.md, which a test keeps in step).
macro_rules! checks {
    ($($check:ident => $($variant:ident $id:literal),+;)*) => {
        /// What a finding is about: doctor's own checks' ids, and `plan.<step>` for a step `provision --check`
        /// would change that no check of doctor's explains. A type, so a finding that names an id no check
        /// declares does not compile; `--json` and the text report show `as_str`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum FindingId {
            $($($variant,)+)*
            /// `plan.<step>`: doctor's reconcile with provision's assessment.
            Plan(StepId),
        }

        impl FindingId {
            /// The ids of doctor's own checks, in report order (the `plan.<step>` ids are
            /// `StepId::ALL`'s `finding_id`).
            pub const ALL: &'static [FindingId] = &[$($(FindingId::$variant,)+)*];

            /// The id users see and scripts match (`--json`).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($(FindingId::$variant => $id,)+)*
                    FindingId::Plan(step) => step.finding_id(),
                }
            }
        }

        /// Every check, in the order a user should fix things.
        pub const CHECKS: &[fn(&HostFacts) -> Vec<Finding>] = &[$($check,)*];

        /// Each check's ids, in `CHECKS` order: a check reports only these (a test holds it to that).
        pub const CHECK_IDS: &[&[FindingId]] = &[$(&[$(FindingId::$variant,)+],)*];
    };
}

checks! {
    check_dpkg => DpkgInterrupted "dpkg.interrupted";
    check_gpu_supported => GpuUnsupported "gpu.unsupported";
    check_nouveau => NouveauLoaded "nouveau.loaded", NouveauNotBlacklisted "nouveau.not-blacklisted";
    check_kernel_headers => KernelHeadersMissing "kernel.headers-missing";
    check_driver_installed => DriverNotInstalled "driver.not-installed";
    check_secure_boot => SecurebootUnsigned "secureboot.unsigned";
    check_dkms => DkmsBuildFailed "dkms.build-failed", DkmsNotBuilt "dkms.not-built";
    check_driver_loaded => DriverNotLoaded "driver.not-loaded";
    check_reboot_pending => DriverRebootPending "driver.reboot-pending";
    check_driver_pinned => DriverNotPinned "driver.not-pinned";
    check_device_nodes => DevUvmMissing "dev.uvm-missing", DevNodesMissing "dev.nodes-missing";
    check_nodes_at_boot => DevNodesNotAtBoot "dev.nodes-not-at-boot";
    check_container_exists => CtMissing "ct.missing";
    check_container_config =>
        CtLocked "ct.locked",
        CtConfigInvalid "ct.config-invalid",
        CtPendingChanges "ct.pending-changes";
    check_devices_configured => CtDevicesMissing "ct.devices-missing";
    check_cgroup_majors => CtCgroupMajorMismatch "ct.cgroup-major-mismatch";
    check_legacy_passthrough => CtLegacyPassthrough "ct.legacy-passthrough";
    check_resolv => CtResolvImmutable "ct.resolv-immutable";
    check_running => CtDeviceGone "ct.device-gone", CtNotRunning "ct.not-running";
    check_ct_libs => CtLibsMismatch "ct.libs-mismatch", CtLibsNotPinned "ct.libs-not-pinned";
    check_gpu_visible => CtGpuNotVisible "ct.gpu-not-visible";
    check_llama_build =>
        LlamaNotInstalled "llama.not-installed",
        LlamaNotCuda "llama.not-cuda",
        LlamaCudaArch "llama.cuda-arch";
    check_llama_context => LlamaContextSmall "llama.context-small";
    check_services =>
        SvcLlamaServerDown "svc.llama-server-down",
        SvcProxyDown "svc.proxy-down",
        SvcProxyLitellm "svc.proxy-litellm",
        SvcReplicaPin "svc.replica-pin";
}

impl std::fmt::Display for FindingId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, not `write_str`: the text report aligns the titles with `{:<26}`.
        f.pad(self.as_str())
    }
}

impl Serialize for FindingId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

pub fn run_all(facts: &HostFacts) -> Vec<Finding> {
    let mut findings: Vec<Finding> = CHECKS.iter().flat_map(|check| check(facts)).collect();
    // While dpkg has an install half-done, apt refuses to change anything: that is the one thing to fix first,
    // and what it left (no module built, none loaded, a container that cannot start) follows from it.
    if findings
        .iter()
        .any(|f| f.id == FindingId::DpkgInterrupted && f.severity == Severity::Fail)
    {
        for f in findings
            .iter_mut()
            .filter(|f| f.id != FindingId::DpkgInterrupted && f.severity.is_problem())
        {
            *f = Finding::skip(
                f.id,
                format!("{}; see {}", f.title, FindingId::DpkgInterrupted),
            );
        }
    }
    findings
}

pub fn check_dpkg(f: &HostFacts) -> Vec<Finding> {
    const ID: FindingId = FindingId::DpkgInterrupted;
    let unfinished = rules::dpkg_interrupted(f);
    if unfinished.is_empty() {
        return vec![Finding::ok(ID, "dpkg has no install half-done")];
    }
    vec![Finding::problem(
        ID,
        Severity::Fail,
        "an apt/dpkg install was interrupted: apt refuses to install anything until it is finished",
        unfinished
            .iter()
            .map(|p| {
                format!(
                    "dpkg: {} {} status {}",
                    p.name,
                    p.version,
                    p.status.as_deref().unwrap_or("?")
                )
            })
            .collect(),
        Fix::by_hand(StepId::Driver, "dpkg --configure -a"),
    )]
}

// ---- host: driver ------------------------------------------------------------------------------------------

/// User-space packages whose version must equal the loaded module.
const LIB_PACKAGES: &[&str] = &["libnvidia-ml1", "libcuda1", "nvidia-driver-cuda"];
pub const UVM_NODES: &[&str] = &["/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"];

fn driver_packages(f: &HostFacts) -> Vec<String> {
    f.packages
        .iter()
        .filter(|p| p.installed())
        .filter(|p| {
            rules::MODULE_PACKAGES.iter().any(|(n, _)| *n == p.name)
                || LIB_PACKAGES.contains(&p.name.as_str())
                || p.name.starts_with("nvidia-driver")
                || p.name.starts_with("nvidia-kernel")
                || p.name.starts_with("nvidia-open")
                || p.name.starts_with("libnvidia")
        })
        .map(|p| p.name.clone())
        .collect()
}

fn module_missing_evidence(f: &HostFacts) -> Vec<String> {
    let mut ev = vec![
        "/proc/driver/nvidia/version: not present (no NVIDIA kernel module loaded)".to_string(),
    ];
    ev.extend(
        f.smi_lines
            .iter()
            .take(2)
            .map(|l| format!("nvidia-smi: {l}")),
    );
    ev
}

fn nvidia_entry_for<'a>(f: &'a HostFacts, kernel: &str) -> Vec<&'a crate::pve::dkms::DkmsEntry> {
    f.dkms
        .iter()
        .filter(|e| e.is_nvidia() && e.kernel.as_deref() == Some(kernel))
        .collect()
}

/// Whether a root cause for "no module loaded" is reported by another check.
fn module_absence_explained(f: &HostFacts) -> bool {
    f.has_module("nouveau")
        || (rules::kernel_driver_installed(f) && !rules::module_installed_for(f, &f.kernel, None))
        || rules::secure_boot_blocks(f).is_some()
        || unsupported_gpu(f).is_some()
}

/// Whether the installed driver (branch and module flavour) can drive every GPU of the host. Judged on what is
/// installed: with llmctl.toml, provision's inventory step judges the configured driver the same way.
fn unsupported_gpu(f: &HostFacts) -> Option<String> {
    let version = rules::installed_driver_version(f)?;
    let flavour = rules::installed_flavour(f).or(f.module.as_ref().map(|m| m.flavour))?;
    rules::driver_fits_gpus(f, &version, flavour == nvidia::ModuleFlavour::Open).err()
}

pub fn check_gpu_supported(f: &HostFacts) -> Vec<Finding> {
    const ID: FindingId = FindingId::GpuUnsupported;
    let Some(why) = unsupported_gpu(f) else {
        let gpus = rules::gpus(f);
        return vec![if gpus.is_empty() {
            Finding::skip(ID, "no NVIDIA GPU found (nvidia-smi, lspci)")
        } else {
            Finding::ok(
                ID,
                format!(
                    "the driver can run every GPU: {}",
                    gpus.iter()
                        .map(|g| g.describe())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            )
        }];
    };
    let mut ev: Vec<String> = f
        .pci_gpus
        .iter()
        .map(|g| format!("lspci: {} {} [{}]", g.bus, g.chip, g.name))
        .collect();
    ev.extend(
        f.dmesg
            .iter()
            .filter(|l| l.contains("NVRM"))
            .take(4)
            .cloned(),
    );
    ev.push(why);
    vec![Finding::problem(
        ID,
        Severity::Fail,
        "the installed NVIDIA driver cannot run a GPU of this host",
        ev,
        Fix::by_hand(
            StepId::Inventory,
            "set [driver] version and flavor in llmctl.toml to what the evidence names",
        ),
    )]
}

pub fn check_driver_installed(f: &HostFacts) -> Vec<Finding> {
    const ID: FindingId = FindingId::DriverNotInstalled;
    if let Some(m) = &f.module {
        let flavour = match m.flavour {
            nvidia::ModuleFlavour::Open => "open",
            nvidia::ModuleFlavour::Proprietary => "proprietary",
        };
        return vec![Finding::ok(
            ID,
            format!("NVIDIA driver {} ({flavour} module) is loaded", m.version),
        )];
    }
    if rules::kernel_driver_installed(f) || !driver_packages(f).is_empty() {
        return vec![Finding::ok(
            ID,
            format!(
                "NVIDIA driver packages are installed: {}",
                driver_packages(f).join(", ")
            ),
        )];
    }
    let mut ev = module_missing_evidence(f);
    ev.push("dpkg: no nvidia-kernel-*-dkms or nvidia-driver* package installed".into());
    vec![Finding::problem(
        ID,
        Severity::Fail,
        "no NVIDIA driver is installed on the host",
        ev,
        Fix::step(StepId::Driver),
    )]
}

pub fn check_nouveau(f: &HostFacts) -> Vec<Finding> {
    let blacklisted: Vec<&String> = rules::nouveau_blacklist_line(&f.modprobe_nouveau)
        .into_iter()
        .collect();
    let not_blacklisted_evidence = || {
        let mut ev = vec![
            "no `blacklist nouveau` line in /etc/modprobe.d, /lib/modprobe.d or /usr/lib/modprobe.d"
                .to_string(),
        ];
        ev.extend(f.modprobe_nouveau.iter().take(4).cloned());
        ev
    };
    if f.has_module("nouveau") {
        let mut ev = vec![
            "lsmod: nouveau is loaded (it owns the GPU, the NVIDIA module cannot probe it)"
                .to_string(),
        ];
        ev.extend(
            f.dmesg
                .iter()
                .filter(|l| l.contains("NVRM") || l.contains("nouveau"))
                .take(6)
                .cloned(),
        );
        // The fix (blacklist + initramfs + reboot) is the same for both: one finding, both facts.
        let blacklist_too = blacklisted.is_empty();
        if blacklist_too {
            ev.extend(not_blacklisted_evidence());
        }
        return vec![
            Finding::problem(
                FindingId::NouveauLoaded,
                Severity::Fail,
                "the nouveau driver is loaded and holds the GPU",
                ev,
                Fix::step(StepId::Nouveau),
            ),
            if blacklist_too {
                Finding::skip(
                    FindingId::NouveauNotBlacklisted,
                    format!("not blacklisted either; see {}", FindingId::NouveauLoaded),
                )
            } else {
                Finding::ok(
                    FindingId::NouveauNotBlacklisted,
                    "nouveau is blacklisted (a reboot after update-initramfs keeps it out)",
                )
            },
        ];
    }
    let mut out = vec![Finding::ok(
        FindingId::NouveauLoaded,
        "nouveau is not loaded",
    )];
    if blacklisted.is_empty() {
        out.push(Finding::problem(
            FindingId::NouveauNotBlacklisted,
            Severity::Fail,
            "nouveau is not blacklisted: it can take the GPU at the next boot",
            not_blacklisted_evidence(),
            Fix::step(StepId::Nouveau),
        ));
    } else {
        out.push(Finding::ok(
            FindingId::NouveauNotBlacklisted,
            format!("nouveau is blacklisted ({})", blacklisted[0]),
        ));
    }
    out
}

pub fn check_kernel_headers(f: &HostFacts) -> Vec<Finding> {
    const ID: FindingId = FindingId::KernelHeadersMissing;
    let missing = rules::kernels_without_headers(f);
    if missing.is_empty() {
        return vec![Finding::ok(
            ID,
            format!(
                "kernel headers are installed for every kernel ({})",
                rules::kernels(f).join(", ")
            ),
        )];
    }
    let running_missing = missing.contains(&f.kernel);
    let ev = missing
        .iter()
        .map(|k| {
            let which = if *k == f.kernel {
                " (running)"
            } else {
                " (installed, not running: the next boot may pick it)"
            };
            format!(
                "/lib/modules/{k}/build: missing, {} not installed{which}",
                rules::headers_package(f, k)
            )
        })
        .collect();
    let title = if running_missing {
        format!(
            "kernel headers for the running kernel {} are missing: DKMS cannot build the NVIDIA module",
            f.kernel
        )
    } else {
        format!(
            "kernel headers are missing for the installed kernel {}: booting it leaves the GPU without a driver",
            missing.join(", ")
        )
    };
    vec![Finding::problem(
        ID,
        Severity::Fail,
        title,
        ev,
        Fix::step(StepId::Headers),
    )]
}

pub fn check_secure_boot(f: &HostFacts) -> Vec<Finding> {
    const ID: FindingId = FindingId::SecurebootUnsigned;
    if let Some(why) = rules::secure_boot_blocks(f) {
        let mut ev: Vec<String> = f.secure_boot_line.iter().cloned().collect();
        ev.extend(
            f.mok_key_line
                .iter()
                .map(|l| format!("mokutil --test-key: {l}")),
        );
        ev.extend(module_missing_evidence(f));
        ev.extend(
            f.dmesg
                .iter()
                .filter(|l| l.contains("module") && (l.contains("reject") || l.contains("key")))
                .take(3)
                .cloned(),
        );
        ev.push(why);
        return vec![Finding::problem(
            ID,
            Severity::Fail,
            "Secure Boot rejects the NVIDIA module: it must be signed with a key enrolled in MOK",
            ev,
            Fix::step(StepId::Module),
        )];
    }
    vec![Finding::ok(
        ID,
        match (f.secure_boot, &f.module) {
            (Some(true), Some(_)) => {
                "Secure Boot is on and the NVIDIA module is loaded (it is signed)"
            }
            (Some(true), None) => {
                "Secure Boot is on; no driver to sign yet, or its key is enrolled"
            }
            (Some(false), _) => "Secure Boot is off",
            _ => "Secure Boot state unknown (no mokutil)",
        },
    )]
}

pub fn check_dkms(f: &HostFacts) -> Vec<Finding> {
    if !rules::kernel_driver_installed(f) {
        return vec![
            Finding::skip(
                FindingId::DkmsBuildFailed,
                "no DKMS NVIDIA driver installed",
            ),
            Finding::skip(FindingId::DkmsNotBuilt, "no DKMS NVIDIA driver installed"),
        ];
    }
    let mut out = Vec::new();
    let nvidia_lines: Vec<String> = f
        .dkms
        .iter()
        .filter(|e| e.is_nvidia())
        .map(|e| format!("dkms status: {}", e.line))
        .collect();
    let running = nvidia_entry_for(f, &f.kernel);
    let running_installed = running.iter().any(|e| e.state == DkmsState::Installed);
    let running_built = running.iter().any(|e| e.state == DkmsState::Built);
    let kernel_pkg_version = rules::module_package_version(f);

    // Build failure for the running kernel (a headers problem is reported by its own check).
    // Another installed kernel the driver is known not to build for: the next boot may pick it.
    let doomed: Vec<(String, String)> = kernel_pkg_version
        .as_deref()
        .map(|v| {
            rules::kernels_without_module(f, Some(v))
                .into_iter()
                .filter(|k| *k != f.kernel)
                .filter_map(|k| rules::known_build_failure(v, &k).map(|why| (k, why)))
                .collect()
        })
        .unwrap_or_default();
    if (running_installed || running_built) && !doomed.is_empty() {
        let mut ev: Vec<String> = doomed.iter().map(|(_, why)| why.clone()).collect();
        ev.extend(nvidia_lines.iter().cloned());
        out.push(Finding::problem(
            FindingId::DkmsBuildFailed,
            Severity::Fail,
            format!(
                "the NVIDIA module cannot be built for the installed kernel {}: the next boot may come up without the GPU",
                doomed.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", ")
            ),
            ev,
            Fix::by_hand(
                StepId::Dkms,
                format!("proxmox-boot-tool kernel pin {}   # or choose a newer driver in llmctl.toml", f.kernel),
            ),
        ));
    } else if running_installed || running_built {
        out.push(Finding::ok(
            FindingId::DkmsBuildFailed,
            format!(
                "the NVIDIA module is built for the running kernel {}",
                f.kernel
            ),
        ));
    } else if !rules::headers_present(f, &f.kernel) {
        out.push(Finding::skip(
            FindingId::DkmsBuildFailed,
            format!(
                "no headers for {}: see {}",
                f.kernel,
                FindingId::KernelHeadersMissing
            ),
        ));
    } else {
        let mut ev = nvidia_lines.clone();
        if ev.is_empty() {
            ev.push("dkms status: no nvidia entry at all".into());
        }
        ev.push(format!(
            "no `installed` nvidia entry for the running kernel {}",
            f.kernel
        ));
        ev.extend(f.make_log_lines.iter().map(|l| format!("make.log: {l}")));
        let version = kernel_pkg_version.clone().or_else(|| {
            f.dkms
                .iter()
                .find(|e| e.is_nvidia())
                .map(|e| e.version.clone())
        });
        let mut title = format!(
            "DKMS did not build the NVIDIA module for the running kernel {}",
            f.kernel
        );
        if let Some(v) = &version
            && rules::known_build_failure(v, &f.kernel).is_some()
        {
            title.push_str(&format!(
                ": driver {v} is too old for kernel {} (install a newer branch, e.g. 595 from NVIDIA's CUDA repo, or pin an older kernel with `proxmox-boot-tool kernel pin`)",
                f.kernel
            ));
        }
        // The dkms step runs this build again (and says why it fails); a driver that cannot build for this
        // kernel is a choice in llmctl.toml.
        let fix = match version {
            Some(_) => Fix::step(StepId::Dkms),
            None => Fix::step(StepId::Driver),
        };
        out.push(Finding::problem(
            FindingId::DkmsBuildFailed,
            Severity::Fail,
            title,
            ev,
            fix,
        ));
    }

    // Built but not installed (running kernel: fail), or not built for other installed kernels (warn).
    let mut ev = Vec::new();
    let mut severity = Severity::Ok;
    if running_built && !running_installed {
        severity = Severity::Fail;
        ev.push(format!(
            "running kernel {}: built but not installed",
            f.kernel
        ));
    }
    for k in rules::kernels_without_module(f, kernel_pkg_version.as_deref())
        .iter()
        .filter(|k| **k != f.kernel && !doomed.iter().any(|(d, _)| d == *k))
    {
        severity = Severity::Fail;
        ev.push(format!(
            "kernel {k}: no installed nvidia module (the next boot may pick it and come up without the GPU)"
        ));
    }
    for e in f.dkms.iter().filter(|e| e.is_nvidia()) {
        if let Some(note) = &e.note
            && note.contains("Diff between built and installed")
        {
            severity = severity.max(Severity::Warn);
            ev.push(format!("dkms status: {}", e.line));
        }
    }
    if severity == Severity::Ok {
        out.push(Finding::ok(
            FindingId::DkmsNotBuilt,
            "the NVIDIA module is installed for every kernel with headers",
        ));
    } else {
        ev.extend(nvidia_lines);
        let fix = Fix::step(StepId::Dkms);
        out.push(Finding::problem(
            FindingId::DkmsNotBuilt,
            severity,
            "the NVIDIA DKMS module is not installed for every kernel",
            ev,
            fix,
        ));
    }
    out
}

pub fn check_driver_loaded(f: &HostFacts) -> Vec<Finding> {
    const ID: FindingId = FindingId::DriverNotLoaded;
    if f.module.is_some() {
        return vec![Finding::ok(ID, "the NVIDIA kernel module is loaded")];
    }
    if !rules::kernel_driver_installed(f) {
        return vec![Finding::skip(ID, "no driver installed")];
    }
    if module_absence_explained(f) {
        return vec![Finding::skip(
            ID,
            "the module is not loaded; the cause is reported above",
        )];
    }
    vec![Finding::problem(
        ID,
        Severity::Fail,
        "the NVIDIA driver is installed and built but its module is not loaded",
        module_missing_evidence(f),
        Fix::step(StepId::Module),
    )]
}

/// Host user-space version (from the packages) vs the loaded module.
pub fn check_reboot_pending(f: &HostFacts) -> Vec<Finding> {
    const ID: FindingId = FindingId::DriverRebootPending;
    let Some(m) = &f.module else {
        return vec![Finding::skip(ID, "no NVIDIA module loaded")];
    };
    let mut ev = Vec::new();
    for name in LIB_PACKAGES {
        if let Some(p) = f.package(name)
            && upstream_version(&p.version) != m.version
        {
            ev.push(format!(
                "host package {name} {} ≠ loaded module {}",
                p.version, m.version
            ));
        }
    }
    for e in nvidia_entry_for(f, &f.kernel) {
        if e.state == DkmsState::Installed && e.version != m.version {
            ev.push(format!(
                "dkms status: {} (loaded module is {})",
                e.line, m.version
            ));
        }
    }
    if let Some(SmiReport::Mismatch { .. }) = &f.smi {
        ev.extend(f.smi_lines.iter().map(|l| format!("nvidia-smi: {l}")));
    }
    if let Some(installed) = rules::installed_flavour(f)
        && installed != m.flavour
    {
        ev.push(format!(
            "the {} module is loaded; the installed driver package builds the {} one (it loads at the next boot)",
            rules::flavour_name(m.flavour),
            rules::flavour_name(installed)
        ));
    }
    if ev.is_empty() {
        return vec![Finding::ok(
            ID,
            format!("host libraries match the loaded module {}", m.version),
        )];
    }
    ev.insert(0, format!("/proc/driver/nvidia/version: {}", m.line));
    vec![Finding::problem(
        ID,
        Severity::Fail,
        format!(
            "the loaded NVIDIA module ({} {}) is not the installed driver: a reboot loads the installed one",
            m.version,
            rules::flavour_name(m.flavour)
        ),
        ev,
        Fix::by_hand(
            StepId::Module,
            "reboot   # or run provision with --reboot, which reboots and goes on",
        ),
    )]
}

pub fn check_driver_pinned(f: &HostFacts) -> Vec<Finding> {
    const ID: FindingId = FindingId::DriverNotPinned;
    // The packages provision installs at one version and holds: the same list judges both commands.
    let open = rules::installed_flavour(f) != Some(nvidia::ModuleFlavour::Proprietary);
    let names = rules::debian_driver_packages(f, open)
        .unwrap_or_else(|| crate::provision::host::host_driver_packages(open));
    if names.iter().all(|n| f.package(n).is_none()) {
        return vec![Finding::skip(ID, "no driver packages installed")];
    }
    let unheld = rules::unheld(f, &names);
    if unheld.is_empty() {
        return vec![Finding::ok(
            ID,
            "the driver version is pinned (every driver package held)",
        )];
    }
    vec![Finding::problem(
        ID,
        Severity::Fail,
        "the driver is not pinned: an apt upgrade (or unattended-upgrades) can replace the libraries and leave them ≠ the loaded module",
        unheld
            .iter()
            .map(|p| format!("{p}: installed, not held (apt-mark showhold)"))
            .collect(),
        Fix::step(StepId::Driver),
    )]
}

// ---- host: device nodes ------------------------------------------------------------------------------------

fn node<'a>(f: &'a HostFacts, path: &str) -> Option<&'a system::DevNode> {
    f.dev_nodes.iter().find(|n| n.path == path && n.kind == 'c')
}

pub fn check_device_nodes(f: &HostFacts) -> Vec<Finding> {
    if f.module.is_none() {
        return vec![
            Finding::skip(FindingId::DevUvmMissing, "no NVIDIA module loaded"),
            Finding::skip(FindingId::DevNodesMissing, "no NVIDIA module loaded"),
        ];
    }
    let mut out = Vec::new();
    let missing_uvm: Vec<&str> = UVM_NODES
        .iter()
        .copied()
        .filter(|p| node(f, p).is_none())
        .collect();
    if missing_uvm.is_empty() {
        out.push(Finding::ok(
            FindingId::DevUvmMissing,
            "/dev/nvidia-uvm and /dev/nvidia-uvm-tools exist",
        ));
    } else {
        let mut ev: Vec<String> = missing_uvm
            .iter()
            .map(|p| format!("{p}: does not exist"))
            .collect();
        if !f.has_module("nvidia_uvm") {
            ev.push("lsmod: nvidia_uvm is not loaded".into());
        }
        if let Some(cfg) = f.config() {
            for (i, d) in cfg.devices() {
                if missing_uvm.contains(&d.path.as_str()) {
                    ev.push(format!(
                        "CT {}: dev{i}: {} → pct start fails with `Device {} does not exist`",
                        f.vmid.unwrap_or_default(),
                        d.path,
                        d.path
                    ));
                }
            }
        }
        // When nothing sets uvm up at boot, that is why it is missing now: the provision step fixes both.
        // The provision step creates the nodes now and sets them up for every boot.
        if let Err(why) = rules::uvm_at_boot(f) {
            ev.extend(why);
        }
        let fix = Fix::step(StepId::DevicesAtBoot);
        out.push(Finding::problem(
            FindingId::DevUvmMissing,
            Severity::Fail,
            "/dev/nvidia-uvm is missing: CUDA cannot run, and a container with it as devN refuses to start",
            ev,
            fix,
        ));
    }
    let mut missing: Vec<String> = Vec::new();
    if node(f, "/dev/nvidiactl").is_none() {
        missing.push("/dev/nvidiactl".into());
    }
    if !f
        .dev_nodes
        .iter()
        .any(|n| is_gpu_node(&n.path) && n.kind == 'c')
    {
        missing.push("/dev/nvidia0".into());
    }
    if missing.is_empty() {
        out.push(Finding::ok(
            FindingId::DevNodesMissing,
            "/dev/nvidiactl and the /dev/nvidiaN GPU nodes exist",
        ));
    } else {
        out.push(Finding::problem(
            FindingId::DevNodesMissing,
            Severity::Fail,
            "NVIDIA device nodes are missing on the host",
            missing
                .iter()
                .map(|p| format!("{p}: does not exist"))
                .collect(),
            Fix::step(StepId::DevicesAtBoot),
        ));
    }
    out
}

pub fn check_nodes_at_boot(f: &HostFacts) -> Vec<Finding> {
    const ID: FindingId = FindingId::DevNodesNotAtBoot;
    if !rules::kernel_driver_installed(f) && f.module.is_none() {
        return vec![Finding::skip(ID, "no driver installed")];
    }
    let missing = match rules::uvm_at_boot(f) {
        Ok(()) => {
            return vec![Finding::ok(
                ID,
                "nvidia_uvm and its device nodes are set up at boot",
            )];
        }
        Err(missing) => missing,
    };
    if f.module.is_some() && UVM_NODES.iter().any(|p| node(f, p).is_none()) {
        return vec![Finding::skip(
            ID,
            format!("reported with {}", FindingId::DevUvmMissing),
        )];
    }
    vec![Finding::problem(
        ID,
        Severity::Fail,
        "/dev/nvidia-uvm is not set up at boot: after a reboot, containers with it as devN will not start",
        missing,
        Fix::step(StepId::DevicesAtBoot),
    )]
}

// ---- container: config -------------------------------------------------------------------------------------

fn ct_skip(ids: &[FindingId], why: &str) -> Vec<Finding> {
    ids.iter().map(|id| Finding::skip(*id, why)).collect()
}

pub fn check_container_exists(f: &HostFacts) -> Vec<Finding> {
    const ID: FindingId = FindingId::CtMissing;
    match f.vmid {
        None => vec![Finding::skip(
            ID,
            "no container on this host yet (llmctl provision creates one)",
        )],
        Some(v) if f.configs.contains_key(&v) => {
            vec![Finding::ok(ID, format!("container {v} exists"))]
        }
        Some(v) => {
            let others: Vec<String> = f.configs.keys().map(u32::to_string).collect();
            vec![Finding::problem(
                ID,
                Severity::Fail,
                format!("container {v} does not exist on this node"),
                vec![
                    format!("/etc/pve/lxc/{v}.conf: does not exist"),
                    format!(
                        "containers here: {}",
                        if others.is_empty() {
                            "none".into()
                        } else {
                            others.join(", ")
                        }
                    ),
                ],
                Fix::by_hand(
                    StepId::Container,
                    "pct list   # then pass the right --vmid, or let provision create it",
                ),
            )]
        }
    }
}

fn ct(f: &HostFacts) -> Option<(u32, &LxcConfig)> {
    let v = f.vmid?;
    Some((v, f.configs.get(&v)?))
}

pub fn check_container_config(f: &HostFacts) -> Vec<Finding> {
    let Some((v, cfg)) = ct(f) else {
        return ct_skip(
            &[
                FindingId::CtLocked,
                FindingId::CtConfigInvalid,
                FindingId::CtPendingChanges,
            ],
            "no container",
        );
    };
    let mut out = Vec::new();
    match cfg.lock() {
        Some(lock) => out.push(Finding::problem(
            FindingId::CtLocked,
            Severity::Fail,
            format!(
                "container {v} is locked ({lock}): pct set / start refuse until it is unlocked"
            ),
            vec![format!("/etc/pve/lxc/{v}.conf: lock: {lock}")],
            Fix::by_hand(
                StepId::Devices,
                format!(
                    "pct unlock {v}   # only after making sure no {lock} task is still running"
                ),
            ),
        )),
        None => out.push(Finding::ok(
            FindingId::CtLocked,
            format!("container {v} is not locked"),
        )),
    }
    let mut bad: Vec<String> = cfg
        .unparsed
        .iter()
        .map(|(n, l)| format!("line {n}: {l}"))
        .collect();
    bad.extend(cfg.live.device_errors());
    if bad.is_empty() {
        out.push(Finding::ok(
            FindingId::CtConfigInvalid,
            format!("/etc/pve/lxc/{v}.conf parses"),
        ));
    } else {
        out.push(Finding::problem(
            FindingId::CtConfigInvalid,
            Severity::Fail,
            format!("/etc/pve/lxc/{v}.conf has lines Proxmox rejects"),
            bad,
            Fix::by_hand(
                StepId::Devices,
                format!("pct config {v}   # then correct the lines above with pct set {v} ..."),
            ),
        ));
    }
    match &cfg.pending {
        // Pending devN: the container runs without those devices until a restart, which provision's devices
        // step makes. Other pending keys are the user's own, shown as a warning.
        Some(p) if !p.options.is_empty() || !p.raw.is_empty() => out.push(Finding::problem(
            FindingId::CtPendingChanges,
            if p.devices().is_empty() {
                Severity::Warn
            } else {
                Severity::Fail
            },
            format!("container {v} has pending changes that apply only at its next start"),
            p.options
                .iter()
                .chain(p.raw.iter())
                .map(|(k, val)| format!("[pve:pending] {k}: {val}"))
                .collect(),
            Fix::step(StepId::Devices),
        )),
        _ => out.push(Finding::ok(
            FindingId::CtPendingChanges,
            "no pending config changes",
        )),
    }
    out
}

/// Device paths the container needs: every GPU node the host has (at least nvidia0), nvidiactl, and uvm.
pub fn check_devices_configured(f: &HostFacts) -> Vec<Finding> {
    const ID: FindingId = FindingId::CtDevicesMissing;
    let Some((v, cfg)) = ct(f) else {
        return ct_skip(&[ID], "no container");
    };
    let devn: Vec<String> = cfg
        .devices_with_pending()
        .into_iter()
        .map(|(_, d)| d.path)
        .collect();
    let mounts = cfg.live.mount_entry_sources();
    let missing: Vec<String> = rules::wanted_devices(f)
        .into_iter()
        .filter(|p| !devn.contains(p) && !mounts.contains(&p.as_str()))
        .collect();
    if missing.is_empty() {
        return vec![Finding::ok(
            ID,
            format!("container {v} has every NVIDIA device passed through"),
        )];
    }
    let mut ev: Vec<String> = missing
        .iter()
        .map(|p| {
            let snaps = cfg.snapshots_with_device(p);
            if snaps.is_empty() {
                format!("{p}: no devN entry in the live config")
            } else {
                format!(
                    "{p}: only in snapshot section [{}], which is not the live config (lines after the first [section] header never apply)",
                    snaps.join("], [")
                )
            }
        })
        .collect();
    ev.extend(
        cfg.devices()
            .iter()
            .map(|(i, d)| format!("live dev{i}: {}", d.render())),
    );
    vec![Finding::problem(
        ID,
        Severity::Fail,
        format!("container {v} is missing NVIDIA device passthrough entries"),
        ev,
        Fix::step(StepId::Devices),
    )]
}

/// Hand-written passthrough that works today (its majors match): the same rule as provision's devices step,
/// which replaces it with devN entries, because the uvm major is dynamic and the lines break at some reboot.
pub fn check_legacy_passthrough(f: &HostFacts) -> Vec<Finding> {
    const ID: FindingId = FindingId::CtLegacyPassthrough;
    let Some((v, _)) = ct(f) else {
        return ct_skip(&[ID], "no container");
    };
    let Some(text) = f.config_texts.get(&v) else {
        return ct_skip(&[ID], "no config text");
    };
    let (_, lines) = rules::legacy_passthrough(f, text);
    if lines.is_empty() {
        return vec![Finding::ok(ID, "no hand-written NVIDIA passthrough lines")];
    }
    if check_cgroup_majors(f)
        .iter()
        .any(|x| x.severity.is_problem())
    {
        return vec![Finding::skip(
            ID,
            format!("reported with {}", FindingId::CtCgroupMajorMismatch),
        )];
    }
    vec![Finding::problem(
        ID,
        Severity::Fail,
        format!(
            "container {v} passes the GPU by hand-written lxc lines: they work until the nvidia-uvm major changes at a reboot; devN entries stay right"
        ),
        lines
            .iter()
            .map(|l| format!("/etc/pve/lxc/{v}.conf: {l}"))
            .collect(),
        Fix::step(StepId::Devices),
    )]
}

pub fn check_cgroup_majors(f: &HostFacts) -> Vec<Finding> {
    const ID: FindingId = FindingId::CtCgroupMajorMismatch;
    let Some((v, cfg)) = ct(f) else {
        return ct_skip(&[ID], "no container");
    };
    let rules = cfg.live.cgroup_allows();
    if rules.is_empty() {
        return vec![Finding::ok(
            ID,
            "no hand-written lxc.cgroup2.devices.allow lines (devN handles majors)",
        )];
    }
    let devn: Vec<String> = cfg.devices().into_iter().map(|(_, d)| d.path).collect();
    let nvidia_nodes: Vec<&system::DevNode> = f
        .dev_nodes
        .iter()
        .filter(|n| n.kind == 'c' && n.path.starts_with("/dev/nvidia"))
        .collect();
    let node_majors: Vec<u32> = nvidia_nodes.iter().filter_map(|n| n.major).collect();
    let mut ev = Vec::new();
    // Nodes passed by bind mount (not devN) need an allow rule for their real major:minor.
    let mounts = cfg.live.mount_entry_sources();
    for n in nvidia_nodes
        .iter()
        .filter(|n| mounts.contains(&n.path.as_str()) && !devn.contains(&n.path))
    {
        if let (Some(ma), Some(mi)) = (n.major, n.minor)
            && !rules.iter().any(|r| r.allows_char(ma, mi))
        {
            ev.push(format!(
                "{} is {ma}:{mi} but no lxc.cgroup2.devices.allow line allows major {ma}",
                n.path
            ));
        }
    }
    // Allow rules naming a major that no NVIDIA node has and no other driver owns (the stale uvm-major trap).
    let known_other: Vec<u32> = f
        .proc_devices
        .iter()
        .filter(|(name, _)| !name.starts_with("nvidia"))
        .map(|(_, m)| *m)
        .collect();
    for r in &rules {
        if let Some(ma) = r.major
            && r.kind == 'c'
            && !node_majors.contains(&ma)
            && !known_other.contains(&ma)
        {
            ev.push(format!(
                "lxc.cgroup2.devices.allow: {} → no device has major {ma}",
                r.text
            ));
        }
    }
    if ev.is_empty() {
        return vec![Finding::ok(
            ID,
            "hand-written lxc.cgroup2.devices.allow majors match the devices",
        )];
    }
    ev.extend(nvidia_nodes.iter().map(|n| format!("ls -l: {}", n.line)));
    // The devices step replaces hand-written passthrough with devN entries (they allow the real majors at every
    // start) and keeps every other line of the config as it is.
    let fix = Fix::step(StepId::Devices);
    vec![Finding::problem(
        ID,
        Severity::Fail,
        format!(
            "container {v} allows device majors by hand that do not match the real devices (the nvidia-uvm major is dynamic)"
        ),
        ev,
        fix,
    )]
}

// ---- container: state --------------------------------------------------------------------------------------

pub fn check_resolv(f: &HostFacts) -> Vec<Finding> {
    const ID: FindingId = FindingId::CtResolvImmutable;
    let (Some(v), Some(c)) = (f.vmid, f.container.as_ref()) else {
        return ct_skip(&[ID], "no container");
    };
    let Some((flags, path)) = rules::resolv_immutable(f) else {
        return vec![Finding::ok(
            ID,
            "the container's /etc/resolv.conf is not immutable",
        )];
    };
    let mut ev = vec![format!("lsattr: {flags} {path}")];
    let fix = if c.status == CtStatus::Running {
        ev.push("the next pct start will fail: close (rename) atomic file '/etc/resolv.conf' failed: Operation not permitted".into());
        format!(
            "pct exec {v} -- chattr -i /etc/resolv.conf && pct exec {v} -- touch /etc/.pve-ignore.resolv.conf"
        )
    } else {
        ev.push(format!(
            "container {v} is stopped and will not start: Proxmox's pre-start hook fails with `close (rename) atomic file '/etc/resolv.conf' failed: Operation not permitted`"
        ));
        format!(
            "pct mount {v} && chattr -i /var/lib/lxc/{v}/rootfs/etc/resolv.conf && touch /var/lib/lxc/{v}/rootfs/etc/.pve-ignore.resolv.conf && pct unmount {v} && pct start {v}"
        )
    };
    vec![Finding::problem(
        ID,
        Severity::Fail,
        "the container's /etc/resolv.conf is immutable (chattr +i): Proxmox cannot rewrite it at start, so the container does not start. Pin DNS with /etc/.pve-ignore.resolv.conf instead",
        ev,
        Fix::by_hand(StepId::Start, fix),
    )]
}

/// Live devN paths under /dev/nvidia that do not exist on the host.
fn missing_host_nodes(f: &HostFacts) -> Vec<String> {
    let Some((_, cfg)) = ct(f) else {
        return Vec::new();
    };
    cfg.devices()
        .into_iter()
        .map(|(_, d)| d.path)
        .filter(|p| p.starts_with("/dev/nvidia") && node(f, p).is_none())
        .collect()
}

/// Whether a host check reports why those nodes are missing: no module at all (driver/dkms/nouveau/secure boot
/// checks), or the standard nodes that `dev.uvm-missing` / `dev.nodes-missing` cover.
fn host_explains_missing_nodes(f: &HostFacts) -> bool {
    f.module.is_none()
        || missing_host_nodes(f).iter().all(|p| {
            UVM_NODES.contains(&p.as_str())
                || p == "/dev/nvidiactl"
                || (is_gpu_node(p) && !f.dev_nodes.iter().any(|n| is_gpu_node(&n.path)))
        })
}

pub fn check_running(f: &HostFacts) -> Vec<Finding> {
    const ID: FindingId = FindingId::CtNotRunning;
    let (Some(v), Some(c)) = (f.vmid, f.container.as_ref()) else {
        return ct_skip(&[ID], "no container");
    };
    match &c.status {
        CtStatus::Running => vec![Finding::ok(ID, format!("container {v} is running"))],
        // The immutable resolv.conf is why it does not start: reported there, with the fix that starts it.
        CtStatus::Stopped if rules::resolv_immutable(f).is_some() => vec![Finding::skip(
            ID,
            format!(
                "container {v} is stopped; see {}",
                FindingId::CtResolvImmutable
            ),
        )],
        // A devN node missing on the host makes `pct start` die (`Device ... does not exist`); the host check
        // that explains the missing node is the one to act on.
        CtStatus::Stopped if !missing_host_nodes(f).is_empty() && host_explains_missing_nodes(f) => {
            vec![Finding::skip(
                ID,
                format!(
                    "container {v} is stopped and cannot start while {} is missing on the host (reported above)",
                    missing_host_nodes(f).join(", ")
                ),
            )]
        }
        // A devN for a GPU the host no longer has (removed, renumbered): the devices step takes it out;
        // `pct start` alone fails on it. The cause has its own id.
        CtStatus::Stopped if !missing_host_nodes(f).is_empty() => vec![
            Finding::problem(
                FindingId::CtDeviceGone,
                Severity::Fail,
                format!(
                    "container {v} passes in a GPU the host does not have, so it cannot start"
                ),
                std::iter::once(format!("pct status {v}: status: stopped"))
                    .chain(missing_host_nodes(f).iter().map(|p| {
                        format!("devN {p} does not exist on the host: pct start fails with `Device {p} does not exist`")
                    }))
                    .collect(),
                Fix::step(StepId::Devices),
            ),
            Finding::skip(
                ID,
                format!("it cannot start; see {}", FindingId::CtDeviceGone),
            ),
        ],
        CtStatus::Stopped => vec![Finding::problem(
            ID,
            Severity::Fail,
            format!("container {v} is stopped (its GPU, llama-server and proxy were not checked)"),
            vec![format!("pct status {v}: status: stopped")],
            Fix::step(StepId::Start),
        )],
        CtStatus::Unknown(said) => vec![Finding::problem(
            ID,
            Severity::Fail,
            format!("cannot tell whether container {v} runs"),
            vec![format!("pct status {v}: {said}")],
            Fix::by_hand(StepId::Start, format!("pct status {v}")),
        )],
    }
}

fn inside(f: &HostFacts) -> Option<(u32, &crate::host::facts::InsideFacts)> {
    let c = f.container.as_ref()?;
    Some((c.vmid, c.inside.as_ref()?))
}

pub fn check_ct_libs(f: &HostFacts) -> Vec<Finding> {
    const ID: FindingId = FindingId::CtLibsMismatch;
    let Some((v, ins)) = inside(f) else {
        return ct_skip(&[ID, FindingId::CtLibsNotPinned], "container not running");
    };
    // The libraries must match the driver the host has installed: after an upgrade that waits for its reboot,
    // that is the new version (the reboot loads it), not the module still loaded.
    let Some(target) = rules::installed_driver_version(f) else {
        return ct_skip(
            &[ID, FindingId::CtLibsNotPinned],
            "no NVIDIA driver installed on the host",
        );
    };
    let wrong = rules::libs_not_at(&ins.packages, LIB_PACKAGES, &target);
    let mut ev: Vec<String> = wrong
        .iter()
        .map(|name| {
            match ins
                .packages
                .iter()
                .find(|p| p.name == *name && p.installed())
            {
                Some(p) => format!(
                    "CT {v}: {name} {} ≠ {target} (the host's installed driver)",
                    p.version
                ),
                None => format!("CT {v}: {name} is not installed (want {target})"),
            }
        })
        .collect();
    if ev.is_empty() {
        let unheld: Vec<&str> = LIB_PACKAGES
            .iter()
            .copied()
            .filter(|n| {
                !ins.holds.iter().any(|h| h == n)
                    && !ins.packages.iter().any(|p| p.name == *n && p.held())
            })
            .collect();
        let pinned = if unheld.is_empty() {
            Finding::ok(
                FindingId::CtLibsNotPinned,
                "the container's NVIDIA libraries are held",
            )
        } else {
            Finding::problem(
                FindingId::CtLibsNotPinned,
                Severity::Fail,
                format!(
                    "container {v}'s NVIDIA libraries are not held: an apt upgrade inside it would break NVML"
                ),
                unheld
                    .iter()
                    .map(|n| format!("CT {v}: {n}: not held"))
                    .collect(),
                Fix::step(StepId::CtLibs),
            )
        };
        return vec![
            Finding::ok(
                ID,
                format!(
                    "container {v}'s NVIDIA libraries are {target}, matching the host's driver"
                ),
            ),
            pinned,
        ];
    }
    if let Some(SmiReport::Mismatch { .. }) = &ins.smi {
        ev.extend(
            ins.smi_lines
                .iter()
                .map(|l| format!("CT {v} nvidia-smi: {l}")),
        );
    }
    vec![
        Finding::problem(
            ID,
            Severity::Fail,
            format!(
                "container {v}'s NVIDIA libraries do not match the host's driver {target}: NVML fails with `Driver/library version mismatch`"
            ),
            ev,
            Fix::step(StepId::CtLibs),
        ),
        Finding::skip(FindingId::CtLibsNotPinned, "libraries do not match yet"),
    ]
}

pub fn check_gpu_visible(f: &HostFacts) -> Vec<Finding> {
    const ID: FindingId = FindingId::CtGpuNotVisible;
    let Some((v, ins)) = inside(f) else {
        return ct_skip(&[ID], "container not running");
    };
    let host_ok = matches!(f.smi, Some(SmiReport::Ok { .. }));
    let blocked = !host_ok
        || check_devices_configured(f)
            .iter()
            .any(|x| x.severity.is_problem())
        || check_ct_libs(f)
            .iter()
            .any(|x| x.id == FindingId::CtLibsMismatch && x.severity.is_problem())
        || check_cgroup_majors(f)
            .iter()
            .any(|x| x.severity.is_problem())
        || check_container_config(f)
            .iter()
            .any(|x| x.id == FindingId::CtPendingChanges && x.severity.is_problem());
    if blocked {
        return vec![Finding::skip(
            ID,
            "a cause upstream (host driver, devices, pending config, libraries) is reported above",
        )];
    }
    let has_node = ins
        .dev_nodes
        .iter()
        .any(|n| is_gpu_node(&n.path) && n.kind == 'c');
    match (&ins.smi, has_node) {
        (Some(SmiReport::Ok { driver_version, .. }), true) => {
            vec![Finding::ok(
                ID,
                format!("nvidia-smi works inside container {v} (driver {driver_version})"),
            )]
        }
        _ => {
            let mut ev: Vec<String> = ins
                .smi_lines
                .iter()
                .take(3)
                .map(|l| format!("CT {v} nvidia-smi: {l}"))
                .collect();
            if !has_node {
                ev.push(format!(
                    "CT {v}: no /dev/nvidiaN device node inside the container"
                ));
            }
            vec![Finding::problem(
                ID,
                Severity::Fail,
                format!(
                    "the GPU is not usable inside container {v} although host, devices and libraries look right"
                ),
                ev,
                Fix::step(StepId::Devices),
            )]
        }
    }
}

// ---- container: llama.cpp and services ---------------------------------------------------------------------

/// The llama-server units the container runs: one `llama-server-gpu<i>` per GPU when their files are there, and
/// `llama-server` while its file is still there or when there is no replica (provision removes it when it runs
/// replicas). Findings about "the llama-server" name these, not a unit the host does not have.
fn llama_units(ins: &crate::host::facts::InsideFacts) -> Vec<String> {
    let replicas = rules::replica_gpus(ins);
    let mut units: Vec<String> = replicas
        .iter()
        .map(|i| crate::host::facts::replica_unit(*i))
        .collect();
    if replicas.is_empty()
        || ins
            .file(crate::provision::units::LLAMA_SERVER_UNIT_PATH)
            .is_some()
    {
        units.insert(0, LLAMA_UNIT.to_string());
    }
    units
}

/// `a.service` / `a.service, b.service`; more than three as the first and last (twelve GPUs make a line
/// nobody reads).
fn unit_files(units: &[String]) -> String {
    match units {
        [first, .., last] if units.len() > 3 => {
            format!("{first}.service ... {last}.service ({} units)", units.len())
        }
        _ => units
            .iter()
            .map(|u| format!("{u}.service"))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

pub fn check_llama_build(f: &HostFacts) -> Vec<Finding> {
    let ids = [
        FindingId::LlamaNotInstalled,
        FindingId::LlamaNotCuda,
        FindingId::LlamaCudaArch,
    ];
    let Some((v, ins)) = inside(f) else {
        return ct_skip(&ids, "container not running");
    };
    let units = llama_units(ins);
    let Some(unit) = &ins.llama_unit else {
        // Replica unit files without an ExecStart (the single unit is not there, or has none either).
        let (title, ev) = if units.iter().any(|u| u != LLAMA_UNIT) {
            (
                format!("container {v} has no llama-server unit with an ExecStart"),
                units
                    .iter()
                    .map(|u| format!("CT {v}: /etc/systemd/system/{u}.service: no ExecStart"))
                    .collect(),
            )
        } else {
            (
                format!("container {v} has no {LLAMA_UNIT}.service with an ExecStart"),
                vec![format!(
                    "CT {v}: /etc/systemd/system/{LLAMA_UNIT}.service: not found"
                )],
            )
        };
        let mut out = vec![Finding::problem(
            FindingId::LlamaNotInstalled,
            Severity::Fail,
            title,
            ev,
            Fix::step(StepId::Llama),
        )];
        out.extend(ct_skip(&ids[1..], "llama-server not installed"));
        return out;
    };
    // An interrupted rebuild can leave the unit pointing at a binary that is gone (the running server keeps the
    // deleted file open, so it looks fine until its next restart fails with 203/EXEC).
    if ins.llama_exe.is_none() {
        let mut out = vec![Finding::problem(
            FindingId::LlamaNotInstalled,
            Severity::Fail,
            format!(
                "{} does not exist in container {v}: the next start of {} fails",
                unit.argv[0],
                units.join(", ")
            ),
            vec![format!(
                "CT {v}: ls -l {}: No such file or directory",
                unit.argv[0]
            )],
            Fix::step(StepId::Llama),
        )];
        out.extend(ct_skip(&ids[1..], "llama-server is not there"));
        return out;
    }
    let mut out = vec![Finding::ok(
        FindingId::LlamaNotInstalled,
        format!(
            "{} {} {}",
            unit_files(&units),
            if units.len() == 1 { "runs" } else { "run" },
            unit.argv[0]
        ),
    )];
    let Some(cache) = &ins.cmake else {
        out.push(Finding::problem(
            FindingId::LlamaNotCuda,
            Severity::Fail,
            "cannot find the llama.cpp build's CMakeCache.txt: was it built here?",
            vec![format!(
                "CT {v}: {}: not readable",
                ins.cmake_path
                    .clone()
                    .unwrap_or_else(|| "CMakeCache.txt".into())
            )],
            Fix::step(StepId::Llama),
        ));
        out.push(Finding::skip(FindingId::LlamaCudaArch, "no CMakeCache.txt"));
        return out;
    };
    let cuda = cache.get("GGML_CUDA").map(String::as_str);
    if !matches!(cuda, Some("ON" | "on" | "1" | "TRUE" | "true" | "YES")) {
        out.push(Finding::problem(
            FindingId::LlamaNotCuda,
            Severity::Fail,
            "llama.cpp was built without CUDA: everything runs on the CPU",
            vec![format!(
                "{}: GGML_CUDA={}",
                ins.cmake_path.clone().unwrap_or_default(),
                cuda.unwrap_or("(unset)")
            )],
            Fix::step(StepId::Llama),
        ));
        out.push(Finding::skip(FindingId::LlamaCudaArch, "not a CUDA build"));
        return out;
    }
    out.push(Finding::ok(
        FindingId::LlamaNotCuda,
        "llama.cpp is built with CUDA",
    ));
    out.push(arch_finding(
        f,
        cache.get("CMAKE_CUDA_ARCHITECTURES").map(String::as_str),
        ins.cmake_path.as_deref(),
    ));
    out
}

fn arch_finding(f: &HostFacts, value: Option<&str>, path: Option<&str>) -> Finding {
    const ID: FindingId = FindingId::LlamaCudaArch;
    let Some(value) = value else {
        return Finding::ok(
            ID,
            "CMAKE_CUDA_ARCHITECTURES unset: llama.cpp's default list",
        );
    };
    // What provision's llama step builds with: the same list, from the same GPUs.
    let Ok(wanted) = rules::cuda_architectures(f) else {
        return Finding::skip(ID, "no GPU reported by nvidia-smi --query-gpu on the host");
    };
    let archs = llama::parse_cuda_architectures(value);
    let mut worst = Severity::Ok;
    let mut ev = vec![format!(
        "{}: CMAKE_CUDA_ARCHITECTURES={value}",
        path.unwrap_or("CMakeCache.txt")
    )];
    for g in rules::driver_gpus(f) {
        let arch = g.compute_cap.arch();
        match llama::arch_fit(&archs, arch) {
            ArchFit::Exact | ArchFit::Unknown => {}
            // Runs only after a JIT compile of PTX at every start, and provision rebuilds it for the exact
            // architecture: a failure, so doctor and `provision --check` agree.
            ArchFit::PtxOnly => {
                worst = worst.max(Severity::Fail);
                ev.push(format!("{} (compute capability {}): only PTX of an older arch, JIT-compiled at every start", g.name, g.compute_cap));
            }
            ArchFit::None => {
                worst = Severity::Fail;
                ev.push(format!(
                    "{} (compute capability {}): no code for arch {arch} → `no kernel image is available for execution on the device`",
                    g.name, g.compute_cap
                ));
            }
        }
    }
    if worst == Severity::Ok {
        return Finding::ok(
            ID,
            format!("llama.cpp is built for the GPUs' arch ({value})"),
        );
    }
    Finding::problem(
        ID,
        worst,
        format!("llama.cpp was built for CUDA arch {value}, not the GPU's {wanted}"),
        ev,
        Fix::step(StepId::Llama),
    )
}

/// Claude Code's system prompt and tools take ~20-24k tokens; below 32768 the first request already overflows.
pub const MIN_CONTEXT: u64 = 32768;

pub fn check_llama_context(f: &HostFacts) -> Vec<Finding> {
    const ID: FindingId = FindingId::LlamaContextSmall;
    let Some((v, ins)) = inside(f) else {
        return ct_skip(&[ID], "container not running");
    };
    let Some(unit) = &ins.llama_unit else {
        return ct_skip(&[ID], "llama-server not installed");
    };
    // With one llama-server per GPU, each replica's own -c (the smallest decides what a client gets).
    let mut named: Vec<(String, &crate::pve::llama::ServerCommand)> = ins
        .replicas
        .iter()
        .map(|(i, u)| (crate::host::facts::replica_unit(*i), u))
        .collect();
    if ins
        .file(crate::provision::units::LLAMA_SERVER_UNIT_PATH)
        .is_some()
        || named.is_empty()
    {
        named.insert(0, (LLAMA_UNIT.to_string(), unit));
    }
    let per_slot = |u: &crate::pve::llama::ServerCommand| {
        u.ctx_size
            .map(|c| c / u.parallel.unwrap_or(1).max(1))
            .unwrap_or(0)
    };
    let (unit_name, unit) = named
        .iter()
        .min_by_key(|(_, u)| (u.ctx_size.is_some(), per_slot(u)))
        .map(|(n, u)| (n.as_str(), *u))
        .unwrap_or((LLAMA_UNIT, unit));
    let slots = unit.parallel.unwrap_or(1).max(1);
    match unit.ctx_size {
        Some(c) if c / slots >= MIN_CONTEXT => vec![Finding::ok(
            ID,
            format!("context {c} tokens per {} slot(s)", slots),
        )],
        Some(c) => vec![Finding::problem(
            ID,
            Severity::Fail,
            format!(
                "{unit_name}'s context is {} tokens per slot, below {MIN_CONTEXT}: Claude Code's system prompt and tools (~20-24k tokens) overflow it (exceed_context_size_error)",
                c / slots
            ),
            vec![format!(
                "CT {v} {unit_name}.service ExecStart: -c {c}{}",
                if slots > 1 {
                    format!(" -np {slots}")
                } else {
                    String::new()
                }
            )],
            Fix::step(StepId::LlamaService),
        )],
        None => vec![Finding::problem(
            ID,
            Severity::Warn,
            format!(
                "{unit_name} has no -c: it uses the model's training context, which may be below {MIN_CONTEXT}"
            ),
            vec![format!(
                "CT {v} {unit_name}.service ExecStart: no -c/--ctx-size"
            )],
            Fix::step(StepId::LlamaService),
        )],
    }
}

pub fn check_services(f: &HostFacts) -> Vec<Finding> {
    let Some((v, ins)) = inside(f) else {
        return ct_skip(
            &[FindingId::SvcLlamaServerDown, FindingId::SvcProxyDown],
            "container not running",
        );
    };
    let mut out = Vec::new();
    // One llama-server per GPU: each replica unit is judged, and llama-server.service only while its file is
    // still there (provision removes it when it runs replicas).
    let replicas = rules::replica_gpus(ins);
    let llama_units = llama_units(ins);
    let down: Vec<(String, &str)> = llama_units
        .iter()
        .map(|u| {
            (
                u.clone(),
                ins.services.get(u).map_or("unknown", String::as_str),
            )
        })
        .filter(|(_, s)| *s != "active")
        .collect();
    if down.is_empty() {
        out.push(Finding::ok(
            FindingId::SvcLlamaServerDown,
            format!(
                "{} {} active",
                llama_units.join(", "),
                if llama_units.len() == 1 { "is" } else { "are" }
            ),
        ));
    } else {
        out.push(Finding::problem(
            FindingId::SvcLlamaServerDown,
            Severity::Fail,
            format!(
                "{} is not running in container {v}",
                down.iter()
                    .map(|(u, _)| u.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            down.iter()
                .map(|(u, s)| format!("CT {v}: systemctl is-active {u}: {s}"))
                .collect(),
            Fix::step(StepId::LlamaService),
        ));
    }
    {
        let (id, unit) = (FindingId::SvcProxyDown, PROXY_UNIT);
        let state = ins.services.get(unit).map_or("unknown", String::as_str);
        if state == "active" {
            out.push(Finding::ok(id, format!("{unit} is active")));
        } else {
            out.push(Finding::problem(
                id,
                Severity::Fail,
                format!("{unit} is not running in container {v}"),
                vec![format!("CT {v}: systemctl is-active {unit}: {state}")],
                Fix::step(StepId::ProxyService),
            ));
        }
    }
    match &ins.proxy_unit_exec {
        Some(exec) if exec.contains("litellm") => out.push(Finding::problem(
            FindingId::SvcProxyLitellm,
            Severity::Warn,
            "the proxy unit runs LiteLLM, which can hang Claude Code requests silently (LiteLLM 1.83 ResponsesAPIResponse validation)",
            vec![format!("CT {v} {PROXY_UNIT}.service ExecStart={exec}")],
            Fix::step(StepId::ProxyService),
        )),
        _ => out.push(Finding::ok(FindingId::SvcProxyLitellm, "the proxy is not LiteLLM")),
    }
    // Each replica pinned to its own GPU, and none for a GPU the host does not have.
    if replicas.is_empty() {
        out.push(Finding::ok(
            FindingId::SvcReplicaPin,
            "no llama-server replicas (one llama-server)",
        ));
    } else {
        let gpu_count = rules::gpus(f).len();
        let problems: Vec<String> = replicas
            .iter()
            .flat_map(|i| {
                let text = ins
                    .file(&crate::host::facts::replica_unit_path(*i))
                    .unwrap_or_default();
                rules::replica_pin_problems(text, *i, gpu_count)
            })
            .collect();
        if problems.is_empty() {
            out.push(Finding::ok(
                FindingId::SvcReplicaPin,
                format!(
                    "{} llama-server replicas, each pinned to its own GPU",
                    replicas.len()
                ),
            ));
        } else {
            out.push(Finding::problem(
                FindingId::SvcReplicaPin,
                Severity::Fail,
                format!("llama-server replicas in container {v} are not pinned one per GPU"),
                problems
                    .into_iter()
                    .map(|p| format!("CT {v} {p}"))
                    .collect(),
                Fix::step(StepId::LlamaService),
            ));
        }
    }
    out
}

#[cfg(test)]
#[path = "checks_tests.rs"]
mod tests;
