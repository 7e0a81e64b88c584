//! The command line, and nothing else: each command's own arguments live beside the code that runs it
//! (`proxy::ServeProxyArgs`, `doctor::DoctorArgs`, ...) so that a command and its flags change together.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "llmctl", version = env!("LLMCTL_VERSION_LONG"), about, long_about = None, propagate_version = true)]
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
    /// The whole stack at a glance: driver, GPUs, container, services, model, tokens/s, proxy traffic.
    #[command(after_long_help = crate::status::JSON_HELP)]
    Status(crate::status::StatusArgs),
    /// Print the journal of the container's llama-server or llmctl-proxy (`-f` to follow).
    Logs(crate::logs::LogsArgs),
    /// Install and configure the whole stack on a Proxmox host, idempotently.
    Provision(crate::provision::ProvisionArgs),
    /// Write a commented llmctl.toml for the guide's setup.
    Init(crate::provision::InitArgs),
    /// Inspect GGUF models, download them, and plan GPU offload.
    Model(crate::model::ModelArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell), e.g.
    /// `llmctl completions bash > /etc/bash_completion.d/llmctl`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `llmctl man > /usr/local/share/man/man1/llmctl.1`.
    Man,
    /// Health and smoke checks provision runs inside the container.
    #[command(hide = true)]
    Probe(crate::provision::probe::ProbeArgs),
}

/// `llmctl completions SHELL`: the script for that shell, from the same definition the parser uses.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cmd, "llmctl", out);
}

/// `llmctl man`: the man page.
pub fn man(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn completions_and_man_page_cover_every_command() {
        let mut bash = Vec::new();
        completions(clap_complete::Shell::Bash, &mut bash);
        let bash = String::from_utf8(bash).unwrap();
        for cmd in [
            "serve-proxy",
            "client-config",
            "doctor",
            "provision",
            "model",
        ] {
            assert!(
                bash.contains(cmd),
                "{cmd} missing from the bash completions"
            );
        }
        let mut page = Vec::new();
        man(&mut page).unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(
            page.starts_with(".ie") || page.contains(".TH llmctl"),
            "{}",
            &page[..200.min(page.len())]
        );
        assert!(
            page.contains("serve\\-proxy") || page.contains("serve-proxy"),
            "subcommands listed"
        );
    }

    #[test]
    fn the_version_names_the_build() {
        let v = env!("LLMCTL_VERSION_LONG");
        assert!(
            v.starts_with(env!("CARGO_PKG_VERSION")) && v.contains('('),
            "{v}"
        );
    }

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
