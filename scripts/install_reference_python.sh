#!/usr/bin/env bash
# The reference libraries tests/nmnist_binning.rs compares the N-MNIST --binning conventions with:
# tonic and SpikingJelly (pip wheels) in a venv at target/python-ref, over Debian's python3, whose
# python3-torch (CPU) is the torch SpikingJelly imports. Idempotent; about a minute the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/python-ref
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import tonic, spikingjelly.datasets' 2>/dev/null; then
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip python3-numpy python3-scipy python3-h5py \
  python3-matplotlib python3-tqdm python3-torch python3-torchvision python3-torchaudio >/dev/null
/usr/bin/python3 -m venv --system-site-packages "$venv"
# keep Debian's numpy: its torch was built against it
numpy=$(/usr/bin/python3 -c 'import numpy; print(numpy.__version__)')
"$venv/bin/pip" install -q --disable-pip-version-check "numpy==$numpy" tonic
# SpikingJelly asks for torch >= 2.6 but its dataset code runs on Debian's torch: no dependencies
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps spikingjelly loguru
"$venv/bin/python" -c 'import tonic, spikingjelly.datasets'
