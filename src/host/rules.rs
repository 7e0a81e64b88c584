//! Rules that judge one concern of a host. Each is a pure function of the facts, called by doctor (to report)
//! and by provision (to plan): one definition of "right", so the two commands cannot disagree about it.

use super::facts::{self, HostFacts, InsideFacts};
use crate::pve::dkms::DkmsState;
use crate::pve::nvidia::ModuleFlavour;

/// `/dev/nvidiaN`: one GPU's device node (not the control or uvm nodes).
pub fn is_gpu_node(path: &str) -> bool {
    path.strip_prefix("/dev/nvidia")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The device nodes a container needs: every `/dev/nvidiaN` the host has, the control node, and uvm.
pub fn wanted_devices(f: &HostFacts) -> Vec<String> {
    let mut gpus: Vec<String> = f
        .dev_nodes
        .iter()
        .filter(|n| is_gpu_node(&n.path))
        .map(|n| n.path.clone())
        .collect();
    if gpus.is_empty() {
        gpus.push("/dev/nvidia0".into());
    }
    // By GPU number, not as text: /dev/nvidia2 before /dev/nvidia10.
    gpus.sort_by_key(|p| {
        p.trim_start_matches("/dev/nvidia")
            .parse::<u32>()
            .unwrap_or(u32::MAX)
    });
    gpus.extend(["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"].map(String::from));
    gpus
}

/// The `grep -rsH nouveau` line (`file:text`) that blacklists nouveau: its first two words are
/// `blacklist nouveau` (a comment, an `options nouveau` line or `blacklist nouveaux` do not count).
pub fn nouveau_blacklist_line(lines: &[String]) -> Option<&String> {
    lines.iter().find(|l| {
        let text = l.split_once(':').map_or(l.as_str(), |(_, t)| t).trim();
        let mut words = text.split_whitespace();
        words.next() == Some("blacklist") && words.next() == Some("nouveau")
    })
}

/// The kernels DKMS must build the NVIDIA module for: every installed Proxmox kernel (the next boot may pick any
/// of them: an upgrade installs a new one and makes it the default) and the running one.
pub fn kernels(f: &HostFacts) -> Vec<String> {
    let mut out: Vec<String> = f
        .installed_kernels
        .iter()
        .filter(|k| crate::pve::system::is_pve_kernel(k))
        .cloned()
        .collect();
    if !f.kernel.is_empty() && !out.contains(&f.kernel) {
        out.push(f.kernel.clone());
    }
    out
}

/// The headers package Proxmox names for a kernel (`proxmox-headers-*` from PVE 8 on, `pve-headers-*` before).
pub fn headers_package(f: &HostFacts, kernel: &str) -> String {
    crate::pve::system::headers_package(kernel, f.pve.as_ref().map(|p| p.major))
}

/// Headers count as present when the kernel's build directory exists or either package name is installed.
pub fn headers_present(f: &HostFacts, kernel: &str) -> bool {
    f.kernels_with_build_dir.iter().any(|k| k == kernel)
        || f.package(&format!("proxmox-headers-{kernel}")).is_some()
        || f.package(&format!("pve-headers-{kernel}")).is_some()
}

/// The kernels (of [`kernels`]) without headers: DKMS cannot build the module for them.
pub fn kernels_without_headers(f: &HostFacts) -> Vec<String> {
    kernels(f)
        .into_iter()
        .filter(|k| !headers_present(f, k))
        .collect()
}

/// Whether DKMS has installed nvidia `version` for `kernel` (`None`: any version).
pub fn module_installed_for(f: &HostFacts, kernel: &str, version: Option<&str>) -> bool {
    f.dkms.iter().any(|e| {
        e.is_nvidia()
            && e.kernel.as_deref() == Some(kernel)
            && e.state == DkmsState::Installed
            && version.is_none_or(|v| e.version == v)
    })
}

/// The kernels (of [`kernels`]) with headers but without the NVIDIA module `version` installed: booting one of
/// them leaves the GPU without a driver. A kernel without headers is [`kernels_without_headers`]'s finding.
pub fn kernels_without_module(f: &HostFacts, version: Option<&str>) -> Vec<String> {
    kernels(f)
        .into_iter()
        .filter(|k| headers_present(f, k) || *k == f.kernel)
        .filter(|k| !module_installed_for(f, k, version))
        .collect()
}

/// A driver is pinned when apt cannot move it: every installed driver package is held. (NVIDIA's
/// `nvidia-driver-pinning-<branch>` package pins a branch, not one exact version: provision installs it before
/// the driver as NVIDIA documents, but it is not what keeps the version exact.)
pub fn unheld<'a>(f: &HostFacts, packages: &[&'a str]) -> Vec<&'a str> {
    packages
        .iter()
        .copied()
        .filter(|n| f.package(n).is_some() && !f.is_held(n))
        .collect()
}

