#!/usr/bin/env bash
# Moves the pinned client versions in scripts/test-stack.sh to the latest releases: the npm binaries (Claude Code,
# Codex CLI) and the official Python SDKs in PY_DEPS (anthropic, openai; as the package index pip uses lists them),
# so the e2e tests run against the clients as they ship today while CI stays deterministic: the pins
# change only when this script runs and the change is committed. Prints what changed; `--check` only reports
# (exit 1 when a pin is behind).
set -euo pipefail
cd "$(dirname "$0")/.."
STACK=scripts/test-stack.sh
check=0
[ "${1:-}" = --check ] && check=1

behind=0
# settle NAME PINNED LATEST SED-EXPRESSION: reports NAME, and unless --check rewrites its pin with the expression.
settle() {
  local name=$1 pinned=$2 latest=$3 expr=$4
  [[ $latest =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "bump-clients: the registry gave $name version '$latest'" >&2; exit 2; }
  if [ "$pinned" = "$latest" ]; then
    echo "$name: $pinned (latest)"
  elif [ $check = 1 ]; then
    behind=1
    echo "$name: pinned $pinned, latest $latest"
  else
    behind=1
    sed -i "$expr" "$STACK"
    echo "$name: $pinned -> $latest"
  fi
}
bump() { # VAR npm-package
  local var=$1 pkg=$2 pinned latest
  pinned=$(sed -n "s/^$var=\${$var:-\([^}]*\)}.*/\1/p" "$STACK")
  [ -n "$pinned" ] || { echo "bump-clients: no $var pin found in $STACK" >&2; exit 2; }
  latest=$(npm view "$pkg" version)
  settle "$pkg (npm)" "$pinned" "$latest" "s/^$var=\${$var:-$pinned}/$var=\${$var:-$latest}/"
}
bump_sdk() { # PyPI package pinned as pkg==X in PY_DEPS
  local pkg=$1 pinned latest
  pinned=$(sed -n "s/^PY_DEPS=\".*\b$pkg==\([^ \"]*\).*/\1/p" "$STACK")
  [ -n "$pinned" ] || { echo "bump-clients: no $pkg== pin found in PY_DEPS of $STACK" >&2; exit 2; }
  # The index pip installs from (a mirror, if pip is configured for one), not pypi.org: a release the mirror
  # does not have yet would fail the next CI run.
  latest=$(python3 -m pip index versions "$pkg" 2>/dev/null | sed -n "s/^$pkg (\(.*\))$/\1/p")
  settle "$pkg (PyPI)" "$pinned" "$latest" "/^PY_DEPS=/s/\b$pkg==$pinned\b/$pkg==$latest/"
}
bump CLAUDE_CODE_VERSION @anthropic-ai/claude-code
bump CODEX_VERSION @openai/codex
bump_sdk anthropic
bump_sdk openai
if [ $check = 1 ]; then exit $behind; fi
[ $behind = 0 ] || echo "run the e2e tests (tests/e2e/test_claude_code.py, test_codex.py, codex_tools.py, test_anthropic_sdk.py, test_openai_sdk.py) and commit $STACK"
