//! `llmctl model`: GGUF inspection, verified downloads, and GPU offload planning.
//!
//! - `gguf`: the header reader; `shape`: what the planner needs from a header; `template`: chat-template
//!   capabilities; `plan`: the pure offload planner; `source`: local files, URLs and range requests;
//!   `download`: the resumable verified download. This file is the command line and the printing.

pub mod download;
pub mod gguf;
pub mod plan;
pub mod shape;
pub mod source;
pub mod template;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use crate::cli::GlobalArgs;
use crate::outcome::Outcome;

use self::download::{FetchOutcome, FetchRequest, Progress, RetryPolicy};
use self::plan::{CacheType, Hardware, Options};
use self::shape::{LayerKind, ModelShape};
use self::source::{Located, Source};

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    #[command(subcommand)]
    pub command: ModelCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ModelCommand {
    /// Read a GGUF header (local file, URL or Hugging Face owner/repo/file) and describe the model; never reads the weights.
    Inspect(InspectArgs),
    /// Download a model resumably, verify its sha256, and move it into place atomically.
    Fetch(FetchArgs),
    /// Plan llama-server's GPU offload for a model: on GPUs of --gpu MiB each (one replica per GPU, a split
    /// across them, or partial offload), or on one GPU of --vram MiB.
    Plan(PlanArgs),
}

#[derive(Debug, Clone, Args)]
pub struct InspectArgs {
    /// A .gguf file, an http(s) URL, or owner/repo[@revision]/file.gguf on Hugging Face (hf: prefix optional)
    pub model: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct FetchArgs {
    /// An http(s) URL, or owner/repo[@revision]/file.gguf on Hugging Face
    pub url: String,
    /// The file's expected SHA-256 (64 hex digits). Without it the file is not verified (and an existing
    /// DEST counts as complete).
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
    /// Where the file goes: a file path, not a directory. `<dest>.partial` holds it while downloading and
    /// `<dest>.partial.source` its URL, sha256 and size: a partial of another file is started over, not resumed.
    #[arg(long, visible_alias = "path", value_name = "PATH")]
    pub dest: PathBuf,
    /// Attempts before giving up on connection errors and 5xx answers (a host name that does not resolve
    /// fails at once).
    #[arg(long, default_value_t = 8)]
    pub attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CacheTypeArg {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q5_1")]
    Q5_1,
    #[value(name = "q5_0")]
    Q5_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "iq4_nl")]
    Iq4Nl,
    #[value(name = "q4_0")]
    Q4_0,
}

