//! llmctl: provision, diagnose and serve a local LLM for coding agents on a Proxmox VE host with an NVIDIA GPU.
//!
//! Modules own one thing each. Logic lives in small pure functions (translation, planning, parsing);
//! I/O (HTTP, SSH, files) stays at the edges.

pub mod cli;
pub mod client_config;
pub mod config;
pub mod doctor;
pub mod fleet;
pub mod gpu;
pub mod host;
pub mod logging;
pub mod logs;
pub mod model;
pub mod outcome;
pub mod provision;
pub mod proxy;
pub mod pve;
pub mod remote;
pub mod shell;
pub mod status;
pub mod term;
pub mod transport;
