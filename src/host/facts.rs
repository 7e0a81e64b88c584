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
use crate::transport::{Cmd, Output, Transport};

/// systemd units doctor expects inside the container.
pub const LLAMA_UNIT: &str = "llama-server";
pub const PROXY_UNIT: &str = "llmctl-proxy";
/// The unit of the replica pinned to GPU `i` is `llama-server-gpu<i>` (`llmctl model plan`'s `replicas` layout).
pub const REPLICA_UNIT_PREFIX: &str = "llama-server-gpu";
/// Where the replicas' unit files are (`<dir><unit>.service`).
pub const REPLICA_UNIT_DIR: &str = "/etc/systemd/system/";

/// The unit of the replica on GPU `gpu`.
pub fn replica_unit(gpu: u32) -> String {
    format!("{REPLICA_UNIT_PREFIX}{gpu}")
}

/// The unit file of the replica on GPU `gpu`.
pub fn replica_unit_path(gpu: u32) -> String {
    format!("{REPLICA_UNIT_DIR}{}.service", replica_unit(gpu))
}

/// The GPU index of a replica's unit file path (`/etc/systemd/system/llama-server-gpu1.service` → 1).
pub fn replica_of_path(path: &str) -> Option<u32> {
    path.strip_prefix(REPLICA_UNIT_DIR)?
        .strip_suffix(".service")?
        .strip_prefix(REPLICA_UNIT_PREFIX)?
        .parse()
        .ok()
}

/// The host probes. `sec NAME CMD...` prints the command's output (stdout and stderr) between markers.
pub const HOST_SCRIPT: &str = r##"export LC_ALL=C
sec() { n=$1; shift; out=$("$@" 2>&1); rc=$?; printf '==> %s <==\n%s\n==> rc=%s <==\n' "$n" "$out" "$rc"; }
kbuild() { for d in /lib/modules/*; do [ -e "$d/build" ] && echo "${d##*/}"; done; return 0; }
devs() { ls -ld /dev/nvidia*; }
exact() { cat -- "$1" && printf '%s' '<llmctl-eof>'; }
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
  sec "ct-config ${v%.conf}" exact "$f"
done
"##;

/// The container round, run on the host with the vmid as `$1`, [`CT_SCRIPT`] as `$2`, and the [`InstallPaths`]
/// (when there are any) after them, which it hands on to `CT_SCRIPT` as its `$1`-`$3`.
pub const CT_ROUND_SCRIPT: &str = r##"export LC_ALL=C
sec() { n=$1; shift; out=$("$@" 2>&1); rc=$?; printf '==> %s <==\n%s\n==> rc=%s <==\n' "$n" "$out" "$rc"; }
sec ct-status pct status "$1"
case "$(pct status "$1" 2>/dev/null)" in
  *running*) v=$1 script=$2; shift 2; pct exec "$v" -- sh -c "$script" llmctl-ct "$@" ;;
  *)
    sec ct-mount pct mount "$1"
    sec ct-resolv lsattr -d "/var/lib/lxc/$1/rootfs/etc/resolv.conf"
    sec ct-pve-ignore ls -a "/var/lib/lxc/$1/rootfs/etc/.pve-ignore.resolv.conf"
    sec ct-unmount pct unmount "$1"
    ;;
esac
"##;

