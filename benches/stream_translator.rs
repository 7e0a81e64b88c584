//! Criterion benchmark of the proxy's streaming hot path, to catch regressions: upstream OpenAI SSE bytes in,
//! client SSE bytes out, through serve-proxy's own stream driver (`Pump`, fed one read at a time: the SSE parser,
//! the typed chunk parse, the stream translator) and each front door's encoder (Anthropic Messages, OpenAI
//! Responses), so the two protocols' costs compare in one run. Throughput is in upstream events/s.
//!
//! Inputs are real llama-server streams recorded for the proxy's tests and benchmark:
//! - text: bench/recorded/chat-stream.sse with its text chunks repeated to 256 (a long answer);
//! - tool call: fixtures/streams/tool-single-length.sse (one Read call whose arguments arrive in fragments).
//!
//! `cargo bench --bench stream_translator`; criterion compares with the previous run kept in target/criterion.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use llmctl::proxy::pump::{AnthropicSse, Pump, SseEncoder};
use llmctl::proxy::responses::{ResponseMeta, ResponsesEncoder};
use llmctl::proxy::stream::StreamTranslator;
use llmctl::proxy::translate::ResponseContext;

const TEXT_CHUNKS: usize = 256;

fn read(rel: &str) -> String {
    let path = format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path} is part of the repository: {e}"))
}

/// The `data:` payloads of a recorded stream, `[DONE]` included.
fn events(sse: &str) -> Vec<&str> {
    sse.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .collect()
}

/// The recorded text stream with its text chunks cycled to TEXT_CHUNKS, one read per event.
fn long_text_stream() -> Vec<Vec<u8>> {
    let sse = read("bench/recorded/chat-stream.sse");
    let all = events(&sse);
    let is_text =
        |d: &&str| d.contains(r#""delta":{"content":""#) && !d.contains(r#""content":"""#);
    let head: Vec<&str> = all.iter().copied().take_while(|d| !is_text(d)).collect();
    let text: Vec<&str> = all.iter().copied().filter(is_text).collect();
    assert!(!text.is_empty(), "the recorded stream has text chunks");
    let tail = all.iter().copied().skip(head.len() + text.len());
    let picked: Vec<&str> = head
        .iter()
        .copied()
        .chain(text.iter().copied().cycle().take(TEXT_CHUNKS))
        .chain(tail)
        .collect();
    to_reads(&picked)
}

/// Each event as the bytes of one read, as llama-server writes them: `data: …` and a blank line.
fn to_reads(data: &[&str]) -> Vec<Vec<u8>> {
    data.iter()
        .map(|d| format!("data: {d}\n\n").into_bytes())
        .collect()
}

/// One stream end to end, the upstream's bytes arriving one event per read as llama-server writes them, out
/// through `enc`. Returns the bytes sent to the client, so nothing can be optimized away.
fn translate<E: SseEncoder>(reads: &[Vec<u8>], mut enc: E) -> usize {
    let mut p = Pump::detached(
        "http://bench",
        StreamTranslator::new(ResponseContext {
            client_model: "claude-sonnet-4-5".into(),
            message_id: "msg_bench".into(),
            ..ResponseContext::default()
        }),
    );
    let mut sent = enc.encode(&p.start()).len();
    for read in reads {
        sent += enc.encode(&p.feed(black_box(read))).len();
    }
    sent += enc.encode(&p.feed_end()).len();
    assert!(p.failure().is_none(), "recorded streams end cleanly");
    sent
}

fn responses() -> ResponsesEncoder {
    ResponsesEncoder::new(ResponseMeta {
        id: "resp_bench".into(),
        model: "local-model".into(),
        ..ResponseMeta::default()
    })
}

fn bench_stream(c: &mut Criterion, name: &str, reads: &[Vec<u8>]) {
    // Fails loudly if a change made the recorded stream produce nothing.
    assert!(
        translate(reads, AnthropicSse) > 0,
        "{name}: no client bytes"
    );
    assert!(translate(reads, responses()) > 0, "{name}: no client bytes");
    let mut group = c.benchmark_group("stream_translator");
    group.throughput(Throughput::Elements(reads.len() as u64));
    group.bench_function(format!("{name}/messages"), |b| {
        b.iter(|| black_box(translate(reads, AnthropicSse)))
    });
    group.bench_function(format!("{name}/responses"), |b| {
        b.iter(|| black_box(translate(reads, responses())))
    });
    group.finish();
}

fn streams(c: &mut Criterion) {
    bench_stream(c, "text_256_chunks", &long_text_stream());
    let tool = read("fixtures/streams/tool-single-length.sse");
    bench_stream(c, "tool_call_recorded", &to_reads(&events(&tool)));
}

criterion_group!(benches, streams);
criterion_main!(benches);
