//! The proxy's settings: the `[proxy]` section of llmctl.toml, overridden by flags and environment variables,
//! resolved once at startup into [`Settings`]. Resolution is a pure function of its inputs so the precedence
//! rules are tested without touching the process environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:4000";
pub const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:11434";
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
pub const DEFAULT_PING_INTERVAL_SECS: f64 = 5.0;
pub const DEFAULT_CONNECT_TIMEOUT_SECS: f64 = 5.0;
/// CPU prefill of Claude Code's ~20k-token first prompt takes minutes: the first byte may be slow.
pub const DEFAULT_FIRST_BYTE_TIMEOUT_SECS: f64 = 600.0;
pub const DEFAULT_SHUTDOWN_GRACE_SECS: f64 = 10.0;
/// Long enough to ride out a burst, short enough that the client's own retry (Claude Code, Codex) takes over.
pub const DEFAULT_QUEUE_TIMEOUT_SECS: f64 = 60.0;

pub const ENV_API_KEY: &str = "LLMCTL_PROXY_API_KEY";
pub const ENV_UPSTREAM_API_KEY: &str = "LLMCTL_UPSTREAM_API_KEY";

/// `[proxy]` of llmctl.toml: its one schema, shared with `provision` (see the rule on [`ProxySection`]).
pub use crate::config::ProxySection;
/// The name serve-proxy's code reads `[proxy]` by.
pub type ProxyConfig = ProxySection;

pub use crate::config::{UpstreamEntry, UpstreamTable, Upstreams};

/// One replica the proxy routes to, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaSpec {
    /// Base URL without a trailing slash or `/v1`.
    pub url: String,
    /// Relative share of the load (1 unless set): the least-loaded choice compares in-flight / weight.
    pub weight: u32,
    /// The model this replica serves, when it differs from `model` (else discovered, as for one upstream).
    pub model: Option<String>,
    /// Another llmctl proxy of the same fleet, not a llama-server (`--peer`, or `peer = true`): it gets the
    /// proxy's own key and the hop mark, and serves what it gets from its own llama-servers.
    pub peer: bool,
}

/// The flag values that matter for resolution (a copy of `ServeProxyArgs` without clap).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    /// `--upstream URL`, repeatable: any given replaces the file's `upstream`/`upstreams`.
    pub upstreams: Vec<String>,
    /// `--peer URL`, repeatable: other proxies of the fleet, routed to beside the upstreams.
    pub peers: Vec<String>,
    pub api_key: Option<String>,
    pub api_key_file: Option<PathBuf>,
    pub upstream_api_key: Option<String>,
    pub upstream_api_key_file: Option<PathBuf>,
    pub model: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub ping_interval_secs: Option<f64>,
    pub connect_timeout_secs: Option<f64>,
    pub first_byte_timeout_secs: Option<f64>,
    pub shutdown_grace_secs: Option<f64>,
    pub queue_timeout_secs: Option<f64>,
    /// `--model-map PREFIX=MODEL`: merged over `[proxy.models]` (a flag wins for the same prefix).
    pub models: BTreeMap<String, String>,
}

/// Where a secret came from; only for the startup log line, never the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretSource {
    CommandLine,
    Environment,
    File,
}

#[derive(Clone, PartialEq)]
pub struct Secret {
    pub value: String,
    pub source: SecretSource,
}

