//! The two systemd units provision installs in the container, rendered with tera from `templates/`.
//! The templates are compiled into the binary so an installed llmctl renders exactly what it was tested with.

use anyhow::{Context, Result};
use tera::Tera;

use super::config::{GpuLayers, ProvisionConfig};

const LLAMA_SERVER_UNIT: &str = include_str!("../../templates/llama-server.service");
const PROXY_UNIT: &str = include_str!("../../templates/llmctl-proxy.service");

pub const LLAMA_SERVER_UNIT_PATH: &str = "/etc/systemd/system/llama-server.service";
pub const PROXY_UNIT_PATH: &str = "/etc/systemd/system/llmctl-proxy.service";
/// Where provision installs the llmctl binary inside the container.
pub const LLMCTL_BIN: &str = "/usr/local/bin/llmctl";

/// Offload decided for llama-server: from `[server]` directly, or from the planner when `gpu_layers = "auto"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offload {
    pub gpu_layers: GpuLayersArg,
    pub n_cpu_moe: Option<u32>,
    /// `--tensor-split` of one llama-server across several GPUs (the planner's `split` or `partial` layout over
    /// more than one GPU), with `--split-mode layer`.
    pub tensor_split: Option<String>,
}

/// One llama-server the installation runs: the single `llama-server` unit, or the replica pinned to one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlamaServer {
    /// None: the single `llama-server` unit (every GPU it sees); Some(i): the replica `llama-server-gpu<i>`.
    pub gpu: Option<u32>,
    pub port: u16,
    /// `Environment=` of its unit, in order (a replica's `CUDA_DEVICE_ORDER`, `CUDA_VISIBLE_DEVICES`).
    pub env: Vec<(String, String)>,
}

impl LlamaServer {
    pub fn unit(&self) -> String {
        match self.gpu {
            None => crate::host::facts::LLAMA_UNIT.to_string(),
            Some(i) => crate::host::facts::replica_unit(i),
        }
    }
    pub fn path(&self) -> String {
        match self.gpu {
            None => LLAMA_SERVER_UNIT_PATH.to_string(),
            Some(i) => crate::host::facts::replica_unit_path(i),
        }
    }
    pub fn health_url(&self) -> String {
        format!("http://127.0.0.1:{}/health", self.port)
    }
}

/// The llama-servers of an installation and their offload: one `llama-server` unit, or (the planner's `replicas`
/// layout over more than one GPU) one unit per GPU, each with the same offload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub offload: Offload,
    pub servers: Vec<LlamaServer>,
}

