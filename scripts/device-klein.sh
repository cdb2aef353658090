#!/usr/bin/env bash
# Runs on the GPU machine (the `device` tool), from the repository root, with the CUDA build in
# .device/ and diffusers' wheel in .device/wheels/: FLUX.2 klein 4B and 9B with random weights,
# whole images by phase (`parallax dev bench-klein`: Qwen3 at 512 tokens, 4 distilled steps or
# Base steps with true CFG, decode) and, in the same lease, diffusers' Flux2Transformer2DModel per
# step, eager and under torch.compile (scripts/klein-peer.py). Output: $OUT/klein.jsonl,
# $OUT/peer.jsonl, $OUT/klein.log.
set -uo pipefail
out=${OUT:-/tmp/parallax-out}
mkdir -p "$out"
source .device/gpu-env.sh
bin=/tmp/pbin/parallax
mkdir -p /tmp/pbin
xz -dc .device/parallax.xz > "$bin" && chmod +x "$bin"
log="$out/klein.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
for m in klein-4b klein-9b; do
    timeout 200 "$bin" dev bench-klein --device cuda --model "random:$m" --size 1024 --steps 4 \
        --runs 5 >> "$out/klein.jsonl" 2>> "$log"
    echo "$m 1024 distilled rc=$?" | tee -a "$log"
done
timeout 150 "$bin" dev bench-klein --device cuda --model random:klein-4b --size 2048 --steps 4 \
    --runs 3 >> "$out/klein.jsonl" 2>> "$log"
echo "klein-4b 2048 rc=$?" | tee -a "$log"
timeout 150 "$bin" dev bench-klein --device cuda --model random:klein-4b --size 1024 --steps 28 \
    --cfg 4 --runs 2 >> "$out/klein.jsonl" 2>> "$log"
echo "klein-4b base cfg rc=$?" | tee -a "$log"
tail -n 20 "$out/klein.jsonl" | python3 -c "
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    if 'total_ms_median' in r: print('ours', r)
" | tee -a "$log"
python3 -m pip install --no-index --no-deps --quiet .device/wheels/*.whl >> "$log" 2>&1
python3 -c "import diffusers; print('diffusers', diffusers.__version__)" >> "$log" 2>&1
timeout 240 python3 scripts/klein-peer.py --models 4b,9b --repeats 10 >> "$out/peer.jsonl" 2>> "$log"
echo "peer eager rc=$?" | tee -a "$log"
timeout 300 python3 scripts/klein-peer.py --models 4b --repeats 10 --compile >> "$out/peer.jsonl" 2>> "$log"
echo "peer compile rc=$?" | tee -a "$log"
cat "$out/peer.jsonl" | tee -a "$log"
