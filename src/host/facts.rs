//! Read-only facts about the host and its GPU container, gathered in two round trips:
//!
//! 1. one host-side shell script (a constant: no user data is interpolated into it) that prints every probe as a
//!    `==> name <==` section followed by `==> rc=N <==`;
//! 2. one container round: `pct status`, then (running) `pct exec <vmid> -- sh -c <constant script>` or (stopped)
//!    `pct mount` + `lsattr` of the rootfs's resolv.conf + `pct unmount`. The vmid travels as `$1` in argv.
//!
//! Parsing the sections into [`HostFacts`] is pure ([`HostFacts::from_sections`]) so checks are tested on text.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::pve::dkms::{self, DkmsEntry};
use crate::pve::llama::{self, ServerCommand};
use crate::pve::lxc::LxcConfig;
use crate::pve::nvidia::{self, Gpu, LoadedModule, SmiReport};
use crate::pve::packages::{self, Package};
use crate::pve::system::{self, DevNode, PveVersion};
use crate::transport::{Cmd, Transport};

/// systemd units doctor expects inside the container.
pub const LLAMA_UNIT: &str = "llama-server";
pub const PROXY_UNIT: &str = "llmctl-proxy";

/// The host probes. `sec NAME CMD...` prints the command's output (stdout and stderr) between markers.
pub const HOST_SCRIPT: &str = r##"export LC_ALL=C
sec() { n=$1; shift; out=$("$@" 2>&1); rc=$?; printf '==> %s <==\n%s\n==> rc=%s <==\n' "$n" "$out" "$rc"; }
kbuild() { for d in /lib/modules/*; do [ -e "$d/build" ] && echo "${d##*/}"; done; return 0; }
devs() { ls -ld /dev/nvidia*; }
makelogs() { for f in /var/lib/dkms/nvidia*/*/build/make.log; do [ -f "$f" ] && { echo "--- $f"; tail -n 5 "$f"; }; done; return 0; }
dmesgnv() { dmesg | grep -E 'NVRM|nouveau' | tail -n 20; }
sec pveversion pveversion
sec uname uname -r
sec os-release cat /etc/os-release
sec kernels ls -1 /lib/modules
sec kernel-build kbuild
sec mokutil mokutil --sb-state
sec mok-key mokutil --test-key /var/lib/dkms/mok.pub
sec lsmod lsmod
sec proc-version cat /proc/driver/nvidia/version
sec nvidia-smi nvidia-smi
sec lspci lspci -nn -d 10de:
sec query-gpu nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,memory.used --format=csv,noheader,nounits
sec dkms dkms status
sec make-log makelogs
sec dev devs
sec proc-devices cat /proc/devices
sec dpkg dpkg-query -W -f '${Package}\t${Version}\t${db:Status-Abbrev}\n'
sec holds apt-mark showhold
sec modprobe-nouveau grep -rsH nouveau /etc/modprobe.d /lib/modprobe.d /usr/lib/modprobe.d
sec modules-load grep -rsH nvidia /etc/modules-load.d /usr/lib/modules-load.d /etc/modules
sec udev grep -rsH nvidia /etc/udev/rules.d /usr/lib/udev/rules.d
sec dmesg dmesgnv
for f in /etc/modprobe.d/blacklist-nouveau.conf /etc/modules-load.d/nvidia.conf /etc/udev/rules.d/70-nvidia.rules \
  /etc/apt/sources.list.d/cuda-debian12-x86_64.list /etc/apt/sources.list.d/cuda-debian13-x86_64.list; do
  sec "file $f" cat "$f"
done
for f in /etc/pve/lxc/*.conf; do
  [ -f "$f" ] || continue
  v=${f##*/}
  sec "ct-config ${v%.conf}" cat "$f"
done
"##;

