//! Test doubles for [`Transport`]: a [`FakeHost`] that answers commands from a script and keeps files in memory,
//! and a [`RecordingTransport`] that writes down what a real host answered, so a fake's script comes from a real
//! run (tests/fast_tier.rs records `doctor` and `provision --check` against the simulated host, then replays them
//! in-process). Neither is used by the llmctl binary; they live in the library so integration tests can use them.
//!
//! A [`FakeHost`] records every command, read and write it receives, in order ([`FakeHost::events`]). A command it
//! has no answer for is an error naming the command, and is kept in [`FakeHost::unanswered`] (code that ignores a
//! failed command still cannot hide that it ran one the script did not know).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::{Cmd, Output, Stream, Transport};

/// One command a real host answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedCommand {
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// `None`: killed by a signal.
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// One file a real host's `read_file` returned (text; binary bytes are kept lossily).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedFile {
    pub path: String,
    pub data: String,
}

/// What a host answered, in the order it was asked. The same command asked twice with the same answer is kept
/// once; with different answers, each answer in turn (a fake replays them in that order, then keeps the last).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recording {
    pub commands: Vec<RecordedCommand>,
    pub files: Vec<RecordedFile>,
}

impl Recording {
    fn add_command(&mut self, c: RecordedCommand) {
        if !self.commands.contains(&c) {
            self.commands.push(c);
        }
    }

    fn add_file(&mut self, f: RecordedFile) {
        if !self.files.contains(&f) {
            self.files.push(f);
        }
    }

    /// Refuses a recording that holds a private key (an SSH or TLS key must never land in a fixture).
    pub fn check_no_secrets(&self) -> anyhow::Result<()> {
        let texts = self
            .commands
            .iter()
            .flat_map(|c| [&c.stdout, &c.stderr])
            .chain(self.files.iter().map(|f| &f.data));
        if texts.into_iter().any(|t| t.contains("PRIVATE KEY")) {
            anyhow::bail!("the recording holds a private key; it must not be saved");
        }
        Ok(())
    }
}

/// Wraps a real transport and writes down every command (argv, stdin, exit status, stdout, stderr) and every file
/// read, for a [`FakeHost`] to replay. A command asked again is answered from the recording (a read-only run sees
/// the same host; doctor and provision gather the same facts). Writes are refused: a recording is taken of read-only runs (`doctor`,
/// `provision --check`). Reads of `redact`ed paths (`read_file`, or `cat PATH` on the host or in a container) are
/// recorded as `<redacted>`.
#[derive(Clone)]
pub struct RecordingTransport {
    inner: Arc<dyn Transport>,
    log: Arc<Mutex<Recording>>,
    redact: Arc<Vec<String>>,
    max_timeout: Option<std::time::Duration>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl RecordingTransport {
    pub fn new(inner: Arc<dyn Transport>, redact: Vec<String>) -> Self {
        RecordingTransport {
            inner,
            log: Arc::default(),
            redact: Arc::new(redact),
            max_timeout: None,
            errors: Arc::default(),
        }
    }

    /// Gives every command at most `max` (a simulated host answers in seconds; a hung channel should not cost a
    /// probe's full timeout before the recording is made again).
    pub fn with_max_timeout(mut self, max: std::time::Duration) -> Self {
        self.max_timeout = Some(max);
        self
    }

    /// What was recorded so far.
    pub fn recording(&self) -> Recording {
        lock(&self.log).clone()
    }

    /// The commands and reads the transport itself failed (a timeout, a dropped connection): not in the recording,
    /// so a recording with any is incomplete even where the code under test carried on.
    pub fn errors(&self) -> Vec<String> {
        lock(&self.errors).clone()
    }

    fn redacted(&self, argv: &[String]) -> bool {
        let inner = match argv {
            [pct, exec, _, dash, rest @ ..] if pct == "pct" && exec == "exec" && dash == "--" => {
                rest
            }
            _ => argv,
        };
        matches!(inner, [cat, path] if cat == "cat" && self.redact.contains(path))
    }
}

const REDACTED: &str = "<redacted>";

impl Transport for RecordingTransport {
    fn run_streaming(
        &self,
        cmd: &Cmd,
        on_line: &mut dyn FnMut(Stream, &str),
    ) -> anyhow::Result<Output> {
        let stdin = cmd
            .stdin
            .as_ref()
            .map(|s| String::from_utf8_lossy(s).into_owned());
        let seen = lock(&self.log)
            .commands
            .iter()
            .find(|c| c.argv == cmd.argv && c.stdin == stdin)
            .cloned();
        if let Some(c) = seen.filter(|c| c.stdout != REDACTED) {
            // A read-only run sees the same host: asked again, the same answer, without the round trip.
            for l in c.stdout.lines() {
                on_line(Stream::Stdout, l);
            }
            for l in c.stderr.lines() {
                on_line(Stream::Stderr, l);
            }
            return Ok(Output {
                status: c.status,
                stdout: c.stdout,
                stderr: c.stderr,
            });
        }
        let capped;
        let cmd = match self.max_timeout {
            Some(max) if cmd.timeout > max => {
                capped = cmd.clone().timeout(max);
                &capped
            }
            _ => cmd,
        };
        let out = match self.inner.run_streaming(cmd, on_line) {
            Ok(out) => out,
            Err(e) => {
                lock(&self.errors).push(format!("`{}`: {e:#}", cmd.display()));
                return Err(e);
            }
        };
        let stdout = if self.redacted(&cmd.argv) {
            REDACTED.to_string()
        } else {
            out.stdout.clone()
        };
        lock(&self.log).add_command(RecordedCommand {
            argv: cmd.argv.clone(),
            stdin,
            status: out.status,
            stdout,
            stderr: out.stderr.clone(),
        });
        Ok(out)
    }

