#!/usr/bin/env bash
# Runs on the GPU machine (the `device` tool), from the repository root, with the CUDA build in
# .device/: the step time of FLUX.1-dev (random weights) at several token counts, bf16 and FP8,
# and `parallax dev profile` at 1024 and 2048 px: what the layout cost model (`parallax plan`)
# calibrates its compute term from. Everything lands in $OUT (cost.jsonl, cost.log, profile-*.log).
set -uo pipefail
out=${OUT:-/tmp/parallax-out}
mkdir -p "$out"
source .device/gpu-env.sh
bin=/tmp/pbin/parallax
mkdir -p /tmp/pbin
xz -dc .device/parallax.xz > "$bin" && chmod +x "$bin"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/cost.log"
for prec in native fp8; do
    for size in 512x256 512x512 1024x512 1024x1024 2048x1024 2048x2048; do
        w=${size%x*}
        h=${size#*x}
        steps=8
        [[ $size == 2048x2048 ]] && steps=4
        timeout 240 "$bin" bench --device cuda --model random:dev --width "$w" --height "$h" \
            --steps "$steps" --runs 3 --warmup 1 --precision "$prec" > /tmp/b.json 2> /tmp/b.err
        rc=$?
        python3 - "$prec" "$size" "$rc" <<'PY' | tee -a "$out/cost.log"
import json, sys
prec, size, rc = sys.argv[1:4]
try:
    v = json.load(open("/tmp/b.json"))
    v["precision"] = prec
    open(sys.argv[0] if False else "/tmp/b.line", "w").write(json.dumps(v) + "\n")
    print(f"{prec} {size}: step {v['step_ms']['median']:.2f} ms (min {v['step_ms']['min']:.2f}, max {v['step_ms'].get('max', float('nan')):.2f}), tokens {v.get('image_tokens', '?')}")
except Exception as e:
    open("/tmp/b.line", "w").write("")
    print(f"{prec} {size}: no result (rc {rc}): {e}; " + open('/tmp/b.err').read()[-300:])
PY
        cat /tmp/b.line >> "$out/cost.jsonl"
    done
done
for w in 1024 2048; do
    timeout 240 "$bin" profile --device cuda --width "$w" > "$out/profile-$w.log" 2>&1
done
