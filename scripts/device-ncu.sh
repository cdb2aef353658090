#!/usr/bin/env bash
# Runs on the GPU machine (the `device` tool) from the repository root, with the build from
# scripts/device-pack.sh in .device/: per-kernel GPU time (Nsight Compute, one metric) of one
# autoencoder decode and of transformer steps, summed by kernel name, largest first.
# Logs and tables go to $OUT.
#   bash scripts/device-ncu.sh [vae|step|both] [width]   (default: both 1024)
# NCU_CLOCK=none times kernels at the clocks the GPU runs at (Nsight Compute locks them to base
# clocks by default), to compare a step's kernel time with its wall time.
set -uo pipefail
out=${OUT:-/tmp/parallax-out}
mkdir -p "$out"
source .device/gpu-env.sh
chmod +x .device/parallax
what=${1:-both}
w=${2:-1024}
summarise() { # csv, title
    python3 - "$1" "$2" <<'PY'
import csv, sys, collections
path, title = sys.argv[1:]
rows = [l for l in open(path) if l.startswith('"')]
tot = collections.defaultdict(float); cnt = collections.Counter()
for r in csv.DictReader(rows):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    v = float(r["Metric Value"].replace(",", ""))
    unit = r.get("Metric Unit", "nsecond")
    scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(unit, 1e-6)
    name = r["Kernel Name"][:110]
    tot[name] += v * scale; cnt[name] += 1
s = sum(tot.values())
print(f"== {title}: {sum(cnt.values())} kernels, {s:.1f} ms GPU time")
for name, t in sorted(tot.items(), key=lambda x: -x[1])[:40]:
    print(f"{t:9.2f} ms {100*t/s:5.1f}% {cnt[name]:6d}x  {name}")
PY
}
if [[ $what == vae || $what == both ]]; then
    timeout 300 .device/parallax bench-vae --device cuda --width "$w" --runs 3 --warmup 1 \
        > "$out/vae-$w.json" 2> "$out/vae-$w.err"
    echo "bench-vae rc=$?"; grep -E '"median"|stages|level|mid|out"|peak_alloc' "$out/vae-$w.json"
    timeout 250 ncu --clock-control ${NCU_CLOCK:-base} --metrics gpu__time_duration.sum --csv \
        .device/parallax bench-vae --device cuda --width "$w" --runs 1 --warmup 0 \
        > "$out/ncu-vae-$w.csv" 2> "$out/ncu-vae-$w.err"
    echo "ncu vae rc=$?"
    summarise "$out/ncu-vae-$w.csv" "autoencoder decode ${w}px (two decodes: timed + staged)" | tee "$out/ncu-vae-$w.txt"
fi
if [[ $what == step || $what == both ]]; then
    timeout 250 ncu --clock-control ${NCU_CLOCK:-base} --metrics gpu__time_duration.sum --csv \
        .device/parallax bench --device cuda --model random:dev --width "$w" --height "$w" \
        --steps 2 --runs 1 --warmup 0 > "$out/ncu-step-$w.csv" 2> "$out/ncu-step-$w.err"
    echo "ncu step rc=$?"
    summarise "$out/ncu-step-$w.csv" "dev ${w}px, 2 steps + text + decode" | tee "$out/ncu-step-$w.txt"
fi