    fn read_file(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let data = self.inner.read_file(path).inspect_err(|e| {
            lock(&self.errors).push(format!("read {path}: {e:#}"));
        })?;
        let kept = if self.redact.iter().any(|p| p == path) {
            REDACTED.to_string()
        } else {
            String::from_utf8_lossy(&data).into_owned()
        };
        lock(&self.log).add_file(RecordedFile {
            path: path.to_string(),
            data: kept,
        });
        Ok(data)
    }

    fn write_file(&self, path: &str, _data: &[u8], _mode: u32) -> anyhow::Result<()> {
        anyhow::bail!("a recording is read-only: refusing to write {path}")
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// What a [`FakeHost`] received, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Run {
        argv: Vec<String>,
        stdin: Option<Vec<u8>>,
    },
    Read {
        path: String,
    },
    Write {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
}

/// A file in a [`FakeHost`]'s memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeFile {
    pub data: Vec<u8>,
    pub mode: u32,
}

type Key = (Vec<String>, Option<Vec<u8>>);

#[derive(Default)]
struct State {
    exact: BTreeMap<Key, VecDeque<Output>>,
    prefix: Vec<(Vec<String>, Output)>,
    /// Files by (container, path): `None` is the host.
    files: BTreeMap<(Option<u32>, String), FakeFile>,
    file_commands: bool,
    temp_counter: u64,
    events: Vec<Event>,
    unanswered: Vec<String>,
}

/// A host in memory: commands answered from a script (exact argv and stdin, or an argv prefix), files in memory
/// (the host's and, through `pct exec`/`pct push`/`pct pull`, each container's), every command and file access
/// recorded. Cheap to clone; clones share the host.
#[derive(Clone)]
pub struct FakeHost {
    name: String,
    state: Arc<Mutex<State>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An exit status with its output.
pub fn output(status: i32, stdout: &str, stderr: &str) -> Output {
    Output {
        status: Some(status),
        stdout: stdout.to_string(),
        stderr: stderr.to_string(),
    }
}

impl FakeHost {
    /// A host that knows no command and holds no file; `name` is what [`Transport::describe`] says.
    pub fn new(name: &str) -> Self {
        FakeHost {
            name: name.to_string(),
            state: Arc::default(),
        }
    }

    /// A host that answers exactly what a real one answered in `rec`, and holds the files read there.
    pub fn from_recording(name: &str, rec: &Recording) -> Self {
        let host = FakeHost::new(name);
        for c in &rec.commands {
            host.answer_with_stdin(
                c.argv.clone(),
                c.stdin.as_ref().map(|s| s.as_bytes().to_vec()),
                Output {
                    status: c.status,
                    stdout: c.stdout.clone(),
                    stderr: c.stderr.clone(),
                },
            );
        }
        for f in &rec.files {
            host.put_file(&f.path, f.data.as_bytes(), 0o644);
        }
        host
    }

