//! OpenAI Chat Completions stream chunks → Anthropic Messages stream events.
//!
//! One stateful translator per response. It guarantees Anthropic's grammar whatever order the
//! upstream sends reasoning, text and tool-call deltas in:
//! `message_start`, then content blocks with dense indices 0..n, each started before its deltas
//! and stopped before the next one starts, then exactly one `message_delta` and `message_stop`,
//! and nothing after it (or a single `error` event, after which nothing follows either).

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::json_write::{self, Object};
use super::openai::{ChatChunk, ToolCallDelta};
use super::translate::ResponseContext;

/// Prefix of the opaque `signature` given to thinking blocks: obviously not Anthropic's, so a
/// client switching back to Anthropic can recognise and strip it.
pub const SIGNATURE_PREFIX: &str = "llmctl-unsigned:";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockKind {
    Text,
    Thinking,
    ToolUse { id: String, name: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    Text(String),
    Thinking(String),
    Signature(String),
    InputJson(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_input_tokens: u64,
}

impl Usage {
    /// Anthropic's usage block, member by member: what both writers below write, in this order.
    fn members(&self) -> [(&'static str, u64); 4] {
        [
            ("input_tokens", self.input_tokens),
            // llama.cpp's cache is not billed for writes: always 0.
            ("cache_creation_input_tokens", 0),
            ("cache_read_input_tokens", self.cache_read_input_tokens),
            ("output_tokens", self.output_tokens),
        ]
    }

    /// The usage block by hand, for the stream's events.
    pub fn write(&self, out: &mut Vec<u8>) {
        let mut o = Object::open(out);
        for (name, n) in self.members() {
            o.uint(name, n);
        }
        o.close();
    }
}

/// The usage block through serde, for the folded message.
impl serde::Serialize for Usage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut u = s.serialize_struct("Usage", 4)?;
        for (name, n) in self.members() {
            u.serialize_field(name, &n)?;
        }
        u.end()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    MessageStart {
        id: String,
        model: String,
        /// The prompt's tokens when already known (llama.cpp's first prompt_progress); output is 0.
        usage: Usage,
    },
    ContentBlockStart {
        index: usize,
        block: BlockKind,
    },
    ContentBlockDelta {
        index: usize,
        delta: Delta,
    },
    ContentBlockStop {
        index: usize,
    },
    MessageDelta {
        stop_reason: String,
        stop_sequence: Option<String>,
        usage: Usage,
    },
    MessageStop,
    Ping,
    Error {
        error_type: String,
        message: String,
    },
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::MessageStart { .. } => "message_start",
            Event::ContentBlockStart { .. } => "content_block_start",
            Event::ContentBlockDelta { .. } => "content_block_delta",
            Event::ContentBlockStop { .. } => "content_block_stop",
            Event::MessageDelta { .. } => "message_delta",
            Event::MessageStop => "message_stop",
            Event::Ping => "ping",
            Event::Error { .. } => "error",
        }
    }

    /// The event's `data:` JSON, exactly as Anthropic sends it. This is the readable reference;
    /// `to_sse` writes the same bytes by hand without building a `Value` (tests check both agree, for
    /// every event kind).
    pub fn data(&self) -> Value {
        match self {
            Event::MessageStart { id, model, usage } => json!({
                "type": "message_start",
                "message": {
                    "id": id, "type": "message", "role": "assistant", "model": model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": usage_json(usage),
                }
            }),
            Event::ContentBlockStart { index, block } => {
                let content_block = match block {
                    BlockKind::Text => json!({"type": "text", "text": ""}),
                    BlockKind::Thinking => {
                        json!({"type": "thinking", "thinking": "", "signature": ""})
                    }
                    BlockKind::ToolUse { id, name } => {
                        json!({"type": "tool_use", "id": id, "name": name, "input": {}})
                    }
                };
                json!({"type": "content_block_start", "index": index, "content_block": content_block})
            }
            Event::ContentBlockDelta { index, delta } => {
                let delta = match delta {
                    Delta::Text(t) => json!({"type": "text_delta", "text": t}),
                    Delta::Thinking(t) => json!({"type": "thinking_delta", "thinking": t}),
                    Delta::Signature(s) => json!({"type": "signature_delta", "signature": s}),
                    Delta::InputJson(j) => json!({"type": "input_json_delta", "partial_json": j}),
                };
                json!({"type": "content_block_delta", "index": index, "delta": delta})
            }
            Event::ContentBlockStop { index } => {
                json!({"type": "content_block_stop", "index": index})
            }
            Event::MessageDelta {
                stop_reason,
                stop_sequence,
                usage,
            } => json!({
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": usage_json(usage),
            }),
            Event::MessageStop => json!({"type": "message_stop"}),
            Event::Ping => json!({"type": "ping"}),
            Event::Error {
                error_type,
                message,
            } => json!({"type": "error", "error": {"type": error_type, "message": message}}),
        }
    }

    /// `event: X\ndata: {...}\n\n`
    pub fn to_sse(&self) -> Bytes {
        let mut out = Vec::with_capacity(64 + self.name().len());
        self.write_sse(&mut out);
        Bytes::from(out)
    }

    /// Appends `event: X\ndata: {...}\n\n` to `out`: a batch of events goes out as one buffer.
    pub fn write_sse(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(self.name().as_bytes());
        out.extend_from_slice(b"\ndata: ");
        self.write_data(out);
        out.extend_from_slice(b"\n\n");
    }

    /// The event's JSON, written by hand (json_write: literal member names, which serde's serializer escapes
    /// byte by byte, ~150 instructions a name); the bytes of `data()`.
    fn write_data(&self, out: &mut Vec<u8>) {
        if let Event::ContentBlockDelta { index, delta } = self {
            // One per token: the whole prefix at once.
            let (kind, field, text) = match delta {
                Delta::Text(t) => ("text_delta", "text", t),
                Delta::Thinking(t) => ("thinking_delta", "thinking", t),
                Delta::Signature(t) => ("signature_delta", "signature", t),
                Delta::InputJson(t) => ("input_json_delta", "partial_json", t),
            };
            out.extend_from_slice(b"{\"type\":\"content_block_delta\",\"index\":");
            json_write::uint(out, *index as u64);
            out.extend_from_slice(b",\"delta\":{\"type\":\"");
            out.extend_from_slice(kind.as_bytes());
            out.extend_from_slice(b"\",\"");
            out.extend_from_slice(field.as_bytes());
            out.extend_from_slice(b"\":");
            json_write::string(out, text);
            out.extend_from_slice(b"}}");
            return;
        }
        let mut o = Object::open(out);
        o.str("type", self.name());
        match self {
            Event::MessageStart { id, model, usage } => {
                let mut m = Object::open(o.name("message"));
                m.str("id", id)
                    .str("type", "message")
                    .str("role", "assistant");
                m.str("model", model).raw("content", "[]");
                m.raw("stop_reason", "null").raw("stop_sequence", "null");
                usage.write(m.name("usage"));
                m.close();
            }
            Event::ContentBlockStart { index, block } => {
                o.uint("index", *index as u64);
                let mut b = Object::open(o.name("content_block"));
                match block {
                    BlockKind::Text => b.str("type", "text").str("text", ""),
                    BlockKind::Thinking => {
                        let b = b.str("type", "thinking");
                        b.str("thinking", "").str("signature", "")
                    }
                    BlockKind::ToolUse { id, name } => {
                        let b = b.str("type", "tool_use").str("id", id);
                        b.str("name", name).raw("input", "{}")
                    }
                }
                .close();
            }
            Event::ContentBlockStop { index } => {
                o.uint("index", *index as u64);
            }
            Event::MessageDelta {
                stop_reason,
                stop_sequence,
                usage,
            } => {
                let mut d = Object::open(o.name("delta"));
                d.str("stop_reason", stop_reason);
                match stop_sequence {
                    Some(seq) => d.str("stop_sequence", seq),
                    None => d.raw("stop_sequence", "null"),
                }
                .close();
                usage.write(o.name("usage"));
            }
            Event::Error {
                error_type,
                message,
            } => {
                let mut e = Object::open(o.name("error"));
                e.str("type", error_type).str("message", message).close();
            }
            Event::ContentBlockDelta { .. } | Event::MessageStop | Event::Ping => {}
        }
        o.close();
    }
}

