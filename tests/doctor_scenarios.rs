//! `llmctl doctor` through the real binary: readable errors (exit 2) for hosts it cannot check, and, for every
//! `fixtures/scenarios/*.toml`, the exact set of problem findings against a simulated Proxmox host with a real
//! sshd.

use std::path::Path;
use std::process::{Command, Output};

fn llmctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llmctl"))
        .args(args)
        // No ./llmctl.toml or user config leaks into the test.
        .current_dir(std::env::temp_dir())
        .env("HOME", std::env::temp_dir())
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .expect("run llmctl")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn no_host_is_a_readable_error() {
    let o = llmctl(&["doctor"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no host given: pass --host"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_machine_that_is_not_proxmox() {
    // This test machine is plain Debian: `pveversion` does not exist here.
    assert!(
        !Path::new("/usr/bin/pveversion").exists(),
        "this test needs a machine that is not a Proxmox host"
    );
    let o = llmctl(&["doctor", "--host", "local"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("local is not a Proxmox VE host"), "{err}");
    assert!(
        err.contains("Run llmctl against the Proxmox host itself"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

#[test]
fn an_unreachable_host() {
    // Nothing listens on port 1 of the loopback address: connection refused.
    let o = llmctl(&["doctor", "--host", "root@127.0.0.1:1"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot reach") && err.contains("127.0.0.1"),
        "{err}"
    );
}

#[test]
fn a_bad_vmid_is_rejected_by_the_parser() {
    let o = llmctl(&["doctor", "--host", "local", "--vmid", "103;reboot"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("invalid value '103;reboot'"),
        "{}",
        stderr(&o)
    );
}
