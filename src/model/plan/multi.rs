//! Several GPUs of given sizes: one llama-server per GPU (replicas), one llama-server with its layers split across
//! the GPUs, or partial offload. Pure functions; docs/model-planning.md ("Several GPUs") explains the choice.
//!
//! - **Replicas** when the model with its context, compute buffers and the CUDA reserve fits one GPU: a split is
//!   slower than one GPU for such a model (llama.cpp's multi-GPU guide lists "performance is worse with multi-GPU
//!   than single-GPU" as a symptom), and N replicas serve N requests at once. Each replica is pinned to its GPU
//!   (`CUDA_VISIBLE_DEVICES=<i>`, `CUDA_DEVICE_ORDER=PCI_BUS_ID` so that `i` is nvidia-smi's index) and listens on
//!   `port + i`; a GPU too small for the model gets none.
//! - **Split** when only the GPUs together hold it: `--split-mode layer --tensor-split` in proportion to each GPU's
//!   usable memory (never `row`, deprecated), checked GPU by GPU with llama.cpp's own layer assignment.
//! - **Partial** offload (the one-GPU planner's `-ngl`/`--n-cpu-moe` over all the GPUs) when the sum is too small.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{
    CacheType, Ctx, Hardware, MAX_VRAM_MIB, MIB, Options, Placement, Plan, PlanError, Strategy,
    check_inputs, describe_strategy, describe_usage, layer_kv_bytes, mib, plan, planned_ctx,
    server_flags,
};
use crate::model::shape::ModelShape;

/// The most GPUs a plan takes (as `--gpus`).
pub const MAX_GPUS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// The model with its context fits one GPU: one llama-server per GPU that holds it, each pinned to its GPU.
    Replicas,
    /// It fits only the GPUs together: one llama-server with its layers split across them.
    Split,
    /// It does not fit the GPUs together either: part of it stays in RAM.
    Partial,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Replicas => "replicas",
            Layout::Split => "split",
            Layout::Partial => "partial",
        }
    }
}

/// One GPU, and what the layout puts on it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuUse {
    /// Its index: the position of its `--gpu`, nvidia-smi's index (PCI bus order).
    pub index: u32,
    pub vram_mib: u64,
    /// Its memory less the CUDA reserve.
    pub usable_mib: u64,
    /// Whether the whole model with its context fits this GPU alone.
    pub holds_model: bool,
    /// The VRAM the layout plans on it, the CUDA reserve included; 0 when it gets nothing.
    pub planned_mib: u64,
    /// Repeating layers on it (the output layer is not counted).
    pub layers: u32,
}

/// One llama-server to run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Server {
    /// The GPUs it sees (indices as nvidia-smi numbers them).
    pub gpus: Vec<u32>,
    pub port: u16,
    pub env: BTreeMap<String, String>,
    /// Its arguments (the model's `-m` aside).
    pub args: Vec<String>,
}

/// The plan for a set of GPUs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuPlan {
    pub layout: Layout,
    /// VRAM the whole model with its context needs on one GPU, CUDA reserve included.
    pub one_gpu_needs_mib: u64,
    pub gpus: Vec<GpuUse>,
    /// `--tensor-split` of a split or a partial offload over several GPUs: the GPU layers each GPU takes, in
    /// proportion to the memory it has for layers (its memory less the CUDA reserve, its compute buffers, and on
    /// the last GPU the output layer), as whole layers so that llama.cpp's assignment is exact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensor_split: Option<Vec<u64>>,
    /// The llama-servers: one per replica, or the one of a split / partial offload.
    pub servers: Vec<Server>,
    /// The placement of one llama-server (a replica's, or the split's), as `llmctl model plan --vram` prints it:
    /// `chosen.ngl` and `flags` (without the port) included.
    #[serde(flatten)]
    pub plan: Plan,
}

fn bad<T>(m: String) -> Result<T, PlanError> {
    Err(PlanError::BadInput(m))
}

