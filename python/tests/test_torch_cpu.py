"""backei.torch on CPU tensors (CI: Debian's python3-torch), against PyTorch's own autograd:

- torch.autograd.gradcheck in float64 of the smooth layer (H -> sigmoid(k x), sign -> tanh(k x)),
  input and every parameter, on every switch;
- agreement with bench/reference/backei_torch.py (an independent pure-PyTorch BackEI written from
  docs/model.md) in the model's exact mode: spikes, dI and every parameter gradient, on every
  switch (back / ei on and off, delay 1 and 2, radius 1 and 2, T_in = 1, another surrogate width);
- a BrainCog BackEINode state dict loads (strict) and its threshold is used;
- dtype and shape errors are Python exceptions with backei's messages.
"""

import copy
import os
import pickle
import sys

import pytest
import torch

from backei.torch import BackEI, MultiStepLIF, SpikingFunction

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "bench", "reference"))
import backei_torch as reference  # noqa: E402

SWITCHES = [
    # (name, back, ei, radius, delay)
    ("back+ei r1 D1", True, True, 1, 1),
    ("back+ei r2 D1", True, True, 2, 1),
    ("back+ei r1 D2", True, True, 1, 2),
    ("back+ei r2 D3", True, True, 2, 3),
    ("back only", True, False, 1, 1),
    ("ei only", False, True, 1, 1),
    ("neither", False, False, 1, 1),
]


def make_pair(back, ei, radius, delay, width=1.0, seed=0, dtype=torch.float64):
    """backei's layer and the reference with the same gate weights (scaled so gates matter)."""
    torch.manual_seed(seed)
    ours = BackEI(3, back=back, ei=ei, radius=radius, delay=delay, surrogate_param=width).to(dtype)
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(3.0)
    ref = reference.BackEI(3, back, ei, radius, delay, width=width).to(dtype)
    missing = ref.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "threshold"}, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    return ours, ref


def run(layer, x, steps, grad):
    x = x.detach().clone().requires_grad_(True)
    s = layer(x, steps)
    (s * grad).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in layer.named_parameters() if p.grad is not None}
    return s.detach(), x.grad.detach(), grads


@pytest.mark.parametrize("name,back,ei,radius,delay", SWITCHES)
@pytest.mark.parametrize("t_in", ["T", "1"])
def test_agrees_with_the_pytorch_reference(name, back, ei, radius, delay, t_in):
    ours, ref = make_pair(back, ei, radius, delay, seed=len(name))
    steps, batch = 6, 2
    torch.manual_seed(1)
    x = torch.rand(steps if t_in == "T" else 1, batch, 3, 6, 7, dtype=torch.float64) * 1.5
    grad = torch.randn(steps, batch, 3, 6, 7, dtype=torch.float64)
    s, dx, dw = run(ours, x, steps, grad)
    s_ref, dx_ref, dw_ref = run(ref, x, steps, grad)
    assert torch.equal(s, s_ref), f"{name}: {(s != s_ref).sum()} spikes differ"
    fired = (s != 0).double().mean().item()
    assert 0.05 < fired < 0.95, f"{name}: firing rate {fired}: the case tests nothing"
    if ei:
        assert (s < 0).any(), f"{name}: no inhibitory spike: the case tests nothing"
    torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-12)
    assert dw.keys() == dw_ref.keys()
    for k in dw:
        torch.testing.assert_close(dw[k], dw_ref[k], rtol=1e-10, atol=1e-12, msg=f"{name}: {k}")


def test_another_surrogate_width_agrees_too():
    ours, ref = make_pair(True, True, 1, 1, width=2.0, seed=3)
    x = torch.rand(5, 2, 3, 6, 7, dtype=torch.float64) * 1.5
    grad = torch.randn(5, 2, 3, 6, 7, dtype=torch.float64)
    s, dx, dw = run(ours, x, None, grad)
    s_ref, dx_ref, dw_ref = run(ref, x, 5, grad)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-12)
    for k in dw:
        torch.testing.assert_close(dw[k], dw_ref[k], rtol=1e-10, atol=1e-12)


