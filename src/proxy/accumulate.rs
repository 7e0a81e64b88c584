//! Folds the stream events into the non-streaming Anthropic message (for `stream: false`
//! clients), so both response modes come from the one stream translator.

use serde_json::{Map, Value, json};

use super::stream::{BlockKind, Delta, Event, Usage, usage_json};

#[derive(Debug)]
enum Block {
    Text(String),
    Thinking {
        thinking: String,
        signature: String,
    },
    ToolUse {
        id: String,
        name: String,
        json: String,
    },
}

#[derive(Debug, Default)]
pub struct MessageAccumulator {
    id: String,
    model: String,
    blocks: Vec<Block>,
    stop_reason: Option<String>,
    stop_sequence: Option<String>,
    usage: Usage,
    error: Option<(String, String)>,
}

impl MessageAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, e: &Event) {
        match e {
            Event::MessageStart { id, model } => {
                self.id = id.clone();
                self.model = model.clone();
            }
            Event::ContentBlockStart { block, .. } => self.blocks.push(match block {
                BlockKind::Text => Block::Text(String::new()),
                BlockKind::Thinking => Block::Thinking {
                    thinking: String::new(),
                    signature: String::new(),
                },
                BlockKind::ToolUse { id, name } => Block::ToolUse {
                    id: id.clone(),
                    name: name.clone(),
                    json: String::new(),
                },
            }),
            // Indices are dense and blocks sequential, so a delta always belongs to the last block.
            Event::ContentBlockDelta { delta, .. } => match (self.blocks.last_mut(), delta) {
                (Some(Block::Text(t)), Delta::Text(d)) => t.push_str(d),
                (Some(Block::Thinking { thinking, .. }), Delta::Thinking(d)) => {
                    thinking.push_str(d)
                }
                (Some(Block::Thinking { signature, .. }), Delta::Signature(s)) => {
                    signature.push_str(s)
                }
                (Some(Block::ToolUse { json, .. }), Delta::InputJson(d)) => json.push_str(d),
                _ => tracing::warn!("delta does not match its block; ignored"),
            },
            Event::ContentBlockStop { .. } | Event::MessageStop | Event::Ping => {}
            Event::MessageDelta {
                stop_reason,
                stop_sequence,
                usage,
            } => {
                self.stop_reason = Some(stop_reason.clone());
                self.stop_sequence = stop_sequence.clone();
                self.usage = *usage;
            }
            Event::Error {
                error_type,
                message,
            } => self.error = Some((error_type.clone(), message.clone())),
        }
    }

    /// `(error_type, message)` when the stream ended with an `error` event: the server answers
    /// with that error instead of a message.
    pub fn error(&self) -> Option<(&str, &str)> {
        self.error.as_ref().map(|(t, m)| (t.as_str(), m.as_str()))
    }

    pub fn finish(self) -> Value {
        let content: Vec<Value> = self
            .blocks
            .into_iter()
            .map(|b| match b {
                Block::Text(text) => json!({"type": "text", "text": text}),
                Block::Thinking {
                    thinking,
                    signature,
                } => json!({"type": "thinking", "thinking": thinking, "signature": signature}),
                Block::ToolUse { id, name, json } => {
                    let input = parse_input(&name, &json);
                    json!({"type": "tool_use", "id": id, "name": name, "input": input})
                }
            })
            .collect();
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": self.stop_reason,
            "stop_sequence": self.stop_sequence,
            "usage": usage_json(&self.usage),
        })
    }
}

fn parse_input(name: &str, json: &str) -> Value {
    match serde_json::from_str::<Value>(json) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) | Err(_) => {
            if !json.trim().is_empty() {
                tracing::warn!(tool = %name, arguments = %json, "tool input is not a JSON object; using {{}}");
            }
            Value::Object(Map::new())
        }
    }
}
