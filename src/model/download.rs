//! A resumable, verified download: stream to `<dest>.partial`, resume it with `Range: bytes=N-` (only when
//! the server proves it honoured the range: 206 + a `Content-Range` starting at N), retry connection errors
//! and 5xx with exponential backoff, verify the sha256 of the whole file (the resumed prefix included), then
//! fsync and rename atomically to `dest`. A partial or corrupt file never appears under `dest`.
//!
//! Beside the partial file, `<dest>.partial.source` records what it is a part of (URL, expected sha256, size):
//! a partial is resumed only for the same URL and sha256, and restarted when the server's size differs from
//! the recorded one (the file changed upstream) or when there is no record (its origin is unknown, which
//! without a sha256 could never be caught afterwards). A `dest` that is a directory is refused before any
//! request, and a host name that does not resolve fails at once (connection errors are retried).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, RANGE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::source::parse_content_range;

#[derive(Debug, Clone)]
pub struct FetchRequest {
    pub url: String,
    /// Expected sha256, 64 hex digits (any case). `None`: not verified (a source archive without a published
    /// hash); the download is still resumable and atomic, and an existing `dest` counts as complete.
    pub sha256: Option<String>,
    pub dest: PathBuf,
}

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all (the first included).
    pub attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 8,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutcome {
    /// `dest` already had the expected sha256; nothing was downloaded.
    AlreadyPresent,
    Downloaded {
        bytes: u64,
        /// Bytes kept from an earlier partial download (0: started from scratch).
        resumed_from: u64,
        /// Times the transfer was interrupted and resumed or restarted.
        retries: u32,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "--sha256 must be 64 hexadecimal digits (the file's SHA-256, e.g. from its Hugging Face page); got `{0}`"
    )]
    BadHash(String),
    #[error(
        "sha256 mismatch for {url}: expected {expected}, got {actual}; the download was deleted. Check the \
         --sha256 value and the URL (a wrong file, or the file changed upstream)"
    )]
    Mismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{url} answered HTTP {status}; {hint}")]
    Http {
        url: String,
        status: StatusCode,
        hint: &'static str,
    },
    #[error("gave up on {url} after {attempts} attempts; last error: {last}")]
    GaveUp {
        url: String,
        attempts: u32,
        last: String,
    },
    #[error(
        "--dest {} is a directory; give the path of the file in it, e.g. --dest {} (the name is not guessed: \
         provision and llama-server read the model from exactly the path in [model].dest)",
        dest.display(),
        suggestion.display()
    )]
    DestIsDir { dest: PathBuf, suggestion: PathBuf },
    #[error(
        "cannot resolve the host name {host} of {url}: {detail}; check the URL's spelling and this machine's DNS \
         (not retried: a name that does not resolve does not start resolving by waiting)"
    )]
    Resolve {
        url: String,
        host: String,
        detail: String,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> FetchError + 'a {
    move |source| FetchError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Progress of a download, reported by `fetch`; the CLI draws it, provision may log it or ignore it.
pub trait Progress: Send + Sync {
    /// A transfer (re)starts: `total` bytes if known, `done` already on disk.
    fn begin(&self, total: Option<u64>, done: u64);
    fn advance(&self, bytes: u64);
    fn note(&self, message: &str);
    fn finish(&self);
}

/// No output.
pub struct Silent;

impl Progress for Silent {
    fn begin(&self, _: Option<u64>, _: u64) {}
    fn advance(&self, _: u64) {}
    fn note(&self, message: &str) {
        tracing::info!("{message}");
    }
    fn finish(&self) {}
}

/// `<dest>.partial`, beside `dest` so the final rename stays on one filesystem (atomic).
pub fn partial_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    dest.with_file_name(name)
}

/// `<dest>.partial.source`: what the partial file is a part of.
pub fn record_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".partial.source");
    dest.with_file_name(name)
}

/// The identity of the file a `.partial` is a part of, kept beside it as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRecord {
    pub url: String,
    /// The expected sha256 (lowercase), when one was given.
    pub sha256: Option<String>,
    /// The whole file's size, once a server said it.
    pub size: Option<u64>,
}

fn read_record(path: &Path) -> Option<SourceRecord> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

fn write_record(path: &Path, record: &SourceRecord) -> Result<(), FetchError> {
    let json = serde_json::to_vec(record).unwrap_or_default();
    fs::write(path, json).map_err(io_err("cannot write", path))
}

