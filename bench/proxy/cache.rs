//! Prompt-cache reuse: a multi-turn conversation shaped like Claude Code's (claude-code-traffic.md) replayed
//! into a real llama-server, through llmctl and through llama-server's native /v1/messages, printing per turn
//! how much of the prompt llama-server took from its cache.
//!
//! Trimmed to run in a couple of minutes on CPU: a ~2 KB system prompt instead of ~6 KB, two short tools
//! (Read, Bash) instead of 24 (~64 KB), and max_tokens 8.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};

use crate::load;
use crate::{PORT_LLAMA, PORT_LLMCTL_LLAMA, env_path, targets};

const SYSTEM_PROMPT: &str = "\nYou are an interactive agent that helps users with software engineering tasks. \
Use the instructions below and the tools available to you to assist the user.\n\n\
# Doing tasks\nThe user will primarily request you to perform software engineering tasks: solving bugs, adding \
functionality, refactoring code, explaining code. Read the relevant files before changing them. Prefer editing \
existing files to creating new ones. Keep answers short and direct; do not add explanations the user did not ask \
for. When you run a command that changes the system, say what it does first.\n\n\
# Tone and style\nBe concise. Use Github-flavored markdown. Only use emojis if the user asks for them. Output text \
to communicate with the user; everything outside tool use is shown to the user.\n\n\
# Tool usage policy\nWhen several independent pieces of information are needed, call the tools in parallel. Use \
the Read tool to read files instead of cat, head or tail. Use Bash for commands that need a shell.\n\n\
# Environment\nWorking directory: /home/dev/proj\nIs directory a git repo: yes\nPlatform: linux\n\
OS Version: Linux 6.1.0-18-amd64\n";

fn billing(turn: usize) -> Value {
    // Claude Code changes this line on every request (cc_version suffix and cch= hash): a proxy that forwards
    // it verbatim at the top of the prompt invalidates llama-server's whole cache each turn.
    let hexes = ["0df", "e12", "7a3", "b41"];
    let cch = ["5f1a2", "0c9e7", "a83d1", "44b0f"];
    json!({"type": "text", "text": format!(
        "x-anthropic-billing-header: cc_version=2.1.197.{}; cc_entrypoint=sdk-cli; cch={};",
        hexes[turn % 4], cch[turn % 4])})
}

fn tools() -> Value {
    let schema = |props: Value, req: &str| {
        json!({"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
               "properties": props, "required": [req], "additionalProperties": false})
    };
    json!([
        {"name": "Read", "description": "Reads a file from the local filesystem. The file_path must be absolute.",
         "input_schema": schema(json!({"file_path": {"description": "The absolute path to the file to read", "type": "string"}}), "file_path")},
        {"name": "Bash", "description": "Executes a bash command and returns its output.",
         "input_schema": schema(json!({"command": {"description": "The command to execute", "type": "string"}}), "command")}
    ])
}

