//! Logging setup: `tracing` to stderr, as text or JSON lines. Stdout stays for command output.

use tracing_subscriber::EnvFilter;

use crate::cli::{GlobalArgs, LogFormat};

pub fn init(global: &GlobalArgs) {
    let default = match (global.quiet, global.verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    // RUST_LOG wins, so a user can turn on one module without touching the others.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match global.log_format {
        LogFormat::Text => builder
            .with_ansi(crate::term::fancy_stderr())
            .with_target(false)
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
