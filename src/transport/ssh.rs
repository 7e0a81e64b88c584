//! SSH transport (libssh2 through the `ssh2` crate): one TCP connection per llmctl run, with every command
//! on its own exec channel of that one session and files over SFTP.
//!
//! Timeouts kill the remote command, not only our side of it: closing a channel does not stop a process
//! that is not writing (e.g. `sleep`), and a `timeout` wrapper would miss the command's children. sshd makes
//! each exec its own session (setsid), so the shell's PID is the process group of everything the command
//! starts; the command line announces that PID on stderr first (stripped again here), and on timeout a
//! second channel runs `kill -KILL -- -<pgid>`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use ssh2::{ErrorCode, OpenFlags, OpenType, Session, Sftp};

use super::known_hosts::{self, Verdict};
use super::ssh_config::{self, Resolved, SshConfig};
use super::{Cmd, LineSplitter, Output, Stream, Transport, TransportError};

/// libssh2's LIBSSH2_ERROR_EAGAIN: a non-blocking call would block.
const EAGAIN: i32 = -37;
const PGID_MARKER: &str = "llmctl-pgid=";
/// Blocking calls (handshake, SFTP) give up after this long without progress.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// Where keys and host keys come from. Every path is overridable so tests use temp dirs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshOptions {
    /// Default `~/.ssh/known_hosts`.
    pub known_hosts: Option<PathBuf>,
    /// Default `~/.ssh/config` (a missing file is fine).
    pub ssh_config: Option<PathBuf>,
    /// Tried after the config's IdentityFile entries, before the default `~/.ssh/id_*` files.
    pub identity_files: Vec<PathBuf>,
    /// Try `~/.ssh/id_ed25519`, `id_ecdsa`, `id_rsa` last.
    pub default_identities: bool,
    pub use_agent: bool,
    /// The agent socket; default `$SSH_AUTH_SOCK`.
    pub agent_socket: Option<PathBuf>,
    /// Record an unknown host key instead of refusing (`--accept-new-host-key`). A changed key is refused anyway.
    pub accept_new_host_key: bool,
    pub connect_timeout: Duration,
}

impl Default for SshOptions {
    fn default() -> Self {
        SshOptions {
            known_hosts: None,
            ssh_config: None,
            identity_files: Vec::new(),
            default_identities: true,
            use_agent: true,
            agent_socket: None,
            accept_new_host_key: false,
            connect_timeout: Duration::from_secs(15),
        }
    }
}

struct Inner {
    session: Session,
    sftp: Option<Sftp>,
}

pub struct SshTransport {
    inner: Mutex<Inner>,
    target: Resolved,
}

fn would_block(e: &ssh2::Error) -> bool {
    e.code() == ErrorCode::Session(EAGAIN)
}

fn current_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "root".into())
}

impl SshTransport {
    pub fn connect(target: &str, options: &SshOptions) -> anyhow::Result<SshTransport> {
        let home = super::home_dir();
        let spec = ssh_config::parse_target(target).map_err(TransportError::Other)?;
        let config_path = options
            .ssh_config
            .clone()
            .unwrap_or_else(|| home.join(".ssh/config"));
        let config = match std::fs::read_to_string(&config_path) {
            Ok(text) => SshConfig::parse(&text)
                .map_err(|e| TransportError::Other(format!("{}: {e}", config_path.display())))?,
            Err(_) => SshConfig::default(),
        };
        let resolved = ssh_config::resolve(&spec, &config, &home, &current_user())
            .map_err(TransportError::Other)?;
        let tcp = open_tcp(&resolved, options.connect_timeout)?;
        let mut session = Session::new().context("libssh2 could not start a session")?;
        session.set_timeout(duration_ms(options.connect_timeout));
        // OpenSSH's preference order, so the key offered is the one `ssh` would have recorded.
        let _ = session.method_pref(
            ssh2::MethodType::HostKey,
            "ssh-ed25519,ecdsa-sha2-nistp256,ecdsa-sha2-nistp384,ecdsa-sha2-nistp521,rsa-sha2-512,rsa-sha2-256,ssh-rsa",
        );
        session.set_tcp_stream(tcp);
        session
            .handshake()
            .map_err(|e| TransportError::Unreachable {
                target: describe_target(&resolved),
                reason: format!("the SSH handshake failed ({e}); is this port an SSH server?"),
            })?;
        verify_host_key(&session, &resolved, options, &home)?;
        authenticate(&session, &resolved, options, &home)?;
        session.set_timeout(duration_ms(IO_TIMEOUT));
        tracing::debug!(target = %describe_target(&resolved), "ssh connected");
        Ok(SshTransport {
            inner: Mutex::new(Inner {
                session,
                sftp: None,
            }),
            target: resolved,
        })
    }

