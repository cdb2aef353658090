#!/usr/bin/env bash
# Runs on the GPU machine (the `device` tool) from the repository root: selfcheck with
# parallax(.xz), then the autoencoder decode (`parallax bench-vae`) at several sizes for each
# binary parallax*(.xz) in the bundle folder: the folder this script sits in when it holds
# gpu-env.sh (a copy of .device/ made by scripts/device-pack.sh), else .device/. Logs and JSON
# go to $OUT. Environment: SKIP_SELFCHECK=1, RUNS (default 3), VAE_TIMEOUT (s, default 240).
#   bash scripts/device-vae.sh [sizes...]        (default 1024 2048 4096)
set -uo pipefail
out=${OUT:-/tmp/parallax-out}
mkdir -p "$out" /tmp/pbin
here=$(cd "$(dirname "$0")" && pwd)
if [[ -f $here/gpu-env.sh ]]; then dir=$here; else dir=.device; fi
source "$dir/gpu-env.sh"
sizes=${*:-1024 2048 4096}
for f in "$dir"/parallax*; do
    name=$(basename "$f" .xz)
    if [[ $f == *.xz ]]; then
        python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$f" "/tmp/pbin/$name"
    else
        cp "$f" "/tmp/pbin/$name"
    fi
    chmod +x "/tmp/pbin/$name"
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$out/gpu.txt"
ldd /tmp/pbin/parallax | grep -E "cudnn|nccl|cublas" | tee -a "$out/gpu.txt"
if [[ ${SKIP_SELFCHECK:-0} != 1 ]]; then
    timeout 300 /tmp/pbin/parallax selfcheck --device cuda > "$out/selfcheck.log" 2>&1
    echo "selfcheck rc=$?: $(tail -1 "$out/selfcheck.log")"
    grep -E "FAIL|nccl|conv|upsampl|autoencoder" "$out/selfcheck.log"
fi
for w in $sizes; do
    for b in /tmp/pbin/parallax*; do
        n=$(basename "$b")
        timeout ${VAE_TIMEOUT:-240} "$b" bench-vae --device cuda --width "$w" --runs ${RUNS:-3} --warmup 1 \
            > "$out/vae-$n-$w.json" 2> "$out/vae-$n-$w.err"
        rc=$?
        python3 - "$out/vae-$n-$w.json" "$n" "$w" "$rc" "$out/vae-$n-$w.err" <<'PY'
import json, sys
path, n, w, rc, err = sys.argv[1:]
try:
    v = json.load(open(path))
    st = " ".join(f"{k} {x:.0f}" for k, x in v.get("stages_ms", {}).items())
    print(f"{n:>16} {w:>5}px {v['convolution']:>18}: decode {v['decode_ms']['median']:8.1f} ms "
          f"(min {v['decode_ms']['min']:.1f}), peak alloc {v['peak_allocated_mib']/1024:6.2f} GiB, "
          f"reserved {v['peak_reserved_mib']/1024:6.2f} GiB, weights {v['resident_before_mib']/1024:.2f} GiB | {st}")
except Exception as e:
    tail = open(err).read().strip().splitlines()[-2:]
    print(f"{n:>16} {w:>5}px: no result (rc {rc}): {' / '.join(tail)[:300]}")
PY
    done
done
