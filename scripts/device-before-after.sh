#!/usr/bin/env bash
# Runs on the GPU machine (the `device` tool), from the repository root: two CUDA builds of
# Parallax carried in .device/ (parallax-before.xz, parallax.xz), timed alternately in the same
# lease on random:dev at 1024 px (bf16 and FP8, 8 steps, 3 runs each, four rounds), after the new
# build's selfcheck. Logs in $OUT: selfcheck.log, before-after.log, before-after.jsonl.
set -uo pipefail
out=${OUT:-/tmp/parallax-out}
mkdir -p "$out" /tmp/pbin
source .device/gpu-env.sh
xz -dc .device/parallax-before.xz > /tmp/pbin/before && xz -dc .device/parallax.xz > /tmp/pbin/after
chmod +x /tmp/pbin/before /tmp/pbin/after
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/before-after.log"
timeout 180 /tmp/pbin/after dev selfcheck --device cuda > "$out/selfcheck.log" 2>&1
echo "selfcheck exit $?" | tee -a "$out/before-after.log"
tail -5 "$out/selfcheck.log" | tee -a "$out/before-after.log"
for round in 1 2 3 4; do
    for which in before after; do
        for prec in native fp8; do
            timeout 200 /tmp/pbin/$which bench --device cuda --model random:dev --width 1024 --height 1024 \
                --steps 8 --runs 3 --warmup 1 --precision $prec > /tmp/b.json 2> /tmp/b.err
            python3 - "$which" "$prec" "$round" "$out/before-after.jsonl" <<'PY' | tee -a "$out/before-after.log"
import json, sys
which, prec, rnd, path = sys.argv[1:5]
try:
    v = json.load(open("/tmp/b.json"))
    open(path, "a").write(json.dumps({"build": which, "precision": prec, "round": int(rnd), "step_ms": v["step_ms"], "total_ms": v["total_ms"]}) + "\n")
    print(f"round {rnd} {which} {prec}: step {v['step_ms']['median']:.2f} ms")
except Exception as e:
    print(f"round {rnd} {which} {prec}: no result: {e}: " + open('/tmp/b.err').read()[-300:])
PY
        done
    done
done
