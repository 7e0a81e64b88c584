//! The common upstream chunk read without serde: one choice whose delta carries text (llama-server's
//! `{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"…"}}],"created":…,"id":"…",…}`), most of a
//! stream's events, and the last one's `timings`. serde_json spent ~6,000 instructions on each (every ignored
//! member scanned through its visitor machinery, the timings' floats parsed); this scanner a few hundred.
//! Anything it does not recognise exactly (another member, a duplicate, an escape in an ignored string, an
//! exponent, `usage`, tool calls, reasoning) is left to serde (`None`), so what a chunk means never depends
//! on which reader took it.

use std::borrow::Cow;

use super::json_write::special;
use super::openai::{ChatChunk, ChunkChoice, ChunkDelta, Timings};

/// Reads one stream's chunks. llama-server's text chunks differ only in their text (and, once a second,
/// in `created`): the bytes around the last scanned chunk's text are kept, and a chunk that starts and ends
/// with exactly those bytes is read by finding its text alone.
#[derive(Debug, Default)]
pub struct ChunkReader {
    /// Up to the text's opening quote, and from its closing quote on; empty before the first text chunk.
    prefix: String,
    suffix: String,
    finish_reason: Option<String>,
}

impl ChunkReader {
    /// The chunk, when `data` has exactly the text-delta shape; `None` sends it the general way.
    pub fn read(&mut self, data: &str) -> Option<ChatChunk> {
        if !self.prefix.is_empty()
            && let Some(text) = self.same_shape(data)
        {
            return Some(one_choice(
                Some(text.into_owned()),
                self.finish_reason.clone(),
            ));
        }
        let (chunk, text) = scan(data)?;
        if let Some((open, close)) = text {
            self.prefix.clear();
            self.prefix.push_str(&data[..open]);
            self.suffix.clear();
            self.suffix.push_str(&data[close..]);
            self.finish_reason = chunk.choices[0].finish_reason.clone();
        }
        Some(chunk)
    }

    /// The text of a chunk that is the kept one but for its text (whole: no quote or control character,
    /// no escape cut off, so the tokens around it are the kept chunk's).
    fn same_shape<'a>(&self, data: &'a str) -> Option<Cow<'a, str>> {
        let middle = data
            .strip_prefix(self.prefix.as_str())?
            .strip_suffix(self.suffix.as_str())?;
        let b = middle.as_bytes();
        let (mut i, mut escaped) = (0, false);
        loop {
            i = special(b, i);
            match b.get(i) {
                None if i == b.len() => break,
                Some(b'\\') => {
                    escaped = true;
                    i += 2;
                }
                _ => return None,
            }
        }
        if !escaped {
            return Some(Cow::Borrowed(middle));
        }
        // With its quotes, which end the prefix and start the suffix.
        let quoted = data.get(self.prefix.len() - 1..data.len() - self.suffix.len() + 1)?;
        serde_json::from_str::<String>(quoted).ok().map(Cow::Owned)
    }
}

fn one_choice(content: Option<String>, finish_reason: Option<String>) -> ChatChunk {
    ChatChunk {
        choices: vec![ChunkChoice {
            delta: Some(ChunkDelta {
                content,
                ..ChunkDelta::default()
            }),
            finish_reason,
        }],
        ..ChatChunk::default()
    }
}

/// The chunk, when `data` has exactly the text-delta shape (no state: see [`ChunkReader`]).
pub fn text_chunk(data: &str) -> Option<ChatChunk> {
    scan(data).map(|(chunk, _)| chunk)
}

/// The chunk, and where its text lies when it has one (after its opening quote, at its closing quote).
fn scan(data: &str) -> Option<(ChatChunk, Option<(usize, usize)>)> {
    let mut s = Scan {
        text: data,
        b: data.as_bytes(),
        i: 0,
        content: None,
    };
    s.eat(b'{')?;
    let mut choice = None;
    let mut timings = None;
    if s.peek()? != b'}' {
        loop {
            let key = s.key()?;
            match key {
                "choices" if choice.is_none() => choice = Some(s.choices()?),
                "timings" if timings.is_none() => timings = Some(s.timings()?),
                "created" | "id" | "model" | "system_fingerprint" | "object" => s.ignored()?,
                _ => return None,
            }
            if !s.comma_or(b'}')? {
                break;
            }
        }
    } else {
        s.i += 1;
    }
    s.ws();
    if s.i != s.b.len() {
        return None;
    }
    let chunk = ChatChunk {
        choices: vec![choice?],
        timings,
        ..ChatChunk::default()
    };
    Some((chunk, s.content))
}

