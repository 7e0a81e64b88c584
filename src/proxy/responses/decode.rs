//! OpenAI Responses request → the chat request llmctl sends upstream, parsed once.
//!
//! Pure: bytes in, a typed `ChatRequest` out, with errors naming the JSON path (`input[3].call_id`). The rules
//! and why are in `docs/proxy.md` (the Responses table); the ones that shape the prompt keep turn N+1's prompt an
//! extension of turn N's, byte for byte, as on the Messages side (Codex resends the whole history every turn).

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use crate::proxy::openai::{
    ChatMessage, ChatRequest, ChatTemplateKwargs, FunctionCall, FunctionDef, FunctionTool,
    StreamOptions, ToolCall,
};
use crate::proxy::schema::clean_input_schema;
use crate::proxy::translate::{
    RequestError, ResponseContext, TranslateOptions, UserParts, new_id, push_text, push_user,
};

/// Marks the reasoning text llmctl put in a reasoning item's `encrypted_content` (asked for with
/// `include: ["reasoning.encrypted_content"]`), so a replayed item gives the model its own reasoning back.
pub const REASONING_PREFIX: &str = "llmctl-reasoning:";

/// Joins a namespace and a tool name for the upstream, which has no namespaces: `multi_agent_v1__spawn_agent`.
pub const NAMESPACE_SEPARATOR: &str = "__";

/// What a tool the upstream knows by one flat name is to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientTool {
    Function {
        namespace: Option<String>,
        name: String,
    },
    /// A freeform tool (`apply_patch`): offered upstream as a function with one string argument, `input`.
    Custom { name: String },
}

/// Upstream name → client tool, for the encoder to turn a call back into what the client offered.
#[derive(Debug, Clone, Default)]
pub struct ToolNames(HashMap<String, ClientTool>);

impl ToolNames {
    pub fn get(&self, upstream_name: &str) -> Option<&ClientTool> {
        self.0.get(upstream_name)
    }
}

/// What the encoder needs to know about the request.
#[derive(Debug, Clone, Default)]
pub struct ResponseMeta {
    pub id: String,
    pub model: String,
    pub created_at: u64,
    pub tools: ToolNames,
    /// `include` asked for `reasoning.encrypted_content`.
    pub include_encrypted: bool,
    /// Request fields echoed in every response object, as OpenAI does (tool_choice, temperature, …).
    pub echo: Map<String, Value>,
}

pub struct Decoded {
    pub chat: ChatRequest,
    pub client_stream: bool,
    /// For the stream translator (forced tool, one call only).
    pub ctx: ResponseContext,
    pub meta: ResponseMeta,
    /// Kept for cache affinity (the router's key); never forwarded.
    pub prompt_cache_key: Option<String>,
}

/// Fields that need server-side state llmctl does not keep: a clear 400 instead of a wrong answer.
const STATEFUL_FIELDS: &[(&str, &str)] = &[
    (
        "previous_response_id",
        "is not supported: llmctl serve-proxy stores no responses (it answers as with store: false); send the whole conversation in input, as Codex does",
    ),
    (
        "conversation",
        "is not supported: llmctl serve-proxy keeps no conversations; send the whole conversation in input",
    ),
    (
        "prompt",
        "is not supported: reusable prompts live on OpenAI's platform; send instructions and input instead",
    ),
];

/// Item types of OpenAI's hosted tools: results of tools that ran on OpenAI's side, meaningless to another
/// model. Skipped (they can only appear in a history that came from OpenAI).
const HOSTED_ITEMS: &[&str] = &[
    "web_search_call",
    "file_search_call",
    "computer_call",
    "computer_call_output",
    "image_generation_call",
    "code_interpreter_call",
    "mcp_call",
    "mcp_list_tools",
    "mcp_approval_request",
    "mcp_approval_response",
    "local_shell_call",
    "local_shell_call_output",
    "tool_search_call",
    "tool_search_output",
    "compaction",
];

pub fn decode_request(body: &[u8], opts: &TranslateOptions) -> Result<Decoded, RequestError> {
    decode_object(&parse_body(body)?, opts)
}

/// The request body as a JSON object: the one parse of the request's bytes.
pub fn parse_body(body: &[u8]) -> Result<Map<String, Value>, RequestError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(req)) => Ok(req),
        Ok(_) => Err(RequestError::at("body", "must be a JSON object")),
        Err(e) => Err(RequestError::at("body", format!("not valid JSON: {e}"))),
    }
}

