//! `llmctl serve-proxy`: the Anthropic Messages API and the OpenAI Responses API in front of an OpenAI Chat
//! Completions server.
//!
//! Front doors → pipeline → upstream:
//! - front doors: `messages` (Anthropic, decoded by `translate`, encoded by `stream::Event`'s wire form) and
//!   `responses` (OpenAI, `responses::decode` / `responses::encode`), routed and authenticated by `server`;
//!   `chat` (OpenAI Chat Completions) passes through untranslated: the door a fleet's proxies reach each
//!   other by;
//! - pipeline: each decoder yields one `openai::ChatRequest`; `pump` drives the upstream's stream through
//!   `stream::StreamTranslator` into one internal event stream, which the front door's encoder writes out;
//!   `accounting` logs and counts every request whichever way it ends;
//! - upstream: `upstream` (the pooled HTTP client), `sse` (the event-stream parser), `whole_body`.

// Serving (HTTP, upstream, errors, metrics).
pub mod accounting;
pub mod chat;
pub mod config;
pub mod dashboard;
pub mod error;
mod http1;
pub mod messages;
pub mod metrics;
pub mod pump;
pub mod responses;
pub mod router;
pub mod server;
pub mod sse;
pub mod upstream;

// Translation (pure code).
pub mod accumulate;
pub mod anthropic;
pub mod chunk_scan;
pub mod json_write;
pub mod openai;
pub mod schema;
pub mod stream;
pub mod translate;
pub mod whole_body;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;

use crate::cli::GlobalArgs;
use crate::config::ConfigFile;
use crate::outcome::Outcome;
use config::{Overrides, ProxySection, SecretSource, Settings};

#[derive(Debug, Clone, Args)]
pub struct ServeProxyArgs {
    /// Address to listen on [default: 127.0.0.1:4000]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Base URL of the OpenAI-compatible server [default: http://127.0.0.1:11434]. Repeat it for
    /// several replicas of one model (or list them in [proxy] upstreams, each a URL or
    /// { url, weight, model }): requests are routed by session, cached prefix and load
    #[arg(long, value_name = "URL")]
    pub upstream: Vec<String>,
    /// Another llmctl serve-proxy of the same fleet (repeatable): routed to like a replica, sent this proxy's
    /// own key and a hop mark, it serves the request from its own llama-servers (`[proxy] upstreams =
    /// "fleet"` makes provision list every other host's proxy here)
    #[arg(long, value_name = "URL")]
    pub peer: Vec<String>,
    /// Key every client must send (x-api-key or Authorization: Bearer). Visible in `ps`: prefer
    /// --api-key-file or the LLMCTL_PROXY_API_KEY environment variable.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// File holding the client key (first line; must not be readable by other users)
    #[arg(long, value_name = "PATH", conflicts_with = "api_key")]
    pub api_key_file: Option<PathBuf>,
    /// Key sent to the upstream as Authorization: Bearer. Prefer --upstream-api-key-file or
    /// LLMCTL_UPSTREAM_API_KEY.
    #[arg(long, value_name = "KEY")]
    pub upstream_api_key: Option<String>,
    /// File holding the upstream key
    #[arg(long, value_name = "PATH", conflicts_with = "upstream_api_key")]
    pub upstream_api_key_file: Option<PathBuf>,
    /// Upstream model to use [default: the first model the upstream's GET /v1/models lists]
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// Client model names starting with PREFIX go to upstream MODEL (repeatable; over `[proxy.models]`)
    #[arg(long = "model-map", value_name = "PREFIX=MODEL", value_parser = parse_model_map)]
    pub model_map: Vec<(String, String)>,
    /// Largest request body accepted, in bytes [default: 33554432 (32 MiB)]
    #[arg(long, value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Seconds without an event after which a `ping` event is sent [default: 5]
    #[arg(long, value_name = "SECS")]
    pub ping_interval: Option<f64>,
    /// Seconds to wait for a TCP connection to the upstream [default: 5]
    #[arg(long, value_name = "SECS")]
    pub connect_timeout: Option<f64>,
    /// Seconds to wait for the upstream's response, and at most between two of its chunks [default: 600]
    #[arg(long, value_name = "SECS")]
    pub first_byte_timeout: Option<f64>,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT [default: 10]
    #[arg(long, value_name = "SECS")]
    pub shutdown_grace: Option<f64>,
    /// With several upstreams: seconds a request waits for a free slot when every replica is busy, before
    /// it is refused (529 overloaded, 429 on /v1/responses); [proxy] queue_timeout_secs [default: 60]
    #[arg(long, value_name = "SECS")]
    pub queue_timeout: Option<f64>,
}