def test_float32_agrees_with_the_reference_in_float64():
    ours, ref = make_pair(True, True, 1, 1, seed=5)
    x = torch.rand(5, 2, 3, 6, 7, dtype=torch.float64) * 1.5
    grad = torch.randn(5, 2, 3, 6, 7, dtype=torch.float64)
    s_ref, dx_ref, _ = run(ref, x, 5, grad)
    s, dx, _ = run(ours.float(), x.float(), 5, grad.float())
    assert s.dtype == torch.float32
    assert (s.double() != s_ref).double().mean() < 0.01
    if torch.equal(s.double(), s_ref):
        torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-4, atol=1e-5)


def test_multistep_lif_is_the_plain_layer_on_any_shape():
    lif = MultiStepLIF().double()
    ref = reference.BackEI(1, False, False, 0, 1).double()
    x = torch.rand(7, 3, 4, 5, dtype=torch.float64) * 1.2  # [T, B, 4, 5]: a map
    grad = torch.randn(7, 3, 4, 5, dtype=torch.float64)
    s, dx, _ = run(lif, x, None, grad)
    s_ref, dx_ref, _ = run(ref, x, 7, grad)
    assert s.shape == x.shape and torch.equal(s, s_ref)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)
    x2 = torch.rand(4, 2, 10, dtype=torch.float64)  # [T, B, N]: after a linear layer
    assert lif(x2).shape == x2.shape


@pytest.mark.parametrize("name,back,ei,radius,delay", SWITCHES)
def test_gradcheck_float64(name, back, ei, radius, delay):
    torch.manual_seed(2)
    layer = BackEI(2, back=back, ei=ei, radius=radius, delay=delay, smooth_k=4.0).double()
    x = (torch.rand(4, 2, 2, 5, 5, dtype=torch.float64) * 1.2).requires_grad_(True)
    handle = layer._handle(2, 5, 5, x.device)
    params = layer.flat_parameters()
    inputs = (x,) if params is None else (x, params.detach().clone().requires_grad_(True))

    def f(x, p=None):
        return SpikingFunction.apply(handle, None, x, p)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5), name


def test_gradcheck_direct_encoding_and_the_plain_layer():
    torch.manual_seed(4)
    layer = BackEI(2, radius=1, delay=2, smooth_k=3.0).double()
    x = (torch.rand(1, 2, 2, 4, 4, dtype=torch.float64) * 1.2).requires_grad_(True)
    handle = layer._handle(2, 4, 4, x.device)
    p = layer.flat_parameters().detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, p: SpikingFunction.apply(handle, 5, x, p), (x, p), eps=1e-6, atol=1e-6)
    lif = MultiStepLIF(smooth_k=4.0)
    y = (torch.rand(5, 3, 7, dtype=torch.float64) * 1.2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: lif(y), (y,), eps=1e-6, atol=1e-6)


def test_module_parameters_get_their_gradients_and_train():
    torch.manual_seed(6)
    layer = BackEI(3, radius=1)
    x = torch.rand(4, 2, 3, 5, 5) * 1.5
    target = torch.rand(2, 3, 5, 5)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    before = [p.detach().clone() for p in layer.parameters()]
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = ((layer(x).mean(0) - target) ** 2).mean()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(not torch.equal(a, p) for a, p in zip(before, layer.parameters()))
    assert min(losses[1:]) < losses[0]


class _BrainCogBaseNode(torch.nn.Module):
    """The attribute layout of BrainCog's BaseNode/BackEINode (braincog/base/node/node.py):
    threshold is a Parameter without gradient, back and ei are nn.Conv2d(channel, channel,
    2*cfg_backei+1, padding=cfg_backei)."""

    def __init__(self, threshold=0.5, channel=40, if_back=True, if_ei=True, cfg_backei=2):
        super().__init__()
        self.threshold = torch.nn.Parameter(torch.tensor(threshold), requires_grad=False)
        k = 2 * cfg_backei + 1
        if if_back:
            self.back = torch.nn.Conv2d(channel, channel, kernel_size=k, stride=1, padding=cfg_backei)
        if if_ei:
            self.ei = torch.nn.Conv2d(channel, channel, kernel_size=k, stride=1, padding=cfg_backei)