/// Decodes a parsed request body (`parse_body`).
pub fn decode_object(
    req: &Map<String, Value>,
    opts: &TranslateOptions,
) -> Result<Decoded, RequestError> {
    for (field, why) in STATEFUL_FIELDS {
        if member(req, field).is_some_and(|v| !v.is_null()) {
            return Err(RequestError::at(field, why));
        }
    }
    if member(req, "background").and_then(Value::as_bool) == Some(true) {
        return Err(RequestError::at(
            "background",
            "background responses need stored responses, which llmctl serve-proxy does not keep; send background: false",
        ));
    }
    let model = match member(req, "model") {
        Some(Value::String(m)) => m.clone(),
        None | Some(Value::Null) => return Err(RequestError::at("model", "field required")),
        Some(_) => return Err(RequestError::at("model", "must be a string")),
    };
    let client_stream = opt_bool(req, "stream")?.unwrap_or(false);
    let (tools, names) = convert_tools(member(req, "tools"))?;
    let choice = resolve_tool_choice(member(req, "tool_choice"), tools)?;
    let parallel = opt_bool(req, "parallel_tool_calls")?;
    let messages = convert_input(
        member(req, "instructions"),
        member(req, "input"),
        opts.llama_cpp,
    )?;
    let max_tokens = match member(req, "max_output_tokens") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(0) => return Err(RequestError::at("max_output_tokens", "must be at least 1")),
            Some(n) => Some(n),
            None => {
                return Err(RequestError::at(
                    "max_output_tokens",
                    "must be a positive integer",
                ));
            }
        },
    };
    let temperature = opt_f64(req, "temperature")?;
    let top_p = opt_f64(req, "top_p")?;
    let (kwargs, budget) = reasoning_switch(member(req, "reasoning"), opts.llama_cpp)?;
    let response_format = text_format(member(req, "text"))?;
    let include_encrypted = match member(req, "include") {
        None | Some(Value::Null) => false,
        Some(Value::Array(items)) => items
            .iter()
            .any(|i| i.as_str() == Some("reasoning.encrypted_content")),
        Some(_) => return Err(RequestError::at("include", "must be an array of strings")),
    };
    let prompt_cache_key = member(req, "prompt_cache_key")
        .and_then(Value::as_str)
        .map(str::to_string);

    let mut echo = Map::new();
    for key in [
        "instructions",
        "max_output_tokens",
        "metadata",
        "parallel_tool_calls",
        "reasoning",
        "temperature",
        "text",
        "tool_choice",
        "top_p",
        "truncation",
    ] {
        if let Some(v) = member(req, key).filter(|v| !v.is_null()) {
            echo.insert(key.to_string(), v.clone());
        }
    }
    let id = new_id("resp_");
    let ctx = ResponseContext {
        client_model: model.clone(),
        message_id: id.clone(),
        stop_sequences: Vec::new(),
        forced_tool: choice.forced_tool.clone(),
        single_tool_call: parallel == Some(false),
    };
    let chat = ChatRequest {
        model: opts.upstream_model.clone(),
        messages,
        tools: choice.tools,
        tool_choice: choice.tool_choice,
        parallel_tool_calls: parallel.filter(|_| choice.tool_choice.is_some()),
        max_tokens,
        temperature,
        top_p,
        top_k: None,
        chat_template_kwargs: kwargs,
        reasoning_budget_tokens: budget,
        response_format,
        stream: Some(true),
        stream_options: Some(StreamOptions {
            include_usage: true,
        }),
        return_progress: opts.llama_cpp.then_some(true),
    };
    let created_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(Decoded {
        chat,
        client_stream,
        ctx,
        meta: ResponseMeta {
            id,
            model,
            created_at,
            tools: names,
            include_encrypted,
            echo,
        },
        prompt_cache_key,
    })
}

fn opt_bool(req: &Map<String, Value>, key: &str) -> Result<Option<bool>, RequestError> {
    match member(req, key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(RequestError::at(key, "must be true or false")),
    }
}

fn opt_f64(req: &Map<String, Value>, key: &str) -> Result<Option<f64>, RequestError> {
    match member(req, key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| RequestError::at(key, "must be a number")),
    }
}

