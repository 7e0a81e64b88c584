//! The instant upstream: an OpenAI-compatible server that replays responses recorded from a real llama-server
//! (bench/recorded/) as fast as the machine allows, so the proxy under test is the only thing being measured.
//!
//! A request steers the replay with markers in its text, which every proxy forwards untouched:
//! `@n=N` streams N content chunks (cycling the recorded ones), `@pace_us=D` sleeps D µs between chunks and
//! then replaces each chunk's text by `~T<send time, ns since the epoch>~` so the client can measure the
//! one-way delay of every event (same host, same clock).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::stream;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The recorded replies, split once at startup into the pieces a replay is assembled from.
pub struct Recorded {
    completion: Bytes,
    models: Bytes,
    /// SSE events before the first content chunk (the role chunk).
    head: Vec<Bytes>,
    content: Vec<Bytes>,
    /// SSE events after the last content chunk (finish_reason, timings, `[DONE]`).
    tail: Vec<Bytes>,
    /// A content chunk cut around its text, for stamped replays.
    stamp_prefix: Bytes,
    stamp_suffix: Bytes,
}

const STAMP_PLACEHOLDER: &str = "@@STAMP@@";

impl Recorded {
    pub fn load(dir: &Path) -> Result<Recorded> {
        let read = |name: &str| {
            std::fs::read(dir.join(name))
                .with_context(|| format!("reading {}", dir.join(name).display()))
        };
        let completion = read("chat.json")?;
        let models = read("models.json")?;
        let sse =
            String::from_utf8(read("chat-stream.sse")?).context("chat-stream.sse is not UTF-8")?;
        let (head, content, tail, template) = split_stream(&sse)?;
        let mut stamp_chunk: Value = serde_json::from_str(&template)?;
        stamp_chunk["choices"][0]["delta"]["content"] = Value::from(STAMP_PLACEHOLDER);
        let line = format!("data: {}\n\n", serde_json::to_string(&stamp_chunk)?);
        let (pre, post) = line
            .split_once(STAMP_PLACEHOLDER)
            .context("stamp placeholder lost")?;
        Ok(Recorded {
            completion: completion.into(),
            models: models.into(),
            head,
            content,
            tail,
            stamp_prefix: Bytes::from(format!("{pre}~T")),
            stamp_suffix: Bytes::from(format!("~{post}")),
        })
    }
}

type Split = (Vec<Bytes>, Vec<Bytes>, Vec<Bytes>, String);

/// Splits a recorded OpenAI stream into head / content / tail events; also returns one content chunk's JSON.
fn split_stream(sse: &str) -> Result<Split> {
    let (mut head, mut content, mut tail) = (vec![], vec![], vec![]);
    let mut template = None;
    for event in sse.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let data = event.strip_prefix("data: ").unwrap_or(event);
        let text = serde_json::from_str::<Value>(data)
            .ok()
            .and_then(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .filter(|t| !t.is_empty());
        let bytes = Bytes::from(format!("{event}\n\n"));
        match text {
            Some(_) => {
                template.get_or_insert_with(|| data.to_owned());
                content.push(bytes);
            }
            None if content.is_empty() => head.push(bytes),
            None => tail.push(bytes),
        }
    }
    let Some(template) = template else {
        bail!("the recorded stream has no content chunk");
    };
    Ok((head, content, tail, template))
}

/// The replay a request asks for, read from the markers in its body.
#[derive(Debug, PartialEq)]
pub struct Replay {
    pub stream: bool,
    pub chunks: Option<usize>,
    pub pace_us: u64,
}

pub fn parse_replay(body: &[u8]) -> Replay {
    let stream = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("stream")?.as_bool())
        .unwrap_or(false);
    Replay {
        stream,
        chunks: marker(body, b"@n=").map(|n| n as usize),
        pace_us: marker(body, b"@pace_us=").unwrap_or(0),
    }
}

fn marker(body: &[u8], key: &[u8]) -> Option<u64> {
    let at = body.windows(key.len()).position(|w| w == key)? + key.len();
    let digits: Vec<u8> = body[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, content_type: &str, body: Bytes) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body).boxed())
        .expect("static response parts are valid")
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