/// The container round, run on the host with the vmid as `$1` and [`CT_SCRIPT`] as `$2`.
pub const CT_ROUND_SCRIPT: &str = r##"export LC_ALL=C
sec() { n=$1; shift; out=$("$@" 2>&1); rc=$?; printf '==> %s <==\n%s\n==> rc=%s <==\n' "$n" "$out" "$rc"; }
sec ct-status pct status "$1"
case "$(pct status "$1" 2>/dev/null)" in
  *running*) pct exec "$1" -- sh -c "$2" ;;
  *)
    sec ct-mount pct mount "$1"
    sec ct-resolv lsattr -d "/var/lib/lxc/$1/rootfs/etc/resolv.conf"
    sec ct-pve-ignore ls -a "/var/lib/lxc/$1/rootfs/etc/.pve-ignore.resolv.conf"
    sec ct-unmount pct unmount "$1"
    ;;
esac
"##;

/// Probes inside a running container.
pub const CT_SCRIPT: &str = r##"export LC_ALL=C
sec() { n=$1; shift; out=$("$@" 2>&1); rc=$?; printf '==> %s <==\n%s\n==> rc=%s <==\n' "$n" "$out" "$rc"; }
unit() { for f in /etc/systemd/system/$1.service /lib/systemd/system/$1.service; do [ -f "$f" ] && { cat "$f"; return 0; }; done; return 1; }
cmakecache() {
  for f in /etc/systemd/system/llama-server.service /lib/systemd/system/llama-server.service; do
    [ -f "$f" ] || continue
    exe=$(sed -n 's/^[[:space:]]*ExecStart=[-@+!]*\([^[:space:]]*\).*/\1/p' "$f" | head -n 1)
    echo "# path: ${exe%/bin/*}/CMakeCache.txt"
    cat "${exe%/bin/*}/CMakeCache.txt"
    return
  done
  return 1
}
llamaexe() {
  for f in /etc/systemd/system/llama-server.service /lib/systemd/system/llama-server.service; do
    [ -f "$f" ] || continue
    exe=$(sed -n 's/^[[:space:]]*ExecStart=[-@+!]*\([^[:space:]]*\).*/\1/p' "$f" | head -n 1)
    ls -l "$exe"
    return
  done
  return 1
}
devs() { ls -ld /dev/nvidia*; }
sec ct-os-release cat /etc/os-release
sec ct-proc-version cat /proc/driver/nvidia/version
sec ct-nvidia-smi nvidia-smi
sec ct-dpkg dpkg-query -W -f '${Package}\t${Version}\t${db:Status-Abbrev}\n' libnvidia-ml1 libcuda1 nvidia-driver-cuda
sec ct-holds apt-mark showhold
sec ct-dev devs
sec ct-resolv lsattr -d /etc/resolv.conf
sec ct-pve-ignore ls -a /etc/.pve-ignore.resolv.conf
sec ct-llama-unit unit llama-server
sec ct-proxy-unit unit llmctl-proxy
sec ct-cmake cmakecache
sec ct-llama-exe llamaexe
sec ct-services systemctl is-active llama-server llmctl-proxy
"##;

/// One probe's output and exit status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Probe {
    pub text: String,
    pub rc: Option<i32>,
}

impl Probe {
    pub fn ok(&self) -> bool {
        self.rc == Some(0)
    }
    pub fn lines(&self) -> Vec<String> {
        self.text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    }
}

