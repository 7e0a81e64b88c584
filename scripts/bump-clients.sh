#!/usr/bin/env bash
# Moves the pinned npm client versions in scripts/test-stack.sh (Claude Code, Codex CLI) to the latest releases
# npm lists, so the e2e tests run against the clients as they ship today while CI stays deterministic: the pins
# change only when this script runs and the change is committed. Prints what changed; `--check` only reports
# (exit 1 when a pin is behind).
set -euo pipefail
cd "$(dirname "$0")/.."
STACK=scripts/test-stack.sh
check=0
[ "${1:-}" = --check ] && check=1

behind=0
bump() { # VAR npm-package
  local var=$1 pkg=$2 pinned latest
  pinned=$(sed -n "s/^$var=\${$var:-\([^}]*\)}.*/\1/p" "$STACK")
  [ -n "$pinned" ] || { echo "bump-clients: no $var pin found in $STACK" >&2; exit 2; }
  latest=$(npm view "$pkg" version)
  [[ $latest =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "bump-clients: npm gave $pkg version '$latest'" >&2; exit 2; }
  if [ "$pinned" = "$latest" ]; then
    echo "$pkg: $pinned (latest)"
    return
  fi
  behind=1
  if [ $check = 1 ]; then
    echo "$pkg: pinned $pinned, npm latest $latest"
  else
    sed -i "s/^$var=\${$var:-$pinned}/$var=\${$var:-$latest}/" "$STACK"
    echo "$pkg: $pinned -> $latest"
  fi
}
bump CLAUDE_CODE_VERSION @anthropic-ai/claude-code
bump CODEX_VERSION @openai/codex
if [ $check = 1 ]; then exit $behind; fi
[ $behind = 0 ] || echo "run the e2e tests (tests/e2e/test_claude_code.py, test_codex.py, codex_tools.py) and commit $STACK"
