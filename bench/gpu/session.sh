#!/usr/bin/env bash
# One lent-GPU session in one call (issue 7), run from the repository root on the device:
#   run  command="bash bench/gpu/session.sh [STAGES]"  carry=[".gpu", ".whl"]
# after `../shared/gpu/pack --data /usr/share/datasets/fashion-mnist` (and, for the reference
# stage, `bench/reference/fetch_wheels.sh`; for the ffi stage, `bench/gpu/pack_ffi.sh` after pack;
# for the nccl stage, `bench/gpu/pack_nccl.sh` after pack).
# STAGES (default all, in this order): tests ffi nccl sanitizer kernels feedforward train-bench
# reference resume train. Also: profile (Nsight Compute over the BackEI kernels, PROFILE_CASES),
# sanitizer-new (memcheck over the window-staged convolutions and v4 only), tests-named (RERUN:
# named tests of named binaries, all at once), tests-parallel (every test binary at once, each into its own log
# in results.tgz: the GPU tests' CPU oracles overlap; never beside a timing stage) and train-tc
# (the training step with the v4 kernels and the tensor-core feed-forward layers, their opt-ins,
# and v1 beside them, on fashion-mnist and cifar10 only: the short form of train-bench), v4-flags
# (v4 with neighbour flags instead of grid barriers: its layer tests, kernel bench and step),
# v4-prefetch (v4 with its epilogue inputs and next halo prefetched into L2: the same three),
# v4-span (v4 with chunks that run on across a sample's end: the same three;
# V4_OPT_TESTS=0 skips the three stages' layer tests) and v4-tune (every tile shape of v4 beside the planner's, V4_TILINGS=sweep|all|requests;
# KERNEL_FILTER picks the workloads, fashion by default: the fastest is printed with the
# BACKEI_V4_TILING that selects it), v4-tune-cifar (cifar10 L1's planner's tiling beside wider
# channel tiles, V4_CIFAR_TILINGS).
# Every stage has its own time limit and the whole run a deadline ($BUDGET seconds, default
# 420), so one hung kernel cannot eat the device time.
# Narrowing env: TEST_FILTERS (test names; tests/gpu_step.rs holds the step-graph, pipelining
# and memory-plan checks of issue 12, tests/gpu_feedforward.rs its tensor-core GEMMs),
# KERNEL_FILTER (kernel bench workloads), FF_RACECHECK=0 (no racecheck before the feed-forward bench),
# TESTS_LIMIT (tests-parallel's limit), BACKEI_BENCH_PRECISIONS (train bench tensor-core rows:
# fp32,tf32,bf16 or none),
# BACKEI_BENCH_VERSIONS=v2,v3 (kernel bench versions), TRAIN_SECONDS/TRAIN_EPOCHS/TRAIN_ARGS.
# docs/gpu.md says what each stage checks and what to record.
# Logs come back in $OUT: gpu.txt, one <stage>.log each, and results.tgz (CSV, metrics).
set -u
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$here"
out=${OUT:-/tmp/backei-out}
mkdir -p "$out" /tmp/backei-results
start=$(date +%s)
budget=${BUDGET:-420}
stages=${*:-tests ffi nccl sanitizer kernels feedforward train-bench reference resume train}

# the environment .gpu/run.sh sets up: the build path linked to this copy, CUDA's libraries found
built=$(cat .gpu/built-at)
[ -e "$built" ] || { mkdir -p "$(dirname "$built")" && ln -s "$here" "$built"; }
dirs=""
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && dirs="$dirs:$d"
done
for d in $(find /usr/local /opt -maxdepth 10 \( -name 'libnvrtc.so*' -o -name 'libcublas.so*' -o -name 'libnccl.so*' \) 2>/dev/null | xargs -r -n1 dirname | awk '!seen[$0]++'); do
  dirs="$dirs:$d"
