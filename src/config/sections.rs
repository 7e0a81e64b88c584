//! The one schema of each section of `llmctl.toml`. Every command that reads a section reads it with the struct
//! here (through [`super::ConfigFile::section`], which only takes a [`Section`]), so a key means the same thing
//! to `provision`, `doctor`, `status`, `logs`, `client-config`, `serve-proxy` and `model plan`, and a typo is an
//! error for all of them.
//!
//! What the file says and what a command requires are kept apart: a key a command cannot do without is
//! `Option` here when another command can (`[host]`), and the command that needs it asks for it through a
//! method here, so the error reads the same wherever it comes from. Values serde cannot judge (ranges,
//! formats) are checked by `check` methods, shared too.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A section of llmctl.toml: its struct and its `[name]`, tied together so no command can read a section with
/// a schema of its own.
pub trait Section: DeserializeOwned + Default {
    const NAME: &'static str;
}

/// Every section llmctl.toml may have, in the order `llmctl init` writes them. Any other top-level name is an
/// error (with the nearest of these suggested).
pub const SECTIONS: &[&str] = &[
    HostSection::NAME,
    ContainerSection::NAME,
    DriverSection::NAME,
    LlamaCppSection::NAME,
    ModelSection::NAME,
    ServerSection::NAME,
    ProxySection::NAME,
];

/// How a field's expected value reads in an error, where the type alone would say too little ("a whole number
/// from 0 to 4294967295" for a container id). Keyed by section and the field's path inside it.
pub fn expected_in_words(section: &str, path: &str) -> Option<&'static str> {
    Some(match (section, path) {
        ("host", "vmid") => "a whole number (a container id such as 103)",
        ("host", "target") => "a string (\"root@pve\", an ssh alias, or \"local\")",
        ("container", "disk_gib") => "a whole number of GiB (such as 120)",
        ("container", "memory_mib" | "swap_mib") => "a whole number of MiB (such as 40000)",
        ("container", "cores") => "a whole number of cores (such as 12)",
        ("container", "unprivileged" | "onboot") => "true or false",
        ("driver", "version") => "a string with the exact driver version (such as \"595.71.05\")",
        ("driver", "flavor") => "\"open\" or \"proprietary\"",
        ("server", "port") => "a port number from 1 to 65535",
        ("server", "context" | "batch" | "ubatch") => "a whole number of tokens (such as 32768)",
        ("server", "threads" | "n_cpu_moe") => "a whole number (such as 11)",
        ("server", "mmap") => "true or false",
        ("server", "extra_args") => "a list of strings (one argument each)",
        ("proxy", "listen") => "a string with an address such as \"127.0.0.1:4000\"",
        ("proxy", "upstream") => "a string with a URL such as \"http://127.0.0.1:11434\"",
        ("proxy", "max_body_bytes") => "a whole number of bytes (such as 33554432)",
        (
            "proxy",
            "ping_interval_secs"
            | "connect_timeout_secs"
            | "first_byte_timeout_secs"
            | "shutdown_grace_secs"
            | "queue_timeout_secs",
        ) => "a number of seconds (such as 5 or 2.5)",
        ("proxy", "upstreams") => {
            "a list of URLs or { url, weight, model, peer } tables (such as [\"http://127.0.0.1:8080\"]), or \"fleet\""
        }
        ("proxy", "peers") => "a list of URLs such as [\"http://192.168.1.51:4000\"]",
        ("proxy", "url") => "a string with a URL such as \"http://192.168.1.50:4000\"",
        ("proxy", "models") => "a table of client model prefix = upstream model",
        _ => return None,
    })
}

/// A value that is well-formed TOML but not acceptable; names the field and says what would be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

fn field_error(field: &str, problem: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_string(),
        problem: problem.into(),
    }
}

/// `[host]`: which Proxmox host and container. Both keys are optional in the file: doctor, status and logs can
/// take them from flags (and doctor finds the only GPU container itself); provision requires both, through
/// [`HostSection::target_or`] and [`HostSection::vmid_required`].
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    /// `user@host[:port]`, an ~/.ssh/config alias, or `local`.
    pub target: Option<String>,
    pub vmid: Option<u32>,
}

impl Section for HostSection {
    const NAME: &'static str = "host";
}

