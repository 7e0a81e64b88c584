//! Anthropic Messages request → OpenAI Chat Completions request.
//!
//! Pure: bytes in, JSON out. The rules (and why) are listed in `docs/proxy.md`; the ones that shape
//! the prompt are chosen so that the translated prompt of turn N+1 extends turn N's byte for byte
//! (llama.cpp's prefix cache then reuses the whole conversation so far).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::anthropic::{
    ContentBlock, DocumentContent, DocumentSource, ImageSource, KNOWN_BLOCK_TYPES, Message,
    MessagesRequest, Role, System, SystemBlock, Thinking, Tool, ToolChoice, ToolResultContent,
};
use super::openai::{
    ChatMessage, ChatRequest, ChatTemplateKwargs, ContentPart, FunctionCall, FunctionDef,
    FunctionTool, ImageUrl, StreamOptions, ToolCall, UserContent,
};
use super::schema::clean_input_schema;

pub struct TranslateOptions {
    /// Already resolved from the client's model name by the server.
    pub upstream_model: String,
    /// Upstream is llama.cpp: also send its own knobs (chat_template_kwargs, thinking budget).
    pub llama_cpp: bool,
}

pub struct Translated {
    /// The OpenAI /v1/chat/completions request, always streaming with usage; serialized once, when sent.
    pub chat: ChatRequest,
    /// Whether the client asked for SSE.
    pub client_stream: bool,
    pub ctx: ResponseContext,
}

#[derive(Debug, Clone, Default)]
pub struct ResponseContext {
    /// Echoed back in message_start / the message.
    pub client_model: String,
    pub message_id: String,
    pub stop_sequences: Vec<String>,
    /// tool_choice {type:"tool",name}.
    pub forced_tool: Option<String>,
    /// disable_parallel_tool_use: the stream keeps only the first call.
    pub single_tool_call: bool,
}

/// A request the client must fix: answered with 400 `invalid_request_error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub message: String,
}

impl RequestError {
    pub(crate) fn at(path: &str, message: impl std::fmt::Display) -> Self {
        RequestError {
            message: format!("{path}: {message}"),
        }
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RequestError {}

/// Claude Code's first system block: changes on every request and means nothing to the model.
const BILLING_HEADER_PREFIX: &str = "x-anthropic-billing-header:";
/// Prefix that makes a failed tool call visible to the model (`tool_result.is_error`).
pub const TOOL_ERROR_PREFIX: &str = "Error: ";
/// Stands in for images moved out of a tool result into the following user message.
const MOVED_IMAGE_NOTE: &str = "[image attached in the next message]";

impl Translated {
    /// The upstream body as JSON (tests, debugging).
    pub fn body(&self) -> Value {
        to_value(&self.chat)
    }
}

pub fn translate_request(body: &[u8], opts: &TranslateOptions) -> Result<Translated, RequestError> {
    translate_object(&parse_body(body)?, opts)
}

/// The request body as a JSON object: the one parse of the request's bytes.
pub fn parse_body(body: &[u8]) -> Result<Map<String, Value>, RequestError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(RequestError {
            message: "request body must be a JSON object".into(),
        }),
        Err(e) => Err(RequestError {
            message: format!("request body is not valid JSON: {e}"),
        }),
    }
}

/// Translates a parsed request body (`parse_body`).
pub fn translate_object(
    obj: &Map<String, Value>,
    opts: &TranslateOptions,
) -> Result<Translated, RequestError> {
    let req = request_from(obj)?;
    // Required by the Messages API (count_tokens does not take it, so parse_request cannot insist).
    match req.max_tokens {
        None => return Err(RequestError::at("max_tokens", "field required")),
        Some(0) => return Err(RequestError::at("max_tokens", "must be at least 1")),
        Some(_) => {}
    }
    let conv = Conversion::new(&req, opts)?;
    let client_stream = req.stream.unwrap_or(false);
    let stop_sequences: Vec<String> = req
        .stop_sequences
        .iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .cloned()
        .collect();
    let ctx = ResponseContext {
        client_model: req.model.clone(),
        message_id: new_message_id(),
        stop_sequences,
        forced_tool: conv.forced_tool.clone(),
        single_tool_call: conv.parallel_tool_calls == Some(false),
    };
    let chat = ChatRequest {
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        // Stop sequences are matched by the stream translator, never sent: an upstream that
        // stops on them swallows the word and we could not report `stop_sequence`.
        stream: Some(true),
        stream_options: Some(StreamOptions {
            include_usage: true,
        }),
        return_progress: opts.llama_cpp.then_some(true),
        ..conv.into_chat(opts)
    };
    Ok(Translated {
        chat,
        client_stream,
        ctx,
    })
}