/// Refuses GPU sizes the plan cannot mean, naming `--gpu` and the fix.
fn check_gpus(gpus: &[u64], opts: &Options) -> Result<(), PlanError> {
    if gpus.is_empty() {
        return bad(
            "no GPU given; give --gpu MIB once per GPU (nvidia-smi --query-gpu=memory.total)"
                .into(),
        );
    }
    if gpus.len() > MAX_GPUS {
        return bad(format!(
            "--gpu is given {} times; a plan takes at most {MAX_GPUS} GPUs",
            gpus.len()
        ));
    }
    for (i, &g) in gpus.iter().enumerate() {
        if g == 0 || g > MAX_VRAM_MIB {
            return bad(format!(
                "--gpu {g} (GPU {i}) is outside 1..={MAX_VRAM_MIB} MiB; give each GPU's total memory in MiB \
                 (nvidia-smi --query-gpu=memory.total)"
            ));
        }
        if g <= opts.reserve_mib {
            return bad(format!(
                "--gpu {g} (GPU {i}) is not more than --reserve {} MiB, which leaves nothing for the model; give \
                 the GPU's total memory in MiB (nvidia-smi --query-gpu=memory.total) or a smaller --reserve",
                opts.reserve_mib
            ));
        }
    }
    if gpus.iter().fold(0u64, |a, &b| a.saturating_add(b)) > MAX_VRAM_MIB {
        return bad(format!(
            "the --gpu sizes add up to more than {MAX_VRAM_MIB} MiB, more than any machine has; give each GPU's \
             total memory in MiB"
        ));
    }
    Ok(())
}

/// The GPU (index into `split`) of each of the `n_layer + 1` layers (the last one is the output) with `-ngl ngl` and
/// `--tensor-split split`, `None` for RAM. As llama.cpp's `load_tensors` assigns them: the `ngl` GPU layers are
/// the last ones (the output among them), and GPU layer `k` of `ngl` goes to the first GPU whose cumulative share
/// of the split exceeds `k / ngl`.
fn layer_devices(n_layer: u32, ngl: u32, split: &[u64]) -> Vec<Option<usize>> {
    let all = n_layer.saturating_add(1);
    let ngl = ngl.min(all);
    let first = all - ngl;
    let sum: f64 = split.iter().map(|&s| s as f64).sum();
    let mut cumulative = Vec::with_capacity(split.len());
    let mut acc = 0.0;
    for &s in split {
        acc += s as f64;
        cumulative.push(if sum > 0.0 { acc / sum } else { 1.0 });
    }
    let last = split.len().saturating_sub(1);
    (0..all)
        .map(|il| {
            (il >= first).then(|| {
                let share = f64::from(il - first) / f64::from(ngl);
                cumulative.iter().position(|&c| c > share).unwrap_or(last)
            })
        })
        .collect()
}

/// VRAM on each GPU (bytes, the reserve included) and the repeating layers it holds, for `-ngl ngl --n-cpu-moe
/// n_cpu_moe` split by `split`. The per-GPU counterpart of `Ctx::place`: each GPU keeps its own CUDA context,
/// activations and flash-attention scratch; the one with the output also holds the logits.
fn per_gpu(c: &Ctx<'_>, ngl: u32, n_cpu_moe: u32, split: &[u64]) -> Vec<(u64, u32)> {
    let s = c.shape;
    let n = split.len();
    let devs = layer_devices(s.n_layer, ngl, split);
    let mut bytes = vec![c.opts.reserve_mib.saturating_mul(MIB); n];
    let mut layers = vec![0u32; n];
    let mut fa = vec![0u64; n];
    let mut largest_cpu_tensor = 0u64;
    let quantized = c.opts.cache_type != CacheType::F16 || c.opts.v_type() != CacheType::F16;
    for (i, layer) in s.layers.iter().enumerate() {
        let Some(d) = devs.get(i).copied().flatten() else {
            largest_cpu_tensor = largest_cpu_tensor.max(layer.largest_tensor_bytes);
            continue;
        };
        layers[d] += 1;
        bytes[d] = bytes[d]
            .saturating_add(layer.weight_bytes)
            .saturating_add(c.kv[i])
            .saturating_add(layer.recurrent_state_bytes);
        if i as u32 >= n_cpu_moe {
            bytes[d] = bytes[d].saturating_add(layer.expert_bytes);
        } else {
            largest_cpu_tensor = largest_cpu_tensor.max(layer.largest_tensor_bytes);
        }
        if quantized {
            fa[d] = fa[d].max(layer_kv_bytes(
                layer,
                c.cells[i],
                CacheType::F16,
                CacheType::F16,
            ));
        }
    }
    let ub = c.opts.ubatch;
    let activations = ub.saturating_mul(4).saturating_mul(
        s.n_embd
            .saturating_mul(4)
            .saturating_add(s.n_ff_active.saturating_mul(3)),
    );
    if let Some(Some(d)) = devs.get(s.n_layer as usize) {
        bytes[*d] = bytes[*d]
            .saturating_add(s.output_bytes.saturating_add(s.tied_output_bytes))
            .saturating_add(ub.saturating_mul(4).saturating_mul(s.n_vocab));
    }
    for d in 0..n {
        bytes[d] = bytes[d]
            .saturating_add(activations)
            .saturating_add(fa[d])
            .saturating_add(largest_cpu_tensor);
    }
    bytes.into_iter().zip(layers).collect()
}

