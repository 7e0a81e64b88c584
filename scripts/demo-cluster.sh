#!/usr/bin/env bash
# `bash scripts/demo.sh --cluster`: llmctl's main job on a simulated 3-node Proxmox VE cluster
# (fixtures/clusters/three-nodes.toml; fixtures/clusters/README.md): each node its own network namespace and real
# OpenSSH sshd, all sharing one /etc/pve as pmxcfs shares it.
#   pve1  healthy          RTX 4090, driver 595 open, CT 101 serving
#   pve2  fresh            RTX PRO 6000 Blackwell (open module only), no driver, CT 102 bare
#   pve3  dkms-not-built   RTX 4090, driver 550 that cannot build for its booted 6.17 kernel, CT 103
# llmctl.toml names one node ([cluster] node); the members, their addresses and who runs which CT come from the
# cluster. doctor → provision --plan → provision --yes (all nodes in parallel) → doctor healthy everywhere →
# provision --check: nothing to change → [proxy] upstreams = "fleet": every node's proxy routes to the others'
# (one endpoint for every GPU), a request to pve1's proxy answered by a peer with pve1's llama-server stopped.
# Usage (as root, on Debian): bash scripts/demo.sh --cluster
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the simulated nodes need network and mount namespaces" >&2; exit 2; }

eval "$(bash scripts/test-stack.sh)"
cargo build -q
LLMCTL=$PWD/target/debug/llmctl
SIM=240   # nodes 240, 241, 242 (the one-host demo uses 250)
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  fixtures/sim/simhost down-cluster "$SIM" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== 0. a simulated 3-node Proxmox VE cluster (fixtures/clusters/three-nodes.toml)"
# The simulated CUDA build installs the test stack's real CPU llama-server; the healthy node's container already
# runs it with the real model and this llmctl as its proxy, as provision leaves them.
export LLMCTL_SIM_LLAMA_SERVER=$LLMCTL_LLAMA_SERVER LLMCTL_SIM_MODEL=$LLMCTL_TEST_MODEL LLMCTL_SIM_LLMCTL=$LLMCTL
fixtures/sim/simhost up-cluster fixtures/clusters/three-nodes.toml "$SIM" >"$work/cluster.env"
key=$(sed -n 's/^CLUSTER_KEY=//p' "$work/cluster.env")
known_hosts=$(sed -n 's/^CLUSTER_KNOWN_HOSTS=//p' "$work/cluster.env")
declare -A target lan num
while read -r line; do
  name=$(sed 's/^NODE=\([^ ]*\) .*/\1/' <<<"$line")
  target[$name]=$(sed 's/.* TARGET=\([^ ]*\) .*/\1/' <<<"$line")
  lan[$name]=$(sed 's/.* LAN=\([^ ]*\).*/\1/' <<<"$line")
  num[$name]=$(sed 's/.* N=\([^ ]*\) .*/\1/' <<<"$line")
  echo "   $name at ${target[$name]}"
done < <(grep '^NODE=' "$work/cluster.env")

# What the containers download: the model, and a llama.cpp source archive (the CUDA build itself is simulated).
# The nodes do not reach the internet nor each other: each reaches one file server at its own link's test side.
mkdir -p "$work/files/llama.cpp-b11434"
cp "$LLMCTL_TEST_MODEL" "$work/files/model.gguf"
echo 'project(llama.cpp)' >"$work/files/llama.cpp-b11434/CMakeLists.txt"
tar -czf "$work/files/llama.cpp-b11434.tar.gz" -C "$work/files" llama.cpp-b11434
declare -A files
for name in pve1 pve2 pve3; do
  addr=${target[$name]#root@}
  test_side=${addr%.*}.1
  python3 -m http.server 18600 --bind "$test_side" --directory "$work/files" >/dev/null 2>&1 &
  pids+=($!)
  files[$name]="http://$test_side:18600"
done

bash scripts/cluster-config.sh "${target[pve1]}" "${files[pve2]}" \
  "$(sha256sum "$LLMCTL_TEST_MODEL" | cut -d' ' -f1)" >"$work/llmctl.toml"
echo
echo "llmctl.toml:"
sed 's/^/   /' "$work/llmctl.toml"

ssh_args=(--identity "$key" --known-hosts "$known_hosts")
codes=()
run() {
  echo "\$ llmctl $*"
  local rc=0 t0=$SECONDS
  "$LLMCTL" --config "$work/llmctl.toml" "$@" "${ssh_args[@]}" || rc=$?
  codes+=("llmctl $*: exit $rc ($((SECONDS - t0)) s)")
  return "$rc"
}

echo
echo "== 1. llmctl doctor: each node's findings"
run doctor && echo "(doctor: healthy)" || echo "(doctor exit code $?: 1 = problems found, each with its fix)"

echo
echo "== 2. llmctl provision --plan: each node's steps and exactly what they would change"
run provision --plan

echo
echo "== 3. llmctl provision --yes: every node in parallel, each verified and smoke-tested"
run provision --yes

echo
echo "== 4. llmctl doctor again: healthy everywhere"
run doctor

echo
echo "== 5. llmctl provision --check: nothing to change on any node"
run provision --check

echo
echo "== 6. one endpoint for every GPU: [proxy] upstreams = \"fleet\""
# Each node's proxy routes to its own llama-server and to the other nodes' proxies (its peers), on the cluster's
# LAN: where each node's proxy is, [proxy] url says (a real container's static net0 ip= would do).
sed -i 's/^listen = "0.0.0.0:4000"$/listen = "0.0.0.0:4000"\nupstreams = "fleet"/' "$work/llmctl.toml"
for name in pve1 pve2 pve3; do
  printf '\n[cluster.nodes.%s.proxy]\nurl = "http://%s:4000"\n' "$name" "${lan[$name]}" >>"$work/llmctl.toml"
done
echo "   + upstreams = \"fleet\" in [proxy]; [cluster.nodes.<node>.proxy] url = \"http://10.x.251.<n>:4000\""
run provision --yes
run status || true
echo
echo "\$ llmctl client-config claude --from-host --host pve1   # one Claude Code endpoint for the house"
"$LLMCTL" --config "$work/llmctl.toml" client-config claude --from-host --host pve1 "${ssh_args[@]}" | sed 's/^/   /' || true
key=$(fixtures/sim/simhost exec "${num[pve1]}" pct exec 101 -- cat /etc/llmctl/proxy-api-key)
fixtures/sim/simhost exec "${num[pve1]}" pct exec 101 -- systemctl stop llama-server
echo "   pve1's own llama-server stopped; a request to pve1's proxy:"
PROXY="http://${target[pve1]#root@}:4000" KEY=$key python3 - <<'PY'
import json, os, urllib.request
url = os.environ["PROXY"]
req = urllib.request.Request(url + "/v1/messages", method="POST", headers={
    "x-api-key": os.environ["KEY"], "content-type": "application/json", "anthropic-version": "2023-06-01"},
    data=json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 16,
                     "messages": [{"role": "user", "content": "Say hi"}]}).encode())
answer = json.load(urllib.request.urlopen(req, timeout=120))
print("   answer:", json.dumps(answer["content"][0].get("text", ""))[:80])
health = json.load(urllib.request.urlopen(url + "/health", timeout=10))
for r in health["replicas"]:
    print("   replica %-28s %-5s %s" % (r["url"], "peer" if r.get("peer") else "own", "up" if r["up"] else "down"))
PY

echo
echo "== each step's exit code and wall time"
printf '%s\n' "${codes[@]}"