pub(crate) fn usage_json(u: &Usage) -> Value {
    serde_json::to_value(u).unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    None,
    Text(usize),
    Thinking(usize),
    /// (block index, position in `calls`)
    Tool(usize, usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallState {
    /// Arguments buffered; block not started yet.
    Pending,
    Open,
    Closed,
    /// Beyond the first call when the client asked for a single tool call.
    Ignored,
}

#[derive(Debug)]
enum Deferred {
    Text(String),
    Reasoning(String),
}

#[derive(Debug)]
struct Call {
    upstream_index: u32,
    id: Option<String>,
    name: Option<String>,
    args: String,
    /// Bytes of `args` already sent as input_json_delta.
    sent: usize,
    state: CallState,
}

#[derive(Debug, Default)]
struct UsageSources {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    cached_tokens: Option<u64>,
    timing_prompt: Option<u64>,
    timing_cache: Option<u64>,
    timing_predicted: Option<u64>,
    /// From llama.cpp's first prompt_progress: known before any token, for message_start.
    progress_total: Option<u64>,
    progress_cache: Option<u64>,
}

pub struct StreamTranslator {
    ctx: ResponseContext,
    started: bool,
    finished: bool,
    failed: bool,
    next_index: usize,
    open: Open,
    /// Text not yet sent: a possible start of a stop sequence is held back.
    held_text: String,
    /// Reasoning seen so far that is only whitespace: not worth a thinking block (yet).
    pending_thinking: String,
    /// Text and reasoning that arrived while a tool call's arguments were still incomplete: its
    /// block cannot be closed yet (no fragment may be lost), so they wait until it can.
    deferred: Vec<Deferred>,
    calls: Vec<Call>,
    tool_blocks: usize,
    finish_reason: Option<String>,
    matched_stop: Option<String>,
    usage: UsageSources,
}

impl StreamTranslator {
    pub fn new(ctx: ResponseContext) -> Self {
        StreamTranslator {
            ctx,
            started: false,
            finished: false,
            failed: false,
            next_index: 0,
            open: Open::None,
            held_text: String::new(),
            pending_thinking: String::new(),
            deferred: Vec::new(),
            calls: Vec::new(),
            tool_blocks: 0,
            finish_reason: None,
            matched_stop: None,
            usage: UsageSources::default(),
        }
    }

    /// Called the moment the upstream answered 200: message_start (+ one ping).
    pub fn start(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        self.ensure_started(&mut out);
        out
    }

    fn ensure_started(&mut self, out: &mut Vec<Event>) {
        if !self.started {
            self.started = true;
            let prompt = self.usage.progress_total.unwrap_or(0);
            let cached = self.usage.progress_cache.unwrap_or(0).min(prompt);
            out.push(Event::MessageStart {
                id: self.ctx.message_id.clone(),
                model: self.ctx.client_model.clone(),
                usage: Usage {
                    input_tokens: prompt - cached,
                    output_tokens: 0,
                    cache_read_input_tokens: cached,
                },
            });
            out.push(Event::Ping);
        }
    }

    /// One parsed upstream `data:` JSON object (not "[DONE]"). Returns the events to send.
    pub fn on_chunk(&mut self, chunk: &Value) -> Vec<Event> {
        // llama.cpp (and vLLM) report a failure after the 200 as a `data: {"error": {...}}` line.
        if let Some(err) = chunk.get("error") {
            return self.upstream_error(err);
        }
        match ChatChunk::deserialize(chunk) {
            Ok(c) => self.on_parsed(c),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an upstream chunk of unexpected shape");
                Vec::new()
            }
        }
    }

    /// The same for a chunk deserialized straight from the upstream's text (no `Value` in between, which
    /// is most of the cost of a chunk).
    pub fn on_parsed(&mut self, chunk: ChatChunk) -> Vec<Event> {
        let mut out = Vec::new();
        self.on_parsed_into(chunk, &mut out);
        out
    }

    /// The same, appending to `out`: the stream driver's batch, so that a token costs no vector of its own.
    pub fn on_parsed_into(&mut self, chunk: ChatChunk, out: &mut Vec<Event>) {
        if let Some(err) = &chunk.error {
            out.extend(self.upstream_error(err));
            return;
        }
        self.take_usage(&chunk);
        if self.finished || self.failed || self.is_done() {
            return;
        }
        self.ensure_started(out);
        // Chunks without choices (usage-only, llama.cpp prompt_progress) produce no events.
        for choice in chunk.choices {
            if let Some(delta) = choice.delta {
                let reasoning = delta.reasoning_content.or(delta.reasoning);
                if let Some(r) = reasoning.filter(|r| !r.is_empty()) {
                    if self.open_call_incomplete() {
                        self.deferred.push(Deferred::Reasoning(r));
                    } else {
                        self.on_reasoning(&r, out);
                    }
                }
                if let Some(t) = delta.content.filter(|t| !t.is_empty()) {
                    if self.open_call_incomplete() {
                        self.deferred.push(Deferred::Text(t));
                    } else {
                        self.on_text(t, out);
                        if self.is_done() {
                            return;
                        }
                    }
                }
                for call in delta.tool_calls.unwrap_or_default() {
                    self.on_tool_call(call, out);
                    if self.is_done() {
                        return;
                    }
                }
            }
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(reason);
            }
        }
    }

    fn upstream_error(&mut self, err: &Value) -> Vec<Event> {
        let message = err
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| err.to_string());
        self.fail(
            "api_error",
            &format!("upstream error mid-stream: {message}"),
        )
    }

    /// True once a stop sequence was matched: the server stops reading and drops the upstream.
    pub fn is_done(&self) -> bool {
        self.matched_stop.is_some()
    }

    /// Upstream ended ([DONE] or EOF) or is_done(): closes the open block, message_delta,
    /// message_stop. Idempotent.
    pub fn finish(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        if self.finished || self.failed {
            return out;
        }
        self.ensure_started(&mut out);
        if matches!(self.open, Open::Tool(..)) {
            self.close_open(&mut out);
        }
        self.replay_deferred(&mut out);
        self.flush_held_text(&mut out);
        self.pending_thinking.clear();
        self.close_open(&mut out);
        if !self.is_done() {
            self.flush_pending_calls(&mut out);
        }
        self.finished = true;
        out.push(Event::MessageDelta {
            stop_reason: self.stop_reason_now().to_string(),
            stop_sequence: self.matched_stop.clone(),
            usage: self.usage(),
        });
        out.push(Event::MessageStop);
        out
    }

    /// Mid-stream failure: one Anthropic-shaped `error` event; nothing may follow it.
    pub fn fail(&mut self, error_type: &str, message: &str) -> Vec<Event> {
        if self.finished || self.failed {
            return Vec::new();
        }
        self.failed = true;
        // A stream still holding back message_start (waiting for the prompt's size) opens with it.
        let mut out = Vec::new();
        self.ensure_started(&mut out);
        out.push(Event::Error {
            error_type: error_type.to_string(),
            message: message.to_string(),
        });
        out
    }

    pub fn usage(&self) -> Usage {
        let u = &self.usage;
        let (prompt, cached) = match u.prompt_tokens {
            Some(p) => (p, u.cached_tokens.or(u.timing_cache).unwrap_or(0)),
            None => {
                let cache = u.timing_cache.unwrap_or(0);
                (u.timing_prompt.unwrap_or(0) + cache, cache)
            }
        };
        Usage {
            input_tokens: prompt.saturating_sub(cached),
            output_tokens: u.completion_tokens.or(u.timing_predicted).unwrap_or(0),
            cache_read_input_tokens: cached.min(prompt),
        }
    }

    /// The stop reason, once `finish()` ran.
    pub fn stop_reason(&self) -> Option<&str> {
        self.finished.then(|| self.stop_reason_now())
    }

    fn stop_reason_now(&self) -> &'static str {
        if self.matched_stop.is_some() {
            return "stop_sequence";
        }
        match self.finish_reason.as_deref() {
            Some("length") => "max_tokens",
            _ if self.tool_blocks > 0 => "tool_use",
            Some("content_filter") => "refusal",
            _ => "end_turn",
        }
    }

    fn take_usage(&mut self, chunk: &ChatChunk) {
        if let Some(u) = &chunk.usage {
            if u.prompt_tokens.is_some() {
                self.usage.prompt_tokens = u.prompt_tokens;
            }
            if u.completion_tokens.is_some() {
                self.usage.completion_tokens = u.completion_tokens;
            }
            if let Some(c) = u
                .prompt_tokens_details
                .as_ref()
                .and_then(|d| d.cached_tokens)
            {
                self.usage.cached_tokens = Some(c);
            }
        }
        if let Some(p) = &chunk.prompt_progress
            && self.usage.progress_total.is_none()
        {
            self.usage.progress_total = p.total;
            self.usage.progress_cache = p.cache;
        }
        if let Some(t) = &chunk.timings {
            self.usage.timing_prompt = t.prompt_n.or(self.usage.timing_prompt);
            self.usage.timing_cache = t.cache_n.or(self.usage.timing_cache);
            self.usage.timing_predicted = t.predicted_n.or(self.usage.timing_predicted);
        }
    }

    // ---- blocks ----

    fn open_block(&mut self, kind: BlockKind, out: &mut Vec<Event>) -> usize {
        let index = self.next_index;
        self.next_index += 1;
        out.push(Event::ContentBlockStart { index, block: kind });
        index
    }

    /// Closes whatever block is open (a thinking block gets its signature first).
    fn close_open(&mut self, out: &mut Vec<Event>) {
        match self.open {
            Open::None => {}
            Open::Text(index) => out.push(Event::ContentBlockStop { index }),
            Open::Thinking(index) => {
                out.push(Event::ContentBlockDelta {
                    index,
                    delta: Delta::Signature(format!("{SIGNATURE_PREFIX}{}", self.ctx.message_id)),
                });
                out.push(Event::ContentBlockStop { index });
            }
            Open::Tool(index, c) => {
                let call = &mut self.calls[c];
                if call.sent == 0 {
                    // No arguments at all: a tool that takes none.
                    out.push(Event::ContentBlockDelta {
                        index,
                        delta: Delta::InputJson("{}".into()),
                    });
                } else if !is_complete_json(&call.args) {
                    tracing::warn!(
                        tool = call.name.as_deref().unwrap_or(""),
                        arguments = %call.args,
                        "upstream tool call arguments are not valid JSON (already streamed to the client)"
                    );
                }
                call.state = CallState::Closed;
                out.push(Event::ContentBlockStop { index });
            }
        }
        self.open = Open::None;
    }

    // ---- text and stop sequences ----

    /// Owned: without stop sequences the chunk's own text becomes the event's (no copy per token).
    fn on_text(&mut self, text: String, out: &mut Vec<Event>) {
        self.pending_thinking.clear();
        if self.ctx.stop_sequences.is_empty() {
            self.emit_text(text, out);
            return;
        }
        self.held_text.push_str(&text);
        if let Some((pos, seq)) = earliest_match(&self.held_text, &self.ctx.stop_sequences) {
            let before = self.held_text[..pos].to_string();
            self.held_text.clear();
            self.emit_text(before, out);
            self.matched_stop = Some(seq);
            return;
        }
        let keep = partial_match_len(&self.held_text, &self.ctx.stop_sequences);
        let send_len = self.held_text.len() - keep;
        let rest = self.held_text.split_off(send_len);
        let send = std::mem::replace(&mut self.held_text, rest);
        self.emit_text(send, out);
    }

    fn flush_held_text(&mut self, out: &mut Vec<Event>) {
        let held = std::mem::take(&mut self.held_text);
        self.emit_text(held, out);
    }

    fn emit_text(&mut self, text: String, out: &mut Vec<Event>) {
        if text.is_empty() {
            return;
        }
        let index = match self.open {
            Open::Text(i) => i,
            _ => {
                self.close_open(out);
                let i = self.open_block(BlockKind::Text, out);
                self.open = Open::Text(i);
                i
            }
        };
        out.push(Event::ContentBlockDelta {
            index,
            delta: Delta::Text(text),
        });
    }

    // ---- reasoning ----

    fn on_reasoning(&mut self, r: &str, out: &mut Vec<Event>) {
        if let Open::Thinking(index) = self.open {
            out.push(Event::ContentBlockDelta {
                index,
                delta: Delta::Thinking(r.to_string()),
            });
            return;
        }
        self.pending_thinking.push_str(r);
        if self.pending_thinking.trim().is_empty() {
            return;
        }
        self.flush_held_text(out);
        self.close_open(out);
        let index = self.open_block(BlockKind::Thinking, out);
        self.open = Open::Thinking(index);
        let text = std::mem::take(&mut self.pending_thinking);
        out.push(Event::ContentBlockDelta {
            index,
            delta: Delta::Thinking(text),
        });
    }

    // ---- tool calls ----

    fn on_tool_call(&mut self, d: ToolCallDelta, out: &mut Vec<Event>) {
        let key = self.call_key(&d);
        let pos = match self.calls.iter().position(|c| c.upstream_index == key) {
            Some(p) => p,
            None => {
                let state = if self.ctx.single_tool_call && !self.calls.is_empty() {
                    tracing::warn!(
                        "dropping an extra tool call: the client disabled parallel tool use"
                    );
                    CallState::Ignored
                } else {
                    CallState::Pending
                };
                self.calls.push(Call {
                    upstream_index: key,
                    id: None,
                    name: None,
                    args: String::new(),
                    sent: 0,
                    state,
                });
                self.calls.len() - 1
            }
        };
        let call = &mut self.calls[pos];
        let (name, args) = match d.function {
            Some(f) => (f.name, f.arguments),
            None => (None, None),
        };
        match call.state {
            CallState::Ignored => return,
            CallState::Closed => {
                if args.as_deref().is_some_and(|a| !a.trim().is_empty()) {
                    tracing::warn!(
                        tool = call.name.as_deref().unwrap_or(""),
                        "dropping arguments that arrived after the tool call's JSON was complete"
                    );
                }
                return;
            }
            CallState::Pending | CallState::Open => {}
        }
        if call.id.is_none() {
            call.id = d.id.filter(|s| !s.is_empty());
        }
        if call.name.is_none() {
            call.name = name.filter(|s| !s.is_empty());
        }
        if let Some(a) = args {
            call.args.push_str(&a);
        }
        self.pump_calls(out);
    }

    /// A tool block is open and its arguments are not complete JSON yet.
    fn open_call_incomplete(&self) -> bool {
        match self.open {
            Open::Tool(_, c) => !is_complete_json(&self.calls[c].args),
            _ => false,
        }
    }

    fn replay_deferred(&mut self, out: &mut Vec<Event>) {
        for d in std::mem::take(&mut self.deferred) {
            if self.is_done() {
                break;
            }
            match d {
                Deferred::Text(t) => self.on_text(t, out),
                Deferred::Reasoning(r) => self.on_reasoning(&r, out),
            }
        }
    }

    /// The upstream's `tool_calls[].index`; servers that omit it are keyed by id, else by the
    /// latest call.
    fn call_key(&self, d: &ToolCallDelta) -> u32 {
        if let Some(i) = d.index {
            return i;
        }
        let next = self
            .calls
            .iter()
            .map(|c| c.upstream_index + 1)
            .max()
            .unwrap_or(0);
        match d.id.as_deref().filter(|s| !s.is_empty()) {
            Some(id) => self
                .calls
                .iter()
                .find(|c| c.id.as_deref() == Some(id))
                .map(|c| c.upstream_index)
                .unwrap_or(next),
            None => self.calls.last().map(|c| c.upstream_index).unwrap_or(0),
        }
    }

    /// Streams the open call's new arguments; switches to the next buffered call once the open
    /// one's arguments form complete JSON (nothing but whitespace can follow a complete value,
    /// so no fragment of it can be lost). Blocks are sequential; interleaved calls are serialized.
    fn pump_calls(&mut self, out: &mut Vec<Event>) {
        loop {
            if let Open::Tool(index, c) = self.open {
                let call = &mut self.calls[c];
                if call.args.len() > call.sent {
                    out.push(Event::ContentBlockDelta {
                        index,
                        delta: Delta::InputJson(call.args[call.sent..].to_string()),
                    });
                    call.sent = call.args.len();
                }
                let others_waiting = !self.deferred.is_empty()
                    || self.calls.iter().any(|o| o.state == CallState::Pending);
                if others_waiting && is_complete_json(&self.calls[c].args) {
                    self.close_open(out);
                    self.replay_deferred(out);
                    if self.is_done() {
                        return;
                    }
                    continue;
                }
                return;
            }
            let Some(next) = self
                .calls
                .iter()
                .position(|c| c.state == CallState::Pending)
            else {
                return;
            };
            let (Some(id), Some(name)) =
                (self.calls[next].id.clone(), self.calls[next].name.clone())
            else {
                return; // wait until the upstream names it
            };
            self.flush_held_text(out);
            self.pending_thinking.clear();
            self.close_open(out);
            let index = self.open_block(BlockKind::ToolUse { id, name }, out);
            self.tool_blocks += 1;
            self.calls[next].state = CallState::Open;
            self.open = Open::Tool(index, next);
        }
    }

    /// At the end: every call still buffered gets its block, in upstream order. Arguments
    /// that are not valid JSON become `{}` (logged).
    fn flush_pending_calls(&mut self, out: &mut Vec<Event>) {
        for c in 0..self.calls.len() {
            if self.calls[c].state != CallState::Pending {
                continue;
            }
            let call = &mut self.calls[c];
            call.state = CallState::Closed;
            let Some(name) = call.name.clone() else {
                tracing::warn!(arguments = %call.args, "dropping a tool call the upstream never named");
                continue;
            };
            let id = call
                .id
                .clone()
                .unwrap_or_else(|| format!("toolu_{}_{c}", self.ctx.message_id));
            let args = if is_complete_json(&call.args) {
                std::mem::take(&mut call.args)
            } else {
                if !call.args.trim().is_empty() {
                    tracing::warn!(tool = %name, arguments = %call.args, "tool call arguments are not valid JSON; sending {{}}");
                }
                "{}".to_string()
            };
            let index = self.open_block(BlockKind::ToolUse { id, name }, out);
            self.tool_blocks += 1;
            out.push(Event::ContentBlockDelta {
                index,
                delta: Delta::InputJson(args),
            });
            out.push(Event::ContentBlockStop { index });
        }
    }
}