/// The udev line that creates the uvm device nodes when the driver loads (`nvidia-modprobe ... -u`).
pub fn uvm_udev_line(f: &HostFacts) -> Option<&String> {
    f.udev_rules.iter().find(|l| {
        let rule = l.split_once(':').map_or(l.as_str(), |(_, t)| t);
        !rule.trim_start().starts_with('#')
            && rule.contains("nvidia-modprobe")
            && rule
                .split(|c: char| c.is_whitespace() || c == '\'' || c == '"')
                .any(|w| {
                    w == "-u" || (w.starts_with('-') && !w.starts_with("--") && w.contains('u'))
                })
    })
}

/// Whether `nvidia_uvm` is listed in modules-load.d (or /etc/modules).
pub fn uvm_loaded_at_boot(f: &HostFacts) -> bool {
    f.modules_load.iter().any(|l| {
        let v = l.split_once(':').map_or(l.as_str(), |(_, t)| t).trim();
        v == "nvidia_uvm" || v == "nvidia-uvm"
    })
}

/// What sets `/dev/nvidia-uvm` and `-uvm-tools` up at boot, before containers with them as devN start (they
/// refuse to start without them). Both are needed: a udev rule running `nvidia-modprobe -u` (loading a module
/// creates no device node), and something that loads `nvidia_uvm` (modules-load.d, or the same rule when it
/// fires for the `nvidia` module, which the kernel loads by itself for the GPU). `Err` says what is missing.
pub fn uvm_at_boot(f: &HostFacts) -> Result<(), Vec<String>> {
    let rule = uvm_udev_line(f);
    let fires_on_nvidia = rule.is_some_and(|l| l.contains("KERNEL==\"nvidia\""));
    let mut missing = Vec::new();
    if rule.is_none() {
        missing.push(
            "no udev rule in /etc/udev/rules.d or /usr/lib/udev/rules.d runs `nvidia-modprobe -c0 -u` (it creates \
             /dev/nvidia-uvm and -uvm-tools)"
                .to_string(),
        );
    }
    if !uvm_loaded_at_boot(f) && !fires_on_nvidia {
        missing.push(
            "no nvidia_uvm line in /etc/modules-load.d/*.conf or /etc/modules (nothing loads nvidia_uvm at boot)"
                .to_string(),
        );
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing)
    }
}

/// The packages that build the NVIDIA kernel module with DKMS, and the flavour each builds: NVIDIA's
/// repository's (`nvidia-kernel-open-dkms`, `nvidia-kernel-dkms`) and Debian's (`nvidia-open-kernel-dkms`,
/// and the same `nvidia-kernel-dkms`). One list, so doctor and provision agree on what "a driver is installed"
/// means and which version and flavour it is.
pub const MODULE_PACKAGES: &[(&str, ModuleFlavour)] = &[
    ("nvidia-kernel-open-dkms", ModuleFlavour::Open),
    ("nvidia-kernel-dkms", ModuleFlavour::Proprietary),
    ("nvidia-open-kernel-dkms", ModuleFlavour::Open),
];

/// The installed package that builds the NVIDIA kernel module (the first of [`MODULE_PACKAGES`]).
pub fn module_package(f: &HostFacts) -> Option<&crate::pve::packages::Package> {
    MODULE_PACKAGES.iter().find_map(|(n, _)| f.package(n))
}

/// The upstream version of the installed module package (`595.71.05`), without DKMS's or the loaded module's.
pub fn module_package_version(f: &HostFacts) -> Option<String> {
    module_package(f).map(|p| crate::pve::packages::upstream_version(&p.version).to_string())
}

