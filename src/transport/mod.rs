//! Running commands and moving files on a Proxmox host (over SSH, or locally on the host itself) and in
//! its containers (through the host: `pct exec`, `pct push`, `pct pull`; no SSH into a container).
//!
//! Every command is a [`Cmd`]: a program and its arguments, never a shell string. The one place that turns
//! arguments into a command line for a remote shell is [`crate::shell::join`].

use std::time::Duration;

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
    #[error("command timed out after {0:?}: {1}")]
    Timeout(Duration, String),
    #[error("{0}")]
    Other(String),
}

/// A place where commands run and files live: a Proxmox host over SSH, or this machine.
pub trait Transport: Send + Sync {
    /// Runs a command to completion. A non-zero exit is an `Ok(Output)`, not an error.
    fn run(&self, cmd: &Cmd) -> anyhow::Result<Output>;
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
