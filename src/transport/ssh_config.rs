//! Resolving an SSH target (`user@host[:port]`, `[v6addr]:port`, or an `~/.ssh/config` alias) into the
//! address, user, port and identity files to use. Only the `~/.ssh/config` keys llmctl needs are read
//! (Host, HostName, User, Port, IdentityFile); like OpenSSH, the first value found for a key wins.

use std::path::{Path, PathBuf};

/// What the user typed after `--host`, split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
}

/// Parses `user@host`, `host:port`, `user@host:port`, `[::1]:2222`.
pub fn parse_target(target: &str) -> Result<TargetSpec, String> {
    let target = target.trim();
    if target.is_empty() {
        return Err(
            "the SSH target is empty: pass --host user@host[:port] or an ~/.ssh/config alias"
                .into(),
        );
    }
    let (user, rest) = match target.rsplit_once('@') {
        Some((u, r)) if !u.is_empty() => (Some(u.to_string()), r),
        Some(_) => return Err(format!("`{target}`: empty user name before `@`")),
        None => (None, target),
    };
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        let (addr, after) = inner
            .split_once(']')
            .ok_or_else(|| format!("`{target}`: missing `]` after an IPv6 address"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(parse_port(p, target)?),
            None if after.is_empty() => None,
            None => return Err(format!("`{target}`: unexpected text after `]`")),
        };
        (addr.to_string(), port)
    } else if rest.matches(':').count() == 1 {
        let (h, p) = rest.split_once(':').unwrap_or((rest, ""));
        (h.to_string(), Some(parse_port(p, target)?))
    } else {
        // Zero colons, or a bare IPv6 address without a port.
        (rest.to_string(), None)
    };
    if host.is_empty() {
        return Err(format!("`{target}`: no host name"));
    }
    Ok(TargetSpec { user, host, port })
}

fn parse_port(p: &str, target: &str) -> Result<u16, String> {
    p.parse::<u16>()
        .ok()
        .filter(|&n| n != 0)
        .ok_or_else(|| format!("`{target}`: `{p}` is not a port number (1-65535)"))
}

/// The settings one `Host` block (or several matching blocks) give a host alias.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSettings {
    pub hostname: Option<String>,
    pub user: Option<String>,
    pub port: Option<u16>,
    pub identity_files: Vec<String>,
}

/// A parsed `~/.ssh/config`: the `Host` blocks in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SshConfig {
    blocks: Vec<Block>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Block {
    /// `None` for lines before the first `Host` (they apply to every host) and for `Match` blocks (skipped).
    patterns: Option<Vec<String>>,
    skip: bool,
    entries: Vec<(String, String)>,
}

impl SshConfig {
    pub fn parse(text: &str) -> Result<SshConfig, String> {
        let mut blocks = vec![Block::default()];
        for (idx, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = split_key_value(line)
                .ok_or_else(|| format!("line {}: `{line}` has no value", idx + 1))?;
            let key = key.to_ascii_lowercase();
            match key.as_str() {
                "host" => blocks.push(Block {
                    patterns: Some(value.split_whitespace().map(str::to_string).collect()),
                    skip: false,
                    entries: Vec::new(),
                }),
                // `Match` conditions need runtime facts llmctl does not evaluate; their settings are ignored.
                "match" => blocks.push(Block {
                    patterns: None,
                    skip: true,
                    entries: Vec::new(),
                }),
                _ => {
                    let value = unquote(value);
                    if let Some(block) = blocks.last_mut() {
                        block.entries.push((key, value));
                    }
                }
            }
        }
        Ok(SshConfig { blocks })
    }

