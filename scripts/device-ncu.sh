#!/usr/bin/env bash
# Runs on the GPU machine (the `device` tool) from the repository root, with the build from
# scripts/device-pack.sh in .device/: per-kernel GPU time (Nsight Compute, one metric) of one
# autoencoder decode and of transformer steps, summed by kernel name, largest first.
# Logs and tables go to $OUT.
#   bash scripts/device-ncu.sh [vae|step|fp8|klein|both] [width]   (default: both 1024)
# step: FLUX.1-dev random weights, STEPS (default 2) steps + text + decode in bf16; fp8: the same with
# --precision fp8; klein: FLUX.2 klein 4B random weights, STEPS (default 2) steps + Qwen3 + decode (bench-klein).
# NCU_CLOCK=none times kernels at the clocks the GPU runs at (Nsight Compute locks them to base
# clocks by default), to compare a step's kernel time with its wall time.
set -uo pipefail
out=${OUT:-/tmp/parallax-out}
mkdir -p "$out"
source .device/gpu-env.sh
bin=.device/parallax
if [[ ! -x $bin && -f .device/parallax.xz ]]; then
    bin=/tmp/pbin/parallax; mkdir -p /tmp/pbin
    xz -dc .device/parallax.xz > "$bin" && chmod +x "$bin"
fi
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
    timeout 300 "$bin" bench-vae --device cuda --width "$w" --runs 3 --warmup 1 \
        > "$out/vae-$w.json" 2> "$out/vae-$w.err"
    echo "bench-vae rc=$?"; grep -E '"median"|stages|level|mid|out"|peak_alloc' "$out/vae-$w.json"
    timeout 250 ncu --clock-control ${NCU_CLOCK:-base} --metrics gpu__time_duration.sum --csv \
        "$bin" bench-vae --device cuda --width "$w" --runs 1 --warmup 0 \
        > "$out/ncu-vae-$w.csv" 2> "$out/ncu-vae-$w.err"
    echo "ncu vae rc=$?"
    summarise "$out/ncu-vae-$w.csv" "autoencoder decode ${w}px (two decodes: timed + staged)" | tee "$out/ncu-vae-$w.txt"
fi
if [[ $what == fp8 ]]; then
    timeout 250 ncu --clock-control ${NCU_CLOCK:-base} --metrics gpu__time_duration.sum --csv \
        "$bin" bench --device cuda --model random:dev --width "$w" --height "$w" --precision fp8 \
        --steps ${STEPS:-2} --runs 1 --warmup 0 > "$out/ncu-fp8-$w.csv" 2> "$out/ncu-fp8-$w.err"
    echo "ncu fp8 rc=$?"
    summarise "$out/ncu-fp8-$w.csv" "dev FP8 ${w}px, ${STEPS:-2} steps + text + decode" | tee "$out/ncu-fp8-$w.txt"
fi
if [[ $what == klein ]]; then
    timeout 250 ncu --clock-control ${NCU_CLOCK:-base} --metrics gpu__time_duration.sum --csv \
        "$bin" dev bench-klein --device cuda --model random:klein-4b --size "$w" --steps ${STEPS:-2} \
        --runs 1 > "$out/ncu-klein-$w.csv" 2> "$out/ncu-klein-$w.err"
    echo "ncu klein rc=$?"
    summarise "$out/ncu-klein-$w.csv" "klein 4B ${w}px, ${STEPS:-2} steps + Qwen3 + decode" | tee "$out/ncu-klein-$w.txt"
fi
if [[ $what == step || $what == both ]]; then
    timeout 250 ncu --clock-control ${NCU_CLOCK:-base} --metrics gpu__time_duration.sum --csv \
        "$bin" bench --device cuda --model random:dev --width "$w" --height "$w" \
        --steps ${STEPS:-2} --runs 1 --warmup 0 > "$out/ncu-step-$w.csv" 2> "$out/ncu-step-$w.err"
    echo "ncu step rc=$?"
    summarise "$out/ncu-step-$w.csv" "dev ${w}px, ${STEPS:-2} steps + text + decode" | tee "$out/ncu-step-$w.txt"
fi
