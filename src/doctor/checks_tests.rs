//! Each check, firing and not firing, on facts built from probe text (the same path the real run takes) and
//! then changed by hand.

use super::*;
use crate::host::facts::{HostFacts, parse_sections};

const HEALTHY_HOST: &str = "\
==> pveversion <==
pve-manager/9.0.3/025864202ebb6109 (running kernel: 6.14.8-2-pve)
==> rc=0 <==
==> uname <==
6.14.8-2-pve
==> rc=0 <==
==> os-release <==
VERSION_CODENAME=trixie
==> rc=0 <==
==> kernels <==
6.14.8-2-pve
==> rc=0 <==
==> kernel-build <==
6.14.8-2-pve
==> rc=0 <==
==> mokutil <==
SecureBoot disabled
==> rc=0 <==
==> lsmod <==
Module                  Size  Used by
nvidia_uvm           1437696  0
nvidia              60579840  1 nvidia_uvm
==> rc=0 <==
==> proc-version <==
NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  595.71.05  Release Build  (dvs-builder@U22)  Tue Apr 14 2026
GCC version:  gcc version 14.2.0 (Debian 14.2.0-19)
==> rc=0 <==
==> nvidia-smi <==
| NVIDIA-SMI 595.71.05              Driver Version: 595.71.05      CUDA Version: 13.2     |
==> rc=0 <==
==> query-gpu <==
NVIDIA RTX 2000 Ada Generation Laptop GPU, 595.71.05, 8.9, 8188, 0
==> rc=0 <==
==> dkms <==
nvidia/595.71.05, 6.14.8-2-pve, x86_64: installed
==> rc=0 <==
==> make-log <==

==> rc=0 <==
==> dev <==
crw-rw-rw- 1 root root 195,   0 Feb 13 21:15 /dev/nvidia0
crw-rw-rw- 1 root root 195, 255 Feb 13 21:15 /dev/nvidiactl
crw-rw-rw- 1 root root 511,   0 Feb 13 21:15 /dev/nvidia-uvm
crw-rw-rw- 1 root root 511,   1 Feb 13 21:15 /dev/nvidia-uvm-tools
==> rc=0 <==
==> proc-devices <==
Character devices:
  1 mem
195 nvidia-frontend
511 nvidia-uvm
==> rc=0 <==
==> dpkg <==
nvidia-kernel-open-dkms\t595.71.05-1\thi 
nvidia-driver-cuda\t595.71.05-1\thi 
libnvidia-ml1\t595.71.05-1\thi 
libcuda1\t595.71.05-1\thi 
proxmox-headers-6.14.8-2-pve\t6.14.8-2\tii 
==> rc=0 <==
==> holds <==
nvidia-kernel-open-dkms
nvidia-driver-cuda
libnvidia-ml1
libcuda1
==> rc=0 <==
==> modprobe-nouveau <==
/etc/modprobe.d/blacklist-nouveau.conf:blacklist nouveau
/etc/modprobe.d/blacklist-nouveau.conf:options nouveau modeset=0
==> rc=0 <==
==> modules-load <==
/etc/modules-load.d/nvidia.conf:nvidia
/etc/modules-load.d/nvidia.conf:nvidia_uvm
==> rc=0 <==
==> udev <==
/etc/udev/rules.d/70-nvidia.rules:KERNEL==\"nvidia\", RUN+=\"/bin/bash -c '/usr/bin/nvidia-smi -L'\"
/etc/udev/rules.d/70-nvidia.rules:KERNEL==\"nvidia_uvm\", RUN+=\"/bin/bash -c '/usr/bin/nvidia-modprobe -c0 -u'\"
==> rc=0 <==
==> dmesg <==
==> rc=1 <==
==> ct-config 103 <==
arch: amd64
hostname: llm-server
dev0: /dev/nvidia0,uid=0,gid=0
dev1: /dev/nvidiactl,uid=0,gid=0
dev2: /dev/nvidia-uvm,uid=0,gid=0
dev3: /dev/nvidia-uvm-tools,uid=0,gid=0
==> rc=0 <==
";

const HEALTHY_CT: &str = "\
==> ct-status <==
status: running
==> rc=0 <==
==> ct-os-release <==
VERSION_CODENAME=bookworm
==> rc=0 <==
==> ct-proc-version <==
NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  595.71.05  Release Build  (dvs-builder@U22)  Tue Apr 14 2026
==> rc=0 <==
==> ct-nvidia-smi <==
| NVIDIA-SMI 595.71.05              Driver Version: 595.71.05      CUDA Version: 13.2     |
==> rc=0 <==
==> ct-dpkg <==
libnvidia-ml1\t595.71.05-1\thi 
libcuda1\t595.71.05-1\thi 
nvidia-driver-cuda\t595.71.05-1\thi 
==> rc=0 <==
==> ct-holds <==
==> rc=0 <==
==> ct-dev <==
crw-rw---- 1 root root 195,   0 Nov 25 05:00 /dev/nvidia0
crw-rw---- 1 root root 195, 255 Nov 25 05:00 /dev/nvidiactl
==> rc=0 <==
==> ct-resolv <==
--------------e------- /etc/resolv.conf
==> rc=0 <==
==> ct-pve-ignore <==
ls: cannot access '/etc/.pve-ignore.resolv.conf': No such file or directory
==> rc=2 <==
==> ct-llama-unit <==
[Service]
ExecStart=/opt/llama.cpp/build/bin/llama-server -m /models/m.gguf -c 32768 --port 11434
==> rc=0 <==
==> ct-proxy-unit <==
[Service]
ExecStart=/usr/local/bin/llmctl serve-proxy
==> rc=0 <==
==> ct-cmake <==
# path: /opt/llama.cpp/build/CMakeCache.txt
GGML_CUDA:BOOL=ON
CMAKE_CUDA_ARCHITECTURES:STRING=89
==> rc=0 <==
==> ct-llama-exe <==
-rwxr-xr-x 1 root root 9051234 Feb 13 21:15 /opt/llama.cpp/build/bin/llama-server
==> rc=0 <==
==> ct-services <==
active
active
==> rc=0 <==
";

