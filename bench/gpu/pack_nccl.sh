#!/usr/bin/env bash
# Builds here what session.sh's `nccl` stage runs on the lent GPU, into .gpu/nccl/ (after
# ../shared/gpu/pack, which empties .gpu/): tests/gpu_distributed.rs with the feature `nccl`
# alone (the data-parallel step's GPU path in a world of one rank; no MPI needed, so nothing has
# to be installed on the device: NCCL is the nvidia-nccl wheel already there, loaded at run time).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu/nccl
exe=$(cargo test --release --features nccl --test gpu_distributed --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu_distributed":
        print(m["executable"])')
cp "$exe" .gpu/nccl/test-gpu_distributed
strip .gpu/nccl/test-gpu_distributed
ls -la .gpu/nccl
echo 'next: device run command="bash bench/gpu/session.sh nccl" carry=[".gpu"]'