/// The lowest and highest Proxmox guest id (`pvesh get /cluster/nextid` and `pct create` refuse others).
pub const VMID_RANGE: std::ops::RangeInclusive<u32> = 100..=999_999_999;

impl HostSection {
    /// The host to reach: the `--host` flag, else `target`. The one wording for every command when neither is
    /// there.
    pub fn target_or(&self, flag: Option<&str>) -> anyhow::Result<String> {
        flag.map(str::to_string)
            .or_else(|| self.target.clone())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no host given: pass --host user@host (or --host local on the Proxmox host itself), or set [host] target in llmctl.toml"
                )
            })
    }

    /// The container, for the commands that cannot pick one themselves (provision creates or uses exactly
    /// this one).
    pub fn vmid_required(&self) -> anyhow::Result<u32> {
        self.vmid.ok_or_else(|| {
            anyhow::anyhow!(
                "no container given: set [host] vmid in llmctl.toml (the container to create or use, e.g. 103)"
            )
        })
    }

    /// The values that are there but wrong; the same for every command that reads the section.
    pub fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.target.as_deref().is_some_and(|t| t.trim().is_empty()) {
            errors.push(field_error(
                "[host].target",
                "is empty; use \"root@pve\", an ssh alias, or \"local\"",
            ));
        }
        if let Some(vmid) = self.vmid
            && !VMID_RANGE.contains(&vmid)
        {
            errors.push(field_error(
                "[host].vmid",
                format!("{vmid} is not a Proxmox guest id (100 to 999999999)"),
            ));
        }
        errors
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerSection {
    pub hostname: String,
    pub template: String,
    pub storage: String,
    pub disk_gib: u32,
    pub cores: u32,
    pub memory_mib: u32,
    pub swap_mib: u32,
    pub net0: String,
    pub unprivileged: bool,
    pub onboot: bool,
}

impl Section for ContainerSection {
    const NAME: &'static str = "container";
}

impl Default for ContainerSection {
    fn default() -> Self {
        // The seed guide's 103.conf.
        ContainerSection {
            hostname: "llm-server".into(),
            template: "local:vztmpl/debian-12-standard_12.12-1_amd64.tar.zst".into(),
            storage: "local-lvm".into(),
            disk_gib: 120,
            cores: 12,
            memory_mib: 40000,
            swap_mib: 0,
            net0: "name=eth0,bridge=vmbr0,ip=dhcp".into(),
            unprivileged: false,
            onboot: true,
        }
    }
}

impl ContainerSection {
    pub fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if !valid_hostname(&self.hostname) {
            errors.push(field_error(
                "[container].hostname",
                format!(
                    "{:?} is not a valid host name (letters, digits, '-', at most 63)",
                    self.hostname
                ),
            ));
        }
        for (field, value) in [
            ("[container].cores", self.cores),
            ("[container].memory_mib", self.memory_mib),
            ("[container].disk_gib", self.disk_gib),
        ] {
            if value == 0 {
                errors.push(field_error(field, "must be greater than 0"));
            }
        }
        errors
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DriverFlavor {
    /// NVIDIA's open kernel modules (Turing and newer).
    #[default]
    Open,
    /// The proprietary kernel modules (needed before Turing).
    Proprietary,
}

/// `[driver]`. `version` is required when the section is there: a driver section without a version says
/// nothing a command could act on.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DriverSection {
    /// The exact driver version, e.g. `595.71.05`.
    pub version: String,
    #[serde(default)]
    pub flavor: DriverFlavor,
}

impl Section for DriverSection {
    const NAME: &'static str = "driver";
}

impl DriverSection {
    pub fn check(&self) -> Vec<FieldError> {
        if is_exact_driver_version(&self.version) {
            return Vec::new();
        }
        vec![field_error(
            "[driver].version",
            format!(
                "{:?} is not an exact driver version; write all of it, e.g. \"595.71.05\" \
                 (a branch like \"595\" lets host and container drift apart)",
                self.version
            ),
        )]
    }
}

