//! The OpenAI Chat Completions door: `POST /v1/chat/completions`, passed through to a replica as it came.
//!
//! The upstreams already speak this protocol, so nothing is translated: the request is routed (session, cached
//! prefix, load), authenticated and accounted like the other doors, and the replica's answer (stream or JSON)
//! is copied to the client byte for byte. It is how the proxies of a fleet reach each other's llama-servers
//! (a peer sends the request it translated here, marked as a hop, and the proxy that gets it serves it from
//! its own llama-servers only), and it gives OpenAI-compatible clients the router and the key too.
//!
//! Tokens are not counted for this door (the answer is not parsed); requests, errors and time to first byte
//! are.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use hyper::body::{Frame, SizeHint};

use super::accounting::Tracker;
use super::error::Dialect;
use super::pump::{self, Route};
use super::router;
use super::server::{Shared, read_object};
use super::upstream::{HOP_HEADER, UpstreamBody};

pub(crate) async fn chat_completions(State(st): State<Shared>, request: Request) -> Response {
    let (Parts { headers, .. }, body) = request.into_parts();
    let mut t = Tracker::new(&st, "POST", "/v1/chat/completions", Instant::now());
    t.dialect = Dialect::OpenAi;
    // Parsed only to refuse what is not a JSON object at once and to read the session and the model; the
    // bytes sent are the client's own.
    let (bytes, req) = match read_object(&st, &mut t, &headers, body).await {
        Ok(r) => r,
        Err(answer) => return answer,
    };
    t.upstream_model = t.client_model.clone();
    t.streamed = req.get("stream") == Some(&serde_json::Value::Bool(true));
    let session = router::session_of(&headers, &req);
    drop(req);
    let hop = headers.contains_key(HOP_HEADER);
    let mut route = Route::new(&st, bytes.to_vec(), session, hop);
    drop(bytes);
    let resp = match pump::send(&st, &mut t, &mut route).await {
        Ok(r) => r,
        Err(e) => return t.error(e),
    };
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("application/json"));
    let passed = Passed {
        body: resp.into_body(),
        t: Some(t),
    };
    let mut out = Response::new(Body::new(passed));
    *out.status_mut() = StatusCode::OK;
    out.headers_mut().insert(header::CONTENT_TYPE, content_type);
    out
}

/// The replica's answer on its way to the client. The request's accounting (and its lease on the replica)
/// lasts until the answer ends: completed at its end, a break marks the replica as broken, and a client that
/// hangs up drops it unfinished (logged as 499, and the upstream connection closed, which stops generation).
struct Passed {
    body: UpstreamBody,
    t: Option<Tracker>,
}

impl hyper::body::Body for Passed {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => {
                if let Some(t) = this.t.as_mut()
                    && t.ttft.is_none()
                {
                    t.ttft = Some(t.start.elapsed());
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(mut t) = this.t.take() {
                    let why = format!("the upstream broke off its answer: {e}");
                    if let Some(lease) = t.lease.as_ref() {
                        lease.router().broke(lease.replica, &why);
                    }
                    t.status = 502;
                    t.error_type = Some("api_error");
                    t.error_message = Some(why);
                    t.completed = true;
                }
            }
            Poll::Ready(None) => {
                if let Some(mut t) = this.t.take() {
                    t.ok();
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
