//! Unit tests of the request translation, one rule per test, plus a Claude-Code-shaped request
//! (snapshot) and the byte-stability property across the turns of a conversation.

use serde_json::{Value, json};

use super::*;

fn opts() -> TranslateOptions {
    TranslateOptions {
        upstream_model: "local-model".into(),
        llama_cpp: true,
    }
}

/// The Messages API requires `max_tokens`; tests about other fields get one when they leave it out.
fn with_max_tokens(mut body: Value) -> Value {
    if let Some(obj) = body.as_object_mut() {
        obj.entry("max_tokens").or_insert(json!(100));
    }
    body
}

fn tr(body: Value) -> Translated {
    translate_request(with_max_tokens(body).to_string().as_bytes(), &opts())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn err(body: Value) -> String {
    match translate_request(with_max_tokens(body).to_string().as_bytes(), &opts()) {
        Ok(t) => panic!("expected an error, got {}", t.body()),
        Err(e) => e.message,
    }
}

fn msgs(messages: Value) -> Value {
    tr(json!({"model": "m", "max_tokens": 10, "messages": messages})).body()["messages"].clone()
}

// ------------------------------------------------------------------ whole requests

/// Built from reference/claude-code-traffic.md (Claude Code 2.1.197, `-p`, second turn of a
/// tool round trip).
fn claude_code_request(cch: &str, messages: Value) -> Value {
    json!({
        "model": "claude-opus-4-8",
        "messages": messages,
        "system": [
            {"type": "text", "text": format!("x-anthropic-billing-header: cc_version=2.1.197.{cch}; cc_entrypoint=sdk-cli;")},
            {"type": "text", "text": "You are a Claude agent, built on Anthropic's Claude Agent SDK.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "\nYou are an interactive agent that helps users with software engineering tasks.\n# Environment\nPrimary working directory: /home/dev/proj", "cache_control": {"type": "ephemeral"}}
        ],
        "tools": [
            {"name": "Read", "description": "Reads a file", "input_schema": {
                "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                "properties": {
                    "file_path": {"description": "The absolute path to the file to read", "type": "string"},
                    "offset": {"description": "line", "type": "integer", "minimum": 0, "maximum": 9007199254740991_u64},
                    "limit": {"description": "lines", "type": "integer", "exclusiveMinimum": 0, "maximum": 9007199254740991_u64},
                    "pages": {"description": "pages", "type": "string"}},
                "required": ["file_path"], "additionalProperties": false}},
            {"name": "Agent", "description": "Launch an agent", "input_schema": {
                "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                "properties": {
                    "env": {"type": "object", "propertyNames": {"type": "string"}, "additionalProperties": {"type": "string"}},
                    "mode": {"anyOf": [{"const": "fast"}, {"type": "string", "enum": ["slow", "auto"]}], "default": "auto"},
                    "url": {"type": "string", "format": "uri"}},
                "required": [], "additionalProperties": false}},
            {"name": "CronList", "description": "List cron jobs", "input_schema": {
                "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                "properties": {}, "additionalProperties": false}},
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 8}
        ],
        "metadata": {"user_id": "{\"device_id\":\"abc\",\"account_uuid\":\"\",\"session_id\":\"s\"}"},
        "max_tokens": 64000,
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "stream": true
    })
}

fn cc_turn1() -> Value {
    json!([
        {"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>\n# currentDate\nToday's date is 2026-11-25.\n</system-reminder>\n\n"},
            {"type": "text", "text": "read the file notes.txt and tell me its first line", "cache_control": {"type": "ephemeral"}}]},
        {"role": "system", "content": "Available agent types for the Agent tool:\n- claude: general"}
    ])
}

