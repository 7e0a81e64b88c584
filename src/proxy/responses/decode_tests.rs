use serde_json::{Value, json};

use super::*;

fn opts() -> TranslateOptions {
    TranslateOptions {
        upstream_model: "up".into(),
        llama_cpp: true,
    }
}

fn decode(body: Value) -> Decoded {
    decode_request(body.to_string().as_bytes(), &opts()).unwrap_or_else(|e| panic!("{e}"))
}

fn chat(body: Value) -> Value {
    serde_json::to_value(&decode(body).chat).unwrap()
}

fn error(body: Value) -> String {
    match decode_request(body.to_string().as_bytes(), &opts()) {
        Ok(_) => panic!("accepted: {body}"),
        Err(e) => e.message,
    }
}

fn msg(role: &str, text: &str) -> Value {
    json!({"type": "message", "id": "msg_x", "role": role, "content": [{"type": "input_text", "text": text}]})
}

/// Codex 0.171.0's first request, shapes as captured (codex-traffic.md §3, §4), texts cut.
fn codex_first() -> Value {
    json!({
        "model": "local-model", "stream": true,
        "input": [msg("developer", "BASE"), msg("developer", "PERMS"), msg("user", "<environment_context/>"),
                  msg("user", "say hi")],
        "tools": [
            {"type": "function", "name": "exec_command", "description": "Runs a command", "strict": false,
             "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"],
                            "additionalProperties": false}},
            {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.",
             "tools": [{"type": "function", "name": "spawn_agent", "description": "Spawns", "strict": false,
                        "parameters": {"type": "object", "properties": {"message": {"type": "string"}}}}]},
            {"type": "web_search", "external_web_access": false},
        ],
        "tool_choice": "auto", "parallel_tool_calls": true, "reasoning": {"summary": "auto"},
        "store": false, "include": ["reasoning.encrypted_content"], "prompt_cache_key": "sess-1",
        "client_metadata": {"thread_id": "t"},
    })
}

#[test]
fn codex_first_request_becomes_one_system_message_and_flat_tools() {
    let d = decode(codex_first());
    assert!(d.client_stream);
    assert!(d.meta.include_encrypted);
    assert_eq!(d.prompt_cache_key.as_deref(), Some("sess-1"));
    let c = serde_json::to_value(&d.chat).unwrap();
    assert_eq!(
        c["messages"],
        json!([
            {"role": "system", "content": "BASE\n\nPERMS"},
            {"role": "user", "content": "<environment_context/>\nsay hi"},
        ])
    );
    let names: Vec<&str> = c["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    // web_search is hosted: left out; the namespace is flattened.
    assert_eq!(names, ["exec_command", "multi_agent_v1__spawn_agent"]);
    assert_eq!(
        d.meta.tools.get("multi_agent_v1__spawn_agent"),
        Some(&ClientTool::Function {
            namespace: Some("multi_agent_v1".into()),
            name: "spawn_agent".into()
        })
    );
    assert_eq!(c["tool_choice"], "auto");
    assert_eq!(c["parallel_tool_calls"], true);
    assert_eq!(c["model"], "up");
    assert_eq!(c["stream"], true);
    assert_eq!(c["stream_options"], json!({"include_usage": true}));
    assert_eq!(c["return_progress"], true);
    // Accepted, never forwarded.
    for k in [
        "store",
        "include",
        "prompt_cache_key",
        "client_metadata",
        "reasoning",
        "input",
    ] {
        assert!(c.get(k).is_none(), "{k} forwarded");
    }
    // No effort given: the server's default thinking.
    assert!(c.get("chat_template_kwargs").is_none());
}

#[test]
fn a_tool_round_trip_is_one_assistant_turn_and_a_tool_message() {
    let mut body = codex_first();
    let input = body["input"].as_array_mut().unwrap();
    input.push(json!({"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "S"}],
                      "encrypted_content": format!("{REASONING_PREFIX}I should cat it")}));
    input.push(json!({"type": "message", "role": "assistant", "id": "m",
                      "content": [{"type": "output_text", "text": "Looking.", "annotations": []}]}));
    input.push(
        json!({"type": "function_call", "status": "completed", "id": "fc_1", "name": "exec_command",
                      "arguments": "{\"cmd\": \"cat notes.txt\"}", "call_id": "call_1"}),
    );
    input.push(
        json!({"type": "function_call", "id": "fc_2", "name": "spawn_agent",
                      "namespace": "multi_agent_v1", "arguments": "{}", "call_id": "call_2"}),
    );
    input.push(json!({"type": "function_call_output", "call_id": "call_1", "output": "the fox"}));
    input.push(json!({"type": "function_call_output", "call_id": "call_2",
                      "output": [{"type": "input_text", "text": "agent 7"}]}));
    let c = chat(body);
    let m = c["messages"].as_array().unwrap();
    assert_eq!(m.len(), 5, "{m:#?}");
    assert_eq!(
        m[2],
        json!({"role": "assistant", "content": "Looking.", "reasoning_content": "I should cat it",
               "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "exec_command", "arguments": "{\"cmd\": \"cat notes.txt\"}"}},
                   {"id": "call_2", "type": "function",
                    "function": {"name": "multi_agent_v1__spawn_agent", "arguments": "{}"}}]})
    );
    assert_eq!(
        m[3],
        json!({"role": "tool", "tool_call_id": "call_1", "content": "the fox"})
    );
    assert_eq!(
        m[4],
        json!({"role": "tool", "tool_call_id": "call_2", "content": "agent 7"})
    );
}

