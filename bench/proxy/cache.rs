//! Prompt-cache reuse: a multi-turn Claude Code conversation replayed into a real llama-server, through llmctl
//! and through llama-server's native /v1/messages, printing per turn how much of the prompt llama-server took
//! from its cache.
//!
//! The conversation starts from a real request: the real Claude Code binary ($LLMCTL_CLAUDE_BIN) is run once
//! against a recorder that keeps its first request (system prompt, all its tools, the user turn with its
//! reminders, metadata) and answers it; the later turns append tool calls, tool results and a new prompt to it,
//! as Claude Code does, with its per-request billing line and moving cache_control breakpoint.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::load;
use crate::{PORT_LLAMA, PORT_LLMCTL_LLAMA, env_path, targets};

/// Where the recorder listens while Claude Code runs (the bench's port range).
const PORT_RECORDER: u16 = 18460;
/// The first prompt, which the later turns answer (a Read of notes.txt, then a Bash line count).
const FIRST_PROMPT: &str = "read the file notes.txt and tell me its first line";
const BILLING_PREFIX: &str = "x-anthropic-billing-header:";

fn billing(turn: usize) -> Value {
    // Claude Code changes this line on every request (cc_version suffix and cch= hash): a proxy that forwards
    // it verbatim at the top of the prompt invalidates llama-server's whole cache each turn.
    let hexes = ["0df", "e12", "7a3", "b41"];
    let cch = ["5f1a2", "0c9e7", "a83d1", "44b0f"];
    json!({"type": "text", "text": format!(
        "{BILLING_PREFIX} cc_version=2.1.197.{}; cc_entrypoint=sdk-cli; cch={};",
        hexes[turn % 4], cch[turn % 4])})
}

/// What follows the recorded first request, two messages per turn.
fn later_messages(proj: &str) -> [Value; 6] {
    [
        json!({"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "Read",
                "input": {"file_path": format!("{proj}/notes.txt")}}]}),
        json!({"role": "user", "content": [{"tool_use_id": "toolu_01", "type": "tool_result",
                "content": "1\tFIRST LINE: the quick brown fox\n2\tsecond line\n3\tthird line\n4\t"}]}),
        json!({"role": "assistant", "content": [{"type": "text", "text": "The first line is: FIRST LINE: the quick brown fox"}]}),
        json!({"role": "user", "content": [{"type": "text", "text": "now count the lines of notes.txt"}]}),
        json!({"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_02", "name": "Bash",
                "input": {"command": format!("wc -l {proj}/notes.txt")}}]}),
        json!({"role": "user", "content": [{"tool_use_id": "toolu_02", "type": "tool_result",
                "content": format!("4 {proj}/notes.txt")}]}),
    ]
}

/// The request body of turn `t` (0-based) on top of the recorded first request: each turn appends to the
/// previous one's messages, as the client does, moves the cache_control breakpoint to the newest user block and
/// rewrites the billing line. Answers are kept short (max_tokens 8, no stream): only the prompt is measured.
pub fn turn_body(t: usize, recorded: &Value, proj: &str) -> Value {
    let mut body = recorded.clone();
    let mut messages = match body["messages"].take() {
        Value::Array(m) => m,
        _ => Vec::new(),
    };
    messages.extend(later_messages(proj).into_iter().take(2 * t));
    for block in messages
        .iter_mut()
        .filter_map(|m| m["content"].as_array_mut())
        .flatten()
    {
        if let Some(b) = block.as_object_mut() {
            b.remove("cache_control");
        }
    }
    // The breakpoint sits on the last block of the last user message only.
    if let Some(last) = messages.iter_mut().rev().find(|m| m["role"] == "user")
        && let Some(block) = last["content"].as_array_mut().and_then(|b| b.last_mut())
    {
        block["cache_control"] = json!({"type": "ephemeral"});
    }
    body["messages"] = Value::Array(messages);
    if let Some(first) = body["system"].as_array_mut().and_then(|s| s.first_mut())
        && first["text"]
            .as_str()
            .is_some_and(|t| t.starts_with(BILLING_PREFIX))
    {
        *first = billing(t);
    }
    body["max_tokens"] = json!(8);
    body["stream"] = json!(false);
    body
}

/// A complete, minimal Messages API answer: Claude Code then ends its run normally.
const RECORDER_SSE: &str = concat!(
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_rec\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":1,\"output_tokens\":1}}}\n\n",
    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"ok\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":1}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
);

