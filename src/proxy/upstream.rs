//! The OpenAI-compatible server behind the proxy: kept-alive connections (one idle pool per serving
//! thread), the model it serves (discovered from `GET /v1/models` unless configured), and every failure
//! classified so the client gets the right Anthropic error: unreachable → 529, slow first byte → 504, a
//! refusal → its status mapped.

use std::cell::Cell;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, Response, Uri};
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use hyper_tls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use reqwest::header;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::error::{ErrorType, ProxyError, from_upstream_status};
use super::http1;

/// Largest error body read from the upstream: enough for any JSON error, not a runaway stream.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Small calls (models, health, template, tokenize) must not wait as long as a generation may.
const SMALL_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// llama-server closes idle keep-alive connections after 5 s; dropping ours first avoids sending a request
/// down a connection the server is closing at that moment (a spurious failure).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// How chat connections are opened: TCP (connect timeout, no Nagle), TLS for an https:// upstream.
type ChatConnector = HttpsConnector<HttpConnector>;
type ChatIo = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

#[derive(Debug)]
pub enum UpstreamError {
    /// No TCP connection: refused, no route, DNS, connect timeout.
    Unreachable(String),
    /// Connected, but no response headers within the first-byte timeout.
    Timeout(Duration),
    /// A non-2xx answer.
    Status(u16, Bytes),
    /// The connection broke or the answer was not what an OpenAI-compatible server sends.
    Broken(String),
}

impl UpstreamError {
    pub fn to_proxy_error(&self, upstream: &str) -> ProxyError {
        match self {
            UpstreamError::Unreachable(reason) => ProxyError::new(
                ErrorType::Overloaded,
                format!("upstream {upstream} is not reachable: {reason}"),
            ),
            UpstreamError::Timeout(after) => ProxyError::new(
                ErrorType::Timeout,
                format!(
                    "upstream {upstream} sent no response within {}s (first_byte_timeout_secs)",
                    after.as_secs_f64()
                ),
            ),
            UpstreamError::Status(status, body) => from_upstream_status(*status, body, upstream),
            UpstreamError::Broken(reason) => ProxyError::new(
                ErrorType::Api,
                format!("upstream {upstream} failed: {reason}"),
            ),
        }
    }
}

/// The model the upstream serves, and whether it is llama.cpp (which takes extra knobs).
#[derive(Debug, Clone)]
pub struct Served {
    pub model: Arc<str>,
    pub llama_cpp: bool,
}

#[derive(Debug, Clone)]
pub struct UpstreamModel {
    pub id: String,
    pub created: Option<i64>,
}

pub struct Upstream {
    /// One client (and so one keep-alive pool) per serving thread, plus one for every other thread: a request
    /// then reuses a connection driven by its own thread, never one whose I/O another thread polls (a
    /// cross-thread wake-up on every read and write). See [`set_serving_thread`]. `chat` carries the chat
    /// completions, the hot path; `small` (reqwest) everything else.
    clients: Vec<Clients>,
    base: String,
    /// `{base}/v1/chat/completions`, parsed once (what connections are opened to).
    chat_uri: Uri,
    /// Its path (the request line's origin form) and its `Host` header, as hyper's pooled client wrote them.
    chat_path: String,
    chat_host: HeaderValue,
    auth: Option<HeaderValue>,
    first_byte_timeout: Duration,
    fixed_model: Option<Arc<str>>,
    discovered: RwLock<Option<Served>>,
    /// Another llmctl proxy of the fleet (see [`Upstream::set_peer`]).
    peer: bool,
}

/// The header that marks a request from one proxy of a fleet to another (a hop): the proxy that gets it
/// serves it from its own llama-servers only, so a request never goes round the fleet.
pub const HOP_HEADER: &str = "x-llmctl-hop";
/// The client's session (its hash, 16 hex digits) on a hop, so the peer keeps the session on one replica too.
pub const SESSION_HEADER: &str = "x-llmctl-session";

struct Clients {
    connector: ChatConnector,
    /// Chat connections kept alive between requests.
    idle: IdlePool,
    small: reqwest::Client,
}

