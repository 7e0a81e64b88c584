//! A model's shape as the memory planner needs it, derived from a GGUF header: per-layer weight bytes
//! (expert tensors apart), what each layer keeps per token of context (full attention, sliding window,
//! recurrent state, nothing), and the input/output tensors.

use std::collections::BTreeMap;

use serde::Serialize;

use super::gguf::{GgmlType, Header, TensorInfo, Value};
use super::template::{self, TemplateCaps};

/// What one layer keeps in memory for the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// K and V for every token of the context.
    FullAttention,
    /// K and V for the last `sliding_window` tokens only.
    SlidingWindow,
    /// A fixed-size recurrent state (Mamba, gated delta net), whatever the context length.
    Recurrent,
    /// Reuses another layer's KV cache (Gemma 3n/4 `shared_kv_layers`).
    SharedKv,
    /// No attention and no state (e.g. a layer without attention tensors).
    Stateless,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerShape {
    pub index: u32,
    /// Bytes of the layer's tensors except the routed experts.
    pub weight_bytes: u64,
    /// Bytes of the routed-expert tensors (`ffn_{gate,up,down,gate_up}_exps`): what `--n-cpu-moe` moves.
    pub expert_bytes: u64,
    pub kind: LayerKind,
    pub n_head_kv: u64,
    pub head_dim_k: u64,
    pub head_dim_v: u64,
    /// For recurrent layers: bytes of state per sequence (f32).
    pub recurrent_state_bytes: u64,
    /// The largest single tensor of the layer (experts included): what ggml stages in VRAM when it
    /// offloads a CPU-resident matmul during prompt processing.
    pub largest_tensor_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TypeUsage {
    pub tensors: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelShape {
    pub architecture: String,
    pub name: Option<String>,
    pub n_layer: u32,
    pub context_length: Option<u64>,
    pub n_embd: u64,
    pub n_vocab: u64,
    pub n_head: u64,
    /// Largest feed-forward width a token goes through (dense FFN, or used experts + shared experts).
    pub n_ff_active: u64,
    pub expert_count: u64,
    pub expert_used_count: u64,
    pub sliding_window: Option<u64>,
    /// How the sliding-window layers were identified, or why none were.
    pub sliding_window_source: Option<String>,
    pub layers: Vec<LayerShape>,
    /// `token_embd` (+ `per_layer_token_embd`): llama.cpp keeps the input layer in RAM, always.
    pub input_bytes: u64,
    /// `output`, `output_norm` and other tensors outside the blocks: they go where `-ngl` puts the output layer.
    pub output_bytes: u64,
    /// When the output matrix is the token embedding (tied), offloading the output layer puts a copy of
    /// `token_embd` in VRAM: its size. 0 when the file has its own `output.weight`.
    pub tied_output_bytes: u64,
    pub total_bytes: u64,
    pub tensor_count: u64,
    pub types: BTreeMap<String, TypeUsage>,
    pub template: Option<TemplateCaps>,
}

impl ModelShape {
    pub fn is_moe(&self) -> bool {
        self.expert_count > 1 && self.layers.iter().any(|l| l.expert_bytes > 0)
    }

    pub fn layer_bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| l.weight_bytes + l.expert_bytes)
            .sum()
    }

    pub fn expert_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.expert_bytes).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error(
        "the GGUF header has no `{0}`; it is not a llama.cpp model file (or a vocabulary-only/LoRA file)"
    )]
    Missing(String),
    #[error("`{key}` has an unexpected value {value}: {why}")]
    Invalid {
        key: String,
        value: String,
        why: String,
    },
}

/// llama.cpp's tensor-name pattern for routed experts (`LLM_FFN_EXPS_REGEX` in common/common.h).
fn is_expert_tensor(name: &str) -> bool {
    ["up", "down", "gate", "gate_up"].iter().any(|p| {
        name.contains(&format!(".ffn_{p}_exps")) || name.contains(&format!(".ffn_{p}_chexps"))
    })
}

/// `blk.12.attn_q.weight` → 12.
fn block_index(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("blk.")?;
    let (n, _) = rest.split_once('.')?;
    n.parse().ok()
}

struct Meta<'a> {
    header: &'a Header,
    arch: &'a str,
}

