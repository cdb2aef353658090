#!/usr/bin/env bash
# One GPU call (device tool, `.device` carried; see scripts/device-pack.sh): the
# stale-activation methods on random:dev with one GPU standing in for N ranks (in-process
# threads, each with its own device handle and transformer): PipeFusion (stage-only replicas,
# their weight bytes reported) and displaced patches, the final latent against one device's.
# `diag` runs small cells with debug logs; `sanitize` reruns the displaced cell under
# compute-sanitizer to name the driver call that fails (when it does). Logs and JSON go to $OUT
# (at most 8 files come back).
#   bash scripts/device-stale.sh [diag] [sanitize] [pipe1024] [displaced1024]
set -uo pipefail
out=${OUT:-/tmp/parallax-out}
mkdir -p "$out"
[[ -f .device/parallax.xz ]] && xz -d -f .device/parallax.xz
source .device/gpu-env.sh
bin=.device/parallax
chmod +x "$bin"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m; } \
    >> "$out/calls.log" 2>&1

run() { # name, then command
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$out/calls.log"
    local t0=$SECONDS
    echo "== $name" >> "$out/errors.log"
    "$@" > "$out/$name.out" 2>> "$out/errors.log"
    echo "   rc $? in $((SECONDS - t0)) s" | tee -a "$out/calls.log"
}
stages=${*:-diag pipe1024}
want() { [[ " $stages " == *" $1 "* ]]; }
dev=(--device cuda --model random:dev)
small=(--width 256 --height 256 --steps 4 --prompt "a red circle above a blue square" --seed 3)
big=(--width 1024 --height 1024 --steps 12 --prompt "a red circle above a blue square" --seed 3)

want diag && run diag_pipe env RUST_LOG=parallax=debug RUST_BACKTRACE=1 \
    "$bin" displaced-error "${dev[@]}" "${small[@]}" --cells "" --pipefusion 2:2:1,4:4:4
want diag && run diag_displaced env RUST_LOG=parallax=debug RUST_BACKTRACE=1 \
    "$bin" displaced-error "${dev[@]}" "${small[@]}" --cells 2:1
ok_displaced() { grep -q relative_error "$out/diag_displaced.out" 2> /dev/null; }
# The sanitizer only when the displaced cell failed (it names the driver call that did).
if want sanitize && ! ok_displaced && command -v compute-sanitizer > /dev/null; then
    run sanitize compute-sanitizer --tool memcheck --print-limit 4 --show-backtrace host \
        "$bin" displaced-error "${dev[@]}" "${small[@]}" --cells 2:1
    tail -40 "$out/sanitize.out" >> "$out/calls.log"
fi
want pipe1024 && run pipe1024 env RUST_LOG=parallax=info \
    "$bin" displaced-error "${dev[@]}" "${big[@]}" --cells "" --pipefusion 2:2:12,4:4:12,2:2:1,2:4:1,4:4:1,4:8:1,4:4:4
want displaced1024 && ok_displaced && run displaced1024 env RUST_LOG=parallax=info \
    "$bin" displaced-error "${dev[@]}" "${big[@]}" --cells 2:12,2:1,2:4,4:12,4:1
echo "done" >> "$out/calls.log"
