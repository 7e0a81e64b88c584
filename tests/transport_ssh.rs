//! The SSH transport against a real OpenSSH sshd (a simulated Proxmox host in its own network namespace),
//! and the simulated host's own behaviour (byte-faithful outputs, state changes) over that transport.
//! Needs root, iproute2, openssh-server and python3 >= 3.11; fails with a clear message otherwise.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use llmctl::transport::{
    Cmd, Container, SshOptions, SshTransport, Stream, Transport, TransportError, ensure_proxmox,
};
use support::SimHost;

fn run(t: &dyn Transport, argv: &[&str]) -> llmctl::transport::Output {
    t.run(&Cmd::new(argv.iter().copied()))
        .unwrap_or_else(|e| panic!("{argv:?}: {e:#}"))
}

fn transport_error(e: &anyhow::Error) -> &TransportError {
    e.downcast_ref::<TransportError>()
        .unwrap_or_else(|| panic!("expected a TransportError, got: {e:#}"))
}

fn fixture(name: &str) -> String {
    let path = support::repo().join("fixtures/outputs").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---- connection, authentication, host keys ------------------------------------------------------------------

#[test]
fn key_auth_exit_codes_and_separate_stderr() {
    let sim = SimHost::start("healthy");
    let t = sim.connect();
    assert_eq!(t.describe(), sim.ssh_target());
    let out = run(&t, &["sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(out.status, Some(7));
    assert_eq!(out.stdout, "out\n");
    assert_eq!(
        out.stderr, "err\n",
        "stderr must not carry llmctl's own bookkeeping"
    );
    // Arguments arrive exactly, whatever they contain.
    let nasty = "a b;$(echo pwned)'\"`x`";
    let out = run(&t, &["printf", "%s", nasty]);
    assert_eq!(out.stdout, nasty);
    // A missing program is exit 127 from the remote shell, not a transport error.
    let out = run(&t, &["llmctl-no-such-program"]);
    assert_eq!(out.status, Some(127), "{out:?}");
    // A command killed by a signal has no exit status.
    let out = run(&t, &["sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status, None, "{out:?}");
    // The same connection serves many commands.
    for i in 0..20 {
        assert_eq!(run(&t, &["echo", &i.to_string()]).stdout, format!("{i}\n"));
    }
}

#[test]
fn agent_auth_with_a_real_ssh_agent() {
    let sim = SimHost::start("healthy");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let agent = Command::new("ssh-agent")
        .arg("-a")
        .arg(&sock)
        .output()
        .expect("ssh-agent is installed (openssh-client)");
    let text = String::from_utf8_lossy(&agent.stdout).into_owned();
    let pid: String = text
        .split("SSH_AGENT_PID=")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or_else(|| panic!("ssh-agent printed no pid: {text}"))
        .to_string();
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("kill").arg(&self.0).status();
        }
    }
    let _kill = Kill(pid);
    let added = Command::new("ssh-add")
        .arg(&sim.key)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let options = SshOptions {
        identity_files: vec![],
        use_agent: true,
        agent_socket: Some(sock.clone()),
        ..sim.ssh_options()
    };
    let t = SshTransport::connect(&sim.target, &options).expect("agent auth");
    assert_eq!(run(&t, &["whoami"]).stdout, "root\n");

    // Without the agent and without key files nothing is left to try: the error says what was tried.
    let options = SshOptions {
        identity_files: vec![],
        use_agent: false,
        ..sim.ssh_options()
    };
    let e = SshTransport::connect(&sim.target, &options)
        .err()
        .expect("no key");
    assert!(matches!(
        transport_error(&e),
        TransportError::AuthFailed { .. }
    ));
}

#[test]
fn unknown_host_key_then_accepted_then_silent() {
    let sim = SimHost::start("healthy");
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("ssh/known_hosts");
    let options = SshOptions {
        known_hosts: Some(kh.clone()),
        ..sim.ssh_options()
    };
    let e = SshTransport::connect(&sim.target, &options)
        .err()
        .expect("unknown host must be refused");
    let msg = format!("{e:#}");
    assert!(matches!(
        transport_error(&e),
        TransportError::HostKeyUnknown { .. }
    ));
    // Our fingerprint is the one ssh-keygen computes from the host's public key.
    assert!(
        msg.contains(&sim.host_key_fingerprint()),
        "{msg}\nwant {}",
        sim.host_key_fingerprint()
    );
    assert!(msg.contains("ED25519 key fingerprint is SHA256:"), "{msg}");
    assert!(msg.contains("--accept-new-host-key"), "{msg}");
    assert!(!kh.exists(), "nothing may be recorded without the flag");

    let accept = SshOptions {
        accept_new_host_key: true,
        ..options.clone()
    };
    let t = SshTransport::connect(&sim.target, &accept).expect("accepted");
    assert_eq!(run(&t, &["true"]).status, Some(0));
    let recorded = std::fs::read_to_string(&kh).unwrap();
    assert_eq!(recorded.trim(), sim.known_hosts_line, "recorded line");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&kh).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Second time: known, no flag needed, nothing appended.
    SshTransport::connect(&sim.target, &options).expect("now known");
    assert_eq!(std::fs::read_to_string(&kh).unwrap(), recorded);

    // Hashed entries (ssh-keygen -H) are recognised too.
    let hashed = Command::new("ssh-keygen")
        .arg("-H")
        .arg("-f")
        .arg(&kh)
        .output()
        .unwrap();
    assert!(hashed.status.success());
    assert!(std::fs::read_to_string(&kh).unwrap().starts_with("|1|"));
    SshTransport::connect(&sim.target, &options).expect("hashed entry matches");
}

#[test]
fn changed_host_key_is_refused_even_with_the_accept_flag() {
    let sim = SimHost::start("healthy");
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other");
    let gen_key = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .unwrap();
    assert!(gen_key.success());
    let other_pub = std::fs::read_to_string(dir.path().join("other.pub")).unwrap();
    let fields: Vec<&str> = other_pub.split_whitespace().collect();
    let kh = dir.path().join("known_hosts");
    std::fs::write(
        &kh,
        format!(
            "# a comment\nunrelated.example ssh-ed25519 {}\n{} {} {}\n",
            fields[1], sim.addr, fields[0], fields[1]
        ),
    )
    .unwrap();
    let options = SshOptions {
        known_hosts: Some(kh.clone()),
        accept_new_host_key: true,
        ..sim.ssh_options()
    };
    let e = SshTransport::connect(&sim.target, &options)
        .err()
        .expect("changed key must be refused");
    let msg = format!("{e:#}");
    assert!(matches!(
        transport_error(&e),
        TransportError::HostKeyChanged { .. }
    ));
    assert!(msg.contains("CHANGED"), "{msg}");
    assert!(msg.contains("(line 3)"), "{msg}");
    assert!(msg.contains(&sim.host_key_fingerprint()), "{msg}");
    assert_eq!(
        std::fs::read_to_string(&kh).unwrap().lines().count(),
        3,
        "known_hosts untouched"
    );
}

#[test]
fn ssh_config_alias_with_hostname_user_and_identityfile() {
    let sim = SimHost::start("healthy");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config");
    std::fs::write(
        &cfg,
        format!(
            "Host sim-*\n  HostName {}\n  User root\n  Port 22\n  IdentityFile {}\n\nHost *\n  User nobody\n",
            sim.addr,
            sim.key.display()
        ),
    )
    .unwrap();
    let options = SshOptions {
        ssh_config: Some(cfg),
        identity_files: vec![],
        ..sim.ssh_options()
    };
    let t = SshTransport::connect("sim-pve", &options).expect("alias resolves");
    assert_eq!(run(&t, &["whoami"]).stdout, "root\n");
    assert_eq!(t.describe(), format!("root@sim-pve ({})", sim.addr));
}

// ---- readable errors ------------------------------------------------------------------------------------------

#[test]
fn unreachable_failed_auth_not_proxmox_and_missing_container_are_readable() {
    let sim = SimHost::start("healthy");
    // Nothing listens on port 2222 inside the sim's network namespace.
    let e = SshTransport::connect(&format!("root@{}:2222", sim.addr), &sim.ssh_options())
        .err()
        .expect("refused");
    let msg = format!("{e:#}");
    assert!(matches!(
        transport_error(&e),
        TransportError::Unreachable { .. }
    ));
    assert!(msg.contains("connection refused"), "{msg}");
    assert!(msg.contains(&format!("{}:2222", sim.addr)), "{msg}");

    let e = SshTransport::connect("root@llmctl-no-such-host.invalid", &sim.ssh_options())
        .err()
        .expect("dns");
    assert!(
        format!("{e:#}").contains("cannot resolve the host name"),
        "{e:#}"
    );

    // A key the host does not know.
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong_ed25519");
    assert!(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&wrong)
            .status()
            .unwrap()
            .success()
    );
    let options = SshOptions {
        identity_files: vec![wrong.clone()],
        ..sim.ssh_options()
    };
    let e = SshTransport::connect(&sim.target, &options)
        .err()
        .expect("wrong key");
    let msg = format!("{e:#}");
    assert!(matches!(
        transport_error(&e),
        TransportError::AuthFailed { .. }
    ));
    assert!(msg.contains(&wrong.display().to_string()), "{msg}");
    assert!(msg.contains("authorized_keys"), "{msg}");

    // A missing container: pct's own words, plus what to do.
    let t = sim.connect();
    let ct = Container::new(&t, 999);
    let e = ct.run(&Cmd::new(["true"])).expect_err("no CT 999");
    let msg = format!("{e:#}");
    assert!(matches!(
        transport_error(&e),
        TransportError::ContainerMissing { vmid: 999, .. }
    ));
    assert!(
        msg.contains("Configuration file 'nodes/pve/lxc/999.conf' does not exist"),
        "{msg}"
    );
    assert!(msg.contains("pct list"), "{msg}");

    assert_eq!(
        ensure_proxmox(&t).unwrap(),
        "pve-manager/9.0.3/025864202ebb6109 (running kernel: 6.14.8-2-pve)"
    );
}

#[test]
fn a_host_that_is_not_proxmox() {
    let sim = SimHost::start("not-proxmox");
    let t = sim.connect();
    let e = ensure_proxmox(&t).expect_err("not proxmox");
    let msg = format!("{e:#}");
    assert!(matches!(
        transport_error(&e),
        TransportError::NotProxmox { .. }
    ));
    assert!(msg.contains("is not installed"), "{msg}");
}

// ---- commands: output size, streaming, stdin, timeouts --------------------------------------------------------

#[test]
fn large_output_streaming_and_stdin() {
    let sim = SimHost::start("healthy");
    let t = sim.connect();
    // 20 MB on stdout while stderr also carries data: neither stream may block the other.
    let out = run(
        &t,
        &[
            "sh",
            "-c",
            "head -c 20000000 /dev/zero | tr '\\0' x; seq 1 50000 >&2",
        ],
    );
    assert_eq!(out.status, Some(0));
    assert_eq!(out.stdout.len(), 20_000_000);
    assert!(out.stdout.bytes().all(|b| b == b'x'));
    assert_eq!(out.stderr.lines().count(), 50_000);

    let mut lines = Vec::new();
    let out = t
        .run_streaming(
            &Cmd::new([
                "sh",
                "-c",
                "for i in 1 2 3; do echo line$i; echo warn$i >&2; done",
            ]),
            &mut |s, l| lines.push((s, l.to_string())),
        )
        .unwrap();
    assert_eq!(out.status, Some(0));
    let stdout_lines: Vec<_> = lines
        .iter()
        .filter(|(s, _)| *s == Stream::Stdout)
        .map(|(_, l)| l.as_str())
        .collect();
    let stderr_lines: Vec<_> = lines
        .iter()
        .filter(|(s, _)| *s == Stream::Stderr)
        .map(|(_, l)| l.as_str())
        .collect();
    assert_eq!(stdout_lines, ["line1", "line2", "line3"]);
    assert_eq!(stderr_lines, ["warn1", "warn2", "warn3"]);

    // 3 MB through stdin and back (more than one SSH window).
    let input: Vec<u8> = (0..3_000_000u32)
        .map(|i| b"abcdefgh\n"[(i % 9) as usize])
        .collect();
    let out = t
        .run(&Cmd::new(["sha256sum"]).stdin(input.clone()))
        .unwrap();
    let local = Command::new("sh")
        .args(["-c", "sha256sum"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&input)?;
            c.wait_with_output()
        })
        .unwrap();
    assert_eq!(out.stdout, String::from_utf8_lossy(&local.stdout));
}

