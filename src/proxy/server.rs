//! The HTTP side: axum routes, authentication, the small endpoints (health, metrics, models) and what every
//! front door shares before its decoder runs (reading the body, picking the upstream model). The front doors
//! are `messages` (Anthropic) and `responses` (OpenAI); both hand the upstream's stream to `pump`.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::accounting::Tracker;
use super::config::Settings;
use super::dashboard::{self, Dashboard};
use super::error::{Dialect, ErrorType, ProxyError};
use super::messages::{count_tokens, messages};
use super::metrics::Metrics;
use super::responses::responses;
use super::router::Router as ReplicaRouter;
use super::translate::{RequestError, TranslateOptions};
use super::upstream::{Upstream, UpstreamError};

pub struct AppState {
    pub settings: Settings,
    /// The replicas and the routing state; one replica for the single-upstream setup.
    pub router: Arc<ReplicaRouter>,
    pub metrics: Metrics,
    /// The dashboard's ring of points, filled by `dashboard::sample`.
    pub dashboard: Dashboard,
    pub started: Instant,
    /// SHA-256 of the client key: compared in constant time, and the key itself is not kept around.
    key_digest: Option<[u8; 32]>,
    /// Turns true when shutdown's grace period is over: answers still running end with their protocol's error.
    cut: tokio::sync::watch::Sender<bool>,
}

impl AppState {
    pub fn new(settings: Settings, router: Arc<ReplicaRouter>) -> Self {
        let key_digest = settings
            .api_key
            .as_ref()
            .map(|k| digest(k.value.as_bytes()));
        AppState {
            settings,
            router,
            metrics: Metrics::default(),
            dashboard: Dashboard::default(),
            started: Instant::now(),
            key_digest,
            cut: tokio::sync::watch::Sender::new(false),
        }
    }

    /// The upstream for calls any replica can answer (models, token counts, the dashboard's figures).
    pub fn upstream(&self) -> &Upstream {
        self.router.primary()
    }

    /// Ends every answer still running (shutdown's grace period is over).
    pub fn cut_in_flight(&self) {
        self.cut.send_replace(true);
    }

    /// Resolves once `cut_in_flight` was called.
    pub fn cut_signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.cut.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }
}

pub(crate) type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/dashboard", get(dashboard::page))
        .route("/dashboard/dashboard.js", get(dashboard::script))
        .route("/dashboard/dashboard.css", get(dashboard::style))
        .route("/dashboard/data.json", get(dashboard::data))
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/v1/responses", post(responses))
        .route("/v1/chat/completions", post(super::chat::chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_by_id))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        // One layer, not one per concern: each `from_fn` layer clones the route service and boxes a future
        // per request.
        .layer(middleware::from_fn_with_state(state.clone(), front))
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
/// Nor does the dashboard's page, its script and style: they are the same static bytes for everyone and hold
/// no data (a browser cannot send a key with a page load); the figures, `/dashboard/data.json`, need the key.
fn is_open(method: &Method, path: &str) -> bool {
    let read = method == Method::GET || method == Method::HEAD;
    path == "/health"
        || (read
            && matches!(
                path,
                "/" | "/dashboard" | "/dashboard/dashboard.js" | "/dashboard/dashboard.css"
            ))
}

tokio::task_local! {
    /// The id of the request being handled, for its log line (`Tracker` reads it when it is created).
    pub(crate) static REQUEST_ID: String;
}

/// A fresh id per request, in both SDKs' headers (`request-id`, Anthropic's; `x-request-id`, OpenAI's: each SDK
/// shows it as the error's and the response's request id) and in the request's log line, so a user's report
/// and the proxy's log can be matched. Then the key check, inside the id's scope, so that a refused request's log line has its id too.
async fn front(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let id = super::translate::new_id("req_");
    let mut res = REQUEST_ID
        .scope(id.clone(), authenticate(&st, req, next))
        .await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("request-id", v.clone());
        res.headers_mut().insert("x-request-id", v);
    }
    res
}

async fn authenticate(st: &Shared, req: Request, next: Next) -> Response {
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
    let mut t = Tracker::new(st, req.method().as_str(), req.uri().path(), start);
    t.dialect = Dialect::of(req.uri().path(), req.headers());
    let msg = if presented_key(req.headers()).is_some() {
        "invalid API key: the x-api-key (or Authorization: Bearer) header does not match the proxy's key"
    } else {
        "missing API key: send it in the x-api-key header or as Authorization: Bearer"
    };
    t.error(ProxyError::new(ErrorType::Authentication, msg))
}

// ---------------------------------------------------------------------------------------------------------
// Small endpoints

async fn root() -> &'static str {
    "llmctl serve-proxy: Anthropic Messages API at /v1/messages, OpenAI Responses API at /v1/responses, OpenAI Chat Completions at /v1/chat/completions\n"
}

async fn not_found(
    State(st): State<Shared>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    let mut t = Tracker::new(&st, method.as_str(), uri.path(), Instant::now());
    t.dialect = Dialect::of(uri.path(), &headers);
    t.error(ProxyError::new(
        ErrorType::NotFound,
        format!(
            "{method} {} is not an endpoint of this proxy (it serves POST /v1/messages, POST /v1/messages/count_tokens, POST /v1/responses, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics, GET /dashboard)",
            uri.path()
        ),
    ))
}

