//! Anthropic Messages API request wire types (what clients such as Claude Code send).
//!
//! Only the fields llmctl acts on are modelled; serde ignores every other key, so unknown or
//! Anthropic-only fields (`metadata`, `context_management`, `output_config`, `cache_control`...) can
//! never leak into the upstream request. Content blocks are parsed one at a time by
//! `translate.rs` so an error can name the exact path (`messages.2.content.0.type`).

use serde::Deserialize;
use serde_json::Value;

/// The top-level body of `POST /v1/messages` (and `/v1/messages/count_tokens`).
#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    pub model: String,
    /// Parsed per message in `translate.rs` (path-aware errors).
    pub messages: Vec<Value>,
    #[serde(default)]
    pub system: Option<System>,
    /// Required by Anthropic for /v1/messages, absent for count_tokens: optional here.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<u64>,
    /// Parsed per tool in `translate.rs`.
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default)]
    pub thinking: Option<Thinking>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum System {
    Text(String),
    Blocks(Vec<SystemBlock>),
}

/// A system prompt block. Anthropic only allows `text` here.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SystemBlock {
    Text { text: String },
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
    /// Not in Anthropic's public schema, but Claude Code sends one (`mid-conversation-system` beta).
    System,
}

/// Every block type a request may carry. Types Anthropic defines but llmctl never produces
/// (server tool results, MCP, containers) are accepted and dropped; see `translate.rs`.
pub const KNOWN_BLOCK_TYPES: &[&str] = &[
    "text",
    "image",
    "document",
    "search_result",
    "tool_use",
    "tool_result",
    "thinking",
    "redacted_thinking",
    "server_tool_use",
    "web_search_tool_result",
    "web_fetch_tool_result",
    "code_execution_tool_result",
    "bash_code_execution_tool_result",
    "text_editor_code_execution_tool_result",
    "mcp_tool_use",
    "mcp_tool_result",
    "container_upload",
    // Tool search (beta advanced-tool-use-2025-11-20 / mid-conversation-tool-changes-2026-07-01).
    "tool_reference",
    "tool_search_tool_result",
    "tool_addition",
];

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentBlock {
    Text {
        text: String,
    },
    Image {
        source: ImageSource,
    },
    Document {
        source: DocumentSource,
        #[serde(default)]
        title: Option<String>,
        #[serde(default)]
        context: Option<String>,
    },
    SearchResult {
        source: String,
        #[serde(default)]
        title: Option<String>,
        content: Vec<TextOnly>,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(default)]
        content: Option<ToolResultContent>,
        #[serde(default)]
        is_error: Option<bool>,
    },
    Thinking {
        thinking: String,
    },
    RedactedThinking {},
    ServerToolUse {},
    WebSearchToolResult {},
    WebFetchToolResult {},
    CodeExecutionToolResult {},
    BashCodeExecutionToolResult {},
    TextEditorCodeExecutionToolResult {},
    McpToolUse {},
    McpToolResult {},
    ContainerUpload {},
    /// Names a deferred tool whose definition the model may now use (Claude Code's ToolSearch result).
    ToolReference {
        tool_name: String,
    },
    /// Anthropic's server-side tool search result; its references are read by `translate.rs`.
    ToolSearchToolResult {},
    ToolAddition {},
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TextOnly {
    Text { text: String },
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImageSource {
    Base64 { media_type: String, data: String },
    Url { url: String },
    File { file_id: String },
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DocumentSource {
    Text {
        #[serde(default)]
        media_type: Option<String>,
        data: String,
    },
    Base64 {
        media_type: String,
    },
    Url {
        url: String,
    },
    Content {
        content: DocumentContent,
    },
    File {
        file_id: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum DocumentContent {
    Text(String),
    Blocks(Vec<Value>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ToolResultContent {
    Text(String),
    Blocks(Vec<Value>),
}

/// A client tool. Server tools (`web_search_20250305`, `bash_20250124`...) carry a `type` other
/// than `custom` and no `input_schema`; `translate.rs` drops them.
#[derive(Debug, Deserialize)]
pub struct Tool {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub input_schema: Option<Value>,
    /// Tool search: the definition is withheld from the model until a `tool_reference` names it.
    #[serde(default)]
    pub defer_loading: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToolChoice {
    Auto {
        #[serde(default)]
        disable_parallel_tool_use: Option<bool>,
    },
    Any {
        #[serde(default)]
        disable_parallel_tool_use: Option<bool>,
    },
    Tool {
        name: String,
        #[serde(default)]
        disable_parallel_tool_use: Option<bool>,
    },
    None {},
}

impl ToolChoice {
    pub fn disable_parallel(&self) -> bool {
        match self {
            ToolChoice::Auto {
                disable_parallel_tool_use,
            }
            | ToolChoice::Any {
                disable_parallel_tool_use,
            }
            | ToolChoice::Tool {
                disable_parallel_tool_use,
                ..
            } => disable_parallel_tool_use.unwrap_or(false),
            ToolChoice::None {} => false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Thinking {
    Enabled {
        #[serde(default)]
        budget_tokens: Option<u64>,
    },
    Adaptive {},
    Disabled {},
}