/// The same conversion without the sampling/stream fields, for exact count_tokens via the
/// upstream's /apply-template + /tokenize.
pub fn translate_for_count(body: &[u8], opts: &TranslateOptions) -> Result<Value, RequestError> {
    count_object(&parse_body(body)?, opts)
}

/// `translate_for_count` of a parsed request body.
pub fn count_object(
    obj: &Map<String, Value>,
    opts: &TranslateOptions,
) -> Result<Value, RequestError> {
    let req = request_from(obj)?;
    let conv = Conversion::new(&req, opts)?;
    Ok(to_value(&conv.into_chat(opts)))
}

fn to_value(chat: &ChatRequest) -> Value {
    // Serializing plain structs of strings/numbers/Values cannot fail.
    serde_json::to_value(chat).unwrap_or(Value::Null)
}

fn request_from(obj: &Map<String, Value>) -> Result<MessagesRequest, RequestError> {
    for required in ["model", "messages"] {
        if !obj.contains_key(required) {
            return Err(RequestError::at(required, "field required"));
        }
    }
    // Deserialize field by field so a type error names its field.
    let mut req = MessagesRequest {
        model: String::new(),
        messages: Vec::new(),
        system: None,
        max_tokens: None,
        stop_sequences: None,
        stream: None,
        temperature: None,
        top_p: None,
        top_k: None,
        tools: None,
        tool_choice: None,
        thinking: None,
    };
    for (key, value) in obj {
        let k = key.as_str();
        match k {
            "model" => req.model = field(value, k)?,
            "messages" => req.messages = field(value, k)?,
            "system" => req.system = opt_field(value, k)?,
            "max_tokens" => req.max_tokens = opt_field(value, k)?,
            "stop_sequences" => req.stop_sequences = opt_field(value, k)?,
            "stream" => req.stream = opt_field(value, k)?,
            "temperature" => req.temperature = opt_field(value, k)?,
            "top_p" => req.top_p = opt_field(value, k)?,
            "top_k" => req.top_k = opt_field(value, k)?,
            "tools" => req.tools = opt_field(value, k)?,
            "tool_choice" => req.tool_choice = opt_field(value, k)?,
            "thinking" => req.thinking = opt_field(value, k)?,
            // Everything else (metadata, context_management, output_config, betas, container,
            // mcp_servers, service_tier, ...) is dropped: never forwarded upstream.
            _ => {}
        }
    }
    if req.messages.is_empty() {
        return Err(RequestError::at(
            "messages",
            "at least one message is required",
        ));
    }
    Ok(req)
}

/// One message, with errors that name the message's own field (`messages.2.role: ...`).
fn message_at(value: &Value, path: &str) -> Result<Message, RequestError> {
    let Some(obj) = value.as_object() else {
        return Err(RequestError::at(
            path,
            "must be an object with role and content",
        ));
    };
    let get = |name: &str| {
        obj.get(name)
            .ok_or_else(|| RequestError::at(&format!("{path}.{name}"), "field required"))
    };
    Ok(Message {
        role: field(get("role")?, &format!("{path}.role"))?,
        content: get("content")?.clone(),
    })
}

fn field<T: DeserializeOwned>(v: &Value, path: &str) -> Result<T, RequestError> {
    T::deserialize(v).map_err(|e| RequestError::at(path, e))
}

fn opt_field<T: DeserializeOwned>(v: &Value, path: &str) -> Result<Option<T>, RequestError> {
    if v.is_null() {
        return Ok(None);
    }
    field(v, path).map(Some)
}

/// A content block, parsed with an error that names its path and, for unknown types, the type.
fn parse_block(v: &Value, path: &str) -> Result<ContentBlock, RequestError> {
    let kind = v.get("type").and_then(Value::as_str);
    match kind {
        None => Err(RequestError::at(
            &format!("{path}.type"),
            "missing content block type",
        )),
        Some(t) if !KNOWN_BLOCK_TYPES.contains(&t) => Err(RequestError::at(
            &format!("{path}.type"),
            format!("unknown content block type '{t}'"),
        )),
        Some(_) => field(v, path),
    }
}