fn stream_response(rec: Arc<Recorded>, replay: &Replay) -> Response<Body> {
    let n = replay.chunks.unwrap_or(rec.content.len());
    let pace = Duration::from_micros(replay.pace_us);
    // States: 0..head = head events, then n content chunks, then the tail.
    let total = rec.head.len() + n + rec.tail.len();
    let events = stream::unfold(0usize, move |i| {
        let rec = rec.clone();
        async move {
            if i >= total {
                return None;
            }
            let h = rec.head.len();
            let bytes = if i < h {
                rec.head[i].clone()
            } else if i < h + n {
                if pace.is_zero() {
                    rec.content[(i - h) % rec.content.len()].clone()
                } else {
                    tokio::time::sleep(pace).await;
                    let mut b =
                        Vec::with_capacity(rec.stamp_prefix.len() + 24 + rec.stamp_suffix.len());
                    b.extend_from_slice(&rec.stamp_prefix);
                    b.extend_from_slice(now_ns().to_string().as_bytes());
                    b.extend_from_slice(&rec.stamp_suffix);
                    Bytes::from(b)
                }
            } else {
                rec.tail[i - h - n].clone()
            };
            Some((Ok::<_, Infallible>(Frame::data(bytes)), i + 1))
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(BodyExt::boxed(StreamBody::new(events)))
        .expect("static response parts are valid")
}

async fn handle(rec: Arc<Recorded>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let is_post = req.method() == hyper::Method::POST;
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(full(
                StatusCode::BAD_REQUEST,
                "text/plain",
                Bytes::from_static(b"bad body"),
            ));
        }
    };
    Ok(match (is_post, path.as_str()) {
        (true, "/v1/chat/completions" | "/chat/completions") => {
            let replay = parse_replay(&body);
            if replay.stream {
                stream_response(rec, &replay)
            } else {
                full(StatusCode::OK, "application/json", rec.completion.clone())
            }
        }
        (false, "/v1/models" | "/models") => {
            full(StatusCode::OK, "application/json", rec.models.clone())
        }
        (false, "/health") => full(
            StatusCode::OK,
            "application/json",
            Bytes::from_static(b"{\"status\":\"ok\"}"),
        ),
        _ => full(
            StatusCode::NOT_FOUND,
            "application/json",
            Bytes::from_static(
                b"{\"error\":{\"code\":404,\"message\":\"not served by the bench upstream\"}}",
            ),
        ),
    })
}

/// Serves until killed, on one thread: the upstream must stay cheap next to the proxy it feeds.
pub fn serve(addr: SocketAddr, recorded_dir: &Path) -> Result<()> {
    let rec = Arc::new(Recorded::load(recorded_dir)?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        loop {
            let (sock, _) = listener.accept().await?;
            let _ = sock.set_nodelay(true);
            let rec = rec.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(rec.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_steer_the_replay() {
        let r = parse_replay(
            br#"{"messages":[{"role":"user","content":"hi @n=64 @pace_us=1500"}],"stream":true}"#,
        );
        assert_eq!(
            r,
            Replay {
                stream: true,
                chunks: Some(64),
                pace_us: 1500
            }
        );
        let r = parse_replay(br#"{"stream": false, "messages":[]}"#);
        assert_eq!(
            r,
            Replay {
                stream: false,
                chunks: None,
                pace_us: 0
            }
        );
    }

    #[test]
    fn recorded_stream_splits_into_head_content_tail() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/recorded");
        let rec = Recorded::load(&dir).unwrap();
        assert_eq!(rec.head.len(), 1, "llama-server sends one role chunk first");
        assert!(rec.content.len() >= 5);
        assert!(rec.tail.last().unwrap().starts_with(b"data: [DONE]"));
        let stamped = [&rec.stamp_prefix[..], b"123", &rec.stamp_suffix[..]].concat();
        let v: Value = serde_json::from_slice(&stamped[6..]).unwrap();
        assert_eq!(v["choices"][0]["delta"]["content"], "~T123~");
    }
}