impl Layout {
    /// One llama-server on `[server].port` with this offload.
    pub fn single(cfg: &ProvisionConfig, offload: Offload) -> Self {
        Layout {
            offload,
            servers: vec![LlamaServer {
                gpu: None,
                port: cfg.server.port,
                env: Vec::new(),
            }],
        }
    }
    /// One llama-server with the offload `[server]` asks for, without a plan.
    pub fn of_config(cfg: &ProvisionConfig) -> Self {
        Layout::single(cfg, Offload::from_config(cfg))
    }
    /// The upstreams serve-proxy routes across: each server on this host.
    pub fn upstreams(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|s| format!("http://127.0.0.1:{}", s.port))
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuLayersArg {
    /// llama-server's own `auto` (its `--fit` logic).
    Auto,
    Count(u32),
}

impl Offload {
    /// The offload `[server]` asks for, without a plan: `auto` stays llama-server's own `auto`.
    pub fn from_config(cfg: &ProvisionConfig) -> Self {
        Offload {
            gpu_layers: match cfg.server.gpu_layers {
                GpuLayers::Auto => GpuLayersArg::Auto,
                GpuLayers::Count(n) => GpuLayersArg::Count(n),
            },
            n_cpu_moe: cfg.server.n_cpu_moe,
            tensor_split: None,
        }
    }
}

/// llama-server's argv, from `[server]`, `[model]` and the offload. Pure: the plan shows it, the unit runs it.
pub fn llama_server_argv(cfg: &ProvisionConfig, offload: &Offload, port: u16) -> Vec<String> {
    let s = &cfg.server;
    let bin = format!(
        "{}/build/bin/llama-server",
        cfg.llama_cpp.install_dir.trim_end_matches('/')
    );
    let mut argv: Vec<String> = vec![bin, "-m".into(), cfg.model.dest.clone()];
    let mut push = |flag: &str, value: String| {
        argv.push(flag.to_string());
        argv.push(value);
    };
    push("--host", s.host.clone());
    push("--port", port.to_string());
    push("-c", s.context.to_string());
    push("--batch-size", s.batch.to_string());
    push("--ubatch-size", s.ubatch.to_string());
    push("--cache-type-k", s.cache_type_k.clone());
    push("--cache-type-v", s.cache_type_v.clone());
    push("-fa", s.flash_attn.clone());
    if let Some(t) = s.threads {
        push("-t", t.to_string());
    }
    push(
        "-ngl",
        match offload.gpu_layers {
            GpuLayersArg::Auto => "auto".to_string(),
            GpuLayersArg::Count(n) => n.to_string(),
        },
    );
    if let Some(n) = offload.n_cpu_moe {
        push("--n-cpu-moe", n.to_string());
    }
    if let Some(split) = &offload.tensor_split {
        push("--split-mode", "layer".into());
        push("--tensor-split", split.clone());
    }
    push("--reasoning", s.reasoning.clone());
    // Claude Code sends tools; llama.cpp parses tool calls only with its Jinja chat templates.
    argv.push("--jinja".into());
    // Prometheus counters at /metrics (tokens and seconds of prefill and generation, busy slots): `llmctl
    // status` reads them. Off by default in llama-server; they cost nothing until scraped.
    argv.push("--metrics".into());
    if !s.mmap {
        // Since b8xxx llama.cpp spells --no-mmap as a load mode; the pinned ref decides the flag.
        argv.push("--load-mode".into());
        argv.push("none".into());
    }
    argv.extend(s.extra_args.iter().cloned());
    argv
}

/// `llmctl serve-proxy`'s argv: every `[proxy]` setting, as flags (the container has no llmctl.toml, and the
/// unit is then all there is to read), the provisioned defaults written out too. No key is in it: the unit
/// passes credential files. The upstream is `[proxy].upstream` when set, else the container's own llama-server.
pub fn proxy_argv(cfg: &ProvisionConfig, layout: &Layout) -> Vec<String> {
    let p = &cfg.proxy;
    let mut argv = vec![
        LLMCTL_BIN.to_string(),
        "serve-proxy".into(),
        "--listen".into(),
        cfg.proxy_listen().to_string(),
    ];
    let (upstreams, peers) = super::config::provisioned_replicas(p, &layout.upstreams());
    for url in upstreams {
        argv.push("--upstream".into());
        argv.push(url);
    }
    // The other proxies of the fleet: each takes this proxy's own key (--api-key-file, one key for the fleet).
    for url in peers {
        argv.push("--peer".into());
        argv.push(url);
    }
    if cfg.proxy_key_file().is_some() {
        argv.push("--api-key-file".into());
        // Expanded by systemd at start: the private copy LoadCredential= made of the key file.
        argv.push("${CREDENTIALS_DIRECTORY}/proxy-api-key".into());
    }
    if p.upstream_api_key_file.is_some() {
        argv.push("--upstream-api-key-file".into());
        argv.push("${CREDENTIALS_DIRECTORY}/upstream-api-key".into());
    }
    let mut push = |flag: &str, value: Option<String>| {
        if let Some(v) = value {
            argv.push(flag.to_string());
            argv.push(v);
        }
    };
    push("--model", p.model.clone());
    push("--max-body-bytes", p.max_body_bytes.map(|n| n.to_string()));
    push(
        "--ping-interval",
        p.ping_interval_secs.map(|n| n.to_string()),
    );
    push(
        "--connect-timeout",
        p.connect_timeout_secs.map(|n| n.to_string()),
    );
    push(
        "--first-byte-timeout",
        p.first_byte_timeout_secs.map(|n| n.to_string()),
    );
    push(
        "--shutdown-grace",
        p.shutdown_grace_secs.map(|n| n.to_string()),
    );
    push(
        "--queue-timeout",
        p.queue_timeout_secs.map(|n| n.to_string()),
    );
    for (prefix, model) in &p.models {
        argv.push("--model-map".into());
        argv.push(format!("{prefix}={model}"));
    }
    argv
}

/// Quotes argv for an `ExecStart=` line. systemd splits on whitespace, honours double quotes and C escapes, and
/// expands `%` specifiers: so every argument is double-quoted when needed, `\` and `"` escaped, `%` doubled.
/// `${VAR}` is left for systemd to expand on purpose (credentials directory).
pub fn systemd_exec_line(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let escaped = a
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('%', "%%");
            let plain = !escaped.is_empty()
                && escaped
                    .bytes()
                    .all(|b| !b.is_ascii_whitespace() && b != b'\'' && b != b'"');
            if plain {
                escaped
            } else {
                format!("\"{escaped}\"")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn render(name: &str, template: &str, ctx: &tera::Context) -> Result<String> {
    let mut tera = Tera::default();
    tera.add_raw_template(name, template)
        .with_context(|| format!("template {name} does not parse"))?;
    tera.render(name, ctx)
        .with_context(|| format!("cannot render {name}"))
}

/// The units name no config file: the same settings from another checkout or path render the same bytes, so
/// `provision --check` from anywhere agrees with what is installed.
pub fn render_llama_server_unit(
    cfg: &ProvisionConfig,
    offload: &Offload,
    server: &LlamaServer,
) -> Result<String> {
    let mut ctx = tera::Context::new();
    ctx.insert(
        "model_file",
        cfg.model.dest.rsplit('/').next().unwrap_or(&cfg.model.dest),
    );
    ctx.insert(
        "gpu",
        &server.gpu.map(|i| i.to_string()).unwrap_or_default(),
    );
    ctx.insert(
        "exec_start",
        &systemd_exec_line(&llama_server_argv(cfg, offload, server.port)),
    );
    ctx.insert(
        "environment",
        &server
            .env
            .iter()
            .map(|(k, v)| format!("Environment={k}={v}"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    render("llama-server.service", LLAMA_SERVER_UNIT, &ctx)
}

pub fn render_proxy_unit(cfg: &ProvisionConfig, layout: &Layout) -> Result<String> {
    let mut ctx = tera::Context::new();
    ctx.insert("exec_start", &systemd_exec_line(&proxy_argv(cfg, layout)));
    ctx.insert(
        "llama_units",
        &layout
            .servers
            .iter()
            .map(|s| format!("{}.service", s.unit()))
            .collect::<Vec<_>>()
            .join(" "),
    );
    ctx.insert("api_key_file", &cfg.proxy_key_file());
    ctx.insert(
        "upstream_api_key_file",
        &cfg.proxy
            .upstream_api_key_file
            .as_ref()
            .map(|p| p.display().to_string()),
    );
    render("llmctl-proxy.service", PROXY_UNIT, &ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigFile;

    fn guide_config() -> ProvisionConfig {
        let text = include_str!("../../templates/llmctl.toml");
        ProvisionConfig::from_file(&ConfigFile::parse(text, None).unwrap()).unwrap()
    }

    #[test]
    fn llama_server_unit_matches_the_guide() {
        let cfg = guide_config();
        let offload = Offload {
            gpu_layers: GpuLayersArg::Count(30),
            n_cpu_moe: Some(18),
            tensor_split: None,
        };
        insta::assert_snapshot!(
            render_llama_server_unit(&cfg, &offload, &Layout::of_config(&cfg).servers[0]).unwrap()
        );
    }

    #[test]
    fn proxy_unit_keeps_the_key_out_of_argv() {
        let cfg = guide_config();
        let unit = render_proxy_unit(&cfg, &Layout::of_config(&cfg)).unwrap();
        insta::assert_snapshot!(unit);
        assert!(unit.contains("LoadCredential=proxy-api-key:/etc/llmctl/proxy-api-key"));
        assert!(!unit.contains("upstream-api-key"));
    }

    #[test]
    fn every_proxy_setting_reaches_the_unit() {
        let text = include_str!("../../templates/llmctl.toml").replace(
            "[proxy]\n",
            "[proxy]\nmodel = \"qwen\"\nmax_body_bytes = 1000\nping_interval_secs = 2.5\n\
             connect_timeout_secs = 3\nfirst_byte_timeout_secs = 900\nshutdown_grace_secs = 30\n\
             upstream_api_key_file = \"/etc/llmctl/upstream-key\"\n\
             models = { \"claude-haiku\" = \"small\", \"claude-opus\" = \"big\" }\n",
        );
        let cfg = ProvisionConfig::from_file(&ConfigFile::parse(&text, None).unwrap()).unwrap();
        let argv = proxy_argv(&cfg, &Layout::of_config(&cfg)).join(" ");
        for expected in [
            "--model qwen",
            "--max-body-bytes 1000",
            "--ping-interval 2.5",
            "--connect-timeout 3",
            "--first-byte-timeout 900",
            "--shutdown-grace 30",
            "--upstream-api-key-file ${CREDENTIALS_DIRECTORY}/upstream-api-key",
            "--model-map claude-haiku=small --model-map claude-opus=big",
        ] {
            assert!(argv.contains(expected), "{expected:?} missing from {argv}");
        }
        let unit = render_proxy_unit(&cfg, &Layout::of_config(&cfg)).unwrap();
        assert!(
            unit.contains("LoadCredential=upstream-api-key:/etc/llmctl/upstream-key"),
            "{unit}"
        );
        // And serve-proxy accepts exactly that command line.
        use clap::Parser;
        let args = crate::cli::Cli::try_parse_from(proxy_argv(&cfg, &Layout::of_config(&cfg)));
        assert!(args.is_ok(), "{:?}", args.err());
    }

    #[test]
    fn units_do_not_depend_on_where_the_config_file_is() {
        let cfg = guide_config();
        let mut elsewhere =
            ConfigFile::parse(include_str!("../../templates/llmctl.toml"), None).unwrap();
        elsewhere.path = Some("/somewhere/else/llmctl.toml".into());
        let other = ProvisionConfig::from_file(&elsewhere).unwrap();
        assert_eq!(
            render_proxy_unit(&cfg, &Layout::of_config(&cfg)).unwrap(),
            render_proxy_unit(&other, &Layout::of_config(&other)).unwrap()
        );
        let offload = Offload::from_config(&cfg);
        assert_eq!(
            render_llama_server_unit(&cfg, &offload, &Layout::of_config(&cfg).servers[0]).unwrap(),
            render_llama_server_unit(&other, &offload, &Layout::of_config(&other).servers[0])
                .unwrap()
        );
    }

    #[test]
    fn exec_line_quotes_what_systemd_would_split_or_expand() {
        let argv: Vec<String> = ["/bin/x", "a b", "50%", "say \"hi\"", "plain", "c:\\d"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            systemd_exec_line(&argv),
            r#"/bin/x "a b" 50%% "say \"hi\"" plain c:\\d"#
        );
    }

    #[test]
    fn auto_offload_is_passed_as_auto() {
        let cfg = guide_config();
        let argv = llama_server_argv(&cfg, &Offload::from_config(&cfg), cfg.server.port);
        let i = argv.iter().position(|a| a == "-ngl").unwrap();
        assert_eq!(argv[i + 1], "auto");
        assert!(!argv.contains(&"--n-cpu-moe".to_string()));
        assert!(
            argv.contains(&"--metrics".to_string()),
            "llmctl status reads /metrics"
        );
    }
}