/// `595.71.05` or a two-part `460.107` (older branches), never a bare branch like `595`.
pub fn is_exact_driver_version(v: &str) -> bool {
    let parts: Vec<&str> = v.split('.').collect();
    (2..=3).contains(&parts.len())
        && parts[0].len() >= 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 63
        && !h.starts_with('-')
        && !h.ends_with('-')
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LlamaCppSection {
    pub repo: String,
    pub git_ref: String,
    pub install_dir: String,
    /// The source archive to build; `{ref}` is replaced by `git_ref`. Empty: GitHub's archive of `repo` at `git_ref`.
    pub archive_url: String,
    /// The archive's sha256, checked when given.
    pub archive_sha256: String,
}

impl Section for LlamaCppSection {
    const NAME: &'static str = "llama_cpp";
}

impl Default for LlamaCppSection {
    fn default() -> Self {
        LlamaCppSection {
            repo: "https://github.com/ggml-org/llama.cpp".into(),
            git_ref: "b11434".into(),
            install_dir: "/opt/llama.cpp".into(),
            archive_url: String::new(),
            archive_sha256: String::new(),
        }
    }
}

impl LlamaCppSection {
    /// The URL of the source archive the container downloads and builds.
    pub fn archive_url(&self) -> String {
        if self.archive_url.is_empty() {
            format!(
                "{}/archive/{}.tar.gz",
                self.repo.trim_end_matches('/').trim_end_matches(".git"),
                self.git_ref
            )
        } else {
            self.archive_url.replace("{ref}", &self.git_ref)
        }
    }

    pub fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.git_ref.trim().is_empty() {
            errors.push(field_error(
                "[llama_cpp].git_ref",
                "is empty; pin a tag such as \"b11434\"",
            ));
        }
        if !self.install_dir.starts_with('/') {
            errors.push(field_error(
                "[llama_cpp].install_dir",
                format!("{:?} must be an absolute path", self.install_dir),
            ));
        }
        if !self.archive_sha256.is_empty() && !is_sha256(&self.archive_sha256) {
            errors.push(field_error(
                "[llama_cpp].archive_sha256",
                "must be 64 hexadecimal characters (or left out)",
            ));
        }
        let archive = self.archive_url();
        if !(archive.starts_with("https://") || archive.starts_with("http://")) {
            errors.push(field_error(
                "[llama_cpp].archive_url",
                format!("{archive:?} must be an http(s) URL of a .tar.gz source archive"),
            ));
        }
        errors
    }
}

/// `[model]`. `source` and `dest` are required when the section is there, for the same reason as `[driver]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A URL or a Hugging Face `owner/repo/file.gguf`.
    pub source: String,
    #[serde(default)]
    pub sha256: String,
    pub dest: String,
}

impl Section for ModelSection {
    const NAME: &'static str = "model";
}

impl ModelSection {
    pub fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.source.trim().is_empty() {
            errors.push(field_error(
                "[model].source",
                "is empty; give a URL or \"owner/repo/file.gguf\"",
            ));
        }
        if !self.sha256.is_empty() && !is_sha256(&self.sha256) {
            errors.push(field_error(
                "[model].sha256",
                "must be 64 hexadecimal characters",
            ));
        }
        if !self.dest.starts_with('/') || !self.dest.ends_with(".gguf") {
            errors.push(field_error(
                "[model].dest",
                format!("{:?} must be an absolute path to a .gguf file", self.dest),
            ));
        }
        errors
    }
}

/// `gpu_layers = "auto"` or a number of layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuLayers {
    #[default]
    Auto,
    Count(u32),
}

impl<'de> Deserialize<'de> for GpuLayers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Count(u32),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Count(n)) => Ok(GpuLayers::Count(n)),
            Ok(Raw::Word(w)) if w == "auto" => Ok(GpuLayers::Auto),
            Ok(Raw::Word(w)) => Err(serde::de::Error::custom(format!(
                "expected \"auto\" or a number of layers, found the string {w:?}"
            ))),
            // An untagged enum's own message ("data did not match any variant") names neither.
            Err(_) => Err(serde::de::Error::custom(
                "expected \"auto\" or a number of layers (such as 12)",
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub context: u32,
    pub batch: u32,
    pub ubatch: u32,
    pub cache_type_k: String,
    pub cache_type_v: String,
    pub flash_attn: String,
    pub threads: Option<u32>,
    pub gpu_layers: GpuLayers,
    pub n_cpu_moe: Option<u32>,
    pub reasoning: String,
    pub mmap: bool,
    pub host: String,
    pub port: u16,
    /// Extra llama-server arguments, passed as they are (one argument per element).
    pub extra_args: Vec<String>,
}

impl Section for ServerSection {
    const NAME: &'static str = "server";
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            context: 32768,
            batch: 512,
            ubatch: 128,
            cache_type_k: "q4_0".into(),
            cache_type_v: "q4_0".into(),
            flash_attn: "on".into(),
            threads: None,
            gpu_layers: GpuLayers::Auto,
            n_cpu_moe: None,
            reasoning: "off".into(),
            mmap: false,
            host: "0.0.0.0".into(),
            port: 11434,
            extra_args: Vec::new(),
        }
    }
}