thread_local! {
    static SERVING_THREAD: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks the current thread as serving thread `index` (0-based, below the `threads` given to
/// [`Upstream::new`]): its requests use their own client.
pub fn set_serving_thread(index: usize) {
    SERVING_THREAD.with(|c| c.set(Some(index)));
}

impl Upstream {
    /// `threads`: how many serving threads will call [`set_serving_thread`] (0 when none do).
    pub fn new(
        base: &str,
        api_key: Option<&str>,
        model: Option<&str>,
        connect_timeout: Duration,
        first_byte_timeout: Duration,
        threads: usize,
    ) -> anyhow::Result<Self> {
        // Built once for every client (system roots, SNI): loading the CA store costs ~0.1 s and ~1 MB per copy.
        // HTTP/1.1 only, for reqwest too: the chat client speaks nothing else, and an upstream that chose h2
        // over ALPN would refuse it.
        let tls = native_tls::TlsConnector::builder()
            .request_alpns(&["http/1.1"])
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up TLS for the upstream: {e}"))?;
        let build = || -> anyhow::Result<Clients> {
            let small = reqwest::Client::builder()
                .tls_backend_preconfigured(tls.clone())
                .connect_timeout(connect_timeout)
                .tcp_nodelay(true)
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                // The upstream is named explicitly: HTTP(S)_PROXY variables meant for the internet must not
                // reroute it (the chat client never reads them).
                .no_proxy()
                .build()
                .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))?;
            let mut http = HttpConnector::new();
            http.enforce_http(false);
            http.set_nodelay(true);
            http.set_connect_timeout(Some(connect_timeout));
            let https =
                HttpsConnector::from((http, tokio_native_tls::TlsConnector::from(tls.clone())));
            Ok(Clients {
                connector: https,
                idle: IdlePool::default(),
                small,
            })
        };
        let clients = (0..=threads)
            .map(|_| build())
            .collect::<anyhow::Result<_>>()?;
        let auth = match api_key {
            Some(k) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {k}")).map_err(|_| {
                    anyhow::anyhow!(
                        "the upstream API key contains characters not allowed in an HTTP header"
                    )
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let chat_url = format!("{base}/v1/chat/completions");
        let chat_uri = chat_url.parse::<Uri>().ok().filter(|u| {
            matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()
        });
        let chat_uri = chat_uri.ok_or_else(|| {
            anyhow::anyhow!(
                "the upstream URL {base:?} is not an http:// or https:// URL; give one like http://127.0.0.1:8080"
            )
        })?;
        let chat_path = chat_uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
        let chat_host = host_header(&chat_uri)?;
        Ok(Upstream {
            clients,
            base: base.to_string(),
            chat_uri,
            chat_path,
            chat_host,
            auth,
            first_byte_timeout,
            fixed_model: model.map(Arc::from),
            discovered: RwLock::new(None),
            peer: false,
        })
    }

    /// Marks this upstream as another llmctl proxy of the fleet: chat requests carry [`HOP_HEADER`] and the
    /// session, and its health is the health its `/health` reports of its own llama-servers (a proxy
    /// answers 200 while its model is down).
    pub fn set_peer(&mut self) {
        self.peer = true;
    }

    /// This thread's clients: its own on a serving thread, the shared last ones elsewhere.
    fn clients(&self) -> &Clients {
        let last = self.clients.len() - 1;
        let i = SERVING_THREAD.with(Cell::get).map_or(last, |i| i.min(last));
        &self.clients[i]
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn request<U: reqwest::IntoUrl>(
        &self,
        method: reqwest::Method,
        url: U,
    ) -> reqwest::RequestBuilder {
        let mut rb = self.clients().small.request(method, url);
        if let Some(a) = &self.auth {
            rb = rb.header(header::AUTHORIZATION, a.clone());
        }
        rb
    }

    /// Starts a streaming chat completion. Returns once the upstream sent its response headers with a 2xx
    /// status; the body is the event stream.
    /// `session`: the client's session hash, passed on to a peer.
    pub async fn start_chat(
        &self,
        body: impl Into<Bytes>,
        session: Option<u64>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let body: Bytes = body.into();
        let clients = self.clients();
        let session = session.filter(|_| self.peer).map(|s| format!("{s:016x}"));
        let mut extra: Vec<(&str, &[u8])> = Vec::with_capacity(3);
        if let Some(a) = &self.auth {
            extra.push(("authorization", a.as_bytes()));
        }
        if self.peer {
            extra.push((HOP_HEADER, b"1"));
            if let Some(s) = &session {
                extra.push((SESSION_HEADER, s.as_bytes()));
            }
        }
        let head = http1::request_head(
            &self.chat_path,
            self.chat_host.as_bytes(),
            body.len(),
            &extra,
        );
        let send = async {
            let mut tries = 1;
            loop {
                let mut conn = match clients.idle.checkout() {
                    Some(conn) => conn,
                    None => self.connect(&clients.connector).await?,
                };
                match conn.send(&head, &body).await {
                    Ok(answer) => {
                        let mut resp = Response::new(UpstreamBody {
                            conn: Some(conn),
                            framing: answer.framing,
                            keep_alive: answer.keep_alive,
                            pool: clients.idle.clone(),
                        });
                        *resp.status_mut() = answer.status;
                        *resp.headers_mut() = answer.headers;
                        return Ok(resp);
                    }
                    // llama-server closes the connection after every streamed answer, without saying so in
                    // its headers: a request that goes out on that connection before its close is seen finds
                    // it closed, and the upstream never saw it. It goes again, on a new connection.
                    Err(SendError::Closed(_)) if tries < STALE_CONNECTION_TRIES => {
                        tracing::debug!(
                            "upstream closed a kept-alive connection before answering; sending again"
                        );
                        tries += 1;
                    }
                    Err(SendError::Closed(e) | SendError::Failed(e)) => {
                        return Err(UpstreamError::Broken(e));
                    }
                }
            }
        };
        let resp = match tokio::time::timeout(self.first_byte_timeout, send).await {
            Err(_) => return Err(UpstreamError::Timeout(self.first_byte_timeout)),
            Ok(r) => r?,
        };
        check_status(resp).await
    }

    /// A new connection for chat requests: TCP (and TLS), read and written by the task that uses it.
    async fn connect(&self, connector: &ChatConnector) -> Result<ChatConn, UpstreamError> {
        let mut connector = connector.clone();
        let unreachable = |e: Box<dyn std::error::Error + Send + Sync>| {
            UpstreamError::Unreachable(root_reason(&*e))
        };
        std::future::poll_fn(|cx| tower_service::Service::poll_ready(&mut connector, cx))
            .await
            .map_err(unreachable)?;
        let io = tower_service::Service::call(&mut connector, self.chat_uri.clone())
            .await
            .map_err(unreachable)?;
        Ok(ChatConn::new(io))
    }

    /// `GET /v1/models`: the ids the upstream serves, and whether it is llama.cpp.
    pub async fn list_models(&self) -> Result<(Vec<UpstreamModel>, bool), UpstreamError> {
        let v = self.get_json("/v1/models").await?;
        let data = v
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| UpstreamError::Broken("GET /v1/models has no \"data\" list".into()))?;
        let mut llama_cpp = false;
        let models = data
            .iter()
            .filter_map(|m| {
                if m.get("owned_by").and_then(Value::as_str) == Some("llamacpp") {
                    llama_cpp = true;
                }
                Some(UpstreamModel {
                    id: m.get("id")?.as_str()?.to_string(),
                    created: m.get("created").and_then(Value::as_i64),
                })
            })
            .collect();
        Ok((models, llama_cpp))
    }

    /// The model to send, discovering it on first use (and again on later requests while discovery fails,
    /// so a proxy started before its upstream recovers by itself).
    pub async fn served(&self) -> Result<Served, UpstreamError> {
        if let Ok(guard) = self.discovered.read()
            && let Some(s) = guard.as_ref()
        {
            return Ok(s.clone());
        }
        let discovered = self.list_models().await;
        let served = match (&self.fixed_model, discovered) {
            (Some(m), Ok((_, llama_cpp))) => Served {
                model: m.clone(),
                llama_cpp,
            },
            // A configured model works with any server, even one whose /v1/models is broken.
            (Some(m), Err(UpstreamError::Status(..) | UpstreamError::Broken(_))) => {
                return Ok(Served {
                    model: m.clone(),
                    llama_cpp: false,
                });
            }
            (Some(_), Err(e)) => return Err(e),
            (None, Ok((models, llama_cpp))) => {
                let first = models.into_iter().next().ok_or_else(|| {
                    UpstreamError::Broken(
                        "GET /v1/models lists no model; start the server with a model or pass --model".into(),
                    )
                })?;
                Served {
                    model: Arc::from(first.id),
                    llama_cpp,
                }
            }
            (None, Err(e)) => return Err(e),
        };
        if let Ok(mut guard) = self.discovered.write() {
            *guard = Some(served.clone());
        }
        Ok(served)
    }

    /// The upstream's own health: llama-server's `GET /health` (200 ready, 503 loading); for servers
    /// without it, `GET /v1/models`.
    pub async fn health(&self) -> Result<(), UpstreamError> {
        if self.peer {
            return self.get_json("/health").await.and_then(|v| peer_health(&v));
        }
        match self.get_json("/health").await {
            Ok(_) => Ok(()),
            Err(UpstreamError::Status(404, _)) => self.list_models().await.map(|_| ()),
            Err(e) => Err(e),
        }
    }

    /// llama-server's `GET /slots`: how many requests it serves at once (an error where it is off or absent).
    pub async fn slots(&self) -> Result<u32, UpstreamError> {
        if self.peer {
            return self.get_json("/health").await.and_then(|v| peer_slots(&v));
        }
        let v = self.get_json("/slots").await?;
        v.as_array()
            .and_then(|a| u32::try_from(a.len()).ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| UpstreamError::Broken("GET /slots is not a list of slots".into()))
    }

    /// Whether a failure before the answer started is the replica's (down, overloaded, broken), so another
    /// replica may serve the request; a 4xx is the request's own and would fail anywhere.
    pub fn is_replica_failure(e: &UpstreamError) -> bool {
        match e {
            UpstreamError::Unreachable(_)
            | UpstreamError::Timeout(_)
            | UpstreamError::Broken(_) => true,
            UpstreamError::Status(status, _) => *status >= 500,
        }
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value, UpstreamError> {
        let url = format!("{}{path}", self.base);
        let send = self
            .request(reqwest::Method::POST, &url)
            .json(body)
            .timeout(SMALL_CALL_TIMEOUT)
            .send();
        read_json(send.await.map_err(classify)?).await
    }

    /// `GET path` as text, for the dashboard's read of the upstream's Prometheus `/metrics`: a short time limit
    /// (it runs once a second) and at most `limit` bytes (llama-server's is ~3 KB; a larger one is not it).
    pub async fn get_text(
        &self,
        path: &str,
        timeout: Duration,
        limit: usize,
    ) -> Result<String, UpstreamError> {
        let url = format!("{}{path}", self.base);
        let send = self
            .request(reqwest::Method::GET, &url)
            .timeout(timeout)
            .send();
        let resp = check_status(Response::from(send.await.map_err(classify)?)).await?;
        let mut body = resp.into_body();
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Some(chunk) = frame.map_err(classify)?.data_ref() {
                if out.len() + chunk.len() > limit {
                    return Err(UpstreamError::Broken(format!(
                        "GET {path} is larger than {limit} bytes"
                    )));
                }
                out.extend_from_slice(chunk);
            }
        }
        String::from_utf8(out)
            .map_err(|_| UpstreamError::Broken(format!("GET {path} is not UTF-8 text")))
    }

    async fn get_json(&self, path: &str) -> Result<Value, UpstreamError> {
        let url = format!("{}{path}", self.base);
        let send = self
            .request(reqwest::Method::GET, &url)
            .timeout(SMALL_CALL_TIMEOUT)
            .send();
        read_json(send.await.map_err(classify)?).await
    }
}

/// A peer proxy's `/health` body: up when it says its model is (`"status": "ok"`).
fn peer_health(v: &Value) -> Result<(), UpstreamError> {
    if v["status"] == "ok" {
        return Ok(());
    }
    let why = v["upstream"]["error"]
        .as_str()
        .or(v["status"].as_str())
        .unwrap_or("no status");
    Err(UpstreamError::Broken(format!(
        "the peer proxy's model is not up: {why}"
    )))
}

/// A peer's slots: those of its own llama-servers that are up, as its `/health` lists them (its peers' are
/// not its to give: a hop is served locally).
fn peer_slots(v: &Value) -> Result<u32, UpstreamError> {
    let n: u64 = v["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["peer"] != true && r["up"] == true)
        .filter_map(|r| r["slots"].as_u64())
        .sum();
    u32::try_from(n)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| UpstreamError::Broken("the peer proxy lists no replica up".into()))
}

/// The answer when its status is 2xx; otherwise the status with the start of its error body.
async fn check_status<B>(resp: Response<B>) -> Result<Response<B>, UpstreamError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = read_capped(resp.into_body()).await;
    Err(UpstreamError::Status(status.as_u16(), body))
}

