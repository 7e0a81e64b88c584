//! Ports (the bench's range is 18400-18499) and environment lookups shared by the sections.

use std::path::PathBuf;

pub const UPSTREAM_ROLE_ENV: &str = "LLMCTL_BENCH_UPSTREAM_ADDR";
/// `LISTEN UPSTREAM`: the bench re-executed as the pass-through proxy (bench/proxy/passthru.rs).
pub const PASSTHRU_ROLE_ENV: &str = "LLMCTL_BENCH_PASSTHRU_ADDRS";

/// The key every endpoint is given and every request carries (LiteLLM demands a strong master key).
pub const API_KEY: &str = "sk-bench-4f6c2a9e8b1d7035c4e2a18f9b6d0c37";

pub const PORT_UPSTREAM: u16 = 18400;
pub const PORT_PASSTHRU: u16 = 18405;
pub const PORT_NGINX: u16 = 18407;
pub const PORT_LLMCTL: u16 = 18410;
pub const PORT_LITELLM: u16 = 18420;
pub const PORT_CCR: u16 = 18430;
pub const PORT_LLAMA: u16 = 18450;
pub const PORT_LLMCTL_LLAMA: u16 = 18451;
/// The replicas section: two llama-servers, llmctl over both and over the first alone, nginx round-robin.
pub const PORT_REPLICA_A: u16 = 18452;
pub const PORT_REPLICA_B: u16 = 18453;
pub const PORT_LLMCTL_REPLICAS: u16 = 18454;
pub const PORT_LLMCTL_ONE: u16 = 18455;
pub const PORT_NGINX_RR: u16 = 18456;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The test stack's llama-server binary and model, or why the sections that run a real llama-server cannot.
pub fn llama_and_model() -> Result<(PathBuf, PathBuf), String> {
    match (
        env_path("LLMCTL_LLAMA_SERVER"),
        env_path("LLMCTL_TEST_MODEL"),
    ) {
        (Some(bin), Some(model)) => Ok((bin, model)),
        _ => Err("LLMCTL_LLAMA_SERVER / LLMCTL_TEST_MODEL are not set \
                  (`eval \"$(bash scripts/test-stack.sh)\"`)"
            .into()),
    }
}
