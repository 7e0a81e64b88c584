//! `dkms status` (the dkms >= 2.8 `module/version, kernel, arch: state` format and the old
//! `module, version, kernel, arch: state` one) and the texts of a failed DKMS build.

use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DkmsState {
    /// Source registered, never built.
    Added,
    /// Built but not installed into `/lib/modules/<kernel>`.
    Built,
    Installed,
    Other(String),
}

/// One `dkms status` line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DkmsEntry {
    pub module: String,
    pub version: String,
    /// Absent for `added` lines, which are not tied to a kernel.
    pub kernel: Option<String>,
    /// `x86_64` or `amd64`: both are seen for the same machine.
    pub arch: Option<String>,
    pub state: DkmsState,
    /// The parenthesised note, e.g. `WARNING! Diff between built and installed module!`.
    pub note: Option<String>,
    pub line: String,
}

impl DkmsEntry {
    pub fn is_nvidia(&self) -> bool {
        self.module == "nvidia"
            || self.module.starts_with("nvidia-")
            || self.module == "nvidia_open"
    }
}

static STATE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?P<head>.+?):\s*(?P<state>[A-Za-z-]+)(?:\s*\((?P<note>.*)\)?)?\s*$")
        .expect("static regex")
});

/// Parses every line of `dkms status`; lines that are not status lines (warnings, blank lines) are skipped.
pub fn parse_status(text: &str) -> Vec<DkmsEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<DkmsEntry> {
    let line = line.trim_end();
    let caps = STATE.captures(line)?;
    let head: Vec<&str> = caps["head"].split(',').map(str::trim).collect();
    let (module, version, rest) = match head.first()?.split_once('/') {
        // New format: module/version, kernel, arch
        Some((m, v)) => (m.to_string(), v.to_string(), &head[1..]),
        // Old format: module, version, kernel, arch
        None if head.len() >= 2 => (head[0].to_string(), head[1].to_string(), &head[2..]),
        None => return None,
    };
    if module.is_empty() || module.contains(' ') || version.is_empty() {
        return None;
    }
    let state = match caps["state"].to_ascii_lowercase().as_str() {
        "added" => DkmsState::Added,
        "built" => DkmsState::Built,
        "installed" => DkmsState::Installed,
        other => DkmsState::Other(other.to_string()),
    };
    Some(DkmsEntry {
        module,
        version,
        kernel: rest.first().map(|s| s.to_string()),
        arch: rest.get(1).map(|s| s.to_string()),
        state,
        note: caps
            .name("note")
            .map(|m| m.as_str().trim_end_matches(')').to_string()),
        line: line.to_string(),
    })
}

/// What a failed `dkms build` / `dkms autoinstall` said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum BuildProblem {
    /// `Error! Bad return status for module build on kernel: K (arch)` + the make.log path.
    BuildFailed {
        kernel: String,
        make_log: Option<String>,
    },
    /// `Error! Your kernel headers for kernel K cannot be found...` (dkms suggests `linux-headers-K`, which does
    /// not exist on Proxmox: the package is `proxmox-headers-K`).
    HeadersMissing { kernel: String },
}

static BAD_STATUS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"Bad return status for module build on kernel: (\S+)").expect("static regex")
});
static MAKE_LOG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"Consult (\S+make\.log)").expect("static regex"));
static HEADERS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?:kernel headers for kernel (\S+?)\.? cannot be found|Module build for kernel (\S+) was skipped since the)")
        .expect("static regex")
});