    fn lock(&self) -> anyhow::Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner.lock().map_err(|_| {
            TransportError::Other("the SSH session was poisoned by a panic".into()).into()
        })
    }

    fn with_sftp<T>(&self, f: impl FnOnce(&Sftp) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let mut inner = self.lock()?;
        if inner.sftp.is_none() {
            let sftp = inner
                .session
                .sftp()
                .context("cannot start SFTP (is the sftp subsystem enabled in sshd_config?)")?;
            inner.sftp = Some(sftp);
        }
        let sftp = inner
            .sftp
            .as_ref()
            .ok_or_else(|| TransportError::Other("no SFTP".into()))?;
        f(sftp)
    }
}

/// A command line cut to its first line and 100 characters, for the debug log (the facts scripts are long).
fn brief(line: &str) -> String {
    let first = line.lines().next().unwrap_or_default();
    let cut: String = first.chars().take(100).collect();
    if cut.len() < line.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

fn duration_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

fn describe_target(r: &Resolved) -> String {
    let port = if r.port == 22 {
        String::new()
    } else {
        format!(":{}", r.port)
    };
    if r.alias == r.hostname {
        format!("{}@{}{port}", r.user, r.hostname)
    } else {
        format!("{}@{} ({}{port})", r.user, r.alias, r.hostname)
    }
}

// Built once per run, on the way out; the size of the error does not matter here.
#[allow(clippy::result_large_err)]
fn open_tcp(r: &Resolved, timeout: Duration) -> Result<TcpStream, TransportError> {
    let target = describe_target(r);
    let addrs: Vec<SocketAddr> = (r.hostname.as_str(), r.port)
        .to_socket_addrs()
        .map_err(|e| TransportError::Unreachable {
            target: target.clone(),
            reason: format!(
                "cannot resolve the host name `{}` ({e}); check the spelling or add it to ~/.ssh/config",
                r.hostname
            ),
        })?
        .collect();
    let mut last = String::from("no address");
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => {
                last = match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => format!(
                        "connection refused at {addr}: nothing listens there (is sshd running, is the port right?)"
                    ),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => format!(
                        "no answer from {addr} within {}s (host down, wrong address, or a firewall)",
                        timeout.as_secs()
                    ),
                    _ => format!("{addr}: {e}"),
                }
            }
        }
    }
    Err(TransportError::Unreachable {
        target,
        reason: last,
    })
}

