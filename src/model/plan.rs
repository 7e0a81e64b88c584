//! The offload plan: which parts of a model go to VRAM and which stay in RAM for llama-server, so that it
//! fits without running out of memory and reads as few bytes as possible from (slow) system RAM per token.
//! Pure functions; the memory model and its constants are explained in docs/model-planning.md.

use serde::Serialize;

use super::gguf::GgmlType;
use super::shape::{LayerKind, LayerShape, ModelShape};

const MIB: u64 = 1 << 20;
/// llama.cpp pads the context (and the sliding-window cache) to 256 cells.
const CTX_PAD: u64 = 256;
/// Default context: Claude Code's system prompt alone is ~24K tokens (seed guide, Part 3).
pub const DEFAULT_CTX: u64 = 32768;
/// CUDA context, cuBLAS workspace and driver allocations that never show up as llama.cpp buffers:
/// 300-500 MiB on current drivers; 512 keeps a margin (8192 MiB card → 7680 MiB, the guide's "~7.5 GB").
pub const DEFAULT_RESERVE_MIB: u64 = 512;
/// llama-server's process outside its buffers: binary, CUDA host libraries, tokenizer, HTTP server.
const RAM_OVERHEAD: u64 = 512 * MIB;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheType {
    F16,
    Q8_0,
    Q4_0,
}

impl CacheType {
    pub fn ggml(self) -> GgmlType {
        match self {
            CacheType::F16 => GgmlType::F16,
            CacheType::Q8_0 => GgmlType::Q8_0,
            CacheType::Q4_0 => GgmlType::Q4_0,
        }
    }
    pub fn flag(self) -> &'static str {
        match self {
            CacheType::F16 => "f16",
            CacheType::Q8_0 => "q8_0",
            CacheType::Q4_0 => "q4_0",
        }
    }
}

/// The machine llama-server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hardware {
    /// Total memory of the GPU (nvidia-smi `memory.total`), MiB.
    pub vram_mib: u64,
    /// RAM llama-server may use (the container's limit), MiB. `None`: not checked.
    pub ram_mib: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Context length; `None`: 32768, or the model's training context when smaller.
    pub ctx: Option<u64>,
    pub cache_type: CacheType,
    /// `-ub`: tokens per compute step; the compute buffers grow with it.
    pub ubatch: u64,
    /// VRAM kept free for the CUDA context and driver, MiB.
    pub reserve_mib: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ctx: None,
            cache_type: CacheType::Q8_0,
            ubatch: 512,
            reserve_mib: DEFAULT_RESERVE_MIB,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Strategy {
    /// Every layer, its experts and the output on the GPU.
    AllOnGpu,
    /// Every layer on the GPU, the routed experts of the first `n_cpu_moe` layers in RAM.
    ExpertsOnCpu { n_cpu_moe: u32 },
    /// The last layers (and the output) on the GPU, the first ones wholly in RAM.
    PartialLayers { gpu_layers: u32 },
    /// Nothing fits on the GPU: it only speeds up prompt processing.
    CpuOnly,
}

/// Bytes in one memory, by use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub weights: u64,
    pub kv_cache: u64,
    pub recurrent_state: u64,
    pub compute: u64,
    /// CUDA context (VRAM) or process overhead (RAM).
    pub overhead: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        [
            self.weights,
            self.kv_cache,
            self.recurrent_state,
            self.compute,
            self.overhead,
        ]
        .iter()
        .fold(0u64, |a, &b| a.saturating_add(b))
    }
}

/// One way to place the model, and what it costs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Placement {
    pub strategy: Strategy,
    /// The `-ngl` value: repeating layers on the GPU + 1 for the output layer (llama.cpp counts it).
    pub ngl: u32,
    pub n_cpu_moe: u32,
    pub vram: Usage,
    pub ram: Usage,
    /// Bytes read from RAM / VRAM to generate one token (active weights + KV cache).
    pub ram_bytes_per_token: u64,
    pub vram_bytes_per_token: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub model: String,
    pub ctx: u64,
    pub cache_type: CacheType,
    pub ubatch: u64,
    pub vram_mib: u64,
    pub ram_mib: Option<u64>,
    pub chosen: Placement,
    /// The best placement of the other kind, when there was a choice (MoE: experts-on-CPU vs partial layers).
    pub alternative: Option<Placement>,
    pub reasoning: Vec<String>,
    /// llama-server arguments.
    pub flags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    BadInput(String),
    #[error(
        "a {ctx}-token context does not fit: the model needs {needed_mib} MiB but RAM + usable VRAM is \
         {available_mib} MiB. {advice}"
    )]
    DoesNotFit {
        ctx: u64,
        needed_mib: u64,
        available_mib: u64,
        advice: String,
    },
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

