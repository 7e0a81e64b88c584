//! The stream driver: one `Pump` reads the upstream's chat-completions stream through the stream translator
//! into the pipeline's events, and one of two answer paths hands them to the client through its front door's
//! encoder: as SSE (with keep-alives while the upstream is silent), or folded into one JSON body for
//! `stream: false`. The server, the benches and the tests all drive streams through this.

use std::collections::VecDeque;
use std::future::Future;
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use hyper::body::Body as _;
use serde_json::Value;

use super::accounting::Tracker;
use super::accumulate::MessageAccumulator;
use super::chunk_scan::ChunkReader;
use super::error::{Dialect, ErrorType, ProxyError, from_upstream_stream_error};
use super::openai::ChatChunk;
use super::responses::ResponsesEncoder;
use super::router::{self, Acquired, RouteKey};
use super::server::Shared;
use super::sse::SseParser;
use super::stream::{Event, StreamTranslator};
use super::upstream::{Upstream, UpstreamBody};
use super::whole_body::{Chunk, Whole};

/// A front door's streaming encoder: the pipeline's events → that protocol's SSE bytes.
pub trait SseEncoder: Send + 'static {
    fn encode(&mut self, events: &[Event]) -> Bytes;
    /// What to send when nothing happened for a ping interval, once the stream has started.
    fn keepalive(&mut self) -> Bytes;
}

/// A front door's non-streaming encoder: the events folded into one JSON body.
pub trait JsonEncoder: Send {
    fn push(&mut self, e: &Event);
    fn finish(self) -> Vec<u8>;
}

/// Anthropic Messages SSE: each event is its own wire form; the keep-alive is Anthropic's `ping` event.
pub struct AnthropicSse;

impl SseEncoder for AnthropicSse {
    fn encode(&mut self, events: &[Event]) -> Bytes {
        if let [one] = events {
            return one.to_sse();
        }
        let mut buf = Vec::with_capacity(events.len() * 128);
        for e in events {
            e.write_sse(&mut buf);
        }
        Bytes::from(buf)
    }

    fn keepalive(&mut self) -> Bytes {
        Event::Ping.to_sse()
    }
}

impl JsonEncoder for MessageAccumulator {
    fn push(&mut self, e: &Event) {
        MessageAccumulator::push(self, e);
    }
    fn finish(self) -> Vec<u8> {
        self.finish_bytes()
    }
}

impl SseEncoder for ResponsesEncoder {
    fn encode(&mut self, events: &[Event]) -> Bytes {
        ResponsesEncoder::encode(self, events)
    }
    fn keepalive(&mut self) -> Bytes {
        ResponsesEncoder::keepalive(self)
    }
}

impl JsonEncoder for ResponsesEncoder {
    fn push(&mut self, e: &Event) {
        ResponsesEncoder::push(self, e);
    }
    fn finish(self) -> Vec<u8> {
        self.finish_json()
    }
}

/// A request on its way to the replicas: the chat request (serialized once), its routing key, and the
/// replicas that already failed it. Kept for the whole answer, so that a non-streaming answer whose replica
/// broke off mid-body can still go to another one: its client has received nothing yet.
pub(crate) struct Route {
    key: RouteKey,
    body: Bytes,
    tried: u64,
    last: Option<ProxyError>,
}

impl Route {
    /// `hop`: the request came from another proxy of the fleet ([`super::upstream::HOP_HEADER`]): only this
    /// proxy's own llama-servers may serve it, never its peers (a request never goes round the fleet).
    pub(crate) fn new(st: &Shared, body: Vec<u8>, session: Option<u64>, hop: bool) -> Self {
        // One upstream has no choice to make: its requests skip the hashing (a few µs on a large prompt).
        let several = st.router.replicas().len() > 1;
        let key = RouteKey {
            session: session.filter(|_| several),
            chain: if several {
                router::prompt_chain(&body)
            } else {
                Vec::new()
            },
        };
        Route {
            key,
            body: Bytes::from(body),
            tried: if hop { st.router.peer_mask() } else { 0 },
            last: None,
        }
    }

