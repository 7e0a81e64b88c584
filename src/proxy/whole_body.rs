//! An upstream that ignores `"stream": true` and answers with one `chat.completion` JSON body (some
//! OpenAI-compatible servers do) is read as if it had streamed that answer in one piece: the body becomes the
//! `chat.completion.chunk`s the stream translator takes, so the client gets the same events (or JSON answer)
//! as from a streaming upstream instead of a 502. Parsed straight into those typed chunks, lenient as the
//! chunks are, with no `serde_json::Value` and no re-serialized text in between; a body the typed chunks cannot
//! take is read as JSON values instead ([`Chunk::Loose`]), the lenient way a streamed chunk goes.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::openai::{ChatChunk, ChunkChoice, ChunkDelta, ChunkUsage, Timings};

/// A whole `chat.completion`, as leniently as the chunks are read: every member optional, unknown ones
/// ignored. A choice's `message` has the fields a stream's `delta` has, so it is read as one.
#[derive(Debug, Default, Deserialize)]
struct Completion {
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    usage: Option<ChunkUsage>,
    #[serde(default)]
    timings: Option<Timings>,
    #[serde(default, deserialize_with = "super::openai::present")]
    error: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<ChunkDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

/// One of the chunks a whole body stands for.
#[derive(Debug)]
pub enum Chunk {
    Typed(ChatChunk),
    /// From a completion with a member the typed chunks cannot read (e.g. a token count as a string): as JSON,
    /// for the lenient way a streamed chunk of that shape goes.
    Loose(Value),
}

/// What a whole body turned out to be.
#[derive(Debug)]
pub enum Whole {
    /// The chunks a stream would have carried: one with the message as its delta and its `finish_reason`,
    /// then, if the body has them, one with `usage` and llama.cpp's `timings` and no choices (as a streaming
    /// upstream sends them with `stream_options.include_usage`).
    Chunks(Vec<Chunk>),
    /// An `{"error": …}` body, as sent.
    Error(Value),
    /// JSON that is not a chat completion (or not JSON at all).
    Other,
}

pub fn read(body: &[u8]) -> Whole {
    let Ok(c) = serde_json::from_slice::<Completion>(body) else {
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return Whole::Other;
        };
        if let Some(e) = v.get("error") {
            return Whole::Error(e.clone());
        }
        return loose_chunks(&v).map_or(Whole::Other, |c| {
            Whole::Chunks(c.into_iter().map(Chunk::Loose).collect())
        });
    };
    if let Some(e) = c.error {
        return Whole::Error(e);
    }
    let Some(choices) = c.choices else {
        return Whole::Other;
    };
    let mut deltas = Vec::with_capacity(choices.len());
    for choice in choices {
        // A legacy completion (`text`) or anything else without a message is not a chat completion.
        let Some(mut message) = choice.message else {
            return Whole::Other;
        };
        // Stream deltas number their tool calls; a whole message does not.
        for (j, call) in message.tool_calls.iter_mut().flatten().enumerate() {
            call.index.get_or_insert(j as u32);
        }
        deltas.push(ChunkChoice {
            delta: Some(message),
            finish_reason: choice.finish_reason,
        });
    }
    let mut chunks = vec![Chunk::Typed(ChatChunk {
        choices: deltas,
        ..ChatChunk::default()
    })];
    if c.usage.is_some() || c.timings.is_some() {
        chunks.push(Chunk::Typed(ChatChunk {
            usage: c.usage,
            timings: c.timings,
            ..ChatChunk::default()
        }));
    }
    Whole::Chunks(chunks)
}

