//! The pipeline's event stream → OpenAI Responses: the SSE events of a streamed response, or the one response
//! object of `stream: false`.
//!
//! The stream translator already guarantees one block at a time, each started before its deltas and stopped
//! before the next starts, and one end (or one error). This maps that onto OpenAI's item lifecycle, which Codex
//! enforces: `response.created`, `response.in_progress`, per item `output_item.added` (+ `content_part.added`
//! for a message), its deltas, its `.done` events, `output_item.done`; then exactly one of `response.completed`,
//! `response.incomplete` or `response.failed`, and nothing after it. Every event carries `sequence_number`.

use bytes::Bytes;
use serde_json::Value;

use super::decode::{ClientTool, REASONING_PREFIX, ResponseMeta};
use crate::proxy::json_write::{self, Object};
use crate::proxy::stream::{BlockKind, Delta, Event, Usage};

/// The item being streamed.
enum Open {
    None,
    Message {
        id: String,
        text: String,
    },
    Reasoning {
        id: String,
        text: String,
    },
    Function {
        id: String,
        call_id: String,
        name: String,
        namespace: Option<String>,
        arguments: String,
    },
    /// A freeform tool's call: its arguments (`{"input": "…"}`) are collected and unwrapped at the end, so
    /// the client sees its raw input once, in one delta.
    Custom {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
    },
}

pub struct ResponsesEncoder {
    meta: ResponseMeta,
    seq: u64,
    started: bool,
    /// A terminal event was written: nothing follows.
    ended: bool,
    /// The last thing written was a `response.in_progress`: a ping right after it adds nothing.
    progress_last: bool,
    open: Open,
    output_index: usize,
    /// Completed items, for the final response object.
    output: Vec<Item>,
    stop_reason: Option<String>,
    usage: Usage,
    /// A failure: `(code, message)`.
    error: Option<(String, String)>,
    /// Folding into one response object (`stream: false`): no event is serialized, only counted.
    fold: bool,
    /// The response object while in progress, serialized once (see `write_response`).
    in_progress_object: Option<Vec<u8>>,
}

impl ResponsesEncoder {
    pub fn new(meta: ResponseMeta) -> Self {
        ResponsesEncoder {
            meta,
            seq: 0,
            started: false,
            ended: false,
            progress_last: false,
            open: Open::None,
            output_index: 0,
            output: Vec::new(),
            stop_reason: None,
            usage: Usage::default(),
            error: None,
            fold: false,
            in_progress_object: None,
        }
    }

    /// The SSE bytes for a batch of pipeline events.
    pub fn encode(&mut self, events: &[Event]) -> Bytes {
        let mut out = Vec::with_capacity(events.len() * 192);
        for e in events {
            self.event(e, &mut out);
        }
        Bytes::from(out)
    }

    /// Nothing happened for a ping interval (a long prefill): a repeated `response.in_progress`, a real event,
    /// because Codex's idle timer counts parsed events and not SSE comments.
    pub fn keepalive(&mut self) -> Bytes {
        let mut out = Vec::new();
        if self.started && !self.ended {
            self.in_progress(&mut out);
        }
        Bytes::from(out)
    }

    /// Non-streaming: feed every event, then take the response object. Nothing is serialized on the way.
    pub fn push(&mut self, e: &Event) {
        self.fold = true;
        let mut sink = Vec::new();
        self.event(e, &mut sink);
    }

    /// The failure the stream ended with, as `(code, message)`.
    pub fn failure(&self) -> Option<(&str, &str)> {
        self.error.as_ref().map(|(c, m)| (c.as_str(), m.as_str()))
    }