#[allow(clippy::result_large_err)]
fn verify_host_key(
    session: &Session,
    r: &Resolved,
    options: &SshOptions,
    home: &Path,
) -> Result<(), TransportError> {
    let (key, _) = session
        .host_key()
        .ok_or_else(|| TransportError::Other("the server sent no host key".into()))?;
    let path = options
        .known_hosts
        .clone()
        .unwrap_or_else(|| home.join(".ssh/known_hosts"));
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let type_name = known_hosts::key_type_name(key).unwrap_or_else(|| "unknown".into());
    let label = known_hosts::key_type_label(&type_name).to_string();
    let fingerprint = known_hosts::fingerprint_sha256(key);
    match known_hosts::check(&text, &r.hostname, r.port, key).map_err(TransportError::Other)? {
        Verdict::Known => Ok(()),
        Verdict::Unknown if options.accept_new_host_key => {
            let line = known_hosts::entry_line(&r.hostname, r.port, key)
                .ok_or_else(|| TransportError::Other("cannot encode the host key".into()))?;
            known_hosts::append(&path, &line).map_err(|e| {
                TransportError::Other(format!(
                    "cannot record the host key in {}: {e}",
                    path.display()
                ))
            })?;
            tracing::warn!(
                "recorded the {label} host key of {} ({fingerprint}) in {}",
                known_hosts::host_field(&r.hostname, r.port),
                path.display()
            );
            Ok(())
        }
        Verdict::Unknown => Err(TransportError::HostKeyUnknown {
            host: known_hosts::host_field(&r.hostname, r.port),
            known_hosts: path.display().to_string(),
            key_file: label.to_ascii_lowercase(),
            key_type: label,
            fingerprint,
        }),
        Verdict::Changed { line } => Err(TransportError::HostKeyChanged {
            host: known_hosts::host_field(&r.hostname, r.port),
            host_field: known_hosts::host_field(&r.hostname, r.port),
            known_hosts: path.display().to_string(),
            line: line.map(|l| format!(" (line {l})")).unwrap_or_default(),
            key_type: label,
            fingerprint,
        }),
    }
}

#[allow(clippy::result_large_err)]
fn authenticate(
    session: &Session,
    r: &Resolved,
    options: &SshOptions,
    home: &Path,
) -> Result<(), TransportError> {
    let mut tried = Vec::new();
    if options.use_agent {
        match try_agent(session, &r.user, options) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(note) => tried.push(note),
        }
        if session.authenticated() {
            return Ok(());
        }
        if tried.is_empty() {
            tried.push("ssh-agent (no key accepted)".into());
        }
    }
    let mut files: Vec<PathBuf> = r.identity_files.clone();
    files.extend(options.identity_files.iter().cloned());
    if options.default_identities {
        for name in ["id_ed25519", "id_ecdsa", "id_rsa"] {
            files.push(home.join(".ssh").join(name));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for file in files {
        if !seen.insert(file.clone()) {
            continue;
        }
        if !file.exists() {
            continue;
        }
        match session.userauth_pubkey_file(&r.user, None, &file, None) {
            Ok(()) if session.authenticated() => return Ok(()),
            Ok(()) => tried.push(format!("{} (not accepted)", file.display())),
            Err(e) => {
                let why = if e.message().contains("decrypt") || e.message().contains("passphrase") {
                    "encrypted: load it with ssh-add instead".to_string()
                } else {
                    "not accepted".to_string()
                };
                tried.push(format!("{} ({why})", file.display()));
            }
        }
    }
    if tried.is_empty() {
        tried.push("nothing: no ssh-agent and no key file found".into());
    }
    Err(TransportError::AuthFailed {
        user: r.user.clone(),
        host: r.hostname.clone(),
        tried: tried.join(", "),
    })
}

/// `Ok(true)` when an agent key was accepted; `Err(note)` describes what was tried otherwise.
fn try_agent(session: &Session, user: &str, options: &SshOptions) -> Result<bool, String> {
    let socket = options
        .agent_socket
        .clone()
        .or_else(|| std::env::var_os("SSH_AUTH_SOCK").map(PathBuf::from));
    let Some(socket) = socket else {
        return Err("ssh-agent (not running: SSH_AUTH_SOCK is not set)".into());
    };
    let mut agent = session.agent().map_err(|e| format!("ssh-agent ({e})"))?;
    agent
        .set_identity_path(&socket)
        .map_err(|e| format!("ssh-agent ({e})"))?;
    agent
        .connect()
        .map_err(|e| format!("ssh-agent at {} (cannot connect: {e})", socket.display()))?;
    agent
        .list_identities()
        .map_err(|e| format!("ssh-agent ({e})"))?;
    let ids = agent.identities().map_err(|e| format!("ssh-agent ({e})"))?;
    for id in &ids {
        if agent.userauth(user, id).is_ok() && session.authenticated() {
            let _ = agent.disconnect();
            return Ok(true);
        }
    }
    let _ = agent.disconnect();
    Err(format!("ssh-agent ({} key(s), none accepted)", ids.len()))
}

/// Restores blocking mode when a non-blocking section ends, also on early return.
struct BlockingGuard<'a>(&'a Session);
impl Drop for BlockingGuard<'_> {
    fn drop(&mut self) {
        self.0.set_blocking(true);
    }
}

