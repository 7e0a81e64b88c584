//! The `llmctl` binary: parse the command line, set up logging, run one command, and turn its outcome
//! into an exit code. Every error is printed once, here, as a readable chain — never a panic or a backtrace.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use llmctl::cli::{Cli, Command};
use llmctl::outcome::Outcome;

// mimalloc, for serve-proxy's many small per-request allocations (Cargo.toml says why and what it measured).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    llmctl::logging::init(&cli.global);
    let result = match cli.command {
        Command::ServeProxy(args) => llmctl::proxy::run(&cli.global, args),
        Command::ClientConfig(args) => llmctl::client_config::run(&cli.global, args),
        Command::Doctor(args) => llmctl::doctor::run(&cli.global, args),
        Command::Status(args) => llmctl::status::run(&cli.global, args),
        Command::Logs(args) => llmctl::logs::run(&cli.global, args),
        Command::Provision(args) => llmctl::provision::run(&cli.global, args),
        Command::Init(args) => llmctl::provision::init(&cli.global, args),
        Command::Model(args) => llmctl::model::run(&cli.global, args),
        Command::Probe(args) => llmctl::provision::probe::run(args),
        Command::Completions { shell } => {
            llmctl::cli::completions(shell, &mut std::io::stdout().lock());
            Ok(Outcome::Success)
        }
        Command::Man => llmctl::cli::man(&mut std::io::stdout().lock())
            .map(|()| Outcome::Success)
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(outcome) => outcome.exit_code(),
        Err(err) => {
            // A closed stdout (`llmctl doctor | head`) is not an error worth reporting.
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "error: {err:#}");
            Outcome::CouldNotRun.exit_code()
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
