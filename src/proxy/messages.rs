//! The Anthropic front door: `POST /v1/messages` and `POST /v1/messages/count_tokens`. Decoding and translation
//! live in `translate`, the stream driver in `pump`, the encoder is Anthropic's own event wire form.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::accounting::Tracker;
use super::accumulate::MessageAccumulator;
use super::error::{ErrorType, ProxyError};
use super::pump::{self, AnthropicSse};
use super::router;
use super::server::{Shared, options_for, read_body, read_object};
use super::stream::StreamTranslator;
use super::translate::{TranslateOptions, count_object, parse_body, translate_object};
use super::upstream::{Upstream, UpstreamError};

// ---------------------------------------------------------------------------------------------------------
// POST /v1/messages/count_tokens

pub(crate) async fn count_tokens(
    State(st): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Response {
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
    let req = parse_body(&bytes).map_err(|e| ProxyError::invalid_request(e.message))?;
    drop(bytes);
    if let Some(Value::String(m)) = req.get("model") {
        t.client_model = m.clone();
    }
    let opts = options_for(st, &t.client_model, |o| count_object(&req, o).map(drop)).await?;
    t.upstream_model = opts.upstream_model.clone();
    let chat = count_object(&req, &opts).map_err(|e| ProxyError::invalid_request(e.message))?;
    let base = st.upstream().base();
    let waited = Instant::now();
    let result = exact_count(st.upstream(), &chat).await;
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
pub(crate) fn estimate_tokens(chat: &Value) -> u64 {
    let len = |k: &str| chat.get(k).map_or(0, |v| v.to_string().len());
    ((len("messages") + len("tools")) as u64).div_ceil(4)
}

// ---------------------------------------------------------------------------------------------------------
// POST /v1/messages

pub(crate) async fn messages(State(st): State<Shared>, request: Request) -> Response {
    let (Parts { headers, .. }, body) = request.into_parts();
    let mut t = Tracker::new(&st, "POST", "/v1/messages", Instant::now());
    // Parsed once: the model picks the upstream's options, then the same object is translated.
    let req = match read_object(&st, &mut t, &headers, body).await {
        Ok((_, req)) => req,
        Err(answer) => return answer,
    };
    let check = |o: &TranslateOptions| count_object(&req, o).map(drop);
    let opts = match options_for(&st, &t.client_model, check).await {
        Ok(o) => o,
        Err(e) => return t.error(e),
    };
    t.upstream_model = opts.upstream_model.clone();
    let translated = match translate_object(&req, &opts) {
        Ok(tr) => tr,
        Err(e) => return t.error(ProxyError::invalid_request(e.message)),
    };
    let session = router::session_of(&headers, &req);
    drop(req);
    t.streamed = translated.client_stream;
    let body = match serde_json::to_vec(&translated.chat) {
        Ok(b) => b,
        Err(e) => {
            return t.error(ProxyError::new(
                ErrorType::Api,
                format!("cannot encode the upstream request: {e}"),
            ));
        }
    };
    let mut route = pump::Route::new(&st, body, session, false);
    let ctx = translated.ctx;
    let translator = || StreamTranslator::new(ctx.clone());
    let pump = match pump::open(&st, &mut t, &mut route, translator()).await {
        Ok(p) => p,
        Err(e) => return t.error(e),
    };
    if translated.client_stream {
        pump::stream_response(&st, pump, t, AnthropicSse).await
    } else {
        pump::json_response(&st, route, pump, t, translator, MessageAccumulator::new).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_is_a_quarter_of_the_bytes() {
        let chat = json!({"messages":[{"role":"user","content":"abcdefgh"}]});
        let bytes = chat["messages"].to_string().len() as u64;
        assert_eq!(estimate_tokens(&chat), bytes.div_ceil(4));
    }
}
