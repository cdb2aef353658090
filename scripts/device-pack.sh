#!/usr/bin/env bash
# Builds the `cuda` feature here (no GPU needed) and puts what the GPU machine needs in .device/
# (ignored by git; name it in the device tool's `carry`): the stripped binary and gpu-env.sh.
# Builds `--features cuda` (candle CUDA backend with NCCL) unless PARALLAX_CUDA_FEATURES says
# otherwise (PARALLAX_CUDA_FEATURES=cudnn: convolutions through cuDNN, see BENCHMARKS.md).
#   bash scripts/device-pack.sh
set -euo pipefail
cd "$(dirname "$0")/.."
toolkit=${CUDA_TOOLKIT_PREFIX:-$HOME/.cache/cuda-13.0}
[[ -f $toolkit/env.sh ]] || bash ../shared/cuda/setup-toolkit.sh "$toolkit"
source "$toolkit/env.sh"
bash scripts/cuda-link-stubs.sh "$toolkit"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/parallax-cuda-target}
cargo build --release --no-default-features --features "${PARALLAX_CUDA_FEATURES:-cuda}"
mkdir -p .device
cp "$CARGO_TARGET_DIR/release/parallax" .device/parallax
strip .device/parallax
cp ../shared/cuda/gpu-env.sh .device/gpu-env.sh
cp scripts/device-vae.sh .device/device-vae.sh
ls -la .device