    /// Replica `i` failed this request: marked down, not tried again for it; `err` is what the client gets
    /// if no other replica can take it.
    fn failed(&mut self, st: &Shared, i: usize, err: ProxyError) {
        st.router.failed(i, &err.message);
        self.tried |= 1u64 << i;
        self.last = Some(err);
    }
}

/// Sends the route's chat request to a replica the router picks and opens a pump on its answer. A replica
/// that fails before answering (unreachable, 5xx, no headers in time) is marked down and the request goes to
/// the next one: nothing reached the client yet. Errors are what the client should see: the last replica's
/// failure, its non-2xx answer mapped, a body that is not a stream, or every slot busy.
pub(crate) async fn open(
    st: &Shared,
    t: &mut Tracker,
    route: &mut Route,
    translator: StreamTranslator,
) -> Result<Pump, ProxyError> {
    let resp = send(st, t, route).await?;
    let base = t.replica.clone().unwrap_or_default();
    let whole_json = answers_whole_json(resp.headers().get(header::CONTENT_TYPE), &base)?;
    let mut pump = Pump::new(
        &base,
        st.settings.first_byte_timeout,
        resp.into_body(),
        translator,
    );
    if whole_json {
        pump.expect_whole_json();
    }
    Ok(pump)
}

/// Sends the route's chat request to a replica the router picks, failing over as [`open`] says; the answer's
/// head is 2xx, its replica's lease is in `t` and its URL in `t.replica`.
pub(crate) async fn send(
    st: &Shared,
    t: &mut Tracker,
    route: &mut Route,
) -> Result<axum::http::Response<super::upstream::UpstreamBody>, ProxyError> {
    // A model named per replica in the config replaces the one the request was translated for, unless the
    // client's model was mapped explicitly (`[proxy.models]`).
    let mapped = st.settings.model_map.resolve(&t.client_model).is_some();
    loop {
        let waited = Instant::now();
        let acquired = st
            .router
            .acquire(&route.key, route.tried, st.settings.queue_timeout)
            .await;
        t.upstream_wait += waited.elapsed();
        let lease = match acquired {
            Acquired::Lease(l) => l,
            Acquired::Exhausted => {
                return Err(route.last.take().unwrap_or_else(|| {
                    ProxyError::new(ErrorType::Overloaded, "no upstream replica is configured")
                }));
            }
            Acquired::Busy(msg) => return Err(every_slot_busy(t.dialect, msg)),
        };
        let replica = lease.replica();
        let base = replica.upstream.base().to_string();
        t.replica = Some(base.clone());
        let send = match replica.spec.model.as_deref() {
            Some(m) if !mapped && m != t.upstream_model => match router::with_model(&route.body, m)
            {
                Some(b) => {
                    t.upstream_model = m.to_string();
                    Bytes::from(b)
                }
                None => route.body.clone(),
            },
            _ => route.body.clone(),
        };
        let waited = Instant::now();
        let started = replica.upstream.start_chat(send, route.key.session).await;
        t.upstream_wait += waited.elapsed();
        let resp = match started {
            Ok(resp) => {
                st.router.answered(lease.replica);
                resp
            }
            Err(e) if Upstream::is_replica_failure(&e) => {
                let err = e.to_proxy_error(&base);
                tracing::debug!(replica = %base, "failing over: {}", err.message);
                route.failed(st, lease.replica, err);
                continue;
            }
            Err(e) => return Err(e.to_proxy_error(&base)),
        };
        t.lease = Some(lease);
        return Ok(resp);
    }
}

/// Every slot of every replica stayed busy: refused before the first byte, in the form each client retries by
/// itself (Claude Code a 529 overloaded_error, Codex a 429).
fn every_slot_busy(dialect: Dialect, msg: String) -> ProxyError {
    let kind = match dialect {
        Dialect::OpenAi => ErrorType::RateLimit,
        Dialect::Anthropic => ErrorType::Overloaded,
    };
    ProxyError::new(kind, msg)
}