def test_a_braincog_backeinode_state_dict_loads_and_its_threshold_counts():
    torch.manual_seed(7)
    node = _BrainCogBaseNode(threshold=0.4, channel=3, cfg_backei=1)
    with torch.no_grad():
        for p in (node.back.weight, node.ei.weight):
            p.mul_(3.0)
    node = node.double()
    ours = BackEI(3, radius=1).double()
    result = ours.load_state_dict(node.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sorted(ours.state_dict()) == sorted(node.state_dict())
    ref = reference.BackEI(3, True, True, 1, 1, threshold=float(node.threshold)).double()
    ref.load_state_dict({k: v for k, v in node.state_dict().items() if k != "threshold"})
    x = torch.rand(5, 2, 3, 6, 6, dtype=torch.float64) * 1.5
    s = ours(x)
    assert torch.equal(s, ref(x, 5))
    at_half = BackEI(3, radius=1).double()  # the same weights at the default threshold 0.5
    at_half.load_state_dict({k: v for k, v in node.state_dict().items() if k != "threshold"}, strict=False)
    assert not torch.equal(s, at_half(x)), "the loaded threshold made no difference"
    assert abs(float(ours.threshold) - 0.4) < 1e-7
    # and back: our state dict loads into BrainCog's node
    node2 = _BrainCogBaseNode(channel=3, cfg_backei=1)
    node2.load_state_dict(ours.state_dict(), strict=True)


def test_copies_and_pickles_rebuild_their_layers():
    layer = BackEI(2)
    x = torch.rand(3, 1, 2, 4, 4) * 1.5
    y = layer(x)
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x), y)
    again = pickle.loads(pickle.dumps(layer))
    assert torch.equal(again(x), y)


def test_dtype_and_shape_errors_say_what_and_how():
    layer = BackEI(3, radius=1)
    with pytest.raises(TypeError, match=r"invalid setting `dtype`: torch.float16 is not supported"):
        layer(torch.rand(2, 1, 3, 5, 5).half())
    with pytest.raises(TypeError, match=r"invalid setting `dtype`.*int64"):
        layer(torch.ones(2, 1, 3, 5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape mismatch in BackEI layer input: expected \[T, B, 3, 5, 5\].*got \[2, 1, 4, 5, 5\]"):
        layer(torch.rand(2, 1, 4, 5, 5))
    with pytest.raises(ValueError, match=r"shape mismatch in BackEI layer input: expected \[T, B, 3, H, W\]"):
        layer(torch.rand(1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"invalid setting `T_in`: the input current has T_in = 2 steps; it must be 1"):
        layer(torch.rand(2, 1, 3, 5, 5), 4)
    with pytest.raises(ValueError, match=r"invalid setting `radius`: r = 3 gives a 7×7 gate kernel that does not fit the 5×5 map"):
        BackEI(3, radius=3)(torch.rand(2, 1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"invalid setting `delay`"):
        BackEI(3, delay=0)(torch.rand(2, 1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"invalid setting `precision`: `fp16` is not a precision mode"):
        BackEI(3, precision="fp16")(torch.rand(2, 1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"invalid setting `surrogate`"):
        MultiStepLIF(surrogate="relu")(torch.rand(2, 1, 3))
    with pytest.raises(ValueError, match=r"expected \[T, B, \.\.\.\]"):
        MultiStepLIF()(torch.rand(5))
    # a non-contiguous input is made contiguous, not refused
    x = torch.rand(1, 3, 5, 5, 2).permute(4, 0, 1, 2, 3) * 1.5
    assert torch.equal(layer(x), layer(x.contiguous()))