/// A member of the request object, found by comparing names: a request has a few to a few dozen members,
/// and `Map::get` hashes the name with SipHash each time (~250 instructions; ~25 lookups per request).
fn member<'a>(req: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    req.iter().find_map(|(k, v)| (k == name).then_some(v))
}

fn str_at<'a>(v: &'a Value, key: &str, path: &str) -> Result<&'a str, RequestError> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => {
            Err(RequestError::at(&format!("{path}.{key}"), "field required"))
        }
        Some(_) => Err(RequestError::at(
            &format!("{path}.{key}"),
            "must be a string",
        )),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Tools

/// The upstream's function tools and the name map. `function` tools go as they are; `custom` (freeform) tools
/// become a function taking one string, `input`, the grammar (if any) quoted in its description so the model
/// knows the format; `namespace` tools are flattened to `namespace__name`; hosted tools (web_search, …) run on
/// OpenAI's side and are left out, said in the log.
fn convert_tools(raw: Option<&Value>) -> Result<(Vec<FunctionTool>, ToolNames), RequestError> {
    let mut tools = Vec::new();
    let mut names = ToolNames::default();
    let list = match raw {
        None | Some(Value::Null) => return Ok((tools, names)),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(RequestError::at("tools", "must be an array")),
    };
    let mut add = |tool: FunctionTool,
                   client: ClientTool,
                   path: &str,
                   tools: &mut Vec<FunctionTool>|
     -> Result<(), RequestError> {
        let name = tool.function.name.clone();
        if names.0.insert(name.clone(), client).is_some() {
            return Err(RequestError::at(
                path,
                format!("two tools would both be named {name:?} upstream; rename one"),
            ));
        }
        tools.push(tool);
        Ok(())
    };
    for (i, t) in list.iter().enumerate() {
        let path = format!("tools[{i}]");
        let kind = str_at(t, "type", &path)?;
        match kind {
            "function" => {
                let name = str_at(t, "name", &path)?.to_string();
                let tool = function_tool(t, &name, &path)?;
                let client = ClientTool::Function {
                    namespace: None,
                    name,
                };
                add(tool, client, &path, &mut tools)?;
            }
            "custom" => {
                let name = str_at(t, "name", &path)?.to_string();
                let tool = custom_tool(t, &name);
                add(tool, ClientTool::Custom { name }, &path, &mut tools)?;
            }
            "namespace" => {
                let ns = str_at(t, "name", &path)?.to_string();
                let Some(Value::Array(inner)) = t.get("tools") else {
                    return Err(RequestError::at(
                        &format!("{path}.tools"),
                        "must be an array of tools",
                    ));
                };
                for (j, f) in inner.iter().enumerate() {
                    let fpath = format!("{path}.tools[{j}]");
                    let name = str_at(f, "name", &fpath)?.to_string();
                    let flat = format!("{ns}{NAMESPACE_SEPARATOR}{name}");
                    let client = match f.get("type").and_then(Value::as_str) {
                        None | Some("function") => ClientTool::Function {
                            namespace: Some(ns.clone()),
                            name,
                        },
                        Some("custom") => ClientTool::Custom { name },
                        Some(other) => {
                            tracing::warn!(
                                tool = %flat,
                                kind = other,
                                "leaving out a namespace member the upstream cannot run"
                            );
                            continue;
                        }
                    };
                    let tool = match &client {
                        ClientTool::Custom { .. } => custom_tool(f, &flat),
                        ClientTool::Function { .. } => function_tool(f, &flat, &fpath)?,
                    };
                    add(tool, client, &fpath, &mut tools)?;
                }
            }
            hosted => {
                let name = t.get("name").and_then(Value::as_str).unwrap_or(hosted);
                tracing::warn!(
                    tool = name,
                    kind = hosted,
                    "leaving out a hosted tool: it runs on OpenAI's side and a local model cannot call it"
                );
            }
        }
    }
    Ok((tools, names))
}

fn function_tool(t: &Value, name: &str, path: &str) -> Result<FunctionTool, RequestError> {
    let parameters = match t.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => clean_input_schema(p),
        Some(_) => {
            return Err(RequestError::at(
                &format!("{path}.parameters"),
                "must be a JSON schema object",
            ));
        }
    };
    Ok(FunctionTool {
        kind: "function",
        function: FunctionDef {
            name: name.to_string(),
            description: t
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_string),
            parameters,
        },
    })
}

