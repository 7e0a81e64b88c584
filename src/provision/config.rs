//! The provisioning sections of `llmctl.toml`: typed, validated, with errors that name the field and the fix.
//!
//! Parsing (serde, `deny_unknown_fields` so a typo is an error, not a silently ignored key) and validation
//! (values serde cannot judge: version formats, ranges, paths) are separate so each stays small and testable.

use std::fmt;

use serde::Deserialize;

use crate::config::ConfigFile;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    /// `user@host[:port]`, an ~/.ssh/config alias, or `local`.
    pub target: String,
    pub vmid: u32,
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

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DriverFlavor {
    /// NVIDIA's open kernel modules (Turing and newer).
    #[default]
    Open,
    /// The proprietary kernel modules (needed before Turing).
    Proprietary,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DriverSection {
    /// The exact driver version, e.g. `595.71.05`.
    pub version: String,
    #[serde(default)]
    pub flavor: DriverFlavor,
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
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A URL or a Hugging Face `owner/repo/file.gguf`.
    pub source: String,
    #[serde(default)]
    pub sha256: String,
    pub dest: String,
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
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(GpuLayers::Count(n)),
            Raw::Word(w) if w == "auto" => Ok(GpuLayers::Auto),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "gpu_layers = {w:?}: expected \"auto\" or a number of layers"
            ))),
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

/// `[proxy]` is one schema, `serve-proxy`'s own (`proxy::config::ProxyConfig`): every key reaches the
/// provisioned proxy's unit, and a typo is an error for both commands. Two keys default differently for the
/// provisioned proxy, because it serves the LAN from a container: `listen` (all interfaces) and `api_key_file`
/// (a key provision creates; a LAN proxy is never open).
pub const PROVISIONED_LISTEN: &str = "0.0.0.0:4000";
pub const PROVISIONED_KEY_FILE: &str = "/etc/llmctl/proxy-api-key";

/// The listen address of the proxy provision installs from this `[proxy]` (client-config --from-host reads it too).
pub fn provisioned_listen(proxy: &crate::proxy::config::ProxyConfig) -> &str {
    proxy.listen.as_deref().unwrap_or(PROVISIONED_LISTEN)
}

/// The key file (in the container) of the proxy provision installs from this `[proxy]`.
pub fn provisioned_key_file(proxy: &crate::proxy::config::ProxyConfig) -> String {
    proxy.api_key_file.as_ref().map_or_else(
        || PROVISIONED_KEY_FILE.to_string(),
        |p| p.display().to_string(),
    )
}

/// Everything `llmctl provision` needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ProvisionConfig {
    pub host: HostSection,
    pub container: ContainerSection,
    pub driver: DriverSection,
    pub llama_cpp: LlamaCppSection,
    pub model: ModelSection,
    pub server: ServerSection,
    pub proxy: crate::proxy::config::ProxyConfig,
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

impl ProvisionConfig {
    /// The provisioned proxy's listen address.
    pub fn proxy_listen(&self) -> &str {
        provisioned_listen(&self.proxy)
    }

    /// The port the proxy listens on, which the container's own health checks and smoke test dial on 127.0.0.1.
    /// `listen` is validated as an address; 4000 is serve-proxy's default.
    pub fn proxy_port(&self) -> u16 {
        self.proxy_listen()
            .parse::<std::net::SocketAddr>()
            .map_or(4000, |a| a.port())
    }

    /// The provisioned proxy's key file (in the container).
    pub fn proxy_key_file(&self) -> Option<String> {
        Some(provisioned_key_file(&self.proxy))
    }

    /// Reads and validates the provisioning sections; every problem is reported, not only the first.
    pub fn from_file(file: &ConfigFile) -> anyhow::Result<Self> {
        if !file.exists() {
            anyhow::bail!(
                "no {} in this directory: `llmctl init` writes a complete, commented one; or pass --config PATH (or set LLMCTL_CONFIG)",
                crate::config::DEFAULT_PATH
            );
        }
        let name = file.path.as_deref().map_or_else(
            || crate::config::DEFAULT_PATH.to_string(),
            |p| p.display().to_string(),
        );
        let required = |section: &str| {
            anyhow::anyhow!(
                "{name}: section [{section}] is missing; `llmctl init` writes a complete, commented file"
            )
        };
        let cfg = ProvisionConfig {
            host: file.section("host")?.ok_or_else(|| required("host"))?,
            container: file.section("container")?.unwrap_or_default(),
            driver: file.section("driver")?.ok_or_else(|| required("driver"))?,
            llama_cpp: file.section("llama_cpp")?.unwrap_or_default(),
            model: file.section("model")?.ok_or_else(|| required("model"))?,
            server: file.section("server")?.unwrap_or_default(),
            proxy: file.section("proxy")?.unwrap_or_default(),
        };
        let errors = cfg.validate();
        if errors.is_empty() {
            return Ok(cfg);
        }
        let lines: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
        anyhow::bail!("{name} has invalid values:\n{}", lines.join("\n"))
    }