fn is_complete_json(s: &str) -> bool {
    !s.trim().is_empty() && serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok()
}

/// The earliest (position, sequence) where any stop sequence occurs in `text`.
fn earliest_match(text: &str, seqs: &[String]) -> Option<(usize, String)> {
    seqs.iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()).map(|p| (p, s.clone())))
        .min_by_key(|(p, _)| *p)
}

/// Length of the longest suffix of `text` that is a proper prefix of some stop sequence: those
/// bytes may become a match with the next delta and must be held back.
fn partial_match_len(text: &str, seqs: &[String]) -> usize {
    let mut best = 0;
    for s in seqs {
        let max = s.len().saturating_sub(1).min(text.len());
        for k in (best + 1..=max).rev() {
            let start = text.len() - k;
            if text.is_char_boundary(start) && s.as_bytes().starts_with(&text.as_bytes()[start..]) {
                best = k;
                break;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written delta events are the bytes of the readable reference, `Event::data()` (every other
    /// event kind: tests/proxy_stream.rs), for awkward text in every kind of delta.
    #[test]
    fn hand_written_deltas_are_the_reference_bytes() {
        let texts = ["", "Hi", " \"q\" \\ \n\t\u{1}", "日本 🦀", "{\"a\":1}"];
        for (i, t) in texts.iter().enumerate() {
            for delta in [
                Delta::Text(t.to_string()),
                Delta::Thinking(t.to_string()),
                Delta::Signature(t.to_string()),
                Delta::InputJson(t.to_string()),
            ] {
                let e = Event::ContentBlockDelta {
                    index: i * 7,
                    delta,
                };
                let reference = format!("event: {}\ndata: {}\n\n", e.name(), e.data());
                assert_eq!(std::str::from_utf8(&e.to_sse()).unwrap(), reference);
            }
        }
    }

    #[test]
    fn partial_match_holds_back_only_possible_prefixes() {
        let seqs = vec!["STOP".to_string(), "éx".to_string()];
        assert_eq!(partial_match_len("hello ST", &seqs), 2);
        assert_eq!(partial_match_len("hello S", &seqs), 1);
        assert_eq!(partial_match_len("hello", &seqs), 0);
        assert_eq!(partial_match_len("caf\u{e9}", &seqs), 2);
        assert_eq!(partial_match_len("STOP", &seqs), 0);
    }

    #[test]
    fn earliest_of_several_stop_sequences_wins() {
        let seqs = vec!["b".to_string(), "a".to_string()];
        assert_eq!(earliest_match("xxaxb", &seqs), Some((2, "a".to_string())));
    }

    #[test]
    fn complete_json_detection() {
        assert!(is_complete_json(r#"{"a":1}"#));
        assert!(is_complete_json("{} \n"));
        assert!(!is_complete_json(r#"{"a":"#));
        assert!(!is_complete_json(""));
    }
}