/// The driver version the host has installed: what its module package (NVIDIA's or Debian's) is at, else what
/// DKMS knows, else the loaded module. After an upgrade that still waits for its reboot this is the new
/// version, which the container's libraries must match (the reboot loads it).
pub fn installed_driver_version(f: &HostFacts) -> Option<String> {
    module_package_version(f)
        .or_else(|| {
            f.dkms
                .iter()
                .find(|e| e.is_nvidia())
                .map(|e| e.version.clone())
        })
        .or_else(|| f.module.as_ref().map(|m| m.version.clone()))
}

/// Whether a kernel-side NVIDIA driver is installed: a module package, or an nvidia module DKMS knows (a
/// `.run` install or a package dpkg no longer lists).
pub fn kernel_driver_installed(f: &HostFacts) -> bool {
    module_package(f).is_some() || f.dkms.iter().any(|e| e.is_nvidia())
}

/// The container's user-space driver packages not installed at `version`. Only the upstream version counts:
/// NVIDIA's `-1` and Debian's `-2` of one driver are the same libraries to NVML.
pub fn libs_not_at<'a>(
    packages: &[crate::pve::packages::Package],
    names: &[&'a str],
    version: &str,
) -> Vec<&'a str> {
    names
        .iter()
        .copied()
        .filter(|n| {
            !packages
                .iter()
                .any(|p| p.name == *n && p.installed() && p.upstream_version() == version)
        })
        .collect()
}

/// Why Secure Boot keeps the NVIDIA module out, when it does: Secure Boot on, the module not loaded, the driver
/// installed, and DKMS's signing key not enrolled (or not even created: the module was built unsigned). A host
/// whose module is loaded under Secure Boot is fine (it is signed with an enrolled key); a host without a driver
/// yet is not blocked (DKMS creates and uses the key at its first build; it is enrolled after that).
pub fn secure_boot_blocks(f: &HostFacts) -> Option<String> {
    use super::facts::MokKey;
    if f.secure_boot != Some(true) || f.module.is_some() || installed_driver_version(f).is_none() {
        return None;
    }
    match f.mok_key {
        Some(MokKey::Enrolled) => None,
        Some(MokKey::NotEnrolled) => Some(
            "Secure Boot is on and DKMS's signing key /var/lib/dkms/mok.pub is not enrolled, so the kernel rejects \
             the NVIDIA module. Enroll it: `mokutil --import /var/lib/dkms/mok.pub` (it asks for a one-time \
             password), reboot, choose \"Enroll MOK\" at the blue MOK screen and give that password; then run \
             provision again"
                .into(),
        ),
        Some(MokKey::Missing) | None => Some(
            "Secure Boot is on and the NVIDIA module was built unsigned (DKMS had no signing key, \
             /var/lib/dkms/mok.pub), so the kernel rejects it. Rebuild it so DKMS creates the key and signs it \
             (`dkms remove nvidia -v <version> --all && dkms install nvidia -v <version>`), enroll the key \
             (`mokutil --import /var/lib/dkms/mok.pub`, reboot, \"Enroll MOK\"), then run provision again"
                .into(),
        ),
    }
}

/// How the two kernel module flavours are called in messages.
pub fn flavour_name(f: crate::pve::nvidia::ModuleFlavour) -> &'static str {
    match f {
        crate::pve::nvidia::ModuleFlavour::Open => "open",
        crate::pve::nvidia::ModuleFlavour::Proprietary => "proprietary",
    }
}

/// The module flavour the installed driver packages build ([`MODULE_PACKAGES`]); the open one when packages
/// of both are installed.
pub fn installed_flavour(f: &HostFacts) -> Option<ModuleFlavour> {
    let installed = |flavour| {
        MODULE_PACKAGES
            .iter()
            .any(|(n, fl)| *fl == flavour && f.package(n).is_some())
    };
    [ModuleFlavour::Open, ModuleFlavour::Proprietary]
        .into_iter()
        .find(|fl| installed(*fl))
}