impl Meta<'_> {
    fn key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.arch)
    }
    fn get(&self, suffix: &str) -> Option<&Value> {
        self.header.get(&self.key(suffix))
    }
    fn u64(&self, suffix: &str) -> Result<Option<u64>, ShapeError> {
        match self.get(suffix) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(n)),
                // Some converters write per-layer arrays for keys that are scalar elsewhere: use the maximum.
                None => match v.as_array() {
                    Some(items) if !items.is_empty() => {
                        Ok(items.iter().filter_map(Value::as_u64).max())
                    }
                    _ => Err(self.invalid(suffix, v, "expected a non-negative integer")),
                },
            },
        }
    }
    /// A key that is either one integer for every layer or an array with one per layer.
    fn per_layer(&self, suffix: &str, n_layer: usize) -> Result<Option<Vec<u64>>, ShapeError> {
        let Some(v) = self.get(suffix) else {
            return Ok(None);
        };
        if let Some(n) = v.as_u64() {
            return Ok(Some(vec![n; n_layer]));
        }
        let items = v
            .as_array()
            .ok_or_else(|| self.invalid(suffix, v, "expected an integer or an array"))?;
        let values: Option<Vec<u64>> = items.iter().map(Value::as_u64).collect();
        match values {
            Some(vals) if vals.len() >= n_layer => Ok(Some(vals[..n_layer].to_vec())),
            _ => Err(self.invalid(
                suffix,
                v,
                &format!("expected {n_layer} non-negative integers, one per layer"),
            )),
        }
    }
    fn invalid(&self, suffix: &str, v: &Value, why: &str) -> ShapeError {
        let mut value = format!("{v:?}");
        if value.len() > 80 {
            value.truncate(80);
            value.push('…');
        }
        ShapeError::Invalid {
            key: self.key(suffix),
            value,
            why: why.to_string(),
        }
    }
}

/// Layers llama.cpp hard-codes as sliding-window when the file gives a window but no pattern
/// (`set_swa_pattern(n)`: every n-th layer is full attention). Other architectures: no layer is assumed
/// to be sliding, which can only over-estimate the KV cache.
fn default_swa_period(arch: &str) -> Option<u64> {
    match arch {
        "gemma2" => Some(2),
        "gemma3" => Some(6),
        "cohere2" => Some(4),
        _ => None,
    }
}

