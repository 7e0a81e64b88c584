//! The LXC container config `/etc/pve/lxc/<vmid>.conf`, read with Proxmox's own line grammar
//! (`parse_pct_config` in pve-container):
//!
//! * blank lines are ignored;
//! * `[pve:pending]` starts the pending section, `[<name>]` a snapshot: everything after the first header is
//!   NOT live config;
//! * `#` lines are the description (the GUI "Notes");
//! * `lxc.<key>: value` or `lxc.<key> = value` are raw LXC keys, kept in order, duplicates allowed;
//! * `key: value` is a Proxmox option (`dev0`, `net0`, `lock`, ...).
//!
//! `devN` values follow `dev[n]: [[path=]<Path>] [,deny-write=<1|0>] [,gid=<int>] [,mode=<octal>] [,uid=<int>]`.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;

/// Proxmox's limit: `dev0` .. `dev255`.
pub const MAX_DEVICES: u32 = 256;

/// One section of the file: the live config, the pending changes, or a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Section {
    /// Description lines without the leading `#`.
    pub description: Vec<String>,
    /// Proxmox options in file order.
    pub options: Vec<(String, String)>,
    /// Raw `lxc.*` keys in file order (duplicates allowed).
    pub raw: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LxcConfig {
    pub live: Section,
    pub pending: Option<Section>,
    /// Snapshot sections by name, in file order.
    pub snapshots: Vec<(String, Section)>,
    /// Lines that fit no rule (Proxmox would refuse them): `(line number, text)`.
    pub unparsed: Vec<(usize, String)>,
}

static SNAPSHOT_HEADER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\[([a-z][a-z0-9_\-]+)\]\s*$").expect("static regex"));
static RAW_KEY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(lxc\.[a-z0-9_\-.]+)(?:\s*:\s*|\s*=\s*)(.*?)\s*$").expect("static regex")
});
static PVE_KEY: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^([a-z][a-z_]*\d*):\s*(.*?)\s*$").expect("static regex"));

impl LxcConfig {
    pub fn parse(text: &str) -> LxcConfig {
        let mut cfg = LxcConfig::default();
        // Which section lines go to: None = live, Some(None) = pending, Some(Some(i)) = snapshot i.
        let mut target: Option<Option<usize>> = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.trim().is_empty() {
                continue;
            }
            if line.trim() == "[pve:pending]" {
                cfg.pending.get_or_insert_with(Section::default);
                target = Some(None);
                continue;
            }
            if let Some(c) = SNAPSHOT_HEADER.captures(line) {
                cfg.snapshots.push((c[1].to_string(), Section::default()));
                target = Some(Some(cfg.snapshots.len() - 1));
                continue;
            }
            let section = match target {
                None => &mut cfg.live,
                Some(None) => cfg.pending.get_or_insert_with(Section::default),
                Some(Some(i)) => &mut cfg.snapshots[i].1,
            };
            if let Some(rest) = line.strip_prefix('#') {
                section.description.push(rest.to_string());
            } else if let Some(c) = RAW_KEY.captures(line) {
                section.raw.push((c[1].to_string(), c[2].to_string()));
            } else if let Some(c) = PVE_KEY.captures(line) {
                section.options.push((c[1].to_string(), c[2].to_string()));
            } else {
                cfg.unparsed.push((n + 1, line.to_string()));
            }
        }
        cfg
    }

    /// The live value of a Proxmox option.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.live.get(key)
    }

    /// The config-level lock (`backup`, `snapshot`, ...), which makes `pct set` refuse.
    pub fn lock(&self) -> Option<&str> {
        self.get("lock")
    }

    pub fn unprivileged(&self) -> bool {
        self.get("unprivileged").is_some_and(|v| v.trim() == "1")
    }

    /// Live devN entries, by index.
    pub fn devices(&self) -> Vec<(u32, DevSpec)> {
        self.live.devices()
    }

    /// The live `devN` entries and those waiting in `[pve:pending]` (a devN added to a running container on PVE 8
    /// applies at its next start): both are configured, neither may be added again.
    pub fn devices_with_pending(&self) -> Vec<(u32, DevSpec)> {
        let mut all = self.live.devices();
        all.extend(self.pending.iter().flat_map(Section::devices));
        all
    }

    /// The lowest `devN` index not used in the live config or the pending section (as Proxmox assigns them).
    pub fn lowest_free_dev_index(&self) -> Option<u32> {
        self.free_dev_indices().next()
    }

    /// Free `devN` indices, lowest first.
    pub fn free_dev_indices(&self) -> impl Iterator<Item = u32> + '_ {
        let used: Vec<u32> = self
            .live
            .devices()
            .into_iter()
            .chain(self.pending.iter().flat_map(Section::devices))
            .map(|(i, _)| i)
            .collect();
        (0..MAX_DEVICES).filter(move |i| !used.contains(i))
    }

    /// Snapshot sections that hold a `devN` for `path` (what people hit after `echo devN >> conf` on a CT
    /// that has snapshots).
    pub fn snapshots_with_device(&self, path: &str) -> Vec<&str> {
        self.snapshots
            .iter()
            .filter(|(_, s)| s.devices().iter().any(|(_, d)| d.path == path))
            .map(|(name, _)| name.as_str())
            .collect()
    }
}