/// Splits a script's output into its `==> name <==` ... `==> rc=N <==` sections.
pub fn parse_sections(output: &str) -> BTreeMap<String, Probe> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, Vec<&str>)> = None;
    for line in output.lines() {
        if let Some(inner) = line
            .strip_prefix("==> ")
            .and_then(|l| l.strip_suffix(" <=="))
        {
            if let Some(rc) = inner.strip_prefix("rc=") {
                if let Some((name, body)) = current.take() {
                    out.insert(
                        name,
                        Probe {
                            text: body.join("\n"),
                            rc: rc.trim().parse().ok(),
                        },
                    );
                }
            } else {
                // A section without its rc marker (cut short) keeps what it printed, rc unknown.
                if let Some((name, body)) = current.take() {
                    out.insert(
                        name,
                        Probe {
                            text: body.join("\n"),
                            rc: None,
                        },
                    );
                }
                current = Some((inner.to_string(), Vec::new()));
            }
        } else if let Some((_, body)) = current.as_mut() {
            body.push(line);
        }
    }
    if let Some((name, body)) = current {
        out.insert(
            name,
            Probe {
                text: body.join("\n"),
                rc: None,
            },
        );
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CtStatus {
    Running,
    Stopped,
    /// `pct status` failed or said something else (kept for evidence).
    Unknown(String),
}

/// What doctor saw inside a running container.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InsideFacts {
    pub os_release: BTreeMap<String, String>,
    pub module: Option<LoadedModule>,
    pub smi: Option<SmiReport>,
    pub smi_lines: Vec<String>,
    pub packages: Vec<Package>,
    pub holds: Vec<String>,
    pub dev_nodes: Vec<DevNode>,
    pub llama_unit: Option<ServerCommand>,
    pub proxy_unit_exec: Option<String>,
    pub cmake_path: Option<String>,
    pub cmake: Option<BTreeMap<String, String>>,
    /// `ls -l` of the executable llama-server's unit starts, when that file exists (None: it does not, or there
    /// is no unit).
    pub llama_exe: Option<String>,
    /// unit → `systemctl is-active` answer.
    pub services: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ContainerFacts {
    pub vmid: u32,
    pub status: CtStatus,
    /// `lsattr` flags of the container's `/etc/resolv.conf`, with the path shown.
    pub resolv_attr: Option<(String, String)>,
    /// `/etc/.pve-ignore.resolv.conf` exists (Proxmox leaves resolv.conf alone).
    pub resolv_ignored: bool,
    /// Present only when the container runs.
    pub inside: Option<InsideFacts>,
}

/// One NVIDIA GPU as `lspci -nn` names it: `01:00.0 3D controller [0302]: NVIDIA Corporation GP102GL [Tesla
/// P40] [10de:1b38] (rev a1)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PciGpu {
    pub bus: String,
    /// The chip codename (`GP102GL`, `AD102`): its prefix is the generation.
    pub chip: String,
    pub name: String,
}

/// The display and 3D controllers of `lspci -nn -d 10de:` (audio functions and bridges of the same cards are not
/// GPUs).
pub fn parse_lspci(text: &str) -> Vec<PciGpu> {
    text.lines()
        .filter(|l| l.contains("VGA compatible controller") || l.contains("3D controller"))
        .filter_map(|l| {
            let (bus, rest) = l.split_once(' ')?;
            let rest = rest.split_once("NVIDIA Corporation ")?.1;
            let (chip, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = rest
                .strip_prefix('[')
                .and_then(|r| r.split_once(']'))
                .map_or_else(String::new, |(n, _)| n.to_string());
            Some(PciGpu {
                bus: bus.to_string(),
                chip: chip.to_string(),
                name,
            })
        })
        .collect()
}

/// Whether the key DKMS signs modules with is enrolled in the machine owner keys (what Secure Boot trusts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MokKey {
    Enrolled,
    NotEnrolled,
    /// `/var/lib/dkms/mok.pub` does not exist yet: DKMS creates it at its next build; modules built before it are
    /// unsigned.
    Missing,
}

/// `mokutil --test-key` output: `... is already enrolled`, `... is not enrolled`, or an error reading the file.
pub fn parse_mok_key(probe: &Probe) -> Option<MokKey> {
    if probe.rc == Some(127) || (probe.text.contains("not found") && probe.text.contains("mokutil"))
    {
        return None;
    }
    let t = &probe.text;
    Some(if t.contains("is already enrolled") {
        MokKey::Enrolled
    } else if t.contains("is not enrolled") {
        MokKey::NotEnrolled
    } else {
        MokKey::Missing
    })
}

