//! Progress of a provisioning run on stderr: on a terminal, one indicatif spinner per step whose message is the
//! latest line of the command running under it (apt, the llama.cpp build); elsewhere (CI, logs, pipes) plain
//! lines, every command and every line of its output, so a log shows exactly what happened.

use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Live {
    tty: bool,
    quiet: bool,
    bar: Mutex<Option<ProgressBar>>,
    /// In a fleet: the host's one line, which shows the step and the command under way instead of a spinner
    /// per step (several hosts' steps would interleave).
    host_line: Option<ProgressBar>,
}

impl Live {
    pub fn new(quiet: bool) -> Live {
        Live {
            tty: crate::term::fancy_stderr(),
            quiet,
            bar: Mutex::new(None),
            host_line: None,
        }
    }

    /// One host of a fleet: its progress on the fleet's line for it, or (`None`: off a terminal) nowhere, so
    /// hosts running at once never interleave their lines.
    pub fn host_line(line: Option<ProgressBar>) -> Live {
        Live {
            tty: line.is_some(),
            quiet: line.is_none(),
            bar: Mutex::new(line.clone()),
            host_line: line,
        }
    }

    /// No output at all (tests of pure logic, `--quiet`).
    pub fn silent() -> Live {
        Live {
            tty: false,
            quiet: true,
            bar: Mutex::new(None),
            host_line: None,
        }
    }

    pub fn step_started(&self, index: usize, total: usize, id: &str, title: &str) {
        if self.quiet {
            return;
        }
        if let Some(line) = &self.host_line {
            line.set_message(format!("[{index}/{total}] {id}: {title}"));
            return;
        }
        if self.tty {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix:.bold} {wide_msg:.dim}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_prefix(format!("[{index}/{total}] {id}: {title}"));
            bar.enable_steady_tick(Duration::from_millis(120));
            *self.bar.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar);
        } else {
            eprintln!("[{index}/{total}] {id}: {title}");
        }
    }

    pub fn step_finished(&self) {
        if self.host_line.is_some() {
            return;
        }
        if let Some(bar) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            bar.finish_and_clear();
        }
    }

    /// A command about to run under the current step.
    pub fn command(&self, shown: &str) {
        if self.quiet {
            return;
        }
        match self.bar.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(bar) => bar.set_message(format!("$ {}", clip(shown))),
            None => eprintln!("    $ {shown}"),
        }
    }

    /// One line of a running command's output.
    pub fn line(&self, _stderr: bool, line: &str) {
        if self.quiet {
            return;
        }
        match self.bar.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(bar) => bar.set_message(clip(line).to_string()),
            None => eprintln!("    | {line}"),
        }
    }

    /// A remark under the current step (waiting for a reboot, a health check).
    pub fn note(&self, text: &str) {
        if self.quiet {
            return;
        }
        match self.bar.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(bar) => bar.set_message(text.to_string()),
            None => eprintln!("    {text}"),
        }
    }
}

fn clip(s: &str) -> &str {
    let s = s.trim();
    match s.char_indices().nth(160) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
