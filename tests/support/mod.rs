//! Shared test harness: a simulated Proxmox host (fixtures/sim/simhost) with a real sshd in its own network
//! namespace. `SimHost::start("healthy")` brings one up from `fixtures/scenarios/healthy.toml`; dropping it
//! tears everything down. Needs root, iproute2, openssh-server and /usr/bin/python3 >= 3.11: without them
//! the start fails with simhost's message saying what is missing (never a silent skip).
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use llmctl::transport::{SshOptions, SshTransport};

pub mod cluster;
pub mod files;
pub mod law;

/// The llmctl under test with `--config config`, `args`, then `ssh` (`--identity K --known-hosts F`: the sim's
/// key and host keys, as a user's ~/.ssh is), kept from the user's environment: no ~/.ssh, no agent, no stdin.
pub fn llmctl<S: AsRef<OsStr>>(config: &Path, args: &[&str], ssh: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llmctl"))
        .arg("--config")
        .arg(config)
        .args(args)
        .args(ssh)
        .current_dir(std::env::temp_dir())
        .env("HOME", std::env::temp_dir())
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .output()
        .expect("run llmctl")
}

/// A run's stdout and stderr as text.
pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Sim host numbers 1-99 belong to this harness; cargo runs test binaries one after another, so a counter
/// per binary is unique among the tests running at the same time. (tests/doctor_scenarios.rs uses 199-249,
/// tests/law.rs 150-198.)
static NEXT: AtomicU32 = AtomicU32::new(1);

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `fixtures/scenarios/*.toml`, sorted by name.
pub fn scenarios() -> Vec<PathBuf> {
    let dir = repo().join("fixtures/scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

pub fn simhost_script() -> PathBuf {
    repo().join("fixtures/sim/simhost")
}

/// SSH options that use only the given key and known_hosts: no agent, no ~/.ssh, no ssh_config, and an
/// unknown host key refused (what every sim host and cluster node is reached with).
pub fn isolated_ssh_options(key: &Path, known_hosts: &Path) -> SshOptions {
    SshOptions {
        known_hosts: Some(known_hosts.to_path_buf()),
        ssh_config: Some(PathBuf::from("/nonexistent/llmctl-test-ssh-config")),
        identity_files: vec![key.to_path_buf()],
        default_identities: false,
        use_agent: false,
        agent_socket: None,
        accept_new_host_key: false,
        ..SshOptions::default()
    }
}

pub struct SimHost {
    pub n: u32,
    pub addr: String,
    pub target: String,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    pub known_hosts_line: String,
    pub host_key_pub: PathBuf,
    pub dir: PathBuf,
}

impl SimHost {
    /// Starts `fixtures/scenarios/<name>.toml`.
    pub fn start(name: &str) -> SimHost {
        Self::start_file(&repo().join(format!("fixtures/scenarios/{name}.toml")))
    }

    /// Starts any scenario file (e.g. one a test writes to a temp dir with `base = "..."` beside a copy).
    pub fn start_file(scenario: &Path) -> SimHost {
        Self::start_file_env(scenario, &[])
    }

    /// [`Self::start`] with variables for `simhost up` only (e.g. `LLMCTL_SIM_MODEL`), not for the whole test
    /// process and the sims its other tests start.
    pub fn start_env(name: &str, env: &[(&str, &str)]) -> SimHost {
        Self::start_file_env(&repo().join(format!("fixtures/scenarios/{name}.toml")), env)
    }

    fn start_file_env(scenario: &Path, env: &[(&str, &str)]) -> SimHost {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(n < 100, "too many sim hosts in one test binary");
        Self::start_n_env(scenario, n, env)
    }

    /// [`Self::start_n`], once more when the first start fails: on a loaded machine simhost can decide too early
    /// that its sshd did not start (it checks the namespace's pids right after spawning it). Only the start is
    /// retried; what a test then observes never is.
    pub fn start_retrying(scenario: &Path, n: u32) -> SimHost {
        Self::start_retrying_env(scenario, n, &[])
    }

    pub fn start_n(scenario: &Path, n: u32) -> SimHost {
        Self::start_n_env(scenario, n, &[])
    }

    /// [`Self::start_retrying`] with `LLMCTL_SIM_LLMCTL` set to the llmctl under test: every container then has it
    /// as /usr/local/bin/llmctl, as provision leaves it, so a scenario's `llmctl-proxy` service really runs.
    pub fn start_provisioned(scenario: &Path, n: u32) -> SimHost {
        Self::start_retrying_env(
            scenario,
            n,
            &[("LLMCTL_SIM_LLMCTL", env!("CARGO_BIN_EXE_llmctl"))],
        )
    }

    /// [`Self::start_n_env`], retried once as [`Self::start_retrying`] says.
    fn start_retrying_env(scenario: &Path, n: u32, env: &[(&str, &str)]) -> SimHost {
        match std::panic::catch_unwind(|| SimHost::start_n_env(scenario, n, env)) {
            Ok(sim) => sim,
            Err(_) => {
                std::thread::sleep(std::time::Duration::from_secs(1));
                SimHost::start_n_env(scenario, n, env)
            }
        }
    }

    /// Starts sim host `n` with extra environment for `simhost up` (its `LLMCTL_SIM_*` settings).
    pub fn start_n_env(scenario: &Path, n: u32, env: &[(&str, &str)]) -> SimHost {
        let out = Command::new("bash")
            .arg(simhost_script())
            .arg("up")
            .arg(scenario)
            .arg(n.to_string())
            .envs(env.iter().copied())
            .output()
            .expect("cannot run bash fixtures/sim/simhost");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "cannot start the simulated Proxmox host {} from {} (needs root, ip netns, openssh-server, \
             python3 >= 3.11):\n{stdout}{}",
            n,
            scenario.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let get = |k: &str| -> String {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("simhost up printed no {k}= line:\n{stdout}"))
                .to_string()
        };
        SimHost {
            n,
            addr: get("SIM_ADDR"),
            target: get("SIM_TARGET"),
            key: get("SIM_KEY").into(),
            known_hosts: get("SIM_KNOWN_HOSTS").into(),
            known_hosts_line: get("SIM_KNOWN_HOSTS_LINE").trim_matches('\'').to_string(),
            host_key_pub: get("SIM_HOST_KEY_PUB").into(),
            dir: get("SIM_DIR").into(),
        }
    }

    /// `root@10.213.<n>.2`
    pub fn ssh_target(&self) -> &str {
        &self.target
    }

    pub fn key_path(&self) -> &Path {
        &self.key
    }

    pub fn known_hosts_path(&self) -> &Path {
        &self.known_hosts
    }

    /// Options that use only this sim's key and known_hosts (no agent, no ~/.ssh).
    pub fn ssh_options(&self) -> SshOptions {
        isolated_ssh_options(&self.key, &self.known_hosts)
    }

    pub fn connect(&self) -> SshTransport {
        SshTransport::connect(&self.target, &self.ssh_options())
            .unwrap_or_else(|e| panic!("cannot connect to the sim host {}: {e:#}", self.target))
    }

    /// Runs a command inside the sim host's namespaces without SSH (to check what SSH did).
    pub fn exec(&self, argv: &[&str]) -> std::process::Output {
        Command::new("bash")
            .arg(simhost_script())
            .arg("exec")
            .arg(self.n.to_string())
            .args(argv)
            .output()
            .expect("simhost exec")
    }

    /// The fingerprint `ssh-keygen -lf` gives for the sim's host key (an independent check of ours).
    pub fn host_key_fingerprint(&self) -> String {
        let out = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(&self.host_key_pub)
            .output()
            .expect("ssh-keygen");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .expect("ssh-keygen -lf prints bits, fingerprint, comment")
            .to_string()
    }
}

impl Drop for SimHost {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(simhost_script())
            .arg("down")
            .arg(self.n.to_string())
            .output();
    }
}