impl Section {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `devN` entries of this section that parse, by index (unparseable ones are skipped here and reported by
    /// [`Section::device_errors`]).
    pub fn devices(&self) -> Vec<(u32, DevSpec)> {
        self.options
            .iter()
            .filter_map(|(k, v)| Some((dev_index(k)?, DevSpec::parse(v).ok()?)))
            .collect()
    }

    pub fn device_errors(&self) -> Vec<String> {
        self.options
            .iter()
            .filter(|(k, _)| dev_index(k).is_some())
            .filter_map(|(k, v)| DevSpec::parse(v).err().map(|e| format!("{k}: {v}: {e}")))
            .collect()
    }

    /// Raw values of a raw LXC key, in order.
    pub fn raw_values<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.raw
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `lxc.cgroup2.devices.allow` (and the cgroup v1 `lxc.cgroup.devices.allow`) rules.
    pub fn cgroup_allows(&self) -> Vec<CgroupRule> {
        self.raw
            .iter()
            .filter(|(k, _)| k == "lxc.cgroup2.devices.allow" || k == "lxc.cgroup.devices.allow")
            .filter_map(|(_, v)| CgroupRule::parse(v))
            .collect()
    }

    /// Source paths of `lxc.mount.entry` lines (the legacy bind-mount passthrough).
    pub fn mount_entry_sources(&self) -> Vec<&str> {
        self.raw_values("lxc.mount.entry")
            .filter_map(|v| v.split_whitespace().next())
            .collect()
    }
}

fn dev_index(key: &str) -> Option<u32> {
    let n: u32 = key.strip_prefix("dev")?.parse().ok()?;
    (n < MAX_DEVICES).then_some(n)
}

/// One `devN` value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DevSpec {
    pub path: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Octal, as written (`0660`).
    pub mode: Option<String>,
    pub deny_write: Option<bool>,
}

impl DevSpec {
    pub fn new(path: &str) -> DevSpec {
        DevSpec {
            path: path.to_string(),
            uid: None,
            gid: None,
            mode: None,
            deny_write: None,
        }
    }