/// Whether the upstream answered one JSON body instead of an event stream (some OpenAI-compatible servers
/// ignore `"stream"` and answer one chat.completion, read as one chunk); an error for anything else.
fn answers_whole_json(
    content_type: Option<&axum::http::HeaderValue>,
    base: &str,
) -> Result<bool, ProxyError> {
    let Some(ct) = content_type else {
        return Ok(false);
    };
    if ct.as_bytes().windows(12).any(|w| w == b"event-stream") {
        return Ok(false);
    }
    if ct.as_bytes().windows(4).any(|w| w == b"json") {
        return Ok(true);
    }
    let ct = String::from_utf8_lossy(ct.as_bytes());
    Err(ProxyError::new(
        ErrorType::Api,
        format!(
            "upstream {base} answered {ct} instead of an event stream; it must support \"stream\": true"
        ),
    ))
}

/// Drives the upstream's event stream through the translator. Every await in `next` is on the upstream's
/// byte stream alone, so cancelling `next` (for a ping) loses nothing.
pub struct Pump {
    upstream_url: String,
    body: Option<UpstreamBody>,
    parser: SseParser,
    chunks: ChunkReader,
    translator: StreamTranslator,
    idle_timeout: Duration,
    /// When the upstream last sent something: the idle timeout counts from here.
    last_frame: tokio::time::Instant,
    /// The idle timer, one per stream (not one per chunk, which cost a timer-wheel insertion and removal
    /// for each of a stream's chunks): set once, moved on only when it fires before the idle deadline.
    idle: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// The failure sent as an `error` event, kept for the non-streaming answer's status.
    failure: Option<ProxyError>,
    /// The failure was the replica's own (its connection broke, it went silent, it hung up before the end),
    /// not an answer it chose to give: the replica is marked down, and a request whose client has received
    /// nothing yet can go to another one.
    broke: bool,
    done: bool,
    /// The upstream answered one JSON body instead of a stream: collected here, translated at its end.
    whole_json: Option<Vec<u8>>,
}

/// What a client whose answer was still running at the end of shutdown's grace period reads. "try again in
/// 5s" is the form Codex parses for its retry delay; Claude Code retries an overloaded error by itself.
pub const SHUTDOWN_MESSAGE: &str = "serve-proxy is shutting down (a restart) and could not finish this answer in its grace period; please try again in 5s";

/// How long message_start waits for the upstream's prompt size before it goes out without it.
const MESSAGE_START_GRACE: Duration = Duration::from_secs(1);

/// The most of a non-streamed upstream answer that is collected before it is read as one chunk.
const MAX_WHOLE_JSON_BYTES: usize = 32 << 20;

impl Pump {
    pub fn new(
        upstream_url: &str,
        idle_timeout: Duration,
        body: UpstreamBody,
        translator: StreamTranslator,
    ) -> Self {
        Pump {
            upstream_url: upstream_url.to_string(),
            body: Some(body),
            parser: SseParser::default(),
            chunks: ChunkReader::default(),
            translator,
            idle_timeout,
            last_frame: tokio::time::Instant::now(),
            idle: None,
            failure: None,
            broke: false,
            done: false,
            whole_json: None,
        }
    }

    /// message_start and a ping, if the upstream's first chunk has not already sent them.
    pub fn start(&mut self) -> Vec<Event> {
        self.translator.start()
    }