/// llama.cpp's KV cache types (`-ctk`/`-ctv`, common/arg.cpp).
pub const CACHE_TYPES: &[&str] = &[
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1",
];

impl ServerSection {
    /// The same for provision (which runs llama-server with them) and `model plan` (which plans with them).
    pub fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.context < 1024 {
            errors.push(field_error(
                "[server].context",
                format!(
                    "{} is too small to be useful (at least 1024; Claude Code needs 32768)",
                    self.context
                ),
            ));
        }
        if self.ubatch == 0 || self.batch == 0 || self.ubatch > self.batch {
            errors.push(field_error(
                "[server].ubatch",
                format!(
                    "ubatch ({}) must be between 1 and batch ({})",
                    self.ubatch, self.batch
                ),
            ));
        }
        for (field, value) in [
            ("[server].cache_type_k", &self.cache_type_k),
            ("[server].cache_type_v", &self.cache_type_v),
        ] {
            if !CACHE_TYPES.contains(&value.as_str()) {
                errors.push(field_error(
                    field,
                    format!(
                        "{value:?} is not a llama.cpp cache type; one of {}",
                        CACHE_TYPES.join(", ")
                    ),
                ));
            }
        }
        for (field, value) in [
            ("[server].flash_attn", &self.flash_attn),
            ("[server].reasoning", &self.reasoning),
        ] {
            if !["on", "off", "auto"].contains(&value.as_str()) {
                errors.push(field_error(
                    field,
                    format!("{value:?}: expected \"on\", \"off\" or \"auto\""),
                ));
            }
        }
        if self.threads == Some(0) {
            errors.push(field_error(
                "[server].threads",
                "must be at least 1 (or left out for llama-server's default)",
            ));
        }
        if self.port == 0 {
            errors.push(field_error("[server].port", "must be between 1 and 65535"));
        }
        errors
    }
}

/// `[proxy]`: the proxy's settings, for `serve-proxy` run by hand and for the proxy `provision` installs alike.
///
/// The rule (docs/proxy.md#configuration, "One schema, one meaning"): a key that is set means the same to
/// every command; a key that is unset takes the default of whoever runs the proxy, and that default is the
/// command line's, never the file's. `serve-proxy` by hand listens on 127.0.0.1:4000 with no key; the provisioned unit passes
/// `--listen 0.0.0.0:4000` and a key file it creates, written out in the unit, because a proxy serving the LAN
/// from a container must be reachable and never open. Keys themselves are never here, only files holding them.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    /// Several replicas of the model behind one proxy: each a URL, or `{ url, weight, model, peer }`; or
    /// `"fleet"`: every host's replicas (provision renders the list, see [`Upstreams::Fleet`]).
    pub upstreams: Option<Upstreams>,
    /// Other llmctl proxies of the same fleet (`http://ADDR:PORT` each), routed to beside the upstreams
    /// (`--peer`). With `upstreams = "fleet"` llmctl fills it with every other host's proxy.
    pub peers: Option<Vec<String>>,
    /// The URL other machines reach this host's proxy at (`http://ADDR:PORT`): a fleet's proxies reach each
    /// other there. Unset: the static `ip=` of `[container].net0` and the port of `listen`.
    pub url: Option<String>,
    pub api_key_file: Option<PathBuf>,
    pub upstream_api_key_file: Option<PathBuf>,
    pub model: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub ping_interval_secs: Option<f64>,
    pub connect_timeout_secs: Option<f64>,
    pub first_byte_timeout_secs: Option<f64>,
    pub shutdown_grace_secs: Option<f64>,
    pub queue_timeout_secs: Option<f64>,
    /// Client model name prefix → upstream model, e.g. `"claude-haiku" = "small-model"`.
    #[serde(default)]
    pub models: BTreeMap<String, String>,
    /// The file this section came from (not a key): errors about its values name it.
    #[serde(skip)]
    pub origin: Option<String>,
}

