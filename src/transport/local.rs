//! `--host local`: llmctl runs on the Proxmox host itself. Same semantics as SSH: argv (no shell), separate
//! stdout/stderr streamed line by line, a timeout that kills the whole process group, atomic file writes.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::Context;

use super::{Cmd, LineSplitter, Output, Stream, Transport, TransportError};

#[derive(Debug, Default)]
pub struct LocalTransport;

impl LocalTransport {
    pub fn new() -> Self {
        LocalTransport
    }
}

enum Event {
    Data(Stream, Vec<u8>),
    Closed,
}

fn pump(mut r: impl Read, stream: Stream, tx: mpsc::Sender<Event>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send(Event::Data(stream, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    let _ = tx.send(Event::Closed);
}

/// Kills a process group: the command and everything it started (a shell's children included).
fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Transport for LocalTransport {
    fn run_streaming(
        &self,
        cmd: &Cmd,
        on_line: &mut dyn FnMut(Stream, &str),
    ) -> anyhow::Result<Output> {
        let (program, args) = cmd
            .argv
            .split_first()
            .ok_or_else(|| TransportError::Other("empty command".into()))?;
        let mut child = match Command::new(program)
            .args(args)
            .stdin(if cmd.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
        {
            Ok(c) => c,
            // Same answer a shell gives over SSH, so callers treat "not installed" alike on both transports.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let line = format!("sh: 1: {program}: not found");
                on_line(Stream::Stderr, &line);
                return Ok(Output {
                    status: Some(127),
                    stdout: String::new(),
                    stderr: format!("{line}\n"),
                });
            }
            Err(e) => return Err(e).with_context(|| format!("cannot start `{}`", cmd.display())),
        };
        let pgid = child.id();
        let (tx, rx) = mpsc::channel();
        if let (Some(mut stdin), Some(data)) = (child.stdin.take(), cmd.stdin.clone()) {
            std::thread::spawn(move || {
                let _ = stdin.write_all(&data);
            });
        }
        let out = child.stdout.take().map(|o| {
            let tx = tx.clone();
            std::thread::spawn(move || pump(o, Stream::Stdout, tx))
        });
        let err = child.stderr.take().map(|e| {
            let tx = tx.clone();
            std::thread::spawn(move || pump(e, Stream::Stderr, tx))
        });
        drop(tx);
        let deadline = Instant::now() + cmd.timeout;
        let (mut so, mut se) = (LineSplitter::default(), LineSplitter::default());
        let mut open = 2;
        while open > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Event::Data(Stream::Stdout, d)) => so.push(&d, |l| on_line(Stream::Stdout, l)),
                Ok(Event::Data(Stream::Stderr, d)) => se.push(&d, |l| on_line(Stream::Stderr, l)),
                Ok(Event::Closed) => open -= 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    kill_group(pgid);
                    let _ = child.wait();
                    return Err(TransportError::Timeout(cmd.timeout, cmd.display()).into());
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() >= deadline {
                kill_group(pgid);
                let _ = child.wait();
                return Err(TransportError::Timeout(cmd.timeout, cmd.display()).into());
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        for h in [out, err].into_iter().flatten() {
            let _ = h.join();
        }
        Ok(Output {
            status: status.code(),
            stdout: so.finish(|l| on_line(Stream::Stdout, l)),
            stderr: se.finish(|l| on_line(Stream::Stderr, l)),
        })
    }

    fn read_file(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        std::fs::read(path).with_context(|| format!("cannot read {path}"))
    }

    fn write_file(&self, path: &str, data: &[u8], mode: u32) -> anyhow::Result<()> {
        let tmp = super::temp_path_beside(path);
        let result = (|| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            // Mode set before any data lands, so a secret is never briefly world-readable.
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            f.write_all(data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.with_context(|| format!("cannot write {path} (through {tmp})"))
    }

    fn describe(&self) -> String {
        "local".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn exit_codes_and_separate_streams() {
        let t = LocalTransport::new();
        let out = t
            .run(&Cmd::new(["sh", "-c", "echo out; echo err >&2; exit 3"]))
            .unwrap();
        assert_eq!(
            (out.status, out.stdout.as_str(), out.stderr.as_str()),
            (Some(3), "out\n", "err\n")
        );
        let out = t.run(&Cmd::new(["cat"]).stdin("piped\n")).unwrap();
        assert_eq!(out.stdout, "piped\n");
        let out = t.run(&Cmd::new(["llmctl-no-such-tool"])).unwrap();
        assert_eq!(out.status, Some(127));
    }

    #[test]
    fn streams_lines_in_order() {
        let t = LocalTransport::new();
        let mut seen = Vec::new();
        t.run_streaming(&Cmd::new(["printf", "a\\nb\\nc"]), &mut |s, l| {
            seen.push((s, l.to_string()))
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                (Stream::Stdout, "a".to_string()),
                (Stream::Stdout, "b".into()),
                (Stream::Stdout, "c".into())
            ]
        );
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let t = LocalTransport::new();
        // The grandchild would create the marker after the timeout if the group were not killed.
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let err = t
            .run(&Cmd::new(["sh", "-c", &script]).timeout(Duration::from_millis(300)))
            .unwrap_err();
        assert!(err.to_string().contains("timed out"), "{err}");
        std::thread::sleep(Duration::from_secs(3));
        assert!(
            !marker.exists(),
            "a child of the timed-out command survived"
        );
    }

    #[test]
    fn atomic_write_keeps_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.env");
        let p = path.to_str().unwrap();
        let t = LocalTransport::new();
        t.write_file(p, b"one", 0o600).unwrap();
        t.write_file(p, b"two", 0o600).unwrap();
        assert_eq!(t.read_file(p).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp file left behind"
        );
        assert!(t.read_file("/nonexistent/x").is_err());
    }
}