    /// Parses a devN value with Proxmox's rules: `path` is the default key; the path must start with `/dev/`
    /// and contain no `/./` or `/../`; mode is `0[0-7]{3}`.
    pub fn parse(value: &str) -> Result<DevSpec, String> {
        let mut spec = DevSpec::new("");
        let mut have_path = false;
        for (i, part) in value.split(',').map(str::trim).enumerate() {
            let (key, val) = match part.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None if i == 0 => ("path", part),
                None => return Err(format!("`{part}` is not a key=value option")),
            };
            match key {
                "path" => {
                    spec.path = val.to_string();
                    have_path = true;
                }
                "uid" => {
                    spec.uid = Some(
                        val.parse()
                            .map_err(|_| format!("uid `{val}` is not an integer"))?,
                    )
                }
                "gid" => {
                    spec.gid = Some(
                        val.parse()
                            .map_err(|_| format!("gid `{val}` is not an integer"))?,
                    )
                }
                "mode" => {
                    let ok = val.len() == 4
                        && val.starts_with('0')
                        && val[1..].bytes().all(|b| (b'0'..=b'7').contains(&b));
                    if !ok {
                        return Err(format!("mode `{val}` is not an octal mode like 0660"));
                    }
                    spec.mode = Some(val.to_string());
                }
                "deny-write" => {
                    spec.deny_write = Some(match val {
                        "1" => true,
                        "0" => false,
                        _ => return Err(format!("deny-write `{val}` must be 0 or 1")),
                    })
                }
                other => return Err(format!("unknown devN option `{other}`")),
            }
        }
        if !have_path
            || !spec.path.starts_with("/dev/")
            || spec.path.contains("/./")
            || spec.path.contains("/../")
        {
            return Err(format!("`{}` is not a valid device path", spec.path));
        }
        Ok(spec)
    }

    /// The value as `pct set --devN` takes it and Proxmox writes it.
    pub fn render(&self) -> String {
        let mut out = self.path.clone();
        if let Some(d) = self.deny_write {
            out.push_str(&format!(",deny-write={}", u8::from(d)));
        }
        if let Some(g) = self.gid {
            out.push_str(&format!(",gid={g}"));
        }
        if let Some(m) = &self.mode {
            out.push_str(&format!(",mode={m}"));
        }
        if let Some(u) = self.uid {
            out.push_str(&format!(",uid={u}"));
        }
        out
    }
}

/// `pct set <vmid> --devN <spec> ...` arguments that add `paths` at the lowest free indices.
pub fn pct_set_device_args(
    cfg: &LxcConfig,
    vmid: u32,
    paths: &[&str],
    gid: Option<u32>,
) -> Vec<String> {
    let mut argv = vec!["pct".to_string(), "set".to_string(), vmid.to_string()];
    for (index, path) in cfg.free_dev_indices().zip(paths) {
        let mut spec = DevSpec::new(path);
        spec.gid = gid;
        argv.push(format!("--dev{index}"));
        argv.push(spec.render());
    }
    argv
}

/// One `lxc.cgroup2.devices.allow` rule: `c 195:* rwm`, `a`, ...
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupRule {
    /// `c`, `b` or `a`.
    pub kind: char,
    /// None = `*`.
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: String,
    pub text: String,
}

impl CgroupRule {
    pub fn parse(value: &str) -> Option<CgroupRule> {
        let mut words = value.split_whitespace();
        let kind = words.next()?.chars().next()?;
        if kind == 'a' {
            return Some(CgroupRule {
                kind,
                major: None,
                minor: None,
                access: "rwm".into(),
                text: value.trim().into(),
            });
        }
        let (major, minor) = words.next()?.split_once(':')?;
        let num = |s: &str| {
            if s == "*" {
                Ok(None)
            } else {
                s.parse().map(Some)
            }
        };
        Some(CgroupRule {
            kind,
            major: num(major).ok()?,
            minor: num(minor).ok()?,
            access: words.next().unwrap_or("rwm").to_string(),
            text: value.trim().to_string(),
        })
    }

    /// Whether this rule lets the container open char device `major:minor`.
    pub fn allows_char(&self, major: u32, minor: u32) -> bool {
        self.kind == 'a'
            || (self.kind == 'c'
                && self.major.is_none_or(|m| m == major)
                && self.minor.is_none_or(|m| m == minor))
    }
}