async fn recorder_answer(
    req: Request<Incoming>,
    keep: tokio::sync::mpsc::UnboundedSender<Value>,
) -> Result<Response<Full<bytes::Bytes>>, hyper::Error> {
    let is_messages = req.method() == hyper::Method::POST && req.uri().path() == "/v1/messages";
    let body = req.into_body().collect().await?.to_bytes();
    if !is_messages {
        return Ok(Response::new(Full::default()));
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    // The conversation's request is the one with the tools (a quota or title request has none).
    if v["tools"].as_array().is_some_and(|t| !t.is_empty()) {
        let _ = keep.send(v);
    }
    Ok(Response::builder()
        .header("content-type", "text/event-stream")
        .body(Full::new(bytes::Bytes::from_static(
            RECORDER_SSE.as_bytes(),
        )))
        .expect("static response parts are valid"))
}

/// Runs Claude Code once in `proj` against a recorder and returns its first full request.
async fn record_claude_code(bin: &Path, home: &Path, proj: &Path) -> Result<Value, String> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", PORT_RECORDER))
        .await
        .map_err(|e| format!("recorder: binding port {PORT_RECORDER}: {e}"))?;
    let (keep, mut kept) = tokio::sync::mpsc::unbounded_channel();
    let server = tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let keep = keep.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| recorder_answer(req, keep.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["-p", FIRST_PROMPT])
        .current_dir(proj)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("ANTHROPIC_") || k.starts_with("CLAUDE_") {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd.env("HOME", home)
        .env(
            "ANTHROPIC_BASE_URL",
            format!("http://127.0.0.1:{PORT_RECORDER}"),
        )
        .env("ANTHROPIC_API_KEY", crate::env::API_KEY)
        .env("DISABLE_TELEMETRY", "1")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("DISABLE_AUTOUPDATER", "1");
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let got = tokio::time::timeout(Duration::from_secs(120), kept.recv()).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    let _ = child.kill().await;
    server.abort();
    match got {
        Ok(Some(v)) => Ok(v),
        _ => Err(format!(
            "{} sent no request with tools within 120 s",
            bin.display()
        )),
    }
}

pub const TURNS: usize = 4;

fn prompt_tokens_total(metrics: &str) -> Option<u64> {
    metrics
        .lines()
        .find(|l| l.starts_with("llamacpp:prompt_tokens_total"))
        .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|v| v as u64)
}

struct Turn {
    total: Option<u64>,
    evaluated: Option<u64>,
    reported_cache_read: Option<u64>,
    error: Option<String>,
}

/// Replays the conversation to `target` (an Anthropic endpoint) while reading llama-server's own counters:
/// prompt tokens evaluated per turn come from llama-server's /metrics, so they do not depend on what the
/// endpoint reports in `usage`.
async fn replay(target: SocketAddr, llama: SocketAddr, recorded: &Value, proj: &str) -> Vec<Turn> {
    let mut out = vec![];
    for t in 0..TURNS {
        let before = load::get_text(llama, "/metrics")
            .await
            .ok()
            .and_then(|m| prompt_tokens_total(&m));
        let resp = load::post_json(target, "/v1/messages", &turn_body(t, recorded, proj)).await;
        let after = load::get_text(llama, "/metrics")
            .await
            .ok()
            .and_then(|m| prompt_tokens_total(&m));
        let evaluated = before.zip(after).map(|(b, a)| a.saturating_sub(b));
        out.push(match resp {
            Ok(v) => {
                let u = &v["usage"];
                let input = u["input_tokens"].as_u64();
                let cache_read = u["cache_read_input_tokens"].as_u64();
                let creation = u["cache_creation_input_tokens"].as_u64().unwrap_or(0);
                Turn {
                    total: input.map(|i| i + cache_read.unwrap_or(0) + creation),
                    evaluated,
                    reported_cache_read: cache_read,
                    error: None,
                }
            }
            Err(e) => Turn {
                total: None,
                evaluated,
                reported_cache_read: None,
                error: Some(format!("{e:#}")),
            },
        });
    }
    out
}

