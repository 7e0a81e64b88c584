//! The offload plan: which parts of a model go to VRAM and which stay in RAM for llama-server, so that it
//! fits without running out of memory and reads as few bytes as possible from (slow) system RAM per token.
//! Pure functions; the memory model and its constants are explained in docs/model-planning.md.

use serde::Serialize;

use super::gguf::GgmlType;
use super::shape::{LayerKind, LayerShape, ModelShape};

mod multi;
pub use multi::{GpuPlan, GpuUse, Layout, Server, plan_gpus};

const MIB: u64 = 1 << 20;
/// llama.cpp pads the context (and the sliding-window cache) to 256 cells.
const CTX_PAD: u64 = 256;
/// Default context: Claude Code's system prompt alone is ~24K tokens (seed guide, Part 3).
pub const DEFAULT_CTX: u64 = 32768;
/// The longest context llama-server takes: `-c` is a signed 32-bit number in llama.cpp (and `n_ctx` 32 bits
/// in its API), padded to 256 cells: the largest multiple of 256 below 2^31.
pub const MAX_CTX: u64 = (i32::MAX as u64 / CTX_PAD) * CTX_PAD;
/// A context longer than this many times the model's training context is refused: RoPE scaling (YaRN) stretches a
/// model 2-4×, rarely 8×; beyond that the model does not follow the text at all.
pub const MAX_CTX_STRETCH: u64 = 8;
/// Upper bounds of the memory flags, in MiB: far beyond any machine (16 TiB of VRAM, 64 TiB of RAM), small enough
/// that bytes never overflow 64 bits.
pub const MAX_VRAM_MIB: u64 = 16 << 20;
pub const MAX_RAM_MIB: u64 = 64 << 20;
/// `-ub` above this is not a micro-batch (llama.cpp's default is 512).
pub const MAX_UBATCH: u64 = 65536;
/// CUDA context, cuBLAS workspace and driver allocations that never show up as llama.cpp buffers:
/// 300-500 MiB on current drivers; 512 keeps a margin (8192 MiB card → 7680 MiB, the guide's "~7.5 GB").
pub const DEFAULT_RESERVE_MIB: u64 = 512;
/// llama-server's process outside its buffers: binary, CUDA host libraries, tokenizer, HTTP server.
const RAM_OVERHEAD: u64 = 512 * MIB;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q5_1,
    Q5_0,
    Q4_1,
    Iq4Nl,
    Q4_0,
}

impl CacheType {
    /// Every type llama-server's `-ctk`/`-ctv` take (the list `[server].cache_type_k` is checked against).
    pub const ALL: [CacheType; 9] = [
        CacheType::F32,
        CacheType::F16,
        CacheType::Bf16,
        CacheType::Q8_0,
        CacheType::Q5_1,
        CacheType::Q5_0,
        CacheType::Q4_1,
        CacheType::Iq4Nl,
        CacheType::Q4_0,
    ];

    pub fn ggml(self) -> GgmlType {
        GgmlType::from_name(self.flag()).unwrap_or(GgmlType::F16)
    }
    pub fn flag(self) -> &'static str {
        match self {
            CacheType::F32 => "f32",
            CacheType::F16 => "f16",
            CacheType::Bf16 => "bf16",
            CacheType::Q8_0 => "q8_0",
            CacheType::Q5_1 => "q5_1",
            CacheType::Q5_0 => "q5_0",
            CacheType::Q4_1 => "q4_1",
            CacheType::Iq4Nl => "iq4_nl",
            CacheType::Q4_0 => "q4_0",
        }
    }
    /// From its llama.cpp name (`q8_0`).
    pub fn from_flag(name: &str) -> Option<CacheType> {
        CacheType::ALL.into_iter().find(|t| t.flag() == name)
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
    /// The K cache type, and the V cache's unless `cache_type_v` says otherwise.
    pub cache_type: CacheType,
    pub cache_type_v: Option<CacheType>,
    /// `-ub`: tokens per compute step; the compute buffers grow with it.
    pub ubatch: u64,
    /// VRAM kept free for the CUDA context and driver, MiB, on each GPU.
    pub reserve_mib: u64,
    /// How many GPUs the layers are split across (`vram_mib` is all of them together). Each GPU has its own CUDA
    /// context and its own compute buffers, so both are counted once per GPU (issue 16 item 10: adding two GPUs'
    /// memory under one reserve over-promises a model sized to just fit them).
    pub gpus: u64,
}