/// `--tensor-split`: the MiB each GPU has for layers, which llama.cpp's split is proportional to: its memory less
/// the CUDA reserve and the compute buffers every GPU keeps, and on the last GPU (where the output layer goes) also
/// less the output and its logits. All of a GPU's memory (less the reserve) when that leaves nothing anywhere.
fn split_shares(c: &Ctx<'_>, gpus: &[u64]) -> Vec<u64> {
    let s = c.shape;
    let ub = c.opts.ubatch;
    let quantized = c.opts.cache_type != CacheType::F16 || c.opts.v_type() != CacheType::F16;
    let fa = if quantized {
        s.layers
            .iter()
            .zip(&c.cells)
            .map(|(l, &n)| layer_kv_bytes(l, n, CacheType::F16, CacheType::F16))
            .max()
            .unwrap_or(0)
    } else {
        0
    };
    let compute = ub
        .saturating_mul(4)
        .saturating_mul(
            s.n_embd
                .saturating_mul(4)
                .saturating_add(s.n_ff_active.saturating_mul(3)),
        )
        .saturating_add(fa);
    let output = s
        .output_bytes
        .saturating_add(s.tied_output_bytes)
        .saturating_add(ub.saturating_mul(4).saturating_mul(s.n_vocab));
    let last = gpus.len().saturating_sub(1);
    let shares: Vec<u64> = gpus
        .iter()
        .enumerate()
        .map(|(i, &g)| {
            let fixed = c
                .opts
                .reserve_mib
                .saturating_mul(MIB)
                .saturating_add(compute)
                .saturating_add(if i == last { output } else { 0 });
            g.saturating_mul(MIB).saturating_sub(fixed) / MIB
        })
        .collect();
    if shares.iter().all(|&s| s == 0) {
        gpus.iter().map(|&g| g - c.opts.reserve_mib).collect()
    } else {
        shares
    }
}

/// `--tensor-split` as whole layers per GPU for `-ngl ngl --n-cpu-moe n_cpu_moe`, such that every GPU holds its
/// share, or `None`. Whole layers make llama.cpp's assignment exact (a proportional split can tip one layer past a
/// GPU's memory). First the layers in proportion to `shares`, rounded (largest remainders); if a GPU overflows,
/// each GPU in turn filled with as many of the remaining layers as it holds.
fn split_counts(
    c: &Ctx<'_>,
    gpus: &[u64],
    shares: &[u64],
    ngl: u32,
    n_cpu_moe: u32,
) -> Option<Vec<u64>> {
    let n = gpus.len();
    let ngl64 = u64::from(ngl);
    let total: u64 = shares.iter().sum::<u64>().max(1);
    let mut counts: Vec<u64> = shares.iter().map(|&s| s * ngl64 / total).collect();
    let mut rest: Vec<(u64, usize)> = shares
        .iter()
        .enumerate()
        .map(|(i, &s)| (s * ngl64 % total, i))
        .collect();
    rest.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let short = ngl64.saturating_sub(counts.iter().sum());
    for &(_, i) in rest.iter().take(short as usize) {
        counts[i] += 1;
    }
    if fits_each(&per_gpu(c, ngl, n_cpu_moe, &counts), gpus) {
        return Some(counts);
    }
    // Greedy: GPU d takes layers while they fit; what each GPU holds is checked with the exact assignment.
    let mut counts = vec![0u64; n];
    let mut placed = 0u64;
    for d in 0..n {
        while placed < ngl64 {
            counts[d] += 1;
            let mut trial = counts.clone();
            // The layers not yet placed go to the last GPU for the check of this one only.
            trial[n - 1] += ngl64 - placed - 1;
            let used = per_gpu(c, ngl, n_cpu_moe, &trial);
            if used[d].0 > gpus[d].saturating_mul(MIB) {
                counts[d] -= 1;
                break;
            }
            placed += 1;
        }
    }
    (placed == ngl64 && fits_each(&per_gpu(c, ngl, n_cpu_moe, &counts), gpus)).then_some(counts)
}