    /// Also carries out, on its in-memory files, the file commands llmctl's own writes and backups issue (on the
    /// host, or in a container through `pct exec VMID --`): `test -e|-f`, `cat`, `mkdir -p`, `cp -a`, `mv -f`,
    /// `rm -f`, `mktemp`, `pct push`, `pct pull`. `test` and `cat` of a path it does not hold fall back to the
    /// script, and so do the others when the file they need is not in memory (a file an accepted command would have
    /// made).
    pub fn with_file_commands(self) -> Self {
        lock(&self.state).file_commands = true;
        self
    }

    /// Answers `argv` (with no stdin) with `out`; a second answer for the same argv is given the second time.
    pub fn answer<S: Into<String>>(&self, argv: impl IntoIterator<Item = S>, out: Output) {
        self.answer_with_stdin(argv.into_iter().map(Into::into).collect(), None, out);
    }

    pub fn answer_with_stdin(&self, argv: Vec<String>, stdin: Option<Vec<u8>>, out: Output) {
        lock(&self.state)
            .exact
            .entry((argv, stdin))
            .or_default()
            .push_back(out);
    }

    /// Answers `argv` (with no stdin) with `out` from now on, whatever was scripted for it before.
    pub fn replace_answer<S: Into<String>>(&self, argv: impl IntoIterator<Item = S>, out: Output) {
        let argv: Vec<String> = argv.into_iter().map(Into::into).collect();
        lock(&self.state)
            .exact
            .insert((argv, None), VecDeque::from([out]));
    }

    /// The answer `argv` (with no stdin) would get next, without asking (and without recording it).
    pub fn peek(&self, argv: &[String]) -> Option<Output> {
        let s = lock(&self.state);
        s.exact
            .get(&(argv.to_vec(), None))
            .and_then(|q| q.front().cloned())
            .or_else(|| {
                s.prefix
                    .iter()
                    .find(|(p, _)| argv.starts_with(p))
                    .map(|(_, o)| o.clone())
            })
    }

    /// Answers any command that starts with `prefix` (when no exact answer matches) with `out`.
    pub fn answer_prefix<S: Into<String>>(&self, prefix: impl IntoIterator<Item = S>, out: Output) {
        lock(&self.state)
            .prefix
            .push((prefix.into_iter().map(Into::into).collect(), out));
    }

    /// Puts a file on the host.
    pub fn put_file(&self, path: &str, data: &[u8], mode: u32) {
        lock(&self.state).files.insert(
            (None, path.to_string()),
            FakeFile {
                data: data.to_vec(),
                mode,
            },
        );
    }

    /// A file on the host (`vmid` None) or in a container.
    pub fn file(&self, vmid: Option<u32>, path: &str) -> Option<FakeFile> {
        lock(&self.state)
            .files
            .get(&(vmid, path.to_string()))
            .cloned()
    }

    /// Everything received so far, in order.
    pub fn events(&self) -> Vec<Event> {
        lock(&self.state).events.clone()
    }

    /// Forgets the events so far (to look at what one phase did).
    pub fn clear_events(&self) {
        lock(&self.state).events.clear();
    }

    /// Commands it had no answer for, as command lines.
    pub fn unanswered(&self) -> Vec<String> {
        lock(&self.state).unanswered.clone()
    }

    fn scripted(s: &mut State, cmd: &Cmd) -> Option<Output> {
        let key = (cmd.argv.clone(), cmd.stdin.clone());
        if let Some(q) = s.exact.get_mut(&key) {
            return if q.len() > 1 {
                q.pop_front()
            } else {
                q.front().cloned()
            };
        }
        s.prefix
            .iter()
            .find(|(p, _)| cmd.argv.starts_with(p))
            .map(|(_, o)| o.clone())
    }

