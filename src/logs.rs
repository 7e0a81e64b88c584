//! `llmctl logs llama|llama-gpu<i>|proxy [-f] [-n N]`: the container's journal of a service, over SSH and
//! `pct exec` (`journalctl -u <unit>`), printed line by line as it arrives; `-f` keeps following until Ctrl-C.
//!
//! `llama` is every llama-server the container runs: `llama-server.service`, or with one replica per GPU each
//! `llama-server-gpu<i>.service`. Which units exist is only known inside the container, so a small `sh` script
//! there lists them and hands all of them to one `journalctl` (one `-u` each): journalctl merges them in time
//! order (`-n` counts lines of the merged journal), and with more than one unit prints each line with its unit
//! (`-o with-unit`), so a replica's lines can be told apart. Merged rather than one unit after another because `-f`
//! must follow every replica at once. `llama-gpu<i>` is the replica on GPU `i` alone.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::cli::GlobalArgs;
use crate::host::facts;
use crate::outcome::Outcome;
use crate::remote::HostArgs;
use crate::transport::{Cmd, Container, Stream, Transport};

#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    /// Whose journal: `llama` (llama-server), `llama-gpu<i>` (one replica) or `proxy` (llmctl-proxy)
    ///
    /// llama: llama-server.service; with one llama-server per GPU, every llama-server-gpu<i>.service, merged
    /// in time order, each line naming its unit.
    ///
    /// llama-gpu<i>: llama-server-gpu<i>.service alone, the replica on GPU i (its unit name works too).
    ///
    /// proxy: llmctl-proxy.service.
    #[arg(value_parser = parse_service, value_name = "SERVICE")]
    pub service: Service,
    /// Keep printing new lines as they come, until Ctrl-C.
    #[arg(short, long)]
    pub follow: bool,
    /// How many of the last lines to print first (with several llama-servers: of their merged journal).
    #[arg(short = 'n', long, value_name = "N", default_value_t = 100)]
    pub lines: u32,
    #[command(flatten)]
    pub target: HostArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Every llama-server unit in the container (the one llama-server.service, or each replica's).
    Llama,
    /// The replica on GPU `i`: llama-server-gpu<i>.service.
    Replica(u32),
    /// llmctl-proxy.service
    Proxy,
}

/// `llama`, `llama-gpu<i>` or `proxy`. The replica's own unit name (`llama-server-gpu1`, with or without
/// `.service`) is taken too: it is what `llmctl status` and doctor print.
pub fn parse_service(s: &str) -> Result<Service, String> {
    let name = s.trim().strip_suffix(".service").unwrap_or(s.trim());
    match name {
        "llama" | facts::LLAMA_UNIT => return Ok(Service::Llama),
        "proxy" | facts::PROXY_UNIT => return Ok(Service::Proxy),
        _ => {}
    }
    let gpu = name
        .strip_prefix("llama-gpu")
        .or_else(|| name.strip_prefix(facts::REPLICA_UNIT_PREFIX));
    match gpu.map(str::parse::<u32>) {
        Some(Ok(i)) => Ok(Service::Replica(i)),
        _ => Err(format!(
            "`{s}` is not a service: `llama` (every llama-server), `llama-gpu<i>` (the replica on GPU i, e.g. llama-gpu1) or `proxy`"
        )),
    }
}

impl Service {
    /// The unit named in messages: the llama-servers as a group, or the one unit.
    pub fn describe(self) -> String {
        match self {
            Service::Llama => "the llama-server units".into(),
            Service::Replica(i) => format!("{}.service", facts::replica_unit(i)),
            Service::Proxy => format!("{}.service", facts::PROXY_UNIT),
        }
    }
}

