#!/usr/bin/env bash
# UI responsiveness benchmark: the real studio window under Xvfb (wgpu on Mesa's lavapipe when
# there is no GPU), one generation on the demo model started by --auto-generate; the window
# records the CPU time of every frame drawn while the job runs and, for every step, the time from the
# engine emitting it to the end of the frame that drew its preview. Prints percentiles.
#   bash scripts/ui-bench.sh [SIZE] [STEPS]      (default 512x512 16)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${PARALLAX_BIN:-target/release/parallax}
size=${1:-512x512}
steps=${2:-16}
out=$(mktemp -d)
PARALLAX_HOME="$out/home" xvfb-run -a -s "-screen 0 1400x900x24" \
    "$bin" studio --fresh --auto-generate --size "$size" --steps "$steps" \
    --ui-stats "$out/ui.json" --quit-after-job
python3 - "$out/ui.json" "$size" "$steps" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))] if v else float("nan")
f, l = d["frame_ms"], d["preview_latency_ms"]
print(f"size {sys.argv[2]}, {sys.argv[3]} steps: {len(f)} frames while the job ran, {d['steps_seen']} step events, {len(l)} previews drawn")
print(f"frame time ms: median {pct(f,50):.1f}, p95 {pct(f,95):.1f}, max {max(f) if f else float('nan'):.1f}")
print(f"step -> preview on screen ms: median {pct(l,50):.1f}, p95 {pct(l,95):.1f}, max {max(l) if l else float('nan'):.1f}")
PY
