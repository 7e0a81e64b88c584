//! Host basics: `pveversion`, `/etc/os-release`, `uname -r`, `lsmod`, `ls -l /dev/nvidia*`, `/proc/devices`,
//! `lsattr`.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;

/// `pveversion`'s first line: `pve-manager/9.0.3/025864202ebb6109 (running kernel: 6.14.8-2-pve)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PveVersion {
    /// `9.0.3`
    pub version: String,
    pub major: u32,
    /// Present in the command's output, absent in the API field.
    pub running_kernel: Option<String>,
}

static PVEVERSION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"pve-manager/(\d+)((?:\.\d+)*)(?:/[0-9a-f]+)?(?:\s+\(running kernel:\s*([^)\s]+)\))?",
    )
    .expect("static regex")
});

pub fn parse_pveversion(text: &str) -> Option<PveVersion> {
    let c = PVEVERSION.captures(text)?;
    Some(PveVersion {
        version: format!("{}{}", &c[1], &c[2]),
        major: c[1].parse().ok()?,
        running_kernel: c.get(3).map(|m| m.as_str().to_string()),
    })
}

/// `/etc/os-release` as key → unquoted value.
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|s| s.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
                .unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

static PVE_KERNEL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\d+\.\d+\.\d+-\d+-pve$").expect("static regex"));

/// Whether `uname -r` is a Proxmox kernel (`6.8.12-4-pve`).
pub fn is_pve_kernel(release: &str) -> bool {
    PVE_KERNEL.is_match(release.trim())
}

/// The header package for a kernel: `proxmox-headers-K` on PVE 8+, `pve-headers-K` before.
pub fn headers_package(kernel: &str, pve_major: Option<u32>) -> String {
    match pve_major {
        Some(m) if m < 8 => format!("pve-headers-{kernel}"),
        _ => format!("proxmox-headers-{kernel}"),
    }
}

/// Module names from `lsmod` (header skipped).
pub fn parse_lsmod(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.starts_with("Module "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// A device node from `ls -l`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DevNode {
    pub path: String,
    /// `c`, `b`, `d`, `-`, `l`...
    pub kind: char,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub line: String,
}

static LS_DEV: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^([cbdl-])[rwxsStT-]{9}[.+@]?\s+\d+\s+\S+\s+\S+\s+(?:(\d+),\s*(\d+)|\d+)\s.*?\s(/\S+)\s*$")
        .expect("static regex")
});

/// Parses `ls -l` / `ls -ld` lines; other lines (prompts, errors) are skipped.
pub fn parse_ls_dev(text: &str) -> Vec<DevNode> {
    text.lines()
        .filter_map(|l| {
            let c = LS_DEV.captures(l)?;
            Some(DevNode {
                kind: c[1].chars().next()?,
                major: c.get(2).and_then(|m| m.as_str().parse().ok()),
                minor: c.get(3).and_then(|m| m.as_str().parse().ok()),
                path: c[4].to_string(),
                line: l.trim_end().to_string(),
            })
        })
        .collect()
}

/// Character-device majors from `/proc/devices` (the `Character devices:` block) as name → major.
pub fn parse_proc_devices(text: &str) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    let mut in_char = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("Character devices") {
            in_char = true;
        } else if line.starts_with("Block devices") {
            in_char = false;
        } else if in_char
            && let Some((major, name)) = line.split_once(char::is_whitespace)
            && let Ok(major) = major.parse()
        {
            out.insert(name.trim().to_string(), major);
        }
    }
    out
}

/// `lsattr FILE` → (flags, path). The immutable flag is `i` in the flags column (`----i---------e-------`).
pub fn parse_lsattr(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (flags, path) = l.trim().split_once(char::is_whitespace)?;
            // A flags column always has dashes; this keeps `chattr -i path` or error lines from reading as one.
            let is_flags =
                flags.contains('-') && flags.bytes().all(|b| b == b'-' || b.is_ascii_alphabetic());
            is_flags.then(|| (flags.to_string(), path.trim().to_string()))
        })
        .collect()
}

