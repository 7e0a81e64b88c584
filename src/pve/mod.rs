//! Pure parsers of what a Proxmox VE host with an NVIDIA GPU prints: `pveversion`, `/proc/driver/nvidia/version`,
//! `nvidia-smi`, `dkms status`, the LXC config file, dpkg/apt listings, `ls -l /dev/nvidia*`, and llama.cpp's build
//! and unit files. No I/O here: every function takes text and returns typed data, so `doctor` and `provision` share
//! one reading of each format and the parsers are tested on the real outputs in `fixtures/outputs/`.

pub mod cluster;
pub mod dkms;
pub mod llama;
pub mod lxc;
pub mod nvidia;
pub mod packages;
pub mod system;

/// Lines of `text` with fixture-style comments (`# ...`) and shell prompts (`$ cmd`, `root@x:~# cmd`) removed.
/// Only used by tests that read the annotated fixture files.
#[cfg(test)]
pub(crate) fn fixture_body(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("$ ") && !l.contains(":~# "))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[cfg(test)]
pub(crate) fn fixture(name: &str) -> String {
    let path = format!("{}/fixtures/outputs/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read fixture {path}: {e}"))
}