impl Options {
    /// The VRAM kept for CUDA contexts on all the GPUs together.
    pub fn reserve_total_mib(&self) -> u64 {
        self.reserve_mib.saturating_mul(self.gpus.max(1))
    }

    /// The V cache's type.
    pub fn v_type(&self) -> CacheType {
        self.cache_type_v.unwrap_or(self.cache_type)
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ctx: None,
            cache_type: CacheType::Q8_0,
            cache_type_v: None,
            ubatch: 512,
            reserve_mib: DEFAULT_RESERVE_MIB,
            gpus: 1,
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
    /// The V cache's type when it is not `cache_type`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_type_v: Option<CacheType>,
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
    n.div_ceil(to).saturating_mul(to)
}

/// KV cells a layer keeps: the whole (padded) context, or the window plus one ubatch (llama.cpp
/// `llama_kv_cache_iswa`, one sequence).
fn layer_cells(layer: &LayerShape, ctx: u64, window: Option<u64>, ubatch: u64) -> u64 {
    match layer.kind {
        LayerKind::FullAttention => ctx,
        LayerKind::SlidingWindow => match window {
            Some(w) => ctx.min(pad(w.saturating_add(ubatch), CTX_PAD)),
            None => ctx,
        },
        _ => 0,
    }
}

/// KV cache bytes of one layer: each cell holds one K row and one V row, each quantized as a row
/// (`ggml_row_size(type, n_head_kv × head_dim)`).
fn layer_kv_bytes(layer: &LayerShape, cells: u64, k_type: CacheType, v_type: CacheType) -> u64 {
    // Saturating: the sizes come from an untrusted header; absurd ones must not wrap into small ones.
    let k = k_type
        .ggml()
        .bytes_for(layer.n_head_kv.saturating_mul(layer.head_dim_k));
    let v = v_type
        .ggml()
        .bytes_for(layer.n_head_kv.saturating_mul(layer.head_dim_v));
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
            .map(|(l, &n)| layer_kv_bytes(l, n, opts.cache_type, opts.v_type()))
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
        let first_gpu = n_layer.saturating_add(1).saturating_sub(ngl);
        let output_on_gpu = ngl >= 1;
        let share = self.expert_share();
        let mut vram = Usage {
            overhead: self.opts.reserve_total_mib().saturating_mul(MIB),
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
            dense_mem.weights = dense_mem.weights.saturating_add(layer.weight_bytes);
            dense_mem.kv_cache = dense_mem.kv_cache.saturating_add(kv);
            dense_mem.recurrent_state = dense_mem
                .recurrent_state
                .saturating_add(layer.recurrent_state_bytes);
            *dense_read += layer.weight_bytes as f64 + kv as f64;
            let expert_read = layer.expert_bytes as f64 * share;
            if experts_on_gpu {
                vram.weights = vram.weights.saturating_add(layer.expert_bytes);
                vram_read += expert_read;
            } else {
                ram.weights = ram.weights.saturating_add(layer.expert_bytes);
                ram_read += expert_read;
            }
            if !on_gpu || !experts_on_gpu {
                largest_cpu_tensor = largest_cpu_tensor.max(layer.largest_tensor_bytes);
            }
            if on_gpu
                && (self.opts.cache_type != CacheType::F16 || self.opts.v_type() != CacheType::F16)
            {
                // Flash attention on CUDA converts a quantized K/V of one layer to F16 at a time.
                fa_scratch = fa_scratch.max(layer_kv_bytes(
                    layer,
                    self.cells[i],
                    CacheType::F16,
                    CacheType::F16,
                ));
            }
        }
        let output_total = s.output_bytes.saturating_add(s.tied_output_bytes);
        if output_on_gpu {
            vram.weights = vram.weights.saturating_add(output_total);
            vram_read += output_total as f64;
        } else {
            ram.weights = ram.weights.saturating_add(s.output_bytes);
            ram_read += output_total as f64;
        }
        let ub = self.opts.ubatch;
        let f32b = 4;
        let activations = ub.saturating_mul(f32b).saturating_mul(
            s.n_embd
                .saturating_mul(4)
                .saturating_add(s.n_ff_active.saturating_mul(3)),
        );
        let logits = ub.saturating_mul(f32b).saturating_mul(s.n_vocab);
        vram.compute = activations
            .saturating_add(fa_scratch)
            .saturating_add(largest_cpu_tensor);
        if output_on_gpu {
            vram.compute = vram.compute.saturating_add(logits);
        }
        // Split across GPUs, each keeps compute buffers of its own.
        vram.compute = vram.compute.saturating_mul(self.opts.gpus.max(1));
        ram.compute = activations.saturating_add(if output_on_gpu { 0 } else { logits });
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
    p.vram.total() <= hw.vram_mib.saturating_mul(MIB)
        && hw
            .ram_mib
            .is_none_or(|r| p.ram.total() <= r.saturating_mul(MIB))
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
    let c = Ctx::new(shape, opts, pad(ctx.clamp(1, MAX_CTX), CTX_PAD));
    let all = shape.n_layer.saturating_add(1);
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

/// Refuses inputs outside the ranges the planner (and llama-server) can mean, naming the flag and the range.
fn check_inputs(shape: &ModelShape, hw: &Hardware, opts: &Options) -> Result<(), PlanError> {
    let bad = |m: String| Err(PlanError::BadInput(m));
    if hw.vram_mib == 0 {
        return bad(
            "--vram is 0; give the GPU's total memory in MiB (nvidia-smi --query-gpu=memory.total)"
                .into(),
        );
    }
    if hw.vram_mib > MAX_VRAM_MIB {
        return bad(format!(
            "--vram {} MiB is more than any GPU has; give the GPU's total memory in MiB (1..={MAX_VRAM_MIB}, \
              nvidia-smi --query-gpu=memory.total)",
            hw.vram_mib
        ));
    }
    match hw.ram_mib {
        Some(0) => return bad("--ram is 0; give the container's memory in MiB".into()),
        Some(r) if r > MAX_RAM_MIB => {
            return bad(format!(
                "--ram {r} MiB is more than any machine has; give the container's memory in MiB \
                  (1..={MAX_RAM_MIB})"
            ));
        }
        _ => {}
    }
    if opts.reserve_total_mib() >= hw.vram_mib {
        return bad(format!(
            "--reserve {} MiB per GPU ({} GPU(s)) leaves nothing of the {} MiB of VRAM; keep it below --vram (the \
              default {} MiB covers the CUDA context)",
            opts.reserve_mib,
            opts.gpus.max(1),
            hw.vram_mib,
            DEFAULT_RESERVE_MIB
        ));
    }
    if !(1..=MAX_UBATCH).contains(&opts.ubatch) {
        return bad(format!(
            "--ubatch {} is outside 1..={MAX_UBATCH} (llama.cpp's default is 512)",
            opts.ubatch
        ));
    }
    if shape.n_layer == 0 || shape.layers.is_empty() {
        return bad(format!(
            "the model has no layers (block_count {}); it is not a complete model file",
            shape.n_layer
        ));
    }
    match opts.ctx {
        Some(0) => return bad("--ctx must be at least 1".into()),
        Some(c) if c > MAX_CTX => {
            return bad(format!(
                "--ctx {c} is longer than llama-server can take: -c is a 32-bit number in llama.cpp, so the \
                  context is 1..={MAX_CTX} tokens"
            ));
        }
        Some(c) => {
            if let Some(train) = shape.context_length.filter(|&t| t > 0)
                && c > train.saturating_mul(MAX_CTX_STRETCH)
            {
                let most = train.saturating_mul(MAX_CTX_STRETCH).min(MAX_CTX);
                return bad(format!(
                    "--ctx {c} is more than {MAX_CTX_STRETCH} times the model's training context ({train} \
                      tokens); no RoPE scaling stretches a model that far. Use --ctx {train} (or up to {most} \
                     with RoPE scaling)"
                ));
            }
        }
        None => {}
    }
    Ok(())
}

/// The context the plan is for, padded as llama.cpp pads it: `--ctx`, else 32768 or the model's training context
/// when that is smaller.
fn planned_ctx(shape: &ModelShape, opts: &Options) -> u64 {
    let requested = match opts.ctx {
        Some(c) => c,
        None => shape
            .context_length
            .filter(|&c| c > 0)
            .map_or(DEFAULT_CTX, |c| c.min(DEFAULT_CTX)),
    };
    pad(requested, CTX_PAD)
}

pub fn plan(shape: &ModelShape, hw: &Hardware, opts: &Options) -> Result<Plan, PlanError> {
    check_inputs(shape, hw, opts)?;
    let ctx = planned_ctx(shape, opts);
    let build = |ctx: u64| Ctx::new(shape, opts, ctx);
    let c = build(ctx);
    let n_layer = shape.n_layer;
    let all = n_layer.saturating_add(1);

    // Refuse a context that fits nowhere: the whole model + cache against RAM + usable VRAM.
    if let Some(ram_mib) = hw.ram_mib {
        let needed = |c: &Ctx<'_>| {
            let p = c.place(0, 0, Strategy::CpuOnly);
            p.ram.total().saturating_add(p.vram.compute)
        };
        let available = ram_mib
            .saturating_add(hw.vram_mib.saturating_sub(opts.reserve_total_mib()))
            .saturating_mul(MIB);
        if needed(&c) > available {
            let max_ctx =
                largest_fitting(ctx / CTX_PAD, |k| needed(&build(k * CTX_PAD)) <= available)
                    .map(|k| k * CTX_PAD);
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

    let flags = server_flags(&chosen, ctx, opts);
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
        cache_type_v: Some(opts.v_type()).filter(|&v| v != opts.cache_type),
        ubatch: opts.ubatch,
        vram_mib: hw.vram_mib,
        ram_mib: hw.ram_mib,
        chosen,
        alternative,
        reasoning,
        flags,
    })
}

/// llama-server's flags for a placement.
fn server_flags(chosen: &Placement, ctx: u64, opts: &Options) -> Vec<String> {
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
            opts.v_type().flag(),
            "-fa",
            "on",
            "-ub",
            &opts.ubatch.to_string(),
            "-np",
            "1",
        ]
        .map(str::to_string),
    );
    flags
}