/// Everything the checks look at.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostFacts {
    pub target: String,
    pub pve: Option<PveVersion>,
    pub os_release: BTreeMap<String, String>,
    pub kernel: String,
    pub installed_kernels: Vec<String>,
    pub kernels_with_build_dir: Vec<String>,
    /// `Some(true)` when mokutil says `SecureBoot enabled`; None when mokutil is absent.
    pub secure_boot: Option<bool>,
    pub secure_boot_line: Option<String>,
    /// DKMS's module signing key (`mokutil --test-key /var/lib/dkms/mok.pub`); None without mokutil.
    pub mok_key: Option<MokKey>,
    /// The line mokutil printed about it.
    pub mok_key_line: Option<String>,
    pub modules: Vec<String>,
    pub module: Option<LoadedModule>,
    pub smi: Option<SmiReport>,
    pub smi_lines: Vec<String>,
    pub gpus: Vec<Gpu>,
    /// NVIDIA display controllers on the PCI bus (`lspci -nn -d 10de:`): the GPUs even when no driver runs.
    pub pci_gpus: Vec<PciGpu>,
    pub dkms: Vec<DkmsEntry>,
    pub make_log_lines: Vec<String>,
    pub dev_nodes: Vec<DevNode>,
    pub proc_devices: BTreeMap<String, u32>,
    pub packages: Vec<Package>,
    pub holds: Vec<String>,
    pub modprobe_nouveau: Vec<String>,
    pub modules_load: Vec<String>,
    pub udev_rules: Vec<String>,
    pub dmesg: Vec<String>,
    /// Every container config on this node, by vmid.
    pub configs: BTreeMap<u32, LxcConfig>,
    /// The same configs exactly as on disk (a rewrite keeps every other byte).
    pub config_texts: BTreeMap<u32, String>,
    /// The host files llmctl manages (HOST_SCRIPT's `file` sections), by path; absent: the file does not exist.
    pub files: BTreeMap<String, String>,
    /// The container doctor looks at (None: no container chosen).
    pub vmid: Option<u32>,
    pub container: Option<ContainerFacts>,
}

impl HostFacts {
    /// Builds facts from the host script's sections. Errors only when the host is not a Proxmox VE host.
    pub fn from_sections(target: &str, s: &BTreeMap<String, Probe>) -> Result<HostFacts> {
        let get = |name: &str| s.get(name).cloned().unwrap_or_default();
        let pv = get("pveversion");
        let Some(pve) = system::parse_pveversion(&pv.text) else {
            let said = pv
                .lines()
                .first()
                .cloned()
                .unwrap_or_else(|| "no output".into());
            return Err(crate::transport::TransportError::NotProxmox {
                host: target.to_string(),
                detail: format!(
                    "did not report a pve-manager version (exit {}: {said})",
                    pv.rc.map_or("unknown".to_string(), |c| c.to_string())
                ),
            }
            .into());
        };
        let smi = get("nvidia-smi");
        let mokutil = get("mokutil");
        let sb_line = mokutil
            .lines()
            .into_iter()
            .find(|l| l.contains("SecureBoot"));
        let query = get("query-gpu");
        let mut facts = HostFacts {
            target: target.to_string(),
            os_release: system::parse_os_release(&get("os-release").text),
            kernel: get("uname").text.trim().to_string(),
            installed_kernels: get("kernels").lines(),
            kernels_with_build_dir: get("kernel-build").lines(),
            secure_boot: sb_line.as_ref().map(|l| l.contains("enabled")),
            secure_boot_line: sb_line,
            mok_key: parse_mok_key(&get("mok-key")),
            mok_key_line: get("mok-key").lines().into_iter().next(),
            modules: system::parse_lsmod(&get("lsmod").text),
            module: nvidia::parse_proc_version(&get("proc-version").text),
            smi: Some(nvidia::parse_smi(&smi.text, smi.rc)),
            smi_lines: smi.lines(),
            gpus: if query.ok() {
                nvidia::parse_query_gpu(&query.text).unwrap_or_default()
            } else {
                Vec::new()
            },
            pci_gpus: parse_lspci(&get("lspci").text),
            dkms: dkms::parse_status(&get("dkms").text),
            make_log_lines: get("make-log").lines(),
            dev_nodes: system::parse_ls_dev(&get("dev").text),
            proc_devices: system::parse_proc_devices(&get("proc-devices").text),
            packages: packages::parse_dpkg_query(&get("dpkg").text),
            holds: packages::parse_showhold(&get("holds").text),
            modprobe_nouveau: get("modprobe-nouveau").lines(),
            modules_load: get("modules-load").lines(),
            udev_rules: get("udev").lines(),
            dmesg: get("dmesg").lines(),
            pve: Some(pve),
            ..HostFacts::default()
        };
        if facts.kernel.is_empty()
            && let Some(k) = facts.pve.as_ref().and_then(|p| p.running_kernel.clone())
        {
            facts.kernel = k;
        }
        for (name, probe) in s {
            if let Some(vmid) = name
                .strip_prefix("ct-config ")
                .and_then(|v| v.parse::<u32>().ok())
            {
                facts.configs.insert(vmid, LxcConfig::parse(&probe.text));
                facts.config_texts.insert(vmid, with_newline(&probe.text));
            }
            if let Some(path) = name.strip_prefix("file ")
                && probe.ok()
            {
                facts
                    .files
                    .insert(path.to_string(), with_newline(&probe.text));
            }
        }
        Ok(facts)
    }

