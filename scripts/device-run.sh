#!/usr/bin/env bash
# Runs on the GPU machine (the `device` tool), from the repository root, with the CUDA build
# carried in .device/ (see scripts/device-pack.sh): selfcheck, then benchmarks. Logs go to $OUT.
#   bash scripts/device-run.sh [selfcheck|bench|all] [extra bench args]
set -uo pipefail
what=${1:-all}
shift || true
out=${OUT:-/tmp/parallax-out}
mkdir -p "$out"
source .device/gpu-env.sh
bin=.device/parallax
chmod +x "$bin"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$out/gpu.txt"

if [[ $what == selfcheck || $what == all ]]; then
    RUST_LOG=info "$bin" selfcheck --device cuda 2>&1 | tee "$out/selfcheck.log"
fi

bench() { # name, then bench args
    local name=$1
    shift
    echo "== $name: parallax bench $*" | tee -a "$out/bench.log"
    "$bin" bench --device cuda "$@" > "$out/$name.json" 2> "$out/$name.err"
    local rc=$?
    tail -3 "$out/$name.err"
    python3 - "$out/$name.json" <<'PY' | tee -a "$out/bench.log"
import json, sys
try:
    v = json.load(open(sys.argv[1]))
except Exception as e:
    print("  no result:", e); sys.exit(0)
print(f"  {v['width']}x{v['height']} {v['steps']} steps {v['dtype']} attn={v['attention']}: "
      f"step {v['step_ms']['median']:.1f} ms (min {v['step_ms']['min']:.1f}), "
      f"{v['achieved_tflops']:.0f} TFLOP/s, floor {v['floor']['floor_ms']:.1f} ms -> x{v['floor']['ratio']:.2f}; "
      f"total {v['total_ms']['median']:.0f} ms, text {v['text_encode_ms_median']:.0f} ms, "
      f"vae {v['vae_decode_ms_median']:.0f} ms, gpu mem max {v['gpu_memory_used_max_mib']:.0f} MiB, load {v['load_ms']:.0f} ms")
PY
    return $rc
}

if [[ $what == bench || $what == all ]]; then
    bench dev1024_fused --model random:dev --width 1024 --height 1024 --steps 28 --runs 3 --warmup 1 "$@"
    PARALLAX_NO_FUSED_ATTENTION=1 bench dev1024_plain --model random:dev --width 1024 --height 1024 --steps 8 --runs 2 --warmup 1 "$@"
    bench dev2048_fused --model random:dev --width 2048 --height 2048 --steps 6 --runs 2 --warmup 1 "$@"
    bench schnell1024 --model random:schnell --width 1024 --height 1024 --steps 4 --runs 5 --warmup 1 "$@"
    "$bin" generate --device cuda --model random:dev --width 512 --height 512 --steps 4 --seed 3 \
        --prompt "a lighthouse" --quiet --out "$out/random-dev-512.png" 2>&1 | tail -1
fi
