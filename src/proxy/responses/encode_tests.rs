//! The encoder on the whole pipeline: recorded upstream chunks → stream translator → Responses events, each
//! stream checked against OpenAI's grammar (`check_grammar`, the same rules tests/e2e/responses_grammar.py
//! checks on the real wire).

use serde_json::{Value, json};

use super::*;
use crate::proxy::responses::decode::{Decoded, decode_request};
use crate::proxy::stream::StreamTranslator;
use crate::proxy::translate::TranslateOptions;

fn decoded(body: Value) -> Decoded {
    let opts = TranslateOptions {
        upstream_model: "up".into(),
        llama_cpp: true,
    };
    decode_request(body.to_string().as_bytes(), &opts).unwrap()
}

fn tools_body() -> Value {
    json!({"model": "local-model", "input": "x", "include": ["reasoning.encrypted_content"],
           "tools": [{"type": "function", "name": "exec_command", "parameters": {"type": "object"}},
                     {"type": "custom", "name": "apply_patch"},
                     {"type": "namespace", "name": "multi_agent_v1",
                      "tools": [{"type": "function", "name": "spawn_agent"}]}]})
}

/// Runs chunks through the pipeline; `fail` ends it with an upstream failure after the chunks instead of
/// [DONE]. Returns the parsed SSE events (name, data).
fn run(body: Value, chunks: &[Value], fail: Option<&str>) -> Vec<(String, Value)> {
    let d = decoded(body);
    let mut t = StreamTranslator::new(d.ctx);
    let mut enc = ResponsesEncoder::new(d.meta);
    let mut wire = Vec::new();
    wire.extend_from_slice(&enc.encode(&t.start()));
    wire.extend_from_slice(&enc.keepalive());
    for c in chunks {
        wire.extend_from_slice(&enc.encode(&t.on_chunk(c)));
    }
    match fail {
        Some(msg) => wire.extend_from_slice(&enc.encode(&t.fail("api_error", msg))),
        None => wire.extend_from_slice(&enc.encode(&t.finish())),
    }
    // Nothing after the end, whatever comes.
    assert!(enc.encode(&t.finish()).is_empty());
    assert!(enc.keepalive().is_empty());
    parse_sse(&wire)
}

fn parse_sse(wire: &[u8]) -> Vec<(String, Value)> {
    let text = std::str::from_utf8(wire).unwrap();
    assert!(text.is_empty() || text.ends_with("\n\n"), "{text}");
    text.split("\n\n")
        .filter(|b| !b.is_empty())
        .map(|block| {
            let mut lines = block.lines();
            let name = lines
                .next()
                .unwrap()
                .strip_prefix("event: ")
                .unwrap()
                .to_string();
            let data = lines.next().unwrap().strip_prefix("data: ").unwrap();
            assert!(lines.next().is_none());
            (name, serde_json::from_str(data).unwrap())
        })
        .collect()
}