    /// The settings that apply to `alias`, first value winning as in OpenSSH.
    pub fn lookup(&self, alias: &str) -> Result<HostSettings, String> {
        let mut out = HostSettings::default();
        for block in &self.blocks {
            if block.skip {
                continue;
            }
            if let Some(patterns) = &block.patterns
                && !patterns_match(patterns, alias)
            {
                continue;
            }
            for (key, value) in &block.entries {
                match key.as_str() {
                    "hostname" if out.hostname.is_none() => out.hostname = Some(value.clone()),
                    "user" if out.user.is_none() => out.user = Some(value.clone()),
                    "port" if out.port.is_none() => {
                        out.port = Some(value.parse::<u16>().map_err(|_| {
                            format!(
                                "~/.ssh/config: Port `{value}` for `{alias}` is not a port number"
                            )
                        })?)
                    }
                    // IdentityFile accumulates, in order.
                    "identityfile" => out.identity_files.push(value.clone()),
                    _ => {}
                }
            }
        }
        Ok(out)
    }
}

fn split_key_value(line: &str) -> Option<(&str, &str)> {
    let idx = line.find(|c: char| c.is_whitespace() || c == '=')?;
    let key = &line[..idx];
    let rest = line[idx..].trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest).trim();
    (!rest.is_empty()).then_some((key, rest))
}

fn unquote(v: &str) -> String {
    v.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v)
        .to_string()
}

/// OpenSSH pattern list semantics: any positive match and no negated (`!pat`) match.
fn patterns_match(patterns: &[String], name: &str) -> bool {
    let mut matched = false;
    for pat in patterns.iter().flat_map(|p| p.split(',')) {
        if let Some(neg) = pat.strip_prefix('!') {
            if glob_match(neg, name) {
                return false;
            }
        } else if glob_match(pat, name) {
            matched = true;
        }
    }
    matched
}

/// `*` = any run of characters, `?` = one character (case-insensitive, as host names are).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.to_ascii_lowercase().chars().collect();
    let n: Vec<char> = name.to_ascii_lowercase().chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Expands `~` and the `%h`/`%r`/`%u`/`%%` tokens OpenSSH allows in IdentityFile.
pub fn expand_path(value: &str, home: &Path, host: &str, user: &str) -> PathBuf {
    let mut out = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '%' {
            match chars.next() {
                Some('h') => out.push_str(host),
                Some('r') | Some('u') => out.push_str(user),
                Some('d') => out.push_str(&home.to_string_lossy()),
                Some('%') => out.push('%'),
                Some(other) => {
                    out.push('%');
                    out.push(other);
                }
                None => out.push('%'),
            }
        } else {
            out.push(c);
        }
    }
    if out == "~" {
        return home.to_path_buf();
    }
    match out.strip_prefix("~/") {
        Some(rest) => home.join(rest),
        None => PathBuf::from(out),
    }
}

/// A target fully resolved: where to connect and as whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The name the user typed (alias), used in messages.
    pub alias: String,
    /// The name or address to connect to and to look up in known_hosts.
    pub hostname: String,
    pub user: String,
    pub port: u16,
    pub identity_files: Vec<PathBuf>,
}

