#!/usr/bin/env bash
# Prints the llmctl.toml of the simulated 3-node cluster (fixtures/clusters/three-nodes.toml) that
# `bash scripts/demo.sh --cluster` and `BENCH_ONLY=fleet bash bench/run.sh` run on:
#   bash scripts/cluster-config.sh <pve1's ssh target> <files URL> <the model's sha256>
# <files URL> serves model.gguf and llama.cpp-<ref>.tar.gz to pve2, the one node that downloads.
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: cluster-config.sh <pve1 target> <files url> <model sha256>" >&2; exit 2; }
node=$1 files=$2 sha=$3
cat <<TOML
# What every node shares.
[container]
cores = 2
memory_mib = 4096

[driver]
version = "595.71.05"
flavor = "open"

[llama_cpp]
git_ref = "b11434"

[model]
source = "https://huggingface.co/bartowski/SmolLM2-135M-Instruct-GGUF/resolve/main/SmolLM2-135M-Instruct-Q4_K_M.gguf"
sha256 = "$sha"
dest = "/models/model.gguf"

[server]
context = 32768
port = 8080

[proxy]
listen = "0.0.0.0:4000"

# The cluster: one node to ask; the members, their addresses and who runs which CT come from /etc/pve.
[cluster]
node = "$node"

[cluster.nodes.pve1]
vmid = 101

[cluster.nodes.pve2]
vmid = 102
# This node downloads the model and llama.cpp's source: from the file server on its link.
[cluster.nodes.pve2.llama_cpp]
archive_url = "$files/llama.cpp-{ref}.tar.gz"
[cluster.nodes.pve2.model]
source = "$files/model.gguf"

[cluster.nodes.pve3]
vmid = 103
TOML