pub fn from_header(header: &Header) -> Result<ModelShape, ShapeError> {
    let arch = header
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| ShapeError::Missing("general.architecture".into()))?;
    let m = Meta { header, arch };
    let n_layer_u64 = m
        .u64("block_count")?
        .ok_or_else(|| ShapeError::Missing(m.key("block_count")))?;
    let n_layer = u32::try_from(n_layer_u64)
        .ok()
        .filter(|&n| n <= 4096)
        .ok_or_else(|| ShapeError::Invalid {
            key: m.key("block_count"),
            value: n_layer_u64.to_string(),
            why: "no model has that many layers".into(),
        })?;
    let nl = n_layer as usize;
    let n_embd = m
        .u64("embedding_length")?
        .ok_or_else(|| ShapeError::Missing(m.key("embedding_length")))?;
    let n_head = m.per_layer("attention.head_count", nl)?.unwrap_or_default();
    let n_head_kv = m
        .per_layer("attention.head_count_kv", nl)?
        .unwrap_or_else(|| n_head.clone());
    let n_head_max = n_head.iter().copied().max().unwrap_or(0);
    let key_length = m.u64("attention.key_length")?;
    let value_length = m.u64("attention.value_length")?;
    let key_length_swa = m.u64("attention.key_length_swa")?;
    let value_length_swa = m.u64("attention.value_length_swa")?;
    let sliding_window = m.u64("attention.sliding_window")?.filter(|&w| w > 0);
    let expert_count = m.u64("expert_count")?.unwrap_or(0);
    let expert_used_count = m.u64("expert_used_count")?.unwrap_or(0);
    let shared_kv_layers = m.u64("attention.shared_kv_layers")?.unwrap_or(0);

    let (swa, sliding_window_source) = swa_layers(&m, nl, sliding_window)?;
    let recurrent_flags: Option<Vec<bool>> = m
        .get("attention.recurrent_layers")
        .and_then(Value::as_array)
        .map(|items| items.iter().map(|v| v.as_bool() == Some(true)).collect());
    let recurrent_state = recurrent_state_bytes(&m)?;

    // Group tensors: per block, and the rest.
    let mut per_layer: Vec<Vec<&TensorInfo>> = vec![Vec::new(); nl];
    let mut input_bytes = 0;
    let mut output_bytes = 0;
    let mut has_output_matrix = false;
    let mut token_embd_bytes = 0;
    let mut types: BTreeMap<String, TypeUsage> = BTreeMap::new();
    let mut total_bytes = 0;
    for t in &header.tensors {
        let bytes = t.n_bytes();
        total_bytes += bytes;
        let usage = types.entry(t.ggml_type.name()).or_insert(TypeUsage {
            tensors: 0,
            bytes: 0,
        });
        usage.tensors += 1;
        usage.bytes += bytes;
        match block_index(&t.name) {
            Some(i) if (i as usize) < nl => per_layer[i as usize].push(t),
            // Blocks past block_count (e.g. multi-token-prediction heads) are not run by llama-server
            // unless asked; count them with the output side, where they would be placed.
            _ if t.name.starts_with("token_embd.") => {
                token_embd_bytes += bytes;
                input_bytes += bytes;
            }
            _ if t.name.starts_with("per_layer_token_embd.") => input_bytes += bytes,
            _ => {
                if t.name == "output.weight" {
                    has_output_matrix = true;
                }
                output_bytes += bytes;
            }
        }
    }

    let mut layers = Vec::with_capacity(nl);
    let mut n_ff_active = m
        .per_layer("feed_forward_length", nl)?
        .map_or(0, |v| v.into_iter().max().unwrap_or(0));
    let n_ff_exp = m.u64("expert_feed_forward_length")?.unwrap_or(0);
    let n_ff_shexp = m.u64("expert_shared_feed_forward_length")?.unwrap_or(0);
    if expert_count > 1 {
        n_ff_active = n_ff_active.max(
            n_ff_exp
                .saturating_mul(expert_used_count)
                .saturating_add(n_ff_shexp),
        );
    }
    for (i, tensors) in per_layer.iter().enumerate() {
        let expert_bytes: u64 = tensors
            .iter()
            .filter(|t| is_expert_tensor(&t.name))
            .map(|t| t.n_bytes())
            .sum();
        let weight_bytes: u64 = tensors.iter().map(|t| t.n_bytes()).sum::<u64>() - expert_bytes;
        let has = |part: &str| {
            tensors
                .iter()
                .any(|t| t.name.split('.').nth(2).is_some_and(|p| p == part))
        };
        let is_recurrent = match &recurrent_flags {
            Some(flags) => flags.get(i).copied().unwrap_or(false),
            None => tensors.iter().any(|t| {
                t.name
                    .split('.')
                    .nth(2)
                    .is_some_and(|p| p.starts_with("ssm_") || p.starts_with("time_mix_"))
            }),
        };
        let has_attention = ["attn_k", "attn_qkv", "attn_kv_a_mqa", "attn_q"]
            .iter()
            .any(|p| has(p));
        let kind = if is_recurrent {
            LayerKind::Recurrent
        } else if shared_kv_layers > 0 && (i as u64) >= n_layer_u64.saturating_sub(shared_kv_layers)
        {
            LayerKind::SharedKv
        } else if !has_attention {
            LayerKind::Stateless
        } else if swa[i] {
            LayerKind::SlidingWindow
        } else {
            LayerKind::FullAttention
        };
        let heads = n_head.get(i).copied().unwrap_or(0);
        let default_dim = n_embd.checked_div(heads).unwrap_or(0);
        let (k, v) = if kind == LayerKind::SlidingWindow {
            (
                key_length_swa.or(key_length).unwrap_or(default_dim),
                value_length_swa
                    .or(key_length_swa)
                    .or(value_length)
                    .or(key_length)
                    .unwrap_or(default_dim),
            )
        } else {
            (
                key_length.unwrap_or(default_dim),
                value_length.or(key_length).unwrap_or(default_dim),
            )
        };
        layers.push(LayerShape {
            index: i as u32,
            weight_bytes,
            expert_bytes,
            kind,
            n_head_kv: n_head_kv.get(i).copied().unwrap_or(0),
            head_dim_k: k,
            head_dim_v: v,
            recurrent_state_bytes: if kind == LayerKind::Recurrent {
                recurrent_state
            } else {
                0
            },
            largest_tensor_bytes: tensors.iter().map(|t| t.n_bytes()).max().unwrap_or(0),
        });
    }

    let n_vocab = header
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .map(|a| a.len() as u64)
        .filter(|&n| n > 0)
        .or(m.u64("vocab_size")?)
        .or_else(|| {
            header
                .tensors
                .iter()
                .find(|t| t.name == "token_embd.weight" || t.name == "output.weight")
                .and_then(|t| t.dims.get(1).copied())
        })
        .unwrap_or(0);

    let template = header
        .get("tokenizer.chat_template")
        .and_then(Value::as_str)
        .map(template::analyze);

    // A tied output is a duplicate of token_embd placed with the output layer.
    let tied_output_bytes = if has_output_matrix {
        0
    } else {
        token_embd_bytes
    };

    Ok(ModelShape {
        architecture: arch.to_string(),
        name: header
            .get("general.name")
            .and_then(Value::as_str)
            .map(str::to_string),
        n_layer,
        context_length: m.u64("context_length")?,
        n_embd,
        n_vocab,
        n_head: n_head_max,
        n_ff_active,
        expert_count,
        expert_used_count,
        sliding_window,
        sliding_window_source,
        layers,
        input_bytes,
        output_bytes,
        tied_output_bytes,
        total_bytes,
        tensor_count: header.tensors.len() as u64,
        types,
        template,
    })
}