pub(crate) fn new_message_id() -> String {
    new_id("msg_")
}

/// `{prefix}llmctl_` and 28 hex digits: the time in ns (16), the pid (8), a per-process counter (4), written
/// by hand (`format!` with padded hex cost ~1,700 instructions, twice per request).
pub(crate) fn new_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // The pid never changes: asked once, not in a system call per request.
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    id_of(prefix, nanos, *PID.get_or_init(std::process::id), n)
}

fn id_of(prefix: &str, nanos: u64, pid: u32, n: u64) -> String {
    let mut id = String::with_capacity(prefix.len() + 7 + 28);
    id.push_str(prefix);
    id.push_str("llmctl_");
    let mut hex = |value: u64, digits: u32| {
        for shift in (0..digits).rev() {
            let d = (value >> (shift * 4)) & 0xf;
            id.push(char::from_digit(d as u32, 16).unwrap_or('0'));
        }
    };
    hex(nanos, 16);
    hex(u64::from(pid), 8);
    hex(n & 0xffff, 4);
    id
}

#[cfg(test)]
#[test]
fn ids_are_written_as_format_wrote_them() {
    for (nanos, pid, n) in [
        (0, 0, 0),
        (1_795_585_243_123_456_789, 4_242, 7),
        (u64::MAX, u32::MAX, u64::MAX),
        (0xabc, 0x1_0000, 0x1_2345),
    ] {
        assert_eq!(
            id_of("msg_", nanos, pid, n),
            format!("msg_llmctl_{nanos:016x}{pid:08x}{:04x}", n & 0xffff)
        );
    }
}

/// The parts of the chat request that both `translate_request` and `translate_for_count` need.
struct Conversion {
    messages: Vec<ChatMessage>,
    tools: Option<Vec<FunctionTool>>,
    tool_choice: Option<&'static str>,
    parallel_tool_calls: Option<bool>,
    forced_tool: Option<String>,
    thinking: Option<(bool, Option<u64>)>,
}

impl Conversion {
    fn new(req: &MessagesRequest, _opts: &TranslateOptions) -> Result<Self, RequestError> {
        let mut messages = Vec::new();
        if let Some(system) = system_prompt(req.system.as_ref()) {
            messages.push(ChatMessage::System { content: system });
        }
        convert_messages(&req.messages, &mut messages)?;
        let mut referenced = referenced_tools(&req.messages);
        if let Some(ToolChoice::Tool { name, .. }) = &req.tool_choice
            && !referenced.contains(name)
        {
            referenced.push(name.clone());
        }
        let (tools, dropped) = convert_tools(req.tools.as_deref(), &referenced)?;
        let choice = resolve_tool_choice(req.tool_choice.as_ref(), tools, &dropped)?;
        let thinking = req.thinking.as_ref().map(|t| match t {
            Thinking::Enabled { budget_tokens } => (true, *budget_tokens),
            Thinking::Adaptive {} => (true, None),
            Thinking::Disabled {} => (false, None),
        });
        Ok(Conversion {
            messages,
            tools: choice.tools,
            tool_choice: choice.tool_choice,
            parallel_tool_calls: choice.parallel_tool_calls,
            forced_tool: choice.forced_tool,
            thinking,
        })
    }

    fn into_chat(self, opts: &TranslateOptions) -> ChatRequest {
        let (kwargs, budget) = match (opts.llama_cpp, self.thinking) {
            (true, Some((enabled, budget))) => (
                Some(ChatTemplateKwargs {
                    enable_thinking: enabled,
                }),
                budget.filter(|_| enabled),
            ),
            _ => (None, None),
        };
        ChatRequest {
            model: opts.upstream_model.clone(),
            messages: self.messages,
            tools: self.tools,
            tool_choice: self.tool_choice,
            parallel_tool_calls: self.parallel_tool_calls,
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            chat_template_kwargs: kwargs,
            reasoning_budget_tokens: budget,
            response_format: None,
            stream: None,
            stream_options: None,
            return_progress: None,
        }
    }
}