fn cc_turn2() -> Value {
    let mut m = cc_turn1();
    // The client moves its cache_control breakpoint to the newest block: must not matter.
    m[0]["content"][1]
        .as_object_mut()
        .unwrap()
        .remove("cache_control");
    let arr = m.as_array_mut().unwrap();
    arr.push(json!({"role": "assistant", "content": [
        {"type": "thinking", "thinking": "I should read it.", "signature": "llmctl-unsigned:msg_1"},
        {"type": "tool_use", "id": "toolu_01", "name": "Read", "input": {"file_path": "/home/dev/notes.txt", "limit": 5}}]}));
    arr.push(json!({"role": "user", "content": [
        {"tool_use_id": "toolu_01", "type": "tool_result", "content": "1\tFIRST LINE\n2\tsecond", "cache_control": {"type": "ephemeral"}}]}));
    m
}

fn cc_turn3() -> Value {
    let mut m = cc_turn2();
    let last = m.as_array().unwrap().len() - 1;
    m[last]["content"][0]
        .as_object_mut()
        .unwrap()
        .remove("cache_control");
    let arr = m.as_array_mut().unwrap();
    arr.push(json!({"role": "assistant", "content": [{"type": "text", "text": "The first line is FIRST LINE."}]}));
    arr.push(json!({"role": "user", "content": [{"type": "text", "text": "thanks", "cache_control": {"type": "ephemeral"}}]}));
    m
}

#[test]
fn claude_code_request_snapshot() {
    let t = tr(claude_code_request("0df", cc_turn2()));
    assert!(t.client_stream);
    assert_eq!(t.ctx.client_model, "claude-opus-4-8");
    assert!(t.ctx.message_id.starts_with("msg_"));
    insta::assert_json_snapshot!(t.body());
}

#[test]
fn prompt_is_a_prefix_extension_across_turns() {
    // Different billing `cch` each turn, as Claude Code sends.
    let bodies: Vec<Value> = [
        ("0df", cc_turn1()),
        ("e12", cc_turn2()),
        ("a07", cc_turn3()),
    ]
    .into_iter()
    .map(|(cch, m)| tr(claude_code_request(cch, m)).body())
    .collect();
    for pair in bodies.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let am = a["messages"].as_array().unwrap();
        let bm = b["messages"].as_array().unwrap();
        assert!(bm.len() > am.len());
        assert_eq!(&bm[..am.len()], am.as_slice(), "earlier messages changed");
        // And byte-wise: the serialized prompt only grows at the end.
        let sa = serde_json::to_string(&a["messages"]).unwrap();
        let sb = serde_json::to_string(&b["messages"]).unwrap();
        assert!(sb.starts_with(&sa[..sa.len() - 1]), "not a byte prefix");
        assert_eq!(a["tools"], b["tools"]);
    }
}

#[test]
fn same_input_gives_same_bytes() {
    let a = tr(claude_code_request("0df", cc_turn3()))
        .body()
        .to_string();
    let b = tr(claude_code_request("0df", cc_turn3()))
        .body()
        .to_string();
    assert_eq!(a, b);
}

#[test]
fn anthropic_only_fields_are_never_forwarded() {
    let body = tr(claude_code_request("0df", cc_turn2())).body();
    let text = body.to_string();
    for banned in [
        "cache_control",
        "metadata",
        "context_management",
        "output_config",
        "x-anthropic-billing-header",
        "$schema",
        "propertyNames",
        "web_search",
        "stop_sequences",
        "signature",
    ] {
        assert!(!text.contains(banned), "{banned} leaked upstream");
    }
    let keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "model",
            "messages",
            "tools",
            "max_tokens",
            "chat_template_kwargs",
            "stream",
            "stream_options",
            "return_progress"
        ]
    );
}

#[test]
fn unknown_top_level_fields_are_ignored() {
    let t = tr(
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
        "betas": ["x"], "container": "c", "mcp_servers": [], "service_tier": "auto", "whatever": 1}),
    );
    assert_eq!(
        t.body(),
        json!({"model": "local-model", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 100, "stream": true, "stream_options": {"include_usage": true}, "return_progress": true})
    );
    assert!(!t.client_stream);
}