fn parse_model_map(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((prefix, model)) if !prefix.trim().is_empty() && !model.trim().is_empty() => {
            Ok((prefix.trim().to_string(), model.trim().to_string()))
        }
        _ => Err(format!(
            "{s:?} is not PREFIX=MODEL, e.g. claude-haiku=qwen3-coder-small"
        )),
    }
}

impl ServeProxyArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            upstreams: self.upstream.clone(),
            peers: self.peer.clone(),
            api_key: self.api_key.clone(),
            api_key_file: self.api_key_file.clone(),
            upstream_api_key: self.upstream_api_key.clone(),
            upstream_api_key_file: self.upstream_api_key_file.clone(),
            model: self.model.clone(),
            max_body_bytes: self.max_body_bytes,
            ping_interval_secs: self.ping_interval,
            connect_timeout_secs: self.connect_timeout,
            first_byte_timeout_secs: self.first_byte_timeout,
            shutdown_grace_secs: self.shutdown_grace,
            queue_timeout_secs: self.queue_timeout,
            models: self.model_map.iter().cloned().collect(),
        }
    }
}

/// Takes the arguments boxed: they are the largest of the CLI's commands.
pub fn run(global: &GlobalArgs, args: Box<ServeProxyArgs>) -> Result<Outcome> {
    let file = ConfigFile::load(global.config.as_deref())?;
    let mut section = file.section_or_default::<ProxySection>()?;
    // The file's values are judged with the same words as provision judges them; flags are judged in resolve.
    file.report(&section.check())?;
    if let Some(path) = &file.path {
        // Read without being named when it is ./llmctl.toml: say so, once.
        section.origin = Some(path.display().to_string());
        tracing::info!(config = %path.display(), "reading [proxy] settings from this file (flags and environment override them)");
    }
    let settings = config::resolve(
        &args.overrides(),
        &section,
        &|k| std::env::var(k).ok(),
        &config::read_secret_file,
    )?;
    for (key, flag) in [
        (&settings.api_key, "--api-key"),
        (&settings.upstream_api_key, "--upstream-api-key"),
    ] {
        if key
            .as_ref()
            .is_some_and(|k| k.source == SecretSource::CommandLine)
        {
            tracing::warn!(
                "{flag} puts the key in the command line, where other users can read it (ps); use {flag}-file or the environment instead"
            );
        }
    }
    // The main thread accepts connections and handles signals; each connection is then served entirely by
    // one of `threads` serving threads, each with its own single-threaded runtime and upstream client. A
    // request's every step (client socket, translation, upstream socket) stays on one thread: no cross-thread
    // wake-up per read or write, which is what a work-stealing runtime pays on each hop.
    let threads = serving_threads();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(settings, threads))?;
    Ok(Outcome::Success)
}

/// One serving thread per CPU, or TOKIO_WORKER_THREADS (the variable tokio's own runtime reads).
fn serving_threads() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