/// `system` as a string or text blocks, joined with "\n"; Claude Code's billing line dropped.
fn system_prompt(system: Option<&System>) -> Option<String> {
    let text = match system? {
        System::Text(s) => s.clone(),
        System::Blocks(blocks) => {
            let texts: Vec<&str> = blocks
                .iter()
                .map(|SystemBlock::Text { text }| text.as_str())
                .filter(|t| !t.starts_with(BILLING_HEADER_PREFIX))
                .collect();
            texts.join("\n")
        }
    };
    (!text.is_empty()).then_some(text)
}

/// Joins two texts with a "\n" unless the first already ends a line (Claude Code's
/// `<system-reminder>` blocks end in "\n\n"), so blocks never run together mid-word.
pub(crate) fn push_text(acc: &mut String, text: &str) {
    if !acc.is_empty() && !acc.ends_with('\n') && !text.is_empty() {
        acc.push('\n');
    }
    acc.push_str(text);
}

/// Builds the user parts of one turn: consecutive texts merged, images kept as image parts.
#[derive(Default)]
pub(crate) struct UserParts {
    parts: Vec<ContentPart>,
}

impl UserParts {
    pub(crate) fn text(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if let Some(ContentPart::Text { text: last }) = self.parts.last_mut() {
            push_text(last, text);
        } else {
            self.parts.push(ContentPart::Text {
                text: text.to_string(),
            });
        }
    }
    pub(crate) fn image(&mut self, url: String) {
        self.parts.push(ContentPart::ImageUrl {
            image_url: ImageUrl { url },
        });
    }
    fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }
    fn into_content(mut self) -> UserContent {
        match self.parts.as_slice() {
            [ContentPart::Text { .. }] => match self.parts.pop() {
                Some(ContentPart::Text { text }) => UserContent::Text(text),
                _ => UserContent::Parts(Vec::new()),
            },
            _ => UserContent::Parts(self.parts),
        }
    }
}

fn image_url(source: &ImageSource, path: &str) -> Result<String, RequestError> {
    match source {
        ImageSource::Base64 { media_type, data } => Ok(format!("data:{media_type};base64,{data}")),
        ImageSource::Url { url } => Ok(url.clone()),
        ImageSource::File { .. } => Err(RequestError::at(
            &format!("{path}.source"),
            "file sources need Anthropic's Files API, which serve-proxy does not have; send the image as base64 or url",
        )),
    }
}

fn document_text(
    source: &DocumentSource,
    title: Option<&str>,
    context: Option<&str>,
    path: &str,
    parts: &mut UserParts,
) -> Result<(), RequestError> {
    let mut header = String::new();
    if let Some(t) = title {
        push_text(&mut header, &format!("Document: {t}"));
    }
    if let Some(c) = context {
        push_text(&mut header, c);
    }
    parts.text(&header);
    match source {
        DocumentSource::Text { data, .. } => parts.text(data),
        DocumentSource::Content { content } => match content {
            DocumentContent::Text(s) => parts.text(s),
            DocumentContent::Blocks(blocks) => {
                for (i, b) in blocks.iter().enumerate() {
                    let bpath = format!("{path}.source.content.{i}");
                    match parse_block(b, &bpath)? {
                        ContentBlock::Text { text } => parts.text(&text),
                        ContentBlock::Image { source } => parts.image(image_url(&source, &bpath)?),
                        _ => {
                            return Err(RequestError::at(
                                &format!("{bpath}.type"),
                                "a document's content may only hold text and image blocks",
                            ));
                        }
                    }
                }
            }
        },
        DocumentSource::Base64 { media_type } => {
            return Err(RequestError::at(
                &format!("{path}.source"),
                format!(
                    "{media_type} documents are not supported by serve-proxy (the upstream has no PDF reader); extract the text and send it as a text document"
                ),
            ));
        }
        DocumentSource::Url { .. } | DocumentSource::File { .. } => {
            return Err(RequestError::at(
                &format!("{path}.source"),
                "url and file documents are not supported by serve-proxy; send the text as a text document",
            ));
        }
    }
    Ok(())
}