#[test]
fn timeout_kills_the_remote_command_and_its_children() {
    let sim = SimHost::start("healthy");
    let t = sim.connect();
    let script = "(sleep 3; touch /root/survived) & sleep 87.654";
    let e = t
        .run(&Cmd::new(["sh", "-c", script]).timeout(Duration::from_millis(800)))
        .expect_err("must time out");
    assert!(matches!(transport_error(&e), TransportError::Timeout(..)));
    // The connection is still usable, and nothing of the killed command is left running.
    let left = run(
        &t,
        &["sh", "-c", "ps -eo args | grep -c '^sleep 87.654' || true"],
    );
    assert_eq!(left.stdout.trim(), "0", "sleep 87.654 still running");
    std::thread::sleep(Duration::from_secs(4));
    let survived = run(&t, &["test", "-e", "/root/survived"]);
    assert_eq!(
        survived.status,
        Some(1),
        "a child of the timed-out command survived and ran on"
    );
}

// ---- files ------------------------------------------------------------------------------------------------------

#[test]
fn file_round_trip_with_mode_on_host_and_in_container() {
    let sim = SimHost::start("healthy");
    let t = sim.connect();
    let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    t.write_file("/root/secret.env", &data, 0o600).unwrap();
    assert_eq!(t.read_file("/root/secret.env").unwrap(), data);
    assert_eq!(
        run(&t, &["stat", "-c", "%a", "/root/secret.env"]).stdout,
        "600\n"
    );
    // Replacing keeps the file atomic and takes the new mode; no temp file is left beside it.
    t.write_file("/root/secret.env", b"v2\n", 0o640).unwrap();
    assert_eq!(t.read_file("/root/secret.env").unwrap(), b"v2\n");
    assert_eq!(
        run(&t, &["stat", "-c", "%a", "/root/secret.env"]).stdout,
        "640\n"
    );
    assert_eq!(run(&t, &["ls", "-A", "/root"]).stdout, "secret.env\n");
    let e = t.read_file("/root/nope").expect_err("missing file");
    assert!(format!("{e:#}").contains("/root/nope"), "{e:#}");

    // Inside CT 103, through pct push/pull.
    let ct = Container::new(&t, 103);
    assert_eq!(ct.describe(), format!("CT 103 on {}", sim.target));
    assert!(
        run(&ct, &["cat", "/etc/os-release"])
            .stdout
            .contains("bookworm"),
        "the CT has its own root filesystem (Debian 12 in a Debian 13 host)"
    );
    ct.write_file("/root/proxy.env", b"KEY=value\n", 0o600)
        .unwrap();
    assert_eq!(ct.read_file("/root/proxy.env").unwrap(), b"KEY=value\n");
    assert_eq!(
        run(&ct, &["stat", "-c", "%a", "/root/proxy.env"]).stdout,
        "600\n"
    );
    assert_eq!(run(&ct, &["ls", "-A", "/root"]).stdout, "proxy.env\n");
    let out = ct
        .run(&Cmd::new(["sh", "-c", "cat; exit 4"]).stdin("through pct exec\n"))
        .unwrap();
    assert_eq!(
        (out.status, out.stdout.as_str()),
        (Some(4), "through pct exec\n")
    );
    // The host's temp files are gone too.
    assert_eq!(
        run(&t, &["sh", "-c", "ls /tmp | grep -c llmctl-ct || true"])
            .stdout
            .trim(),
        "0"
    );
}

