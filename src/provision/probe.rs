//! `llmctl probe`: the checks provision runs inside the container with the llmctl binary it installed there, so
//! a container needs no curl: wait for a health endpoint, send one message through the proxy (the smoke test), or
//! read one endpoint (`llmctl status` reads llama-server's `/props`, `/slots`, `/metrics` and the proxy's `/metrics`).
//! Hidden from `--help`: it is provision's tool, not a user command.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::outcome::Outcome;

#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// GET this URL until it answers 200.
    #[arg(long, value_name = "URL", conflicts_with = "message")]
    pub health: Option<String>,
    /// GET this URL once and print its body (exit 1 with the status on stderr when it is not 2xx).
    #[arg(long, value_name = "URL", conflicts_with_all = ["health", "message"])]
    pub get: Option<String>,
    /// How long to keep trying, in seconds (0: once).
    #[arg(long, default_value_t = 0)]
    pub wait: u64,
    /// POST one short message to this Anthropic Messages endpoint (`http://127.0.0.1:4000`) and print the reply.
    #[arg(long, value_name = "URL")]
    pub message: Option<String>,
    /// File holding the API key to send (never on the command line).
    #[arg(long, value_name = "PATH")]
    pub api_key_file: Option<std::path::PathBuf>,
}

pub fn run(args: ProbeArgs) -> Result<Outcome> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        let key = match &args.api_key_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read the API key from {}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        if let Some(url) = args.get {
            return get_once(&client, &url, key.as_deref()).await;
        }
        if let Some(url) = args.health {
            return wait_healthy(&client, &url, Duration::from_secs(args.wait)).await;
        }
        if let Some(url) = args.message {
            return smoke(&client, &url, key.as_deref()).await;
        }
        bail!("nothing to probe: pass --health URL, --get URL or --message URL")
    })
}

/// Polls `url` until it answers 2xx or `wait` is over. The poll interval starts at 50 ms and doubles up to 500 ms:
/// a server that comes up within a few hundred milliseconds (a small model, a restarted proxy) is seen at once,
/// and a long load is still polled only twice a second.
async fn wait_healthy(client: &reqwest::Client, url: &str, wait: Duration) -> Result<Outcome> {
    let deadline = Instant::now() + wait;
    let mut interval = Duration::from_millis(50);
    let mut last;
    loop {
        last = match client
            .get(url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                println!("{url}: {}", r.status());
                return Ok(Outcome::Success);
            }
            Ok(r) => format!("HTTP {}", r.status()),
            Err(e) => format!("{e}"),
        };
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(interval.min(deadline - now)).await;
        interval = (interval * 2).min(Duration::from_millis(500));
    }
    eprintln!("{url} is not healthy: {last}");
    Ok(Outcome::ProblemsFound)
}

/// Sends `req` with the proxy key (if any) in a header, never in argv; returns the status and the body's text.
async fn send(
    req: reqwest::RequestBuilder,
    url: &str,
    key: Option<&str>,
) -> Result<(reqwest::StatusCode, String)> {
    let req = match key {
        Some(k) => req.header("x-api-key", k),
        None => req,
    };
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    Ok((status, resp.text().await.unwrap_or_default()))
}

/// One GET, body to stdout. The key goes in a header, never in argv (it comes from `--api-key-file`).
async fn get_once(client: &reqwest::Client, url: &str, key: Option<&str>) -> Result<Outcome> {
    let (status, body) = send(client.get(url).timeout(Duration::from_secs(10)), url, key).await?;
    print!("{body}");
    if status.is_success() {
        return Ok(Outcome::Success);
    }
    eprintln!("{url} answered HTTP {status}");
    Ok(Outcome::ProblemsFound)
}

async fn smoke(client: &reqwest::Client, base: &str, key: Option<&str>) -> Result<Outcome> {
    let url = format!("{}/v1/messages", base.trim_end_matches('/'));
    let body = serde_json::json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 24,
        "messages": [{"role": "user", "content": "Say hello in five words."}],
    });
    let req = client
        .post(&url)
        .timeout(Duration::from_secs(600))
        .header("anthropic-version", "2023-06-01")
        .json(&body);
    let (status, text) = send(req, &url, key).await?;
    if !status.is_success() {
        eprintln!("{url} answered HTTP {status}: {}", text.trim());
        return Ok(Outcome::ProblemsFound);
    }
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{url} answered non-JSON: {text}"))?;
    let reply: String = v["content"]
        .as_array()
        .map(|blocks| {
            blocks
                .iter()
                .filter_map(|b| b["text"].as_str())
                .collect::<Vec<_>>()
                .join("")
        })
        .unwrap_or_default();
    if v["type"] != "message" {
        eprintln!("{url} answered something that is not a message: {text}");
        return Ok(Outcome::ProblemsFound);
    }
    println!(
        "reply ({} output tokens, stop_reason {}): {}",
        v["usage"]["output_tokens"],
        v["stop_reason"].as_str().unwrap_or("?"),
        reply.trim()
    );
    Ok(Outcome::Success)
}
