#!/usr/bin/env bash
# Where serve-proxy spends its time on a non-streaming request: a CPU flamegraph of `llmctl serve-proxy` (one
# serving thread) under one closed-loop connection of wrk against the bench's instant upstream, written to
# docs/perf/serve-proxy-nonstream.svg (override with PROFILE_OUT). Installs what it needs: wrk and perf from
# Debian, inferno (perf output to flamegraph) from crates.io. PROFILE_SECS: seconds sampled (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${PROFILE_OUT:-$root/docs/perf/serve-proxy-nonstream.svg}
secs=${PROFILE_SECS:-5}
up_port=19301
px_port=19302

need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v perf >/dev/null || need_apt+=(linux-perf)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
command -v inferno-flamegraph >/dev/null || cargo install --locked inferno --version 0.12.3
# No frame pointers needed: perf unwinds through the call frame information (.eh_frame) that the release build
# keeps along with its symbols (it strips only debuginfo).
cargo build --release --bin llmctl
cargo bench --bench proxy --no-run

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -- "-$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# The bench binary, re-executed in its upstream role (bench/proxy/upstream.rs).
setsid env LLMCTL_BENCH_UPSTREAM_ADDR=127.0.0.1:$up_port cargo bench --offline --bench proxy >"$tmp/upstream.log" 2>&1 &
pids+=($!)
setsid env TOKIO_WORKER_THREADS=1 "$root/target/release/llmctl" serve-proxy \
  --listen 127.0.0.1:$px_port --upstream http://127.0.0.1:$up_port >"$tmp/proxy.log" 2>&1 &
pids+=($!)
proxy_pid=$!
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$px_port/health" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$px_port/health" >/dev/null || { cat "$tmp"/*.log >&2; echo "serve-proxy did not come up" >&2; exit 1; }

cat >"$tmp/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["anthropic-version"] = "2023-06-01"
wrk.body = '{"model":"m","max_tokens":24,"messages":[{"role":"user","content":"Say hello in one short sentence."}],"stream":false}'
LUA
url=http://127.0.0.1:$px_port/v1/messages
wrk -t1 -c1 -d2s -s "$tmp/post.lua" "$url" >/dev/null # warm-up
wrk -t1 -c1 -d$((secs + 3))s -s "$tmp/post.lua" --latency "$url" >"$tmp/wrk.txt" &
wrk_pid=$!
sleep 1
perf record -q -F 2999 --call-graph dwarf,16384 -p "$proxy_pid" -o "$tmp/perf.data" -- sleep "$secs" 2>/dev/null
wait "$wrk_pid"
mkdir -p "$(dirname "$out")"
title="llmctl serve-proxy, non-streaming /v1/messages, 1 connection closed loop ($(awk '/Requests\/sec/{print $2}' "$tmp/wrk.txt") requests/s), $(date -u +%Y-%m-%d)"
perf script -i "$tmp/perf.data" 2>/dev/null | inferno-collapse-perf >"$tmp/folded.txt"
inferno-flamegraph --title "$title" --width 1600 --minwidth 0.5 <"$tmp/folded.txt" >"$out"
grep -E "Requests/sec|50%|99%" "$tmp/wrk.txt" >&2
# The shares of the parts a request goes through (a stack counts for each part it contains).
awk '{ n = $NF; total += n; $NF = ""
       for (i = 1; i <= np; i++) if (index($0, pat[i])) share[i] += n }
     BEGIN { np = split("writev;recvfrom;epoll_wait;proxy::server::Pump::on_bytes;proxy::translate::translate_request;RequestLine;role::Server as hyper::proto::h1::Http1Transaction>::parse;role::Client as hyper::proto::h1::Http1Transaction>::parse;legacy::client::Client<C,B>::send_request;malloc;free", pat, ";") }
     END { printf "share of serve-proxy CPU samples (%.0f):\n", total
           for (i = 1; i <= np; i++) printf "  %5.1f%%  %s\n", 100 * share[i] / total, pat[i] }' "$tmp/folded.txt" >&2
echo "flamegraph written to $out ($(du -k "$out" | cut -f1) KiB)" >&2