/// Tool result content: text (joined), with images moved out to the following user message.
fn tool_result_text(
    content: Option<&ToolResultContent>,
    path: &str,
    moved_images: &mut Vec<String>,
) -> Result<String, RequestError> {
    let mut text = String::new();
    match content {
        None => {}
        Some(ToolResultContent::Text(s)) => text.push_str(s),
        Some(ToolResultContent::Blocks(blocks)) => {
            for (i, b) in blocks.iter().enumerate() {
                let bpath = format!("{path}.content.{i}");
                match parse_block(b, &bpath)? {
                    ContentBlock::Text { text: t } => push_text(&mut text, &t),
                    ContentBlock::Image { source } => {
                        moved_images.push(image_url(&source, &bpath)?);
                        push_text(&mut text, MOVED_IMAGE_NOTE);
                    }
                    ContentBlock::Document {
                        source,
                        title,
                        context,
                    } => {
                        let mut parts = UserParts::default();
                        document_text(
                            &source,
                            title.as_deref(),
                            context.as_deref(),
                            &bpath,
                            &mut parts,
                        )?;
                        for p in parts.parts {
                            match p {
                                ContentPart::Text { text: t } => push_text(&mut text, &t),
                                ContentPart::ImageUrl { image_url } => {
                                    moved_images.push(image_url.url);
                                    push_text(&mut text, MOVED_IMAGE_NOTE);
                                }
                            }
                        }
                    }
                    ContentBlock::SearchResult {
                        source,
                        title,
                        content,
                    } => push_text(
                        &mut text,
                        &search_result_text(&source, title.as_deref(), &content),
                    ),
                    ContentBlock::ToolReference { tool_name } => {
                        push_text(&mut text, &tool_loaded_text(&tool_name))
                    }
                    ContentBlock::ToolSearchToolResult {} | ContentBlock::ToolAddition {} => {}
                    _ => {
                        return Err(RequestError::at(
                            &format!("{bpath}.type"),
                            "a tool_result may only hold text, image, document and search_result blocks",
                        ));
                    }
                }
            }
        }
    }
    Ok(text)
}

fn search_result_text(
    source: &str,
    title: Option<&str>,
    content: &[super::anthropic::TextOnly],
) -> String {
    let mut text = String::new();
    if let Some(t) = title {
        push_text(&mut text, t);
    }
    push_text(&mut text, &format!("Source: {source}"));
    for super::anthropic::TextOnly::Text { text: t } in content {
        push_text(&mut text, t);
    }
    text
}

/// Converts `messages`, appending to `out` (which may already hold the system prompt).
///
/// Folding rules (documented in docs/proxy.md, "Prompt shaping"):
/// - `role: "system"` entries before the first user/assistant message join the leading system
///   message; later ones become user text wrapped in `<system-reminder>` tags *in place*, so
///   content never moves between turns (a prompt that only grows stays a prefix-extension).
/// - consecutive messages of the same role are merged (strict-alternation templates).
/// - a user turn's `tool_result`s become `role: tool` messages right after the assistant turn,
///   in the order of its tool_calls, before the remaining user text and images.
fn convert_messages(raw: &[Value], out: &mut Vec<ChatMessage>) -> Result<(), RequestError> {
    for (i, value) in raw.iter().enumerate() {
        let path = format!("messages.{i}");
        let msg = message_at(value, &path)?;
        match msg.role {
            Role::System => {
                let text = system_message_text(&msg.content, &path)?;
                let only_system_so_far =
                    out.iter().all(|m| matches!(m, ChatMessage::System { .. }));
                if only_system_so_far {
                    match out.first_mut() {
                        Some(ChatMessage::System { content }) => push_text(content, &text),
                        _ => out.push(ChatMessage::System { content: text }),
                    }
                } else {
                    let mut parts = UserParts::default();
                    parts.text(&format!("<system-reminder>\n{text}\n</system-reminder>"));
                    push_user(out, parts);
                }
            }
            Role::User => convert_user(&msg.content, &path, out)?,
            Role::Assistant => convert_assistant(&msg.content, &path, out)?,
        }
    }
    Ok(())
}

