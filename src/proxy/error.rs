//! Every error the proxy answers with, in Anthropic's shape: `{"type":"error","error":{"type":…,"message":…}}`
//! with the status Anthropic uses for that type. Clients key their behaviour on these: the SDKs retry 429/5xx/529,
//! and Claude Code compacts the conversation when a 400 says `prompt is too long: N tokens > M maximum`.

use std::sync::OnceLock;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use regex::Regex;
use serde_json::{Value, json};

/// Anthropic's error types, each with its one status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    InvalidRequest,
    Authentication,
    NotFound,
    RequestTooLarge,
    RateLimit,
    Api,
    Timeout,
    Overloaded,
}

impl ErrorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::InvalidRequest => "invalid_request_error",
            ErrorType::Authentication => "authentication_error",
            ErrorType::NotFound => "not_found_error",
            ErrorType::RequestTooLarge => "request_too_large",
            ErrorType::RateLimit => "rate_limit_error",
            ErrorType::Api => "api_error",
            ErrorType::Timeout => "timeout_error",
            ErrorType::Overloaded => "overloaded_error",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorType::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorType::Authentication => StatusCode::UNAUTHORIZED,
            ErrorType::NotFound => StatusCode::NOT_FOUND,
            ErrorType::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorType::RateLimit => StatusCode::TOO_MANY_REQUESTS,
            ErrorType::Api => StatusCode::BAD_GATEWAY,
            ErrorType::Timeout => StatusCode::GATEWAY_TIMEOUT,
            // 529 is Anthropic's own "overloaded": clients back off and retry.
            ErrorType::Overloaded => {
                StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyError {
    pub kind: ErrorType,
    pub message: String,
}

impl ProxyError {
    pub fn new(kind: ErrorType, message: impl Into<String>) -> Self {
        ProxyError {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(ErrorType::InvalidRequest, message)
    }

    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    pub fn body(&self) -> Value {
        json!({"type": "error", "error": {"type": self.kind.as_str(), "message": self.message}})
    }

    pub fn prompt_too_long(prompt_tokens: u64, max_tokens: u64) -> Self {
        // Exactly Anthropic's wording: Claude Code matches
        // `prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*(\d+)` to decide to compact.
        Self::invalid_request(format!(
            "prompt is too long: {prompt_tokens} tokens > {max_tokens} maximum"
        ))
    }
}

/// Which API's error shape a client reads: the front door it came through (or, for shared endpoints such as
/// `/v1/models`, the headers it sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    #[default]
    Anthropic,
    OpenAi,
}

impl Dialect {
    /// `/v1/responses` is OpenAI's, `/v1/messages` Anthropic's; elsewhere a client that sends `anthropic-version` (every Anthropic SDK,
    /// Claude Code) is Anthropic's, one that sends only `Authorization: Bearer` is OpenAI's, and the rest
    /// (curl) get Anthropic's shape, as before the OpenAI front door existed.
    pub fn of(path: &str, headers: &axum::http::HeaderMap) -> Self {
        if path.starts_with("/v1/responses") || path.starts_with("/v1/chat/") {
            return Dialect::OpenAi;
        }
        if path.starts_with("/v1/messages") {
            return Dialect::Anthropic;
        }
        if headers.contains_key("anthropic-version") || headers.contains_key("x-api-key") {
            return Dialect::Anthropic;
        }
        match headers.get(header::AUTHORIZATION) {
            Some(v)
                if v.as_bytes().len() > 7 && v.as_bytes()[..7].eq_ignore_ascii_case(b"bearer ") =>
            {
                Dialect::OpenAi
            }
            _ => Dialect::Anthropic,
        }
    }
}

impl ErrorType {
    /// OpenAI's `(type, code)` for this error.
    fn openai(self) -> (&'static str, Option<&'static str>) {
        match self {
            ErrorType::InvalidRequest => ("invalid_request_error", None),
            ErrorType::Authentication => ("invalid_request_error", Some("invalid_api_key")),
            ErrorType::NotFound => ("invalid_request_error", Some("not_found")),
            ErrorType::RequestTooLarge => ("invalid_request_error", Some("request_too_large")),
            ErrorType::RateLimit => ("rate_limit_error", Some("rate_limit_exceeded")),
            ErrorType::Api => ("server_error", Some("upstream_error")),
            ErrorType::Timeout => ("server_error", Some("timeout")),
            ErrorType::Overloaded => ("server_error", Some("server_overloaded")),
        }
    }

    /// OpenAI's status: as Anthropic's, but 503 where Anthropic has its own 529.
    fn openai_status(self) -> StatusCode {
        match self {
            ErrorType::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            other => other.status(),
        }
    }
}

impl ProxyError {
    /// `{"error":{"message","type","param","code"}}`. A request error's message starts with the JSON path it
    /// is about (`input[3].call_id: field required`): that path is also the `param`.
    pub fn openai_body(&self) -> Value {
        let (kind, mut code) = self.kind.openai();
        if self.message.starts_with("prompt is too long") {
            code = Some("context_length_exceeded");
        }
        let param = (self.kind == ErrorType::InvalidRequest)
            .then(|| request_path(&self.message))
            .flatten();
        json!({"error": {"message": self.message, "type": kind, "param": param, "code": code}})
    }

    pub fn into_response_for(self, dialect: Dialect) -> Response {
        match dialect {
            Dialect::Anthropic => self.into_response(),
            Dialect::OpenAi => {
                let body = Bytes::from(self.openai_body().to_string());
                let mut res = (self.kind.openai_status(), body).into_response();
                res.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                res
            }
        }
    }
}

/// The JSON path a request error's message starts with, if it does (`tools[2].name: …`).
fn request_path(message: &str) -> Option<&str> {
    let (head, _) = message.split_once(": ")?;
    let ok = !head.is_empty()
        && head
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']'));
    ok.then_some(head)
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let body = Bytes::from(self.body().to_string());
        let mut res = (self.status(), body).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        res
    }
}