    /// The whole response object (`stream: false`), once the events are pushed.
    pub fn finish_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        self.write_object(&mut out, self.status(), true);
        out
    }

    fn status(&self) -> &'static str {
        if self.error.is_some() {
            "failed"
        } else if !self.ended {
            "in_progress"
        } else if self.stop_reason.as_deref() == Some("max_tokens") {
            "incomplete"
        } else {
            "completed"
        }
    }

    fn event(&mut self, e: &Event, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        match e {
            Event::MessageStart { .. } => {
                if !self.started {
                    self.started = true;
                    self.write_response(out, "response.created", "in_progress", false);
                    self.in_progress(out);
                }
            }
            Event::Ping => {
                if self.started && !self.progress_last {
                    self.in_progress(out);
                }
            }
            Event::ContentBlockStart { block, .. } => self.open_item(block, out),
            Event::ContentBlockDelta { delta, .. } => self.delta(delta, out),
            Event::ContentBlockStop { .. } => self.close_item(out),
            Event::MessageDelta {
                stop_reason, usage, ..
            } => {
                self.stop_reason = Some(stop_reason.clone());
                self.usage = *usage;
            }
            Event::MessageStop => {
                self.close_item(out);
                self.ended = true;
                let status = self.status();
                let name = if status == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                self.write_response(out, name, status, true);
            }
            Event::Error {
                error_type,
                message,
            } => {
                // An item still open is not complete: it is not part of the output.
                self.open = Open::None;
                self.error = Some((error_code(error_type, message).to_string(), message.clone()));
                self.ended = true;
                self.write_response(out, "response.failed", "failed", true);
            }
        }
    }

    fn in_progress(&mut self, out: &mut Vec<u8>) {
        self.write_response(out, "response.in_progress", "in_progress", false);
        self.progress_last = true;
    }

    fn item_id(&self, prefix: &str) -> String {
        // Unique per response and per item: the response id's tail, then the item's index.
        let tail = self.meta.id.strip_prefix("resp_").unwrap_or(&self.meta.id);
        format!("{prefix}_{tail}_{}", self.output_index)
    }

    fn open_item(&mut self, block: &BlockKind, out: &mut Vec<u8>) {
        self.close_item(out);
        let index = self.output_index;
        match block {
            BlockKind::Text => {
                let id = self.item_id("msg");
                let item = Item::Message {
                    id: id.clone(),
                    text: String::new(),
                };
                self.added(out, index, &item);
                self.write_part(
                    out,
                    "response.content_part.added",
                    &id,
                    index,
                    Part::OutputText(""),
                );
                self.open = Open::Message {
                    id,
                    text: String::new(),
                };
            }
            BlockKind::Thinking => {
                let id = self.item_id("rs");
                let item = Item::Reasoning {
                    id: id.clone(),
                    text: String::new(),
                    encrypted: None,
                };
                self.added(out, index, &item);
                self.write_part(
                    out,
                    "response.reasoning_summary_part.added",
                    &id,
                    index,
                    Part::SummaryText(""),
                );
                self.open = Open::Reasoning {
                    id,
                    text: String::new(),
                };
            }
            BlockKind::ToolUse { id: call_id, name } => {
                let client = self.meta.tools.get(name).cloned();
                match client {
                    Some(ClientTool::Custom { name }) => {
                        let id = self.item_id("ctc");
                        let item = Item::Custom {
                            id: id.clone(),
                            call_id: call_id.clone(),
                            name: name.clone(),
                            input: String::new(),
                        };
                        self.added(out, index, &item);
                        self.open = Open::Custom {
                            id,
                            call_id: call_id.clone(),
                            name,
                            arguments: String::new(),
                        };
                    }
                    other => {
                        let (namespace, name) = match other {
                            Some(ClientTool::Function { namespace, name }) => (namespace, name),
                            // A name the client never offered (the model made it up): as it is.
                            _ => (None, name.clone()),
                        };
                        let id = self.item_id("fc");
                        let item = Item::Function {
                            id: id.clone(),
                            call_id: call_id.clone(),
                            name: name.clone(),
                            namespace: namespace.clone(),
                            arguments: String::new(),
                        };
                        self.added(out, index, &item);
                        self.open = Open::Function {
                            id,
                            call_id: call_id.clone(),
                            name,
                            namespace,
                            arguments: String::new(),
                        };
                    }
                }
            }
        }
    }

    /// `response.output_item.added` for an item just opened.
    fn added(&mut self, out: &mut Vec<u8>, index: usize, item: &Item) {
        self.write_item(out, "response.output_item.added", index, item, false);
    }

    /// `response.output_item.added` / `.done`: `output_index`, `item`.
    fn write_item(&mut self, out: &mut Vec<u8>, name: &str, index: usize, item: &Item, done: bool) {
        self.write(out, name, |o| {
            o.uint("output_index", index as u64);
            item.write(o.name("item"), done);
        });
    }

    /// `response.content_part.*` (`content_index`) and `response.reasoning_summary_part.*` (`summary_index`).
    fn write_part(&mut self, out: &mut Vec<u8>, name: &str, id: &str, index: usize, part: Part) {
        let which = match part {
            Part::OutputText(_) => "content_index",
            Part::SummaryText(_) => "summary_index",
        };
        self.write(out, name, |o| {
            o.str("item_id", id).uint("output_index", index as u64);
            o.uint(which, 0);
            part.write(o.name("part"));
        });
    }

    fn delta(&mut self, delta: &Delta, out: &mut Vec<u8>) {
        let index = self.output_index;
        let seq = self.seq;
        // The event to write, if any: (name, item id, index field, text).
        let (name, id, field, text) = match (&mut self.open, delta) {
            (Open::Message { id, text }, Delta::Text(t)) => {
                text.push_str(t);
                (
                    "response.output_text.delta",
                    id,
                    Some(("content_index", 0)),
                    t,
                )
            }
            (Open::Reasoning { id, text }, Delta::Thinking(t)) => {
                text.push_str(t);
                let name = "response.reasoning_summary_text.delta";
                (name, id, Some(("summary_index", 0)), t)
            }
            (Open::Function { id, arguments, .. }, Delta::InputJson(j)) => {
                arguments.push_str(j);
                ("response.function_call_arguments.delta", id, None, j)
            }
            (Open::Custom { arguments, .. }, Delta::InputJson(j)) => {
                arguments.push_str(j);
                return;
            }
            // Signatures are Anthropic's; nothing else can reach an item of another kind.
            _ => return,
        };
        // Folding: the deltas only build the item; nothing is written.
        if !self.fold {
            write_delta(out, name, seq, id, index, field, text);
        }
        self.seq += 1;
        self.progress_last = false;
    }

    fn close_item(&mut self, out: &mut Vec<u8>) {
        let index = self.output_index;
        let item = match std::mem::replace(&mut self.open, Open::None) {
            Open::None => return,
            Open::Message { id, text } => {
                self.write(out, "response.output_text.done", |o| {
                    o.str("item_id", &id).uint("output_index", index as u64);
                    o.uint("content_index", 0).str("text", &text);
                    o.raw("logprobs", "[]");
                });
                let part = Part::OutputText(&text);
                self.write_part(out, "response.content_part.done", &id, index, part);
                Item::Message { id, text }
            }
            Open::Reasoning { id, text } => {
                self.write(out, "response.reasoning_summary_text.done", |o| {
                    o.str("item_id", &id).uint("output_index", index as u64);
                    o.uint("summary_index", 0).str("text", &text);
                });
                let part = Part::SummaryText(&text);
                let name = "response.reasoning_summary_part.done";
                self.write_part(out, name, &id, index, part);
                // Not encrypted: llmctl's own reasoning text, marked, so the next turn gives it back.
                let encrypted = self
                    .meta
                    .include_encrypted
                    .then(|| format!("{REASONING_PREFIX}{text}"));
                Item::Reasoning {
                    id,
                    text,
                    encrypted,
                }
            }
            Open::Function {
                id,
                call_id,
                name,
                namespace,
                arguments,
            } => {
                self.write(out, "response.function_call_arguments.done", |o| {
                    o.str("item_id", &id).uint("output_index", index as u64);
                    o.str("arguments", &arguments);
                });
                Item::Function {
                    id,
                    call_id,
                    name,
                    namespace,
                    arguments,
                }
            }
            Open::Custom {
                id,
                call_id,
                name,
                arguments,
            } => {
                let input = custom_input(&arguments);
                for (name, member) in [
                    ("response.custom_tool_call_input.delta", "delta"),
                    ("response.custom_tool_call_input.done", "input"),
                ] {
                    self.write(out, name, |o| {
                        o.str("item_id", &id).uint("output_index", index as u64);
                        o.str(member, &input);
                    });
                }
                Item::Custom {
                    id,
                    call_id,
                    name,
                    input,
                }
            }
        };
        self.write_item(out, "response.output_item.done", index, &item, true);
        self.output.push(item);
        self.output_index += 1;
    }

    /// Writes an event that carries the response object: `{"type":<name>,"sequence_number":n,"response":…}`.
    fn write_response(&mut self, out: &mut Vec<u8>, name: &str, status: &str, last: bool) {
        if self.fold {
            self.seq += 1;
            return;
        }
        event_head(out, name, self.seq);
        out.extend_from_slice(b",\"response\":");
        // Before the end the object is the same each time (no output, no usage, no error): serialized once,
        // for response.created, response.in_progress and every in_progress keep-alive after them.
        if !last && status == "in_progress" {
            if self.in_progress_object.is_none() {
                let mut object = Vec::with_capacity(512);
                self.write_object(&mut object, status, false);
                self.in_progress_object = Some(object);
            }
            out.extend_from_slice(self.in_progress_object.as_deref().unwrap_or_default());
        } else {
            self.write_object(out, status, last);
        }
        out.extend_from_slice(b"}\n\n");
        self.seq += 1;
        self.progress_last = false;
    }

    /// Writes one event: `event: <name>`, `data: {"type":<name>,"sequence_number":n,…}`, the rest being the
    /// members `members` writes, in order.
    fn write(&mut self, out: &mut Vec<u8>, name: &str, members: impl FnOnce(&mut Object)) {
        if self.fold {
            self.seq += 1;
            return;
        }
        event_head(out, name, self.seq);
        let mut o = Object::resume(out);
        members(&mut o);
        o.close();
        out.extend_from_slice(b"\n\n");
        self.seq += 1;
        self.progress_last = false;
    }

    /// The response object in `status`, with the output and usage once they are final (`last`). Written
    /// straight from the encoder's state: it is sent several times per stream and once for `stream: false`
    /// (built as a `Value` first, it cost a map, a copy of the output and a key allocation per member each
    /// time; through serde's map serializer, ~150 instructions a member name).
    fn write_object(&self, out: &mut Vec<u8>, status: &str, last: bool) {
        let echo = &self.meta.echo;
        let mut o = Object::open(out);
        o.str("id", &self.meta.id).str("object", "response");
        o.uint("created_at", self.meta.created_at)
            .str("status", status);
        o.raw("background", "false");
        match &self.error {
            Some((code, message)) => {
                Object::open(o.name("error"))
                    .str("code", code)
                    .str("message", message)
                    .close();
            }
            None => {
                o.raw("error", "null");
            }
        }
        if status == "incomplete" {
            let details = o.name("incomplete_details");
            Object::open(details)
                .str("reason", "max_output_tokens")
                .close();
        } else {
            o.raw("incomplete_details", "null");
        }
        o.str("model", &self.meta.model);
        let items: &[Item] = if last { &self.output } else { &[] };
        let output = o.name("output");
        output.push(b'[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                output.push(b',');
            }
            item.write(output, true);
        }
        output.push(b']');
        // The echoed request fields (their names a fixed list: `decode`).
        for (k, v) in echo {
            o.serde(k, v);
        }
        // What OpenAI's response objects always carry, where the request did not set it.
        if !echo.contains_key("parallel_tool_calls") {
            o.raw("parallel_tool_calls", "true");
        }
        if !echo.contains_key("tool_choice") {
            o.str("tool_choice", "auto");
        }
        for k in ["instructions", "temperature", "top_p"] {
            if !echo.contains_key(k) {
                o.raw(k, "null");
            }
        }
        if !echo.contains_key("metadata") {
            o.raw("metadata", "{}");
        }
        // Tools are not echoed: Codex's are ~19 KB, sent on every event otherwise.
        o.raw("tools", "[]").raw("store", "false");
        o.raw("previous_response_id", "null");
        if last && self.error.is_none() {
            write_usage(o.name("usage"), &self.usage);
        } else {
            o.raw("usage", "null");
        }
        o.close();
    }
}