/// The last path segment of a URL (`.../resolve/main/f.gguf?download=1` → `f.gguf`), for a suggested `--dest`.
fn url_file_name(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    match path.rsplit('/').next() {
        Some(name) if !name.is_empty() && !path.ends_with("//") && path.contains('/') => {
            name.to_string()
        }
        _ => "model.gguf".to_string(),
    }
}

/// A directory, or a path written as one (`/mnt/models/`).
fn is_directory(dest: &Path) -> bool {
    dest.is_dir() || dest.as_os_str().to_string_lossy().ends_with('/')
}

fn normalize_hash(h: &str) -> Result<String, FetchError> {
    let h = h.trim();
    if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(h.to_ascii_lowercase())
    } else {
        Err(FetchError::BadHash(h.to_string()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hashes a whole file; returns the hasher (so a download can continue it) and the length.
fn hash_file(path: &Path) -> Result<(Sha256, u64), FetchError> {
    let mut f = File::open(path).map_err(io_err("cannot read", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err("cannot read", path))?;
        if n == 0 {
            return Ok((hasher, len));
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
}

async fn hash_file_async(path: PathBuf) -> Result<(Sha256, u64), FetchError> {
    let p = path.clone();
    tokio::task::spawn_blocking(move || hash_file(&p))
        .await
        .unwrap_or_else(|e| {
            Err(FetchError::Io {
                what: "hashing failed for",
                path,
                source: std::io::Error::other(e.to_string()),
            })
        })
}

/// What went wrong in one attempt: worth retrying, or not.
enum Attempt {
    Retry(String),
    Fatal(FetchError),
}

/// Where the partial file stands: bytes written and their running hash, and what it is a part of.
struct Partial {
    path: PathBuf,
    file: File,
    len: u64,
    hasher: Sha256,
    record: SourceRecord,
    record_path: PathBuf,
    /// Bytes of an earlier run kept in the file (0 once restarted).
    resumed_from: u64,
}

impl Partial {
    fn open(
        path: &Path,
        hasher: Sha256,
        len: u64,
        record: SourceRecord,
        record_path: PathBuf,
    ) -> Result<Partial, FetchError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err("cannot write", path))?;
        write_record(&record_path, &record)?;
        Ok(Partial {
            path: path.to_path_buf(),
            file,
            len,
            hasher,
            record,
            record_path,
            resumed_from: len,
        })
    }

    fn restart(&mut self) -> Result<(), FetchError> {
        self.file
            .set_len(0)
            .map_err(io_err("cannot truncate", &self.path))?;
        self.len = 0;
        self.hasher = Sha256::new();
        self.resumed_from = 0;
        Ok(())
    }

    /// The server says the whole file is `total` bytes: recorded; `Err(recorded)` when bytes are kept from a
    /// file of another size.
    fn learn_size(&mut self, total: u64) -> Result<Result<(), u64>, FetchError> {
        if let Some(recorded) = self.record.size
            && recorded != total
            && self.len > 0
        {
            return Ok(Err(recorded));
        }
        if self.record.size != Some(total) {
            self.record.size = Some(total);
            write_record(&self.record_path, &self.record)?;
        }
        Ok(Ok(()))
    }

    fn write(&mut self, chunk: &[u8]) -> Result<(), FetchError> {
        self.file
            .write_all(chunk)
            .map_err(io_err("cannot write", &self.path))?;
        self.hasher.update(chunk);
        self.len += chunk.len() as u64;
        Ok(())
    }
}

/// Downloads `req.url` to `req.dest`, verified. See the module documentation.
pub async fn fetch(
    client: &reqwest::Client,
    req: &FetchRequest,
    policy: &RetryPolicy,
    progress: &dyn Progress,
) -> Result<FetchOutcome, FetchError> {
    let expected = match &req.sha256 {
        Some(h) => Some(normalize_hash(h)?),
        None => None,
    };
    if is_directory(&req.dest) {
        return Err(FetchError::DestIsDir {
            dest: req.dest.clone(),
            suggestion: req.dest.join(url_file_name(&req.url)),
        });
    }
    if req.dest.is_file() && expected.is_none() {
        progress.note(&format!(
            "{} is already present (no sha256 given to verify it)",
            req.dest.display()
        ));
        return Ok(FetchOutcome::AlreadyPresent);
    }
    if let Some(expected) = &expected
        && req.dest.is_file()
    {
        let (hasher, _) = hash_file_async(req.dest.clone()).await?;
        if hex(&hasher.finalize()) == *expected {
            progress.note(&format!(
                "{} is already present (sha256 verified)",
                req.dest.display()
            ));
            return Ok(FetchOutcome::AlreadyPresent);
        }
        progress.note(&format!(
            "{} exists with another sha256; downloading the expected file to replace it",
            req.dest.display()
        ));
    }
    if let Some(parent) = req.dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
    }
    let partial_path = partial_path(&req.dest);
    let record_path = record_path(&req.dest);
    let mut record = SourceRecord {
        url: req.url.clone(),
        sha256: expected.clone(),
        size: None,
    };
    let (hasher, len) = if partial_path.is_file() {
        match read_record(&record_path) {
            Some(r) if r.url == record.url && r.sha256 == record.sha256 => {
                record.size = r.size;
                hash_file_async(partial_path.clone()).await?
            }
            other => {
                progress.note(&format!(
                    "{} is {}; starting over",
                    partial_path.display(),
                    if other.is_some() {
                        "a partial download of another file (another URL or sha256)"
                    } else {
                        "a partial download of unknown origin (no record of its URL beside it)"
                    }
                ));
                fs::remove_file(&partial_path).map_err(io_err("cannot remove", &partial_path))?;
                (Sha256::new(), 0)
            }
        }
    } else {
        (Sha256::new(), 0)
    };
    if len > 0 {
        progress.note(&format!(
            "resuming {} from byte {len}",
            partial_path.display()
        ));
    }
    let mut partial = Partial::open(&partial_path, hasher, len, record, record_path.clone())?;

    let mut retries = 0u32;
    let mut backoff = policy.initial_backoff;
    loop {
        match attempt(client, &req.url, &mut partial, progress).await {
            Ok(()) => break,
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retry(why)) => {
                retries += 1;
                if retries >= policy.attempts.max(1) {
                    return Err(FetchError::GaveUp {
                        url: req.url.clone(),
                        attempts: retries,
                        last: why,
                    });
                }
                progress.note(&format!(
                    "{why}; retrying in {:.1}s (attempt {} of {}), keeping the {} bytes already on disk",
                    backoff.as_secs_f64(),
                    retries + 1,
                    policy.attempts,
                    partial.len
                ));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(policy.max_backoff);
            }
        }
    }
    progress.finish();

    let actual = hex(&partial.hasher.clone().finalize());
    if let Some(expected) = expected
        && actual != expected
    {
        drop(partial);
        let _ = fs::remove_file(&partial_path);
        let _ = fs::remove_file(&record_path);
        return Err(FetchError::Mismatch {
            url: req.url.clone(),
            expected,
            actual,
        });
    }
    partial
        .file
        .sync_all()
        .map_err(io_err("cannot sync", &partial_path))?;
    let (bytes, resumed_from) = (partial.len, partial.resumed_from);
    drop(partial);
    fs::rename(&partial_path, &req.dest).map_err(io_err("cannot rename into", &req.dest))?;
    let _ = fs::remove_file(&record_path);
    // The rename is durable only once the directory entry is.
    if let Some(parent) = req.dest.parent().filter(|p| !p.as_os_str().is_empty())
        && let Ok(dir) = File::open(parent)
    {
        let _ = dir.sync_all();
    }
    Ok(FetchOutcome::Downloaded {
        bytes,
        resumed_from,
        retries,
    })
}

/// One request: resume from `partial.len` (or restart when the server ignores the range) and stream
/// to the end. `Ok` means the server sent the whole file.
async fn attempt(
    client: &reqwest::Client,
    url: &str,
    partial: &mut Partial,
    progress: &dyn Progress,
) -> Result<(), Attempt> {
    let mut request = client.get(url);
    if partial.len > 0 {
        request = request.header(RANGE, format!("bytes={}-", partial.len));
    }
    let mut resp = request.send().await.map_err(|e| match dns_failure(&e) {
        Some(detail) => Attempt::Fatal(FetchError::Resolve {
            url: url.to_string(),
            host: reqwest::Url::parse(url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_string))
                .unwrap_or_else(|| url.to_string()),
            detail,
        }),
        None => Attempt::Retry(format!("cannot reach {url}: {}", error_chain(&e))),
    })?;
    let status = resp.status();
    let content_range = resp
        .headers()
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let total = match status {
        StatusCode::PARTIAL_CONTENT if partial.len > 0 => {
            match content_range.as_deref().and_then(parse_content_range) {
                Some((start, _, total)) if start == partial.len => total,
                _ => {
                    // Bytes from somewhere else: nothing they say can be appended.
                    progress.note("the server answered the Range request with another range; restarting from byte 0");
                    partial.restart().map_err(Attempt::Fatal)?;
                    return Err(Attempt::Retry("unexpected Content-Range".into()));
                }
            }
        }
        StatusCode::OK | StatusCode::PARTIAL_CONTENT => {
            if partial.len > 0 {
                progress.note(&format!(
                    "the server ignored the Range request (HTTP {status}); restarting from byte 0"
                ));
                partial.restart().map_err(Attempt::Fatal)?;
            }
            resp.content_length()
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            // `bytes */TOTAL`: if the partial file is exactly the whole file, it only needs verifying.
            let total = content_range
                .as_deref()
                .and_then(|v| v.trim().strip_prefix("bytes */"))
                .and_then(|t| t.parse::<u64>().ok());
            if total == Some(partial.len) {
                return Ok(());
            }
            partial.restart().map_err(Attempt::Fatal)?;
            return Err(Attempt::Retry(format!(
                "the server refused to resume at byte {} (HTTP 416)",
                partial.len
            )));
        }
        s if s.is_server_error()
            || s == StatusCode::REQUEST_TIMEOUT
            || s == StatusCode::TOO_MANY_REQUESTS =>
        {
            return Err(Attempt::Retry(format!("{url} answered HTTP {s}")));
        }
        s => {
            let hint = match s {
                StatusCode::NOT_FOUND => {
                    "check the URL (for Hugging Face: owner/repo/file, and the revision)"
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    "the file needs authorisation (a gated Hugging Face model?); download it where you are logged in"
                }
                _ => "check the URL",
            };
            return Err(Attempt::Fatal(FetchError::Http {
                url: url.to_string(),
                status: s,
                hint,
            }));
        }
    };
    // For 206 `total` is the whole file; for 200 the body length is the whole file.
    let total = total.map(|t| {
        if status == StatusCode::PARTIAL_CONTENT {
            t
        } else {
            t + partial.len
        }
    });
    if let Some(t) = total
        && let Err(recorded) = partial.learn_size(t).map_err(Attempt::Fatal)?
    {
        partial.restart().map_err(Attempt::Fatal)?;
        // Nothing is kept now, so the new size is simply recorded.
        let _ = partial.learn_size(t).map_err(Attempt::Fatal)?;
        return Err(Attempt::Retry(format!(
            "{url} is now {t} bytes, not the {recorded} of the partial download (the file changed upstream); \
             restarting from byte 0"
        )));
    }
    progress.begin(total, partial.len);
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                partial.write(&chunk).map_err(Attempt::Fatal)?;
                progress.advance(chunk.len() as u64);
            }
            Ok(None) => break,
            Err(e) => {
                return Err(Attempt::Retry(format!(
                    "the connection broke after {} bytes: {}",
                    partial.len,
                    error_chain(&e)
                )));
            }
        }
    }
    match total {
        Some(t) if partial.len < t => Err(Attempt::Retry(format!(
            "the server closed the connection at byte {} of {t}",
            partial.len
        ))),
        Some(t) if partial.len > t => {
            partial.restart().map_err(Attempt::Fatal)?;
            Err(Attempt::Retry(format!(
                "received more bytes than the announced {t}; restarting"
            )))
        }
        _ => Ok(()),
    }
}