/// Longest upstream text quoted in an error message: enough to diagnose, not a whole HTML error page.
const MAX_QUOTED: usize = 500;

/// Maps a non-2xx upstream answer to what the client should see. `upstream` is the base URL, named in
/// every message so a user can tell the proxy's own errors from the server behind it.
pub fn from_upstream_status(status: u16, body: &[u8], upstream: &str) -> ProxyError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if let Some((n, m)) = parsed.as_ref().and_then(context_overflow) {
        return ProxyError::prompt_too_long(n, m);
    }
    let message = parsed
        .as_ref()
        .and_then(upstream_message)
        .unwrap_or_else(|| quote(body));
    match status {
        401 | 403 => ProxyError::new(
            ErrorType::Api,
            format!(
                "upstream {upstream} refused the proxy's credentials ({status}: {message}); check --upstream-api-key"
            ),
        ),
        429 => ProxyError::new(
            ErrorType::RateLimit,
            format!("upstream {upstream} is rate limiting: {message}"),
        ),
        400..=499 => ProxyError::invalid_request(message),
        // llama-server answers 503 while it loads the model: a retry later succeeds.
        503 => ProxyError::new(
            ErrorType::Overloaded,
            format!("upstream {upstream} is not ready ({status}): {message}"),
        ),
        _ => ProxyError::new(
            ErrorType::Api,
            format!("upstream {upstream} failed with status {status}: {message}"),
        ),
    }
}

/// An error object the upstream sent inside its event stream (llama.cpp: `data: {"error":{…}}`).
pub fn from_upstream_stream_error(error: &Value, upstream: &str) -> ProxyError {
    let wrapped = json!({ "error": error });
    if let Some((n, m)) = context_overflow(&wrapped) {
        return ProxyError::prompt_too_long(n, m);
    }
    let message = upstream_message(&wrapped).unwrap_or_else(|| error.to_string());
    ProxyError::new(
        ErrorType::Api,
        format!("upstream {upstream} failed mid-stream: {message}"),
    )
}

/// `(prompt tokens, context size)` when the body says the prompt does not fit the upstream's context.
fn context_overflow(body: &Value) -> Option<(u64, u64)> {
    // vLLM puts the error at the top level, llama.cpp and OpenAI under "error".
    let err = body.get("error").filter(|e| e.is_object()).unwrap_or(body);
    // llama.cpp: {"error":{"type":"exceed_context_size_error","n_prompt_tokens":N,"n_ctx":M,...}}
    if err.get("type").and_then(Value::as_str) == Some("exceed_context_size_error") {
        let n = err.get("n_prompt_tokens").and_then(Value::as_u64)?;
        let m = err.get("n_ctx").and_then(Value::as_u64)?;
        return Some((n, m));
    }
    // vLLM / OpenAI: "This model's maximum context length is M tokens. However, you requested N tokens ..."
    let msg = err.get("message").and_then(Value::as_str)?;
    static VLLM: OnceLock<Option<Regex>> = OnceLock::new();
    let re = VLLM
        .get_or_init(|| {
            Regex::new(
                r"maximum context length is (\d+) tokens.*?(?:requested|resulted in) (\d+) tokens",
            )
            .ok()
        })
        .as_ref()?;
    let caps = re.captures(msg)?;
    let m = caps.get(1)?.as_str().parse().ok()?;
    let n = caps.get(2)?.as_str().parse().ok()?;
    Some((n, m))
}