impl From<CacheTypeArg> for CacheType {
    fn from(a: CacheTypeArg) -> CacheType {
        match a {
            CacheTypeArg::F32 => CacheType::F32,
            CacheTypeArg::F16 => CacheType::F16,
            CacheTypeArg::Bf16 => CacheType::Bf16,
            CacheTypeArg::Q8_0 => CacheType::Q8_0,
            CacheTypeArg::Q5_1 => CacheType::Q5_1,
            CacheTypeArg::Q5_0 => CacheType::Q5_0,
            CacheTypeArg::Q4_1 => CacheType::Q4_1,
            CacheTypeArg::Iq4Nl => CacheType::Iq4Nl,
            CacheTypeArg::Q4_0 => CacheType::Q4_0,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// A .gguf file, an http(s) URL, or owner/repo[@revision]/file.gguf on Hugging Face (hf: prefix optional)
    pub model: String,
    /// One GPU's total memory in MiB (nvidia-smi --query-gpu=memory.total), once per GPU in nvidia-smi's order,
    /// sizes may differ (--gpu 24564 --gpu 12288). The plan chooses one llama-server per GPU that holds the model
    /// (pinned with CUDA_VISIBLE_DEVICES, port --port + the GPU's index), a split across the GPUs
    /// (--split-mode layer --tensor-split) when only their sum holds it, or partial offload.
    #[arg(long, value_name = "MIB", conflicts_with = "vram",
          value_parser = clap::value_parser!(u64).range(1..=plan::MAX_VRAM_MIB))]
    pub gpu: Vec<u64>,
    /// The GPU's total memory in MiB (nvidia-smi --query-gpu=memory.total): one llama-server on it. With --gpus N,
    /// N equal GPUs together, one llama-server split across them, never replicas: the older form, kept for
    /// scripts; prefer --gpu MIB once per GPU, which also considers one replica per GPU.
    #[arg(long, value_name = "MIB", required_unless_present = "gpu",
          value_parser = clap::value_parser!(u64).range(1..=plan::MAX_VRAM_MIB))]
    pub vram: Option<u64>,
    /// RAM llama-server may use, in MiB (the container's memory) [default: this machine's memory, MemTotal in
    /// /proc/meminfo]
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..=plan::MAX_RAM_MIB))]
    pub ram: Option<u64>,
    /// Context length, at most 2147483392 (llama.cpp's 32-bit -c) and 8 times the model's training context
    /// [default: [server].context of llmctl.toml when there is one; else 32768, or the model's training context
    /// if smaller]
    #[arg(long, visible_alias = "context", value_name = "N", value_parser = clap::value_parser!(u64).range(1..=plan::MAX_CTX))]
    pub ctx: Option<u64>,
    /// KV cache type for K and V [default: [server].cache_type_k/_v of llmctl.toml when there is one, as
    /// provision runs llama-server; else q8_0]
    #[arg(long, value_enum)]
    pub cache_type: Option<CacheTypeArg>,
    /// Micro-batch size (-ub); compute buffers grow with it [default: [server].ubatch of llmctl.toml when there
    /// is one; else 512]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=plan::MAX_UBATCH))]
    pub ubatch: Option<u64>,
    /// With --vram: how many equal GPUs --vram is, together: the layers are split across them, and each keeps its
    /// own CUDA context (--reserve) and compute buffers (the older form; prefer --gpu MIB once per GPU).
    #[arg(long, value_name = "N", default_value_t = 1, conflicts_with = "gpu",
          value_parser = clap::value_parser!(u64).range(1..=16))]
    pub gpus: u64,
    /// With --gpu: the port of the replica on GPU 0 (GPU i's replica listens on PORT + i), or of the one
    /// llama-server of a split [default: [server].port of llmctl.toml when there is one; else 11434]
    #[arg(long, value_name = "PORT", requires = "gpu")]
    pub port: Option<u16>,
    /// VRAM kept free for the CUDA context, in MiB, on each GPU (less than --vram and each --gpu).
    #[arg(long, value_name = "MIB", default_value_t = plan::DEFAULT_RESERVE_MIB,
          value_parser = clap::value_parser!(u64).range(0..=plan::MAX_VRAM_MIB - 1))]
    pub reserve: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(global: &GlobalArgs, args: ModelArgs) -> Result<Outcome> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut out = std::io::stdout().lock();
    match args.command {
        ModelCommand::Inspect(a) => {
            let located = runtime.block_on(locate(&a.model))?;
            let report = inspect_report(&a.model, &located)?;
            if a.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                out.write_all(render_inspect(&report).as_bytes())?;
            }
        }
        ModelCommand::Plan(a) => {
            let located = runtime.block_on(locate(&a.model))?;
            let shape = shape::from_header(&located.header)?;
            let (opts, settings, server_port) = plan_options(global, &a)?;
            // Without --ram, this machine's memory: a plan against unlimited RAM would accept anything.
            let (ram_mib, machine) = match a.ram {
                Some(r) => (r, false),
                None => {
                    let total = std::fs::read_to_string(MEMINFO)
                        .ok()
                        .as_deref()
                        .and_then(mem_total_mib)
                        .with_context(|| {
                            format!(
                                "--ram is not given and this machine's memory is unknown (no MemTotal in \
                                 {MEMINFO}); give --ram with the container's memory in MiB"
                            )
                        })?;
                    (total, true)
                }
            };
            let refused = |e: plan::PlanError| match e {
                e @ plan::PlanError::DoesNotFit { .. } if machine => anyhow::anyhow!(
                    "{e} (RAM: this machine's {ram_mib} MiB, MemTotal in {MEMINFO}, as --ram was not given)"
                ),
                e => e.into(),
            };
            let notes = |p: &mut plan::Plan| {
                if let Some(note) = settings.clone() {
                    p.reasoning.insert(0, note);
                }
                if machine {
                    let at = p
                        .reasoning
                        .iter()
                        .position(|r| r.starts_with("budget:"))
                        .map_or(p.reasoning.len(), |i| i + 1);
                    p.reasoning.insert(
                        at,
                        format!(
                            "RAM: --ram not given, so this machine's memory is the budget (MemTotal in \
                             {MEMINFO}: {ram_mib} MiB); give --ram with the container's memory to plan for \
                             another machine"
                        ),
                    );
                }
            };
            if let Some(vram) = a.vram {
                let hw = Hardware {
                    vram_mib: vram,
                    ram_mib: Some(ram_mib),
                };
                let mut p = plan::plan(&shape, &hw, &opts).map_err(refused)?;
                notes(&mut p);
                if a.json {
                    writeln!(out, "{}", serde_json::to_string_pretty(&p)?)?;
                } else {
                    out.write_all(render_plan(&p).as_bytes())?;
                }
            } else {
                let port = a.port.unwrap_or(server_port);
                let mut p =
                    plan::plan_gpus(&shape, &a.gpu, Some(ram_mib), &opts, port).map_err(refused)?;
                notes(&mut p.plan);
                if a.json {
                    writeln!(out, "{}", serde_json::to_string_pretty(&p)?)?;
                } else {
                    out.write_all(render_gpu_plan(&p).as_bytes())?;
                }
            }
        }
        ModelCommand::Fetch(a) => {
            let url = Source::parse_remote(&a.url)?;
            let verified = if a.sha256.is_some() {
                "sha256 verified"
            } else {
                "not verified (no --sha256)"
            };
            let req = FetchRequest {
                url,
                sha256: a.sha256,
                dest: a.dest,
            };
            let policy = RetryPolicy {
                attempts: a.attempts,
                ..RetryPolicy::default()
            };
            let client = http_client()?;
            let progress: Box<dyn Progress> = if crate::term::fancy_stderr() {
                Box::new(BarProgress::new())
            } else {
                Box::new(LineProgress::default())
            };
            let outcome =
                runtime.block_on(download::fetch(&client, &req, &policy, progress.as_ref()))?;
            match outcome {
                FetchOutcome::AlreadyPresent => {
                    writeln!(out, "{}: already present, {verified}", req.dest.display())?
                }
                FetchOutcome::Downloaded {
                    bytes,
                    resumed_from,
                    ..
                } => writeln!(
                    out,
                    "{}: {bytes} bytes, {verified}{}",
                    req.dest.display(),
                    if resumed_from > 0 {
                        format!(" (resumed from byte {resumed_from})")
                    } else {
                        String::new()
                    }
                )?,
            }
        }
    }
    Ok(Outcome::Success)
}