/// The start of every event: `event: <name>`, then `data: {"type":<name>,"sequence_number":<seq>`, the object
/// left open for the event's own members.
fn event_head(out: &mut Vec<u8>, name: &str, seq: u64) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    // The name is one of this module's literals: nothing in it to escape.
    out.extend_from_slice(b"\ndata: {\"type\":\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\",\"sequence_number\":");
    json_write::uint(out, seq);
}

/// Delta events are most of a stream (one per token): written by hand (`json_write`), the bytes serde's derive
/// of [`tests::DeltaOracle`] writes.
fn write_delta(
    out: &mut Vec<u8>,
    name: &str,
    seq: u64,
    item_id: &str,
    output_index: usize,
    index: Option<(&'static str, usize)>,
    delta: &str,
) {
    event_head(out, name, seq);
    out.extend_from_slice(b",\"item_id\":");
    json_write::string(out, item_id);
    out.extend_from_slice(b",\"output_index\":");
    json_write::uint(out, output_index as u64);
    if let Some((field, i)) = index {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(field.as_bytes());
        out.extend_from_slice(b"\":");
        json_write::uint(out, i as u64);
    }
    out.extend_from_slice(b",\"delta\":");
    json_write::string(out, delta);
    out.extend_from_slice(b"}\n\n");
}

/// A completed output item, kept for the final response object and serialized straight from its strings
/// (a `json!` object per item cost a map with a hashed key per member, then a second serialization for
/// `response.completed`). The members are in the order OpenAI's items have them.
enum Item {
    Message {
        id: String,
        text: String,
    },
    Reasoning {
        id: String,
        text: String,
        encrypted: Option<String>,
    },
    Function {
        id: String,
        call_id: String,
        name: String,
        namespace: Option<String>,
        arguments: String,
    },
    Custom {
        id: String,
        call_id: String,
        name: String,
        input: String,
    },
}

impl Item {
    /// The item as `response.output_item.added` shows it (`done: false`: `in_progress`, its text and summary
    /// parts not there yet, no `encrypted_content`) or as `.done` and the response object do (`done: true`).
    /// The items were `json!` objects; a unit test keeps those as the oracle of the bytes.
    fn write(&self, out: &mut Vec<u8>, done: bool) {
        let (id, kind) = match self {
            Item::Message { id, .. } => (id, "message"),
            Item::Reasoning { id, .. } => (id, "reasoning"),
            Item::Function { id, .. } => (id, "function_call"),
            Item::Custom { id, .. } => (id, "custom_tool_call"),
        };
        let mut o = Object::open(out);
        o.str("id", id).str("type", kind);
        o.str("status", if done { "completed" } else { "in_progress" });
        match self {
            Item::Message { text, .. } => {
                Part::OutputText(text).write_list(o.name("content"), done);
                o.str("role", "assistant");
            }
            Item::Reasoning {
                text, encrypted, ..
            } => {
                Part::SummaryText(text).write_list(o.name("summary"), done);
                if let Some(e) = encrypted.as_ref().filter(|_| done) {
                    o.str("encrypted_content", e);
                }
            }
            Item::Function {
                call_id,
                name,
                namespace,
                arguments,
                ..
            } => {
                o.str("arguments", arguments).str("call_id", call_id);
                o.str("name", name);
                if let Some(ns) = namespace {
                    o.str("namespace", ns);
                }
            }
            Item::Custom {
                call_id,
                name,
                input,
                ..
            } => {
                o.str("call_id", call_id)
                    .str("name", name)
                    .str("input", input);
            }
        }
        o.close();
    }
}

/// A message's text part or a reasoning item's summary part.
enum Part<'a> {
    OutputText(&'a str),
    SummaryText(&'a str),
}

impl Part<'_> {
    /// An item's list of parts: this one once the item is done, none before.
    fn write_list(&self, out: &mut Vec<u8>, done: bool) {
        if !done {
            return out.extend_from_slice(b"[]");
        }
        out.push(b'[');
        self.write(out);
        out.push(b']');
    }

    fn write(&self, out: &mut Vec<u8>) {
        let mut o = Object::open(out);
        match self {
            Part::OutputText(text) => {
                o.str("type", "output_text").str("text", text);
                o.raw("annotations", "[]");
            }
            Part::SummaryText(text) => {
                o.str("type", "summary_text").str("text", text);
            }
        }
        o.close();
    }
}

/// A freeform tool's raw input from the arguments the model gave the one-string function it was offered:
/// the `input` string, or the only string whatever the model named its key, or the arguments as they are.
pub fn custom_input(arguments: &str) -> String {
    match serde_json::from_str::<Value>(arguments) {
        Ok(Value::Object(m)) => {
            if let Some(Value::String(s)) = m.get("input") {
                return s.clone();
            }
            let strings: Vec<&String> = m
                .values()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s),
                    _ => None,
                })
                .collect();
            match strings.as_slice() {
                [one] if m.len() == 1 => (*one).clone(),
                _ => arguments.to_string(),
            }
        }
        Ok(Value::String(s)) => s,
        _ => arguments.to_string(),
    }
}

