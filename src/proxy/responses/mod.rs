//! The OpenAI front door: `POST /v1/responses` (the Responses API, which Codex CLI speaks), on the same pipeline
//! as `/v1/messages`: `decode` turns the request into the upstream's chat request, the shared stream driver reads
//! the upstream, and `encode` writes OpenAI's event grammar (or one response object for `stream: false`).

pub mod decode;
pub mod encode;

use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::response::Response;

pub use decode::{ClientTool, Decoded, ResponseMeta, decode_object, decode_request, parse_body};
pub use encode::ResponsesEncoder;

use super::accounting::Tracker;
use super::error::{Dialect, ErrorType, ProxyError};
use super::pump;
use super::server::{Shared, options_for, read_object};
use super::stream::StreamTranslator;
use super::translate::TranslateOptions;

pub(crate) async fn responses(State(st): State<Shared>, request: Request) -> Response {
    let (Parts { headers, .. }, body) = request.into_parts();
    let mut t = Tracker::new(&st, "POST", "/v1/responses", Instant::now());
    t.dialect = Dialect::OpenAi;
    // Parsed once: the model picks the upstream's options, then the same object is decoded.
    let req = match read_object(&st, &mut t, &headers, body).await {
        Ok((_, req)) => req,
        Err(answer) => return answer,
    };
    let check = |o: &TranslateOptions| decode_object(&req, o).map(drop);
    let opts = match options_for(&st, &t.client_model, check).await {
        Ok(o) => o,
        Err(e) => return t.error(e),
    };
    t.upstream_model = opts.upstream_model.clone();
    let decoded = match decode_object(&req, &opts) {
        Ok(d) => d,
        Err(e) => return t.error(ProxyError::invalid_request(e.message)),
    };
    let session = super::router::session_of(&headers, &req);
    drop(req);
    t.streamed = decoded.client_stream;
    let body = match serde_json::to_vec(&decoded.chat) {
        Ok(b) => b,
        Err(e) => {
            return t.error(ProxyError::new(
                ErrorType::Api,
                format!("cannot encode the upstream request: {e}"),
            ));
        }
    };
    let mut route = pump::Route::new(&st, body, session, false);
    let (ctx, meta) = (decoded.ctx, decoded.meta);
    let translator = || StreamTranslator::new(ctx.clone());
    let pump = match pump::open(&st, &mut t, &mut route, translator()).await {
        Ok(p) => p,
        Err(e) => return t.error(e),
    };
    if decoded.client_stream {
        pump::stream_response(&st, pump, t, ResponsesEncoder::new(meta)).await
    } else {
        let encoder = || ResponsesEncoder::new(meta.clone());
        pump::json_response(&st, route, pump, t, translator, encoder).await
    }
}
