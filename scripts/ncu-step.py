#!/usr/bin/env python3
"""One denoising step's kernels out of a Nsight Compute CSV (scripts/device-ncu.sh).

The CSV holds every kernel of a run (random weights drawn, text encoders, steps, decode). A step
is found by its attention calls: the attention kernels come in groups of one per block, so the
last group is taken, widened to the step's first kernel (the timestep embedding, after the last
non-step kernel) and its last (the final layer, before the scheduler's update). Prints the step's
GPU time by kernel class.
  python3 scripts/ncu-step.py FILE.csv [--blocks N] [--before K] [--after K]
--before/--after: kernels kept before the group's first attention call and after its last
(default 14 and 12: the time embedding and modulations before, the last block's tail after).
"""
import argparse
import collections
import csv


def load(path):
    rows = [line for line in open(path) if line.startswith('"')]
    out = []
    for r in csv.DictReader(rows):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = float(r["Metric Value"].replace(",", ""))
        scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(r.get("Metric Unit"), 1e-6)
        out.append((r["Kernel Name"], v * scale))
    return out


def klass(name):
    if name.startswith("nvjet") or "gemm" in name.lower() or "cublasLt" in name:
        return "GEMM, FP8 (cuBLASLt)" if "qq" in name else "GEMM, bf16 (cuBLASLt)"
    return name.split("<")[0][:60]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--before", type=int, default=14)
    ap.add_argument("--after", type=int, default=12)
    a = ap.parse_args()
    k = load(a.csv)
    attn = [i for i, (n, _) in enumerate(k) if "flash" in n or "fmha" in n]
    if not attn:
        raise SystemExit("no attention kernels in the CSV")
    groups, g = [], [attn[0]]
    for i in attn[1:]:
        if i - g[-1] > 200:
            groups.append(g)
            g = [i]
        else:
            g.append(i)
    groups.append(g)
    g = groups[-1]
    lo, hi = max(0, g[0] - a.before), min(len(k), g[-1] + a.after)
    tot, cnt = collections.defaultdict(float), collections.Counter()
    for n, t in k[lo:hi]:
        tot[klass(n)] += t
        cnt[klass(n)] += 1
    s = sum(tot.values())
    print(f"one step: {len(g)} attention calls, {hi - lo} kernels, {s:.2f} ms GPU time")
    for n, t in sorted(tot.items(), key=lambda x: -x[1]):
        if t >= 0.05:
            print(f"  {t:8.2f} ms {100 * t / s:5.1f}% {cnt[n]:5d}x  {n}")


if __name__ == "__main__":
    main()
