#!/usr/bin/env python3
"""The step-time model of docs/distributed.md: data-parallel training of the four networks on N
ranks, from the measured single-GPU step and the all-reduce of the flat gradient buffer.

  t_step(N) = t_compute(b) + t_allreduce(N)        (no overlap: an upper bound)
  t_allreduce(N) = 2 (N-1)/N * S / BW + hops(N) * alpha      (ring; S = 4 bytes * parameters)

Measured inputs (bench/RESULTS.md, NVIDIA H200, B = 100, T = 20, back + ei, Adam): the step
times below. Everything else is modelled: the bandwidths are the links' nominal figures, alpha
an assumed per-hop latency, t_compute(b) for b < 100 either proportional to b (kernels whose
work scales with the batch) or flat (one block per sample, as the v1 BackEI kernels: a smaller
batch leaves more of the GPU idle but does not finish sooner). Prints the markdown tables.
"""

PARAMS = {"mnist": 302_100, "fashion-mnist": 3_366_986, "cifar10": 16_073_738, "nmnist": 410_475}
# measured: one training step, B = 100, T = 20, backei GPU engine (v1 kernels), H200
STEP_MS = {"mnist": 85.28, "fashion-mnist": 255.33, "cifar10": 8467.6, "nmnist": 186.93}
# measured on the same card, same step: PyTorch eager (what a faster backei would approach)
EAGER_MS = {"mnist": 59.54, "fashion-mnist": 72.78, "cifar10": 365.24}

# nominal per-GPU, per-direction bandwidths (GB/s) and assumed per-hop latencies (us)
LINKS = {
    "NVLink 4 (H100/H200 SXM, NVSwitch)": (450.0, 3.0),
    "InfiniBand NDR 400 Gb/s, one NIC per GPU": (50.0, 5.0),
    "InfiniBand HDR 200 Gb/s, one NIC per GPU": (25.0, 5.0),
}


def allreduce_ms(params, n, bw_gbs, alpha_us, algo="ring"):
    if n == 1:
        return 0.0
    s = 4.0 * params
    bandwidth = 2.0 * (n - 1) / n * s / (bw_gbs * 1e9) * 1e3
    hops = 2 * (n - 1) if algo == "ring" else 2 * max(1, (n - 1).bit_length())
    return bandwidth + hops * alpha_us * 1e-3


def efficiency(t_compute, t_ar):
    return t_compute / (t_compute + t_ar)


def table_bytes():
    print("| network | parameters | all-reduce bytes S | 2S/BW, NVLink 4 | 2S/BW, IB NDR | 2S/BW, IB HDR |")
    print("|---|---|---|---|---|---|")
    for net, p in PARAMS.items():
        s = 4 * p
        cells = [f"{2 * s / (bw * 1e9) * 1e3:.3f} ms" for bw, _ in LINKS.values()]
        print(f"| {net} | {p:,} | {s / 1e6:.2f} MB | " + " | ".join(cells) + " |")


def table_weak():
    """Per-rank batch 100 (global 100 N): compute stays the measured step."""
    ns = [2, 8, 64, 512]
    print("| network, link | " + " | ".join(f"N = {n}" for n in ns) + " |")
    print("|---|" + "---|" * len(ns))
    for net in PARAMS:
        for link, (bw, a) in list(LINKS.items())[:2]:
            cells = []
            for n in ns:
                t = allreduce_ms(PARAMS[net], n, bw, a, "ring")
                cells.append(f"{t:.2f} ms, {100 * efficiency(STEP_MS[net], t):.1f} %")
            print(f"| {net}, {link.split(' (')[0].split(',')[0]} | " + " | ".join(cells) + " |")


def table_strong():
    """Global batch 100 (the paper's recipe) split over N ranks, InfiniBand NDR between them."""
    ns = [2, 4, 10, 25, 50, 100]
    bw, a = LINKS["InfiniBand NDR 400 Gb/s, one NIC per GPU"]
    print("| network, compute per rank | " + " | ".join(f"N = {n}" for n in ns) + " |")
    print("|---|" + "---|" * len(ns))
    for net in PARAMS:
        for label, scale in [("∝ batch", True), ("flat (v1)", False)]:
            cells = []
            for n in ns:
                tc = STEP_MS[net] * (1.0 / n if scale else 1.0)
                t = tc + allreduce_ms(PARAMS[net], n, bw, a, "tree")
                cells.append(f"{t:.1f} ms ({STEP_MS[net] / t:.1f}×)")
            print(f"| {net}, {label} | " + " | ".join(cells) + " |")
        if net in EAGER_MS:
            cells = []
            for n in ns:
                tc = EAGER_MS[net] / n
                t = tc + allreduce_ms(PARAMS[net], n, bw, a, "tree")
                cells.append(f"{t:.2f} ms ({EAGER_MS[net] / t:.1f}×)")
            print(f"| {net}, at PyTorch eager's speed, ∝ batch | " + " | ".join(cells) + " |")


def half_efficiency_ranks():
    """The N at which the all-reduce takes as long as the compute, per network and link."""
    print("| network | strong scaling (B = 100), ∝ batch, IB NDR | same at PyTorch eager's speed | weak scaling (100 per rank), IB NDR, ring |")
    print("|---|---|---|---|")
    bw, a = LINKS["InfiniBand NDR 400 Gb/s, one NIC per GPU"]
    for net in PARAMS:
        def first(f):
            for n in range(2, 1 << 16):
                if f(n):
                    return n
            return None
        strong = first(lambda n: allreduce_ms(PARAMS[net], n, bw, a, "tree") >= STEP_MS[net] / n)
        eager = first(lambda n: allreduce_ms(PARAMS[net], n, bw, a, "tree") >= EAGER_MS[net] / n) if net in EAGER_MS else None
        weak = first(lambda n: allreduce_ms(PARAMS[net], n, bw, a, "ring") >= STEP_MS[net])
        def fmt(n, batch_limit):
            if n is None:
                return "beyond N = 65,536"
            return f"N = {n:,}" + (" (past N = 100: the batch runs out first)" if batch_limit and n > 100 else "")
        print(f"| {net} | {fmt(strong, True)} | {fmt(eager, True) if net in EAGER_MS else 'not measured'} | {fmt(weak, False)} |")


if __name__ == "__main__":
    print("## all-reduce bytes\n")
    table_bytes()
    print("\n## weak scaling: ring all-reduce time and efficiency\n")
    table_weak()
    print("\n## strong scaling: step time and speed-up\n")
    table_strong()
    print("\n## where the all-reduce equals the compute\n")
    half_efficiency_ranks()