/// Combines the typed target with `~/.ssh/config`: explicit `user@`/`:port` beat the config file.
pub fn resolve(
    spec: &TargetSpec,
    config: &SshConfig,
    home: &Path,
    default_user: &str,
) -> Result<Resolved, String> {
    let settings = config.lookup(&spec.host)?;
    let hostname = settings
        .hostname
        .clone()
        .unwrap_or_else(|| spec.host.clone());
    let user = spec
        .user
        .clone()
        .or(settings.user.clone())
        .unwrap_or_else(|| default_user.to_string());
    let port = spec.port.or(settings.port).unwrap_or(22);
    let identity_files = settings
        .identity_files
        .iter()
        .map(|f| expand_path(f, home, &hostname, &user))
        .collect();
    Ok(Resolved {
        alias: spec.host.clone(),
        hostname,
        user,
        port,
        identity_files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t = parse_target("root@pve1:2222").unwrap();
        assert_eq!(
            (t.user.as_deref(), t.host.as_str(), t.port),
            (Some("root"), "pve1", Some(2222))
        );
        let t = parse_target("pve1").unwrap();
        assert_eq!((t.user, t.host.as_str(), t.port), (None, "pve1", None));
        let t = parse_target("admin@[fe80::1]:22").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("fe80::1", Some(22)));
        let t = parse_target("::1").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", None));
        assert!(parse_target("root@pve:0").unwrap_err().contains("port"));
        assert!(parse_target("root@pve:ssh").unwrap_err().contains("`ssh`"));
        assert!(parse_target("@pve").is_err());
        assert!(parse_target("").is_err());
        assert!(parse_target("root@").is_err());
    }

    const CONFIG: &str = "\
# global defaults come first in a real file only if meant for all hosts
Host pve pve.lan
    HostName 10.0.0.5
    User root
    Port 2222
    IdentityFile ~/.ssh/pve_ed25519

Host gpu-*  !gpu-old
    User=admin
    IdentityFile \"%d/.ssh/id_%h\"

Match host foo
    User ignored

Host *
    User fallback
    Port 22
    IdentityFile ~/.ssh/id_ed25519
";

    #[test]
    fn first_value_wins_and_identity_files_accumulate() {
        let cfg = SshConfig::parse(CONFIG).unwrap();
        let s = cfg.lookup("pve").unwrap();
        assert_eq!(s.hostname.as_deref(), Some("10.0.0.5"));
        assert_eq!(s.user.as_deref(), Some("root"));
        assert_eq!(s.port, Some(2222));
        assert_eq!(
            s.identity_files,
            vec!["~/.ssh/pve_ed25519", "~/.ssh/id_ed25519"]
        );
        let s = cfg.lookup("PVE.lan").unwrap();
        assert_eq!(s.hostname.as_deref(), Some("10.0.0.5"));
    }

    #[test]
    fn wildcards_negation_and_match_blocks() {
        let cfg = SshConfig::parse(CONFIG).unwrap();
        let s = cfg.lookup("gpu-box").unwrap();
        assert_eq!(s.user.as_deref(), Some("admin"));
        assert_eq!(s.hostname, None);
        let s = cfg.lookup("gpu-old").unwrap();
        assert_eq!(s.user.as_deref(), Some("fallback"));
        let s = cfg.lookup("foo").unwrap();
        assert_eq!(
            s.user.as_deref(),
            Some("fallback"),
            "Match blocks are skipped"
        );
    }

    #[test]
    fn glob() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("pve?", "pve1"));
        assert!(!glob_match("pve?", "pve12"));
        assert!(glob_match("*.lan", "a.b.lan"));
        assert!(!glob_match("*.lan", "a.lan.x"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
    }

    #[test]
    fn resolve_prefers_explicit_parts() {
        let cfg = SshConfig::parse(CONFIG).unwrap();
        let home = Path::new("/home/me");
        let r = resolve(&parse_target("pve").unwrap(), &cfg, home, "me").unwrap();
        assert_eq!(
            (r.hostname.as_str(), r.user.as_str(), r.port),
            ("10.0.0.5", "root", 2222)
        );
        assert_eq!(r.identity_files[0], Path::new("/home/me/.ssh/pve_ed25519"));
        let r = resolve(&parse_target("ops@pve:22").unwrap(), &cfg, home, "me").unwrap();
        assert_eq!((r.user.as_str(), r.port), ("ops", 22));
        let r = resolve(&parse_target("gpu-a").unwrap(), &cfg, home, "me").unwrap();
        assert_eq!(r.identity_files[0], Path::new("/home/me/.ssh/id_gpu-a"));
        let r = resolve(
            &parse_target("x").unwrap(),
            &SshConfig::default(),
            home,
            "me",
        )
        .unwrap();
        assert_eq!((r.user.as_str(), r.port), ("me", 22));
    }

    #[test]
    fn bad_port_in_config_is_a_clear_error() {
        let cfg = SshConfig::parse("Host a\n Port ssh\n").unwrap();
        assert!(cfg.lookup("a").unwrap_err().contains("Port `ssh`"));
    }
}
