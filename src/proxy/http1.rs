//! The client side of HTTP/1.1 for the chat connections, as pure functions over byte buffers: the request
//! head, the response head (RFC 9112 §4-6) and the body's framing (chunked, by length, or to the close).
//! The upstream's answer is an event stream of many small chunks; hyper's client connection passed each
//! chunk through its body channel and woke the reader once per chunk (~2,700 instructions a chunk, a third
//! of serve-proxy's work per request). Decoded here, everything one read brings is one piece of payload.
//! The I/O is in `upstream.rs` (`ChatConn`).

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use bytes::{Buf, BytesMut};

/// Most headers read in a response head (llama-server sends 6-9).
const MAX_HEADERS: usize = 64;
/// Longest response head, and longest chunk-size or trailer line, before the answer is called broken.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_LINE_BYTES: usize = 4096;

/// A response head, read.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The connection may carry another request once this answer is read to its end.
    pub keep_alive: bool,
}

/// The request head of a chat request: the request line, the fixed headers, and `extra`, each already valid
/// as a header (they come from `HeaderValue`s).
pub fn request_head(path: &str, host: &[u8], body_len: usize, extra: &[(&str, &[u8])]) -> Vec<u8> {
    let mut h = Vec::with_capacity(
        160 + extra
            .iter()
            .map(|(n, v)| n.len() + v.len() + 4)
            .sum::<usize>(),
    );
    h.extend_from_slice(b"POST ");
    h.extend_from_slice(path.as_bytes());
    h.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    h.extend_from_slice(host);
    h.extend_from_slice(
        b"\r\ncontent-type: application/json\r\naccept: text/event-stream\r\ncontent-length: ",
    );
    h.extend_from_slice(body_len.to_string().as_bytes());
    h.extend_from_slice(b"\r\n");
    for (name, value) in extra {
        h.extend_from_slice(name.as_bytes());
        h.extend_from_slice(b": ");
        h.extend_from_slice(value);
        h.extend_from_slice(b"\r\n");
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// Reads a response head from the start of `buf`: `Ok(None)` while it is incomplete; otherwise the head and
/// its length in bytes. Interim (1xx) answers are returned like any other; the caller skips them.
pub fn parse_head(buf: &[u8]) -> Result<Option<(usize, Head)>, String> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(format!(
                "its answer's head is longer than {MAX_HEAD_BYTES} bytes"
            ));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("its answer is not HTTP/1.1 ({e})")),
    };
    let code = resp.code.unwrap_or_default();
    let status = StatusCode::from_u16(code)
        .map_err(|_| format!("its answer has an invalid status code {code}"))?;
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("its answer has an invalid header name {:?}", h.name))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| format!("its answer's header {:?} has an invalid value", h.name))?;
        headers.append(name, value);
    }
    let framing = framing(status, &headers)?;
    let http11 = resp.version == Some(1);
    let connection = |token: &str| {
        headers
            .get_all(axum::http::header::CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), token))
    };
    let keep_alive = !matches!(framing, Framing::UntilClose)
        && if http11 {
            !connection("close")
        } else {
            connection("keep-alive")
        };
    Ok(Some((
        len,
        Head {
            status,
            headers,
            framing,
            keep_alive,
        },
    )))
}

