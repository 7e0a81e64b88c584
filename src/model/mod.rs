//! `llmctl model`: GGUF inspection, verified downloads, and GPU offload planning.

use anyhow::Result;
use clap::Args;

use crate::cli::GlobalArgs;
use crate::outcome::Outcome;

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {}

pub fn run(_global: &GlobalArgs, _args: ModelArgs) -> Result<Outcome> {
    anyhow::bail!("model is not built yet")
}