    /// The file commands of [`Self::with_file_commands`]; `None` when `argv` is not one of them.
    fn file_command(s: &mut State, cmd: &Cmd) -> Option<Output> {
        let argv = &cmd.argv;
        let (ct, args): (Option<u32>, &[String]) = match argv.as_slice() {
            [pct, exec, v, dash, rest @ ..] if pct == "pct" && exec == "exec" && dash == "--" => {
                (Some(v.parse().ok()?), rest)
            }
            _ => (None, argv.as_slice()),
        };
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let key = |p: &str| (ct, p.to_string());
        let ok = || output(0, "", "");
        let missing = |tool: &str, p: &str| {
            output(1, "", &format!("{tool}: {p}: No such file or directory\n"))
        };
        match a.as_slice() {
            ["test", "-e" | "-f", p] => {
                if s.files.contains_key(&key(p)) {
                    Some(ok())
                } else {
                    Some(Self::scripted(s, cmd).unwrap_or_else(|| output(1, "", "")))
                }
            }
            ["cat", p] => match s.files.get(&key(p)) {
                Some(f) => Some(output(0, &String::from_utf8_lossy(&f.data), "")),
                None => Some(Self::scripted(s, cmd).unwrap_or_else(|| missing("cat", p))),
            },
            ["mkdir", ..] => Some(ok()),
            ["cp", "-a", "--", from, to] => match s.files.get(&key(from)).cloned() {
                Some(f) => {
                    s.files.insert(key(to), f);
                    Some(ok())
                }
                None => Some(Self::scripted(s, cmd).unwrap_or_else(|| missing("cp", from))),
            },
            ["mv", "-f", "--", from, to] => match s.files.remove(&key(from)) {
                Some(f) => {
                    s.files.insert(key(to), f);
                    Some(ok())
                }
                None => Some(Self::scripted(s, cmd).unwrap_or_else(|| missing("mv", from))),
            },
            ["rm", "-f", "--", paths @ ..] => {
                for p in paths {
                    s.files.remove(&key(p));
                }
                Some(ok())
            }
            ["mktemp", template] if ct.is_none() => {
                s.temp_counter += 1;
                let path = format!("{}{:0>8}", template.trim_end_matches('X'), s.temp_counter);
                s.files.insert(
                    key(&path),
                    FakeFile {
                        data: Vec::new(),
                        mode: 0o600,
                    },
                );
                Some(output(0, &format!("{path}\n"), ""))
            }
            ["pct", "push", v, from, to, rest @ ..] if ct.is_none() => {
                let vmid: u32 = v.parse().ok()?;
                let mode = match rest {
                    ["--perms", m] => u32::from_str_radix(m, 8).ok()?,
                    _ => 0o644,
                };
                match s.files.get(&(None, from.to_string())).cloned() {
                    Some(f) => {
                        s.files.insert(
                            (Some(vmid), to.to_string()),
                            FakeFile { data: f.data, mode },
                        );
                        Some(ok())
                    }
                    None => {
                        Some(Self::scripted(s, cmd).unwrap_or_else(|| missing("pct push", from)))
                    }
                }
            }
            ["pct", "pull", v, from, to] if ct.is_none() => {
                let vmid: u32 = v.parse().ok()?;
                match s.files.get(&(Some(vmid), from.to_string())).cloned() {
                    Some(f) => {
                        s.files.insert((None, to.to_string()), f);
                        Some(ok())
                    }
                    None => {
                        Some(Self::scripted(s, cmd).unwrap_or_else(|| missing("pct pull", from)))
                    }
                }
            }
            _ => None,
        }
    }
}

impl Transport for FakeHost {
    fn run_streaming(
        &self,
        cmd: &Cmd,
        on_line: &mut dyn FnMut(Stream, &str),
    ) -> anyhow::Result<Output> {
        let out = {
            let mut s = lock(&self.state);
            s.events.push(Event::Run {
                argv: cmd.argv.clone(),
                stdin: cmd.stdin.clone(),
            });
            let handled = if s.file_commands {
                Self::file_command(&mut s, cmd)
            } else {
                None
            };
            match handled.or_else(|| Self::scripted(&mut s, cmd)) {
                Some(o) => o,
                None => {
                    s.unanswered.push(cmd.display());
                    anyhow::bail!(
                        "the fake host {} has no answer for `{}` (not in its recording: a new or changed probe \
                         needs the recordings made again)",
                        self.name,
                        cmd.display()
                    );
                }
            }
        };
        for l in out.stdout.lines() {
            on_line(Stream::Stdout, l);
        }
        for l in out.stderr.lines() {
            on_line(Stream::Stderr, l);
        }
        Ok(out)
    }

    fn read_file(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let mut s = lock(&self.state);
        s.events.push(Event::Read {
            path: path.to_string(),
        });
        match s.files.get(&(None, path.to_string())) {
            Some(f) => Ok(f.data.clone()),
            None => {
                s.unanswered.push(format!("read {path}"));
                anyhow::bail!(
                    "the fake host {} holds no file {path} (not in its recording)",
                    self.name
                )
            }
        }
    }

