//! The stream state machine on recorded upstream streams (`fixtures/streams/`, see its README
//! for which are recorded from a real llama-server and which are hand-made) and on hand-built
//! edge cases. Every sequence is checked by one grammar checker, `assert_valid_anthropic_stream`.

use std::path::PathBuf;

use llmctl::proxy::accumulate::MessageAccumulator;
use llmctl::proxy::pump::Pump;
use llmctl::proxy::stream::{BlockKind, Delta, Event, SIGNATURE_PREFIX, StreamTranslator, Usage};
use llmctl::proxy::translate::ResponseContext;
use serde_json::{Value, json};

// ---------------------------------------------------------------- helpers

fn ctx() -> ResponseContext {
    ResponseContext {
        client_model: "claude-sonnet-5".into(),
        message_id: "msg_test".into(),
        ..Default::default()
    }
}

/// The `data:` JSON objects of a recorded SSE body, up to `[DONE]`.
fn load_fixture(name: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/streams")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .take_while(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{name}: bad JSON {d}: {e}")))
        .collect()
}

/// Runs a whole stream through the server's own stream driver: the chunks as the upstream's SSE bytes, one
/// read each, then `[DONE]` and the end of the body.
fn run(ctx: ResponseContext, chunks: &[Value]) -> (Vec<Event>, StreamTranslator) {
    let mut p = Pump::detached("http://upstream", StreamTranslator::new(ctx));
    let mut events = p.start();
    for c in chunks {
        events.extend(p.feed(format!("data: {c}\n\n").as_bytes()));
    }
    events.extend(p.feed(b"data: [DONE]\n\n"));
    events.extend(p.feed_end());
    (events, p.into_translator())
}

fn accumulate(events: &[Event]) -> Value {
    let mut acc = MessageAccumulator::new();
    events.iter().for_each(|e| acc.push(e));
    acc.finish()
}

/// Anthropic's stream grammar, as Claude Code's parser enforces it.
fn assert_valid_anthropic_stream(events: &[Event]) {
    let names: Vec<&str> = events.iter().map(Event::name).collect();
    assert!(
        matches!(events.first(), Some(Event::MessageStart { .. })),
        "must start with message_start: {names:?}"
    );
    let starts = names.iter().filter(|n| **n == "message_start").count();
    assert_eq!(starts, 1, "exactly one message_start: {names:?}");
    let errored = names.contains(&"error");
    if errored {
        assert_eq!(
            names.last(),
            Some(&"error"),
            "nothing may follow an error: {names:?}"
        );
        assert_eq!(names.iter().filter(|n| **n == "error").count(), 1);
    } else {
        assert_eq!(
            names.last(),
            Some(&"message_stop"),
            "message_stop last: {names:?}"
        );
        assert_eq!(names.iter().filter(|n| **n == "message_stop").count(), 1);
        assert_eq!(names.iter().filter(|n| **n == "message_delta").count(), 1);
        assert_eq!(names[names.len() - 2], "message_delta", "{names:?}");
    }
    // (index, kind, saw signature)
    let mut open: Option<(usize, BlockKind, bool)> = None;
    let mut next_index = 0;
    for e in events {
        match e {
            Event::ContentBlockStart { index, block } => {
                assert!(
                    open.is_none(),
                    "block {index} started while {open:?} is open"
                );
                assert_eq!(*index, next_index, "indices must be dense and never reused");
                next_index += 1;
                open = Some((*index, block.clone(), false));
            }
            Event::ContentBlockDelta { index, delta } => {
                let Some((oi, kind, signed)) = open.as_mut() else {
                    panic!("delta for block {index} with no open block");
                };
                assert_eq!(index, oi, "delta index must be the open block");
                let ok = match (&*kind, delta) {
                    (BlockKind::Text, Delta::Text(t)) => !t.is_empty(),
                    (BlockKind::Thinking, Delta::Thinking(t)) => !*signed && !t.is_empty(),
                    (BlockKind::Thinking, Delta::Signature(s)) => {
                        *signed = true;
                        !s.is_empty()
                    }
                    (BlockKind::ToolUse { .. }, Delta::InputJson(j)) => !j.is_empty(),
                    _ => false,
                };
                assert!(
                    ok,
                    "delta {delta:?} does not fit block {kind:?} (or is empty)"
                );
            }
            Event::ContentBlockStop { index } => {
                let (oi, kind, signed) = open.take().expect("stop with no open block");
                assert_eq!(*index, oi, "stop must close the open block");
                if kind == BlockKind::Thinking {
                    assert!(
                        signed,
                        "thinking block {oi} stopped without signature_delta"
                    );
                }
            }
            Event::MessageDelta { .. } | Event::MessageStop => {
                assert!(open.is_none(), "{} while block {open:?} is open", e.name());
            }
            Event::MessageStart { .. } | Event::Ping | Event::Error { .. } => {}
        }
    }
}