// ---- the simulated host: byte-faithful outputs and state ------------------------------------------------------

/// A scenario in a temp dir that derives from a copy of the repo's healthy.toml.
fn scenario_from_healthy(body: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        support::repo().join("fixtures/scenarios/healthy.toml"),
        dir.path().join("healthy.toml"),
    )
    .unwrap();
    let path = dir.path().join("custom.toml");
    std::fs::write(&path, format!("base = \"healthy\"\n{body}")).unwrap();
    (dir, path)
}

#[test]
fn sim_outputs_match_the_reference_fixtures() {
    let (_dir, path) = scenario_from_healthy(
        "[host.driver]\ninstalled = \"595.71.05\"\nloaded = \"595.71.05\"\n\
         [[host.gpus]]\nname = \"NVIDIA GeForce RTX 5090\"\ncompute_cap = \"12.0\"\nmemory_mib = 32607\n\
         memory_used_mib = 14\nbus_id = \"00000000:01:00.0\"\n",
    );
    // Arrays replace: this scenario has exactly the one RTX 5090 of the fixture.
    let sim = SimHost::start_file(&path);
    let t = sim.connect();

    let table = run(&t, &["nvidia-smi"]).stdout;
    let want: Vec<String> = fixture("nvidia-smi.table.595.txt")
        .lines()
        .skip(2) // source comment, timestamp
        .map(str::to_string)
        .collect();
    let got: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(got, want, "nvidia-smi table differs from the fixture");

    let pve = run(&t, &["pveversion"]).stdout;
    assert!(fixture("pveversion.txt").contains(pve.trim_end()), "{pve}");

    let csv = run(
        &t,
        &[
            "nvidia-smi",
            "--query-gpu=name,driver_version,compute_cap,memory.total,memory.used",
            "--format=csv,noheader",
        ],
    );
    assert_eq!(
        csv.stdout,
        "NVIDIA GeForce RTX 5090, 595.71.05, 12.0, 32607 MiB, 14 MiB\n"
    );

    // The CT's libraries move to 590.48.01: NVML mismatch inside the CT, in the fixture's words.
    let ct = Container::new(&t, 103);
    let out = run(
        &ct,
        &[
            "apt-get",
            "install",
            "-y",
            "--allow-change-held-packages",
            "nvidia-driver-cuda=590.48.01-1",
            "libnvidia-ml1=590.48.01-1",
            "libcuda1=590.48.01-1",
        ],
    );
    assert_eq!(out.status, Some(0), "{out:?}");
    let out = run(&ct, &["nvidia-smi"]);
    assert_eq!(out.status, Some(18));
    assert_eq!(
        out.stdout,
        "Failed to initialize NVML: Driver/library version mismatch\nNVML library version: 590.48\n"
    );
    assert!(fixture("nvidia-smi.mismatch.txt").contains(
        "Failed to initialize NVML: Driver/library version mismatch\nNVML library version: "
    ));

    // Unloading the module: the no-driver text, byte for byte.
    assert_eq!(run(&t, &["modprobe", "-r", "nvidia"]).status, Some(0));
    let out = run(&t, &["nvidia-smi"]);
    assert_eq!(out.status, Some(9));
    let no_driver = fixture("nvidia-smi.no-driver.txt");
    assert_eq!(no_driver.lines().nth(2), Some(out.stdout.trim_end()));
    assert!(!run(&t, &["test", "-e", "/proc/driver/nvidia/version"]).success());
    assert!(!run(&t, &["test", "-c", "/dev/nvidia-uvm"]).success());
}

