"""An independent PyTorch implementation of BackEISNN, written from docs/model.md (not from the
Rust code), used to time PyTorch against backei and to check backei's numbers.

Layout is time-major everywhere: a spiking layer takes the input current [T_in, B, ...] with
T_in = 1 (direct encoding: the same current at every step) or T_in = T, and returns s [T, B, ...].

Per step t = 1..T (u, s zero at the start; s_{t-D} = 0 for t <= D):
    g_t = sigmoid(W_b * s_{t-D} + b_b)          (back; at t <= D this is sigmoid(b_b))
    v_t = leak * u_{t-1} + g_t * I_t            (without back: + I_t)
    o_t = H(v_t - threshold)                    (H(x) = 1 iff x > 0)
    e_t = sign(W_e * v_t + b_e)                 (ei; sign(0) = 0; on v BEFORE the reset)
    u_t = v_t * (1 - o_t)                       (hard reset, not detached)
    s_t = e_t * o_t                             (without ei: o_t)
Backward: rectangle surrogate of height 1/width, width `width` (1 in the reference) for both H
and sign; everything else exact (autograd).

Parameter names follow backei's `ParamSlot` names (`layers.1.back.weight`, ...), so a state dict
from a backei case loads with strict=True.
"""

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for specs.py
from specs import network_layers, spiking_layer_inputs  # noqa: F401 (re-exported)

LEAK = 0.2
THRESHOLD = 0.5


class Heaviside(torch.autograd.Function):
    """H(x) = 1 iff x > 0 forward; rectangle |x| < width/2 of height 1/width backward."""

    @staticmethod
    def forward(ctx, x, width):
        ctx.save_for_backward(x)
        ctx.width = width
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        w = ctx.width
        return grad * (x.abs() < 0.5 * w).to(grad.dtype) / w, None


class Sign(torch.autograd.Function):
    """sign(x) with sign(0) = 0 forward; the same rectangle as H backward (height 1, not 2)."""

    @staticmethod
    def forward(ctx, x, width):
        ctx.save_for_backward(x)
        ctx.width = width
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        w = ctx.width
        return grad * (x.abs() < 0.5 * w).to(grad.dtype) / w, None


def gate_conv(channels, radius):
    """The C -> C (2r+1)x(2r+1) convolution of the back and E/I gates (stride 1, padding r)."""
    k = 2 * radius + 1
    return nn.Conv2d(channels, channels, k, stride=1, padding=radius, bias=True)


class BackEI(nn.Module):
    """A BackEI spiking layer; with back=False and ei=False, the plain spiking layer (any shape)."""

    def __init__(self, channels, back=True, ei=True, radius=1, delay=1, leak=LEAK,
                 threshold=THRESHOLD, width=1.0):
        super().__init__()
        assert delay >= 1, "the feedback delay D must be >= 1"
        # attribute names give the parameter names back.weight, back.bias, ei.weight, ei.bias
        self.back = gate_conv(channels, radius) if back else None
        self.ei = gate_conv(channels, radius) if ei else None
        self.delay = delay
        self.leak = leak
        self.threshold = threshold
        self.width = width

    def step(self, u, s_prev, i_t):
        """One time step: (u_{t-1}, s_{t-D} or None when t <= D, I_t) -> (s_t, u_t)."""
        if self.back is not None:
            if s_prev is not None:
                a = self.back(s_prev)
            else:  # s_{t-D} = 0: the convolution gives its bias alone
                a = self.back.bias.view(1, -1, 1, 1).expand_as(i_t)
            i_t = torch.sigmoid(a) * i_t
        v = self.leak * u + i_t
        o = Heaviside.apply(v - self.threshold, self.width)
        if self.ei is not None:
            s = Sign.apply(self.ei(v), self.width) * o  # E/I gate on v before the reset
        else:
            s = o
        return s, v * (1.0 - o)

    def forward(self, current, steps):
        t_in = current.shape[0]
        assert t_in in (1, steps), f"input has T_in = {t_in}, expected 1 or {steps}"
        # compile_steps() may swap in a torch.compile'd step; the math is the same
        cell = self.__dict__.get("compiled_step") or self.step
        u = torch.zeros_like(current[0])
        outs = []
        for t in range(steps):
            i_t = current[0] if t_in == 1 else current[t]
            s_prev = outs[t - self.delay] if t >= self.delay else None
            s, u = cell(u, s_prev, i_t)
            outs.append(s)
        return torch.stack(outs)