#[test]
fn the_prompt_of_turn_two_extends_turn_one() {
    let one = codex_first();
    let mut two = one.clone();
    two["input"].as_array_mut().unwrap().extend([
        json!({"type": "function_call", "name": "exec_command", "arguments": "{}", "call_id": "c"}),
        json!({"type": "function_call_output", "call_id": "c", "output": "x"}),
    ]);
    let a = serde_json::to_string(&chat(one)["messages"]).unwrap();
    let b = serde_json::to_string(&chat(two)["messages"]).unwrap();
    assert!(b.starts_with(a.trim_end_matches(']')), "{a}\n{b}");
}

#[test]
fn custom_tools_are_one_string_functions_and_their_history_round_trips() {
    let body = json!({
        "model": "m",
        "input": [
            {"role": "user", "content": "patch it"},
            {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "*** Begin Patch\n"},
            {"type": "custom_tool_call_output", "call_id": "c1", "output": "Done!"},
        ],
        "tools": [{"type": "custom", "name": "apply_patch", "description": "Edit files",
                   "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch"}}],
        "tool_choice": {"type": "custom", "name": "apply_patch"},
    });
    let d = decode(body);
    assert_eq!(d.ctx.forced_tool.as_deref(), Some("apply_patch"));
    assert_eq!(
        d.meta.tools.get("apply_patch"),
        Some(&ClientTool::Custom {
            name: "apply_patch".into()
        })
    );
    let c = serde_json::to_value(&d.chat).unwrap();
    let f = &c["tools"][0]["function"];
    assert_eq!(f["name"], "apply_patch");
    assert_eq!(f["parameters"]["required"], json!(["input"]));
    assert_eq!(f["parameters"]["properties"]["input"]["type"], "string");
    let doc = f["parameters"]["properties"]["input"]["description"]
        .as_str()
        .unwrap();
    assert!(
        doc.contains("lark grammar") && doc.contains("start: begin_patch"),
        "{doc}"
    );
    assert_eq!(c["tool_choice"], "required");
    assert_eq!(
        c["messages"][1]["tool_calls"][0]["function"],
        json!({"name": "apply_patch", "arguments": "{\"input\":\"*** Begin Patch\\n\"}"})
    );
    assert_eq!(
        c["messages"][2],
        json!({"role": "tool", "tool_call_id": "c1", "content": "Done!"})
    );
}

