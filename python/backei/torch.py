"""backei's spiking layers as PyTorch modules.

    from backei.torch import BackEI, MultiStepLIF
    layer = BackEI(32, radius=1)          # a BackEI layer of 32 channels (back and ei gates on)
    s = layer(x)                          # x: [T, B, 32, H, W] input current -> s: [T, B, 32, H, W]
    lif = MultiStepLIF()                  # the plain spiking layer, any [T, B, ...] input

CUDA tensors run backei's fused kernels on `torch.cuda.current_stream()`, reading and writing the
tensors' own memory (DLPack, no copies); CPU tensors run backei's CPU engine (float32 or float64).
Both are `torch.autograd.Function`s: BPTT over all T steps in one backward call.

The model (docs/model.md), per step t with u, s zero at the start and s_{t-D} = 0 for t <= D:
    g_t = sigmoid(back(s_{t-D}))     v_t = leak * u_{t-1} + g_t * I_t     o_t = H(v_t - threshold)
    e_t = sign(ei(v_t))              u_t = v_t * (1 - o_t)                s_t = e_t * o_t
`back` and `ei` are C -> C convolutions with (2r+1)^2 kernels and zero padding r.

Parameter names are BrainCog's `BackEINode` (braincog/base/node/node.py): `back.weight`,
`back.bias`, `ei.weight`, `ei.bias` (nn.Conv2d), and `threshold`, so its state dict loads with
strict=True (BackEINode's `decay` is `leak` here, its `cfg_backei` is `radius`, `if_back`/`if_ei`
are `back`/`ei`). BackEINode steps one time step per call; these modules take all T steps at once.
"""

import torch
from torch import nn
from torch.utils.dlpack import to_dlpack

from . import _backei

__all__ = ["BackEI", "MultiStepLIF", "SpikingFunction"]


def _capsule(t):
    """A zero-copy DLPack capsule of the tensor's memory (torch.utils.dlpack, which torch 1.13 and
    2.x both offer), consumed by the extension."""
    return None if t is None else to_dlpack(t.detach())