#[test]
fn count_body_has_no_sampling_or_stream_fields() {
    let body = claude_code_request("0df", cc_turn2()).to_string();
    let count = translate_for_count(body.as_bytes(), &opts()).unwrap();
    let full = translate_request(body.as_bytes(), &opts()).unwrap().body();
    assert_eq!(count["messages"], full["messages"]);
    assert_eq!(count["tools"], full["tools"]);
    for k in ["stream", "stream_options", "max_tokens", "return_progress"] {
        assert!(count.get(k).is_none(), "{k} in count body");
    }
}

// ------------------------------------------------------------------ system prompt

#[test]
fn system_string_and_blocks_joined_by_newline_without_billing_line() {
    let t = tr(
        json!({"model": "m", "system": "be brief", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(
        t.body()["messages"][0],
        json!({"role": "system", "content": "be brief"})
    );
    let t = tr(
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "system": [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=abcde;"},
        {"type": "text", "text": "one"}, {"type": "text", "text": "two", "cache_control": {"type": "ephemeral"}}]}),
    );
    assert_eq!(
        t.body()["messages"][0],
        json!({"role": "system", "content": "one\ntwo"})
    );
}

#[test]
fn leading_role_system_message_joins_the_system_prompt() {
    let m =
        msgs(json!([{"role": "system", "content": "rules"}, {"role": "user", "content": "hi"}]));
    assert_eq!(
        m,
        json!([{"role": "system", "content": "rules"}, {"role": "user", "content": "hi"}])
    );
}

#[test]
fn later_role_system_message_becomes_a_reminder_in_place() {
    let m = msgs(json!([
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "agents: a, b"},
        {"role": "assistant", "content": "hello"},
        {"role": "system", "content": [{"type": "text", "text": "mid"}]}
    ]));
    assert_eq!(
        m,
        json!([
            {"role": "user", "content": "hi\n<system-reminder>\nagents: a, b\n</system-reminder>"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "<system-reminder>\nmid\n</system-reminder>"}
        ])
    );
}

// ------------------------------------------------------------------ user / assistant content

#[test]
fn consecutive_same_role_messages_are_merged() {
    let m = msgs(json!([
        {"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"}, {"role": "assistant", "content": "d"}
    ]));
    assert_eq!(
        m,
        json!([{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c\nd"}])
    );
}

#[test]
fn text_blocks_are_joined_without_running_together() {
    let m = msgs(json!([{"role": "user", "content": [
        {"type": "text", "text": "<r>\n</r>\n\n"}, {"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}]));
    assert_eq!(m[0]["content"], "<r>\n</r>\n\nhi\nthere");
}

#[test]
fn images_become_image_url_parts() {
    let m = msgs(json!([{"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}}]}]));
    assert_eq!(
        m[0]["content"],
        json!([
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}
        ])
    );
}

#[test]
fn text_documents_become_text_and_pdfs_are_a_clear_400() {
    let m = msgs(json!([{"role": "user", "content": [
        {"type": "document", "title": "notes", "source": {"type": "text", "media_type": "text/plain", "data": "body"}},
        {"type": "text", "text": "summarize"}]}]));
    assert_eq!(m[0]["content"], "Document: notes\nbody\nsummarize");
    let e = err(
        json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}}]}]}),
    );
    assert!(
        e.starts_with("messages.0.content.1.source: application/pdf documents are not supported"),
        "{e}"
    );
}

#[test]
fn assistant_tool_use_and_thinking() {
    let m = msgs(json!([
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "plan", "signature": "sig"},
            {"type": "redacted_thinking", "data": "xyz"},
            {"type": "text", "text": "ok"},
            {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"z": 1, "a": {"y": [1, 2], "b": null}}}]}
    ]));
    assert_eq!(
        m[1],
        json!({"role": "assistant", "content": "ok", "reasoning_content": "plan", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "Bash", "arguments": "{\"z\":1,\"a\":{\"y\":[1,2],\"b\":null}}"}}]})
    );
}