async fn read_json(resp: reqwest::Response) -> Result<Value, UpstreamError> {
    let resp = check_status(Response::from(resp)).await?;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(classify)?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| UpstreamError::Broken(format!("answered with invalid JSON: {e}")))
}

/// An error body: up to [`MAX_ERROR_BODY`] bytes of what arrives within the time limit, nothing when the
/// connection breaks in the middle of it.
async fn read_capped<B>(mut body: B) -> Bytes
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let mut out = Vec::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                out.clear();
                return;
            };
            if let Some(chunk) = frame.data_ref() {
                let room = MAX_ERROR_BODY.saturating_sub(out.len());
                out.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if out.len() >= MAX_ERROR_BODY {
                    return;
                }
            }
        }
    };
    // An error body that never ends must not hang the request.
    let _ = tokio::time::timeout(SMALL_CALL_TIMEOUT, read).await;
    Bytes::from(out)
}

/// Attempts at a chat request whose connection turns out to be closed already (one per pooled connection that
/// can be stale, then one on a new connection).
const STALE_CONNECTION_TRIES: u32 = 3;

/// `Host` as hyper's pooled client set it: the URL's host, with its port unless that is the scheme's default.
fn host_header(uri: &Uri) -> anyhow::Result<HeaderValue> {
    let host = uri.host().unwrap_or_default();
    let default_port = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let value = match uri.port_u16() {
        Some(p) if p != default_port => format!("{host}:{p}"),
        _ => host.to_string(),
    };
    HeaderValue::from_str(&value)
        .map_err(|_| anyhow::anyhow!("the upstream host {host:?} is not valid"))
}