done
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}$dirs"
export PATH="$PATH:/usr/local/cuda/bin"
export BACKEI_KERNEL_CACHE=/tmp/backei-kernels
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nvcc --version 2>/dev/null | tail -n 1; echo "commit $(cat .gpu/commit 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)"; } > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

# run NAME LIMIT CMD...: a stage step, cut at LIMIT seconds or at the deadline, whichever is first
run() {
  local name=$1 limit=$2; shift 2
  local left=$(( budget - ($(date +%s) - start) ))
  (( left < limit )) && limit=$left
  if (( limit < 10 )); then echo "== $name: skipped, deadline reached" | tee -a "$out/$stage.log"; return; fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$out/$stage.log"
  local t0=$(date +%s)
  timeout -s INT -k 10 "$limit" "$@" >> "$out/$stage.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$out/$stage.log"
  tail -n 4 "$out/$stage.log" | sed 's/^/   /'
}

# spawn_test BIN LIMIT [FILTERS...]: one test binary in the background (the tests-parallel and
# tests-named stages), its whole log and exit line under /tmp/backei-results/tests. --nocapture: a
# failure's message is printed when it happens, not at the end of the binary's run, which a time
# limit may cut (two GPU runs of 2026-12-04 lost theirs so)
spawn_test() {
  local n=$1 limit=$2; shift 2
  ( t0=$(date +%s); timeout -s INT -k 10 "$limit" ".gpu/bin/$n" --ignored --test-threads=1 --nocapture "$@" > "/tmp/backei-results/tests/$n.log" 2>&1
    echo "$n: exit $? after $(( $(date +%s) - t0 ))s" > "/tmp/backei-results/tests/$n.rc" ) &
  pids+=($!)
}
# summarize_test BIN: its exit line and the lines that say what passed and failed, into the stage log
summarize_test() {
  local n=$1
  [ -e "/tmp/backei-results/tests/$n.rc" ] || return 0
  { cat "/tmp/backei-results/tests/$n.rc"
    awk '/^test |(ok|FAILED|ignored)$|^test result|^  left|^ right|error/ {print} after {print; after=0} /panicked/ {print; after=1}' "/tmp/backei-results/tests/$n.log" \
      | grep -v "worst relative error\|of the largest element" | head -n 80; } >> "$out/$stage.log"
}