/// The same chunks as [`read`] makes, as JSON values, for a completion the typed chunks cannot take (a member
/// of an unexpected type, e.g. a token count as a string): each goes the lenient way a streamed chunk of that
/// shape goes, which ignores what it cannot read instead of failing the answer. `None` when `body` is not a
/// chat completion.
fn loose_chunks(body: &Value) -> Option<Vec<Value>> {
    let obj = body.as_object()?;
    let choices = obj.get("choices")?.as_array()?;
    let mut out_choices = Vec::with_capacity(choices.len());
    for (i, choice) in choices.iter().enumerate() {
        let message = choice.get("message")?.as_object()?;
        let mut delta = Map::new();
        for (k, v) in message {
            if k == "tool_calls" {
                // Stream deltas number their tool calls; a whole message does not.
                let calls: Vec<Value> = v
                    .as_array()?
                    .iter()
                    .enumerate()
                    .map(|(j, c)| {
                        let mut c = c.clone();
                        if let Some(m) = c.as_object_mut() {
                            m.entry("index").or_insert(json!(j));
                        }
                        c
                    })
                    .collect();
                delta.insert(k.clone(), Value::Array(calls));
            } else if !v.is_null() {
                delta.insert(k.clone(), v.clone());
            }
        }
        out_choices.push(json!({
            "index": choice.get("index").cloned().unwrap_or(json!(i)),
            "delta": delta,
            "finish_reason": choice.get("finish_reason").cloned().unwrap_or(Value::Null),
        }));
    }
    let head = |choices: Vec<Value>| {
        let mut c = Map::new();
        for k in ["id", "created", "model", "system_fingerprint"] {
            if let Some(v) = obj.get(k) {
                c.insert(k.into(), v.clone());
            }
        }
        c.insert("object".into(), json!("chat.completion.chunk"));
        c.insert("choices".into(), Value::Array(choices));
        c
    };
    let mut chunks = vec![Value::Object(head(out_choices))];
    if obj.contains_key("usage") || obj.contains_key("timings") {
        let mut last = head(Vec::new());
        for k in ["usage", "timings"] {
            if let Some(v) = obj.get(k) {
                last.insert(k.into(), v.clone());
            }
        }
        chunks.push(Value::Object(last));
    }
    Some(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(body: &str) -> Vec<ChatChunk> {
        match read(body.as_bytes()) {
            Whole::Chunks(c) => c
                .into_iter()
                .map(|c| match c {
                    Chunk::Typed(c) => c,
                    Chunk::Loose(v) => panic!("loose: {v}"),
                })
                .collect(),
            other => panic!("not chunks: {other:?}"),
        }
    }

    #[test]
    fn a_text_completion_becomes_a_delta_and_a_usage_chunk() {
        let c = chunks(
            r#"{"id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Hello.", "reasoning_content": "hmm", "refusal": null}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
                      "prompt_tokens_details": {"cached_tokens": 4}},
            "timings": {"cache_n": 4, "prompt_n": 8, "predicted_n": 3}}"#,
        );
        assert_eq!(c.len(), 2);
        let first = &c[0].choices[0];
        let delta = first.delta.as_ref().unwrap();
        assert_eq!(delta.content.as_deref(), Some("Hello."));
        assert_eq!(delta.reasoning_content.as_deref(), Some("hmm"));
        assert_eq!(first.finish_reason.as_deref(), Some("stop"));
        assert!(c[0].usage.is_none() && c[0].timings.is_none());
        assert!(c[1].choices.is_empty());
        let usage = c[1].usage.as_ref().unwrap();
        assert_eq!(usage.prompt_tokens, Some(12));
        assert_eq!(usage.completion_tokens, Some(3));
        assert_eq!(
            usage.prompt_tokens_details.as_ref().unwrap().cached_tokens,
            Some(4)
        );
        assert_eq!(c[1].timings.as_ref().unwrap().cache_n, Some(4));
    }

    #[test]
    fn tool_calls_get_their_stream_index() {
        let c = chunks(
            r#"{"choices": [{"finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
                           {"id": "c2", "type": "function", "function": {"name": "b", "arguments": {"x": 1}}}]}}]}"#,
        );
        assert_eq!(c.len(), 1, "no usage, no usage chunk");
        let delta = c[0].choices[0].delta.as_ref().unwrap();
        assert!(delta.content.is_none());
        let calls = delta.tool_calls.as_ref().unwrap();
        assert_eq!(
            calls.iter().map(|t| t.index).collect::<Vec<_>>(),
            [Some(0), Some(1)]
        );
        let f = calls[1].function.as_ref().unwrap();
        assert_eq!(f.name.as_deref(), Some("b"));
        // An object where the spec says a string is read as its JSON text, as in a stream.
        assert_eq!(f.arguments.as_deref(), Some(r#"{"x":1}"#));
        assert_eq!(calls[0].id.as_deref(), Some("c1"));
    }

    #[test]
    fn a_member_of_an_unexpected_type_goes_the_lenient_way() {
        let body = r#"{"choices": [{"finish_reason": "stop", "message": {"content": "Hi", "tool_calls": [{"id": "c1",
            "function": {"name": "a", "arguments": "{}"}}]}}], "usage": {"prompt_tokens": "12", "completion_tokens": 1}}"#;
        let Whole::Chunks(c) = read(body.as_bytes()) else {
            panic!("not chunks")
        };
        let c: Vec<Value> = c
            .into_iter()
            .map(|c| match c {
                Chunk::Loose(v) => v,
                Chunk::Typed(t) => panic!("typed: {t:?}"),
            })
            .collect();
        assert_eq!(c.len(), 2);
        let delta = &c[0]["choices"][0]["delta"];
        assert_eq!(delta["content"], "Hi");
        assert_eq!(delta["tool_calls"][0]["index"], 0);
        assert_eq!(c[0]["choices"][0]["finish_reason"], "stop");
        assert_eq!(c[1]["usage"]["prompt_tokens"], "12");
        assert_eq!(c[1]["choices"], json!([]));
    }

    #[test]
    fn an_error_body_is_the_error() {
        match read(br#"{"error": {"message": "x", "type": "server_error"}}"#) {
            Whole::Error(e) => assert_eq!(e["message"], "x"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_json_is_not_a_completion() {
        for body in [
            r#"[1]"#,
            r#"{"object": "list"}"#,
            r#"{"choices": [{"text": "legacy"}]}"#,
            "not json",
            r#"{"choices": "x"}"#,
        ] {
            assert!(matches!(read(body.as_bytes()), Whole::Other), "{body}");
        }
    }
}
