//! llama.cpp's own Anthropic endpoint has no separate proxy process: its cost is measured on a real
//! llama-server, relative to the same server's /v1/chat/completions, next to llmctl in front of that server.

use std::time::Duration;

use crate::load::{self, Api, Endpoint};
use crate::report::us;
use crate::stats::{self, Summary};
use crate::{PORT_LLAMA, PORT_LLMCTL_LLAMA, env_path, targets};

struct Figures {
    name: String,
    nonstream: Option<Summary>,
    first_byte: Option<Summary>,
    first_text: Option<Summary>,
    errors: String,
}

async fn figures(name: &str, ep: &Endpoint, n: usize) -> Figures {
    // Sequential requests with the same short prompt: llama-server reuses its cache, so the model's own work
    // is a handful of tokens and the endpoint's cost is what differs.
    let r = load::sequential(ep, n).await;
    let s = load::streams(ep, 1, 0, 0, Duration::ZERO, Some(n)).await;
    let mut errors = vec![];
    for (what, count, first) in [
        ("non-stream", r.errors, r.first_error),
        ("stream", s.errors, s.first_error),
    ] {
        if let Some(e) = first.filter(|_| count > 0) {
            let e: String = e.chars().take(300).collect();
            errors.push(format!("{count} of {n} {what} requests failed, first: {e}"));
        }
    }
    let errors = errors.join("; ").replace('|', "/").replace('\n', " ");
    let lat = r.latencies_us;
    Figures {
        name: name.into(),
        nonstream: stats::summarize(lat),
        first_byte: stats::summarize(s.first_byte_us),
        first_text: stats::summarize(s.first_content_us),
        errors,
    }
}

fn cell(s: Option<Summary>, base: Option<Summary>) -> String {
    match (s, base) {
        (Some(s), Some(b)) => format!("{} / {} (+{} p50)", us(s.p50), us(s.p99), us(s.p50 - b.p50)),
        (Some(s), None) => format!("{} / {}", us(s.p50), us(s.p99)),
        _ => "—".into(),
    }
}

pub async fn run() -> String {
    let (bin, model) = match crate::env::llama_and_model() {
        Ok(found) => found,
        Err(why) => return format!("Not measured: {why}.\n"),
    };
    let n: usize = std::env::var("BENCH_NATIVE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let mut server = match targets::llama_server(&bin, &model, PORT_LLAMA, &["-c", "4096"]) {
        Ok(s) => s,
        Err(e) => return format!("Not measured: {e:#}\n"),
    };
    server.endpoint.max_tokens = 4;
    eprintln!("native: starting llama-server");
    if let Err(e) = targets::wait_ready(&mut server, Duration::from_secs(120)).await {
        return format!("Not measured: {e:#}\n");
    }
    let chat = server.endpoint.clone();
    let native = Endpoint {
        api: Api::Anthropic,
        ..chat.clone()
    };
    let mut rows = vec![figures("llama-server /v1/chat/completions", &chat, n).await];
    rows.push(figures("llama-server native /v1/messages", &native, n).await);
    let mut note = String::new();
    match env_path("LLMCTL_BIN") {
        Some(llmctl) => match targets::llmctl(&llmctl, PORT_LLMCTL_LLAMA, chat.addr) {
            Ok(mut p) => {
                p.endpoint.max_tokens = 4;
                match targets::wait_ready(&mut p, Duration::from_secs(30)).await {
                    Ok(()) => rows
                        .push(figures("llmctl serve-proxy → llama-server", &p.endpoint, n).await),
                    Err(e) => note = format!("\nllmctl not measured here: {e:#}\n"),
                }
            }
            Err(e) => note = format!("\nllmctl not measured here: {e:#}\n"),
        },
        None => note = "\nllmctl not measured here: LLMCTL_BIN is not set.\n".into(),
    }
    drop(server);
    let base = (rows[0].nonstream, rows[0].first_byte, rows[0].first_text);
    let mut out = format!(
        "SmolLM2-135M on CPU, the same short prompt each time (cached), max_tokens 4, {n} sequential requests per \
         figure; p50 / p99, and in brackets the p50 added over the server's own /v1/chat/completions. The model's \
         time dominates, so only differences of a millisecond or more mean anything here.\n\n\
         | endpoint | non-stream latency | stream first byte | stream first text event |\n|---|---|---|---|\n"
    );
    for r in &rows {
        let err = if r.errors.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.errors)
        };
        out.push_str(&format!(
            "| {}{err} | {} | {} | {} |\n",
            r.name,
            cell(r.nonstream, base.0),
            cell(r.first_byte, base.1),
            cell(r.first_text, base.2)
        ));
    }
    out.push_str(&note);
    out
}