/// The host's GPUs as the generation rules need them: from the driver (`nvidia-smi`, exact compute capability)
/// when it runs, else from the PCI bus, where the chip codename's prefix gives the generation (ref
/// gpu-generations.md: GK Kepler, GM Maxwell, GP Pascal, GV Volta, TU Turing, GA Ampere, AD Ada, GH Hopper, GB
/// Blackwell) and a representative compute capability of it.
pub fn gpus(f: &HostFacts) -> Vec<crate::gpu::GpuModel> {
    use crate::gpu::{ComputeCap, GpuModel};
    let from_driver = driver_gpus(f);
    if !from_driver.is_empty() {
        return from_driver;
    }
    f.pci_gpus
        .iter()
        .enumerate()
        .filter_map(|(index, g)| {
            let chip = g.chip.to_ascii_uppercase();
            let (major, minor) = match chip.get(..2)? {
                "GK" => (3, 5),
                "GM" => (5, 2),
                "GP" if chip.starts_with("GP100") => (6, 0),
                "GP" => (6, 1),
                "GV" => (7, 0),
                "TU" => (7, 5),
                "GA" if chip.starts_with("GA100") => (8, 0),
                "GA" => (8, 6),
                "AD" => (8, 9),
                "GH" => (9, 0),
                "GB" if chip.starts_with("GB1") => (10, 0),
                "GB" => (12, 0),
                _ => return None,
            };
            Some(GpuModel {
                index,
                name: if g.name.is_empty() {
                    g.chip.clone()
                } else {
                    g.name.clone()
                },
                compute_cap: ComputeCap { major, minor },
            })
        })
        .collect()
}

/// The GPUs as the driver reports them (`nvidia-smi --query-gpu`), with their exact compute capability; a row
/// whose capability does not parse is left out. Empty before the driver runs.
pub fn driver_gpus(f: &HostFacts) -> Vec<crate::gpu::GpuModel> {
    f.gpus
        .iter()
        .enumerate()
        .filter_map(|(i, g)| crate::gpu::GpuModel::from_query(i, g))
        .collect()
}

/// The `CMAKE_CUDA_ARCHITECTURES` llama.cpp must be built with on this host: [`crate::gpu::cuda_architectures`]
/// of the GPUs the driver reports. From the driver only: the PCI codename gives a generation, not the exact
/// capability (a GM107 is 5.0, a GM204 5.2), and a build for the wrong one cannot run. Doctor judges the build
/// against it and provision's `llama` step builds with it. `Err` says why there is none.
pub fn cuda_architectures(f: &HostFacts) -> Result<String, String> {
    let archs = crate::gpu::cuda_architectures(&driver_gpus(f));
    if archs.is_empty() {
        return Err(
            "no GPU's compute capability is known (`nvidia-smi --query-gpu=compute_cap` on the host printed \
             none): the driver must work on the host before llama.cpp can be built for the GPU"
                .into(),
        );
    }
    Ok(archs)
}

/// The container's `/etc/resolv.conf` flags and path when it is immutable (`chattr +i`): Proxmox's pre-start
/// hook renames a new file over it, which fails, so the container does not start. Doctor reports it and
/// provision's `start` step clears the flag (keeping the user's DNS with `.pve-ignore.resolv.conf`).
pub fn resolv_immutable(f: &HostFacts) -> Option<&(String, String)> {
    f.container
        .as_ref()?
        .resolv_attr
        .as_ref()
        .filter(|(flags, _)| crate::pve::system::is_immutable(flags))
}

/// Whether driver `version` with the `open` (or proprietary) module can drive every GPU of the host; the error
/// names each GPU it cannot and what would (issue 11 deliver 4).
pub fn driver_fits_gpus(f: &HostFacts, version: &str, open: bool) -> Result<(), String> {
    let Some(branch) = version
        .split('.')
        .next()
        .and_then(|b| b.parse::<u32>().ok())
    else {
        return Ok(());
    };
    let flavour = if open {
        crate::pve::nvidia::ModuleFlavour::Open
    } else {
        crate::pve::nvidia::ModuleFlavour::Proprietary
    };
    crate::gpu::check_driver(&gpus(f), branch, flavour).map_err(|e| e.to_string())
}

