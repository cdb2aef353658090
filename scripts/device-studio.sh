#!/usr/bin/env bash
# The studio driving a GPU, on the device tool's GPU machine: the `cuda` build
# of the studio (scripts/device-pack.sh with PARALLAX_CUDA_FEATURES=studio,cuda) in a real window
# under Xvfb, with Xvfb, the Vulkan loader and Mesa's lavapipe carried as Debian packages unpacked
# into a folder (.gl/glroot.tar.xz, made by scripts/device-gl-pack.sh). The window is drawn by the
# NVIDIA Vulkan driver when it can present to Xvfb, else by lavapipe on the CPU; the engine runs on
# the GPU either way. Runs, each its own studio process on random:dev at 1024 px:
#   1. Generate: a batch of 4 images (the first is the warm-up), previews on; screenshot + stats.
#   2. Compare sweep, bf16: First Block Cache at 4 thresholds, DBCache and TaylorSeer at their
#      balanced presets, 3 timing rounds (MagCache needs a calibration random:dev does not have).
#   3. The same sweep with FP8 on.
# and the CLI's time for the same images (`bench`, same steps and size) in between, so the studio's
# overhead is read against the CLI in one lease. Everything lands in $OUT.
#   (carry .device and .gl) bash scripts/device-studio.sh [STEPS]
set -uo pipefail
steps=${1:-12}
out=${OUT:-/tmp/out}
mkdir -p "$out"
log=$out/studio-gpu.log
exec > >(tee -a "$log") 2>&1
bin=$PWD/.device/parallax
# The binary travels xz-compressed (the carried tree is limited to 64 MiB).
if [[ ! -x $bin && -f $bin.xz ]]; then
    python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$bin.xz" "$bin"
    chmod +x "$bin"
fi
[[ -x $bin ]] || { echo "no .device/parallax: build it with scripts/device-pack.sh"; exit 1; }
source .device/gpu-env.sh

# The X server and the Vulkan loader, unpacked into a folder of their own.
python3 -c "import tarfile; tarfile.open('.gl/glroot.tar.xz').extractall('/tmp')"
g=/tmp/glroot
lib=$g/usr/lib/x86_64-linux-gnu
export LD_LIBRARY_PATH=$lib:${LD_LIBRARY_PATH:-}
# Xvfb runs xkbcomp from its built-in path.
[[ -x /usr/bin/xkbcomp ]] || cp "$g/usr/bin/xkbcomp" /usr/bin/xkbcomp
"$g/usr/bin/Xvfb" :99 -screen 0 1600x1000x24 -nolisten tcp -xkbdir "$g/usr/share/X11/xkb" \
    -extension GLX > /tmp/xvfb.txt 2>&1 &
xvfb=$!
export DISPLAY=:99
# libxkbcommon (winit's keyboard) reads the keymaps from here, not only the server.
export XKB_CONFIG_ROOT=$g/usr/share/X11/xkb
sleep 2
kill -0 $xvfb || { echo "Xvfb did not start"; cat /tmp/xvfb.txt; exit 1; }
sed "s#/usr/lib/x86_64-linux-gnu#$lib#" "$g/usr/share/vulkan/icd.d/lvp_icd.x86_64.json" > /tmp/lvp.json
nv=$(ls /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd*.json /usr/share/vulkan/icd.d/nvidia_icd*.json \
    /etc/vulkan/icd.d/nvidia_icd*.json 2>/dev/null | head -1)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

settings() { # HOME_DIR FP8(true|false) BATCH
    mkdir -p "$1"
    cat > "$1/studio-settings.json" <<JSON
{"model": "random:dev", "device": "cuda", "layout_auto": true,
 "prompt": "a red fox in fresh snow, morning light", "width": 1024, "height": 1024,
 "steps": $steps, "seed": 7, "guidance": 3.5, "random_seed": false, "fp8": $2, "batch": $3,
 "compare_thresholds": [0, 0.08, 0.12, 0.2], "compare_repeats": 3,
 "compare_caches": ["dbcache:f=1,b=1,t=0.3,max=3,warmup=2", "taylorseer:n=3,order=1,warmup=2"]}
JSON
}

studio() { # NAME ICD EXTRA...
    local name=$1 icd=$2
    shift 2
    echo "== studio $name (Vulkan ICD: ${icd:-default})"
    local t0=$SECONDS
    PARALLAX_HOME=/tmp/home-$name VK_ICD_FILENAMES=$icd timeout "${limit:-240}" "$bin" studio \
        --screenshot "$out/studio-gpu-$name.png" --quit-after-job --ui-stats "$out/ui-$name.json" \
        --auto-generate "$@" > "/tmp/studio-$name.txt" 2>&1
    local rc=$?
    echo "rc=$rc, $((SECONDS - t0)) s"
    tail -5 "/tmp/studio-$name.txt"
    return $rc
}

# 1. Which driver draws the window: NVIDIA's if it presents to Xvfb, else lavapipe.
settings /tmp/home-generate false 4
icd=$nv
if [[ -z $nv ]] || ! limit=150 studio generate "$nv"; then
    echo "NVIDIA Vulkan could not draw under Xvfb here: lavapipe draws the window"
    icd=/tmp/lvp.json
    settings /tmp/home-generate false 4
    studio generate "$icd"
fi

# The CLI, the same images (text + steps + decode): 1 warm-up, 4 timed.
echo "== cli bench"
"$bin" bench --device cuda --model random:dev --width 1024 --height 1024 --steps "$steps" \
    --seed 7 --guidance 3.5 --prompt "a red fox in fresh snow, morning light" --runs 4 --warmup 1 \
    > "$out/bench.json" 2> /tmp/bench.txt
echo "rc=$?"
python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('bench total_ms', d.get('total_ms'))" "$out/bench.json"

# 2-3. Compare sweeps, bf16 then FP8.
settings /tmp/home-compare false 1
studio compare "$icd" --compare
settings /tmp/home-compare-fp8 true 1
studio compare-fp8 "$icd" --compare

python3 - "$out" <<'PY'
import json, os, statistics as st, sys
out = sys.argv[1]
for name in ("generate", "compare", "compare-fp8"):
    p = os.path.join(out, f"ui-{name}.json")
    if not os.path.exists(p):
        print(name, "no stats"); continue
    d = json.load(open(p))
    f, l, im = d["frame_ms"], d["preview_latency_ms"], d["image_ms"]
    med = lambda v: st.median(v) if v else float("nan")
    print(f"{name}: {len(f)} frames, frame ms median {med(f):.1f} max {max(f) if f else 0:.1f}; "
          f"step->preview ms median {med(l):.1f} max {max(l) if l else 0:.1f}; "
          f"images {len(im)}: {[round(x) for x in im]} ms; jobs {[round(x) for x in d['job_wall_ms']]} ms")
PY
kill $xvfb
