"""One timing row: the fashion-mnist network of bench/reference/backei_torch.py (the paper's: conv,
BackEI, pool, conv, BackEI, pool, linear, spiking, linear, spiking) as a plain PyTorch model, once
with its pure-PyTorch spiking layers and once with backei's swapped in (the same weights), forward
+ MSE + backward at B = 100, T = 20 on CUDA. Prints a markdown table; `--csv PATH` writes it too.

    python3 python/bench/time_model.py [--batch 100] [--steps 20] [--reps 10]
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "bench", "reference"))
import backei_torch as reference  # noqa: E402

from backei.torch import BackEI, MultiStepLIF  # noqa: E402


def swap_layers(model):
    """Replaces every reference spiking layer of `model` by backei's, keeping its weights."""
    for i, m in enumerate(model.layers):
        if not isinstance(m, reference.BackEI):
            continue
        if m.back is None and m.ei is None:
            new = MultiStepLIF(leak=m.leak, threshold=m.threshold, surrogate_param=m.width)
        else:
            conv = m.back if m.back is not None else m.ei
            new = BackEI(conv.in_channels, back=m.back is not None, ei=m.ei is not None, radius=conv.padding[0],
                         delay=m.delay, leak=m.leak, threshold=m.threshold, surrogate_param=m.width)
            new.load_state_dict({**m.state_dict(), "threshold": torch.tensor(m.threshold)}, strict=True)
        model.layers[i] = new.to(next(model.parameters()).device)
    return model


def time_step(model, x, labels, reps):
    def step():
        model.zero_grad(set_to_none=True)
        loss = reference.mse_loss(model(x), labels)
        loss.backward()
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--network", default="fashion-mnist")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--csv")
    args = ap.parse_args()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    torch.manual_seed(4150)
    model = reference.Network(args.network, steps=args.steps).to(dev)
    shape = model.input_shape
    x = torch.rand(1, args.batch, *shape, device=dev)
    labels = torch.randint(0, 10, (args.batch,), device=dev)
    with torch.no_grad():
        before = model(x)
    t_ref = time_step(model, x, labels, args.reps)
    swap_layers(model)
    with torch.no_grad():
        after = model(x)
    same = (before - after).abs().max().item()
    t_ours = time_step(model, x, labels, args.reps)
    gpu = torch.cuda.get_device_name()
    rows = [
        "| model | GPU | B | T | pure-PyTorch layers (ms) | backei's layers (ms) | speed-up | max readout difference |",
        "|---|---|---|---|---|---|---|---|",
        f"| {args.network} train step (forward, MSE, backward) | {gpu} | {args.batch} | {args.steps} | {t_ref:.2f} | "
        f"{t_ours:.2f} | {t_ref / t_ours:.2f}x | {same:.2e} |",
    ]
    print("\n".join(rows))
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("network,gpu,batch,steps,torch_ms,backei_ms,max_readout_diff\n")
            f.write(f"{args.network},{gpu},{args.batch},{args.steps},{t_ref:.3f},{t_ours:.3f},{same:.3e}\n")


if __name__ == "__main__":
    main()
