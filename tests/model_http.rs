//! Remote inspection (range requests) and the resumable verified download, against a small HTTP/1.1
//! server written here on tokio so each test can misbehave on purpose: drop the connection midway,
//! ignore `Range`, or answer 404. Ports: 127.0.0.1:18300-18349, one per server.

#[path = "model_support.rs"]
mod support;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llmctl::model::download::{self, FetchError, FetchOutcome, FetchRequest, RetryPolicy, Silent};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Copy)]
enum Behaviour {
    /// Honour `Range`.
    Ranges,
    /// Always answer 200 with the whole file.
    IgnoreRange,
    /// 404 for everything.
    NotFound,
}

struct Server {
    port: u16,
    /// What it serves; a test may swap it (the file changed upstream).
    body: Arc<Mutex<Arc<Vec<u8>>>>,
    /// The `Range` header of each request (None: no header).
    requests: Arc<Mutex<Vec<Option<String>>>>,
    /// Bytes sent in bodies, in all.
    sent: Arc<Mutex<u64>>,
}

/// Serves `body`; on the first request, closes the connection after `drop_after` body bytes if set.
async fn serve(
    port: u16,
    body: Arc<Vec<u8>>,
    behaviour: Behaviour,
    drop_after: Option<usize>,
) -> Server {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("cannot listen on 127.0.0.1:{port}: {e}"));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let sent = Arc::new(Mutex::new(0u64));
    let current = Arc::new(Mutex::new(body));
    let (reqs, sent2, current2) = (requests.clone(), sent.clone(), current.clone());
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let body = current2.lock().unwrap().clone();
            let text = String::from_utf8_lossy(&head).to_string();
            let range = text
                .lines()
                .find_map(|l| {
                    l.strip_prefix("range: ")
                        .or_else(|| l.strip_prefix("Range: "))
                })
                .map(|v| v.trim().to_string());
            reqs.lock().unwrap().push(range.clone());
            let (status, start, end) = match (behaviour, &range) {
                (Behaviour::NotFound, _) => ("404 Not Found", 0, 0),
                (Behaviour::Ranges, Some(r)) => {
                    let spec = r.trim_start_matches("bytes=");
                    let (s, e) = spec.split_once('-').unwrap();
                    let s: usize = s.parse().unwrap();
                    let e: usize = if e.is_empty() {
                        body.len() - 1
                    } else {
                        e.parse::<usize>().unwrap().min(body.len() - 1)
                    };
                    ("206 Partial Content", s, e + 1)
                }
                _ => ("200 OK", 0, body.len()),
            };
            let mut resp = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
            if status.starts_with("206") {
                resp.push_str(&format!(
                    "Content-Range: bytes {}-{}/{}\r\n",
                    start,
                    end - 1,
                    body.len()
                ));
            }
            resp.push_str(&format!("Content-Length: {}\r\n\r\n", end - start));
            let _ = sock.write_all(resp.as_bytes()).await;
            let mut chunk = &body[start..end];
            if first && let Some(n) = drop_after {
                chunk = &chunk[..n.min(chunk.len())];
            }
            first = false;
            let _ = sock.write_all(chunk).await;
            *sent2.lock().unwrap() += chunk.len() as u64;
            let _ = sock.shutdown().await;
        }
    });
    Server {
        port,
        body: current,
        requests,
        sent,
    }
}

impl Server {
    fn set_body(&self, body: Arc<Vec<u8>>) {
        *self.body.lock().unwrap() = body;
    }
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/model.gguf", self.port)
    }
    fn ranges(&self) -> Vec<Option<String>> {
        self.requests.lock().unwrap().clone()
    }
}

fn payload(len: usize) -> Arc<Vec<u8>> {
    // Deterministic, non-repeating bytes, so a misplaced resume shows up in the hash.
    let mut v = Vec::with_capacity(len);
    let mut x: u32 = 0x1234_5678;
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.push((x >> 24) as u8);
    }
    Arc::new(v)
}

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        attempts: 5,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
    }
}

fn request(url: String, hash: String, dest: &Path) -> FetchRequest {
    FetchRequest {
        url,
        sha256: Some(hash),
        dest: dest.to_path_buf(),
    }
}

#[tokio::test]
async fn remote_inspect_reads_only_the_header_with_ranges() {
    let path = support::smollm2_path();
    let body = Arc::new(std::fs::read(&path).unwrap());
    let server = serve(18300, body.clone(), Behaviour::Ranges, None).await;
    let remote = llmctl::model::locate(&server.url()).await.unwrap();
    let local = llmctl::model::source::read_local(&path).unwrap();
    assert_eq!(remote.header.tensors, local.header.tensors);
    assert_eq!(remote.header.metadata, local.header.metadata);
    assert_eq!(remote.file_size, Some(body.len() as u64));
    let ranges = server.ranges();
    assert!(
        ranges.len() >= 2,
        "SmolLM2's header is over 1 MiB, so the prefix grew: {ranges:?}"
    );
    assert!(
        ranges.iter().all(|r| r.is_some()),
        "every request is a range request"
    );
    assert_eq!(ranges[0].as_deref(), Some("bytes=0-1048575"));
    let sent = *server.sent.lock().unwrap();
    assert!(
        sent < body.len() as u64 / 4,
        "read {sent} of {} bytes",
        body.len()
    );
    let report = llmctl::model::inspect_report(&server.url(), &remote).unwrap();
    assert_eq!(report.layers, 30);
}

