//! `llmctl provision` and `llmctl init`: the whole stack on a Proxmox host, idempotently, with a plan.

pub mod config;
pub mod diff;
pub mod step;
pub mod units;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::cli::GlobalArgs;
use crate::outcome::Outcome;

/// The commented configuration `llmctl init` writes: the seed guide's setup.
pub const INIT_TEMPLATE: &str = include_str!("../../templates/llmctl.toml");

#[derive(Debug, Clone, Args)]
pub struct ProvisionArgs {}

#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// Where to write the file.
    #[arg(long, default_value = crate::config::DEFAULT_PATH, value_name = "PATH")]
    pub path: PathBuf,
    /// Replace an existing file (the old one is kept as PATH.bak).
    #[arg(long)]
    pub force: bool,
    /// Print the file instead of writing it.
    #[arg(long)]
    pub stdout: bool,
}

pub fn run(global: &GlobalArgs, _args: ProvisionArgs) -> Result<Outcome> {
    // Validate what we can today so a user learns about a bad llmctl.toml early.
    let file = crate::config::ConfigFile::load(global.config.as_deref())?;
    config::ProvisionConfig::from_file(&file)?;
    anyhow::bail!("provision is not available in this build yet; `llmctl doctor` diagnoses a host")
}

pub fn init(_global: &GlobalArgs, args: InitArgs) -> Result<Outcome> {
    if args.stdout {
        std::io::stdout()
            .lock()
            .write_all(INIT_TEMPLATE.as_bytes())?;
        return Ok(Outcome::Success);
    }
    write_new_file(&args.path, INIT_TEMPLATE.as_bytes(), args.force)?;
    eprintln!(
        "wrote {}: set [host].target and [host].vmid, then run `llmctl provision --plan`",
        args.path.display()
    );
    Ok(Outcome::Success)
}

/// Writes `data` to `path` atomically (temp file in the same directory, fsync, rename). An existing file is an
/// error unless `force`, and then it is kept as `<path>.bak` first: nothing a user wrote is ever lost.
fn write_new_file(path: &std::path::Path, data: &[u8], force: bool) -> Result<()> {
    if path.exists() {
        if !force {
            anyhow::bail!(
                "{} already exists; use --force to replace it (the old file is kept as {}.bak)",
                path.display(),
                path.display()
            );
        }
        let backup = PathBuf::from(format!("{}.bak", path.display()));
        std::fs::copy(path, &backup).with_context(|| {
            format!("cannot back up {} to {}", path.display(), backup.display())
        })?;
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("llmctl.toml"),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_refuses_to_overwrite_and_backs_up_with_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmctl.toml");
        write_new_file(&path, b"first", false).unwrap();
        let err = write_new_file(&path, b"second", false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("already exists") && err.contains("--force"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        write_new_file(&path, b"second", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(
            std::fs::read(dir.path().join("llmctl.toml.bak")).unwrap(),
            b"first"
        );
    }
}