#[test]
fn sim_installs_a_driver_and_reports_it_after_the_module_loads() {
    let sim = SimHost::start("fresh");
    let t = sim.connect();
    assert_eq!(run(&t, &["nvidia-smi"]).status, Some(127), "no driver yet");
    let pkgs = [
        "nvidia-kernel-open-dkms=595.71.05-1",
        "nvidia-driver-cuda=595.71.05-1",
        "libcuda1=595.71.05-1",
        "libnvidia-ml1=595.71.05-1",
    ];
    let mut argv = vec!["apt-get", "-s", "install", "--no-install-recommends"];
    argv.extend(pkgs);
    let sim_out = run(&t, &argv);
    assert!(
        sim_out
            .stdout
            .contains("Inst nvidia-driver-cuda (595.71.05-1 cuda-debian13-x86_64 [amd64])"),
        "{}",
        sim_out.stdout
    );
    assert!(!sim_out.stdout.contains("590."), "only the pinned version");
    // Unpinned, apt takes the newest: the trap the pinned install avoids.
    let unpinned = run(&t, &["apt-get", "-s", "install", "nvidia-driver-cuda"]);
    assert!(
        unpinned
            .stdout
            .contains("Inst nvidia-driver-cuda (595.71.05-1")
    );

    let mut argv = vec!["apt-get", "install", "-y", "--no-install-recommends"];
    argv.extend(pkgs);
    let out = run(&t, &argv);
    assert_eq!(out.status, Some(0), "{out:?}");
    assert_eq!(
        run(&t, &["dkms", "status"]).stdout,
        "nvidia/595.71.05, 6.14.8-2-pve, x86_64: installed\n"
    );
    // Installed is not loaded: nvidia-smi cannot talk to a driver until the module loads.
    let out = run(&t, &["nvidia-smi"]);
    assert_eq!(out.status, Some(9), "{out:?}");
    assert_eq!(run(&t, &["modprobe", "nvidia"]).status, Some(0));
    assert_eq!(run(&t, &["modprobe", "nvidia_uvm"]).status, Some(0));
    let out = run(
        &t,
        &[
            "nvidia-smi",
            "--query-gpu=driver_version",
            "--format=csv,noheader",
        ],
    );
    assert_eq!(out.stdout, "595.71.05\n");
    assert!(
        run(&t, &["cat", "/proc/driver/nvidia/version"])
            .stdout
            .starts_with("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  595.71.05  ")
    );
    assert!(run(&t, &["test", "-c", "/dev/nvidia-uvm"]).success());
    assert_eq!(
        run(&t, &["apt-mark", "hold", "libnvidia-ml1"]).stdout,
        "libnvidia-ml1 set on hold.\n"
    );
    assert_eq!(run(&t, &["apt-mark", "showhold"]).stdout, "libnvidia-ml1\n");
}