    /// Checks what serde cannot: formats, ranges, paths. Pure, so each rule is unit-tested.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut err = |field: &str, problem: String| {
            errors.push(FieldError {
                field: field.to_string(),
                problem,
            })
        };
        if self.host.target.trim().is_empty() {
            err(
                "[host].target",
                "is empty; use \"root@pve\", an ssh alias, or \"local\"".into(),
            );
        }
        if !(100..=999_999_999).contains(&self.host.vmid) {
            err(
                "[host].vmid",
                format!(
                    "{} is not a Proxmox guest id (100 to 999999999)",
                    self.host.vmid
                ),
            );
        }
        if !is_exact_driver_version(&self.driver.version) {
            err(
                "[driver].version",
                format!(
                    "{:?} is not an exact driver version; write all of it, e.g. \"595.71.05\" \
                     (a branch like \"595\" lets host and container drift apart)",
                    self.driver.version
                ),
            );
        }
        if !valid_hostname(&self.container.hostname) {
            err(
                "[container].hostname",
                format!(
                    "{:?} is not a valid host name (letters, digits, '-', at most 63)",
                    self.container.hostname
                ),
            );
        }
        for (field, value) in [
            ("[container].cores", self.container.cores),
            ("[container].memory_mib", self.container.memory_mib),
            ("[container].disk_gib", self.container.disk_gib),
        ] {
            if value == 0 {
                err(field, "must be greater than 0".into());
            }
        }
        if self.llama_cpp.git_ref.trim().is_empty() {
            err(
                "[llama_cpp].git_ref",
                "is empty; pin a tag such as \"b11434\"".into(),
            );
        }
        if !self.llama_cpp.install_dir.starts_with('/') {
            err(
                "[llama_cpp].install_dir",
                format!("{:?} must be an absolute path", self.llama_cpp.install_dir),
            );
        }
        if self.model.source.trim().is_empty() {
            err(
                "[model].source",
                "is empty; give a URL or \"owner/repo/file.gguf\"".into(),
            );
        }
        if !self.model.sha256.is_empty() && !is_sha256(&self.model.sha256) {
            err("[model].sha256", "must be 64 hexadecimal characters".into());
        }
        if !self.llama_cpp.archive_sha256.is_empty() && !is_sha256(&self.llama_cpp.archive_sha256) {
            err(
                "[llama_cpp].archive_sha256",
                "must be 64 hexadecimal characters (or left out)".into(),
            );
        }
        let archive = self.llama_cpp.archive_url();
        if !(archive.starts_with("https://") || archive.starts_with("http://")) {
            err(
                "[llama_cpp].archive_url",
                format!("{archive:?} must be an http(s) URL of a .tar.gz source archive"),
            );
        }
        if !self.model.dest.starts_with('/') || !self.model.dest.ends_with(".gguf") {
            err(
                "[model].dest",
                format!(
                    "{:?} must be an absolute path to a .gguf file",
                    self.model.dest
                ),
            );
        }
        let s = &self.server;
        if s.context < 1024 {
            err(
                "[server].context",
                format!(
                    "{} is too small to be useful (at least 1024; Claude Code needs 32768)",
                    s.context
                ),
            );
        }
        if s.ubatch == 0 || s.batch == 0 || s.ubatch > s.batch {
            err(
                "[server].ubatch",
                format!(
                    "ubatch ({}) must be between 1 and batch ({})",
                    s.ubatch, s.batch
                ),
            );
        }
        for (field, value) in [
            ("[server].cache_type_k", &s.cache_type_k),
            ("[server].cache_type_v", &s.cache_type_v),
        ] {
            if !CACHE_TYPES.contains(&value.as_str()) {
                err(
                    field,
                    format!(
                        "{value:?} is not a llama.cpp cache type; one of {}",
                        CACHE_TYPES.join(", ")
                    ),
                );
            }
        }
        if !["on", "off", "auto"].contains(&s.flash_attn.as_str()) {
            err(
                "[server].flash_attn",
                format!("{:?}: expected \"on\", \"off\" or \"auto\"", s.flash_attn),
            );
        }
        if !["on", "off", "auto"].contains(&s.reasoning.as_str()) {
            err(
                "[server].reasoning",
                format!("{:?}: expected \"on\", \"off\" or \"auto\"", s.reasoning),
            );
        }
        if s.threads == Some(0) {
            err(
                "[server].threads",
                "must be at least 1 (or left out for llama-server's default)".into(),
            );
        }
        if s.port == 0 {
            err("[server].port", "must be between 1 and 65535".into());
        }
        if self.proxy_listen().parse::<std::net::SocketAddr>().is_err() {
            err(
                "[proxy].listen",
                format!(
                    "{:?} is not an address like \"0.0.0.0:4000\"",
                    self.proxy_listen()
                ),
            );
        } else if self
            .proxy_listen()
            .parse::<std::net::SocketAddr>()
            .map(|a| a.port())
            == Ok(s.port)
        {
            err(
                "[proxy].listen",
                format!("uses port {}, the same as [server].port", s.port),
            );
        }
        errors
    }
}

