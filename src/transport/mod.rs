//! Running commands and moving files on a Proxmox host (over SSH, or locally on the host itself) and in
//! its containers (through the host: `pct exec`, `pct push`, `pct pull`; no SSH into a container).
//!
//! Every command is a [`Cmd`]: a program and its arguments, never a shell string. The one place that turns
//! arguments into a command line for a remote shell is [`crate::shell::join`].

use std::path::PathBuf;
use std::time::Duration;

pub mod container;
pub mod fake;
pub mod known_hosts;
pub mod local;
pub mod ssh;
pub mod ssh_config;

pub use container::Container;
pub use local::LocalTransport;
pub use ssh::{SshOptions, SshTransport};

/// A command to run: argv, optional stdin, and a timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    pub argv: Vec<String>,
    pub stdin: Option<Vec<u8>>,
    pub timeout: Duration,
}

impl Cmd {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Cmd {
            argv: argv.into_iter().map(Into::into).collect(),
            stdin: None,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The command line as a shell would read it (for messages and for SSH exec).
    pub fn display(&self) -> String {
        crate::shell::join(&self.argv)
    }
}

/// What a finished command left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Exit status; `None` when the command was killed by a signal.
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }
}

/// Which stream a line of live output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("command timed out after {0:?} and was killed: {1}")]
    Timeout(Duration, String),
    #[error("cannot reach {target}: {reason}")]
    Unreachable { target: String, reason: String },
    #[error(
        "the host key of {host} is not known (not in {known_hosts}).\n  {key_type} key fingerprint is \
         {fingerprint}\n  Compare it with `ssh-keygen -lf /etc/ssh/ssh_host_{key_file}_key.pub` run on the \
         host itself, then run again with --accept-new-host-key to record it"
    )]
    HostKeyUnknown {
        host: String,
        known_hosts: String,
        key_type: String,
        key_file: String,
        fingerprint: String,
    },
    #[error(
        "REFUSED: the host key of {host} has CHANGED since it was recorded in {known_hosts}{line}.\n  The \
         {key_type} key it offers now has fingerprint {fingerprint}.\n  This is either a reinstalled host or \
         someone intercepting the connection. Only if you know the host was reinstalled, remove the old entry \
         (`ssh-keygen -R '{host_field}' -f {known_hosts}`) and connect again"
    )]
    HostKeyChanged {
        host: String,
        host_field: String,
        known_hosts: String,
        line: String,
        key_type: String,
        fingerprint: String,
    },
    #[error(
        "authentication as {user}@{host} failed; tried: {tried}. Add your public key to the host's \
         ~{user}/.ssh/authorized_keys, load it into ssh-agent (`ssh-add`), or name it with IdentityFile in \
         ~/.ssh/config"
    )]
    AuthFailed {
        user: String,
        host: String,
        tried: String,
    },
    #[error(
        "{host} is not a Proxmox VE host: `pveversion` {detail}. Run llmctl against the Proxmox host itself \
         (not a VM or a container)"
    )]
    NotProxmox { host: String, detail: String },
    #[error(
        "container {vmid} does not exist on {host}: {detail}. List the containers with `pct list` and pass \
         the right --vmid"
    )]
    ContainerMissing {
        vmid: u32,
        host: String,
        detail: String,
    },
    #[error("{0}")]
    Other(String),
}

/// A place where commands run and files live: a Proxmox host over SSH, or this machine.
pub trait Transport: Send + Sync {
    /// Runs a command to completion. A non-zero exit is an `Ok(Output)`, not an error.
    fn run(&self, cmd: &Cmd) -> anyhow::Result<Output> {
        self.run_streaming(cmd, &mut |_, _| {})
    }
    /// Runs a command, handing each line of output to `on_line` as it arrives (progress of long steps).
    fn run_streaming(
        &self,
        cmd: &Cmd,
        on_line: &mut dyn FnMut(Stream, &str),
    ) -> anyhow::Result<Output>;
    /// Reads a whole file.
    fn read_file(&self, path: &str) -> anyhow::Result<Vec<u8>>;
    /// Writes a file atomically (temp file in the same directory, then rename) with the given mode.
    fn write_file(&self, path: &str, data: &[u8], mode: u32) -> anyhow::Result<()>;
    /// A short human name for messages: `root@pve1`, `local`.
    fn describe(&self) -> String;
}

/// How to reach a host: `local` (this machine is the Proxmox host), or an SSH target and its options. A
/// connection [`keep`]t for the same target and options is handed out instead of opening a new one.
pub fn connect(host: &str, options: &SshOptions) -> anyhow::Result<Box<dyn Transport>> {
    if host == "local" {
        return Ok(Box::new(LocalTransport::new()));
    }
    if let Some(kept) = take_kept(host, options) {
        tracing::debug!(target = %kept.describe(), "ssh connection reused");
        return Ok(kept);
    }
    Ok(Box::new(SshTransport::connect(host, options)?))
}

