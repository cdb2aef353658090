#!/usr/bin/env bash
# One GPU call (device tool, `.device` carried; see scripts/device-pack.sh): the trained demo's
# prompt score and cache sweep on the GPU, selfcheck (FP8 quantiser and products
# included), then FLUX.1-dev-shaped steps in bf16 and FP8 (per-channel and per-tensor weight
# scales) at 1024 and 2048 px. Logs and JSON go to $OUT (stderr of every command into
# one errors.log: the device tool brings back at most 8 files).
#   bash scripts/device-fp8.sh [score] [selfcheck] [bench] [fp8score] [caches] [overhead] [fp8error]
#                              [budget] [full28]
#   (default: all; mind the device tool's 8 files back: name a few stages per call)
set -uo pipefail
out=${OUT:-/tmp/parallax-out}
mkdir -p "$out"
[[ -f .device/parallax.xz ]] && xz -d -f .device/parallax.xz
source .device/gpu-env.sh
bin=.device/parallax
chmod +x "$bin"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee -a "$out/calls.log"

run() { # name, then command
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$out/calls.log"
    local t0=$SECONDS
    echo "== $name" >> "$out/errors.log"
    "$@" > "$out/$name.out" 2>> "$out/errors.log"
    echo "   rc $? in $((SECONDS - t0)) s" | tee -a "$out/calls.log"
}
stages=${*:-score selfcheck bench fp8score caches overhead fp8error}
want() { [[ " $stages " == *" $1 "* ]]; }

want score && run score_gpu "$bin" score --device cuda --prompts 40 --thresholds 0,0.04,0.08,0.12,0.2
if want selfcheck; then
    run selfcheck env RUST_LOG=info "$bin" selfcheck --device cuda
    grep -E "fp8|FP8|passed|FAIL" "$out/selfcheck.out" | tee -a "$out/calls.log"
fi
want bench && for p in native fp8; do
    run "dev1024_$p" "$bin" bench --device cuda --model random:dev --width 1024 --height 1024 \
        --steps 12 --runs 2 --warmup 1 --precision "$p"
done
want bench && PARALLAX_FP8_WEIGHT_SCALE=tensor run dev1024_fp8_tensor "$bin" bench --device cuda --model random:dev \
    --width 1024 --height 1024 --steps 12 --runs 1 --warmup 1 --precision fp8
want bench && for p in native fp8; do
    run "dev2048_$p" "$bin" bench --device cuda --model random:dev --width 2048 --height 2048 \
        --steps 4 --runs 1 --warmup 1 --precision "$p"
done
# The memory budget: dev 1024 px within 24 GiB (the plan's choice, peak memory measured),
# the estimate for 16/24/48/80 GiB beside it; then 28 steps + text + decode, bf16 against FP8.
if want budget; then
    run memory_plan "$bin" memory --model random:dev --json
    for sz in 1024 2048; do
        run "budget24_$sz" env RUST_LOG=info "$bin" bench --device cuda --model random:dev --width $sz \
            --height $sz --steps 12 --runs 2 --warmup 1 --memory-budget 24
    done
fi
want full28 && for p in native fp8; do
    run "full28_1024_$p" "$bin" bench --device cuda --model random:dev --width 1024 --height 1024 \
        --steps 28 --runs 3 --warmup 1 --precision "$p"
done
want full28 && for p in native fp8; do
    run "full28_2048_$p" "$bin" bench --device cuda --model random:dev --width 2048 --height 2048 \
        --steps 28 --runs 1 --warmup 1 --precision "$p"
done
want fp8score && run score_gpu_fp8 "$bin" score --device cuda --prompts 40 --thresholds 0 --precision fp8
# Cache policies on the GPU: the policies' table on the trained demo (every preset), and what
# each policy costs on random:dev when it computes every step (settings that never reuse).
presets="dbcache:f=1,b=1,t=0.2,max=2,warmup=2;dbcache:f=1,b=1,t=0.3,max=3,warmup=2;dbcache:f=1,b=1,t=0.5,max=4,warmup=1,taylor=1"
presets+=";taylorseer:n=2,order=1,warmup=3;taylorseer:n=3,order=1,warmup=2;taylorseer:n=4,order=1,warmup=2"
presets+=";magcache:t=0.1,k=2,warmup=2;magcache:t=0.3,k=3,warmup=2;magcache:t=0.5,k=4,warmup=1"
want caches && run score_gpu_caches "$bin" score --device cuda --prompts 40 --thresholds 0,0.12,0.2,0.3 --caches "$presets"
if want overhead; then
    # MagCache needs a calibration of random:dev (written where the engine looks for it).
    run calibrate_dev "$bin" calibrate-magcache --device cuda --model random:dev --prompts 2 --steps 8
    for c in none fbcache:t=1e-9 dbcache:f=1,b=1,t=1e-9 taylorseer:n=1 magcache:t=1e-9; do
        run "overhead_${c%%:*}" "$bin" bench --device cuda --model random:dev --width 1024 --height 1024 \
            --steps 8 --runs 2 --warmup 1 --cache "$c"
    done
    python3 - "$out" <<'PY' | tee -a "$out/calls.log"
import json, sys, os, glob
for f in sorted(glob.glob(os.path.join(sys.argv[1], "overhead_*.out"))):
    try:
        v = json.load(open(f))
        print(f"{os.path.basename(f)}: {v['cache']} step {v['step_ms']['median']:.1f} ms (min {v['step_ms']['min']:.1f}), "
              f"total {v['total_ms']['median']:.0f} ms, steps {v['cache_steps']['pattern']}")
    except Exception as e:
        print(f, "no result:", e)
PY
fi
want fp8error && run fp8_error_dev "$bin" fp8-error --device cuda --model random:dev --width 1024 --height 1024 \
    --steps 28 --prompt "a lighthouse on a cliff at dawn" --seed 3
python3 - "$out" <<'PY' | tee -a "$out/calls.log"
import json, sys, os
out = sys.argv[1]
every = {}
for name in ["dev1024_native", "dev1024_fp8", "dev1024_fp8_tensor", "dev2048_native", "dev2048_fp8",
             "budget24_1024", "budget24_2048", "full28_1024_native", "full28_1024_fp8",
             "full28_2048_native", "full28_2048_fp8"]:
    try:
        path = os.path.join(out, name + ".out")
        v = json.load(open(path))
        every[name] = v
        os.remove(path)
        print(f"{name}: step {v['step_ms']['median']:.1f} ms (min {v['step_ms']['min']:.1f}), total "
              f"{v['total_ms']['median']:.0f} ms, text {v['text_encode_ms_median']:.0f} ms, vae "
              f"{v['vae_decode_ms_median']:.0f} ms, gpu mem max {v['gpu_memory_used_max_mib']:.0f} MiB, "
              f"pool peak {v.get('gpu_pool_peak_mib')}, weights {v.get('transformer_weights_mib', 0):.0f} MiB, "
              f"t5 {v.get('t5')}, dtype {v['dtype']}")
    except Exception as e:
        print(name, "no result:", e)
if every:
    json.dump(every, open(os.path.join(out, "bench.json"), "w"), indent=1)
PY