/// OpenAI's Responses stream grammar; panics naming the first violation. Returns the terminal response.
fn check_grammar(events: &[(String, Value)]) -> Value {
    let mut open: Option<(usize, Value)> = None; // (output_index, item as added)
    let mut built = String::new();
    let mut done_items: Vec<Value> = Vec::new();
    let mut terminal: Option<Value> = None;
    for (i, (name, data)) in events.iter().enumerate() {
        let at = format!("event {i} {name}");
        assert!(terminal.is_none(), "{at}: after the terminal event");
        assert_eq!(
            data["type"],
            name.as_str(),
            "{at}: type differs from the event name"
        );
        assert_eq!(data["sequence_number"], i, "{at}: sequence_number");
        if i == 0 {
            assert_eq!(
                name, "response.created",
                "the stream must open with response.created"
            );
            assert_eq!(data["response"]["status"], "in_progress");
            assert!(data["response"]["id"].is_string());
            continue;
        }
        let idx = data["output_index"].as_u64().map(|n| n as usize);
        let item_id = data["item_id"].as_str();
        let check_open = |kind: &str| {
            let (oi, item) = open
                .as_ref()
                .unwrap_or_else(|| panic!("{at}: no item open"));
            assert_eq!(Some(*oi), idx, "{at}: output_index");
            assert_eq!(
                item["type"], kind,
                "{at}: event for a {} item",
                item["type"]
            );
            if let Some(id) = item_id {
                assert_eq!(item["id"], id, "{at}: item_id");
            }
        };
        match name.as_str() {
            "response.created" => panic!("{at}: a second response.created"),
            "response.in_progress" => assert!(open.is_none(), "{at}: in_progress inside an item"),
            "response.output_item.added" => {
                assert!(open.is_none(), "{at}: an item is still open");
                assert_eq!(idx, Some(done_items.len()), "{at}: output_index not dense");
                assert_eq!(data["item"]["status"], "in_progress", "{at}");
                open = Some((done_items.len(), data["item"].clone()));
                built.clear();
            }
            "response.content_part.added" => {
                check_open("message");
                assert_eq!(data["content_index"], 0);
                assert_eq!(data["part"]["text"], "");
            }
            "response.output_text.delta" => {
                check_open("message");
                assert_eq!(data["content_index"], 0, "{at}");
                built.push_str(data["delta"].as_str().unwrap());
            }
            "response.output_text.done" => {
                check_open("message");
                assert_eq!(
                    data["text"],
                    built.as_str(),
                    "{at}: done text is not the deltas joined"
                );
            }
            "response.content_part.done" => {
                check_open("message");
                assert_eq!(data["part"]["text"], built.as_str(), "{at}");
            }
            "response.reasoning_summary_part.added" | "response.reasoning_summary_part.done" => {
                check_open("reasoning");
                assert_eq!(data["summary_index"], 0, "{at}");
            }
            "response.reasoning_summary_text.delta" => {
                check_open("reasoning");
                assert_eq!(data["summary_index"], 0, "{at}");
                built.push_str(data["delta"].as_str().unwrap());
            }
            "response.reasoning_summary_text.done" => {
                check_open("reasoning");
                assert_eq!(data["text"], built.as_str(), "{at}");
            }
            "response.function_call_arguments.delta" => {
                check_open("function_call");
                built.push_str(data["delta"].as_str().unwrap());
            }
            "response.function_call_arguments.done" => {
                check_open("function_call");
                assert_eq!(data["arguments"], built.as_str(), "{at}");
            }
            "response.custom_tool_call_input.delta" => {
                check_open("custom_tool_call");
                built.push_str(data["delta"].as_str().unwrap());
            }
            "response.custom_tool_call_input.done" => {
                check_open("custom_tool_call");
                assert_eq!(data["input"], built.as_str(), "{at}");
            }
            "response.output_item.done" => {
                let (oi, added) = open.take().unwrap_or_else(|| panic!("{at}: no item open"));
                assert_eq!(idx, Some(oi), "{at}");
                let item = &data["item"];
                assert_eq!(item["id"], added["id"], "{at}");
                assert_eq!(item["type"], added["type"], "{at}");
                assert_eq!(item["status"], "completed", "{at}");
                let content = match item["type"].as_str().unwrap() {
                    "message" => item["content"][0]["text"].clone(),
                    "reasoning" => item["summary"][0]["text"].clone(),
                    "function_call" => item["arguments"].clone(),
                    "custom_tool_call" => item["input"].clone(),
                    other => panic!("{at}: item type {other}"),
                };
                assert_eq!(
                    content,
                    built.as_str(),
                    "{at}: the item is not what the deltas built"
                );
                done_items.push(item.clone());
            }
            "response.completed" | "response.incomplete" | "response.failed" => {
                if name != "response.failed" {
                    assert!(open.is_none(), "{at}: an item is still open");
                }
                let r = &data["response"];
                assert_eq!(
                    r["output"],
                    Value::Array(done_items.clone()),
                    "{at}: output"
                );
                let status = name.trim_start_matches("response.");
                assert_eq!(r["status"], status, "{at}");
                if name == "response.completed" || name == "response.incomplete" {
                    let u = &r["usage"];
                    let (inp, out) = (
                        u["input_tokens"].as_u64().unwrap(),
                        u["output_tokens"].as_u64().unwrap(),
                    );
                    assert_eq!(u["total_tokens"].as_u64().unwrap(), inp + out, "{at}");
                    assert!(u["input_tokens_details"]["cached_tokens"].as_u64().unwrap() <= inp);
                    assert!(u["output_tokens_details"]["reasoning_tokens"].is_u64());
                }
                terminal = Some(r.clone());
            }
            other => panic!("{at}: unknown event {other}"),
        }
    }
    terminal.expect("the stream has no terminal event")
}

