#!/usr/bin/env bash
# Runs on the GPU machine (the `device` tool) from the repository root, with diffusers' and
# torchao's wheels in .device/wheels/ (diffusers-0.42.1, torchao-0.18.0; installed with --no-deps
# on the machine's own PyTorch). Issue 30's peers, to be timed in the same lease as Parallax's
# runs (scripts/device-targets.sh): diffusers' FluxTransformer2DModel at FLUX.1-dev's config with
# random bf16 weights, one denoising step (scripts/flux-peer.py), eager, under torch.compile, and
# with torchao's float8 dynamic rowwise quantisation + torch.compile. Each mode in its own python
# process under its own timeout (torchao's config also changes inductor's settings process-wide).
# Compile times: the whole bf16 model 1-2 minutes (earlier leases); on an H100 (2026-12-07) the
# whole FP8 model 375 s to its first step (coordinate-descent tuning), past the default limits;
# with PEER_ARGS=--regional the FP8 mode's first step came after 139 s, bf16's after 8.5 s.
# Output: $OUT/peers.jsonl (one JSON line per size and mode, an error line for a mode that died or
# ran out of time), $OUT/peers.log.
#   bash scripts/device-peers.sh                 # dev, 1024 px
#   SIZES="1024 2048" bash scripts/device-peers.sh   # adds 2048 px (about 6 more minutes)
#   PEER_ARGS=--schnell bash scripts/device-peers.sh # schnell's config (256 text tokens)
#   LIMITS="60 150 260"                           # seconds for eager, compile, fp8 (the default)
#   MODES="fp8"                                   # only these modes, in this order
#   PEER_ARGS=--regional                          # compile the repeated blocks only: a short
#                                                 # compile, and on 2026-12-07 the faster FP8 peer
#                                                 # (103.3 ms a step against 111.3 whole-model)
#   MODES=fp8 LIMITS="10 10 560"                  # the whole FP8 model's compile, alone in a call
set -uo pipefail
out=${OUT:-/tmp/parallax-out}
mkdir -p "$out"
source .device/gpu-env.sh
log="$out/peers.log"
jsonl="$out/peers.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv | tee -a "$log"
python3 -m pip install --no-index --no-deps --quiet .device/wheels/*.whl >> "$log" 2>&1
echo "wheels rc=$?" | tee -a "$log"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'diffusers', diffusers.__version__)" 2>&1 | tee -a "$log"
python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -3 | tee -a "$log"

# peer SIZE MODE LIMIT: one mode of flux-peer.py in its own process; its JSON line, or an error
# line saying how it ended, appended to peers.jsonl.
peer() {
    local size=$1 mode=$2 limit=$3
    local t0; t0=$(date +%s)
    # shellcheck disable=SC2086
    timeout --kill-after=15 "$limit" python3 scripts/flux-peer.py --size "$size" --modes "$mode" \
        --repeats 10 --warmup 3 ${PEER_ARGS:-} > /tmp/peer.out 2>> "$log"
    local rc=$?
    python3 - "$size" "$mode" "$rc" "$(( $(date +%s) - t0 ))" "$jsonl" <<'PY' | tee -a "$log"
import json, sys
size, mode, rc, wall, path = sys.argv[1:6]
lines = []
for l in open("/tmp/peer.out"):
    try:
        lines.append(json.loads(l))
    except ValueError:
        pass
if not lines:
    why = "timed out" if rc in ("124", "137") else "ended without a result"
    lines = [{"peer": "diffusers", "mode": mode, "size": int(size), "error": f"{why} (rc {rc})"}]
with open(path, "a") as f:
    for v in lines:
        v["rc"], v["process_wall_s"] = int(rc), int(wall)
        f.write(json.dumps(v) + "\n")
        print(v.get("model"), v.get("mode"), v.get("size"), "rc", rc, "wall", wall, "s",
              "median", v.get("step_ms_median"), "min", v.get("step_ms_min"),
              "peak_gib", v.get("peak_gib"), "weights_gib", v.get("weights_gib"),
              "first_call_s", v.get("first_call_s"), "error", v.get("error"))
PY
}
declare -A limit # seconds per mode
read -r 'limit[eager]' 'limit[compile]' 'limit[fp8]' <<< "${LIMITS:-60 150 260}"
for size in ${SIZES:-1024}; do
    for mode in ${MODES:-eager compile fp8}; do
        if [[ -n ${limit[$mode]:-} ]]; then
            peer "$size" "$mode" "${limit[$mode]}"
        else
            echo "unknown mode $mode (eager, compile, fp8)" | tee -a "$log"
        fi
    done
done
