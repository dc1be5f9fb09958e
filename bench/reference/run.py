"""PyTorch side of the benchmarks (issue 6, item 3), run on the lent GPU machine.

    python3 bench/reference/run.py --backei-csv $OUT/kernels.csv --out $OUT/reference.md

Workloads (names shared with backei's CSV; fp32, B = 100, T = 20 unless stated):
  backei_fwd_bwd/<net>/L1, .../L2   one BackEI layer (back + ei, D = 1, the net's radius) at the
                                    shape of the net's first / second spiking layer, random input
                                    current [T, B, C, H, W], forward + backward (dI and all
                                    parameter gradients); <net> in mnist, fashion-mnist, cifar10
  plain_lif_fwd_bwd/T32x64x65536    the plain spiking layer (no back, no ei) on [32, 64, 65536]
  train_step/<net>                  forward, MSE, backward, Adam step of the whole network
                                    (direct encoding, random input and labels)
Columns: PyTorch eager; torch.compile of the per-step cell (the Python loop over T stays eager:
compiling the unrolled 20-step graph takes minutes); SpikingJelly multi-step LIF (plain layer
only), one column per installed SpikingJelly (see sj_lif.py). Times are medians of >= --reps
repetitions (fewer, at least --min-reps, for workloads slower than --seconds-per-workload allows),
measured with CUDA events after warm-up. TF32 is off (true fp32) unless --tf32.

--backei-csv: a CSV with at least the columns `workload,ms` (more columns are ignored; the first
row of a workload counts), with the workload names above; `<workload>@v2` and `<workload>@v3` rows
(the tiled BackEI kernels) compete with the plain name, and the table shows the fastest. Ratios are PyTorch ms / backei ms,
so > 1 means backei is faster.

Every workload runs inside try/except: an error is printed and the run goes on.
"""

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

NETS = ["mnist", "fashion-mnist", "cifar10"]
PLAIN = "plain_lif_fwd_bwd/T32x64x65536"
PLAIN_SHAPE = (32, 64, 65536)
BATCH, STEPS = 100, 20


def log(msg):
    print(msg, flush=True)


# ---------------------------------------------------------------- timing