/// Probes inside a running container: everything doctor's checks and provision's container steps read. The files
/// and units at fixed paths are always read; what sits at the paths llmctl.toml chooses only when the round is
/// given them as `$1` (llama.cpp's install folder), `$2` (the model file) and `$3` (the proxy's key file), with
/// the installed llmctl's checksum (hashing it is the one costly probe, and only provision's check needs it).
pub const CT_SCRIPT: &str = r##"export LC_ALL=C
sec() { n=$1; shift; out=$("$@" 2>&1); rc=$?; printf '==> %s <==\n%s\n==> rc=%s <==\n' "$n" "$out" "$rc"; }
exact() { cat -- "$1" && printf '%s' '<llmctl-eof>'; }
unit() { for f in /etc/systemd/system/$1.service /lib/systemd/system/$1.service; do [ -f "$f" ] && { cat "$f"; return 0; }; done; return 1; }
cmakecache() {
  for f in /etc/systemd/system/llama-server.service /lib/systemd/system/llama-server.service /etc/systemd/system/llama-server-gpu*.service; do
    [ -f "$f" ] || continue
    exe=$(sed -n 's/^[[:space:]]*ExecStart=[-@+!]*\([^[:space:]]*\).*/\1/p' "$f" | head -n 1)
    echo "# path: ${exe%/bin/*}/CMakeCache.txt"
    cat "${exe%/bin/*}/CMakeCache.txt"
    return
  done
  return 1
}
llamaexe() {
  for f in /etc/systemd/system/llama-server.service /lib/systemd/system/llama-server.service /etc/systemd/system/llama-server-gpu*.service; do
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
sec "ct-enabled llama-server" systemctl is-enabled llama-server
sec "ct-enabled llmctl-proxy" systemctl is-enabled llmctl-proxy
sec ct-dpkg-cuda dpkg-query -W -f '${Package}\t${Version}\t${db:Status-Abbrev}\n' cuda-keyring 'cuda-toolkit-*'
for c in /usr/local/cuda-*/bin/nvcc; do
  [ -e "$c" ] && sec "ct-nvcc $c" "$c" --version
done
for f in /etc/apt/sources.list.d/cuda-debian12-x86_64.list /etc/apt/sources.list.d/cuda-debian13-x86_64.list \
  /etc/systemd/system/llama-server.service /etc/systemd/system/llmctl-proxy.service; do
  sec "ct-file $f" exact "$f"
done
for f in /etc/systemd/system/llama-server-gpu*.service; do
  [ -f "$f" ] || continue
  u=${f##*/}; u=${u%.service}
  sec "ct-file $f" exact "$f"
  sec "ct-active $u" systemctl is-active "$u"
  sec "ct-enabled $u" systemctl is-enabled "$u"
done
if [ $# -eq 3 ]; then
  sec ct-llmctl-sha256 sha256sum /usr/local/bin/llmctl
  sec ct-llama-stamp exact "$1/.llmctl-build"
  sec ct-llama-ldd ldd "$1/build/bin/llama-server"
  sec ct-model-file test -f "$2"
  sec ct-model-stat stat -c '%s %Y' "$2"
  sec ct-model-marker exact "$2.llmctl-verified"
  sec ct-key-stat stat -c '%a %s' "$3"
  sec ct-key-sha256 sha256sum "$3"
fi
"##;

/// The facts that are live by nature, so they are not in [`HostFacts`]: each is asked only when a check needs it,
/// with the others a check is likely to ask next in the same command ([`OnDemand::together`]), and kept for the
/// run until something changes (provision's `Ctx::on_demand`, which forgets them with the gathered facts after
/// every applied step). These are the only commands a check runs besides the two rounds of [`gather`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum OnDemand {
    /// Whether a service answers its health endpoint now: `llmctl probe --health <url> --wait 0` in the container.
    Health { url: String },
    /// The offload planner's choice for the model in the container and the host's GPUs (`gpu_layers = "auto"`):
    /// `llmctl model plan ... --json` in the container, its argv built by `provision::ct::plan_argv`.
    OffloadPlan { argv: Vec<String> },
}

impl OnDemand {
    /// The command, run in the container.
    pub fn cmd(&self) -> Cmd {
        match self {
            OnDemand::Health { url } => Cmd::new([
                crate::provision::units::LLMCTL_BIN,
                "probe",
                "--health",
                url,
                "--wait",
                "0",
            ])
            .timeout(std::time::Duration::from_secs(60)),
            OnDemand::OffloadPlan { argv } => {
                Cmd::new(argv.iter().cloned()).timeout(std::time::Duration::from_secs(120))
            }
        }
    }

    /// One command, run in the container, that asks all of `asks` one after the other (one round trip instead
    /// of one each): each command's stdout in a section named by its index, its stderr in `<index> stderr`
    /// ([`Self::split`] reads them back). Its timeout is the sum of theirs.
    pub fn together(asks: &[OnDemand]) -> Cmd {
        let mut script = String::from(ASK_SCRIPT);
        let mut timeout = std::time::Duration::ZERO;
        for (i, a) in asks.iter().enumerate() {
            let cmd = a.cmd();
            script.push_str(&format!("ask {i} {}\n", crate::shell::join(&cmd.argv)));
            timeout += cmd.timeout;
        }
        Cmd::new(["sh".to_string(), "-c".into(), script, "llmctl-ask".into()]).timeout(timeout)
    }

    /// Each command's output from the output of [`Self::together`]`(asks)`, in their order. A command without
    /// its section (the container could not run the script at all) gets the whole command's status and stderr,
    /// as it would have on its own.
    pub fn split(asks: &[OnDemand], out: &Output) -> Vec<Output> {
        let sections = parse_sections(&out.stdout);
        (0..asks.len())
            .map(|i| match sections.get(&i.to_string()) {
                Some(stdout) => Output {
                    status: stdout.rc,
                    stdout: stdout.text.clone(),
                    stderr: sections
                        .get(&format!("{i} stderr"))
                        .map(|e| e.text.clone())
                        .unwrap_or_default(),
                },
                None => Output {
                    status: if out.success() { None } else { out.status },
                    stdout: String::new(),
                    stderr: out.stderr.clone(),
                },
            })
            .collect()
    }
}

/// [`OnDemand::together`]'s script, before one `ask <index> <command>` line per command: the command's stdout
/// goes straight out in its section (a line break before the rc marker, so that the section's text is the
/// output as printed), its stderr is caught and printed in a section of its own.
const ASK_SCRIPT: &str = r##"export LC_ALL=C
exec 3>&1
ask() { n=$1; shift; printf '==> %s <==\n' "$n"; err=$("$@" 2>&1 >&3 3>&-); rc=$?; printf '\n==> rc=%s <==\n==> %s stderr <==\n%s\n==> rc=0 <==\n' "$rc" "$n" "$err"; }
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
    /// llama-server.service's command; when there is none, the first replica's (the build it runs).
    pub llama_unit: Option<ServerCommand>,
    /// The replica units (`llama-server-gpu<i>.service` in /etc/systemd/system), by GPU index: their command.
    pub replicas: BTreeMap<u32, ServerCommand>,
    pub proxy_unit_exec: Option<String>,
    pub cmake_path: Option<String>,
    pub cmake: Option<BTreeMap<String, String>>,
    /// `ls -l` of the executable llama-server's unit starts, when that file exists (None: it does not, or there
    /// is no unit).
    pub llama_exe: Option<String>,
    /// unit → `systemctl is-active` answer.
    pub services: BTreeMap<String, String>,
    /// unit → whether `systemctl is-enabled` exits 0 (enabled, or static).
    pub enabled: BTreeMap<String, bool>,
    /// NVIDIA's keyring and CUDA toolkit packages (`cuda-keyring`, `cuda-toolkit-*`), whatever their state.
    pub cuda_packages: Vec<Package>,
    /// The release (`13.2`) of every `/usr/local/cuda-*/bin/nvcc` whose `--version` exits 0, by path.
    pub nvcc: BTreeMap<String, String>,
    /// The container files llmctl manages at fixed paths (CT_SCRIPT's `ct-file` sections: NVIDIA's repository
    /// lists, both unit files), exactly as on disk; absent: the file does not exist.
    pub files: BTreeMap<String, String>,
    /// What is at the paths llmctl.toml chooses; None when the round was not given them (doctor without a
    /// configuration).
    pub installed: Option<Installed>,
}

/// `systemctl is-active`'s states for which it exits 0.
pub fn is_active_state(state: &str) -> bool {
    matches!(state, "active" | "reloading" | "refreshing")
}

impl InsideFacts {
    /// A container file llmctl manages, as gathered (None: it does not exist). Only the paths CT_SCRIPT reads.
    pub fn file(&self, path: &str) -> Option<&str> {
        debug_assert!(
            CT_SCRIPT.contains(path) || replica_of_path(path).is_some(),
            "{path} is not gathered by CT_SCRIPT"
        );
        self.files.get(path).map(String::as_str)
    }

    /// Whether a package is installed (not only known to dpkg, or removed with its config files left).
    pub fn cuda_package_installed(&self, name: &str) -> bool {
        self.cuda_packages
            .iter()
            .any(|p| p.name == name && p.installed())
    }
}

/// The paths in the container that llmctl.toml chooses, handed to the container round as argv (`$3`-`$5` of
/// [`CT_ROUND_SCRIPT`]), never spliced into its text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InstallPaths {
    /// llama.cpp's install folder (`[llama_cpp].install_dir`, without a trailing `/`).
    pub llama_dir: String,
    /// The model file (`[model].dest`).
    pub model_dest: String,
    /// The proxy's API key file.
    pub key_file: String,
}