fn custom_tool(t: &Value, name: &str) -> FunctionTool {
    let mut input_doc = String::from("The tool's whole input, as raw text (not JSON).");
    if let Some(format) = t.get("format")
        && format.get("type").and_then(Value::as_str) == Some("grammar")
        && let Some(def) = format.get("definition").and_then(Value::as_str)
    {
        let syntax = format
            .get("syntax")
            .and_then(Value::as_str)
            .unwrap_or("lark");
        input_doc.push_str(&format!(" It must match this {syntax} grammar:\n{def}"));
    }
    FunctionTool {
        kind: "function",
        function: FunctionDef {
            name: name.to_string(),
            description: t
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_string),
            parameters: json!({
                "type": "object",
                "properties": {"input": {"type": "string", "description": input_doc}},
                "required": ["input"],
            }),
        },
    }
}

/// The upstream name of a tool the client names by (namespace, name).
fn upstream_name(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) if !ns.is_empty() => format!("{ns}{NAMESPACE_SEPARATOR}{name}"),
        _ => name.to_string(),
    }
}

struct Choice {
    tools: Option<Vec<FunctionTool>>,
    tool_choice: Option<&'static str>,
    forced_tool: Option<String>,
}

/// `tool_choice`: "auto" | "none" | "required", or a named tool (`{"type":"function","name":…}`, `custom`, or
/// `allowed_tools`). A named tool narrows the upstream's list to that one tool with "required", which any
/// OpenAI-compatible server honours; the stream translator then keeps only that tool's call.
fn resolve_tool_choice(
    raw: Option<&Value>,
    mut tools: Vec<FunctionTool>,
) -> Result<Choice, RequestError> {
    let none = |tools: Vec<FunctionTool>| Choice {
        tools: (!tools.is_empty()).then_some(tools),
        tool_choice: None,
        forced_tool: None,
    };
    if tools.is_empty() {
        return Ok(none(tools));
    }
    let named = match raw {
        None | Some(Value::Null) => return Ok(none(tools)),
        Some(Value::String(s)) => {
            let choice = match s.as_str() {
                "auto" => "auto",
                "none" => "none",
                "required" => "required",
                other => {
                    return Err(RequestError::at(
                        "tool_choice",
                        format!("{other:?} is not one of \"auto\", \"none\", \"required\""),
                    ));
                }
            };
            return Ok(Choice {
                tools: Some(tools),
                tool_choice: Some(choice),
                forced_tool: None,
            });
        }
        Some(obj @ Value::Object(_)) => match obj.get("type").and_then(Value::as_str) {
            Some("function") | Some("custom") => {
                let name = str_at(obj, "name", "tool_choice")?;
                let ns = obj.get("namespace").and_then(Value::as_str);
                upstream_name(ns, name)
            }
            Some("allowed_tools") => {
                // Narrow to the allowed ones; mode "required" or "auto".
                let allowed: Vec<String> = obj
                    .get("tools")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|t| {
                        let name = t.get("name").and_then(Value::as_str)?;
                        Some(upstream_name(
                            t.get("namespace").and_then(Value::as_str),
                            name,
                        ))
                    })
                    .collect();
                tools.retain(|t| allowed.contains(&t.function.name));
                let mode = match obj.get("mode").and_then(Value::as_str) {
                    Some("required") => "required",
                    _ => "auto",
                };
                if tools.is_empty() {
                    return Ok(none(tools));
                }
                return Ok(Choice {
                    tools: Some(tools),
                    tool_choice: Some(mode),
                    forced_tool: None,
                });
            }
            // A hosted tool (web_search, …) was left out: the model answers without it.
            _ => return Ok(none(tools)),
        },
        Some(_) => {
            return Err(RequestError::at(
                "tool_choice",
                "must be a string or a tool object",
            ));
        }
    };
    let Some(pos) = tools.iter().position(|t| t.function.name == named) else {
        return Err(RequestError::at(
            "tool_choice.name",
            format!("tool {named:?} is not among the tools in 'tools'"),
        ));
    };
    let keep = tools.swap_remove(pos);
    Ok(Choice {
        tools: Some(vec![keep]),
        tool_choice: Some("required"),
        forced_tool: Some(named),
    })
}

// ---------------------------------------------------------------------------------------------------------
// Input items

