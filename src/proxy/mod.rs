//! `llmctl serve-proxy`: the Anthropic Messages API in front of an OpenAI Chat Completions server.

// Translation (pure code).
pub mod accumulate;
pub mod anthropic;
pub mod openai;
pub mod schema;
pub mod stream;
pub mod translate;

use anyhow::Result;
use clap::Args;

use crate::cli::GlobalArgs;
use crate::outcome::Outcome;

#[derive(Debug, Clone, Args)]
pub struct ServeProxyArgs {
    /// Address to listen on [default: 127.0.0.1:4000]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
}

pub fn run(_global: &GlobalArgs, _args: ServeProxyArgs) -> Result<Outcome> {
    anyhow::bail!("serve-proxy is not built yet")
}
