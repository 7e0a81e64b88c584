//! Records the commit llmctl is built from, for `llmctl --version` (a bug report then names the exact build).
//! Outside a git checkout (a source tarball, crates.io) the version says so instead of failing the build.

use std::process::Command;

fn main() {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit =
        git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown commit".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    let suffix = if dirty { ", modified" } else { "" };
    println!(
        "cargo:rustc-env=LLMCTL_VERSION_LONG={} ({commit}{suffix})",
        env!("CARGO_PKG_VERSION")
    );
    // Rebuilt when HEAD moves (a commit, a checkout); not on every file change.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{r}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