fn healthy() -> HostFacts {
    let host = HEALTHY_HOST.replace("\\t", "\t");
    let mut f = HostFacts::from_sections("root@pve", &parse_sections(&host)).unwrap();
    f.add_container(103, &parse_sections(&HEALTHY_CT.replace("\\t", "\t")), "");
    f
}

fn problems(f: &HostFacts) -> Vec<&'static str> {
    let mut ids: Vec<&'static str> = run_all(f)
        .iter()
        .filter(|x| x.severity.is_problem())
        .map(|x| x.id.as_str())
        .collect();
    ids.sort();
    ids
}

fn finding(f: &HostFacts, id: &str) -> Finding {
    run_all(f)
        .into_iter()
        .find(|x| x.id.as_str() == id)
        .unwrap_or_else(|| panic!("no finding {id}"))
}

#[test]
fn healthy_has_no_problems_and_every_check_reports() {
    let f = healthy();
    assert_eq!(problems(&f), Vec::<&str>::new());
    let all = run_all(&f);
    assert!(all.iter().all(|x| x.severity == Severity::Ok), "{all:#?}");
    for id in [
        "driver.not-installed",
        "driver.reboot-pending",
        "driver.not-pinned",
        "kernel.headers-missing",
        "dkms.build-failed",
        "dkms.not-built",
        "nouveau.loaded",
        "nouveau.not-blacklisted",
        "secureboot.unsigned",
        "dev.uvm-missing",
        "dev.nodes-not-at-boot",
        "ct.missing",
        "ct.locked",
        "ct.devices-missing",
        "ct.cgroup-major-mismatch",
        "ct.resolv-immutable",
        "ct.not-running",
        "ct.gpu-not-visible",
        "ct.libs-mismatch",
        "llama.cuda-arch",
        "llama.not-cuda",
        "llama.context-small",
        "svc.llama-server-down",
        "svc.proxy-down",
    ] {
        assert!(
            all.iter().any(|x| x.id.as_str() == id),
            "missing check {id}"
        );
    }
}

fn no_driver(f: &mut HostFacts) {
    f.module = None;
    f.smi = Some(SmiReport::NoDriver);
    f.smi_lines = vec!["NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest NVIDIA driver is installed and running.".into()];
    f.gpus.clear();
    f.dkms.clear();
    f.packages
        .retain(|p| !p.name.contains("nvidia") && !p.name.contains("cuda"));
    f.holds.clear();
    f.modules.clear();
    f.dev_nodes.clear();
}

#[test]
fn fresh_host_reports_only_the_missing_driver() {
    let mut f = healthy();
    no_driver(&mut f);
    // The container still has its own libs, but without a host module nothing there can be judged.
    assert_eq!(problems(&f), vec!["driver.not-installed"]);
    let d = finding(&f, "driver.not-installed");
    assert_eq!(d.fix, Some(Fix::step(crate::host::StepId::Driver)));
    assert!(
        d.evidence
            .iter()
            .any(|l| l.contains("couldn't communicate"))
    );
}

#[test]
fn reboot_pending_when_host_libs_moved_on() {
    let mut f = healthy();
    for p in f
        .packages
        .iter_mut()
        .filter(|p| p.name.starts_with("lib") || p.name == "nvidia-driver-cuda")
    {
        p.version = "595.91.07-1".into();
    }
    f.smi = Some(SmiReport::Mismatch {
        nvml_library: Some("595.91".into()),
    });
    f.smi_lines = vec![
        "Failed to initialize NVML: Driver/library version mismatch".into(),
        "NVML library version: 595.91".into(),
    ];
    assert_eq!(problems(&f), vec!["driver.reboot-pending"]);
    let x = finding(&f, "driver.reboot-pending");
    assert!(
        x.evidence
            .iter()
            .any(|l| l.contains("libnvidia-ml1 595.91.07-1 ≠ loaded module 595.71.05")),
        "{x:#?}"
    );
    assert!(
        x.evidence
            .iter()
            .any(|l| l.contains("NVML library version: 595.91"))
    );
}