/// Connections opened for one purpose and kept for the next [`connect`] to the same target with the same
/// options: cluster discovery's, which the named node's own run then uses (one SSH handshake fewer). Each is
/// handed out once; one never asked for closes when the process ends.
type Kept = (String, SshOptions, Box<dyn Transport>);
static KEPT: std::sync::Mutex<Vec<Kept>> = std::sync::Mutex::new(Vec::new());

/// Keeps `transport`, open to `host` with `options`, for the next [`connect`] to it.
pub fn keep(host: &str, options: &SshOptions, transport: Box<dyn Transport>) {
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    kept.push((host.to_string(), options.clone(), transport));
}

fn take_kept(host: &str, options: &SshOptions) -> Option<Box<dyn Transport>> {
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    let i = kept
        .iter()
        .position(|(h, o, _)| h == host && o == options)?;
    Some(kept.swap_remove(i).2)
}

/// The user's home directory, for `~/.ssh/...` defaults.
pub fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// Fails with [`TransportError::NotProxmox`] unless `pveversion` runs and prints `pve-manager/...`.
/// Returns its first line.
pub fn ensure_proxmox(host: &dyn Transport) -> anyhow::Result<String> {
    let out = host.run(&Cmd::new(["pveversion"]).timeout(Duration::from_secs(30)))?;
    let first = out.stdout.lines().next().unwrap_or("").trim().to_string();
    if out.success() && first.starts_with("pve-manager/") {
        return Ok(first);
    }
    let detail = match out.status {
        Some(127) => "is not installed (command not found)".to_string(),
        Some(code) if code != 0 => format!(
            "exited with status {code}: {}",
            out.stderr.lines().next().unwrap_or("").trim()
        ),
        _ => format!("printed `{first}` instead of pve-manager/<version>"),
    };
    Err(TransportError::NotProxmox {
        host: host.describe(),
        detail,
    }
    .into())
}

/// A temp file name beside `path` (same directory, so the final rename is atomic).
pub(crate) fn temp_path_beside(path: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let (dir, name) = match path.rsplit_once('/') {
        Some((d, n)) => (format!("{d}/"), n),
        None => (String::new(), path),
    };
    format!("{dir}.{name}.llmctl-tmp-{}-{n}-{nanos}", std::process::id())
}

/// Cuts a byte stream into lines for streaming callbacks; keeps the whole text for the final [`Output`].
#[derive(Debug, Default)]
pub struct LineSplitter {
    all: Vec<u8>,
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Adds bytes and hands each completed line (without its newline) to `on_line`.
    pub fn push(&mut self, data: &[u8], mut on_line: impl FnMut(&str)) {
        self.all.extend_from_slice(data);
        // Only the new bytes are searched: a long line arriving in many chunks stays linear, not quadratic.
        let mut start = self.pending.len();
        self.pending.extend_from_slice(data);
        let mut consumed = 0;
        while let Some(rel) = self.pending[start..].iter().position(|&b| b == b'\n') {
            let end = start + rel;
            let line = &self.pending[consumed..end];
            on_line(String::from_utf8_lossy(line).trim_end_matches('\r'));
            consumed = end + 1;
            start = consumed;
        }
        self.pending.drain(..consumed);
    }

    /// Flushes a last unterminated line and returns everything received.
    pub fn finish(mut self, mut on_line: impl FnMut(&str)) -> String {
        if !self.pending.is_empty() {
            on_line(&String::from_utf8_lossy(&std::mem::take(&mut self.pending)));
        }
        String::from_utf8_lossy(&self.all).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kept connection goes to the next connect to its target with its options, once.
    #[test]
    fn a_kept_connection_is_handed_out_once_to_its_target_and_options() {
        let target = "root@kept.llmctl-test.invalid";
        let options = SshOptions {
            identity_files: vec!["/nonexistent/key".into()],
            ..SshOptions::default()
        };
        keep(target, &options, Box::new(fake::FakeHost::new("kept")));
        assert!(take_kept(target, &SshOptions::default()).is_none());
        assert!(take_kept("root@other.llmctl-test.invalid", &options).is_none());
        let kept = take_kept(target, &options).expect("kept");
        assert_eq!(kept.describe(), "kept");
        assert!(take_kept(target, &options).is_none());
    }

    #[test]
    fn line_splitter_handles_split_chunks() {
        let mut lines = Vec::new();
        let mut s = LineSplitter::default();
        s.push(b"ab", |l| lines.push(l.to_string()));
        s.push(b"c\nde\r\nf", |l| lines.push(l.to_string()));
        let all = s.finish(|l| lines.push(l.to_string()));
        assert_eq!(lines, ["abc", "de", "f"]);
        assert_eq!(all, "abc\nde\r\nf");
    }

    #[test]
    fn temp_files_live_beside_the_target() {
        let t = temp_path_beside("/etc/pve/lxc/103.conf");
        assert!(t.starts_with("/etc/pve/lxc/.103.conf.llmctl-tmp-"));
        assert_ne!(t, temp_path_beside("/etc/pve/lxc/103.conf"));
    }
}
