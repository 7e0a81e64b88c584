#!/usr/bin/env bash
# llmctl's main job on its bundled default, no Proxmox host or GPU of your own needed:
#   a simulated Proxmox VE host (its own network namespace, a real OpenSSH sshd, simulated pct/nvidia-smi/dkms/apt
#   reproducing real outputs; the container runs real processes) is diagnosed by `llmctl doctor`, provisioned by
#   `llmctl provision` over real SSH (plan, apply, smoke test), diagnosed again (healthy), and then the real Claude
#   Code binary talks to the provisioned container: `llmctl serve-proxy` in front of a real llama-server with a real
#   (tiny, CPU) model that provision downloaded and verified there.
# Usage (as root, on Debian): bash scripts/demo.sh [scenario]   (default: fresh; others: ls fixtures/scenarios)
#   SKIP_CLAUDE=1 skips the last part (Claude Code's ~20k-token first prompt takes minutes of CPU prefill).
#   bash scripts/demo.sh --cluster: the same job on a simulated 3-node Proxmox VE cluster
#   (fixtures/clusters/three-nodes.toml: pve1 healthy, pve2 fresh with a Blackwell card, pve3 whose DKMS cannot
#   build): llmctl.toml names one node ([cluster]), doctor, provision --plan / --yes on all nodes in parallel,
#   doctor healthy everywhere, provision --check with nothing to change. No Claude Code part (see docs/fleet.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --cluster ]; then
  exec bash scripts/demo-cluster.sh
fi
SCENARIO=${1:-fresh}
[ -f "fixtures/scenarios/$SCENARIO.toml" ] || { echo "no scenario $SCENARIO; one of: $(ls fixtures/scenarios | sed 's/.toml//' | tr '\n' ' ')" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "run as root: the simulated host needs network and mount namespaces" >&2; exit 2; }

eval "$(bash scripts/test-stack.sh)"
cargo build -q
LLMCTL=$PWD/target/debug/llmctl
SIM=250
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  fixtures/sim/simhost down "$SIM" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== 0. a simulated Proxmox VE host in state '$SCENARIO'"
export LLMCTL_SIM_LLAMA_SERVER=$LLMCTL_LLAMA_SERVER   # the simulated CUDA build installs this real CPU build
eval "$(fixtures/sim/simhost up "fixtures/scenarios/$SCENARIO.toml" "$SIM")"
test_side=${SIM_ADDR%.*}.1
# What the container downloads: the model, and a llama.cpp source archive (the CUDA build itself is simulated).
mkdir -p "$work/files/llama.cpp-b11434"
cp "$LLMCTL_TEST_MODEL" "$work/files/model.gguf"
echo 'project(llama.cpp)' >"$work/files/llama.cpp-b11434/CMakeLists.txt"
tar -czf "$work/files/llama.cpp-b11434.tar.gz" -C "$work/files" llama.cpp-b11434
python3 -m http.server 18600 --bind "$test_side" --directory "$work/files" >/dev/null 2>&1 &
pids+=($!)
cat >"$work/llmctl.toml" <<EOF
[host]
target = "$SIM_TARGET"
vmid = 103

[container]
cores = 2
memory_mib = 4096

[driver]
version = "595.71.05"

[llama_cpp]
git_ref = "b11434"
archive_url = "http://$test_side:18600/llama.cpp-{ref}.tar.gz"

[model]
source = "http://$test_side:18600/model.gguf"
sha256 = "$(sha256sum "$LLMCTL_TEST_MODEL" | cut -d' ' -f1)"
dest = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"

[server]
context = 32768
threads = 2
cache_type_k = "f16"
cache_type_v = "f16"
port = 8080
# The tiny test model was trained on 8k tokens; Claude Code's first prompt is ~20k. +5 on its end-of-turn token
# keeps its replies short on a CPU (see tests/e2e/stack.py).
extra_args = ["-np", "1", "--override-kv", "llama.context_length=int:32768", "--logit-bias", "2+5"]

[proxy]
listen = "0.0.0.0:4000"
EOF
ssh_args=(--identity "$SIM_KEY" --known-hosts "$SIM_KNOWN_HOSTS")
run() { echo "\$ llmctl $*"; "$LLMCTL" --config "$work/llmctl.toml" "$@" "${ssh_args[@]}"; }

echo
echo "== 1. llmctl doctor: what is wrong with the host"
run doctor && echo "(doctor: healthy)" || echo "(doctor exit code $?: 1 = problems found, each with its fix)"

echo
echo "== 2. llmctl provision --plan: every step and exactly what it would change"
run provision --plan

echo
echo "== 3. llmctl provision --yes: apply, verify each step, smoke-test through the proxy"
run provision --yes

echo
echo "== 4. llmctl doctor again"
run doctor

echo
echo "== 5. llmctl provision again: nothing to change"
run provision --yes | tail -n 4

if [ "${SKIP_CLAUDE:-}" = 1 ]; then exit 0; fi
echo
echo "== 6. the real Claude Code on \"your laptop\" (a fresh HOME here) against the provisioned container's proxy"
home=$(mktemp -d)
# The container's address and the proxy's key come from the host over SSH, into ~/.claude/settings.json only.
HOME=$home run client-config claude --from-host --write
echo "claude -p 'Say hello' (its first prompt is ~20k tokens: a few minutes of CPU prefill on 2 cores)"
(cd "$home" && env -i PATH="$PATH" HOME="$home" timeout 900 "$LLMCTL_CLAUDE_BIN" -p "Say hello" </dev/null)
echo
echo "proxy log in the container (one line per request):"
fixtures/sim/simhost exec "$SIM" pct exec 103 -- journalctl -u llmctl-proxy -n 3 --no-pager -o cat
rm -rf "$home"