#[test]
fn tool_results_follow_the_assistant_in_call_order_before_user_text() {
    let m = msgs(json!([
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "a", "name": "A", "input": {}},
            {"type": "tool_use", "id": "b", "name": "B", "input": {}}]},
        {"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>x</system-reminder>"},
            {"type": "tool_result", "tool_use_id": "b", "content": [{"type": "text", "text": "from b"}]},
            {"type": "tool_result", "tool_use_id": "a", "content": "from a", "is_error": true}]}
    ]));
    assert_eq!(
        m,
        json!([
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "A", "arguments": "{}"}},
                {"id": "b", "type": "function", "function": {"name": "B", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "a", "content": "Error: from a"},
            {"role": "tool", "tool_call_id": "b", "content": "from b"},
            {"role": "user", "content": "<system-reminder>x</system-reminder>"}
        ])
    );
}

#[test]
fn images_in_tool_results_move_to_the_following_user_message() {
    let m = msgs(json!([
        {"role": "user", "content": "shot"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "s", "name": "Screenshot", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "s", "content": [
            {"type": "text", "text": "captured"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA"}}]}]}
    ]));
    assert_eq!(
        m[2],
        json!({"role": "tool", "tool_call_id": "s", "content": "captured\n[image attached in the next message]"})
    );
    assert_eq!(
        m[3],
        json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}}]})
    );
}

// ------------------------------------------------------------------ errors

#[test]
fn bad_requests_name_the_field() {
    let e = err(
        json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "foo"}]}]}),
    );
    assert_eq!(
        e,
        "messages.0.content.1.type: unknown content block type 'foo'"
    );
    let e = err(json!({"messages": []}));
    assert_eq!(e, "model: field required");
    let e = err(json!({"model": "m", "messages": []}));
    assert_eq!(e, "messages: at least one message is required");
    let e = err(
        json!({"model": "m", "temperature": "hot", "messages": [{"role": "user", "content": "x"}]}),
    );
    assert!(e.starts_with("temperature: invalid type"), "{e}");
    let e = err(json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]}));
    assert!(
        e.starts_with("messages.0.role: unknown variant `robot`"),
        "{e}"
    );
    let e =
        err(json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}));
    assert!(
        e.starts_with("messages.0.content.0: missing field `text`"),
        "{e}"
    );
    let e = translate_request(b"{not json", &opts())
        .err()
        .unwrap()
        .message;
    assert!(e.starts_with("request body is not valid JSON"), "{e}");
    let e = err(json!({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope", "content": "x"}]}]}));
    assert!(
        e.starts_with("messages.0.content.0.tool_use_id: no tool_use with id 'nope'"),
        "{e}"
    );
    let e = err(
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "tools": [{"name": "A", "input_schema": {"type": "object"}}], "tool_choice": {"type": "tool", "name": "B"}}),
    );
    assert_eq!(
        e,
        "tool_choice.name: tool 'B' is not among the client tools in 'tools'"
    );
}

// ------------------------------------------------------------------ tools and tool_choice

fn with_tools(tool_choice: Value) -> Translated {
    tr(
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "tools": [
            {"name": "A", "description": "a", "input_schema": {"type": "object", "properties": {"p": {"type": "string"}}}},
            {"name": "B", "input_schema": {"type": "object", "properties": {}}, "cache_control": {"type": "ephemeral"}},
            {"type": "bash_20250124", "name": "bash"}],
        "tool_choice": tool_choice}),
    )
}

