//! Incremental parser for the upstream's Server-Sent Events byte stream (the WHATWG event-stream format).
//!
//! Network chunks split lines, CRLF pairs and multi-byte UTF-8 characters anywhere, so bytes are buffered
//! until a whole line is present and decoded only then. One event can be large (a tool call's arguments
//! arrive in one chunk from some servers) but never unbounded: a line longer than `max_line_bytes` is an
//! error rather than a way to exhaust memory.

/// Index of the first `\n` or `\r` in `buf[from..]`: event lines are long (a chunk's JSON), so this scan is
/// most of the parser's work, done by memchr's vector search.
fn find_line_break(buf: &[u8], from: usize) -> Option<usize> {
    let rest = buf.get(from..)?;
    memchr::memchr2(b'\n', b'\r', rest).map(|p| from + p)
}

/// One dispatched event: its `event:` name (none for the default "message" type) and its joined `data:` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an event-stream line is longer than {0} bytes")]
    LineTooLong(usize),
    #[error("the event stream is not valid UTF-8")]
    InvalidUtf8,
}

/// Largest line accepted by default: a whole tool call's arguments can arrive as one `data:` line.
pub const DEFAULT_MAX_LINE_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug)]
pub struct SseParser {
    buf: Vec<u8>,
    /// Where to resume the newline search in `buf`, so a long line is scanned once, not once per chunk.
    scanned: usize,
    /// A chunk ended on `\r`: a `\n` at the start of the next chunk belongs to the same line break.
    pending_cr: bool,
    event: Option<String>,
    data: String,
    has_data: bool,
    max_line_bytes: usize,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LINE_BYTES)
    }
}

impl SseParser {
    pub fn new(max_line_bytes: usize) -> Self {
        SseParser {
            buf: Vec::new(),
            scanned: 0,
            pending_cr: false,
            event: None,
            data: String::new(),
            has_data: false,
            max_line_bytes,
        }
    }