/// The plan's options: the flags, else `[server]` of llmctl.toml (what provision runs llama-server with) when a
/// config file is there, else the planner's defaults. The note says what came from the file.
/// The third value is the port of the first llama-server: `[server].port`, or its default.
fn plan_options(global: &GlobalArgs, a: &PlanArgs) -> Result<(Options, Option<String>, u16)> {
    let file = crate::config::ConfigFile::load(global.config.as_deref())?;
    let defaults = Options::default();
    let mut opts = Options {
        ctx: a.ctx,
        cache_type: a.cache_type.map_or(defaults.cache_type, CacheType::from),
        cache_type_v: None,
        ubatch: a.ubatch.unwrap_or(defaults.ubatch),
        reserve_mib: a.reserve,
        gpus: a.gpus,
    };
    let Some(path) = file.path.clone() else {
        return Ok((opts, None, crate::config::ServerSection::default().port));
    };
    // Provision runs with the section's defaults when it is absent, and so does the plan.
    let server: crate::config::ServerSection = file.section_or_default()?;
    // A value provision would refuse is refused here too, in the same words.
    file.report(&server.check())?;
    let cache = |field: &str, value: &str| {
        CacheType::from_flag(value).with_context(|| {
            format!(
                "{}: [server].{field} = {value:?} is not a llama.cpp cache type; one of {}",
                path.display(),
                CacheType::ALL.map(CacheType::flag).join(", ")
            )
        })
    };
    let mut taken = Vec::new();
    if a.ctx.is_none() {
        opts.ctx = Some(u64::from(server.context));
        taken.push(format!("context {}", server.context));
    }
    if a.cache_type.is_none() {
        opts.cache_type = cache("cache_type_k", &server.cache_type_k)?;
        let v = cache("cache_type_v", &server.cache_type_v)?;
        opts.cache_type_v = (v != opts.cache_type).then_some(v);
        taken.push(format!(
            "cache {} K / {} V",
            server.cache_type_k, server.cache_type_v
        ));
    }
    if a.ubatch.is_none() {
        opts.ubatch = u64::from(server.ubatch);
        taken.push(format!("-ub {}", server.ubatch));
    }
    let note = (!taken.is_empty()).then(|| {
        format!(
            "settings from [server] of {} (as provision runs llama-server; flags override them): {}",
            path.display(),
            taken.join(", ")
        )
    });
    Ok((opts, note, server.port))
}

