//! `llmctl client-config claude|pi`: the client-side settings for Claude Code and pi.

use anyhow::Result;
use clap::Args;

use crate::cli::GlobalArgs;
use crate::outcome::Outcome;

#[derive(Debug, Clone, Args)]
pub struct ClientConfigArgs {}

pub fn run(_global: &GlobalArgs, _args: ClientConfigArgs) -> Result<Outcome> {
    anyhow::bail!("client-config is not built yet")
}