/// llama.cpp's KV cache types (`-ctk`/`-ctv`, common/arg.cpp).
pub const CACHE_TYPES: &[&str] = &[
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1",
];

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

#[cfg(test)]
mod tests {
    use super::*;

    const INIT: &str = include_str!("../../templates/llmctl.toml");

    fn parse(text: &str) -> anyhow::Result<ProvisionConfig> {
        ProvisionConfig::from_file(&ConfigFile::parse(text, None)?)
    }

    #[test]
    fn the_init_file_is_valid() {
        let cfg = parse(INIT).expect("llmctl init must write a valid file");
        assert_eq!(cfg.host.vmid, 103);
        assert_eq!(cfg.driver.version, "595.71.05");
        assert_eq!(cfg.driver.flavor, DriverFlavor::Open);
        assert_eq!(cfg.server.context, 32768);
        assert_eq!(cfg.server.gpu_layers, GpuLayers::Auto);
        assert_eq!(cfg.proxy_listen(), "0.0.0.0:4000");
    }

    #[test]
    fn driver_versions_must_be_exact() {
        assert!(is_exact_driver_version("595.71.05"));
        assert!(is_exact_driver_version("460.107"));
        for bad in [
            "595",
            "595.",
            "595.71.05-1",
            "v595.71.05",
            "59.71.05",
            "595.71.05.1",
            "",
        ] {
            assert!(!is_exact_driver_version(bad), "{bad}");
        }
    }

    #[test]
    fn every_bad_value_is_named_with_its_field() {
        let text = INIT
            .replace("version = \"595.71.05\"", "version = \"595\"")
            .replace("vmid = 103", "vmid = 7")
            .replace("cache_type_k = \"q4_0\"", "cache_type_k = \"q3\"")
            .replace("ubatch = 128", "ubatch = 4096")
            .replace("listen = \"0.0.0.0:4000\"", "listen = \"0.0.0.0:11434\"");
        let err = parse(&text).unwrap_err().to_string();
        for field in [
            "[driver].version: \"595\" is not an exact driver version",
            "[host].vmid: 7 is not a Proxmox guest id",
            "[server].cache_type_k: \"q3\" is not a llama.cpp cache type",
            "[server].ubatch: ubatch (4096) must be between 1 and batch (512)",
            "[proxy].listen: uses port 11434, the same as [server].port",
        ] {
            assert!(err.contains(field), "missing {field:?} in:\n{err}");
        }
    }

    #[test]
    fn typos_and_wrong_types_are_errors_naming_the_section() {
        let err = parse(&INIT.replace("context = 32768", "contxt = 32768"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[server]: unknown key `contxt`; did you mean `context`?"),
            "{err}"
        );
        let err = parse(&INIT.replace("gpu_layers = \"auto\"", "gpu_layers = \"most\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expected \"auto\" or a number of layers"),
            "{err}"
        );
        let err = parse(&INIT.replace("flavor = \"open\"", "flavor = \"closed\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[driver].flavor") && err.contains("closed"),
            "{err}"
        );
    }

    #[test]
    fn missing_sections_point_at_init() {
        let err = parse("[host]\ntarget = \"local\"\nvmid = 103\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("section [driver] is missing") && err.contains("llmctl init"),
            "{err}"
        );
    }

    #[test]
    fn gpu_layers_accepts_numbers() {
        let cfg = parse(&INIT.replace("gpu_layers = \"auto\"", "gpu_layers = 12")).unwrap();
        assert_eq!(cfg.server.gpu_layers, GpuLayers::Count(12));
    }
}