/// The request body of turn `t` (0-based): each turn appends to the previous one's messages, as the client does,
/// and moves the cache_control breakpoint to the newest user block.
pub fn turn_body(t: usize) -> Value {
    let reminder = "<system-reminder>\nAs you answer the user's questions, you can use the following context:\n\
# currentDate\nToday's date is 2026-11-25.\n\n      IMPORTANT: this context may or may not be relevant to your tasks.\n</system-reminder>\n\n";
    let mut messages = vec![
        json!({"role": "user", "content": [{"type": "text", "text": reminder},
                                           {"type": "text", "text": "read the file notes.txt and tell me its first line"}]}),
        json!({"role": "system", "content": "Available agent types for the Agent tool:\n- general-purpose: researches \
complex questions and runs multi-step tasks.\n\nThe following skills are available for use with the Skill tool:\n- review: reviews a change."}),
    ];
    let later = [
        json!({"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "Read",
                "input": {"file_path": "/home/dev/proj/notes.txt"}}]}),
        json!({"role": "user", "content": [{"tool_use_id": "toolu_01", "type": "tool_result",
                "content": "1\tFIRST LINE: the quick brown fox\n2\tsecond line\n3\tthird line\n4\t"}]}),
        json!({"role": "assistant", "content": [{"type": "text", "text": "The first line is: FIRST LINE: the quick brown fox"}]}),
        json!({"role": "user", "content": [{"type": "text", "text": "now count the lines of notes.txt"}]}),
        json!({"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_02", "name": "Bash",
                "input": {"command": "wc -l /home/dev/proj/notes.txt"}}]}),
        json!({"role": "user", "content": [{"tool_use_id": "toolu_02", "type": "tool_result",
                "content": "4 /home/dev/proj/notes.txt"}]}),
    ];
    messages.extend(later.iter().take(2 * t).cloned());
    // The breakpoint sits on the last block of the last user message only.
    if let Some(last) = messages.iter_mut().rev().find(|m| m["role"] == "user")
        && let Some(block) = last["content"].as_array_mut().and_then(|b| b.last_mut())
    {
        block["cache_control"] = json!({"type": "ephemeral"});
    }
    json!({
        "model": "claude-opus-4-8",
        "messages": messages,
        "system": [billing(t),
                   {"type": "text", "text": "You are a Claude agent, built on Anthropic's Claude Agent SDK.", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": SYSTEM_PROMPT, "cache_control": {"type": "ephemeral"}}],
        "tools": tools(),
        "metadata": {"user_id": "{\"device_id\":\"0000\",\"account_uuid\":\"\",\"session_id\":\"bench\"}"},
        "max_tokens": 8,
        "stream": false
    })
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
async fn replay(target: SocketAddr, llama: SocketAddr) -> Vec<Turn> {
    let mut out = vec![];
    for t in 0..TURNS {
        let before = load::get_text(llama, "/metrics")
            .await
            .ok()
            .and_then(|m| prompt_tokens_total(&m));
        let resp = load::post_json(target, "/v1/messages", &turn_body(t)).await;
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
                    "; previous prompt reused: {:.0}%",
                    100.0 * cached.min(p) as f64 / p as f64
                ),
                None => String::new(),
            };
            format!(
                "{cached}/{total} = {:.0}% (usage cache_read: {reported}{kept})",
                100.0 * cached as f64 / total as f64
            )
        }
        _ => "—".into(),
    }
}

async fn fresh_server(extra: &[&str]) -> Result<targets::Proc, String> {
    let (Some(bin), Some(model)) = (
        env_path("LLMCTL_LLAMA_SERVER"),
        env_path("LLMCTL_TEST_MODEL"),
    ) else {
        return Err("LLMCTL_LLAMA_SERVER / LLMCTL_TEST_MODEL are not set (`eval \"$(bash scripts/test-stack.sh)\"`)".into());
    };
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
    let template = templates.join("google-gemma-4-31B-it.jinja");
    let template = template.to_string_lossy().into_owned();
    // The Gemma 4 template renders tools, tool calls and tool results; SmolLM2's own template has none.
    let extra = [
        "-c",
        "8192",
        "--jinja",
        "--chat-template-file",
        template.as_str(),
    ];

    let mut columns: Vec<(String, Result<Vec<Turn>, String>)> = vec![];
    eprintln!("cache: replay through llama-server's native /v1/messages");
    columns.push((
        "llama-server native /v1/messages".into(),
        match fresh_server(&extra).await {
            Ok(p) => Ok(replay(p.endpoint.addr, p.endpoint.addr).await),
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
                        Ok(replay(p.endpoint.addr, server.endpoint.addr).await)
                    }
                },
            },
        },
    };
    columns.push(("llmctl serve-proxy → llama-server".into(), llmctl));

    let mut out = String::from(
        "Four turns (prompt, Read tool_use/tool_result, text answer + new prompt, Bash tool_use/tool_result), each \
         resending the whole conversation like Claude Code, with its changing billing line (`cc_version=….xxx; \
         cch=…`) as system block 0, the role-`system` message and the moving cache_control breakpoint. Trimmed for \
         CPU: short system prompt, 2 tools, max_tokens 8; a fresh llama-server (Gemma 4 template, -c 8192) per column. \
         Cell = prompt tokens llama-server took from its cache / prompt tokens (evaluated tokens from its /metrics; \
         prompt size from the response's usage); \"previous prompt reused\" = the part of the previous turn's prompt \
         (all of which the client sends again) that came from the cache. Turn 1 has nothing cached by construction; \
         the client leaves every earlier part unchanged except the billing line, which it rewrites each turn. The \
         trimming makes each turn's new messages (40-95 tokens here) 5-12% of the prompt; in a real Claude Code \
         conversation (a 76 KB request with 24 tools, roughly 19k tokens) they are under 1%.\n\n| turn |",
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
        let t0 = turn_body(0);
        let t3 = turn_body(3);
        assert_eq!(t0["messages"].as_array().unwrap().len(), 2);
        assert_eq!(t3["messages"].as_array().unwrap().len(), 8);
        assert_ne!(
            t0["system"][0], t3["system"][0],
            "the billing line changes every turn"
        );
        assert_eq!(t0["system"][2], t3["system"][2]);
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