fn pad(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// KV cells a layer keeps: the whole (padded) context, or the window plus one ubatch (llama.cpp
/// `llama_kv_cache_iswa`, one sequence).
fn layer_cells(layer: &LayerShape, ctx: u64, window: Option<u64>, ubatch: u64) -> u64 {
    match layer.kind {
        LayerKind::FullAttention => ctx,
        LayerKind::SlidingWindow => match window {
            Some(w) => ctx.min(pad(w + ubatch, CTX_PAD)),
            None => ctx,
        },
        _ => 0,
    }
}

/// KV cache bytes of one layer: each cell holds one K row and one V row, each quantized as a row
/// (`ggml_row_size(type, n_head_kv × head_dim)`).
fn layer_kv_bytes(layer: &LayerShape, cells: u64, cache: CacheType) -> u64 {
    // Saturating: the sizes come from an untrusted header; absurd ones must not wrap into small ones.
    let t = cache.ggml();
    let k = t.bytes_for(layer.n_head_kv.saturating_mul(layer.head_dim_k));
    let v = t.bytes_for(layer.n_head_kv.saturating_mul(layer.head_dim_v));
    cells.saturating_mul(k.saturating_add(v))
}

struct Ctx<'a> {
    shape: &'a ModelShape,
    ctx: u64,
    opts: &'a Options,
    /// KV cells per layer, and the bytes they take.
    cells: Vec<u64>,
    kv: Vec<u64>,
}

impl<'a> Ctx<'a> {
    fn new(shape: &'a ModelShape, opts: &'a Options, ctx: u64) -> Ctx<'a> {
        let cells: Vec<u64> = shape
            .layers
            .iter()
            .map(|l| layer_cells(l, ctx, shape.sliding_window, opts.ubatch))
            .collect();
        let kv = shape
            .layers
            .iter()
            .zip(&cells)
            .map(|(l, &n)| layer_kv_bytes(l, n, opts.cache_type))
            .collect();
        Ctx {
            shape,
            ctx,
            opts,
            cells,
            kv,
        }
    }

    fn expert_share(&self) -> f64 {
        if self.shape.expert_count > 1 && self.shape.expert_used_count > 0 {
            self.shape.expert_used_count as f64 / self.shape.expert_count as f64
        } else {
            1.0
        }
    }

    /// Memory and per-token reads for `-ngl ngl --n-cpu-moe n_cpu_moe`.
    fn place(&self, ngl: u32, n_cpu_moe: u32, strategy: Strategy) -> Placement {
        let s = self.shape;
        let n_layer = s.n_layer;
        let first_gpu = (n_layer + 1).saturating_sub(ngl);
        let output_on_gpu = ngl >= 1;
        let share = self.expert_share();
        let mut vram = Usage {
            overhead: self.opts.reserve_mib * MIB,
            ..Usage::default()
        };
        let mut ram = Usage {
            overhead: RAM_OVERHEAD,
            weights: s.input_bytes,
            ..Usage::default()
        };
        let (mut ram_read, mut vram_read) = (0f64, 0f64);
        let mut largest_cpu_tensor = 0u64;
        let mut fa_scratch = 0u64;
        for (i, layer) in s.layers.iter().enumerate() {
            let on_gpu = i as u32 >= first_gpu;
            let experts_on_gpu = on_gpu && i as u32 >= n_cpu_moe;
            let kv = self.kv[i];
            let (dense_mem, dense_read) = if on_gpu {
                (&mut vram, &mut vram_read)
            } else {
                (&mut ram, &mut ram_read)
            };
            dense_mem.weights += layer.weight_bytes;
            dense_mem.kv_cache = dense_mem.kv_cache.saturating_add(kv);
            dense_mem.recurrent_state = dense_mem
                .recurrent_state
                .saturating_add(layer.recurrent_state_bytes);
            *dense_read += layer.weight_bytes as f64 + kv as f64;
            let expert_read = layer.expert_bytes as f64 * share;
            if experts_on_gpu {
                vram.weights += layer.expert_bytes;
                vram_read += expert_read;
            } else {
                ram.weights += layer.expert_bytes;
                ram_read += expert_read;
            }
            if !on_gpu || !experts_on_gpu {
                largest_cpu_tensor = largest_cpu_tensor.max(layer.largest_tensor_bytes);
            }
            if on_gpu && self.opts.cache_type != CacheType::F16 {
                // Flash attention on CUDA converts a quantized K/V of one layer to F16 at a time.
                fa_scratch = fa_scratch.max(layer_kv_bytes(layer, self.cells[i], CacheType::F16));
            }
        }
        let output_total = s.output_bytes + s.tied_output_bytes;
        if output_on_gpu {
            vram.weights += output_total;
            vram_read += output_total as f64;
        } else {
            ram.weights += s.output_bytes;
            ram_read += output_total as f64;
        }
        let ub = self.opts.ubatch;
        let f32b = 4;
        let activations = (ub * f32b).saturating_mul(
            s.n_embd
                .saturating_mul(4)
                .saturating_add(s.n_ff_active.saturating_mul(3)),
        );
        let logits = (ub * f32b).saturating_mul(s.n_vocab);
        vram.compute = activations + fa_scratch + largest_cpu_tensor;
        if output_on_gpu {
            vram.compute += logits;
        }
        ram.compute = activations + if output_on_gpu { 0 } else { logits };
        Placement {
            strategy,
            ngl,
            n_cpu_moe,
            vram,
            ram,
            ram_bytes_per_token: ram_read.round() as u64,
            vram_bytes_per_token: vram_read.round() as u64,
        }
    }
}

