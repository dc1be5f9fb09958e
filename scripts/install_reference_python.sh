#!/usr/bin/env bash
# Every Python package the tests use, in one venv at target/python-ref (pip never touches the
# global Python), over Debian's python3, whose python3-torch (CPU) is the torch SpikingJelly imports:
#   tonic and SpikingJelly   the N-MNIST --binning conventions compared with (tests/nmnist_binning.rs)
#   tensorboard              reads back the event files a run writes (tests/tensorboard.rs)
#   NVIDIA's CUDA wheels     NVRTC, ptxas, nvdisasm, cuobjdump: every kernel compiled, assembled and
#                            read without a GPU (tests/kernels_compile.rs); backei finds them in the
#                            active venv ($VIRTUAL_ENV) by itself
# Idempotent; a few minutes the first time (the CUDA wheels are ~300 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/python-ref
ready() {
  "$venv/bin/python" - <<'PY' 2>/dev/null
import os, tonic, spikingjelly.datasets, tensorboard, nvidia
base = list(nvidia.__path__)[0]
for f in ["cuda_nvrtc/lib/libnvrtc.so.12", "cuda_nvcc/bin/ptxas", "cu13/bin/nvdisasm", "cu13/bin/cuobjdump"]:
    assert os.path.exists(os.path.join(base, f)), f
PY
}
if [ -x "$venv/bin/python" ] && ready; then
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip python3-numpy python3-scipy python3-h5py \
  python3-matplotlib python3-tqdm python3-torch python3-torchvision python3-torchaudio >/dev/null
/usr/bin/python3 -m venv --system-site-packages "$venv"
pip=("$venv/bin/pip" install -q --disable-pip-version-check --no-cache-dir)
# keep Debian's numpy: its torch was built against it
numpy=$(/usr/bin/python3 -c 'import numpy; print(numpy.__version__)')
"${pip[@]}" "numpy==$numpy" tonic tensorboard
# SpikingJelly asks for torch >= 2.6 but its dataset code runs on Debian's torch: no dependencies
"${pip[@]}" --no-deps spikingjelly loguru
"${pip[@]}" nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12 nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump
ready || { echo "target/python-ref: a package did not install" >&2; exit 1; }