/// OpenAI's usage: `input_tokens` counts the cached ones too, `cached_tokens` is that subset.
fn write_usage(out: &mut Vec<u8>, u: &Usage) {
    let input = u.input_tokens + u.cache_read_input_tokens;
    let mut o = Object::open(out);
    o.uint("input_tokens", input);
    let details = o.name("input_tokens_details");
    Object::open(details)
        .uint("cached_tokens", u.cache_read_input_tokens)
        .close();
    o.uint("output_tokens", u.output_tokens);
    let details = o.name("output_tokens_details");
    Object::open(details).uint("reasoning_tokens", 0).close();
    o.uint("total_tokens", input + u.output_tokens);
    o.close();
}

/// The `response.error.code` for a pipeline error. Codex keys on these: `context_length_exceeded` is fatal
/// (it compacts), `rate_limit_exceeded` is retried after the delay the message names, anything else is retried.
pub fn error_code(error_type: &str, message: &str) -> &'static str {
    if message.contains("prompt is too long") {
        return "context_length_exceeded";
    }
    match error_type {
        "rate_limit_error" | "overloaded_error" => "rate_limit_exceeded",
        "invalid_request_error" => "invalid_request_error",
        "timeout_error" => "timeout",
        _ => "server_error",
    }
}

#[cfg(test)]
#[path = "encode_tests.rs"]
mod tests;