/// `[proxy] upstreams`: the replicas listed, or the word `"fleet"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Upstreams {
    List(Vec<UpstreamEntry>),
    /// `upstreams = "fleet"` (any other word is an error of [`ProxySection::check`]): the proxy provision
    /// installs on each host of a fleet routes to that host's own llama-servers and, through the other hosts'
    /// proxies (its peers), to theirs: one endpoint for every GPU of the fleet.
    Word(String),
}

impl Upstreams {
    pub const FLEET: &'static str = "fleet";
    /// The entries listed (none for `"fleet"`).
    pub fn list(&self) -> &[UpstreamEntry] {
        match self {
            Upstreams::List(l) => l,
            Upstreams::Word(_) => &[],
        }
    }
    pub fn is_fleet(&self) -> bool {
        matches!(self, Upstreams::Word(w) if w == Self::FLEET)
    }
}

/// One entry of `[proxy] upstreams`: a bare URL, or a table with the replica's weight and model.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum UpstreamEntry {
    Url(String),
    Table(UpstreamTable),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTable {
    pub url: String,
    pub weight: Option<u32>,
    pub model: Option<String>,
    /// The URL is another llmctl proxy of the same fleet (a peer), not a llama-server: it is sent the proxy's
    /// own key and a hop mark, and routes what it gets to its own llama-servers only.
    pub peer: Option<bool>,
}

impl Section for ProxySection {
    const NAME: &'static str = "proxy";
}

impl ProxySection {
    /// The values that are set but wrong, with the same words for serve-proxy and provision (each also checks
    /// the values its flags and defaults give).
    pub fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Some(listen) = &self.listen
            && listen.parse::<std::net::SocketAddr>().is_err()
        {
            errors.push(field_error(
                "[proxy].listen",
                format!("{listen:?} is not an address like \"127.0.0.1:4000\" (IP:PORT)"),
            ));
        }
        if let Some(upstream) = &self.upstream
            && crate::proxy::config::normalize_upstream(upstream).is_err()
        {
            errors.push(field_error(
                "[proxy].upstream",
                format!(
                    "{upstream:?} is not a URL like \"http://127.0.0.1:11434\" (the OpenAI-compatible server, without /v1)"
                ),
            ));
        }
        if let Some(Upstreams::Word(w)) = &self.upstreams
            && w != Upstreams::FLEET
        {
            errors.push(field_error(
                "[proxy].upstreams",
                format!(
                    "{w:?} is not a list of URLs nor \"fleet\" (every host's replicas, in a fleet)"
                ),
            ));
        }
        for (i, peer) in self.peers.iter().flatten().enumerate() {
            if crate::proxy::config::normalize_upstream(peer).is_err() {
                errors.push(field_error(
                    &format!("[proxy].peers[{i}]"),
                    format!("{peer:?} is not a URL like \"http://192.168.1.51:4000\" (another host's proxy)"),
                ));
            }
        }
        if let Some(url) = &self.url
            && crate::proxy::config::normalize_upstream(url).is_err()
        {
            errors.push(field_error(
                "[proxy].url",
                format!("{url:?} is not a URL like \"http://192.168.1.50:4000\" (where other machines reach this proxy)"),
            ));
        }
        if self.max_body_bytes == Some(0) {
            errors.push(field_error(
                "[proxy].max_body_bytes",
                "must be greater than 0",
            ));
        }
        for (field, value) in [
            ("[proxy].ping_interval_secs", self.ping_interval_secs),
            ("[proxy].connect_timeout_secs", self.connect_timeout_secs),
            (
                "[proxy].first_byte_timeout_secs",
                self.first_byte_timeout_secs,
            ),
            ("[proxy].shutdown_grace_secs", self.shutdown_grace_secs),
        ] {
            if let Some(v) = value
                && !(v.is_finite() && v > 0.0 && v <= 86_400.0)
            {
                errors.push(field_error(
                    field,
                    format!("{v} is not a number of seconds between 0 and 86400"),
                ));
            }
        }
        errors
    }
}
