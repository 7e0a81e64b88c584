//! `llmctl serve-proxy`: the Anthropic Messages API in front of an OpenAI Chat Completions server.

// Serving (HTTP, upstream, errors, metrics).
pub mod config;
pub mod error;
pub mod metrics;
pub mod server;
pub mod sse;
pub mod upstream;

// Translation (pure code).
pub mod accumulate;
pub mod anthropic;
pub mod openai;
pub mod schema;
pub mod stream;
pub mod translate;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;

use crate::cli::GlobalArgs;
use crate::config::ConfigFile;
use crate::outcome::Outcome;
use config::{Overrides, ProxyConfig, SecretSource, Settings};

#[derive(Debug, Clone, Args)]
pub struct ServeProxyArgs {
    /// Address to listen on [default: 127.0.0.1:4000]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Base URL of the OpenAI-compatible server [default: http://127.0.0.1:11434]
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
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
}

impl ServeProxyArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            upstream: self.upstream.clone(),
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
        }
    }
}

/// Takes the arguments boxed: they are the largest of the CLI's commands.
pub fn run(global: &GlobalArgs, args: Box<ServeProxyArgs>) -> Result<Outcome> {
    let file = ConfigFile::load(global.config.as_deref())?;
    let section = file.section::<ProxyConfig>("proxy")?.unwrap_or_default();
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(settings))?;
    Ok(Outcome::Success)
}

async fn serve(settings: Settings) -> Result<()> {
    // Before listening: a SIGTERM that arrives as soon as the port is open must already mean "shut down".
    let stop_signal = shutdown_signal()?;
    let upstream = upstream::Upstream::new(
        &settings.upstream,
        settings.upstream_api_key.as_ref().map(|k| k.value.as_str()),
        settings.model.as_deref(),
        settings.connect_timeout,
        settings.first_byte_timeout,
    )?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let grace = settings.shutdown_grace;
    let state = Arc::new(server::AppState::new(settings, upstream));
    tracing::info!(
        listen = %state.settings.listen,
        upstream = %state.settings.upstream,
        auth = state.settings.api_key.is_some(),
        "serve-proxy listening"
    );
    // Learn the upstream's model now, so the first request does not pay for it; an upstream that is not
    // up yet is retried on the first request instead.
    match state.upstream.served().await {
        Ok(s) => tracing::info!(model = %s.model, llama_cpp = s.llama_cpp, "upstream model"),
        Err(e) => tracing::warn!(
            "{}; will retry on the first request",
            e.to_proxy_error(state.upstream.base()).message
        ),
    }
    let app = server::router(state.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stopped = stop_rx.clone();
    // No Nagle delay: an SSE event is a small write that must leave at once, not wait for the client's ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = stopped.wait_for(|s| *s).await;
    });
    let mut server = std::pin::pin!(server.into_future());
    tokio::select! {
        r = &mut server => return r.context("the proxy server failed"),
        () = stop_signal => {}
    }
    let _ = stop_tx.send(true);
    let in_flight = state.metrics.in_flight();
    tracing::info!(in_flight, grace_secs = grace.as_secs_f64(), "shutting down");
    match tokio::time::timeout(grace, &mut server).await {
        Ok(r) => r.context("the proxy server failed")?,
        Err(_) => tracing::warn!(
            in_flight = state.metrics.in_flight(),
            "in-flight requests did not finish within the grace period; closing them"
        ),
    }
    Ok(())
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