#[test]
fn container_libs_mismatch_even_in_the_patch_part() {
    let mut f = healthy();
    let ins = f.container.as_mut().unwrap().inside.as_mut().unwrap();
    ins.packages[0].version = "595.71.03-1".into();
    ins.packages.retain(|p| p.name != "libcuda1");
    ins.smi = Some(SmiReport::Mismatch {
        nvml_library: Some("595.71".into()),
    });
    assert_eq!(problems(&f), vec!["ct.libs-mismatch"]);
    let x = finding(&f, "ct.libs-mismatch");
    assert!(
        x.evidence
            .iter()
            .any(|l| l.contains("libnvidia-ml1 595.71.03-1 ≠ 595.71.05"))
    );
    assert!(
        x.evidence
            .iter()
            .any(|l| l.contains("libcuda1 is not installed"))
    );
    assert_eq!(x.fix, Some(Fix::step(crate::host::StepId::CtLibs)));
}

/// Issue 16 item 3: NVML compares the upstream version; Debian's `-2` of the same driver is the same library.
#[test]
fn a_debian_revision_of_the_same_driver_matches() {
    let mut f = healthy();
    let ins = f.container.as_mut().unwrap().inside.as_mut().unwrap();
    for p in &mut ins.packages {
        p.version = "595.71.05-2".into();
    }
    assert_eq!(problems(&f), Vec::<&str>::new());
}

/// Issue 16 item 2: after an upgrade waiting for its reboot, the container must match the installed driver (what
/// the reboot loads), not the stale module.
#[test]
fn the_container_follows_the_installed_driver_not_the_stale_module() {
    let mut f = healthy();
    for p in f
        .packages
        .iter_mut()
        .filter(|p| p.name.contains("nvidia") || p.name.starts_with("lib"))
    {
        p.version = "595.71.08-1".into();
    }
    let ids = problems(&f);
    assert!(ids.contains(&"ct.libs-mismatch"), "{ids:?}");
    let x = finding(&f, "ct.libs-mismatch");
    assert!(x.title.contains("driver 595.71.08"), "{}", x.title);
    let ins = f.container.as_mut().unwrap().inside.as_mut().unwrap();
    for p in &mut ins.packages {
        p.version = "595.71.08-1".into();
    }
    assert!(!problems(&f).contains(&"ct.libs-mismatch"));
}

#[test]
fn container_libs_not_held_is_a_failure_provision_fixes() {
    let mut f = healthy();
    let ins = f.container.as_mut().unwrap().inside.as_mut().unwrap();
    for p in &mut ins.packages {
        p.status = Some("ii".into());
    }
    assert_eq!(problems(&f), vec!["ct.libs-not-pinned"]);
    let x = finding(&f, "ct.libs-not-pinned");
    assert_eq!(x.severity, Severity::Fail);
    assert_eq!(x.fix, Some(Fix::step(crate::host::StepId::CtLibs)));
}

#[test]
fn dkms_not_built_for_new_kernel_with_old_driver() {
    let mut f = healthy();
    f.kernel = "6.17.2-1-pve".into();
    f.installed_kernels = vec!["6.14.8-2-pve".into(), "6.17.2-1-pve".into()];
    f.kernels_with_build_dir = f.installed_kernels.clone();
    f.module = None;
    f.modules.clear();
    f.smi = Some(SmiReport::NoDriver);
    f.dkms = crate::pve::dkms::parse_status("nvidia/550.163.01, 6.14.8-2-pve, x86_64: installed\n");
    for p in f
        .packages
        .iter_mut()
        .filter(|p| p.name.contains("nvidia") || p.name.starts_with("lib"))
    {
        p.version = "550.163.01-1".into();
    }
    // The container's libraries (595) do not match the installed driver (550) either.
    assert_eq!(problems(&f), vec!["ct.libs-mismatch", "dkms.build-failed"]);
    let x = finding(&f, "dkms.build-failed");
    assert!(
        x.title
            .contains("driver 550.163.01 is too old for kernel 6.17.2-1-pve"),
        "{}",
        x.title
    );
    assert_eq!(x.fix.unwrap().render(), "llmctl provision --only dkms");
}

#[test]
fn headers_missing_for_running_kernel_hides_the_dkms_symptom() {
    let mut f = healthy();
    f.kernels_with_build_dir.clear();
    f.packages
        .retain(|p| !p.name.starts_with("proxmox-headers"));
    f.dkms.clear();
    f.module = None;
    f.modules.clear();
    assert_eq!(problems(&f), vec!["kernel.headers-missing"]);
    let x = finding(&f, "kernel.headers-missing");
    assert_eq!(x.severity, Severity::Fail);
    assert_eq!(x.fix.unwrap().render(), "llmctl provision --only headers");
}

#[test]
fn headers_missing_for_another_kernel_fails_before_the_reboot() {
    let mut f = healthy();
    f.installed_kernels.push("6.17.2-1-pve".into());
    let ids = problems(&f);
    assert_eq!(ids, vec!["kernel.headers-missing"]);
    assert_eq!(
        finding(&f, "kernel.headers-missing").severity,
        Severity::Fail
    );
    // With headers but no module for it, DKMS reports it, as a failure: the next boot may pick that kernel.
    f.kernels_with_build_dir.push("6.17.2-1-pve".into());
    assert_eq!(problems(&f), vec!["dkms.not-built"]);
    assert_eq!(finding(&f, "dkms.not-built").severity, Severity::Fail);
}