/// `instructions` and `input` → chat messages. Leading developer/system messages join the instructions in one
/// system message (chat templates want one, first); later ones stay in place. Function and custom tool calls
/// join the assistant message before them (one assistant turn with its tool calls), their outputs become
/// `tool` messages; a reasoning item gives the next assistant message its reasoning.
fn convert_input(
    instructions: Option<&Value>,
    input: Option<&Value>,
    llama_cpp: bool,
) -> Result<Vec<ChatMessage>, RequestError> {
    let mut system = String::new();
    match instructions {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => system.push_str(s),
        Some(_) => return Err(RequestError::at("instructions", "must be a string")),
    }
    let items: Vec<Value> = match input {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![json!({"type": "message", "role": "user", "content": s})],
        Some(Value::Array(a)) => a.clone(),
        Some(_) => {
            return Err(RequestError::at(
                "input",
                "must be a string or an array of items",
            ));
        }
    };
    let mut out: Vec<ChatMessage> = Vec::new();
    let mut leading = true;
    let mut reasoning: Option<String> = None;
    for (i, item) in items.iter().enumerate() {
        let path = format!("input[{i}]");
        if !item.is_object() {
            return Err(RequestError::at(&path, "must be an item object"));
        }
        let kind = match item.get("type") {
            Some(Value::String(t)) => t.as_str(),
            // EasyInputMessage: {role, content} without a type.
            None if item.get("role").is_some() => "message",
            None => return Err(RequestError::at(&format!("{path}.type"), "field required")),
            Some(_) => {
                return Err(RequestError::at(
                    &format!("{path}.type"),
                    "must be a string",
                ));
            }
        };
        match kind {
            "message" => {
                let role = str_at(item, "role", &path)?;
                match role {
                    "developer" | "system" => {
                        let text = message_text(item, &path)?;
                        if leading {
                            if !system.is_empty() && !text.is_empty() {
                                system.push_str("\n\n");
                            }
                            system.push_str(&text);
                        } else {
                            out.push(ChatMessage::System { content: text });
                        }
                    }
                    "user" => {
                        leading = false;
                        push_user(&mut out, user_parts(item, &path)?);
                    }
                    "assistant" => {
                        leading = false;
                        let text = message_text(item, &path)?;
                        assistant(&mut out, reasoning.take(), Some(text), None);
                    }
                    other => {
                        return Err(RequestError::at(
                            &format!("{path}.role"),
                            format!(
                                "{other:?} is not one of \"user\", \"assistant\", \"developer\", \"system\""
                            ),
                        ));
                    }
                }
            }
            "function_call" => {
                leading = false;
                let name = str_at(item, "name", &path)?;
                let ns = item.get("namespace").and_then(Value::as_str);
                let call = ToolCall {
                    id: str_at(item, "call_id", &path)?.to_string(),
                    kind: "function",
                    function: FunctionCall {
                        name: upstream_name(ns, name),
                        arguments: str_at(item, "arguments", &path)?.to_string(),
                    },
                };
                assistant(&mut out, reasoning.take(), None, Some(call));
            }
            "custom_tool_call" => {
                leading = false;
                let name = str_at(item, "name", &path)?;
                let input = str_at(item, "input", &path)?;
                let ns = item.get("namespace").and_then(Value::as_str);
                let call = ToolCall {
                    id: str_at(item, "call_id", &path)?.to_string(),
                    kind: "function",
                    function: FunctionCall {
                        name: upstream_name(ns, name),
                        // What the model produced for the one-string function it was offered.
                        arguments: json!({ "input": input }).to_string(),
                    },
                };
                assistant(&mut out, reasoning.take(), None, Some(call));
            }
            "function_call_output" | "custom_tool_call_output" => {
                leading = false;
                let call_id = str_at(item, "call_id", &path)?.to_string();
                let content = tool_output(item.get("output"), &format!("{path}.output"))?;
                out.push(ChatMessage::Tool {
                    tool_call_id: call_id,
                    content,
                });
            }
            "reasoning" => {
                leading = false;
                let text = reasoning_text(item);
                if llama_cpp && !text.trim().is_empty() {
                    let acc = reasoning.get_or_insert_with(String::new);
                    push_text(acc, &text);
                }
            }
            "item_reference" => {
                return Err(RequestError::at(
                    &path,
                    "item_reference needs stored responses, which llmctl serve-proxy does not keep; send the item itself",
                ));
            }
            t if HOSTED_ITEMS.contains(&t) => {
                tracing::debug!(item = t, "skipping an item of a hosted tool");
            }
            other => {
                tracing::warn!(
                    item = other,
                    path = %path,
                    "skipping an input item of a type serve-proxy does not know"
                );
            }
        }
    }
    if !system.is_empty() {
        out.insert(0, ChatMessage::System { content: system });
    }
    Ok(out)
}

