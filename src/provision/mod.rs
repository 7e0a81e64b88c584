//! `llmctl provision` and `llmctl init`: the whole stack on a Proxmox host, idempotently, with a plan.

use anyhow::Result;
use clap::Args;

use crate::cli::GlobalArgs;
use crate::outcome::Outcome;

#[derive(Debug, Clone, Args)]
pub struct ProvisionArgs {}

#[derive(Debug, Clone, Args)]
pub struct InitArgs {}

pub fn run(_global: &GlobalArgs, _args: ProvisionArgs) -> Result<Outcome> {
    anyhow::bail!("provision is not built yet")
}

pub fn init(_global: &GlobalArgs, _args: InitArgs) -> Result<Outcome> {
    anyhow::bail!("init is not built yet")
}