/// `prev`: the turn before, whose whole prompt this one repeats before its own new messages.
fn cell(t: &Turn, prev: Option<&Turn>) -> String {
    if let Some(e) = &t.error {
        return format!(
            "error: {}",
            e.chars().take(120).collect::<String>().replace('|', "/")
        );
    }
    match (t.total, t.evaluated) {
        (Some(total), Some(ev)) if total > 0 => {
            let cached = total.saturating_sub(ev);
            let reported = t
                .reported_cache_read
                .map_or("absent".into(), |c| c.to_string());
            // How much of the previous prompt (what the client sent again, under the billing line) came
            // from the cache; the rest of this prompt is the turn's new messages, which no cache can hold.
            let kept = match prev.and_then(|p| p.total).filter(|&p| p > 0) {
                Some(p) => format!(
                    "; previous prompt reused: {:.1}%",
                    100.0 * cached.min(p) as f64 / p as f64
                ),
                None => String::new(),
            };
            format!(
                "{cached}/{total} = {:.1}% (usage cache_read: {reported}{kept})",
                100.0 * cached as f64 / total as f64
            )
        }
        _ => "—".into(),
    }
}

async fn fresh_server(extra: &[&str]) -> Result<targets::Proc, String> {
    let (bin, model) = crate::env::llama_and_model()?;
    let mut p =
        targets::llama_server(&bin, &model, PORT_LLAMA, extra).map_err(|e| format!("{e:#}"))?;
    targets::wait_ready(&mut p, Duration::from_secs(120))
        .await
        .map_err(|e| format!("{e:#}"))?;
    Ok(p)
}