/// Finds build failures and missing-headers errors in dkms or apt output, in order.
pub fn parse_build_problems(text: &str) -> Vec<BuildProblem> {
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(c) = BAD_STATUS.captures(line) {
            out.push(BuildProblem::BuildFailed {
                kernel: c[1].to_string(),
                make_log: None,
            });
        } else if let Some(c) = MAKE_LOG.captures(line) {
            if let Some(BuildProblem::BuildFailed { make_log, .. }) = out.last_mut() {
                *make_log = Some(c[1].to_string());
            }
        } else if let Some(c) = HEADERS.captures(line) {
            let kernel = c
                .get(1)
                .or(c.get(2))
                .map(|m| m.as_str().to_string())
                .unwrap_or_default();
            let kernel = kernel.trim_end_matches('.').to_string();
            if !out.contains(&BuildProblem::HeadersMissing {
                kernel: kernel.clone(),
            }) {
                out.push(BuildProblem::HeadersMissing { kernel });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pve::{fixture, fixture_body};

    #[test]
    fn all_fixture_formats() {
        let entries = parse_status(&fixture_body(&fixture("dkms-status.formats.txt")));
        let lines: Vec<_> = entries
            .iter()
            .map(|e| {
                (
                    e.module.as_str(),
                    e.version.as_str(),
                    e.kernel.as_deref(),
                    e.arch.as_deref(),
                    &e.state,
                    e.note.as_deref(),
                )
            })
            .collect();
        let installed = DkmsState::Installed;
        let built = DkmsState::Built;
        assert_eq!(
            lines[0],
            (
                "nvidia",
                "535.86.05",
                Some("6.5.0-060500rc5-generic"),
                Some("x86_64"),
                &installed,
                None
            )
        );
        assert_eq!(
            lines[2],
            (
                "nvidia-current",
                "470.199.02",
                Some("5.10.0-26-amd64"),
                Some("x86_64"),
                &installed,
                None
            )
        );
        assert_eq!(
            lines[3],
            (
                "i915-sriov-dkms",
                "2025.03.26",
                Some("6.11.11-2-pve"),
                Some("x86_64"),
                &installed,
                Some("WARNING! Diff between built and installed module!")
            )
        );
        assert_eq!(
            lines[6],
            (
                "vendor-reset",
                "0.1.1",
                Some("6.8.12-11-pve"),
                Some("x86_64"),
                &built,
                None
            )
        );
        assert_eq!(lines[7].3, Some("amd64"));
        assert_eq!(lines[7].5, Some("Original modules exist"));
        assert_eq!(lines[8].4, &built);
        // The truncated line in the fixture still yields an entry with its (partial) note.
        assert_eq!(lines[5].4, &installed);
        assert!(entries[0].is_nvidia() && entries[2].is_nvidia() && !entries[1].is_nvidia());
        assert_eq!(entries.len(), 9);
    }

    #[test]
    fn added_has_no_kernel() {
        let e = parse_status("nvidia/595.71.05: added\n");
        assert_eq!(e[0].state, DkmsState::Added);
        assert_eq!(e[0].kernel, None);
        assert_eq!(e[0].version, "595.71.05");
        assert!(parse_status("Error! something\n\n").is_empty());
    }

    #[test]
    fn build_failure_fixture() {
        let problems = parse_build_problems(&fixture("dkms.build-failure.nvidia.txt"));
        assert_eq!(
            problems[0],
            BuildProblem::BuildFailed {
                kernel: "5.15.27-1-pve".into(),
                make_log: Some("/var/lib/dkms/nvidia/460.107/build/make.log".into())
            }
        );
        assert_eq!(
            problems[1],
            BuildProblem::BuildFailed {
                kernel: "6.2.16-3-pve".into(),
                make_log: Some("/var/lib/dkms/i915-sriov-dkms/6.2/build/make.log".into())
            }
        );
    }

    #[test]
    fn headers_missing_fixture() {
        let problems = parse_build_problems(&fixture("dkms.headers-missing.pve.txt"));
        assert_eq!(
            problems,
            vec![
                BuildProblem::HeadersMissing {
                    kernel: "6.8.12-4-pve".into()
                },
                BuildProblem::HeadersMissing {
                    kernel: "6.2.16-3-pve".into()
                },
                BuildProblem::HeadersMissing {
                    kernel: "5.15.35-1-pve".into()
                },
            ]
        );
    }
}