fn upstream_message(body: &Value) -> Option<String> {
    let err = body.get("error").unwrap_or(body);
    match err {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("message").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".to_string();
    }
    let mut end = text.len().min(MAX_QUOTED);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if end < text.len() {
        format!("{}…", &text[..end])
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: &str = "http://127.0.0.1:11434";

    #[test]
    fn llama_cpp_context_overflow_becomes_anthropic_prompt_too_long() {
        let body = br#"{"error":{"code":400,"message":"request (5031 tokens) exceeds the available context size (4096 tokens), try increasing it","type":"exceed_context_size_error","n_prompt_tokens":5031,"n_ctx":4096}}"#;
        let e = from_upstream_status(400, body, UP);
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            e.body(),
            json!({"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 5031 tokens > 4096 maximum"}})
        );
        // Claude Code's compaction regex must find both numbers.
        let cc = Regex::new(r"prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*(\d+)").unwrap();
        let caps = cc.captures(&e.message).unwrap();
        assert_eq!((&caps[1], &caps[2]), ("5031", "4096"));
    }

    #[test]
    fn vllm_context_overflow_is_recognised_too() {
        let body = br#"{"object":"error","message":"This model's maximum context length is 32768 tokens. However, you requested 40000 tokens (39000 in the messages, 1000 in the completion). Please reduce the length of the messages or completion.","type":"BadRequestError","param":null,"code":400}"#;
        let e = from_upstream_status(400, body, UP);
        assert_eq!(
            e.message,
            "prompt is too long: 40000 tokens > 32768 maximum"
        );
    }

    #[test]
    fn other_upstream_4xx_is_400_with_the_upstream_message() {
        let e = from_upstream_status(
            400,
            br#"{"error":{"code":400,"message":"Invalid tool_choice: bogus","type":"invalid_request_error"}}"#,
            UP,
        );
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.message, "Invalid tool_choice: bogus");
    }

    #[test]
    fn upstream_5xx_and_garbage_are_502_naming_the_upstream() {
        let e = from_upstream_status(500, b"<html>oops</html>", UP);
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(e.kind.as_str(), "api_error");
        assert!(
            e.message.contains(UP) && e.message.contains("<html>oops</html>"),
            "{}",
            e.message
        );
    }

    #[test]
    fn upstream_loading_is_529_overloaded() {
        let e = from_upstream_status(
            503,
            br#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#,
            UP,
        );
        assert_eq!(e.status().as_u16(), 529);
        assert_eq!(e.kind.as_str(), "overloaded_error");
        assert!(e.message.contains("Loading model"));
    }

    #[test]
    fn upstream_auth_failure_is_not_blamed_on_the_client_key() {
        let e = from_upstream_status(401, br#"{"error":{"message":"Invalid API Key"}}"#, UP);
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert!(e.message.contains("--upstream-api-key"));
    }

    #[test]
    fn long_bodies_are_quoted_short_on_a_char_boundary() {
        let body = "é".repeat(1000);
        let q = quote(body.as_bytes());
        assert!(q.len() <= MAX_QUOTED + '…'.len_utf8());
        assert!(q.ends_with('…'));
    }

    #[test]
    fn openai_shape_names_the_param_and_the_context_overflow() {
        let e = ProxyError::invalid_request("input[3].call_id: field required");
        assert_eq!(
            e.openai_body(),
            json!({"error":{"message":"input[3].call_id: field required","type":"invalid_request_error",
                            "param":"input[3].call_id","code":null}})
        );
        let e = ProxyError::prompt_too_long(9000, 8192);
        assert_eq!(e.openai_body()["error"]["code"], "context_length_exceeded");
        assert_eq!(e.openai_body()["error"]["param"], Value::Null);
        let e = ProxyError::new(ErrorType::Overloaded, "loading");
        assert_eq!(
            e.into_response_for(Dialect::OpenAi).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let e = ProxyError::new(ErrorType::Authentication, "missing API key: send it");
        assert_eq!(e.openai_body()["error"]["code"], "invalid_api_key");
        assert_eq!(e.openai_body()["error"]["param"], Value::Null);
    }

    #[test]
    fn dialect_follows_the_path_then_the_headers() {
        use axum::http::HeaderMap;
        let mut h = HeaderMap::new();
        assert_eq!(Dialect::of("/v1/models", &h), Dialect::Anthropic);
        assert_eq!(Dialect::of("/v1/responses", &h), Dialect::OpenAi);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        assert_eq!(Dialect::of("/v1/models", &h), Dialect::OpenAi);
        assert_eq!(Dialect::of("/v1/messages", &h), Dialect::Anthropic);
        h.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        assert_eq!(Dialect::of("/v1/models", &h), Dialect::Anthropic);
    }

    #[test]
    fn mid_stream_error_object_is_mapped() {
        let e = from_upstream_stream_error(&json!({"code":500,"message":"boom"}), UP);
        assert_eq!(e.kind, ErrorType::Api);
        assert!(e.message.contains("boom"));
    }
}