def time_cuda(torch, fn, reps, min_reps, seconds, warmup=2):
    """Median ms of fn() over CUDA events; the rep count shrinks for slow workloads."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = time.perf_counter() - t0
    n = max(min_reps, min(reps, int(seconds / max(one, 1e-6))))
    times = []
    for _ in range(n):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), n


class CompileTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise CompileTimeout()


def with_time_box(seconds, fn):
    """Runs fn() and raises CompileTimeout after `seconds` (SIGALRM; main thread only)."""
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(max(1, int(seconds)))
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- workloads

def layer_workload(torch, bt, net, which):
    """(model, fn) for one BackEI layer's forward + backward at the net's L1 or L2 shape."""
    l1, l2, radius = bt.spiking_layer_inputs(net)
    c, h, w = l1 if which == "L1" else l2
    layer = bt.BackEI(c, back=True, ei=True, radius=radius, delay=1).cuda()
    x = torch.randn(STEPS, BATCH, c, h, w, device="cuda").mul_(0.5).add_(0.5).requires_grad_(True)
    g = torch.randn(STEPS, BATCH, c, h, w, device="cuda")

    def fn():
        x.grad = None
        layer(x, STEPS).backward(g)

    return layer, fn


def plain_workload(torch, bt):
    t, n, m = PLAIN_SHAPE
    layer = bt.BackEI(1, back=False, ei=False).cuda()
    x = (torch.rand(t, n, m, device="cuda") * 1.5).requires_grad_(True)
    g = torch.randn(t, n, m, device="cuda")

    def fn():
        x.grad = None
        layer(x, t).backward(g)

    return layer, fn


def train_workload(torch, bt, net):
    model = bt.Network(net, steps=STEPS).cuda().train()
    c, h, w = model.input_shape
    x = torch.rand(1, BATCH, c, h, w, device="cuda")  # direct encoding: T_in = 1
    labels = torch.randint(0, 10, (BATCH,), device="cuda")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def fn():
        opt.zero_grad(set_to_none=True)
        loss = bt.mse_loss(model(x), labels)
        loss.backward()
        opt.step()

    return model, fn


def all_workloads():
    names = [f"backei_fwd_bwd/{n}/{l}" for n in NETS for l in ("L1", "L2")]
    names.append(PLAIN)
    names += [f"train_step/{n}" for n in NETS]
    return names


def make_workload(torch, bt, name):
    parts = name.split("/")
    if parts[0] == "backei_fwd_bwd":
        return layer_workload(torch, bt, parts[1], parts[2])
    if name == PLAIN:
        return plain_workload(torch, bt)
    if parts[0] == "train_step":
        return train_workload(torch, bt, parts[1])
    raise ValueError(name)


def run_eager(torch, bt, name, args):
    model, fn = make_workload(torch, bt, name)
    ms, n = time_cuda(torch, fn, args.reps, args.min_reps, args.seconds_per_workload)
    del model, fn
    return ms, n


def run_compiled(torch, bt, name, args, time_left):
    """Compiles the step cells (time-boxed, the first calls included) and times."""
    model, fn = make_workload(torch, bt, name)
    bt.compile_steps(model)
    t0 = time.perf_counter()
    box = min(args.compile_timeout, time_left)
    with_time_box(box, lambda: (fn(), fn(), torch.cuda.synchronize()))  # compiles fwd and bwd
    compile_s = time.perf_counter() - t0
    ms, n = time_cuda(torch, fn, args.reps, args.min_reps, args.seconds_per_workload)
    return ms, n, compile_s


def run_spikingjelly(site, args):
    """sj_lif.py in a subprocess with PYTHONPATH = site; returns its JSON result."""
    env = dict(os.environ, PYTHONPATH=site)
    cmd = [sys.executable, os.path.join(HERE, "sj_lif.py"), "--shape", *map(str, PLAIN_SHAPE),
           "--reps", str(args.reps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.sj_timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"sj_lif.py exit {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------- table

def read_backei_csv(path):
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            name, ms = (row.get("workload") or "").strip(), (row.get("ms") or "").strip()
            if name and ms and name not in out:
                try:
                    out[name] = float(ms)
                except ValueError:
                    log(f"backei csv: `{ms}` is not a number (workload {name})")
    return out


def fmt(x, digits=3):
    return "—" if x is None else f"{x:.{digits}g}" if digits else str(x)


def best_backei(backei, name):
    """The fastest backei row of a workload: `name` (v1) or `name@v2` / `name@v3` (the tiled
    kernels), as (ms, version)."""
    found = [(backei[k], v) for k, v in ((name, "v1"), (f"{name}@v2", "v2"), (f"{name}@v3", "v3")) if k in backei]
    return min(found) if found else (None, None)


def build_table(results, backei, sj_columns):
    cols = ["backei ms", "kernels", "eager ms", "compile ms"] + [f"{c} ms" for c in sj_columns]
    ratio_cols = ["eager/backei", "compile/backei"] + [f"{c}/backei" for c in sj_columns]
    header = ["workload"] + cols + ratio_cols
    rows = []
    for name in all_workloads():
        r = results.get(name, {})
        b, version = best_backei(backei, name)
        others = [r.get("eager"), r.get("compile")] + [r.get(c) for c in sj_columns]
        ratios = [(v / b) if (v is not None and b) else None for v in others]
        rows.append([name, fmt(b, 4), version or "—"] + [fmt(v, 4) for v in others] + [fmt(v, 3) for v in ratios])
    return header, rows


def write_outputs(path, header, rows, notes):
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(md + [""] + [f"- {n}" for n in notes]) + "\n"
    print(text, flush=True)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        with open(os.path.splitext(path)[0] + ".csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
        log(f"wrote {path} and {os.path.splitext(path)[0]}.csv")


# ---------------------------------------------------------------- main

def default_sj_sites():
    return [s for s in ("/tmp/site", "/tmp/site-sj2") if os.path.isdir(os.path.join(s, "spikingjelly"))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backei-csv", default=None)
    ap.add_argument("--out", default=None, help="markdown table path (a .csv twin is written too)")
    ap.add_argument("--only", nargs="*", default=None, help="workload names (default: all)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--seconds-per-workload", type=float, default=3.0)
    ap.add_argument("--compile-timeout", type=float, default=60.0, help="per workload")
    ap.add_argument("--compile-budget", type=float, default=100.0, help="all compiles together")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--sj-site", action="append", default=None,
                    help="a --target folder holding spikingjelly (repeatable; default /tmp/site, /tmp/site-sj2)")
    ap.add_argument("--sj-timeout", type=float, default=90.0)
    ap.add_argument("--tf32", action="store_true")
    args = ap.parse_args()
    t_start = time.perf_counter()

    import torch
    import backei_torch as bt
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(4150)
    # every BackEI layer instance (and shape) is a recompile of its step cell: raise the limit
    try:
        import torch._dynamo
        for key in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, key):
                setattr(torch._dynamo.config, key, 256)
    except Exception as e:
        log(f"could not raise the dynamo recompile limit ({e}); compiled cells may fall back to eager")
    gpu = torch.cuda.get_device_name(0)
    log(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpu}, TF32 {'on' if args.tf32 else 'off'}")

    names = args.only or all_workloads()
    results = {n: {} for n in all_workloads()}
    notes = [f"{gpu}, torch {torch.__version__}, fp32 (TF32 {'on' if args.tf32 else 'off'}), "
             f"B = {BATCH}, T = {STEPS}; medians of CUDA-event times; ratios = PyTorch / backei"]

    # 1. eager: every workload first, so the essentials land even if compiling runs long
    for name in names:
        try:
            ms, n = run_eager(torch, bt, name, args)
            results[name]["eager"] = ms
            log(f"eager    {name:38s} {ms:10.3f} ms  ({n} reps)")
        except Exception as e:
            log(f"eager    {name}: FAILED {type(e).__name__}: {e}")
            traceback.print_exc()
        torch.cuda.empty_cache()

    # 2. SpikingJelly, in subprocesses (plain layer only)
    sj_columns = []
    if PLAIN in names:
        for site in args.sj_site or default_sj_sites():
            try:
                r = run_spikingjelly(site, args)
                col = f"SJ {r['version']} {r['backend']}"
                sj_columns.append(col)
                results[PLAIN][col] = r["ms"]
                log(f"sj       {PLAIN:38s} {r['ms']:10.3f} ms  ({col}, firing rate {r['firing_rate']:.3f})")
            except Exception as e:
                log(f"sj       {site}: FAILED {type(e).__name__}: {e}")
        if not sj_columns:
            notes.append("SpikingJelly: not measured (no site with spikingjelly, or it failed; see the log)")

    # 3. torch.compile of the step cells, time-boxed per workload and in total
    if not args.no_compile:
        budget_end = time.perf_counter() + args.compile_budget
        for name in names:
            left = budget_end - time.perf_counter()
            if left < 5:
                log(f"compile  {name}: skipped (compile budget of {args.compile_budget:.0f} s spent)")
                continue
            try:
                ms, n, cs = run_compiled(torch, bt, name, args, left)
                results[name]["compile"] = ms
                log(f"compile  {name:38s} {ms:10.3f} ms  ({n} reps, first calls {cs:.1f} s)")
            except CompileTimeout:
                log(f"compile  {name}: skipped, compiling took longer than the time box")
            except Exception as e:
                log(f"compile  {name}: FAILED {type(e).__name__}: {e}")
                traceback.print_exc()
            torch.cuda.empty_cache()
        notes.append("compile = torch.compile of each BackEI layer's per-step cell (default mode); "
                     "the loop over T is eager Python")

    backei = {}
    if args.backei_csv:
        try:
            backei = read_backei_csv(args.backei_csv)
            missing = [n for n in names if n not in backei]
            if missing:
                notes.append(f"not in {os.path.basename(args.backei_csv)}: {', '.join(missing)}")
        except Exception as e:
            log(f"backei csv {args.backei_csv}: FAILED {e}")
    header, rows = build_table(results, backei, sj_columns)
    notes.append(f"total run time {time.perf_counter() - t_start:.0f} s")
    write_outputs(args.out, header, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
