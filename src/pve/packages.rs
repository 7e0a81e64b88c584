//! Debian package state: `dpkg-query -W` listings, `apt-mark showhold`, and Debian version strings.

use serde::Serialize;

/// The `dpkg-query` format every caller uses: name, version, and the status abbreviation (`ii `, `hi `, `rc `).
pub const DPKG_QUERY_FORMAT: &str = "${Package}\\t${Version}\\t${db:Status-Abbrev}\\n";

/// One package known to dpkg.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Package {
    pub name: String,
    /// Empty when dpkg knows the name but it is not installed.
    pub version: String,
    /// `ii`, `hi`, `rc`, `un`, ... when the listing has a status column.
    pub status: Option<String>,
}

impl Package {
    pub fn installed(&self) -> bool {
        match &self.status {
            // Second letter is the current state: i = installed.
            Some(s) => s.as_bytes().get(1) == Some(&b'i'),
            None => !self.version.is_empty(),
        }
    }

    /// Held through dpkg's selection state (`hi`): the same thing `apt-mark hold` sets.
    pub fn held(&self) -> bool {
        self.status.as_deref().is_some_and(|s| s.starts_with('h'))
    }

    /// The upstream part of the version: `595.71.05` of `595.71.05-1`.
    pub fn upstream_version(&self) -> &str {
        upstream_version(&self.version)
    }
}

/// Parses `dpkg-query -W` output in the default (`name<TAB>version`) or [`DPKG_QUERY_FORMAT`] form. Lines
/// that are not listings (`dpkg-query: no packages found matching x`) are skipped. A package name may carry an
/// architecture qualifier (`libcuda1:amd64`), which is dropped.
pub fn parse_dpkg_query(text: &str) -> Vec<Package> {
    text.lines()
        .filter_map(|line| {
            let mut cols = line.split('\t');
            let name = cols.next()?.trim();
            let version = cols.next()?.trim();
            if name.is_empty() || name.contains(' ') {
                return None;
            }
            let status = cols
                .next()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty());
            let name = name.split(':').next().unwrap_or(name);
            Some(Package {
                name: name.to_string(),
                version: version.to_string(),
                status,
            })
        })
        .collect()
}

/// `apt-mark showhold`: one package per line (an arch qualifier is dropped).
pub fn parse_showhold(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains(' '))
        .map(|l| l.split(':').next().unwrap_or(l).to_string())
        .collect()
}

/// Strips the epoch (`1:`) and the Debian revision (`-1`, `-2`...) from a Debian version.
pub fn upstream_version(version: &str) -> &str {
    let v = version.split_once(':').map_or(version, |(_, rest)| rest);
    v.rsplit_once('-').map_or(v, |(up, _)| up)
}

/// The Debian revision NVIDIA's CUDA repository uses. Debian's own archive has `-2`, `-4`, ..., which never equal
/// it, so a container library at `<module version>-1` is the proof it came from the matching NVIDIA package.
pub const NVIDIA_REPO_REVISION: &str = "-1";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_default_and_status_formats() {
        let pkgs = parse_dpkg_query(
            "libnvidia-ml1:amd64\t595.71.05-1\nnvidia-driver-cuda\t\ndpkg-query: no packages found matching libcuda1\n",
        );
        assert_eq!(pkgs.len(), 2);
        assert_eq!(pkgs[0].name, "libnvidia-ml1");
        assert!(pkgs[0].installed());
        assert_eq!(pkgs[0].upstream_version(), "595.71.05");
        assert!(!pkgs[1].installed());

        let pkgs = parse_dpkg_query(
            "libcuda1\t595.71.05-1\thi \nnvidia-kernel-open-dkms\t595.71.05-1\tii \nold-pkg\t1.0-1\trc \n",
        );
        assert!(pkgs[0].held() && pkgs[0].installed());
        assert!(!pkgs[1].held() && pkgs[1].installed());
        assert!(!pkgs[2].installed());
    }

    #[test]
    fn versions() {
        assert_eq!(upstream_version("595.71.05-1"), "595.71.05");
        assert_eq!(upstream_version("1:550.163.01-2"), "550.163.01");
        assert_eq!(upstream_version("460.107"), "460.107");
    }

    #[test]
    fn showhold() {
        assert_eq!(
            parse_showhold("libcuda1\nnvidia-driver-cuda:amd64\n\n"),
            vec!["libcuda1", "nvidia-driver-cuda"]
        );
    }
}