#[test]
fn built_but_not_installed_fails() {
    let mut f = healthy();
    f.dkms = crate::pve::dkms::parse_status("nvidia/595.71.05, 6.14.8-2-pve, x86_64: built\n");
    assert!(problems(&f).contains(&"dkms.not-built"));
    assert_eq!(finding(&f, "dkms.not-built").severity, Severity::Fail);
}

#[test]
fn nouveau_loaded_and_not_blacklisted() {
    let mut f = healthy();
    f.modules = vec!["nouveau".into()];
    f.module = None;
    f.modprobe_nouveau.clear();
    // One finding for one fix (blacklist + reboot), with both facts as evidence.
    assert_eq!(problems(&f), vec!["nouveau.loaded"]);
    let x = finding(&f, "nouveau.loaded");
    assert!(
        x.evidence
            .iter()
            .any(|l| l.contains("no `blacklist nouveau` line")),
        "{x:#?}"
    );
    // Not loaded, not blacklisted: a failure (the next boot), which provision's nouveau step fixes.
    f.modules.clear();
    f.module = healthy().module;
    // Commented-out blacklist lines do not count.
    f.modprobe_nouveau = vec!["/etc/modprobe.d/x.conf:#blacklist nouveau".into()];
    assert_eq!(problems(&f), vec!["nouveau.not-blacklisted"]);
    assert_eq!(
        finding(&f, "nouveau.not-blacklisted").severity,
        Severity::Fail
    );
}

#[test]
fn secure_boot_blocks_the_module() {
    let mut f = healthy();
    f.secure_boot = Some(true);
    f.secure_boot_line = Some("SecureBoot enabled".into());
    assert_eq!(problems(&f), Vec::<&str>::new(), "loaded module = signed");
    f.module = None;
    f.modules.clear();
    assert_eq!(problems(&f), vec!["secureboot.unsigned"]);
}

#[test]
fn module_not_loaded_without_other_cause() {
    let mut f = healthy();
    f.module = None;
    f.modules.clear();
    f.smi = Some(SmiReport::NoDriver);
    assert_eq!(problems(&f), vec!["driver.not-loaded"]);
}

#[test]
fn uvm_missing_names_the_container_that_will_not_start() {
    let mut f = healthy();
    f.dev_nodes.retain(|n| !n.path.contains("uvm"));
    f.modules.retain(|m| m != "nvidia_uvm");
    assert_eq!(problems(&f), vec!["dev.uvm-missing"]);
    let x = finding(&f, "dev.uvm-missing");
    assert!(
        x.evidence
            .iter()
            .any(|l| l.contains("Device /dev/nvidia-uvm does not exist")),
        "{x:#?}"
    );
    assert_eq!(x.fix, Some(Fix::step(crate::host::StepId::DevicesAtBoot)));
    // Nothing loads it at boot either: that is the cause, and one provision step fixes both.
    f.modules_load.clear();
    assert_eq!(problems(&f), vec!["dev.uvm-missing"]);
    let x = finding(&f, "dev.uvm-missing");
    assert_eq!(x.fix, Some(Fix::step(crate::host::StepId::DevicesAtBoot)));
    assert!(x.evidence.iter().any(|l| l.contains("no nvidia_uvm line")));
}

#[test]
fn nothing_loads_uvm_at_boot() {
    let mut f = healthy();
    f.modules_load.clear();
    assert_eq!(problems(&f), vec!["dev.nodes-not-at-boot"]);
    // A rule that fires for the nvidia module itself loads uvm too (nvidia-modprobe -u).
    f.udev_rules = vec![
        "/etc/udev/rules.d/71-x.rules:KERNEL==\"nvidia\", RUN+=\"/usr/bin/nvidia-modprobe -c0 -u\""
            .into(),
    ];
    assert!(problems(&f).is_empty());
    // Loading the module alone creates no device node.
    f.udev_rules.clear();
    f.modules_load = healthy().modules_load;
    assert_eq!(problems(&f), vec!["dev.nodes-not-at-boot"]);
}

#[test]
fn driver_not_pinned() {
    let mut f = healthy();
    f.holds.clear();
    for p in &mut f.packages {
        p.status = Some("ii".into());
    }
    assert_eq!(problems(&f), vec!["driver.not-pinned"]);
    assert_eq!(
        finding(&f, "driver.not-pinned").fix,
        Some(Fix::step(crate::host::StepId::Driver))
    );
    // NVIDIA's pinning package pins a branch, not the exact version: without holds it is still not pinned.
    f.packages.push(crate::pve::packages::Package {
        name: "nvidia-driver-pinning-595".into(),
        version: "595-1".into(),
        status: Some("ii".into()),
    });
    assert_eq!(problems(&f), vec!["driver.not-pinned"]);
    // Holds alone pin it.
    f.packages.retain(|p| p.name != "nvidia-driver-pinning-595");
    f.holds = healthy().holds;
    assert!(problems(&f).is_empty());
}

fn set_config(f: &mut HostFacts, text: &str) {
    f.configs
        .insert(103, crate::pve::lxc::LxcConfig::parse(text));
}