    /// Feeds one network chunk; returns the events it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut events = Vec::new();
        self.push_each(chunk, |event, data| {
            events.push(SseEvent {
                event: event.map(str::to_owned),
                data: data.to_owned(),
            });
        })?;
        Ok(events)
    }

    /// Feeds one network chunk and hands each event it completes, in order, to `f` (its `event:` name and
    /// its data), with no copy of a one-line event's data when the chunk holds it whole (the usual case:
    /// one upstream chunk per event). On an error `f` sees none of the chunk's events, as with [`push`].
    ///
    /// [`push`]: SseParser::push
    pub fn push_each(
        &mut self,
        chunk: &[u8],
        mut f: impl FnMut(Option<&str>, &str),
    ) -> Result<(), SseError> {
        let mut chunk = chunk;
        if self.pending_cr && !chunk.is_empty() {
            self.pending_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        if self.buf.is_empty() {
            // Nothing held back: the lines are read in the chunk itself, and only a partial last line kept.
            let consumed = self.lines(chunk, 0, &mut f)?;
            self.buf.extend_from_slice(&chunk[consumed..]);
        } else {
            // The buffer is taken out while its lines are handled, so they are read in place.
            let mut buf = std::mem::take(&mut self.buf);
            buf.extend_from_slice(chunk);
            let read = self.lines(&buf, self.scanned, &mut f);
            if let Ok(consumed) = read {
                buf.drain(..consumed);
            }
            self.buf = buf;
            read?;
        }
        self.scanned = self.buf.len();
        Ok(())
    }

    /// Handles the complete lines of `region` (whose bytes before `from` hold no line break) and returns
    /// how many bytes they took. The checks come first, so that an error dispatches nothing.
    fn lines(
        &mut self,
        region: &[u8],
        from: usize,
        f: &mut impl FnMut(Option<&str>, &str),
    ) -> Result<usize, SseError> {
        let consumed = memchr::memrchr2(b'\n', b'\r', &region[from..]).map_or(0, |p| from + p + 1);
        // Line breaks are ASCII, never inside a character: the lines are valid exactly when all of them are.
        let text = std::str::from_utf8(&region[..consumed]).map_err(|_| SseError::InvalidUtf8)?;
        if region.len() - consumed > self.max_line_bytes {
            return Err(SseError::LineTooLong(self.max_line_bytes));
        }
        let bytes = text.as_bytes();
        // The one data line of the event being read, while it needs no joining: not copied.
        let mut first: Option<&str> = None;
        let mut start = 0;
        let mut i = from.min(consumed);
        while let Some(line_end) = find_line_break(bytes, i) {
            let mut next = line_end + 1;
            if bytes[line_end] == b'\r' {
                if next < region.len() {
                    if region[next] == b'\n' {
                        next += 1;
                    }
                } else {
                    self.pending_cr = true;
                }
            }
            let line = &text[start..line_end];
            start = next;
            i = next;
            if line.is_empty() {
                let event = self.event.take();
                if self.has_data {
                    self.has_data = false;
                    let data = match first.take() {
                        Some(d) => d,
                        None => self.data.as_str(),
                    };
                    f(event.as_deref(), data);
                    self.data.clear();
                }
                continue;
            }
            if line.starts_with(':') {
                continue; // comment (keep-alive)
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "data" if !self.has_data => {
                    first = Some(value);
                    self.has_data = true;
                }
                "data" => {
                    if let Some(d) = first.take() {
                        self.data.push_str(d);
                    }
                    self.data.push('\n');
                    self.data.push_str(value);
                }
                "event" => self.event = Some(value.to_owned()),
                _ => {} // id, retry and unknown fields mean nothing to a proxy
            }
        }
        // The event goes on in the next chunk: its data is kept.
        if let Some(d) = first {
            self.data.push_str(d);
        }
        Ok(consumed)
    }

    /// Ends the stream: a final event without its blank line is still dispatched (servers that close right
    /// after their last `data:` line exist), a half line is dropped as the spec says.
    pub fn finish(&mut self) -> Option<SseEvent> {
        self.buf.clear();
        self.scanned = 0;
        self.dispatch()
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        if !self.has_data {
            return None;
        }
        self.has_data = false;
        Some(SseEvent {
            event,
            data: std::mem::take(&mut self.data),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(parser: &mut SseParser, chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend(parser.push(c).unwrap());
        }
        out.extend(parser.finish());
        out
    }

    fn data(d: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: d.to_string(),
        }
    }

    const STREAM: &str =
        "data: {\"a\":1}\n\n: keep-alive\n\nevent: error\ndata: {\"b\":\"é€\"}\n\ndata: [DONE]\n\n";

    #[test]
    fn line_breaks_are_found_at_every_offset() {
        for len in 0..40 {
            for at in 0..len {
                for brk in [b'\n', b'\r'] {
                    let mut buf = vec![b'x'; len];
                    buf[at] = brk;
                    for from in 0..=at {
                        assert_eq!(find_line_break(&buf, from), Some(at), "{len} {at} {from}");
                    }
                    assert_eq!(find_line_break(&buf, at + 1), None);
                }
            }
            assert_eq!(
                find_line_break(&vec![0x8a; len], 0),
                None,
                "high bytes are not line breaks"
            );
        }
    }

    #[test]
    fn whole_stream_in_one_chunk() {
        let mut p = SseParser::default();
        let evs = all(&mut p, &[STREAM.as_bytes()]);
        assert_eq!(
            evs,
            vec![
                data("{\"a\":1}"),
                SseEvent {
                    event: Some("error".into()),
                    data: "{\"b\":\"é€\"}".into()
                },
                data("[DONE]"),
            ]
        );
    }

    #[test]
    fn split_at_every_byte_boundary_gives_the_same_events() {
        let bytes = STREAM.as_bytes();
        let expected = all(&mut SseParser::default(), &[bytes]);
        for cut in 0..=bytes.len() {
            let mut p = SseParser::default();
            let evs = all(&mut p, &[&bytes[..cut], &bytes[cut..]]);
            assert_eq!(evs, expected, "cut at {cut}");
        }
        // One byte at a time, the worst case for UTF-8 and CRLF handling.
        let mut p = SseParser::default();
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(all(&mut p, &singles), expected);
    }

    #[test]
    fn crlf_and_lone_cr_line_endings() {
        let crlf = STREAM.replace('\n', "\r\n");
        let cr = STREAM.replace('\n', "\r");
        let expected = all(&mut SseParser::default(), &[STREAM.as_bytes()]);
        for text in [crlf, cr] {
            let bytes = text.as_bytes();
            for cut in 0..=bytes.len() {
                let mut p = SseParser::default();
                assert_eq!(
                    all(&mut p, &[&bytes[..cut], &bytes[cut..]]),
                    expected,
                    "{text:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn multi_line_data_is_joined_with_newlines() {
        let mut p = SseParser::default();
        let evs = all(&mut p, &[b"data: one\ndata:two\ndata\n\n"]);
        assert_eq!(evs, vec![data("one\ntwo\n")]);
    }

    #[test]
    fn comments_and_unknown_fields_produce_nothing() {
        let mut p = SseParser::default();
        let evs = all(&mut p, &[b": ping\n\nid: 7\nretry: 10\n\n:\n\n"]);
        assert!(evs.is_empty());
    }

    #[test]
    fn last_event_without_blank_line_is_dispatched_on_finish() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: tail").unwrap().is_empty());
        assert!(p.push(b"\n").unwrap().is_empty());
        assert_eq!(p.finish(), Some(data("tail")));
    }

    #[test]
    fn overlong_line_is_an_error_not_unbounded_memory() {
        let mut p = SseParser::new(16);
        assert_eq!(p.push(&[b'x'; 17]).unwrap_err(), SseError::LineTooLong(16));
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let mut p = SseParser::default();
        assert_eq!(
            p.push(b"data: \xff\xfe\n\n").unwrap_err(),
            SseError::InvalidUtf8
        );
    }
}