/// All container configs in a directory listing, keyed by vmid (for picking the GPU container).
pub type Configs = BTreeMap<u32, LxcConfig>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pve::fixture;

    const GUIDE_103: &str = "arch: amd64\ncores: 12\nfeatures: nesting=1\nhostname: llm-server\nmemory: 40000\nnet0: name=eth0,bridge=vmbr0,hwaddr=BC:24:11:F0:15:BA,type=veth\nostype: debian\nrootfs: local-lvm:vm-103-disk-0,size=120G\nswap: 0\ndev0: /dev/nvidia0,uid=0,gid=0\ndev1: /dev/nvidiactl,uid=0,gid=0\ndev2: /dev/nvidia-uvm,uid=0,gid=0\ndev3: /dev/nvidia-uvm-tools,uid=0,gid=0\n";

    #[test]
    fn guide_config() {
        let cfg = LxcConfig::parse(GUIDE_103);
        assert_eq!(cfg.get("hostname"), Some("llm-server"));
        let devs = cfg.devices();
        assert_eq!(devs.len(), 4);
        assert_eq!(devs[2].0, 2);
        assert_eq!(devs[2].1.path, "/dev/nvidia-uvm");
        assert_eq!(devs[2].1.gid, Some(0));
        assert_eq!(cfg.lowest_free_dev_index(), Some(4));
        assert!(cfg.unparsed.is_empty());
        assert!(!cfg.unprivileged());
    }

    #[test]
    fn fixture_examples_b() {
        let text = fixture("pct-config.devN.examples.txt");
        let b: String = text
            .lines()
            .skip_while(|l| !l.starts_with("# (b)"))
            .skip(1)
            .take_while(|l| !l.starts_with("# (c)"))
            .map(|l| format!("{l}\n"))
            .collect();
        let cfg = LxcConfig::parse(&b);
        assert_eq!(cfg.devices().len(), 7);
        assert!(cfg.devices().iter().all(|(_, d)| d.gid == Some(985)));
        assert_eq!(cfg.get("unprivileged"), Some("0"));
        assert_eq!(cfg.get("startup"), Some("order=2,up=15"));
        assert_eq!(
            cfg.live.raw,
            vec![
                ("lxc.apparmor.profile".to_string(), "unconfined".to_string()),
                ("lxc.cap.drop".to_string(), String::new()),
            ]
        );
    }

    #[test]
    fn sections_description_and_raw_keys() {
        let text = "#GPU box%3A llama.cpp\n#second line\narch: amd64\nlock: backup\nunprivileged: 1\ndev0: path=/dev/nvidia0,gid=44,mode=0666\nlxc.cgroup2.devices.allow: c 195:* rwm\nlxc.cgroup2.devices.allow = c 508:* rwm\nlxc.mount.entry: /dev/nvidia-uvm dev/nvidia-uvm none bind,optional,create=file\n\n[pve:pending]\ndev1: /dev/nvidiactl\n\n[pre-gpu]\n#old notes\ndev2: /dev/nvidia-uvm\ndev3: /dev/nvidia-uvm-tools\nsnaptime: 1700000000\n";
        let cfg = LxcConfig::parse(text);
        assert_eq!(
            cfg.live.description,
            vec!["GPU box%3A llama.cpp", "second line"]
        );
        assert_eq!(cfg.lock(), Some("backup"));
        assert!(cfg.unprivileged());
        assert_eq!(cfg.devices().len(), 1);
        assert_eq!(cfg.devices()[0].1.mode.as_deref(), Some("0666"));
        let allows = cfg.live.cgroup_allows();
        assert_eq!(
            allows.iter().map(|r| r.major).collect::<Vec<_>>(),
            vec![Some(195), Some(508)]
        );
        assert!(allows[1].allows_char(508, 0) && !allows[1].allows_char(511, 0));
        assert_eq!(cfg.live.mount_entry_sources(), vec!["/dev/nvidia-uvm"]);
        assert_eq!(
            cfg.pending.as_ref().unwrap().devices()[0].1.path,
            "/dev/nvidiactl"
        );
        assert_eq!(cfg.snapshots.len(), 1);
        assert_eq!(cfg.snapshots[0].0, "pre-gpu");
        assert_eq!(cfg.snapshots[0].1.description, vec!["old notes"]);
        assert_eq!(
            cfg.snapshots_with_device("/dev/nvidia-uvm"),
            vec!["pre-gpu"]
        );
        assert!(cfg.snapshots_with_device("/dev/nvidia0").is_empty());
        // dev0 live and dev1 pending are taken; dev2/dev3 only exist in a snapshot, so they are free.
        assert_eq!(
            cfg.free_dev_indices().take(2).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(cfg.unparsed.is_empty());
    }

    #[test]
    fn lines_after_a_snapshot_are_not_live() {
        // `echo dev0: ... >> conf` on a CT with a snapshot lands in the snapshot.
        let cfg = LxcConfig::parse("arch: amd64\n[snap1]\narch: amd64\ndev0: /dev/nvidia0\n");
        assert!(cfg.devices().is_empty());
        assert_eq!(cfg.snapshots_with_device("/dev/nvidia0"), vec!["snap1"]);
    }

    #[test]
    fn devspec_parse_and_render() {
        let d = DevSpec::parse("/dev/nvidia0,uid=0,gid=0").unwrap();
        assert_eq!(d.render(), "/dev/nvidia0,gid=0,uid=0");
        let d = DevSpec::parse("path=/dev/nvidia-uvm,deny-write=1,mode=0660").unwrap();
        assert_eq!(d.deny_write, Some(true));
        assert_eq!(d.render(), "/dev/nvidia-uvm,deny-write=1,mode=0660");
        assert!(
            DevSpec::parse("/etc/passwd")
                .unwrap_err()
                .contains("not a valid device path")
        );
        assert!(DevSpec::parse("/dev/../etc/x").is_err());
        assert!(
            DevSpec::parse("/dev/nvidia0,mode=666")
                .unwrap_err()
                .contains("octal")
        );
        assert!(
            DevSpec::parse("/dev/nvidia0,gid=video")
                .unwrap_err()
                .contains("gid")
        );
        assert!(
            DevSpec::parse("/dev/nvidia0,colour=red")
                .unwrap_err()
                .contains("colour")
        );
        let cfg = LxcConfig::parse("dev0: /dev/nvidia0,gid=video\n");
        assert!(cfg.devices().is_empty());
        assert_eq!(cfg.live.device_errors().len(), 1);
    }

    #[test]
    fn pct_set_args_use_lowest_free_indices() {
        let cfg = LxcConfig::parse("dev0: /dev/dri/card0\ndev2: /dev/dri/renderD128\n");
        assert_eq!(
            pct_set_device_args(
                &cfg,
                103,
                &["/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm"],
                Some(44)
            ),
            vec![
                "pct",
                "set",
                "103",
                "--dev1",
                "/dev/nvidia0,gid=44",
                "--dev3",
                "/dev/nvidiactl,gid=44",
                "--dev4",
                "/dev/nvidia-uvm,gid=44"
            ]
        );
    }

    #[test]
    fn cgroup_rules() {
        assert_eq!(CgroupRule::parse("c 195:* rwm").unwrap().major, Some(195));
        assert!(CgroupRule::parse("a").unwrap().allows_char(1, 2));
        assert!(
            CgroupRule::parse("c 195:255 rw")
                .unwrap()
                .allows_char(195, 255)
        );
        assert!(
            !CgroupRule::parse("c 195:255 rw")
                .unwrap()
                .allows_char(195, 0)
        );
        assert_eq!(CgroupRule::parse("c x:* rwm"), None);
    }

    #[test]
    fn unparseable_lines_are_reported() {
        let cfg = LxcConfig::parse("arch: amd64\nthis is not a key\n");
        assert_eq!(cfg.unparsed, vec![(2, "this is not a key".to_string())]);
    }
}