async fn serve(settings: Settings, threads: usize) -> Result<()> {
    // Before listening: a SIGTERM that arrives as soon as the port is open must already mean "shut down".
    let stop_signal = shutdown_signal()?;
    let replicas = settings
        .upstreams
        .iter()
        .map(|spec| {
            // A peer is a proxy of the same fleet: it takes this proxy's own key (one key for the fleet).
            let key = if spec.peer {
                settings.api_key.as_ref()
            } else {
                settings.upstream_api_key.as_ref()
            };
            let mut upstream = upstream::Upstream::new(
                &spec.url,
                key.map(|k| k.value.as_str()),
                spec.model.as_deref().or(settings.model.as_deref()),
                settings.connect_timeout,
                settings.first_byte_timeout,
                threads,
            )?;
            if spec.peer {
                upstream.set_peer();
            }
            Ok(router::Replica::new(spec.clone(), upstream))
        })
        .collect::<Result<Vec<_>>>()?;
    let router = Arc::new(router::Router::new(replicas));
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let grace = settings.shutdown_grace;
    let state = Arc::new(server::AppState::new(settings, router.clone()));
    // The bound address, not the configured one: `--listen 127.0.0.1:0` says which port it got.
    let bound = listener.local_addr()?;
    tracing::info!(
        listen = %bound,
        upstream = %state.settings.upstream,
        replicas = state.settings.upstreams.len(),
        auth = state.settings.api_key.is_some(),
        "serve-proxy listening"
    );
    // Learn the upstream's model now, so the first request does not pay for it; an upstream that is not
    // up yet is retried on the first request instead.
    // All replicas at once: one that does not answer must not hold up the others' discovery.
    let discoveries = router.replicas().iter().map(|r| async move {
        match r.upstream.served().await {
            Ok(s) => {
                tracing::info!(replica = %r.spec.url, model = %s.model, llama_cpp = s.llama_cpp, "upstream model")
            }
            Err(e) => tracing::warn!(
                replica = %r.spec.url,
                "{}; will retry on the first request",
                e.to_proxy_error(&r.spec.url).message
            ),
        }
    });
    futures_util::future::join_all(discoveries).await;
    // Health probes only matter with a choice to make: one upstream gets every request either way, and its
    // errors reach the client as before.
    if router.replicas().len() > 1 {
        router.probe().await;
        tokio::spawn(router::probe_forever(
            router.clone(),
            router::PROBE_INTERVAL,
        ));
    }
    // On this (accepting) thread, not a serving one: the once-a-second sample never delays a request.
    tokio::spawn(dashboard::sample(state.clone()));
    let app = server::router(state.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let local = listener.local_addr()?;
    let mut pool = ServingThreads::start(threads, local, &app, &stop_rx)?;
    let mut stop_signal = std::pin::pin!(stop_signal);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => pool.hand_over(tcp),
                Err(e) => accept_error(e).await,
            },
            failed = pool.any_ended() => return failed,
            () = &mut stop_signal => break,
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let in_flight = state.metrics.in_flight();
    tracing::info!(in_flight, grace_secs = grace.as_secs_f64(), "shutting down");
    if let Ok(r) = tokio::time::timeout(grace, pool.all_ended()).await {
        return r;
    }
    // Still running: each answer ends with its protocol's error (an `error` event, `response.failed`, or a 529/503)
    // and its log line, instead of a connection cut mid-stream that the client cannot tell from a network fault.
    tracing::warn!(
        in_flight = state.metrics.in_flight(),
        "in-flight requests did not finish within the grace period; ending them with an error"
    );
    state.cut_in_flight();
    if tokio::time::timeout(CUT_FLUSH, pool.all_ended())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = state.metrics.in_flight(),
            "connections still open after their error was sent; closing them"
        );
    }
    Ok(())
}

/// How long answers ended at shutdown get to write their error and close.
const CUT_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// A connection the listener could not accept: one that the client already gave up is skipped; anything
/// else (out of file descriptors) is logged and retried a second later, as axum's own listener does.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!("accept failed: {e}; retrying in 1s");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
}

