//! `llmctl logs llama|proxy [-f] [-n N]`: the container's journal of one service, over SSH and `pct exec`
//! (`journalctl -u <unit>`), printed line by line as it arrives; `-f` keeps following until Ctrl-C.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use crate::cli::GlobalArgs;
use crate::outcome::Outcome;
use crate::remote::HostArgs;
use crate::transport::{Cmd, Container, Stream, Transport};

#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    /// Whose journal: `llama` (llama-server) or `proxy` (llmctl-proxy).
    #[arg(value_enum)]
    pub service: Service,
    /// Keep printing new lines as they come, until Ctrl-C.
    #[arg(short, long)]
    pub follow: bool,
    /// How many of the last lines to print first.
    #[arg(short = 'n', long, value_name = "N", default_value_t = 100)]
    pub lines: u32,
    #[command(flatten)]
    pub target: HostArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Service {
    /// llama-server.service
    Llama,
    /// llmctl-proxy.service
    Proxy,
}

impl Service {
    pub fn unit(self) -> &'static str {
        match self {
            Service::Llama => crate::host::facts::LLAMA_UNIT,
            Service::Proxy => crate::host::facts::PROXY_UNIT,
        }
    }
}

/// The command run inside the container. `--no-pager`: no terminal there, and none wanted.
pub fn journal_argv(service: Service, lines: u32, follow: bool) -> Vec<String> {
    let mut argv = vec![
        "journalctl".to_string(),
        "-u".into(),
        service.unit().into(),
        "-n".into(),
        lines.to_string(),
        "--no-pager".into(),
    ];
    if follow {
        argv.push("-f".into());
    }
    argv
}

pub fn run(global: &GlobalArgs, args: LogsArgs) -> Result<Outcome> {
    let remote = args.target.resolve(global)?;
    let host = remote.connect()?;
    let vmid = match remote.vmid {
        Some(v) => v,
        None => crate::status::find_vmid(host.as_ref())?,
    };
    let ct = Container::new(host.as_ref(), vmid);
    // -f runs until the user stops it; a plain read gets the usual limit.
    let timeout = if args.follow {
        Duration::from_secs(10 * 365 * 24 * 3600)
    } else {
        Duration::from_secs(120)
    };
    let cmd = Cmd::new(journal_argv(args.service, args.lines, args.follow)).timeout(timeout);
    let mut write_err = None;
    let out = ct
        .run_streaming(&cmd, &mut |stream, line| {
            if write_err.is_some() {
                return;
            }
            let r = match stream {
                Stream::Stdout => {
                    let mut o = std::io::stdout().lock();
                    writeln!(o, "{line}").and_then(|()| o.flush())
                }
                Stream::Stderr => writeln!(std::io::stderr(), "{line}"),
            };
            match r {
                // `llmctl logs -f | head`: the reader is gone, and following would never end on its own.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
                r => write_err = r.err(),
            }
        })
        .with_context(|| {
            format!(
                "cannot read the journal of {} in {}",
                args.service.unit(),
                ct.describe()
            )
        })?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    if !out.success() {
        bail!(
            "journalctl -u {} in container {vmid} exited with {}: run `llmctl doctor` to see what is wrong there",
            args.service.unit(),
            out.status
                .map_or("a signal".to_string(), |c| format!("status {c}"))
        );
    }
    Ok(Outcome::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_command_names_the_unit() {
        assert_eq!(
            journal_argv(Service::Proxy, 20, false),
            ["journalctl", "-u", "llmctl-proxy", "-n", "20", "--no-pager"]
        );
        assert_eq!(
            journal_argv(Service::Llama, 5, true).join(" "),
            "journalctl -u llama-server -n 5 --no-pager -f"
        );
    }
}