const MEMINFO: &str = "/proc/meminfo";

/// `MemTotal` of a /proc/meminfo text, in MiB.
pub fn mem_total_mib(meminfo: &str) -> Option<u64> {
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024).filter(|&m| m > 0)
}

pub fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent(concat!("llmctl/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120))
        .build()
        .context("cannot build the HTTP client")
}

/// Reads the header of a local file or a remote one (range requests).
pub async fn locate(model: &str) -> Result<Located> {
    match Source::parse(model)? {
        Source::Local(path) => {
            if !path.exists() {
                anyhow::bail!(
                    "{} does not exist; give a .gguf file, an http(s) URL, or owner/repo/file.gguf on Hugging Face",
                    path.display()
                );
            }
            source::read_local(&path)
        }
        Source::Remote(url) if source::is_bare_hf(model) => {
            source::read_remote(&http_client()?, &url)
                .await
                .with_context(|| {
                    format!(
                        "`{model}` is not a local file, so it was read as the Hugging Face file owner/repo/file ({url})"
                    )
                })
        }
        Source::Remote(url) => source::read_remote(&http_client()?, &url).await,
    }
}

#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub source: String,
    pub gguf_version: u32,
    pub architecture: String,
    pub name: Option<String>,
    pub layers: u32,
    pub context_length: Option<u64>,
    pub embedding_length: u64,
    pub vocab_size: u64,
    pub experts: Option<Experts>,
    pub attention: Attention,
    pub quantization: Vec<QuantUsage>,
    pub sizes: Sizes,
    pub chat_template: Option<template::TemplateCaps>,
    pub tensor_count: u64,
    pub metadata_count: u64,
}

#[derive(Debug, Serialize)]
pub struct Experts {
    pub count: u64,
    pub used_per_token: u64,
}

#[derive(Debug, Serialize)]
pub struct Attention {
    pub heads: u64,
    /// Distinct KV head counts across attention layers (more than one when it varies per layer).
    pub kv_heads: Vec<u64>,
    pub head_dim_k: Vec<u64>,
    pub head_dim_v: Vec<u64>,
    pub sliding_window: Option<u64>,
    pub sliding_window_source: Option<String>,
    pub layer_kinds: Vec<KindCount>,
}

