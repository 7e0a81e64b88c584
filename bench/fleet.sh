#!/usr/bin/env bash
# Issue 13's fleet figures (`BENCH_ONLY=fleet bash bench/run.sh`, which builds llmctl and sets up the test stack
# first; or alone: `eval "$(bash scripts/test-stack.sh)"; LLMCTL_BIN=target/release/llmctl bash bench/fleet.sh`),
# on the simulated 3-node cluster of fixtures/clusters/three-nodes.toml (healthy, fresh, dkms-not-built):
#   - `provision --yes` over the cluster (its nodes in parallel) on a fresh cluster, against each node alone
#     (`provision --yes --host <node>`, each on a fresh copy), FLEET_ROUNDS (default 3) times: the ratio of the
#     medians, parallel / slowest node alone;
#   - `doctor` over the cluster: the median wall time of FLEET_DOCTOR_RUNS runs, on the fresh cluster (three
#     states) and on the provisioned one (three healthy nodes), and the SSH commands (exec channels) each node
#     receives during one run, by phase, from `llmctl -v` (one `ssh exec:` line per command, naming its host).
# Prints the figures and writes them as the fleet block of BENCH_OUT (default docs/performance.md), between
# `<!-- fleet ... -->` and `<!-- /fleet -->` in its hand-written part. Needs root (the sims), the test stack's
# LLMCTL_LLAMA_SERVER and LLMCTL_TEST_MODEL, and LLMCTL_BIN. The sims are sim hosts FLEET_SIM (default 200) to
# FLEET_SIM+2 on LLMCTL_SIM_NET's network; every cluster started is removed again, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
: "${LLMCTL_BIN:?LLMCTL_BIN is not set (an llmctl binary, e.g. target/release/llmctl)}"
: "${LLMCTL_LLAMA_SERVER:?not set: eval \"\$(bash scripts/test-stack.sh)\" first}"
: "${LLMCTL_TEST_MODEL:?not set: eval \"\$(bash scripts/test-stack.sh)\" first}"
[ "$(id -u)" = 0 ] || { echo "[fleet] run as root: the simulated nodes need network and mount namespaces" >&2; exit 2; }
LLMCTL_BIN=$(realpath "$LLMCTL_BIN")
out=${BENCH_OUT:-$root/docs/performance.md}
sim=${FLEET_SIM:-200}
runs=${FLEET_DOCTOR_RUNS:-7}
rounds=${FLEET_ROUNDS:-3}
net=${LLMCTL_SIM_NET:-213}
cluster_file=fixtures/clusters/three-nodes.toml
nodes=(pve1 pve2 pve3)
port=18611   # the file server on pve2's link (what its fresh container downloads)