#[test]
fn tools_become_functions_and_server_tools_are_dropped() {
    let t = with_tools(Value::Null);
    assert_eq!(
        t.body()["tools"],
        json!([
            {"type": "function", "function": {"name": "A", "description": "a", "parameters": {"type": "object", "properties": {"p": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "B", "parameters": {"type": "object", "properties": {}}}}
        ])
    );
    assert!(t.body().get("tool_choice").is_none());
}

#[test]
fn tool_choice_variants() {
    assert_eq!(
        with_tools(json!({"type": "auto"})).body()["tool_choice"],
        "auto"
    );
    assert_eq!(
        with_tools(json!({"type": "any"})).body()["tool_choice"],
        "required"
    );
    assert_eq!(
        with_tools(json!({"type": "none"})).body()["tool_choice"],
        "none"
    );
    let t = with_tools(json!({"type": "tool", "name": "B", "disable_parallel_tool_use": true}));
    assert_eq!(t.body()["tool_choice"], "required");
    assert_eq!(t.body()["parallel_tool_calls"], false);
    let body = t.body();
    let names: Vec<&str> = body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["B"], "tools narrowed to the forced one");
    assert_eq!(t.ctx.forced_tool.as_deref(), Some("B"));
    assert!(t.ctx.single_tool_call);
    let t = with_tools(json!({"type": "auto", "disable_parallel_tool_use": false}));
    assert!(t.body().get("parallel_tool_calls").is_none());
    assert!(!t.ctx.single_tool_call);
}

#[test]
fn tool_choice_for_a_dropped_server_tool_or_with_no_tools_is_not_sent() {
    let t = with_tools(json!({"type": "tool", "name": "bash"}));
    assert!(t.body().get("tool_choice").is_none());
    assert_eq!(t.body()["tools"].as_array().unwrap().len(), 2);
    assert!(t.ctx.forced_tool.is_none());
    let t = tr(
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 8}],
        "tool_choice": {"type": "tool", "name": "web_search"}}),
    );
    assert!(t.body().get("tools").is_none());
    assert!(t.body().get("tool_choice").is_none());
    let t = tr(
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [],
        "tool_choice": {"type": "any"}}),
    );
    assert!(t.body().get("tool_choice").is_none());
}

// ------------------------------------------------------------------ sampling and thinking

#[test]
fn sampling_fields_and_stop_sequences() {
    let t = tr(
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5,
        "temperature": 0.2, "top_p": 0.9, "top_k": 40, "stop_sequences": ["END", ""], "stream": true}),
    );
    assert_eq!(t.body()["max_tokens"], 5);
    assert_eq!(t.body()["temperature"], 0.2);
    assert_eq!(t.body()["top_p"], 0.9);
    assert_eq!(t.body()["top_k"], 40);
    assert!(
        t.body().get("stop").is_none(),
        "stop sequences are matched by the proxy"
    );
    assert_eq!(t.ctx.stop_sequences, ["END"]);
    assert_eq!(t.body()["stream"], true);
    assert_eq!(t.body()["stream_options"], json!({"include_usage": true}));
}

#[test]
fn thinking_maps_to_llama_cpp_knobs() {
    let think = |thinking: Value, llama_cpp: bool| {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "thinking": thinking});
        let o = TranslateOptions {
            upstream_model: "u".into(),
            llama_cpp,
        };
        let b = translate_request(with_max_tokens(body).to_string().as_bytes(), &o)
            .unwrap()
            .body();
        (
            b.get("chat_template_kwargs").cloned(),
            b.get("reasoning_budget_tokens").cloned(),
        )
    };
    assert_eq!(
        think(json!({"type": "enabled", "budget_tokens": 31999}), true),
        (Some(json!({"enable_thinking": true})), Some(json!(31999)))
    );
    assert_eq!(
        think(json!({"type": "adaptive"}), true),
        (Some(json!({"enable_thinking": true})), None)
    );
    assert_eq!(
        think(json!({"type": "disabled"}), true),
        (Some(json!({"enable_thinking": false})), None)
    );
    assert_eq!(think(Value::Null, true), (None, None));
    assert_eq!(
        think(json!({"type": "enabled", "budget_tokens": 1024}), false),
        (None, None)
    );
}

#[test]
fn a_user_turn_with_nothing_translatable_stays_as_an_empty_turn() {
    let m = msgs(json!([
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": [{"type": "redacted_thinking", "data": "x"}]}
    ]));
    assert_eq!(m[2], json!({"role": "user", "content": ""}));
}

#[test]
fn max_tokens_is_required_for_messages_but_not_for_count_tokens() {
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let direct = |b: &Value| {
        translate_request(b.to_string().as_bytes(), &opts())
            .map(|_| ())
            .unwrap_err()
            .message
    };
    assert_eq!(direct(&body), "max_tokens: field required");
    assert!(translate_for_count(body.to_string().as_bytes(), &opts()).is_ok());
    let mut zero = body.clone();
    zero["max_tokens"] = json!(0);
    assert_eq!(direct(&zero), "max_tokens: must be at least 1");
}