#[tokio::test]
async fn remote_inspect_without_range_support_is_a_clear_error() {
    let server = serve(18301, payload(4096), Behaviour::IgnoreRange, None).await;
    let err = format!(
        "{:#}",
        llmctl::model::locate(&server.url()).await.unwrap_err()
    );
    assert!(
        err.contains("does not support HTTP range requests") && err.contains("model fetch"),
        "{err}"
    );
}

#[tokio::test]
async fn download_resumes_after_a_dropped_connection() {
    let body = payload(3 << 20);
    let server = serve(18302, body.clone(), Behaviour::Ranges, Some(1_000_000)).await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let client = llmctl::model::http_client().unwrap();
    let out = download::fetch(
        &client,
        &request(server.url(), sha(&body), &dest),
        &fast_retries(),
        &Silent,
    )
    .await
    .unwrap();
    assert_eq!(
        out,
        FetchOutcome::Downloaded {
            bytes: body.len() as u64,
            resumed_from: 0,
            retries: 1
        }
    );
    assert_eq!(std::fs::read(&dest).unwrap(), *body);
    assert!(!download::partial_path(&dest).exists());
    assert_eq!(
        server.ranges(),
        vec![None, Some("bytes=1000000-".to_string())]
    );
}

#[tokio::test]
async fn a_server_that_ignores_range_restarts_cleanly() {
    let body = payload(2 << 20);
    let server = serve(18303, body.clone(), Behaviour::IgnoreRange, Some(700_000)).await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let client = llmctl::model::http_client().unwrap();
    download::fetch(
        &client,
        &request(server.url(), sha(&body), &dest),
        &fast_retries(),
        &Silent,
    )
    .await
    .unwrap();
    // The 200 answer to the Range request restarted the file instead of appending to it.
    assert_eq!(std::fs::read(&dest).unwrap(), *body);
    assert_eq!(
        server.ranges(),
        vec![None, Some("bytes=700000-".to_string())]
    );
}

#[tokio::test]
async fn a_wrong_sha256_leaves_no_file() {
    let body = payload(100_000);
    let server = serve(18304, body.clone(), Behaviour::Ranges, None).await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let client = llmctl::model::http_client().unwrap();
    let wrong = sha(b"something else");
    let err = download::fetch(
        &client,
        &request(server.url(), wrong.clone(), &dest),
        &fast_retries(),
        &Silent,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, FetchError::Mismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&wrong) && msg.contains(&sha(&body)) && msg.contains("deleted"),
        "{msg}"
    );
    assert!(!dest.exists());
    assert!(!download::partial_path(&dest).exists());
}

/// What a killed earlier run leaves behind: `<dest>.partial` with the first `cut` bytes (and whatever else fetch
/// keeps beside it), from a server that drops the connection there; one attempt only.
async fn interrupted_download(
    port: u16,
    body: Arc<Vec<u8>>,
    cut: usize,
    hash: Option<String>,
    dest: &Path,
) -> Server {
    let server = serve(port, body, Behaviour::Ranges, Some(cut)).await;
    let client = llmctl::model::http_client().unwrap();
    let once = RetryPolicy {
        attempts: 1,
        ..fast_retries()
    };
    let req = FetchRequest {
        url: server.url(),
        sha256: hash,
        dest: dest.to_path_buf(),
    };
    let err = download::fetch(&client, &req, &once, &Silent)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::GaveUp { .. }), "{err}");
    assert_eq!(
        std::fs::metadata(download::partial_path(dest))
            .unwrap()
            .len(),
        cut as u64
    );
    server
}

#[tokio::test]
async fn an_interrupted_run_completes_on_the_next_run() {
    let body = payload(1 << 20);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let server = interrupted_download(18305, body.clone(), 300_000, Some(sha(&body)), &dest).await;
    let client = llmctl::model::http_client().unwrap();
    let out = download::fetch(
        &client,
        &request(server.url(), sha(&body), &dest),
        &fast_retries(),
        &Silent,
    )
    .await
    .unwrap();
    assert_eq!(
        out,
        FetchOutcome::Downloaded {
            bytes: body.len() as u64,
            resumed_from: 300_000,
            retries: 0
        }
    );
    assert_eq!(std::fs::read(&dest).unwrap(), *body);
    assert_eq!(
        server.ranges(),
        vec![None, Some("bytes=300000-".to_string())]
    );
    assert!(!download::partial_path(&dest).exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "nothing but the model is left beside it"
    );

    // Run again: already present, nothing requested.
    let server = serve(18311, body.clone(), Behaviour::Ranges, None).await;
    let out = download::fetch(
        &client,
        &request(server.url(), sha(&body), &dest),
        &fast_retries(),
        &Silent,
    )
    .await
    .unwrap();
    assert_eq!(out, FetchOutcome::AlreadyPresent);
    assert_eq!(server.ranges().len(), 0);
}

