//! The OpenAI front door: `POST /v1/responses` (the Responses API, which Codex CLI speaks), on the same pipeline
//! as `/v1/messages`: `decode` turns the request into the upstream's chat request, the shared stream driver reads
//! the upstream, and `encode` writes OpenAI's event grammar (or one response object for `stream: false`).

pub mod decode;
pub mod encode;

use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

pub use decode::{ClientTool, Decoded, ResponseMeta, decode_request};
pub use encode::ResponsesEncoder;

use super::accounting::Tracker;
use super::error::{Dialect, ErrorType, ProxyError};
use super::pump;
use super::server::{Shared, options_for, peek_model, read_body};
use super::stream::StreamTranslator;
use super::translate::{RequestError, TranslateOptions};

fn valid(body: &[u8], opts: &TranslateOptions) -> Result<(), RequestError> {
    decode_request(body, opts).map(drop)
}

pub(crate) async fn responses(
    State(st): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut t = Tracker::new(&st, "POST", "/v1/responses", Instant::now());
    t.dialect = Dialect::OpenAi;
    let bytes = match read_body(&headers, body, st.settings.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return t.error(e),
    };
    match peek_model(&bytes) {
        Ok(m) => t.client_model = m,
        Err(e) => return t.error(e),
    }
    let opts = match options_for(&st, &t.client_model, &bytes, valid).await {
        Ok(o) => o,
        Err(e) => return t.error(e),
    };
    t.upstream_model = opts.upstream_model.clone();
    let decoded = match decode_request(&bytes, &opts) {
        Ok(d) => d,
        Err(e) => return t.error(ProxyError::invalid_request(e.message)),
    };
    drop(bytes);
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
    let translator = StreamTranslator::new(decoded.ctx);
    let pump = match pump::open(&st, &mut t, body, translator).await {
        Ok(p) => p,
        Err(e) => return t.error(e),
    };
    let encoder = ResponsesEncoder::new(decoded.meta);
    if decoded.client_stream {
        pump::stream_response(st.settings.ping_interval, pump, t, encoder)
    } else {
        pump::json_response(pump, t, encoder).await
    }
}
