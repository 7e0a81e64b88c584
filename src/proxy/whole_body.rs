//! An upstream that ignores `"stream": true` and answers with one `chat.completion` JSON body (some
//! OpenAI-compatible servers do) is read as if it had streamed that answer in one piece: the body becomes the
//! `chat.completion.chunk`s the stream translator takes, so the client gets the same events (or JSON answer)
//! as from a streaming upstream instead of a 502.

use serde_json::{Map, Value, json};

/// The chunks equivalent to one `chat.completion`: one with each choice's whole message as its delta and its
/// `finish_reason`, then one with `usage` (and llama.cpp's `timings`) and no choices, as a streaming upstream
/// sends them with `stream_options.include_usage`. `None` when `body` is not a chat completion.
pub fn completion_chunks(body: &Value) -> Option<Vec<Value>> {
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

    #[test]
    fn a_text_completion_becomes_a_delta_and_a_usage_chunk() {
        let body = json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Hello.", "reasoning_content": "hmm", "refusal": null}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
            "timings": {"cache_n": 4}});
        let chunks = completion_chunks(&body).unwrap();
        assert_eq!(chunks.len(), 2);
        assert_eq!(
            chunks[0],
            json!({"id": "chatcmpl-1", "created": 5, "model": "m", "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello.", "reasoning_content": "hmm"},
                                "finish_reason": "stop"}]})
        );
        assert_eq!(chunks[1]["choices"], json!([]));
        assert_eq!(chunks[1]["usage"]["prompt_tokens"], 12);
        assert_eq!(chunks[1]["timings"]["cache_n"], 4);
    }

    #[test]
    fn tool_calls_get_their_stream_index() {
        let body = json!({"choices": [{"finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
                           {"id": "c2", "type": "function", "function": {"name": "b", "arguments": "{\"x\":1}"}}]}}]});
        let chunks = completion_chunks(&body).unwrap();
        assert_eq!(chunks.len(), 1);
        let delta = &chunks[0]["choices"][0]["delta"];
        assert!(delta.get("content").is_none());
        assert_eq!(delta["tool_calls"][1]["index"], 1);
        assert_eq!(delta["tool_calls"][1]["function"]["name"], "b");
        assert_eq!(chunks[0]["choices"][0]["index"], 0);
    }

    #[test]
    fn other_json_is_not_a_completion() {
        assert!(completion_chunks(&json!({"error": {"message": "x"}})).is_none());
        assert!(completion_chunks(&json!([1])).is_none());
        assert!(completion_chunks(&json!({"choices": [{"text": "legacy"}]})).is_none());
    }
}
