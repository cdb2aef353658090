#!/usr/bin/env bash
# Runs on the GPU machine (the `device` tool), from the repository root, with the CUDA build in
# .device/: LoRA overhead per step on FLUX.1-dev shapes (random weights, 1024 px): no LoRA, one
# rank-16 LoRA, one rank-64, three rank-16, in bf16 and with FP8 products (LoRA files made by
# `parallax dev random-lora`, on the blocks' products). Output: $OUT/lora.jsonl, $OUT/lora.log.
set -uo pipefail
out=${OUT:-/tmp/parallax-out}
mkdir -p "$out"
source .device/gpu-env.sh
bin=/tmp/pbin/parallax
mkdir -p /tmp/pbin
xz -dc .device/parallax.xz > "$bin" && chmod +x "$bin"
log="$out/lora.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
d=/tmp/loras
mkdir -p $d
"$bin" dev random-lora --size dev --rank 16 --seed 1 $d/r16a.safetensors >> "$log" 2>&1
"$bin" dev random-lora --size dev --rank 16 --seed 2 $d/r16b.safetensors >> "$log" 2>&1
"$bin" dev random-lora --size dev --rank 16 --seed 3 $d/r16c.safetensors >> "$log" 2>&1
"$bin" dev random-lora --size dev --rank 64 --seed 4 $d/r64.safetensors >> "$log" 2>&1
run() {
    local name=$1 prec=$2
    shift 2
    timeout 200 "$bin" bench --device cuda --model random:dev --width 1024 --height 1024 \
        --steps 8 --runs 3 --warmup 1 --precision "$prec" --seed 1 "$@" > /tmp/b.json 2>> "$log"
    local rc=$?
    python3 - "$name" "$prec" "$rc" <<'PY' | tee -a "$out/lora.jsonl"
import json, sys
name, prec, rc = sys.argv[1:4]
try:
    v = json.load(open("/tmp/b.json"))
except Exception as e:
    v = {"error": str(e)}
v.update({"case": name, "precision": prec, "rc": int(rc)})
print(json.dumps(v))
PY
}
for prec in native fp8; do
    run none $prec
    run r16 $prec --lora $d/r16a.safetensors
    run r64 $prec --lora $d/r64.safetensors
    run 3xr16 $prec --lora $d/r16a.safetensors --lora $d/r16b.safetensors:0.7 --lora $d/r16c.safetensors:-0.5
done
python3 - "$out/lora.jsonl" <<'PY' | tee -a "$log"
import json, sys
for l in open(sys.argv[1]):
    v = json.loads(l)
    s = v.get("step_ms", {})
    print(v["case"], v["precision"], "rc", v["rc"], "step median", s.get("median"), "min", s.get("min"), "max", s.get("max"))
PY