#[test]
fn sim_dkms_fails_for_kernel_617_with_driver_550_and_without_headers() {
    let sim = SimHost::start("dkms-not-built");
    let t = sim.connect();
    assert_eq!(
        run(&t, &["dkms", "status"]).stdout,
        "nvidia/550.163.01, 6.14.8-2-pve, x86_64: installed\n"
    );
    let out = run(
        &t,
        &[
            "dkms",
            "install",
            "-m",
            "nvidia",
            "-v",
            "550.163.01",
            "-k",
            "6.17.2-1-pve",
        ],
    );
    assert_eq!(out.status, Some(10));
    assert_eq!(
        out.stderr,
        "Error! Bad return status for module build on kernel: 6.17.2-1-pve (x86_64)\n\
         Consult /var/lib/dkms/nvidia/550.163.01/build/make.log for more information.\n"
    );
    let out = run(&t, &["modprobe", "nvidia"]);
    assert_eq!(
        out.stderr,
        "modprobe: FATAL: Module nvidia not found in directory /lib/modules/6.17.2-1-pve\n"
    );

    let sim = SimHost::start("headers-missing");
    let t = sim.connect();
    let out = run(&t, &["dkms", "autoinstall"]);
    assert_ne!(out.status, Some(0));
    let want = fixture("dkms.headers-missing.pve.txt")
        .lines()
        .nth(2)
        .unwrap()
        .replace("6.8.12-4-pve", "6.17.2-1-pve");
    assert!(out.stderr.contains(&want), "{}\nwant {want}", out.stderr);
}

