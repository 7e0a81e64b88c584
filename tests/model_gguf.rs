//! The GGUF header reader on the real SmolLM2 file and on generated, truncated and corrupt headers.

#[path = "model_support.rs"]
mod support;

use std::io::Read;

use llmctl::model::gguf::{self, GgufError, Value};
use llmctl::model::shape::{self, LayerKind};
use llmctl::model::source;
use support::*;

#[test]
fn smollm2_real_file() {
    let path = smollm2_path();
    let located = source::read_local(&path).expect("SmolLM2 header parses");
    let h = &located.header;
    assert_eq!(h.version, 3);
    assert_eq!(
        h.get("general.architecture").and_then(Value::as_str),
        Some("llama")
    );
    assert_eq!(h.alignment, 32);
    // 30 blocks × 9 tensors + token_embd + output_norm: the tied-output llama layout.
    assert_eq!(h.tensors.len(), 272);
    let count = |t: &str| h.tensors.iter().filter(|x| x.ggml_type.name() == t).count();
    assert_eq!((count("Q4_1"), count("Q8_0"), count("F32")), (210, 1, 61));
    let embd = h
        .tensors
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .unwrap();
    assert_eq!(embd.dims, vec![576, 49152]);
    assert_eq!(embd.ggml_type.name(), "Q8_0");

    // The tensors fill the data section exactly (up to the alignment padding after the last one).
    let file_size = located.file_size.unwrap();
    let data_in_file = file_size - h.data_offset;
    assert!(h.data_size >= data_in_file && h.data_size - data_in_file < h.alignment);
    assert_eq!(h.min_file_size(), file_size);

    let s = shape::from_header(h).unwrap();
    assert_eq!(s.architecture, "llama");
    assert_eq!(s.n_layer, 30);
    assert_eq!(s.context_length, Some(8192));
    assert_eq!((s.n_embd, s.n_head, s.n_vocab), (576, 9, 49152));
    assert!(!s.is_moe());
    assert!(s.layers.iter().all(|l| l.kind == LayerKind::FullAttention
        && l.n_head_kv == 3
        && l.head_dim_k == 64
        && l.head_dim_v == 64));
    assert_eq!(
        s.total_bytes,
        h.tensors.iter().map(|t| t.n_bytes()).sum::<u64>()
    );
    assert_eq!(
        s.tied_output_bytes,
        embd.n_bytes(),
        "SmolLM2 ties its output to the embedding"
    );
    let caps = s.template.expect("SmolLM2 has a chat template");
    assert!(!caps.tools && !caps.thinking, "ChatML template: {caps:?}");
}

#[test]
fn smollm2_inspect_report() {
    let path = smollm2_path();
    let located = source::read_local(&path).unwrap();
    let report = llmctl::model::inspect_report("SmolLM2", &located).unwrap();
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["architecture"], "llama");
    assert_eq!(json["layers"], 30);
    assert_eq!(json["context_length"], 8192);
    assert_eq!(json["attention"]["kv_heads"], serde_json::json!([3]));
    assert_eq!(json["quantization"][0]["type"], "Q4_1");
    assert_eq!(json["sizes"]["per_layer"].as_array().unwrap().len(), 30);
    let text = llmctl::model::render_inspect(&report);
    assert!(text.contains("layers           30"), "{text}");
    assert!(text.contains("blk.0-29"), "{text}");
}

#[test]
fn the_header_reader_never_reads_tensor_data() {
    // A reader that fails on any byte past the header proves only the header is read.
    let path = smollm2_path();
    let header_len = source::read_local(&path).unwrap().header.header_len;
    let file = std::fs::File::open(&path).unwrap();
    let h = gguf::read_header(std::io::BufReader::new(file.take(header_len))).unwrap();
    assert_eq!(h.tensors.len(), 272);
}

#[test]
fn generated_models_parse_with_their_shapes() {
    let g = gguf::read_header(&gemma4_26b_a4b().bytes()[..]).unwrap();
    let s = shape::from_header(&g).unwrap();
    assert!(s.is_moe());
    assert_eq!((s.expert_count, s.expert_used_count), (128, 8));
    let swa = s
        .layers
        .iter()
        .filter(|l| l.kind == LayerKind::SlidingWindow)
        .count();
    assert_eq!(swa, 25);
    assert_eq!(s.layers[5].n_head_kv, 2);
    assert_eq!(s.layers[5].head_dim_k, 512);
    assert_eq!(s.layers[0].head_dim_k, 256);
    // Within a few per cent of the guide's 15.9 GB file.
    let gb = s.total_bytes as f64 / 1e9;
    assert!((15.0..16.8).contains(&gb), "{gb} GB");

    let q = shape::from_header(&gguf::read_header(&qwen36_35b_a3b().bytes()[..]).unwrap()).unwrap();
    let rec = q
        .layers
        .iter()
        .filter(|l| l.kind == LayerKind::Recurrent)
        .count();
    assert_eq!(rec, 30);
    // Gated delta net state: conv 3 × (4096 + 2·16·128) + ssm 128 × 4096 floats.
    assert_eq!(
        q.layers[0].recurrent_state_bytes,
        (3 * 8192 + 128 * 4096) * 4
    );
    assert!(q.layers[3].kind == LayerKind::FullAttention);

    let d = shape::from_header(&gguf::read_header(&qwen36_27b().bytes()[..]).unwrap()).unwrap();
    assert!(!d.is_moe());
    assert_eq!(d.n_layer, 64);
}

