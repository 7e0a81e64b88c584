//! Where a model comes from (a local file, a URL, a Hugging Face `owner/repo/file` shorthand), and
//! reading its GGUF header from there: a local file is read up to the end of the header; a remote one
//! through HTTP range requests for growing prefixes, never the whole file.

use std::fs::File;
use std::io::{BufReader, Cursor};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, RANGE};

use super::gguf::{self, Header};

/// First prefix fetched for a remote header; it grows ×4 per round (most headers without a big
/// vocabulary fit in 1 MiB; a 262k-token vocabulary with merges needs ~10-20 MiB).
const FIRST_PREFIX: u64 = 1 << 20;
/// Beyond this, a "header" is not one.
const MAX_REMOTE_HEADER: u64 = 256 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Local(PathBuf),
    Remote(String),
}

impl Source {
    /// `http(s)://...` and `hf:owner/repo/file` are remote; so is a bare `owner/repo[@revision]/file` (the form
    /// `init` writes and `model fetch` takes) that is not a local file. Anything else is a local path.
    pub fn parse(arg: &str) -> Result<Source> {
        if arg.starts_with("http://") || arg.starts_with("https://") {
            return Ok(Source::Remote(arg.to_string()));
        }
        if let Some(rest) = arg
            .strip_prefix("hf://")
            .or_else(|| arg.strip_prefix("hf:"))
        {
            return Ok(Source::Remote(hf_resolve_url(rest)?));
        }
        if is_bare_hf(arg) {
            return Ok(Source::Remote(hf_resolve_url(arg)?));
        }
        Ok(Source::Local(PathBuf::from(arg)))
    }

    /// For `model fetch`, where the source must be remote: a bare `owner/repo/file` is Hugging Face.
    pub fn parse_remote(arg: &str) -> Result<String> {
        match Source::parse(arg)? {
            Source::Remote(url) => Ok(url),
            Source::Local(_) => hf_resolve_url(arg),
        }
    }
}

/// Whether `arg` reads as `owner/repo[@revision]/file` rather than a path: not a file or directory here, not
/// absolute or explicitly relative (`/`, `./`, `../`, `~`), three parts or more, and valid as a Hugging Face file.
pub fn is_bare_hf(arg: &str) -> bool {
    !Path::new(arg).exists()
        && !arg.starts_with(['/', '.', '~', '\\'])
        && arg.split('/').count() >= 3
        && hf_resolve_url(arg).is_ok()
}

/// `owner/repo[@revision]/path/to/file.gguf` → `https://huggingface.co/owner/repo/resolve/<revision|main>/path/to/file.gguf`.
pub fn hf_resolve_url(spec: &str) -> Result<String> {
    let mut parts = spec.splitn(3, '/');
    let (owner, repo, path) = match (parts.next(), parts.next(), parts.next()) {
        (Some(o), Some(r), Some(p)) if !o.is_empty() && !r.is_empty() && !p.is_empty() => (o, r, p),
        _ => bail!(
            "`{spec}` is not a URL or a Hugging Face file: write `https://...`, or `owner/repo/file.gguf` \
             (optionally `owner/repo@revision/file.gguf`)"
        ),
    };
    let (repo, revision) = match repo.split_once('@') {
        Some((r, rev)) if !r.is_empty() && !rev.is_empty() => (r, rev),
        Some(_) => bail!("`{spec}`: an empty repository name or revision around `@`"),
        None => (repo, "main"),
    };
    if path.split('/').any(|seg| seg.is_empty() || seg == "..") {
        bail!("`{spec}`: the file path has an empty or `..` segment");
    }
    let path: Vec<String> = path.split('/').map(percent_encode).collect();
    Ok(format!(
        "https://huggingface.co/{}/{}/resolve/{}/{}",
        percent_encode(owner),
        percent_encode(repo),
        percent_encode(revision),
        path.join("/")
    ))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A header and, when known, the size of the whole file.
#[derive(Debug)]
pub struct Located {
    pub header: Header,
    pub file_size: Option<u64>,
}

pub fn read_local(path: &Path) -> Result<Located> {
    let file =
        File::open(path).with_context(|| format!("cannot open model file {}", path.display()))?;
    let size = file.metadata().ok().map(|m| m.len());
    let header = gguf::read_header(BufReader::new(file))
        .with_context(|| format!("{} is not a usable GGUF file", path.display()))?;
    Ok(Located {
        header,
        file_size: size,
    })
}

/// Reads the header of a remote file with range requests: 1 MiB first, then ×4 until it parses.
pub async fn read_remote(client: &reqwest::Client, url: &str) -> Result<Located> {
    let mut bytes: Vec<u8> = Vec::new();
    let mut want = FIRST_PREFIX;
    let mut total: Option<u64> = None;
    loop {
        let start = bytes.len() as u64;
        let (chunk, file_size) = fetch_range(client, url, start, want - 1).await?;
        total = file_size.or(total);
        let got_all_asked = chunk.len() as u64 == want - start;
        bytes.extend_from_slice(&chunk);
        match gguf::read_header(Cursor::new(&bytes)) {
            Ok(header) => {
                return Ok(Located {
                    header,
                    file_size: total,
                });
            }
            Err(e) if e.is_truncated() && got_all_asked && want < MAX_REMOTE_HEADER => {
                tracing::debug!(
                    url,
                    have = bytes.len(),
                    "header longer than the prefix; fetching more"
                );
                want = (want * 4).min(MAX_REMOTE_HEADER);
            }
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("{url} is not a usable GGUF file"))
                );
            }
        }
    }
}