/// The largest `k` in `1..=hi` for which `fits(k)` holds, where `fits` holds up to some `k` and fails beyond
/// (more context never takes less memory).
/// A binary search: ~log2(hi) calls, so `--ctx 1000000000` is answered at once.
fn largest_fitting(hi: u64, mut fits: impl FnMut(u64) -> bool) -> Option<u64> {
    if hi == 0 || !fits(1) {
        return None;
    }
    // fits(lo) holds; every k above hi fails.
    let (mut lo, mut hi) = (1, hi);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(lo)
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
        mib(s.output_bytes.saturating_add(s.tied_output_bytes)),
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
    let (k, v) = (opts.cache_type, opts.v_type());
    let types = if k == v {
        format!(
            "{} (2 × cells × kv_heads × head_dim × {} bytes per {} elements)",
            k.flag(),
            k.ggml().type_size(),
            k.ggml().block_size()
        )
    } else {
        format!(
            "{} K / {} V (cells × kv_heads × head_dim × {} bytes per {} elements for K, {} per {} for V)",
            k.flag(),
            v.flag(),
            k.ggml().type_size(),
            k.ggml().block_size(),
            v.ggml().type_size(),
            v.ggml().block_size()
        )
    };
    format!(
        "KV cache: {} MiB for {} tokens at {types}; layers: {}",
        mib(kv_total),
        c.ctx,
        parts.join(", ")
    )
}