/// Hand-written passthrough in a container's config (`text`, as on disk): the `lxc.mount.entry` lines that bind
/// `/dev/nvidia*` and the `lxc.cgroup2.devices.allow` lines for character majors no other driver owns (NVIDIA's
/// 195, the dynamic uvm major, and stale ones), in the live section only (snapshots are history). One rule for
/// both commands: it is replaced by devN entries, which Proxmox keeps right at every start (the uvm major is
/// dynamic, so a hand-written one breaks at some reboot). Returns the config without them, and the lines.
pub fn legacy_passthrough(f: &HostFacts, text: &str) -> (String, Vec<String>) {
    let other_majors: Vec<u32> = f
        .proc_devices
        .iter()
        .filter(|(name, _)| !name.starts_with("nvidia"))
        .map(|(_, m)| *m)
        .collect();
    let mut out = String::with_capacity(text.len());
    let mut removed = Vec::new();
    let mut live = true;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') {
            live = false;
        }
        let drop = live
            && match t.split_once([':', '=']).map(|(k, v)| (k.trim(), v.trim())) {
                Some(("lxc.mount.entry", v)) => v.starts_with("/dev/nvidia"),
                Some(("lxc.cgroup2.devices.allow", v)) => crate::pve::lxc::CgroupRule::parse(v)
                    .is_some_and(|r| {
                        r.kind == 'c' && r.major.is_some_and(|m| !other_majors.contains(&m))
                    }),
                _ => false,
            };
        if drop {
            removed.push(t.to_string());
        } else {
            out.push_str(line);
        }
    }
    (out, removed)
}

/// Packages dpkg left unfinished (unpacked, half-installed, half-configured, triggers pending): an `apt-get
/// install` interrupted mid-way, e.g. by a Ctrl-C during the driver's DKMS build. apt refuses to install anything
/// until `dpkg --configure -a` finishes them.
pub fn dpkg_interrupted(f: &HostFacts) -> Vec<&crate::pve::packages::Package> {
    f.packages
        .iter()
        .filter(|p| {
            p.status
                .as_deref()
                .and_then(|s| s.as_bytes().get(1))
                .is_some_and(|c| matches!(c, b'U' | b'F' | b'H' | b'W' | b't'))
        })
        .collect()
}

/// `6.17.2-1-pve` → `(6, 17)`.
pub fn kernel_series(kernel: &str) -> Option<(u32, u32)> {
    let mut it = kernel.split(['.', '-']).map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??))
}

/// Why driver `version` is known not to build for `kernel` (gpu-generations.md §5: a new kernel series breaks
/// the older branches, which get no fix): `None` when nothing is known against it.
pub fn known_build_failure(version: &str, kernel: &str) -> Option<String> {
    let branch: u32 = version.split('.').next()?.parse().ok()?;
    let series = kernel_series(kernel)?;
    let broken = match branch {
        ..=470 => series >= (6, 12),
        535..=559 => series >= (6, 17),
        _ => false,
    };
    broken.then(|| {
        format!(
            "driver {version} (branch {branch}) does not build for kernel {kernel}: newer kernels break the older \
             branches, which NVIDIA no longer fixes"
        )
    })
}

/// Debian's own packaging of the NVIDIA driver (non-free): its module package (`nvidia-open-kernel-dkms` for the
/// open flavour, `nvidia-kernel-dkms`) and `nvidia-smi` as its own package, no `nvidia-driver-cuda`. Its packages,
/// when that is what the host has; `None` for NVIDIA's repository's packaging (or no driver).
pub fn debian_driver_packages(f: &HostFacts, open: bool) -> Option<Vec<&'static str>> {
    let module = if open {
        "nvidia-open-kernel-dkms"
    } else {
        "nvidia-kernel-dkms"
    };
    let debian = f.package(module).is_some()
        && f.package("nvidia-smi").is_some()
        && f.package("nvidia-driver-cuda").is_none();
    debian.then(|| {
        [
            module,
            "nvidia-smi",
            "libcuda1",
            "libnvidia-ml1",
            "nvidia-persistenced",
            "nvidia-modprobe",
        ]
        .into_iter()
        .filter(|n| f.package(n).is_some())
        .collect()
    })
}