def compile_steps(model, **compile_kwargs):
    """torch.compile the per-step cell of every BackEI layer in `model` (the loop over T stays in
    Python: compiling the unrolled 20-step graph takes minutes)."""
    for m in model.modules():
        if isinstance(m, BackEI):
            m.__dict__["compiled_step"] = torch.compile(m.step, **compile_kwargs)
    return model


def uncompile_steps(model):
    for m in model.modules():
        if isinstance(m, BackEI):
            m.__dict__.pop("compiled_step", None)
    return model


class StepDropout(nn.Module):
    """Dropout with a new mask at every time step: F.dropout on [T, B, ...] draws every element
    independently, so each step has its own mask. A T_in = 1 input is expanded to T first."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x, steps):
        if x.shape[0] == 1 and steps > 1:
            x = x.expand(steps, *x.shape[1:])
        return F.dropout(x, self.p, self.training)


def merge_time(fn, x):
    """Applies a stateless per-frame op to [T, B, ...] by folding T into the batch."""
    t, b = x.shape[:2]
    y = fn(x.reshape(t * b, *x.shape[2:]))
    return y.reshape(t, b, *y.shape[1:])


class Network(nn.Module):
    """One of the paper's networks. forward(x) takes [T_in, B, C, H, W] (T_in = 1: direct
    encoding) and returns the readout [B, classes]: the last layer's spikes averaged over T."""

    def __init__(self, name, steps=20, back=True, ei=True, delay=1, leak=LEAK,
                 threshold=THRESHOLD, width=1.0):
        super().__init__()
        spec, radius, self.input_shape = network_layers(name)
        self.name = name
        self.steps = steps
        self.kinds = [kind for kind, _ in spec]
        mods = []
        for kind, args in spec:
            if kind == "conv":
                cin, cout, k, p = args
                mods.append(nn.Conv2d(cin, cout, k, stride=1, padding=p, bias=True))
            elif kind == "linear":
                mods.append(nn.Linear(*args, bias=True))
            elif kind == "pool":
                mods.append(nn.AvgPool2d(2))
            elif kind == "flatten":
                mods.append(nn.Flatten())
            elif kind == "dropout":
                mods.append(StepDropout(args[0]))
            elif kind == "backei":
                mods.append(BackEI(args[0], back, ei, radius, delay, leak, threshold, width))
            elif kind == "spiking":
                mods.append(BackEI(1, False, False, 0, 1, leak, threshold, width))
            else:
                raise ValueError(kind)
        self.layers = nn.ModuleList(mods)

    def forward(self, x, return_spikes=False):
        spikes = {}
        for i, (kind, mod) in enumerate(zip(self.kinds, self.layers)):
            if kind in ("conv", "pool", "flatten"):
                x = merge_time(mod, x)
            elif kind == "linear":
                x = mod(x)  # nn.Linear broadcasts over [T, B]
            elif kind == "dropout":
                x = mod(x, self.steps)
            else:  # backei / spiking
                x = mod(x, self.steps)
                spikes[i] = x
        readout = x.mean(0)
        return (readout, spikes) if return_spikes else readout


def mse_loss(readout, labels, classes=10):
    """The reference loss: mean over batch and classes of (readout - onehot)^2."""
    target = F.one_hot(labels, classes).to(readout.dtype)
    return F.mse_loss(readout, target)
