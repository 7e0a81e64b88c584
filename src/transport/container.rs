//! A Proxmox LXC container, reached through its host: `pct exec <vmid> -- argv…` for commands and
//! `pct push` / `pct pull` (through a temp file on the host) for files. No SSH into the container.

use anyhow::Context;

use super::{Cmd, Output, Stream, Transport, TransportError};

pub struct Container<'a> {
    pub host: &'a dyn Transport,
    pub vmid: u32,
}

/// `pct` on a real host says this when the CT has no config (the path is relative to /etc/pve).
fn missing_container_detail(out: &Output) -> Option<String> {
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("Configuration file") && l.contains("does not exist"))?;
    Some(line.trim().to_string())
}

impl<'a> Container<'a> {
    pub fn new(host: &'a dyn Transport, vmid: u32) -> Self {
        Container { host, vmid }
    }

    /// The host-side command that runs `argv` inside the container.
    pub fn exec_argv(&self, argv: &[String]) -> Vec<String> {
        let mut out = vec![
            "pct".to_string(),
            "exec".into(),
            self.vmid.to_string(),
            "--".into(),
        ];
        out.extend(argv.iter().cloned());
        out
    }

    /// `pct config <vmid>`: the container's configuration as Proxmox prints it (keys sorted, no snapshots).
    pub fn config(&self) -> anyhow::Result<String> {
        let out = self.pct(&Cmd::new([
            "pct".to_string(),
            "config".into(),
            self.vmid.to_string(),
        ]))?;
        if !out.success() {
            anyhow::bail!(
                "`pct config {}` failed on {}: {}",
                self.vmid,
                self.host.describe(),
                out.stderr.trim()
            );
        }
        Ok(out.stdout)
    }

    fn host_cmd(&self, argv: Vec<String>) -> Cmd {
        Cmd::new(argv)
    }

    /// Runs a host-side `pct …` command; a missing container becomes [`TransportError::ContainerMissing`].
    fn pct(&self, cmd: &Cmd) -> anyhow::Result<Output> {
        let out = self.host.run(cmd)?;
        self.check_exists(&out)?;
        Ok(out)
    }

    fn check_exists(&self, out: &Output) -> anyhow::Result<()> {
        if !out.success()
            && let Some(detail) = missing_container_detail(out)
        {
            return Err(TransportError::ContainerMissing {
                vmid: self.vmid,
                host: self.host.describe(),
                detail,
            }
            .into());
        }
        Ok(())
    }

    fn host_temp(&self) -> anyhow::Result<String> {
        let out = self
            .host
            .run(&Cmd::new(["mktemp", "/tmp/llmctl-ct.XXXXXXXX"]))?;
        if !out.success() {
            anyhow::bail!(
                "cannot make a temp file on {}: {}",
                self.host.describe(),
                out.stderr.trim()
            );
        }
        Ok(out.stdout.trim().to_string())
    }

    fn remove_host_file(&self, path: &str) {
        let _ = self.host.run(&Cmd::new(["rm", "-f", "--", path]));
    }
}

impl Transport for Container<'_> {
    fn run_streaming(
        &self,
        cmd: &Cmd,
        on_line: &mut dyn FnMut(Stream, &str),
    ) -> anyhow::Result<Output> {
        let mut host_cmd = self.host_cmd(self.exec_argv(&cmd.argv));
        host_cmd.stdin = cmd.stdin.clone();
        host_cmd.timeout = cmd.timeout;
        let out = self.host.run_streaming(&host_cmd, on_line)?;
        self.check_exists(&out)?;
        Ok(out)
    }

    fn read_file(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let tmp = self.host_temp()?;
        let pulled = self.pct(&Cmd::new([
            "pct".to_string(),
            "pull".into(),
            self.vmid.to_string(),
            path.to_string(),
            tmp.clone(),
        ]));
        let result = match pulled {
            Ok(out) if out.success() => self.host.read_file(&tmp),
            Ok(out) => Err(anyhow::anyhow!(
                "cannot read {path} in {}: {}",
                self.describe(),
                out.stderr.trim()
            )),
            Err(e) => Err(e),
        };
        self.remove_host_file(&tmp);
        result
    }

    fn write_file(&self, path: &str, data: &[u8], mode: u32) -> anyhow::Result<()> {
        let tmp = self.host_temp()?;
        let result = (|| -> anyhow::Result<()> {
            self.host.write_file(&tmp, data, 0o600)?;
            let ct_tmp = super::temp_path_beside(path);
            let out = self.pct(&Cmd::new([
                "pct".to_string(),
                "push".into(),
                self.vmid.to_string(),
                tmp.clone(),
                ct_tmp.clone(),
                "--perms".into(),
                format!("{:04o}", mode & 0o7777),
            ]))?;
            if !out.success() {
                anyhow::bail!("pct push failed: {}", out.stderr.trim());
            }
            let out = self.run(&Cmd::new(["mv", "-f", "--", &ct_tmp, path]))?;
            if !out.success() {
                let _ = self.run(&Cmd::new(["rm", "-f", "--", &ct_tmp]));
                anyhow::bail!("cannot move {ct_tmp} to {path}: {}", out.stderr.trim());
            }
            Ok(())
        })();
        self.remove_host_file(&tmp);
        result.with_context(|| format!("cannot write {path} in {}", self.describe()))
    }

    fn describe(&self) -> String {
        format!("CT {} on {}", self.vmid, self.host.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_argv_is_pct_exec() {
        let host = super::super::LocalTransport::new();
        let ct = Container::new(&host, 103);
        assert_eq!(
            ct.exec_argv(&["ls".into(), "-l".into(), "a b".into()]),
            ["pct", "exec", "103", "--", "ls", "-l", "a b"]
        );
        assert_eq!(
            crate::shell::join(&ct.exec_argv(&["echo".into(), "$(x)".into()])),
            "pct exec 103 -- echo '$(x)'"
        );
    }

    #[test]
    fn recognises_the_missing_container_message() {
        let out = Output {
            status: Some(2),
            stdout: String::new(),
            stderr: "Configuration file 'nodes/pve/lxc/999.conf' does not exist\n".into(),
        };
        assert_eq!(
            missing_container_detail(&out).as_deref(),
            Some("Configuration file 'nodes/pve/lxc/999.conf' does not exist")
        );
    }
}