    /// The next batch of events; empty once the stream is over.
    pub async fn next(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while out.is_empty() && !self.done {
            let Some(body) = self.body.as_mut() else {
                self.done = true;
                break;
            };
            let deadline = self.last_frame + self.idle_timeout;
            let idle = &mut self.idle;
            let item = std::future::poll_fn(|cx| {
                if let Poll::Ready(item) = std::pin::Pin::new(&mut *body).poll_frame(cx) {
                    return Poll::Ready(Ok(item));
                }
                idle_expired(idle, deadline, cx).map(Err)
            })
            .await;
            let item = match item {
                Ok(item) => item,
                Err(()) => {
                    let e = ProxyError::new(
                        ErrorType::Timeout,
                        format!(
                            "upstream {} sent nothing for {}s (first_byte_timeout_secs)",
                            self.upstream_url,
                            self.idle_timeout.as_secs_f64()
                        ),
                    );
                    self.broke = true;
                    self.fail(e, &mut out);
                    break;
                }
            };
            self.last_frame = tokio::time::Instant::now();
            match item {
                Some(Ok(frame)) => {
                    // Trailers carry no events.
                    if let Some(chunk) = frame.data_ref() {
                        self.on_frame(chunk, &mut out);
                    }
                }
                Some(Err(e)) => {
                    let reason = super::upstream::root_reason(&e);
                    let msg = format!(
                        "upstream {} broke off the stream: {reason}",
                        self.upstream_url
                    );
                    self.broke = true;
                    self.fail(ProxyError::new(ErrorType::Api, msg), &mut out);
                }
                None => self.on_end(&mut out),
            }
        }
        out
    }

    /// A pump with no upstream connection, fed by hand with `feed` and `feed_end`: the benches and tests drive
    /// recorded streams through exactly the code the server runs per chunk.
    pub fn detached(upstream_url: &str, translator: StreamTranslator) -> Self {
        Pump {
            upstream_url: upstream_url.to_string(),
            body: None,
            parser: SseParser::default(),
            chunks: ChunkReader::default(),
            translator,
            idle_timeout: Duration::MAX,
            last_frame: tokio::time::Instant::now(),
            idle: None,
            failure: None,
            broke: false,
            done: false,
            whole_json: None,
        }
    }

