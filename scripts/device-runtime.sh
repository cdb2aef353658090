#!/usr/bin/env bash
# Runs on the GPU machine (the `device` tool) with the CUDA build carried in .device/ (see
# scripts/device-pack.sh): the runtime — the studio's engine path, without a window, through
# `parallax compare` — runs a sweep on cuda:0 (per-step events) and a data-parallel sweep on
# cuda:0,0, and every image is checked against `parallax generate`'s, file for file.
#   bash scripts/device-runtime.sh [model] [size]
set -uo pipefail
model=${1:-demo}
size=${2:-256}
out=${OUT:-/tmp/parallax-out}/$(echo "$model" | tr -c 'a-zA-Z0-9\n' '-')-$size
mkdir -p "$out/cli" "$out/rt" "$out/rtdp"
source .device/gpu-env.sh
bin=.device/parallax
chmod +x "$bin"
common=(--model "$model" --prompt "a lighthouse on a cliff at dawn" --seed 1 --width "$size" --height "$size")
status=0
"$bin" info --model "$model" --devices cuda --parallel auto | grep -E "layout|GPU"
for t in 0 0.08 0.2; do
    "$bin" generate --device cuda "${common[@]}" --cache-threshold "$t" --quiet \
        --out "$out/cli/t$t.png" 2>&1 | tail -1
done
"$bin" compare --device cuda "${common[@]}" --thresholds 0.08,0.2 --save "$out/rt" --events \
    > "$out/rt.json" 2> "$out/rt-events.log" || status=1
"$bin" compare --devices cuda:0,0 --dp 2 "${common[@]}" --thresholds 0.08,0.2 --save "$out/rtdp" \
    --events > "$out/rtdp.json" 2> "$out/rtdp-events.log" || status=1
tail -3 "$out/rt-events.log" "$out/rtdp-events.log"
grep -c "step " "$out/rt-events.log" | sed 's/^/cuda:0 sweep step events: /'
python3 - "$out/rt.json" "$out/rtdp.json" <<'PY'
import json, sys
for f in sys.argv[1:]:
    v = json.load(open(f))
    print(f.split("/")[-1], v["layout"], "wall %.0f ms" % v["wall_ms"])
    for r in v["images"]:
        print("  t=%s computed %s reused %s wall %.0f ms speedup %s psnr %s ssim %s" % (
            r["threshold"], r["steps_computed"], r["steps_reused"], r["wall_ms"],
            r["speedup"], r["psnr_db"], r["ssim"]))
PY
for dir in rt rtdp; do
    for t in 0 0.08 0.2; do
        if cmp -s "$out/$dir/compare-$t.png" "$out/cli/t$t.png"; then
            echo "SAME  $dir/compare-$t.png = cli/t$t.png"
        else
            echo "DIFF  $dir/compare-$t.png != cli/t$t.png"; status=1
        fi
    done
done
# A placement this machine cannot run is refused before loading, with the engine's message.
"$bin" generate --devices cuda:0,7 "${common[@]}" --out "$out/never.png" 2>&1 | tail -1
exit $status
