#!/usr/bin/env bash
# Builds the `cuda` feature here (no GPU needed) and puts what the GPU machine needs in .device/
# (ignored by git; name it in the device tool's `carry`): the stripped binary and gpu-env.sh.
# Builds `--features cudnn` (cuDNN convolutions, NCCL) unless PARALLAX_CUDA_FEATURES says otherwise
# (e.g. PARALLAX_CUDA_FEATURES=cuda for candle's own convolutions).
#   bash scripts/device-pack.sh
set -euo pipefail
cd "$(dirname "$0")/.."
toolkit=${CUDA_TOOLKIT_PREFIX:-$HOME/.cache/cuda-13.0}
[[ -f $toolkit/env.sh ]] || bash ../shared/cuda/setup-toolkit.sh "$toolkit"
source "$toolkit/env.sh"
bash scripts/cuda-link-stubs.sh "$toolkit"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/parallax-cuda-target}
cargo build --release --features "${PARALLAX_CUDA_FEATURES:-cudnn}"
mkdir -p .device
cp "$CARGO_TARGET_DIR/release/parallax" .device/parallax
strip .device/parallax
cp ../shared/cuda/gpu-env.sh .device/gpu-env.sh
ls -la .device
