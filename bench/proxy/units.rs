//! Runs the proxy benchmark's unit tests under `cargo test`: the bench itself has no test harness.
#![allow(dead_code)]

#[path = "cache.rs"]
mod cache;
#[path = "env.rs"]
mod env;
#[path = "load.rs"]
mod load;
#[path = "replicas.rs"]
mod replicas;
#[path = "stats.rs"]
mod stats;
#[path = "targets.rs"]
mod targets;
#[path = "upstream.rs"]
mod upstream;

pub use env::{PASSTHRU_ROLE_ENV, PORT_LLAMA, PORT_LLMCTL_LLAMA, UPSTREAM_ROLE_ENV, env_path};