fn fits(p: &Placement, hw: &Hardware) -> bool {
    p.vram.total() <= hw.vram_mib * MIB && hw.ram_mib.is_none_or(|r| p.ram.total() <= r * MIB)
}

/// The memory and per-token reads of one given placement (`-ngl ngl --n-cpu-moe n_cpu_moe`), e.g. to
/// compare a hand-picked `-ngl` with the plan. `ctx` is padded as llama.cpp pads it.
pub fn evaluate(
    shape: &ModelShape,
    opts: &Options,
    ctx: u64,
    ngl: u32,
    n_cpu_moe: u32,
) -> Placement {
    let c = Ctx::new(shape, opts, pad(ctx.max(1), CTX_PAD));
    let all = shape.n_layer + 1;
    let ngl = ngl.min(all);
    let strategy = match (ngl, n_cpu_moe) {
        (0, _) => Strategy::CpuOnly,
        (n, 0) if n == all => Strategy::AllOnGpu,
        (n, m) if n == all => Strategy::ExpertsOnCpu { n_cpu_moe: m },
        (n, _) => Strategy::PartialLayers { gpu_layers: n - 1 },
    };
    c.place(ngl, n_cpu_moe, strategy)
}

/// Whether a placement fits the hardware.
pub fn fits_hardware(p: &Placement, hw: &Hardware) -> bool {
    fits(p, hw)
}