fn content(text: &str) -> Value {
    json!({"choices": [{"index": 0, "delta": {"content": text}}]})
}

fn reasoning(text: &str) -> Value {
    json!({"choices": [{"index": 0, "delta": {"reasoning_content": text}}]})
}

fn call(index: u64, id: Option<&str>, name: Option<&str>, args: &str) -> Value {
    let mut f = json!({"arguments": args});
    if let Some(n) = name {
        f["name"] = n.into();
    }
    let mut c = json!({"index": index, "function": f});
    if let Some(id) = id {
        c["id"] = id.into();
        c["type"] = "function".into();
    }
    json!({"choices": [{"index": 0, "delta": {"tool_calls": [c]}}]})
}

fn finish(reason: &str) -> Value {
    json!({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
}

fn usage(prompt: u64, cached: u64, completion: u64) -> Value {
    json!({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
           "prompt_tokens_details": {"cached_tokens": cached}}})
}

#[test]
fn text() {
    let ev = run(
        json!({"model": "local-model", "input": "hi"}),
        &[
            content("Hel"),
            content("lo"),
            finish("stop"),
            usage(30, 20, 2),
        ],
        None,
    );
    let r = check_grammar(&ev);
    assert_eq!(r["output"][0]["content"][0]["text"], "Hello");
    assert_eq!(r["output"][0]["role"], "assistant");
    assert_eq!(r["model"], "local-model");
    assert_eq!(
        r["usage"],
        json!({"input_tokens": 30, "input_tokens_details": {"cached_tokens": 20}, "output_tokens": 2,
               "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 32})
    );
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            // The keep-alive: a real event (Codex's idle timer ignores SSE comments).
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
}

#[test]
fn reasoning_then_text_carries_the_reasoning_back_for_the_next_turn() {
    let ev = run(
        tools_body(),
        &[
            reasoning("think "),
            reasoning("hard"),
            content("ok"),
            finish("stop"),
            usage(5, 0, 3),
        ],
        None,
    );
    let r = check_grammar(&ev);
    let rs = &r["output"][0];
    assert_eq!(rs["type"], "reasoning");
    assert_eq!(
        rs["summary"],
        json!([{"type": "summary_text", "text": "think hard"}])
    );
    let enc = rs["encrypted_content"].as_str().unwrap();
    assert_eq!(enc, format!("{REASONING_PREFIX}think hard"));
    assert_eq!(r["output"][1]["content"][0]["text"], "ok");
    // Given back as input, the model gets its reasoning again.
    let next =
        json!({"model": "m", "input": [{"role": "user", "content": "x"}, rs, r["output"][1]]});
    let c = serde_json::to_value(decoded(next).chat).unwrap();
    assert_eq!(c["messages"][1]["reasoning_content"], "think hard");
}

#[test]
fn parallel_function_calls_with_interleaved_argument_deltas() {
    let ev = run(
        tools_body(),
        &[
            call(0, Some("call_a"), Some("exec_command"), "{\"cmd\":"),
            call(
                1,
                Some("call_b"),
                Some("multi_agent_v1__spawn_agent"),
                "{\"mess",
            ),
            call(0, None, None, " \"ls\"}"),
            call(1, None, None, "age\": \"go\"}"),
            finish("tool_calls"),
            usage(9, 0, 12),
        ],
        None,
    );
    let r = check_grammar(&ev);
    let out = r["output"].as_array().unwrap();
    assert_eq!(out.len(), 2, "{out:#?}");
    assert_eq!(out[0]["type"], "function_call");
    assert_eq!(out[0]["call_id"], "call_a");
    assert_eq!(out[0]["name"], "exec_command");
    assert_eq!(out[0]["arguments"], "{\"cmd\": \"ls\"}");
    assert!(out[0].get("namespace").is_none());
    // The namespace member comes back under its own name, with its namespace.
    assert_eq!(out[1]["name"], "spawn_agent");
    assert_eq!(out[1]["namespace"], "multi_agent_v1");
    assert_eq!(out[1]["call_id"], "call_b");
    assert_eq!(out[1]["arguments"], "{\"message\": \"go\"}");
    assert_eq!(r["status"], "completed");
}

#[test]
fn a_custom_tool_call_comes_back_as_its_raw_input_once() {
    let patch = "*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch\n";
    let args = json!({ "input": patch }).to_string();
    let (a, b) = args.split_at(17);
    let ev = run(
        tools_body(),
        &[
            call(0, Some("call_p"), Some("apply_patch"), a),
            call(0, None, None, b),
            finish("tool_calls"),
        ],
        None,
    );
    let r = check_grammar(&ev);
    let item = &r["output"][0];
    assert_eq!(item["type"], "custom_tool_call");
    assert_eq!(item["name"], "apply_patch");
    assert_eq!(item["call_id"], "call_p");
    assert_eq!(item["input"], patch);
    let deltas = ev
        .iter()
        .filter(|(n, _)| n == "response.custom_tool_call_input.delta")
        .count();
    assert_eq!(deltas, 1);
    assert!(
        !ev.iter()
            .any(|(n, _)| n == "response.function_call_arguments.delta")
    );
}

#[test]
fn custom_input_unwraps_whatever_single_key_the_model_used() {
    assert_eq!(custom_input(r#"{"input":"a"}"#), "a");
    assert_eq!(custom_input(r#"{"patch":"b"}"#), "b");
    assert_eq!(custom_input(r#""c""#), "c");
    assert_eq!(custom_input(r#"{"a":"x","b":"y"}"#), r#"{"a":"x","b":"y"}"#);
    assert_eq!(custom_input("not json"), "not json");
}

#[test]
fn an_error_mid_stream_is_response_failed_without_the_open_item() {
    let ev = run(
        json!({"model": "m", "input": "x"}),
        &[content("par")],
        Some("upstream http://u failed mid-stream: prompt is too long: 9 tokens > 8 maximum"),
    );
    let r = check_grammar(&ev);
    assert_eq!(ev.last().unwrap().0, "response.failed");
    assert_eq!(r["status"], "failed");
    assert_eq!(r["output"], json!([]));
    assert_eq!(r["error"]["code"], "context_length_exceeded");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("prompt is too long")
    );
}

#[test]
fn a_length_stop_is_response_incomplete() {
    let ev = run(
        json!({"model": "m", "input": "x", "max_output_tokens": 2}),
        &[content("a b"), finish("length"), usage(3, 0, 2)],
        None,
    );
    let r = check_grammar(&ev);
    assert_eq!(ev.last().unwrap().0, "response.incomplete");
    assert_eq!(
        r["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(r["max_output_tokens"], 2);
}

#[test]
fn the_json_answer_is_the_terminal_response_object() {
    let d = decoded(tools_body());
    let mut t = StreamTranslator::new(d.ctx);
    let mut enc = ResponsesEncoder::new(d.meta);
    for e in t.start() {
        enc.push(&e);
    }
    for c in [content("hi"), finish("stop"), usage(4, 1, 1)] {
        for e in t.on_chunk(&c) {
            enc.push(&e);
        }
    }
    for e in t.finish() {
        enc.push(&e);
    }
    let r: Value = serde_json::from_slice(&enc.finish_json()).unwrap();
    assert_eq!(r["object"], "response");
    assert_eq!(r["status"], "completed");
    assert_eq!(r["output"][0]["content"][0]["text"], "hi");
    assert_eq!(r["usage"]["input_tokens"], 4);
    assert_eq!(r["usage"]["input_tokens_details"]["cached_tokens"], 1);
    assert!(enc.failure().is_none());
}

#[test]
fn error_codes_follow_what_codex_keys_on() {
    assert_eq!(
        error_code("api_error", "prompt is too long: 1 tokens > 0 maximum"),
        "context_length_exceeded"
    );
    assert_eq!(error_code("overloaded_error", "x"), "rate_limit_exceeded");
    assert_eq!(error_code("api_error", "boom"), "server_error");
}

/// What `write_delta` wrote through serde's derive before it was written by hand: the oracle for its bytes.
#[derive(serde::Serialize)]
pub(super) struct DeltaOracle<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    sequence_number: u64,
    item_id: &'a str,
    output_index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary_index: Option<usize>,
    delta: &'a str,
}

#[test]
fn hand_written_deltas_are_the_derived_bytes() {
    let names = [
        "response.output_text.delta",
        "response.reasoning_summary_text.delta",
        "response.function_call_arguments.delta",
    ];
    let indexes = [Some(("content_index", 0)), Some(("summary_index", 3)), None];
    for (name, index) in names.iter().zip(indexes) {
        for (seq, delta) in ["", "Hi", " \"q\" \\ \n\u{1}", "日本 🦀", "{\"path\":\"a\"}"]
            .iter()
            .enumerate()
        {
            let mut ours = Vec::new();
            write_delta(
                &mut ours,
                name,
                seq as u64 * 1000,
                "msg_x_1",
                12,
                index,
                delta,
            );
            let (content_index, summary_index) = match index {
                Some(("content_index", i)) => (Some(i), None),
                Some((_, i)) => (None, Some(i)),
                None => (None, None),
            };
            let oracle = DeltaOracle {
                kind: name,
                sequence_number: seq as u64 * 1000,
                item_id: "msg_x_1",
                output_index: 12,
                content_index,
                summary_index,
                delta,
            };
            let want = format!(
                "event: {name}\ndata: {}\n\n",
                serde_json::to_string(&oracle).unwrap()
            );
            assert_eq!(String::from_utf8(ours).unwrap(), want);
        }
    }
}

/// The typed items write the bytes of the `json!` objects they replaced (member order included: with
/// `preserve_order` the objects below serialize in the order written).
#[test]
fn typed_items_are_the_json_objects_they_replaced() {
    let s = |x: &str| x.to_string();
    let cases = [
        (
            Item::Message {
                id: s("msg_1"),
                text: s("Hi \"there\"\n"),
            },
            json!({"id": "msg_1", "type": "message", "status": "completed",
                   "content": [{"type": "output_text", "text": "Hi \"there\"\n", "annotations": []}],
                   "role": "assistant"}),
        ),
        (
            Item::Reasoning {
                id: s("rs_1"),
                text: s("hmm"),
                encrypted: None,
            },
            json!({"id": "rs_1", "type": "reasoning", "status": "completed",
                   "summary": [{"type": "summary_text", "text": "hmm"}]}),
        ),
        (
            Item::Reasoning {
                id: s("rs_2"),
                text: s("hmm"),
                encrypted: Some(s("llmctl:hmm")),
            },
            json!({"id": "rs_2", "type": "reasoning", "status": "completed",
                   "summary": [{"type": "summary_text", "text": "hmm"}], "encrypted_content": "llmctl:hmm"}),
        ),
        (
            Item::Function {
                id: s("fc_1"),
                call_id: s("call_1"),
                name: s("exec_command"),
                namespace: None,
                arguments: s("{\"cmd\":\"ls\"}"),
            },
            json!({"id": "fc_1", "type": "function_call", "status": "completed",
                   "arguments": "{\"cmd\":\"ls\"}", "call_id": "call_1", "name": "exec_command"}),
        ),
        (
            Item::Function {
                id: s("fc_2"),
                call_id: s("call_2"),
                name: s("spawn_agent"),
                namespace: Some(s("multi_agent_v1")),
                arguments: s("{}"),
            },
            json!({"id": "fc_2", "type": "function_call", "status": "completed", "arguments": "{}",
                   "call_id": "call_2", "name": "spawn_agent", "namespace": "multi_agent_v1"}),
        ),
        (
            Item::Custom {
                id: s("ctc_1"),
                call_id: s("call_3"),
                name: s("apply_patch"),
                input: s("*** Begin Patch"),
            },
            json!({"id": "ctc_1", "type": "custom_tool_call", "status": "completed", "call_id": "call_3",
                   "name": "apply_patch", "input": "*** Begin Patch"}),
        ),
    ];
    for (item, want) in cases {
        assert_eq!(written(|out| item.write(out, true)), want.to_string());
    }
    // As `response.output_item.added` shows them: the `json!` objects that event used to write.
    let added = [
        (
            Item::Message {
                id: s("msg_1"),
                text: String::new(),
            },
            json!({"id": "msg_1", "type": "message", "status": "in_progress", "content": [], "role": "assistant"}),
        ),
        (
            Item::Reasoning {
                id: s("rs_1"),
                text: String::new(),
                encrypted: None,
            },
            json!({"id": "rs_1", "type": "reasoning", "status": "in_progress", "summary": []}),
        ),
        (
            Item::Function {
                id: s("fc_1"),
                call_id: s("call_1"),
                name: s("exec_command"),
                namespace: None,
                arguments: String::new(),
            },
            json!({"id": "fc_1", "type": "function_call", "status": "in_progress", "arguments": "",
                   "call_id": "call_1", "name": "exec_command"}),
        ),
        (
            Item::Function {
                id: s("fc_2"),
                call_id: s("call_2"),
                name: s("spawn_agent"),
                namespace: Some(s("multi_agent_v1")),
                arguments: String::new(),
            },
            json!({"id": "fc_2", "type": "function_call", "status": "in_progress", "arguments": "",
                   "call_id": "call_2", "name": "spawn_agent", "namespace": "multi_agent_v1"}),
        ),
        (
            Item::Custom {
                id: s("ctc_1"),
                call_id: s("call_3"),
                name: s("apply_patch"),
                input: String::new(),
            },
            json!({"id": "ctc_1", "type": "custom_tool_call", "status": "in_progress", "call_id": "call_3",
                   "name": "apply_patch", "input": ""}),
        ),
    ];
    for (item, want) in added {
        assert_eq!(written(|out| item.write(out, false)), want.to_string());
    }
    let usage = Usage {
        input_tokens: 3,
        output_tokens: 5,
        cache_read_input_tokens: 30,
    };
    assert_eq!(
        written(|out| write_usage(out, &usage)),
        json!({"input_tokens": 33, "input_tokens_details": {"cached_tokens": 30}, "output_tokens": 5,
               "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 38}).to_string()
    );
}

fn written(write: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut out = Vec::new();
    write(&mut out);
    String::from_utf8(out).unwrap()
}

/// The response object as serde's map serializer wrote it before `write_object` wrote it by hand: the
/// oracle of its bytes (member order included).
struct ObjectOracle<'a> {
    enc: &'a ResponsesEncoder,
    status: &'a str,
    last: bool,
}

impl serde::Serialize for ObjectOracle<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let e = self.enc;
        let echo = &e.meta.echo;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &e.meta.id)?;
        m.serialize_entry("object", "response")?;
        m.serialize_entry("created_at", &e.meta.created_at)?;
        m.serialize_entry("status", self.status)?;
        m.serialize_entry("background", &false)?;
        match &e.error {
            Some((code, message)) => {
                m.serialize_entry("error", &json!({"code": code, "message": message}))?
            }
            None => m.serialize_entry("error", &())?,
        }
        if self.status == "incomplete" {
            m.serialize_entry(
                "incomplete_details",
                &json!({"reason": "max_output_tokens"}),
            )?;
        } else {
            m.serialize_entry("incomplete_details", &())?;
        }
        m.serialize_entry("model", &e.meta.model)?;
        // Items have their own oracle (above).
        let output: Vec<Value> = e
            .output
            .iter()
            .filter(|_| self.last)
            .map(|i| serde_json::from_str(&written(|out| i.write(out, true))).unwrap())
            .collect();
        m.serialize_entry("output", &output)?;
        for (k, v) in echo {
            m.serialize_entry(k, v)?;
        }
        if !echo.contains_key("parallel_tool_calls") {
            m.serialize_entry("parallel_tool_calls", &true)?;
        }
        if !echo.contains_key("tool_choice") {
            m.serialize_entry("tool_choice", "auto")?;
        }
        for k in ["instructions", "temperature", "top_p"] {
            if !echo.contains_key(k) {
                m.serialize_entry(k, &())?;
            }
        }
        if !echo.contains_key("metadata") {
            m.serialize_entry("metadata", &serde_json::Map::new())?;
        }
        m.serialize_entry("tools", &[(); 0])?;
        m.serialize_entry("store", &false)?;
        m.serialize_entry("previous_response_id", &())?;
        if self.last && e.error.is_none() {
            let u = &e.usage;
            let input = u.input_tokens + u.cache_read_input_tokens;
            let usage = json!({"input_tokens": input,
                               "input_tokens_details": {"cached_tokens": u.cache_read_input_tokens},
                               "output_tokens": u.output_tokens,
                               "output_tokens_details": {"reasoning_tokens": 0},
                               "total_tokens": input + u.output_tokens});
            m.serialize_entry("usage", &usage)?;
        } else {
            m.serialize_entry("usage", &())?;
        }
        m.end()
    }
}

#[test]
fn the_hand_written_response_object_is_the_serialized_one() {
    let s = |x: &str| x.to_string();
    let bodies = [
        json!({"model": "m", "input": "hi"}),
        json!({"model": "m", "input": "hi", "instructions": "Be \"brief\".\n", "temperature": 0.2,
               "top_p": 1, "tool_choice": "required", "parallel_tool_calls": false,
               "metadata": {"k": "v"}, "max_output_tokens": 64, "reasoning": {"effort": "low"},
               "text": {"format": {"type": "text"}}, "truncation": "auto"}),
    ];
    for body in bodies {
        let mut enc = ResponsesEncoder::new(decoded(body).meta);
        let check = |enc: &ResponsesEncoder, status: &str, last: bool| {
            let oracle = ObjectOracle { enc, status, last };
            assert_eq!(
                written(|out| enc.write_object(out, status, last)),
                serde_json::to_string(&oracle).unwrap(),
                "{status}"
            );
        };
        check(&enc, "in_progress", false);
        enc.output = vec![
            Item::Message {
                id: s("msg_1"),
                text: s("Hi \"there\""),
            },
            Item::Function {
                id: s("fc_1"),
                call_id: s("call_1"),
                name: s("exec_command"),
                namespace: Some(s("ns")),
                arguments: s("{}"),
            },
        ];
        enc.usage = Usage {
            input_tokens: 3,
            output_tokens: 5,
            cache_read_input_tokens: 30,
        };
        check(&enc, "in_progress", false);
        check(&enc, "completed", true);
        check(&enc, "incomplete", true);
        enc.error = Some((s("server_error"), s("upstream \"x\" broke")));
        check(&enc, "failed", true);
    }
}

/// The events written through `write`, against the objects serde wrote for them.
#[test]
fn hand_written_events_are_the_serialized_objects() {
    let mut enc = ResponsesEncoder::new(decoded(json!({"model": "m", "input": "hi"})).meta);
    enc.seq = 7;
    let mut out = Vec::new();
    let item = Item::Reasoning {
        id: "rs_1".into(),
        text: "why \"so\"".into(),
        encrypted: Some("llmctl:why".into()),
    };
    enc.write_item(&mut out, "response.output_item.done", 2, &item, true);
    let part = Part::SummaryText("why");
    enc.write_part(
        &mut out,
        "response.reasoning_summary_part.done",
        "rs_1",
        2,
        part,
    );
    let part = Part::OutputText("");
    enc.write_part(&mut out, "response.content_part.added", "msg_1", 3, part);
    let want = [
        json!({"type": "response.output_item.done", "sequence_number": 7, "output_index": 2,
               "item": {"id": "rs_1", "type": "reasoning", "status": "completed",
                        "summary": [{"type": "summary_text", "text": "why \"so\""}],
                        "encrypted_content": "llmctl:why"}}),
        json!({"type": "response.reasoning_summary_part.done", "sequence_number": 8, "item_id": "rs_1",
               "output_index": 2, "summary_index": 0, "part": {"type": "summary_text", "text": "why"}}),
        json!({"type": "response.content_part.added", "sequence_number": 9, "item_id": "msg_1",
               "output_index": 3, "content_index": 0,
               "part": {"type": "output_text", "text": "", "annotations": []}}),
    ];
    let want: String = want
        .iter()
        .map(|v| format!("event: {}\ndata: {v}\n\n", v["type"].as_str().unwrap()))
        .collect();
    assert_eq!(String::from_utf8(out).unwrap(), want);
}