/// What provision installed at [`InstallPaths`], as the container round found it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Installed {
    /// The paths looked at.
    pub paths: InstallPaths,
    /// `sha256sum /usr/local/bin/llmctl` (None: no such file).
    pub llmctl_sha256: Option<String>,
    /// `<llama_dir>/.llmctl-build` exactly as on disk: what the build there was made from.
    pub llama_stamp: Option<String>,
    /// `ldd <llama_dir>/build/bin/llama-server` ran and found every library.
    pub llama_linked: bool,
    /// The model path is a regular file.
    pub model_is_file: bool,
    /// `stat -c '%s %Y'` of the model: its size and mtime, as the verified marker records them.
    pub model_size_mtime: Option<String>,
    /// `<model_dest>.llmctl-verified` exactly as on disk.
    pub model_marker: Option<String>,
    /// The key file's permission bits and size.
    pub key_file: Option<(u32, u64)>,
    /// `sha256sum` of the key file: a fleet's proxies must share one key, and this says whether they do
    /// without the key leaving the container.
    pub key_sha256: Option<String>,
}

impl Installed {
    /// Parses the container round's installation sections (those it prints when given `paths`).
    pub fn from_sections(paths: &InstallPaths, s: &BTreeMap<String, Probe>) -> Installed {
        let ok = |name: &str| s.get(name).filter(|p| p.ok());
        Installed {
            paths: paths.clone(),
            llmctl_sha256: ok("ct-llmctl-sha256")
                .and_then(|p| p.text.split_whitespace().next().map(str::to_string)),
            llama_stamp: ok("ct-llama-stamp").map(exact_text),
            llama_linked: ok("ct-llama-ldd").is_some_and(|p| !p.text.contains("not found")),
            model_is_file: ok("ct-model-file").is_some(),
            model_size_mtime: ok("ct-model-stat").map(|p| p.text.trim().to_string()),
            model_marker: ok("ct-model-marker").map(exact_text),
            key_file: ok("ct-key-stat").and_then(|p| parse_mode_size(&p.text)),
            key_sha256: ok("ct-key-sha256")
                .and_then(|p| p.text.split_whitespace().next().map(str::to_string)),
        }
    }
}

