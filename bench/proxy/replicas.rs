//! Issue 12's "Measured", against two real llama-servers (the test model, one thread each): prompt-cache reuse
//! of interleaved sessions through llmctl's router, nginx round-robin and one replica alone; the throughput of
//! concurrent sessions on two replicas against one; and what is lost when a replica dies mid-run.
//!
//! Off the default run (it takes minutes): `BENCH_ONLY=replicas bash bench/run.sh`.

use std::cell::Cell;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::env::{
    API_KEY, PORT_LLMCTL_ONE, PORT_LLMCTL_REPLICAS, PORT_NGINX_RR, PORT_REPLICA_A, PORT_REPLICA_B,
};
use crate::{env_path, targets};

/// Interleaved sessions in the cache measurement, and turns each (turn n of every session, then turn n + 1).
const SESSIONS: usize = 3;
const TURNS: usize = 4;
/// The throughput measurement: concurrent sessions, turns each, and rounds (2 replicas and 1 in turns).
const TP_SESSIONS: usize = 4;
const TP_TURNS: usize = 3;
const TP_ROUNDS: usize = 2;
/// Answers are kept short: the prompt is what is measured, and what costs.
const MAX_TOKENS: u64 = 8;
/// Each replica as the CI test runs it: two slots sharing 8192 tokens (llama-server keeps what leaves a slot
/// in its host-memory prompt cache, 8 GiB by default). `-t 1 -tb 1` come from targets::llama_server.
const LLAMA_ARGS: [&str; 4] = ["-c", "8192", "-np", "2"];
/// The failover run: concurrent clients, each alternating streaming and non-streaming requests; how long
/// they run before the kill (at least) and after it.
const FO_CLIENTS: usize = 4;
const FO_BEFORE: Duration = Duration::from_secs(3);
const FO_AFTER: Duration = Duration::from_secs(6);
const FO_MAX_TOKENS: u64 = 48;

const SYSTEM_LINE: &str = "You are an interactive CLI tool that helps users with software engineering tasks. \
                           Use the instructions below and the tools available to you to assist the user. ";

/// The system prompt every session shares (as Claude Code's sessions share theirs), ~360 tokens.
fn system() -> String {
    SYSTEM_LINE.repeat(12)
}

/// A session's own first message: a file it pasted, different in every session (~1,850 tokens).
fn pasted(salt: &str, s: usize) -> String {
    let mut out = format!("[{salt}] Session {s}. Here is the file I am working on:\n");
    for i in 0..60 {
        out.push_str(&format!(
            "fn step_{s}_{i}(x: u32) -> u32 {{ x * {} + {} }}\n",
            i + 3,
            s * 7 + i
        ));
    }
    out.push_str(&format!("What does step_{s}_0 do?"));
    out
}

/// Turn `n` (1-based) of session `s`: the pasted file, then a short answer and question per later turn (~30
/// tokens each), as an agent's conversation grows by a little on each turn.
fn messages(salt: &str, s: usize, n: usize) -> Vec<Value> {
    let mut m = vec![json!({"role": "user", "content": pasted(salt, s)})];
    for t in 1..n {
        m.push(json!({"role": "assistant", "content":
            format!("It multiplies x by {} and adds {}.", t + 2, s * 7 + t - 1)}));
        m.push(
            json!({"role": "user", "content": format!("And step_{s}_{t}? Answer in one line.")}),
        );
    }
    m
}

/// The turn through a Messages front door, naming its session as Claude Code does (`metadata.user_id`).
fn anthropic_body(salt: &str, s: usize, n: usize) -> Value {
    let user =
        json!({"device_id": "bench", "account_uuid": "", "session_id": format!("{salt}-{s}")});
    json!({"model": "bench", "max_tokens": MAX_TOKENS, "stream": false, "system": system(),
           "messages": messages(salt, s, n), "metadata": {"user_id": user.to_string()}})
}

