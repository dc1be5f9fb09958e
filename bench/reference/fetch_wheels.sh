#!/usr/bin/env bash
# Downloads the SpikingJelly wheels the GPU run installs offline (the device has no internet).
# Both are pure Python (py3-none-any). .whl/ is ignored by git; carry it with the run.
#   .whl/       spikingjelly 0.0.0.0.14: LIFNode(step_mode='m', backend='cupy') (CuPy kernels)
#   .whl/sj2/   spikingjelly 2.0.0: LIFNode(step_mode='m'), CUDA implementation chosen by itself
set -eu
cd "$(dirname "$0")/../.."
mkdir -p .whl/sj2
python3 -m pip download -q --no-deps --only-binary=:all: spikingjelly==0.0.0.0.14 -d .whl
python3 -m pip download -q --no-deps --only-binary=:all: spikingjelly==2.0.0 -d .whl/sj2
# 2.0.0 imports loguru at start (the first GPU run failed without it); pure Python too
python3 -m pip download -q --no-deps --only-binary=:all: 'loguru>=0.7,<1' -d .whl/sj2
ls -l .whl .whl/sj2