#[test]
fn sim_pct_devices_lock_and_immutable_resolv_conf() {
    let sim = SimHost::start("uvm-missing");
    let t = sim.connect();
    // devN validation happens now, on the host: the uvm node does not exist.
    let out = run(&t, &["pct", "set", "103", "--dev4", "/dev/nvidia-modeset"]);
    assert_eq!(out.status, Some(0), "{out:?}");
    let out = run(&t, &["pct", "start", "103"]);
    assert_eq!(out.stderr, "Device /dev/nvidia-uvm does not exist\n");
    assert_eq!(
        run(&t, &["pct", "status", "103"]).stdout,
        "status: stopped\n"
    );
    // pct set rewrote the file in Proxmox's order: notes first, sorted keys, the snapshot last.
    let conf = String::from_utf8(t.read_file("/etc/pve/lxc/103.conf").unwrap()).unwrap();
    assert!(conf.starts_with("#LLM server (llama.cpp + llmctl proxy)\n#GPU passthrough managed by llmctl\narch: amd64\n"), "{conf}");
    assert!(
        conf.contains(
            "dev3: /dev/nvidia-uvm-tools,uid=0,gid=0\ndev4: /dev/nvidia-modeset\nfeatures:"
        ),
        "{conf}"
    );
    assert!(conf.ends_with("snaptime: 1760000000\nswap: 0\n"), "{conf}");
    // Loading nvidia_uvm creates the nodes; now the CT starts and sees them with the host's majors.
    assert_eq!(run(&t, &["modprobe", "nvidia_uvm"]).status, Some(0));
    assert_eq!(run(&t, &["pct", "start", "103"]).status, Some(0));
    let ls = run(&Container::new(&t, 103), &["ls", "-l", "/dev/nvidia-uvm"]).stdout;
    assert!(ls.starts_with("crw-rw---- 1 root root 511, 0 "), "{ls}");

    let sim = SimHost::start("resolv-immutable");
    let t = sim.connect();
    let attr = run(&t, &["lsattr", "/var/lib/lxc/103/rootfs/etc/resolv.conf"]).stdout;
    assert!(attr.starts_with("----i-"), "{attr}");
    let out = run(&t, &["pct", "start", "103"]);
    assert_ne!(out.status, Some(0));
    let want: Vec<String> = fixture("lxc-prestart.resolv-immutable.txt")
        .lines()
        .filter(|l| l.starts_with("lxc_init:") || l.starts_with("startup for container"))
        .map(|l| l.replace("CTID", "103"))
        .collect();
    assert_eq!(out.stderr.lines().collect::<Vec<_>>(), want);
    assert!(
        run(&t, &["journalctl"]).stdout.contains(
            "close (rename) atomic file '/etc/resolv.conf' failed: Operation not permitted"
        )
    );
    // The fix from the seed guide works on the simulated host too.
    run(
        &t,
        &["chattr", "-i", "/var/lib/lxc/103/rootfs/etc/resolv.conf"],
    );
    assert_eq!(run(&t, &["pct", "start", "103"]).status, Some(0));

    let sim = SimHost::start("config-locked");
    let t = sim.connect();
    let out = run(&t, &["pct", "set", "103", "--memory", "1024"]);
    assert_eq!(
        (out.status, out.stderr.as_str()),
        (Some(255), "CT is locked (backup)\n")
    );
    assert_eq!(run(&t, &["pct", "unlock", "103"]).status, Some(0));
    assert_eq!(
        run(&t, &["pct", "set", "103", "--memory", "1024"]).status,
        Some(0)
    );
}