struct Scan<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
    /// Where the delta's text lies.
    content: Option<(usize, usize)>,
}

impl<'a> Scan<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// After a member: `true` on `,` (another follows), `false` on `close`.
    fn comma_or(&mut self, close: u8) -> Option<bool> {
        match self.peek()? {
            b',' => {
                self.i += 1;
                Some(true)
            }
            c if c == close => {
                self.i += 1;
                Some(false)
            }
            _ => None,
        }
    }

    /// A member's name and its `:`; names with escapes are left to serde.
    fn key(&mut self) -> Option<&'a str> {
        let (k, escaped) = self.string()?;
        self.eat(b':')?;
        (!escaped).then_some(k)
    }

    /// The raw text between a string's quotes (`true` when it holds an escape); control characters and
    /// a missing end are left to serde.
    fn string(&mut self) -> Option<(&'a str, bool)> {
        self.eat(b'"')?;
        let start = self.i;
        let mut escaped = false;
        loop {
            self.i = special(self.b, self.i);
            match *self.b.get(self.i)? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    self.i += 2;
                }
                _ => return None, // a control character
            }
        }
        let raw = self.text.get(start..self.i)?;
        self.i += 1;
        Some((raw, escaped))
    }

    /// A string value, escapes decoded by serde_json itself.
    fn string_value(&mut self) -> Option<Cow<'a, str>> {
        let start = self.i;
        let (raw, escaped) = self.string()?;
        if !escaped {
            return Some(Cow::Borrowed(raw));
        }
        let quoted = self.text.get(start..self.i)?.trim_start();
        serde_json::from_str::<String>(quoted).ok().map(Cow::Owned)
    }

    fn null(&mut self) -> Option<()> {
        self.ws();
        let rest = self.b.get(self.i..)?;
        rest.starts_with(b"null").then(|| self.i += 4)
    }

    /// A JSON number (skipped).
    fn number(&mut self) -> Option<()> {
        self.ws();
        let start = self.i;
        let digits = |s: &mut Self| {
            let from = s.i;
            while s.b.get(s.i).is_some_and(u8::is_ascii_digit) {
                s.i += 1;
            }
            (s.i > from).then_some(())
        };
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        match self.b.get(self.i)? {
            b'0' => self.i += 1,
            b'1'..=b'9' => digits(self)?,
            _ => return None,
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            digits(self)?;
        }
        // An exponent can overflow (serde refuses 1e400): left to serde, like any very long number.
        if let Some(b'e' | b'E') = self.b.get(self.i) {
            return None;
        }
        (self.i - start <= 40).then_some(())
    }

    /// A `u64` member: digits (serde refuses a fraction, a sign or an overflow for one) or null.
    fn u64_or_null(&mut self) -> Option<Option<u64>> {
        if self.peek()? == b'n' {
            self.null()?;
            return Some(None);
        }
        let start = self.i;
        self.number()?;
        let digits = self.text.get(start..self.i)?;
        if digits.bytes().all(|c| c.is_ascii_digit()) {
            digits.parse().ok().map(Some)
        } else {
            None
        }
    }

    /// llama.cpp's `timings`: the three counts read, every other member a number (or string, or null).
    fn timings(&mut self) -> Option<Timings> {
        self.eat(b'{')?;
        let mut t = Timings::default();
        let (mut cache, mut prompt, mut predicted) = (false, false, false);
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(t);
        }
        loop {
            match self.key()? {
                "cache_n" if !cache => {
                    cache = true;
                    t.cache_n = self.u64_or_null()?;
                }
                "prompt_n" if !prompt => {
                    prompt = true;
                    t.prompt_n = self.u64_or_null()?;
                }
                "predicted_n" if !predicted => {
                    predicted = true;
                    t.predicted_n = self.u64_or_null()?;
                }
                "cache_n" | "prompt_n" | "predicted_n" => return None,
                _ => self.ignored()?,
            }
            if !self.comma_or(b'}')? {
                break;
            }
        }
        Some(t)
    }

    /// A member serde ignores: a string without escapes, a number or null.
    fn ignored(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => match self.string()? {
                (_, false) => Some(()),
                (_, true) => None,
            },
            b'n' => self.null(),
            _ => self.number(),
        }
    }

    /// `[ {choice} ]`, exactly one.
    fn choices(&mut self) -> Option<ChunkChoice> {
        self.eat(b'[')?;
        self.eat(b'{')?;
        let mut choice = ChunkChoice::default();
        let (mut delta, mut finish, mut index) = (false, false, false);
        if self.peek()? == b'}' {
            self.i += 1;
        } else {
            loop {
                match self.key()? {
                    "delta" if !delta => {
                        delta = true;
                        choice.delta = Some(self.delta()?);
                    }
                    "finish_reason" if !finish => {
                        finish = true;
                        if self.peek()? != b'n' {
                            choice.finish_reason = Some(self.string_value()?.into_owned());
                        } else {
                            self.null()?;
                        }
                    }
                    "index" if !index => {
                        index = true;
                        self.number()?;
                    }
                    _ => return None,
                }
                if !self.comma_or(b'}')? {
                    break;
                }
            }
        }
        self.eat(b']')?;
        Some(choice)
    }

    /// `{"content": "…" | null, "role": "…"}`, either member optional.
    fn delta(&mut self) -> Option<ChunkDelta> {
        self.eat(b'{')?;
        let mut delta = ChunkDelta::default();
        let (mut content, mut role) = (false, false);
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(delta);
        }
        loop {
            match self.key()? {
                "content" if !content => {
                    content = true;
                    if self.peek()? != b'n' {
                        let open = self.i + 1;
                        delta.content = Some(self.string_value()?.into_owned());
                        self.content = Some((open, self.i - 1));
                    } else {
                        self.null()?;
                    }
                }
                "role" if !role => {
                    role = true;
                    self.ignored()?;
                }
                _ => return None,
            }
            if !self.comma_or(b'}')? {
                break;
            }
        }
        Some(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serde(data: &str) -> Option<ChatChunk> {
        serde_json::from_str(data).ok()
    }

    /// Whatever the scanner takes, serde reads the same; what it leaves, serde still reads.
    fn same(data: &str) -> bool {
        let fast = text_chunk(data);
        if let Some(f) = &fast {
            let s = serde(data)
                .unwrap_or_else(|| panic!("serde refused what the scanner took: {data}"));
            assert_eq!(format!("{f:?}"), format!("{s:?}"), "{data}");
        }
        fast.is_some()
    }

    #[test]
    fn the_recorded_stream_reads_as_serde_reads_it() {
        let sse = include_str!("../../bench/recorded/chat-stream.sse");
        let mut taken = 0;
        for line in sse.lines() {
            if let Some(data) = line.strip_prefix("data: ")
                && data != "[DONE]"
                && same(data)
            {
                taken += 1;
            }
        }
        assert!(taken >= 10, "only {taken} chunks took the fast path");
    }

    #[test]
    fn text_chunks_with_escapes_whitespace_and_any_member_order() {
        for data in [
            r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"a\nb \"q\" \u00e9 \ud83d\ude00"}}],"created":1,"id":"x","model":"m","system_fingerprint":"f","object":"chat.completion.chunk"}"#,
            r#" { "id" : "x" , "object":"chat.completion.chunk","created":1795585243,"model":"m","choices":[ { "index":0 , "delta":{ "role":"assistant" , "content":"" } , "finish_reason":null } ] } "#,
            r#"{"choices":[{"delta":{"content":null},"finish_reason":"stop","index":0}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"st\u006fp"}]}"#,
            r#"{"choices":[{}]}"#,
            r#"{"choices":[{"delta":{"content":"é€ 😀"}}],"created":-1.5}"#,
            r#"{"choices":[{"delta":{}}],"timings":{"cache_n":36,"prompt_n":1,"prompt_ms":450.013,"predicted_n":12,"x":"y","z":null}}"#,
            r#"{"timings":{"cache_n":null},"choices":[{"delta":{}}]}"#,
            r#"{"choices":[{"delta":{}}],"timings":{}}"#,
            r#"{"choices":[{"delta":{}}],"timings":{"predicted_n":18446744073709551615}}"#,
        ] {
            assert!(same(data), "{data}");
        }
    }

    /// What the reader takes by the kept bytes, serde reads the same, text and finish_reason included.
    #[test]
    fn chunks_read_by_the_kept_shape_are_what_serde_reads() {
        let shape = |text: &str| {
            format!(
                r#"{{"choices":[{{"finish_reason":null,"index":0,"delta":{{"content":"{text}"}}}}],"created":1,"id":"x"}}"#
            )
        };
        let mut reader = ChunkReader::default();
        for text in [
            "first",
            "",
            "a b",
            r"\n",
            r#"\"q\""#,
            r"\u00e9\ud83d\ude00",
            "é€",
            r"\\",
        ] {
            let data = shape(text);
            let fast = reader.read(&data).unwrap_or_else(|| panic!("{data}"));
            let s: ChatChunk = serde_json::from_str(&data).unwrap();
            assert_eq!(format!("{fast:?}"), format!("{s:?}"), "{data}");
        }
        assert!(!reader.prefix.is_empty());
        // A text that would change the chunk's tokens is scanned whole (and here left to serde).
        for text in [r#"a","x":"b"#, r"a\", "a\tb", r"a\q"] {
            let data = shape(text);
            assert!(reader.same_shape(&data).is_none(), "{data}");
            if let Some(fast) = reader.read(&data) {
                let s: ChatChunk = serde_json::from_str(&data).unwrap();
                assert_eq!(format!("{fast:?}"), format!("{s:?}"), "{data}");
            }
        }
        // Another finish_reason, another shape: kept with it.
        let stop = r#"{"choices":[{"delta":{"content":"end"},"finish_reason":"stop"}]}"#;
        let again = r#"{"choices":[{"delta":{"content":"more"},"finish_reason":"stop"}]}"#;
        reader.read(stop).unwrap();
        let fast = reader.read(again).unwrap();
        assert!(reader.same_shape(again).is_some());
        let s: ChatChunk = serde_json::from_str(again).unwrap();
        assert_eq!(format!("{fast:?}"), format!("{s:?}"));
    }

    #[test]
    fn everything_else_is_left_to_serde() {
        for data in [
            r#"{"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":3}}"#,
            r#"{"choices":[{"delta":{"content":"a"}}],"created":1e400}"#,
            r#"{"choices":[{"delta":{"content":"a"}}],"created":1E2}"#,
            r#"{"choices":[{"delta":{}}],"timings":{"cache_n":3.0}}"#,
            r#"{"choices":[{"delta":{}}],"timings":{"cache_n":-3}}"#,
            r#"{"choices":[{"delta":{}}],"timings":{"cache_n":18446744073709551616}}"#,
            r#"{"choices":[{"delta":{}}],"timings":{"cache_n":1,"cache_n":2}}"#,
            r#"{"choices":[{"delta":{}}],"timings":{"prompt_ms":[1]}}"#,
            r#"{"choices":[{"delta":{}}],"timings":null}"#,
            r#"{"choices":[{"delta":{}}],"timings":{"cache_n":1},"timings":{}}"#,
            r#"{"choices":[{"delta":{"reasoning_content":"a"}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[]}}]}"#,
            r#"{"choices":[{"delta":{"content":"a"}},{"delta":{"content":"b"}}]}"#,
            r#"{"choices":[]}"#,
            r#"{"choices":[{"delta":{"content":"a","content":"b"}}]}"#,
            r#"{"choices":[{"delta":{"content":"a"}}],"choices":[]}"#,
            r#"{"choices":[{"delta":{"content":"a"}}],"error":null}"#,
            r#"{"choices":[{"delta":{"content":"a"}}],"id":"\n"}"#,
            r#"{"choices":[{"delta":{"content":"a"}}],"id":true}"#,
            r#"{"choices":[{"delta":{"content":"a"}}],"created":01}"#,
            r#"{"choices":[{"delta":{"content":"a"}}]} x"#,
            r#"{"choices":[{"delta":{"content":"a	b"}}]}"#,
            r#"{"choices":[{"delta":{"content":"a\qb"}}]}"#,
            r#"{"choices":[{"delta":{"content":"a"}}]"#,
            r#"{"choices":[{"delta":null}]}"#,
            r#"{"ch\u006fices":[{"delta":{"content":"a"}}]}"#,
            r#"{}"#,
            r#"{"error":{"message":"boom"}}"#,
            "",
        ] {
            assert!(!same(data), "{data}");
        }
    }
}
