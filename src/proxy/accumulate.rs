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
            Event::MessageStart { id, model, .. } => {
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

impl MessageAccumulator {
    /// `finish()` serialized, byte for byte, without building the `Value` first (the answer's JSON is
    /// written straight from the blocks).
    pub fn finish_bytes(self) -> Vec<u8> {
        let content: Vec<wire::Block> = self
            .blocks
            .iter()
            .map(|b| match b {
                Block::Text(text) => wire::Block::Text { text },
                Block::Thinking {
                    thinking,
                    signature,
                } => wire::Block::Thinking {
                    thinking,
                    signature,
                },
                Block::ToolUse { id, name, json } => wire::Block::ToolUse {
                    id,
                    name,
                    input: parse_input(name, json),
                },
            })
            .collect();
        let message = wire::Message {
            id: &self.id,
            kind: "message",
            role: "assistant",
            model: &self.model,
            content,
            stop_reason: self.stop_reason.as_deref(),
            stop_sequence: self.stop_sequence.as_deref(),
            usage: self.usage,
        };
        // Strings, integers and parsed JSON serialize into a Vec without failing.
        serde_json::to_vec(&message).unwrap_or_default()
    }
}

/// Borrowed mirror of `finish()`'s JSON, field for field in the same order.
mod wire {
    use serde::Serialize;
    use serde_json::Value;

    #[derive(Serialize)]
    pub struct Message<'a> {
        pub id: &'a str,
        #[serde(rename = "type")]
        pub kind: &'static str,
        pub role: &'static str,
        pub model: &'a str,
        pub content: Vec<Block<'a>>,
        pub stop_reason: Option<&'a str>,
        pub stop_sequence: Option<&'a str>,
        pub usage: super::Usage,
    }

    #[derive(Serialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub enum Block<'a> {
        Text {
            text: &'a str,
        },
        Thinking {
            thinking: &'a str,
            signature: &'a str,
        },
        ToolUse {
            id: &'a str,
            name: &'a str,
            input: Value,
        },
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fold(events: &[Event]) -> MessageAccumulator {
        let mut acc = MessageAccumulator::new();
        for e in events {
            acc.push(e);
        }
        acc
    }

    #[test]
    fn finish_bytes_is_finish_serialized() {
        let start = Event::MessageStart {
            id: "msg_1".into(),
            model: "claude-x".into(),
            usage: Default::default(),
        };
        let end = |stop_sequence: Option<&str>| Event::MessageDelta {
            stop_reason: "tool_use".into(),
            stop_sequence: stop_sequence.map(str::to_owned),
            usage: Usage {
                input_tokens: 7,
                output_tokens: 3,
                cache_read_input_tokens: 5,
            },
        };
        let delta = |index, delta| Event::ContentBlockDelta { index, delta };
        let cases: Vec<Vec<Event>> = vec![
            vec![start.clone()],
            vec![
                start.clone(),
                Event::ContentBlockStart {
                    index: 0,
                    block: BlockKind::Thinking,
                },
                delta(0, Delta::Thinking("hm \"quoted\" \u{e9}".into())),
                delta(0, Delta::Signature("sig".into())),
                Event::ContentBlockStart {
                    index: 1,
                    block: BlockKind::Text,
                },
                delta(1, Delta::Text("Hi\n".into())),
                Event::ContentBlockStart {
                    index: 2,
                    block: BlockKind::ToolUse {
                        id: "toolu_1".into(),
                        name: "Read".into(),
                    },
                },
                delta(2, Delta::InputJson(r#"{"b":1,"a":[true,null]}"#.into())),
                Event::ContentBlockStart {
                    index: 3,
                    block: BlockKind::ToolUse {
                        id: "toolu_2".into(),
                        name: "Bash".into(),
                    },
                },
                delta(3, Delta::InputJson("[1]".into())),
                end(Some("STOP")),
            ],
            vec![start, end(None)],
        ];
        for events in cases {
            let value = serde_json::to_vec(&fold(&events).finish()).unwrap();
            let bytes = fold(&events).finish_bytes();
            assert_eq!(
                String::from_utf8(bytes).unwrap(),
                String::from_utf8(value).unwrap()
            );
        }
    }
}