/// The resolver's own message when `e` is a failure to resolve the host name (hyper-util's "dns error").
fn dns_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    let mut dns = false;
    let mut last = None;
    while let Some(err) = cur {
        let text = err.to_string();
        dns |= text.starts_with("dns error");
        last = Some(text);
        cur = err.source();
    }
    dns.then(|| last.unwrap_or_default())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.contains(&text) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_sits_beside_dest() {
        assert_eq!(
            partial_path(Path::new("/mnt/models/m.gguf")),
            PathBuf::from("/mnt/models/m.gguf.partial")
        );
    }

    #[test]
    fn a_directory_dest_gets_a_suggested_file_name() {
        assert_eq!(
            url_file_name("https://huggingface.co/o/r/resolve/main/f.gguf?download=1"),
            "f.gguf"
        );
        assert_eq!(url_file_name("http://host/"), "model.gguf");
        assert!(is_directory(Path::new("/mnt/models/")));
        assert!(is_directory(Path::new("/")));
        assert!(!is_directory(Path::new("/mnt/models/m.gguf")));
        assert_eq!(
            record_path(Path::new("/mnt/models/m.gguf")),
            PathBuf::from("/mnt/models/m.gguf.partial.source")
        );
    }

    #[test]
    fn hash_must_be_hex() {
        assert!(normalize_hash("abc").is_err());
        assert!(normalize_hash(&"g".repeat(64)).is_err());
        assert_eq!(normalize_hash(&"AB".repeat(32)).unwrap(), "ab".repeat(32));
    }
}