/// One HTTP/1.1 connection to the upstream, spoken by llmctl itself ([`super::http1`]) and driven by the task
/// of the request that uses it: the answer's bytes are decoded where they are translated, everything one read
/// brings as one piece, with no task, channel or wake-up in between.
struct ChatConn {
    io: TokioIo<ChatIo>,
    /// Read and not yet consumed.
    buf: BytesMut,
}

/// A chat request that failed before its answer's head was read.
enum SendError {
    /// The connection was closed (or reset) before any byte of an answer: the mark of a kept-alive
    /// connection the upstream had already closed, which never saw the request.
    Closed(String),
    Failed(String),
}

/// Room made in the read buffer before each read: a stream's events arrive a few hundred bytes at a time.
const READ_CHUNK: usize = 16 * 1024;

impl ChatConn {
    fn new(io: ChatIo) -> Self {
        ChatConn {
            io: TokioIo::new(io),
            buf: BytesMut::new(),
        }
    }

    /// Whether another request can go out on it now: it is open, and nothing unasked-for has arrived (a
    /// read would block). llama-server closes its connection after a streamed answer; the close is seen here
    /// when it has already arrived, otherwise the request goes again ([`SendError::Closed`]).
    fn reusable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut probe = [0u8; 1];
        let mut probe = tokio::io::ReadBuf::new(&mut probe);
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut probe),
            Poll::Pending
        )
    }

    /// Sends the request (head and body in one write where the socket takes both) and reads the answer's
    /// head, skipping interim (1xx) answers.
    async fn send(&mut self, head: &[u8], body: &Bytes) -> Result<http1::Head, SendError> {
        let broke = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted => SendError::Closed(e.to_string()),
            _ => SendError::Failed(e.to_string()),
        };
        let mut out = Buf::chain(head, &body[..]);
        self.io.write_all_buf(&mut out).await.map_err(broke)?;
        self.io.flush().await.map_err(broke)?;
        let mut answered = false;
        loop {
            // An empty buffer (the usual case right after the write) has nothing to parse yet.
            if !self.buf.is_empty()
                && let Some((len, head)) =
                    http1::parse_head(&self.buf).map_err(SendError::Failed)?
            {
                self.buf.advance(len);
                if head.status.is_informational() {
                    continue;
                }
                return Ok(head);
            }
            self.buf.reserve(READ_CHUNK);
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) if !answered => {
                    return Err(SendError::Closed(
                        "connection closed before message completed".into(),
                    ));
                }
                Ok(0) => {
                    return Err(SendError::Failed(
                        "the connection closed in the middle of the answer's head".into(),
                    ));
                }
                Ok(_) => answered = true,
                Err(e) if !answered => return Err(broke(e)),
                Err(e) => return Err(SendError::Failed(e.to_string())),
            }
        }
    }
}

