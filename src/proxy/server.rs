//! The HTTP side: axum routes, authentication, request bodies, and the one response path that drives the
//! upstream's event stream through the stream translator, either out to the client as SSE (with pings while
//! the upstream is silent) or folded into one JSON message for `stream: false`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::accumulate::MessageAccumulator;
use super::config::Settings;
use super::error::{ErrorType, ProxyError, from_upstream_stream_error};
use super::metrics::{Metrics, RequestRecord};
use super::openai::ChatChunk;
use super::sse::SseParser;
use super::stream::{Event, StreamTranslator, Usage};
use super::translate::{TranslateOptions, translate_for_count, translate_request};
use super::upstream::{Upstream, UpstreamError};

pub struct AppState {
    pub settings: Settings,
    pub upstream: Upstream,
    pub metrics: Metrics,
    pub started: Instant,
    /// SHA-256 of the client key: compared in constant time, and the key itself is not kept around.
    key_digest: Option<[u8; 32]>,
}

impl AppState {
    pub fn new(settings: Settings, upstream: Upstream) -> Self {
        let key_digest = settings
            .api_key
            .as_ref()
            .map(|k| digest(k.value.as_bytes()));
        AppState {
            settings,
            upstream,
            metrics: Metrics::default(),
            started: Instant::now(),
            key_digest,
        }
    }
}

type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_by_id))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------------------
// Authentication

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Equal digests, compared without an early exit so timing reveals nothing about the key.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The key a client presented: `x-api-key: K` (Anthropic SDKs) or `Authorization: Bearer K`.
fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get("x-api-key") {
        return Some(v.as_bytes());
    }
    let auth = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = auth.split_at(auth.len().min(7));
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
}

/// Health probes and the bare root need no key: load balancers and Claude Code's startup `HEAD /` carry none.
fn is_open(method: &Method, path: &str) -> bool {
    path == "/health" || (path == "/" && (method == Method::GET || method == Method::HEAD))
}

