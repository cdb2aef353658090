#!/usr/bin/env bash
# Runs on the GPU machine (the `device` tool) with the CUDA build carried in .device/ (see
# scripts/device-pack.sh; the runtime_jobs example built beside it): the runtime — the studio's
# engine path, without a window — runs a generation on cuda:0 and a data-parallel compare sweep on
# cuda:0,0, and its images are checked against `parallax generate`'s, file for file.
#   bash scripts/device-runtime.sh [model] [size]
set -uo pipefail
model=${1:-demo}
size=${2:-256}
out=${OUT:-/tmp/parallax-out}
mkdir -p "$out/cli" "$out/rt"
source .device/gpu-env.sh
bin=.device/parallax
ex=.device/runtime_jobs
chmod +x "$bin" "$ex"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
common=(--model "$model" --prompt "a lighthouse on a cliff at dawn" --seed 1 --width "$size" --height "$size")
status=0
for t in 0 0.08 0.2; do
    "$bin" generate --device cuda "${common[@]}" --cache-threshold "$t" --quiet \
        --out "$out/cli/t$t.png" 2>&1 | tail -2
done
"$bin" generate --devices cuda:0,0 --dp 2 --images 1 "${common[@]}" --quiet \
    --out "$out/cli/dp.png" 2>&1 | tail -2
"$ex" --model "$model" --devices cuda:0 --sweep-devices cuda:0,0 --sweep-dp 2 --size "$size" \
    --thresholds 0.08,0.2 --out "$out/rt" 2>&1 | tee "$out/runtime-events.log" | grep -v "step image"
check() { # runtime image, CLI image
    if cmp -s "$1" "$2"; then echo "SAME  $1 = $2"; else echo "DIFF  $1 != $2"; status=1; fi
}
check "$out/rt/generate-0.png" "$out/cli/t0.png"
check "$out/rt/generate-0.png" "$out/cli/dp.png"
check "$out/rt/compare-0.png" "$out/cli/t0.png"
check "$out/rt/compare-0.08.png" "$out/cli/t0.08.png"
check "$out/rt/compare-0.2.png" "$out/cli/t0.2.png"
grep -c "step image" "$out/runtime-events.log" | sed 's/^/step events: /'
exit $status