/// The chat connections a serving thread keeps alive between requests, newest last.
#[derive(Clone, Default)]
struct IdlePool(Arc<Mutex<Vec<(ChatConn, Instant)>>>);

impl IdlePool {
    /// The newest idle connection still open, closing those idle for longer than [`POOL_IDLE_TIMEOUT`]
    /// (llama-server closes its own after 5 s) and those the upstream closed.
    fn checkout(&self) -> Option<ChatConn> {
        let mut idle = self.0.lock().ok()?;
        while let Some((mut conn, since)) = idle.pop() {
            if since.elapsed() < POOL_IDLE_TIMEOUT && conn.reusable() {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, conn: ChatConn) {
        if let Ok(mut idle) = self.0.lock() {
            let now = Instant::now();
            idle.retain(|(_, since)| now.duration_since(*since) < POOL_IDLE_TIMEOUT);
            idle.push((conn, now));
        }
    }
}

/// A chat answer's body. Reading it reads its connection; dropped, it gives the connection back for the
/// next request when the answer was read to its end (or its rest is already here), and closes it otherwise,
/// which is how llama-server learns to stop generating.
pub struct UpstreamBody {
    conn: Option<ChatConn>,
    framing: http1::Framing,
    keep_alive: bool,
    pool: IdlePool,
}

impl UpstreamBody {
    /// Decodes what is buffered, then reads while the payload is empty: one piece of payload, the end, or
    /// a failure (after which the connection is closed).
    fn poll_payload(&mut self, cx: &mut Context<'_>) -> Poll<Option<std::io::Result<Bytes>>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        let mut out = Vec::new();
        loop {
            let decoded = self.framing.decode(&mut conn.buf, &mut out);
            if let Err(e) = decoded {
                self.conn = None;
                return Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    e,
                ))));
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Bytes::from(out))));
            }
            if self.framing.is_done() {
                return Poll::Ready(None);
            }
            conn.buf.reserve(READ_CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    let end = self.framing.at_close();
                    // Whatever the framing, a closed connection is not kept.
                    self.conn = None;
                    return Poll::Ready(match end {
                        Ok(()) => None,
                        Err(e) => Some(Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            e,
                        ))),
                    });
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.get_mut()
            .poll_payload(cx)
            .map(|p| p.map(|r| r.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.framing.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            http1::Framing::Length(n) => SizeHint::with_exact(n),
            http1::Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // The rest of an answer read to its last event (the chunked end after `[DONE]`) is usually here
        // already: read what has arrived without waiting, and keep the connection if that completes it
        // (more payload, a wait, a failure or the upstream's close leave it unkept).
        if self.keep_alive && !self.framing.is_done() {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let _ = self.poll_payload(&mut cx);
        }
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && self.framing.is_done()
            && conn.buf.is_empty()
        {
            self.pool.put(conn);
        }
    }
}

