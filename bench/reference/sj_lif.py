"""Times SpikingJelly's multi-step LIF, forward + backward, on the plain-layer workload.

Run by run.py in a subprocess (so that each SpikingJelly version gets its own PYTHONPATH and a
crash or hang there cannot take the benchmark down); prints one JSON line, the last on stdout.

    PYTHONPATH=/tmp/site python3 bench/reference/sj_lif.py --shape 32 64 65536

The neuron is made as close as SpikingJelly allows to backei's plain layer:
v = 0.2·u + I is LIF with decay_input=False and 1 − 1/tau = 0.2 (tau = 1.25), threshold 0.5,
hard reset to 0, reset not detached. (SpikingJelly fires on v ≥ θ rather than v > θ and has
no rectangle surrogate: its default Sigmoid surrogate is used; neither changes the timing.)
  - SpikingJelly 0.0.0.0.x: LIFNode(step_mode='m', backend='cupy'), CuPy-compiled CUDA kernels.
  - SpikingJelly >= 1.0: LIFNode(step_mode='m') picks its CUDA implementation itself (native
    CUDA when built from source, otherwise Triton); no backend argument any more.
"""

import argparse
import inspect
import json
import statistics
import sys


def make_node(neuron):
    kwargs = dict(tau=1.25, decay_input=False, v_threshold=0.5, v_reset=0.0,
                  detach_reset=False, step_mode="m")
    if "backend" in inspect.signature(neuron.LIFNode.__init__).parameters:
        return neuron.LIFNode(backend="cupy", **kwargs), "cupy"
    return neuron.LIFNode(**kwargs), "auto"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs="+", default=[32, 64, 65536], help="T N M")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()

    import torch
    import numpy as np
    # SpikingJelly 0.0.0.0.14's CuPy path still says np.int / np.float / np.bool, removed in
    # NumPy 1.24; the first GPU run failed on it. The builtins are what those aliases were.
    for alias, builtin in (("int", int), ("float", float), ("bool", bool)):
        if alias not in np.__dict__:
            setattr(np, alias, builtin)
    import spikingjelly
    from spikingjelly.activation_based import neuron

    version = getattr(spikingjelly, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as pkg_version
            version = pkg_version("spikingjelly")
        except Exception:
            version = "unknown"
    torch.manual_seed(0)
    node, backend = make_node(neuron)
    node = node.cuda()
    x = (torch.rand(*args.shape, device="cuda") * 1.5).requires_grad_(True)
    g = torch.randn(*args.shape, device="cuda")

    def step():
        node.reset()
        x.grad = None
        node(x).backward(g)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.reps):
        node.reset()
        x.grad = None
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        node(x).backward(g)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    node.reset()
    with torch.no_grad():
        rate = float(node(x).float().mean())
    print(json.dumps({"ms": statistics.median(times), "reps": len(times), "version": version,
                      "backend": backend, "firing_rate": rate}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