/// llama-server's units in a container that are not among `keep` (the units the installation runs): the single
/// `llama-server` unit (its file in /etc/systemd/system, or enabled, or running) and every replica unit
/// `llama-server-gpu<i>` whose file is there. As (unit, file). Provision stops, disables and removes them, so going
/// between one llama-server and one per GPU (or from two GPUs to one) converges.
pub fn stray_llama_units(inside: &InsideFacts, keep: &[&str]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let single = facts::LLAMA_UNIT;
    let path = crate::provision::units::LLAMA_SERVER_UNIT_PATH;
    if !keep.contains(&single)
        && (inside.file(path).is_some()
            || inside.enabled.get(single) == Some(&true)
            || inside
                .services
                .get(single)
                .is_some_and(|s| facts::is_active_state(s)))
    {
        out.push((single.to_string(), path.to_string()));
    }
    for i in replica_gpus(inside) {
        let unit = facts::replica_unit(i);
        if !keep.contains(&unit.as_str()) {
            out.push((unit, facts::replica_unit_path(i)));
        }
    }
    out
}

/// The GPU indices of the replica units whose files are in the container, in GPU order.
pub fn replica_gpus(inside: &InsideFacts) -> Vec<u32> {
    let mut gpus: Vec<u32> = inside
        .files
        .keys()
        .filter_map(|p| facts::replica_of_path(p))
        .collect();
    gpus.sort_unstable();
    gpus
}