/// How the body of an answer is delimited (RFC 9112 §6.3; the request is never HEAD or CONNECT).
fn framing(status: StatusCode, headers: &HeaderMap) -> Result<Framing, String> {
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Length(0));
    }
    let te = headers.get_all(axum::http::header::TRANSFER_ENCODING);
    // Only a final `chunked` delimits the body; any other coding runs to the close.
    if let Some(last) = te.iter().next_back().map(HeaderValue::as_bytes) {
        let final_coding = last.rsplit(|&b| b == b',').next().unwrap_or_default();
        return Ok(
            if final_coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                Framing::Chunked(Chunked::default())
            } else {
                Framing::UntilClose
            },
        );
    }
    let mut length = None;
    for v in headers.get_all(axum::http::header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let n = std::str::from_utf8(part.trim_ascii())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or("its answer has an invalid Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("its answer has two different Content-Lengths".into());
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// An answer body's framing, and how far it has been read.
#[derive(Debug)]
pub enum Framing {
    Chunked(Chunked),
    /// This many bytes are still to come.
    Length(u64),
    /// Everything until the upstream closes the connection (which cannot be kept).
    UntilClose,
    /// Read to its end.
    Done,
}

impl Framing {
    /// Moves the payload that `buf` holds to `out`, consuming the framing around it; what `buf` keeps is
    /// an incomplete piece of framing, or what comes after the body.
    pub fn decode(&mut self, buf: &mut BytesMut, out: &mut Vec<u8>) -> Result<(), &'static str> {
        // The payload is at most what is buffered: one allocation, not one per chunk appended.
        out.reserve(buf.len());
        match self {
            Framing::Chunked(c) => {
                c.decode(buf, out)?;
                if c.done() {
                    *self = Framing::Done;
                }
            }
            Framing::Length(n) => {
                let take = (*n).min(buf.len() as u64) as usize;
                out.extend_from_slice(&buf[..take]);
                buf.advance(take);
                *n -= take as u64;
                if *n == 0 {
                    *self = Framing::Done;
                }
            }
            Framing::UntilClose => {
                out.extend_from_slice(buf);
                buf.clear();
            }
            Framing::Done => {}
        }
        Ok(())
    }

    /// The upstream closed the connection: the end of a body read to the close, a broken answer otherwise.
    pub fn at_close(&mut self) -> Result<(), &'static str> {
        match self {
            Framing::UntilClose | Framing::Done => {
                *self = Framing::Done;
                Ok(())
            }
            _ => Err("the upstream closed the connection before the end of its answer"),
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, Framing::Done)
    }
}

/// The chunked transfer coding (RFC 9112 §7.1), decoded as its bytes arrive.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum ChunkState {
    /// Before a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailer,
    Done,
}

impl Chunked {
    fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    fn decode(&mut self, buf: &mut BytesMut, out: &mut Vec<u8>) -> Result<(), &'static str> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some((len, taken)) = next_line(buf)? else {
                        return Ok(());
                    };
                    // Extensions (`;name=value`) are allowed and mean nothing here.
                    let line = &buf[..len];
                    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
                    let size = parse_hex(digits.trim_ascii());
                    buf.advance(taken);
                    let size = size.ok_or("its answer has an invalid chunk size")?;
                    self.state = if size == 0 {
                        ChunkState::Trailer
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(());
                    }
                    let take = left.min(buf.len() as u64) as usize;
                    out.extend_from_slice(&buf[..take]);
                    buf.advance(take);
                    self.state = match left - take as u64 {
                        0 => ChunkState::DataEnd,
                        n => ChunkState::Data(n),
                    };
                }
                ChunkState::DataEnd => {
                    let Some((len, taken)) = next_line(buf)? else {
                        return Ok(());
                    };
                    buf.advance(taken);
                    if len > 0 {
                        return Err("its answer has a chunk longer than its size");
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailer => {
                    let Some((len, taken)) = next_line(buf)? else {
                        return Ok(());
                    };
                    buf.advance(taken);
                    if len == 0 {
                        self.state = ChunkState::Done;
                    }
                }
                ChunkState::Done => return Ok(()),
            }
        }
    }
}

/// The next line of `buf`: its length without the CRLF (or bare LF), and with it; `None` until it is complete.
fn next_line(buf: &[u8]) -> Result<Option<(usize, usize)>, &'static str> {
    let Some(end) = memchr::memchr(b'\n', buf) else {
        return if buf.len() > MAX_LINE_BYTES {
            Err("its answer has a framing line that never ends")
        } else {
            Ok(None)
        };
    };
    let len = if end > 0 && buf[end - 1] == b'\r' {
        end - 1
    } else {
        end
    };
    Ok(Some((len, end + 1)))
}

