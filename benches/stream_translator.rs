//! Criterion benchmark of the proxy's stream translator (OpenAI chunks in, Anthropic SSE events out), in
//! chunks/s, to catch regressions: one recorded llama-server stream (bench/recorded/chat-stream.sse) with
//! its text chunks repeated to 256, translated and serialized end to end.
//!
//! Not in this branch's [[bench]] list: `llmctl::proxy::stream` lands with branch `proxy`. On merge add to
//! Cargo.toml:
//!   [dev-dependencies] criterion = { version = "0.7", default-features = false, features = ["cargo_bench_support"] }
//!   [[bench]] name = "stream_translator"  harness = false
//! and run `cargo bench --bench stream_translator`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use llmctl::proxy::stream::{ResponseContext, StreamTranslator};
use serde_json::Value;

const TEXT_CHUNKS: usize = 256;

/// The recorded chunks: role chunk, text chunks cycled to TEXT_CHUNKS, finish chunk (`[DONE]` is not JSON).
fn recorded_chunks() -> Vec<Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/bench/recorded/chat-stream.sse"
    );
    let sse = std::fs::read_to_string(path)
        .expect("bench/recorded/chat-stream.sse is part of the repository");
    let all: Vec<Value> = sse
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    let is_text = |v: &Value| {
        v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    };
    let head: Vec<Value> = all.iter().take_while(|v| !is_text(v)).cloned().collect();
    let text: Vec<Value> = all.iter().filter(|v| is_text(v)).cloned().collect();
    let tail: Vec<Value> = all.iter().skip(head.len() + text.len()).cloned().collect();
    head.into_iter()
        .chain(text.iter().cycle().take(TEXT_CHUNKS).cloned())
        .chain(tail)
        .collect()
}

fn translate_stream(c: &mut Criterion) {
    let chunks = recorded_chunks();
    let mut group = c.benchmark_group("stream_translator");
    group.throughput(Throughput::Elements(chunks.len() as u64));
    group.bench_function("recorded_stream_256_text_chunks", |b| {
        b.iter(|| {
            let mut t = StreamTranslator::new(ResponseContext::default());
            let mut bytes = 0usize;
            for e in t.start() {
                bytes += e.to_sse().len();
            }
            for chunk in &chunks {
                for e in t.on_chunk(black_box(chunk)) {
                    bytes += e.to_sse().len();
                }
            }
            for e in t.finish() {
                bytes += e.to_sse().len();
            }
            black_box(bytes)
        })
    });
    group.finish();
}

criterion_group!(benches, translate_stream);
criterion_main!(benches);