    /// Adds the container round's sections (and its stderr, which carries `pct exec`'s own errors).
    pub fn add_container(&mut self, vmid: u32, s: &BTreeMap<String, Probe>, round_stderr: &str) {
        let get = |name: &str| s.get(name).cloned().unwrap_or_default();
        let status_text = get("ct-status").text.trim().to_string();
        let mut status = match status_text.as_str() {
            t if t.ends_with("running") => CtStatus::Running,
            t if t.ends_with("stopped") => CtStatus::Stopped,
            t => CtStatus::Unknown(t.to_string()),
        };
        // Running, but `pct exec` printed none of the probes: nothing inside can be judged.
        if status == CtStatus::Running
            && !["ct-os-release", "ct-nvidia-smi", "ct-dpkg", "ct-services"]
                .iter()
                .any(|k| s.contains_key(*k))
        {
            status = CtStatus::Unknown(format!(
                "status: running, but `pct exec {vmid} -- sh` failed: {}",
                round_stderr.lines().next().unwrap_or("no output")
            ));
        }
        let resolv = get("ct-resolv");
        let resolv_attr = system::parse_lsattr(&resolv.text).into_iter().next();
        let inside = (status == CtStatus::Running).then(|| {
            let smi = get("ct-nvidia-smi");
            let cmake = get("ct-cmake");
            let cmake_path = cmake
                .text
                .lines()
                .find_map(|l| l.strip_prefix("# path: "))
                .map(str::to_string);
            let llama_unit = get("ct-llama-unit");
            let llama_exe = get("ct-llama-exe");
            let proxy_unit = get("ct-proxy-unit");
            let services = get("ct-services")
                .lines()
                .into_iter()
                .zip([LLAMA_UNIT, PROXY_UNIT])
                .map(|(state, unit)| (unit.to_string(), state.trim().to_string()))
                .collect();
            InsideFacts {
                os_release: system::parse_os_release(&get("ct-os-release").text),
                module: nvidia::parse_proc_version(&get("ct-proc-version").text),
                smi: Some(nvidia::parse_smi(&smi.text, smi.rc)),
                smi_lines: smi.lines(),
                packages: packages::parse_dpkg_query(&get("ct-dpkg").text),
                holds: packages::parse_showhold(&get("ct-holds").text),
                dev_nodes: system::parse_ls_dev(&get("ct-dev").text),
                llama_unit: llama_unit
                    .ok()
                    .then(|| llama::parse_server_unit(&llama_unit.text))
                    .flatten(),
                proxy_unit_exec: proxy_unit
                    .ok()
                    .then(|| {
                        proxy_unit
                            .text
                            .lines()
                            .find_map(|l| l.trim_start().strip_prefix("ExecStart="))
                            .map(str::to_string)
                    })
                    .flatten(),
                cmake: (cmake.ok() && cmake_path.is_some())
                    .then(|| llama::parse_cmake_cache(&cmake.text)),
                cmake_path,
                llama_exe: llama_exe.ok().then(|| llama_exe.text.trim().to_string()),
                services,
            }
        });
        self.vmid = Some(vmid);
        self.container = Some(ContainerFacts {
            vmid,
            status,
            resolv_attr,
            resolv_ignored: get("ct-pve-ignore").ok(),
            inside,
        });
    }

