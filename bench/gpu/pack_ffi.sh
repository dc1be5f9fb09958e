#!/usr/bin/env bash
# Builds here what session.sh's `ffi` stage runs on the lent GPU, into .gpu/ffi/ (after
# ../shared/gpu/pack, which empties .gpu/): the C test program linked against the release static
# library of the C ABI (it loads libcuda itself), and the PyTorch package as an abi3 wheel
# (`pip wheel ./python`: maturin, release; the device's Python 3.12 installs it without Rust).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu/ffi
cargo build --release -p backei-capi --quiet
cc -std=c11 -O2 -I include capi/tests/c/backei_test.c target/release/libbackei_capi.a \
  -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc -o .gpu/ffi/backei_test
strip .gpu/ffi/backei_test
rm -f .gpu/ffi/*.whl
python3 -m pip wheel -q --disable-pip-version-check --no-deps -w .gpu/ffi ./python
ls -la .gpu/ffi
echo 'next: device run command="bash bench/gpu/session.sh ffi" carry=[".gpu"]'