#[test]
fn sim_reboot_loads_the_installed_module() {
    let sim = SimHost::start("host-libs-upgraded-old-module");
    let t = sim.connect();
    let out = run(&t, &["nvidia-smi"]);
    assert_eq!(
        out.stdout,
        "Failed to initialize NVML: Driver/library version mismatch\nNVML library version: 595.71\n"
    );
    assert_eq!(run(&t, &["reboot"]).status, Some(0));
    let v = run(
        &t,
        &[
            "nvidia-smi",
            "--query-gpu=driver_version",
            "--format=csv,noheader",
        ],
    );
    assert_eq!(v.stdout, "595.71.05\n");
    // The CT's 590 libraries now mismatch the new module.
    let out = run(&Container::new(&t, 103), &["nvidia-smi"]);
    assert_eq!(out.status, Some(18), "{out:?}");
}

#[test]
fn sim_pct_create_makes_a_stopped_ct_with_its_own_rootfs() {
    let sim = SimHost::start("healthy");
    let t = sim.connect();
    let tpl = "local:vztmpl/debian-13-standard_13.1-2_amd64.tar.zst";
    let out = run(
        &t,
        &[
            "pct",
            "create",
            "104",
            tpl,
            "--hostname",
            "llm2",
            "--memory",
            "8192",
        ],
    );
    assert_eq!(out.status, Some(0), "{out:?}");
    let out = run(&t, &["pct", "create", "104", tpl]);
    assert_eq!(
        out.stderr,
        "unable to create CT 104 - CT 104 already exists on node 'pve'\n"
    );
    assert_eq!(
        String::from_utf8(t.read_file("/etc/pve/lxc/104.conf").unwrap()).unwrap(),
        "arch: amd64\nhostname: llm2\nmemory: 8192\nostype: debian\n"
    );
    assert_eq!(
        run(&t, &["pct", "status", "104"]).stdout,
        "status: stopped\n"
    );
    assert_eq!(run(&t, &["pct", "start", "104"]).status, Some(0));
    let ct = Container::new(&t, 104);
    assert!(
        run(&ct, &["cat", "/etc/os-release"])
            .stdout
            .contains("trixie")
    );
    // A new CT has no NVIDIA userspace yet.
    assert_ne!(run(&ct, &["nvidia-smi"]).status, Some(0));
}