    /// The events for one chunk of the upstream's body (what one read gives).
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        if !self.done {
            self.on_frame(chunk, &mut out);
        }
        out
    }

    /// The upstream's body ended.
    pub fn feed_end(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        if !self.done {
            self.on_end(&mut out);
        }
        out
    }

    /// Reads the upstream answered as one JSON body (it ignored `stream`), not as an event stream.
    pub fn expect_whole_json(&mut self) {
        self.whole_json = Some(Vec::new());
    }

    fn on_frame(&mut self, chunk: &[u8], out: &mut Vec<Event>) {
        match self.whole_json.as_mut() {
            Some(buf) if buf.len() + chunk.len() > MAX_WHOLE_JSON_BYTES => {
                let e = ProxyError::new(
                    ErrorType::Api,
                    format!(
                        "upstream {} answered a JSON body over {MAX_WHOLE_JSON_BYTES} bytes instead of a stream",
                        self.upstream_url
                    ),
                );
                self.fail(e, out);
            }
            Some(buf) => buf.extend_from_slice(chunk),
            None => self.on_bytes(chunk, out),
        }
    }

    fn on_end(&mut self, out: &mut Vec<Event>) {
        if let Some(buf) = self.whole_json.take() {
            return self.on_whole_json(&buf, out);
        }
        if let Some(ev) = self.parser.finish() {
            self.on_data(&ev.data, out);
        }
        if !self.done {
            let e = ProxyError::new(
                ErrorType::Api,
                format!(
                    "upstream {} closed the stream before it finished (no [DONE])",
                    self.upstream_url
                ),
            );
            self.broke = true;
            self.fail(e, out);
        }
    }

    /// Shutdown's grace period is over: the protocol's error (retryable: overloaded), then nothing.
    pub fn cut(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        if !self.done {
            let e = ProxyError::new(ErrorType::Overloaded, SHUTDOWN_MESSAGE);
            self.fail(e, &mut out);
        }
        out
    }

    /// The translator, once the stream is over (its usage and stop reason).
    pub fn into_translator(self) -> StreamTranslator {
        self.translator
    }

    /// The stream is over (ended, stopped or failed).
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The failure the stream ended with, if it did.
    pub fn failure(&self) -> Option<&ProxyError> {
        self.failure.as_ref()
    }

    /// The stream ended because its replica broke (see `broke`), with that failure.
    fn replica_failure(&self) -> Option<&ProxyError> {
        self.failure.as_ref().filter(|_| self.broke)
    }

    fn on_bytes(&mut self, chunk: &[u8], out: &mut Vec<Event>) {
        // The parser is taken out while its events are handled, so each is read where it lies.
        let mut parser = std::mem::take(&mut self.parser);
        let parsed = parser.push_each(chunk, |_, data| {
            if !self.done {
                self.on_data(data, out);
            }
        });
        self.parser = parser;
        if let Err(e) = parsed {
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

    fn on_data(&mut self, data: &str, out: &mut Vec<Event>) {
        if data == "[DONE]" {
            out.extend(self.translator.finish());
            self.end();
            return;
        }
        // Straight into the typed chunk, the common case. What that cannot take (not JSON, an unexpected
        // shape) goes the general way below, which tells those apart.
        // The usual text delta is read without serde (chunk_scan), to the same ChatChunk.
        let chunk = self
            .chunks
            .read(data)
            .map_or_else(|| serde_json::from_str::<ChatChunk>(data), Ok);
        if let Ok(chunk) = chunk {
            return self.on_chunk(chunk, out);
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
        self.on_value(&chunk, out);
    }

    /// A chunk the typed reading could not take, read leniently as JSON.
    fn on_value(&mut self, chunk: &Value, out: &mut Vec<Event>) {
        if let Some(err) = chunk.get("error") {
            let e = from_upstream_stream_error(err, &self.upstream_url);
            return self.fail(e, out);
        }
        out.extend(self.translator.on_chunk(chunk));
        self.end_if_stopped(out);
    }

    fn on_chunk(&mut self, chunk: ChatChunk, out: &mut Vec<Event>) {
        if let Some(err) = &chunk.error {
            let e = from_upstream_stream_error(err, &self.upstream_url);
            return self.fail(e, out);
        }
        self.translator.on_parsed_into(chunk, out);
        self.end_if_stopped(out);
    }

    /// A whole `chat.completion` body, fed to the translator as the chunks a stream would have carried.
    fn on_whole_json(&mut self, body: &[u8], out: &mut Vec<Event>) {
        let chunks = match super::whole_body::read(body) {
            Whole::Chunks(chunks) => chunks,
            Whole::Error(err) => {
                let e = from_upstream_stream_error(&err, &self.upstream_url);
                return self.fail(e, out);
            }
            Whole::Other => {
                let e = ProxyError::new(
                    ErrorType::Api,
                    format!(
                        "upstream {} answered a JSON body that is neither an event stream nor a chat completion",
                        self.upstream_url
                    ),
                );
                return self.fail(e, out);
            }
        };
        for chunk in chunks {
            if self.done {
                return;
            }
            match chunk {
                Chunk::Typed(chunk) => self.on_chunk(chunk, out),
                Chunk::Loose(chunk) => self.on_value(&chunk, out),
            }
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

    pub fn record(&self, t: &mut Tracker) {
        t.usage = self.translator.usage();
        t.stop_reason = self.translator.stop_reason().map(str::to_owned);
        if let Some(e) = &self.failure {
            t.error_type = Some(e.kind.as_str());
            t.error_message = Some(e.message.clone());
        }
    }
}

/// Whether the idle deadline has passed, on the stream's one timer (created at the first wait).
fn idle_expired(
    idle: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    deadline: tokio::time::Instant,
    cx: &mut std::task::Context<'_>,
) -> Poll<()> {
    let sleep = idle.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    loop {
        std::task::ready!(sleep.as_mut().poll(cx));
        if sleep.deadline() >= deadline {
            return Poll::Ready(());
        }
        // Set for an earlier deadline: the upstream sent something since.
        sleep.as_mut().reset(deadline);
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

struct StreamState<E: SseEncoder> {
    pump: Pump,
    encoder: E,
    /// Shutdown's grace period is over.
    cut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    tracker: Tracker,
    pending: VecDeque<Bytes>,
    ping_interval: Duration,
    last_sent: tokio::time::Instant,
    finished: bool,
}

impl<E: SseEncoder> Drop for StreamState<E> {
    fn drop(&mut self) {
        // A client that hung up: still log the tokens the upstream reported so far.
        if !self.finished {
            self.pump.record(&mut self.tracker);
        }
    }
}

impl<E: SseEncoder> StreamState<E> {
    /// The bytes of one batch of events, marked when it is the answer's last.
    fn batch(&mut self, events: Vec<Event>) -> Batch {
        tracing::trace!(events = events.len(), "stream batch");
        note_first_token(&mut self.tracker, &events);
        if self.pump.is_done() {
            self.finished = true;
            // Bytes already reached the client: the stream ends with its error event, and the replica gets
            // no more traffic until a probe finds it healthy (its error is counted when the answer finishes).
            if let (Some(e), Some(l)) = (self.pump.replica_failure(), &self.tracker.lease) {
                l.router().broke(l.replica, &e.message);
            }
            self.pump.record(&mut self.tracker);
            self.tracker.ok();
        }
        let bytes = self.encoder.encode(&events);
        (bytes, self.finished && self.pending.is_empty())
    }
}

/// Adds to `events` whatever the upstream already sent, so that it goes out in one write. llama-server writes
/// one HTTP chunk per event; taken one by one, a 4,428-byte read became 13 writev calls and as many client
/// wake-ups (strace; the bench's streaming p50 was 5x what nginx adds). The upstream connection is driven by
/// this task (upstream.rs), so polling the body decodes the next chunk already read, with no other task to
/// wait for: what is ready is taken, and the batch goes out when nothing more is. A paced stream, whose next
/// event is not on the socket yet, is not held back.
fn gather(pump: &mut Pump, events: &mut Vec<Event>) {
    while !pump.is_done() {
        match futures_util::FutureExt::now_or_never(pump.next()) {
            Some(more) if !more.is_empty() => events.extend(more),
            _ => break,
        }
    }
}

pub async fn stream_response<E: SseEncoder>(
    st: &Shared,
    pump: Pump,
    tracker: Tracker,
    encoder: E,
) -> Response {
    let ping_interval = st.settings.ping_interval;
    // message_start waits for the upstream's first chunk, which from llama.cpp is the prompt's size right
    // after tokenizing (so message_start can carry input_tokens), but never longer than MESSAGE_START_GRACE:
    // the first "ping" tick sends it (with the ping) when the upstream is still silent, e.g. queued.
    let grace = ping_interval.min(MESSAGE_START_GRACE);
    let now = tokio::time::Instant::now();
    // The answer's head goes out with the first batch when the upstream has already sent it (taken as
    // between batches: what is already read, no timer); otherwise hyper writes the head alone, and the client wakes up
    // once more per request. A silent upstream (a long prefill) does not hold the head back.
    let mut pump = pump;
    let mut events = Vec::new();
    gather(&mut pump, &mut events);
    let mut state = StreamState {
        pump,
        encoder,
        cut: Box::pin(st.cut_signal()),
        tracker,
        pending: VecDeque::new(),
        ping_interval,
        last_sent: now.checked_sub(ping_interval - grace).unwrap_or(now),
        finished: false,
    };
    let first = if events.is_empty() {
        None
    } else {
        state.last_sent = tokio::time::Instant::now();
        Some(Some(state.batch(events)))
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        if let Some(b) = s.pending.pop_front() {
            s.last_sent = tokio::time::Instant::now();
            return Some(((b, false), s));
        }
        if s.finished {
            return None;
        }
        let waited = Instant::now();
        let ping_at = s.last_sent + s.ping_interval;
        let events = tokio::select! {
            ev = s.pump.next() => Some(ev),
            () = tokio::time::sleep_until(ping_at) => None,
            () = &mut s.cut, if !s.pump.is_done() => {
                tracing::warn!(path = %s.tracker.path, "a stream still running at the end of the shutdown grace period ends with an error event");
                Some(s.pump.cut())
            }
        };
        s.tracker.upstream_wait += waited.elapsed();
        s.last_sent = tokio::time::Instant::now();
        match events {
            // No event for a whole interval (a long prefill): a ping keeps the client's idle timer happy,
            // after message_start if that was still held back.
            None => {
                let start = s.pump.start();
                let bytes = if start.is_empty() {
                    s.encoder.keepalive()
                } else {
                    s.encoder.encode(&start)
                };
                Some(((bytes, false), s))
            }
            Some(events) if events.is_empty() => {
                s.finished = true;
                s.pump.record(&mut s.tracker);
                s.tracker.ok();
                None
            }
            Some(mut events) => {
                gather(&mut s.pump, &mut events);
                let batch = s.batch(events);
                Some((batch, s))
            }
        }
    });
    let body = SseBody {
        stream: Box::pin(stream),
        first,
        ended: false,
    };
    let mut res = Response::new(Body::new(body));
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

type Batch = (Bytes, bool);

/// A stream answer's body: the batches, the last one marked, so that hyper writes it and the chunked
/// encoding's end in one write (a stream that only ends when polled once more costs a write of its own).
struct SseBody {
    stream: std::pin::Pin<Box<dyn futures_util::Stream<Item = Batch> + Send>>,
    /// A batch taken before the head was sent.
    first: Option<Option<Batch>>,
    ended: bool,
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if self.ended {
            return std::task::Poll::Ready(None);
        }
        let item = match self.first.take() {
            Some(item) => item,
            None => std::task::ready!(self.stream.as_mut().poll_next(cx)),
        };
        std::task::Poll::Ready(match item {
            Some((bytes, last)) => {
                self.ended = last;
                Some(Ok(hyper::body::Frame::data(bytes)))
            }
            None => {
                self.ended = true;
                None
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// `stream: false`: the same events, folded into one body by the front door's encoder. The client receives
/// nothing until the answer is whole, so a replica that breaks off mid-body (killed, connection lost, silent
/// past the idle timeout) does not lose the request: it goes to another replica from the start, with a fresh
/// translator and encoder, until none is left (then the client gets the last failure).
pub(crate) async fn json_response<E: JsonEncoder>(
    st: &Shared,
    mut route: Route,
    mut pump: Pump,
    mut t: Tracker,
    translator: impl Fn() -> StreamTranslator,
    encoder: impl Fn() -> E,
) -> Response {
    let mut cut = std::pin::pin!(st.cut_signal());
    let mut was_cut = false;
    let mut acc = encoder();
    loop {
        for e in pump.start() {
            acc.push(&e);
        }
        loop {
            let waited = Instant::now();
            let events = tokio::select! {
                ev = pump.next() => ev,
                // A finished future must not be polled again.
                () = &mut cut, if !was_cut => {
                    was_cut = true;
                    tracing::warn!(path = %t.path, "an answer still running at the end of the shutdown grace period ends with an error");
                    pump.cut()
                }
            };
            t.upstream_wait += waited.elapsed();
            if events.is_empty() {
                break;
            }
            note_first_token(&mut t, &events);
            for e in &events {
                acc.push(e);
            }
        }
        let broke = pump.replica_failure().cloned();
        let (Some(err), Some(lease)) = (broke, t.lease.take()) else {
            break;
        };
        tracing::warn!(replica = %lease.replica().spec.url, "a non-streaming answer broke off before its client received anything; sending it to another replica: {}", err.message);
        route.failed(st, lease.replica, err);
        drop(lease);
        t.ttft = None;
        pump = match open(st, &mut t, &mut route, translator()).await {
            Ok(p) => p,
            Err(e) => return t.error(e),
        };
        acc = encoder();
    }
    pump.record(&mut t);
    if let Some(e) = pump.failure.take() {
        return t.error(e);
    }
    t.ok();
    let mut res = Response::new(Body::from(acc.finish()));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}
