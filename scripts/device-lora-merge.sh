#!/usr/bin/env bash
# Runs on the GPU machine (the `device` tool), from the repository root, with the CUDA build in
# .device/: FLUX.1-dev's step (random weights, 1024 px, bf16) with no LoRA, one rank-16 LoRA beside
# the products, the same merged into the weights (`--lora-merge`), and three merged; with the peak
# GPU memory. Output: $OUT/merge.jsonl, $OUT/merge.log.
set -uo pipefail
out=${OUT:-/tmp/parallax-out}
mkdir -p "$out"
source .device/gpu-env.sh
bin=/tmp/pbin/parallax
mkdir -p /tmp/pbin
xz -dc .device/parallax.xz > "$bin" && chmod +x "$bin"
log="$out/merge.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
d=/tmp/loras
mkdir -p $d
for s in 1 2 3; do
    "$bin" dev random-lora --size dev --rank 16 --seed $s $d/r16-$s.safetensors >> "$log" 2>&1
done
run() {
    local name=$1
    shift
    timeout 200 "$bin" bench --device cuda --model random:dev --width 1024 --height 1024 \
        --steps 8 --runs 3 --warmup 1 --seed 1 "$@" > /tmp/b.json 2>> "$log"
    local rc=$?
    python3 - "$name" "$rc" <<'PY' | tee -a "$out/merge.jsonl"
import json, sys
name, rc = sys.argv[1:3]
try:
    v = json.load(open("/tmp/b.json"))
    print(json.dumps({"case": name, "rc": int(rc), "step_median": v["step_ms"]["median"],
                      "step_min": v["step_ms"]["min"], "step_max": v["step_ms"]["max"],
                      "queued_median": v["step_ms"].get("queued_median"),
                      "pool_peak_allocated_mib": v["gpu_pool_peak_mib"]["allocated"]}))
except Exception as e:
    print(json.dumps({"case": name, "rc": int(rc), "error": str(e)}))
PY
}
run none
run r16-beside --lora $d/r16-1.safetensors
run r16-merged --lora $d/r16-1.safetensors --lora-merge
run 3xr16-merged --lora $d/r16-1.safetensors --lora $d/r16-2.safetensors:0.7 --lora $d/r16-3.safetensors:-0.5 --lora-merge