/// Adds text and/or one tool call to the assistant turn being built: merged into a directly preceding assistant
/// message (text, then its calls), else a new one.
fn assistant(
    out: &mut Vec<ChatMessage>,
    reasoning: Option<String>,
    text: Option<String>,
    call: Option<ToolCall>,
) {
    if let Some(ChatMessage::Assistant {
        content,
        reasoning_content,
        tool_calls,
    }) = out.last_mut()
        // Text after calls starts a new turn only in a history no client sends; merge all the same.
        && (text.is_none() || tool_calls.is_empty())
    {
        if let Some(t) = text.filter(|t| !t.is_empty()) {
            push_text(content.get_or_insert_with(String::new), &t);
        }
        if let Some(r) = reasoning {
            push_text(reasoning_content.get_or_insert_with(String::new), &r);
        }
        tool_calls.extend(call);
        return;
    }
    out.push(ChatMessage::Assistant {
        // Always present (possibly empty): some templates index it unconditionally.
        content: Some(text.unwrap_or_default()),
        reasoning_content: reasoning,
        tool_calls: call.into_iter().collect(),
    });
}

/// The text of a message's content: a string, or its text parts (`input_text`, `output_text`, `refusal`)
/// joined.
fn message_text(item: &Value, path: &str) -> Result<String, RequestError> {
    match item.get("content") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let ppath = format!("{path}.content[{j}]");
                match part.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => {
                        push_text(&mut text, str_at(part, "text", &ppath)?)
                    }
                    Some("refusal") => push_text(&mut text, str_at(part, "refusal", &ppath)?),
                    Some("input_image" | "input_file") => {
                        return Err(RequestError::at(
                            &format!("{ppath}.type"),
                            "images and files can only be sent in user messages",
                        ));
                    }
                    Some(other) => {
                        return Err(RequestError::at(
                            &format!("{ppath}.type"),
                            format!("unknown content part {other:?}"),
                        ));
                    }
                    None => {
                        return Err(RequestError::at(&format!("{ppath}.type"), "field required"));
                    }
                }
            }
            Ok(text)
        }
        None | Some(Value::Null) => Err(RequestError::at(
            &format!("{path}.content"),
            "field required",
        )),
        Some(_) => Err(RequestError::at(
            &format!("{path}.content"),
            "must be a string or an array of content parts",
        )),
    }
}

fn user_parts(item: &Value, path: &str) -> Result<UserParts, RequestError> {
    let mut parts = UserParts::default();
    let list = match item.get("content") {
        Some(Value::String(s)) => {
            parts.text(s);
            return Ok(parts);
        }
        Some(Value::Array(list)) => list,
        None | Some(Value::Null) => {
            return Err(RequestError::at(
                &format!("{path}.content"),
                "field required",
            ));
        }
        Some(_) => {
            return Err(RequestError::at(
                &format!("{path}.content"),
                "must be a string or an array of content parts",
            ));
        }
    };
    for (j, part) in list.iter().enumerate() {
        let ppath = format!("{path}.content[{j}]");
        match part.get("type").and_then(Value::as_str) {
            Some("input_text" | "output_text" | "text") => {
                parts.text(str_at(part, "text", &ppath)?)
            }
            Some("input_image") => match part.get("image_url").and_then(Value::as_str) {
                Some(url) => parts.image(url.to_string()),
                None if part.get("file_id").is_some_and(|f| !f.is_null()) => {
                    return Err(RequestError::at(
                        &format!("{ppath}.file_id"),
                        "file ids need OpenAI's Files API, which serve-proxy does not have; send the image as image_url (a data: URL or https URL)",
                    ));
                }
                None => {
                    return Err(RequestError::at(
                        &format!("{ppath}.image_url"),
                        "field required",
                    ));
                }
            },
            Some("input_file") => {
                return Err(RequestError::at(
                    &format!("{ppath}.type"),
                    "input_file is not supported by serve-proxy; send the file's text as input_text",
                ));
            }
            Some(other) => {
                return Err(RequestError::at(
                    &format!("{ppath}.type"),
                    format!("unknown content part {other:?}"),
                ));
            }
            None => return Err(RequestError::at(&format!("{ppath}.type"), "field required")),
        }
    }
    Ok(parts)
}