fn text_of(events: &[Event]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ContentBlockDelta {
                delta: Delta::Text(t),
                ..
            } => Some(t.as_str()),
            _ => None,
        })
        .collect()
}

fn upstream_text(chunks: &[Value], field: &str) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"][field].as_str())
        .collect()
}

fn message_delta(events: &[Event]) -> (String, Option<String>, llmctl::proxy::stream::Usage) {
    events
        .iter()
        .find_map(|e| match e {
            Event::MessageDelta {
                stop_reason,
                stop_sequence,
                usage,
            } => Some((stop_reason.clone(), stop_sequence.clone(), *usage)),
            _ => None,
        })
        .expect("a message_delta")
}

fn chunk(delta: Value) -> Value {
    json!({"choices": [{"index": 0, "delta": delta, "finish_reason": null}]})
}

fn finish_chunk(reason: &str) -> Value {
    json!({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
}

fn tool_delta(index: u32, id: Option<&str>, name: Option<&str>, args: &str) -> Value {
    let mut f = json!({"arguments": args});
    if let Some(n) = name {
        f["name"] = json!(n);
    }
    let mut call = json!({"index": index, "function": f});
    if let Some(i) = id {
        call["id"] = json!(i);
        call["type"] = json!("function");
    }
    chunk(json!({"tool_calls": [call]}))
}

// ---------------------------------------------------------------- recorded streams

#[test]
fn recorded_text_with_trailing_usage_chunk() {
    let chunks = load_fixture("text-usage.sse");
    let (events, t) = run(ctx(), &chunks);
    assert_valid_anthropic_stream(&events);
    let names: Vec<&str> = events.iter().map(Event::name).collect();
    assert_eq!(
        &names[..3],
        ["message_start", "ping", "content_block_start"]
    );
    assert_eq!(text_of(&events), upstream_text(&chunks, "content"));
    let (reason, seq, usage) = message_delta(&events);
    assert_eq!((reason.as_str(), seq), ("end_turn", None));
    // From the trailing `choices: []` chunk of the recording.
    let last = chunks.last().unwrap();
    assert_eq!(
        usage.output_tokens,
        last["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let cached = last["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(usage.cache_read_input_tokens, cached);
    assert_eq!(
        usage.input_tokens,
        last["usage"]["prompt_tokens"].as_u64().unwrap() - cached
    );
    assert!(usage.output_tokens > 0);
    assert_eq!(t.stop_reason(), Some("end_turn"));

    let msg = accumulate(&events);
    assert_eq!(
        msg["content"][0]["text"],
        json!(upstream_text(&chunks, "content"))
    );
    assert_eq!(msg["model"], "claude-sonnet-5");
    assert_eq!(msg["id"], "msg_test");
    assert_eq!(msg["stop_reason"], "end_turn");
}

#[test]
fn recorded_length_stop_with_prompt_progress_and_cache() {
    let chunks = load_fixture("text-length.sse");
    assert!(
        chunks.iter().any(|c| c.get("prompt_progress").is_some()),
        "fixture should contain llama.cpp prompt_progress chunks"
    );
    let (events, _) = run(ctx(), &chunks);
    assert_valid_anthropic_stream(&events);
    assert_eq!(text_of(&events), upstream_text(&chunks, "content"));
    let (reason, _, usage) = message_delta(&events);
    assert_eq!(reason, "max_tokens");
    let u = &chunks.last().unwrap()["usage"];
    let cached = u["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(usage.cache_read_input_tokens, cached);
    assert_eq!(
        usage.input_tokens,
        u["prompt_tokens"].as_u64().unwrap() - cached
    );
}

#[test]
fn recorded_tool_call_cut_by_max_tokens() {
    // Real gemma-4-template stream: the tiny model's arguments are cut off by max_tokens. The
    // fragments are streamed verbatim; the folded message parses them, or gets `{}` when the cut
    // left invalid JSON (which of the two depends on the recording).
    let chunks = load_fixture("tool-single-length.sse");
    let (events, _) = run(ctx(), &chunks);
    assert_valid_anthropic_stream(&events);
    let starts: Vec<&BlockKind> = events
        .iter()
        .filter_map(|e| match e {
            Event::ContentBlockStart { block, .. } => Some(block),
            _ => None,
        })
        .collect();
    let upstream_id = chunks
        .iter()
        .find_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["id"].as_str())
        .unwrap();
    assert_eq!(
        starts,
        [&BlockKind::ToolUse {
            id: upstream_id.into(),
            name: "get_weather".into()
        }]
    );
    let streamed: String = events
        .iter()
        .filter_map(|e| match e {
            Event::ContentBlockDelta {
                delta: Delta::InputJson(j),
                ..
            } => Some(j.as_str()),
            _ => None,
        })
        .collect();
    let upstream_args: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(streamed, upstream_args);
    assert_eq!(message_delta(&events).0, "max_tokens");
    let msg = accumulate(&events);
    let expected = match serde_json::from_str::<Value>(&upstream_args) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({}),
    };
    assert_eq!(msg["content"][0]["input"], expected);
}

/// The upstream's tool calls: (id, name, concatenated arguments) per `tool_calls[].index`.
fn upstream_calls(chunks: &[Value]) -> Vec<(String, String, String)> {
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for c in chunks {
        for d in c["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = d["index"].as_u64().unwrap() as usize;
            if calls.len() <= i {
                calls.resize(i + 1, Default::default());
            }
            if let Some(id) = d["id"].as_str() {
                calls[i].0 = id.into();
            }
            if let Some(n) = d["function"]["name"].as_str() {
                calls[i].1 = n.into();
            }
            if let Some(a) = d["function"]["arguments"].as_str() {
                calls[i].2.push_str(a);
            }
        }
    }
    calls
}

#[test]
fn recorded_two_sequential_tool_calls() {
    // Real gemma-4-template stream: call 0 completes, call 1 starts and is cut by max_tokens.
    let chunks = load_fixture("tool-two-calls-length.sse");
    let calls = upstream_calls(&chunks);
    assert_eq!(calls.len(), 2, "fixture holds two calls");
    let mut t = StreamTranslator::new(ctx());
    let mut events = t.start();
    let mut second_started_before_end = false;
    for c in &chunks {
        events.extend(t.on_chunk(c));
        second_started_before_end |= events.iter().any(|e| {
            matches!(e, Event::ContentBlockStart { index: 1, block: BlockKind::ToolUse { id, .. } } if *id == calls[1].0)
        });
    }
    assert!(
        second_started_before_end,
        "call 1 streams once call 0's JSON is complete"
    );
    events.extend(t.finish());
    assert_valid_anthropic_stream(&events);
    let msg = accumulate(&events);
    let blocks = msg["content"].as_array().unwrap();
    assert_eq!(blocks.len(), 2);
    for (block, (id, name, args)) in blocks.iter().zip(&calls) {
        assert_eq!(block["type"], "tool_use");
        assert_eq!(&block["id"], id);
        assert_eq!(&block["name"], name);
        let expected = match serde_json::from_str::<Value>(args) {
            Ok(v @ Value::Object(_)) => v,
            _ => json!({}),
        };
        assert_eq!(block["input"], expected);
    }
    assert_ne!(blocks[0]["input"], json!({}), "call 0 was complete");
    assert_eq!(msg["stop_reason"], "max_tokens");
}

#[test]
fn recorded_reasoning() {
    let chunks = load_fixture("reasoning.sse");
    let (events, _) = run(ctx(), &chunks);
    assert_valid_anthropic_stream(&events);
    let thinking: String = events
        .iter()
        .filter_map(|e| match e {
            Event::ContentBlockDelta {
                delta: Delta::Thinking(t),
                ..
            } => Some(t.as_str()),
            _ => None,
        })
        .collect();
    let upstream = upstream_text(&chunks, "reasoning_content");
    assert!(
        !upstream.trim().is_empty(),
        "fixture must carry reasoning_content"
    );
    assert_eq!(thinking, upstream);
    let msg = accumulate(&events);
    assert_eq!(msg["content"][0]["type"], "thinking");
    assert!(
        msg["content"][0]["signature"]
            .as_str()
            .unwrap()
            .starts_with(SIGNATURE_PREFIX)
    );
}

#[test]
fn hand_made_parallel_calls_with_interleaved_arguments() {
    let chunks = load_fixture("parallel-interleaved.handmade.sse");
    let (events, _) = run(ctx(), &chunks);
    assert_valid_anthropic_stream(&events);
    let msg = accumulate(&events);
    assert_eq!(
        msg["content"],
        json!([
            {"type": "tool_use", "id": "call_a", "name": "Read", "input": {"file_path": "/etc/hosts"}},
            {"type": "tool_use", "id": "call_b", "name": "Bash", "input": {"command": "ls -la", "timeout": 5}}
        ])
    );
    assert_eq!(msg["stop_reason"], "tool_use");
    assert_eq!(msg["usage"]["output_tokens"], 31);
}

#[test]
fn hand_made_error_mid_stream() {
    let chunks = load_fixture("error-midstream.handmade.sse");
    let mut t = StreamTranslator::new(ctx());
    let mut events = t.start();
    for c in &chunks {
        events.extend(t.on_chunk(c));
    }
    events.extend(t.finish());
    events.extend(t.fail("api_error", "again"));
    assert_valid_anthropic_stream(&events);
    let Some(Event::Error {
        error_type,
        message,
    }) = events.last()
    else {
        panic!("stream must end with an error: {events:?}")
    };
    assert_eq!(error_type, "api_error");
    assert!(message.contains("llama_decode failed"), "{message}");
    let e = events.last().unwrap().to_sse();
    let text = std::str::from_utf8(&e).unwrap();
    assert!(
        text.starts_with(
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\""
        )
    );
}

// ---------------------------------------------------------------- edge cases

#[test]
fn text_thinking_text_gets_three_blocks() {
    let chunks = [
        chunk(json!({"content": "---\n"})),
        chunk(json!({"reasoning_content": "let me think"})),
        chunk(json!({"reasoning_content": " more"})),
        chunk(json!({"content": "answer"})),
        finish_chunk("stop"),
    ];
    let (events, _) = run(ctx(), &chunks);
    assert_valid_anthropic_stream(&events);
    let msg = accumulate(&events);
    assert_eq!(msg["content"][0], json!({"type": "text", "text": "---\n"}));
    assert_eq!(msg["content"][1]["thinking"], "let me think more");
    assert_eq!(msg["content"][2], json!({"type": "text", "text": "answer"}));
}

#[test]
fn whitespace_only_thinking_and_empty_deltas_are_not_emitted() {
    let chunks = [
        chunk(json!({"reasoning_content": "\n"})),
        chunk(json!({"reasoning_content": "  "})),
        chunk(json!({"content": ""})),
        chunk(json!({"content": "hi"})),
        finish_chunk("stop"),
    ];
    let (events, _) = run(ctx(), &chunks);
    assert_valid_anthropic_stream(&events);
    let msg = accumulate(&events);
    assert_eq!(msg["content"], json!([{"type": "text", "text": "hi"}]));
}

#[test]
fn text_then_tool_call_closes_text_first() {
    let chunks = [
        chunk(json!({"content": "Let me look."})),
        tool_delta(0, Some("c1"), Some("Read"), "{\"file_path\":"),
        tool_delta(0, None, None, "\"/a\"}"),
        finish_chunk("tool_calls"),
    ];
    let (events, _) = run(ctx(), &chunks);
    assert_valid_anthropic_stream(&events);
    let msg = accumulate(&events);
    assert_eq!(msg["content"][0]["text"], "Let me look.");
    assert_eq!(msg["content"][1]["input"], json!({"file_path": "/a"}));
    assert_eq!(msg["stop_reason"], "tool_use");
}

#[test]
fn arguments_before_id_and_name_are_buffered() {
    let chunks = [
        tool_delta(0, None, None, "{\"a\":"),
        tool_delta(0, Some("c1"), Some("T"), "1}"),
        finish_chunk("tool_calls"),
    ];
    let (events, _) = run(ctx(), &chunks);
    assert_valid_anthropic_stream(&events);
    assert_eq!(accumulate(&events)["content"][0]["input"], json!({"a": 1}));
}

#[test]
fn whole_arguments_in_one_chunk_and_sequential_calls_stream() {
    let chunks = [
        tool_delta(0, Some("c1"), Some("A"), "{\"x\":1}"),
        tool_delta(1, Some("c2"), Some("B"), "{\"y\":"),
        tool_delta(1, None, None, "2}"),
        finish_chunk("tool_calls"),
    ];
    let mut t = StreamTranslator::new(ctx());
    let mut events = t.start();
    events.extend(t.on_chunk(&chunks[0]));
    events.extend(t.on_chunk(&chunks[1]));
    // The second call streams as soon as the first one's JSON is complete.
    assert!(events.iter().any(|e| matches!(e,
        Event::ContentBlockDelta { index: 1, delta: Delta::InputJson(j) } if j == "{\"y\":")));
    events.extend(t.on_chunk(&chunks[2]));
    events.extend(t.on_chunk(&chunks[3]));
    events.extend(t.finish());
    assert_valid_anthropic_stream(&events);
    let msg = accumulate(&events);
    assert_eq!(msg["content"][0]["input"], json!({"x": 1}));
    assert_eq!(msg["content"][1]["input"], json!({"y": 2}));
}

#[test]
fn tool_without_arguments_gets_empty_object_and_invalid_buffered_json_becomes_empty() {
    let chunks = [
        tool_delta(0, Some("c1"), Some("CronList"), ""),
        tool_delta(1, Some("c2"), Some("Bad"), "{not json"),
        finish_chunk("tool_calls"),
    ];
    let (events, _) = run(ctx(), &chunks);
    assert_valid_anthropic_stream(&events);
    let msg = accumulate(&events);
    assert_eq!(msg["content"][0]["input"], json!({}));
    assert_eq!(msg["content"][1]["input"], json!({}));
}

#[test]
fn single_tool_call_keeps_only_the_first() {
    let chunks = [
        tool_delta(0, Some("c1"), Some("A"), "{}"),
        tool_delta(1, Some("c2"), Some("B"), "{}"),
        finish_chunk("tool_calls"),
    ];
    let ctx = ResponseContext {
        single_tool_call: true,
        ..ctx()
    };
    let (events, _) = run(ctx, &chunks);
    assert_valid_anthropic_stream(&events);
    let msg = accumulate(&events);
    assert_eq!(msg["content"].as_array().unwrap().len(), 1);
    assert_eq!(msg["content"][0]["name"], "A");
}

#[test]
fn stop_sequence_split_across_deltas_is_matched_and_never_leaked() {
    let chunks = [
        chunk(json!({"content": "one two ST"})),
        chunk(json!({"content": "OP three"})),
        chunk(json!({"content": "never sent"})),
        finish_chunk("stop"),
    ];
    let ctx = ResponseContext {
        stop_sequences: vec!["STOP".into(), "xyz".into()],
        ..ctx()
    };
    let (events, t) = run(ctx, &chunks);
    assert_valid_anthropic_stream(&events);
    assert!(t.is_done());
    assert_eq!(text_of(&events), "one two ");
    let (reason, seq, _) = message_delta(&events);
    assert_eq!(
        (reason.as_str(), seq.as_deref()),
        ("stop_sequence", Some("STOP"))
    );
    let msg = accumulate(&events);
    assert_eq!(msg["stop_sequence"], "STOP");
}

#[test]
fn held_back_partial_match_is_flushed_when_no_match_comes() {
    let chunks = [
        chunk(json!({"content": "abc S"})),
        chunk(json!({"content": "T"})),
        finish_chunk("stop"),
    ];
    let ctx = ResponseContext {
        stop_sequences: vec!["STOP".into()],
        ..ctx()
    };
    let mut t = StreamTranslator::new(ctx);
    let mut events = t.start();
    events.extend(t.on_chunk(&chunks[0]));
    assert_eq!(
        text_of(&events),
        "abc ",
        "a possible match start is held back"
    );
    for c in &chunks[1..] {
        events.extend(t.on_chunk(c));
    }
    events.extend(t.finish());
    assert_valid_anthropic_stream(&events);
    assert_eq!(text_of(&events), "abc ST");
    assert_eq!(message_delta(&events).0, "end_turn");
}

#[test]
fn stop_sequence_on_a_recorded_stream() {
    let chunks = load_fixture("text-usage.sse");
    let full = upstream_text(&chunks, "content");
    // A word from the middle of the recorded answer.
    let word = full
        .split_whitespace()
        .nth(1)
        .expect("at least two words")
        .to_string();
    let at = full.find(&word).unwrap();
    let ctx = ResponseContext {
        stop_sequences: vec![word.clone()],
        ..ctx()
    };
    let (events, _) = run(ctx, &chunks);
    assert_valid_anthropic_stream(&events);
    assert_eq!(text_of(&events), full[..at]);
    assert_eq!(message_delta(&events).1, Some(word));
}

#[test]
fn finish_is_idempotent_and_nothing_follows_message_stop() {
    let mut t = StreamTranslator::new(ctx());
    let mut events = t.start();
    events.extend(t.on_chunk(&chunk(json!({"content": "x"}))));
    events.extend(t.finish());
    assert!(t.finish().is_empty());
    assert!(t.on_chunk(&chunk(json!({"content": "late"}))).is_empty());
    assert!(t.fail("api_error", "late").is_empty());
    assert_valid_anthropic_stream(&events);
}

#[test]
fn empty_upstream_stream_still_is_a_valid_message() {
    let (events, _) = run(ctx(), &[]);
    assert_valid_anthropic_stream(&events);
    let msg = accumulate(&events);
    assert_eq!(msg["content"], json!([]));
    assert_eq!(msg["stop_reason"], "end_turn");
}

#[test]
fn sse_encoding_matches_anthropic_wire_format() {
    let e = Event::ContentBlockDelta {
        index: 2,
        delta: Delta::InputJson("{\"a\"".into()),
    };
    assert_eq!(
        &e.to_sse()[..],
        b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\"\"}}\n\n"
    );
    let start = Event::MessageStart {
        id: "msg_1".into(),
        model: "m".into(),
        usage: Default::default(),
    };
    let data = start.data();
    assert_eq!(data["message"]["type"], "message");
    assert_eq!(data["message"]["content"], json!([]));
    assert_eq!(data["message"]["stop_reason"], Value::Null);
}

// ---------------------------------------------------------------- randomized orderings

/// xorshift64*: a tiny deterministic generator, so failures reproduce from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random interleavings of reasoning, text and up to three tool calls (ids and names arriving
/// with or after the first fragment, fragments of different calls interleaved): every stream is
/// grammatical, the text arrives unchanged and every call gets exactly its own arguments.
#[test]
fn random_interleavings_keep_the_grammar_and_the_content() {
    let args = [
        r#"{"file_path": "/a/b.txt", "limit": 5}"#,
        r#"{"command": "ls -la | grep \"x\"", "timeout": 30}"#,
        r#"{"q": ["é", {"n": null}], "deep": {"k": true}}"#,
    ];
    for seed in 1..=3000u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let ncalls = rng.below(4) as usize;
        // Split each call's arguments into fragments (on char boundaries).
        let mut frags: Vec<Vec<String>> = Vec::new();
        for a in args.iter().take(ncalls) {
            let chars: Vec<char> = a.chars().collect();
            let mut parts = Vec::new();
            let mut i = 0;
            while i < chars.len() {
                let n = 1 + rng.below(8) as usize;
                let end = (i + n).min(chars.len());
                parts.push(chars[i..end].iter().collect::<String>());
                i = end;
            }
            frags.push(parts);
        }
        let mut next_frag = vec![0usize; ncalls];
        let mut named = vec![false; ncalls];
        let mut chunks = Vec::new();
        let mut text = String::new();
        loop {
            let pending: Vec<usize> = (0..ncalls)
                .filter(|&c| !named[c] || next_frag[c] < frags[c].len())
                .collect();
            let r = rng.below(10);
            if pending.is_empty() && r < 2 {
                break;
            }
            match r {
                0 | 1 if !pending.is_empty() || rng.below(3) == 0 => {
                    let w = ["hello", " ", "\n", "wörld", ""][rng.below(5) as usize];
                    text.push_str(w);
                    chunks.push(chunk(json!({"content": w})));
                }
                2 => {
                    let w = ["hmm", " ", "\n\n", "so"][rng.below(4) as usize];
                    chunks.push(chunk(json!({"reasoning_content": w})));
                }
                _ if !pending.is_empty() => {
                    let c = pending[rng.below(pending.len() as u64) as usize];
                    let name_now = !named[c] && rng.below(2) == 0;
                    let frag = if next_frag[c] < frags[c].len() && (named[c] || rng.below(2) == 0) {
                        next_frag[c] += 1;
                        frags[c][next_frag[c] - 1].clone()
                    } else {
                        String::new()
                    };
                    if name_now {
                        named[c] = true;
                        chunks.push(tool_delta(
                            c as u32,
                            Some(&format!("call_{c}")),
                            Some(&format!("tool_{c}")),
                            &frag,
                        ));
                    } else {
                        chunks.push(tool_delta(c as u32, None, None, &frag));
                    }
                }
                _ => {}
            }
            if chunks.len() > 400 {
                break;
            }
        }
        chunks.push(finish_chunk(if ncalls > 0 { "tool_calls" } else { "stop" }));
        let with_stop = seed % 3 == 0;
        let ctx = ResponseContext {
            stop_sequences: if with_stop {
                vec!["wör".into()]
            } else {
                vec![]
            },
            ..ctx()
        };
        let (events, t) = run(ctx, &chunks);
        assert_valid_anthropic_stream(&events);
        if with_stop && let Some(at) = text.find("wör") {
            assert!(t.is_done(), "seed {seed}");
            assert_eq!(text_of(&events), text[..at], "seed {seed}");
            assert_eq!(message_delta(&events).0, "stop_sequence");
            continue;
        }
        assert_eq!(text_of(&events), text, "seed {seed}");
        let msg = accumulate(&events);
        let tools: Vec<&Value> = msg["content"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["type"] == "tool_use")
            .collect();
        // Blocks come in the order the upstream first mentioned each call.
        let mut appearance: Vec<usize> = Vec::new();
        for c in &chunks {
            if let Some(i) = c["choices"][0]["delta"]["tool_calls"][0]["index"].as_u64() {
                if !appearance.contains(&(i as usize)) {
                    appearance.push(i as usize);
                }
            }
        }
        let complete: Vec<usize> = appearance
            .into_iter()
            .filter(|&c| named[c] && next_frag[c] == frags[c].len())
            .collect();
        assert_eq!(tools.len(), complete.len(), "seed {seed}: {chunks:?}");
        for (block, &c) in tools.iter().zip(&complete) {
            assert_eq!(block["id"], format!("call_{c}"), "seed {seed}");
            let expected: Value = serde_json::from_str(args[c]).unwrap();
            assert_eq!(block["input"], expected, "seed {seed}: {chunks:?}");
        }
        if ncalls > 0 && !complete.is_empty() {
            assert_eq!(msg["stop_reason"], "tool_use", "seed {seed}");
        }
    }
}

#[test]
fn arguments_sent_as_a_json_object_are_accepted() {
    let chunks = [
        chunk(
            json!({"tool_calls": [{"index": 0, "id": "c1", "type": "function",
            "function": {"name": "T", "arguments": {"a": [1, "x"]}}}]}),
        ),
        finish_chunk("tool_calls"),
    ];
    let (events, _) = run(ctx(), &chunks);
    assert_valid_anthropic_stream(&events);
    assert_eq!(
        accumulate(&events)["content"][0]["input"],
        json!({"a": [1, "x"]})
    );
}

#[test]
fn sse_bytes_equal_the_reference_json_for_every_event_kind() {
    let events = [
        Event::MessageStart {
            id: "msg_\"q".into(),
            model: "claude-x \"135M\"".into(),
            usage: Usage {
                input_tokens: 1507,
                output_tokens: 0,
                cache_read_input_tokens: 24,
            },
        },
        Event::Ping,
        Event::ContentBlockStart {
            index: 0,
            block: BlockKind::Text,
        },
        Event::ContentBlockStart {
            index: 1,
            block: BlockKind::Thinking,
        },
        Event::ContentBlockStart {
            index: 2,
            block: BlockKind::ToolUse {
                id: "c1".into(),
                name: "Read\n".into(),
            },
        },
        Event::ContentBlockDelta {
            index: 0,
            delta: Delta::Text("a\n\u{1F600}\"".into()),
        },
        Event::ContentBlockDelta {
            index: 1,
            delta: Delta::Thinking("t".into()),
        },
        Event::ContentBlockDelta {
            index: 1,
            delta: Delta::Signature("s".into()),
        },
        Event::ContentBlockDelta {
            index: 2,
            delta: Delta::InputJson("{\"a\":".into()),
        },
        Event::ContentBlockStop { index: 2 },
        Event::MessageDelta {
            stop_reason: "stop_sequence".into(),
            stop_sequence: Some("</\"END\">".into()),
            usage: llmctl::proxy::stream::Usage {
                input_tokens: 5,
                output_tokens: 7,
                cache_read_input_tokens: 3,
            },
        },
        Event::MessageDelta {
            stop_reason: "end_turn".into(),
            stop_sequence: None,
            usage: Default::default(),
        },
        Event::MessageStop,
        Event::Error {
            error_type: "api_error".into(),
            message: "upstream \"x\" broke\n".into(),
        },
    ];
    for e in &events {
        let expected = format!("event: {}\ndata: {}\n\n", e.name(), e.data());
        assert_eq!(std::str::from_utf8(&e.to_sse()).unwrap(), expected);
    }
}

#[test]
fn message_start_carries_the_prompt_size_from_the_first_prompt_progress() {
    // As llama-server 11434 streams with return_progress: the first progress chunk comes right after
    // tokenizing (processed = cache, time_ms 0), here 10.5 s before the first token.
    let chunks = [
        json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": null}}],
               "prompt_progress": {"total": 1531, "cache": 24, "processed": 24, "time_ms": 0}}),
        json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": null}}],
               "prompt_progress": {"total": 1531, "cache": 24, "processed": 1531, "time_ms": 10520}}),
        json!({"choices": [{"index": 0, "delta": {"content": "Hi"}}]}),
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        json!({"choices": [], "usage": {"completion_tokens": 1, "prompt_tokens": 1531,
               "prompt_tokens_details": {"cached_tokens": 24}}}),
    ];
    // The server does not call start() first any more: the first chunk starts the message.
    let mut t = StreamTranslator::new(ctx());
    let first = t.on_chunk(&chunks[0]);
    let Some(Event::MessageStart { usage, .. }) = first.first() else {
        panic!("the first progress chunk must open the message: {first:?}");
    };
    assert_eq!(
        *usage,
        Usage {
            input_tokens: 1507,
            output_tokens: 0,
            cache_read_input_tokens: 24
        }
    );
    assert_eq!(first.get(1), Some(&Event::Ping));
    assert_eq!(
        first[0].data()["message"]["usage"]["input_tokens"],
        json!(1507)
    );
    let mut events = first;
    for c in &chunks[1..] {
        events.extend(t.on_chunk(c));
    }
    events.extend(t.finish());
    assert_valid_anthropic_stream(&events);
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::MessageStart { .. }))
            .count(),
        1
    );
    // Without progress (another upstream, or start() before any chunk) the counts stay 0 until message_delta.
    let mut t = StreamTranslator::new(ctx());
    let Some(Event::MessageStart { usage, .. }) = t.start().first().cloned() else {
        panic!()
    };
    assert_eq!(usage, Usage::default());
}

