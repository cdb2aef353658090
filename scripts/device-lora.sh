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
run none native
run r16 native --lora $d/r16a.safetensors
run r64 native --lora $d/r64.safetensors
run 3xr16 native --lora $d/r16a.safetensors --lora $d/r16b.safetensors:0.7 --lora $d/r16c.safetensors:-0.5
run none fp8
run r16 fp8 --lora $d/r16a.safetensors
python3 - "$out/lora.jsonl" <<'PY' | tee -a "$log"
import json, sys
for l in open(sys.argv[1]):
    v = json.loads(l)
    s = v.get("step_ms", {})
    print(v["case"], v["precision"], "rc", v["rc"], "step median", s.get("median"), "min", s.get("min"), "max", s.get("max"))
PY
# The same FLUX.1-dev step with the build from before the model-family refactor (issue 27), when
# carried as .device/parallax-before.xz: beside the `none` rows above, in the same lease.
if [[ -f .device/parallax-before.xz ]]; then
    xz -dc .device/parallax-before.xz > /tmp/pbin/parallax-before && chmod +x /tmp/pbin/parallax-before
    for round in 1; do
        for which in before; do
            b=$bin
            [[ $which == before ]] && b=/tmp/pbin/parallax-before
            for prec in native fp8; do
                timeout 200 "$b" bench --device cuda --model random:dev --width 1024 --height 1024 \
                    --steps 8 --runs 3 --warmup 1 --precision "$prec" --seed 1 > /tmp/ba.json 2>> "$log"
                python3 - "$which" "$prec" "$round" <<'PY' | tee -a "$out/before-after.jsonl"
import json, sys
which, prec, rnd = sys.argv[1:4]
try:
    v = json.load(open("/tmp/ba.json"))
    s = v["step_ms"]
    print(json.dumps({"build": which, "precision": prec, "round": int(rnd), "step_median": s["median"], "step_min": s["min"], "step_max": s.get("max")}))
except Exception as e:
    print(json.dumps({"build": which, "precision": prec, "round": int(rnd), "error": str(e)}))
PY
            done
        done
    done
fi
# FLUX.2 klein 4B through the image pipeline (`generate`), 1024 px, 4 steps.
timeout 120 "$bin" generate --model random:klein-4b --device cuda --width 1024 --height 1024 \
    --steps 4 --seed 1 --prompt "a red fox in fresh snow" --out "$out/klein-4b.png" >> "$log" 2>&1
echo "klein-4b generate rc=$?" | tee -a "$log"