#[test]
fn instructions_come_first_and_later_developer_messages_stay_in_place() {
    let c = chat(json!({"model": "m", "instructions": "Be terse.",
                        "input": [msg("system", "S"), msg("user", "u"), msg("developer", "mid")]}));
    assert_eq!(
        c["messages"],
        json!([{"role": "system", "content": "Be terse.\n\nS"}, {"role": "user", "content": "u"},
               {"role": "system", "content": "mid"}])
    );
    // A bare string input is one user message.
    let c = chat(json!({"model": "m", "input": "hello"}));
    assert_eq!(c["messages"], json!([{"role": "user", "content": "hello"}]));
}

#[test]
fn images_are_image_parts_and_file_ids_are_refused() {
    let c = chat(json!({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "what is it"},
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "auto"}]}]}));
    assert_eq!(
        c["messages"][0]["content"],
        json!([{"type": "text", "text": "what is it"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])
    );
    let e = error(json!({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "file_id": "file_1"}]}]}));
    assert!(e.starts_with("input[0].content[0].file_id: "), "{e}");
}

#[test]
fn sampling_knobs_reach_the_upstream() {
    let c = chat(
        json!({"model": "m", "input": "x", "max_output_tokens": 64, "temperature": 0.2,
                        "top_p": 0.9, "reasoning": {"effort": "low"},
                        "text": {"format": {"type": "json_schema", "name": "r", "strict": true,
                                            "schema": {"type": "object"}}}}),
    );
    assert_eq!(c["max_tokens"], 64);
    assert_eq!(c["temperature"], 0.2);
    assert_eq!(c["top_p"], 0.9);
    assert_eq!(c["chat_template_kwargs"], json!({"enable_thinking": true}));
    assert_eq!(c["reasoning_budget_tokens"], 1024);
    assert_eq!(
        c["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}, "strict": true}})
    );
    let c = chat(json!({"model": "m", "input": "x", "reasoning": {"effort": "none"}}));
    assert_eq!(c["chat_template_kwargs"], json!({"enable_thinking": false}));
    assert!(c.get("reasoning_budget_tokens").is_none());
    // Not llama.cpp: no llama.cpp knobs.
    let plain = TranslateOptions {
        upstream_model: "up".into(),
        llama_cpp: false,
    };
    let body = json!({"model": "m", "input": "x", "reasoning": {"effort": "high"}}).to_string();
    let c = serde_json::to_value(decode_request(body.as_bytes(), &plain).unwrap().chat).unwrap();
    assert!(c.get("chat_template_kwargs").is_none() && c.get("return_progress").is_none());
}

#[test]
fn tool_choice_forms() {
    let tools = json!([{"type": "function", "name": "a", "parameters": {"type": "object"}},
                       {"type": "function", "name": "b"}]);
    let c = chat(
        json!({"model": "m", "input": "x", "tools": tools, "tool_choice": {"type": "function", "name": "b"}}),
    );
    assert_eq!(c["tools"].as_array().unwrap().len(), 1);
    assert_eq!(c["tools"][0]["function"]["name"], "b");
    assert_eq!(c["tool_choice"], "required");
    let c = chat(
        json!({"model": "m", "input": "x", "tools": tools, "tool_choice": {"type": "allowed_tools",
                        "mode": "required", "tools": [{"type": "function", "name": "a"}]}}),
    );
    assert_eq!(c["tools"].as_array().unwrap().len(), 1);
    assert_eq!(c["tool_choice"], "required");
    // Tools without a choice, and a choice without tools: nothing forced.
    let c = chat(json!({"model": "m", "input": "x", "tools": tools}));
    assert!(c.get("tool_choice").is_none());
    let c = chat(json!({"model": "m", "input": "x", "tool_choice": "required"}));
    assert!(c.get("tool_choice").is_none() && c.get("tools").is_none());
    // Only a hosted tool: no tools at all upstream.
    let c = chat(
        json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}], "tool_choice": "auto"}),
    );
    assert!(c.get("tools").is_none());
    let e = error(
        json!({"model": "m", "input": "x", "tools": tools, "tool_choice": {"type": "function", "name": "zz"}}),
    );
    assert!(e.starts_with("tool_choice.name: "), "{e}");
    // parallel_tool_calls: false keeps only the first call.
    let d = decode(
        json!({"model": "m", "input": "x", "tools": tools, "tool_choice": "auto",
                          "parallel_tool_calls": false}),
    );
    assert!(d.ctx.single_tool_call);
}