/// The same turn as chat-completions, for nginx in front of llama-server.
fn openai_body(salt: &str, s: usize, n: usize) -> Value {
    let mut m = vec![json!({"role": "system", "content": system()})];
    m.extend(messages(salt, s, n));
    json!({"model": "bench", "max_tokens": MAX_TOKENS, "stream": false, "messages": m})
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Reuse {
    prompt: u64,
    cached: u64,
}

/// Prompt tokens and those taken from the cache, from an answer: Anthropic's usage (llmctl), or
/// llama-server's own (`prompt_tokens_details.cached_tokens`, else `timings.cache_n`).
fn reuse_of(v: &Value) -> Option<Reuse> {
    let u = &v["usage"];
    if let Some(input) = u["input_tokens"].as_u64() {
        let cached = u["cache_read_input_tokens"].as_u64().unwrap_or(0);
        let created = u["cache_creation_input_tokens"].as_u64().unwrap_or(0);
        return Some(Reuse {
            prompt: input + cached + created,
            cached,
        });
    }
    let prompt = u["prompt_tokens"].as_u64()?;
    let cached = u["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .or_else(|| v["timings"]["cache_n"].as_u64())
        .unwrap_or(0);
    Some(Reuse { prompt, cached })
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("a plain HTTP client")
}

fn request(c: &reqwest::Client, url: &str, body: &Value) -> reqwest::RequestBuilder {
    c.post(url)
        .header("x-api-key", API_KEY)
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("anthropic-version", "2023-06-01")
        .json(body)
}

async fn post(c: &reqwest::Client, url: &str, body: &Value) -> Result<Value, String> {
    let r = request(c, url, body)
        .send()
        .await
        .map_err(|e| format!("{e}"))?;
    let status = r.status();
    let text = r.text().await.map_err(|e| format!("{e}"))?;
    if !status.is_success() {
        return Err(format!(
            "HTTP {status}: {}",
            text.chars().take(200).collect::<String>()
        ));
    }
    serde_json::from_str(&text).map_err(|e| format!("not JSON ({e})"))
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------------------
// Starting what is measured

struct Bins {
    llama: PathBuf,
    model: PathBuf,
    llmctl: PathBuf,
    nginx: Option<(PathBuf, String)>,
}

async fn ready(p: Result<targets::Proc>, secs: u64) -> Result<targets::Proc, String> {
    let mut p = p.map_err(|e| format!("{e:#}"))?;
    targets::wait_ready(&mut p, Duration::from_secs(secs))
        .await
        .map_err(|e| format!("{e:#}"))?;
    Ok(p)
}

type Result<T, E = anyhow::Error> = std::result::Result<T, E>;

async fn replica(b: &Bins, port: u16) -> Result<targets::Proc, String> {
    ready(
        targets::llama_server(&b.llama, &b.model, port, &LLAMA_ARGS),
        120,
    )
    .await
}

async fn llmctl_over(b: &Bins, port: u16, ups: &[SocketAddr]) -> Result<targets::Proc, String> {
    ready(targets::llmctl_over(&b.llmctl, port, ups), 60).await
}

fn url(p: &targets::Proc, path: &str) -> String {
    format!("http://{}{path}", p.endpoint.addr)
}

// ---------------------------------------------------------------------------------------------------------
// 1. Prompt-cache reuse

/// `[turn][session]`: what each answer reported, or why there was none.
type Turns = Vec<Vec<Result<Reuse, String>>>;

async fn reuse_run(url: &str, anthropic: bool, salt: &str) -> Turns {
    let c = client();
    let mut out = vec![];
    for n in 1..=TURNS {
        let mut row = vec![];
        for s in 0..SESSIONS {
            let body = if anthropic {
                anthropic_body(salt, s, n)
            } else {
                openai_body(salt, s, n)
            };
            row.push(post(&c, url, &body).await.and_then(|v| {
                reuse_of(&v).ok_or_else(|| {
                    format!(
                        "no usage in {}",
                        v.to_string().chars().take(200).collect::<String>()
                    )
                })
            }));
        }
        out.push(row);
    }
    out
}

struct ReuseSummary {
    share: f64,
    lowest: f64,
    below_half: usize,
    turns: usize,
    prompt_avg: u64,
    errors: Vec<String>,
}

fn share(r: &Reuse) -> f64 {
    if r.prompt == 0 {
        0.0
    } else {
        r.cached as f64 / r.prompt as f64
    }
}

/// Turns 2 and later: the cached share of all their prompt tokens, the lowest single turn's, and how many
/// turns took less than half their prompt from the cache.
fn summarize(t: &Turns) -> ReuseSummary {
    let later: Vec<&Reuse> = t
        .iter()
        .skip(1)
        .flatten()
        .filter_map(|r| r.as_ref().ok())
        .collect();
    let (prompt, cached) = later
        .iter()
        .fold((0, 0), |(p, c), r| (p + r.prompt, c + r.cached));
    ReuseSummary {
        share: if prompt == 0 {
            0.0
        } else {
            cached as f64 / prompt as f64
        },
        lowest: later.iter().map(|r| share(r)).fold(f64::NAN, f64::min),
        below_half: later.iter().filter(|r| share(r) < 0.5).count(),
        turns: later.len(),
        prompt_avg: if later.is_empty() {
            0
        } else {
            prompt / later.len() as u64
        },
        errors: t
            .iter()
            .flatten()
            .filter_map(|r| r.as_ref().err().cloned())
            .collect(),
    }
}

fn pct(x: f64) -> String {
    if x.is_nan() {
        "—".into()
    } else {
        format!("{:.0}%", 100.0 * x)
    }
}

fn met(ok: Option<bool>) -> &'static str {
    ok.map_or("n/a", |b| if b { "yes" } else { "**no**" })
}

fn reuse_table(cols: &[(&str, Result<Turns, String>)]) -> String {
    let mut out = String::from(
        "| routing | prompt tokens from the cache, turns ≥ 2 | lowest turn | turns ≥ 2 under 50% | goal | met |\n\
         |---|---|---|---|---|---|\n",
    );
    for (i, (name, r)) in cols.iter().enumerate() {
        let goal = if i == 0 { "≥ 90%" } else { "(baseline)" };
        match r {
            Ok(t) => {
                let s = summarize(t);
                let ok = (i == 0).then_some(s.share >= 0.9 && s.errors.is_empty());
                let errs = if s.errors.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({} failed, first: {})",
                        s.errors.len(),
                        s.errors[0].replace('|', "/").replace('\n', " ")
                    )
                };
                out.push_str(&format!(
                    "| {name}{errs} | {} (of ~{} tokens per turn) | {} | {} of {} | {goal} | {} |\n",
                    pct(s.share),
                    s.prompt_avg,
                    pct(s.lowest),
                    s.below_half,
                    s.turns,
                    met(ok)
                ));
            }
            Err(e) => out.push_str(&format!(
                "| {name} | not measured: {} | | | {goal} | n/a |\n",
                e.replace('|', "/").replace('\n', " ")
            )),
        }
    }
    // Per turn: each session's share, to show where a baseline loses it.
    out.push_str("\nPer turn, each session's share from the cache (sessions 1-3):\n\n| turn |");
    for (name, _) in cols {
        out.push_str(&format!(" {name} |"));
    }
    out.push_str("\n|---|");
    for _ in cols {
        out.push_str("---|");
    }
    out.push('\n');
    for n in 0..TURNS {
        out.push_str(&format!("| {} |", n + 1));
        for (_, r) in cols {
            let cell = match r {
                Ok(t) => t[n]
                    .iter()
                    .map(|x| x.as_ref().map_or("error".into(), |r| pct(share(r))))
                    .collect::<Vec<_>>()
                    .join(" "),
                Err(_) => "—".into(),
            };
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// 2. Throughput of concurrent sessions

struct Round {
    wall: Duration,
    turns: usize,
    errors: Vec<String>,
}

/// TP_SESSIONS sessions at once, each its TP_TURNS turns one after the other.
async fn concurrent_sessions(url: &str, salt: &str) -> Round {
    let c = client();
    let start = Instant::now();
    let sessions = (0..TP_SESSIONS).map(|s| {
        let c = &c;
        async move {
            let mut ok = 0;
            let mut errors = vec![];
            for n in 1..=TP_TURNS {
                match post(c, url, &anthropic_body(salt, s, n)).await {
                    Ok(_) => ok += 1,
                    Err(e) => errors.push(e),
                }
            }
            (ok, errors)
        }
    });
    let done = join_all(sessions).await;
    Round {
        wall: start.elapsed(),
        turns: done.iter().map(|d| d.0).sum(),
        errors: done.into_iter().flat_map(|d| d.1).collect(),
    }
}

struct Throughput {
    two: Vec<Round>,
    one: Vec<Round>,
    load_before: String,
    load_after: String,
}

fn throughput_table(t: &Throughput) -> String {
    fn sum(rs: &[Round]) -> (f64, usize, Vec<&String>) {
        (
            rs.iter().map(|r| r.wall.as_secs_f64()).sum::<f64>(),
            rs.iter().map(|r| r.turns).sum::<usize>(),
            rs.iter().flat_map(|r| r.errors.iter()).collect::<Vec<_>>(),
        )
    }
    let (w2, n2, e2) = sum(&t.two);
    let (w1, n1, e1) = sum(&t.one);
    let walls = |rs: &[Round]| {
        rs.iter()
            .map(|r| format!("{:.1} s", r.wall.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let errs = |e: &[&String]| {
        if e.is_empty() {
            String::new()
        } else {
            format!(
                " ({} failed, first: {})",
                e.len(),
                e[0].replace('|', "/").replace('\n', " ")
            )
        }
    };
    let rate2 = n2 as f64 / w2.max(1e-9);
    let rate1 = n1 as f64 / w1.max(1e-9);
    let x = rate2 / rate1.max(1e-9);
    let mut out = String::from(
        "| llmctl serve-proxy over | wall time per round | turns/s | goal | met |\n|---|---|---|---|---|\n",
    );
    out.push_str(&format!(
        "| 1 replica{} | {} | {rate1:.2} | | |\n",
        errs(&e1),
        walls(&t.one)
    ));
    out.push_str(&format!(
        "| 2 replicas{} | {} | {rate2:.2} | | |\n",
        errs(&e2),
        walls(&t.two)
    ));
    out.push_str(&format!(
        "| 2 replicas / 1 | | **{x:.2}×** | ≥ 1.8× | {} |\n",
        met(Some(x >= 1.8 && e1.is_empty() && e2.is_empty()))
    ));
    out.push_str(&format!(
        "\nLoad average (1, 5, 15 min) before / after this measurement: {} / {}.\n",
        t.load_before, t.load_after
    ));
    out
}

// ---------------------------------------------------------------------------------------------------------
// 3. Failover

#[derive(Default)]
struct Tally {
    nonstream_ok: usize,
    /// Non-streaming requests that failed: the client had received nothing, so each is lost.
    nonstream_lost: usize,
    stream_ok: usize,
    /// Streams refused or failed before any byte of an answer: lost like the above.
    stream_lost: usize,
    /// Streams that ended with the protocol's error event, after text had been streamed...
    stream_error_event: usize,
    /// ... and before any text (the answer's head had been sent: too late to go elsewhere).
    stream_error_before_text: usize,
    /// Streams that ended with neither `message_stop` nor an error event.
    stream_cut: usize,
    first_lost: Option<String>,
    first_cut: Option<String>,
}

enum Outcome {
    Ok,
    Lost(String),
    ErrorEvent { after_text: bool },
    Cut(String),
}

fn fo_body(w: usize, i: usize, stream: bool) -> Value {
    let user =
        json!({"device_id": "bench", "account_uuid": "", "session_id": format!("failover-{w}")});
    json!({"model": "bench", "max_tokens": FO_MAX_TOKENS, "stream": stream,
           "metadata": {"user_id": user.to_string()},
           "messages": [{"role": "user", "content":
               format!("Client {w}, request {i}: count from 1 to 100, one number per line.")}]})
}

async fn one_stream(c: &reqwest::Client, url: &str, body: &Value, live: &Cell<usize>) -> Outcome {
    let r = match request(c, url, body).send().await {
        Ok(r) => r,
        Err(e) => return Outcome::Lost(format!("{e}")),
    };
    if !r.status().is_success() {
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        return Outcome::Lost(format!(
            "HTTP {status}: {}",
            text.chars().take(200).collect::<String>()
        ));
    }
    let mut body = r.bytes_stream();
    let mut text = String::new();
    let mut counted = false;
    let mut broken = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(b) => text.push_str(&String::from_utf8_lossy(&b)),
            Err(e) => {
                broken = Some(format!("{e}"));
                break;
            }
        }
        if !counted && text.contains("content_block_delta") {
            counted = true;
            live.set(live.get() + 1);
        }
    }
    if counted {
        live.set(live.get() - 1);
    }
    let first_text = text.find("content_block_delta");
    if let Some(e) = text.find("event: error") {
        return Outcome::ErrorEvent {
            after_text: first_text.is_some_and(|t| t < e),
        };
    }
    if text.contains("message_stop") {
        return Outcome::Ok;
    }
    Outcome::Cut(
        broken.unwrap_or_else(|| format!("ended after {} bytes without message_stop", text.len())),
    )
}

/// The replica (index into `ups`) with the most requests in flight, by llmctl's /health.
async fn busiest(c: &reqwest::Client, health: &str, ups: &[SocketAddr]) -> Option<usize> {
    let v: Value = c.get(health).send().await.ok()?.json().await.ok()?;
    let (url, _) = v["replicas"]
        .as_array()?
        .iter()
        .filter_map(|r| Some((r["url"].as_str()?.to_owned(), r["in_flight"].as_u64()?)))
        .filter(|(_, n)| *n > 0)
        .max_by_key(|(_, n)| *n)?;
    ups.iter().position(|u| url.contains(&u.to_string()))
}

struct Failover {
    tally: Tally,
    killed: Option<String>,
    streams_live_at_kill: usize,
    load_before: String,
    load_after: String,
}

/// FO_CLIENTS clients alternate streaming and non-streaming requests through llmctl over `servers`; once a
/// stream is carrying text, the busiest replica is killed (SIGKILL) and the clients go on for FO_AFTER.
async fn failover(
    llmctl: &targets::Proc,
    servers: &mut [targets::Proc],
    ups: &[SocketAddr],
) -> Failover {
    let load_before = load_avg();
    let c = client();
    let msgs = url(llmctl, "/v1/messages");
    let health = url(llmctl, "/health");
    let stop_at: Cell<Option<Instant>> = Cell::new(None);
    let live = Cell::new(0usize);
    let tally = std::cell::RefCell::new(Tally::default());
    let clients = (0..FO_CLIENTS).map(|w| {
        let (c, msgs, stop_at, live, tally) = (&c, &msgs, &stop_at, &live, &tally);
        async move {
            let mut i = 0;
            while stop_at.get().is_none_or(|t| Instant::now() < t) {
                let stream = (i + w) % 2 == 0;
                let body = fo_body(w, i, stream);
                i += 1;
                if !stream {
                    let r = post(c, msgs, &body).await;
                    let mut t = tally.borrow_mut();
                    match r {
                        Ok(_) => t.nonstream_ok += 1,
                        Err(e) => {
                            t.nonstream_lost += 1;
                            t.first_lost.get_or_insert(e);
                        }
                    }
                    continue;
                }
                let o = one_stream(c, msgs, &body, live).await;
                let mut t = tally.borrow_mut();
                match o {
                    Outcome::Ok => t.stream_ok += 1,
                    Outcome::Lost(e) => {
                        t.stream_lost += 1;
                        t.first_lost.get_or_insert(e);
                    }
                    Outcome::ErrorEvent { after_text: true } => t.stream_error_event += 1,
                    Outcome::ErrorEvent { after_text: false } => t.stream_error_before_text += 1,
                    Outcome::Cut(e) => {
                        t.stream_cut += 1;
                        t.first_cut.get_or_insert(e);
                    }
                }
            }
        }
    });
    let controller = async {
        tokio::time::sleep(FO_BEFORE).await;
        // Wait (up to 20 s) for a stream carrying text and a replica with work in flight.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut victim = None;
        while Instant::now() < deadline {
            if live.get() > 0
                && let Some(v) = busiest(&c, &health, ups).await
            {
                victim = Some(v);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let live_at_kill = live.get();
        let killed = victim.map(|v| {
            servers[v].kill();
            ups[v].to_string()
        });
        stop_at.set(Some(Instant::now() + FO_AFTER));
        (killed, live_at_kill)
    };
    let (_, (killed, streams_live_at_kill)) = tokio::join!(join_all(clients), controller);
    Failover {
        tally: tally.into_inner(),
        killed,
        streams_live_at_kill,
        load_before,
        load_after: load_avg(),
    }
}

fn failover_table(f: &Failover) -> String {
    let t = &f.tally;
    let lost = t.nonstream_lost + t.stream_lost;
    let streams = t.stream_ok
        + t.stream_lost
        + t.stream_error_event
        + t.stream_error_before_text
        + t.stream_cut;
    let mut out = format!(
        "Replica killed: {} (SIGKILL), with {} stream(s) carrying text at that moment. Requests during the run: \
         {} non-streaming, {} streaming.\n\n\
         | measure | figure | goal | met |\n|---|---|---|---|\n",
        f.killed
            .as_deref()
            .unwrap_or("none (no stream was in progress within 20 s)"),
        f.streams_live_at_kill,
        t.nonstream_ok + t.nonstream_lost,
        streams,
    );
    out.push_str(&format!(
        "| requests lost before the answer started (non-streaming failed: {}, streams refused: {}) | {lost} | 0 | {} |\n",
        t.nonstream_lost,
        t.stream_lost,
        met(f.killed.as_ref().map(|_| lost == 0))
    ));
    out.push_str(&format!(
        "| streams in progress that ended with an error event | {} | every stream cut by the kill | {} |\n",
        t.stream_error_event,
        met(f.killed.as_ref().map(|_| t.stream_cut == 0))
    ));
    out.push_str(&format!(
        "| streams cut silently (no message_stop, no error event) | {} | 0 | {} |\n",
        t.stream_cut,
        met(f.killed.as_ref().map(|_| t.stream_cut == 0))
    ));
    out.push_str(&format!(
        "| streams that ended with an error event before any text (head already sent) | {} | — | n/a |\n",
        t.stream_error_before_text
    ));
    out.push_str(&format!(
        "| requests that succeeded (non-streaming / streaming) | {} / {} | — | n/a |\n",
        t.nonstream_ok, t.stream_ok
    ));
    for (what, e) in [("first lost", &t.first_lost), ("first cut", &t.first_cut)] {
        if let Some(e) = e {
            out.push_str(&format!(
                "\n{what}: {}\n",
                e.replace('|', "/")
                    .replace('\n', " ")
                    .chars()
                    .take(300)
                    .collect::<String>()
            ));
        }
    }
    out.push_str(&format!(
        "\nLoad average before / after this measurement: {} / {}.\n",
        f.load_before, f.load_after
    ));
    out
}

// ---------------------------------------------------------------------------------------------------------

/// The replicas section's block inside the hand-written part, replaced by each run of that section.
pub const REPLICAS_BEGIN: &str =
    "<!-- replicas: written by `BENCH_ONLY=replicas bash bench/run.sh` -->";
pub const REPLICAS_END: &str = "<!-- /replicas -->";

/// `kept` (the hand-written part, from its marker on) with the replicas block replaced by `block`, or
/// `block` put right after the marker when there is none yet.
pub fn splice(kept: &str, block: &str) -> String {
    let block = format!("{REPLICAS_BEGIN}\n{}\n{REPLICAS_END}", block.trim_end());
    if let Some(b) = kept.find(REPLICAS_BEGIN)
        && let Some(e) = kept[b..].find(REPLICAS_END)
    {
        let e = b + e + REPLICAS_END.len();
        return format!("{}{block}{}", &kept[..b], &kept[e..]);
    }
    match kept.find('\n') {
        Some(i) => format!("{}\n{block}\n{}", &kept[..i], &kept[i + 1..]),
        None => format!("{kept}\n{block}\n"),
    }
}

pub async fn run() -> String {
    let (llama, model) = match crate::env::llama_and_model() {
        Ok(found) => found,
        Err(why) => return format!("Not measured: {why}.\n"),
    };
    let Some(llmctl) = env_path("LLMCTL_BIN") else {
        return "Not measured: LLMCTL_BIN is not set.\n".into();
    };
    let nginx = env_path("BENCH_NGINX_BIN")
        .map(|b| (b, std::env::var("BENCH_NGINX_VERSION").unwrap_or_default()));
    let b = Bins {
        llama,
        model,
        llmctl,
        nginx,
    };
    match measure(&b).await {
        Ok(s) => s,
        Err(e) => format!("Not measured: {e}\n"),
    }
}

async fn measure(b: &Bins) -> Result<String, String> {
    let started = Instant::now();
    let load_start = load_avg();
    let ups = [
        SocketAddr::from(([127, 0, 0, 1], PORT_REPLICA_A)),
        SocketAddr::from(([127, 0, 0, 1], PORT_REPLICA_B)),
    ];
    let pair = || async {
        let (a, b2) = tokio::join!(replica(b, PORT_REPLICA_A), replica(b, PORT_REPLICA_B));
        Ok::<_, String>([a?, b2?])
    };

    // 1. Cache reuse, each routing on fresh replicas (nothing cached from the one before).
    eprintln!("replicas: cache reuse through llmctl over 2 replicas");
    let servers = pair().await?;
    let router = match llmctl_over(b, PORT_LLMCTL_REPLICAS, &ups).await {
        Ok(p) => Ok(reuse_run(&url(&p, "/v1/messages"), true, "router").await),
        Err(e) => Err(e),
    };
    drop(servers);
    eprintln!("replicas: cache reuse through nginx round-robin over 2 replicas");
    let rr = match &b.nginx {
        None => Err("BENCH_NGINX_BIN is not set (bench/peers.sh installs nginx)".to_string()),
        Some((bin, v)) => {
            let servers = pair().await?;
            let r = match ready(targets::nginx(bin, v, PORT_NGINX_RR, &ups), 10).await {
                Ok(p) => Ok(reuse_run(&url(&p, "/v1/chat/completions"), false, "rr").await),
                Err(e) => Err(e),
            };
            drop(servers);
            r
        }
    };
    eprintln!("replicas: cache reuse through llmctl over 1 replica");
    let a = replica(b, PORT_REPLICA_A).await?;
    let one = llmctl_over(b, PORT_LLMCTL_ONE, &ups[..1]).await?;
    let alone = reuse_run(&url(&one, "/v1/messages"), true, "one").await;
    let load_reuse = load_avg();

    // 2. Throughput: llmctl over A alone and over A + B, in turns, each round with new sessions.
    eprintln!("replicas: throughput, 2 replicas against 1");
    let bsrv = replica(b, PORT_REPLICA_B).await?;
    let mut servers = [a, bsrv];
    let two = llmctl_over(b, PORT_LLMCTL_REPLICAS, &ups).await?;
    // Both replicas hold the shared system prompt before the first round, as A already does.
    let c = client();
    for u in &ups {
        post(
            &c,
            &format!("http://{u}/v1/chat/completions"),
            &openai_body("warm", 0, 1),
        )
        .await
        .map_err(|e| format!("warming {u}: {e}"))?;
    }
    let tp_before = load_avg();
    let (mut r2, mut r1) = (vec![], vec![]);
    for r in 0..TP_ROUNDS {
        let (u2, u1) = (url(&two, "/v1/messages"), url(&one, "/v1/messages"));
        if r % 2 == 0 {
            r2.push(concurrent_sessions(&u2, &format!("tp{r}-2")).await);
            r1.push(concurrent_sessions(&u1, &format!("tp{r}-1")).await);
        } else {
            r1.push(concurrent_sessions(&u1, &format!("tp{r}-1")).await);
            r2.push(concurrent_sessions(&u2, &format!("tp{r}-2")).await);
        }
    }
    let tp = Throughput {
        two: r2,
        one: r1,
        load_before: tp_before,
        load_after: load_avg(),
    };
    drop(one);

    // 3. Failover: one replica killed while streams are in progress.
    eprintln!("replicas: failover");
    let fo = failover(&two, &mut servers, &ups).await;
    drop(two);
    drop(servers);

    let mut out = format!(
        "Issue 12's figures against two real llama-servers (SmolLM2-135M, one thread each (`-t 1 -tb 1`), \
         `-c 8192 -np 2` as the CI test runs them), all in one run of {:.0} s. Load average (1, 5, 15 min) at \
         the start: {load_start}; after the cache measurement: {load_reuse}.\n\n",
        started.elapsed().as_secs_f64()
    );
    out.push_str(&format!(
        "### Prompt-cache reuse of interleaved sessions over 2 replicas\n\n\
         {SESSIONS} sessions, {TURNS} turns each, sent one at a time in turns (turn 1 of every session, then \
         turn 2, ...), max_tokens {MAX_TOKENS}. Every session: a system prompt all share (~360 tokens), its own \
         pasted file (~1,850 tokens), and ~30 tokens more per turn, so a turn can take at most ~98% of its \
         prompt from the cache. Share = what llama-server reported as cached per answer (through llmctl: \
         `cache_read_input_tokens`; through nginx: `usage.prompt_tokens_details.cached_tokens`) / prompt tokens. \
         Round-robin = nginx with both replicas in one upstream block (its default balancing); llmctl has no \
         round-robin mode. Each column starts on fresh replicas.\n\n"
    ));
    out.push_str(&reuse_table(&[
        ("llmctl router, 2 replicas", router),
        ("nginx round-robin, 2 replicas", rr),
        ("llmctl, 1 replica alone", Ok(alone)),
    ]));
    out.push_str(&format!(
        "\n### Throughput of concurrent sessions, 2 replicas against 1\n\n\
         {TP_SESSIONS} sessions at once, each {TP_TURNS} turns one after the other (the shapes above; turn 1 \
         prefills its ~2,200 tokens, later turns come mostly from the cache), through llmctl over both \
         replicas and over the first alone, {TP_ROUNDS} rounds in turns with new sessions each round. Each \
         replica has one thread, so 2 replicas need 2 free cores to be 2× faster: this machine has {} and \
         shares them, so read the ratio against the load.\n\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    out.push_str(&throughput_table(&tp));
    out.push_str(&format!(
        "\n### Failover: a replica killed mid-run\n\n\
         {FO_CLIENTS} clients through llmctl over both replicas, each alternating streaming and non-streaming \
         requests (max_tokens {FO_MAX_TOKENS}, its own session), for at least {} s; then, once a stream is \
         carrying text, the replica with the most requests in flight is killed, and the clients go on for {} \
         s.\n\n",
        FO_BEFORE.as_secs(),
        FO_AFTER.as_secs()
    ));
    out.push_str(&failover_table(&fo));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_is_put_after_the_marker_then_replaced() {
        let marker = "<!-- hand-written below -->";
        let kept = format!("{marker}\n## Notes\ntext\n");
        let once = splice(&kept, "figures 1\n");
        assert_eq!(
            once,
            format!("{marker}\n{REPLICAS_BEGIN}\nfigures 1\n{REPLICAS_END}\n## Notes\ntext\n")
        );
        let twice = splice(&once, "figures 2");
        assert_eq!(twice, once.replace("figures 1", "figures 2"));
    }

    #[test]
    fn usage_is_read_from_either_side() {
        let a = json!({"usage": {"input_tokens": 40, "cache_read_input_tokens": 960, "output_tokens": 8}});
        assert_eq!(
            reuse_of(&a),
            Some(Reuse {
                prompt: 1000,
                cached: 960
            })
        );
        let o = json!({"usage": {"prompt_tokens": 1000, "prompt_tokens_details": {"cached_tokens": 0}},
                       "timings": {"cache_n": 0}});
        assert_eq!(
            reuse_of(&o),
            Some(Reuse {
                prompt: 1000,
                cached: 0
            })
        );
        let t = json!({"usage": {"prompt_tokens": 10}, "timings": {"cache_n": 7}});
        assert_eq!(reuse_of(&t).map(|r| r.cached), Some(7));
        assert_eq!(reuse_of(&json!({})), None);
    }

    #[test]
    fn turns_grow_a_little_and_sessions_differ_after_the_system_prompt() {
        let t1 = openai_body("x", 0, 1);
        let t2 = openai_body("x", 0, 2);
        assert_eq!(t1["messages"].as_array().unwrap().len(), 2);
        assert_eq!(t2["messages"].as_array().unwrap().len(), 4);
        assert_eq!(t1["messages"][1], t2["messages"][1]);
        let other = openai_body("x", 1, 1);
        assert_eq!(t1["messages"][0], other["messages"][0]);
        assert_ne!(t1["messages"][1], other["messages"][1]);
        let a = anthropic_body("x", 2, 3);
        assert_eq!(a["messages"], json!(messages("x", 2, 3)));
        assert!(
            a["metadata"]["user_id"]
                .as_str()
                .unwrap()
                .contains("\"session_id\":\"x-2\"")
        );
    }

    #[test]
    fn reuse_summary_counts_later_turns_only() {
        let r = |p, c| {
            Ok(Reuse {
                prompt: p,
                cached: c,
            })
        };
        let t: Turns = vec![
            vec![r(100, 0), r(100, 0)],
            vec![r(100, 90), r(100, 10)],
            vec![r(100, 100), Err("x".into())],
        ];
        let s = summarize(&t);
        assert!((s.share - 200.0 / 300.0).abs() < 1e-9);
        assert!((s.lowest - 0.1).abs() < 1e-9);
        assert_eq!((s.below_half, s.turns, s.errors.len()), (1, 3, 1));
    }
}