/// Stderr with the PGID announcement taken off its first line.
struct StderrFilter {
    head: Option<Vec<u8>>,
    pgid: Option<u32>,
}

impl StderrFilter {
    fn new() -> Self {
        StderrFilter {
            head: Some(Vec::new()),
            pgid: None,
        }
    }

    /// Returns the bytes that belong to the command's real stderr.
    fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        let Some(head) = self.head.as_mut() else {
            return data.to_vec();
        };
        head.extend_from_slice(data);
        let Some(pos) = head.iter().position(|&b| b == b'\n') else {
            return Vec::new();
        };
        let head = self.head.take().unwrap_or_default();
        let first = String::from_utf8_lossy(&head[..pos]);
        match first.strip_prefix(PGID_MARKER).map(str::parse::<u32>) {
            Some(Ok(pgid)) => {
                self.pgid = Some(pgid);
                head[pos + 1..].to_vec()
            }
            _ => head,
        }
    }

    fn finish(&mut self) -> Vec<u8> {
        self.head.take().unwrap_or_default()
    }
}

impl SshTransport {
    fn kill_remote_group(session: &Session, pgid: u32) {
        let run = || -> Result<(), ssh2::Error> {
            let mut ch = session.channel_session()?;
            ch.exec(&format!("kill -KILL -- -{pgid}"))?;
            let mut sink = Vec::new();
            let _ = ch.read_to_end(&mut sink);
            ch.wait_close()
        };
        if let Err(e) = run() {
            tracing::warn!(
                "could not kill the timed-out remote command (process group {pgid}): {e}"
            );
        }
    }
}