#[test]
fn a_failure_before_any_chunk_still_opens_the_message() {
    let mut t = StreamTranslator::new(ctx());
    let events = t.fail("timeout_error", "upstream sent nothing");
    assert!(
        matches!(events.first(), Some(Event::MessageStart { .. })),
        "{events:?}"
    );
    assert!(
        matches!(events.last(), Some(Event::Error { .. })),
        "{events:?}"
    );
}

/// An upstream that answers one `chat.completion` body instead of a stream: the same message as the stream of
/// that answer, whether the typed chunks read it or a member of an unexpected type sends it the lenient way.
#[test]
fn a_whole_json_body_folds_to_the_message_its_stream_would() {
    let streamed = run(
        ctx(),
        &[
            chunk(json!({"role": "assistant", "content": "Hello there."})),
            finish_chunk("stop"),
            json!({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}}),
        ],
    )
    .0;
    let whole = |usage: Value| {
        let body = json!({"id": "c", "object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "Hello there."}}], "usage": usage});
        let mut p = Pump::detached("http://upstream", StreamTranslator::new(ctx()));
        p.expect_whole_json();
        let mut events = p.start();
        let bytes = body.to_string();
        // Split anywhere: the body is collected whole before it is read.
        let (a, b) = bytes.as_bytes().split_at(bytes.len() / 2);
        events.extend(p.feed(a));
        events.extend(p.feed(b));
        events.extend(p.feed_end());
        assert!(p.failure().is_none(), "{:?}", p.failure());
        events
    };
    let typed = whole(json!({"prompt_tokens": 12, "completion_tokens": 3}));
    assert_valid_anthropic_stream(&typed);
    let mut want = accumulate(&streamed);
    let mut got = accumulate(&typed);
    for m in [&mut want, &mut got] {
        m["id"] = json!("masked");
    }
    assert_eq!(got, want);
    assert_eq!(got["content"][0]["text"], "Hello there.");
    assert_eq!(got["usage"]["input_tokens"], 12);
    // A token count as a string: not read, but the answer still arrives.
    let loose = whole(json!({"prompt_tokens": "12", "completion_tokens": 3}));
    assert_valid_anthropic_stream(&loose);
    assert_eq!(text_of(&loose), "Hello there.");
}
