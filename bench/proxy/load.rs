//! The load generator: HTTP/1.1 keep-alive connections through hyper, one thread, no timed assertions.
//! Latency is measured from the *scheduled* send time in open-loop runs (no coordinated omission).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::future::join_all;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// Which protocol the measured endpoint speaks: direct upstream (OpenAI chat completions) or a translating
/// proxy's front door (Anthropic Messages, or OpenAI Responses).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Api {
    OpenAi,
    Anthropic,
    Responses,
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub api: Api,
    /// The model name the endpoint routes on.
    pub model: String,
    /// Only a real llama-server honours it; the instant upstream streams what `@n=` asks for.
    pub max_tokens: u32,
}

impl Endpoint {
    pub fn path(&self) -> &'static str {
        match self.api {
            Api::OpenAi => "/v1/chat/completions",
            Api::Anthropic => "/v1/messages",
            Api::Responses => "/v1/responses",
        }
    }

    pub fn body(&self, stream: bool, text: &str) -> Bytes {
        let max_tokens = self.max_tokens;
        let v = match self.api {
            // The same text as one input string, as Codex's simplest request has it.
            Api::Responses => serde_json::json!({
                "model": self.model, "max_output_tokens": max_tokens, "input": text, "stream": stream
            }),
            Api::OpenAi | Api::Anthropic => {
                let msg = serde_json::json!([{"role": "user", "content": text}]);
                serde_json::json!({"model": self.model, "max_tokens": max_tokens, "messages": msg, "stream": stream})
            }
        };
        Bytes::from(serde_json::to_vec(&v).expect("a JSON value serializes"))
    }

    fn request(&self, body: Bytes) -> hyper::Request<Full<Bytes>> {
        hyper::Request::post(self.path())
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .header("x-api-key", crate::env::API_KEY)
            .header("authorization", format!("Bearer {}", crate::env::API_KEY))
            .header("anthropic-version", "2023-06-01")
            .body(Full::new(body))
            .expect("static request parts are valid")
    }

    /// Is this SSE event one that carries generated text?
    fn is_content_event(&self, event: &[u8]) -> bool {
        match self.api {
            Api::OpenAi => find(event, b"\"delta\":{\"content\":\"").is_some(),
            Api::Anthropic => find(event, b"content_block_delta").is_some(),
            Api::Responses => find(event, b"response.output_text.delta").is_some(),
        }
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

type Sender = SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender> {
    let sock = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    sock.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(sock)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A kept-alive connection that reconnects when the server closed it.
struct Conn {
    addr: SocketAddr,
    sender: Option<Sender>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        Conn { addr, sender: None }
    }

    async fn send(
        &mut self,
        req: hyper::Request<Full<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        if let Some(mut sender) = self.sender.take().filter(|s| !s.is_closed()) {
            // A kept-alive connection the server has just closed (llama-server ends one after a number of
            // requests) fails before any answer: the request goes again on a new connection, as any HTTP
            // client does. Its time, failed attempt included, is still charged to the request.
            let again = clone_request(&req);
            let sent = match sender.ready().await {
                Ok(()) => sender.send_request(req).await,
                Err(e) => Err(e),
            };
            match sent {
                Ok(resp) => {
                    self.sender = Some(sender);
                    return Ok(resp);
                }
                Err(e) if e.is_incomplete_message() || e.is_canceled() || e.is_closed() => {
                    return self.send_fresh(again).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.send_fresh(req).await
    }

    async fn send_fresh(
        &mut self,
        req: hyper::Request<Full<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let mut sender = connect(self.addr).await?;
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        self.sender = Some(sender);
        Ok(resp)
    }
}

fn clone_request(req: &hyper::Request<Full<Bytes>>) -> hyper::Request<Full<Bytes>> {
    let mut out = hyper::Request::new(req.body().clone());
    *out.method_mut() = req.method().clone();
    *out.uri_mut() = req.uri().clone();
    *out.headers_mut() = req.headers().clone();
    out
}

#[derive(Debug, Default)]
pub struct RunResult {
    pub latencies_us: Vec<f64>,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

impl RunResult {
    pub fn rate(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn error(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }

    pub fn merge(parts: Vec<RunResult>, elapsed: Duration) -> RunResult {
        let mut out = RunResult {
            elapsed,
            ..Default::default()
        };
        for p in parts {
            out.latencies_us.extend(p.latencies_us);
            out.errors += p.errors;
            if out.first_error.is_none() {
                out.first_error = p.first_error;
            }
        }
        out
    }
}

async fn one_nonstream(conn: &mut Conn, ep: &Endpoint, body: &Bytes) -> Result<()> {
    let resp = conn.send(ep.request(body.clone())).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
        );
    }
    Ok(())
}

/// Non-streaming requests: `rate` = Some(r) is an open loop at r requests/s shared by the connections,
/// None is a closed loop at maximum throughput.
pub async fn nonstream(ep: &Endpoint, conns: usize, rate: Option<f64>, dur: Duration) -> RunResult {
    let body = ep.body(false, "Say hello in one short sentence.");
    // Each connection answers one request before the clock starts: opening it (and, behind a proxy, the
    // proxy's own upstream connection) is not what is measured.
    let primed = join_all((0..conns).map(|_| {
        let body = body.clone();
        async move {
            let mut conn = Conn::new(ep.addr);
            if one_nonstream(&mut conn, ep, &body).await.is_err() {
                conn.sender = None;
            }
            conn
        }
    }))
    .await;
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now() + Duration::from_millis(20);
    let end = t0 + dur;
    let workers = primed.into_iter().map(|mut conn| {
        let (body, next) = (body.clone(), next.clone());
        async move {
            let mut res = RunResult::default();
            // Not to t0 itself: the first slot is t0, and the timer's lateness (below) would be charged to
            // it: ~1.3 ms on every run's first request, which five one-second turns made the p99.
            tokio::time::sleep_until((t0 - Duration::from_millis(3)).into()).await;
            while Instant::now() < t0 {
                tokio::task::yield_now().await;
            }
            loop {
                let scheduled = match rate {
                    Some(r) => {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let at = t0 + Duration::from_secs_f64(i as f64 / r);
                        if at >= end {
                            break;
                        }
                        // tokio's timer rounds a deadline up to its next millisecond tick and the poller's
                        // timeout up to a whole millisecond, so it wakes up to ~2 ms late, and that lateness
                        // would be charged to the request (with 1 ms of margin it added ~0.6 ms to every
                        // p50 at 100 requests/s): sleep to 3 ms before the slot, then yield until it.
                        if let Some(early) = at.checked_sub(Duration::from_millis(3)) {
                            tokio::time::sleep_until(early.into()).await;
                        }
                        while Instant::now() < at {
                            tokio::task::yield_now().await;
                        }
                        at
                    }
                    None => {
                        let now = Instant::now();
                        if now >= end {
                            break;
                        }
                        now
                    }
                };
                match one_nonstream(&mut conn, ep, &body).await {
                    Ok(()) => res
                        .latencies_us
                        .push(scheduled.elapsed().as_secs_f64() * 1e6),
                    Err(e) => {
                        res.error(format!("{e:#}"));
                        conn.sender = None;
                    }
                }
            }
            res
        }
    });
    let parts = join_all(workers).await;
    RunResult::merge(parts, t0.elapsed())
}

/// One connection, closed loop (as wrk -c1 runs): the next request goes as soon as the previous answer has
/// been read to its end, streamed (`stream`: the recorded stream of ~16 events) or not. Latency = send to the
/// last byte of the answer.
pub async fn closed_loop(ep: &Endpoint, stream: bool, dur: Duration) -> RunResult {
    let body = ep.body(stream, "Say hello in one short sentence.");
    let mut conn = Conn::new(ep.addr);
    // The connection (and behind a proxy, its upstream connection) is opened before the clock starts.
    if one_nonstream(&mut conn, ep, &body).await.is_err() {
        conn.sender = None;
    }
    let mut res = RunResult::default();
    let t0 = Instant::now();
    while t0.elapsed() < dur {
        let sent = Instant::now();
        match one_nonstream(&mut conn, ep, &body).await {
            Ok(()) => res.latencies_us.push(sent.elapsed().as_secs_f64() * 1e6),
            Err(e) => {
                res.error(format!("{e:#}"));
                conn.sender = None;
            }
        }
    }
    res.elapsed = t0.elapsed();
    res
}

/// Exactly `n` non-streaming requests, one after the other on one kept-alive connection (the native
/// section's figures: each takes a real model tens of milliseconds).
pub async fn sequential(ep: &Endpoint, n: usize) -> RunResult {
    let body = ep.body(false, "Say hello in one short sentence.");
    let mut conn = Conn::new(ep.addr);
    let mut res = RunResult::default();
    let t0 = Instant::now();
    for _ in 0..n {
        let sent = Instant::now();
        match one_nonstream(&mut conn, ep, &body).await {
            Ok(()) => res.latencies_us.push(sent.elapsed().as_secs_f64() * 1e6),
            Err(e) => {
                res.error(format!("{e:#}"));
                conn.sender = None;
            }
        }
    }
    res.elapsed = t0.elapsed();
    res
}

#[derive(Debug, Default)]
pub struct StreamResult {
    /// Send → response head.
    pub first_byte_us: Vec<f64>,
    /// Send → first event carrying text.
    pub first_content_us: Vec<f64>,
    /// One-way delay of each stamped text event (upstream send → client receipt).
    pub event_delay_us: Vec<f64>,
    pub content_events: u64,
    pub streams: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

impl StreamResult {
    pub fn events_per_s(&self) -> f64 {
        self.content_events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// Every `~T<ns>~` stamp in an event.
pub fn stamps(event: &[u8]) -> Vec<u128> {
    let mut out = vec![];
    let mut rest = event;
    while let Some(i) = find(rest, b"~T") {
        rest = &rest[i + 2..];
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if rest.get(digits) == Some(&b'~')
            && let Some(ns) = std::str::from_utf8(&rest[..digits])
                .ok()
                .and_then(|s| s.parse().ok())
        {
            out.push(ns);
        }
        rest = &rest[digits..];
    }
    out
}

async fn one_stream(
    conn: &mut Conn,
    ep: &Endpoint,
    body: &Bytes,
    out: &mut StreamResult,
) -> Result<()> {
    let sent = Instant::now();
    let resp = conn.send(ep.request(body.clone())).await?;
    let status = resp.status();
    out.first_byte_us.push(sent.elapsed().as_secs_f64() * 1e6);
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut seen_content = false;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buf.extend_from_slice(data);
        let mut start = 0;
        while let Some(i) = find(&buf[start..], b"\n\n") {
            let event = &buf[start..start + i];
            if ep.is_content_event(event) {
                if !seen_content {
                    seen_content = true;
                    out.first_content_us
                        .push(sent.elapsed().as_secs_f64() * 1e6);
                }
                out.content_events += 1;
                let now = now_ns();
                for s in stamps(event) {
                    out.event_delay_us.push(now.saturating_sub(s) as f64 / 1e3);
                }
            }
            start += i + 2;
        }
        buf.drain(..start);
    }
    if !status.is_success() {
        bail!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&buf[..buf.len().min(300)])
        );
    }
    if !seen_content {
        bail!("the stream carried no text event");
    }
    out.streams += 1;
    Ok(())
}

/// `concurrency` connections each running streams back to back until `dur` has passed, or exactly
/// `per_conn` streams each when given.
pub async fn streams(
    ep: &Endpoint,
    concurrency: usize,
    chunks: usize,
    pace_us: u64,
    dur: Duration,
    per_conn: Option<usize>,
) -> StreamResult {
    let text = format!("Say hello in one short sentence. @n={chunks} @pace_us={pace_us}");
    let body = ep.body(true, &text);
    let t0 = Instant::now();
    let workers = (0..concurrency).map(|_| {
        let body = body.clone();
        async move {
            let mut conn = Conn::new(ep.addr);
            let mut res = StreamResult::default();
            let mut done = 0;
            while per_conn.map_or(t0.elapsed() < dur, |n| done < n) {
                done += 1;
                if let Err(e) = one_stream(&mut conn, ep, &body, &mut res).await {
                    res.errors += 1;
                    res.first_error.get_or_insert(format!("{e:#}"));
                    conn.sender = None;
                }
            }
            res
        }
    });
    let parts = join_all(workers).await;
    let mut out = StreamResult {
        elapsed: t0.elapsed(),
        ..Default::default()
    };
    for p in parts {
        out.first_byte_us.extend(p.first_byte_us);
        out.first_content_us.extend(p.first_content_us);
        out.event_delay_us.extend(p.event_delay_us);
        out.content_events += p.content_events;
        out.streams += p.streams;
        out.errors += p.errors;
        if out.first_error.is_none() {
            out.first_error = p.first_error;
        }
    }
    out
}

/// Sends one non-streaming request and returns the response JSON (readiness probes, the cache replay).
pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value> {
    let mut conn = Conn::new(addr);
    let req = hyper::Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .header("x-api-key", crate::env::API_KEY)
        .header("authorization", format!("Bearer {}", crate::env::API_KEY))
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
    let resp = conn.send(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(400)])
        );
    }
    serde_json::from_slice(&bytes).context("response is not JSON")
}

pub async fn get_text(addr: SocketAddr, path: &str) -> Result<String> {
    let mut conn = Conn::new(addr);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))?;
    let resp = conn.send(req).await?;
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_found_in_both_wire_formats() {
        assert_eq!(
            stamps(br#"data: {"choices":[{"delta":{"content":"~T1700000000123~"}}]}"#),
            vec![1700000000123]
        );
        let ev = b"event: content_block_delta\ndata: {\"delta\":{\"type\":\"text_delta\",\"text\":\"~T5~~T6~\"}}";
        assert_eq!(stamps(ev), vec![5, 6]);
        assert!(stamps(b"~T12 not closed").is_empty());
    }

    #[test]
    fn content_events_are_told_apart_from_framing() {
        let oa = Endpoint {
            addr: "127.0.0.1:1".parse().unwrap(),
            api: Api::OpenAi,
            model: "m".into(),
            max_tokens: 1,
        };
        assert!(oa.is_content_event(br#"data: {"choices":[{"delta":{"content":"I"}}]}"#));
        assert!(!oa.is_content_event(
            br#"data: {"choices":[{"delta":{"role":"assistant","content":null}}]}"#
        ));
        let an = Endpoint {
            api: Api::Anthropic,
            ..oa
        };
        assert!(an.is_content_event(b"event: content_block_delta\ndata: {}"));
        assert!(!an.is_content_event(b"event: message_start\ndata: {}"));
        let re = Endpoint {
            api: Api::Responses,
            ..an
        };
        assert!(re.is_content_event(b"event: response.output_text.delta\ndata: {}"));
        assert!(!re.is_content_event(b"event: response.output_text.done\ndata: {}"));
    }

    #[test]
    fn a_responses_request_carries_the_text_as_input() {
        let re = Endpoint {
            addr: "127.0.0.1:1".parse().unwrap(),
            api: Api::Responses,
            model: "m".into(),
            max_tokens: 24,
        };
        let v: serde_json::Value = serde_json::from_slice(&re.body(true, "hi @n=3")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"model": "m", "max_output_tokens": 24, "input": "hi @n=3", "stream": true})
        );
        assert_eq!(re.path(), "/v1/responses");
    }
}
