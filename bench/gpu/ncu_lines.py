#!/usr/bin/env python3
"""Where a kernel's time goes, per line of its CUDA source: Nsight Compute's per-instruction
samples joined with the line table of the very CUBIN that ran.

    python3 bench/gpu/ncu_lines.py SASS_CSV CUBIN_DIR [--top N] [--source-dir cuda]

SASS_CSV: `ncu --import R.ncu-rep --page source --csv --print-source sass` of one kernel (the
session script's `profile` stage writes one per case into results.tgz, and the CUBINs that
kernel came from — compiled on the GPU machine by its NVRTC, with `-lineinfo`, which every module
gets (src/gpu/kernels.rs) — into results.tgz's ncu/cubins/). The kernel's name is on the CSV's
first line; the CUBIN holding that function is found in CUBIN_DIR and disassembled with
`nvdisasm --print-line-info` (pip nvidia-cuda-nvdisasm: found next to the python running this, or
on PATH). Instructions are matched by their offset in the function; the opcodes at each offset
must agree, else the CUBIN is not the one that was profiled and the script stops.

Prints, per source line (the innermost line of inlined code, as the line table gives it): the
share of warp-state samples (where warps waited), of executed warp instructions, the HMMA, global
and shared loads among them, and the two main stall reasons; then a summary per file.
"""
import argparse
import collections
import csv
import os
import re
import shutil
import subprocess
import sys


def find_nvdisasm():
    # the pip wheel's (nvidia/*/bin/nvdisasm in this python's site-packages), else PATH's
    import glob
    for prefix in {sys.prefix, sys.base_prefix, os.path.expanduser("~/.local")}:
        for hit in sorted(glob.glob(os.path.join(prefix, "lib", "python3*", "site-packages", "nvidia", "*", "bin", "nvdisasm"))):
            return hit
    return shutil.which("nvdisasm")


def read_ncu(path):
    rows = list(csv.reader(open(path, newline="")))
    if len(rows) < 3 or not rows[0] or rows[0][0] != "Kernel Name":
        sys.exit(f"{path}: not an ncu source-page CSV (its first line must name the kernel)")
    kernel = rows[0][1]
    hdr = rows[1]
    col = {h: i for i, h in enumerate(hdr)}
    for need in ("Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed"):
        if need not in col:
            sys.exit(f"{path}: no column {need!r}")
    stall_cols = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    instrs = []
    base = None
    for r in rows[2:]:
        if len(r) < len(hdr) - 1 or not r[0].startswith("0x"):
            continue
        addr = int(r[0], 16)
        base = addr if base is None else base
        num = lambda h: int(float(r[col[h]] or 0))
        instrs.append({
            "off": addr - base,
            "sass": r[col["Source"]].strip(),
            "samples": num("Warp Stall Sampling (All Samples)"),
            "executed": num("Instructions Executed"),
            "stalls": {h[6:]: num(h) for h in stall_cols},
        })
    return kernel, instrs


def opcode(sass):
    s = re.sub(r"^@!?U?P\w+\s+", "", sass.strip())
    return s.split(" ")[0].split(".")[0].rstrip(";")


def line_table(nvdisasm, cubin_dir, kernel):
    """{offset: (file, line), ...} and {offset: opcode} of `kernel` in the CUBIN that holds it."""
    cubins = sorted(os.path.join(cubin_dir, f) for f in os.listdir(cubin_dir) if f.endswith(".cubin"))
    for path in cubins:
        with open(path, "rb") as f:
            if kernel.encode() not in f.read():
                continue
        out = subprocess.run([nvdisasm, "--print-line-info", "-c", path], capture_output=True, text=True).stdout
        lines, ops, inside, where = {}, {}, False, None
        for text in out.splitlines():
            m = re.match(r"\s*//-+ \.text\.(\S+)\s", text)
            if m:
                inside = m.group(1) == kernel
                continue
            if not inside:
                continue
            m = re.search(r'//## File "([^"]+)", line (\d+)', text)
            if m:
                where = (os.path.basename(m.group(1)), int(m.group(2)))
                continue
            m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$", text)
            if m:
                off = int(m.group(1), 16)
                lines[off] = where
                ops[off] = opcode(m.group(2))
        if ops:
            return path, lines, ops
    sys.exit(f"no CUBIN in {cubin_dir} holds {kernel}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("cubin_dir")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--source-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "cuda"))
    a = ap.parse_args()
    kernel, instrs = read_ncu(a.csv)
    nvdisasm = find_nvdisasm()
    if not nvdisasm:
        sys.exit("nvdisasm not found: pip install nvidia-cuda-nvdisasm")
    path, lines, ops = line_table(nvdisasm, a.cubin_dir, kernel)
    matched = sum(1 for i in instrs if ops.get(i["off"]) == opcode(i["sass"]))
    if matched < 0.99 * len(instrs):
        sys.exit(f"{path}: only {matched} of {len(instrs)} profiled instructions have the CUBIN's opcode at their offset: not the CUBIN that ran")
    tot_s = sum(i["samples"] for i in instrs) or 1
    tot_e = sum(i["executed"] for i in instrs) or 1
    per = collections.defaultdict(lambda: {"samples": 0, "executed": 0, "ops": collections.Counter(), "stalls": collections.Counter()})
    for i in instrs:
        p = per[lines.get(i["off"]) or ("?", 0)]
        p["samples"] += i["samples"]
        p["executed"] += i["executed"]
        p["ops"][opcode(i["sass"])] += i["executed"]
        p["stalls"].update(i["stalls"])
    sources = {}

    def text_of(f, n):
        if f not in sources:
            try:
                sources[f] = open(os.path.join(a.source_dir, f)).read().splitlines()
            except OSError:
                sources[f] = []
        src = sources[f]
        return src[n - 1].strip()[:90] if 0 < n <= len(src) else ""

    print(f"{kernel}: {len(instrs)} instructions, {tot_e:,} warp instructions executed, {tot_s:,} samples (CUBIN {os.path.basename(path)})")
    print(f"{'samples':>8} {'executed':>8} {'HMMA':>5} {'LDG':>5} {'LDS':>5}  {'stalls':<26} line")
    for (f, n), p in sorted(per.items(), key=lambda kv: -kv[1]["samples"])[: a.top]:
        e = max(p["executed"], 1)
        share = lambda *names: sum(p["ops"][x] for x in names) / e
        stalls = ", ".join(f"{k} {v / max(p['samples'], 1):.0%}" for k, v in p["stalls"].most_common(2))
        print(f"{p['samples'] / tot_s:8.1%} {p['executed'] / tot_e:8.1%} {share('HMMA'):5.0%} {share('LDG'):5.0%} {share('LDS', 'LDSM'):5.0%}  {stalls:<26} {f}:{n}  {text_of(f, n)}")
    files = collections.Counter()
    for (f, _), p in per.items():
        files[f] += p["samples"]
    print("per file: " + ", ".join(f"{f} {s / tot_s:.0%}" for f, s in files.most_common()))


if __name__ == "__main__":
    main()