#[test]
fn a_bad_message_names_its_field() {
    let bad = |m: Value| err(json!({"model": "m", "messages": [m]}));
    let e = bad(json!({"role": "bot", "content": "hi"}));
    assert!(
        e.starts_with("messages.0.role: unknown variant `bot`"),
        "{e}"
    );
    assert_eq!(
        bad(json!({"role": "user"})),
        "messages.0.content: field required"
    );
    assert_eq!(
        bad(json!("hi")),
        "messages.0: must be an object with role and content"
    );
}

// ------------------------------------------------------------------ deferred tools (tool search)

/// The tool list of Claude Code 2.1.332 behind a custom base URL (captured 2026-12-03, schemas cut
/// short): client tools, its ToolSearch tool, and a `defer_loading` placeholder it asks never to call;
/// here also one deferred MCP tool.
fn deferred_tools() -> Value {
    let schema = json!({"type": "object", "properties": {"q": {"type": "string"}}});
    json!([
        {"name": "Bash", "description": "Runs a command", "input_schema": schema},
        {"name": "ToolSearch", "description": "Fetches full schema definitions for deferred tools",
         "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}},
        {"name": "DeferredToolPlaceholder",
         "description": "Reserved placeholder that keeps deferred tool loading active; never call this tool.",
         "input_schema": {"type": "object", "properties": {}}, "defer_loading": true},
        {"name": "mcp__docs__grep", "description": "Greps the docs", "input_schema": schema,
         "defer_loading": true, "cache_control": {"type": "ephemeral"}},
        {"name": "Write", "description": "Writes a file", "input_schema": schema}
    ])
}

fn tool_names(body: &Value) -> Vec<String> {
    body["tools"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| t["function"]["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn search_turns() -> Value {
    json!([
        {"role": "user", "content": "Grep the docs for retries."},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "ToolSearch",
                                           "input": {"query": "select:mcp__docs__grep"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [{"type": "tool_reference", "tool_name": "mcp__docs__grep"}]}]}
    ])
}

#[test]
fn deferred_tools_stay_out_until_referenced() {
    let first = tr(json!({"model": "m", "tools": deferred_tools(),
                          "messages": [{"role": "user", "content": "Grep the docs for retries."}]}));
    assert_eq!(tool_names(&first.body()), ["Bash", "ToolSearch", "Write"]);
    assert!(!first.body().to_string().contains("defer_loading"));
    assert!(!first.body().to_string().contains("cache_control"));
}

#[test]
fn a_referenced_deferred_tool_is_appended_after_the_others() {
    let t = tr(json!({"model": "m", "tools": deferred_tools(), "messages": search_turns()}));
    // Appended last: the tool list of the earlier turn stays a prefix of this one.
    assert_eq!(
        tool_names(&t.body()),
        ["Bash", "ToolSearch", "Write", "mcp__docs__grep"]
    );
    let grep = &t.body()["tools"][3]["function"];
    assert_eq!(grep["description"], "Greps the docs");
    assert!(grep.get("defer_loading").is_none());
    // The tool_reference reaches the model as a short line in the tool result.
    let m = &t.body()["messages"];
    let tool_msg = m
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "tool")
        .unwrap();
    assert_eq!(
        tool_msg["content"],
        "Tool mcp__docs__grep is loaded and can be called now."
    );
}