/// `stat -c '%a %s'` output (`600 65`): the permission bits (octal) and the size.
pub fn parse_mode_size(text: &str) -> Option<(u32, u64)> {
    let mut w = text.split_whitespace();
    let mode = u32::from_str_radix(w.next()?, 8).ok()?;
    let size = w.next()?.parse().ok()?;
    Some((mode, size))
}

/// The release of `nvcc --version` (`Cuda compilation tools, release 13.2, V13.2.78` → `13.2`).
pub fn parse_nvcc_release(text: &str) -> Option<String> {
    let rest = text.split_once("release ")?.1;
    let release = rest.split([',', ' ', '\n']).next()?.trim();
    (!release.is_empty()).then(|| release.to_string())
}

/// What ends a file that `exact` printed, so its trailing newlines survive the shell's `$(...)`.
pub const EOF_MARK: &str = "<llmctl-eof>";

/// A file's exact text from an `exact` section: everything before [`EOF_MARK`]. Sections written without it
/// (older fixtures) read as before: the text with one final newline.
pub fn exact_text(probe: &Probe) -> String {
    match probe.text.strip_suffix(EOF_MARK) {
        Some(t) => t.to_string(),
        None => with_newline(&probe.text),
    }
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
                let text = exact_text(probe);
                facts.configs.insert(vmid, LxcConfig::parse(&text));
                facts.config_texts.insert(vmid, text);
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
            let replica_files: BTreeMap<u32, &Probe> = s
                .iter()
                .filter(|(_, p)| p.ok())
                .filter_map(|(name, p)| Some((replica_of_path(name.strip_prefix("ct-file ")?)?, p)))
                .collect();
            let replicas: BTreeMap<u32, ServerCommand> = replica_files
                .iter()
                .filter_map(|(i, p)| Some((*i, llama::parse_server_unit(&exact_text(p))?)))
                .collect();
            let mut services: BTreeMap<String, String> = get("ct-services")
                .lines()
                .into_iter()
                .zip([LLAMA_UNIT, PROXY_UNIT])
                .map(|(state, unit)| (unit.to_string(), state.trim().to_string()))
                .collect();
            let mut enabled: BTreeMap<String, bool> = [LLAMA_UNIT, PROXY_UNIT]
                .into_iter()
                .map(|u| (u.to_string(), get(&format!("ct-enabled {u}")).ok()))
                .collect();
            for i in replica_files.keys() {
                let u = replica_unit(*i);
                services.insert(
                    u.clone(),
                    get(&format!("ct-active {u}")).text.trim().to_string(),
                );
                enabled.insert(u.clone(), get(&format!("ct-enabled {u}")).ok());
            }
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
                    .flatten()
                    .or_else(|| replicas.values().next().cloned()),
                replicas,
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
                enabled,
                cuda_packages: packages::parse_dpkg_query(&get("ct-dpkg-cuda").text),
                nvcc: s
                    .iter()
                    .filter(|(_, p)| p.ok())
                    .filter_map(|(name, p)| {
                        Some((
                            name.strip_prefix("ct-nvcc ")?.to_string(),
                            parse_nvcc_release(&p.text)?,
                        ))
                    })
                    .collect(),
                files: s
                    .iter()
                    .filter(|(_, p)| p.ok())
                    .filter_map(|(name, p)| {
                        Some((name.strip_prefix("ct-file ")?.to_string(), exact_text(p)))
                    })
                    .collect(),
                installed: None,
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

    /// What the container round saw inside a running container (None: it does not run, or was not examined).
    pub fn inside(&self) -> Option<&InsideFacts> {
        self.container.as_ref()?.inside.as_ref()
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
    gather_with(transport, vmid, None)
}

/// [`gather`], and what is installed at `paths` in the container (llmctl.toml's choices), in the same rounds.
pub fn gather_with(
    transport: &dyn Transport,
    vmid: Option<u32>,
    paths: Option<&InstallPaths>,
) -> Result<HostFacts> {
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
        let mut argv = vec![
            "sh".to_string(),
            "-c".into(),
            CT_ROUND_SCRIPT.into(),
            "llmctl-doctor".into(),
            vmid.to_string(),
            CT_SCRIPT.into(),
        ];
        if let Some(p) = paths {
            argv.extend([
                p.llama_dir.clone(),
                p.model_dest.clone(),
                p.key_file.clone(),
            ]);
        }
        let out = transport.run(&Cmd::new(argv)).with_context(|| {
            format!("cannot run the container probes for CT {vmid} on {target}")
        })?;
        let sections = parse_sections(&out.stdout);
        facts.add_container(vmid, &sections, &out.stderr);
        if let Some(paths) = paths
            && let Some(inside) = facts.container.as_mut().and_then(|c| c.inside.as_mut())
        {
            inside.installed = Some(Installed::from_sections(paths, &sections));
        }
    }
    Ok(facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Live facts asked together come back as each would have on its own: stdout as printed, stderr, status.
    #[test]
    fn on_demand_facts_asked_together_split_as_asked_alone() {
        let asks: Vec<OnDemand> = [
            vec!["sh", "-c", "printf 'a\\n\\nb\\n'; echo oops >&2; exit 3"],
            vec!["printf", "{\"no\": \"newline\"}"],
            vec!["true"],
            vec![
                "sh",
                "-c",
                "echo '==> not a marker'; echo 'it''s' \"$0\" >&2",
                "x y",
            ],
        ]
        .into_iter()
        .map(|argv| OnDemand::OffloadPlan {
            argv: argv.into_iter().map(String::from).collect(),
        })
        .collect();
        let local = |argv: &[String]| {
            let o = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .output()
                .unwrap();
            Output {
                status: o.status.code(),
                stdout: String::from_utf8(o.stdout).unwrap(),
                stderr: String::from_utf8(o.stderr).unwrap(),
            }
        };
        let together = OnDemand::together(&asks);
        assert_eq!(together.argv[..2], ["sh", "-c"]);
        let split = OnDemand::split(&asks, &local(&together.argv));
        assert_eq!(split.len(), asks.len());
        for (a, got) in asks.iter().zip(&split) {
            let alone = local(&a.cmd().argv);
            assert_eq!(got.status, alone.status, "{a:?}");
            assert_eq!(got.stdout, alone.stdout, "{a:?}");
            // Caught in a variable: without its trailing line breaks.
            assert_eq!(got.stderr, alone.stderr.trim_end_matches('\n'), "{a:?}");
        }
        assert_eq!(split[0].stdout, "a\n\nb\n");
        assert_eq!(split[0].stderr, "oops");
        assert_eq!(split[3].stderr, "its x y");
        assert_eq!(together.timeout, std::time::Duration::from_secs(4 * 120));
        // The container could not run it at all: each fact fails as the command did.
        let failed = Output {
            status: Some(255),
            stdout: String::new(),
            stderr: "CT 103 not running".into(),
        };
        for got in OnDemand::split(&asks, &failed) {
            assert_eq!(
                (got.status, got.stderr.as_str()),
                (Some(255), "CT 103 not running")
            );
        }
    }

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
        assert_eq!(calls[1].len(), 6, "no paths: CT_SCRIPT gets no arguments");
    }

    /// The container round takes llmctl.toml's paths as argv after the script, and what it printed about them
    /// lands in `installed`.
    #[test]
    fn gather_passes_the_install_paths_in_argv() {
        let t = Recorded {
            host: HOST.into(),
            ct: format!(
                "==> ct-status <==\nstatus: running\n==> rc=0 <==\n==> ct-os-release <==\nVERSION_ID=\"12\"\n==> rc=0 <==\n==> ct-model-file <==\n\n==> rc=0 <==\n==> ct-model-marker <==\nsha256=ab size_mtime=1 2\n{EOF_MARK}\n==> rc=0 <==\n"
            ),
            calls: Default::default(),
        };
        let paths = InstallPaths {
            llama_dir: "/opt/llama.cpp".into(),
            model_dest: "/models/m; rm -rf /.gguf".into(),
            key_file: "/etc/llmctl/key".into(),
        };
        let f = gather_with(&t, Some(103), Some(&paths)).unwrap();
        let calls = t.calls.lock().unwrap();
        assert_eq!(
            calls[1][6..],
            [
                "/opt/llama.cpp",
                "/models/m; rm -rf /.gguf",
                "/etc/llmctl/key"
            ]
        );
        assert!(
            !CT_SCRIPT.contains("rm -rf"),
            "user data never enters the script"
        );
        let i = f.inside().unwrap().installed.as_ref().unwrap();
        assert_eq!(i.paths, paths);
        assert!(i.model_is_file);
        assert_eq!(
            i.model_marker.as_deref(),
            Some("sha256=ab size_mtime=1 2\n")
        );
        assert_eq!(i.llama_stamp, None);
        assert!(!i.llama_linked);
    }

    const CT_RUNNING: &str = "==> ct-status <==\nstatus: running\n==> rc=0 <==\n\
==> ct-os-release <==\nVERSION_ID=\"12\"\n==> rc=0 <==\n\
==> ct-services <==\nactive\nreloading\n==> rc=0 <==\n\
==> ct-enabled llama-server <==\nenabled\n==> rc=0 <==\n\
==> ct-enabled llmctl-proxy <==\nFailed to get unit file state for llmctl-proxy.service: No such file or directory\n==> rc=1 <==\n\
==> ct-dpkg-cuda <==\ncuda-keyring\t1.1-1\tii \ncuda-toolkit-12-9\t12.9.1-1\trc \ncuda-toolkit-13-2\t13.2.0-1\tii \n==> rc=0 <==\n\
==> ct-nvcc /usr/local/cuda-13.2/bin/nvcc <==\nnvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.2, V13.2.51\n==> rc=0 <==\n\
==> ct-nvcc /usr/local/cuda-12.9/bin/nvcc <==\nsh: 1: /usr/local/cuda-12.9/bin/nvcc: Permission denied\n==> rc=126 <==\n\
==> ct-file /etc/apt/sources.list.d/cuda-debian12-x86_64.list <==\ndeb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/ /\n<llmctl-eof>\n==> rc=0 <==\n\
==> ct-file /etc/systemd/system/llama-server.service <==\n[Unit]\n\n\n<llmctl-eof>\n==> rc=0 <==\n\
==> ct-file /etc/systemd/system/llmctl-proxy.service <==\ncat: /etc/systemd/system/llmctl-proxy.service: No such file or directory\n==> rc=1 <==\n\
==> ct-llmctl-sha256 <==\n30a4816ca6e0aa  /usr/local/bin/llmctl\n==> rc=0 <==\n\
==> ct-llama-stamp <==\nsource=x\ncuda=13.2\n<llmctl-eof>\n==> rc=0 <==\n\
==> ct-llama-ldd <==\n\tlibcuda.so.1 => not found\n==> rc=0 <==\n\
==> ct-model-file <==\n\n==> rc=1 <==\n\
==> ct-model-stat <==\n4096 1733500000\n==> rc=0 <==\n\
==> ct-key-stat <==\n600 65\n==> rc=0 <==\n";

    /// One llama-server per GPU: each replica unit's file, command, state and enablement; without
    /// llama-server.service the first replica's command stands for the build the container runs.
    #[test]
    fn replica_units_are_gathered_by_gpu() {
        let unit = |gpu: u32, port: u16| {
            format!(
                "[Service]\nExecStart=/opt/llama.cpp/build/bin/llama-server -m /m.gguf --port {port} -c 32768\n\
                 Environment=CUDA_DEVICE_ORDER=PCI_BUS_ID\nEnvironment=CUDA_VISIBLE_DEVICES={gpu}\n"
            )
        };
        let text = format!(
            "==> ct-status <==\nstatus: running\n==> rc=0 <==\n\
             ==> ct-services <==\ninactive\nactive\n==> rc=3 <==\n\
             ==> ct-llama-unit <==\n\n==> rc=1 <==\n\
             ==> ct-file /etc/systemd/system/llama-server-gpu0.service <==\n{}<llmctl-eof>\n==> rc=0 <==\n\
             ==> ct-active llama-server-gpu0 <==\nactive\n==> rc=0 <==\n\
             ==> ct-enabled llama-server-gpu0 <==\nenabled\n==> rc=0 <==\n\
             ==> ct-file /etc/systemd/system/llama-server-gpu1.service <==\n{}<llmctl-eof>\n==> rc=0 <==\n\
             ==> ct-active llama-server-gpu1 <==\nfailed\n==> rc=3 <==\n\
             ==> ct-enabled llama-server-gpu1 <==\ndisabled\n==> rc=1 <==\n",
            unit(0, 8080),
            unit(1, 8081)
        );
        let mut f = HostFacts::default();
        f.add_container(103, &parse_sections(&text), "");
        let i = f.inside().unwrap();
        assert_eq!(i.replicas.keys().copied().collect::<Vec<_>>(), [0, 1]);
        assert_eq!(i.replicas[&1].port, Some(8081));
        assert_eq!(i.llama_unit.as_ref().unwrap().port, Some(8080));
        assert_eq!(i.services["llama-server-gpu0"], "active");
        assert_eq!(i.services["llama-server-gpu1"], "failed");
        assert!(i.enabled["llama-server-gpu0"]);
        assert!(!i.enabled["llama-server-gpu1"]);
        assert_eq!(i.file(&replica_unit_path(1)), Some(unit(1, 8081).as_str()));
        assert_eq!(crate::host::rules::replica_gpus(i), [0, 1]);
        assert_eq!(
            replica_of_path("/etc/systemd/system/llama-server-gpu12.service"),
            Some(12)
        );
        assert_eq!(
            replica_of_path("/etc/systemd/system/llama-server.service"),
            None
        );
    }

    /// Every fact provision's container steps read comes from the round's text.
    #[test]
    fn the_container_round_holds_what_the_container_steps_read() {
        let s = parse_sections(CT_RUNNING);
        let mut f = HostFacts::default();
        f.add_container(103, &s, "");
        let i = f.inside().unwrap();
        assert!(i.enabled["llama-server"]);
        assert!(!i.enabled["llmctl-proxy"]);
        assert!(is_active_state(&i.services["llama-server"]));
        assert!(
            is_active_state(&i.services["llmctl-proxy"]),
            "reloading counts as active"
        );
        assert!(i.cuda_package_installed("cuda-keyring"));
        assert!(i.cuda_package_installed("cuda-toolkit-13-2"));
        assert!(
            !i.cuda_package_installed("cuda-toolkit-12-9"),
            "removed, config files left"
        );
        assert_eq!(
            i.nvcc.iter().collect::<Vec<_>>(),
            [(
                &"/usr/local/cuda-13.2/bin/nvcc".to_string(),
                &"13.2".to_string()
            )],
            "an nvcc that does not run has no release"
        );
        assert!(
            i.file("/etc/apt/sources.list.d/cuda-debian12-x86_64.list")
                .unwrap()
                .contains("/debian12/")
        );
        assert_eq!(
            i.file("/etc/systemd/system/llama-server.service"),
            Some("[Unit]\n\n\n"),
            "the file exactly, trailing blank lines included"
        );
        assert_eq!(i.file("/etc/systemd/system/llmctl-proxy.service"), None);
        assert_eq!(i.installed, None, "no paths were given");
        let paths = InstallPaths::default();
        let x = Installed::from_sections(&paths, &s);
        assert_eq!(x.llmctl_sha256.as_deref(), Some("30a4816ca6e0aa"));
        assert_eq!(x.llama_stamp.as_deref(), Some("source=x\ncuda=13.2\n"));
        assert!(!x.llama_linked, "ldd exits 0 but a library is missing");
        assert!(!x.model_is_file);
        assert_eq!(x.model_size_mtime.as_deref(), Some("4096 1733500000"));
        assert_eq!(x.model_marker, None);
        assert_eq!(x.key_file, Some((0o600, 65)));
    }

    #[test]
    fn small_parsers() {
        assert_eq!(parse_mode_size("600 65\n"), Some((0o600, 65)));
        assert_eq!(parse_mode_size("644 0"), Some((0o644, 0)));
        assert_eq!(parse_mode_size("stat: cannot stat"), None);
        assert_eq!(
            parse_nvcc_release("Cuda compilation tools, release 12.9, V12.9.86\n").as_deref(),
            Some("12.9")
        );
        assert_eq!(parse_nvcc_release("nvcc fatal"), None);
        let probe = |text: &str| Probe {
            text: text.into(),
            rc: Some(0),
        };
        assert_eq!(exact_text(&probe("a\n\n<llmctl-eof>")), "a\n\n");
        assert_eq!(exact_text(&probe("no newline<llmctl-eof>")), "no newline");
        assert_eq!(exact_text(&probe("<llmctl-eof>")), "");
        assert_eq!(exact_text(&probe("old fixture")), "old fixture\n");
    }

    /// A container config is kept byte for byte (the devices step rewrites it from this text).
    #[test]
    fn container_configs_are_exact() {
        let s = parse_sections(&format!(
            "==> pveversion <==\npve-manager/9.0.3/025864202ebb6109 (running kernel: 6.14.8-2-pve)\n==> rc=0 <==\n==> ct-config 103 <==\n#notes\narch: amd64\n\n{EOF_MARK}\n==> rc=0 <==\n"
        ));
        let f = HostFacts::from_sections("root@pve", &s).unwrap();
        assert_eq!(f.config_texts[&103], "#notes\narch: amd64\n\n");
        assert_eq!(f.configs[&103].get("arch"), Some("amd64"));
    }

    /// The paths of the files the container steps judge are the ones CT_SCRIPT reads.
    #[test]
    fn ct_script_reads_the_paths_provision_manages() {
        for path in [
            crate::provision::units::LLAMA_SERVER_UNIT_PATH,
            crate::provision::units::PROXY_UNIT_PATH,
            crate::provision::units::LLMCTL_BIN,
            &crate::provision::host::repo_list_path("debian12"),
            &crate::provision::host::repo_list_path("debian13"),
        ] {
            assert!(CT_SCRIPT.contains(path), "{path}");
        }
        assert!(CT_SCRIPT.contains(EOF_MARK) && HOST_SCRIPT.contains(EOF_MARK));
    }

    /// CT_SCRIPT under a real `sh`, given paths as a container round gives them: what it finds there.
    #[test]
    fn ct_script_reads_the_install_paths_under_a_real_shell() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        std::fs::create_dir_all(format!("{d}/llama/build/bin")).unwrap();
        std::fs::write(format!("{d}/llama/.llmctl-build"), "source=x\n\n").unwrap();
        std::fs::write(format!("{d}/model.gguf"), "GGUF").unwrap();
        std::fs::write(
            format!("{d}/model.gguf.llmctl-verified"),
            "sha256=ab size_mtime=4 1",
        )
        .unwrap();
        std::fs::write(format!("{d}/key"), "k\n").unwrap();
        std::fs::set_permissions(format!("{d}/key"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let paths = InstallPaths {
            llama_dir: format!("{d}/llama"),
            model_dest: format!("{d}/model.gguf"),
            key_file: format!("{d}/key"),
        };
        let out = std::process::Command::new("sh")
            .args(["-c", CT_SCRIPT, "llmctl-ct"])
            .args([&paths.llama_dir, &paths.model_dest, &paths.key_file])
            .output()
            .expect("sh runs");
        let s = parse_sections(&String::from_utf8_lossy(&out.stdout));
        let i = Installed::from_sections(&paths, &s);
        assert_eq!(i.llama_stamp.as_deref(), Some("source=x\n\n"));
        assert!(!i.llama_linked, "no llama-server there");
        assert!(i.model_is_file);
        assert!(i.model_size_mtime.as_deref().unwrap().starts_with("4 "));
        assert_eq!(i.model_marker.as_deref(), Some("sha256=ab size_mtime=4 1"));
        assert_eq!(i.key_file, Some((0o600, 2)));
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