/// The serving threads: each runs axum on a single-threaded runtime, fed accepted connections through a
/// channel, round robin.
/// See the serving thread's wheel keeper in [`ServingThreads::start`].
const WHEEL_TICK: std::time::Duration = std::time::Duration::from_secs(1);

struct ServingThreads {
    feeds: Vec<tokio::sync::mpsc::UnboundedSender<std::net::TcpStream>>,
    next: usize,
    ended: tokio::task::JoinSet<Result<()>>,
}

impl ServingThreads {
    fn start(
        threads: usize,
        local: std::net::SocketAddr,
        app: &axum::Router,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<Self> {
        let mut feeds = Vec::with_capacity(threads);
        let mut ended = tokio::task::JoinSet::new();
        for index in 0..threads {
            let (feed, connections) = tokio::sync::mpsc::unbounded_channel();
            let (done, finished) = tokio::sync::oneshot::channel();
            let (app, mut stop) = (app.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("serve-{index}"))
                .spawn(move || {
                    upstream::set_serving_thread(index);
                    let served = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("cannot start the async runtime")
                        .and_then(|rt| {
                            rt.block_on(async move {
                                // A timer wheel that is never empty: tokio wakes its own driver (a write to
                                // its eventfd, and one more pass of the poller) whenever a timer is set on an
                                // empty wheel, which every request's first-byte timeout would do on an idle
                                // thread. A timer a second away keeps that from happening for any deadline
                                // further off, which every request's is (strace: one eventfd write per request).
                                tokio::spawn(async {
                                    loop {
                                        tokio::time::sleep(WHEEL_TICK).await;
                                    }
                                });
                                let listener = Handed { connections, local };
                                axum::serve(listener, app)
                                    .with_graceful_shutdown(async move {
                                        let _ = stop.wait_for(|s| *s).await;
                                    })
                                    .await
                                    .context("the proxy server failed")
                            })
                        });
                    let _ = done.send(served);
                })
                .context("cannot start a serving thread")?;
            feeds.push(feed);
            ended.spawn(async move {
                finished
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a serving thread panicked")))
            });
        }
        Ok(ServingThreads {
            feeds,
            next: 0,
            ended,
        })
    }

    fn hand_over(&mut self, tcp: tokio::net::TcpStream) {
        // No Nagle delay: an SSE event is a small write that must leave at once, not wait for the client's
        // ACK.
        let _ = tcp.set_nodelay(true);
        // Deregistered from this thread's poller; the serving thread registers it with its own.
        let Ok(tcp) = tcp.into_std() else { return };
        let feed = &self.feeds[self.next];
        self.next = (self.next + 1) % self.feeds.len();
        let _ = feed.send(tcp);
    }

    /// Resolves only if a serving thread stopped before shutdown: that is a failure.
    async fn any_ended(&mut self) -> Result<()> {
        match self.ended.join_next().await {
            Some(Ok(Err(e))) => Err(e),
            Some(_) => Err(anyhow::anyhow!("a serving thread stopped unexpectedly")),
            None => std::future::pending().await,
        }
    }

    async fn all_ended(&mut self) -> Result<()> {
        while let Some(r) = self.ended.join_next().await {
            r.context("a serving thread panicked")??;
        }
        Ok(())
    }
}

/// The listener a serving thread's axum sees: the connections the accepting thread hands over.
struct Handed {
    connections: tokio::sync::mpsc::UnboundedReceiver<std::net::TcpStream>,
    local: std::net::SocketAddr,
}

impl axum::serve::Listener for Handed {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some(tcp) = self.connections.recv().await else {
                // The accepting thread is gone: only shutdown is left, which stops this server.
                return std::future::pending().await;
            };
            let peer = tcp.peer_addr();
            match (tokio::net::TcpStream::from_std(tcp), peer) {
                (Ok(tcp), Ok(peer)) => return (tcp, peer),
                // The client hung up in between, or the socket could not be registered: drop it.
                _ => continue,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// SIGTERM or SIGINT. The handlers are registered when this is called, not when it is first awaited.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