/// Turns a reqwest failure into one of our classes, with a short human reason.
pub fn classify(e: reqwest::Error) -> UpstreamError {
    if e.is_connect() {
        return UpstreamError::Unreachable(root_reason(&e));
    }
    if e.is_timeout() {
        return UpstreamError::Broken("timed out".into());
    }
    UpstreamError::Broken(root_reason(&e))
}

/// The innermost cause, worded for people: "connection refused" rather than a chain of wrappers.
pub fn root_reason(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    if let Some(io) = cause.downcast_ref::<std::io::Error>() {
        match io.kind() {
            std::io::ErrorKind::ConnectionRefused => return "connection refused".into(),
            std::io::ErrorKind::ConnectionReset => return "connection reset".into(),
            std::io::ErrorKind::TimedOut => return "connect timed out".into(),
            _ => {}
        }
    }
    let text = cause.to_string();
    if text.contains("timed out") {
        return "connect timed out".into();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_up_when_its_model_is_and_offers_its_own_replicas_slots() {
        let ok = serde_json::json!({"status": "ok", "replicas": [
            {"url": "http://127.0.0.1:8080", "up": true, "slots": 4, "peer": false},
            {"url": "http://127.0.0.1:8081", "up": false, "slots": 4, "peer": false},
            {"url": "http://10.0.0.2:4000", "up": true, "slots": 8, "peer": true}]});
        assert!(peer_health(&ok).is_ok());
        assert_eq!(
            peer_slots(&ok).unwrap(),
            4,
            "its own replicas that are up, not its peers"
        );
        let down = serde_json::json!({"status": "degraded",
            "upstream": {"status": "unreachable", "error": "upstream http://127.0.0.1:8080 is unreachable"},
            "replicas": [{"url": "http://127.0.0.1:8080", "up": false, "slots": 4}]});
        let e = peer_health(&down)
            .unwrap_err()
            .to_proxy_error("http://b:4000")
            .message;
        assert!(e.contains("is unreachable"), "{e}");
        assert!(peer_slots(&down).is_err());
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers each request on a connection with a complete event stream and then closes that connection
    /// without a `Connection: close` header, as llama-server does after a streamed answer.
    async fn closing_upstream() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = served.clone();
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let count = count.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    // Headers, then the body by its Content-Length.
                    let body_len = loop {
                        let n = sock.read(&mut buf).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&req).to_lowercase();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let len = text
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break end + 4 + len;
                        }
                    };
                    while req.len() < body_len {
                        let n = sock.read(&mut buf).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..n]);
                    }
                    let event = "data: [DONE]\n\n";
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n0\r\n\r\n",
                        event.len()
                    );
                    sock.write_all(answer.as_bytes()).await.unwrap();
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    // The close comes a moment after the answer, when the client may already reuse it.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                });
            }
        });
        (url, served)
    }

    /// Serves every request on a connection with a chunked event stream written a few bytes at a time
    /// (with a chunk extension), keeping the connection; counts the connections it accepted.
    async fn trickling_upstream() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let n = sock.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        // The request's body is `{}` and ends it.
                        if !seen.ends_with(b"{}") {
                            continue;
                        }
                        seen.clear();
                        let answer = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                                      transfer-encoding: chunked\r\n\r\n\
                                      d;x=1\r\ndata: {\"a\":1}\r\n2\r\n\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n";
                        for piece in answer.as_bytes().chunks(7) {
                            sock.write_all(piece).await.unwrap();
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                });
            }
        });
        (url, accepted)
    }

    /// An upstream at `url` with a fixed model (nothing to discover) and 5 s timeouts.
    fn upstream_at(url: &str) -> Upstream {
        let five = Duration::from_secs(5);
        Upstream::new(url, None, Some("m"), five, five, 0).unwrap()
    }

    /// Request `i` of a test: its whole answer body, which must have come with an event-stream head.
    async fn chat_body(up: &Upstream, body: &[u8], i: usize) -> Bytes {
        let resp = up
            .start_chat(body.to_vec(), None)
            .await
            .unwrap_or_else(|e| panic!("request {i}: {}", e.to_proxy_error(up.base()).message));
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_stream_cut_anywhere_by_reads_decodes_and_its_connection_is_kept() {
        let (url, accepted) = trickling_upstream().await;
        let up = upstream_at(&url);
        for i in 0..3 {
            let body = chat_body(&up, b"{}", i).await;
            assert_eq!(body, "data: {\"a\":1}\n\ndata: [DONE]\n\n", "request {i}");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_request_on_a_connection_the_upstream_closed_goes_again() {
        let (url, served) = closing_upstream().await;
        let up = upstream_at(&url);
        for i in 0..5 {
            let body = chat_body(&up, br#"{"stream":true}"#, i).await;
            assert_eq!(body, "data: [DONE]\n\n");
        }
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 5);
    }
}