impl Transport for SshTransport {
    fn run_streaming(
        &self,
        cmd: &Cmd,
        on_line: &mut dyn FnMut(Stream, &str),
    ) -> anyhow::Result<Output> {
        if cmd.argv.is_empty() {
            return Err(TransportError::Other("empty command".into()).into());
        }
        let line = format!(
            "echo \"{PGID_MARKER}$$\" >&2; exec {}",
            crate::shell::join(&cmd.argv)
        );
        // One line per round trip, naming the host: `-v` shows how many commands a run costs on each host of a
        // fleet (doctor's and provision's facts are meant to be a few rounds, not a probe per question).
        tracing::debug!(target = %self.describe(), "ssh exec: {}", brief(&cmd.display()));
        let inner = self.lock()?;
        let session = &inner.session;
        let mut channel = session
            .channel_session()
            .with_context(|| format!("cannot open an SSH channel to {}", self.describe()))?;
        channel
            .exec(&line)
            .with_context(|| format!("cannot run `{}` on {}", cmd.display(), self.describe()))?;
        let deadline = Instant::now() + cmd.timeout;
        let (mut so, mut se) = (LineSplitter::default(), LineSplitter::default());
        let mut filter = StderrFilter::new();
        let mut stdin_pos = 0usize;
        let mut eof_sent = cmd.stdin.is_none();
        if eof_sent {
            channel.send_eof()?;
        }
        let mut buf = vec![0u8; 64 * 1024];
        session.set_blocking(false);
        let guard = BlockingGuard(session);
        loop {
            let mut progressed = false;
            if let Some(data) = &cmd.stdin {
                if stdin_pos < data.len() {
                    match channel.write(&data[stdin_pos..]) {
                        Ok(n) => {
                            stdin_pos += n;
                            progressed = true;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        // The command exited without reading all its input; not our error.
                        Err(_) => stdin_pos = data.len(),
                    }
                }
                if stdin_pos >= data.len() && !eof_sent {
                    match channel.send_eof() {
                        Ok(()) => eof_sent = true,
                        Err(e) if would_block(&e) => {}
                        Err(_) => eof_sent = true,
                    }
                }
            }
            loop {
                match channel.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        so.push(&buf[..n], |l| on_line(Stream::Stdout, l));
                        progressed = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e).context("reading command output over SSH"),
                }
            }
            loop {
                match channel.stderr().read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let real = filter.feed(&buf[..n]);
                        se.push(&real, |l| on_line(Stream::Stderr, l));
                        progressed = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e).context("reading command errors over SSH"),
                }
            }
            if channel.eof() && !progressed {
                break;
            }
            if !progressed {
                if Instant::now() >= deadline {
                    drop(guard);
                    if let Some(pgid) = filter.pgid {
                        Self::kill_remote_group(session, pgid);
                    }
                    let _ = channel.close();
                    return Err(TransportError::Timeout(cmd.timeout, cmd.display()).into());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        drop(guard);
        let rest = filter.finish();
        se.push(&rest, |l| on_line(Stream::Stderr, l));
        channel.close()?;
        channel.wait_close()?;
        let signalled = channel
            .exit_signal()
            .map(|s| s.exit_signal.is_some())
            .unwrap_or(false);
        let status = if signalled {
            None
        } else {
            Some(channel.exit_status()?)
        };
        Ok(Output {
            status,
            stdout: so.finish(|l| on_line(Stream::Stdout, l)),
            stderr: se.finish(|l| on_line(Stream::Stderr, l)),
        })
    }

    fn read_file(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        tracing::debug!("ssh read: {path}");
        self.with_sftp(|sftp| {
            let mut f = sftp.open(Path::new(path))?;
            let mut data = Vec::new();
            f.read_to_end(&mut data)?;
            Ok(data)
        })
        .with_context(|| format!("cannot read {path} on {}", self.describe()))
    }

    fn write_file(&self, path: &str, data: &[u8], mode: u32) -> anyhow::Result<()> {
        tracing::debug!("ssh write: {path}");
        let tmp = super::temp_path_beside(path);
        let mode = mode & 0o7777;
        let written = self.with_sftp(|sftp| {
            let mut f = sftp.open_mode(
                Path::new(&tmp),
                OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCLUSIVE,
                mode as i32,
                OpenType::File,
            )?;
            // The server applies its umask to the open mode; set it explicitly before the data lands.
            f.setstat(ssh2::FileStat {
                size: None,
                uid: None,
                gid: None,
                perm: Some(mode),
                atime: None,
                mtime: None,
            })?;
            f.write_all(data)?;
            f.fsync()?;
            Ok(())
        });
        if let Err(e) = written {
            let _ = self.with_sftp(|sftp| Ok(sftp.unlink(Path::new(&tmp))?));
            return Err(e.context(format!("cannot write {path} on {}", self.describe())));
        }
        // SFTP's rename refuses to replace an existing file on OpenSSH; mv is rename(2), atomic in one directory.
        let out = self.run(&Cmd::new(["mv", "-f", "--", &tmp, path]))?;
        if !out.success() {
            let _ = self.with_sftp(|sftp| Ok(sftp.unlink(Path::new(&tmp))?));
            anyhow::bail!(
                "cannot move {tmp} to {path} on {}: {}",
                self.describe(),
                out.stderr.trim()
            );
        }
        Ok(())
    }

    fn describe(&self) -> String {
        describe_target(&self.target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_filter_strips_the_marker_across_chunks() {
        let mut f = StderrFilter::new();
        assert!(f.feed(b"llmctl-pg").is_empty());
        assert_eq!(f.feed(b"id=4242\nreal error\n"), b"real error\n");
        assert_eq!(f.pgid, Some(4242));
        assert_eq!(f.feed(b"more"), b"more");

        let mut f = StderrFilter::new();
        assert_eq!(f.feed(b"no marker here\n"), b"no marker here\n");
        assert_eq!(f.pgid, None);
        let mut f = StderrFilter::new();
        assert!(f.feed(b"partial").is_empty());
        assert_eq!(f.finish(), b"partial");
    }
}