#[derive(Debug, Serialize)]
pub struct KindCount {
    pub kind: LayerKind,
    pub layers: u64,
}

#[derive(Debug, Serialize)]
pub struct QuantUsage {
    #[serde(rename = "type")]
    pub ggml_type: String,
    pub tensors: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Sizes {
    pub total_bytes: u64,
    pub layer_bytes: u64,
    pub expert_bytes: u64,
    pub input_bytes: u64,
    pub output_bytes: u64,
    /// Start of the data section and its size per the header (tensor sizes plus alignment padding).
    pub data_offset: u64,
    pub data_bytes: u64,
    pub file_bytes: Option<u64>,
    pub per_layer: Vec<LayerSize>,
}

#[derive(Debug, Serialize)]
pub struct LayerSize {
    pub index: u32,
    pub kind: LayerKind,
    pub weight_bytes: u64,
    pub expert_bytes: u64,
}

fn distinct(values: impl Iterator<Item = u64>) -> Vec<u64> {
    let mut v: Vec<u64> = values.collect();
    v.sort_unstable();
    v.dedup();
    v
}

pub fn inspect_report(source: &str, located: &Located) -> Result<InspectReport> {
    let h = &located.header;
    let s: ModelShape = shape::from_header(h)?;
    if let Some(size) = located.file_size
        && size < h.min_file_size()
    {
        anyhow::bail!(
            "{source} is truncated: its header describes {} bytes but the file has {size}; download it again",
            h.min_file_size()
        );
    }
    let attn = s
        .layers
        .iter()
        .filter(|l| matches!(l.kind, LayerKind::FullAttention | LayerKind::SlidingWindow));
    let kinds = [
        LayerKind::FullAttention,
        LayerKind::SlidingWindow,
        LayerKind::Recurrent,
        LayerKind::SharedKv,
        LayerKind::Stateless,
    ];
    let mut quantization: Vec<QuantUsage> = s
        .types
        .iter()
        .map(|(t, u)| QuantUsage {
            ggml_type: t.clone(),
            tensors: u.tensors,
            bytes: u.bytes,
        })
        .collect();
    quantization.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.ggml_type.cmp(&b.ggml_type)));
    Ok(InspectReport {
        source: source.to_string(),
        gguf_version: h.version,
        architecture: s.architecture.clone(),
        name: s.name.clone(),
        layers: s.n_layer,
        context_length: s.context_length,
        embedding_length: s.n_embd,
        vocab_size: s.n_vocab,
        experts: (s.expert_count > 0).then_some(Experts {
            count: s.expert_count,
            used_per_token: s.expert_used_count,
        }),
        attention: Attention {
            heads: s.n_head,
            kv_heads: distinct(attn.clone().map(|l| l.n_head_kv)),
            head_dim_k: distinct(attn.clone().map(|l| l.head_dim_k)),
            head_dim_v: distinct(attn.map(|l| l.head_dim_v)),
            sliding_window: s.sliding_window,
            sliding_window_source: s.sliding_window_source.clone(),
            layer_kinds: kinds
                .iter()
                .map(|&k| KindCount {
                    kind: k,
                    layers: s.layers.iter().filter(|l| l.kind == k).count() as u64,
                })
                .filter(|k| k.layers > 0)
                .collect(),
        },
        quantization,
        sizes: Sizes {
            total_bytes: s.total_bytes,
            layer_bytes: s.layer_bytes(),
            expert_bytes: s.expert_bytes(),
            input_bytes: s.input_bytes,
            output_bytes: s.output_bytes,
            data_offset: h.data_offset,
            data_bytes: h.data_size,
            file_bytes: located.file_size,
            per_layer: s
                .layers
                .iter()
                .map(|l| LayerSize {
                    index: l.index,
                    kind: l.kind,
                    weight_bytes: l.weight_bytes,
                    expert_bytes: l.expert_bytes,
                })
                .collect(),
        },
        chat_template: s.template.clone(),
        tensor_count: s.tensor_count,
        metadata_count: h.metadata.len() as u64,
    })
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn kind_name(k: LayerKind) -> &'static str {
    match k {
        LayerKind::FullAttention => "full attention",
        LayerKind::SlidingWindow => "sliding window",
        LayerKind::Recurrent => "recurrent",
        LayerKind::SharedKv => "shared KV",
        LayerKind::Stateless => "no attention",
    }
}