/// Inside the container, for the llama-servers. `$1`: the unit directory, `$2`: `all` or one replica's unit,
/// then journalctl's own options. `all`: every `llama-server-gpu*.service` there, and `llama-server` when there is
/// none or its file is there too (doctor's rule: a single unit without its file still has a journal worth
/// reading, and is what an older installation runs). A named replica whose file is not there is not read (its
/// journal would only say `-- No entries --`): a `llmctl-logs:` line on stderr lists the replicas there are.
pub const LLAMA_JOURNAL_SCRIPT: &str = r##"dir=$1; want=$2; shift 2
replicas=
for f in "$dir"/llama-server-gpu*.service; do
  [ -f "$f" ] || continue
  u=${f##*/}; u=${u%.service}
  case $u in *[!a-z0-9-]*) continue ;; esac
  replicas="$replicas $u"
done
if [ "$want" = all ]; then
  units=$replicas
  if [ -z "$units" ] || [ -f "$dir/llama-server.service" ]; then units="llama-server$units"; fi
elif [ -f "$dir/$want.service" ]; then
  units=$want
else
  echo "llmctl-logs: no-unit$replicas" >&2
  exit 64
fi
args=; n=0
for u in $units; do args="$args -u $u"; n=$((n + 1)); done
if [ "$n" -gt 1 ]; then args="$args -o with-unit"; fi
exec journalctl $args "$@"
"##;

/// The command run inside the container. `--no-pager`: no terminal there, and none wanted.
pub fn journal_argv(service: Service, lines: u32, follow: bool) -> Vec<String> {
    let mut argv: Vec<String> = match service {
        Service::Proxy => vec!["journalctl".into(), "-u".into(), facts::PROXY_UNIT.into()],
        Service::Llama | Service::Replica(_) => vec![
            "sh".into(),
            "-c".into(),
            LLAMA_JOURNAL_SCRIPT.into(),
            "llmctl-logs".into(),
            facts::REPLICA_UNIT_DIR.trim_end_matches('/').into(),
            match service {
                Service::Replica(i) => facts::replica_unit(i),
                _ => "all".into(),
            },
        ],
    };
    argv.extend(["-n".into(), lines.to_string(), "--no-pager".into()]);
    if follow {
        argv.push("-f".into());
    }
    argv
}

