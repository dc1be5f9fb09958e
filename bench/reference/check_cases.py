"""Checks backei's CPU engine against an independent implementation, case by case.

    python3 bench/reference/check_cases.py bench/reference/cases               # torch (fwd + grads)
    python3 bench/reference/check_cases.py bench/reference/cases --backend numpy   # forward only

The cases are written by `cargo run --release --example dump_reference_case -- DIR` (f64 CPU
engine). For every case this recomputes the outputs (and, with torch, every gradient) in float64
and prints, per tensor, the max abs difference and the max abs difference relative to the largest
magnitude of the reference tensor (element-wise relative errors are meaningless for gradient
entries that cancel to ~0). Exit status 1 if any tensor is off by more than --tol (1e-9)
relative, or a case fails to run.
"""

import argparse
import glob
import json
import os
import struct
import sys
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "I64": np.int64}


def load_case(path):
    """Reads a safetensors file with numpy only (no safetensors package needed): an 8-byte
    little-endian header length, a JSON header, then the raw little-endian tensor bytes."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {}) or {}
    body = raw[8 + n:]
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = NUMPY_DTYPES[info["dtype"]]
        arr = np.frombuffer(body[start:end], dtype=np.dtype(dtype).newbyteorder("<"))
        tensors[name] = arr.reshape(info["shape"]).astype(dtype)
    return meta, tensors


def as_bool(text):
    return str(text).lower() == "true"


def layer_config(meta):
    return dict(back=as_bool(meta["back"]), ei=as_bool(meta["ei"]), radius=int(meta["radius"]),
                delay=int(meta["delay"]), leak=float(meta["leak"]),
                threshold=float(meta["threshold"]), width=float(meta["surrogate_width"]))


# ---------------------------------------------------------------- numpy twin (forward only)

def np_conv2d(x, weight, bias, padding):
    """Cross-correlation as PyTorch's Conv2d: x [N, Cin, H, W], weight [Cout, Cin, k, k]."""
    k = weight.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho, wo = xp.shape[2] - k + 1, xp.shape[3] - k + 1
    y = np.broadcast_to(bias.reshape(1, -1, 1, 1), (x.shape[0], weight.shape[0], ho, wo)).copy()
    for ky in range(k):
        for kx in range(k):
            y += np.einsum("oc,nchw->nohw", weight[:, :, ky, kx], xp[:, :, ky:ky + ho, kx:kx + wo])
    return y


def np_sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def np_backei_forward(current, steps, params, back, ei, radius, delay, leak, threshold, **_):
    """The layer of docs/model.md in numpy; returns (s [T, ...], v [T, ...])."""
    u = np.zeros_like(current[0])
    outs, vs = [], []
    for t in range(steps):
        i_t = current[0] if current.shape[0] == 1 else current[t]
        if back:
            if t >= delay:
                a = np_conv2d(outs[t - delay], params["back.weight"], params["back.bias"], radius)
            else:
                a = np.broadcast_to(params["back.bias"].reshape(1, -1, 1, 1), i_t.shape)
            i_t = np_sigmoid(a) * i_t
        v = leak * u + i_t
        o = (v - threshold > 0).astype(v.dtype)
        s = np.sign(np_conv2d(v, params["ei.weight"], params["ei.bias"], radius)) * o if ei else o
        u = v * (1.0 - o)
        outs.append(s)
        vs.append(v)
    return np.stack(outs), np.stack(vs)


def np_network_forward(meta, t):
    """Forward of a network case in numpy: returns {name: array} of the recomputed outputs."""
    from specs import network_layers  # plain Python, no torch needed
    spec, radius, _ = network_layers(meta["network"])
    steps = int(meta["steps"])
    x = t["input"]  # [1, B, C, H, W]
    got = {}
    for i, (kind, args) in enumerate(spec):
        w, b = t.get(f"layers.{i}.weight"), t.get(f"layers.{i}.bias")
        tt, bb = x.shape[:2]
        if kind == "conv":
            y = np_conv2d(x.reshape(tt * bb, *x.shape[2:]), w.astype(np.float64), b.astype(np.float64), args[3])
            x = y.reshape(tt, bb, *y.shape[1:])
        elif kind == "pool":
            h2, w2 = x.shape[3] // 2, x.shape[4] // 2
            x = x[..., :2 * h2, :2 * w2].reshape(tt, bb, x.shape[2], h2, 2, w2, 2).mean(axis=(4, 6))
        elif kind == "flatten":
            x = x.reshape(tt, bb, -1)
        elif kind == "linear":
            x = x @ w.astype(np.float64).T + b.astype(np.float64)
        elif kind == "dropout":
            raise NotImplementedError("numpy twin: dropout cases are not supported (eval only)")
        else:
            is_backei = kind == "backei"
            params = {k[len(f"layers.{i}."):]: v.astype(np.float64) for k, v in t.items()
                      if k.startswith(f"layers.{i}.")}
            fb = dict(back=is_backei, ei=is_backei, radius=radius if is_backei else 0, delay=1,
                      leak=0.2, threshold=0.5)
            x, _ = np_backei_forward(x, steps, params, **fb)
            got[f"out.layers.{i}"] = x
    readout = x.mean(0)
    got["readout"] = readout
    onehot = np.eye(readout.shape[1])[t["labels"]]
    got["loss"] = np.array(((readout - onehot) ** 2).mean())
    return got