#[test]
fn loading_a_tool_leaves_the_earlier_messages_and_tools_byte_identical() {
    let before = tr(json!({"model": "m", "tools": deferred_tools(),
                           "messages": search_turns().as_array().unwrap()[..2]}));
    let after = tr(json!({"model": "m", "tools": deferred_tools(), "messages": search_turns()}));
    let (b, a) = (&before.body(), &after.body());
    assert_eq!(
        b["messages"].as_array().unwrap()[..],
        a["messages"].as_array().unwrap()[..2]
    );
    let (bt, at) = (
        b["tools"].as_array().unwrap(),
        a["tools"].as_array().unwrap(),
    );
    assert_eq!(bt[..], at[..bt.len()]);
    // And the order of loaded tools is stable on later turns.
    let mut more = search_turns();
    more.as_array_mut().unwrap().extend([
        json!({"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_2", "name": "mcp__docs__grep", "input": {"q": "retries"}}]}),
        json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "content": "docs/x.md: retries"}]}),
    ]);
    let later = tr(json!({"model": "m", "tools": deferred_tools(), "messages": more}));
    assert_eq!(later.body()["tools"], a["tools"]);
}

#[test]
fn other_tool_search_blocks_are_accepted_and_their_references_load_tools() {
    let t = tr(
        json!({"model": "m", "tools": deferred_tools(), "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "go"},
                {"type": "tool_addition", "tools": [{"name": "Write"}]}]},
            {"role": "assistant", "content": [
                {"type": "server_tool_use", "id": "srvtoolu_1", "name": "tool_search_tool_regex", "input": {"query": "grep"}},
                {"type": "tool_search_tool_result", "tool_use_id": "srvtoolu_1", "content": {
                    "type": "tool_search_tool_search_result",
                    "tool_references": [{"type": "tool_reference", "tool_name": "mcp__docs__grep"}]}},
                {"type": "text", "text": "Found it."}]},
            {"role": "user", "content": [{"type": "tool_reference", "tool_name": "mcp__docs__grep"}, {"type": "text", "text": "use it"}]}
        ]}),
    );
    assert_eq!(tool_names(&t.body()).last().unwrap(), "mcp__docs__grep");
    let text = t.body()["messages"].to_string();
    assert!(text.contains("Found it."), "{text}");
    assert!(
        !text.contains("tool_addition") && !text.contains("srvtoolu_1"),
        "{text}"
    );
}

#[test]
fn tool_choice_naming_a_deferred_tool_loads_it() {
    let t = tr(json!({"model": "m", "tools": deferred_tools(),
                      "tool_choice": {"type": "tool", "name": "mcp__docs__grep"},
                      "messages": [{"role": "user", "content": "grep"}]}));
    assert_eq!(tool_names(&t.body()).last().unwrap(), "mcp__docs__grep");
}

/// Claude Code 2.1.332's first `-p "Say hello"` request behind a custom base URL, as the binary sent it
/// (captured 2026-12-03 with a recorder; long texts cut, ids replaced): system-role message after the
/// prompt, adaptive thinking, `output_config`, `context_management`, `ToolSearch` and a deferred
/// `DeferredToolPlaceholder`.
#[test]
fn claude_code_2_1_332_request_translates() {
    let body: Value =
        serde_json::from_str(include_str!("claude-code-2.1.332-request.json")).unwrap();
    let t = tr(body);
    let names = tool_names(&t.body());
    assert_eq!(names.len(), 11, "{names:?}");
    assert!(names.contains(&"ToolSearch".to_string()), "{names:?}");
    assert!(
        !names.contains(&"DeferredToolPlaceholder".to_string()),
        "{names:?}"
    );
    let body = t.body();
    let m = body["messages"].as_array().unwrap();
    // The billing line is gone from the system prompt; the trailing system message is a reminder in place.
    assert_eq!(m[0]["role"], "system");
    assert!(
        !m[0]["content"]
            .as_str()
            .unwrap()
            .contains("x-anthropic-billing-header")
    );
    let last = m.last().unwrap();
    assert_eq!(last["role"], "user");
    let text = last["content"].as_str().unwrap();
    assert!(text.contains("<system-reminder>\n# Environment"), "{last}");
    assert!(
        text.find("Say hello") < text.find("# Environment"),
        "{last}"
    );
    assert_eq!(t.body()["chat_template_kwargs"]["enable_thinking"], true);
    for k in [
        "output_config",
        "context_management",
        "metadata",
        "defer_loading",
        "cache_control",
    ] {
        assert!(!t.body().to_string().contains(k), "{k} leaked upstream");
    }
}