fn err_of(bytes: &[u8]) -> GgufError {
    match gguf::read_header(bytes) {
        Ok(_) => panic!("a broken header parsed"),
        Err(e) => e,
    }
}

#[test]
fn truncated_at_every_section_boundary() {
    let mut w = GgufWriter::new("llama");
    w.u32("llama.block_count", 1)
        .kv("general.name", Value::Str("tiny".into()))
        .kv(
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::Str("a".into()), Value::Str("b".into())]),
        )
        .tensor("token_embd.weight", &[64, 2], F32)
        .tensor("blk.0.attn_q.weight", &[64, 64], Q8_0);
    let (bytes, marks) = w.encode();
    assert!(gguf::read_header(&bytes[..]).is_ok());
    for (section, end) in &marks {
        // Cut right at the boundary (except at the very end, which is complete) and one byte inside it.
        for cut in [*end, end.saturating_sub(1)] {
            if cut >= bytes.len() {
                continue;
            }
            let e = err_of(&bytes[..cut]);
            assert!(e.is_truncated(), "cut at {cut} ({section}): {e}");
            let msg = e.to_string();
            assert!(
                msg.contains("truncated") && msg.contains("fetch it again"),
                "{msg}"
            );
        }
    }
    // Every cut anywhere, not only at boundaries, is an error and never a panic.
    for cut in 0..bytes.len() {
        assert!(gguf::read_header(&bytes[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn bad_magic_names_the_bytes() {
    let msg = err_of(b"PK\x03\x04rest of a zip file").to_string();
    assert!(
        msg.contains("not a GGUF file") && msg.contains("50 4b 03 04"),
        "{msg}"
    );
}

#[test]
fn huge_string_length_is_refused_without_allocating() {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(u64::MAX.to_le_bytes()); // key length
    let msg = err_of(&b).to_string();
    assert!(
        msg.contains("claims a length of 18446744073709551615"),
        "{msg}"
    );

    // A plausible-looking but huge value string in a short file: truncated, not an allocation.
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(3u64.to_le_bytes());
    b.extend(b"key");
    b.extend(8u32.to_le_bytes());
    b.extend((30u64 << 20).to_le_bytes());
    b.extend(b"only a few bytes");
    assert!(err_of(&b).is_truncated());
}

#[test]
fn absurd_counts_are_refused() {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(u64::MAX.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    assert!(err_of(&b).to_string().contains("tensor count"));

    let mut w = GgufWriter::new("llama");
    w.kv("x", Value::Array(vec![Value::U8(1)]));
    let mut bytes = w.bytes();
    // Patch the array length (the last 9 bytes are: u64 length + one u8) to 2^40.
    let at = bytes.len() - 9;
    bytes[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(err_of(&bytes).to_string().contains("length of array `x`"));
}

#[test]
fn corrupt_tensor_infos_are_explained() {
    let cases: Vec<(GgufWriter, &str)> = vec![
        (
            {
                let mut w = GgufWriter::new("llama");
                w.tensor("t", &[64], 77);
                w
            },
            "ggml type id 77",
        ),
        (
            {
                let mut w = GgufWriter::new("llama");
                w.tensor("t", &[100], Q4_K);
                w
            },
            "not a multiple of its block size 256",
        ),
        (
            {
                let mut w = GgufWriter::new("llama");
                w.tensor("t", &[64], F32).tensor("t", &[64], F32);
                w
            },
            "appears twice",
        ),
        (
            {
                let mut w = GgufWriter::new("llama");
                w.tensor("t", &[u64::MAX, 4], F32);
                w
            },
            "absurd dimensions",
        ),
    ];
    for (w, expected) in cases {
        let msg = err_of(&w.bytes()).to_string();
        assert!(msg.contains(expected), "{msg}");
    }
    // A wrong offset: patch the second tensor's offset (its last 8 bytes).
    let mut w = GgufWriter::new("llama");
    w.tensor("a", &[64], F32).tensor("b", &[64], F32);
    let mut bytes = w.bytes();
    let n = bytes.len();
    bytes[n - 8..].copy_from_slice(&4u64.to_le_bytes());
    let msg = err_of(&bytes).to_string();
    assert!(
        msg.contains("starts at data offset 4, expected 256"),
        "{msg}"
    );
    // Too many dimensions.
    let mut w = GgufWriter::new("llama");
    w.tensor("t", &[1, 1, 1, 1, 1], F32);
    assert!(err_of(&w.bytes()).to_string().contains("5 dimensions"));
}

#[test]
fn bad_alignment_and_missing_architecture() {
    let mut w = GgufWriter::new("llama");
    w.u32("general.alignment", 24);
    assert!(err_of(&w.bytes()).to_string().contains("power of two"));

    let mut w = GgufWriter::new("llama");
    w.kvs.clear();
    let h = gguf::read_header(&w.bytes()[..]).unwrap();
    let e = shape::from_header(&h).unwrap_err().to_string();
    assert!(e.contains("general.architecture"), "{e}");
}
