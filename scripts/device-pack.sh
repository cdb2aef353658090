#!/usr/bin/env bash
# Builds the `cuda` feature here (no GPU needed) and puts what the GPU machine needs in .device/
# (ignored by git; name it in the device tool's `carry`): the stripped binary and gpu-env.sh.
#   bash scripts/device-pack.sh
set -euo pipefail
cd "$(dirname "$0")/.."
toolkit=${CUDA_TOOLKIT_PREFIX:-$HOME/.cache/cuda-13.0}
[[ -f $toolkit/env.sh ]] || bash ../shared/cuda/setup-toolkit.sh "$toolkit"
source "$toolkit/env.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/parallax-cuda-target}
cargo build --release --no-default-features --features cuda
mkdir -p .device
cp "$CARGO_TARGET_DIR/release/parallax" .device/parallax
strip .device/parallax
cp ../shared/cuda/gpu-env.sh .device/gpu-env.sh
ls -la .device
