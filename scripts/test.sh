#!/usr/bin/env bash
# The test command: prepares the real test stack (cached), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/test-stack.sh)"
cargo test --all-targets