async fn health(State(st): State<Shared>) -> Response {
    // This proxy's own model, never a peer's: the status is what a peer reads before sending a hop here.
    let own = st.router.own_primary();
    let upstream = match own.health().await {
        Ok(()) => json!({"url": own.base(), "status": "ok"}),
        Err(e) => {
            let state = match e {
                UpstreamError::Unreachable(_) => "unreachable",
                UpstreamError::Status(503, _) => "loading",
                _ => "error",
            };
            json!({"url": own.base(), "status": state,
                   "error": e.to_proxy_error(own.base()).message})
        }
    };
    let ok = upstream["status"] == "ok";
    // Each replica's state as the router sees it (probed once a second with several).
    let replicas: Vec<Value> = st
        .router
        .replicas()
        .iter()
        .map(|r| json!({"url": r.spec.url, "up": r.is_up(), "in_flight": r.in_flight(), "slots": r.slots(), "peer": r.spec.peer}))
        .collect();
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
        "replicas": replicas,
    }))
    .into_response()
}

async fn metrics(State(st): State<Shared>) -> Response {
    let mut text = st.metrics.render();
    st.router.render(&mut text);
    let mut res = text.into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}

async fn models(State(st): State<Shared>, headers: HeaderMap) -> Response {
    let mut t = Tracker::new(&st, "GET", "/v1/models", Instant::now());
    t.dialect = Dialect::of("/v1/models", &headers);
    let listed = model_list(&st).await;
    t.upstream_wait = t.start.elapsed();
    match listed {
        Ok(data) if t.dialect == Dialect::OpenAi => {
            t.ok();
            let data: Vec<Value> = data.iter().map(openai_model).collect();
            axum::Json(json!({"object": "list", "data": data})).into_response()
        }
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

async fn model_by_id(
    State(st): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut t = Tracker::new(&st, "GET", "/v1/models/{id}", Instant::now());
    t.dialect = Dialect::of("/v1/models", &headers);
    let listed = model_list(&st).await;
    t.upstream_wait = t.start.elapsed();
    match listed {
        Ok(data) => match data.into_iter().find(|m| m["id"] == id.as_str()) {
            Some(m) => {
                t.ok();
                if t.dialect == Dialect::OpenAi {
                    axum::Json(openai_model(&m)).into_response()
                } else {
                    axum::Json(m).into_response()
                }
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
    let base = st.upstream().base();
    let (models, _) = st
        .upstream()
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

/// One model in OpenAI's shape, from the Anthropic-shaped entry.
fn openai_model(m: &Value) -> Value {
    let created = m["created_at"]
        .as_str()
        .and_then(parse_rfc3339)
        .unwrap_or(0);
    json!({"id": m["id"], "object": "model", "created": created, "owned_by": "llmctl"})
}

/// `YYYY-MM-DDTHH:MM:SSZ` → Unix seconds (the inverse of `rfc3339`).
fn parse_rfc3339(s: &str) -> Option<i64> {
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Days from civil (Howard Hinnant), the inverse of rfc3339's.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
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

/// A front door's request: its body read within `max_body_bytes` and parsed once as one JSON object, its
/// `model` noted as the client's; otherwise the error answer, already accounted. The bytes come back too (the
/// chat door sends them as they came; the others drop them).
pub(crate) async fn read_object(
    st: &Shared,
    t: &mut Tracker,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Bytes, serde_json::Map<String, Value>), Response> {
    let bytes = match read_body(headers, body, st.settings.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return Err(t.error(e)),
    };
    let req = match super::translate::parse_body(&bytes) {
        Ok(r) => r,
        Err(e) => return Err(t.error(ProxyError::invalid_request(e.message))),
    };
    if let Some(Value::String(m)) = req.get("model") {
        t.client_model = m.clone();
    }
    Ok((bytes, req))
}

/// Reads the body up to `limit` bytes: 413 beyond it (checked on Content-Length first, so an honest client
/// is refused before it uploads), 400 when the client breaks the upload off.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ProxyError> {
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

/// Translation options for this request: the model map first, else the upstream's own model.
/// When the upstream cannot be asked (it is down before its model was ever discovered), a request that is
/// itself invalid still gets its 400: the client has something to fix either way, and that comes first.
pub(crate) async fn options_for(
    st: &Shared,
    client_model: &str,
    check: impl FnOnce(&TranslateOptions) -> Result<(), RequestError>,
) -> Result<TranslateOptions, ProxyError> {
    let served = match st.upstream().served().await {
        Ok(s) => s,
        Err(e) => {
            let probe = TranslateOptions {
                upstream_model: String::new(),
                llama_cpp: false,
            };
            if let Err(bad) = check(&probe) {
                return Err(ProxyError::invalid_request(bad.message));
            }
            return Err(e.to_proxy_error(st.upstream().base()));
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn rfc3339_round_trips() {
        for secs in [0, 951_782_400, 1_795_585_933, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&rfc3339(secs)), Some(secs));
        }
        assert_eq!(parse_rfc3339("garbage"), None);
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
        assert!(is_open(&Method::GET, "/dashboard"));
        assert!(is_open(&Method::GET, "/dashboard/dashboard.js"));
        assert!(!is_open(&Method::POST, "/dashboard"));
        assert!(!is_open(&Method::GET, "/dashboard/data.json"));
    }
}