#[tokio::test]
async fn a_directory_dest_is_refused_before_downloading() {
    let body = payload(100_000);
    let server = serve(18308, body.clone(), Behaviour::Ranges, None).await;
    let dir = tempfile::tempdir().unwrap();
    let client = llmctl::model::http_client().unwrap();
    for dest in [dir.path().to_path_buf(), dir.path().join("new-dir/")] {
        let err = download::fetch(
            &client,
            &request(server.url(), sha(&body), &dest),
            &fast_retries(),
            &Silent,
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("--dest") && msg.contains("directory") && msg.contains("model.gguf"),
            "{msg}"
        );
    }
    assert!(server.ranges().is_empty(), "nothing was downloaded");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn a_partial_of_another_url_is_not_resumed() {
    let other = payload(1 << 20)
        .iter()
        .map(|b| b ^ 0x5a)
        .collect::<Vec<u8>>();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    interrupted_download(18309, Arc::new(other), 300_000, None, &dest).await;
    let body = payload(1 << 20);
    let server = serve(18310, body.clone(), Behaviour::Ranges, None).await;
    let client = llmctl::model::http_client().unwrap();
    let out = download::fetch(
        &client,
        &request(server.url(), sha(&body), &dest),
        &fast_retries(),
        &Silent,
    )
    .await
    .unwrap();
    assert_eq!(
        out,
        FetchOutcome::Downloaded {
            bytes: body.len() as u64,
            resumed_from: 0,
            retries: 0
        }
    );
    assert_eq!(server.ranges(), vec![None]);
    assert_eq!(std::fs::read(&dest).unwrap(), *body);
}

#[tokio::test]
async fn a_partial_of_unknown_origin_is_not_installed_without_a_sha256() {
    let body = payload(1 << 20);
    let server = serve(18312, body.clone(), Behaviour::Ranges, None).await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    // A `.partial` with no record of where it came from (another tool, an older llmctl).
    std::fs::write(download::partial_path(&dest), vec![7u8; 300_000]).unwrap();
    let client = llmctl::model::http_client().unwrap();
    let req = FetchRequest {
        url: server.url(),
        sha256: None,
        dest: dest.clone(),
    };
    let out = download::fetch(&client, &req, &fast_retries(), &Silent)
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            FetchOutcome::Downloaded {
                resumed_from: 0,
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(server.ranges(), vec![None]);
    assert_eq!(std::fs::read(&dest).unwrap(), *body);
}

#[tokio::test]
async fn a_partial_of_a_file_that_changed_size_restarts() {
    let first = payload(1 << 20);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let server = interrupted_download(18313, first, 300_000, None, &dest).await;
    // The file at that URL changed upstream, to one of another size.
    let body = Arc::new(
        payload(2 << 20)
            .iter()
            .map(|b| b ^ 0x33)
            .collect::<Vec<u8>>(),
    );
    server.set_body(body.clone());
    let client = llmctl::model::http_client().unwrap();
    let req = FetchRequest {
        url: server.url(),
        sha256: None,
        dest: dest.clone(),
    };
    let out = download::fetch(&client, &req, &fast_retries(), &Silent)
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            FetchOutcome::Downloaded {
                resumed_from: 0,
                retries: 1,
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(
        server.ranges(),
        vec![None, Some("bytes=300000-".to_string()), None],
        "the resume was tried, the new size seen, and the download restarted"
    );
    assert_eq!(std::fs::read(&dest).unwrap(), *body);
}

#[tokio::test]
async fn a_host_that_does_not_resolve_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let client = llmctl::model::http_client().unwrap();
    // `.invalid` never resolves (RFC 6761).
    let err = download::fetch(
        &client,
        &request("http://llmctl-test.invalid/m.gguf".into(), sha(b"x"), &dest),
        &fast_retries(),
        &Silent,
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, FetchError::Resolve { .. })
            && msg.contains("llmctl-test.invalid")
            && msg.contains("resolve")
            && !msg.contains("gave up"),
        "{msg}"
    );
    assert!(!dest.exists());
}

#[tokio::test]
async fn http_errors_are_not_retried_and_connection_errors_give_up() {
    let server = serve(18306, payload(10), Behaviour::NotFound, None).await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let client = llmctl::model::http_client().unwrap();
    let err = download::fetch(
        &client,
        &request(server.url(), sha(b"x"), &dest),
        &fast_retries(),
        &Silent,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("404") && err.to_string().contains("check the URL"),
        "{err}"
    );
    assert_eq!(server.ranges().len(), 1, "a 404 is not retried");

    // Nothing listens on 18307: every attempt fails to connect, then it gives up.
    let err = download::fetch(
        &client,
        &request("http://127.0.0.1:18307/m.gguf".into(), sha(b"x"), &dest),
        &fast_retries(),
        &Silent,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("gave up") && err.to_string().contains("5 attempts"),
        "{err}"
    );
    assert!(!dest.exists());
}