/// Which layers use the sliding window, and a sentence saying how that was decided.
fn swa_layers(
    m: &Meta<'_>,
    nl: usize,
    window: Option<u64>,
) -> Result<(Vec<bool>, Option<String>), ShapeError> {
    let Some(w) = window else {
        return Ok((vec![false; nl], None));
    };
    let key = "attention.sliding_window_pattern";
    match m.get(key) {
        Some(Value::Array(items)) => {
            let flags: Vec<bool> = items.iter().map(|v| v.as_bool() == Some(true)).collect();
            if flags.len() < nl {
                return Err(m.invalid(
                    key,
                    &Value::Array(items.clone()),
                    &format!("expected {nl} booleans, one per layer"),
                ));
            }
            Ok((
                flags[..nl].to_vec(),
                Some(format!(
                    "{w}-token window on the layers `{}` marks",
                    m.key(key)
                )),
            ))
        }
        Some(v) => {
            let period = v
                .as_u64()
                .ok_or_else(|| m.invalid(key, v, "expected an integer or a boolean array"))?;
            Ok((
                period_pattern(nl, period),
                Some(format!(
                    "{w}-token window, every {period}th layer full ({})",
                    m.key(key)
                )),
            ))
        }
        None => match default_swa_period(m.arch) {
            Some(period) => Ok((
                period_pattern(nl, period),
                Some(format!(
                    "{w}-token window, every {period}th layer full (llama.cpp's fixed pattern for {})",
                    m.arch
                )),
            )),
            None => Ok((
                vec![false; nl],
                Some(format!(
                    "{w}-token window in the metadata but no layer pattern: every layer counted at full \
                     context (over-estimates the KV cache)"
                )),
            )),
        },
    }
}

/// llama.cpp `set_swa_pattern(n)`: layer i is sliding unless it is the last of each group of n.
fn period_pattern(nl: usize, period: u64) -> Vec<bool> {
    (0..nl as u64)
        .map(|i| period > 1 && i % period < period - 1)
        .collect()
}

/// llama.cpp `n_embd_r() + n_embd_s()` for Mamba-style and gated-delta-net layers, in f32 bytes:
/// conv state `(d_conv - 1) × (d_inner + 2 × n_group × d_state)` plus SSM state `d_state × d_inner`.
fn recurrent_state_bytes(m: &Meta<'_>) -> Result<u64, ShapeError> {
    let d_conv = m.u64("ssm.conv_kernel")?.unwrap_or(0);
    let d_inner = m.u64("ssm.inner_size")?.unwrap_or(0);
    let d_state = m.u64("ssm.state_size")?.unwrap_or(0);
    let n_group = m.u64("ssm.group_count")?.unwrap_or(0);
    let conv = d_conv
        .saturating_sub(1)
        .saturating_mul(d_inner.saturating_add(n_group.saturating_mul(d_state).saturating_mul(2)));
    let ssm = d_state.saturating_mul(d_inner);
    Ok(conv
        .saturating_add(ssm)
        .saturating_mul(GgmlType::F32.type_size()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_tensor_names() {
        assert!(is_expert_tensor("blk.3.ffn_down_exps.weight"));
        assert!(is_expert_tensor("blk.3.ffn_gate_up_exps.weight"));
        assert!(!is_expert_tensor("blk.3.ffn_down_shexp.weight"));
        assert!(!is_expert_tensor("blk.3.ffn_down.weight"));
        assert_eq!(block_index("blk.12.attn_q.weight"), Some(12));
        assert_eq!(block_index("output.weight"), None);
    }

    #[test]
    fn gemma3_pattern_is_five_sliding_one_full() {
        let p = period_pattern(12, 6);
        assert_eq!(p.iter().filter(|&&s| !s).count(), 2);
        assert!(!p[5] && !p[11] && p[0] && p[4]);
    }
}