    fn write_file(&self, path: &str, data: &[u8], mode: u32) -> anyhow::Result<()> {
        let mut s = lock(&self.state);
        s.events.push(Event::Write {
            path: path.to_string(),
            data: data.to_vec(),
            mode,
        });
        s.files.insert(
            (None, path.to_string()),
            FakeFile {
                data: data.to_vec(),
                mode,
            },
        );
        Ok(())
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Container;

    #[test]
    fn answers_from_its_script_and_names_what_it_does_not_know() {
        let host = FakeHost::new("root@fake");
        host.answer(["uname", "-r"], output(0, "6.17.2-1-pve\n", ""));
        host.answer(["pct", "status", "103"], output(0, "status: stopped\n", ""));
        host.answer(["pct", "status", "103"], output(0, "status: running\n", ""));
        assert_eq!(
            host.run(&Cmd::new(["uname", "-r"])).unwrap().stdout,
            "6.17.2-1-pve\n"
        );
        let status = || {
            host.run(&Cmd::new(["pct", "status", "103"]))
                .unwrap()
                .stdout
        };
        assert_eq!(
            [status(), status(), status()],
            [
                "status: stopped\n",
                "status: running\n",
                "status: running\n"
            ]
        );
        let err = host
            .run(&Cmd::new(["nvidia-smi", "-L"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no answer for `nvidia-smi -L`"), "{err}");
        assert_eq!(host.unanswered(), ["nvidia-smi -L"]);
        assert_eq!(host.events().len(), 5);
    }

    #[test]
    fn container_writes_land_in_the_containers_files() {
        let host = FakeHost::new("root@fake").with_file_commands();
        let ct = Container::new(&host, 103);
        ct.write_file("/etc/x.conf", b"hello\n", 0o640).unwrap();
        let f = host.file(Some(103), "/etc/x.conf").unwrap();
        assert_eq!((f.data.as_slice(), f.mode), (&b"hello\n"[..], 0o640));
        assert_eq!(ct.read_file("/etc/x.conf").unwrap(), b"hello\n");
        // The host's temp files are gone again; the container's file is not on the host.
        assert!(host.file(None, "/etc/x.conf").is_none());
        let temps = host
            .events()
            .iter()
            .any(|e| matches!(e, Event::Run { argv, .. } if argv[0] == "mktemp"));
        assert!(temps);
        let out = ct.run(&Cmd::new(["cat", "/etc/x.conf"])).unwrap();
        assert_eq!(out.stdout, "hello\n");
        assert!(
            !ct.run(&Cmd::new(["test", "-e", "/nope"]))
                .unwrap()
                .success()
        );
    }

    #[test]
    fn a_recording_replays_and_redacts() {
        let real = FakeHost::new("root@real");
        real.answer(["cat", "/etc/llmctl/key"], output(0, "sk-secret\n", ""));
        real.answer(["uname", "-r"], output(0, "6.8\n", ""));
        real.put_file("/etc/pve/lxc/103.conf", b"arch: amd64\n", 0o640);
        let rec = RecordingTransport::new(Arc::new(real), vec!["/etc/llmctl/key".into()]);
        rec.run(&Cmd::new(["uname", "-r"])).unwrap();
        assert_eq!(rec.run(&Cmd::new(["uname", "-r"])).unwrap().stdout, "6.8\n");
        rec.run(&Cmd::new(["cat", "/etc/llmctl/key"])).unwrap();
        rec.read_file("/etc/pve/lxc/103.conf").unwrap();
        assert!(rec.write_file("/x", b"", 0o600).is_err());
        let r = rec.recording();
        assert_eq!(r.commands.len(), 2, "the same answer is kept once");
        assert_eq!(r.commands[1].stdout, "<redacted>");
        let fake = FakeHost::from_recording("root@fake", &r);
        assert_eq!(
            fake.run(&Cmd::new(["uname", "-r"])).unwrap().stdout,
            "6.8\n"
        );
        assert_eq!(
            fake.read_file("/etc/pve/lxc/103.conf").unwrap(),
            b"arch: amd64\n"
        );
        let mut with_key = r.clone();
        with_key.files[0].data = "-----BEGIN OPENSSH PRIVATE KEY-----".into();
        assert!(with_key.check_no_secrets().is_err());
        assert!(r.check_no_secrets().is_ok());
    }
}