#[test]
fn devices_only_in_snapshot() {
    let mut f = healthy();
    set_config(
        &mut f,
        "arch: amd64\nhostname: llm\n\n[pre-gpu]\narch: amd64\ndev0: /dev/nvidia0,gid=44\ndev1: /dev/nvidiactl,gid=44\ndev2: /dev/nvidia-uvm,gid=44\ndev3: /dev/nvidia-uvm-tools,gid=44\n",
    );
    let ins = f.container.as_mut().unwrap().inside.as_mut().unwrap();
    ins.dev_nodes.clear();
    ins.smi = Some(SmiReport::Other);
    assert_eq!(problems(&f), vec!["ct.devices-missing"]);
    let x = finding(&f, "ct.devices-missing");
    assert!(
        x.evidence[0].contains("only in snapshot section [pre-gpu]"),
        "{:?}",
        x.evidence
    );
    assert_eq!(x.fix.unwrap().render(), "llmctl provision --only devices");
}

#[test]
fn legacy_mount_entries_with_a_stale_uvm_major() {
    let mut f = healthy();
    set_config(
        &mut f,
        "arch: amd64\nlxc.cgroup2.devices.allow: c 195:* rwm\nlxc.cgroup2.devices.allow: c 508:* rwm\nlxc.mount.entry: /dev/nvidia0 dev/nvidia0 none bind,optional,create=file\nlxc.mount.entry: /dev/nvidiactl dev/nvidiactl none bind,optional,create=file\nlxc.mount.entry: /dev/nvidia-uvm dev/nvidia-uvm none bind,optional,create=file\nlxc.mount.entry: /dev/nvidia-uvm-tools dev/nvidia-uvm-tools none bind,optional,create=file\n",
    );
    assert_eq!(problems(&f), vec!["ct.cgroup-major-mismatch"]);
    let x = finding(&f, "ct.cgroup-major-mismatch");
    assert!(
        x.evidence
            .iter()
            .any(|l| l.contains("/dev/nvidia-uvm is 511:0")),
        "{:?}",
        x.evidence
    );
    assert!(
        x.evidence
            .iter()
            .any(|l| l.contains("c 508:* rwm → no device has major 508"))
    );
    assert_eq!(x.fix.unwrap().render(), "llmctl provision --only devices");
    // The right major passes.
    set_config(
        &mut f,
        "lxc.cgroup2.devices.allow: c 195:* rwm\nlxc.cgroup2.devices.allow: c 511:* rwm\nlxc.mount.entry: /dev/nvidia0 dev/nvidia0 none bind,optional,create=file\nlxc.mount.entry: /dev/nvidiactl dev/nvidiactl none bind\nlxc.mount.entry: /dev/nvidia-uvm dev/nvidia-uvm none bind\nlxc.mount.entry: /dev/nvidia-uvm-tools dev/nvidia-uvm-tools none bind\n",
    );
    assert!(problems(&f).is_empty());
}

#[test]
fn stale_allow_next_to_devn() {
    let mut f = healthy();
    let text = format!(
        "{}lxc.cgroup2.devices.allow: c 508:* rwm\n",
        "dev0: /dev/nvidia0\ndev1: /dev/nvidiactl\ndev2: /dev/nvidia-uvm\ndev3: /dev/nvidia-uvm-tools\n"
    );
    set_config(&mut f, &text);
    assert_eq!(problems(&f), vec!["ct.cgroup-major-mismatch"]);
    // A major that another driver owns (/proc/devices) is not NVIDIA's business.
    f.proc_devices.insert("drm".into(), 226);
    set_config(&mut f, &text.replace("508", "226"));
    assert!(problems(&f).is_empty());
}

#[test]
fn locked_invalid_and_pending() {
    let mut f = healthy();
    let base = "dev0: /dev/nvidia0\ndev1: /dev/nvidiactl\ndev2: /dev/nvidia-uvm\ndev3: /dev/nvidia-uvm-tools\n";
    set_config(&mut f, &format!("lock: backup\n{base}"));
    assert_eq!(problems(&f), vec!["ct.locked"]);
    assert_eq!(
        finding(&f, "ct.locked").fix.unwrap().render(),
        "pct unlock 103   # only after making sure no backup task is still running\nthen: llmctl provision --only devices"
    );
    set_config(
        &mut f,
        &format!("{base}dev4: /dev/nvidia-caps/nvidia-cap1,gid=video\n"),
    );
    assert_eq!(problems(&f), vec!["ct.config-invalid"]);
    set_config(
        &mut f,
        &format!("{base}[pve:pending]\ndev4: /dev/dri/card0\n"),
    );
    assert_eq!(problems(&f), vec!["ct.pending-changes"]);
}