fn describe_usage(p: &Placement) -> String {
    format!(
        "VRAM {} MiB (weights {}, KV {}, compute {}, CUDA reserve {}), RAM {} MiB; per token it reads {} MiB \
         from RAM and {} MiB from VRAM",
        mib(p.vram.total()),
        mib(p.vram.weights),
        mib(p.vram.kv_cache.saturating_add(p.vram.recurrent_state)),
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
        "budget: {} MiB of VRAM, {} MiB kept for the CUDA context{}; RAM {}",
        hw.vram_mib,
        opts.reserve_total_mib(),
        if opts.gpus > 1 {
            format!(
                "s ({} MiB on each of {} GPUs, which also keep their own compute buffers)",
                opts.reserve_mib, opts.gpus
            )
        } else {
            String::new()
        },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_fitting_context_is_found_in_few_steps() {
        // `--ctx 1000000000` against a budget that holds 1000 padded contexts: a linear search from the top
        // tries ~3.9 million contexts (minutes); a binary search ~22.
        for (hi, limit) in [
            (1_000_000_000 / CTX_PAD, Some(1000)),
            (1 << 23, None),
            (5, Some(5)),
            (1, Some(1)),
        ] {
            let mut calls = 0u32;
            let found = largest_fitting(hi, |k| {
                calls += 1;
                limit.is_some_and(|l| k <= l)
            });
            assert_eq!(found, limit, "hi {hi}");
            assert!(calls <= 64, "{calls} evaluations for hi {hi}");
        }
        let mut calls = 0u32;
        assert_eq!(
            largest_fitting(0, |_| {
                calls += 1;
                true
            }),
            None
        );
        assert_eq!(calls, 0);
    }
}
