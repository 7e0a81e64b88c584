//! Starting and stopping what is measured: the instant upstream, llmctl, and the peers, each in its own
//! process group so that stopping it also stops whatever it forked.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::load::{self, Api, Endpoint};
use crate::stats;

pub struct Proc {
    pub name: String,
    pub version: String,
    pub endpoint: Endpoint,
    child: Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    /// The process doing the work: the one listening on the port, and its descendants.
    pub fn measured_pids(&self) -> Vec<u32> {
        stats::listener_pid(self.endpoint.addr.port())
            .map(stats::process_tree)
            .unwrap_or_else(|| stats::process_tree(self.child.id()))
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(8).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // The group is ours: process_group(0) at spawn made the child its leader. Signalled through libc,
        // not the `kill` program, whose parsing of a negative pid differs between implementations.
        let pgid = -(self.child.id() as libc::pid_t);
        // SAFETY: kill(2) with a negative pid signals only that process group; no memory is involved.
        unsafe { libc::kill(pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe { libc::kill(pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Kills the process group at once (SIGKILL, no shutdown): a replica dying, not stopping.
    pub fn kill(&mut self) {
        let pgid = -(self.child.id() as libc::pid_t);
        // SAFETY: kill(2) with a negative pid signals only that process group; no memory is involved.
        unsafe { libc::kill(pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn spawn(mut cmd: Command, dir: &Path) -> Result<(Child, PathBuf)> {
    let log = dir.join("process.log");
    let out = std::fs::File::create(&log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .current_dir(dir)
        .process_group(0);
    let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    Ok((child, log))
}

/// Waits until a non-streaming request through the endpoint succeeds.
pub async fn wait_ready(p: &mut Proc, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let body = serde_json::from_slice::<serde_json::Value>(&p.endpoint.body(false, "ready?"))?;
    let path = p.endpoint.path();
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        if let Ok(Some(status)) = p.child.try_wait() {
            bail!(
                "{} exited ({status}) before answering:\n{}",
                p.name,
                p.log_tail()
            );
        }
        match load::post_json(p.endpoint.addr, path, &body).await {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!(
        "{} did not answer within {timeout:?}: {last}\n{}",
        p.name,
        p.log_tail()
    )
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub fn upstream(port: u16) -> Result<Proc> {
    let dir = tempfile::tempdir()?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env(crate::UPSTREAM_ROLE_ENV, addr(port).to_string());
    let (child, log) = spawn(cmd, dir.path())?;
    Ok(Proc {
        name: "direct (instant upstream)".into(),
        version: "bench/recorded".into(),
        endpoint: Endpoint {
            addr: addr(port),
            api: Api::OpenAi,
            model: "bench".into(),
            max_tokens: 24,
        },
        child,
        log,
        _dir: dir,
    })
}

/// The pass-through floor (bench/proxy/passthru.rs): the bench re-executed in that role. It speaks OpenAI
/// on both sides, so it is measured with direct access's requests.
pub fn passthru(port: u16, upstream: SocketAddr) -> Result<Proc> {
    let dir = tempfile::tempdir()?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env(
        crate::PASSTHRU_ROLE_ENV,
        format!("{} {upstream}", addr(port)),
    );
    let (child, log) = spawn(cmd, dir.path())?;
    Ok(Proc {
        name: "pass-through floor".into(),
        version: "(hyper, no translation)".into(),
        endpoint: Endpoint {
            addr: addr(port),
            api: Api::OpenAi,
            model: "bench".into(),
            max_tokens: 24,
        },
        child,
        log,
        _dir: dir,
    })
}

/// nginx as a plain keep-alive reverse proxy, the floor for any separate proxy process: one upstream block
/// with a keep-alive pool, HTTP/1.1 to it with the Connection header cleared (without both, nginx opens a new
/// upstream connection per request), `proxy_buffering off` so a stream passes through event by event, no
/// access log. It speaks OpenAI on both sides, so it is measured with direct access's requests. With several
/// upstreams it balances them with nginx's default, round-robin (the replicas section's baseline).
///
/// One worker process: a single client connection is served by one worker whatever their number, and each
/// worker keeps its own upstream pool, so with two the readiness probe's connection (and its warm upstream
/// connection) could land on the other worker than the measured one; llmctl's serving threads, by contrast,
/// share nothing either, and one connection also only ever uses one of them.
pub fn nginx(bin: &Path, version: &str, port: u16, upstreams: &[SocketAddr]) -> Result<Proc> {
    let dir = tempfile::tempdir()?;
    let d = dir.path().display();
    let servers: String = upstreams
        .iter()
        .map(|u| format!("        server {u};\n"))
        .collect();
    let config = format!(
        "daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log stderr warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    upstream bench {{
{servers}        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_buffering off;
        }}
    }}
}}
",
        listen = addr(port),
    );
    std::fs::write(dir.path().join("nginx.conf"), config)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(dir.path().join("nginx.conf"));
    let (child, log) = spawn(cmd, dir.path())?;
    Ok(Proc {
        name: "nginx".into(),
        version: format!("{version} (keep-alive reverse proxy)"),
        endpoint: Endpoint {
            addr: addr(port),
            api: Api::OpenAi,
            model: "bench".into(),
            max_tokens: 24,
        },
        child,
        log,
        _dir: dir,
    })
}

/// llmctl serve-proxy; its arguments come from LLMCTL_PROXY_ARGS ({listen} and {upstream} are filled in)
/// because the command line is owned by the proxy's authors, not by the bench.
pub fn llmctl(bin: &Path, port: u16, upstream: SocketAddr) -> Result<Proc> {
    llmctl_over(bin, port, &[upstream])
}

/// LLMCTL_PROXY_ARGS (or the default) with `{listen}` filled in and each argument naming `{upstream}` given
/// once per upstream, with the flag before it (`--upstream http://{upstream}` twice for two replicas).
pub fn proxy_args(template: &str, listen: SocketAddr, upstreams: &[SocketAddr]) -> Vec<String> {
    let words: Vec<&str> = template.split_whitespace().collect();
    let mut args = vec![];
    for (i, w) in words.iter().enumerate() {
        let flag_of_next = words.get(i + 1).is_some_and(|n| n.contains("{upstream}"));
        if flag_of_next && w.starts_with('-') && !w.contains("{upstream}") {
            continue;
        }
        if !w.contains("{upstream}") {
            args.push(w.replace("{listen}", &listen.to_string()));
            continue;
        }
        let flag = i
            .checked_sub(1)
            .map(|p| words[p])
            .filter(|p| p.starts_with('-') && !p.contains("{upstream}"));
        for u in upstreams {
            args.extend(flag.map(str::to_owned));
            args.push(
                w.replace("{upstream}", &u.to_string())
                    .replace("{listen}", &listen.to_string()),
            );
        }
    }
    args
}

/// llmctl serve-proxy over several upstreams (replicas); see [`llmctl`].
pub fn llmctl_over(bin: &Path, port: u16, upstreams: &[SocketAddr]) -> Result<Proc> {
    let dir = tempfile::tempdir()?;
    let template = std::env::var("LLMCTL_PROXY_ARGS")
        .unwrap_or_else(|_| "serve-proxy --listen {listen} --upstream http://{upstream}".into());
    let args = proxy_args(&template, addr(port), upstreams);
    let version = Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut cmd = Command::new(bin);
    cmd.args(&args).env("RUST_LOG", "warn");
    let (child, log) = spawn(cmd, dir.path())?;
    Ok(Proc {
        name: "llmctl serve-proxy".into(),
        version,
        endpoint: Endpoint {
            addr: addr(port),
            api: Api::Anthropic,
            model: "bench".into(),
            max_tokens: 24,
        },
        child,
        log,
        _dir: dir,
    })
}

/// LiteLLM's proxy with one model routed to the upstream as an OpenAI-compatible provider; clients use its
/// Anthropic `/v1/messages` endpoint. No database, no network beyond loopback, and the settings of LiteLLM's
/// production guide (docs.litellm.ai/docs/proxy/prod): debug logging off, JSON logs, LITELLM_LOG=ERROR,
/// request_timeout 600, one worker per CPU. Retries, cooldowns and allowed_fails keep their defaults.
///
/// `use_chat_completions_url_for_anthropic_messages`: LiteLLM translates /v1/messages for an `openai/` deployment
/// into the OpenAI *Responses* API (`POST {api_base}/responses`), which llama-server-style upstreams (and the
/// bench's) do not serve: every request failed with 404, and its router then put the only deployment in cooldown
/// ("No deployments available"). This documented opt-out sends them to /v1/chat/completions, as the other proxies
/// do (litellm/llms/anthropic/pass_through/messages/handler.py, `_should_route_to_responses_api`).
pub fn litellm(bin: &Path, version: &str, port: u16, upstream: SocketAddr) -> Result<Proc> {
    let dir = tempfile::tempdir()?;
    let config = [
        "model_list:".to_string(),
        "  - model_name: bench".into(),
        "    litellm_params:".into(),
        "      model: openai/bench".into(),
        format!("      api_base: http://{upstream}/v1"),
        format!("      api_key: {}", crate::env::API_KEY),
        "litellm_settings:".into(),
        "  drop_params: true".into(),
        "  telemetry: false".into(),
        "  set_verbose: false".into(),
        "  json_logs: true".into(),
        "  request_timeout: 600".into(),
        "  use_chat_completions_url_for_anthropic_messages: true".into(),
        String::new(),
    ]
    .join("\n");
    std::fs::write(dir.path().join("config.yaml"), config)?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cmd = Command::new(bin);
    cmd.args([
        "--config",
        "config.yaml",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--num_workers",
        &workers.to_string(),
    ])
    // It would otherwise fetch its model price list from GitHub at startup.
    .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    .env("LITELLM_TELEMETRY", "False")
    .env("LITELLM_LOG", "ERROR")
    // It refuses to start without a master key; given through the environment, never argv.
    .env("LITELLM_MASTER_KEY", crate::env::API_KEY)
    .env("HOME", dir.path());
    let (child, log) = spawn(cmd, dir.path())?;
    Ok(Proc {
        name: "LiteLLM".into(),
        version: version.into(),
        endpoint: Endpoint {
            addr: addr(port),
            api: Api::Anthropic,
            model: "bench".into(),
            max_tokens: 24,
        },
        child,
        log,
        _dir: dir,
    })
}

/// claude-code-router with one provider = the upstream, logging off, in a private HOME.
pub fn ccr(bin: &Path, version: &str, port: u16, upstream: SocketAddr) -> Result<Proc> {
    let dir = tempfile::tempdir()?;
    let home = dir.path().join(".claude-code-router");
    std::fs::create_dir_all(&home)?;
    let config = serde_json::json!({
        "LOG": false,
        "HOST": "127.0.0.1",
        "PORT": port,
        "NON_INTERACTIVE_MODE": true,
        "Providers": [{
            "name": "bench",
            "api_base_url": format!("http://{upstream}/v1/chat/completions"),
            "api_key": crate::env::API_KEY,
            "models": ["bench"]
        }],
        "Router": {"default": "bench,bench"}
    });
    std::fs::write(
        home.join("config.json"),
        serde_json::to_vec_pretty(&config)?,
    )?;
    let mut cmd = Command::new(bin);
    cmd.arg("start").env("HOME", dir.path()).env("CI", "true");
    let (child, log) = spawn(cmd, dir.path())?;
    Ok(Proc {
        name: "claude-code-router".into(),
        version: version.into(),
        endpoint: Endpoint {
            addr: addr(port),
            api: Api::Anthropic,
            model: "bench".into(),
            max_tokens: 24,
        },
        child,
        log,
        _dir: dir,
    })
}

/// A real llama-server on the test model; `extra` adds e.g. `--jinja --chat-template-file ...`.
pub fn llama_server(bin: &Path, model: &Path, port: u16, extra: &[&str]) -> Result<Proc> {
    let dir = tempfile::tempdir()?;
    let mut cmd = Command::new(bin);
    cmd.arg("-m")
        .arg(model)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "-np",
            "1",
            // One thread each for generation and prompt: with its default (one per core) it busy-waits
            // against the load generator and the proxy for the same two cores, and a 4-token answer then
            // takes anywhere from 0.1 to 8 s. Its speed is not what is measured; its steadiness is needed.
            "-t",
            "1",
            "-tb",
            "1",
            "--metrics",
        ])
        .args(extra);
    let (child, log) = spawn(cmd, dir.path())?;
    Ok(Proc {
        name: "llama-server".into(),
        version: bin.display().to_string(),
        endpoint: Endpoint {
            addr: addr(port),
            api: Api::OpenAi,
            model: "bench".into(),
            max_tokens: 24,
        },
        child,
        log,
        _dir: dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_args_repeat_the_upstream_flag_per_replica() {
        let (l, a, b) = (addr(1), addr(2), addr(3));
        let t = "serve-proxy --listen {listen} --upstream http://{upstream} --log-format json";
        assert_eq!(
            proxy_args(t, l, &[a, b]).join(" "),
            "serve-proxy --listen 127.0.0.1:1 --upstream http://127.0.0.1:2 \
             --upstream http://127.0.0.1:3 --log-format json"
        );
        assert_eq!(
            proxy_args(t, l, &[a]).join(" "),
            "serve-proxy --listen 127.0.0.1:1 --upstream http://127.0.0.1:2 --log-format json"
        );
        // An upstream given as --flag=value is repeated as it is.
        assert_eq!(
            proxy_args("x --upstream=http://{upstream}", l, &[a, b]).join(" "),
            "x --upstream=http://127.0.0.1:2 --upstream=http://127.0.0.1:3"
        );
    }
}
