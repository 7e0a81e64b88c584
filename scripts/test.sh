#!/usr/bin/env bash
# The test command (README, CI): prepares the real test stack (cached), builds llmctl, runs every Rust test, then
# the end-to-end suite: the official Anthropic and OpenAI SDKs, the real Claude Code and Codex CLI binaries through
# `llmctl serve-proxy` to real llama-servers with a real model. Nothing is skipped; a missing component is a failure that says what to do.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/test-stack.sh)"
cargo build
cargo test
# Criterion's test mode: each stream_translator benchmark runs once, so the benchmark itself cannot rot.
cargo test --bench stream_translator
# -rP: print what passing end-to-end tests report (prompt-cache figures, what Claude Code printed).
"$LLMCTL_TEST_VENV/bin/pytest" -v -rP -p no:cacheprovider tests/e2e