pub fn plan(shape: &ModelShape, hw: &Hardware, opts: &Options) -> Result<Plan, PlanError> {
    if hw.vram_mib == 0 {
        return Err(PlanError::BadInput(
            "--vram is 0; give the GPU's total memory in MiB (nvidia-smi --query-gpu=memory.total)"
                .into(),
        ));
    }
    if opts.ubatch == 0 {
        return Err(PlanError::BadInput("--ubatch must be at least 1".into()));
    }
    if shape.n_layer == 0 || shape.layers.is_empty() {
        return Err(PlanError::BadInput(format!(
            "the model has no layers (block_count {}); it is not a complete model file",
            shape.n_layer
        )));
    }
    let requested = match opts.ctx {
        Some(0) => return Err(PlanError::BadInput("--ctx must be at least 1".into())),
        Some(c) => c,
        None => shape
            .context_length
            .map_or(DEFAULT_CTX, |c| c.min(DEFAULT_CTX)),
    };
    let ctx = pad(requested, CTX_PAD);
    let build = |ctx: u64| Ctx::new(shape, opts, ctx);
    let c = build(ctx);
    let n_layer = shape.n_layer;
    let all = n_layer + 1;

    // Refuse a context that fits nowhere: the whole model + cache against RAM + usable VRAM.
    if let Some(ram_mib) = hw.ram_mib {
        let needed = |c: &Ctx<'_>| {
            let p = c.place(0, 0, Strategy::CpuOnly);
            p.ram.total() + p.vram.compute
        };
        let available = (ram_mib + hw.vram_mib.saturating_sub(opts.reserve_mib)) * MIB;
        if needed(&c) > available {
            let max_ctx = (1..=ctx / CTX_PAD)
                .rev()
                .map(|k| k * CTX_PAD)
                .find(|&x| needed(&build(x)) <= available);
            let advice = match max_ctx {
                Some(m) => format!(
                    "Use --ctx {m} or less, or a smaller --cache-type (q4_0), or give the container more RAM."
                ),
                None => "Even the smallest context does not fit: use a smaller quantization of the model or \
                         give the container more RAM."
                    .into(),
            };
            return Err(PlanError::DoesNotFit {
                ctx,
                needed_mib: mib(needed(&c)),
                available_mib: mib(available),
                advice,
            });
        }
    }

    let mut reasoning = Vec::new();
    let kv_total = c.kv.iter().fold(0u64, |a, &b| a.saturating_add(b));
    reasoning.push(describe_model(shape));
    reasoning.push(describe_kv(shape, &c, kv_total, opts));

    // Largest -ngl that fits (dense placement).
    let partial = (0..=all).rev().find_map(|ngl| {
        let strategy = match ngl {
            n if n == all => Strategy::AllOnGpu,
            0 => Strategy::CpuOnly,
            n => Strategy::PartialLayers { gpu_layers: n - 1 },
        };
        let p = c.place(ngl, 0, strategy);
        fits(&p, hw).then_some(p)
    });
    let experts = if shape.is_moe() {
        (0..=n_layer).find_map(|n| {
            let strategy = if n == 0 {
                Strategy::AllOnGpu
            } else {
                Strategy::ExpertsOnCpu { n_cpu_moe: n }
            };
            let p = c.place(all, n, strategy);
            fits(&p, hw).then_some(p)
        })
    } else {
        None
    };

    let (chosen, alternative) = match (partial, experts) {
        (None, _) => {
            let p = c.place(0, 0, Strategy::CpuOnly);
            return Err(PlanError::DoesNotFit {
                ctx,
                needed_mib: mib(p.ram.total()),
                available_mib: hw.ram_mib.unwrap_or(0),
                advice:
                    "The model and its cache do not fit in RAM even with nothing on the GPU: use a \
                         smaller quantization, a shorter --ctx, or more RAM."
                        .into(),
            });
        }
        (Some(p), None) => (p, None),
        (Some(p), Some(e)) if p.strategy == Strategy::AllOnGpu => {
            let _ = e;
            (p, None)
        }
        (Some(p), Some(e)) => {
            if e.ram_bytes_per_token <= p.ram_bytes_per_token {
                (e, Some(p))
            } else {
                (p, Some(e))
            }
        }
    };
    reasoning.extend(describe_choice(
        shape,
        &chosen,
        alternative.as_ref(),
        hw,
        opts,
    ));

    let mut flags = vec!["-ngl".to_string(), chosen.ngl.to_string()];
    if chosen.n_cpu_moe > 0 {
        flags.extend(["--n-cpu-moe".to_string(), chosen.n_cpu_moe.to_string()]);
    }
    flags.extend(
        [
            "-c",
            &ctx.to_string(),
            "-ctk",
            opts.cache_type.flag(),
            "-ctv",
            opts.cache_type.flag(),
            "-fa",
            "on",
            "-ub",
            &opts.ubatch.to_string(),
            "-np",
            "1",
        ]
        .map(str::to_string),
    );
    if let Some(train) = shape.context_length.filter(|&t| ctx > t) {
        reasoning.push(format!(
            "warning: the context {ctx} is longer than the model's training context {train}; llama-server caps \
             each slot at {train} unless the model is told otherwise (--override-kv {}.context_length=int:{ctx})",
            shape.architecture
        ));
    }
    Ok(Plan {
        model: shape
            .name
            .clone()
            .unwrap_or_else(|| shape.architecture.clone()),
        ctx,
        cache_type: opts.cache_type,
        ubatch: opts.ubatch,
        vram_mib: hw.vram_mib,
        ram_mib: hw.ram_mib,
        chosen,
        alternative,
        reasoning,
        flags,
    })
}

fn describe_model(s: &ModelShape) -> String {
    let kind = if s.is_moe() {
        format!(
            "MoE, {} experts with {} used per token; routed experts are {} MiB of the {} MiB of layers",
            s.expert_count,
            s.expert_used_count,
            mib(s.expert_bytes()),
            mib(s.layer_bytes())
        )
    } else {
        format!("dense, {} MiB of layers", mib(s.layer_bytes()))
    };
    format!(
        "model: {} layers, {kind}; input embedding {} MiB (always in RAM), output {} MiB{}",
        s.n_layer,
        mib(s.input_bytes),
        mib(s.output_bytes + s.tied_output_bytes),
        if s.tied_output_bytes > 0 {
            " (tied to the embedding: a copy goes to the GPU)"
        } else {
            ""
        }
    )
}