pub fn is_immutable(flags: &str) -> bool {
    flags.contains('i')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pve::{fixture, fixture_body};

    #[test]
    fn pveversion_fixture() {
        let lines: Vec<String> = fixture("pveversion.txt")
            .lines()
            .filter(|l| l.contains("pve-manager/") && !l.starts_with('#'))
            .map(String::from)
            .collect();
        let v8 = parse_pveversion(&lines[0]).unwrap();
        assert_eq!(
            v8,
            PveVersion {
                version: "8.4.10".into(),
                major: 8,
                running_kernel: Some("6.8.12-13-pve".into())
            }
        );
        let v9 = parse_pveversion(&lines[1]).unwrap();
        assert_eq!(v9.major, 9);
        assert_eq!(v9.running_kernel.as_deref(), Some("6.14.8-2-pve"));
        let api = parse_pveversion("pve-manager/9.0.3").unwrap();
        assert_eq!((api.version.as_str(), api.running_kernel), ("9.0.3", None));
        assert_eq!(
            parse_pveversion("bash: pveversion: command not found"),
            None
        );
    }

    #[test]
    fn os_release_fixture() {
        let m = parse_os_release(&fixture_body(&fixture("os-release.pve9-trixie.txt")));
        assert_eq!(m["VERSION_CODENAME"], "trixie");
        assert_eq!(m["VERSION_ID"], "13");
        assert_eq!(m["PRETTY_NAME"], "Debian GNU/Linux 13 (trixie)");
    }

    #[test]
    fn kernels_fixture() {
        for line in fixture("uname-r.pve.txt")
            .lines()
            .filter(|l| !l.starts_with('#'))
        {
            let k = line.split_whitespace().next().unwrap();
            assert!(is_pve_kernel(k), "{k}");
        }
        assert!(!is_pve_kernel("6.1.0-18-amd64"));
        assert_eq!(
            headers_package("6.8.12-4-pve", Some(8)),
            "proxmox-headers-6.8.12-4-pve"
        );
        assert_eq!(
            headers_package("5.15.35-1-pve", Some(7)),
            "pve-headers-5.15.35-1-pve"
        );
    }

    #[test]
    fn lsmod() {
        let mods = parse_lsmod(
            "Module                  Size  Used by\nnvidia_uvm           1437696  0\nnvidia              60579840  1 nvidia_uvm\nnouveau  2 0\n",
        );
        assert_eq!(mods, vec!["nvidia_uvm", "nvidia", "nouveau"]);
    }

    #[test]
    fn ls_dev_fixture() {
        let nodes = parse_ls_dev(&fixture("ls-dev-nvidia.host.txt"));
        assert_eq!(nodes.len(), 5);
        assert_eq!(
            (nodes[0].path.as_str(), nodes[0].major, nodes[0].minor),
            ("/dev/nvidia0", Some(195), Some(0))
        );
        assert_eq!((nodes[1].major, nodes[1].minor), (Some(195), Some(255)));
        assert_eq!(
            (nodes[3].path.as_str(), nodes[3].major),
            ("/dev/nvidia-uvm", Some(511))
        );
        assert_eq!(nodes[4].minor, Some(1));
        assert!(nodes.iter().all(|n| n.kind == 'c'));
        let dir = parse_ls_dev("drwxr-xr-x 2 root root 80 Feb 13 21:15 /dev/nvidia-caps\n");
        assert_eq!((dir[0].kind, dir[0].major), ('d', None));
    }

    #[test]
    fn proc_devices() {
        let m = parse_proc_devices(
            "Character devices:\n  1 mem\n195 nvidia-frontend\n511 nvidia-uvm\n\nBlock devices:\n  8 sd\n",
        );
        assert_eq!(m.get("nvidia-uvm"), Some(&511));
        assert_eq!(m.get("nvidia-frontend"), Some(&195));
        assert_eq!(m.get("sd"), None);
    }

    #[test]
    fn lsattr_fixture() {
        let rows = parse_lsattr(&fixture_body(&fixture("lsattr.resolv-immutable.txt")));
        assert_eq!(
            rows[0],
            (
                "----i---------e-------".to_string(),
                "/mnt/tmp-lxc/etc/resolv.conf".to_string()
            )
        );
        assert!(is_immutable(&rows[0].0));
        assert!(!is_immutable("--------------e-------"));
        assert!(
            parse_lsattr("lsattr: No such file or directory while trying to stat x").is_empty()
        );
    }
}