/// The script's `llmctl-logs: no-unit ...` line → the replicas the container has.
fn missing_unit(line: &str) -> Option<Vec<String>> {
    let rest = line.trim().strip_prefix("llmctl-logs: no-unit")?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Why a named replica cannot be read, and what to read instead.
fn no_replica_error(service: Service, vmid: u32, replicas: &[String]) -> anyhow::Error {
    let there = if replicas.is_empty() {
        "it runs one llama-server (`llmctl logs llama`), no replica per GPU".to_string()
    } else {
        format!(
            "its replicas are {} (`llmctl logs llama` reads them all)",
            replicas.join(", ")
        )
    };
    anyhow::anyhow!("container {vmid} has no {}: {there}", service.describe())
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
    let mut missing = None;
    let out = ct
        .run_streaming(&cmd, &mut |stream, line| {
            if write_err.is_some() {
                return;
            }
            if stream == Stream::Stderr
                && let Some(replicas) = missing_unit(line)
            {
                // The script's own word, not journalctl's: turned into an error below.
                missing = Some(replicas);
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
                args.service.describe(),
                ct.describe()
            )
        })?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    if let Some(replicas) = missing {
        return Err(no_replica_error(args.service, vmid, &replicas));
    }
    if !out.success() {
        bail!(
            "journalctl for {} in container {vmid} exited with {}: run `llmctl doctor` to see what is wrong there",
            args.service.describe(),
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
        let llama = journal_argv(Service::Llama, 5, true);
        assert_eq!(llama[..3], ["sh", "-c", LLAMA_JOURNAL_SCRIPT]);
        assert_eq!(
            llama[3..].join(" "),
            "llmctl-logs /etc/systemd/system all -n 5 --no-pager -f"
        );
        assert_eq!(
            journal_argv(Service::Replica(1), 5, false)[3..].join(" "),
            "llmctl-logs /etc/systemd/system llama-server-gpu1 -n 5 --no-pager"
        );
    }

    #[test]
    fn services_are_named_as_status_and_doctor_print_them() {
        assert_eq!(parse_service("llama"), Ok(Service::Llama));
        assert_eq!(parse_service("proxy"), Ok(Service::Proxy));
        assert_eq!(parse_service("llmctl-proxy"), Ok(Service::Proxy));
        for s in [
            "llama-gpu1",
            "llama-server-gpu1",
            "llama-server-gpu1.service",
        ] {
            assert_eq!(parse_service(s), Ok(Service::Replica(1)), "{s}");
        }
        assert_eq!(parse_service("llama-gpu12"), Ok(Service::Replica(12)));
        for bad in ["llama-gpu", "llama-gpu-1", "gpu1", "llamas", ""] {
            let e = parse_service(bad).unwrap_err();
            assert!(e.contains("llama-gpu<i>"), "{bad}: {e}");
        }
        assert_eq!(
            missing_unit("llmctl-logs: no-unit llama-server-gpu0 llama-server-gpu1"),
            Some(vec!["llama-server-gpu0".into(), "llama-server-gpu1".into()])
        );
        assert_eq!(missing_unit("Failed to add match"), None);
        let e = no_replica_error(Service::Replica(3), 103, &[]).to_string();
        assert_eq!(
            e,
            "container 103 has no llama-server-gpu3.service: it runs one llama-server (`llmctl logs llama`), no replica per GPU"
        );
    }

    /// The container script under a real `sh`, on a unit directory like provision leaves it, with a
    /// `journalctl` on PATH that prints the arguments it was given.
    fn script(dir: &std::path::Path, want: &str) -> std::process::Output {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let fake = bin.join("journalctl");
        std::fs::write(&fake, "#!/bin/sh\necho \"journalctl $*\"\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        std::process::Command::new("sh")
            .args(["-c", LLAMA_JOURNAL_SCRIPT, "llmctl-logs"])
            .arg(dir.join("units"))
            .args([want, "-n", "7", "--no-pager"])
            .env("PATH", path)
            .output()
            .unwrap()
    }

    #[test]
    fn the_script_reads_every_llama_server_unit_there_is() {
        let dir = tempfile::tempdir().unwrap();
        let units = dir.path().join("units");
        std::fs::create_dir_all(&units).unwrap();
        let stdout = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
        // No unit at all: the one llama-server's journal, as before replicas.
        let o = script(dir.path(), "all");
        assert_eq!(stdout(&o), "journalctl -u llama-server -n 7 --no-pager\n");
        std::fs::write(units.join("llama-server.service"), "").unwrap();
        let o = script(dir.path(), "all");
        assert_eq!(stdout(&o), "journalctl -u llama-server -n 7 --no-pager\n");
        // Replicas (GPU 10 too: every file, not a range): merged, each line with its unit.
        std::fs::remove_file(units.join("llama-server.service")).unwrap();
        for i in [0, 1, 10] {
            std::fs::write(units.join(format!("llama-server-gpu{i}.service")), "").unwrap();
        }
        std::fs::write(units.join("llama-server-gpu x.service"), "").unwrap();
        let o = script(dir.path(), "all");
        assert_eq!(
            stdout(&o),
            "journalctl -u llama-server-gpu0 -u llama-server-gpu1 -u llama-server-gpu10 -o with-unit -n 7 --no-pager\n"
        );
        let o = script(dir.path(), "llama-server-gpu1");
        assert_eq!(
            stdout(&o),
            "journalctl -u llama-server-gpu1 -n 7 --no-pager\n"
        );
        // A replica that is not there: not read, and the ones there are named.
        let o = script(dir.path(), "llama-server-gpu2");
        assert_eq!(o.status.code(), Some(64));
        assert_eq!(stdout(&o), "");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            missing_unit(&err),
            Some(vec![
                "llama-server-gpu0".into(),
                "llama-server-gpu1".into(),
                "llama-server-gpu10".into()
            ]),
            "{err}"
        );
    }
}