def _stream(device):
    """The handle of the stream the caller's work is on (0 on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return 0


def _bytes(n, device):
    return torch.empty(n, dtype=torch.uint8, device=device) if n else None


class SpikingFunction(torch.autograd.Function):
    """One backei layer over all T steps: (handle, steps, x [T_in, B, C, H, W], flat params)
    -> s [T, B, C, H, W]. The backward's state (v, g, z) lives in a workspace tensor kept with
    the graph; the output s is saved too (the feedback gate reads it)."""

    @staticmethod
    def forward(ctx, handle, steps, x, params):
        t_in, batch, steps, saved_bytes, scratch_bytes = handle.plan(tuple(x.shape), str(x.dtype), steps)
        x = x.contiguous()
        params = None if params is None else params.detach().contiguous()
        out = torch.empty((steps, batch) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
        saved = _bytes(saved_bytes, x.device)
        scratch = _bytes(scratch_bytes, x.device)
        handle.forward(t_in, batch, steps, _stream(x.device), _capsule(x), _capsule(params), _capsule(out), _capsule(saved),
                       _capsule(scratch))
        ctx.handle, ctx.dims, ctx.saved_ws = handle, (t_in, batch, steps, scratch_bytes), saved
        ctx.save_for_backward(x, params, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, params, out = ctx.saved_tensors
        t_in, batch, steps, scratch_bytes = ctx.dims
        grad_out = grad_out.contiguous()
        grad_in = torch.empty_like(x)
        grad_params = None if params is None else torch.zeros_like(params)
        scratch = _bytes(scratch_bytes, x.device)
        ctx.handle.backward(t_in, batch, steps, _stream(x.device), _capsule(x), _capsule(params), _capsule(out),
                            _capsule(grad_out), _capsule(grad_in), _capsule(grad_params), _capsule(ctx.saved_ws),
                            _capsule(scratch))
        return None, None, grad_in, grad_params


class _BackeiModule(nn.Module):
    """Keeps one backei layer per (device, map size) the module has seen; they hold no tensors."""

    def __init__(self, leak, threshold, surrogate, surrogate_param, smooth_k, precision, deterministic):
        super().__init__()
        # BrainCog's BaseNode keeps `threshold` in the state dict: so do we (a buffer)
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self._threshold = float(threshold)
        self.leak = float(leak)
        self.surrogate, self.surrogate_param = surrogate, float(surrogate_param)
        self.smooth_k = None if smooth_k is None else float(smooth_k)
        self.precision, self.deterministic = precision, bool(deterministic)
        self._handles = {}

    def _gates(self):
        return False, False, 0, 1

    def _handle(self, channels, height, width, device):
        key = (device.type, device.index or 0, channels, height, width, self._threshold)
        h = self._handles.get(key)
        if h is None:
            back, ei, radius, delay = self._gates()
            h = _backei.Layer(channels, height, width, back=back, ei=ei, radius=radius, delay=delay, leak=self.leak,
                              threshold=self._threshold, surrogate=self.surrogate, surrogate_param=self.surrogate_param,
                              smooth_k=self.smooth_k, precision=self.precision, deterministic=self.deterministic,
                              device=device.type, index=device.index or 0)
            self._handles[key] = h
        return h

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "threshold"
        if key in state_dict:  # a load is no hot path: reading the value here may synchronise
            self._threshold = float(state_dict[key])
            self._handles = {}

    def __getstate__(self):  # the handles are rebuilt on demand (pickling, deepcopy)
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


class BackEI(_BackeiModule):
    """A BackEI layer of `channels` channels: forward(x, steps=None) with x the input current
    [T, B, C, H, W] (or [1, B, C, H, W] with `steps` = T: the same current at every step) returns
    the spikes s [T, B, C, H, W] in {-1, 0, 1} (ei on) or {0, 1}.

    back / ei: the two gates; radius r: (2r+1)^2 gate kernels; delay D >= 1; leak, threshold;
    surrogate ('rectangle' of width `surrogate_param`, 'sigmoid' or 'atan' with alpha =
    `surrogate_param`); smooth_k: None for the model's step functions, k > 0 for a smooth layer
    (H -> sigmoid(k x), sign -> tanh(k x)) whose gradients finite differences can check;
    precision ('fp32', 'tf32', 'bf16'): the GPU's tensor-core rounding; deterministic:
    bit-reproducible weight gradients on the GPU. The gates are initialised as nn.Conv2d."""

    def __init__(self, channels, back=True, ei=True, radius=1, delay=1, leak=0.2, threshold=0.5, surrogate="rectangle",
                 surrogate_param=1.0, smooth_k=None, precision="fp32", deterministic=False):
        super().__init__(leak, threshold, surrogate, surrogate_param, smooth_k, precision, deterministic)
        k = 2 * radius + 1
        self.channels, self.radius, self.delay = channels, radius, delay
        self.back = nn.Conv2d(channels, channels, k, stride=1, padding=radius) if back else None
        self.ei = nn.Conv2d(channels, channels, k, stride=1, padding=radius) if ei else None

    def _gates(self):
        return self.back is not None, self.ei is not None, self.radius, self.delay

    def flat_parameters(self):
        """[W_b, b_b, W_e, b_e] as backei's one flat buffer (the gates that are on)."""
        parts = [p.reshape(-1) for m in (self.back, self.ei) if m is not None for p in (m.weight, m.bias)]
        return torch.cat(parts) if parts else None

    def forward(self, x, steps=None):
        if x.dim() != 5:
            raise ValueError(f"shape mismatch in BackEI layer input: expected [T, B, {self.channels}, H, W] (time-major: "
                             f"T steps, B samples, C·H·W of the layer), got {list(x.shape)}")
        handle = self._handle(self.channels, x.shape[3], x.shape[4], x.device)
        return SpikingFunction.apply(handle, steps, x, self.flat_parameters())

    def extra_repr(self):
        return (f"{self.channels}, back={self.back is not None}, ei={self.ei is not None}, radius={self.radius}, "
                f"delay={self.delay}, leak={self.leak}, threshold={self._threshold}")


class MultiStepLIF(_BackeiModule):
    """The plain spiking layer (BackEI without gates) over all T steps of any input [T, B, ...]:
    v_t = leak * u_{t-1} + I_t, s_t = H(v_t - threshold), hard reset (not detached).
    forward(x, steps=None) as BackEI's."""

    def __init__(self, leak=0.2, threshold=0.5, surrogate="rectangle", surrogate_param=1.0, smooth_k=None):
        super().__init__(leak, threshold, surrogate, surrogate_param, smooth_k, "fp32", False)

    def forward(self, x, steps=None):
        if x.dim() < 3:
            raise ValueError(f"shape mismatch in spiking layer input: expected [T, B, ...] (time-major), got {list(x.shape)}")
        t, b, rest = x.shape[0], x.shape[1], tuple(x.shape[2:])
        n = 1
        for d in rest:
            n *= d
        handle = self._handle(n, 1, 1, x.device)
        s = SpikingFunction.apply(handle, steps, x.reshape(t, b, n, 1, 1), None)
        return s.reshape((s.shape[0], b) + rest)

    def extra_repr(self):
        return f"leak={self.leak}, threshold={self._threshold}"