for stage in $stages; do
  case $stage in
    tests)
      # TEST_FILTERS (libtest name filters) narrows a rerun to what failed before
      for t in .gpu/bin/test-*; do
        case $(basename "$t") in test-emu_*) continue ;; esac  # the emulator's long ignored tests need no GPU
        run "$(basename "$t")" 150 "$t" --ignored --test-threads=1 --nocapture ${TEST_FILTERS:-}
      done ;;
    tests-parallel)
      # the same binaries as `tests`, all at once: one stage limit for all, the CPU oracles in
      # parallel; a summary line per binary in tests-parallel.log, the whole logs in results.tgz
      mkdir -p /tmp/backei-results/tests
      left=$(( budget - ($(date +%s) - start) )); limit=${TESTS_LIMIT:-200}; (( left < limit )) && limit=$left
      echo "== tests-parallel (limit ${limit}s each, all at once)" | tee -a "$out/$stage.log"
      pids=()
      for t in .gpu/bin/test-*; do
        n=$(basename "$t")
        case $n in
          test-emu_*) continue ;;        # the emulator's long ignored tests need no GPU
          test-degenerate_input) continue ;;  # sizes a batch to the free memory: run alone, below
        esac
        spawn_test "$n" "$limit" ${TEST_FILTERS:-}
      done
      wait "${pids[@]}"
      if [ -x .gpu/bin/test-degenerate_input ]; then
        pids=()
        spawn_test test-degenerate_input 60
        wait "${pids[@]}"
      fi
      for t in .gpu/bin/test-*; do summarize_test "$(basename "$t")"; done
      grep -h "exit" /tmp/backei-results/tests/*.rc ;;
    tests-named)
      # a rerun of named tests, each binary with its own filters, all at once (RERUN="bin=f1,f2
      # bin2" — bin without test- and without filters runs all of its tests), limit TESTS_LIMIT
      mkdir -p /tmp/backei-results/tests
      left=$(( budget - ($(date +%s) - start) )); limit=${TESTS_LIMIT:-200}; (( left < limit )) && limit=$left
      echo "== tests-named (limit ${limit}s each, all at once): ${RERUN:-}" | tee -a "$out/$stage.log"
      pids=()
      for item in ${RERUN:-}; do
        n=test-${item%%=*}; filters=""
        [[ $item == *=* ]] && filters=${item#*=} && filters=${filters//,/ }
        [ -x ".gpu/bin/$n" ] || { echo "$n: not packed" >> "$out/$stage.log"; continue; }
        spawn_test "$n" "$limit" $filters
      done
      wait "${pids[@]}"
      for item in ${RERUN:-}; do summarize_test "test-${item%%=*}"; done ;;
    v4-flags|v4-prefetch|v4-span)
      # issue 11: an opt-in of v4 — its phases ordered by neighbour flags (v4-flags:
      # BACKEI_V4_SYNC=neighbours, cuda/v4/sync.cuh), each chunk's epilogue inputs and the next
      # chunk's halo prefetched into L2 (v4-prefetch: BACKEI_V4_PREFETCH=l2, cuda/v4/chunks.cuh)
      # or chunks that run on across a sample's end (v4-span: BACKEI_V4_CHUNKS=span, chunks.cuh
      # chunk_len: fashion L1 6 -> 5 chunks per block, L2 7 -> 5) — correct on the hardware (the
      # layer tests' v4 cases against the CPU; V4_OPT_TESTS=0 skips them), then timed beside the
      # default build in one run of each bench (`…@v4/<p>+flags`, `…+pf` or `…+span` rows), then
      # the step
      name=${stage#v4-}
      case $stage in
        v4-flags) opt=BACKEI_V4_SYNC=neighbours; base=grid ;;
        v4-prefetch) opt=BACKEI_V4_PREFETCH=l2; base=plain ;;
        *) opt=BACKEI_V4_CHUNKS=span; base=per-sample ;;
      esac
      [ "${V4_OPT_TESTS:-1}" = 0 ] || run test-v4-$name 150 env $opt .gpu/bin/test-gpu_backei_layer --ignored --test-threads=1 --nocapture v4_
      export BACKEI_BENCH_CSV=/tmp/backei-results/kernels-$name.csv
      run bench-kernels-v4-$base 60 env BACKEI_BENCH_VERSIONS=v4/fp32,v4/bf16 .gpu/bin/bench-kernels ${KERNEL_FILTER:-fashion}
      run bench-kernels-v4-$name 60 env $opt BACKEI_BENCH_VERSIONS=v4/fp32,v4/bf16 .gpu/bin/bench-kernels ${KERNEL_FILTER:-fashion}
      unset BACKEI_BENCH_CSV
      run train-v4-$name 60 env BACKEI_BENCH_CPU=0 BACKEI_BACKEI_KERNEL=v4 $opt BACKEI_BENCH_PRECISIONS=fp32 BACKEI_BENCH_NETWORKS=fashion-mnist .gpu/bin/bench-train ;;
    v4-tune)
      # issue 11: the v4 tilings beside the planner's (`…@v4/<p>[co_t=…]` rows), each validated
      # against the CPU and timed in one run (the fastest printed with its BACKEI_V4_TILING)
      export BACKEI_BENCH_CSV=/tmp/backei-results/kernels-tilings.csv
      run bench-kernels-v4-tilings 240 env BACKEI_BENCH_VERSIONS=${V4_TUNE_VERSIONS:-v4/fp32,v4/bf16} BACKEI_BENCH_V4_TILINGS="${V4_TILINGS:-sweep}" .gpu/bin/bench-kernels ${KERNEL_FILTER:-fashion}
      unset BACKEI_BENCH_CSV ;;
    v4-tune-cifar)
      # issue 11: cifar10 L1, whose planner's tiling (8 channel groups of 16, each staging the whole
      # 128-channel halo: v4 fp32 305 ms against v3's 210 on 2026-12-04) beside 2 groups of 64 and
      # 4 of 32 with dW in L2 — the tiling of cifar10 L2, which has the same products per step and
      # ran in 133 ms; fp32 mode only (V4_TUNE_VERSIONS), the requests in V4_CIFAR_TILINGS
      export BACKEI_BENCH_CSV=/tmp/backei-results/kernels-tilings-cifar10.csv
      run bench-kernels-v4-tilings-cifar10 150 env BACKEI_BENCH_VERSIONS=${V4_TUNE_VERSIONS:-v4/fp32} BACKEI_BENCH_V4_TILINGS="${V4_CIFAR_TILINGS:-co_t=64,mt=2;co_t=64,mt=1;co_t=32,mt=2}" .gpu/bin/bench-kernels "cifar10 L1"
      unset BACKEI_BENCH_CSV ;;
    train-tc)
      # issue 11/12: the step on v4 (fp32 mode) with cuBLAS, then with the tensor-core GEMMs in
      # each precision; then the opt-ins (256-thread tiles, window-staged convolutions); v1 beside
      # them on fashion-mnist (the step 255 ms measured on 2026-11-28)
      run train-v4 150 env BACKEI_BENCH_CPU=0 BACKEI_BACKEI_KERNEL=v4 BACKEI_BENCH_NETWORKS=fashion-mnist,cifar10 BACKEI_BENCH_RECOMPUTE=4 .gpu/bin/bench-train
      run train-v4-halo-big 90 env BACKEI_BACKEI_KERNEL=v4 BACKEI_TC_CONV=halo BACKEI_TC_TILES=big BACKEI_BENCH_PRECISIONS=fp32,bf16 BACKEI_BENCH_NETWORKS=fashion-mnist,cifar10 BACKEI_BENCH_CPU=0 .gpu/bin/bench-train
      run train-v4-halo 60 env BACKEI_BACKEI_KERNEL=v4 BACKEI_TC_CONV=halo BACKEI_BENCH_PRECISIONS=fp32 BACKEI_BENCH_NETWORKS=fashion-mnist BACKEI_BENCH_CPU=0 .gpu/bin/bench-train
      run train-v3 60 env BACKEI_BACKEI_KERNEL=v3 BACKEI_BENCH_PRECISIONS=fp32 BACKEI_BENCH_NETWORKS=fashion-mnist BACKEI_BENCH_CPU=0 .gpu/bin/bench-train
      run train-v1 60 env BACKEI_BENCH_CPU=0 BACKEI_BENCH_PRECISIONS=none BACKEI_BENCH_NETWORKS=fashion-mnist .gpu/bin/bench-train ;;
    ffi)
      # issue 15: the C ABI on a stream of its own (every switch against the CPU engine), the
      # PyTorch package on CUDA (against bench/reference/backei_torch.py; no wait for the default
      # stream), and one timing row of a PyTorch model with backei's layers against its own
      if [ ! -x .gpu/ffi/backei_test ]; then echo "== ffi: run bench/gpu/pack_ffi.sh first" | tee -a "$out/$stage.log"; continue; fi
      run c-abi-cuda 60 .gpu/ffi/backei_test cuda
      run torch-install 60 python3 -m pip install -q --no-index --no-deps --target /tmp/site-backei .gpu/ffi/backei-*.whl
      run torch-cuda-tests 150 env PYTHONPATH=/tmp/site-backei python3 -m pytest -q -p no:cacheprovider python/tests/gpu
      run torch-cpu-tests 90 env PYTHONPATH=/tmp/site-backei python3 -m pytest -q -p no:cacheprovider python/tests/test_torch_cpu.py
      run torch-model-timing 120 env PYTHONPATH=/tmp/site-backei python3 python/bench/time_model.py --csv /tmp/backei-results/torch_layer.csv
      run torch-example 90 env PYTHONPATH=/tmp/site-backei python3 python/examples/train_mnist_sample.py --device cuda --epochs 2 ;;
    nccl)
      # issue 16: the data-parallel step's GPU path (NCCL refuses two ranks on one GPU, so a world
      # of one): the split eager step with bucketed all-reduces overlapping the backward, against
      # the engine's own graph step; a rank without samples. Record the max difference it prints.
      if [ ! -x .gpu/nccl/test-gpu_distributed ]; then echo "== nccl: run bench/gpu/pack_nccl.sh first" | tee -a "$out/$stage.log"; continue; fi
      run nccl-world-of-one 120 .gpu/nccl/test-gpu_distributed --ignored --test-threads=1 --nocapture ;;
    sanitizer)
      if command -v compute-sanitizer >/dev/null; then
        run memcheck-smoke 40 compute-sanitizer --tool memcheck --error-exitcode 9 .gpu/bin/test-gpu_smoke --ignored --test-threads=1
        run memcheck-layer 80 compute-sanitizer --tool memcheck --error-exitcode 9 .gpu/bin/test-gpu_backei_layer --ignored --test-threads=1 plain_layer
        run racecheck-layer 80 compute-sanitizer --tool racecheck --error-exitcode 9 .gpu/bin/test-gpu_backei_layer --ignored --test-threads=1 odd_shapes
        # the tensor-core wrappers and kernels (v4 runs in odd_shapes beside v1–v3)
        run memcheck-mma 40 compute-sanitizer --tool memcheck --error-exitcode 9 .gpu/bin/test-gpu_mma --ignored --test-threads=1
        run memcheck-layer-versions 80 compute-sanitizer --tool memcheck --error-exitcode 9 .gpu/bin/test-gpu_backei_layer --ignored --test-threads=1 odd_shapes
        run memcheck-ops 80 compute-sanitizer --tool memcheck --error-exitcode 9 .gpu/bin/test-gpu_network --ignored --test-threads=1 conv_ linear_ pool_ dropout_ readout_ fused_adam
        # the training step as one CUDA graph (issue 12): capture, replay, the pipelined read-back
        run memcheck-step 80 compute-sanitizer --tool memcheck --error-exitcode 9 .gpu/bin/test-gpu_step --ignored --test-threads=1 graph_replay pipelined fused_readout compact_state fused_pooling recompute_steps
        [ -x .gpu/bin/test-gpu_backei_unfused ] && run memcheck-unfused 80 compute-sanitizer --tool memcheck --error-exitcode 9 .gpu/bin/test-gpu_backei_unfused --ignored --test-threads=1
      else
        echo "compute-sanitizer not found" > "$out/sanitizer.log"
      fi ;;
    profile)
      # Nsight Compute over the BackEI kernels that dominate the step (issue 11): one B = 100 launch
      # each (the bench's first launch of a kind is its B = 2 validation: skipped), the hardware's
      # own account of where the time goes (stall reasons, pipe use, the SASS lines that stall most).
      # PROFILE_CASES: version=workload[=kind] items; kind = backward (default) or forward.
      if ! command -v ncu >/dev/null; then echo "ncu not found" | tee -a "$out/$stage.log"; continue; fi
      # the reports stay there (too large to bring back); their text pages come back in results.tgz,
      # with the CUBINs the profiled kernels came from (a kernel cache of the stage's own, so only
      # those): `python3 bench/gpu/ncu_lines.py ncu/CASE.sass.csv ncu/cubins` puts the samples on
      # source lines (every module is compiled with -lineinfo)
      mkdir -p /tmp/backei-results/ncu/cubins /tmp/ncu-reps
      rm -rf /tmp/ncu-kernels
      for case in ${PROFILE_CASES:-v3=fashion_L1 v4/bf16=fashion_L1 v4/bf16=fashion_L1=forward v4/fp32=fashion_L2}; do
        IFS== read -r version workload kind <<< "$case"
        kind=${kind:-backward}
        tag=$(echo "${version}_${workload}_${kind}" | tr '/' '-')
        run "ncu-$tag" 75 env BACKEI_KERNEL_CACHE=/tmp/ncu-kernels BACKEI_BENCH_VERSIONS="$version" BACKEI_BENCH_CSV=/tmp/ncu.csv ncu --clock-control none --set full \
          -k "regex:backei_${kind}_v" --launch-skip 1 --launch-count 1 -o "/tmp/ncu-reps/$tag" .gpu/bin/bench-kernels "${workload//_/ }"
        ncu --import "/tmp/ncu-reps/$tag.ncu-rep" --page source --csv --print-source sass \
          > "/tmp/backei-results/ncu/$tag.sass.csv" 2>&1 || true
        ncu --import "/tmp/ncu-reps/$tag.ncu-rep" --page details > "/tmp/backei-results/ncu/$tag.txt" 2>&1 || true
      done
      # the modules of the profiled kernels (v3's or v4's for the workloads named), not every one
      # the bench compiled
      for f in /tmp/ncu-kernels/*.cubin; do
        grep -q "backei_\(forward\|backward\)_v" "$f" 2>/dev/null && cp "$f" /tmp/backei-results/ncu/cubins/
      done
      du -sh /tmp/backei-results/ncu/cubins | tee -a "$out/$stage.log" ;;
    sanitizer-new)
      # the short form of `sanitizer` for the kernels that have not yet been under it: the
      # window-staged convolutions and v4 (odd shapes run v1-v4 on every switch)
      if command -v compute-sanitizer >/dev/null; then
        run memcheck-halo 60 compute-sanitizer --tool memcheck --error-exitcode 9 .gpu/bin/test-gpu_feedforward --ignored --test-threads=1 window_staged
        run memcheck-v4 80 compute-sanitizer --tool memcheck --error-exitcode 9 .gpu/bin/test-gpu_backei_layer --ignored --test-threads=1 odd_shapes
      else
        echo "compute-sanitizer not found" > "$out/$stage.log"
      fi ;;
    kernels)
      export BACKEI_BENCH_CSV=/tmp/backei-results/kernels.csv
      run bench-kernels 120 .gpu/bin/bench-kernels ${KERNEL_FILTER:-} ;;
    feedforward)
      # issue 12: the feed-forward layers' tensor-core GEMMs (racecheck: their shared-memory
      # staging), then cuBLAS against them per precision and layer (validated before timed), and
      # the 128×128 tiles (BACKEI_TC_TILES=big) where a layer takes them: `tc <p> big` rows, which
      # must give the bits of `tc <p>` (record both: the big tiles become the default if faster)
      if command -v compute-sanitizer >/dev/null && [ "${FF_RACECHECK:-1}" != 0 ]; then
        run racecheck-gemm 80 compute-sanitizer --tool racecheck --error-exitcode 9 .gpu/bin/test-gpu_feedforward --ignored --test-threads=1 linear_layers
      fi
      run bench-feedforward 120 .gpu/bin/bench-feedforward ;;
    train-bench)
      run bench-train 90 .gpu/bin/bench-train
      # the same steps launched one by one: what one CUDA graph per step saves
      run bench-train-eager 90 env BACKEI_CUDA_GRAPHS=0 .gpu/bin/bench-train
      # the v2 and v3 kernels (verified on the CPU emulator in CI, never timed on a GPU before)
      run bench-train-v2 90 env BACKEI_BACKEI_KERNEL=v2 .gpu/bin/bench-train
      run bench-train-v3 90 env BACKEI_BACKEI_KERNEL=v3 .gpu/bin/bench-train
      # the tensor-core kernels (fp32 mode: split fp16 products)
      # (and cifar10 / fashion-mnist with --recompute 4 on the tensor-core GEMMs: issue 12's 4 GiB
      # setting, the convolutions before the BackEI layers run per window)
      run bench-train-v4 90 env BACKEI_BACKEI_KERNEL=v4 BACKEI_BENCH_RECOMPUTE=4 .gpu/bin/bench-train
      # issue 12: fashion-mnist at T = 100, B = 100 with --recompute 10 (target ≤ 8 GiB): the plan's
      # figure, then 20 batches with the card's memory sampled each second (peak in the log)
      run info-t100 20 .gpu/bin/backei info --model fashion-mnist --steps 100 --recompute 10
      rm -rf /tmp/run-t100
      ( while sleep 1; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; done ) > /tmp/backei-results/t100-mem.txt 2>&1 &
      sampler=$!
      run train-t100-recompute 90 .gpu/bin/backei train --dataset fashion-mnist --data-dir .gpu/data/fashion-mnist --device cuda \
        --steps 100 --batch-size 100 --recompute 10 --epochs 1 --train-limit 2000 --test-limit 500 --quiet --out /tmp/run-t100
      kill $sampler 2>/dev/null
      echo "== peak device memory during train-t100-recompute: $(sort -n /tmp/backei-results/t100-mem.txt | tail -n 1) MiB" | tee -a "$out/$stage.log" ;;
    reference)
      run reference 150 env BACKEI_CSV=/tmp/backei-results/kernels.csv OUT=/tmp/backei-results bash bench/reference/gpu_run.sh ;;
    train)
      rm -rf /tmp/run-fmnist
      run train-fashion "${TRAIN_SECONDS:-120}" .gpu/bin/backei train --dataset fashion-mnist --data-dir .gpu/data/fashion-mnist \
        --device cuda --steps 20 --batch-size 100 --epochs "${TRAIN_EPOCHS:-200}" ${TRAIN_ARGS:-} --quiet --out /tmp/run-fmnist
      mkdir -p /tmp/backei-results/run-fmnist
      cp /tmp/run-fmnist/*.csv /tmp/run-fmnist/*.jsonl /tmp/run-fmnist/config.json /tmp/backei-results/run-fmnist/ 2>/dev/null ;;
    resume)
      # --deterministic on the GPU: an interrupted and resumed run's metrics equal an uninterrupted
      # run's (timing columns aside), as tests/cli.rs checks for the CPU engine
      small=(.gpu/bin/backei train --dataset fashion-mnist --data-dir .gpu/data/fashion-mnist --device cuda --deterministic
             --steps 4 --batch-size 50 --epochs 2 --train-limit 1000 --test-limit 500 --quiet)
      rm -rf /tmp/det-whole /tmp/det-cut
      run det-whole 60 "${small[@]}" --out /tmp/det-whole
      run det-cut 60 env BACKEI_INTERRUPT_AFTER_BATCHES=7 "${small[@]}" --out /tmp/det-cut
      run det-resume 60 .gpu/bin/backei train --resume /tmp/det-cut --quiet
      strip_time() { cut -d, -f1-7,10- "$1"; }
      if [ ! -s /tmp/det-whole/metrics.csv ] || [ ! -s /tmp/det-cut/metrics.csv ]; then
        echo "== resume: FAILED, a run left no metrics" | tee -a "$out/$stage.log"
      elif diff <(strip_time /tmp/det-whole/metrics.csv) <(strip_time /tmp/det-cut/metrics.csv) >> "$out/$stage.log" 2>&1; then
        echo "== resume: metrics identical" | tee -a "$out/$stage.log"
      else
        echo "== resume: metrics DIFFER" | tee -a "$out/$stage.log"
      fi ;;
    *) echo "unknown stage $stage" ;;
  esac
done
tar -czf "$out/results.tgz" -C /tmp backei-results 2>/dev/null
echo "session.sh: done after $(( $(date +%s) - start ))s"