// Hand-written so a `{:?}` of the settings can never print a key.
impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<redacted>, from {:?})", self.source)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub listen: SocketAddr,
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:11434`: the first replica's.
    pub upstream: String,
    /// Every replica, in the order given (one for the single-upstream setup).
    pub upstreams: Vec<ReplicaSpec>,
    pub api_key: Option<Secret>,
    pub upstream_api_key: Option<Secret>,
    pub model: Option<String>,
    pub model_map: ModelMap,
    pub max_body_bytes: usize,
    pub ping_interval: Duration,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub shutdown_grace: Duration,
    /// With several replicas: how long a request waits for a free slot when every one is busy.
    pub queue_timeout: Duration,
}

/// Client model name → upstream model by longest matching prefix.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelMap {
    /// Longest prefix first, so `claude-haiku-4` wins over `claude-haiku`.
    entries: Vec<(String, String)>,
}

impl ModelMap {
    pub fn new(map: &BTreeMap<String, String>) -> Self {
        let mut entries: Vec<(String, String)> =
            map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        entries.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        ModelMap { entries }
    }

    /// The upstream model for `client_model`, or `None` for "the default upstream model".
    pub fn resolve(&self, client_model: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(prefix, _)| client_model.starts_with(prefix.as_str()))
            .map(|(_, upstream)| upstream.as_str())
    }

    /// The mapped client names (the keys), for `GET /v1/models`.
    pub fn client_names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }
}

/// Flags and environment over the file; `env` and `read_secret` are the only I/O, injected for tests.
pub fn resolve(
    flags: &Overrides,
    file: &ProxySection,
    env: &dyn Fn(&str) -> Option<String>,
    read_secret: &dyn Fn(&Path) -> Result<String>,
) -> Result<Settings> {
    let listen_text = flags
        .listen
        .as_deref()
        .or(file.listen.as_deref())
        .unwrap_or(DEFAULT_LISTEN);
    let listen: SocketAddr = listen_text.parse().with_context(|| {
        format!("invalid listen address {listen_text:?}: expected IP:PORT, e.g. 127.0.0.1:4000")
    })?;
    let origin = file
        .origin
        .as_deref()
        .unwrap_or(crate::config::DEFAULT_PATH);
    // `--peer` flags replace the file's `peers`, as `--upstream` replaces its upstreams.
    let peers = if flags.peers.is_empty() {
        file.peers.clone().unwrap_or_default()
    } else {
        flags.peers.clone()
    };
    let upstreams = replicas(&flags.upstreams, &peers, file, origin)?;
    let upstream = upstreams[0].url.clone();
    let api_key = secret(
        flags.api_key.as_deref(),
        flags.api_key_file.as_deref(),
        env(ENV_API_KEY),
        file.api_key_file.as_deref(),
        read_secret,
        ["--api-key", "--api-key-file", ENV_API_KEY, "api_key_file"],
        origin,
    )?;
    let upstream_api_key = secret(
        flags.upstream_api_key.as_deref(),
        flags.upstream_api_key_file.as_deref(),
        env(ENV_UPSTREAM_API_KEY),
        file.upstream_api_key_file.as_deref(),
        read_secret,
        [
            "--upstream-api-key",
            "--upstream-api-key-file",
            ENV_UPSTREAM_API_KEY,
            "upstream_api_key_file",
        ],
        origin,
    )?;
    let model = flags
        .model
        .clone()
        .or_else(|| file.model.clone())
        .filter(|m| !m.trim().is_empty());
    let max_body_bytes = flags
        .max_body_bytes
        .or(file.max_body_bytes)
        .unwrap_or(DEFAULT_MAX_BODY_BYTES);
    if max_body_bytes == 0 {
        bail!("max_body_bytes must be greater than 0");
    }
    Ok(Settings {
        listen,
        upstream,
        upstreams,
        api_key,
        upstream_api_key,
        model,
        model_map: ModelMap::new(&{
            let mut m = file.models.clone();
            m.extend(flags.models.clone());
            m
        }),
        max_body_bytes,
        ping_interval: seconds(
            "ping_interval_secs",
            flags.ping_interval_secs.or(file.ping_interval_secs),
            DEFAULT_PING_INTERVAL_SECS,
        )?,
        connect_timeout: seconds(
            "connect_timeout_secs",
            flags.connect_timeout_secs.or(file.connect_timeout_secs),
            DEFAULT_CONNECT_TIMEOUT_SECS,
        )?,
        first_byte_timeout: seconds(
            "first_byte_timeout_secs",
            flags
                .first_byte_timeout_secs
                .or(file.first_byte_timeout_secs),
            DEFAULT_FIRST_BYTE_TIMEOUT_SECS,
        )?,
        shutdown_grace: seconds(
            "shutdown_grace_secs",
            flags.shutdown_grace_secs.or(file.shutdown_grace_secs),
            DEFAULT_SHUTDOWN_GRACE_SECS,
        )?,
        queue_timeout: seconds(
            "queue_timeout_secs",
            flags.queue_timeout_secs.or(file.queue_timeout_secs),
            DEFAULT_QUEUE_TIMEOUT_SECS,
        )?,
    })
}

fn seconds(name: &str, value: Option<f64>, default: f64) -> Result<Duration> {
    let v = value.unwrap_or(default);
    if !v.is_finite() || v <= 0.0 || v > 86_400.0 {
        bail!("{name} must be a number of seconds between 0 and 86400, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

/// The replicas: the `--upstream` flags when any were given, else the file's `upstream` or `upstreams` (not
/// both: which one was meant would be a guess), else the default URL.
/// `--peer` flags are added to either; a list of peers alone has no replica of its own (a proxy that only
/// forwards to its fleet is allowed: a laptop's endpoint over the house).
fn replicas(
    flags: &[String],
    peers: &[String],
    file: &ProxyConfig,
    origin: &str,
) -> Result<Vec<ReplicaSpec>> {
    let plain = |url: &str| -> Result<ReplicaSpec> {
        Ok(ReplicaSpec {
            url: normalize_upstream(url)?,
            weight: 1,
            model: None,
            peer: false,
        })
    };
    let mut out = if !flags.is_empty() {
        flags.iter().map(|u| plain(u)).collect::<Result<Vec<_>>>()?
    } else if !peers.is_empty() && file.upstream.is_none() && file.upstreams.is_none() {
        Vec::new()
    } else {
        match (&file.upstream, &file.upstreams) {
            (_, Some(super::config::Upstreams::Word(w))) => bail!(
                "[proxy] upstreams = {w:?} in {origin} is for the proxy `llmctl provision` installs on each host \
                 of a fleet ([[hosts]] or [cluster]): it renders the list there. serve-proxy by hand takes the \
                 URLs: --upstream URL for llama-servers, --peer URL for the fleet's other proxies"
            ),
            (Some(_), Some(_)) => bail!(
                "[proxy] in {origin} sets both upstream and upstreams: keep one (upstreams = [\"http://a:8080\", \"http://b:8080\"] lists every replica)"
            ),
            (Some(u), None) => vec![plain(u)?],
            (None, Some(Upstreams::List(list))) if list.is_empty() => bail!(
                "[proxy] upstreams in {origin} is empty: list at least one URL, or remove the key for the default {DEFAULT_UPSTREAM}"
            ),
            (None, Some(Upstreams::List(list))) => list
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    entry(e).with_context(|| format!("[proxy] upstreams[{i}] in {origin}"))
                })
                .collect::<Result<Vec<_>>>()?,
            (None, None) => vec![plain(DEFAULT_UPSTREAM)?],
        }
    };
    for p in peers {
        out.push(ReplicaSpec {
            peer: true,
            ..plain(p)?
        });
    }
    if out.len() > super::router::MAX_REPLICAS {
        bail!(
            "{} upstreams given; serve-proxy routes across at most {}",
            out.len(),
            super::router::MAX_REPLICAS
        );
    }
    // The same server twice would split its own sessions between two names of itself.
    for i in 1..out.len() {
        if out[..i].iter().any(|r| r.url == out[i].url) {
            bail!(
                "upstream {} is listed twice; list each replica once",
                out[i].url
            );
        }
    }
    for r in &mut out {
        r.model = r.model.take().filter(|m| !m.trim().is_empty());
    }
    Ok(out)
}

fn entry(e: &UpstreamEntry) -> Result<ReplicaSpec> {
    match e {
        UpstreamEntry::Url(u) => Ok(ReplicaSpec {
            url: normalize_upstream(u)?,
            weight: 1,
            model: None,
            peer: false,
        }),
        UpstreamEntry::Table(t) => {
            let weight = t.weight.unwrap_or(1);
            if weight == 0 || weight > 1000 {
                bail!("weight must be between 1 and 1000, got {weight}");
            }
            Ok(ReplicaSpec {
                url: normalize_upstream(&t.url)?,
                weight,
                model: t.model.clone(),
                peer: t.peer.unwrap_or(false),
            })
        }
    }
}

pub(crate) fn normalize_upstream(url: &str) -> Result<String> {
    let trimmed = url.trim().trim_end_matches('/');
    let trimmed = trimmed.strip_suffix("/v1").unwrap_or(trimmed);
    let rest = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => {
            Ok(trimmed.to_string())
        }
        _ => bail!(
            "invalid upstream URL {url:?}: expected http://HOST:PORT (the OpenAI-compatible server, without /v1)"
        ),
    }
}

/// One key from the first of: its flag, its file flag, its environment variable, its file in `[proxy]`.
/// `names` are those four's names (flag, file flag, variable, config key); every error says which one the key
/// came from, so a path read from a config file the user did not know was read is not a mystery.
#[allow(clippy::too_many_arguments)]
fn secret(
    flag: Option<&str>,
    flag_file: Option<&Path>,
    env_value: Option<String>,
    file_path: Option<&Path>,
    read_secret: &dyn Fn(&Path) -> Result<String>,
    names: [&str; 4],
    origin: &str,
) -> Result<Option<Secret>> {
    let [flag_name, file_flag, var, key] = names;
    let from_file = |p: &Path, given: String| {
        read_secret(p).with_context(|| format!("the key file comes from {given}"))
    };
    let (value, source, given) = if let Some(v) = flag {
        (
            v.to_string(),
            SecretSource::CommandLine,
            flag_name.to_string(),
        )
    } else if let Some(p) = flag_file {
        let given = format!("{file_flag} {}", p.display());
        (from_file(p, given.clone())?, SecretSource::File, given)
    } else if let Some(v) = env_value {
        (
            v,
            SecretSource::Environment,
            format!("the environment variable {var}"),
        )
    } else if let Some(p) = file_path {
        let given = format!("[proxy] {key} = {:?} in {origin}", p.display().to_string());
        (from_file(p, given.clone())?, SecretSource::File, given)
    } else {
        return Ok(None);
    };
    let value = value.trim().to_string();
    if value.is_empty() {
        bail!(
            "the key from {given} is empty: put the key on its first line, or remove the setting"
        );
    }
    Ok(Some(Secret { value, source }))
}

/// Reads a key file: the first line, trimmed. Refuses a file others can read, as ssh does with its keys.
pub fn read_secret_file(path: &Path) -> Result<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot read key file {}", path.display()))?;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            bail!(
                "key file {} is readable by other users (mode {:o}); run: chmod 600 {}",
                path.display(),
                mode & 0o777,
                path.display()
            );
        }
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read key file {}", path.display()))?;
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn no_files(p: &Path) -> Result<String> {
        bail!("unexpected read of {}", p.display())
    }

    fn file_from_toml(text: &str) -> ProxySection {
        crate::config::ConfigFile::parse(text, None)
            .unwrap()
            .section::<ProxySection>()
            .unwrap()
            .unwrap()
    }

    #[test]
    fn defaults_when_nothing_is_set() {
        let s = resolve(
            &Overrides::default(),
            &ProxySection::default(),
            &no_env,
            &no_files,
        )
        .unwrap();
        assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(s.upstream, DEFAULT_UPSTREAM);
        assert_eq!(s.api_key, None);
        assert_eq!(s.max_body_bytes, 32 * 1024 * 1024);
        assert_eq!(s.ping_interval, Duration::from_secs(5));
        assert_eq!(s.first_byte_timeout, Duration::from_secs(600));
        assert_eq!(s.connect_timeout, Duration::from_secs(5));
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let file = file_from_toml(
            r#"
            [proxy]
            listen = "127.0.0.1:5000"
            upstream = "http://10.0.0.2:8080/v1/"
            model = "from-file"
            ping_interval_secs = 2.5
            max_body_bytes = 1000
            [proxy.models]
            "claude-haiku" = "small"
            "#,
        );
        let from_file = resolve(&Overrides::default(), &file, &no_env, &no_files).unwrap();
        assert_eq!(from_file.listen.to_string(), "127.0.0.1:5000");
        assert_eq!(from_file.upstream, "http://10.0.0.2:8080");
        assert_eq!(from_file.model.as_deref(), Some("from-file"));
        assert_eq!(from_file.ping_interval, Duration::from_millis(2500));
        assert_eq!(from_file.max_body_bytes, 1000);

        let flags = Overrides {
            listen: Some("127.0.0.1:6000".into()),
            model: Some("from-flag".into()),
            max_body_bytes: Some(5),
            ..Default::default()
        };
        let s = resolve(&flags, &file, &no_env, &no_files).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:6000");
        assert_eq!(s.model.as_deref(), Some("from-flag"));
        assert_eq!(s.max_body_bytes, 5);
        // Not overridden: still the file's.
        assert_eq!(s.upstream, "http://10.0.0.2:8080");
        assert_eq!(
            s.model_map.resolve("claude-haiku-4-5-20251001"),
            Some("small")
        );
    }

    #[test]
    fn key_errors_name_where_the_key_came_from() {
        let file = ProxySection {
            api_key_file: Some("/etc/llmctl/proxy-api-key".into()),
            origin: Some("./llmctl.toml".into()),
            ..Default::default()
        };
        let missing =
            |p: &Path| -> Result<String> { bail!("cannot read key file {}", p.display()) };
        let e = resolve(&Overrides::default(), &file, &no_env, &missing).unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains("[proxy] api_key_file = \"/etc/llmctl/proxy-api-key\" in ./llmctl.toml")
                && text.contains("cannot read key file"),
            "{text}"
        );
        let empty = |_: &Path| Ok(String::new());
        let flags = Overrides {
            api_key_file: Some("/k".into()),
            ..Default::default()
        };
        let e = resolve(&flags, &file, &no_env, &empty)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--api-key-file /k") && e.contains("is empty"),
            "{e}"
        );
        let env = |k: &str| (k == ENV_UPSTREAM_API_KEY).then(|| " ".to_string());
        let e = resolve(
            &Overrides::default(),
            &ProxySection::default(),
            &env,
            &no_files,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("LLMCTL_UPSTREAM_API_KEY") && e.contains("is empty"),
            "{e}"
        );
    }

    #[test]
    fn secrets_flag_then_flag_file_then_env_then_config_file() {
        let file = ProxySection {
            api_key_file: Some("/cfg.key".into()),
            ..Default::default()
        };
        let env = |k: &str| (k == ENV_API_KEY).then(|| "from-env".to_string());
        let read = |p: &Path| Ok(format!("from-{}", p.display()));
        let s = resolve(&Overrides::default(), &file, &env, &read).unwrap();
        assert_eq!(s.api_key.as_ref().unwrap().value, "from-env");
        assert_eq!(s.api_key.unwrap().source, SecretSource::Environment);

        let s = resolve(&Overrides::default(), &file, &no_env, &read).unwrap();
        assert_eq!(s.api_key.unwrap().value, "from-/cfg.key");

        let flags = Overrides {
            api_key_file: Some("/flag.key".into()),
            ..Default::default()
        };
        assert_eq!(
            resolve(&flags, &file, &env, &read)
                .unwrap()
                .api_key
                .unwrap()
                .value,
            "from-/flag.key"
        );

        let flags = Overrides {
            api_key: Some(" k1 ".into()),
            ..Default::default()
        };
        let s = resolve(&flags, &file, &env, &read).unwrap();
        assert_eq!(s.api_key.clone().unwrap().value, "k1");
        assert_eq!(s.api_key.clone().unwrap().source, SecretSource::CommandLine);
        // Debug output never shows the key.
        assert!(!format!("{s:?}").contains("k1"));
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let bad = |o: Overrides| {
            resolve(&o, &ProxySection::default(), &no_env, &no_files)
                .unwrap_err()
                .to_string()
        };
        assert!(
            bad(Overrides {
                listen: Some("localhost".into()),
                ..Default::default()
            })
            .contains("invalid listen address")
        );
        assert!(
            bad(Overrides {
                upstreams: vec!["127.0.0.1:8080".into()],
                ..Default::default()
            })
            .contains("expected http://HOST:PORT")
        );
        assert!(
            bad(Overrides {
                ping_interval_secs: Some(0.0),
                ..Default::default()
            })
            .contains("ping_interval_secs")
        );
        assert!(
            bad(Overrides {
                api_key: Some("  ".into()),
                ..Default::default()
            })
            .contains("empty")
        );
    }

    #[test]
    fn unknown_keys_in_the_section_are_rejected_with_the_file_name() {
        let err = crate::config::ConfigFile::parse("[proxy]\napi_key = \"x\"\n", None)
            .unwrap()
            .section::<ProxySection>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("[proxy]") && err.contains("api_key"), "{err}");
    }

    #[test]
    fn model_map_flags_merge_over_the_file() {
        let mut file = ProxySection::default();
        file.models
            .insert("claude-haiku".into(), "file-small".into());
        file.models.insert("claude-opus".into(), "file-big".into());
        let mut flags = Overrides::default();
        flags
            .models
            .insert("claude-haiku".into(), "flag-small".into());
        let s = resolve(&flags, &file, &no_env, &no_files).unwrap();
        assert_eq!(s.model_map.resolve("claude-haiku-4-5"), Some("flag-small"));
        assert_eq!(s.model_map.resolve("claude-opus-4-8"), Some("file-big"));
    }

    #[test]
    fn model_map_longest_prefix_wins() {
        let mut m = BTreeMap::new();
        m.insert("claude-haiku".to_string(), "small".to_string());
        m.insert("claude-haiku-4-5".to_string(), "tiny".to_string());
        m.insert("claude".to_string(), "big".to_string());
        let map = ModelMap::new(&m);
        assert_eq!(map.resolve("claude-haiku-4-5-20251001"), Some("tiny"));
        assert_eq!(map.resolve("claude-haiku-3"), Some("small"));
        assert_eq!(map.resolve("claude-opus-4-8"), Some("big"));
        assert_eq!(map.resolve("gpt-4"), None);
    }

    #[test]
    fn key_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "secret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            read_secret_file(&p)
                .unwrap_err()
                .to_string()
                .contains("chmod 600")
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret_file(&p).unwrap(), "secret");
    }

    #[test]
    fn upstreams_from_flags_file_list_or_tables() {
        let flags = Overrides {
            upstreams: vec!["http://a:1/v1".into(), "http://b:2/".into()],
            ..Default::default()
        };
        let s = resolve(&flags, &ProxyConfig::default(), &no_env, &no_files).unwrap();
        let urls: Vec<&str> = s.upstreams.iter().map(|r| r.url.as_str()).collect();
        assert_eq!(urls, ["http://a:1", "http://b:2"]);
        assert_eq!(s.upstream, "http://a:1");

        let file = file_from_toml(
            r#"
            [proxy]
            upstreams = ["http://a:1", { url = "http://b:2", weight = 2, model = "big" }]
            "#,
        );
        let s = resolve(&Overrides::default(), &file, &no_env, &no_files).unwrap();
        assert_eq!(
            s.upstreams,
            vec![
                ReplicaSpec {
                    url: "http://a:1".into(),
                    weight: 1,
                    model: None,
                    peer: false,
                },
                ReplicaSpec {
                    url: "http://b:2".into(),
                    weight: 2,
                    model: Some("big".into()),
                    peer: false,
                },
            ]
        );
        // Flags replace the file's list.
        let s = resolve(&flags, &file, &no_env, &no_files).unwrap();
        assert_eq!(s.upstreams.len(), 2);
        assert_eq!(s.upstreams[1].weight, 1);

        // One upstream, the old way: one replica.
        let file = file_from_toml("[proxy]\nupstream = \"http://c:3\"\n");
        let s = resolve(&Overrides::default(), &file, &no_env, &no_files).unwrap();
        assert_eq!(s.upstreams.len(), 1);
        assert_eq!(s.upstreams[0].url, "http://c:3");
    }

    #[test]
    fn bad_upstream_lists_are_clear_errors() {
        let err = |toml: &str| {
            let file = file_from_toml(toml);
            format!(
                "{:#}",
                resolve(&Overrides::default(), &file, &no_env, &no_files).unwrap_err()
            )
        };
        let e = err("[proxy]\nupstream = \"http://a:1\"\nupstreams = [\"http://b:2\"]\n");
        assert!(e.contains("both upstream and upstreams"), "{e}");
        let e = err("[proxy]\nupstreams = []\n");
        assert!(e.contains("is empty"), "{e}");
        let e = err("[proxy]\nupstreams = [\"http://a:1\", { url = \"b:2\" }]\n");
        assert!(
            e.contains("upstreams[1]") && e.contains("expected http://HOST:PORT"),
            "{e}"
        );
        let e = err("[proxy]\nupstreams = [{ url = \"http://a:1\", weight = 0 }]\n");
        assert!(e.contains("weight must be between 1 and 1000"), "{e}");
        let e = err("[proxy]\nupstreams = [\"http://a:1\", \"http://a:1/\"]\n");
        assert!(e.contains("listed twice"), "{e}");
    }
}