fn fits_each(used: &[(u64, u32)], gpus: &[u64]) -> bool {
    used.iter()
        .zip(gpus)
        .all(|(&(b, _), &g)| b <= g.saturating_mul(MIB))
}

fn env(visible: &[u32]) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("CUDA_DEVICE_ORDER".to_string(), "PCI_BUS_ID".to_string()),
        (
            "CUDA_VISIBLE_DEVICES".to_string(),
            visible
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
    ])
}

fn with_port(flags: &[String], port: u16) -> Vec<String> {
    let mut args = flags.to_vec();
    args.extend(["--port".to_string(), port.to_string()]);
    args
}

fn usage_line(p: &Placement) -> String {
    format!(
        "weights {}, KV {}, compute {}, CUDA reserve {} MiB",
        mib(p.vram.weights),
        mib(p.vram.kv_cache.saturating_add(p.vram.recurrent_state)),
        mib(p.vram.compute),
        mib(p.vram.overhead)
    )
}

/// The plan for GPUs of `gpus` MiB each (in nvidia-smi's order), `ram_mib` of RAM for llama-server (all the
/// replicas together), the first llama-server on `port`.
pub fn plan_gpus(
    shape: &ModelShape,
    gpus: &[u64],
    ram_mib: Option<u64>,
    opts: &Options,
    port: u16,
) -> Result<GpuPlan, PlanError> {
    check_gpus(gpus, opts)?;
    let one = Options { gpus: 1, ..*opts };
    let largest = gpus.iter().copied().max().unwrap_or(0);
    check_inputs(
        shape,
        &Hardware {
            vram_mib: largest,
            ram_mib,
        },
        &one,
    )?;
    let n = gpus.len();
    let indices: Vec<u32> = (0..n as u32).collect();
    if let Some(i) = indices
        .iter()
        .find(|&&i| u32::from(port).saturating_add(i) > u32::from(u16::MAX))
    {
        return bad(format!(
            "--port {port} + GPU index {i} is past port 65535; give a lower --port"
        ));
    }
    let ctx = planned_ctx(shape, &one);
    let c = Ctx::new(shape, &one, ctx);
    let all = shape.n_layer.saturating_add(1);
    let whole = c.place(all, 0, Strategy::AllOnGpu);
    let needs = whole.vram.total();
    let holds: Vec<bool> = gpus.iter().map(|&g| needs <= g * MIB).collect();
    let usable: Vec<u64> = gpus.iter().map(|&g| g - opts.reserve_mib).collect();
    let mut lines = vec![
        format!(
            "GPUs: {}; {} MiB of each kept for its CUDA context",
            gpus.iter()
                .enumerate()
                .map(|(i, g)| format!("{i}: {g} MiB"))
                .collect::<Vec<_>>()
                .join(", "),
            opts.reserve_mib
        ),
        format!(
            "on one GPU the whole model with its {ctx}-token context needs {} MiB ({})",
            mib(needs),
            usage_line(&whole)
        ),
    ];
    for (i, &g) in gpus.iter().enumerate() {
        lines.push(if holds[i] {
            format!(
                "GPU {i} ({g} MiB): holds it alone ({} MiB left)",
                g - mib(needs).min(g)
            )
        } else {
            format!(
                "GPU {i} ({g} MiB): too small to hold it alone ({} MiB short)",
                mib(needs) - g.min(mib(needs))
            )
        });
    }

    // Replicas: every GPU that holds the model, as many as RAM takes. The model file's RAM-resident weights (the
    // input embedding) are one mmap of one file, shared through the page cache; the rest is per process.
    let per_process = whole.ram.total().saturating_sub(whole.ram.weights);
    let replicas_in_ram = |k: u64| {
        ram_mib.is_none_or(|r| {
            whole
                .ram
                .weights
                .saturating_add(per_process.saturating_mul(k))
                <= r.saturating_mul(MIB)
        })
    };
    let holding: Vec<u32> = indices
        .iter()
        .copied()
        .filter(|&i| holds[i as usize])
        .collect();
    if !holding.is_empty() && replicas_in_ram(1) {
        let fit = (1..=holding.len() as u64)
            .rev()
            .find(|&k| replicas_in_ram(k))
            .unwrap_or(1) as usize;
        let replicas = &holding[..fit];
        let first = replicas[0] as usize;
        let mut base = plan(
            shape,
            &Hardware {
                vram_mib: gpus[first],
                ram_mib,
            },
            &one,
        )?;
        lines.push(format!(
            "layout: one replica per GPU that holds the model: {} llama-server{} ({}), each pinned to its GPU \
             (CUDA_VISIBLE_DEVICES=<index>, CUDA_DEVICE_ORDER=PCI_BUS_ID so that the index is nvidia-smi's) on \
             port {port} + index. why: a model that fits one GPU runs fastest on one GPU (a split sends every token \
             across the GPUs; llama.cpp's multi-GPU guide: \"performance is worse with multi-GPU than \
             single-GPU\"), and each replica serves requests of its own",
            replicas.len(),
            if replicas.len() == 1 { "" } else { "s" },
            replicas
                .iter()
                .map(|i| format!("GPU {i}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        for (i, _) in gpus.iter().enumerate() {
            if !holds[i] {
                lines.push(format!(
                    "GPU {i} gets no replica: it is too small for the model with this context"
                ));
            }
        }
        if fit < holding.len() {
            lines.push(format!(
                "RAM: {} replicas would need {} MiB (the model's RAM-resident weights {} MiB once, shared through \
                 the page cache, + {} MiB per llama-server) but the budget is {} MiB: {fit} replica{}; GPU{} {} \
                 get{} none (give more RAM for more replicas)",
                holding.len(),
                mib(whole
                    .ram
                    .weights
                    .saturating_add(per_process.saturating_mul(holding.len() as u64))),
                mib(whole.ram.weights),
                mib(per_process),
                ram_mib.unwrap_or(0),
                if fit == 1 { "" } else { "s" },
                if holding.len() - fit == 1 { "" } else { "s" },
                holding[fit..]
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                if holding.len() - fit == 1 { "s" } else { "" },
            ));
        }
        lines.push(format!(
            "context: every replica gets the same {ctx} tokens, so that any replica can take any session (and the \
             router can move one); a GPU with memory to spare keeps it as headroom"
        ));
        let servers = replicas
            .iter()
            .map(|&i| Server {
                gpus: vec![i],
                port: port + i as u16,
                env: env(&[i]),
                args: with_port(&base.flags, port + i as u16),
            })
            .collect();
        let uses = gpus
            .iter()
            .enumerate()
            .map(|(i, &g)| {
                let on = replicas.contains(&(i as u32));
                GpuUse {
                    index: i as u32,
                    vram_mib: g,
                    usable_mib: usable[i],
                    holds_model: holds[i],
                    planned_mib: if on { mib(needs) } else { 0 },
                    layers: if on { shape.n_layer } else { 0 },
                }
            })
            .collect();
        base.reasoning.extend(lines);
        return Ok(GpuPlan {
            layout: Layout::Replicas,
            one_gpu_needs_mib: mib(needs),
            gpus: uses,
            tensor_split: None,
            servers,
            plan: base,
        });
    }

    // One llama-server over every GPU: the one-GPU planner over their sum, each GPU counting its own reserve and
    // compute buffers, then checked GPU by GPU with llama.cpp's layer assignment.
    let many = Options {
        gpus: n as u64,
        ..*opts
    };
    let sum = gpus.iter().sum();
    let mut base = plan(
        shape,
        &Hardware {
            vram_mib: sum,
            ram_mib,
        },
        &many,
    )?;
    let cm = Ctx::new(shape, &many, ctx);
    let split_needs = cm.place(all, 0, Strategy::AllOnGpu).vram.total();
    let shares = split_shares(&c, gpus);
    let (mut ngl, mut n_cpu_moe) = (base.chosen.ngl, base.chosen.n_cpu_moe);
    let mut split = if n > 1 {
        split_counts(&c, gpus, &shares, ngl, n_cpu_moe)
    } else {
        Some(shares.clone())
    };
    let mut adjusted = false;
    while split.is_none() && ngl > 0 {
        // One step less on the GPUs: an MoE placement moves one more layer's experts to RAM while it can, a dense
        // one drops a layer.
        if n_cpu_moe > 0 && n_cpu_moe < shape.n_layer {
            n_cpu_moe += 1;
        } else {
            ngl -= 1;
        }
        adjusted = true;
        split = split_counts(&c, gpus, &shares, ngl, n_cpu_moe);
    }
    // -ngl 0: nothing on the GPUs to split.
    let split = split.unwrap_or(shares);
    let used = per_gpu(&c, ngl, n_cpu_moe, &split);
    let mut adjustment = None;
    if adjusted {
        let strategy = match (ngl, n_cpu_moe) {
            (0, _) => Strategy::CpuOnly,
            (g, 0) if g == all => Strategy::AllOnGpu,
            (g, m) if g == all => Strategy::ExpertsOnCpu { n_cpu_moe: m },
            (g, _) => Strategy::PartialLayers { gpu_layers: g - 1 },
        };
        let chosen = cm.place(ngl, n_cpu_moe, strategy);
        adjustment = Some(format!(
            "per GPU: no split of -ngl {}{} across the GPUs fits each of them, so: {}: {}",
            base.chosen.ngl,
            if base.chosen.n_cpu_moe > 0 {
                format!(" --n-cpu-moe {}", base.chosen.n_cpu_moe)
            } else {
                String::new()
            },
            describe_strategy(shape, &chosen),
            describe_usage(&chosen)
        ));
        base.flags = server_flags(&chosen, ctx, opts);
        base.chosen = chosen;
        base.alternative = None;
    }
    let layout = if base.chosen.strategy == Strategy::AllOnGpu {
        Layout::Split
    } else {
        Layout::Partial
    };
    let on_gpus = gpus
        .iter()
        .enumerate()
        .map(|(i, g)| {
            format!(
                "GPU {i}: {} of {g} MiB, {} layers",
                mib(used[i].0),
                used[i].1
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let split_flag = split
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    lines.push(match layout {
        Layout::Split => format!(
            "layout: one llama-server split across the {n} GPUs by layer (--split-mode layer --tensor-split \
             {split_flag}: layers per GPU, in proportion to the memory each has for layers): no GPU holds the model alone, but together they do ({} MiB with \
             a CUDA context and compute buffers on each GPU; {on_gpus}). A split is slower than one GPU, but only \
             it keeps every layer in VRAM; never --split-mode row (deprecated)",
            mib(split_needs)
        ),
        _ if n == 1 => "layout: partial offload: the GPU cannot hold the model with this context, so part of \
                        it stays in RAM"
            .to_string(),
        _ => format!(
            "layout: partial offload across the {n} GPUs (--split-mode layer --tensor-split {split_flag}): no GPU \
             holds the model alone and all of them together would need {} MiB (a CUDA context and compute \
             buffers on each GPU) of the {sum} MiB they have, so part of it stays in RAM ({on_gpus})",
            mib(split_needs)
        ),
    });
    lines.extend(adjustment);
    let tensor_split = (n > 1).then(|| split.clone());
    if n > 1 {
        base.flags.extend([
            "--split-mode".to_string(),
            "layer".to_string(),
            "--tensor-split".to_string(),
            split_flag,
        ]);
    }
    let uses = gpus
        .iter()
        .enumerate()
        .map(|(i, &g)| GpuUse {
            index: i as u32,
            vram_mib: g,
            usable_mib: usable[i],
            holds_model: holds[i],
            planned_mib: mib(used[i].0),
            layers: used[i].1,
        })
        .collect();
    base.reasoning.extend(lines);
    Ok(GpuPlan {
        layout,
        one_gpu_needs_mib: mib(needs),
        gpus: uses,
        tensor_split,
        servers: vec![Server {
            gpus: indices.clone(),
            port,
            env: env(&indices),
            args: with_port(&base.flags, port),
        }],
        plan: base,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::plan::evaluate;
    use crate::model::shape::{LayerKind, LayerShape};

    /// A dense model of 10 layers of 100 MiB (+16 MiB of f16 KV each at 4096 tokens), 60 MiB in and out.
    fn model() -> ModelShape {
        let layer = |index| LayerShape {
            index,
            weight_bytes: 100 * MIB,
            expert_bytes: 0,
            kind: LayerKind::FullAttention,
            n_head_kv: 8,
            head_dim_k: 128,
            head_dim_v: 128,
            recurrent_state_bytes: 0,
            largest_tensor_bytes: 40 * MIB,
        };
        ModelShape {
            architecture: "llama".into(),
            name: Some("test".into()),
            n_layer: 10,
            context_length: Some(4096),
            n_embd: 1024,
            n_vocab: 32000,
            n_head: 8,
            n_ff_active: 4096,
            expert_count: 0,
            expert_used_count: 0,
            sliding_window: None,
            sliding_window_source: None,
            layers: (0..10).map(layer).collect(),
            input_bytes: 60 * MIB,
            output_bytes: 60 * MIB,
            tied_output_bytes: 0,
            total_bytes: 1120 * MIB,
            tensor_count: 100,
            types: Default::default(),
            template: None,
        }
    }

    fn opts() -> Options {
        Options {
            ctx: Some(4096),
            cache_type: CacheType::F16,
            ..Options::default()
        }
    }

    /// MiB the whole model needs on one GPU, the reserve included.
    fn need() -> u64 {
        mib(evaluate(&model(), &opts(), 4096, 11, 0).vram.total())
    }

    fn go(gpus: &[u64]) -> GpuPlan {
        plan_gpus(&model(), gpus, Some(64000), &opts(), 8080).unwrap()
    }

    fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
        args.windows(2)
            .find(|w| w[0] == name)
            .map(|w| w[1].as_str())
    }

    #[test]
    fn two_equal_gpus_that_each_hold_the_model_get_a_replica_each() {
        let p = go(&[need() + 100, need() + 100]);
        assert_eq!(p.layout, Layout::Replicas);
        assert_eq!(p.servers.len(), 2);
        for (i, s) in p.servers.iter().enumerate() {
            assert_eq!(s.gpus, [i as u32]);
            assert_eq!(s.port, 8080 + i as u16);
            assert_eq!(s.env["CUDA_VISIBLE_DEVICES"], i.to_string());
            assert_eq!(s.env["CUDA_DEVICE_ORDER"], "PCI_BUS_ID");
            assert_eq!(flag(&s.args, "-ngl"), Some("11"));
            assert_eq!(flag(&s.args, "-c"), Some("4096"), "the configured context");
            assert_eq!(flag(&s.args, "--port"), Some(&*s.port.to_string()));
            assert_eq!(flag(&s.args, "--split-mode"), None);
        }
        assert!(
            p.gpus
                .iter()
                .all(|g| g.holds_model && g.planned_mib == need())
        );
        assert_eq!(p.plan.chosen.strategy, Strategy::AllOnGpu);
        assert!(p.tensor_split.is_none());
    }

    #[test]
    fn two_gpus_that_hold_it_only_together_split_it_by_layer() {
        let g = need() * 7 / 10;
        let p = go(&[g, g]);
        assert_eq!(p.layout, Layout::Split, "{:#?}", p.plan.reasoning);
        assert_eq!(p.servers.len(), 1);
        let s = &p.servers[0];
        assert_eq!(s.env["CUDA_VISIBLE_DEVICES"], "0,1");
        assert_eq!(flag(&s.args, "-ngl"), Some("11"));
        assert_eq!(flag(&s.args, "--split-mode"), Some("layer"));
        let ts = p.tensor_split.clone().unwrap();
        assert_eq!(
            flag(&s.args, "--tensor-split"),
            Some(&*format!("{},{}", ts[0], ts[1]))
        );
        // The last GPU also keeps the output layer: it gets a smaller share.
        assert!(ts[0] > ts[1], "{ts:?}");
        assert!(!s.args.iter().any(|a| a == "row"));
        assert!(
            p.gpus
                .iter()
                .all(|u| !u.holds_model && u.planned_mib <= u.vram_mib)
        );
        assert_eq!(p.gpus.iter().map(|u| u.layers).sum::<u32>(), 10);
    }

    #[test]
    fn a_gpu_too_small_for_the_model_gets_no_replica() {
        let p = go(&[need() + 100, need() / 2]);
        assert_eq!(p.layout, Layout::Replicas);
        assert_eq!(p.servers.len(), 1);
        assert_eq!(p.servers[0].gpus, [0]);
        assert!(!p.gpus[1].holds_model);
        assert_eq!(p.gpus[1].planned_mib, 0);
        assert!(
            p.plan
                .reasoning
                .iter()
                .any(|r| r.starts_with("GPU 1 gets no replica")),
            "{:?}",
            p.plan.reasoning
        );
    }

    #[test]
    fn three_mixed_gpus_replicate_on_those_that_hold_it_each_on_its_port() {
        let p = go(&[need() + 500, 600, need() + 10]);
        assert_eq!(p.layout, Layout::Replicas);
        let on: Vec<(Vec<u32>, u16)> = p.servers.iter().map(|s| (s.gpus.clone(), s.port)).collect();
        assert_eq!(on, [(vec![0], 8080), (vec![2], 8082)]);
        assert_eq!(p.servers[1].env["CUDA_VISIBLE_DEVICES"], "2");
    }

    #[test]
    fn three_gpus_none_holding_it_alone_split_it_in_proportion() {
        let p = go(&[need() * 7 / 10, need() * 6 / 10, need() / 2]);
        assert_eq!(p.layout, Layout::Split, "{:#?}", p.plan.reasoning);
        let ts = p.tensor_split.unwrap();
        assert_eq!(ts.len(), 3);
        assert!(ts[2] < ts[0]);
        assert!(p.gpus.iter().all(|u| u.planned_mib <= u.vram_mib));
    }

    #[test]
    fn when_nothing_holds_it_part_stays_in_ram() {
        let g = need() / 2;
        let p = go(&[g, g]);
        assert_eq!(p.layout, Layout::Partial);
        assert!(matches!(
            p.plan.chosen.strategy,
            Strategy::PartialLayers { .. }
        ));
        let args = &p.servers[0].args;
        let ngl: u32 = flag(args, "-ngl").unwrap().parse().unwrap();
        assert!(ngl > 0 && ngl < 11, "{ngl}");
        assert_eq!(flag(args, "--split-mode"), Some("layer"));
        assert!(p.gpus.iter().all(|u| u.planned_mib <= u.vram_mib));
        // One GPU alone: partial offload, no split flags.
        let one = go(&[g]);
        assert_eq!(one.layout, Layout::Partial);
        assert_eq!(flag(&one.servers[0].args, "--split-mode"), None);
    }

    #[test]
    fn one_gpu_that_holds_it_is_one_replica() {
        let p = go(&[need()]);
        assert_eq!(p.layout, Layout::Replicas);
        assert_eq!(p.servers.len(), 1);
    }

    #[test]
    fn ram_bounds_the_number_of_replicas() {
        let s = model();
        let whole = evaluate(&s, &opts(), 4096, 11, 0);
        let per_process = whole.ram.total() - whole.ram.weights;
        // RAM for the shared weights and two processes, not three.
        let ram = mib(whole.ram.weights + 2 * per_process) + 1;
        let g = need() + 100;
        let p = plan_gpus(&s, &[g, g, g], Some(ram), &opts(), 8080).unwrap();
        assert_eq!(p.layout, Layout::Replicas);
        assert_eq!(p.servers.len(), 2);
        assert!(
            p.plan
                .reasoning
                .iter()
                .any(|r| r.starts_with("RAM: 3 replicas"))
        );
    }

    #[test]
    fn bad_gpu_sets_are_refused_naming_the_fix() {
        let s = model();
        let err = |gpus: &[u64], port: u16| {
            plan_gpus(&s, gpus, Some(64000), &opts(), port)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[], 8080).contains("give --gpu"));
        assert!(err(&[24564, 512], 8080).contains("--gpu 512 (GPU 1) is not more than --reserve"));
        assert!(err(&[0], 8080).contains("--gpu 0 (GPU 0)"));
        assert!(err(&[1000; 17], 8080).contains("at most 16"));
        assert!(err(&[24564, 24564], 65535).contains("give a lower --port"));
    }

    #[test]
    fn layers_go_to_gpus_as_llama_cpp_assigns_them() {
        // 9 blocks + output = 10 GPU layers, split 1:1: five each.
        let d = layer_devices(9, 10, &[1, 1]);
        assert_eq!(d[..5], [Some(0); 5]);
        assert_eq!(d[5..], [Some(1); 5]);
        // -ngl 4: the first 6 blocks in RAM, then 2 and 2.
        let d = layer_devices(9, 4, &[1, 1]);
        assert_eq!(d[..6], [None; 6]);
        assert_eq!(d[6..], [Some(0), Some(0), Some(1), Some(1)]);
        // A GPU with share 0 gets nothing.
        assert!(!layer_devices(9, 10, &[1, 0, 1]).contains(&Some(1)));
    }
}