async fn authenticate(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let Some(expected) = &st.key_digest else {
        return next.run(req).await;
    };
    if is_open(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    let ok = presented_key(req.headers()).is_some_and(|k| same_digest(&digest(k), expected));
    if ok {
        return next.run(req).await;
    }
    let start = Instant::now();
    let mut t = Tracker::new(&st, req.method().as_str(), req.uri().path(), start);
    let msg = if presented_key(req.headers()).is_some() {
        "invalid API key: the x-api-key (or Authorization: Bearer) header does not match the proxy's key"
    } else {
        "missing API key: send it in the x-api-key header or as Authorization: Bearer"
    };
    t.error(ProxyError::new(ErrorType::Authentication, msg))
}

// ---------------------------------------------------------------------------------------------------------
// Per-request accounting: one log line and one metrics record, whichever way the request ends (including a
// client that disconnects mid-stream, when only Drop runs).

const CLIENT_CLOSED: u16 = 499;

struct Tracker {
    st: Shared,
    method: String,
    path: String,
    start: Instant,
    client_model: String,
    upstream_model: String,
    status: u16,
    error_type: Option<&'static str>,
    error_message: Option<String>,
    usage: Usage,
    ttft: Option<Duration>,
    upstream_wait: Duration,
    stop_reason: Option<String>,
    streamed: bool,
    completed: bool,
}

impl Tracker {
    fn new(st: &Shared, method: &str, path: &str, start: Instant) -> Self {
        st.metrics.request_started();
        Tracker {
            st: st.clone(),
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
        }
    }

    /// Ends the request with an error response.
    fn error(&mut self, e: ProxyError) -> Response {
        self.status = e.status().as_u16();
        self.error_type = Some(e.kind.as_str());
        self.error_message = Some(e.message.clone());
        self.completed = true;
        e.into_response()
    }

    fn ok(&mut self) {
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
        let outcome = match (self.completed, self.error_type) {
            (false, _) => "client_disconnected",
            (true, Some(_)) => "error",
            (true, None) => "ok",
        };
        let line = RequestLine {
            method: std::mem::take(&mut self.method),
            path: std::mem::take(&mut self.path),
            status: self.status,
            outcome,
            client_model: std::mem::take(&mut self.client_model),
            upstream_model: std::mem::take(&mut self.upstream_model),
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
    method: String,
    path: String,
    status: u16,
    outcome: &'static str,
    client_model: String,
    upstream_model: String,
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
            method = %self.method,
            path = %self.path,
            status = self.status,
            outcome = self.outcome,
            model = %self.client_model,
            upstream_model = %self.upstream_model,
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

// ---------------------------------------------------------------------------------------------------------
// Small endpoints

async fn root() -> &'static str {
    "llmctl serve-proxy: Anthropic Messages API at /v1/messages\n"
}

async fn not_found(State(st): State<Shared>, method: Method, uri: axum::http::Uri) -> Response {
    let mut t = Tracker::new(&st, method.as_str(), uri.path(), Instant::now());
    t.error(ProxyError::new(
        ErrorType::NotFound,
        format!(
            "{method} {} is not an endpoint of this proxy (it serves POST /v1/messages, POST /v1/messages/count_tokens, GET /v1/models, GET /health, GET /metrics)",
            uri.path()
        ),
    ))
}

async fn health(State(st): State<Shared>) -> Response {
    let upstream = match st.upstream.health().await {
        Ok(()) => json!({"url": st.upstream.base(), "status": "ok"}),
        Err(e) => {
            let state = match e {
                UpstreamError::Unreachable(_) => "unreachable",
                UpstreamError::Status(503, _) => "loading",
                _ => "error",
            };
            json!({"url": st.upstream.base(), "status": state,
                   "error": e.to_proxy_error(st.upstream.base()).message})
        }
    };
    let ok = upstream["status"] == "ok";
    // Always 200 while the proxy itself serves: "is the proxy up" and "is the model up" are separate
    // questions, and the body answers the second.
    axum::Json(json!({
        "status": if ok { "ok" } else { "degraded" },
        "proxy": {
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": st.started.elapsed().as_secs(),
            "in_flight": st.metrics.in_flight(),
        },
        "upstream": upstream,
    }))
    .into_response()
}

async fn metrics(State(st): State<Shared>) -> Response {
    let mut res = st.metrics.render().into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}

async fn models(State(st): State<Shared>) -> Response {
    let mut t = Tracker::new(&st, "GET", "/v1/models", Instant::now());
    let listed = model_list(&st).await;
    t.upstream_wait = t.start.elapsed();
    match listed {
        Ok(data) => {
            t.ok();
            let first = data.first().map(|m| m["id"].clone()).unwrap_or(Value::Null);
            let last = data.last().map(|m| m["id"].clone()).unwrap_or(Value::Null);
            axum::Json(json!({"data": data, "has_more": false, "first_id": first, "last_id": last}))
                .into_response()
        }
        Err(e) => t.error(e),
    }
}

async fn model_by_id(State(st): State<Shared>, Path(id): Path<String>) -> Response {
    let mut t = Tracker::new(&st, "GET", "/v1/models/{id}", Instant::now());
    let listed = model_list(&st).await;
    t.upstream_wait = t.start.elapsed();
    match listed {
        Ok(data) => match data.into_iter().find(|m| m["id"] == id.as_str()) {
            Some(m) => {
                t.ok();
                axum::Json(m).into_response()
            }
            None => t.error(ProxyError::new(
                ErrorType::NotFound,
                format!("model {id:?} is not served here; GET /v1/models lists the models"),
            )),
        },
        Err(e) => t.error(e),
    }
}

/// The upstream's models in Anthropic's shape, then the client names of the model map.
async fn model_list(st: &Shared) -> Result<Vec<Value>, ProxyError> {
    let base = st.upstream.base();
    let (models, _) = st
        .upstream
        .list_models()
        .await
        .map_err(|e| e.to_proxy_error(base))?;
    let entry = |id: &str, display: &str, created: Option<i64>| {
        json!({"type": "model", "id": id, "display_name": display,
               "created_at": rfc3339(created.unwrap_or(0))})
    };
    let mut out: Vec<Value> = models
        .iter()
        .map(|m| entry(&m.id, display_name(&m.id), m.created))
        .collect();
    for name in st.settings.model_map.client_names() {
        if !out.iter().any(|m| m["id"] == name) {
            let target = st.settings.model_map.resolve(name).unwrap_or(name);
            out.push(entry(name, &format!("{name} → {target}"), None));
        }
    }
    Ok(out)
}

/// llama-server names models by their file path: show the file name.
fn display_name(id: &str) -> &str {
    id.rsplit('/').next().unwrap_or(id)
}

/// Unix seconds → `YYYY-MM-DDTHH:MM:SSZ` (Howard Hinnant's days-to-civil; no date crate for one field).
fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---------------------------------------------------------------------------------------------------------
// Request bodies

/// Reads the body up to `limit` bytes: 413 beyond it (checked on Content-Length first, so an honest client
/// is refused before it uploads), 400 when the client breaks the upload off.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ProxyError> {
    let too_large = || {
        ProxyError::new(
            ErrorType::RequestTooLarge,
            format!(
                "request body is larger than the proxy's limit of {limit} bytes (max_body_bytes)"
            ),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ProxyError::invalid_request(format!("could not read the request body: {e}"))
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// The `model` field alone, before full translation: it picks the upstream model. Invalid JSON is
/// reported here, naming the position.
fn peek_model(body: &[u8]) -> Result<String, ProxyError> {
    #[derive(Deserialize)]
    struct Peek {
        model: Option<Value>,
    }
    let peek: Peek = serde_json::from_slice(body)
        .map_err(|e| ProxyError::invalid_request(format!("request body is not valid JSON: {e}")))?;
    match peek.model {
        Some(Value::String(s)) => Ok(s),
        // Missing or mistyped: translation reports it with the field's name.
        _ => Ok(String::new()),
    }
}

/// Translation options for this request: the model map first, else the upstream's own model.
/// When the upstream cannot be asked (it is down before its model was ever discovered), a request that is
/// itself invalid still gets its 400: the client has something to fix either way, and that comes first.
async fn options_for(
    st: &Shared,
    client_model: &str,
    body: &[u8],
) -> Result<TranslateOptions, ProxyError> {
    let served = match st.upstream.served().await {
        Ok(s) => s,
        Err(e) => {
            let probe = TranslateOptions {
                upstream_model: String::new(),
                llama_cpp: false,
            };
            if let Err(bad) = translate_for_count(body, &probe) {
                return Err(ProxyError::invalid_request(bad.message));
            }
            return Err(e.to_proxy_error(st.upstream.base()));
        }
    };
    let upstream_model = match st.settings.model_map.resolve(client_model) {
        Some(m) => m.to_string(),
        None => served.model.to_string(),
    };
    Ok(TranslateOptions {
        upstream_model,
        llama_cpp: served.llama_cpp,
    })
}

// ---------------------------------------------------------------------------------------------------------
// POST /v1/messages/count_tokens

async fn count_tokens(State(st): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let mut t = Tracker::new(&st, "POST", "/v1/messages/count_tokens", Instant::now());
    match count(&st, &mut t, &headers, body).await {
        Ok(n) => {
            t.ok();
            axum::Json(json!({"input_tokens": n})).into_response()
        }
        Err(e) => t.error(e),
    }
}

async fn count(
    st: &Shared,
    t: &mut Tracker,
    headers: &HeaderMap,
    body: Body,
) -> Result<u64, ProxyError> {
    let bytes = read_body(headers, body, st.settings.max_body_bytes).await?;
    t.client_model = peek_model(&bytes)?;
    let opts = options_for(st, &t.client_model, &bytes).await?;
    t.upstream_model = opts.upstream_model.clone();
    let chat =
        translate_for_count(&bytes, &opts).map_err(|e| ProxyError::invalid_request(e.message))?;
    let base = st.upstream.base();
    let waited = Instant::now();
    let result = exact_count(&st.upstream, &chat).await;
    t.upstream_wait += waited.elapsed();
    match result {
        Ok(n) => Ok(n),
        // Servers without llama.cpp's template/tokenizer endpoints: an estimate, said so in the log.
        Err(UpstreamError::Status(404 | 405 | 501, _)) => {
            let n = estimate_tokens(&chat);
            tracing::warn!(
                upstream = base,
                estimate = n,
                "count_tokens: the upstream has no /apply-template + /tokenize; answering an estimate (bytes/4)"
            );
            Ok(n)
        }
        Err(e) => Err(e.to_proxy_error(base)),
    }
}

/// llama-server renders the prompt with the model's own chat template, then tokenizes it exactly as a
/// completion would (special tokens added and parsed).
async fn exact_count(upstream: &Upstream, chat: &Value) -> Result<u64, UpstreamError> {
    let rendered = upstream.post_json("/apply-template", chat).await?;
    let prompt = rendered
        .get("prompt")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            UpstreamError::Broken("/apply-template answered without a \"prompt\" string".into())
        })?;
    let tokens = upstream
        .post_json(
            "/tokenize",
            &json!({"content": prompt, "add_special": true, "parse_special": true}),
        )
        .await?;
    tokens
        .get("tokens")
        .and_then(Value::as_array)
        .map(|a| a.len() as u64)
        .ok_or_else(|| UpstreamError::Broken("/tokenize answered without a \"tokens\" list".into()))
}

/// Roughly 4 bytes per token over what the template would render: the messages and the tools.
fn estimate_tokens(chat: &Value) -> u64 {
    let len = |k: &str| chat.get(k).map_or(0, |v| v.to_string().len());
    ((len("messages") + len("tools")) as u64).div_ceil(4)
}

// ---------------------------------------------------------------------------------------------------------
// POST /v1/messages

async fn messages(State(st): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let mut t = Tracker::new(&st, "POST", "/v1/messages", Instant::now());
    let bytes = match read_body(&headers, body, st.settings.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return t.error(e),
    };
    match peek_model(&bytes) {
        Ok(m) => t.client_model = m,
        Err(e) => return t.error(e),
    }
    let opts = match options_for(&st, &t.client_model, &bytes).await {
        Ok(o) => o,
        Err(e) => return t.error(e),
    };
    t.upstream_model = opts.upstream_model.clone();
    let translated = match translate_request(&bytes, &opts) {
        Ok(tr) => tr,
        Err(e) => return t.error(ProxyError::invalid_request(e.message)),
    };
    drop(bytes);
    t.streamed = translated.client_stream;
    let body = match serde_json::to_vec(&translated.body) {
        Ok(b) => b,
        Err(e) => {
            return t.error(ProxyError::new(
                ErrorType::Api,
                format!("cannot encode the upstream request: {e}"),
            ));
        }
    };
    let waited = Instant::now();
    let started = st.upstream.start_chat(body).await;
    t.upstream_wait += waited.elapsed();
    let resp = match started {
        Ok(r) => r,
        Err(e) => return t.error(e.to_proxy_error(st.upstream.base())),
    };
    let mut whole_json = false;
    if let Some(ct) = resp.headers().get(header::CONTENT_TYPE)
        && !ct.as_bytes().windows(12).any(|w| w == b"event-stream")
    {
        // Some OpenAI-compatible servers ignore "stream" and answer one chat.completion: read it as one chunk.
        whole_json = ct.as_bytes().windows(4).any(|w| w == b"json");
        if !whole_json {
            let ct = String::from_utf8_lossy(ct.as_bytes()).into_owned();
            return t.error(ProxyError::new(
                ErrorType::Api,
                format!(
                    "upstream {} answered {ct} instead of an event stream; it must support \"stream\": true",
                    st.upstream.base()
                ),
            ));
        }
    }
    let mut pump = Pump::new(&st, resp, StreamTranslator::new(translated.ctx));
    if whole_json {
        pump.whole_json = Some(Vec::new());
    }
    if translated.client_stream {
        stream_response(st.settings.ping_interval, pump, t)
    } else {
        json_response(pump, t).await
    }
}

/// Drives the upstream's event stream through the translator. Every await in `next` is on the upstream's
/// byte stream alone, so cancelling `next` (for a ping) loses nothing.
struct Pump {
    upstream_url: String,
    body: Option<Incoming>,
    parser: SseParser,
    translator: StreamTranslator,
    idle_timeout: Duration,
    deadline: tokio::time::Instant,
    /// The failure sent as an `error` event, kept for the non-streaming answer's status.
    failure: Option<ProxyError>,
    done: bool,
    /// The upstream answered one JSON body instead of a stream: collected here, translated at its end.
    whole_json: Option<Vec<u8>>,
}

/// How long message_start waits for the upstream's prompt size before it goes out without it.
const MESSAGE_START_GRACE: Duration = Duration::from_secs(1);

/// The most of a non-streamed upstream answer that is collected before it is read as one chunk.
const MAX_WHOLE_JSON_BYTES: usize = 32 << 20;

impl Pump {
    fn new(
        st: &Shared,
        resp: axum::http::Response<Incoming>,
        translator: StreamTranslator,
    ) -> Self {
        let idle_timeout = st.settings.first_byte_timeout;
        Pump {
            upstream_url: st.upstream.base().to_string(),
            body: Some(resp.into_body()),
            parser: SseParser::default(),
            translator,
            idle_timeout,
            deadline: tokio::time::Instant::now() + idle_timeout,
            failure: None,
            done: false,
            whole_json: None,
        }
    }

    /// message_start and a ping, if the upstream's first chunk has not already sent them.
    fn start(&mut self) -> Vec<Event> {
        self.translator.start()
    }

    /// The next batch of events; empty once the stream is over.
    async fn next(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while out.is_empty() && !self.done {
            let Some(body) = self.body.as_mut() else {
                self.done = true;
                break;
            };
            let item = match tokio::time::timeout_at(self.deadline, body.frame()).await {
                Ok(item) => item,
                Err(_) => {
                    let e = ProxyError::new(
                        ErrorType::Timeout,
                        format!(
                            "upstream {} sent nothing for {}s (first_byte_timeout_secs)",
                            self.upstream_url,
                            self.idle_timeout.as_secs_f64()
                        ),
                    );
                    self.fail(e, &mut out);
                    break;
                }
            };
            self.deadline = tokio::time::Instant::now() + self.idle_timeout;
            match item {
                Some(Ok(frame)) => {
                    // Trailers carry no events.
                    if let Some(chunk) = frame.data_ref() {
                        match self.whole_json.as_mut() {
                            Some(buf) if buf.len() + chunk.len() > MAX_WHOLE_JSON_BYTES => {
                                let e = ProxyError::new(
                                    ErrorType::Api,
                                    format!(
                                        "upstream {} answered a JSON body over {MAX_WHOLE_JSON_BYTES} bytes instead of a stream",
                                        self.upstream_url
                                    ),
                                );
                                self.fail(e, &mut out);
                            }
                            Some(buf) => buf.extend_from_slice(chunk),
                            None => self.on_bytes(chunk, &mut out),
                        }
                    }
                }
                Some(Err(e)) => {
                    let reason = super::upstream::root_reason(&e);
                    let msg = format!(
                        "upstream {} broke off the stream: {reason}",
                        self.upstream_url
                    );
                    self.fail(ProxyError::new(ErrorType::Api, msg), &mut out);
                }
                None if self.whole_json.is_some() => {
                    let buf = self.whole_json.take().unwrap_or_default();
                    self.on_whole_json(&buf, &mut out);
                }
                None => {
                    if let Some(ev) = self.parser.finish() {
                        self.on_data(&ev.data, &mut out);
                    }
                    if !self.done {
                        let e = ProxyError::new(
                            ErrorType::Api,
                            format!(
                                "upstream {} closed the stream before it finished (no [DONE])",
                                self.upstream_url
                            ),
                        );
                        self.fail(e, &mut out);
                    }
                }
            }
        }
        out
    }

    fn on_bytes(&mut self, chunk: &[u8], out: &mut Vec<Event>) {
        match self.parser.push(chunk) {
            Ok(events) => {
                for ev in events {
                    if self.done {
                        break;
                    }
                    self.on_data(&ev.data, out);
                }
            }
            Err(e) => {
                let e = ProxyError::new(
                    ErrorType::Api,
                    format!(
                        "upstream {} sent a broken event stream: {e}",
                        self.upstream_url
                    ),
                );
                self.fail(e, out);
            }
        }
    }

    fn on_data(&mut self, data: &str, out: &mut Vec<Event>) {
        if data == "[DONE]" {
            out.extend(self.translator.finish());
            self.end();
            return;
        }
        // Straight into the typed chunk, the common case. What that cannot take (not JSON, an unexpected
        // shape) goes the general way below, which tells those apart.
        if let Ok(chunk) = serde_json::from_str::<ChatChunk>(data) {
            if let Some(err) = &chunk.error {
                let e = from_upstream_stream_error(err, &self.upstream_url);
                return self.fail(e, out);
            }
            out.extend(self.translator.on_parsed(chunk));
            self.end_if_stopped(out);
            return;
        }
        let chunk: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(e) => {
                let e = ProxyError::new(
                    ErrorType::Api,
                    format!(
                        "upstream {} sent an event that is not JSON: {e}",
                        self.upstream_url
                    ),
                );
                return self.fail(e, out);
            }
        };
        if let Some(err) = chunk.get("error") {
            let e = from_upstream_stream_error(err, &self.upstream_url);
            return self.fail(e, out);
        }
        out.extend(self.translator.on_chunk(&chunk));
        self.end_if_stopped(out);
    }

    /// A whole `chat.completion` body, fed to the translator as the chunks a stream would have carried.
    fn on_whole_json(&mut self, body: &[u8], out: &mut Vec<Event>) {
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        if let Some(err) = parsed.as_ref().and_then(|v| v.get("error")) {
            let e = from_upstream_stream_error(err, &self.upstream_url);
            return self.fail(e, out);
        }
        let Some(chunks) = parsed
            .as_ref()
            .and_then(super::whole_body::completion_chunks)
        else {
            let e = ProxyError::new(
                ErrorType::Api,
                format!(
                    "upstream {} answered a JSON body that is neither an event stream nor a chat completion",
                    self.upstream_url
                ),
            );
            return self.fail(e, out);
        };
        for chunk in chunks {
            if self.done {
                return;
            }
            self.on_data(&chunk.to_string(), out);
        }
        if !self.done {
            self.on_data("[DONE]", out);
        }
    }

    fn end_if_stopped(&mut self, out: &mut Vec<Event>) {
        if self.translator.is_done() {
            // A stop sequence matched: finish now and hang up, which stops the upstream's generation.
            out.extend(self.translator.finish());
            self.end();
        }
    }

    fn fail(&mut self, e: ProxyError, out: &mut Vec<Event>) {
        out.extend(self.translator.fail(e.kind.as_str(), &e.message));
        self.failure = Some(e);
        self.end();
    }

    /// Drops the upstream response: its connection closes, and llama-server cancels the generation.
    fn end(&mut self) {
        self.done = true;
        self.body = None;
    }

    fn record(&self, t: &mut Tracker) {
        t.usage = self.translator.usage();
        t.stop_reason = self.translator.stop_reason().map(str::to_owned);
        if let Some(e) = &self.failure {
            t.error_type = Some(e.kind.as_str());
            t.error_message = Some(e.message.clone());
        }
    }
}

fn note_first_token(t: &mut Tracker, events: &[Event]) {
    if t.ttft.is_none()
        && events
            .iter()
            .any(|e| matches!(e, Event::ContentBlockDelta { .. }))
    {
        t.ttft = Some(t.start.elapsed());
    }
}

fn encode(events: &[Event]) -> Bytes {
    if let [one] = events {
        return one.to_sse();
    }
    let mut buf = Vec::with_capacity(events.len() * 128);
    for e in events {
        buf.extend_from_slice(&e.to_sse());
    }
    Bytes::from(buf)
}

struct StreamState {
    pump: Pump,
    tracker: Tracker,
    pending: VecDeque<Bytes>,
    ping_interval: Duration,
    last_sent: tokio::time::Instant,
    finished: bool,
}

impl Drop for StreamState {
    fn drop(&mut self) {
        // A client that hung up: still log the tokens the upstream reported so far.
        if !self.finished {
            self.pump.record(&mut self.tracker);
        }
    }
}

fn stream_response(ping_interval: Duration, pump: Pump, tracker: Tracker) -> Response {
    // message_start waits for the upstream's first chunk, which from llama.cpp is the prompt's size right
    // after tokenizing (so message_start can carry input_tokens), but never longer than MESSAGE_START_GRACE:
    // the first "ping" tick sends it (with the ping) when the upstream is still silent, e.g. queued.
    let grace = ping_interval.min(MESSAGE_START_GRACE);
    let now = tokio::time::Instant::now();
    let state = StreamState {
        pump,
        tracker,
        pending: VecDeque::new(),
        ping_interval,
        last_sent: now.checked_sub(ping_interval - grace).unwrap_or(now),
        finished: false,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        if let Some(b) = s.pending.pop_front() {
            s.last_sent = tokio::time::Instant::now();
            return Some((Ok::<Bytes, std::convert::Infallible>(b), s));
        }
        if s.finished {
            return None;
        }
        let waited = Instant::now();
        let ping_at = s.last_sent + s.ping_interval;
        let events = tokio::select! {
            ev = s.pump.next() => Some(ev),
            () = tokio::time::sleep_until(ping_at) => None,
        };
        s.tracker.upstream_wait += waited.elapsed();
        s.last_sent = tokio::time::Instant::now();
        match events {
            // No event for a whole interval (a long prefill): a ping keeps the client's idle timer happy,
            // after message_start if that was still held back.
            None => {
                let start = s.pump.start();
                let bytes = if start.is_empty() {
                    Event::Ping.to_sse()
                } else {
                    encode(&start)
                };
                Some((Ok(bytes), s))
            }
            Some(events) if events.is_empty() => {
                s.finished = true;
                s.pump.record(&mut s.tracker);
                s.tracker.ok();
                None
            }
            Some(events) => {
                note_first_token(&mut s.tracker, &events);
                if s.pump.done {
                    s.finished = true;
                    s.pump.record(&mut s.tracker);
                    s.tracker.ok();
                }
                Some((Ok(encode(&events)), s))
            }
        }
    });
    let mut res = Response::new(Body::from_stream(stream));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells any reverse proxy in front (nginx) not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

/// `stream: false`: the same events, folded into one message.
async fn json_response(mut pump: Pump, mut t: Tracker) -> Response {
    let mut acc = MessageAccumulator::new();
    for e in pump.start() {
        acc.push(&e);
    }
    loop {
        let waited = Instant::now();
        let events = pump.next().await;
        t.upstream_wait += waited.elapsed();
        if events.is_empty() {
            break;
        }
        note_first_token(&mut t, &events);
        for e in &events {
            acc.push(e);
        }
    }
    pump.record(&mut t);
    if let Some(e) = pump.failure.take() {
        return t.error(e);
    }
    t.ok();
    let mut res = Response::new(Body::from(acc.finish_bytes()));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn presented_key_reads_both_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(presented_key(&h), Some(&b"abc"[..]));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer abc"),
        );
        assert_eq!(presented_key(&h), Some(&b"abc"[..]));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(presented_key(&h), None);
        h.insert("x-api-key", HeaderValue::from_static("k"));
        assert_eq!(presented_key(&h), Some(&b"k"[..]));
    }

    #[test]
    fn digests_compare() {
        assert!(same_digest(&digest(b"a"), &digest(b"a")));
        assert!(!same_digest(&digest(b"a"), &digest(b"b")));
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_585_933), "2026-11-25T05:52:13Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn open_paths() {
        assert!(is_open(&Method::HEAD, "/"));
        assert!(is_open(&Method::GET, "/health"));
        assert!(!is_open(&Method::POST, "/"));
        assert!(!is_open(&Method::GET, "/metrics"));
    }

    #[test]
    fn peek_model_reports_invalid_json() {
        assert_eq!(peek_model(br#"{"model":"m","x":1}"#).unwrap(), "m");
        assert_eq!(peek_model(br#"{"messages":[]}"#).unwrap(), "");
        let e = peek_model(b"{not json").unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
    }

    #[test]
    fn estimate_is_a_quarter_of_the_bytes() {
        let chat = json!({"messages":[{"role":"user","content":"abcdefgh"}]});
        let bytes = chat["messages"].to_string().len() as u64;
        assert_eq!(estimate_tokens(&chat), bytes.div_ceil(4));
    }
}
