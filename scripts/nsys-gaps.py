#!/usr/bin/env python3
"""Where the GPU sits idle in a run (issue 30: do CUDA graphs pay?). Reads the CSV of
`nsys stats -r cuda_gpu_trace --format csv` (one row per kernel or copy, in ns) and prints the
GPU's busy time, the span from the first to the last row, and the idle gaps between rows bucketed
by length, with the gaps' total divided by the steps run (`--steps`).
    python3 scripts/nsys-gaps.py trace.csv --steps 12
Written 2026-12-06 for the next lease (no machine started for it that day): checked on a made-up
CSV only.
"""
import argparse
import csv
import sys

ap = argparse.ArgumentParser()
ap.add_argument("csv")
ap.add_argument("--steps", type=int, default=1)
a = ap.parse_args()
rows = []
with open(a.csv, newline="") as f:
    lines = [l for l in f if l.strip() and not l.startswith("Processing") and not l.startswith("NOTICE")]
for r in csv.DictReader(lines):
    start = r.get("Start (ns)") or r.get("Start")
    dur = r.get("Duration (ns)") or r.get("Duration")
    if start is None or dur is None:
        continue
    try:
        rows.append((int(float(start)), int(float(dur)), r.get("Name", "")))
    except ValueError:
        continue
if not rows:
    sys.exit("no rows with Start and Duration in " + a.csv)
rows.sort()
busy = 0
end = rows[0][0]
gaps = {"<10us": [0, 0], "10-100us": [0, 0], "0.1-1ms": [0, 0], "1-10ms": [0, 0], ">=10ms": [0, 0]}
for s, d, _ in rows:
    if s > end:
        g = s - end
        k = ("<10us" if g < 1e4 else "10-100us" if g < 1e5 else "0.1-1ms" if g < 1e6
             else "1-10ms" if g < 1e7 else ">=10ms")
        gaps[k][0] += 1
        gaps[k][1] += g
    if s + d > end:
        busy += s + d - max(s, end)
        end = s + d
span = end - rows[0][0]
print(f"rows {len(rows)}  span {span/1e6:.1f} ms  busy {busy/1e6:.1f} ms  idle {(span-busy)/1e6:.1f} ms")
for k, (n, t) in gaps.items():
    print(f"  gaps {k:>9}: {n:6d}  total {t/1e6:9.2f} ms  per step {t/1e6/a.steps:8.3f} ms")
small = sum(t for k, (n, t) in gaps.items() if k in ("<10us", "10-100us", "0.1-1ms"))
print(f"gaps under 1 ms per step (what a captured step could remove): {small/1e6/a.steps:.2f} ms")