fn list(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join("/")
}

pub fn render_inspect(r: &InspectReport) -> String {
    let mut o = String::new();
    let mut line = |k: &str, v: String| o.push_str(&format!("{k:<16} {v}\n"));
    line(
        "model",
        r.name.clone().unwrap_or_else(|| "(unnamed)".into()),
    );
    line("source", r.source.clone());
    line(
        "architecture",
        format!("{} (GGUF v{})", r.architecture, r.gguf_version),
    );
    line("layers", r.layers.to_string());
    line(
        "type",
        match &r.experts {
            Some(e) if e.count > 1 => format!(
                "MoE: {} experts, {} used per token",
                e.count, e.used_per_token
            ),
            _ => "dense".into(),
        },
    );
    line(
        "context",
        r.context_length
            .map_or("unknown".into(), |c| format!("{c} tokens (training)")),
    );
    line(
        "embedding",
        format!("{} (vocabulary {})", r.embedding_length, r.vocab_size),
    );
    let a = &r.attention;
    line(
        "attention",
        format!(
            "{} heads, {} KV heads, head dim K {} / V {}",
            a.heads,
            list(&a.kv_heads),
            list(&a.head_dim_k),
            list(&a.head_dim_v)
        ),
    );
    line(
        "layer kinds",
        a.layer_kinds
            .iter()
            .map(|k| format!("{} {}", k.layers, kind_name(k.kind)))
            .collect::<Vec<_>>()
            .join(", "),
    );
    if let Some(src) = &a.sliding_window_source {
        line("sliding window", src.clone());
    }
    line(
        "quantization",
        r.quantization
            .iter()
            .map(|q| format!("{} ×{} ({})", q.ggml_type, q.tensors, human(q.bytes)))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let s = &r.sizes;
    line(
        "size",
        format!(
            "{} in {} tensors: layers {} (routed experts {}), input {}, output {}",
            human(s.total_bytes),
            r.tensor_count,
            human(s.layer_bytes),
            human(s.expert_bytes),
            human(s.input_bytes),
            human(s.output_bytes)
        ),
    );
    line(
        "chat template",
        match &r.chat_template {
            None => "none in the file".into(),
            Some(t) => format!(
                "tools: {}, thinking: {}{}",
                if t.tools { "yes" } else { "no" },
                if t.thinking { "yes" } else { "no" },
                if t.evidence.is_empty() {
                    String::new()
                } else {
                    format!(" (uses {})", t.evidence.join(", "))
                }
            ),
        },
    );
    o.push_str("per layer:\n");
    // Consecutive layers that look the same are printed as one range.
    let mut i = 0;
    let layers = &s.per_layer;
    while i < layers.len() {
        let l = &layers[i];
        let mut j = i;
        while j + 1 < layers.len()
            && layers[j + 1].kind == l.kind
            && layers[j + 1].weight_bytes == l.weight_bytes
            && layers[j + 1].expert_bytes == l.expert_bytes
        {
            j += 1;
        }
        let range = if i == j {
            format!("blk.{i}")
        } else {
            format!("blk.{i}-{j}")
        };
        let experts = if l.expert_bytes > 0 {
            format!(" + experts {}", human(l.expert_bytes))
        } else {
            String::new()
        };
        o.push_str(&format!(
            "  {range:<12} {:<15} {}{experts}\n",
            kind_name(l.kind),
            human(l.weight_bytes)
        ));
        i = j + 1;
    }
    o
}

pub fn render_plan(p: &plan::Plan) -> String {
    let cache = match p.cache_type_v {
        Some(v) => format!("{} K / {} V", p.cache_type.flag(), v.flag()),
        None => p.cache_type.flag().to_string(),
    };
    let mut o = format!(
        "plan for {} ({} tokens of context, {cache} KV cache)\n",
        p.model, p.ctx
    );
    for r in &p.reasoning {
        o.push_str(&format!("- {r}\n"));
    }
    o.push_str(&format!(
        "llama-server flags: {}\n",
        crate::shell::join(&p.flags)
    ));
    o
}

/// The text of a plan for several GPUs: the one-GPU plan's lines, then each llama-server to run.
pub fn render_gpu_plan(p: &plan::GpuPlan) -> String {
    let mut o = render_plan(&p.plan);
    let count = p.servers.len();
    for (k, s) in p.servers.iter().enumerate() {
        let env: Vec<String> = s.env.iter().map(|(n, v)| format!("{n}={v}")).collect();
        let what = match p.layout {
            plan::Layout::Replicas => format!(
                "replica {} of {count} on GPU {}",
                k + 1,
                s.gpus.first().copied().unwrap_or(0)
            ),
            layout => format!(
                "{} over GPU{} {}",
                layout.name(),
                if s.gpus.len() == 1 { "" } else { "s" },
                s.gpus
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        o.push_str(&format!(
            "llama-server, {what}, port {}: {} llama-server {}\n",
            s.port,
            env.join(" "),
            crate::shell::join(&s.args)
        ));
    }
    o
}

/// An indicatif bar, for a terminal.
struct BarProgress {
    bar: indicatif::ProgressBar,
}

impl BarProgress {
    fn new() -> Self {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bytes}/{total_bytes} [{wide_bar}] {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        BarProgress { bar }
    }
}

impl Progress for BarProgress {
    fn begin(&self, total: Option<u64>, done: u64) {
        if let Some(t) = total {
            self.bar.set_length(t);
        }
        self.bar.set_position(done);
    }
    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }
    fn note(&self, message: &str) {
        self.bar.println(message);
    }
    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Plain lines every 10% (or 256 MiB when the size is unknown), for logs and pipes.
#[derive(Default)]
struct LineProgress {
    state: Mutex<(Option<u64>, u64, u64)>,
}

impl Progress for LineProgress {
    fn begin(&self, total: Option<u64>, done: u64) {
        if let Ok(mut s) = self.state.lock() {
            *s = (total, done, done);
        }
    }
    fn advance(&self, bytes: u64) {
        let Ok(mut s) = self.state.lock() else { return };
        let (total, done, last) = &mut *s;
        *done += bytes;
        let step = total.map_or(256 << 20, |t| (t / 10).max(1));
        if *done - *last >= step {
            *last = *done;
            match total {
                Some(t) => eprintln!(
                    "downloaded {} of {} ({}%)",
                    human(*done),
                    human(*t),
                    *done * 100 / *t.max(&mut 1)
                ),
                None => eprintln!("downloaded {}", human(*done)),
            }
        }
    }
    fn note(&self, message: &str) {
        eprintln!("{message}");
    }
    fn finish(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_mib() {
        let text = "MemFree:  1000 kB\nMemTotal:        65856312 kB\nSwapTotal: 0 kB\n";
        assert_eq!(mem_total_mib(text), Some(64312));
        assert_eq!(mem_total_mib("MemTotal: 12 MB\n"), None);
        assert_eq!(mem_total_mib("MemTotal: 100 kB\n"), None);
        assert_eq!(mem_total_mib(""), None);
    }
}