    pub fn package(&self, name: &str) -> Option<&Package> {
        self.packages
            .iter()
            .find(|p| p.name == name && p.installed())
    }

    pub fn is_held(&self, name: &str) -> bool {
        self.holds.iter().any(|h| h == name)
            || self.packages.iter().any(|p| p.name == name && p.held())
    }

    pub fn has_module(&self, name: &str) -> bool {
        self.modules.iter().any(|m| m == name)
    }

    /// A host file llmctl manages, as gathered (None: it does not exist). Only the paths HOST_SCRIPT reads.
    pub fn file(&self, path: &str) -> Option<&str> {
        debug_assert!(
            HOST_SCRIPT.contains(path),
            "{path} is not gathered by HOST_SCRIPT"
        );
        self.files.get(path).map(String::as_str)
    }

    pub fn config(&self) -> Option<&LxcConfig> {
        self.configs.get(&self.vmid?)
    }
}

/// A section's text is the command's output with its last newline cut (`$(...)` drops trailing newlines):
/// a file that ends in a newline gets it back. (A file without one gets one: these are config files.)
fn with_newline(text: &str) -> String {
    if text.is_empty() || text.ends_with('\n') {
        text.to_string()
    } else {
        format!("{text}\n")
    }
}

/// How doctor picks the container when `--vmid` is not given: the only container whose config mentions an
/// NVIDIA device; else the only container; else an error listing them.
pub fn pick_vmid(configs: &BTreeMap<u32, LxcConfig>) -> Result<Option<u32>> {
    if configs.is_empty() {
        return Ok(None);
    }
    let mentions_nvidia = |c: &LxcConfig| {
        let in_section = |s: &crate::pve::lxc::Section| {
            s.options
                .iter()
                .chain(s.raw.iter())
                .any(|(_, v)| v.contains("/dev/nvidia"))
        };
        in_section(&c.live) || c.snapshots.iter().any(|(_, s)| in_section(s))
    };
    let gpu: Vec<u32> = configs
        .iter()
        .filter(|(_, c)| mentions_nvidia(c))
        .map(|(v, _)| *v)
        .collect();
    match (gpu.as_slice(), configs.len()) {
        ([one], _) => Ok(Some(*one)),
        ([], 1) => Ok(configs.keys().next().copied()),
        _ => {
            let list = configs
                .iter()
                .map(|(v, c)| format!("{v} ({})", c.get("hostname").unwrap_or("no hostname")))
                .collect::<Vec<_>>()
                .join(", ");
            let which = if gpu.is_empty() {
                "none of them has NVIDIA devices"
            } else {
                "several have NVIDIA devices"
            };
            bail!(
                "cannot tell which container to check: {which}. Containers: {list}. Pass --vmid N (or set [host] vmid in llmctl.toml)"
            )
        }
    }
}

