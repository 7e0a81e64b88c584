#!/usr/bin/env bash
# Installs the peer proxies the benchmark compares llmctl with, from their registries, into a cache outside
# the work tree keyed by version (a second run costs nothing), and nginx from Debian. Prints `export ...` lines:
#   eval "$(bash bench/peers.sh)"
# Each peer that fails to install is reported on stderr and left out (its export is absent), so the benchmark
# table can say why instead of the whole run failing.
set -uo pipefail

CACHE=${LLMCTL_BENCH_CACHE:-/var/cache/llmctl-bench}
LITELLM_VERSION=1.108.7     # the version the figures were taken with
CCR_VERSION=2.0.0           # @musistudio/claude-code-router, idem

log() { echo "[peers] $*" >&2; }
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

# --- LiteLLM (PyPI, with its proxy extra) ---
LITELLM_VENV="$CACHE/litellm-$LITELLM_VERSION"
# A venv is not relocatable (its scripts name their interpreter by path), so it is built in place and a
# marker written last says it is complete.
if [ ! -f "$LITELLM_VENV/.complete" ]; then
  log "installing litellm[proxy]==$LITELLM_VERSION into $LITELLM_VENV"
  rm -rf "$LITELLM_VENV"
  if python3 -m venv "$LITELLM_VENV" >&2 \
    && "$LITELLM_VENV/bin/pip" install -q --disable-pip-version-check "litellm[proxy]==$LITELLM_VERSION" >&2; then
    touch "$LITELLM_VENV/.complete"
  else
    log "litellm[proxy]==$LITELLM_VERSION could not be installed"
    rm -rf "$LITELLM_VENV"
  fi
fi
[ -f "$LITELLM_VENV/.complete" ] && {
  echo "export BENCH_LITELLM_BIN=$LITELLM_VENV/bin/litellm"
  echo "export BENCH_LITELLM_VERSION=$LITELLM_VERSION"
}

# --- claude-code-router (npm) ---
CCR_DIR="$CACHE/claude-code-router-$CCR_VERSION"
if [ ! -x "$CCR_DIR/node_modules/.bin/ccr" ]; then
  log "installing @musistudio/claude-code-router@$CCR_VERSION into $CCR_DIR"
  rm -rf "$CCR_DIR.tmp" && mkdir -p "$CCR_DIR.tmp"
  if npm install --prefix "$CCR_DIR.tmp" --no-audit --no-fund --loglevel=error \
      "@musistudio/claude-code-router@$CCR_VERSION" >&2; then
    rm -rf "$CCR_DIR" && mv "$CCR_DIR.tmp" "$CCR_DIR"
  else
    log "claude-code-router $CCR_VERSION could not be installed"
    rm -rf "$CCR_DIR.tmp"
  fi
fi
[ -x "$CCR_DIR/node_modules/.bin/ccr" ] && {
  echo "export BENCH_CCR_BIN=$CCR_DIR/node_modules/.bin/ccr"
  echo "export BENCH_CCR_VERSION=$CCR_VERSION"
}
# --- nginx (Debian), the plain keep-alive reverse proxy: the floor for any separate proxy process ---
# nginx-light has the proxy and upstream keepalive modules, which is all the bench configures. Installed only
# when absent (apt is not idempotent-cheap: `apt-get update` alone takes seconds).
if ! command -v nginx >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  log "installing nginx-light from Debian"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light; } >&2 \
    || log "nginx-light could not be installed"
fi
if command -v nginx >/dev/null; then
  echo "export BENCH_NGINX_BIN=$(command -v nginx)"
  # `nginx -v` prints "nginx version: nginx/1.22.1" on stderr.
  echo "export BENCH_NGINX_VERSION=$(nginx -v 2>&1 | sed -n 's|.*nginx/||p')"
else
  log "nginx is not installed (run as root with apt-get to install nginx-light)"
fi
exit 0
