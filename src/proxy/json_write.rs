//! The few JSON pieces written by hand on the streaming path, byte for byte what serde_json writes for them.
//! A text delta is most of every stream (one event per token); written through serde's derive (an internally
//! tagged enum is a map serializer with a `type` entry, each member a trait call), it cost ~3k instructions per
//! event, which made a Responses stream 28% dearer than a Messages one (callgrind, 2026-12-07).

/// `s` as a JSON string: copied as is when nothing in it needs escaping (the usual token), else serde_json's
/// own escaping, so the bytes are the same either way.
pub fn string(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
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
    fn integers_are_decimal() {
        for n in [0u64, 7, 10, 99, 1234567890, u64::MAX] {
            let mut ours = Vec::new();
            uint(&mut ours, n);
            assert_eq!(String::from_utf8(ours).unwrap(), n.to_string());
        }
    }
}
