//! The few JSON pieces written by hand on the streaming path, byte for byte what serde_json writes for them.
//! A text delta is most of every stream (one event per token); written through serde's derive (an internally
//! tagged enum is a map serializer with a `type` entry, each member a trait call), it cost ~3k instructions per
//! event, which made a Responses stream 28% dearer than a Messages one (callgrind, 2026-12-07).

/// `s` as a JSON string: copied as is when nothing in it needs escaping (the usual token), else serde_json's
/// own escaping, so the bytes are the same either way.
pub fn string(out: &mut Vec<u8>, s: &str) {
    if special(s.as_bytes(), 0) == s.len() {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// Index of the first `"`, `\\` or control character in `b[from..]` (`b.len()` when none): what JSON escapes
/// inside a string. Eight bytes at a time: strings are most of the bytes both chunk_scan reads and this module
/// writes.
pub fn special(b: &[u8], from: usize) -> usize {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // Bit 7 of each byte is set where the byte is below `n` (n <= 0x80), exact up to the first one.
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS;
    let mut i = from;
    while let Some(eight) = b.get(i..i + 8) {
        let word = u64::from_le_bytes(eight.try_into().expect("eight bytes"));
        let found = below(word ^ (ONES * u64::from(b'"')), 1)
            | below(word ^ (ONES * u64::from(b'\\')), 1)
            | below(word, 0x20);
        if found != 0 {
            return i + found.trailing_zeros() as usize / 8;
        }
        i += 8;
    }
    let rest = b.get(i..).unwrap_or_default();
    i + rest
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .unwrap_or(rest.len())
}

/// An unsigned integer in decimal.
pub fn uint(out: &mut Vec<u8>, n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// A JSON object written member by member, for the objects every streamed response carries several of:
/// serde_json escapes each member's name byte by byte (~150 instructions a name), and a Responses stream has
/// ~140 of them. Names are the caller's literals, which need no escaping.
pub struct Object<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Object<'a> {
    /// A new object: `{`.
    pub fn open(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Object { out, first: true }
    }

    /// An object whose `{` and first members are already written (an event's head).
    pub fn resume(out: &'a mut Vec<u8>) -> Self {
        Object { out, first: false }
    }

    /// `,"name":`, and the buffer to write the member's value into.
    pub fn name(&mut self, name: &str) -> &mut Vec<u8> {
        debug_assert!(
            special(name.as_bytes(), 0) == name.len(),
            "{name:?} needs escaping"
        );
        if !std::mem::take(&mut self.first) {
            self.out.push(b',');
        }
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    pub fn str(&mut self, name: &str, value: &str) -> &mut Self {
        string(self.name(name), value);
        self
    }

    pub fn uint(&mut self, name: &str, value: u64) -> &mut Self {
        uint(self.name(name), value);
        self
    }

    /// A value given as its JSON text: `null`, `false`, `[]`.
    pub fn raw(&mut self, name: &str, json: &str) -> &mut Self {
        self.name(name).extend_from_slice(json.as_bytes());
        self
    }

    /// Any other value, through serde.
    pub fn serde<T: serde::Serialize + ?Sized>(&mut self, name: &str, value: &T) -> &mut Self {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *self.name(name), value);
        self
    }

    /// `}`.
    pub fn close(&mut self) {
        self.out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_what_serde_json_writes() {
        for s in [
            "",
            "plain token",
            " with \"quotes\"",
            "back\\slash",
            "line\nbreak\ttab\r",
            "\u{0}\u{1f}\u{7f}",
            "é ü 日本 🦀",
            "</script>",
        ] {
            let mut ours = Vec::new();
            string(&mut ours, s);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(s).unwrap(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn objects_are_what_serde_json_writes() {
        let mut ours = Vec::new();
        let mut o = Object::open(&mut ours);
        o.str("id", "a\"b").uint("n", 42).raw("error", "null");
        o.serde("list", &[1, 2]);
        o.name("nested");
        Object::open(&mut ours).str("x", "y").close();
        Object::resume(&mut ours).raw("empty", "[]").close();
        let want = serde_json::json!({"id": "a\"b", "n": 42, "error": null, "list": [1, 2],
                                      "nested": {"x": "y"}, "empty": []});
        assert_eq!(String::from_utf8(ours).unwrap(), want.to_string());
    }

    #[test]
    fn special_bytes_are_found_at_every_offset() {
        for len in 0..40 {
            for at in 0..len {
                for c in [b'"', b'\\', 0, 0x1f, b'\n'] {
                    let mut b = vec![b'x'; len];
                    b[at] = c;
                    for from in 0..=at {
                        assert_eq!(special(&b, from), at, "{len} {at} {from} {c}");
                    }
                    assert_eq!(special(&b, at + 1), len);
                }
            }
            for c in [b' ', 0x7f, 0x80, 0xff, b'!', b'#', b'[', b']'] {
                assert_eq!(special(&vec![c; len], 0), len, "{c}");
            }
        }
    }

    #[test]
    fn integers_are_decimal() {
        for n in [0u64, 7, 10, 99, 1234567890, u64::MAX] {
            let mut ours = Vec::new();
            uint(&mut ours, n);
            assert_eq!(String::from_utf8(ours).unwrap(), n.to_string());
        }
    }
}
