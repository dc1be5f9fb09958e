"""A small spiking network in plain PyTorch whose spiking layers are backei's, trained on the
MNIST sample this repository ships (data/mnist-sample).

    python3 python/examples/train_mnist_sample.py                    # backei's layers, CPU or CUDA
    python3 python/examples/train_mnist_sample.py --layers reference # the same model, pure PyTorch

The model is ordinary PyTorch: a Conv2d and a Linear feed the spiking layers, which take the whole
time-major sequence [T, B, ...]. Swapping the layer is the one line in `Net.__init__`; the rest
(optimizer, loss, data) does not change. Exits 1 if the test accuracy stays near chance.
"""

import argparse
import gzip
import os
import sys
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..", "..")


def read_idx(name, limit):
    with gzip.open(os.path.join(REPO, "data", "mnist-sample", name)) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    return torch.from_numpy(arr[:limit].copy())


class Net(nn.Module):
    """conv 1->8 k5 (28->24), BackEI (r = 2), avg-pool (12), linear 1152->10, spiking readout."""

    def __init__(self, layers, steps):
        super().__init__()
        self.steps = steps
        self.conv = nn.Conv2d(1, 8, 5)
        self.fc = nn.Linear(8 * 12 * 12, 10)
        if layers == "backei":
            from backei.torch import BackEI, MultiStepLIF
            self.spike1, self.spike2 = BackEI(8, radius=2), MultiStepLIF()
        else:  # the independent pure-PyTorch implementation (bench/reference/backei_torch.py)
            sys.path.insert(0, os.path.join(REPO, "bench", "reference"))
            import backei_torch
            self.spike1, self.spike2 = backei_torch.BackEI(8, radius=2), backei_torch.BackEI(1, False, False)

    def forward(self, images):  # images [B, 1, 28, 28] in [0, 1]
        current = self.conv(images).unsqueeze(0)      # [1, B, 8, 24, 24]: direct encoding, T_in = 1
        s = self.spike1(current, self.steps)          # [T, B, 8, 24, 24]
        t, b = s.shape[:2]
        x = F.avg_pool2d(s.reshape(t * b, 8, 24, 24), 2).reshape(t, b, -1)
        return self.spike2(self.fc(x), t).mean(0)     # spike counts averaged over T: [B, 10]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", choices=["backei", "reference"], default="backei")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--min-accuracy", type=float, default=0.5)
    args = ap.parse_args()
    torch.manual_seed(4150)
    dev = torch.device(args.device)
    xs = read_idx("train-images-idx3-ubyte.gz", args.train).float().div(255).unsqueeze(1)
    ys = read_idx("train-labels-idx1-ubyte.gz", args.train).long()
    xt = read_idx("t10k-images-idx3-ubyte.gz", args.test).float().div(255).unsqueeze(1)
    yt = read_idx("t10k-labels-idx1-ubyte.gz", args.test).long()
    model = Net(args.layers, args.steps).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(xs))
        for i in range(0, len(xs), args.batch_size):
            idx = order[i:i + args.batch_size]
            out = model(xs[idx].to(dev))
            loss = F.mse_loss(out, F.one_hot(ys[idx].to(dev), 10).float())  # the paper's loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            correct = sum((model(xt[i:i + 100].to(dev)).argmax(1).cpu() == yt[i:i + 100]).sum().item()
                          for i in range(0, len(xt), 100))
        acc = correct / len(xt)
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {100 * acc:.2f} % "
              f"({args.layers} layers on {dev}, {time.time() - start:.1f} s)")
    if acc < args.min_accuracy:
        print(f"test accuracy {acc:.3f} is below {args.min_accuracy}: the network did not learn")
        sys.exit(1)


if __name__ == "__main__":
    main()
