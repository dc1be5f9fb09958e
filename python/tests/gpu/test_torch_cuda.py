"""backei.torch on CUDA tensors: run by bench/gpu/session.sh's `ffi` stage on a lent GPU (CI has
none and does not collect this folder). Without CUDA these tests FAIL: they never pass silently.

- the fused kernels against bench/reference/backei_torch.py on CUDA, every switch, float32;
- the kernels run on the caller's stream and never wait for the legacy default stream: with the
  default stream spinning for a second, a forward and backward on a non-default stream finish;
- the output is written in place: the extension reads and writes the tensors' own memory.
"""

import os
import sys

import pytest
import torch

from backei.torch import BackEI, MultiStepLIF

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "bench", "reference"))
import backei_torch as reference  # noqa: E402

DEV = torch.device("cuda")

SWITCHES = [
    ("back+ei r1 D1", True, True, 1, 1),
    ("back+ei r2 D1", True, True, 2, 1),
    ("back+ei r1 D2", True, True, 1, 2),
    ("back only", True, False, 1, 1),
    ("ei only", False, True, 1, 1),
    ("neither", False, False, 1, 1),
]


def test_cuda_is_there():
    assert torch.cuda.is_available(), "these tests need a CUDA GPU"


def pair(back, ei, radius, delay, channels=8, seed=0):
    torch.manual_seed(seed)
    ours = BackEI(channels, back=back, ei=ei, radius=radius, delay=delay).to(DEV)
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(3.0)
    ref = reference.BackEI(channels, back, ei, radius, delay).to(DEV)
    ref.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "threshold"})
    return ours, ref


def run(layer, x, steps, grad):
    x = x.detach().clone().requires_grad_(True)
    s = layer(x, steps)
    (s * grad).sum().backward()
    return s.detach(), x.grad.detach(), {n: p.grad.detach().clone() for n, p in layer.named_parameters()}


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name,back,ei,radius,delay", SWITCHES)
@pytest.mark.parametrize("t_in", ["T", "1"])
def test_cuda_agrees_with_the_reference(name, back, ei, radius, delay, t_in):
    torch.backends.cudnn.allow_tf32 = False  # the reference's gate convolutions in full fp32
    ours, ref = pair(back, ei, radius, delay, seed=len(name))
    steps, batch = 8, 4
    torch.manual_seed(1)
    x = torch.rand(steps if t_in == "T" else 1, batch, 8, 12, 13, device=DEV) * 1.5
    grad = torch.randn(steps, batch, 8, 12, 13, device=DEV)
    s, dx, dw = run(ours, x, steps, grad)
    s_ref, dx_ref, dw_ref = run(ref, x, steps, grad)
    flips = (s != s_ref).float().mean().item()
    # float32 rounding of v near the threshold may flip a spike, and a flip travels in time
    assert flips < 2e-3, f"{name}: {flips:.2%} of the spikes differ"
    tol = 1e-3 if flips == 0 else 5e-2
    assert rel(dx, dx_ref) < tol, f"{name}: dI rel. error {rel(dx, dx_ref):.2e} ({flips:.2%} flips)"
    for k in dw:
        assert rel(dw[k], dw_ref[k]) < tol, f"{name}: {k} rel. error {rel(dw[k], dw_ref[k]):.2e}"


def test_multistep_lif_on_cuda_is_the_plain_layer():
    lif = MultiStepLIF()
    ref = reference.BackEI(1, False, False, 0, 1)
    x = torch.rand(16, 8, 1000, device=DEV) * 1.2
    grad = torch.randn_like(x)
    s, dx, _ = run(lif, x, None, grad)
    s_ref, dx_ref, _ = run(ref, x, 16, grad)
    assert (s != s_ref).float().mean().item() < 1e-4
    assert rel(dx, dx_ref) < 1e-3


def test_no_wait_for_the_default_stream():
    layer = BackEI(16, radius=1).to(DEV)
    x = torch.rand(8, 8, 16, 16, 16, device=DEV) * 1.5
    side = torch.cuda.Stream()  # a non-blocking stream: only an explicit wait ties it to the default stream
    with torch.cuda.stream(side):  # warm up: module loading may synchronise once
        xs = x.clone().requires_grad_(True)
        layer(xs).sum().backward()
    side.synchronize()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of spinning on the default stream
    with torch.cuda.stream(side):
        xs = x.clone().requires_grad_(True)
        s = layer(xs)
        s.sum().backward()
        done = torch.cuda.Event()
        done.record(side)
    done.synchronize()
    busy = not torch.cuda.default_stream().query()
    torch.cuda.synchronize()
    assert busy, "backei's work on a side stream waited for the default stream (it finished only after the spin)"
    assert xs.grad is not None and torch.isfinite(xs.grad).all()


def test_the_layer_runs_on_the_callers_current_stream():
    # a side stream and the default stream give the same spikes; the output is a new tensor (the
    # input is never overwritten). That no extra copy is made is not observable from here.
    layer = BackEI(4, radius=1).to(DEV)
    x = torch.rand(4, 2, 4, 8, 8, device=DEV) * 1.5
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        s1 = layer(x)
    side.synchronize()
    s2 = layer(x)  # the default stream
    assert torch.equal(s1, s2)
    assert s1.is_cuda and s1.data_ptr() != x.data_ptr()