fn system_message_text(content: &Value, path: &str) -> Result<String, RequestError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut text = String::new();
            for (j, b) in blocks.iter().enumerate() {
                let bpath = format!("{path}.content.{j}");
                match parse_block(b, &bpath)? {
                    ContentBlock::Text { text: t } => push_text(&mut text, &t),
                    _ => {
                        return Err(RequestError::at(
                            &format!("{bpath}.type"),
                            "a system message may only hold text blocks",
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(RequestError::at(
            &format!("{path}.content"),
            "expected a string or an array of content blocks",
        )),
    }
}

fn content_blocks(content: &Value, path: &str) -> Result<Vec<ContentBlock>, RequestError> {
    match content {
        Value::String(s) => Ok(vec![ContentBlock::Text { text: s.clone() }]),
        Value::Array(blocks) => blocks
            .iter()
            .enumerate()
            .map(|(j, b)| parse_block(b, &format!("{path}.content.{j}")))
            .collect(),
        _ => Err(RequestError::at(
            &format!("{path}.content"),
            "expected a string or an array of content blocks",
        )),
    }
}

/// Appends user parts, merging into a directly preceding user message.
pub(crate) fn push_user(out: &mut Vec<ChatMessage>, parts: UserParts) {
    if parts.is_empty() {
        return;
    }
    if let Some(ChatMessage::User { content }) = out.last_mut() {
        let mut merged = UserParts::default();
        match std::mem::replace(content, UserContent::Text(String::new())) {
            UserContent::Text(t) => merged.text(&t),
            UserContent::Parts(p) => merged.parts = p,
        }
        for p in parts.parts {
            match p {
                ContentPart::Text { text } => merged.text(&text),
                img => merged.parts.push(img),
            }
        }
        *content = merged.into_content();
    } else {
        out.push(ChatMessage::User {
            content: parts.into_content(),
        });
    }
}

fn convert_user(
    content: &Value,
    path: &str,
    out: &mut Vec<ChatMessage>,
) -> Result<(), RequestError> {
    let blocks = content_blocks(content, path)?;
    let mut parts = UserParts::default();
    let mut moved_images = Vec::new();
    // (position among the assistant's tool_calls, message)
    let mut tool_msgs: Vec<(usize, ChatMessage)> = Vec::new();
    let call_ids: Vec<String> = match out.last() {
        Some(ChatMessage::Assistant { tool_calls, .. }) => {
            tool_calls.iter().map(|c| c.id.clone()).collect()
        }
        _ => Vec::new(),
    };
    for (j, block) in blocks.into_iter().enumerate() {
        let bpath = format!("{path}.content.{j}");
        match block {
            ContentBlock::Text { text } => parts.text(&text),
            ContentBlock::Image { source } => parts.image(image_url(&source, &bpath)?),
            ContentBlock::Document {
                source,
                title,
                context,
            } => document_text(
                &source,
                title.as_deref(),
                context.as_deref(),
                &bpath,
                &mut parts,
            )?,
            ContentBlock::SearchResult {
                source,
                title,
                content,
            } => parts.text(&search_result_text(&source, title.as_deref(), &content)),
            ContentBlock::ToolReference { tool_name } => parts.text(&tool_loaded_text(&tool_name)),
            ContentBlock::ToolResult {
                tool_use_id,
                content,
                is_error,
            } => {
                let Some(pos) = call_ids.iter().position(|id| *id == tool_use_id) else {
                    return Err(RequestError::at(
                        &format!("{bpath}.tool_use_id"),
                        format!(
                            "no tool_use with id '{tool_use_id}' in the assistant message just before this one"
                        ),
                    ));
                };
                let mut text = tool_result_text(content.as_ref(), &bpath, &mut moved_images)?;
                if is_error == Some(true) {
                    text.insert_str(0, TOOL_ERROR_PREFIX);
                }
                tool_msgs.push((
                    pos,
                    ChatMessage::Tool {
                        tool_call_id: tool_use_id,
                        content: text,
                    },
                ));
            }
            ContentBlock::ToolUse { .. } | ContentBlock::Thinking { .. } => {
                return Err(RequestError::at(
                    &format!("{bpath}.type"),
                    "this block type is only allowed in assistant messages",
                ));
            }
            // Anthropic-hosted tool blocks and redacted thinking mean nothing to another model.
            _ => {}
        }
    }
    // Stable sort: results for the same call keep their order.
    tool_msgs.sort_by_key(|(pos, _)| *pos);
    let had_tool_results = !tool_msgs.is_empty();
    out.extend(tool_msgs.into_iter().map(|(_, m)| m));
    let mut all = UserParts::default();
    for url in moved_images {
        all.image(url);
    }
    for p in parts.parts {
        match p {
            ContentPart::Text { text } => all.text(&text),
            img => all.parts.push(img),
        }
    }
    if all.is_empty() && !had_tool_results && !matches!(out.last(), Some(ChatMessage::User { .. }))
    {
        // Keep the turn (empty) rather than break the user/assistant alternation.
        out.push(ChatMessage::User {
            content: UserContent::Text(String::new()),
        });
    }
    push_user(out, all);
    Ok(())
}

fn convert_assistant(
    content: &Value,
    path: &str,
    out: &mut Vec<ChatMessage>,
) -> Result<(), RequestError> {
    let blocks = content_blocks(content, path)?;
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut calls = Vec::new();
    for (j, block) in blocks.into_iter().enumerate() {
        let bpath = format!("{path}.content.{j}");
        match block {
            ContentBlock::Text { text: t } => push_text(&mut text, &t),
            ContentBlock::Thinking { thinking } => push_text(&mut reasoning, &thinking),
            ContentBlock::ToolUse { id, name, input } => calls.push(ToolCall {
                id,
                kind: "function",
                function: FunctionCall {
                    name,
                    // Compact, key order kept (preserve_order): byte-stable across turns.
                    arguments: serde_json::to_string(&input).unwrap_or_else(|_| "{}".into()),
                },
            }),
            ContentBlock::RedactedThinking {}
            | ContentBlock::ServerToolUse {}
            | ContentBlock::WebSearchToolResult {}
            | ContentBlock::WebFetchToolResult {}
            | ContentBlock::CodeExecutionToolResult {}
            | ContentBlock::BashCodeExecutionToolResult {}
            | ContentBlock::TextEditorCodeExecutionToolResult {}
            | ContentBlock::McpToolUse {}
            | ContentBlock::McpToolResult {}
            | ContentBlock::ToolSearchToolResult {} => {}
            _ => {
                return Err(RequestError::at(
                    &format!("{bpath}.type"),
                    "assistant messages may only hold text, thinking, redacted_thinking and tool_use blocks",
                ));
            }
        }
    }
    if let Some(ChatMessage::Assistant {
        content,
        reasoning_content,
        tool_calls,
    }) = out.last_mut()
    {
        // Merge into the previous assistant turn (strict-alternation templates).
        if !text.is_empty() {
            push_text(content.get_or_insert_with(String::new), &text);
        }
        if !reasoning.trim().is_empty() {
            push_text(
                reasoning_content.get_or_insert_with(String::new),
                &reasoning,
            );
        }
        tool_calls.extend(calls);
        return Ok(());
    }
    out.push(ChatMessage::Assistant {
        // Content is always present (possibly empty): some templates index it unconditionally.
        content: Some(text),
        reasoning_content: (!reasoning.trim().is_empty()).then_some(reasoning),
        tool_calls: calls,
    });
    Ok(())
}

/// What the model reads where a `tool_reference` block was: the tool's definition itself is in the
/// upstream's tool list from this request on.
fn tool_loaded_text(name: &str) -> String {
    format!("Tool {name} is loaded and can be called now.")
}

/// Deferred tools the conversation has loaded, in the order it first names them: `tool_reference` blocks
/// (top level or inside a `tool_result`, Claude Code's ToolSearch) and server tool-search results. The
/// history only grows, so this order, and with it the upstream tool list, is the same on every later turn.
fn referenced_tools(messages: &[Value]) -> Vec<String> {
    fn visit(block: &Value, out: &mut Vec<String>) {
        let mut add = |name: Option<&str>| {
            if let Some(n) = name
                && !out.iter().any(|o| o == n)
            {
                out.push(n.to_string());
            }
        };
        match block.get("type").and_then(Value::as_str) {
            Some("tool_reference") => add(block.get("tool_name").and_then(Value::as_str)),
            Some("tool_search_tool_result") => {
                let refs = block
                    .pointer("/content/tool_references")
                    .and_then(Value::as_array);
                for r in refs.into_iter().flatten() {
                    add(r.get("tool_name").and_then(Value::as_str));
                }
            }
            Some("tool_result") => {
                if let Some(Value::Array(inner)) = block.get("content") {
                    inner.iter().for_each(|b| visit(b, out));
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for m in messages {
        if let Some(Value::Array(blocks)) = m.get("content") {
            blocks.iter().for_each(|b| visit(b, &mut out));
        }
    }
    out
}

/// Tools that survive translation: client tools with an input schema. Server tools (a `type`
/// other than "custom": web_search_*, bash_*, text_editor_*, code_execution_*, web_fetch_*...)
/// run on Anthropic's side and cannot be offered to another model.
///
/// Deferred tools (`defer_loading: true`) stay out until `referenced` (the conversation's
/// `tool_reference`s) names them, and then come after every other tool, in the order they were
/// loaded: the templates render tools at the head of the prompt, so a loaded tool appended last leaves
/// the system prompt and the earlier tools byte-identical and llama.cpp's cached prefix reusable up to
/// that point. Placeholders that are never referenced (Claude Code's `DeferredToolPlaceholder`) are never
/// offered.
/// Returns the function tools and the names of the dropped server tools.
fn convert_tools(
    raw: Option<&[Value]>,
    referenced: &[String],
) -> Result<(Vec<FunctionTool>, Vec<String>), RequestError> {
    let mut tools = Vec::new();
    let mut deferred = Vec::new();
    let mut dropped = Vec::new();
    for (i, value) in raw.unwrap_or_default().iter().enumerate() {
        let path = format!("tools.{i}");
        let tool: Tool = field(value, &path)?;
        let server_tool = tool.kind.as_deref().is_some_and(|k| k != "custom");
        if server_tool {
            tracing::debug!(tool = %tool.name, "dropping Anthropic server tool");
            dropped.push(tool.name);
            continue;
        }
        let Some(schema) = tool.input_schema.as_ref() else {
            return Err(RequestError::at(
                &format!("{path}.input_schema"),
                "field required",
            ));
        };
        let function = FunctionTool {
            kind: "function",
            function: FunctionDef {
                name: tool.name,
                description: tool.description,
                parameters: clean_input_schema(schema),
            },
        };
        if tool.defer_loading == Some(true) {
            deferred.push(function);
        } else {
            tools.push(function);
        }
    }
    for name in referenced {
        if let Some(pos) = deferred.iter().position(|t| t.function.name == *name) {
            tools.push(deferred.remove(pos));
        }
    }
    if !deferred.is_empty() {
        tracing::debug!(
            count = deferred.len(),
            "deferred tools not loaded yet: not offered"
        );
    }
    Ok((tools, dropped))
}

struct ToolChoiceResolved {
    tools: Option<Vec<FunctionTool>>,
    tool_choice: Option<&'static str>,
    parallel_tool_calls: Option<bool>,
    forced_tool: Option<String>,
}

fn resolve_tool_choice(
    choice: Option<&ToolChoice>,
    mut tools: Vec<FunctionTool>,
    dropped: &[String],
) -> Result<ToolChoiceResolved, RequestError> {
    let names_dropped_tool =
        matches!(choice, Some(ToolChoice::Tool { name, .. }) if dropped.contains(name));
    if tools.is_empty() || names_dropped_tool {
        // No tool left (none sent, or only server tools): never a tool_choice without tools, nor
        // one forcing a tool the upstream cannot have; the model answers in text instead.
        return Ok(ToolChoiceResolved {
            tools: (!tools.is_empty()).then_some(tools),
            tool_choice: None,
            parallel_tool_calls: None,
            forced_tool: None,
        });
    }
    let parallel = choice
        .is_some_and(ToolChoice::disable_parallel)
        .then_some(false);
    let mut forced_tool = None;
    let tool_choice = match choice {
        None => None,
        Some(ToolChoice::Auto { .. }) => Some("auto"),
        Some(ToolChoice::Any { .. }) => Some("required"),
        Some(ToolChoice::None {}) => Some("none"),
        Some(ToolChoice::Tool { name, .. }) => {
            match tools.iter().position(|t| t.function.name == *name) {
                // Narrow to the one tool: "required" then can only produce that tool, even
                // from an upstream that does not understand a named tool_choice.
                Some(pos) => {
                    let keep = tools.swap_remove(pos);
                    tools = vec![keep];
                    forced_tool = Some(name.clone());
                    Some("required")
                }
                None => {
                    return Err(RequestError::at(
                        "tool_choice.name",
                        format!("tool '{name}' is not among the client tools in 'tools'"),
                    ));
                }
            }
        }
    };
    Ok(ToolChoiceResolved {
        tools: Some(tools),
        tool_choice,
        parallel_tool_calls: parallel,
        forced_tool,
    })
}

#[cfg(test)]
mod tests;