/// `GET` bytes `start..=end`; the server must answer 206 with a matching `Content-Range`.
async fn fetch_range(
    client: &reqwest::Client,
    url: &str,
    start: u64,
    end: u64,
) -> Result<(Vec<u8>, Option<u64>)> {
    let resp = client
        .get(url)
        .header(RANGE, format!("bytes={start}-{end}"))
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    if status == StatusCode::OK {
        bail!(
            "{url} does not support HTTP range requests (it answered 200 with the whole file to a Range \
             request), so its header cannot be read without downloading everything; download it with \
             `llmctl model fetch` and inspect the local file"
        );
    }
    if status == StatusCode::RANGE_NOT_SATISFIABLE {
        bail!("{url} is shorter than a GGUF header ({start} bytes): it is not a model file");
    }
    if status != StatusCode::PARTIAL_CONTENT {
        bail!("{url} answered HTTP {status} to a range request; check the URL");
    }
    let range = resp
        .headers()
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_content_range);
    let total = match range {
        Some((s, _, total)) if s == start => total,
        _ => bail!(
            "{url} answered 206 without a Content-Range starting at byte {start}; cannot trust the bytes"
        ),
    };
    let body = resp
        .bytes()
        .await
        .with_context(|| format!("reading bytes {start}-{end} of {url}"))?;
    Ok((body.to_vec(), total))
}

/// `bytes 0-99/1234` → (0, 99, Some(1234)); `bytes 0-99/*` → total None.
pub fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (s, e) = range.split_once('-')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    Some((s.parse().ok()?, e.parse().ok()?, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_shorthand() {
        assert_eq!(
            hf_resolve_url("unsloth/gemma-4-26B-it-GGUF/gemma-4-26B-A4B-it-UD-Q4_K_XL.gguf")
                .unwrap(),
            "https://huggingface.co/unsloth/gemma-4-26B-it-GGUF/resolve/main/gemma-4-26B-A4B-it-UD-Q4_K_XL.gguf"
        );
        assert_eq!(
            hf_resolve_url("owner/repo@v1.0/sub dir/f+1.gguf").unwrap(),
            "https://huggingface.co/owner/repo/resolve/v1.0/sub%20dir/f%2B1.gguf"
        );
        assert_eq!(
            Source::parse("hf:a/b/c.gguf").unwrap(),
            Source::Remote("https://huggingface.co/a/b/resolve/main/c.gguf".into())
        );
        assert_eq!(
            Source::parse("models/x.gguf").unwrap(),
            Source::Local("models/x.gguf".into())
        );
        assert_eq!(
            Source::parse_remote("a/b/c.gguf").unwrap(),
            "https://huggingface.co/a/b/resolve/main/c.gguf"
        );
        for bad in ["a/b", "a//c.gguf", "a/b/../x", "a/@/x", "x.gguf"] {
            assert!(hf_resolve_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bare_hugging_face_file_is_remote_unless_it_is_a_local_file() {
        // The form `init` writes into [model].source and `model fetch` takes.
        assert_eq!(
            Source::parse("unsloth/gemma-4-26B-it-GGUF/gemma-4-26B-A4B-it-UD-Q4_K_XL.gguf").unwrap(),
            Source::Remote(
                "https://huggingface.co/unsloth/gemma-4-26B-it-GGUF/resolve/main/gemma-4-26B-A4B-it-UD-Q4_K_XL.gguf"
                    .into()
            )
        );
        assert_eq!(
            Source::parse("owner/repo@v2/sub/f.gguf").unwrap(),
            Source::Remote("https://huggingface.co/owner/repo/resolve/v2/sub/f.gguf".into())
        );
        // A file that exists (here a relative `dir/b/c.gguf`), absolute or explicitly relative paths, and
        // two-part paths stay local.
        let dir = tempfile::Builder::new()
            .prefix("source-test-")
            .tempdir_in(".")
            .unwrap();
        let name = dir
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        std::fs::create_dir_all(dir.path().join("b")).unwrap();
        std::fs::write(dir.path().join("b/c.gguf"), b"GGUF").unwrap();
        let rel = format!("{name}/b/c.gguf");
        assert_eq!(
            Source::parse(&rel).unwrap(),
            Source::Local(rel.clone().into())
        );
        for local in [
            "/mnt/models/x/y.gguf",
            "./a/b/c.gguf",
            "../a/b/c.gguf",
            "~/a/b.gguf",
            "models/x.gguf",
        ] {
            assert_eq!(
                Source::parse(local).unwrap(),
                Source::Local(local.into()),
                "{local}"
            );
        }
    }

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 0-99/1234"),
            Some((0, 99, Some(1234)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes */1234"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }
}