#[test]
fn stateful_fields_get_a_clear_400() {
    let e = error(json!({"model": "m", "input": "x", "previous_response_id": "resp_1"}));
    assert!(
        e.starts_with("previous_response_id: is not supported") && e.contains("whole conversation"),
        "{e}"
    );
    let e = error(json!({"model": "m", "input": [{"type": "item_reference", "id": "x"}]}));
    assert!(e.starts_with("input[0]: item_reference"), "{e}");
    let e = error(json!({"model": "m", "input": "x", "background": true}));
    assert!(e.starts_with("background: "), "{e}");
    // null is the same as absent.
    decode(json!({"model": "m", "input": "x", "previous_response_id": null}));
}

#[test]
fn errors_name_the_json_path() {
    for (body, path) in [
        (json!({"input": "x"}), "model: field required"),
        (json!({"model": 3, "input": "x"}), "model: must be a string"),
        (json!({"model": "m", "input": 3}), "input: must be"),
        (
            json!({"model": "m", "input": [3]}),
            "input[0]: must be an item object",
        ),
        (
            json!({"model": "m", "input": [{"role": "robot", "content": "x"}]}),
            "input[0].role: ",
        ),
        (
            json!({"model": "m", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}),
            "input[0].call_id: field required",
        ),
        (
            json!({"model": "m", "input": [{"type": "function_call_output", "call_id": "c"}]}),
            "input[0].output: field required",
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "bogus"}]}]}),
            "input[0].content[0].type: unknown content part",
        ),
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "function"}]}),
            "tools[0].name: field required",
        ),
        (
            json!({"model": "m", "input": "x", "tools": [{"name": "f"}]}),
            "tools[0].type: field required",
        ),
        (
            json!({"model": "m", "input": "x", "max_output_tokens": 0}),
            "max_output_tokens: must be at least 1",
        ),
        (
            json!({"model": "m", "input": "x", "stream": "yes"}),
            "stream: must be true or false",
        ),
        (
            json!({"model": "m", "input": "x", "text": {"format": {"type": "xml"}}}),
            "text.format.type: ",
        ),
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "function", "name": "a"},
                                                       {"type": "function", "name": "a"}]}),
            "tools[1]: two tools",
        ),
    ] {
        let e = error(body.clone());
        assert!(e.starts_with(path), "{body}: {e}");
    }
    let e = decode_request(b"{not json", &opts()).err().unwrap().message;
    assert!(e.starts_with("body: not valid JSON"), "{e}");
}

#[test]
fn unknown_and_hosted_items_are_skipped() {
    let c = chat(json!({"model": "m", "input": [
        {"type": "web_search_call", "id": "ws", "status": "completed"},
        {"type": "some_future_item", "x": 1},
        msg("user", "hi")]}));
    assert_eq!(c["messages"], json!([{"role": "user", "content": "hi"}]));
}

#[test]
fn reasoning_from_elsewhere_uses_its_summary_and_non_llama_upstreams_drop_it() {
    let input = json!([msg("user", "q"),
        {"type": "reasoning", "id": "r", "summary": [{"type": "summary_text", "text": "thought"}],
         "encrypted_content": "gAAAA-openai-blob"},
        {"type": "message", "role": "assistant", "content": "a"}]);
    let c = chat(json!({"model": "m", "input": input}));
    assert_eq!(c["messages"][1]["reasoning_content"], "thought");
    let plain = TranslateOptions {
        upstream_model: "up".into(),
        llama_cpp: false,
    };
    let body = json!({"model": "m", "input": input}).to_string();
    let c = serde_json::to_value(decode_request(body.as_bytes(), &plain).unwrap().chat).unwrap();
    assert!(c["messages"][1].get("reasoning_content").is_none());
}
