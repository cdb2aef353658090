#!/usr/bin/env bash
# One training call on the GPU machine (run through the device tool, with `.train` carried):
# restores the state that earlier calls brought back (.train/state.tar.part-*), trains for
# BUDGET seconds (train.py stops cleanly and checkpoints), then puts the state and the exported
# weights into $OUT as pieces under 15 MB (the device tool brings back files of at most 16 MB).
#   bash scripts/train-demo/device-train.sh [BUDGET] [extra train.py flags...]
# (e.g. `--init-from ../../assets/demo` to go on from the shipped weights when no state is carried,
# `--stop-after flux` to skip guidance distillation)
# Back here: rm -f .train/state.tar.part-*; cp FILES_AT/state.tar.part-* .train/
set -euo pipefail
cd "$(dirname "$0")"
budget=${1:-540}
shift || true
out=${OUT:-/tmp/out}
mkdir -p "$out" /tmp/train/state /tmp/train/export
if ls ../../.train/state.tar.part-* >/dev/null 2>&1; then
    cat ../../.train/state.tar.part-* | tar -x -C /tmp/train/state
    echo "restored: $(ls /tmp/train/state | tr '\n' ' ')"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
python3 train.py --data ../../.train/data --state /tmp/train/state --budget "$budget" \
    --export /tmp/train/export "$@" 2>&1 | tee "$out/train-call.log"
cp /tmp/train/state/train.log "$out/train.log" 2>/dev/null || true
tar -c -C /tmp/train/state --exclude train.log . | split -b 15M -d - "$out/state.tar.part-"
tar -c -C /tmp/train export | split -b 15M -d - "$out/export.tar.part-"
ls -la "$out"