#[test]
fn resolv_immutable_stopped_container() {
    let mut f = healthy();
    let c = f.container.as_mut().unwrap();
    c.status = crate::host::facts::CtStatus::Stopped;
    c.inside = None;
    c.resolv_attr = Some((
        "----i---------e-------".into(),
        "/var/lib/lxc/103/rootfs/etc/resolv.conf".into(),
    ));
    assert_eq!(problems(&f), vec!["ct.resolv-immutable"]);
    let x = finding(&f, "ct.resolv-immutable");
    assert!(x.evidence[0].contains("----i---------e-------"));
    assert!(
        x.fix
            .unwrap()
            .render()
            .contains("chattr -i /var/lib/lxc/103/rootfs/etc/resolv.conf")
    );
    // Without the flag, the stopped container is the problem.
    f.container.as_mut().unwrap().resolv_attr =
        Some(("--------------e-------".into(), "/x".into()));
    assert_eq!(problems(&f), vec!["ct.not-running"]);
}

#[test]
fn missing_container_is_could_not_run() {
    let mut f = healthy();
    f.vmid = Some(999);
    f.container = None;
    assert_eq!(problems(&f), vec!["ct.missing"]);
    assert_eq!(
        crate::doctor::outcome(&run_all(&f)),
        crate::outcome::Outcome::CouldNotRun
    );
}

#[test]
fn llama_arch_context_cuda_and_services() {
    let mut f = healthy();
    let set_cache = |f: &mut HostFacts, k: &str, v: &str| {
        let ins = f.container.as_mut().unwrap().inside.as_mut().unwrap();
        ins.cmake.as_mut().unwrap().insert(k.into(), v.into());
    };
    set_cache(&mut f, "CMAKE_CUDA_ARCHITECTURES", "86");
    assert_eq!(problems(&f), vec!["llama.cuda-arch"]);
    assert_eq!(
        finding(&f, "llama.cuda-arch").severity,
        Severity::Fail,
        "86 PTX runs on 8.9 only via JIT, and provision rebuilds for 89"
    );
    set_cache(&mut f, "CMAKE_CUDA_ARCHITECTURES", "120a-real");
    assert_eq!(finding(&f, "llama.cuda-arch").severity, Severity::Fail);
    set_cache(&mut f, "CMAKE_CUDA_ARCHITECTURES", "86;89");
    assert!(problems(&f).is_empty());
    set_cache(&mut f, "GGML_CUDA", "OFF");
    assert_eq!(problems(&f), vec!["llama.not-cuda"]);
    set_cache(&mut f, "GGML_CUDA", "ON");

    let ins = f.container.as_mut().unwrap().inside.as_mut().unwrap();
    ins.llama_unit.as_mut().unwrap().ctx_size = Some(8192);
    assert_eq!(problems(&f), vec!["llama.context-small"]);
    let ins = f.container.as_mut().unwrap().inside.as_mut().unwrap();
    let unit = ins.llama_unit.as_mut().unwrap();
    unit.ctx_size = Some(65536);
    unit.parallel = Some(4);
    assert_eq!(
        problems(&f),
        vec!["llama.context-small"],
        "65536 over 4 slots is 16384 each"
    );
    let ins = f.container.as_mut().unwrap().inside.as_mut().unwrap();
    ins.llama_unit.as_mut().unwrap().parallel = None;

    ins.services.insert("llama-server".into(), "failed".into());
    ins.services
        .insert("llmctl-proxy".into(), "inactive".into());
    assert_eq!(
        problems(&f),
        vec!["svc.llama-server-down", "svc.proxy-down"]
    );
    let ins = f.container.as_mut().unwrap().inside.as_mut().unwrap();
    ins.services.clear();
    ins.services.insert("llama-server".into(), "active".into());
    ins.services.insert("llmctl-proxy".into(), "active".into());
    ins.proxy_unit_exec = Some("/usr/bin/litellm --port 4000".into());
    assert_eq!(problems(&f), vec!["svc.proxy-litellm"]);
}

#[test]
fn gpu_not_visible_inside_only_when_everything_upstream_is_fine() {
    let mut f = healthy();
    let ins = f.container.as_mut().unwrap().inside.as_mut().unwrap();
    ins.dev_nodes.clear();
    ins.smi = Some(SmiReport::Other);
    ins.smi_lines = vec!["No devices were found".into()];
    assert_eq!(problems(&f), vec!["ct.gpu-not-visible"]);
    // With the host driver gone, the container symptom is not reported on its own.
    no_driver(&mut f);
    assert_eq!(problems(&f), vec!["driver.not-installed"]);
}

#[test]
fn text_report_shows_evidence_and_fix() {
    let mut f = healthy();
    f.container
        .as_mut()
        .unwrap()
        .inside
        .as_mut()
        .unwrap()
        .services
        .insert("llmctl-proxy".into(), "inactive".into());
    let text = crate::doctor::render_text("root@pve", Some(103), &run_all(&f));
    assert!(text.contains("FAIL  svc.proxy-down"), "{text}");
    assert!(text.contains("        CT 103: systemctl is-active llmctl-proxy: inactive\n"));
    assert!(text.contains("        fix: llmctl provision --only proxy-service\n"));
    assert!(text.contains("ok    driver.not-installed"));
    assert!(text.trim_end().ends_with("skipped") && text.contains("problems found: 1 failed"));
}