fn parse_hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16)?;
        Some(n << 4 | u64::from(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        let (len, h) = parse_head(text.as_bytes()).unwrap().expect("complete");
        assert_eq!(len, text.len());
        h
    }

    /// Decodes `wire` fed in pieces of `step` bytes, as reads would bring it.
    fn decode_in_steps(
        mut framing: Framing,
        wire: &[u8],
        step: usize,
    ) -> (Vec<u8>, Framing, Vec<u8>) {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in wire.chunks(step) {
            buf.extend_from_slice(piece);
            framing.decode(&mut buf, &mut out).unwrap();
        }
        (out, framing, buf.to_vec())
    }

    #[test]
    fn a_request_head_has_its_length_and_extra_headers() {
        let h = request_head(
            "/v1/chat/completions",
            b"127.0.0.1:8080",
            42,
            &[("authorization", b"Bearer k")],
        );
        assert_eq!(
            String::from_utf8(h).unwrap(),
            "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:8080\r\ncontent-type: application/json\r\n\
             accept: text/event-stream\r\ncontent-length: 42\r\nauthorization: Bearer k\r\n\r\n"
        );
    }

    #[test]
    fn llama_servers_stream_head_is_chunked_and_kept_alive() {
        let h = head(
            "HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=100\r\nContent-Type: text/event-stream\r\n\
             Server: llama.cpp\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(h.headers["content-type"], "text/event-stream");
        assert!(matches!(h.framing, Framing::Chunked(_)));
        assert!(h.keep_alive);
    }

    #[test]
    fn heads_say_how_the_body_ends_and_whether_the_connection_stays() {
        let h = head("HTTP/1.1 400 Bad Request\r\nContent-Length: 12\r\nConnection: close\r\n\r\n");
        assert!(matches!(h.framing, Framing::Length(12)));
        assert!(!h.keep_alive);
        // HTTP/1.0 keeps the connection only when it says so.
        assert!(!head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n").keep_alive);
        assert!(
            head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: Keep-Alive\r\n\r\n")
                .keep_alive
        );
        // No length and no chunking: the body runs to the close, and the connection goes with it.
        let h = head("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n");
        assert!(matches!(h.framing, Framing::UntilClose));
        assert!(!h.keep_alive);
        // A coding after chunked is not chunked.
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n").framing,
            Framing::UntilClose
        ));
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").framing,
            Framing::Chunked(_)
        ));
        assert!(matches!(
            head("HTTP/1.1 204 No Content\r\n\r\n").framing,
            Framing::Length(0)
        ));
        assert!(
            head("HTTP/1.1 100 Continue\r\n\r\n")
                .status
                .is_informational()
        );
    }

    #[test]
    fn an_incomplete_head_waits_and_a_broken_one_is_named() {
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Le")
                .unwrap()
                .is_none()
        );
        assert!(parse_head(b"").unwrap().is_none());
        let e = parse_head(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").unwrap_err();
        assert!(e.contains("not HTTP/1.1"), "{e}");
        let e = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n")
            .unwrap_err();
        assert!(e.contains("two different Content-Lengths"), "{e}");
        let e = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n").unwrap_err();
        assert!(e.contains("invalid Content-Length"), "{e}");
        let long = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD_BYTES));
        assert!(
            parse_head(long.as_bytes())
                .unwrap_err()
                .contains("longer than")
        );
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads_cut() {
        let wire = b"6\r\ndata: \r\nE;ext=1\r\n{\"a\":1}\n\ndata:\r\n5\r\n [DON\r\n3\r\nE]\n\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for step in 1..=wire.len() {
            let (out, framing, rest) =
                decode_in_steps(Framing::Chunked(Chunked::default()), wire, step);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                "data: {\"a\":1}\n\ndata: [DONE]\n",
                "step {step}"
            );
            assert!(framing.is_done(), "step {step}");
            // What follows the body is not the body's.
            assert_eq!(rest, b"NEXT", "step {step}");
        }
    }

    #[test]
    fn broken_chunking_is_an_error() {
        for wire in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"3\r\nabcd\r\n",
            b"11111111111111111\r\n",
        ] {
            let mut buf = BytesMut::from(wire);
            let mut framing = Framing::Chunked(Chunked::default());
            assert!(
                framing.decode(&mut buf, &mut Vec::new()).is_err(),
                "{wire:?}"
            );
        }
        let mut buf = BytesMut::from(&b"1"[..]);
        buf.extend_from_slice(&[b'0'; MAX_LINE_BYTES + 1]);
        let mut framing = Framing::Chunked(Chunked::default());
        assert!(framing.decode(&mut buf, &mut Vec::new()).is_err());
    }

    #[test]
    fn bodies_by_length_and_to_the_close() {
        let (out, framing, rest) = decode_in_steps(Framing::Length(5), b"hello, again", 3);
        assert_eq!(out, b"hello");
        assert!(framing.is_done());
        assert_eq!(rest, b", again");
        let (out, mut framing, _) = decode_in_steps(Framing::UntilClose, b"all of it", 4);
        assert_eq!(out, b"all of it");
        assert!(!framing.is_done());
        framing.at_close().unwrap();
        assert!(framing.is_done());
        // A close before the announced end is a broken answer.
        assert!(Framing::Length(3).at_close().is_err());
        assert!(Framing::Chunked(Chunked::default()).at_close().is_err());
    }
}
