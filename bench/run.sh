#!/usr/bin/env bash
# The one command behind docs/performance.md: installs the peers (bench/peers.sh) and the real test stack
# (scripts/test-stack.sh), builds llmctl in release mode and the proxy benchmark, then runs it inside a private
# network namespace with only loopback, so that no peer (LiteLLM fetches a price list, claude-code-router checks
# for updates) can send anything off the machine; and in its own PID namespace, so every signal the bench sends
# stays among the processes it started. llmctl is measured from target/release/llmctl unless LLMCTL_BIN names
# another binary (its serve-proxy arguments in LLMCTL_PROXY_ARGS); BENCH_SECS, BENCH_ONLY, BENCH_OUT as
# described in bench/proxy/main.rs; BENCH_QUIET_WAIT below. One more section, `fleet` (issue 13: provision and
# doctor over a simulated 3-node cluster), is bench/fleet.sh, run here only when BENCH_ONLY names it (it takes
# minutes) and before the others, outside the private network namespace (its simulated nodes need the host's).
set -euo pipefail
cd "$(dirname "$0")/.."
fleet=0
proxy_bench=1
if [ -n "${BENCH_ONLY:-}" ]; then
  sections=$(tr ', ' '\n\n' <<<"$BENCH_ONLY" | grep -v '^$' || true)
  grep -qx fleet <<<"$sections" && fleet=1
  # BENCH_ONLY=fleet alone leaves the proxy bench (and the report's generated part) as it is.
  BENCH_ONLY=$(grep -vx fleet <<<"$sections" | paste -sd, || true)
  [ -n "$BENCH_ONLY" ] || proxy_bench=0
  export BENCH_ONLY
fi
[ "$proxy_bench" = 1 ] && eval "$(bash bench/peers.sh)"
eval "$(bash scripts/test-stack.sh)"
if [ -z "${LLMCTL_BIN:-}" ]; then
  cargo build --release --bin llmctl
  LLMCTL_BIN=$PWD/target/release/llmctl
fi
export LLMCTL_BIN
[ "$proxy_bench" = 1 ] && cargo bench --bench proxy --no-run
# The figures are tenths of a millisecond: wait (polling every 15 s, up to BENCH_QUIET_WAIT seconds, default 20
# minutes, 0 = not at all) until the 1-minute load is below 1, which the builds above have just raised. A run
# that starts busier says so in its report.
wait_s=${BENCH_QUIET_WAIT:-1200}
while [ "$wait_s" -gt 0 ] && ! awk '{exit !($1 < 1.0)}' /proc/loadavg; do
  echo "[bench] waiting for a quiet machine: load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  sleep 15
  wait_s=$((wait_s - 15))
done
[ "$fleet" = 1 ] && bash bench/fleet.sh
[ "$proxy_bench" = 1 ] || exit 0
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null && command -v ip >/dev/null; then
  exec unshare --net --pid --fork --mount-proc bash -c 'ip link set lo up && exec cargo bench --offline --bench proxy'
fi
echo "[bench] not root (or no unshare/ip): running without a private network namespace" >&2
exec cargo bench --bench proxy
