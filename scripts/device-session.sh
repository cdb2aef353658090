#!/usr/bin/env bash
# Runs on the GPU machine (the `device` tool) from the repository root, with this session's CUDA
# build in .device/parallax.xz, the build before it in .device/before/parallax.xz and diffusers'
# wheel in .device/wheels/. One part per call (each fits the device tool's 10 minutes):
#   bash scripts/device-session.sh klein   selfcheck; klein 4B with SwiGLU fused and as separate
#                                          ops, FP8; 9B; one step kernel by kernel; diffusers peer
#   bash scripts/device-session.sh flux    selfcheck; FLUX.1-dev before/after (bf16, FP8, alternating), FP8
#                                          with its quantisation apart and with bf16 copies kept,
#                                          image-to-image at three strengths, cold start
#                                          (scripts/device-cold.sh, REPEATS=1)
# ROUNDS=1 SHORT=1 (flux): one before/after round and the FP8 variants only; COLD=0: no cold start. Logs and JSON lines
# in $OUT.
set -uo pipefail
out=${OUT:-/tmp/parallax-out}
mkdir -p "$out" /tmp/pbin
source .device/gpu-env.sh
xz -dc .device/parallax.xz > /tmp/pbin/parallax && chmod +x /tmp/pbin/parallax
b=/tmp/pbin/parallax
log="$out/session.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
# A JSON line's medians: `last NAME` prints the last JSON line of /tmp/r.json tagged NAME.
tag() {
    python3 - "$1" "$out/session.jsonl" <<'PY' | tee -a "$log"
import json, sys
name, path = sys.argv[1:3]
txt = open("/tmp/r.json").read().strip()
try:
    v = json.loads(txt)
except Exception:
    lines = [l for l in txt.splitlines() if l.startswith("{")]
    v = json.loads(lines[-1]) if lines else {"error": txt[-300:]}
v["name"] = name
open(path, "a").write(json.dumps(v) + "\n")
keys = ["total_ms_median", "step_ms_median", "text_ms_median", "decode_ms_median", "step_ms", "total_ms", "gpu_pool_peak_mib", "steps_run"]
print(name, {k: v[k] for k in keys if k in v})
PY
}
case ${1:-klein} in
klein)
    timeout 200 $b dev selfcheck --device cuda > "$out/selfcheck.log" 2>&1
    echo "selfcheck rc=$?" | tee -a "$log"
    grep -Ei "swiglu|fp8|FAIL|passed|error" "$out/selfcheck.log" | tail -20 | tee -a "$log"
    for round in 1 2; do
        for s in plain fused; do
            timeout 120 $b dev bench-klein --device cuda --model random:klein-4b --size 1024 \
                --steps 4 --runs 5 --swiglu $s > /tmp/r.json 2>> "$log"
            tag "klein4b-$s-r$round"
        done
    done
    timeout 120 $b dev bench-klein --device cuda --model random:klein-4b --size 1024 --steps 4 \
        --runs 5 --precision fp8 > /tmp/r.json 2>> "$log"
    tag klein4b-fused-fp8
    timeout 150 $b dev bench-klein --device cuda --model random:klein-9b --size 1024 --steps 4 \
        --runs 5 > /tmp/r.json 2>> "$log"
    tag klein9b-fused
    timeout 150 $b dev bench-klein --device cuda --model random:klein-9b --size 1024 --steps 4 \
        --runs 5 --precision fp8 > /tmp/r.json 2>> "$log"
    tag klein9b-fused-fp8
    STEPS=1 NCU_CLOCK=none OUT=$out/fused bash scripts/device-ncu.sh klein 1024 > /dev/null 2>&1
    python3 scripts/ncu-step.py "$out/fused/ncu-klein-1024.csv" | tee -a "$log"
    python3 -m pip install --no-index --no-deps --quiet .device/wheels/*.whl >> "$log" 2>&1
    timeout 200 python3 scripts/klein-peer.py --models 4b --repeats 10 --compile \
        >> "$out/peer.jsonl" 2>> "$log"
    echo "peer compile rc=$?" | tee -a "$log"
    timeout 100 python3 scripts/klein-peer.py --models 4b --repeats 10 >> "$out/peer.jsonl" 2>> "$log"
    echo "peer eager rc=$?" | tee -a "$log"
    cat "$out/peer.jsonl" | tee -a "$log"
    ;;
flux)
    timeout 120 $b dev selfcheck --device cuda > "$out/selfcheck.log" 2>&1
    echo "selfcheck rc=$?" | tee -a "$log"
    grep -Ei "ln_modulate|FAIL|passed" "$out/selfcheck.log" | tail -12 | tee -a "$log"
    xz -dc .device/before/parallax.xz > /tmp/pbin/before && chmod +x /tmp/pbin/before
    bench() { # name, binary, extra args: random:dev 1024 px, 8 steps, 3 runs after a warm-up
        local name=$1 bin=$2
        shift 2
        timeout 100 "$bin" bench --device cuda --model random:dev --width 1024 --height 1024 \
            --steps 8 --runs 3 --warmup 1 "$@" > /tmp/r.json 2>> "$log"
        tag "$name"
    }
    for round in $(seq 1 ${ROUNDS:-2}); do
        for prec in native fp8; do
            bench "dev-before-$prec-r$round" /tmp/pbin/before --precision $prec
            bench "dev-after-$prec-r$round" $b --precision $prec
            [[ $prec == fp8 ]] && PARALLAX_FUSED_FP8_QUANT=0 bench "dev-after-fp8-unfused-quant-r$round" $b --precision fp8
        done
    done
    PARALLAX_FP8_KEEP_BF16=1 bench dev-after-fp8-keep-bf16 $b --precision fp8
    [[ ${SHORT:-0} == 1 ]] && exit 0
    timeout 60 $b generate --device cuda --model random:dev --width 1024 --height 1024 --steps 2 \
        --quiet --out /tmp/src.png >> "$log" 2>&1
    for s in 1.0 0.6 0.3; do
        timeout 80 $b bench --device cuda --model random:dev --steps 28 --runs 2 --warmup 1 \
            --image /tmp/src.png --strength $s > /tmp/r.json 2>> "$log"
        tag "img2img-dev-28-strength-$s"
    done
    [[ ${COLD:-1} == 1 ]] && REPEATS=${REPEATS:-1} timeout 280 bash scripts/device-cold.sh bf16 fp8 2>&1 | tail -30 | tee -a "$log"
    ;;
esac