pub async fn run() -> String {
    let Some(templates) = env_path("LLMCTL_LLAMA_TEMPLATES") else {
        return "Not measured: LLMCTL_LLAMA_TEMPLATES is not set (`eval \"$(bash scripts/test-stack.sh)\"`).\n".into();
    };
    let Some(claude) = env_path("LLMCTL_CLAUDE_BIN") else {
        return "Not measured: LLMCTL_CLAUDE_BIN is not set (`eval \"$(bash scripts/test-stack.sh)\"`).\n".into();
    };
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return format!("Not measured: no temporary directory: {e}\n"),
    };
    let (home, proj) = (dir.path().join("home"), dir.path().join("proj"));
    let made = std::fs::create_dir_all(&home)
        .and_then(|()| std::fs::create_dir_all(&proj))
        .and_then(|()| {
            std::fs::write(
                proj.join("notes.txt"),
                "FIRST LINE: the quick brown fox\nsecond line\nthird line\n",
            )
        });
    if let Err(e) = made {
        return format!("Not measured: cannot prepare Claude Code's directory: {e}\n");
    }
    eprintln!("cache: recording Claude Code's first request");
    let recorded = match record_claude_code(&claude, &home, &proj).await {
        Ok(v) => v,
        Err(e) => return format!("Not measured: {e}\n"),
    };
    let proj = proj.to_string_lossy().into_owned();
    let request_kb = serde_json::to_vec(&recorded).map_or(0, |b| b.len()) / 1024;
    let n_tools = recorded["tools"].as_array().map_or(0, Vec::len);
    let version = std::process::Command::new(&claude)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            // "2.1.197 (Claude Code)"
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            out.split_whitespace().next().map(str::to_owned)
        })
        .unwrap_or_default();
    let template = templates.join("google-gemma-4-31B-it.jinja");
    let template = template.to_string_lossy().into_owned();
    // The Gemma 4 template renders tools, tool calls and tool results; SmolLM2's own template has none. One slot
    // of 32768 tokens holds Claude Code's whole prompt (the model's own training context is 8192). Two threads:
    // only token counts are measured here, and the native endpoint prefills the whole prompt every turn.
    let extra = [
        "-c",
        "32768",
        "--override-kv",
        "llama.context_length=int:32768",
        "-t",
        "2",
        "-tb",
        "2",
        "--jinja",
        "--chat-template-file",
        template.as_str(),
    ];

    let mut columns: Vec<(String, Result<Vec<Turn>, String>)> = vec![];
    eprintln!("cache: replay through llama-server's native /v1/messages");
    columns.push((
        "llama-server native /v1/messages".into(),
        match fresh_server(&extra).await {
            Ok(p) => Ok(replay(p.endpoint.addr, p.endpoint.addr, &recorded, &proj).await),
            Err(e) => Err(e),
        },
    ));
    let llmctl = match env_path("LLMCTL_BIN") {
        None => Err("LLMCTL_BIN is not set".to_string()),
        Some(bin) => match fresh_server(&extra).await {
            Err(e) => Err(e),
            Ok(server) => match targets::llmctl(&bin, PORT_LLMCTL_LLAMA, server.endpoint.addr) {
                Err(e) => Err(format!("{e:#}")),
                Ok(mut p) => match targets::wait_ready(&mut p, Duration::from_secs(60)).await {
                    Err(e) => Err(format!("{e:#}")),
                    Ok(()) => {
                        eprintln!("cache: replay through llmctl");
                        Ok(replay(p.endpoint.addr, server.endpoint.addr, &recorded, &proj).await)
                    }
                },
            },
        },
    };
    columns.push(("llmctl serve-proxy → llama-server".into(), llmctl));

    let mut out = format!(
        "Claude Code {version}'s real first request, recorded from the binary ({request_kb} KB: its system prompt, \
         {n_tools} tools, the user turn with its reminders), then three more turns (Read tool_use/tool_result, text \
         answer + new prompt, Bash tool_use/tool_result), each resending the whole conversation like Claude Code, \
         with its billing line (`cc_version=….xxx; cch=…`, system block 0) rewritten every turn and the \
         cache_control breakpoint moved to the newest user block; max_tokens 8; a fresh llama-server (Gemma 4 \
         template, one 32768-token slot) per column. Cell = prompt tokens llama-server took from its cache / prompt \
         tokens (evaluated tokens from its /metrics; prompt size from the response's usage); \"previous prompt \
         reused\" = the part of the previous turn's prompt (all of which the client sends again) that came from the \
         cache. Turn 1 has nothing cached by construction; the client leaves every earlier part unchanged except \
         the billing line.\n\n| turn |"
    );
    for (name, _) in &columns {
        out.push_str(&format!(" {name} |"));
    }
    out.push_str("\n|---|");
    for _ in &columns {
        out.push_str("---|");
    }
    out.push('\n');
    for t in 0..TURNS {
        out.push_str(&format!("| {} |", t + 1));
        for (_, c) in &columns {
            let cell = match c {
                Ok(turns) => cell(&turns[t], t.checked_sub(1).map(|p| &turns[p])),
                Err(_) => "not measured".into(),
            };
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    for (name, c) in &columns {
        if let Err(e) = c {
            out.push_str(&format!("\n{name} not measured: {e}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_grow_and_move_the_breakpoint() {
        // Shaped like a recorded Claude Code request: billing line first, a breakpoint on the user's text.
        let recorded = json!({
            "model": "claude-opus-4-8", "max_tokens": 32000, "stream": true,
            "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.abc; cch=00000;"},
                       {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
            "tools": [{"name": "Read", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>x</system-reminder>"},
                {"type": "text", "text": FIRST_PROMPT, "cache_control": {"type": "ephemeral"}}]}]
        });
        let t0 = turn_body(0, &recorded, "/p");
        let t3 = turn_body(3, &recorded, "/p");
        assert_eq!(t0["messages"].as_array().unwrap().len(), 1);
        assert_eq!(t3["messages"].as_array().unwrap().len(), 7);
        assert_eq!(
            (t3["max_tokens"].clone(), t3["stream"].clone()),
            (json!(8), json!(false))
        );
        assert_ne!(
            t0["system"][0], t3["system"][0],
            "the billing line changes every turn"
        );
        assert!(
            t3["system"][0]["text"]
                .as_str()
                .unwrap()
                .starts_with(BILLING_PREFIX)
        );
        assert_eq!(t0["system"][1], t3["system"][1]);
        assert_eq!(
            t3["messages"][1]["content"][0]["input"]["file_path"],
            "/p/notes.txt"
        );
        let marked: Vec<_> = t3["messages"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|m| m["content"].as_array().cloned().unwrap_or_default())
            .filter(|b| b.get("cache_control").is_some())
            .collect();
        assert_eq!(marked.len(), 1);
        assert_eq!(marked[0]["tool_use_id"], "toolu_02");
    }

    #[test]
    fn reads_llama_server_prompt_counter() {
        let m = "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.\n# TYPE llamacpp:prompt_tokens_total counter\nllamacpp:prompt_tokens_total 1234\nllamacpp:tokens_predicted_total 5\n";
        assert_eq!(prompt_tokens_total(m), Some(1234));
    }
}