#[test]
fn stopped_container_because_a_devn_node_is_missing() {
    let mut f = healthy();
    f.dev_nodes.retain(|n| !n.path.contains("uvm"));
    let c = f.container.as_mut().unwrap();
    c.status = crate::host::facts::CtStatus::Stopped;
    c.inside = None;
    assert_eq!(problems(&f), vec!["dev.uvm-missing"]);
    // No driver at all: the container cannot start either; only the root cause is reported.
    no_driver(&mut f);
    assert_eq!(problems(&f), vec!["driver.not-installed"]);
    // All nodes there: a stopped container is its own problem.
    let mut f = healthy();
    let c = f.container.as_mut().unwrap();
    c.status = crate::host::facts::CtStatus::Stopped;
    c.inside = None;
    assert_eq!(problems(&f), vec!["ct.not-running"]);
}

#[test]
fn pct_exec_failing_is_not_read_as_an_empty_container() {
    let mut f = healthy();
    f.add_container(
        103,
        &parse_sections("==> ct-status <==\nstatus: running\n==> rc=0 <==\n"),
        "lxc-attach: 103: attach.c: 1475 No such file or directory - Failed to exec \"sh\"",
    );
    assert_eq!(problems(&f), vec!["ct.not-running"]);
    let x = finding(&f, "ct.not-running");
    assert!(x.evidence[0].contains("Failed to exec"), "{x:#?}");
    assert_eq!(finding(&f, "llama.not-installed").severity, Severity::Skip);
}

/// Issue 16 item 9: an interrupted rebuild left the unit pointing at a binary that is gone.
#[test]
fn a_missing_server_binary_is_not_installed() {
    let mut f = healthy();
    f.container
        .as_mut()
        .unwrap()
        .inside
        .as_mut()
        .unwrap()
        .llama_exe = None;
    assert_eq!(problems(&f), vec!["llama.not-installed"]);
    assert_eq!(
        finding(&f, "llama.not-installed").fix,
        Some(Fix::step(crate::host::StepId::Llama))
    );
}

/// Issue 11's interrupted install: the one finding is dpkg's, and what follows from it is not reported as its
/// own problem.
#[test]
fn an_interrupted_install_is_the_one_thing_to_fix() {
    let mut f = healthy();
    for p in f
        .packages
        .iter_mut()
        .filter(|p| p.name == "nvidia-kernel-open-dkms")
    {
        p.status = Some("iF".into());
    }
    f.module = None;
    f.modules.clear();
    f.dkms.clear();
    assert_eq!(problems(&f), vec!["dpkg.interrupted"]);
    let x = finding(&f, "dpkg.interrupted");
    assert!(x.evidence[0].contains("nvidia-kernel-open-dkms"), "{x:?}");
    assert_eq!(x.fix.unwrap().step, crate::host::StepId::Driver);
}

/// A check reports only the ids its registration line declares, each at most once, so `FindingId::ALL` and
/// docs/doctor.md tell a reader exactly which check a finding comes from.
#[test]
fn each_check_reports_only_its_declared_ids() {
    assert_eq!(CHECKS.len(), CHECK_IDS.len());
    let mut states = vec![healthy()];
    let mut f = healthy();
    no_driver(&mut f);
    states.push(f);
    let mut f = healthy();
    let c = f.container.as_mut().unwrap();
    c.status = crate::host::facts::CtStatus::Stopped;
    c.inside = None;
    states.push(f);
    let mut f = healthy();
    f.vmid = Some(999);
    f.container = None;
    states.push(f);
    for f in &states {
        for (check, ids) in CHECKS.iter().zip(CHECK_IDS) {
            let got: Vec<FindingId> = check(f).iter().map(|x| x.id).collect();
            for id in &got {
                assert!(
                    ids.contains(id),
                    "{id} is not declared for its check {ids:?}"
                );
                assert_eq!(got.iter().filter(|x| *x == id).count(), 1, "{id} twice");
            }
        }
    }
}

/// docs/doctor.md's tables list every id of doctor's own checks, in report order, and no other (beside the one
/// `plan.<step>` row for the reconcile's findings).
#[test]
fn doctor_md_lists_exactly_the_finding_ids() {
    let doc = include_str!("../../docs/doctor.md");
    // The first cell of each row of the tables headed `| id | severity | ...`.
    let mut documented: Vec<&str> = Vec::new();
    let mut in_ids = false;
    for line in doc.lines() {
        if !line.starts_with('|') {
            in_ids = false;
        } else if line.starts_with("| id |") {
            in_ids = true;
        } else if in_ids && let Some(cell) = line.strip_prefix("| `") {
            let id = cell.split_once('`').map_or(cell, |(id, _)| id);
            if id != "plan.<step>" {
                documented.push(id);
            }
        }
    }
    let ids: Vec<&str> = FindingId::ALL.iter().map(|id| id.as_str()).collect();
    assert_eq!(documented, ids);
    assert!(ids.iter().all(|id| !id.starts_with("plan.")));
    for step in crate::host::StepId::ALL {
        assert_eq!(FindingId::Plan(*step).to_string(), format!("plan.{step}"));
    }
}

