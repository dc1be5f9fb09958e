#!/usr/bin/env bash
# The whole PyTorch side in one device call, from the repository root:
#   run(command="bash bench/reference/gpu_run.sh", carry=[".whl", "bench/reference/cases/network_fashion-mnist.safetensors"])
# Optional: BACKEI_CSV=path/to/kernels.csv (backei's timings) to fill the backei column;
# REF_ARGS="--no-compile --seconds-per-workload 1" (run.py's options) for a short run.
# Logs and tables go to $OUT (check_cases.log, reference.md, reference.csv, run.log).
set -u
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --target /tmp/site-sj2 .whl/sj2/*.whl
status=0
python3 bench/reference/check_cases.py bench/reference/cases 2>&1 | tee "$out/check_cases.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
csv_arg=()
[ -n "${BACKEI_CSV:-}" ] && csv_arg=(--backei-csv "$BACKEI_CSV")
python3 bench/reference/run.py ${csv_arg[@]+"${csv_arg[@]}"} ${REF_ARGS:-} --out "$out/reference.md" 2>&1 | tee "$out/run.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "gpu_run.sh: exit $status"
exit $status
