//! Per-request accounting: one log line and one metrics record, whichever way the request ends (including a
//! client that disconnects mid-stream, when only Drop runs), and the error answer in the client's dialect.

use std::time::{Duration, Instant};

use axum::response::Response;

use super::error::{Dialect, ProxyError};
use super::metrics::RequestRecord;
use super::router::Lease;
use super::server::Shared;
use super::stream::Usage;

const CLIENT_CLOSED: u16 = 499;

pub struct Tracker {
    st: Shared,
    /// The error shape this client reads.
    pub dialect: Dialect,
    pub request_id: String,
    pub method: String,
    pub path: String,
    pub start: Instant,
    pub client_model: String,
    pub upstream_model: String,
    pub status: u16,
    pub error_type: Option<&'static str>,
    pub error_message: Option<String>,
    pub usage: Usage,
    pub ttft: Option<Duration>,
    pub upstream_wait: Duration,
    pub stop_reason: Option<String>,
    pub streamed: bool,
    pub completed: bool,
    /// The replica serving the answer: counted in flight there until this request ends.
    pub lease: Option<Lease>,
    /// The replica the request went to last (its log field), also when every one failed it.
    pub replica: Option<String>,
}

impl Tracker {
    pub fn new(st: &Shared, method: &str, path: &str, start: Instant) -> Self {
        st.metrics.request_started();
        Tracker {
            st: st.clone(),
            dialect: Dialect::Anthropic,
            request_id: super::server::REQUEST_ID
                .try_with(String::clone)
                .unwrap_or_default(),
            method: method.to_string(),
            path: path.to_string(),
            start,
            client_model: String::new(),
            upstream_model: String::new(),
            status: 200,
            error_type: None,
            error_message: None,
            usage: Usage::default(),
            ttft: None,
            upstream_wait: Duration::ZERO,
            stop_reason: None,
            streamed: false,
            completed: false,
            lease: None,
            replica: None,
        }
    }

    /// Ends the request with an error response.
    pub fn error(&mut self, e: ProxyError) -> Response {
        self.status = e.status().as_u16();
        self.error_type = Some(e.kind.as_str());
        self.error_message = Some(e.message.clone());
        self.completed = true;
        e.into_response_for(self.dialect)
    }

    pub fn ok(&mut self) {
        self.completed = true;
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let duration = self.start.elapsed();
        if !self.completed {
            // The client hung up before the answer ended: nginx's "client closed request".
            self.status = CLIENT_CLOSED;
        }
        self.st.metrics.request_finished(&RequestRecord {
            status: self.status,
            error_type: self.error_type,
            input_tokens: self.usage.input_tokens,
            output_tokens: self.usage.output_tokens,
            cache_read_input_tokens: self.usage.cache_read_input_tokens,
            ttft: self.ttft,
            duration,
            upstream_wait: self.upstream_wait,
        });
        if let Some(lease) = self.lease.take() {
            lease.finish(&self.usage, self.error_type.is_some());
        }
        // Request lines switched off (RUST_LOG=warn, as the bench runs it): nothing to build, no task to spawn.
        if !tracing::enabled!(tracing::Level::INFO) {
            return;
        }
        let outcome = match (self.completed, self.error_type) {
            (false, _) => "client_disconnected",
            (true, Some(_)) => "error",
            (true, None) => "ok",
        };
        let line = RequestLine {
            request_id: std::mem::take(&mut self.request_id),
            method: std::mem::take(&mut self.method),
            path: std::mem::take(&mut self.path),
            status: self.status,
            outcome,
            client_model: std::mem::take(&mut self.client_model),
            upstream_model: std::mem::take(&mut self.upstream_model),
            replica: self.replica.take(),
            streamed: self.streamed,
            usage: self.usage,
            ttft: self.ttft,
            duration,
            upstream_wait: self.upstream_wait,
            stop_reason: self.stop_reason.take(),
            error_type: self.error_type,
            error: self.error_message.take(),
        };
        // The line is written once the answer is out: formatting it and the write(2) to stderr cost ~10 µs,
        // which a non-streamed answer would otherwise wait for (its Tracker is dropped before hyper writes
        // it). On a serving thread the spawned task runs when the connection's task yields, after its write.
        // The line is written when dropped, so a task a shutting-down runtime drops unrun still writes it.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            drop(rt.spawn(async move { drop(line) }));
        }
    }
}

/// What the per-request log line says, owned so it can be written after the answer; written when dropped.
struct RequestLine {
    request_id: String,
    method: String,
    path: String,
    status: u16,
    outcome: &'static str,
    client_model: String,
    upstream_model: String,
    replica: Option<String>,
    streamed: bool,
    usage: Usage,
    ttft: Option<Duration>,
    duration: Duration,
    upstream_wait: Duration,
    stop_reason: Option<String>,
    error_type: Option<&'static str>,
    error: Option<String>,
}

impl Drop for RequestLine {
    fn drop(&mut self) {
        let ms = |d: Duration| (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
        tracing::info!(
            request_id = %self.request_id,
            method = %self.method,
            path = %self.path,
            status = self.status,
            outcome = self.outcome,
            model = %self.client_model,
            upstream_model = %self.upstream_model,
            replica = self.replica.as_deref(),
            stream = self.streamed,
            input_tokens = self.usage.input_tokens,
            output_tokens = self.usage.output_tokens,
            cache_read_input_tokens = self.usage.cache_read_input_tokens,
            ttft_ms = self.ttft.map(ms),
            duration_ms = ms(self.duration),
            overhead_ms = ms(self.duration.saturating_sub(self.upstream_wait)),
            stop_reason = self.stop_reason.as_deref(),
            error_type = self.error_type,
            error = self.error.as_deref(),
            "request"
        );
    }
}