fn describe_kv(s: &ModelShape, c: &Ctx<'_>, kv_total: u64, opts: &Options) -> String {
    let count = |k: LayerKind| s.layers.iter().filter(|l| l.kind == k).count();
    let mut parts = vec![format!(
        "{} full-attention",
        count(LayerKind::FullAttention)
    )];
    let swa = count(LayerKind::SlidingWindow);
    if swa > 0 {
        parts.push(format!(
            "{swa} sliding-window ({})",
            s.sliding_window_source.as_deref().unwrap_or("window")
        ));
    }
    let rec = count(LayerKind::Recurrent);
    if rec > 0 {
        parts.push(format!("{rec} recurrent (fixed-size state, no KV cache)"));
    }
    let shared = count(LayerKind::SharedKv);
    if shared > 0 {
        parts.push(format!("{shared} sharing another layer's KV cache"));
    }
    format!(
        "KV cache: {} MiB for {} tokens at {} (2 × cells × kv_heads × head_dim × {} bytes per {} elements); layers: {}",
        mib(kv_total),
        c.ctx,
        opts.cache_type.flag(),
        opts.cache_type.ggml().type_size(),
        opts.cache_type.ggml().block_size(),
        parts.join(", ")
    )
}

fn describe_usage(p: &Placement) -> String {
    format!(
        "VRAM {} MiB (weights {}, KV {}, compute {}, CUDA reserve {}), RAM {} MiB; per token it reads {} MiB \
         from RAM and {} MiB from VRAM",
        mib(p.vram.total()),
        mib(p.vram.weights),
        mib(p.vram.kv_cache + p.vram.recurrent_state),
        mib(p.vram.compute),
        mib(p.vram.overhead),
        mib(p.ram.total()),
        mib(p.ram_bytes_per_token),
        mib(p.vram_bytes_per_token)
    )
}

fn describe_strategy(s: &ModelShape, p: &Placement) -> String {
    match p.strategy {
        Strategy::AllOnGpu => format!(
            "everything on the GPU (-ngl {} = {} layers + output)",
            p.ngl, s.n_layer
        ),
        Strategy::ExpertsOnCpu { n_cpu_moe } => format!(
            "all {} layers on the GPU with the routed experts of the first {n_cpu_moe} in RAM (-ngl {} --n-cpu-moe {n_cpu_moe})",
            s.n_layer, p.ngl
        ),
        Strategy::PartialLayers { gpu_layers } => format!(
            "the last {gpu_layers} of {} layers and the output on the GPU, the rest in RAM (-ngl {})",
            s.n_layer, p.ngl
        ),
        Strategy::CpuOnly => {
            "nothing on the GPU (-ngl 0); it still speeds up prompt processing".to_string()
        }
    }
}

fn describe_choice(
    s: &ModelShape,
    chosen: &Placement,
    alternative: Option<&Placement>,
    hw: &Hardware,
    opts: &Options,
) -> Vec<String> {
    let mut lines = vec![format!(
        "budget: {} MiB of VRAM, {} MiB kept for the CUDA context; RAM {}",
        hw.vram_mib,
        opts.reserve_mib,
        hw.ram_mib
            .map_or("not checked (give --ram)".to_string(), |r| format!(
                "{r} MiB"
            ))
    )];
    lines.push(format!(
        "chosen: {}: {}",
        describe_strategy(s, chosen),
        describe_usage(chosen)
    ));
    if let Some(alt) = alternative {
        lines.push(format!(
            "alternative: {}: {}",
            describe_strategy(s, alt),
            describe_usage(alt)
        ));
        lines.push(format!(
            "why: generation is bound by memory bandwidth and RAM is several times slower than VRAM, so the \
             placement that reads fewer bytes from RAM per token wins ({} MiB vs {} MiB). An MoE token uses \
             only {} of {} experts: keeping attention, shared weights and the KV cache on the GPU and only the \
             experts in RAM means each token reads just the used experts' slice from RAM",
            mib(chosen.ram_bytes_per_token),
            mib(alt.ram_bytes_per_token),
            s.expert_used_count,
            s.expert_count
        ));
    } else if matches!(chosen.strategy, Strategy::PartialLayers { .. }) {
        lines.push(
            "why: a dense model reads every weight for every token, so each layer moved to the GPU takes its \
             bytes off the slow RAM path; this is the largest -ngl that fits"
                .to_string(),
        );
    }
    lines
}