#[test]
fn replicas_are_judged_each_pinned_to_a_gpu_of_the_host() {
    let mut f = healthy();
    let gpus = crate::host::rules::gpus(&f).len();
    assert_eq!(gpus, 1, "the healthy host has one GPU");
    let unit = |gpu: u32| {
        format!(
            "[Service]\nExecStart=/opt/llama.cpp/build/bin/llama-server -m /m.gguf --port {} -c 32768\n\
             Environment=CUDA_DEVICE_ORDER=PCI_BUS_ID\nEnvironment=CUDA_VISIBLE_DEVICES={gpu}\n",
            8080 + gpu
        )
    };
    let ins = f.container.as_mut().unwrap().inside.as_mut().unwrap();
    ins.files
        .remove(crate::provision::units::LLAMA_SERVER_UNIT_PATH);
    ins.services.remove("llama-server");
    ins.files
        .insert(crate::host::facts::replica_unit_path(0), unit(0));
    ins.services
        .insert("llama-server-gpu0".into(), "active".into());
    assert_eq!(problems(&f), Vec::<&str>::new());
    assert!(
        finding(&f, "svc.replica-pin")
            .title
            .contains("each pinned to its own GPU")
    );
    // A replica for a GPU the host does not have, and one that does not run.
    let ins = f.container.as_mut().unwrap().inside.as_mut().unwrap();
    ins.files
        .insert(crate::host::facts::replica_unit_path(1), unit(1));
    ins.services
        .insert("llama-server-gpu1".into(), "failed".into());
    assert_eq!(
        problems(&f),
        vec!["svc.llama-server-down", "svc.replica-pin"]
    );
    let down = finding(&f, "svc.llama-server-down");
    assert!(down.title.contains("llama-server-gpu1"), "{}", down.title);
    // Pinned to another GPU than its own.
    let ins = f.container.as_mut().unwrap().inside.as_mut().unwrap();
    ins.files.remove(&crate::host::facts::replica_unit_path(1));
    ins.services.remove("llama-server-gpu1");
    ins.files.insert(
        crate::host::facts::replica_unit_path(0),
        unit(0).replace("CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"),
    );
    assert_eq!(problems(&f), vec!["svc.replica-pin"]);
}

/// With one llama-server per GPU there is no llama-server.service: the llama findings name the replica units
/// the container does run, and a host with the one unit reads as before.
#[test]
fn llama_findings_name_the_replica_units_the_host_runs() {
    let mut f = healthy();
    assert_eq!(
        finding(&f, "llama.not-installed").title,
        "llama-server.service runs /opt/llama.cpp/build/bin/llama-server"
    );
    let unit = |gpu: u32, ctx: u32| {
        format!(
            "[Service]\nExecStart=/opt/llama.cpp/build/bin/llama-server -m /m.gguf --port {} -c {ctx}\n\
             Environment=CUDA_DEVICE_ORDER=PCI_BUS_ID\nEnvironment=CUDA_VISIBLE_DEVICES={gpu}\n",
            8080 + gpu
        )
    };
    // As facts reads such a container: the first replica's command stands for the build it runs.
    let ins = f.container.as_mut().unwrap().inside.as_mut().unwrap();
    ins.files
        .remove(crate::provision::units::LLAMA_SERVER_UNIT_PATH);
    ins.services.remove("llama-server");
    for (gpu, ctx) in [(0, 32768), (1, 16384)] {
        let text = unit(gpu, ctx);
        ins.replicas.insert(
            gpu,
            crate::pve::llama::parse_server_unit(&text).expect("a server unit"),
        );
        ins.files
            .insert(crate::host::facts::replica_unit_path(gpu), text);
        ins.services
            .insert(crate::host::facts::replica_unit(gpu), "active".into());
    }
    ins.llama_unit = ins.replicas.get(&0).cloned();
    assert_eq!(
        finding(&f, "llama.not-installed").title,
        "llama-server-gpu0.service, llama-server-gpu1.service run /opt/llama.cpp/build/bin/llama-server"
    );
    // The replica with the smaller context is the one named.
    let ctx = finding(&f, "llama.context-small");
    assert!(
        ctx.title
            .starts_with("llama-server-gpu1's context is 16384 tokens per slot"),
        "{}",
        ctx.title
    );
    assert_eq!(
        ctx.evidence,
        ["CT 103 llama-server-gpu1.service ExecStart: -c 16384"]
    );
    // The binary gone: the next start of every replica fails.
    let ins = f.container.as_mut().unwrap().inside.as_mut().unwrap();
    ins.llama_exe = None;
    let gone = finding(&f, "llama.not-installed");
    assert!(
        gone.title
            .ends_with("the next start of llama-server-gpu0, llama-server-gpu1 fails"),
        "{}",
        gone.title
    );
    // Replica files without an ExecStart: those files are named, not a llama-server.service that is not there.
    let ins = f.container.as_mut().unwrap().inside.as_mut().unwrap();
    ins.llama_unit = None;
    ins.replicas.clear();
    let none = finding(&f, "llama.not-installed");
    assert_eq!(
        none.title,
        "container 103 has no llama-server unit with an ExecStart"
    );
    assert_eq!(
        none.evidence,
        [
            "CT 103: /etc/systemd/system/llama-server-gpu0.service: no ExecStart",
            "CT 103: /etc/systemd/system/llama-server-gpu1.service: no ExecStart"
        ]
    );
}
