//! Host key verification against an OpenSSH `known_hosts` file. libssh2 does the matching (plain, hashed
//! `|1|salt|hash` and `[host]:port` entries); this module adds what a user needs to decide: the key type,
//! the OpenSSH-style `SHA256:` fingerprint, the line number of a conflicting entry, and the line to append.

use std::path::Path;

use sha2::{Digest, Sha256};
use ssh2::{CheckResult, KnownHostFileKind};

/// Standard base64 (RFC 4648) with or without `=` padding.
pub fn base64(data: &[u8], pad: bool) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..4 {
            if i < chars {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// `SHA256:<base64 without padding>` of the raw public key blob, as `ssh-keygen -lf` prints it.
pub fn fingerprint_sha256(key_blob: &[u8]) -> String {
    format!("SHA256:{}", base64(&Sha256::digest(key_blob), false))
}

/// The algorithm name stored at the start of an SSH public key blob (`ssh-ed25519`, `ecdsa-sha2-nistp256`).
pub fn key_type_name(key_blob: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(key_blob.get(..4)?.try_into().ok()?) as usize;
    let name = key_blob.get(4..4 + len)?;
    String::from_utf8(name.to_vec()).ok()
}

/// The short name OpenSSH uses in prompts: `ED25519`, `ECDSA`, `RSA`.
pub fn key_type_label(type_name: &str) -> &'static str {
    match type_name {
        "ssh-ed25519" => "ED25519",
        t if t.starts_with("ecdsa-") => "ECDSA",
        "ssh-rsa" => "RSA",
        "ssh-dss" => "DSA",
        _ => "UNKNOWN",
    }
}

/// The known_hosts host field: `host` on port 22, `[host]:port` elsewhere (OpenSSH's rule).
pub fn host_field(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// The line to append to known_hosts when the user accepts a new key.
pub fn entry_line(host: &str, port: u16, key_blob: &[u8]) -> Option<String> {
    let kind = key_type_name(key_blob)?;
    Some(format!(
        "{} {} {}",
        host_field(host, port),
        kind,
        base64(key_blob, true)
    ))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Known,
    Unknown,
    /// The host is listed with a different key; `line` is the 1-based line of the conflicting entry.
    Changed {
        line: Option<usize>,
    },
}

/// Checks `key_blob` for `host:port` against the known_hosts text.
pub fn check(text: &str, host: &str, port: u16, key_blob: &[u8]) -> Result<Verdict, String> {
    let session = ssh2::Session::new().map_err(|e| format!("libssh2: {e}"))?;
    let mut kh = session.known_hosts().map_err(|e| format!("libssh2: {e}"))?;
    // Lines libssh2 cannot parse (e.g. @cert-authority markers) are skipped, as OpenSSH would not match them here.
    for line in text.lines() {
        let _ = kh.read_str(line, KnownHostFileKind::OpenSSH);
    }
    Ok(match kh.check_port(host, port, key_blob) {
        CheckResult::Match => Verdict::Known,
        CheckResult::NotFound => Verdict::Unknown,
        CheckResult::Mismatch => Verdict::Changed {
            line: conflicting_line(text, host, port, key_blob),
        },
        CheckResult::Failure => return Err("libssh2 could not check the host key".into()),
    })
}

/// Finds the entry that conflicts, by checking each line on its own (libssh2 reports no line numbers).
fn conflicting_line(text: &str, host: &str, port: u16, key_blob: &[u8]) -> Option<usize> {
    let session = ssh2::Session::new().ok()?;
    for (idx, line) in text.lines().enumerate() {
        let Ok(mut kh) = session.known_hosts() else {
            return None;
        };
        if kh.read_str(line, KnownHostFileKind::OpenSSH).is_err() {
            continue;
        }
        if matches!(kh.check_port(host, port, key_blob), CheckResult::Mismatch) {
            return Some(idx + 1);
        }
    }
    None
}

/// Appends an accepted key, creating the file (0600) and its directory (0700) when missing.
pub fn append(path: &Path, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let existing = std::fs::read(path).unwrap_or_default();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    if !existing.is_empty() && !existing.ends_with(b"\n") {
        f.write_all(b"\n")?;
    }
    writeln!(f, "{line}")
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real ed25519 public key blob (from `ssh-keygen -t ed25519`), and what `ssh-keygen -lf` prints for it.
    const PUB_B64: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIHdXKqNKGQ3UAGcvJv6ouTRRQBtmZxaTAjUIJJrgILAr";

    fn decode(s: &str) -> Vec<u8> {
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut bits = 0u32;
        let mut nbits = 0;
        let mut out = Vec::new();
        for c in s.bytes().filter(|&c| c != b'=') {
            let v = alphabet.iter().position(|&a| a == c).unwrap() as u32;
            bits = (bits << 6) | v;
            nbits += 6;
            if nbits >= 8 {
                nbits -= 8;
                out.push((bits >> nbits) as u8);
            }
        }
        out
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        assert_eq!(base64(b"", true), "");
        assert_eq!(base64(b"f", true), "Zg==");
        assert_eq!(base64(b"fo", true), "Zm8=");
        assert_eq!(base64(b"foo", true), "Zm9v");
        assert_eq!(base64(b"foob", false), "Zm9vYg");
        assert_eq!(base64(b"fooba", true), "Zm9vYmE=");
        let blob = decode(PUB_B64);
        assert_eq!(base64(&blob, true), PUB_B64);
    }

    #[test]
    fn fingerprint_has_openssh_shape() {
        let blob = decode(PUB_B64);
        let fp = fingerprint_sha256(&blob);
        assert!(fp.starts_with("SHA256:"));
        assert_eq!(
            fp.len(),
            7 + 43,
            "32 bytes -> 43 base64 chars without padding"
        );
        assert!(!fp.ends_with('='));
        assert_eq!(key_type_name(&blob).as_deref(), Some("ssh-ed25519"));
        assert_eq!(key_type_label("ssh-ed25519"), "ED25519");
    }

    #[test]
    fn entry_lines_and_checks() {
        let blob = decode(PUB_B64);
        assert_eq!(host_field("10.0.0.2", 22), "10.0.0.2");
        assert_eq!(host_field("10.0.0.2", 2222), "[10.0.0.2]:2222");
        let line = entry_line("10.0.0.2", 2222, &blob).unwrap();
        assert_eq!(line, format!("[10.0.0.2]:2222 ssh-ed25519 {PUB_B64}"));
        let text = format!("# comment\nother ssh-ed25519 {PUB_B64}\n{line}\n");
        assert_eq!(
            check(&text, "10.0.0.2", 2222, &blob).unwrap(),
            Verdict::Known
        );
        assert_eq!(
            check(&text, "10.0.0.2", 22, &blob).unwrap(),
            Verdict::Unknown
        );
        let mut other = blob.clone();
        let last = other.len() - 1;
        other[last] ^= 1;
        assert_eq!(
            check(&text, "10.0.0.2", 2222, &other).unwrap(),
            Verdict::Changed { line: Some(3) }
        );
    }
}