/// A tool's output: a string, or content parts whose texts are joined (a chat `tool` message holds text only;
/// an image in a tool output is named, not sent).
fn tool_output(output: Option<&Value>, path: &str) -> Result<String, RequestError> {
    match output {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let ppath = format!("{path}[{j}]");
                match part.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => {
                        push_text(&mut text, str_at(part, "text", &ppath)?)
                    }
                    Some("input_image") => push_text(&mut text, "[image omitted]"),
                    Some("input_file") => push_text(&mut text, "[file omitted]"),
                    _ => {
                        return Err(RequestError::at(
                            &format!("{ppath}.type"),
                            "must be input_text, input_image or input_file",
                        ));
                    }
                }
            }
            Ok(text)
        }
        None | Some(Value::Null) => Err(RequestError::at(path, "field required")),
        Some(_) => Err(RequestError::at(
            path,
            "must be a string or an array of content parts",
        )),
    }
}

/// A reasoning item's text: llmctl's own (in `encrypted_content`) when it carries it, else its summaries and
/// reasoning texts.
fn reasoning_text(item: &Value) -> String {
    if let Some(own) = item
        .get("encrypted_content")
        .and_then(Value::as_str)
        .and_then(|e| e.strip_prefix(REASONING_PREFIX))
    {
        return own.to_string();
    }
    let mut text = String::new();
    for key in ["content", "summary"] {
        for part in item
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(t) = part.get("text").and_then(Value::as_str) {
                push_text(&mut text, t);
            }
        }
        if !text.is_empty() {
            break;
        }
    }
    text
}

// ---------------------------------------------------------------------------------------------------------
// Sampling knobs

/// Budget tokens per `reasoning.effort`, for llama.cpp's reasoning budget (no upstream knob is finer).
fn effort_budget(effort: &str) -> Option<Option<u64>> {
    match effort {
        "none" | "minimal" => None,
        "low" => Some(Some(1024)),
        "medium" => Some(Some(4096)),
        "high" => Some(Some(16384)),
        _ => Some(None), // "xhigh" and anything newer: no limit
    }
}

/// `reasoning.effort` → llama.cpp's thinking switch and budget (other upstreams get neither: they have no
/// standard knob). No effort given: the server's default.
fn reasoning_switch(
    raw: Option<&Value>,
    llama_cpp: bool,
) -> Result<(Option<ChatTemplateKwargs>, Option<u64>), RequestError> {
    let effort = match raw {
        None | Some(Value::Null) => None,
        Some(r @ Value::Object(_)) => match r.get("effort") {
            None | Some(Value::Null) => None,
            Some(Value::String(e)) => Some(e.as_str()),
            Some(_) => return Err(RequestError::at("reasoning.effort", "must be a string")),
        },
        Some(_) => return Err(RequestError::at("reasoning", "must be an object")),
    };
    let Some(effort) = effort.filter(|_| llama_cpp) else {
        return Ok((None, None));
    };
    Ok(match effort_budget(effort) {
        None => (
            Some(ChatTemplateKwargs {
                enable_thinking: false,
            }),
            None,
        ),
        Some(budget) => (
            Some(ChatTemplateKwargs {
                enable_thinking: true,
            }),
            budget,
        ),
    })
}

/// `text.format` → the chat API's `response_format`.
fn text_format(raw: Option<&Value>) -> Result<Option<Value>, RequestError> {
    let Some(format) = raw.and_then(|t| t.get("format")).filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let schema = format
                .get("schema")
                .ok_or_else(|| RequestError::at("text.format.schema", "field required"))?;
            let mut js = Map::new();
            js.insert(
                "name".into(),
                format
                    .get("name")
                    .cloned()
                    .unwrap_or_else(|| json!("response")),
            );
            js.insert("schema".into(), schema.clone());
            if let Some(strict) = format.get("strict").filter(|s| !s.is_null()) {
                js.insert("strict".into(), strict.clone());
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": js})))
        }
        _ => Err(RequestError::at(
            "text.format.type",
            "must be \"text\", \"json_object\" or \"json_schema\"",
        )),
    }
}

#[cfg(test)]
#[path = "decode_tests.rs"]
mod tests;
