#!/usr/bin/env bash
# llmctl's main job on its bundled default, no Proxmox host or GPU of your own needed:
#   1. a simulated Proxmox VE host (its own network namespace, a real OpenSSH sshd, simulated pct/nvidia-smi/dkms
#      reproducing real outputs) in a broken state, diagnosed by `llmctl doctor` over real SSH;
#   2. `llmctl serve-proxy` in front of a real llama-server with a real (tiny) model, and the real Claude Code
#      binary answering through it.
# Usage (as root, on Debian): bash scripts/demo.sh [scenario]   (scenarios: ls fixtures/scenarios)
set -euo pipefail
cd "$(dirname "$0")/.."
SCENARIO=${1:-container-libs-mismatch}
[ -f "fixtures/scenarios/$SCENARIO.toml" ] || { echo "no scenario $SCENARIO; one of: $(ls fixtures/scenarios | sed 's/.toml//' | tr '\n' ' ')" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "run as root: the simulated host needs network and mount namespaces" >&2; exit 2; }

eval "$(bash scripts/test-stack.sh)"
cargo build -q
LLMCTL=$PWD/target/debug/llmctl
SIM=250
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  fixtures/sim/simhost down "$SIM" >/dev/null 2>&1 || true
}
trap cleanup EXIT

echo "== 1. llmctl doctor against a simulated Proxmox host in state '$SCENARIO' (real sshd, real SSH)"
eval "$(fixtures/sim/simhost up "fixtures/scenarios/$SCENARIO.toml" "$SIM")"
"$LLMCTL" doctor --host "$SIM_TARGET" --identity "$SIM_KEY" --known-hosts "$SIM_KNOWN_HOSTS" --vmid 103 \
  && echo "(doctor: healthy)" || echo "(doctor exit code $?: 1 = problems found, each with its fix)"

echo
echo "== 2. llmctl serve-proxy in front of a real llama-server; Claude Code through it"
port_llama=18601 port_proxy=18602
"$LLMCTL_LLAMA_SERVER" -m "$LLMCTL_TEST_MODEL" --host 127.0.0.1 --port $port_llama -c 32768 -np 1 \
  --override-kv llama.context_length=int:32768 >/tmp/llmctl-demo-llama.log 2>&1 &
pids+=($!)
"$LLMCTL" serve-proxy --listen 127.0.0.1:$port_proxy --upstream http://127.0.0.1:$port_llama \
  2>/tmp/llmctl-demo-proxy.log &
pids+=($!)
for _ in $(seq 120); do curl -fs http://127.0.0.1:$port_llama/health >/dev/null 2>&1 && break; sleep 1; done
curl -s http://127.0.0.1:$port_proxy/health; echo
home=$(mktemp -d)
echo "claude -p 'Say hello' (Claude Code's first prompt is ~20k tokens: a few minutes of CPU prefill on 2 cores)"
HOME=$home ANTHROPIC_BASE_URL=http://127.0.0.1:$port_proxy ANTHROPIC_API_KEY=local DISABLE_TELEMETRY=1 \
  CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_AUTOUPDATER=1 \
  timeout 900 "$LLMCTL_CLAUDE_BIN" -p "Say hello" </dev/null
echo
echo "proxy log (one line per request):"; tail -n 3 /tmp/llmctl-demo-proxy.log
rm -rf "$home"