/// What is wrong with the pinning of the replica unit on GPU `gpu` of a host with `gpu_count` GPUs: a replica
/// for a GPU that is not there, or a unit whose environment does not pin its own GPU
/// (`CUDA_DEVICE_ORDER=PCI_BUS_ID` and `CUDA_VISIBLE_DEVICES=<gpu>`, as `llmctl model plan` gives it). Empty:
/// pinned right.
pub fn replica_pin_problems(unit_text: &str, gpu: u32, gpu_count: usize) -> Vec<String> {
    let unit = facts::replica_unit(gpu);
    let mut out = Vec::new();
    if gpu as usize >= gpu_count {
        out.push(format!(
            "{unit}: the host has {gpu_count} GPU(s), none with index {gpu}"
        ));
    }
    let env: Vec<&str> = unit_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Environment="))
        .flat_map(str::split_whitespace)
        .collect();
    for want in [
        "CUDA_DEVICE_ORDER=PCI_BUS_ID".to_string(),
        format!("CUDA_VISIBLE_DEVICES={gpu}"),
    ] {
        if !env.contains(&want.as_str()) {
            out.push(format!("{unit}: no Environment={want}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn nouveau_is_blacklisted_by_the_two_words_only() {
        assert!(
            nouveau_blacklist_line(&lines(&["/etc/modprobe.d/b.conf:blacklist\tnouveau"]))
                .is_some()
        );
        for no in [
            "/etc/modprobe.d/x.conf:# blacklist nouveau",
            "/etc/modprobe.d/x.conf:options nouveau modeset=0",
            "/etc/modprobe.d/x.conf:blacklist nouveaux",
        ] {
            assert!(nouveau_blacklist_line(&lines(&[no])).is_none(), "{no}");
        }
    }

    fn smi_gpu(cc: &str) -> crate::pve::nvidia::Gpu {
        crate::pve::nvidia::Gpu {
            name: "NVIDIA x".into(),
            driver_version: "595.71.05".into(),
            compute_cap: cc.into(),
            memory_total_mib: None,
            memory_used_mib: None,
        }
    }

    /// One list for doctor's judgement of a build and provision's build: sorted, deduplicated, from the driver's
    /// exact capabilities, never from the PCI codename.
    #[test]
    fn cuda_architectures_come_from_the_driver_sorted_and_deduplicated() {
        let mut f = HostFacts {
            gpus: vec![smi_gpu("8.9"), smi_gpu("8.6"), smi_gpu("8.9"), smi_gpu("x")],
            ..HostFacts::default()
        };
        assert_eq!(cuda_architectures(&f).unwrap(), "86;89");
        f.gpus.clear();
        f.pci_gpus = vec![crate::host::facts::PciGpu {
            bus: "01:00.0".into(),
            chip: "GM107".into(),
            name: "GeForce GTX 750 Ti".into(),
        }];
        assert_eq!(gpus(&f).len(), 1, "the generation rules still see the GPU");
        assert!(
            cuda_architectures(&f)
                .unwrap_err()
                .contains("compute capability")
        );
    }

    #[test]
    fn resolv_conf_is_immutable_by_its_i_flag() {
        let with = |flags: &str| HostFacts {
            container: Some(crate::host::facts::ContainerFacts {
                vmid: 103,
                status: crate::host::facts::CtStatus::Stopped,
                resolv_attr: Some((flags.into(), "/etc/resolv.conf".into())),
                resolv_ignored: false,
                inside: None,
            }),
            ..HostFacts::default()
        };
        assert!(resolv_immutable(&with("----i---------e-------")).is_some());
        assert!(resolv_immutable(&with("--------------e-------")).is_none());
        assert!(resolv_immutable(&HostFacts::default()).is_none());
    }

    #[test]
    fn the_module_package_gives_the_version_and_flavour() {
        use crate::pve::nvidia::ModuleFlavour;
        let with = |dpkg: &str| HostFacts {
            packages: crate::pve::packages::parse_dpkg_query(dpkg),
            ..HostFacts::default()
        };
        let nvidia = with("nvidia-kernel-dkms\t580.95.05-1\tii \n");
        assert_eq!(
            module_package_version(&nvidia).as_deref(),
            Some("580.95.05")
        );
        assert_eq!(installed_flavour(&nvidia), Some(ModuleFlavour::Proprietary));
        assert!(kernel_driver_installed(&nvidia));
        let debian = with("nvidia-open-kernel-dkms\t550.163.01-2\tii \n");
        assert_eq!(
            installed_driver_version(&debian).as_deref(),
            Some("550.163.01")
        );
        assert_eq!(installed_flavour(&debian), Some(ModuleFlavour::Open));
        let none = with("libcuda1\t580.95.05-1\tii \n");
        assert!(!kernel_driver_installed(&none) && installed_flavour(&none).is_none());
    }

    #[test]
    fn every_installed_kernel_needs_headers_and_the_module() {
        let f = HostFacts {
            kernel: "6.14.8-2-pve".into(),
            installed_kernels: lines(&["6.14.8-2-pve", "6.17.2-1-pve"]),
            kernels_with_build_dir: lines(&["6.14.8-2-pve"]),
            ..HostFacts::default()
        };
        assert_eq!(kernels_without_headers(&f), ["6.17.2-1-pve"]);
        assert_eq!(kernels_without_module(&f, None), ["6.14.8-2-pve"]);
    }

    #[test]
    fn uvm_at_boot_needs_the_rule_and_a_loader() {
        let llmctl = HostFacts {
            modules_load: lines(&["/etc/modules-load.d/nvidia.conf:nvidia_uvm"]),
            udev_rules: lines(&[
                "/etc/udev/rules.d/70-nvidia.rules:KERNEL==\"nvidia_uvm\", RUN+=\"/bin/bash -c '/usr/bin/nvidia-modprobe -c0 -u'\"",
            ]),
            ..HostFacts::default()
        };
        assert_eq!(uvm_at_boot(&llmctl), Ok(()));
        let rule_on_nvidia = HostFacts {
            udev_rules: lines(&[
                "/etc/udev/rules.d/70-nvidia.rules:KERNEL==\"nvidia\", RUN+=\"/usr/bin/nvidia-modprobe -c0 -u\"",
            ]),
            ..HostFacts::default()
        };
        assert_eq!(uvm_at_boot(&rule_on_nvidia), Ok(()));
        let load_only = HostFacts {
            modules_load: llmctl.modules_load.clone(),
            ..HostFacts::default()
        };
        assert_eq!(uvm_at_boot(&load_only).unwrap_err().len(), 1);
        let rule_only = HostFacts {
            udev_rules: llmctl.udev_rules.clone(),
            ..HostFacts::default()
        };
        assert_eq!(uvm_at_boot(&rule_only).unwrap_err().len(), 1);
    }

    /// Issue 16 item 1: refuse only what cannot work.
    #[test]
    fn secure_boot_blocks_only_an_unenrolled_or_unsigned_module() {
        use crate::host::facts::MokKey;
        let installed = HostFacts {
            secure_boot: Some(true),
            packages: crate::pve::packages::parse_dpkg_query(
                "nvidia-kernel-open-dkms\t595.71.05-1\tii \n",
            ),
            mok_key: Some(MokKey::Enrolled),
            ..HostFacts::default()
        };
        assert_eq!(secure_boot_blocks(&installed), None, "enrolled key");
        let not_enrolled = HostFacts {
            mok_key: Some(MokKey::NotEnrolled),
            ..installed.clone()
        };
        assert!(
            secure_boot_blocks(&not_enrolled)
                .unwrap()
                .contains("mokutil --import")
        );
        let unsigned = HostFacts {
            mok_key: Some(MokKey::Missing),
            ..installed.clone()
        };
        assert!(
            secure_boot_blocks(&unsigned)
                .unwrap()
                .contains("built unsigned")
        );
        let fresh = HostFacts {
            packages: Vec::new(),
            mok_key: Some(MokKey::Missing),
            ..installed.clone()
        };
        assert_eq!(
            secure_boot_blocks(&fresh),
            None,
            "DKMS makes the key at its first build"
        );
        let off = HostFacts {
            secure_boot: Some(false),
            ..unsigned
        };
        assert_eq!(secure_boot_blocks(&off), None);
    }

    /// Issue 11 deliver 4: the GPUs come from the PCI bus when no driver runs, and a driver that cannot run one
    /// is named with what would.
    #[test]
    fn a_pascal_gpu_on_the_bus_refuses_the_open_module() {
        let f = HostFacts {
            pci_gpus: crate::host::facts::parse_lspci(
                "01:00.0 3D controller [0302]: NVIDIA Corporation GP102GL [Tesla P40] [10de:1b38] (rev a1)\n\
                 01:00.1 Audio device [0403]: NVIDIA Corporation GP102 HDMI Audio Controller [10de:10ef] (rev a1)\n\
                 02:00.0 VGA compatible controller [0300]: NVIDIA Corporation AD102 [GeForce RTX 4090] [10de:2684] (rev a1)\n",
            ),
            ..HostFacts::default()
        };
        let gpus = gpus(&f);
        assert_eq!(gpus.len(), 2, "{gpus:?}");
        assert_eq!(gpus[0].name, "Tesla P40");
        assert_eq!(gpus[0].compute_cap.arch(), 61);
        let why = driver_fits_gpus(&f, "595.71.05", true).unwrap_err();
        assert!(why.contains("Tesla P40") && why.contains("580"), "{why}");
        assert_eq!(driver_fits_gpus(&f, "580.105.08", false), Ok(()));
        assert_eq!(crate::gpu::newest_cuda_major(&gpus), Some(12));
    }

    /// Issue 16 item 6: a branch known not to build for the new kernel, named by that kernel.
    #[test]
    fn older_branches_do_not_build_for_newer_kernels() {
        assert!(
            known_build_failure("550.163.01", "6.17.2-1-pve")
                .is_some_and(|w| w.contains("6.17.2-1-pve"))
        );
        assert_eq!(known_build_failure("550.163.01", "6.14.8-2-pve"), None);
        assert_eq!(known_build_failure("595.71.05", "6.17.2-1-pve"), None);
        let f = HostFacts {
            kernel: "6.14.8-2-pve".into(),
            installed_kernels: vec!["6.14.8-2-pve".into(), "6.17.2-1-pve".into()],
            kernels_with_build_dir: vec!["6.14.8-2-pve".into(), "6.17.2-1-pve".into()],
            dkms: crate::pve::dkms::parse_status(
                "nvidia/550.163.01, 6.14.8-2-pve, x86_64: installed\n",
            ),
            ..HostFacts::default()
        };
        match crate::provision::host::dkms_check(&f, "550.163.01") {
            crate::provision::step::Check::Refused(why) => assert!(
                why.contains("kernel 6.17.2-1-pve") && why.contains("kernel pin 6.14.8-2-pve"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
    }
}