def numpy_check(meta, t):
    if meta["kind"] == "layer":
        cfg = layer_config(meta)
        s, v = np_backei_forward(t["input"], int(meta["steps"]), t, **cfg)
        return {"out": s, "v": v}
    return np_network_forward(meta, t)


# ---------------------------------------------------------------- torch (forward + backward)

def torch_check(meta, t, device):
    import torch
    import backei_torch as bt

    def tensor(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=torch.float64)

    if meta["kind"] == "layer":
        cfg = layer_config(meta)
        c = t["input"].shape[2]
        layer = bt.BackEI(c, **cfg).to(device=device, dtype=torch.float64)
        params = {k: tensor(v) for k, v in t.items() if k.split(".")[0] in ("back", "ei")}
        layer.load_state_dict(params, strict=True)
        x = tensor(t["input"]).requires_grad_(True)
        s = layer(x, int(meta["steps"]))
        s.backward(tensor(t["grad_out"]))
        got = {"out": s, "grad.input": x.grad}
        for name, p in layer.named_parameters():
            got["grad." + name] = p.grad
    else:
        net = bt.Network(meta["network"], steps=int(meta["steps"])).to(device=device, dtype=torch.float64)
        names = [n for n, _ in net.named_parameters()]
        net.load_state_dict({n: tensor(t[n]) for n in names}, strict=True)
        net.eval()  # no dropout: the case was computed with dropout off
        readout, spikes = net(tensor(t["input"]), return_spikes=True)
        loss = bt.mse_loss(readout, torch.from_numpy(t["labels"]).to(device))
        loss.backward()
        got = {f"out.layers.{i}": s for i, s in spikes.items()}
        got.update(readout=readout, loss=loss)
        for name, p in net.named_parameters():
            got["grad." + name] = p.grad
    return {k: (v.detach().cpu().numpy() if v is not None else None) for k, v in got.items()}


# ---------------------------------------------------------------- comparison

def compare(name, got, ref, tol):
    """Prints one line per tensor; returns True when it agrees within tol (norm-relative)."""
    if got is None:
        print(f"    {name:34s} MISSING in the recomputation")
        return False
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        print(f"    {name:34s} SHAPE {got.shape} vs reference {ref.shape}")
        return False
    diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rel = diff / scale if scale > 0 else diff
    ok = rel <= tol
    print(f"    {name:34s} max|ref| {scale:10.3e}  max abs {diff:10.3e}  rel {rel:10.3e}  "
          f"{'ok' if ok else 'FAIL'}")
    return ok


def check_file(path, backend, device, tol):
    meta, t = load_case(path)
    print(f"== {os.path.basename(path)}  ({json.dumps(meta, sort_keys=True)})")
    got = numpy_check(meta, t) if backend == "numpy" else torch_check(meta, t, device)
    ok = True
    for name in sorted(got):
        if name not in t:
            print(f"    {name:34s} (not in the case file; skipped)")
            continue
        ok &= compare(name, got[name], t[name], tol)
    # every gradient in the case must have been recomputed (torch); numpy checks forward only
    if backend == "torch":
        for name in sorted(k for k in t if k.startswith("grad.") and k not in got):
            print(f"    {name:34s} NOT RECOMPUTED")
            ok = False
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", help="folder of *.safetensors cases")
    ap.add_argument("--backend", choices=["torch", "numpy"], default="torch")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--tol", type=float, default=1e-9)
    args = ap.parse_args()

    device = args.device
    if args.backend == "torch" and device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = sorted(glob.glob(os.path.join(args.cases, "*.safetensors")))
    if not paths:
        print(f"no *.safetensors in {args.cases}")
        return 1
    if not any(os.path.basename(p).startswith("network_") for p in paths):
        print("note: no network case here; it is not committed (41 MB): make it with "
              "`cargo run --release --example dump_reference_case -- bench/reference/cases`")
    failed = []
    for path in paths:
        try:
            if not check_file(path, args.backend, device, args.tol):
                failed.append(path)
        except Exception:  # report and go on with the other cases
            traceback.print_exc()
            failed.append(path)
    print(f"{len(paths) - len(failed)}/{len(paths)} cases agree within {args.tol:g} "
          f"(backend {args.backend}{', device ' + str(device) if device else ''})")
    for p in failed:
        print(f"FAILED: {p}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
