//! Which Proxmox host and container a command reaches, and how: `--host`/`--vmid` and the SSH flags that
//! `doctor`, `status` and `logs` share, with `[host]` in llmctl.toml as the default. One definition, so the
//! read-only commands take the same flags and resolve them the same way.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::cli::GlobalArgs;
use crate::config::{ConfigFile, HostSection};
use crate::transport::Transport;
use crate::transport::ssh::SshOptions;

#[derive(Debug, Clone, Args)]
pub struct HostArgs {
    /// The Proxmox host: `local` (run on the host itself), `user@host[:port]`, or a ~/.ssh/config alias; with
    /// [[hosts]] or [cluster] in llmctl.toml, a host's (a cluster node's) name, or its target. Repeatable
    /// where a command runs over several hosts (doctor, status) [default: [host] target in llmctl.toml, or
    /// every [[hosts]] entry and cluster node]
    #[arg(long, value_name = "HOST")]
    pub host: Vec<String>,
    /// The GPU container [default: [host] vmid in llmctl.toml, else the only container with NVIDIA devices]
    #[arg(long, value_name = "N")]
    pub vmid: Option<u32>,
    #[command(flatten)]
    pub ssh: SshArgs,
}

/// How to authenticate the SSH connection and check the host's key: the same flags for every command that
/// reaches a host (doctor, status, logs, client-config --from-host, provision).
#[derive(Debug, Clone, Default, Args)]
pub struct SshArgs {
    /// Record the host's key in known_hosts when it is not there yet (a changed key is always refused).
    #[arg(long)]
    pub accept_new_host_key: bool,
    /// SSH private key to try (after ssh-agent and ~/.ssh/config's IdentityFile). Repeatable.
    #[arg(long, value_name = "PATH")]
    pub identity: Vec<PathBuf>,
    /// known_hosts file [default: ~/.ssh/known_hosts]
    #[arg(long, value_name = "PATH")]
    pub known_hosts: Option<PathBuf>,
}

impl SshArgs {
    pub fn options(&self) -> SshOptions {
        SshOptions {
            known_hosts: self.known_hosts.clone(),
            identity_files: self.identity.clone(),
            accept_new_host_key: self.accept_new_host_key,
            ..SshOptions::default()
        }
    }
}

/// The flags and llmctl.toml, resolved: where to connect and which container to look at.
#[derive(Debug, Clone)]
pub struct Remote {
    pub host: String,
    /// None: the command picks (doctor: the only container with NVIDIA devices).
    pub vmid: Option<u32>,
    pub options: SshOptions,
}

impl HostArgs {
    /// Flags first, then `[host]` in llmctl.toml; no host at all is an error naming both ways to give one.
    pub fn resolve(&self, global: &GlobalArgs) -> Result<Remote> {
        self.resolve_with(&ConfigFile::load(global.config.as_deref())?)
    }

    /// [`HostArgs::resolve`] from a file already read: `[host]` with the schema and checks provision uses, so
    /// the same file names the same host and container for every command. A command that reaches one host
    /// takes one from an inventory too (`--host NAME`, or an inventory of one).
    pub fn resolve_with(&self, config: &ConfigFile) -> Result<Remote> {
        Ok(self.resolve_member(config)?.0)
    }

    /// [`HostArgs::resolve_with`], and the selected host's own configuration: the file with that host's
    /// overrides (`[[hosts]]`, `[cluster.nodes.<name>]`) merged in, for a command that reads more than the
    /// target (client-config's ports are the host's `[server]` and `[proxy]`).
    pub fn resolve_member(&self, config: &ConfigFile) -> Result<(Remote, ConfigFile)> {
        match crate::fleet::select(config, &self.host, self.vmid, &self.ssh.options())? {
            crate::fleet::Selection::One { config, host, .. } => {
                Ok((self.resolve_one(&config, host.as_deref())?, config))
            }
            crate::fleet::Selection::Fleet { members, .. } => {
                let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
                anyhow::bail!(
                    "this command reaches one host and {} are selected ({}): pick one with --host NAME",
                    names.len(),
                    names.join(", ")
                )
            }
        }
    }

    /// One host: `host` (the flag) over `[host]` of `config`.
    pub fn resolve_one(&self, config: &ConfigFile, host: Option<&str>) -> Result<Remote> {
        let section: HostSection = config.section_or_default()?;
        config.report(&section.check())?;
        Ok(Remote {
            host: section.target_or(host)?,
            vmid: self.vmid.or(section.vmid),
            options: self.ssh.options(),
        })
    }
}

impl Remote {
    pub fn connect(&self) -> Result<Box<dyn Transport>> {
        crate::transport::connect(&self.host, &self.options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(hosts: &[&str]) -> HostArgs {
        HostArgs {
            host: hosts.iter().map(|h| h.to_string()).collect(),
            vmid: None,
            ssh: SshArgs::default(),
        }
    }

    /// One host of an inventory comes with its own overrides: a command reading its ports reads that host's.
    #[test]
    fn one_inventory_host_resolves_with_its_own_overrides() {
        let file = ConfigFile::parse(
            "[proxy]\nlisten = \"0.0.0.0:4000\"\n\
             [[hosts]]\nname = \"a\"\ntarget = \"root@10.0.0.1\"\nvmid = 103\n\
             [[hosts]]\nname = \"b\"\ntarget = \"root@10.0.0.2\"\nvmid = 104\n\
             [hosts.proxy]\nlisten = \"0.0.0.0:4001\"\n",
            Some("lab.toml".into()),
        )
        .unwrap();
        let listen = |c: &ConfigFile| {
            let p: crate::config::ProxySection = c.section_or_default().unwrap();
            p.listen
        };
        let (remote, config) = args(&["b"]).resolve_member(&file).unwrap();
        assert_eq!(
            (remote.host.as_str(), remote.vmid),
            ("root@10.0.0.2", Some(104))
        );
        assert_eq!(listen(&config).as_deref(), Some("0.0.0.0:4001"));
        let (_, config) = args(&["a"]).resolve_member(&file).unwrap();
        assert_eq!(listen(&config).as_deref(), Some("0.0.0.0:4000"));
        let e = args(&[]).resolve_member(&file).unwrap_err().to_string();
        assert!(
            e.contains("2 are selected (a, b): pick one with --host NAME"),
            "{e}"
        );
    }
}
