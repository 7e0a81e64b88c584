//! `llmctl doctor`: find what is broken on a Proxmox host and its GPU container, and say how to fix it.

use anyhow::Result;
use clap::Args;

use crate::cli::GlobalArgs;
use crate::outcome::Outcome;

#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {}

pub fn run(_global: &GlobalArgs, _args: DoctorArgs) -> Result<Outcome> {
    anyhow::bail!("doctor is not built yet")
}