/// Gathers everything: the host round, then (when a container is chosen and exists) the container round.
pub fn gather(transport: &dyn Transport, vmid: Option<u32>) -> Result<HostFacts> {
    let target = transport.describe();
    let out = transport
        .run(&Cmd::new(["sh", "-c", HOST_SCRIPT, "llmctl-doctor"]))
        .with_context(|| format!("cannot run the host probes on {target}"))?;
    let sections = parse_sections(&out.stdout);
    if sections.is_empty() {
        bail!(
            "the host probes on {target} printed nothing readable (exit {:?}): {}",
            out.status,
            out.stderr.lines().next().unwrap_or("")
        );
    }
    let mut facts = HostFacts::from_sections(&target, &sections)?;
    let vmid = match vmid {
        Some(v) => Some(v),
        None => pick_vmid(&facts.configs)?,
    };
    facts.vmid = vmid;
    if let Some(vmid) = vmid
        && facts.configs.contains_key(&vmid)
    {
        let out = transport
            .run(&Cmd::new([
                "sh".to_string(),
                "-c".to_string(),
                CT_ROUND_SCRIPT.to_string(),
                "llmctl-doctor".to_string(),
                vmid.to_string(),
                CT_SCRIPT.to_string(),
            ]))
            .with_context(|| {
                format!("cannot run the container probes for CT {vmid} on {target}")
            })?;
        facts.add_container(vmid, &parse_sections(&out.stdout), &out.stderr);
    }
    Ok(facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_split_with_exit_codes() {
        let s = parse_sections(
            "junk\n==> uname <==\n6.14.8-2-pve\n==> rc=0 <==\n==> ct-config 103 <==\narch: amd64\n\n==> rc=0 <==\n==> mokutil <==\nsh: 1: mokutil: not found\n==> rc=127 <==\n==> cut <==\npartial",
        );
        assert_eq!(
            s["uname"],
            Probe {
                text: "6.14.8-2-pve".into(),
                rc: Some(0)
            }
        );
        assert_eq!(s["ct-config 103"].text, "arch: amd64\n");
        assert_eq!(s["mokutil"].rc, Some(127));
        assert_eq!(
            s["cut"],
            Probe {
                text: "partial".into(),
                rc: None
            }
        );
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn not_proxmox_is_an_error_naming_the_fix() {
        let s =
            parse_sections("==> pveversion <==\nsh: 1: pveversion: not found\n==> rc=127 <==\n");
        let err = HostFacts::from_sections("root@10.0.0.2", &s)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("root@10.0.0.2 is not a Proxmox VE host"),
            "{err}"
        );
        assert!(err.contains("pveversion: not found"), "{err}");
    }

    #[test]
    fn pick_vmid_rules() {
        let mut configs = BTreeMap::new();
        assert_eq!(pick_vmid(&configs).unwrap(), None);
        configs.insert(101, LxcConfig::parse("hostname: web\n"));
        assert_eq!(pick_vmid(&configs).unwrap(), Some(101));
        configs.insert(103, LxcConfig::parse("hostname: llm\ndev0: /dev/nvidia0\n"));
        assert_eq!(pick_vmid(&configs).unwrap(), Some(103));
        configs.insert(
            104,
            LxcConfig::parse("hostname: llm2\n[snap]\ndev0: /dev/nvidia0\n"),
        );
        let err = pick_vmid(&configs).unwrap_err().to_string();
        assert!(
            err.contains("several have NVIDIA devices")
                && err.contains("103 (llm)")
                && err.contains("--vmid"),
            "{err}"
        );
        configs.remove(&103);
        configs.remove(&104);
        configs.insert(102, LxcConfig::parse("hostname: db\n"));
        assert!(
            pick_vmid(&configs)
                .unwrap_err()
                .to_string()
                .contains("none of them")
        );
    }

    #[test]
    fn scripts_take_user_data_only_through_argv() {
        // The vmid is `$1`, never spliced into the script text.
        assert!(CT_ROUND_SCRIPT.contains("pct status \"$1\""));
        assert!(!HOST_SCRIPT.contains("{}") && !CT_SCRIPT.contains("{}"));
    }

    /// Serves the host and container rounds from text, and records the argv of each call.
    struct Recorded {
        host: String,
        ct: String,
        calls: std::sync::Mutex<Vec<Vec<String>>>,
    }

    impl Transport for Recorded {
        fn run(&self, cmd: &Cmd) -> Result<crate::transport::Output> {
            self.calls.lock().unwrap().push(cmd.argv.clone());
            let stdout = if cmd.argv[2] == HOST_SCRIPT {
                self.host.clone()
            } else {
                self.ct.clone()
            };
            Ok(crate::transport::Output {
                status: Some(0),
                stdout,
                stderr: String::new(),
            })
        }
        fn run_streaming(
            &self,
            cmd: &Cmd,
            _: &mut dyn FnMut(crate::transport::Stream, &str),
        ) -> Result<crate::transport::Output> {
            self.run(cmd)
        }
        fn read_file(&self, _: &str) -> Result<Vec<u8>> {
            bail!("not used")
        }
        fn write_file(&self, _: &str, _: &[u8], _: u32) -> Result<()> {
            bail!("doctor never writes")
        }
        fn describe(&self) -> String {
            "root@recorded".into()
        }
    }

    const HOST: &str = "==> pveversion <==\npve-manager/8.4.10/293f4abc4b22fa08 (running kernel: 6.8.12-13-pve)\n==> rc=0 <==\n==> uname <==\n6.8.12-13-pve\n==> rc=0 <==\n==> ct-config 103 <==\ndev0: /dev/nvidia0\n==> rc=0 <==\n==> ct-config 200 <==\nhostname: web\n==> rc=0 <==\n";

    #[test]
    fn gather_takes_two_rounds_and_passes_the_vmid_in_argv() {
        let t = Recorded {
            host: HOST.into(),
            ct: "==> ct-status <==\nstatus: stopped\n==> rc=0 <==\n==> ct-resolv <==\n----i---------e------- /var/lib/lxc/103/rootfs/etc/resolv.conf\n==> rc=0 <==\n".into(),
            calls: Default::default(),
        };
        let f = gather(&t, None).unwrap();
        assert_eq!(f.vmid, Some(103), "the only container with NVIDIA devices");
        assert_eq!(f.kernel, "6.8.12-13-pve");
        assert_eq!(f.pve.as_ref().unwrap().major, 8);
        let c = f.container.as_ref().unwrap();
        assert_eq!(c.status, CtStatus::Stopped);
        assert!(c.inside.is_none());
        assert_eq!(c.resolv_attr.as_ref().unwrap().0, "----i---------e-------");
        let calls = t.calls.lock().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1][..2], ["sh", "-c"]);
        assert_eq!(calls[1][2], CT_ROUND_SCRIPT);
        assert_eq!(calls[1][4], "103");
        assert_eq!(calls[1][5], CT_SCRIPT);
    }

    #[test]
    fn gather_skips_the_container_round_for_a_missing_container() {
        let t = Recorded {
            host: HOST.into(),
            ct: String::new(),
            calls: Default::default(),
        };
        let f = gather(&t, Some(999)).unwrap();
        assert_eq!(f.vmid, Some(999));
        assert!(f.container.is_none());
        assert_eq!(t.calls.lock().unwrap().len(), 1);
    }

    /// The scripts run under a real `sh` here (not a Proxmox host): every probe still prints its section and exit
    /// code, and the result is the not-Proxmox error.
    #[test]
    fn scripts_run_under_a_real_shell() {
        for script in [HOST_SCRIPT, CT_SCRIPT] {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .arg("llmctl-doctor")
                .output()
                .expect("sh runs");
            let text = String::from_utf8_lossy(&out.stdout);
            let sections = parse_sections(&text);
            let wanted: Vec<&str> = script
                .lines()
                .filter_map(|l| l.strip_prefix("sec "))
                .filter_map(|l| l.split_whitespace().next())
                .filter(|n| !n.starts_with('"'))
                .collect();
            assert!(wanted.len() > 10, "{wanted:?}");
            for name in wanted {
                let probe = sections
                    .get(name)
                    .unwrap_or_else(|| panic!("no section {name} in:\n{text}"));
                assert!(probe.rc.is_some(), "section {name} has no exit code");
            }
        }
        let err = gather(&crate::transport::local::LocalTransport::new(), None).unwrap_err();
        assert!(
            format!("{err:#}").contains("is not a Proxmox VE host"),
            "{err:#}"
        );
    }
}
