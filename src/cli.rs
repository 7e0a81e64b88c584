//! The command line, and nothing else: each command's own arguments live beside the code that runs it
//! (`proxy::ServeProxyArgs`, `doctor::DoctorArgs`, ...) so that a command and its flags change together.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "llmctl", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Path of llmctl.toml [default: ./llmctl.toml when present]
    #[arg(long, global = true, env = "LLMCTL_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// More output (-v: debug, -vv: trace). RUST_LOG overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "LLMCTL_LOG_FORMAT")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the Anthropic Messages and OpenAI Responses APIs in front of an OpenAI-compatible server (llama-server, vLLM, Ollama...).
    ServeProxy(Box<crate::proxy::ServeProxyArgs>),
    /// Print or write the client settings for Claude Code, Codex CLI or pi.
    ClientConfig(crate::client_config::ClientConfigArgs),
    /// Find what is broken on a Proxmox host and its GPU container, and say how to fix it.
    Doctor(crate::doctor::DoctorArgs),
    /// Install and configure the whole stack on a Proxmox host, idempotently.
    Provision(crate::provision::ProvisionArgs),
    /// Write a commented llmctl.toml for the guide's setup.
    Init(crate::provision::InitArgs),
    /// Inspect GGUF models, download them, and plan GPU offload.
    Model(crate::model::ModelArgs),
    /// Health and smoke checks provision runs inside the container.
    #[command(hide = true)]
    Probe(crate::provision::probe::ProbeArgs),
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// One name per idea across commands; the other spelling a user may bring from a sibling command works too.
    #[test]
    fn sibling_commands_accept_each_others_flag_names() {
        for argv in [
            &[
                "llmctl",
                "model",
                "plan",
                "m.gguf",
                "--vram",
                "8000",
                "--context",
                "4096",
            ][..],
            &[
                "llmctl", "model", "plan", "m.gguf", "--vram", "8000", "--ctx", "4096",
            ],
            &["llmctl", "client-config", "claude", "--ctx", "4096"],
            &[
                "llmctl",
                "client-config",
                "claude",
                "--context",
                "4096",
                "--path",
                "/tmp/s.json",
            ],
            &[
                "llmctl",
                "model",
                "fetch",
                "https://x/m.gguf",
                "--path",
                "/tmp/m.gguf",
            ],
            &[
                "llmctl",
                "model",
                "fetch",
                "https://x/m.gguf",
                "--dest",
                "/tmp/m.gguf",
            ],
        ] {
            if let Err(e) = Cli::try_parse_from(argv) {
                panic!("{argv:?}: {e}");
            }
        }
    }
}