work=$(mktemp -d)
files_pid=
log() { echo "[fleet] $*" >&2; }
stop_files() {
  if [ -n "$files_pid" ]; then kill "$files_pid" 2>/dev/null || true; wait "$files_pid" 2>/dev/null || true; fi
  files_pid=
}
down() { stop_files; fixtures/sim/simhost down-cluster "$sim" >/dev/null 2>&1 || true; }
cleanup() { down; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

load() { cut -d' ' -f1-3 /proc/loadavg; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# What pve2's fresh container downloads: the model, and a llama.cpp source archive (the CUDA build is simulated).
mkdir -p "$work/files/llama.cpp-b11434"
cp "$LLMCTL_TEST_MODEL" "$work/files/model.gguf"
echo 'project(llama.cpp)' >"$work/files/llama.cpp-b11434/CMakeLists.txt"
tar -czf "$work/files/llama.cpp-b11434.tar.gz" -C "$work/files" llama.cpp-b11434
sha=$(sha256sum "$LLMCTL_TEST_MODEL" | cut -d' ' -f1)
pve1="root@10.$net.$sim.2"
files_at="10.$net.$((sim + 1)).1"   # the test side of pve2's link
bash scripts/cluster-config.sh "$pve1" "http://$files_at:$port" "$sha" >"$work/llmctl.toml"

# A fresh copy of the cluster: its containers run this llmctl as their proxy (and the test stack's llama-server
# and model), as provision leaves them, so the healthy node is healthy.
up() {
  down
  LLMCTL_SIM_LLMCTL=$LLMCTL_BIN LLMCTL_SIM_LLAMA_SERVER=$LLMCTL_LLAMA_SERVER LLMCTL_SIM_MODEL=$LLMCTL_TEST_MODEL \
    fixtures/sim/simhost up-cluster "$cluster_file" "$sim" >"$work/cluster.env"
  grep -q "^NODE=pve1 .* TARGET=$pve1 " "$work/cluster.env" || { cat "$work/cluster.env" >&2; log "unexpected cluster"; exit 2; }
  python3 -m http.server "$port" --bind "$files_at" --directory "$work/files" >/dev/null 2>&1 &
  files_pid=$!
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/$files_at/$port") 2>/dev/null && break; sleep 0.1; done
}

# llmctl with the cluster's key and known_hosts only (no agent, no ~/.ssh), as the tests run it.
llmctl() {
  local cdir=/run/llmctl-sim$net/cluster-$sim
  [ "$net" = 213 ] && cdir=/run/llmctl-sim/cluster-$sim
  env -u SSH_AUTH_SOCK HOME="$work" "$LLMCTL_BIN" --config "$work/llmctl.toml" "$@" \
    --identity "$cdir/id_ed25519" --known-hosts "$cdir/known_hosts" </dev/null
}

# Runs `llmctl "$@"` and prints its wall time in seconds; its output goes to $work/last.{out,err}. Exit codes
# other than 0 and 1 (problems found) stop the bench.
timed() {
  local t0 t1 rc=0
  t0=$(now)
  llmctl "$@" >"$work/last.out" 2>"$work/last.err" || rc=$?
  t1=$(now)
  if [ "$rc" -gt 1 ] || { [[ " $* " == *" provision "* ]] && [ "$rc" != 0 ]; }; then
    cat "$work/last.out" "$work/last.err" >&2
    log "llmctl $* exited $rc"
    exit 2
  fi
  secs "$t0" "$t1"
}

# The SSH commands of one `llmctl -v doctor` over the cluster ($work/last.err), per node and phase: discovery
# (the named node's /etc/pve), host facts, container facts (the two rounds of host::facts::gather, in that
# order), then the live probes a check asks in the container (the offload planner, health endpoints).
commands_by_node() {
  local name addr
  for name in "${nodes[@]}"; do
    addr=$(target_of "$name")
    awk -v t="$addr" -v name="$name" '
      /ssh exec: / && $NF == "target=" t {
        n++
        if (/\/etc\/pve\/\.members/) d++
        else if (/ssh exec: pct exec [0-9]+ -- sh -c .export LC_ALL=C/) b++
        else if (/ssh exec: pct exec .*llmctl probe --health/) h++
        else if (/ssh exec: pct exec .*llmctl model plan/) p++
        else if (/ssh exec: sh -c .export LC_ALL=C/) f++
        else o++
      }
      END {
        facts = (f >= 1 ? "host facts 1" : "") (f >= 2 ? ", container facts 1" : "") (f > 2 ? sprintf(" (+%d more fact rounds)", f - 2) : "")
        live = b + p + h
        what = (b ? sprintf("%d asking several together", b) : "")
        what = what (what != "" && p ? ", " : "") (p ? sprintf("offload plan %d", p) : "")
        what = what (what != "" && h ? ", " : "") (h ? sprintf("health %d", h) : "")
        printf "%s|%d|%s%s%s%s\n", name, n, (d ? sprintf("discovery %d, ", d) : ""), facts,
          (live ? sprintf(", live probes %d (%s)", live, what) : ""), (o ? sprintf(", other %d", o) : "")
      }' "$work/last.err"
  done
}

# From a `llmctl -v` run's log ($work/last.err): each node's first and last SSH command, in seconds after the
# run's first log line ("first–last").
span_of() { # target
  awk -v t="$1" '
    function secs(ts) { split(substr(ts, 12, 15), p, ":"); return p[1] * 3600 + p[2] * 60 + p[3] }
    NR == 1 { t0 = secs($1) }
    /ssh exec: / && $NF == "target=" t { if (first == "") first = secs($1) - t0; last = secs($1) - t0 }
    END { printf "%.1f–%.1f s", first, last }' "$work/last.err"
}
target_of() { sed -n "s/^NODE=$1 .* TARGET=\([^ ]*\) .*/\1/p" "$work/cluster.env"; }

doctor_figures() { # label
  local label=$1 walls=() i
  llmctl -v doctor >"$work/last.out" 2>"$work/last.err" || true
  grep -q 'ssh exec: ' "$work/last.err" || { cat "$work/last.err" >&2; log "llmctl -v printed no ssh exec lines"; exit 2; }
  commands_by_node >"$work/commands-$label.txt"
  cp "$work/last.err" "$work/doctor-v-$label.log"
  for i in $(seq "$runs"); do
    walls+=("$(timed doctor)")
  done
  printf '%s\n' "${walls[@]}" >"$work/doctor-$label.txt"
  log "doctor over 3 nodes ($label): ${walls[*]} s; commands per node: $(tr '\n' ';' <"$work/commands-$label.txt")"
}

started=$(date -u '+%Y-%m-%d %H:%M UTC')
load_start=$(load)
log "load average at the start: $load_start"

# 1. Doctor on the fresh cluster (three states).
up
doctor_figures fresh

# 2. Rounds of: provision --yes over the cluster (its nodes in parallel) from fresh, then each node alone on a
# fresh copy. The first round's parallel run is followed by doctor on the provisioned (healthy) cluster, and its
# -v logs give each node's first and last command.
declare -A alone span_alone
par_all=()
load_rounds=()
for r in $(seq "$rounds"); do
  [ "$r" = 1 ] || up
  load_rounds+=("$(load)")
  log "round $r: provision --yes over the cluster (in parallel), load $(load)"
  t=$(timed -v provision --yes)
  par_all+=("$t")
  log "round $r: parallel: $t s"
  if [ "$r" = 1 ]; then
    span_par=""
    for name in "${nodes[@]}"; do span_par+="${span_par:+, }$name $(span_of "$(target_of "$name")")"; done
    summary_par=$(sed -n '/^host  /,$p' "$work/last.out")
    doctor_figures provisioned
  fi
  for name in "${nodes[@]}"; do
    up
    t=$(timed -v provision --yes --host "$name")
    alone[$name]="${alone[$name]:-}${alone[$name]:+ }$t"
    [ "$r" = 1 ] && span_alone[$name]=$(span_of "$(target_of "$name")")
    log "round $r: $name alone (fresh copy): $t s"
  done
done
down
load_end=$(load)

med() { tr ' ' '\n' <<<"$1" | median; }
list() { sed 's/ /, /g' <<<"$1"; }
par=$(med "${par_all[*]}")
slowest=${nodes[0]}
for name in "${nodes[@]}"; do
  awk -v a="$(med "${alone[$name]}")" -v b="$(med "${alone[$slowest]}")" 'BEGIN { exit !(a > b) }' && slowest=$name
done
slow=$(med "${alone[$slowest]}")
ratio=$(awk -v p="$par" -v s="$slow" 'BEGIN { printf "%.2f", p / s }')
sum_alone=$(awk -v a="$(med "${alone[pve1]}")" -v b="$(med "${alone[pve2]}")" -v c="$(med "${alone[pve3]}")" 'BEGIN { printf "%.2f", a + b + c }')
verdict() { awk -v v="$1" -v g="$2" 'BEGIN { print (v <= g ? "met" : "**not met**") }'; }
med_fresh=$(median <"$work/doctor-fresh.txt")
med_prov=$(median <"$work/doctor-provisioned.txt")
range() { sort -g "$1" | sed -n '1p;$p' | paste -sd- | sed 's/-/–/'; }
busy=$(awk -v l="${load_start%% *}" 'BEGIN { print (l >= 1.0 ? " — **busy** (1-minute load ≥ 1 at the start: other work shared the CPUs; treat the wall times as rough)" : "") }')
cmd_rows() {
  while IFS='|' read -r name n phases; do
    echo "| $name | $n | $phases |"
  done <"$1"
}
round_loads=$(printf '%s; ' "${load_rounds[@]}")
round_loads=${round_loads%; }

block=$(cat <<EOF
## A fleet: provision and doctor over a 3-node cluster (issue 13, measured)

Written by \`BENCH_ONLY=fleet bash bench/run.sh\` (bench/fleet.sh) on $started; llmctl: \`${LLMCTL_BIN#"$root"/}\`.

- Machine: $(nproc) CPUs, shared by llmctl, the three simulated nodes and their containers' llama-servers (every
  simulated tool is a Python process)
- Load average at the start: $load_start$busy; at each round's parallel provision: $round_loads; at the end: $load_end
- The cluster: fixtures/clusters/three-nodes.toml, simulated (each node its own network namespace and real OpenSSH
  sshd, one shared /etc/pve): pve1 healthy, pve2 fresh (no driver, CT 102 bare: it installs the driver, downloads
  the model and builds llama.cpp), pve3 with a DKMS module that does not build for its kernel (a new driver)

| provision --yes, from a fresh cluster ($rounds rounds) | median wall time | each round | round 1: each node's first–last SSH command |
|---|---|---|---|
| the 3 nodes in parallel (\`provision --yes\`) | $par s | $(list "${par_all[*]}") s | $span_par |
| pve1 alone (\`provision --yes --host pve1\`, fresh copy) | $(med "${alone[pve1]}") s | $(list "${alone[pve1]}") s | ${span_alone[pve1]} |
| pve2 alone | $(med "${alone[pve2]}") s | $(list "${alone[pve2]}") s | ${span_alone[pve2]} |
| pve3 alone | $(med "${alone[pve3]}") s | $(list "${alone[pve3]}") s | ${span_alone[pve3]} |

Parallel / slowest alone ($slowest), medians: **$ratio×** (goal ≤ 1.3×: $(verdict "$ratio" 1.3)). The three alone,
one after the other: $sum_alone s.

| doctor over the 3 nodes, $runs runs | median wall time | range |
|---|---|---|
| fresh cluster (healthy, fresh, DKMS broken: exit 1) | $med_fresh s | $(range "$work/doctor-fresh.txt") s |
| after the parallel provision (3 healthy nodes) | $med_prov s | $(range "$work/doctor-provisioned.txt") s |

Goal < 3 s: $(verdict "$(awk -v a="$med_fresh" -v b="$med_prov" 'BEGIN { print (a > b ? a : b) }')" 2.99).

SSH commands (exec channels) each node receives during one \`llmctl -v doctor\` over the cluster (one
\`ssh exec:\` line per command, naming its host), by phase. Fresh cluster:

| node | commands | phases |
|---|---|---|
$(cmd_rows "$work/commands-fresh.txt")

After the provision (3 healthy nodes):

| node | commands | phases |
|---|---|---|
$(cmd_rows "$work/commands-provisioned.txt")

Round 1's parallel run, its summary:

\`\`\`
$summary_par
\`\`\`
EOF
)
echo "$block"
mkdir -p "$(dirname "$out")"
[ -f "$out" ] || : >"$out"
# The block replaces the previous one; the first time it goes after the replicas block (or the hand-written
# marker, or at the end).
BLOCK=$block python3 - "$out" <<'PY'
import os, sys
path = sys.argv[1]
text = open(path).read()
begin, end = "<!-- fleet: written by `BENCH_ONLY=fleet bash bench/run.sh` -->", "<!-- /fleet -->"
block = f"{begin}\n{os.environ['BLOCK'].rstrip()}\n{end}\n"
b = text.find(begin)
e = text.find(end, b) if b >= 0 else -1
if b >= 0 and e >= 0:
    e += len(end)
    if text[e:e + 1] == "\n":
        e += 1
    text = text[:b] + block + text[e:]
else:
    for anchor in ("<!-- /replicas -->\n", "<!-- hand-written below: kept by the bench when it regenerates this file -->\n"):
        i = text.find(anchor)
        if i >= 0:
            i += len(anchor)
            text = text[:i] + block + text[i:]
            break
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + block
open(path, "w").write(text)
PY
log "fleet block written to $out"
